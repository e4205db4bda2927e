//! Sockets: peer credentials, socket options, resets, non-blocking Unix
//! connects, readiness waits, interface addresses.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::Duration;

use super::user::{Gid, Uid};
use super::{cerr, cerr_retry};

/// Who is at the other end of a Unix stream socket: its uid and gid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: Uid,
    pub gid: Gid,
}

/// The uid of the process at the other end of a Unix stream socket
/// (SO_PEERCRED on Linux, getpeereid elsewhere).
pub fn peer_uid(s: &std::os::unix::net::UnixStream) -> Option<Uid> {
    peer_ids(s).ok().map(|p| p.uid)
}

/// The uid and gid of the process at the other end of a Unix stream
/// socket. For a client, that is the server as it was when it called
/// listen(2): known right after connect(2), whatever the server does next.
/// SO_PEERCRED on Linux; getpeereid (LOCAL_PEERCRED underneath) on macOS
/// and FreeBSD, which gives the same ids.
pub fn peer_ids(s: &std::os::unix::net::UnixStream) -> io::Result<Peer> {
    #[cfg(target_os = "linux")]
    {
        let cred = peer_cred(s.as_raw_fd())?;
        Ok(Peer {
            uid: Uid(cred.uid),
            gid: Gid(cred.gid),
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let (mut uid, mut gid) = (0, 0);
        // SAFETY: getpeereid writes two ids through pointers to locals.
        cerr(unsafe { libc::getpeereid(s.as_raw_fd(), &mut uid, &mut gid) })?;
        Ok(Peer {
            uid: Uid(uid),
            gid: Gid(gid),
        })
    }
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
    cerr(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Sets O_NONBLOCK on `fd` (fcntl: every platform has it, unlike
/// SOCK_NONBLOCK at socket creation).
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with integer arguments on a descriptor the caller holds.
    let flags = cerr(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cerr(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// Sets FD_CLOEXEC on `fd`, so a program we exec does not inherit it.
pub(crate) fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with integer arguments on a descriptor the caller holds.
    cerr(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) }).map(drop)
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

/// Shuts a listening socket down. On Linux that wakes a thread waiting
/// on it in `poll` (a hang-up) or `accept` (EINVAL); macOS and FreeBSD
/// do neither (see `listener::Listener::stop`). std has no shutdown for
/// listeners.
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
    // Linux and FreeBSD set both flags atomically with the socket; macOS
    // has no SOCK_CLOEXEC, so there they are set right after (the gateway
    // execs only at start, before any daemon connection exists).
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    let flags = libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let flags = 0;
    // SAFETY: plain socket(2) with integer arguments; the fd it returns is
    // owned at once below.
    let fd = cerr(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | flags, 0) })?;
    // SAFETY: `fd` is a new socket nobody else owns.
    let s = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    if flags == 0 {
        set_cloexec(fd)?;
        set_nonblocking(fd)?;
    }
    Ok(s)
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
    // The path and its NUL after the fields before it (the family; BSDs
    // also have a length byte first).
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: a valid fd (borrowed) and a sockaddr_un of at least `len` bytes.
    cerr_retry(|| unsafe {
        libc::connect(
            s.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The pid of the process listening on the Linux abstract Unix stream
/// name `name` (without the leading NUL), as the kernel recorded it at
/// listen(2): SO_PEERCRED of a connection made to it, which needs no
/// /proc (hidepid, systemd's ProtectProc, hides other users' processes
/// there). Non-blocking: `WouldBlock` when its backlog is full, another
/// error (ECONNREFUSED, EPROTOTYPE) when no stream socket listens under
/// the name. 0 when that process is outside our pid namespace. The
/// connection is closed at once (`registry::Registration::answer` drops
/// it on the other side).
#[cfg(target_os = "linux")]
pub fn abstract_listener_pid(name: &[u8]) -> io::Result<u32> {
    let s = unix_socket()?;
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if name.is_empty() || name.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "abstract name too long or empty",
        ));
    }
    // An abstract address: a NUL, then the name (no terminator; the
    // length says where it ends).
    for (d, &b) in addr.sun_path[1..].iter_mut().zip(name) {
        *d = b as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + 1 + name.len();
    // SAFETY: a valid fd (borrowed) and a sockaddr_un of at least `len` bytes.
    cerr_retry(|| unsafe {
        libc::connect(
            s.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    })?;
    Ok(peer_cred(s.as_raw_fd())?.pid.max(0) as u32)
}

/// SO_PEERCRED of a connected Unix socket: the peer's pid, uid and gid as
/// the kernel recorded them at connect(2) or listen(2).
#[cfg(target_os = "linux")]
fn peer_cred(fd: std::os::fd::RawFd) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a ucred of that size.
    cerr(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(cred)
}

/// Sets a listening socket's backlog (listen(2) again on a socket that
/// listens already only changes the backlog). pilot-devd uses it to let
/// its backlog fill at once, as a stalled daemon's does.
pub fn set_backlog(fd: &impl AsRawFd, backlog: i32) -> io::Result<()> {
    // SAFETY: a valid fd, borrowed for the call.
    cerr(unsafe { libc::listen(fd.as_raw_fd(), backlog) }).map(drop)
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
    match cerr(unsafe { libc::poll(&mut p, 1, ms) }) {
        Ok(n) => Ok(n > 0),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
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
    cerr(unsafe { libc::getifaddrs(&mut head) })?;
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
