//! Whether a local TCP client has *closed* its socket or only shut down
//! its sending side, asked of the kernel through NETLINK_SOCK_DIAG.
//!
//! Both look the same on the wire (a FIN), so after a client's EOF the
//! relay cannot tell them apart. But the gateway's clients are on this host,
//! so the kernel holds the client's own socket too: once the client has
//! closed it, no file owns it any more (an orphan: sock_diag reports inode
//! 0, in FIN_WAIT2 or, as a timewait socket, TIME_WAIT); after
//! `shutdown(SHUT_WR)` the file and its inode stay.
//!
//! One exact-match request per call (the kernel hashes the 4-tuple, as for
//! an incoming packet; no dump, no `/proc/net/tcp` scan), on a netlink
//! socket opened and closed by the call: an EOF is rare enough per
//! connection that keeping a socket per connection or a shared one with
//! locking is not worth it. A call costs ~10 µs (socket, lookup, close;
//! measured on loopback, release and debug alike); a reply
//! that does not come within [`TIMEOUT`] is an error, so a stuck netlink
//! never stalls the relay.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, TcpStream};

/// What the kernel says about the client's end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// The client's socket has an owning file: still open, or only shut
    /// down for writing (it may still read the reply). Keep relaying.
    Open,
    /// The client's socket exists but no process holds it (inode 0: an
    /// orphan in FIN_WAIT2/LAST_ACK/CLOSING, or TIME_WAIT): the client
    /// closed it or exited. Nobody can read a reply: tear down now.
    Closed,
    /// No socket with the client's 4-tuple exists in this network
    /// namespace, though the lookup itself works (our own end was found).
    /// For a client on this host that means its socket is gone entirely,
    /// so it was closed (e.g. it closed after we had sent our FIN, or with
    /// unread data, which resets). A client on another host is never
    /// found either: see [`PeerState::client_closed`].
    NotFound,
    /// The kernel cannot be asked (not Linux, not IPv4, no inet_diag
    /// support): fall back to the half-closed timer.
    Unknown,
}

impl PeerState {
    /// Whether the client has certainly closed its socket, given whether
    /// its address is one of this host's (the issue-11 rule serves only
    /// such clients unless `--allow-remote`). `NotFound` only proves a
    /// close for a local client: a remote client's socket is never in our
    /// kernel, so for it `NotFound` says nothing and the timer decides.
    pub fn client_closed(self, peer_is_local: bool) -> bool {
        match self {
            PeerState::Closed => true,
            PeerState::NotFound => peer_is_local,
            PeerState::Open | PeerState::Unknown => false,
        }
    }
}

/// How long one lookup waits for the kernel's reply at most.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// How many netlink sockets lookups hold at once at most (each opens one
/// for its duration): a fixed number the descriptor budget counts
/// (`limits.rs`), however many connections ask at the same time. A lookup
/// that finds none free within [`SLOT_WAIT`] fails ("could not tell").
pub const MAX_OPEN: usize = 4;
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// One of the [`MAX_OPEN`] lookup slots, given back when dropped.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
struct Slot;

