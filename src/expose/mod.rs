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
//!    admitting (a drain), and one its [`Budget`] refuses (the gateway's:
//!    `--max-per-peer`, `--max-exposed`, `--max-conns`; or `max_conns`).
//!    Each refusal's warning is rate-limited under its own kind and peer.
//! 2. It registers the connection and spawns its thread, which connects to
//!    the target (never on the reader thread: a slow target must not stall
//!    the session). A failed connect is logged and answered with Close.
//! 3. Two threads per connection, as in the map direction, plus a bounded
//!    queue the session's reader feeds (see [`conn`]: the queue, its pacing
//!    and stall rule). The idle timeout (`--idle-timeout`) is the engine's,
//!    as for map: a peer that opens connections and sends nothing does not
//!    hold them.
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
//! 5. The last of the two threads to finish runs the engine's cleanup
//!    ([`crate::engine::finish`]: Close if the daemon still thinks it open,
//!    the slot, the log line), deregisters the connection and reports it
//!    through `on_end` (for the access log).
//!
//! Parts: [`target`] (which services may be published), [`session`] (the
//! daemon session, Bind and Unbind), [`conn`] (one connection); this file
//! is the exposure itself: its reader thread, Accept and re-binding.
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

mod conn;
pub mod session;
mod target;

use std::collections::{HashMap, HashSet};
use std::net::{Shutdown, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;

use crate::access::{Record, Side};
use crate::address::PilotAddr;
use crate::closing::Closer;
use crate::engine::Bridge;
use crate::engine::{self, Ending, Refusal, Slot};
use crate::error::{Code, Error, Result};
use crate::ipc::{self, cmd, FrameReader};
use crate::log::RateLimit;
use crate::{debug, info, warn, warn_limited, warn_source};
use std::os::unix::net::UnixStream;

pub use crate::engine::Slots;
use conn::{Conn, Finish};
use session::{open, Link, Unbind, IPC_TIMEOUT};
pub use target::{canonical, check_target};

/// Stack of the session's reader thread: buffers live on the heap,
/// nothing recurses.
pub const THREAD_STACK: usize = 128 * 1024;

// Warnings a misbehaving daemon can cause (peers' go through
// `engine::report`, per kind and per peer): rate-limited, one limit per
// kind (the counters count every one).
static MALFORMED_ACCEPT: RateLimit = RateLimit::new();
static SPAWN_FAILED: RateLimit = RateLimit::new();
static WRONG_PORT: RateLimit = RateLimit::new();
/// Each exposure retries a refused re-bind every few seconds: limited too.
static REBIND_REFUSED: RateLimit = RateLimit::new();
/// Default bound of one connection's queue of data for the local service.
pub const QUEUE_BYTES: usize = 512 * 1024;
/// How long a connection at its bound may go without progress.
pub const STALL: Duration = Duration::from_secs(1);
/// Default idle limit of a connection (the gateway passes `--idle-timeout`).
pub const IDLE: Duration = Duration::from_secs(300);
/// Re-bind backoff after the daemon went away.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Bound on waiting for the answer to Unbind; past it, closing the
/// session frees the port as on daemons without Unbind.
const UNBIND_WAIT: Duration = Duration::from_secs(1);

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
    /// A connection on which nothing moved either way for this long is
    /// ended (`idle_timeout`), as a mapped one is (`--idle-timeout`).
    pub idle_timeout: Duration,
    /// Live connections at most (newer daemons cap a client at 4096);
    /// only when `budget` is `None`.
    pub max_conns: usize,
    /// The daemon's uid seen at start: every session (the first Bind and
    /// each re-bind) refuses a socket served by another uid. `None`: not
    /// checked (tests and tools; the gateway always sets it).
    pub daemon_uid: Option<crate::sys::user::Uid>,
    /// A budget shared with others (the gateway's `--max-conns`,
    /// `--max-exposed`, `--max-per-peer`): each admitted connection holds
    /// one slot of it until it ends (instead of `max_conns`).
    pub budget: Option<Arc<dyn Budget>>,
    /// Bound on the whole first Bind (connect, request, answer), so a
    /// stalled daemon costs the caller at most this long.
    pub bind_timeout: Duration,
    /// Called once per finished or refused connection (the access log).
    /// It must not block: refusals are reported from the session's reader
    /// thread (the access log's `try_send` queue fits).
    pub on_end: Option<OnEnd>,
    /// The gateway's closer: Closes wait until they lose nothing (see
    /// `engine`, "Closing"); `None`: every Close at once.
    pub closer: Option<Arc<Closer>>,
    /// Send a PROXY protocol v2 header to the service before any data.
    pub proxy_protocol: bool,
    /// This node's own pilot address, for the PROXY header's destination.
    pub local_addr: Option<PilotAddr>,
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
            idle_timeout: IDLE,
            max_conns: 4096,
            daemon_uid: None,
            budget: None,
            bind_timeout: IPC_TIMEOUT,
            on_end: None,
            closer: None,
            proxy_protocol: false,
            local_addr: None,
        }
    }
}

