//! Exposing a local TCP service on a pilot port: the engine for one
//! exposure, independent of the control plane (which starts and stops it).
//!
//! The gateway Binds the port on one IPC session of its own; the daemon
//! then delivers every inbound connection to that port on that session
//! (PROTOCOL.md "Serving a port"). One session carries them all, so the
//! thread that reads it must never wait for a local service.
//!
//! Life of an exposed connection:
//!
//! 1. The session's reader thread gets Accept `[port][conn][addr][port]`.
//!    A peer outside `allow` (when set) is refused at once: Close, counted,
//!    logged with its address. So is every Accept once the exposure stops
//!    admitting (a drain), and one for which no connection slot is free
//!    (`max_conns`, or the gateway's shared [`Slots`]).
//! 2. It registers the connection and spawns its thread, which connects to
//!    the target (never on the reader thread: a slow target must not stall
//!    the session). A failed connect is logged and answered with Close.
//! 3. Two threads per connection, as in the forward path:
//!    - remote→local: the reader thread parses Recv frames and pushes their
//!      data into the connection's bounded queue (`queue_bytes`); it never
//!      writes to a local socket. The connection's writer thread drains the
//!      queue into the local socket. When a queue is at its bound, the
//!      reader waits for room only as long as that service keeps taking
//!      data: one that takes nothing for `stall` (1 s) has stopped reading
//!      and is reset, so the others wait at most that long and the daemon
//!      (which drops a client that does not drain for 10 s) never drops
//!      the session. A service that reads, only slower than the daemon
//!      delivers, paces the session while its queue is full instead of
//!      being reset: without per-connection flow control in the protocol,
//!      the only alternatives are unbounded memory or cutting a working
//!      transfer.
//!    - local→remote: reads the local socket and sends Send frames (at most
//!      64 KiB of data each) under the session's writer lock, held for one
//!      frame, so many connections share the session without a global stall.
//! 4. Endings. Pilot streams have no half-close:
//!    - the remote side closes (CloseOK): the writer drains the queue, then
//!      shuts the local socket's writing side and lets the service finish
//!      (its later output has nowhere to go and is dropped; after `LINGER`
//!      we stop waiting for it);
//!    - the service closes (EOF): Close; the daemon's CloseOK then ends the
//!      writer as above;
//!    - anything else (service reset, queue over its bound, daemon session
//!      lost, stop): the local socket is *reset*, never closed with a FIN,
//!      so the service does not mistake a cut stream for a complete one.
//! 5. The last of the two threads to finish deregisters the connection,
//!    sends Close if the daemon still thinks it open, logs the outcome and
//!    reports it through `on_end` (for the access log).
//!
//! When the session ends (daemon restart), every connection is cut and the
//! reader thread opens a new session and Binds again, with backoff, until
//! it succeeds or the exposure is stopped (or is draining); [`State`]
//! shows which.
//!
//! Releasing the port: a drain and a stop send Unbind (newer daemons) on
//! the session; the reader thread sees the answer among the other frames
//! and wakes the asker, who waits at most `UNBIND_WAIT`. After UnbindOK
//! the port is free while accepted connections go on; without it (the
//! Feb-2026 daemon's `unknown command: 0x37`) closing the session frees it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;

use crate::address::PilotAddr;
use crate::error::{Code, Error, Result};
use crate::ipc::{self, cmd, FrameReader};
use crate::log::RateLimit;
use crate::{debug, info, sys, warn, warn_limited};

/// Stack of every thread here: buffers live on the heap, nothing recurses.
pub const THREAD_STACK: usize = 128 * 1024;

// Per-connection warnings peers (or a misbehaving daemon) can cause at
// will: rate-limited, one limit per kind (the counters count every one).
static MALFORMED_ACCEPT: RateLimit = RateLimit::new();
static REFUSED: RateLimit = RateLimit::new();
static SPAWN_FAILED: RateLimit = RateLimit::new();
static WRONG_PORT: RateLimit = RateLimit::new();
/// Each exposure retries a refused re-bind every few seconds: limited too.
static REBIND_REFUSED: RateLimit = RateLimit::new();
/// Default bound of one connection's queue of data for the local service.
pub const QUEUE_BYTES: usize = 512 * 1024;
/// How long a connection at its bound may go without progress.
pub const STALL: Duration = Duration::from_secs(1);
/// Largest data chunk per Send frame (the daemon takes up to 1 MiB − 64).
const SEND_CHUNK: usize = 64 * 1024;
/// Recv payloads (4 KiB each) are gathered into queue chunks of this size.
const COALESCE: usize = 64 * 1024;
/// How long the service may keep its side open after the remote closed.
const LINGER: Duration = Duration::from_secs(2);
/// The writer wakes this often while a write is blocked, to notice a reset.
const WRITE_POLL: Duration = Duration::from_millis(500);
/// Re-bind backoff after the daemon went away.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Bound on one frame write to the daemon, and by default on the whole
/// Bind exchange (connect, Bind, its answer).
const IPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a Bind in progress looks whether the exposure was stopped.
const BIND_POLL: Duration = Duration::from_millis(100);
/// Bound on waiting for the answer to Unbind; past it, closing the
/// session frees the port as on daemons without Unbind.
const UNBIND_WAIT: Duration = Duration::from_secs(1);

/// Connection slots an exposure shares with other users of one budget
/// (the gateway's `--max-conns`, which forwarded connections draw on too).
pub trait Slots: Send + Sync {
    /// Takes a slot; `false` when none is free.
    fn try_acquire(&self) -> bool;
    /// Gives back a slot `try_acquire` took.
    fn release(&self);
}

/// Receives every finished or refused connection.
pub type OnEnd = Arc<dyn Fn(&Ended) + Send + Sync>;

