//! Least privilege: a gateway started as root runs as the daemon's user
//! (or `--user`), keeping only the two capabilities it needs.
//!
//! Why: newer daemons accept IPC only from their own UID (root included),
//! so a root gateway cannot talk to a daemon run by an ordinary user. And a
//! network-facing process should not keep root anyway.
//!
//! What it keeps: CAP_NET_ADMIN (loopback aliases) and CAP_NET_BIND_SERVICE
//! (ports below 1024), as *ambient* capabilities, so the `ip` command we run
//! for aliases inherits them across exec. Everything else is dropped,
//! including from the bounding set, and supplementary groups are cleared.
//!
//! The order matters: drop the bounding set (needs CAP_SETPCAP, which root
//! still has), set KEEPCAPS so setuid keeps the permitted set, change
//! groups, gid, uid, then capset the two and raise them as ambient.

use std::io;
use std::path::Path;

use crate::error::{Code, Error, Result};
use crate::sys;
use crate::sys::net::Peer;
use crate::sys::user::{Gid, Uid, User};

/// The capabilities a switched gateway keeps, by name.
pub const KEPT: [&str; 2] = ["cap_net_admin", "cap_net_bind_service"];
#[cfg(target_os = "linux")]
const CAP_NET_BIND_SERVICE: u32 = 10;
#[cfg(target_os = "linux")]
const CAP_NET_ADMIN: u32 = 12;

/// The result of a switch, for the start report.
#[derive(Clone, Debug)]
pub struct Switched {
    pub user: String,
    pub capabilities: Vec<String>,
}

/// Decides whether to switch, and to whom: `--user NAME`; else, when root,
/// the daemon's user if that is not root.
///
/// `daemon`: who serves the socket, from the peer credentials of a
/// connection made just before (`daemon::identify`), never from a stat of
/// the path, which a local user can race. The same uid is then required
/// of every later connection (`ipc::connect_by`). See [`check_daemon`]
/// for which daemons are accepted.
pub fn target_user(
    flag: Option<&str>,
    no_switch: bool,
    socket: &Path,
    searched: bool,
    daemon: Peer,
) -> Result<Option<User>> {
    let root = sys::user::euid().is_root();
    let named = flag
        .map(|name| {
            sys::user::user_by_name(name)
                .or_else(|| name.parse().ok().map(Uid).and_then(sys::user::user_by_uid))
                .ok_or_else(|| Error::invalid(format!("--user {name}: no such user")))
        })
        .transpose()?;
    check_daemon(socket, searched, daemon.uid, named.as_ref())?;
    if let (Some(name), Some(user)) = (flag, named) {
        if user.uid == sys::user::euid() {
            return Ok(None);
        }
        if !root {
            return Err(Error::new(
                Code::PermissionDenied,
                format!("--user {name} needs root: only root can switch to another user"),
            )
            .hint("run the command as root, or leave out --user"));
        }
        return Ok((!user.uid.is_root()).then_some(user));
    }
    if !root || no_switch || daemon.uid.is_root() {
        return Ok(None);
    }
    Ok(Some(sys::user::user_by_uid(daemon.uid).unwrap_or(User {
        name: daemon.uid.to_string(),
        uid: daemon.uid,
        gid: daemon.gid,
    })))
}

/// Which daemons a start accepts, by the uid `daemon` serving `socket`:
///
/// - any start: our own uid, root, or `--user`'s. Upstream daemons v1.9+
///   serve only clients of their own uid, so the daemon of a non-root
///   gateway is its own user's (or root's); any other uid is someone
///   else's socket. A root start may also switch to the daemon's user,
///   so for root this rule leaves every daemon named by `--socket`,
///   `$PILOT_SOCKET` or a config file.
/// - a socket found by the default search (`searched`) in a directory
///   others may write (sticky `/tmp`): anyone may have bound it, so for a
///   root start it must be served by root or by `--user`'s uid.
fn check_daemon(socket: &Path, searched: bool, daemon: Uid, named: Option<&User>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = sys::user::euid();
    if !me.is_root() && daemon != me && !daemon.is_root() && named.map(|u| u.uid) != Some(daemon) {
        return Err(Error::new(
            Code::PermissionDenied,
            format!(
                "the process serving daemon socket {} runs as uid {daemon}, neither our own uid {me} nor root: it is not this user's daemon",
                socket.display()
            ),
        )
        .hint("name your daemon's socket with --socket PATH, or run the gateway as the daemon's user (as root, --user NAME)"));
    }
    if !me.is_root() || !searched {
        return Ok(());
    }
    let parent = socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let open_dir = std::fs::metadata(parent).map_or(true, |m| m.mode() & 0o022 != 0);
    match named {
        _ if !open_dir || daemon.is_root() => Ok(()),
        Some(u) if daemon == u.uid => Ok(()),
        Some(u) => Err(Error::new(
            Code::PermissionDenied,
            format!(
                "the process serving daemon socket {} runs as uid {daemon}, which belongs not to --user {} (uid {}) nor to root",
                socket.display(),
                u.name,
                u.uid
            ),
        )
        .hint("name the daemon's socket with --socket PATH, or the daemon's user with --user NAME")),
        None => Err(Error::new(
            Code::PermissionDenied,
            format!(
                "daemon socket {} (found by the default search) is in {}, which any local user can write, and the process serving it runs as uid {daemon}, not root: it may not be the daemon",
                socket.display(),
                parent.display()
            ),
        )
        .hint("say which daemon to use: --socket PATH, or --user NAME for the daemon's user")),
    }
}