/// A budget exposed connections are admitted from, per peer.
pub trait Budget: Send + Sync {
    /// The slot a connection from `peer` holds until it ends, or why it
    /// is refused (the budget counts the refusal).
    fn admit(&self, peer: PilotAddr) -> std::result::Result<Slot, Refusal>;
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
    /// Ended because nothing moved for the idle timeout.
    pub idle_timeouts: u64,
    /// Successful re-binds after the daemon session was lost.
    pub rebinds: u64,
    /// Sessions given up because the daemon stopped reading them (a peer
    /// that does not read blocks the daemon's inline Send): each cut every
    /// connection on the port.
    pub session_stalls: u64,
}

/// One finished (or refused) exposed connection.
#[derive(Clone, Debug)]
pub struct Ended {
    pub port: u16,
    pub target: SocketAddr,
    pub conn: u32,
    pub peer: PilotAddr,
    pub peer_port: u16,
    pub outcome: Ending,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
}

impl Ended {
    /// Its access-log record.
    pub fn record(&self) -> Record<'_> {
        Record {
            side: Side::Expose {
                peer_port: self.peer_port,
                port: self.port,
                target: self.target,
            },
            pilot: self.peer,
            to_pilot: self.bytes_out,
            from_pilot: self.bytes_in,
            duration: self.duration,
            outcome: self.outcome.label(),
            reason: self.outcome.reason(),
        }
    }
}

