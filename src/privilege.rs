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
//! The same whether it switches to a user or stays uid 0 (a root daemon):
//! see [`restrict`]. The order matters: drop the bounding set and set the
//! securebits (both need CAP_SETPCAP, which root still has; NO_SETUID_FIXUP
//! keeps the permitted set across the uid change), change groups, gid,
//! uid, then capset the two, raise them as ambient, and set NO_NEW_PRIVS.

use std::io;
use std::path::Path;

#[cfg(target_os = "linux")]
use libc::c_ulong;

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

/// Set to `1` by whoever runs the gateway under a user-mode emulator
/// (qemu-user), which adds threads of its own to our process: then
/// [`restrict`] goes on beside them (they keep their capabilities) instead
/// of refusing. Only the operator who starts the gateway sets it.
pub const EMULATED_ENV: &str = "PILOT_GATEWAY_EMULATED";

/// The result of a switch, for the start report.
#[derive(Clone, Debug)]
pub struct Switched {
    pub user: String,
    pub uid: Uid,
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
    if root && no_switch && !daemon.uid.is_root() {
        // A root gateway keeps only its two capabilities (no
        // CAP_DAC_OVERRIDE), so it could not even open another user's
        // socket; and newer daemons serve only their own uid anyway.
        let owner =
            sys::user::user_by_uid(daemon.uid).map_or_else(|| format!("uid {}", daemon.uid), |u| u.name);
        return Err(Error::new(
            Code::PermissionDenied,
            format!(
                "the daemon at {} runs as {owner}, and --no-user-switch keeps the gateway root: newer daemons accept only clients running as their own user, and a root gateway keeps no capability to reach another user's socket",
                socket.display()
            ),
        )
        .hint("leave out --no-user-switch (the gateway then runs as the daemon's user)"));
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

/// Restricts a root-started gateway to [`KEPT`], becoming `user` if one is
/// given, else staying uid 0 (a root daemon, `--user root`,
/// `--no-user-switch`). Either way, afterwards:
///
/// - the bounding set holds only the two, so no exec can gain more;
/// - securebits are set and locked: NOROOT (uid 0 gets no capabilities
///   from exec), NO_SETUID_FIXUP (uid changes neither add nor remove any),
///   KEEP_CAPS cleared and locked; so being uid 0 is worth nothing more;
/// - permitted, effective and inheritable hold exactly the two, and they
///   are raised as ambient so the `ip` we exec keeps them;
/// - NO_NEW_PRIVS is on (no setuid binary or file capability grants more).
///
/// The result is checked with capget, and refused if anything else is
/// left. Must run before the process has a second thread: the capability
/// calls act on the calling thread only. (glibc's set*id apply to every
/// thread; capabilities do not.) The gateway calls this right after
/// installing its signal pipe, which starts no thread, and checks.
#[cfg(target_os = "linux")]
pub fn restrict(user: Option<&User>) -> Result<Switched> {
    let name = user.map_or_else(|| "root".to_string(), |u| u.name.clone());
    let fail = |e: Error| {
        Error::new(
            Code::PermissionDenied,
            format!(
                "cannot restrict the gateway to {} as user {name}: {}",
                KEPT.join(","),
                e.message
            ),
        )
        .hint("run as root, or start the gateway as the daemon's user with --no-user-switch")
    };
    if let Some(n @ 2..) = sys::proc::thread_count() {
        // A user-mode emulator (qemu-user) runs threads of its own in our
        // process, which we cannot restrict; only its operator may say so.
        if !matches!(std::env::var_os(EMULATED_ENV), Some(v) if v == "1") {
            return Err(Error::internal(format!(
                "cannot switch to user {name} with {n} threads running: capabilities are per thread"
            ))
            .hint(format!("under a user-mode emulator (qemu-user), whose own threads keep their capabilities, set {EMULATED_ENV}=1")));
        }
        crate::warn!("{n} threads before the privilege drop ({EMULATED_ENV}=1): the emulator's own threads keep their capabilities");
    }
    let keep = (1u64 << CAP_NET_ADMIN) | (1u64 << CAP_NET_BIND_SERVICE);
    drop_bounding_set(keep).map_err(fail)?;
    set_securebits().map_err(fail)?;
    if let Some(user) = user {
        set_ids(user.uid, user.gid).map_err(fail)?;
    }
    keep_capabilities(keep).map_err(fail)?;
    // SAFETY: prctl with integer arguments (unsigned long, as the variadic
    // prototype reads them); the result is checked.
    sys::cerr(unsafe {
        libc::prctl(
            libc::PR_SET_NO_NEW_PRIVS,
            1 as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
        )
    })
    .map_err(|e| fail(step("prctl(PR_SET_NO_NEW_PRIVS)", e)))?;
    match capabilities_now() {
        Some((eff, prm)) if eff == keep && prm == keep => {}
        got => {
            return Err(Error::internal(format!(
                "after dropping capabilities the gateway still holds {got:x?} (effective, permitted), not {keep:#x}"
            )))
        }
    }
    Ok(Switched {
        user: name,
        uid: sys::user::euid(),
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
    sys::cerr(unsafe {
        libc::prctl(
            libc::PR_SET_KEEPCAPS,
            0 as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
        )
    })
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
    for cap in 0..64u32 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl(PR_CAPBSET_DROP, cap) takes integers only (as
        // unsigned long: prctl is variadic); the result is checked.
        let dropped = unsafe {
            libc::prctl(
                libc::PR_CAPBSET_DROP,
                c_ulong::from(cap),
                0 as c_ulong,
                0 as c_ulong,
                0 as c_ulong,
            )
        };
        match sys::cerr(dropped) {
            // EINVAL: past the kernel's last capability.
            Err(e) if e.raw_os_error() != Some(libc::EINVAL) => {
                return Err(step("dropping the capability bounding set", e))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The securebits a restricted gateway runs with, each with its lock:
/// NOROOT (exec as uid 0 grants nothing), NO_SETUID_FIXUP (uid changes
/// leave capabilities alone, so returning to uid 0 gives none back; and
/// the switch to the user keeps them until they are cut to the two), and
/// KEEP_CAPS locked off.
#[cfg(target_os = "linux")]
const SECUREBITS: c_ulong = {
    const NOROOT: c_ulong = 1 << 0;
    const NOROOT_LOCKED: c_ulong = 1 << 1;
    const NO_SETUID_FIXUP: c_ulong = 1 << 2;
    const NO_SETUID_FIXUP_LOCKED: c_ulong = 1 << 3;
    const KEEP_CAPS_LOCKED: c_ulong = 1 << 5;
    NOROOT | NOROOT_LOCKED | NO_SETUID_FIXUP | NO_SETUID_FIXUP_LOCKED | KEEP_CAPS_LOCKED
};

/// Sets and locks [`SECUREBITS`] (needs CAP_SETPCAP, which root still has).
#[cfg(target_os = "linux")]
fn set_securebits() -> Result<()> {
    let zero = 0 as c_ulong;
    // SAFETY: prctl with integer arguments; the result is checked.
    sys::cerr(unsafe { libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS, zero, zero, zero) })
        .map_err(|e| step("prctl(PR_SET_SECUREBITS)", e))?;
    // SAFETY: as above; PR_GET_SECUREBITS takes no argument.
    let now = sys::cerr(unsafe { libc::prctl(libc::PR_GET_SECUREBITS, zero, zero, zero, zero) })
        .map_err(|e| step("prctl(PR_GET_SECUREBITS)", e))?;
    if now as c_ulong & SECUREBITS != SECUREBITS {
        return Err(Error::internal(format!(
            "securebits are {now:#x} after setting {SECUREBITS:#x}"
        )));
    }
    Ok(())
}

/// capget(2)/capset(2)'s header, version 3 (`_LINUX_CAPABILITY_VERSION_3`):
/// then two [`CapData`] words per set, bits 0–31 and 32–63.
#[cfg(target_os = "linux")]
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[cfg(target_os = "linux")]
impl CapHeader {
    /// This thread (pid 0), layout version 3.
    fn v3() -> CapHeader {
        CapHeader {
            version: 0x2008_0522,
            pid: 0,
        }
    }
}

/// One 32-bit word of each capability set, as capget/capset use it.
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// This thread's effective and permitted capability sets (capget, v3).
#[cfg(target_os = "linux")]
fn capabilities_now() -> Option<(u64, u64)> {
    let mut header = CapHeader::v3();
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two v3 data words into `data`, which has room
    // for them; both pointers outlive the call. The result is checked.
    sys::cerr(unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, data.as_mut_ptr()) })
        .ok()?;
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Some((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
    ))
}

/// capset(2) to exactly `keep` (effective, permitted, inheritable), then
/// raises the kept ones as ambient so the `ip` we exec inherits them.
#[cfg(target_os = "linux")]
fn keep_capabilities(keep: u64) -> Result<()> {
    let mut header = CapHeader::v3();
    let lo = keep as u32;
    let empty = CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    };
    let data = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: lo,
        },
        empty,
    ];
    // SAFETY: the header and the two data words have the v3 layout capset
    // reads; both outlive the call. The result is checked.
    sys::cerr(unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) })
        .map_err(|e| step("capset", e))?;
    for cap in [CAP_NET_ADMIN, CAP_NET_BIND_SERVICE] {
        let raise = libc::PR_CAP_AMBIENT_RAISE as c_ulong;
        let zero = 0 as c_ulong;
        // SAFETY: prctl with integer arguments (unsigned long, as the
        // variadic prototype reads them); the result is checked.
        sys::cerr(unsafe { libc::prctl(libc::PR_CAP_AMBIENT, raise, c_ulong::from(cap), zero, zero) })
            .map_err(|e| step("raising ambient capabilities", e))?;
    }
    Ok(())
}