/// How an exposure behaves; `Options::default()` suits most.
#[derive(Clone)]
pub struct Options {
    /// Admit only these peers (`None`: whoever the daemon lets in).
    pub allow: Option<HashSet<PilotAddr>>,
    /// Permit a target that is not an address of this host.
    pub allow_remote_target: bool,
    /// The gateway's subnet: targets inside it (its mappings) are refused.
    pub own_subnet: Option<Ipv4Network>,
    /// Bound of each connection's queue towards the local service.
    pub queue_bytes: usize,
    /// A connection at its bound whose service takes nothing for this
    /// long is reset (kept well below the daemon's 10 s write deadline).
    pub stall: Duration,
    pub connect_timeout: Duration,
    /// Live connections at most (newer daemons cap a client at 4096);
    /// only when `slots` is `None`.
    pub max_conns: usize,
    /// The daemon's uid seen at start: every session (the first Bind and
    /// each re-bind) refuses a socket served by another uid. `None`: not
    /// checked (tests and tools; the gateway always sets it).
    pub daemon_uid: Option<crate::sys::user::Uid>,
    /// A budget shared with others: each admitted connection holds one
    /// slot of it until it ends (instead of `max_conns`).
    pub slots: Option<Arc<dyn Slots>>,
    /// Bound on the whole first Bind (connect, request, answer), so a
    /// stalled daemon costs the caller at most this long.
    pub bind_timeout: Duration,
    /// Called once per finished or refused connection (the access log).
    /// It must not block: refusals are reported from the session's reader
    /// thread (the access log's `try_send` queue fits).
    pub on_end: Option<OnEnd>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            allow: None,
            allow_remote_target: false,
            own_subnet: None,
            queue_bytes: QUEUE_BYTES,
            stall: STALL,
            connect_timeout: Duration::from_secs(5),
            max_conns: 4096,
            daemon_uid: None,
            slots: None,
            bind_timeout: IPC_TIMEOUT,
            on_end: None,
        }
    }
}

/// Whether the port is held now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Bound,
    /// The session was lost (or Bind failed); retrying. Holds the reason.
    Rebinding(String),
    Stopped,
}

/// A snapshot of one exposure's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub active: u64,
    /// Connections admitted (refused ones are not counted here).
    pub total: u64,
    /// Bytes from remote peers written to the local service.
    pub bytes_in: u64,
    /// Bytes from the local service sent to remote peers.
    pub bytes_out: u64,
    /// Refused by the allow-list.
    pub refused: u64,
    /// Refused because `max_conns` were live (or no shared slot was free).
    pub over_limit: u64,
    /// Refused because the exposure had stopped admitting (a drain).
    pub refused_draining: u64,
    /// Reset because the local service stopped reading.
    pub slow_resets: u64,
    pub connect_failures: u64,
    /// Successful re-binds after the daemon session was lost.
    pub rebinds: u64,
    /// Sessions given up because the daemon stopped reading them (a peer
    /// that does not read blocks the daemon's inline Send): each cut every
    /// connection on the port.
    pub session_stalls: u64,
}

/// How a connection ended, for logs and the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Refused(String),
    ConnectFailed(String),
    Reset(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused(_) => "refused",
            Outcome::ConnectFailed(_) => "connect_failed",
            Outcome::Reset(_) => "reset",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Outcome::Ok => "",
            Outcome::Refused(r) | Outcome::ConnectFailed(r) | Outcome::Reset(r) => r,
        }
    }
}

/// One finished (or refused) exposed connection.
#[derive(Clone, Debug)]
pub struct Ended {
    pub port: u16,
    pub target: SocketAddr,
    pub conn: u32,
    pub peer: PilotAddr,
    pub peer_port: u16,
    pub outcome: Outcome,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
}