/// One exposed port. Dropping it stops it.
pub struct Exposure {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

pub struct Shared {
    socket: PathBuf,
    pub port: u16,
    pub target: SocketAddr,
    pub opts: Options,
    stopping: AtomicBool,
    /// No new connections (a drain): every Accept is refused.
    draining: AtomicBool,
    state: Mutex<State>,
    /// The current session, so `stop` can end it.
    link: Mutex<Option<Arc<Link>>>,
    pub conns: Mutex<HashMap<u32, Arc<Conn>>>,
    pub active: AtomicU64,
    total: AtomicU64,
    /// What finished connections moved (live ones are summed in).
    pub done_in: AtomicU64,
    pub done_out: AtomicU64,
    pub idle_timeouts: AtomicU64,
    refused: AtomicU64,
    over_limit: AtomicU64,
    refused_draining: AtomicU64,
    slow_resets: AtomicU64,
    pub connect_failures: AtomicU64,
    rebinds: AtomicU64,
    session_stalls: AtomicU64,
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
            done_in: AtomicU64::new(0),
            done_out: AtomicU64::new(0),
            idle_timeouts: AtomicU64::new(0),
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
        let (mut bytes_in, mut bytes_out) = {
            let conns = lock(&s.conns);
            let live = conns
                .values()
                .map(|c| (c.core.from_pilot.load(Relaxed), c.core.to_pilot.load(Relaxed)));
            live.fold((0, 0), |(i, o), (a, b)| (i + a, o + b))
        };
        bytes_in += s.done_in.load(Relaxed);
        bytes_out += s.done_out.load(Relaxed);
        Counters {
            active: s.active.load(Relaxed),
            total: s.total.load(Relaxed),
            bytes_in,
            bytes_out,
            refused: s.refused.load(Relaxed),
            over_limit: s.over_limit.load(Relaxed),
            refused_draining: s.refused_draining.load(Relaxed),
            slow_resets: s.slow_resets.load(Relaxed),
            connect_failures: s.connect_failures.load(Relaxed),
            idle_timeouts: s.idle_timeouts.load(Relaxed),
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
        c.fail(Ending::Reset(why.to_string()));
    }
}

/// Why a new connection from `peer` is not admitted, counted; `Ok`
/// admits it, with the slot (of the budget) its cleanup gives back.
fn admit(ex: &Shared, peer: PilotAddr) -> std::result::Result<Option<Slot>, Refusal> {
    let refusal = |kind, why: &str| Refusal {
        kind,
        why: why.to_string(),
    };
    if ex.opts.allow.as_ref().is_some_and(|set| !set.contains(&peer)) {
        ex.refused.fetch_add(1, Relaxed);
        return Err(refusal("refused_peer", "not in the allow-list"));
    }
    if ex.draining.load(Relaxed) {
        ex.refused_draining.fetch_add(1, Relaxed);
        return Err(refusal("refused_draining", "draining: no new connections"));
    }
    let admitted = match &ex.opts.budget {
        Some(budget) => budget.admit(peer).map(Some),
        None if ex.active.load(Relaxed) >= ex.opts.max_conns as u64 => Err(Refusal {
            kind: "refused_max_conns",
            why: format!("{} connections already live", ex.opts.max_conns),
        }),
        None => Ok(None),
    };
    if admitted.is_err() {
        ex.over_limit.fetch_add(1, Relaxed);
    }
    admitted
}

fn accept(ex: &Arc<Shared>, link: &Arc<Link>, payload: &[u8]) {
    let accepted = Instant::now();
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
        engine::send_close(&**link, a.conn);
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
    let slot = match admit(ex, a.remote) {
        Ok(slot) => slot,
        Err(Refusal { kind, why }) => {
            // Not at once: a Close this soon after the Accept is lost on
            // its way to the dialer, which then waits out its dial
            // (`engine` "Closing"); the closer's poller sends it once it
            // reaches the dialer (≤ ACCEPT_SETTLE). This thread never waits.
            match &ex.opts.closer {
                Some(closer) => {
                    let (link, conn) = (link.clone(), a.conn);
                    closer.close_when_established(
                        a.conn,
                        accepted,
                        Box::new(move || {
                            engine::send_close(&*link, conn);
                        }),
                    );
                }
                None => {
                    engine::send_close(&**link, a.conn);
                }
            }
            warn_source!(
                kind,
                a.remote,
                "exposed port {}: refused {}:{} ({why})",
                ex.port,
                a.remote,
                a.remote_port
            );
            ex.ended(&Ended {
                port: ex.port,
                target: ex.target,
                conn: a.conn,
                peer: a.remote,
                peer_port: a.remote_port,
                outcome: Ending::Refused(why),
                bytes_in: 0,
                bytes_out: 0,
                duration: Duration::ZERO,
            });
            return;
        }
    };
    let conn = Arc::new(Conn::new(a.conn, a.remote, a.remote_port, link.clone()));
    let _ = conn.core.accepted.set(accepted);
    if let Some(closer) = &ex.opts.closer {
        let _ = conn.core.closer.set(closer.clone());
    }
    if let Some(slot) = slot {
        conn.core.hold(slot);
    }
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
        .stack_size(engine::THREAD_STACK)
        .spawn(move || conn::connect_then_relay(finish));
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
        c.fail(Ending::Reset(why));
    }
}

