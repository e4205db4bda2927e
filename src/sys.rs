//! Thin, checked wrappers over the few POSIX calls the gateway needs
//! beyond std: process identity, signals, file locks, users, socket
//! options, interface addresses, detaching. Every `unsafe` block of the
//! product outside `privilege.rs` is here (the rest of the crate denies
//! `unsafe_code`), each with a SAFETY note that says why it holds.

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
    // SAFETY: errno_location returns this thread's errno slot; write(2) is
    // async-signal-safe and a full pipe just drops the byte. errno is saved
    // and restored, so the interrupted code never sees write's EAGAIN.
    unsafe {
        let errno = errno_location();
        let saved = *errno;
        libc::write(fd, (&b as *const u8).cast(), 1);
        *errno = saved;
    }
}

/// The calling thread's `errno`.
#[cfg(any(target_os = "linux", target_os = "android"))]
unsafe fn errno_location() -> *mut libc::c_int {
    libc::__errno_location()
}

/// The calling thread's `errno`.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
unsafe fn errno_location() -> *mut libc::c_int {
    libc::__error()
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
            // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the
            // handler only saves errno, calls write(2) and restores errno, all
            // async-signal-safe, on a pipe stored before it is installed.
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
    peer_ids(s).map(|(uid, _)| uid)
}

/// The uid and gid of the process at the other end of a Unix stream
/// socket. For a client, that is the server as it was when it called
/// listen(2): known right after connect(2), whatever the server does next.
pub fn peer_ids(s: &std::os::unix::net::UnixStream) -> Option<(u32, u32)> {
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
        (r == 0).then_some((cred.uid, cred.gid))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let (mut uid, mut gid) = (0, 0);
        // SAFETY: getpeereid fills two ids.
        (unsafe { libc::getpeereid(s.as_raw_fd(), &mut uid, &mut gid) } == 0).then_some((uid, gid))
    }
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

/// Whether we may write `path` (access(2) with W_OK, real ids).
pub fn can_write(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) on a NUL-terminated path that outlives the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Resets and closes a TCP connection we will not serve (or that ends
/// abnormally): RST instead of FIN, so the peer never takes it for a
/// complete stream.
pub fn reset(tcp: std::net::TcpStream) {
    set_linger_zero(&tcp);
    drop(tcp);
}

/// SO_LINGER with a zero timeout: `close` then sends RST instead of FIN,
/// telling the peer the stream did not end normally.
pub fn set_linger_zero(tcp: &std::net::TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // Best effort: the stream is about to be closed either way.
    let _ = set_sock_opt(tcp, libc::SOL_SOCKET, libc::SO_LINGER, &l);
}

/// setsockopt(2) with the plain-data option value `v`.
pub(crate) fn set_sock_opt<T: Copy>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: &T,
) -> io::Result<()> {
    // SAFETY: a valid fd (borrowed for the call) and `v`, a live,
    // initialised value whose exact size we pass; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes written to a TCP socket that its peer has not acknowledged yet
/// (SIOCOUTQ). `None` where the kernel cannot say (not Linux, an error).
pub fn unsent_bytes(tcp: &std::net::TcpStream) -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int through the pointer,
        // which points to a local int; the fd is borrowed for the call.
        let r = unsafe { libc::ioctl(tcp.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
        (r == 0).then(|| usize::try_from(n).unwrap_or(0))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = tcp;
        None
    }
}

/// Shuts a listening socket down, which wakes a thread blocked in
/// `accept` on it (EINVAL on Linux). std has no shutdown for listeners.
pub fn shutdown_listener(socket: &std::net::TcpListener) {
    // SAFETY: the fd is valid while `socket` is borrowed; shutdown(2)
    // does not close it, so it cannot be reused under another thread.
    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
}

/// A Unix stream socket, not connected yet, in non-blocking mode: the
/// relay creates it on the accept thread (so the connection owns its
/// descriptor from the start) and connects it from the connection's own
/// thread with [`unix_connect`].
pub fn unix_socket() -> io::Result<std::os::unix::net::UnixStream> {
    // SAFETY: plain socket(2); the fd it returns is owned at once below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns.
    Ok(unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) })
}

/// One connect(2) of a socket from [`unix_socket`] to `path`. A
/// non-blocking Unix connect never waits: `WouldBlock` (EAGAIN) means the
/// listener's backlog is full (a stalled or stopped daemon), and the
/// caller decides how long to keep retrying.
pub fn unix_connect(s: &std::os::unix::net::UnixStream, path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or invalid",
        ));
    }
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: a valid fd (borrowed) and a sockaddr_un of at least `len` bytes.
        let r = unsafe {
            libc::connect(
                s.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Raises the soft limit on open descriptors to the hard limit; returns
/// the soft limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    // SAFETY: rlimit is plain data; getrlimit fills it.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if rl.rlim_cur < rl.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: rl.rlim_max,
            rlim_max: rl.rlim_max,
        };
        // SAFETY: a valid pointer to an rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            rl.rlim_cur = rl.rlim_max;
        }
    }
    Ok(rl.rlim_cur as u64)
}