/// One exposed port. Dropping it stops it.
pub struct Exposure {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

struct Shared {
    socket: PathBuf,
    port: u16,
    target: SocketAddr,
    opts: Options,
    stopping: AtomicBool,
    /// No new connections (a drain): every Accept is refused.
    draining: AtomicBool,
    state: Mutex<State>,
    /// The current session, so `stop` can end it.
    link: Mutex<Option<Arc<Link>>>,
    conns: Mutex<HashMap<u32, Arc<Conn>>>,
    active: AtomicU64,
    total: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    refused: AtomicU64,
    over_limit: AtomicU64,
    refused_draining: AtomicU64,
    slow_resets: AtomicU64,
    connect_failures: AtomicU64,
    rebinds: AtomicU64,
    session_stalls: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Exposure {
    /// Checks the target, opens a session, Binds `port` and starts serving
    /// inbound connections to it from `target`. Fails with `port_in_use`
    /// when the port is held, `bad_target` for an unacceptable target,
    /// `daemon_unreachable` when there is no daemon.
    pub fn start(socket: &Path, port: u16, target: SocketAddr, opts: Options) -> Result<Exposure> {
        check_target(target, opts.allow_remote_target, opts.own_subnet)?;
        let target = canonical(target);
        let deadline = Instant::now() + opts.bind_timeout;
        let (reader, link) = open(socket, port, opts.daemon_uid, deadline, &|| false)?;
        let shared = Arc::new(Shared {
            socket: socket.to_path_buf(),
            port,
            target,
            opts,
            stopping: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            state: Mutex::new(State::Bound),
            link: Mutex::new(Some(link.clone())),
            conns: Mutex::new(HashMap::new()),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            over_limit: AtomicU64::new(0),
            refused_draining: AtomicU64::new(0),
            slow_resets: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            rebinds: AtomicU64::new(0),
            session_stalls: AtomicU64::new(0),
        });
        let s2 = shared.clone();
        let thread = thread::Builder::new()
            .name(format!("expose {port}"))
            .stack_size(THREAD_STACK)
            .spawn(move || run(&s2, Some((reader, link))))
            .map_err(|e| Error::internal(format!("starting the exposure of port {port}: {e}")))?;
        info!("exposing pilot port {port} → {target}");
        Ok(Exposure {
            shared,
            reader: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.shared.port
    }

    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    pub fn state(&self) -> State {
        lock(&self.shared.state).clone()
    }

    pub fn counters(&self) -> Counters {
        let s = &self.shared;
        Counters {
            active: s.active.load(Relaxed),
            total: s.total.load(Relaxed),
            bytes_in: s.bytes_in.load(Relaxed),
            bytes_out: s.bytes_out.load(Relaxed),
            refused: s.refused.load(Relaxed),
            over_limit: s.over_limit.load(Relaxed),
            refused_draining: s.refused_draining.load(Relaxed),
            slow_resets: s.slow_resets.load(Relaxed),
            connect_failures: s.connect_failures.load(Relaxed),
            rebinds: s.rebinds.load(Relaxed),
            session_stalls: s.session_stalls.load(Relaxed),
        }
    }

    /// Stops admitting connections (`--drain`): releases the port with
    /// Unbind where the daemon has it (no more Accepts; another program
    /// may Bind it at once), and answers every Accept still arriving with
    /// Close, counted. Live connections go on.
    pub fn stop_admitting(&self) {
        self.shared.draining.store(true, Relaxed);
        if self.release() {
            info!(
                "exposed port {}: released (Unbind); live connections go on",
                self.shared.port
            );
        }
    }

    /// Releases the port with Unbind, waiting up to `UNBIND_WAIT` for the
    /// answer; whether the daemon released it. Connections already
    /// accepted go on. `false` on a daemon without Unbind (the port is
    /// then freed when the session closes) or one that did not answer.
    pub fn release(&self) -> bool {
        let link = lock(&self.shared.link).clone();
        link.is_some_and(|l| l.unbind(self.shared.port, UNBIND_WAIT))
    }

    pub fn is_admitting(&self) -> bool {
        !self.shared.draining.load(Relaxed)
    }

    /// Waits up to `wait` for the live connections to end on their own
    /// (`--drain`, after [`stop_admitting`](Exposure::stop_admitting)).
    pub fn drain(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while self.shared.active.load(Relaxed) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Releases the port (Unbind, where the daemon has it), closes the
    /// session (the daemon frees the port, if still held, and every
    /// connection on it), resets the local sides, and waits (bounded by
    /// `wait`) for the connection threads to finish.
    pub fn stop(&mut self, wait: Duration) {
        let s = &self.shared;
        s.stopping.store(true, Relaxed);
        let link = lock(&s.link).take();
        if let Some(link) = link {
            // Once UnbindOK is in, the port is free: a Bind of it right
            // after (a changed exposure restarting) cannot race the
            // daemon's clean-up of the closed session.
            link.unbind(s.port, UNBIND_WAIT);
            let _ = link.stream.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
        let deadline = Instant::now() + wait;
        while s.active.load(Relaxed) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if s.active.load(Relaxed) > 0 {
            warn!(
                "exposed port {}: connections still closing after {wait:?}",
                s.port
            );
        }
    }
}

impl Drop for Exposure {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

/// The address a target is checked and served at: an IPv4-mapped IPv6
/// address (`[::ffff:10.4.0.1]`) is the IPv4 address it stands for, so no
/// check is passed by spelling an address another way.
pub fn canonical(target: SocketAddr) -> SocketAddr {
    SocketAddr::new(target.ip().to_canonical(), target.port())
}

/// Refuses targets that cannot work, that lead into the gateway's own
/// mappings (`own`: its subnet) or another gateway's (an alias labelled
/// `lo:pgw…`) (both refused even with `allow_remote`: every admitted peer
/// would become a client of the mapped agents, with this node's
/// identity), or that leave this host unasked.
pub fn check_target(target: SocketAddr, allow_remote: bool, own: Option<Ipv4Network>) -> Result<()> {
    let target = canonical(target);
    let ip = target.ip();
    if target.port() == 0 || ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255u8; 4]) {
        return Err(Error::new(
            Code::BadTarget,
            format!("target {target} is not a TCP service address"),
        )
        .hint("give the service's address and port, e.g. 127.0.0.1:8000"));
    }
    // 127.0.0.1 is never mapped, even in a 127.0.0.0/8 subnet.
    if let (IpAddr::V4(v4), Some(net)) = (ip, own) {
        if net.contains(v4) && v4 != Ipv4Addr::LOCALHOST {
            return Err(Error::new(
                Code::BadTarget,
                format!("target {target} is inside the gateway's subnet {net}: it would relay inbound peers to mapped agents"),
            )
            .hint("expose the service itself (e.g. 127.0.0.1:PORT); --allow-remote-target does not allow this"));
        }
    }
    // Another gateway's mappings lead to agents just the same.
    if let Some(label) = gateway_alias(ip) {
        return Err(Error::new(
            Code::BadTarget,
            format!("target {target} is a pilot gateway's mapped address (loopback alias labelled {label}): it would relay inbound peers to a mapped agent"),
        )
        .hint("expose the service itself (e.g. 127.0.0.1:PORT); --allow-remote-target does not allow this"));
    }
    if !allow_remote && !on_this_host(ip) {
        return Err(
            Error::new(Code::BadTarget, format!("target {target} is not on this host"))
                .hint("expose a local service, or pass --allow-remote-target to publish another host's"),
        );
    }
    Ok(())
}

/// The label of `ip` if it is an address on this host labelled by a
/// gateway (`lo:pgw…`, any state directory's: see [`crate::alias`]).
fn gateway_alias(ip: IpAddr) -> Option<String> {
    let IpAddr::V4(v4) = ip else { return None };
    sys::net::interface_addresses()
        .ok()?
        .into_iter()
        .find(|a| a.addr == v4 && a.interface.starts_with(crate::alias::LABEL_PREFIX))
        .map(|a| a.interface)
}

/// Whether `ip` is loopback (127.0.0.0/8, ::1) or an address an interface
/// of this host has. Never "a socket can bind it": with
/// `ip_nonlocal_bind` every bind succeeds.
fn on_this_host(ip: IpAddr) -> bool {
    ip.is_loopback() || sys::net::host_ips().is_ok_and(|all| all.contains(&ip))
}

fn unreachable(socket: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::new(
        Code::DaemonUnreachable,
        format!("daemon socket {}: {e}", socket.display()),
    )
    .hint("is the Pilot daemon running, as this user?")
}

/// The write half of a session, shared by every connection on it.
struct Link {
    stream: UnixStream,
    /// Held for one frame, so frames from many threads stay whole; it
    /// guards what each connection sent lately (to name a stall's culprit).
    lock: Mutex<Recent>,
    /// Set when a frame could not be written within `IPC_TIMEOUT`: the
    /// daemon stopped reading the session. Names the likely culprit.
    stalled: OnceLock<String>,
    /// Where this session's Unbind stands; the reader thread records the
    /// answer and wakes the asker through `unbind_answered`.
    unbind: Mutex<Unbind>,
    unbind_answered: Condvar,
}

/// A session's Unbind. At most one is ever sent per session, so an answer
/// (UnbindOK, or an Error about Unbind) can only be for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unbind {
    /// Not asked.
    Bound,
    /// Sent, no answer yet.
    Asked,
    /// UnbindOK: the port is free; accepted connections go on.
    Released,
    /// `unknown command: 0x37` (the Feb-2026 daemon): close the session.
    Unknown,
    /// Refused, failed to send, or the session ended first.
    Failed,
}

/// Data bytes each connection sent in the current window of
/// `IPC_TIMEOUT` (bounded by the connections live in one window).
#[derive(Default)]
struct Recent {
    since: Option<Instant>,
    bytes: HashMap<u32, (PilotAddr, u64)>,
}

impl Link {
    fn new(stream: UnixStream) -> Link {
        Link {
            stream,
            lock: Mutex::new(Recent::default()),
            stalled: OnceLock::new(),
            unbind: Mutex::new(Unbind::Bound),
            unbind_answered: Condvar::new(),
        }
    }

    /// Sends Unbind (once per session) and waits up to `wait` for the
    /// reader thread to see the answer; whether the port was released.
    /// Never waits longer than `wait` for other writers either: a writer
    /// blocked on a daemon that stopped reading holds the write lock.
    fn unbind(&self, port: u16, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut st = lock(&self.unbind);
        if *st == Unbind::Bound {
            *st = Unbind::Asked;
            drop(st);
            let frame = ipc::encode(cmd::UNBIND, &[&port.to_be_bytes()]);
            if !self.send_by(&frame, deadline) {
                self.unbind_answer(Unbind::Failed);
            }
            st = lock(&self.unbind);
        }
        while *st == Unbind::Asked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = match self.unbind_answered.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        *st == Unbind::Released
    }

    /// Records the answer to an Unbind in flight (and nothing otherwise).
    fn unbind_answer(&self, answer: Unbind) {
        let mut st = lock(&self.unbind);
        if *st == Unbind::Asked {
            *st = answer;
        }
        drop(st);
        self.unbind_answered.notify_all();
    }

    fn unbind_asked(&self) -> bool {
        *lock(&self.unbind) == Unbind::Asked
    }

    /// Like `send`, but gives up (sending nothing) when the write lock
    /// stays taken until `deadline`.
    fn send_by(&self, frame: &[u8], deadline: Instant) -> bool {
        let _recent = loop {
            match self.lock.try_lock() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(1));
                }
                Err(std::sync::TryLockError::WouldBlock) => return false,
            }
        };
        // The write itself is bounded by the same deadline (we hold the
        // write lock, so no other writer sees the shorter timeout): a daemon
        // that stopped reading must not make `stop` wait the full
        // IPC_TIMEOUT. A frame cut short ends the session, as in `send`.
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = self
            .stream
            .set_write_timeout(Some(left.max(Duration::from_millis(10))));
        let ok = (&self.stream).write_all(frame).is_ok();
        let _ = self.stream.set_write_timeout(Some(IPC_TIMEOUT));
        if !ok {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        ok
    }

    /// Writes one whole frame (`from`: the connection whose data it
    /// carries); a failed write ends the session (a partial frame would
    /// corrupt it), which the reader then sees.
    ///
    /// The daemon handles Send inline, so a peer that does not read can
    /// block the daemon's reading of the whole session: nothing written
    /// after that gets through, Close of the culprit included. Such a
    /// write times out; the session is then given up (the port re-bound
    /// at once), naming the connection that sent the most lately.
    fn send(&self, frame: &[u8], from: Option<(u32, PilotAddr)>) -> bool {
        let result = {
            let mut recent = lock(&self.lock);
            if let Some((conn, peer)) = from {
                recent.count(conn, peer, frame.len());
            }
            let r = (&self.stream).write_all(frame);
            if matches!(&r, Err(e) if ipc::is_timeout(e)) {
                let _ = self.stalled.set(recent.culprit());
            }
            r
        };
        if result.is_err() {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        result.is_ok()
    }

    fn close(&self, conn: u32) -> bool {
        self.send(&ipc::encode(cmd::CLOSE, &[&conn.to_be_bytes()]), None)
    }
}

impl Recent {
    fn count(&mut self, conn: u32, peer: PilotAddr, n: usize) {
        let now = Instant::now();
        if !self.since.is_some_and(|t| now.duration_since(t) <= IPC_TIMEOUT) {
            (self.since, self.bytes) = (Some(now), HashMap::new());
        }
        self.bytes.entry(conn).or_insert((peer, 0)).1 += n as u64;
    }

    /// The connection that sent the most in this window, described.
    fn culprit(&self) -> String {
        match self.bytes.iter().max_by_key(|(_, (_, n))| *n) {
            Some((conn, (peer, n))) => {
                format!("likely culprit: connection {conn} from {peer}, {n} bytes sent lately")
            }
            None => "no connection sent data lately".into(),
        }
    }
}

/// Opens a session (to a daemon of uid `expect`, when given) and Binds
/// `port` on it, all by `deadline` (one overall bound: a daemon that
/// trickles its answer cannot stretch it), giving up early once
/// `abandoned` says so (looked at every `BIND_POLL`).
fn open(
    socket: &Path,
    port: u16,
    expect: Option<crate::sys::user::Uid>,
    deadline: Instant,
    abandoned: &dyn Fn() -> bool,
) -> Result<(FrameReader<UnixStream>, Arc<Link>)> {
    let io_err = |e: io::Error| unreachable(socket, &e);
    let stream = crate::sys::net::unix_socket().map_err(io_err)?;
    ipc::connect_by(&stream, socket, deadline, abandoned, expect).map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            Error::new(Code::PermissionDenied, e.to_string())
                .hint("the daemon's socket is served by another user now; restart the gateway once the daemon is back")
        } else {
            unreachable(socket, &e)
        }
    })?;
    // One socket under both descriptors: its timeouts are shared.
    let mut writer = stream.try_clone().map_err(io_err)?;
    let bind = ipc::encode(cmd::BIND, &[&port.to_be_bytes()]);
    writer
        .set_write_timeout(Some(left(deadline, socket)?))
        .map_err(io_err)?;
    writer.write_all(&bind).map_err(io_err)?;
    writer.set_write_timeout(Some(IPC_TIMEOUT)).map_err(io_err)?;
    let mut reader = FrameReader::growing(stream, 16 * 1024, 256 * 1024);
    let (command, range) = bind_reply(&mut reader, socket, deadline, abandoned)?;
    let payload = &reader.buffer()[range];
    match command {
        cmd::BIND_OK if payload.get(..2) == Some(&port.to_be_bytes()[..]) => {}
        cmd::ERROR => {
            let text = ipc::error_text(payload);
            let code = if text.contains("already bound") {
                Code::PortInUse
            } else {
                Code::ConnectionFailed
            };
            return Err(Error::new(code, format!("bind pilot port {port}: {text}"))
                .hint("choose another port, or stop the program that holds it"));
        }
        c => {
            return Err(Error::internal(format!(
                "bind pilot port {port}: unexpected reply 0x{c:02X}"
            )))
        }
    }
    reader.get_ref().set_read_timeout(None).map_err(io_err)?;
    Ok((reader, Arc::new(Link::new(writer))))
}