impl Shared {
    /// Hands a finished or refused connection to `on_end`.
    fn ended(&self, e: &Ended) {
        if let Some(f) = &self.opts.on_end {
            f(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, expect_frame, read_frame, recv, send, wait_until};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixListener;

    fn peer() -> PilotAddr {
        PilotAddr::new(0, 9)
    }

    struct Rig {
        ex: Exposure,
        daemon: UnixStream,
        service: TcpListener,
        ended: Arc<Mutex<Vec<Ended>>>,
        _listener: UnixListener,
    }

    /// An exposure of port 80 on a scripted daemon, serving a loopback
    /// listener the test accepts on.
    fn rig(opts: Options) -> Rig {
        let dir = testkit::scratch();
        let (path, l) = testkit::daemon(&dir);
        let service = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = service.local_addr().unwrap();
        let bind = thread::spawn(move || {
            let mut s = testkit::session(&l);
            assert_eq!(read_frame(&mut s).map(|f| f.0), Some(cmd::BIND));
            send(&mut s, cmd::BIND_OK, &[&[0, 80]]);
            (s, l)
        });
        let ended: Arc<Mutex<Vec<Ended>>> = Arc::default();
        let e2 = ended.clone();
        let opts = Options {
            on_end: Some(Arc::new(move |e: &Ended| lock(&e2).push(e.clone()))),
            ..opts
        };
        let ex = Exposure::start(&path, 80, target, opts).unwrap();
        let (daemon, listener) = bind.join().unwrap();
        Rig {
            ex,
            daemon,
            service,
            ended,
            _listener: listener,
        }
    }

    impl Rig {
        fn accept(&mut self, conn: u32, from: PilotAddr) {
            send(
                &mut self.daemon,
                cmd::ACCEPT,
                &[
                    &80u16.to_be_bytes(),
                    &conn.to_be_bytes(),
                    &from.to_wire(),
                    &4000u16.to_be_bytes(),
                ],
            );
        }

        fn service_conn(&self) -> TcpStream {
            let (s, _) = self.service.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        }

        fn ending(&self) -> Ending {
            assert!(wait_until(Duration::from_secs(10), || !lock(&self.ended).is_empty()));
            lock(&self.ended)[0].outcome.clone()
        }
    }

    #[test]
    fn an_exposed_connection_carries_bytes_both_ways_and_ends_ok() {
        let mut r = rig(Options::default());
        r.accept(1, peer());
        let mut svc = r.service_conn();
        recv(&mut r.daemon, 1, b"request");
        let mut buf = [0u8; 7];
        svc.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"request");
        svc.write_all(b"reply").unwrap();
        let body = expect_frame(&mut r.daemon, cmd::SEND).unwrap();
        assert_eq!((&body[..4], &body[4..]), (&1u32.to_be_bytes()[..], &b"reply"[..]));
        send(&mut r.daemon, cmd::CLOSE_OK, &[&1u32.to_be_bytes()]);
        send(&mut r.daemon, cmd::CLOSE_OK, &[&1u32.to_be_bytes()]); // duplicate
        let mut rest = Vec::new();
        svc.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "EOF after the peer closed");
        drop(svc);
        assert_eq!(r.ending(), Ending::Ok);
        let c = r.ex.counters();
        assert_eq!((c.total, c.bytes_in, c.bytes_out, c.active), (1, 7, 5, 0));
    }

    #[test]
    fn the_services_end_sends_close() {
        let mut r = rig(Options::default());
        r.accept(2, peer());
        let svc = r.service_conn();
        drop(svc);
        assert_eq!(
            expect_frame(&mut r.daemon, cmd::CLOSE),
            Some(2u32.to_be_bytes().to_vec())
        );
        send(&mut r.daemon, cmd::CLOSE_OK, &[&2u32.to_be_bytes()]);
        assert_eq!(r.ending(), Ending::Ok);
    }

    #[test]
    fn a_silent_exposed_connection_ends_at_the_idle_timeout() {
        let mut r = rig(Options {
            idle_timeout: Duration::from_millis(300),
            ..Options::default()
        });
        r.accept(3, peer());
        let mut svc = r.service_conn();
        assert_eq!(
            expect_frame(&mut r.daemon, cmd::CLOSE),
            Some(3u32.to_be_bytes().to_vec())
        );
        assert_eq!(r.ending(), Ending::IdleTimeout);
        assert_eq!(r.ex.counters().idle_timeouts, 1);
        let mut buf = [0u8; 1];
        assert!(
            svc.read(&mut buf).is_err(),
            "the service is reset, not sent a FIN"
        );
    }

    #[test]
    fn a_peer_outside_the_allow_list_is_closed_and_counted() {
        let mut r = rig(Options {
            allow: Some([PilotAddr::new(0, 5)].into_iter().collect()),
            ..Options::default()
        });
        r.accept(4, peer());
        assert_eq!(
            expect_frame(&mut r.daemon, cmd::CLOSE),
            Some(4u32.to_be_bytes().to_vec())
        );
        assert!(matches!(r.ending(), Ending::Refused(why) if why.contains("allow")));
        assert_eq!(r.ex.counters().refused, 1);
    }

