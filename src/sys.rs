//! Thin, checked wrappers over the few POSIX calls the gateway needs
//! beyond std: process identity, signals, file locks, users.

pub mod sock_diag;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// Identity of a process that survives pid reuse: its pid and its start
/// time (clock ticks since boot, field 22 of `/proc/PID/stat`). On systems
/// without `/proc` the start time is 0 and only the pid is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcId {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcId {
    pub fn current() -> ProcId {
        let pid = std::process::id();
        ProcId {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        }
    }

    /// Whether this exact process is still alive (not a zombie, not a new
    /// process that reuses the pid).
    pub fn is_alive(self) -> bool {
        if self.pid == 0 || self.pid > i32::MAX as u32 {
            return false;
        }
        if cfg!(target_os = "linux") {
            return start_time(self.pid) == Some(self.start_time);
        }
        // SAFETY: signal 0 only checks for existence and permission.
        let r = unsafe { libc::kill(self.pid as libc::pid_t, 0) };
        r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }

    /// Sends `sig` to this process, but only if it is still this process.
    pub fn signal(self, sig: i32) -> io::Result<()> {
        if !self.is_alive() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: plain kill(2) on a pid we just verified.
        if unsafe { libc::kill(self.pid as libc::pid_t, sig) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Start time of a live, non-zombie process; `None` if it is gone.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_start_time(&stat)
}

/// Reads field 22 (starttime) of a `/proc/PID/stat` line. The command name
/// (field 2) is in parentheses and may itself contain spaces and ')', so
/// fields are counted from the last ')'. Zombies and dead tasks count as gone.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X") | Some(&"x")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The signals the gateway handles, delivered through a self-pipe so the
/// main loop can wait for them with a timeout (portable, unlike sigtimedwait).
pub struct Signals {
    read: OwnedFd,
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    let b = sig as u8;
    // SAFETY: write(2) is async-signal-safe; a full pipe just drops it.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
}

impl Signals {
    pub fn install(signals: &[i32]) -> io::Result<Signals> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe fills two fds.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for fd in [&read, &write] {
            set_flags(fd.as_raw_fd())?;
        }
        SIGNAL_PIPE.store(write.as_raw_fd(), Ordering::Relaxed);
        std::mem::forget(write); // lives as long as the process
        for &sig in signals {
            // SAFETY: installing a handler that only calls write(2).
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(Signals { read })
    }

    /// Waits up to `timeout` for signals; returns those that arrived.
    pub fn wait(&self, timeout: Duration) -> Vec<i32> {
        let mut pfd = libc::pollfd {
            fd: self.read.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        let mut buf = [0u8; 64];
        // SAFETY: non-blocking read into a local buffer.
        let n = unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        buf[..n.max(0) as usize].iter().map(|&b| i32::from(b)).collect()
    }
}

fn set_flags(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An exclusive `flock` held until dropped.
pub struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    pub fn acquire(file: std::fs::File) -> io::Result<FileLock> {
        loop {
            // SAFETY: flock on an open file.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(FileLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// The uid of the process at the other end of a Unix stream socket
/// (SO_PEERCRED on Linux, getpeereid elsewhere).
pub fn peer_uid(s: &std::os::unix::net::UnixStream) -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into a ucred of that size.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(cred.uid)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let (mut uid, mut gid) = (0, 0);
        // SAFETY: getpeereid fills two ids.
        (unsafe { libc::getpeereid(s.as_raw_fd(), &mut uid, &mut gid) } == 0).then_some(uid)
    }
}

/// A user account from the password database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

pub fn user_by_name(name: &str) -> Option<User> {
    let c = CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or NULL; we
    // copy out what we need at once. Called before other threads use it.
    unsafe {
        let pw = libc::getpwnam(c.as_ptr());
        user_from(pw)
    }
}

pub fn user_by_uid(uid: u32) -> Option<User> {
    // SAFETY: as in `user_by_name`.
    unsafe { user_from(libc::getpwuid(uid)) }
}

unsafe fn user_from(pw: *const libc::passwd) -> Option<User> {
    if pw.is_null() {
        return None;
    }
    let pw = &*pw;
    Some(User {
        name: std::ffi::CStr::from_ptr(pw.pw_name)
            .to_string_lossy()
            .into_owned(),
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing() {
        let line = "123 (a b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21";
        assert_eq!(parse_stat_start_time(line), Some(987654));
        let zombie = "123 (x) Z 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20";
        assert_eq!(parse_stat_start_time(zombie), None);
        assert_eq!(parse_stat_start_time("garbage"), None);
        assert_eq!(parse_stat_start_time("1 (x) S 1"), None);
    }

    #[test]
    fn own_process_is_alive_and_pid_reuse_is_not() {
        let me = ProcId::current();
        assert!(me.is_alive());
        let other = ProcId {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        assert!(!other.is_alive(), "same pid, other start time: not us");
    }
}