/// What is left before `deadline`, or the error of a daemon too slow.
fn left(deadline: Instant, socket: &Path) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(unreachable(
            socket,
            &"no answer to Bind in time (is the daemon stalled?)",
        ));
    }
    Ok(left)
}

/// Reads the daemon's answer to Bind by `deadline`, re-arming the read
/// timeout before every read (a per-read timeout restarts with each byte).
fn bind_reply(
    reader: &mut FrameReader<UnixStream>,
    socket: &Path,
    deadline: Instant,
    abandoned: &dyn Fn() -> bool,
) -> Result<(u8, std::ops::Range<usize>)> {
    loop {
        if let Some(frame) = reader.next_buffered().map_err(|e| unreachable(socket, &e))? {
            return Ok(frame);
        }
        if abandoned() {
            return Err(Error::new(Code::DaemonUnreachable, "the exposure was stopped"));
        }
        let wait = left(deadline, socket)?.min(BIND_POLL);
        let io_err = |e: io::Error| unreachable(socket, &e);
        reader.get_ref().set_read_timeout(Some(wait)).map_err(io_err)?;
        match reader.fill() {
            Ok(()) => {}
            Err(e) if e.is_timeout() => {}
            Err(e) => return Err(unreachable(socket, &e)),
        }
    }
}