/// What a running process holds, as `/proc/PID/status` shows it (readable
/// by everyone): its uid, its effective, permitted, bounding and ambient
/// capability sets, and NoNewPrivs. For `status`, which asks about the
/// live gateway rather than trusting a record of it. `None` without
/// `/proc` or once the process is gone.
pub fn describe(pid: u32) -> Option<Privileges> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let caps = |name: &str| field(name).and_then(|v| u64::from_str_radix(v, 16).ok());
    Some(Privileges {
        uid: field("Uid:")?.split_whitespace().nth(1)?.parse().ok()?,
        effective: caps("CapEff:")?,
        permitted: caps("CapPrm:")?,
        bounding: caps("CapBnd:")?,
        ambient: caps("CapAmb:").unwrap_or(0),
        no_new_privs: field("NoNewPrivs:") == Some("1"),
    })
}

/// A process's privileges (see [`describe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Privileges {
    /// The effective uid.
    pub uid: u32,
    pub effective: u64,
    pub permitted: u64,
    pub bounding: u64,
    pub ambient: u64,
    pub no_new_privs: bool,
}

impl Privileges {
    /// The effective set by name (`cap_net_admin`, …; unknown ones as
    /// `cap_N`).
    pub fn names(&self) -> Vec<String> {
        const NAMES: [&str; 41] = [
            "cap_chown",
            "cap_dac_override",
            "cap_dac_read_search",
            "cap_fowner",
            "cap_fsetid",
            "cap_kill",
            "cap_setgid",
            "cap_setuid",
            "cap_setpcap",
            "cap_linux_immutable",
            "cap_net_bind_service",
            "cap_net_broadcast",
            "cap_net_admin",
            "cap_net_raw",
            "cap_ipc_lock",
            "cap_ipc_owner",
            "cap_sys_module",
            "cap_sys_rawio",
            "cap_sys_chroot",
            "cap_sys_ptrace",
            "cap_sys_pacct",
            "cap_sys_admin",
            "cap_sys_boot",
            "cap_sys_nice",
            "cap_sys_resource",
            "cap_sys_time",
            "cap_sys_tty_config",
            "cap_mknod",
            "cap_lease",
            "cap_audit_write",
            "cap_audit_control",
            "cap_setfcap",
            "cap_mac_override",
            "cap_mac_admin",
            "cap_syslog",
            "cap_wake_alarm",
            "cap_block_suspend",
            "cap_audit_read",
            "cap_perfmon",
            "cap_bpf",
            "cap_checkpoint_restore",
        ];
        (0..64usize)
            .filter(|&c| self.effective & (1 << c) != 0)
            .map(|c| NAMES.get(c).map_or_else(|| format!("cap_{c}"), |n| n.to_string()))
            .collect()
    }
}

#[cfg(not(target_os = "linux"))]
pub fn restrict(user: Option<&User>) -> Result<Switched> {
    // Elsewhere there are no capabilities to drop: a root gateway stays
    // root (SECURITY.md says so).
    match user {
        None => Ok(Switched {
            user: "root".into(),
            uid: Uid(0),
            capabilities: Vec::new(),
        }),
        Some(user) => Err(Error::new(
            Code::NotSupported,
            format!(
                "switching to user {} with kept capabilities is supported on Linux only",
                user.name
            ),
        )
        .hint("start the gateway as the daemon's user")),
    }
}