/// Sets a listening socket's backlog (listen(2) again on a socket that
/// listens already only changes the backlog). pilot-devd uses it to let
/// its backlog fill at once, as a stalled daemon's does.
pub fn set_backlog(fd: &impl AsRawFd, backlog: i32) -> io::Result<()> {
    // SAFETY: a valid fd, borrowed for the call.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Hands freed heap memory back to the system. glibc keeps what thousands
/// of connection threads freed in its per-thread arenas; without this, RSS
/// after a burst stays near its peak. Other C libraries return memory on
/// their own or offer no such call.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists, under
    // the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Waits until `fd` has something to read, or has hung up or failed
/// (`true`; the next read says which), or `timeout` passes (`false`). A
/// signal also returns `false`: callers re-check their limits and wait
/// again. This lets a connection thread block on its socket without
/// holding a read buffer.
pub fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Rounded up, so a short wait never becomes a busy loop of zeros.
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one live pollfd, and we pass a count of exactly one.
    match unsafe { libc::poll(&mut p, 1, ms) } {
        n if n > 0 => Ok(true),
        0 => Ok(false),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// Whether a read on `fd` would return at once (data, EOF or an error);
/// when it cannot tell, it says yes, so a caller keeps its buffer.
pub fn readable_now(fd: &impl AsRawFd) -> bool {
    wait_readable(fd, Duration::ZERO).unwrap_or(true)
}

/// Makes `cmd`'s child a session leader (setsid), detaching it from our
/// terminal and process group.
pub fn new_session_on_spawn(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls
    // only setsid(2), which is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}

/// Points our stdout (fd 1) at `file`, e.g. /dev/null once nobody reads
/// the pipe it was.
pub fn redirect_stdout(file: &std::fs::File) -> io::Result<()> {
    // SAFETY: dup2 onto fd 1 from a file that stays open for the call;
    // std's stdout handle keeps using fd 1, which now names `file`.
    if unsafe { libc::dup2(file.as_raw_fd(), 1) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One IPv4 address of a network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddr {
    pub interface: String,
    pub addr: std::net::Ipv4Addr,
    pub prefix: u8,
    pub loopback: bool,
}

/// Every IPv4 address on every interface (getifaddrs).
pub fn interface_addresses() -> io::Result<Vec<InterfaceAddr>> {
    let mut out = Vec::new();
    each_ifaddr(|ifa| {
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            return;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            return;
        }
        // SAFETY: the family is AF_INET, so address and (non-null) netmask
        // are sockaddr_in.
        let (addr, mask) = unsafe {
            let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let m = if ifa.ifa_netmask.is_null() {
                u32::MAX
            } else {
                u32::from_be((*(ifa.ifa_netmask as *const libc::sockaddr_in)).sin_addr.s_addr)
            };
            (std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), m)
        };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        out.push(InterfaceAddr {
            interface: name.to_string_lossy().into_owned(),
            addr,
            prefix: mask.count_ones() as u8,
            loopback: ifa.ifa_flags & (libc::IFF_LOOPBACK as libc::c_uint) != 0,
        });
    })?;
    Ok(out)
}

/// Every address, IPv4 and IPv6, that an interface of this host has
/// (getifaddrs): what "on this host" means, whatever a bind would accept
/// (`ip_nonlocal_bind` lets a socket bind any address).
pub fn host_ips() -> io::Result<Vec<std::net::IpAddr>> {
    let mut out = Vec::new();
    each_ifaddr(|ifa| {
        if ifa.ifa_addr.is_null() {
            return;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr whose
        // family says which sockaddr it is.
        match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                // SAFETY: AF_INET: a sockaddr_in.
                let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into());
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6: a sockaddr_in6.
                let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).into());
            }
            _ => {}
        }
    })?;
    Ok(out)
}

/// Calls `f` with each entry of the interface address list (getifaddrs);
/// the entries, and all they point to, live only during the call.
fn each_ifaddr(mut f: impl FnMut(&libc::ifaddrs)) -> io::Result<()> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, which
        // lives until freeifaddrs below.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        f(ifa);
    }
    // SAFETY: `head` came from getifaddrs and is freed once; `f` got only
    // borrows for the length of its call, so nothing uses it after this.
    unsafe { libc::freeifaddrs(head) };
    Ok(())
}