/// The reader thread: serves the session; when it is lost, cuts every
/// connection and re-binds with backoff until stopped.
fn run(ex: &Arc<Shared>, mut session: Option<(FrameReader<UnixStream>, Arc<Link>)>) {
    let mut backoff = RETRY_MIN;
    loop {
        if let Some((reader, link)) = session.take() {
            *lock(&ex.link) = Some(link.clone());
            // `stop` may have run while we were binding.
            if ex.stopping.load(Relaxed) {
                let _ = link.stream.shutdown(Shutdown::Both);
            }
            *lock(&ex.state) = State::Bound;
            backoff = RETRY_MIN;
            let mut why = serve(ex, reader, &link);
            // An Unbind in flight gets no answer now; a `stop` to come
            // must not write to this session.
            link.unbind_answer(Unbind::Failed);
            {
                let mut current = lock(&ex.link);
                if current.as_ref().is_some_and(|l| Arc::ptr_eq(l, &link)) {
                    *current = None;
                }
            }
            if ex.stopping.load(Relaxed) {
                why = "the exposure was stopped".into();
            } else if let Some(culprit) = link.stalled.get() {
                // No wait: the daemon frees the port once its blocked Send ends.
                ex.session_stalls.fetch_add(1, Relaxed);
                backoff = Duration::ZERO;
                why = format!(
                    "daemon session stalled: the daemon took no frame for {IPC_TIMEOUT:?}, blocked sending to a peer that does not read ({culprit}); every connection on the port is reset"
                );
            }
            cut_all(ex, &why);
            if ex.stopping.load(Relaxed) {
                break;
            }
            // Draining: the port was given up (or is about to be); taking
            // it back would only refuse every Accept, or take it from
            // whoever Bound it after our Unbind.
            if ex.draining.load(Relaxed) {
                warn!("exposed port {}: {why}; not re-binding (draining)", ex.port);
                break;
            }
            warn!("exposed port {}: {why}; re-binding", ex.port);
            *lock(&ex.state) = State::Rebinding(why);
        }
        let until = Instant::now() + backoff;
        while Instant::now() < until && !ex.stopping.load(Relaxed) {
            thread::sleep(Duration::from_millis(20));
        }
        if ex.stopping.load(Relaxed) {
            break;
        }
        let deadline = Instant::now() + IPC_TIMEOUT;
        let stopped = || ex.stopping.load(Relaxed);
        match open(&ex.socket, ex.port, ex.opts.daemon_uid, deadline, &stopped) {
            Ok(s) => {
                ex.rebinds.fetch_add(1, Relaxed);
                info!("exposed port {}: bound again", ex.port);
                session = Some(s);
            }
            Err(e) => {
                // Another uid serves the socket now: worth a line each time
                // (the backoff bounds them), unlike a daemon that is away.
                if e.code == Code::PermissionDenied {
                    warn_limited!(
                        REBIND_REFUSED,
                        "exposed port {}: re-bind refused: {}",
                        ex.port,
                        e.message
                    );
                } else {
                    debug!("exposed port {}: re-bind failed: {}", ex.port, e.message);
                }
                *lock(&ex.state) = State::Rebinding(e.message);
                backoff = (backoff * 2).clamp(RETRY_MIN, RETRY_MAX);
            }
        }
    }
    *lock(&ex.state) = State::Stopped;
}

