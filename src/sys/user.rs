//! Users: typed ids, the password database (reentrant lookups), our own
//! ids and changing them.

use std::ffi::CString;
use std::fmt;
use std::io;

use super::cerr;

/// A user id. Typed, so a gid or a pid is never passed where a uid is
/// meant; shown as the bare number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Uid(pub u32);

/// A group id (see [`Uid`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gid(pub u32);

impl Uid {
    pub const ROOT: Uid = Uid(0);

    pub fn is_root(self) -> bool {
        self == Uid::ROOT
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

pub fn euid() -> Uid {
    // SAFETY: geteuid takes no arguments and cannot fail.
    Uid(unsafe { libc::geteuid() })
}

/// A user account from the password database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Clears the supplementary groups (needs root).
pub fn clear_groups() -> io::Result<()> {
    // SAFETY: a NULL list of length 0; only this process's credentials change.
    cerr(unsafe { libc::setgroups(0, std::ptr::null()) }).map(drop)
}

/// Sets the real, effective and saved gid (needs root). setresgid where
/// it exists; macOS has none, and its setgid sets all three for root.
pub fn set_gid(gid: Gid) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    // SAFETY: integer arguments; only this process's credentials change.
    let r = unsafe { libc::setresgid(gid.0, gid.0, gid.0) };
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    // SAFETY: integer argument; only this process's credentials change.
    let r = unsafe { libc::setgid(gid.0) };
    cerr(r).map(drop)
}

/// Sets the real, effective and saved uid (needs root), as [`set_gid`].
pub fn set_uid(uid: Uid) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    // SAFETY: integer arguments; only this process's credentials change.
    let r = unsafe { libc::setresuid(uid.0, uid.0, uid.0) };
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    // SAFETY: integer argument; only this process's credentials change.
    let r = unsafe { libc::setuid(uid.0) };
    cerr(r).map(drop)
}

/// Looks a user up by name (getpwnam_r: safe in a threaded process).
pub fn user_by_name(name: &str) -> Option<User> {
    let c = CString::new(name).ok()?;
    // SAFETY: getpwnam_r writes into `pw` and `buf`, both ours and sized
    // as passed; `found` points to `pw` or is NULL.
    lookup_user(|pw, buf, len, found| unsafe { libc::getpwnam_r(c.as_ptr(), pw, buf, len, found) })
}

/// Looks a user up by uid (getpwuid_r: safe in a threaded process; the
/// running gateway calls it from its main thread while connection threads
/// run).
pub fn user_by_uid(uid: Uid) -> Option<User> {
    // SAFETY: as in `user_by_name`.
    lookup_user(|pw, buf, len, found| unsafe { libc::getpwuid_r(uid.0, pw, buf, len, found) })
}

/// Runs a reentrant password-database lookup with a caller-owned buffer,
/// growing it on ERANGE (bounded), and copies the answer out.
fn lookup_user(
    call: impl Fn(*mut libc::passwd, *mut libc::c_char, usize, *mut *mut libc::passwd) -> libc::c_int,
) -> Option<User> {
    let mut len = 1024;
    while len <= 1 << 20 {
        let mut buf = vec![0 as libc::c_char; len];
        // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids);
        // it is only read after getpw*_r filled it.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let r = call(&mut pw, buf.as_mut_ptr(), buf.len(), &mut found);
        if r == libc::ERANGE {
            len *= 4;
            continue;
        }
        if r != 0 || found.is_null() || pw.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success pw_name points to a NUL-terminated string in
        // `buf`, which is still alive here.
        let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
        return Some(User {
            name: name.to_string_lossy().into_owned(),
            uid: Uid(pw.pw_uid),
            gid: Gid(pw.pw_gid),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_found_by_name_and_uid() {
        let root = user_by_uid(Uid::ROOT).unwrap();
        assert_eq!(root.uid, Uid(0));
        assert_eq!(user_by_name(&root.name), Some(root));
        assert_eq!(user_by_name("no-such-user-pgw"), None);
    }
}