static SLOTS_IN_USE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
impl Slot {
    fn take() -> io::Result<Slot> {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let deadline = std::time::Instant::now() + SLOT_WAIT;
        loop {
            let now = SLOTS_IN_USE.load(Acquire);
            if now < MAX_OPEN
                && SLOTS_IN_USE
                    .compare_exchange(now, now + 1, AcqRel, Acquire)
                    .is_ok()
            {
                return Ok(Slot);
            }
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "every sock_diag lookup slot is busy",
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        SLOTS_IN_USE.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// [`peer_state`] for an accepted connection: its peer is the client, its
/// local address the listener's. `Unknown` for IPv6 (listeners are IPv4).
pub fn client_state(tcp: &TcpStream) -> io::Result<PeerState> {
    match (tcp.peer_addr()?, tcp.local_addr()?) {
        (SocketAddr::V4(peer), SocketAddr::V4(local)) => peer_state(peer, local),
        _ => Ok(PeerState::Unknown),
    }
}

/// The state of the client's own socket: the one whose source is `peer`
/// (our accepted socket's `peer_addr`) and whose destination is `local`
/// (its `local_addr`). The caller must still hold that accepted socket:
/// it is what tells "no such socket" from "the kernel cannot answer".
/// Errors (timeout, refused by a security module, odd reply) mean "could
/// not tell": treat them like `Unknown`.
#[cfg(target_os = "linux")]
pub fn peer_state(peer: SocketAddrV4, local: SocketAddrV4) -> io::Result<PeerState> {
    linux::peer_state(peer, local)
}

/// Not Linux: no sock_diag, the caller's timer decides.
#[cfg(not(target_os = "linux"))]
pub fn peer_state(_peer: SocketAddrV4, _local: SocketAddrV4) -> io::Result<PeerState> {
    Ok(PeerState::Unknown)
}

/// How many TCP sockets a process holds whose local address is `ip`
/// (listening, connected, or, on kernels that list them, only bound):
/// another gateway's listeners, for instance. Sockets no process holds
/// (TIME_WAIT, orphans) do not count. One dump of every IPv4 TCP socket of
/// this network namespace, filtered here; it needs no privilege.
#[cfg(target_os = "linux")]
pub fn tcp_sockets_on(ip: std::net::Ipv4Addr) -> io::Result<usize> {
    linux::tcp_sockets_on(ip)
}

/// Not Linux: the kernel cannot be asked.
#[cfg(not(target_os = "linux"))]
pub fn tcp_sockets_on(_ip: std::net::Ipv4Addr) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "no sock_diag on this platform",
    ))
}

#[cfg(target_os = "linux")]
mod linux {
    use super::{PeerState, TIMEOUT};
    use crate::sys::{cerr, cerr_retry};
    use std::io;
    use std::net::SocketAddrV4;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Instant;

    /// linux/sock_diag.h; libc does not have it.
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
    const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
    /// `struct nlmsghdr`, see [`encode_request`].
    const HDR: usize = 16;
    /// `struct inet_diag_req_v2`.
    const REQ: usize = 56;
    /// `struct inet_diag_msg`.
    const MSG: usize = 72;
    /// Replies are ~100-200 bytes (inet_diag_msg and a few attributes, or
    /// an error echoing our request); anything larger is refused.
    const RECV_BUF: usize = 1024;
    /// Datagrams read per lookup at most (one is expected).
    const MAX_DATAGRAMS: usize = 4;
    /// The interface the kernel matches the socket against, as for a
    /// packet arriving there. Local traffic arrives on lo, whose index is
    /// 1 in every network namespace (the kernel's LOOPBACK_IFINDEX). A
    /// socket not bound to a device matches any index; one bound to lo
    /// (SO_BINDTODEVICE) matches only 1: with 0 it would not be found and
    /// look closed.
    const LOOPBACK_IFINDEX: u32 = 1;