/// Reads the session until it ends; returns why it ended.
fn serve(ex: &Arc<Shared>, mut reader: FrameReader<UnixStream>, link: &Arc<Link>) -> String {
    loop {
        let (command, range) = match reader.read_frame() {
            Ok(f) => f,
            Err(e) => return format!("daemon session lost: {e}"),
        };
        let payload = &reader.buffer()[range];
        match command {
            cmd::ACCEPT => accept(ex, link, payload),
            cmd::RECV => recv(ex, payload),
            cmd::CLOSE_OK => {
                let conn = ipc::be_u32(payload).and_then(|id| lock(&ex.conns).get(&id).cloned());
                if let Some(c) = conn {
                    c.remote_closed();
                }
            }
            cmd::UNBIND_OK if payload.get(..2) == Some(&ex.port.to_be_bytes()[..]) => {
                link.unbind_answer(Unbind::Released);
                debug!("exposed port {}: released (UnbindOK)", ex.port);
            }
            cmd::ERROR => error(ex, link, &ipc::error_text(payload)),
            other => debug!("exposed port {}: ignoring message 0x{other:02X}", ex.port),
        }
    }
}

/// An Error on the session. Errors carry no connection id: one about
/// Unbind while ours is in flight answers it (only one ever is); any
/// other can only answer a Send or Close of a connection already gone.
fn error(ex: &Shared, link: &Link, text: &str) {
    let about_unbind = text.starts_with("unbind") || text.contains("0x37");
    if about_unbind && link.unbind_asked() {
        if text.contains("unknown command") {
            debug!(
                "exposed port {}: the daemon has no Unbind; the port is freed when the session closes",
                ex.port
            );
            link.unbind_answer(Unbind::Unknown);
        } else {
            warn!(
                "exposed port {}: Unbind refused: {text}; closing the session instead",
                ex.port
            );
            link.unbind_answer(Unbind::Failed);
        }
        return;
    }
    debug!("exposed port {}: daemon: {text}", ex.port);
}

/// Cuts every connection of a session that ended.
fn cut_all(ex: &Shared, why: &str) {
    let conns: Vec<Arc<Conn>> = lock(&ex.conns).values().cloned().collect();
    for c in conns {
        c.fail(Outcome::Reset(why.to_string()));
    }
}

/// Why a new connection from `peer` is not admitted, counted; `None`
/// admits it, holding a slot (of `slots`) that `Finish` gives back.
fn refusal(ex: &Shared, peer: PilotAddr) -> Option<String> {
    if ex.opts.allow.as_ref().is_some_and(|set| !set.contains(&peer)) {
        ex.refused.fetch_add(1, Relaxed);
        return Some("not in the allow-list".into());
    }
    if ex.draining.load(Relaxed) {
        ex.refused_draining.fetch_add(1, Relaxed);
        return Some("draining: no new connections".into());
    }
    let full = match &ex.opts.slots {
        Some(slots) => (!slots.try_acquire()).then(|| "no connection slot free (--max-conns)".into()),
        None => (ex.active.load(Relaxed) >= ex.opts.max_conns as u64)
            .then(|| format!("{} connections already live", ex.opts.max_conns)),
    };
    if full.is_some() {
        ex.over_limit.fetch_add(1, Relaxed);
    }
    full
}

fn accept(ex: &Arc<Shared>, link: &Arc<Link>, payload: &[u8]) {
    let Some(a) = ipc::parse_accept(payload) else {
        warn_limited!(
            MALFORMED_ACCEPT,
            "exposed port {}: malformed Accept ({} bytes)",
            ex.port,
            payload.len()
        );
        return;
    };
    if a.port != ex.port {
        // A protocol error: this session Bound one port. Closed unserved.
        link.close(a.conn);
        warn_limited!(
            WRONG_PORT,
            "exposed port {}: the daemon sent an Accept for port {} (connection {} from {}); closed",
            ex.port,
            a.port,
            a.conn,
            a.remote
        );
        return;
    }
    if let Some(why) = refusal(ex, a.remote) {
        link.close(a.conn);
        warn_limited!(
            REFUSED,
            "exposed port {}: refused {}:{} ({why})",
            ex.port,
            a.remote,
            a.remote_port
        );
        report(
            ex,
            a.conn,
            a.remote,
            a.remote_port,
            Outcome::Refused(why),
            (0, 0),
            Duration::ZERO,
        );
        return;
    }
    let conn = Arc::new(Conn {
        id: a.conn,
        peer: a.remote,
        peer_port: a.remote_port,
        link: link.clone(),
        started: Instant::now(),
        queue: Mutex::new(Queue::default()),
        ready: Condvar::new(),
        room: Condvar::new(),
        tcp: OnceLock::new(),
        bytes_in: AtomicU64::new(0),
        bytes_out: AtomicU64::new(0),
        remote_closed: AtomicBool::new(false),
        close_sent: AtomicBool::new(false),
        outcome: OnceLock::new(),
    });
    lock(&ex.conns).insert(a.conn, conn.clone());
    ex.active.fetch_add(1, Relaxed);
    ex.total.fetch_add(1, Relaxed);
    debug!(
        "exposed port {}: connection {} from {}:{}",
        ex.port, a.conn, a.remote, a.remote_port
    );
    let finish = Finish { conn, ex: ex.clone() };
    // If the thread cannot start, the closure (and `finish`) is dropped:
    // the connection is closed and accounted for all the same.
    let spawned = thread::Builder::new()
        .stack_size(THREAD_STACK)
        .spawn(move || connect_then_relay(finish));
    if let Err(e) = spawned {
        warn_limited!(
            SPAWN_FAILED,
            "exposed port {}: no thread for a connection: {e}",
            ex.port
        );
    }
}