    #[test]
    fn a_target_that_is_down_is_connect_failed_and_closed() {
        let mut r = rig(Options::default());
        // Nothing listens there any more.
        let gone = std::mem::replace(&mut r.service, TcpListener::bind("127.0.0.1:0").unwrap());
        drop(gone);
        r.accept(5, peer());
        assert_eq!(
            expect_frame(&mut r.daemon, cmd::CLOSE),
            Some(5u32.to_be_bytes().to_vec())
        );
        assert!(matches!(r.ending(), Ending::ConnectFailed(_)));
        assert_eq!(r.ex.counters().connect_failures, 1);
    }

    #[test]
    fn beyond_max_conns_an_accept_is_refused() {
        let mut r = rig(Options {
            max_conns: 1,
            ..Options::default()
        });
        r.accept(6, peer());
        let _svc = r.service_conn();
        assert!(wait_until(Duration::from_secs(5), || r.ex.counters().active == 1));
        r.accept(7, peer());
        assert_eq!(
            expect_frame(&mut r.daemon, cmd::CLOSE),
            Some(7u32.to_be_bytes().to_vec())
        );
        assert_eq!(r.ex.counters().over_limit, 1);
    }

    #[test]
    fn an_accept_for_another_port_is_closed_unserved() {
        let mut r = rig(Options::default());
        send(
            &mut r.daemon,
            cmd::ACCEPT,
            &[
                &81u16.to_be_bytes(),
                &8u32.to_be_bytes(),
                &peer().to_wire(),
                &4000u16.to_be_bytes(),
            ],
        );
        assert_eq!(
            expect_frame(&mut r.daemon, cmd::CLOSE),
            Some(8u32.to_be_bytes().to_vec())
        );
        assert_eq!(r.ex.counters().total, 0);
    }

    #[test]
    fn an_error_frame_does_not_end_the_connections() {
        let mut r = rig(Options::default());
        r.accept(9, peer());
        let mut svc = r.service_conn();
        send(&mut r.daemon, cmd::ERROR, &[&[0, 1], b"send: no such connection"]);
        recv(&mut r.daemon, 9, b"still");
        let mut buf = [0u8; 5];
        svc.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"still");
        assert_eq!(r.ex.state(), State::Bound);
    }

    #[test]
    fn a_service_that_stops_reading_is_reset_and_the_session_goes_on() {
        let mut r = rig(Options {
            queue_bytes: 64 * 1024,
            stall: Duration::from_millis(200),
            ..Options::default()
        });
        r.accept(10, peer());
        let _stuck = r.service_conn(); // never reads
        let chunk = vec![1u8; 60_000];
        for _ in 0..200 {
            recv(&mut r.daemon, 10, &chunk);
        }
        assert!(matches!(r.ending(), Ending::Reset(why) if why.contains("stopped reading")));
        assert_eq!(r.ex.counters().slow_resets, 1);
        // Another connection is served at once.
        r.accept(11, peer());
        let mut svc = r.service_conn();
        recv(&mut r.daemon, 11, b"ok");
        let mut buf = [0u8; 2];
        svc.read_exact(&mut buf).unwrap();
    }

    #[test]
    fn a_lost_session_cuts_every_connection_and_rebinds() {
        let mut r = rig(Options::default());
        r.accept(12, peer());
        let mut svc = r.service_conn();
        assert!(wait_until(Duration::from_secs(5), || r.ex.counters().active == 1));
        r.daemon.shutdown(std::net::Shutdown::Both).unwrap();
        assert!(matches!(r.ending(), Ending::Reset(why) if why.contains("session lost")));
        let mut buf = [0u8; 1];
        assert!(svc.read(&mut buf).is_err(), "reset");
        assert!(wait_until(Duration::from_secs(5), || matches!(
            r.ex.state(),
            State::Rebinding(_)
        )));
    }

    #[test]
    fn a_drain_refuses_new_connections() {
        let mut r = rig(Options::default());
        r.ex.shared.draining.store(true, Relaxed);
        r.accept(13, peer());
        assert_eq!(
            expect_frame(&mut r.daemon, cmd::CLOSE),
            Some(13u32.to_be_bytes().to_vec())
        );
        assert_eq!(r.ex.counters().refused_draining, 1);
        assert!(!r.ex.is_admitting());
    }
}