    /// What the kernel answered for one 4-tuple.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Answer {
        Found { state: u8, inode: u32 },
        NotFound,
    }

    pub fn peer_state(peer: SocketAddrV4, local: SocketAddrV4) -> io::Result<PeerState> {
        let _slot = super::Slot::take()?;
        let fd = open()?;
        match lookup(&fd, 1, peer, local)? {
            Answer::Found { inode: 0, .. } => Ok(PeerState::Closed),
            Answer::Found { .. } => Ok(PeerState::Open),
            // ENOENT also means "no inet_diag/tcp_diag handler" (module
            // missing and module loading disabled): then every client
            // would look closed. Our own end, which the caller holds, must
            // be found; if it is not either, the kernel cannot answer.
            Answer::NotFound => match lookup(&fd, 2, local, peer)? {
                Answer::Found { .. } => Ok(PeerState::NotFound),
                Answer::NotFound => Ok(PeerState::Unknown),
            },
        }
    }

    const NLM_F_DUMP: u16 = libc::NLM_F_DUMP as u16;
    const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
    /// A dump datagram is at most 32 KiB (the kernel's netlink dump skb).
    const DUMP_BUF: usize = 64 * 1024;
    /// Bound on one dump: time and datagrams (a host with a million
    /// sockets fits in well under this).
    const DUMP_TIME: std::time::Duration = std::time::Duration::from_secs(5);
    const DUMP_DATAGRAMS: usize = 100_000;

    pub fn tcp_sockets_on(ip: std::net::Ipv4Addr) -> io::Result<usize> {
        let _slot = super::Slot::take()?;
        let fd = open()?;
        let seq = 3;
        // The request of `encode_request`, made a dump: NLM_F_DUMP, id all
        // zeros (a dump without a filter matches every socket; zero ports
        // are no filter), every state but TIME_WAIT (6), whose sockets no
        // process holds. Unknown state bits (e.g. 13, bound-only sockets
        // on newer kernels) are listed where supported, ignored elsewhere.
        let mut req = encode_request(
            seq,
            SocketAddrV4::new(0.into(), 0),
            SocketAddrV4::new(0.into(), 0),
        );
        req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req[20..24].copy_from_slice(&(!(1u32 << 6)).to_ne_bytes());
        req[60..72].fill(0);
        // SAFETY: `req` is a live buffer of the length we pass.
        cerr(unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) })?;
        let deadline = Instant::now() + DUMP_TIME;
        let mut buf = vec![0u8; DUMP_BUF];
        let mut count = 0;
        for _ in 0..DUMP_DATAGRAMS {
            if Instant::now() >= deadline {
                break;
            }
            let n = recv_from_kernel(&fd, &mut buf, deadline)?;
            let Some(reply) = buf.get(..n) else {
                return Err(odd(format!("dump datagram of {n} bytes exceeds {DUMP_BUF}")));
            };
            match count_in_dump(reply, seq, ip)? {
                (found, true) => return Ok(count + found),
                (found, false) => count += found,
            }
        }
        Err(odd("the socket dump did not end in time".into()))
    }

    /// Reads one datagram of a dump (messages as in [`parse_reply`]):
    /// how many `inet_diag_msg` have source address `ip` (`id.idiag_src`,
    /// offset 8, network order) and an owning file (`idiag_inode`, offset
    /// 68, non-zero), and whether NLMSG_DONE ended the dump.
    pub(super) fn count_in_dump(buf: &[u8], seq: u32, ip: std::net::Ipv4Addr) -> io::Result<(usize, bool)> {
        let (mut rest, mut found) = (buf, 0);
        while !rest.is_empty() {
            let msg = next_message(&mut rest)?;
            if u32_at(msg, 8)? != seq {
                continue;
            }
            let payload = &msg[HDR..];
            match u16::from_ne_bytes([msg[4], msg[5]]) {
                NLMSG_DONE => return Ok((found, true)),
                NLMSG_ERROR => match (u32_at(payload, 0)? as i32).wrapping_neg() {
                    0 => continue,
                    errno => return Err(io::Error::from_raw_os_error(errno)),
                },
                SOCK_DIAG_BY_FAMILY => {
                    let Some(m) = payload.get(..MSG) else {
                        return Err(odd(format!("inet_diag_msg of {} bytes", payload.len())));
                    };
                    if m[0] == libc::AF_INET as u8 && m[8..12] == ip.octets() && u32_at(m, 68)? != 0 {
                        found += 1;
                    }
                }
                other => return Err(odd(format!("unexpected netlink message type {other}"))),
            }
        }
        Ok((found, false))
    }

    /// A NETLINK_SOCK_DIAG socket whose receives time out after [`TIMEOUT`].
    pub(super) fn open() -> io::Result<OwnedFd> {
        // SAFETY: plain socket(2) with constant arguments; no pointers.
        let raw = cerr(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        })?;
        // SAFETY: `raw` is a descriptor socket(2) just returned to us and
        // nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: TIMEOUT.as_secs() as _,
            tv_usec: TIMEOUT.subsec_micros() as _,
        };
        crate::sys::net::set_sock_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        Ok(fd)
    }

    /// Asks for the TCP socket whose local end is `src` and remote end is
    /// `dst`, and waits for the answer (at most [`TIMEOUT`] in all).
    pub(super) fn lookup(fd: &OwnedFd, seq: u32, src: SocketAddrV4, dst: SocketAddrV4) -> io::Result<Answer> {
        let req = encode_request(seq, src, dst);
        // No address: an unconnected netlink socket sends to the kernel.
        // SAFETY: `req` is a live buffer of the length we pass.
        cerr_retry(|| unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) })?;
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = [0u8; RECV_BUF];
        for _ in 0..MAX_DATAGRAMS {
            let n = recv_from_kernel(fd, &mut buf, deadline)?;
            let Some(reply) = buf.get(..n) else {
                return Err(odd(format!(
                    "reply of {n} bytes exceeds the {RECV_BUF}-byte buffer"
                )));
            };
            if let Some(answer) = parse_reply(reply, seq, &req[HDR + 8..HDR + 8 + 36])? {
                return Ok(answer);
            }
        }
        Err(odd("no reply to our request among the kernel's messages".into()))
    }

    /// Receives one datagram that the kernel (port id 0) sent, retrying on
    /// EINTR until `deadline`. Returns its full length (MSG_TRUNC), which
    /// may exceed `buf`.
    fn recv_from_kernel(fd: &OwnedFd, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        loop {
            // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: `buf` and `from` are live and writable for the
            // lengths we pass; the kernel writes at most that much.
            let n = match cerr(unsafe {
                libc::recvfrom(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                    (&mut from as *mut libc::sockaddr_nl).cast(),
                    &mut from_len,
                )
            }) {
                Ok(n) => n,
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted if Instant::now() < deadline => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("sock_diag: no reply within {}s", TIMEOUT.as_secs_f64()),
                        ))
                    }
                    _ => return Err(e),
                },
            };
            // Only the kernel may answer (another process could, if
            // privileged, unicast to our port id): skip anything else.
            if from.nl_pid == 0 {
                return Ok(n as usize);
            }
            if Instant::now() >= deadline {
                return Err(odd("only messages from other processes".into()));
            }
        }
    }

    /// The request: a netlink header and an `inet_diag_req_v2` (native
    /// byte order unless said otherwise, no padding between fields):
    ///
    /// | offset | size | field                                   | value              |
    /// |--------|------|-----------------------------------------|--------------------|
    /// | 0      | 4    | nlmsghdr.nlmsg_len                      | 72                 |
    /// | 4      | 2    | nlmsghdr.nlmsg_type                     | SOCK_DIAG_BY_FAMILY (20) |
    /// | 6      | 2    | nlmsghdr.nlmsg_flags                    | NLM_F_REQUEST only: no NLM_F_DUMP, so the kernel's exact-match path (`inet_diag_cmd_exact`) answers one socket or ENOENT |
    /// | 8      | 4    | nlmsghdr.nlmsg_seq                      | `seq`              |
    /// | 12     | 4    | nlmsghdr.nlmsg_pid                      | 0 (kernel fills)   |
    /// | 16     | 1    | sdiag_family                            | AF_INET            |
    /// | 17     | 1    | sdiag_protocol                          | IPPROTO_TCP        |
    /// | 18     | 1    | idiag_ext                               | 0 (no extensions)  |
    /// | 19     | 1    | pad                                     | 0                  |
    /// | 20     | 4    | idiag_states                            | all (the exact path ignores it) |
    /// | 24     | 2    | id.idiag_sport (big-endian)             | `src` port         |
    /// | 26     | 2    | id.idiag_dport (big-endian)             | `dst` port         |
    /// | 28     | 16   | id.idiag_src[4] (network order)         | `src` IP, then 0s  |
    /// | 44     | 16   | id.idiag_dst[4] (network order)         | `dst` IP, then 0s  |
    /// | 60     | 4    | id.idiag_if                             | [`LOOPBACK_IFINDEX`] |
    /// | 64     | 8    | id.idiag_cookie[2]                      | INET_DIAG_NOCOOKIE (all ones) |
    pub(super) fn encode_request(seq: u32, src: SocketAddrV4, dst: SocketAddrV4) -> [u8; HDR + REQ] {
        let mut r = [0u8; HDR + REQ];
        r[0..4].copy_from_slice(&((HDR + REQ) as u32).to_ne_bytes());
        r[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        r[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        r[8..12].copy_from_slice(&seq.to_ne_bytes());
        r[16] = libc::AF_INET as u8;
        r[17] = libc::IPPROTO_TCP as u8;
        r[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        r[24..26].copy_from_slice(&src.port().to_be_bytes());
        r[26..28].copy_from_slice(&dst.port().to_be_bytes());
        r[28..32].copy_from_slice(&src.ip().octets());
        r[44..48].copy_from_slice(&dst.ip().octets());
        r[60..64].copy_from_slice(&LOOPBACK_IFINDEX.to_ne_bytes());
        r[64..72].copy_from_slice(&[0xff; 8]);
        r
    }

    /// Reads one datagram of netlink messages (each a 16-byte header as in
    /// [`encode_request`], payload, padding to 4 bytes). `Ok(None)`: none
    /// answers `seq`. `want_id` is the request's id bytes (ports,
    /// addresses) that a found socket's must equal.
    ///
    /// An answer is either NLMSG_ERROR, payload `struct nlmsgerr`:
    ///
    /// | offset | size | field | meaning                                  |
    /// |--------|------|-------|------------------------------------------|
    /// | 0      | 4    | error | 0 or -errno; -ENOENT: no such socket     |
    /// | 4      | 16+  | msg   | our request's header (and body), ignored |
    ///
    /// or SOCK_DIAG_BY_FAMILY, payload `struct inet_diag_msg` (attributes
    /// after it are ignored):
    ///
    /// | offset | size | field          | use                                  |
    /// |--------|------|----------------|--------------------------------------|
    /// | 0      | 1    | idiag_family   | must be AF_INET                      |
    /// | 1      | 1    | idiag_state    | TCP state (1 ESTABLISHED .. 6 TIME_WAIT ..) |
    /// | 2      | 2    | timer, retrans | ignored                              |
    /// | 4      | 36   | id: sport, dport, src[4], dst[4] | must equal `want_id` |
    /// | 40     | 12   | id: if, cookie | ignored                              |
    /// | 52     | 16   | expires, rqueue, wqueue, uid | ignored                |
    /// | 68     | 4    | idiag_inode    | 0: no owning file (orphan/timewait)  |
    pub(super) fn parse_reply(buf: &[u8], seq: u32, want_id: &[u8]) -> io::Result<Option<Answer>> {
        let mut rest = buf;
        while !rest.is_empty() {
            let msg = next_message(&mut rest)?;
            if u32_at(msg, 8)? != seq {
                continue;
            }
            let payload = &msg[HDR..];
            match u16::from_ne_bytes([msg[4], msg[5]]) {
                NLMSG_ERROR => match (u32_at(payload, 0)? as i32).wrapping_neg() {
                    0 => continue, // an ack, which we did not ask for
                    libc::ENOENT => return Ok(Some(Answer::NotFound)),
                    errno => return Err(io::Error::from_raw_os_error(errno)),
                },
                SOCK_DIAG_BY_FAMILY => {
                    let Some(m) = payload.get(..MSG) else {
                        return Err(odd(format!("inet_diag_msg of {} bytes", payload.len())));
                    };
                    if m[0] != libc::AF_INET as u8 {
                        return Err(odd(format!("reply for address family {}", m[0])));
                    }
                    // The exact path falls back to a listener on the
                    // source port (ids 0.0.0.0:0 as remote): not our socket.
                    if m[4..40] != *want_id {
                        return Ok(Some(Answer::NotFound));
                    }
                    let inode = u32_at(m, 68)?;
                    return Ok(Some(Answer::Found { state: m[1], inode }));
                }
                other => return Err(odd(format!("unexpected netlink message type {other}"))),
            }
        }
        Ok(None)
    }

    /// Takes the first netlink message (header included) off `rest`, which
    /// moves past it and its padding to 4 bytes. Its length (`nlmsg_len`,
    /// offset 0) must cover the header and fit in what is left.
    fn next_message<'a>(rest: &mut &'a [u8]) -> io::Result<&'a [u8]> {
        let len = u32_at(rest, 0)? as usize;
        let (Some(msg), true) = (rest.get(..len), len >= HDR) else {
            return Err(odd(format!(
                "netlink message length {len} of {} bytes left",
                rest.len()
            )));
        };
        *rest = rest.get((len + 3) & !3..).unwrap_or(&[]);
        Ok(msg)
    }

    fn u32_at(b: &[u8], at: usize) -> io::Result<u32> {
        match b.get(at..at + 4) {
            Some(&[a, b, c, d]) => Ok(u32::from_ne_bytes([a, b, c, d])),
            _ => Err(odd(format!("message of {} bytes cut short", b.len()))),
        }
    }

    fn odd(what: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::linux::{encode_request, lookup, open, parse_reply, Answer};
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, Shutdown, TcpListener};
    use std::time::{Duration, Instant};

    const TCP_ESTABLISHED: u8 = 1;

    fn v4(a: SocketAddr) -> SocketAddrV4 {
        match a {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => panic!("IPv6 {a}"),
        }
    }

    /// A client connected to a listener on 127.0.0.1, and the accepted end.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    /// Polls `client_state(s)` until it is `want` (bounded: 5 s).
    fn wait_for(s: &TcpStream, want: PeerState) {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let got = client_state(s).unwrap();
            if got == want {
                return;
            }
            assert!(Instant::now() < end, "still {got:?}, want {want:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn open_half_closed_closed() {
        let (mut c, s) = pair();
        assert_eq!(client_state(&s).unwrap(), PeerState::Open);
        c.shutdown(Shutdown::Write).unwrap();
        // Our side sees the EOF, as the relay would...
        let mut buf = [0u8; 8];
        assert_eq!((&s).read(&mut buf).unwrap(), 0);
        // ...but the client may still read: still owned.
        assert_eq!(client_state(&s).unwrap(), PeerState::Open);
        (&s).write_all(b"reply").unwrap();
        assert_eq!(c.read(&mut buf).unwrap(), 5);
        assert_eq!(client_state(&s).unwrap(), PeerState::Open);
        drop(c);
        wait_for(&s, PeerState::Closed);
        assert!(PeerState::Closed.client_closed(true));
        assert!(PeerState::Closed.client_closed(false));
    }

    #[test]
    fn close_without_shutdown_is_closed() {
        let (c, s) = pair();
        drop(c);
        let mut buf = [0u8; 8];
        assert_eq!((&s).read(&mut buf).unwrap(), 0);
        wait_for(&s, PeerState::Closed);
    }

    /// We send our FIN first, then the client closes: its socket goes
    /// LAST_ACK (orphan) and is gone once we ack, while ours sits in
    /// TIME_WAIT, so the self-check finds ours.
    #[test]
    fn gone_after_our_fin_is_not_found() {
        let (c, s) = pair();
        s.shutdown(Shutdown::Write).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!((&c).read(&mut buf).unwrap(), 0);
        let (peer, local) = (v4(s.peer_addr().unwrap()), v4(s.local_addr().unwrap()));
        assert_eq!(peer_state(peer, local).unwrap(), PeerState::Open);
        drop(c);
        let end = Instant::now() + Duration::from_secs(5);
        while peer_state(peer, local).unwrap() != PeerState::NotFound {
            assert!(Instant::now() < end, "client socket never went away");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(PeerState::NotFound.client_closed(true));
        assert!(!PeerState::NotFound.client_closed(false));
    }

    #[test]
    fn sockets_on_an_address_are_counted() {
        // An address of 127/8 nothing else in this test binary uses.
        let ip = Ipv4Addr::new(127, 91, (std::process::id() % 250) as u8, 7);
        assert_eq!(tcp_sockets_on(ip).unwrap(), 0);
        let l = TcpListener::bind((ip, 0)).unwrap();
        assert_eq!(tcp_sockets_on(ip).unwrap(), 1, "the listener");
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        // The listener and the accepted socket (the client's source is 127.0.0.1).
        assert_eq!(tcp_sockets_on(ip).unwrap(), 2);
        drop((l, s, c));
        assert!(
            tcp_sockets_on(ip).unwrap() <= 1,
            "TIME_WAIT or orphans do not count"
        );
    }

    #[test]
    fn nothing_matches() {
        let (_c, s) = pair();
        let (peer, local) = (v4(s.peer_addr().unwrap()), v4(s.local_addr().unwrap()));
        let fd = open().unwrap();
        // A port nobody uses on this tuple: the kernel's ENOENT.
        let ghost = SocketAddrV4::new(*peer.ip(), peer.port() ^ 1);
        assert_eq!(lookup(&fd, 7, ghost, local).unwrap(), Answer::NotFound);
        // Our own end is found: ESTABLISHED, with an inode.
        match lookup(&fd, 8, local, peer).unwrap() {
            Answer::Found { state, inode } => {
                assert_eq!(state, TCP_ESTABLISHED);
                assert_ne!(inode, 0);
            }
            other => panic!("own socket: {other:?}"),
        }
        // Neither end exists: the lookup cannot prove it works.
        let nowhere = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 9);
        assert_eq!(peer_state(ghost, nowhere).unwrap(), PeerState::Unknown);
    }

    /// A client bound to lo (SO_BINDTODEVICE) is found too.
    #[test]
    fn client_bound_to_lo() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = v4(l.local_addr().unwrap());
        // SAFETY: plain socket(2); the descriptor is owned below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let c: TcpStream = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
        // SAFETY: a live NUL-terminated name and its length.
        let r = crate::sys::cerr(unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                c"lo".as_ptr().cast(),
                3,
            )
        });
        if let Err(e) = r {
            // Kernels before 5.7 want CAP_NET_RAW (the suite runs as root).
            eprintln!("SO_BINDTODEVICE: {e}; skipped");
            return;
        }
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: to.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(to.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `sa` is a live sockaddr_in of the length we pass.
        crate::sys::cerr(unsafe { libc::connect(raw, (&sa as *const libc::sockaddr_in).cast(), len) })
            .unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(client_state(&s).unwrap(), PeerState::Open);
        drop(c);
        wait_for(&s, PeerState::Closed);
    }

    /// The exact path falls back to a listener on the asked source port;
    /// that listener is not the client's socket.
    #[test]
    fn listener_is_not_the_client() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let lis = v4(l.local_addr().unwrap());
        let fd = open().unwrap();
        let other = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 9);
        assert_eq!(lookup(&fd, 1, lis, other).unwrap(), Answer::NotFound);
    }

    #[test]
    fn odd_replies_are_errors() {
        let a = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 1234);
        let b = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 80);
        let req = encode_request(5, a, b);
        assert_eq!(&req[24..28], &[0x04, 0xd2, 0, 80]);
        assert_eq!(&req[28..32], &[127, 0, 0, 2]);
        let id = &req[24..60];
        // A diag reply: header + inet_diag_msg with our id and inode 42.
        let mut ok = vec![0u8; 16 + 72];
        ok[0..4].copy_from_slice(&88u32.to_ne_bytes());
        ok[4..6].copy_from_slice(&20u16.to_ne_bytes());
        ok[8..12].copy_from_slice(&5u32.to_ne_bytes());
        ok[16] = libc::AF_INET as u8;
        ok[17] = 4;
        ok[20..56].copy_from_slice(id);
        ok[84..88].copy_from_slice(&42u32.to_ne_bytes());
        let found = Answer::Found { state: 4, inode: 42 };
        assert_eq!(parse_reply(&ok, 5, id).unwrap(), Some(found));
        assert_eq!(parse_reply(&ok, 6, id).unwrap(), None);
        for cut in [1, 4, 15, 16, 40, 87] {
            assert!(parse_reply(&ok[..cut], 5, id).is_err(), "cut at {cut}");
        }
        let mut bad_len = ok.clone();
        bad_len[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(parse_reply(&bad_len, 5, id).is_err());
        bad_len[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_reply(&bad_len, 5, id).is_err());
        let mut err = vec![0u8; 20];
        err[0..4].copy_from_slice(&20u32.to_ne_bytes());
        err[4..6].copy_from_slice(&2u16.to_ne_bytes());
        err[8..12].copy_from_slice(&5u32.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_reply(&err, 5, id).unwrap(), Some(Answer::NotFound));
        err[16..20].copy_from_slice(&(-libc::EACCES).to_ne_bytes());
        let e = parse_reply(&err, 5, id).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    }

    /// Not a speed assert: prints what one lookup costs.
    #[test]
    fn lookup_cost() {
        let (_c, s) = pair();
        let n = 200;
        let start = Instant::now();
        for _ in 0..n {
            assert_eq!(client_state(&s).unwrap(), PeerState::Open);
        }
        eprintln!(
            "sock_diag: one client_state() (socket + lookup + close) {:?}",
            start.elapsed() / n
        );
    }
}