fn recv(ex: &Shared, payload: &[u8]) {
    let Some(id) = ipc::be_u32(payload) else { return };
    let Some(c) = lock(&ex.conns).get(&id).cloned() else {
        return;
    };
    if !c.push(&payload[4..], ex.opts.queue_bytes, ex.opts.stall) {
        ex.slow_resets.fetch_add(1, Relaxed);
        let why = format!(
            "the local service stopped reading ({} bytes queued, no progress for {:?})",
            ex.opts.queue_bytes, ex.opts.stall
        );
        c.fail(Outcome::Reset(why));
    }
}

/// Data on its way to the local service.
#[derive(Default)]
struct Queue {
    chunks: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Bytes the local service has taken (every partial write counts):
    /// the writer's progress, whatever the service's pace.
    taken: u64,
    remote_closed: bool,
    /// When the first CloseOK came: the service's `LINGER` counts from it.
    closed_at: Option<Instant>,
    /// The local→remote thread has ended (the service closed, or its
    /// socket failed or was shut): nothing left to linger for.
    local_done: bool,
    cut: bool,
}

/// One exposed connection, shared by its threads and the reader thread.
struct Conn {
    id: u32,
    peer: PilotAddr,
    peer_port: u16,
    link: Arc<Link>,
    started: Instant,
    queue: Mutex<Queue>,
    /// Data queued, remote closed, service done or cut: for the writer.
    ready: Condvar,
    /// The service took data, or cut: for a reader waiting for room.
    room: Condvar,
    /// The local socket, once connected.
    tcp: OnceLock<TcpStream>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// CloseOK seen: the daemon has forgotten this connection.
    remote_closed: AtomicBool,
    close_sent: AtomicBool,
    outcome: OnceLock<Outcome>,
}

