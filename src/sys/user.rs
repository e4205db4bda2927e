//! Users: the password database (reentrant lookups) and our own ids.

use std::ffi::CString;

pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// A user account from the password database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
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
pub fn user_by_uid(uid: u32) -> Option<User> {
    // SAFETY: as in `user_by_name`.
    lookup_user(|pw, buf, len, found| unsafe { libc::getpwuid_r(uid, pw, buf, len, found) })
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
            uid: pw.pw_uid,
            gid: pw.pw_gid,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_found_by_name_and_uid() {
        let root = user_by_uid(0).unwrap();
        assert_eq!(root.uid, 0);
        assert_eq!(user_by_name(&root.name), Some(root));
        assert_eq!(user_by_name("no-such-user-pgw"), None);
    }
}