/// Becomes `user`, keeping only [`KEPT`] (see the module docs).
///
/// Must run before the process has a second thread: the capability calls
/// (prctl, capset) act on the calling thread only, so a thread that
/// existed before would keep root's capabilities. (glibc's set*id apply
/// to every thread; capabilities do not.) The gateway calls this right
/// after installing its signal pipe, which starts no thread, and checks.
#[cfg(target_os = "linux")]
pub fn switch_to(user: &User) -> Result<Switched> {
    let fail = |e: Error| {
        Error::new(
            Code::PermissionDenied,
            format!("cannot switch to user {}: {}", user.name, e.message),
        )
        .hint("run as root, or start the gateway as the daemon's user with --no-user-switch")
    };
    if let Some(n @ 2..) = sys::proc::thread_count() {
        return Err(Error::internal(format!(
            "cannot switch to user {} with {n} threads running: capabilities are per thread",
            user.name
        )));
    }
    let keep = (1u64 << CAP_NET_ADMIN) | (1u64 << CAP_NET_BIND_SERVICE);
    drop_bounding_set(keep).map_err(fail)?;
    change_ids(user).map_err(fail)?;
    keep_capabilities(keep).map_err(fail)?;
    Ok(Switched {
        user: user.name.clone(),
        capabilities: KEPT.iter().map(|s| s.to_string()).collect(),
    })
}

/// Makes a root-run command the state directory's owner `uid:gid` for
/// good: no supplementary groups, real/effective/saved ids all set, no
/// capabilities (setresuid from root to a non-zero uid without KEEPCAPS
/// clears the permitted, effective and ambient sets). Commands need none:
/// from here on they can do to the directory and the gateway only what
/// its user could, so a planted link or a forged pid gains nothing.
///
/// Must run before the command starts a thread: glibc applies set*id to
/// every thread, but capabilities and KEEPCAPS are per thread, so it is
/// checked rather than assumed.
pub fn become_owner(uid: Uid, gid: Gid) -> Result<()> {
    if uid.is_root() || !sys::user::euid().is_root() {
        return Ok(());
    }
    if let Some(n @ 2..) = sys::proc::thread_count() {
        return Err(Error::internal(format!(
            "cannot become uid {uid} with {n} threads running"
        )));
    }
    let fail = |e: Error| {
        Error::new(
            Code::PermissionDenied,
            format!(
                "cannot become the state directory's owner (uid {uid}): {}",
                e.message
            ),
        )
    };
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with integer arguments; its result is checked.
    sys::cerr(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) })
        .map_err(|e| fail(step("prctl(PR_SET_KEEPCAPS)", e)))?;
    set_ids(uid, gid).map_err(fail)?;
    if sys::user::euid() != uid {
        return Err(fail(Error::internal("the effective uid did not change")));
    }
    Ok(())
}

/// Clears the supplementary groups, then sets gid and uid (real,
/// effective, saved).
fn set_ids(uid: Uid, gid: Gid) -> Result<()> {
    sys::user::clear_groups().map_err(|e| step("setgroups", e))?;
    sys::user::set_gid(gid).map_err(|e| step("setting the group id", e))?;
    sys::user::set_uid(uid).map_err(|e| step("setting the user id", e))
}

/// A failed step of a switch: which, and what the system said.
fn step(what: &str, err: io::Error) -> Error {
    Error::new(Code::PermissionDenied, format!("{what}: {err}"))
}

/// Drops every capability but `keep` from the bounding set (needs
/// CAP_SETPCAP, which root still has).
#[cfg(target_os = "linux")]
fn drop_bounding_set(keep: u64) -> Result<()> {
    for cap in 0..64u64 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl(PR_CAPBSET_DROP, cap) takes integers only; the
        // result is checked.
        match sys::cerr(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) }) {
            // EINVAL: past the kernel's last capability.
            Err(e) if e.raw_os_error() != Some(libc::EINVAL) => {
                return Err(step("dropping the capability bounding set", e))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Sets KEEPCAPS (so setuid keeps the permitted set), clears the
/// supplementary groups, then sets gid and uid (real, effective, saved).
#[cfg(target_os = "linux")]
fn change_ids(user: &User) -> Result<()> {
    // SAFETY: prctl with integer arguments; its result is checked.
    sys::cerr(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) })
        .map_err(|e| step("prctl(PR_SET_KEEPCAPS)", e))?;
    set_ids(user.uid, user.gid)
}

/// capset(2) to exactly `keep` (effective, permitted, inheritable), then
/// raises the kept ones as ambient so the `ip` we exec inherits them.
#[cfg(target_os = "linux")]
fn keep_capabilities(keep: u64) -> Result<()> {
    // capset(2) with the v3 layout: a header, then two 32-bit words per set.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let lo = keep as u32;
    let empty = Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    };
    let data = [
        Data {
            effective: lo,
            permitted: lo,
            inheritable: lo,
        },
        empty,
    ];
    // SAFETY: the header and the two data words have the v3 layout capset
    // reads; both outlive the call. The result is checked.
    sys::cerr(unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) })
        .map_err(|e| step("capset", e))?;
    for cap in [CAP_NET_ADMIN, CAP_NET_BIND_SERVICE] {
        let raise = libc::PR_CAP_AMBIENT_RAISE as u64;
        // SAFETY: prctl with integer arguments; the result is checked.
        sys::cerr(unsafe { libc::prctl(libc::PR_CAP_AMBIENT, raise, u64::from(cap), 0, 0) })
            .map_err(|e| step("raising ambient capabilities", e))?;
    }
    // SAFETY: prctl with integer arguments; clearing KEEPCAPS cannot fail
    // in a way that matters (the switch is done).
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn switch_to(user: &User) -> Result<Switched> {
    Err(Error::new(
        Code::NotSupported,
        format!(
            "switching to user {} with kept capabilities is supported on Linux only",
            user.name
        ),
    )
    .hint("start the gateway as the daemon's user"))
}