impl Conn {
    /// Queues data for the local service. A queue at its `limit` makes
    /// the caller wait for room while the service keeps reading (every
    /// byte it takes is progress); `false` once it has made none for
    /// `stall`. The clock starts only once the target is connected (a
    /// slow connect is bounded by its own timeout). Never waits on the
    /// socket itself.
    fn push(&self, data: &[u8], limit: usize, stall: Duration) -> bool {
        let mut q = lock(&self.queue);
        let (mut taken, mut deadline) = (q.taken, Instant::now() + stall);
        while !q.cut && q.bytes > 0 && q.bytes + data.len() > limit {
            if q.taken != taken || self.tcp.get().is_none() {
                (taken, deadline) = (q.taken, Instant::now() + stall);
            }
            let Some(left) = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
            else {
                return false;
            };
            q = match self.room.wait_timeout(q, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        if q.cut {
            return true; // being torn down: the data has nowhere to go
        }
        q.bytes += data.len();
        match q.chunks.back_mut() {
            Some(last) if last.len() + data.len() <= COALESCE => last.extend_from_slice(data),
            _ => q.chunks.push_back(data.to_vec()),
        }
        drop(q);
        self.ready.notify_one();
        true
    }

    /// CloseOK (the daemon may send two: the first one counts).
    fn remote_closed(&self) {
        self.remote_closed.store(true, Relaxed);
        let mut q = lock(&self.queue);
        q.remote_closed = true;
        q.closed_at.get_or_insert_with(Instant::now);
        drop(q);
        self.ready.notify_all();
    }

    /// The service took `n` more bytes: progress for a waiting `push`.
    fn took(&self, n: usize) {
        lock(&self.queue).taken += n as u64;
        self.room.notify_all();
    }

    fn local_done(&self) {
        lock(&self.queue).local_done = true;
        self.ready.notify_all();
    }

    /// Whether the service has had its `LINGER` since the remote closed.
    fn lingered(&self) -> bool {
        lock(&self.queue).closed_at.is_some_and(|t| t.elapsed() >= LINGER)
    }

    /// After the remote closed: waits until the service has finished, the
    /// connection is cut, or `LINGER` has passed since the CloseOK. On the
    /// queue's condvar, so a cut (or the service's end) wakes it at once.
    fn linger(&self) {
        let mut q = lock(&self.queue);
        let until = q.closed_at.unwrap_or_else(Instant::now) + LINGER;
        while !q.cut && !q.local_done {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q = match self.ready.wait_timeout(q, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Sends Close unless the daemon has already ended the connection or
    /// we have already asked.
    fn close_once(&self) {
        if !self.remote_closed.load(Relaxed) && !self.close_sent.swap(true, Relaxed) {
            self.link.close(self.id);
        }
    }

    fn is_cut(&self) -> bool {
        lock(&self.queue).cut
    }

    /// Ends the connection abnormally: the first reason wins and the local
    /// socket is reset when it closes. Only its reading side is shut here
    /// (a FIN could pass for a complete stream); the writer notices the
    /// cut within `WRITE_POLL` even when blocked on a service that does
    /// not read.
    fn fail(&self, outcome: Outcome) {
        let _ = self.outcome.set(outcome);
        lock(&self.queue).cut = true;
        self.ready.notify_all();
        self.room.notify_all();
        if let Some(tcp) = self.tcp.get() {
            sys::net::set_linger_zero(tcp);
            let _ = tcp.shutdown(Shutdown::Read);
        }
    }
}

/// Shared by a connection's threads; when the last lets go, `drop`
/// cleans up exactly once.
struct Finish {
    conn: Arc<Conn>,
    ex: Arc<Shared>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let (c, ex) = (&self.conn, &self.ex);
        // A `push` waiting for room (one that waits on a connect has no
        // stall clock) must not wait for a connection that is gone.
        lock(&c.queue).cut = true;
        c.room.notify_all();
        c.close_once();
        {
            let mut conns = lock(&ex.conns);
            if conns.get(&c.id).is_some_and(|x| Arc::ptr_eq(x, c)) {
                conns.remove(&c.id);
            }
        }
        ex.active.fetch_sub(1, Relaxed);
        if let Some(slots) = &ex.opts.slots {
            slots.release();
        }
        let outcome = c.outcome.get().cloned().unwrap_or(Outcome::Ok);
        let moved = (c.bytes_in.load(Relaxed), c.bytes_out.load(Relaxed));
        report(ex, c.id, c.peer, c.peer_port, outcome, moved, c.started.elapsed());
    }
}

/// Logs an ended connection and hands it to `on_end`.
fn report(
    ex: &Shared,
    conn: u32,
    peer: PilotAddr,
    peer_port: u16,
    outcome: Outcome,
    (bytes_in, bytes_out): (u64, u64),
    duration: Duration,
) {
    let level = match outcome {
        Outcome::Ok => crate::log::Level::Debug,
        Outcome::Refused(_) | Outcome::ConnectFailed(_) | Outcome::Reset(_) => crate::log::Level::Warn,
    };
    crate::log::log(
        level,
        format_args!(
            "exposed connection {conn} from {peer}:{peer_port} to port {} ({}) ended: {} {} (in {bytes_in} B, out {bytes_out} B, {duration:?})",
            ex.port,
            ex.target,
            outcome.label(),
            outcome.reason(),
        ),
    );
    if let Some(f) = &ex.opts.on_end {
        f(&Ended {
            port: ex.port,
            target: ex.target,
            conn,
            peer,
            peer_port,
            outcome,
            bytes_in,
            bytes_out,
            duration,
        });
    }
}

/// The connection's thread: connects to the target, starts the
/// local→remote thread and itself feeds the queue to the local socket.
fn connect_then_relay(finish: Finish) {
    let (c, ex) = (&finish.conn, &finish.ex);
    let tcp = match TcpStream::connect_timeout(&ex.target, ex.opts.connect_timeout) {
        Ok(t) => t,
        Err(e) => {
            ex.connect_failures.fetch_add(1, Relaxed);
            let _ = c
                .outcome
                .set(Outcome::ConnectFailed(format!("{}: {e}", ex.target)));
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_write_timeout(Some(WRITE_POLL));
    let _ = c.tcp.set(tcp);
    // A cut that came while we connected could not reach the socket.
    if c.is_cut() {
        c.fail(Outcome::Reset("cut while connecting".into()));
        return;
    }
    let finish = Arc::new(finish);
    let f2 = finish.clone();
    let spawned = thread::Builder::new().stack_size(THREAD_STACK).spawn(move || {
        local_to_remote(&f2.conn, &f2.ex);
        f2.conn.local_done();
    });
    if let Err(e) = spawned {
        finish.conn.fail(Outcome::Reset(format!("no thread: {e}")));
        return;
    }
    remote_to_local(&finish.conn, &finish.ex);
}

/// Drains the connection's queue into the local socket.
fn remote_to_local(c: &Conn, ex: &Shared) {
    let Some(tcp) = c.tcp.get() else { return };
    loop {
        let next = {
            let mut q = lock(&c.queue);
            loop {
                if q.cut {
                    return;
                }
                if let Some(chunk) = q.chunks.pop_front() {
                    q.bytes -= chunk.len();
                    c.room.notify_one();
                    break Some(chunk);
                }
                if q.remote_closed {
                    break None;
                }
                q = c.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let Some(chunk) = next else {
            // The remote closed: let the service see the end and finish
            // within `LINGER`. Then shutting the reading side wakes the
            // local→remote thread even inside a read (a read timeout set
            // now would not apply to a read already waiting), and it ends
            // normally; the connection and its slot are freed.
            let _ = tcp.shutdown(Shutdown::Write);
            c.linger();
            let _ = tcp.shutdown(Shutdown::Read);
            return;
        };
        if let Err(e) = write_local(c, tcp, &chunk) {
            if !c.is_cut() {
                c.fail(Outcome::Reset(format!("writing to {}: {e}", ex.target)));
            }
            return;
        }
        c.bytes_in.fetch_add(chunk.len() as u64, Relaxed);
        ex.bytes_in.fetch_add(chunk.len() as u64, Relaxed);
    }
}

/// Writes all of `data`, waking every `WRITE_POLL` to notice a cut.
fn write_local(c: &Conn, mut tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match tcp.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                c.took(n);
            }
            Err(e) if ipc::is_timeout(&e) => {
                if c.is_cut() {
                    return Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads the local socket and sends its data as Send frames; the
/// service's EOF becomes Close.
fn local_to_remote(c: &Conn, ex: &Shared) {
    let Some(mut tcp) = c.tcp.get() else { return };
    // Starts small (idle connections stay cheap), doubles while busy.
    let mut buf = vec![0u8; ipc::DATA_HEADER + 4096];
    loop {
        match tcp.read(&mut buf[ipc::DATA_HEADER..]) {
            Ok(0) => {
                if !c.is_cut() {
                    c.close_once();
                }
                return;
            }
            // Nowhere to go. A service that keeps talking still ends once
            // its `LINGER` is over (the writer's shutdown alone would not
            // end reads while data keeps arriving).
            Ok(_) if c.remote_closed.load(Relaxed) => {
                if c.lingered() {
                    return;
                }
            }
            Ok(n) => {
                ipc::put_send_header(&mut buf, c.id, n);
                if !c.link.send(&buf[..ipc::DATA_HEADER + n], Some((c.id, c.peer))) {
                    c.fail(Outcome::Reset("daemon session lost while sending".into()));
                    return;
                }
                c.bytes_out.fetch_add(n as u64, Relaxed);
                ex.bytes_out.fetch_add(n as u64, Relaxed);
                if ipc::DATA_HEADER + n == buf.len() && n < SEND_CHUNK {
                    buf.resize(ipc::DATA_HEADER + (2 * n).min(SEND_CHUNK), 0);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The remote has closed: whatever ends the service's side now
            // is a normal end.
            Err(_) if c.remote_closed.load(Relaxed) => return,
            Err(e) => {
                if !c.is_cut() {
                    c.fail(Outcome::Reset(format!("reading from {}: {e}", ex.target)));
                }
                return;
            }
        }
    }
}