/// Makes `name` a C string, refusing an interior NUL.
fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn c_path(path: &std::path::Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Creates directory `path` with `mode` (EEXIST is returned as is: the
/// caller decides whether what exists is acceptable).
pub fn mkdir(path: &std::path::Path, mode: u32) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: mkdir(2) on a NUL-terminated path that outlives the call.
    if unsafe { libc::mkdir(c.as_ptr(), mode as libc::mode_t) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens `path` as a directory descriptor, refusing a symlink as the
/// last component (O_NOFOLLOW) and anything that is not a directory.
pub fn open_dir(path: &std::path::Path) -> io::Result<std::fs::File> {
    let c = c_path(path)?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: open(2) on a NUL-terminated path; the fd is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// openat(2) relative to the directory `dir`, always with O_NOFOLLOW and
/// O_CLOEXEC added, so a planted symlink is never followed.
pub fn open_at(dir: &std::fs::File, name: &str, flags: i32, mode: u32) -> io::Result<std::fs::File> {
    let c = c_name(name)?;
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: openat(2) with a valid directory fd (borrowed for the call)
    // and a NUL-terminated name; the fd returned is owned below.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// renameat(2) within one directory.
pub fn rename_at(dir: &std::fs::File, from: &str, to: &str) -> io::Result<()> {
    let (f, t) = (c_name(from)?, c_name(to)?);
    let d = dir.as_raw_fd();
    // SAFETY: a valid directory fd and two NUL-terminated names.
    if unsafe { libc::renameat(d, f.as_ptr(), d, t.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// unlinkat(2) of a non-directory entry (a symlink itself is removed,
/// never followed).
pub fn unlink_at(dir: &std::fs::File, name: &str) -> io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: a valid directory fd and a NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What fstatat(AT_SYMLINK_NOFOLLOW) says of an entry.
#[derive(Clone, Copy, Debug)]
pub struct EntryStat {
    pub regular: bool,
    pub uid: u32,
    pub nlink: u64,
}

/// fstatat(2) with AT_SYMLINK_NOFOLLOW: describes the entry itself.
pub fn stat_at(dir: &std::fs::File, name: &str) -> io::Result<EntryStat> {
    let c = c_name(name)?;
    // SAFETY: all-zero is a valid `stat`; fstatat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid directory fd, a NUL-terminated name and a `stat` of
    // the right type that outlives the call.
    if unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(EntryStat {
        regular: st.st_mode & libc::S_IFMT == libc::S_IFREG,
        uid: st.st_uid,
        nlink: st.st_nlink as u64,
    })
}

/// fchownat(2) with AT_SYMLINK_NOFOLLOW: changes the entry itself.
pub fn chown_at(dir: &std::fs::File, name: &str, uid: u32, gid: u32) -> io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: a valid directory fd and a NUL-terminated name.
    let r = unsafe { libc::fchownat(dir.as_raw_fd(), c.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The real and effective uid of a process, from the `Uid:` line of
/// `/proc/PID/status` (readable by everyone).
pub fn process_uids(pid: u32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(|t| t.parse::<u32>().ok());
    Some((ids.next()??, ids.next()??))
}

/// Whether process `pid` runs this same program: `/proc/PID/exe` names
/// the same file as `/proc/self/exe` (device and inode), or — when the
/// binary was replaced in place since the process started — the same
/// path with " (deleted)" after it. `None` when we may not look
/// (EACCES: the process is not dumpable and we lack CAP_SYS_PTRACE).
pub fn runs_same_program(pid: u32) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let theirs = format!("/proc/{pid}/exe");
    let ours = std::fs::metadata("/proc/self/exe").ok()?;
    match std::fs::metadata(&theirs) {
        Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => return Some(true),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return None,
        Err(_) => return Some(false),
    }
    let (Ok(t), Ok(o)) = (std::fs::read_link(&theirs), std::fs::read_link("/proc/self/exe")) else {
        return Some(false);
    };
    let t = t.to_string_lossy().into_owned();
    let o = o.to_string_lossy().into_owned();
    let o = o.strip_suffix(" (deleted)").unwrap_or(&o);
    Some(t.strip_suffix(" (deleted)") == Some(o))
}

/// How many threads this process has (Linux: /proc/self/task); `None`
/// where that cannot be seen.
pub fn thread_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/task").ok().map(Iterator::count)
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
    fn users_are_found_by_name_and_uid() {
        let root = user_by_uid(0).unwrap();
        assert_eq!(root.uid, 0);
        assert_eq!(user_by_name(&root.name), Some(root));
        assert_eq!(user_by_name("no-such-user-pgw"), None);
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
