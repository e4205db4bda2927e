//! The map direction: one accepted TCP client bridged to the same port of
//! its agent, through a pilot session of its own (`listener.rs` accepts
//! and hands connections here). What both directions share (endings, the
//! copy loop, the idle timeout, Close, the cleanup, rate-limited lines)
//! is in [`crate::engine`]; this is what only map does.
//!
//! 1. [`serve`] registers the connection in its mapping's [`Connections`]
//!    and starts a thread, which opens the connection's *own* IPC session
//!    and sends Dial. A session per connection means a slow or dead agent
//!    (the daemon retries for up to ~30 s) never stalls another
//!    connection. If the dial fails or `--dial-timeout` passes (then
//!    Cancel is sent), the client is reset and the reason logged.
//! 2. That thread spawns the agent→client thread and itself copies
//!    client→agent ([`engine::copy_to_pilot`]). Agent→client: Recv frames
//!    are parsed in the session's read buffer and their payloads written
//!    to the client with one `writev`, straight from where the socket read
//!    put them.
//! 3. Endings. Pilot streams have no half-close:
//!    - client's EOF ([`client_eof`]): if the kernel says the client closed
//!      its socket, the stream ends at once (`client_closed`); if it only
//!      shut its sending side, we stop sending and keep delivering the
//!      agent's reply until the agent closes, the client closes (looked at
//!      again every ≤ 500 ms) or `--half-closed-timeout` passes
//!      (`half_closed_timeout`);
//!    - agent closes (CloseOK): [`engine::linger_after_remote_close`];
//!    - anything else (daemon gone, protocol error, client reset, idle):
//!      the client is *reset*, so it never mistakes a cut stream for a
//!      complete one.
//! 4. The last of the two threads to finish drops the [`ConnCleanup`]:
//!    [`engine::finish`] (Close, slot, log line), then the group's totals
//!    and the access-log record; dropping the session lets the daemon free
//!    everything it held.

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::access::{AccessLog, Record, Side};
use crate::address::PilotAddr;
use crate::engine::{self, Bridge, CopyEnd, Core, Ending, Frame, PilotSide, Refusal, Slot, Slots};
use crate::ipc::{self, cmd, FrameReader, IpcError};
use crate::stats::Counters;
use crate::sys::sock_diag::{self, PeerState};
use crate::{debug, subnet, sys, warn, warn_source};

pub use crate::engine::{BUFFER_START, THREAD_STACK};

/// client→agent limit: one read, plus the 9-byte Send header in front, is
/// one Send frame of at most 256 KiB (the daemon accepts up to 1 MiB).
pub const UP_BUFFER: usize = 256 * 1024 - ipc::DATA_HEADER;
/// agent→client limit: dozens of 4 KiB Recv frames per read.
pub const DOWN_BUFFER: usize = 256 * 1024;
/// Most Recv payloads gathered into one `writev`.
const MAX_IOVECS: usize = 64;
/// After the client's EOF, how soon its socket is first looked at again
/// (the client's `close` may still be orphaning it as we read its FIN);
/// the pause doubles up to [`RECHECK_MAX`]. A lookup costs ~10 µs (see
/// `sys::sock_diag`), so 5,000 half-closed clients cost ~1% of a core.
const RECHECK_FIRST: Duration = Duration::from_millis(10);
const RECHECK_MAX: Duration = Duration::from_millis(500);

/// Settings that every connection shares.
#[derive(Clone, Debug)]
pub struct ConnSettings {
    /// The daemon's IPC socket; each connection opens its own session.
    pub daemon_socket: PathBuf,
    /// The daemon's uid seen at start: a connection whose peer is another
    /// uid is a failed dial (whoever serves the path now is not the daemon).
    pub daemon_uid: crate::sys::user::Uid,
    pub max_conns: usize,
    /// `--max-exposed`: slots of `max_conns` the expose side (exposures'
    /// daemon sessions and exposed connections together) may hold; while
    /// any exposure runs, forwarded connections hold at most the rest, so
    /// neither side can take the other's share (issue 18).
    pub max_exposed: usize,
    /// `--max-per-peer`: exposed connections one peer node may hold.
    pub max_per_peer: usize,
    pub dial_timeout: Duration,
    pub idle_timeout: Duration,
    /// `--half-closed-timeout`: idle limit once the client has shut its
    /// sending side but still holds its socket.
    pub half_closed_timeout: Duration,
    /// `--allow-remote`: serve clients from other hosts too.
    pub allow_remote: bool,
}

/// Gateway-wide state of the data path, shared by every listener and
/// connection (map and expose): settings, connection slots, the access log.
pub struct DataPath {
    pub settings: ConnSettings,
    /// Slots of `--max-conns` taken now (connections of both directions
    /// and exposures' sessions).
    pub active: AtomicUsize,
    /// Of those, the forwarded (map side) connections'.
    forwarded: AtomicUsize,
    /// Closes waiting for delivery that keep their room in `active`
    /// (`engine::finish`, [`Slots::linger`]).
    lingering: Mutex<Lingering>,
    /// Connections refused because of `--max-conns`.
    pub refused: AtomicU64,
    /// What the expose side holds (see [`ConnSettings::max_exposed`]).
    exposed: Mutex<ExposedUse>,
    /// Exposed connections refused at `--max-exposed`.
    pub refused_max_exposed: AtomicU64,
    /// Exposed connections refused at `--max-per-peer`.
    pub refused_per_peer: AtomicU64,
    /// Connections that have ended, either direction (for deciding when
    /// to return memory).
    pub finished: AtomicU64,
    next_id: AtomicU64,
    pub access: Option<AccessLog>,
    /// The gateway's closer (see `engine`, "Closing"), once started; every
    /// connection, mapped or exposed, hands its Close to it.
    pub closer: std::sync::OnceLock<Arc<crate::closing::Closer>>,
}

impl DataPath {
    pub fn new(settings: ConnSettings, access: Option<AccessLog>) -> Arc<DataPath> {
        Arc::new(DataPath {
            settings,
            active: AtomicUsize::new(0),
            forwarded: AtomicUsize::new(0),
            lingering: Mutex::new(Lingering::default()),
            refused: AtomicU64::new(0),
            exposed: Mutex::new(ExposedUse::default()),
            refused_max_exposed: AtomicU64::new(0),
            refused_per_peer: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            access,
            closer: std::sync::OnceLock::new(),
        })
    }

    /// Takes a forwarded connection's slot, or `false` when the map side's
    /// share ([`forwarded_share`](DataPath::forwarded_share)) or the
    /// whole `--max-conns` is in use.
    pub fn try_acquire(&self) -> bool {
        let share = self.forwarded_share();
        let taken = self
            .forwarded
            .fetch_update(Relaxed, Relaxed, |n| (n < share).then_some(n + 1))
            .is_ok();
        if taken && !self.take_any() {
            self.forwarded.fetch_sub(1, Relaxed);
            return false;
        }
        taken
    }

    /// Slots forwarded connections may hold now: all of `--max-conns`
    /// while nothing is exposed (a map-only gateway loses nothing), the
    /// rest after `--max-exposed` while an exposure runs (its daemon
    /// session holds an exposed slot for as long as it runs).
    pub fn forwarded_share(&self) -> usize {
        let s = &self.settings;
        if self.exposed_in_use() > 0 {
            s.max_conns.saturating_sub(s.max_exposed)
        } else {
            s.max_conns
        }
    }

    /// Takes a slot of the whole `--max-conns`, or `false` when none is
    /// free. With none free, a close still waiting for delivery gives its
    /// room up: the slot passes to the caller as it is (`active` stays),
    /// and the longest-waiting close is cut short, so its Close goes out
    /// now (counted `close_unconfirmed`) and its thread and descriptors go.
    fn take_any(&self) -> bool {
        let free = self
            .active
            .fetch_update(Relaxed, Relaxed, |n| {
                (n < self.settings.max_conns).then_some(n + 1)
            })
            .is_ok();
        if free {
            return true;
        }
        {
            let mut l = self.lingering.lock().unwrap_or_else(|p| p.into_inner());
            if l.held <= l.given {
                return false;
            }
            l.given += 1;
        }
        if let Some(closer) = self.closer.get() {
            closer.cut_oldest();
        }
        true
    }

    /// A closing connection keeps its room in `active` (see [`take_any`]).
    fn begin_linger(&self) {
        self.lingering.lock().unwrap_or_else(|p| p.into_inner()).held += 1;
    }

    /// Its Close went out: the room goes back, unless a new connection
    /// took a lingering close's room meanwhile (then that was the slot).
    pub fn end_linger(&self) {
        let mut l = self.lingering.lock().unwrap_or_else(|p| p.into_inner());
        l.held = l.held.saturating_sub(1);
        if l.given > 0 {
            l.given -= 1;
        } else {
            self.active.fetch_sub(1, Relaxed);
        }
    }

    /// Takes a slot for the expose side: an exposure's daemon session
    /// (`peer` `None`) or a connection from `peer`. In this order: the
    /// peer's own cap (`--max-per-peer`; its cause whatever others hold),
    /// the expose side's share (`--max-exposed`), the whole budget
    /// (`--max-conns`). A connection's refusal is counted under its
    /// reason; a session's is the caller's error to report.
    pub fn take_exposed(&self, peer: Option<PilotAddr>) -> Result<(), Refusal> {
        let s = &self.settings;
        let mut used = self.exposed.lock().unwrap_or_else(|p| p.into_inner());
        let count = |n: &AtomicU64| {
            if peer.is_some() {
                n.fetch_add(1, Relaxed);
            }
        };
        if let Some(p) = peer {
            let held = used.per_peer.get(&p).copied().unwrap_or(0);
            if held >= s.max_per_peer {
                count(&self.refused_per_peer);
                return Err(Refusal {
                    kind: "refused_per_peer",
                    why: format!("--max-per-peer {} reached: {p} holds {held}", s.max_per_peer),
                });
            }
        }
        if used.taken >= s.max_exposed {
            count(&self.refused_max_exposed);
            return Err(Refusal {
                kind: "refused_max_exposed",
                why: format!(
                    "--max-exposed {} reached ({} exposed connections and exposures' sessions)",
                    s.max_exposed, used.taken
                ),
            });
        }
        if !self.take_any() {
            count(&self.refused);
            return Err(Refusal {
                kind: "refused_max_conns",
                why: format!("--max-conns {} reached", s.max_conns),
            });
        }
        used.taken += 1;
        if let Some(p) = peer {
            *used.per_peer.entry(p).or_insert(0) += 1;
        }
        Ok(())
    }

    /// Gives back what [`take_exposed`](DataPath::take_exposed) took for
    /// `peer` (a finished connection is counted as one, for trimming).
    pub fn release_exposed(&self, peer: Option<PilotAddr>) {
        self.release_share(peer);
        self.active.fetch_sub(1, Relaxed);
    }

    /// [`release_exposed`](DataPath::release_exposed) for a connection
    /// whose Close waits: its room in `--max-conns` stays taken until
    /// [`end_linger`](DataPath::end_linger).
    pub fn linger_exposed(&self, peer: Option<PilotAddr>) {
        self.release_share(peer);
        self.begin_linger();
    }

    /// The expose side's share and the peer's of one slot.
    fn release_share(&self, peer: Option<PilotAddr>) {
        {
            let mut used = self.exposed.lock().unwrap_or_else(|p| p.into_inner());
            used.taken = used.taken.saturating_sub(1);
            if let Some(p) = peer {
                if let Some(n) = used.per_peer.get_mut(&p) {
                    *n -= 1;
                    if *n == 0 {
                        used.per_peer.remove(&p);
                    }
                }
            }
        }
        if peer.is_some() {
            self.finished.fetch_add(1, Relaxed);
        }
    }

    /// Slots the expose side holds now (sessions and connections).
    pub fn exposed_in_use(&self) -> usize {
        self.exposed.lock().unwrap_or_else(|p| p.into_inner()).taken
    }
}

/// Closes that wait holding room in `active` (`held`), and how many of
/// those rooms new connections took meanwhile (`given`, at most `held`):
/// `active` counts live connections plus `held - given`.
#[derive(Default)]
struct Lingering {
    held: usize,
    given: usize,
}

/// The expose side's share of the slots: how many it holds, and how many
/// connections each peer node holds (an entry only while it holds one, so
/// at most `max_exposed` entries).
#[derive(Default)]
struct ExposedUse {
    taken: usize,
    per_peer: HashMap<PilotAddr, usize>,
}

/// A connection's slot: freeing it also counts a finished connection.
impl Slots for DataPath {
    fn try_acquire(&self) -> bool {
        DataPath::try_acquire(self)
    }

    fn release(&self) {
        self.forwarded.fetch_sub(1, Relaxed);
        self.active.fetch_sub(1, Relaxed);
        self.finished.fetch_add(1, Relaxed);
    }

    fn linger(&self) {
        self.forwarded.fetch_sub(1, Relaxed);
        self.finished.fetch_add(1, Relaxed);
        self.begin_linger();
    }

    fn end_linger(&self) {
        DataPath::end_linger(self);
    }
}

/// The live connections of one mapping (or any other group that wants its
/// own counters), plus what finished ones moved.
#[derive(Default)]
pub struct Connections {
    live: Mutex<HashMap<u64, Arc<Conn>>>,
    total: AtomicU64,
    dial_failures: AtomicU64,
    idle_timeouts: AtomicU64,
    /// Clients refused because they came from another host.
    pub refused_remote: AtomicU64,
    /// Clients reset because a connection thread could not be started.
    spawn_failures: AtomicU64,
    done_up: AtomicU64,
    done_down: AtomicU64,
}

impl Connections {
    pub fn counters(&self) -> Counters {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let (mut up, mut down) = (self.done_up.load(Relaxed), self.done_down.load(Relaxed));
        for c in live.values() {
            up += c.core.to_pilot.load(Relaxed);
            down += c.core.from_pilot.load(Relaxed);
        }
        Counters {
            active: live.len() as u64,
            total: self.total.load(Relaxed),
            bytes_up: up,
            bytes_down: down,
            dial_failures: self.dial_failures.load(Relaxed),
            idle_timeouts: self.idle_timeouts.load(Relaxed),
            refused_remote: self.refused_remote.load(Relaxed),
            spawn_failures: self.spawn_failures.load(Relaxed),
        }
    }

    fn is_empty(&self) -> bool {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Waits up to `wait` for the live connections to end on their own
    /// (`--drain`: the listeners have stopped accepting already).
    pub fn drain(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && !self.is_empty() {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Tears down every live connection and waits (bounded) until their
    /// threads have finished. Returns how many were cut. A thread blocked
    /// writing to a client that does not read notices within
    /// [`engine::WRITE_POLL`].
    pub fn close_all(&self, wait: Duration) -> usize {
        let conns: Vec<Arc<Conn>> = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            live.values().cloned().collect()
        };
        for c in &conns {
            c.fail(Ending::Reset("closed by the gateway".into()));
        }
        let deadline = Instant::now() + wait;
        while !self.is_empty() {
            if Instant::now() >= deadline {
                warn!("connections still closing after {wait:?}");
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        conns.len()
    }
}

/// One bridged connection, shared by its two threads and its mapping's
/// [`Connections`] (so `unmap` and `stop` can tear it down).
pub struct Conn {
    pub id: u64,
    pub client: SocketAddr,
    pub local: SocketAddr,
    pub pilot: PilotAddr,
    core: Core,
    /// The connection's own session: one descriptor serves the dial, both
    /// threads and the final Close.
    ipc: UnixStream,
}

impl PilotSide for Conn {
    fn send(&self, frame: &[u8], what: Frame) -> crate::error::Result<()> {
        if what == Frame::Close {
            let _ = self.ipc.set_write_timeout(Some(engine::close_write_bound()));
        }
        (&self.ipc)
            .write_all(frame)
            .map_err(|e| crate::error::Error::io("writing to the daemon", &e))
    }
}

impl Bridge for Conn {
    fn core(&self) -> &Core {
        &self.core
    }

    /// Shutting the session wakes the agent→client thread too.
    fn fail(&self, ending: Ending) {
        self.core.fail_tcp(ending);
        let _ = self.ipc.shutdown(Shutdown::Both);
    }
}

/// Shared (in an `Arc`) by both threads of a connection; when the last one
/// lets go, `drop` cleans up exactly once.
pub struct ConnCleanup {
    conn: Arc<Conn>,
    data_path: Arc<DataPath>,
    group: Arc<Connections>,
}

impl Drop for ConnCleanup {
    fn drop(&mut self) {
        let c = &self.conn;
        let ending = engine::finish(
            &**c,
            format_args!(
                "connection {} from {} to {} port {}",
                c.id,
                c.client,
                c.pilot,
                c.local.port()
            ),
            &c.client.ip().to_string(),
        );
        let (up, down) = (c.core.to_pilot.load(Relaxed), c.core.from_pilot.load(Relaxed));
        {
            let mut live = self.group.live.lock().unwrap_or_else(|p| p.into_inner());
            self.group.done_up.fetch_add(up, Relaxed);
            self.group.done_down.fetch_add(down, Relaxed);
            live.remove(&c.id);
        }
        match ending {
            Ending::DialFailed(_) => self.group.dial_failures.fetch_add(1, Relaxed),
            ref e if e.is_timeout() => self.group.idle_timeouts.fetch_add(1, Relaxed),
            _ => 0,
        };
        if let Some(log) = &self.data_path.access {
            log.write(&Record {
                side: Side::Map {
                    client: c.client,
                    local: Some(c.local),
                },
                pilot: c.pilot,
                to_pilot: up,
                from_pilot: down,
                duration: c.core.started().elapsed(),
                outcome: ending.label(),
                reason: ending.reason(),
            });
        }
    }
}

/// Registers the connection and starts its first thread. The listener
/// took its slot in `data_path`; from here on it is freed exactly once,
/// whatever fails.
pub fn serve(
    tcp: TcpStream,
    client: SocketAddr,
    local: SocketAddr,
    pilot: PilotAddr,
    data_path: &Arc<DataPath>,
    group: &Arc<Connections>,
) {
    let slot = Slot::adopt(data_path.clone());
    // Only the socket is made here; it is connected from the connection's
    // own thread (`dial`), so a stalled daemon never holds up the accept
    // thread. Failing here means we are out of descriptors.
    let ipc = match sys::net::unix_socket() {
        Ok(s) => s,
        Err(e) => {
            let why = format!("cannot open a socket for the daemon session: {e}");
            group.dial_failures.fetch_add(1, Relaxed);
            crate::stats::note_dial_failure(local.ip(), local.port(), &why);
            group.total.fetch_add(1, Relaxed);
            warn_source!(
                "dial_failed",
                client.ip(),
                "dial {pilot} port {} for {client} failed: {why}",
                local.port()
            );
            if let Some(log) = &data_path.access {
                let side = Side::Map {
                    client,
                    local: Some(local),
                };
                log.write(&Record::without_data(side, pilot, "dial_failed", &why));
            }
            sys::net::reset(tcp);
            drop(slot);
            return;
        }
    };
    let core = Core::new();
    let _ = core.tcp.set(tcp);
    if let Some(closer) = data_path.closer.get() {
        let _ = core.closer.set(closer.clone());
    }
    core.hold(slot);
    let conn = Arc::new(Conn {
        id: data_path.next_id.fetch_add(1, Relaxed),
        client,
        local,
        pilot,
        core,
        ipc,
    });
    group.total.fetch_add(1, Relaxed);
    group
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(conn.id, conn.clone());
    let cleanup = Arc::new(ConnCleanup {
        conn: conn.clone(),
        data_path: data_path.clone(),
        group: group.clone(),
    });
    // Held here too, so that a failed spawn records its ending before the
    // last holder cleans up (and writes the access-log line).
    let ours = cleanup.clone();
    let spawned = thread::Builder::new()
        .stack_size(THREAD_STACK)
        .spawn(move || dial_then_relay(cleanup));
    if let Err(e) = spawned {
        group.spawn_failures.fetch_add(1, Relaxed);
        conn.fail(Ending::Reset(format!("cannot start a thread: {e}")));
    }
    drop(ours);
}

/// First thread of a connection: dial, start the agent→client thread, then
/// copy client→agent.
fn dial_then_relay(cleanup: Arc<ConnCleanup>) {
    let c = cleanup.conn.clone();
    let limits = &cleanup.data_path.settings;
    let Some(tcp) = c.core.tcp() else { return };
    let _ = tcp.set_nodelay(true);
    let port = c.local.port();
    let reader = match dial(&c, port, limits) {
        Ok(r) => r,
        Err(_) if c.core.is_over() => return, // torn down by unmap or stop
        Err(why) => {
            crate::stats::note_dial_failure(c.local.ip(), port, &why.to_string());
            warn_source!(
                "dial_failed",
                c.client.ip(),
                "dial {} port {port} for {} failed: {why}",
                c.pilot,
                c.client
            );
            c.fail(Ending::DialFailed(why));
            return;
        }
    };
    debug!(
        "connection {} from {} bridged to {} port {port}",
        c.id, c.client, c.pilot
    );
    c.core.touch();
    let _ = tcp.set_read_timeout(Some(limits.idle_timeout));
    let _ = tcp.set_write_timeout(Some(engine::WRITE_POLL));
    let _ = c.ipc.set_read_timeout(Some(limits.idle_timeout));
    let _ = c.ipc.set_write_timeout(Some(limits.idle_timeout));
    let down = {
        let (c2, idle) = (c.clone(), limits.idle_timeout);
        let cleanup2 = cleanup.clone();
        thread::Builder::new().stack_size(THREAD_STACK).spawn(move || {
            c2.core.register_writer();
            agent_to_client(&c2, reader, idle);
            drop(cleanup2);
        })
    };
    if let Err(e) = down {
        cleanup.group.spawn_failures.fetch_add(1, Relaxed);
        c.fail(Ending::Reset(format!("cannot start a thread: {e}")));
        return;
    }
    match engine::copy_to_pilot(&*c, limits.idle_timeout, UP_BUFFER, false) {
        CopyEnd::Eof => client_eof(&c, limits),
        // The agent is gone; these bytes can never be delivered.
        CopyEnd::LateData => c.fail(Ending::Reset("client sent data after the agent closed".into())),
        CopyEnd::Over => {}
    }
    c.core.local_done.store(true, Relaxed);
    c.core.wake();
    drop(cleanup);
}

/// Reads a connection's IPC session through the connection's own handle,
/// so one descriptor serves the dial, both threads and the final Close
/// (three would be needed with separate reader and writer clones, and the
/// descriptor limit caps concurrent connections).
pub struct IpcRead(Arc<Conn>);

impl Read for IpcRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.0.ipc).read(buf)
    }
}

/// Connects to the daemon and opens the pilot stream, the two together
/// bounded by `--dial-timeout`. Returns the session's reader, which the
/// agent→client thread takes over (with any Recv frames that arrived right
/// behind the DialOK).
fn dial(c: &Arc<Conn>, port: u16, limits: &ConnSettings) -> Result<FrameReader<IpcRead>, String> {
    let timeout = limits.dial_timeout;
    let deadline = Instant::now() + timeout;
    // Connected here, on the connection's own thread, and bounded by the
    // same deadline as the dial: a stalled daemon costs this connection a
    // few retries, never a listener or another connection.
    let socket = &limits.daemon_socket;
    let abandoned = || c.core.is_over();
    ipc::connect_by(&c.ipc, socket, deadline, &abandoned, Some(limits.daemon_uid)).map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            e.to_string() // the daemon's identity: says it all
        } else {
            format!("cannot reach the daemon at {}: {e}", socket.display())
        }
    })?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let _ = c.ipc.set_read_timeout(Some(left));
    let _ = c.ipc.set_write_timeout(Some(left));
    let mut reader = FrameReader::growing(IpcRead(c.clone()), BUFFER_START, DOWN_BUFFER);
    let reply = (&c.ipc)
        .write_all(&ipc::encode(
            cmd::DIAL,
            &[&c.pilot.to_wire(), &port.to_be_bytes()],
        ))
        .map_err(IpcError::from)
        .and_then(|()| reader.read_frame_by(deadline, |t| c.ipc.set_read_timeout(Some(t))))
        .and_then(|(command, range)| ipc::dial_reply(command, &reader.buffer()[range]));
    match reply {
        Ok(id) => {
            let _ = c.core.pilot_conn.set(id);
            Ok(reader)
        }
        Err(e) if e.is_timeout() => {
            // Tell newer daemons to stop retrying now rather than in ~30 s.
            let _ = (&c.ipc).write_all(&ipc::encode(cmd::CANCEL, &[]));
            Err(format!("no answer within --dial-timeout {}s (sent Cancel)", timeout.as_secs_f64()))
        }
        Err(e) if e.is_closed() => Err("the daemon closed the session without answering: newer daemons refuse \
             clients of another user and clients beyond their limit (1024); run the gateway as the daemon's user \
             and keep --max-conns below that limit"
            .to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The client shut its sending side, or closed its socket: from a read
/// the two look the same, so ask the kernel about the client's own socket
/// (`sys::sock_diag`). Closed: nobody can read a reply, so end now (the
/// cleanup sends Close) instead of holding the agent's stream, a daemon
/// client slot and a `--max-conns` slot. Only half-closed: keep relaying
/// the agent's reply (pilot streams cannot pass a half-close on), looking
/// again now and then, so a client that closes later is freed then too,
/// until the agent closes or `--half-closed-timeout` passes without a byte
/// (`half_closed_timeout`; the idle limit, if shorter, still applies).
/// Where the kernel cannot be asked, only the timers end it.
fn client_eof(c: &Conn, limits: &ConnSettings) {
    let (limit, ending) = if limits.half_closed_timeout <= limits.idle_timeout {
        (limits.half_closed_timeout, Ending::HalfClosedTimeout)
    } else {
        (limits.idle_timeout, Ending::IdleTimeout)
    };
    let mut ask = true;
    let mut pause = RECHECK_FIRST;
    loop {
        if c.core.remote_closed.load(Relaxed) || c.core.is_over() {
            return;
        }
        if ask {
            match client_closed(c, limits.allow_remote) {
                Some(true) => {
                    let _ = c.core.ending.set(Ending::ClientClosed);
                    // Wakes the agent→client thread; our write side stays
                    // open for the cleanup's Close.
                    let _ = c.ipc.shutdown(Shutdown::Read);
                    return;
                }
                Some(false) => {}
                None => ask = false,
            }
        }
        let Some(left) = c.core.idle_left(limit) else {
            c.fail(ending);
            return;
        };
        thread::park_timeout(if ask { left.min(pause) } else { left });
        pause = (pause * 2).min(RECHECK_MAX);
    }
}

/// Whether the client has closed its socket; `None` when the kernel
/// cannot tell (then only the half-closed timer applies).
fn client_closed(c: &Conn, allow_remote: bool) -> Option<bool> {
    let (SocketAddr::V4(peer), SocketAddr::V4(local)) = (c.client, c.local) else {
        return None;
    };
    match sock_diag::peer_state(peer, local) {
        Ok(PeerState::Unknown) => None,
        // Without --allow-remote the listener served only local clients.
        Ok(state) => {
            Some(state.client_closed(!allow_remote || subnet::is_local_client(c.client.ip(), c.local.ip())))
        }
        Err(e) => {
            debug!(
                "connection {}: cannot ask the kernel about {}: {e}",
                c.id, c.client
            );
            None
        }
    }
}

/// What one pass over the buffered frames found.
#[derive(Debug, PartialEq, Eq)]
struct Gathered {
    /// Payload ranges (in the reader's buffer) ready for the client.
    ranges: usize,
    /// The agent closed its stream (CloseOK).
    closed: bool,
    /// Why the session cannot go on, if it cannot.
    failure: Option<String>,
}

/// Collects the payloads of every complete frame already buffered (up to
/// [`MAX_IOVECS`]) into `ranges`, which it empties first.
fn gather<R: Read>(reader: &mut FrameReader<R>, id: u32, ranges: &mut Vec<Range<usize>>) -> Gathered {
    ranges.clear();
    let mut g = Gathered {
        ranges: 0,
        closed: false,
        failure: None,
    };
    while g.ranges < MAX_IOVECS {
        match reader.next_buffered() {
            Ok(None) => break,
            Ok(Some((cmd::RECV, r))) => match ipc::be_u32(&reader.buffer()[r.clone()]) {
                Some(got) if got == id => {
                    if r.len() > 4 {
                        ranges.push(r.start + 4..r.end);
                        g.ranges += 1;
                    }
                }
                Some(got) => {
                    g.failure = Some(format!("daemon sent data for connection {got}, expected {id}"));
                    break;
                }
                None => {
                    g.failure = Some("daemon sent a Recv frame without a connection id".into());
                    break;
                }
            },
            Ok(Some((cmd::CLOSE_OK, _))) => {
                g.closed = true;
                break;
            }
            Ok(Some((cmd::ERROR, r))) => {
                g.failure = Some(format!("daemon error: {}", ipc::error_text(&reader.buffer()[r])));
                break;
            }
            Ok(Some((other, _))) => {
                g.failure = Some(format!("daemon sent unexpected message 0x{other:02X}"));
                break;
            }
            Err(e) => {
                g.failure = Some(format!("daemon protocol error: {e}"));
                break;
            }
        }
    }
    g
}

/// Copies agent→client until the agent closes or something fails.
///
/// The payload ranges (and the iovecs) live on the heap, and only while
/// data moves (like the read buffer): as 64-entry arrays in these frames
/// they pushed an idle thread's stack onto a second page (measured with
/// smaps on a musl build; see `fill_or_end`).
fn agent_to_client(c: &Conn, mut reader: FrameReader<IpcRead>, idle: Duration) {
    let Some(&id) = c.core.pilot_conn.get() else {
        return;
    };
    let mut ranges = Vec::new();
    loop {
        let g = gather(&mut reader, id, &mut ranges);
        if g.ranges > 0 {
            let buf = reader.buffer();
            // One small allocation per batch of up to MAX_IOVECS frames,
            // next to the writev it feeds.
            let mut slices: Vec<IoSlice<'_>> = ranges.iter().map(|r| IoSlice::new(&buf[r.clone()])).collect();
            if let Err(why) = engine::write_to_local(&c.core, &mut slices, idle, &mut |_| {}) {
                if !c.core.is_over() {
                    c.fail(why);
                }
                return;
            }
        }
        if let Some(why) = g.failure {
            c.fail(Ending::Reset(why));
            return;
        }
        if g.closed {
            engine::linger_after_remote_close(&c.core);
            return;
        }
        if g.ranges == MAX_IOVECS {
            continue;
        }
        if !fill_or_end(c, &mut reader, &mut ranges, idle) {
            return;
        }
    }
}

/// Waits for more from the daemon, giving the read buffer and `ranges`
/// back first if the session stays drained ([`engine::KEEP_WARM`]).
/// `false` once the connection is over: torn down elsewhere, idle past
/// its limit, or the session broke.
fn fill_or_end(
    c: &Conn,
    reader: &mut FrameReader<IpcRead>,
    ranges: &mut Vec<Range<usize>>,
    idle: Duration,
) -> bool {
    if !engine::readable_soon(&c.ipc) {
        reader.release();
        *ranges = Vec::new();
    }
    if !engine::wait_readable(c, &c.ipc, idle) {
        return false;
    }
    match reader.fill() {
        Ok(()) => true,
        // poll said readable, so a timeout is a spurious wake-up.
        Err(e) if e.is_timeout() => true,
        Err(e) => {
            if !c.core.is_over() {
                let why = match e {
                    IpcError::Truncated => "the daemon closed the session in the middle of a frame".to_string(),
                    e if e.is_closed() => "the daemon closed the session (daemon restarted, or it dropped us: newer daemons drop a client that has not read for 10 s, which happens when the TCP client reads slowly)".to_string(),
                    e => format!("daemon: {e}"),
                };
                c.fail(Ending::Reset(why));
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::AccessLog;
    use crate::log::Format;
    use crate::testkit::{self, expect_frame, recv, send, session, tcp_pair, wait_until};
    use std::os::unix::net::UnixListener;

    const ID: u32 = 5;

    struct Rig {
        dir: PathBuf,
        dp: Arc<DataPath>,
        group: Arc<Connections>,
        daemon: UnixListener,
    }

    fn rig(idle_ms: u64, half_ms: u64) -> Rig {
        let dir = testkit::scratch();
        let (path, daemon) = testkit::daemon(&dir);
        let settings = ConnSettings {
            daemon_socket: path,
            daemon_uid: sys::user::euid(),
            max_conns: 8,
            max_exposed: 4,
            max_per_peer: 2,
            dial_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_millis(idle_ms),
            half_closed_timeout: Duration::from_millis(half_ms),
            allow_remote: false,
        };
        let access = AccessLog::open(dir.join("access.log").to_str().unwrap(), Format::Json).unwrap();
        Rig {
            dp: DataPath::new(settings, Some(access)),
            group: Arc::new(Connections::default()),
            dir,
            daemon,
        }
    }

    impl Rig {
        /// A client connection handed to the relay, as the listener does.
        fn client(&self) -> TcpStream {
            let (ours, theirs) = tcp_pair();
            let (client, local) = (ours.peer_addr().unwrap(), ours.local_addr().unwrap());
            assert!(self.dp.try_acquire());
            serve(ours, client, local, PilotAddr::new(0, 4), &self.dp, &self.group);
            theirs.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            theirs
        }

        /// The daemon's side of a dial that succeeds.
        fn dialled(&self) -> UnixStream {
            let mut s = session(&self.daemon);
            let dial = expect_frame(&mut s, cmd::DIAL).expect("Dial");
            assert_eq!(&dial[..6], &PilotAddr::new(0, 4).to_wire());
            send(&mut s, cmd::DIAL_OK, &[&ID.to_be_bytes()]);
            s
        }

        fn ended(&self) -> bool {
            wait_until(Duration::from_secs(10), || {
                self.group.counters().active == 0 && self.dp.active.load(Relaxed) == 0
            })
        }

        /// The outcome the access log recorded for the one connection.
        fn outcome(&self) -> String {
            let path = self.dir.join("access.log");
            let read = || std::fs::read_to_string(&path).unwrap_or_default();
            assert!(wait_until(Duration::from_secs(5), || read().contains("outcome")));
            let v = crate::json::parse(read().lines().next().unwrap()).unwrap();
            v.get("outcome")
                .and_then(crate::json::Value::as_str)
                .unwrap()
                .to_string()
        }
    }

    fn is_reset(c: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match c.read(&mut buf) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(e) => return e.kind() == io::ErrorKind::ConnectionReset,
            }
        }
    }

    /// Issue 18: peers cannot take the map side's room, nor one peer the
    /// others' (8 slots, 4 for the expose side, 2 per peer).
    #[test]
    fn the_expose_side_keeps_to_its_share_and_each_peer_to_its_cap() {
        let r = rig(1000, 1000);
        let (p, q, x) = (PilotAddr::new(0, 9), PilotAddr::new(0, 8), PilotAddr::new(0, 7));
        r.dp.take_exposed(None).unwrap(); // an exposure's session
        r.dp.take_exposed(Some(p)).unwrap();
        r.dp.take_exposed(Some(p)).unwrap();
        let e = r.dp.take_exposed(Some(p)).unwrap_err();
        assert_eq!(e.kind, "refused_per_peer", "{e:?}");
        r.dp.take_exposed(Some(q)).unwrap();
        let e = r.dp.take_exposed(Some(x)).unwrap_err();
        assert_eq!(e.kind, "refused_max_exposed", "{e:?}");
        assert_eq!(r.dp.refused_per_peer.load(Relaxed), 1);
        assert_eq!(r.dp.refused_max_exposed.load(Relaxed), 1);
        // The map side's 4 slots are all there.
        for _ in 0..4 {
            assert!(r.dp.try_acquire());
        }
        assert!(!r.dp.try_acquire());
        // A freed exposed slot serves another peer.
        r.dp.release_exposed(Some(p));
        r.dp.take_exposed(Some(x)).unwrap();
        assert_eq!(r.dp.exposed_in_use(), 4);
        // A session's refusal is not counted as a peer's.
        assert!(r.dp.take_exposed(None).is_err());
        assert_eq!(r.dp.refused_max_exposed.load(Relaxed), 1);
    }

    /// A close that waits keeps its room in `--max-conns` but not its
    /// share; a connection that finds no room takes a waiting close's.
    #[test]
    fn a_waiting_close_keeps_its_room_until_a_new_connection_needs_it() {
        let r = rig(1000, 1000);
        let slots: Arc<dyn engine::Slots> = r.dp.clone();
        let mut all: Vec<_> = (0..8)
            .map(|_| engine::Slot::take(&slots).expect("a slot"))
            .collect();
        let waiting: Vec<_> = all.drain(..3).filter_map(engine::Slot::linger).collect();
        assert_eq!(waiting.len(), 3);
        assert_eq!(r.dp.active.load(Relaxed), 8, "their room stays taken");
        // Three new connections take the three rooms; a fourth finds none.
        let taken: Vec<_> = (0..3)
            .map(|_| engine::Slot::take(&slots).expect("a waiting close's room"))
            .collect();
        assert!(!r.dp.try_acquire(), "no room left");
        assert_eq!(r.dp.active.load(Relaxed), 8);
        drop(waiting);
        assert_eq!(r.dp.active.load(Relaxed), 8, "the rooms were given");
        drop((all, taken));
        assert_eq!(r.dp.active.load(Relaxed), 0);
        // A peer's share goes at once; its room when its Close went.
        let p = PilotAddr::new(0, 9);
        r.dp.take_exposed(Some(p)).unwrap();
        r.dp.linger_exposed(Some(p));
        assert_eq!((r.dp.exposed_in_use(), r.dp.active.load(Relaxed)), (0, 1));
        r.dp.end_linger();
        assert_eq!(r.dp.active.load(Relaxed), 0);
    }

    /// Issue 18, the other way: local clients cannot take the expose
    /// side's share while an exposure runs; with none running, a map-only
    /// gateway keeps its whole budget.
    #[test]
    fn local_clients_keep_to_their_share_while_an_exposure_runs() {
        let r = rig(1000, 1000);
        let slots: Arc<dyn engine::Slots> = r.dp.clone();
        let all: Vec<_> = (0..8)
            .map(|_| engine::Slot::take(&slots).expect("a slot"))
            .collect();
        assert!(!r.dp.try_acquire(), "--max-conns 8 in use");
        drop(all);
        assert_eq!(r.dp.active.load(Relaxed), 0);
        r.dp.take_exposed(None).unwrap(); // an exposure starts
        let held: Vec<_> = (0..4)
            .map(|_| engine::Slot::take(&slots).expect("a slot"))
            .collect();
        assert_eq!(r.dp.forwarded_share(), 4);
        assert!(!r.dp.try_acquire(), "the rest is the expose side's");
        let p = PilotAddr::new(0, 9);
        r.dp.take_exposed(Some(p)).unwrap();
        r.dp.take_exposed(Some(p)).unwrap();
        drop(held);
        assert_eq!(r.dp.active.load(Relaxed), 3);
        // The exposure stops: its share is the map side's again.
        r.dp.release_exposed(None);
        r.dp.release_exposed(Some(p));
        r.dp.release_exposed(Some(p));
        let all: Vec<_> = (0..8)
            .map(|_| engine::Slot::take(&slots).expect("a slot"))
            .collect();
        assert_eq!(all.len(), 8);
    }

    #[test]
    fn bytes_flow_both_ways_and_closeok_ends_it_normally() {
        let r = rig(5000, 5000);
        let mut c = r.client();
        let mut d = r.dialled();
        c.write_all(b"ping").unwrap();
        let send_frame = expect_frame(&mut d, cmd::SEND).unwrap();
        assert_eq!(&send_frame[4..], b"ping");
        recv(&mut d, ID, b"pong");
        send(&mut d, cmd::CLOSE_OK, &[&ID.to_be_bytes()]);
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"pong", "data, then EOF");
        drop(c);
        assert!(r.ended());
        let n = r.group.counters();
        assert_eq!((n.total, n.bytes_up, n.bytes_down), (1, 4, 4));
        assert_eq!(r.outcome(), "ok");
    }

    #[test]
    fn a_duplicate_closeok_is_harmless() {
        let r = rig(5000, 5000);
        let mut c = r.client();
        let mut d = r.dialled();
        recv(&mut d, ID, b"x");
        send(&mut d, cmd::CLOSE_OK, &[&ID.to_be_bytes()]);
        send(&mut d, cmd::CLOSE_OK, &[&ID.to_be_bytes()]);
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"x");
        drop(c);
        assert!(r.ended());
        assert_eq!(r.outcome(), "ok");
    }

    #[test]
    fn a_client_that_closes_gets_close_sent_and_closeok_after_it_is_fine() {
        let r = rig(5000, 5000);
        let c = r.client();
        let mut d = r.dialled();
        drop(c);
        let close = expect_frame(&mut d, cmd::CLOSE).expect("Close");
        assert_eq!(close, ID.to_be_bytes());
        send(&mut d, cmd::CLOSE_OK, &[&ID.to_be_bytes()]);
        assert!(r.ended());
        let outcome = r.outcome();
        // Where the kernel can be asked, a closed client ends at once.
        assert!(
            outcome == "client_closed" || outcome == "half_closed_timeout",
            "{outcome}"
        );
    }

    #[test]
    fn an_error_frame_resets_the_client() {
        let r = rig(5000, 5000);
        let mut c = r.client();
        let mut d = r.dialled();
        send(&mut d, cmd::ERROR, &[&[0, 1], b"connection lost"]);
        assert!(is_reset(&mut c));
        assert!(r.ended());
        assert_eq!(r.outcome(), "reset");
    }

    #[test]
    fn data_for_another_connection_resets() {
        let r = rig(5000, 5000);
        let mut c = r.client();
        let mut d = r.dialled();
        recv(&mut d, ID + 1, b"not yours");
        assert!(is_reset(&mut c));
        assert!(r.ended());
        assert_eq!(r.outcome(), "reset");
    }

    #[test]
    fn an_unexpected_frame_resets() {
        let r = rig(5000, 5000);
        let mut c = r.client();
        let mut d = r.dialled();
        send(&mut d, cmd::BIND_OK, &[&[0, 80]]);
        assert!(is_reset(&mut c));
        assert!(r.ended());
    }

    #[test]
    fn a_refused_dial_resets_and_counts() {
        let r = rig(5000, 5000);
        let mut c = r.client();
        let mut d = session(&r.daemon);
        expect_frame(&mut d, cmd::DIAL).unwrap();
        send(&mut d, cmd::ERROR, &[&[0, 1], b"dial: not trusted"]);
        assert!(is_reset(&mut c));
        assert!(r.ended());
        assert_eq!(r.group.counters().dial_failures, 1);
        assert_eq!(r.outcome(), "dial_failed");
    }

    #[test]
    fn a_dial_without_answer_sends_cancel_and_fails_in_time() {
        let r = rig(5000, 5000);
        let mut c = r.client();
        let mut d = session(&r.daemon);
        expect_frame(&mut d, cmd::DIAL).unwrap();
        assert!(
            expect_frame(&mut d, cmd::CANCEL).is_some(),
            "Cancel after --dial-timeout"
        );
        assert!(is_reset(&mut c));
        assert!(r.ended());
        assert_eq!(r.group.counters().dial_failures, 1);
    }

    #[test]
    fn no_daemon_is_a_failed_dial() {
        let r = rig(5000, 5000);
        let _ = std::fs::remove_file(&r.dp.settings.daemon_socket);
        let mut c = r.client();
        assert!(is_reset(&mut c));
        assert!(r.ended());
        assert_eq!(r.outcome(), "dial_failed");
    }

    #[test]
    fn an_idle_connection_ends_at_the_idle_timeout() {
        let r = rig(300, 5000);
        let mut c = r.client();
        let mut d = r.dialled();
        assert!(is_reset(&mut c));
        assert!(r.ended());
        assert_eq!(r.group.counters().idle_timeouts, 1);
        assert_eq!(r.outcome(), "idle_timeout");
        // The session is closed: the daemon frees the connection with it.
        assert!(expect_frame(&mut d, cmd::CLOSE).is_none());
    }

    #[test]
    fn a_half_closed_client_gets_the_reply_then_its_own_timeout() {
        let r = rig(5000, 300);
        let mut c = r.client();
        let mut d = r.dialled();
        c.write_all(b"q").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        expect_frame(&mut d, cmd::SEND).unwrap();
        recv(&mut d, ID, b"answer");
        let mut buf = [0u8; 6];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"answer", "the reply still flows after a half-close");
        assert!(is_reset(&mut c));
        assert!(r.ended());
        assert_eq!(r.outcome(), "half_closed_timeout");
        assert_eq!(r.group.counters().idle_timeouts, 1);
    }

    #[test]
    fn close_all_resets_live_connections() {
        let r = rig(5000, 5000);
        let mut c = r.client();
        let _d = r.dialled();
        assert!(wait_until(Duration::from_secs(5), || r.group.counters().active == 1));
        assert_eq!(r.group.close_all(Duration::from_secs(5)), 1);
        assert!(is_reset(&mut c));
        assert!(r.ended());
        assert_eq!(r.outcome(), "reset");
    }

    #[test]
    fn a_client_that_does_not_read_is_cut_by_close_all_in_time() {
        let r = rig(60_000, 60_000);
        let _c = r.client();
        let mut d = r.dialled();
        // Far more than the socket buffers hold: the writer blocks (and
        // so does this daemon's writer, until the session is closed).
        let _daemon = thread::spawn(move || {
            let chunk = vec![7u8; 60_000];
            for _ in 0..200 {
                recv(&mut d, ID, &chunk);
            }
        });
        thread::sleep(Duration::from_millis(500));
        let start = Instant::now();
        r.group.close_all(Duration::from_secs(5));
        assert!(r.ended());
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn the_slot_is_freed_exactly_once() {
        let r = rig(5000, 5000);
        for _ in 0..3 {
            let c = r.client();
            let d = r.dialled();
            drop((c, d));
        }
        assert!(r.ended());
        assert_eq!(r.dp.finished.load(Relaxed), 3);
        assert_eq!(r.group.counters().total, 3);
    }

    fn frames(bytes: Vec<u8>) -> FrameReader<io::Cursor<Vec<u8>>> {
        let mut r = FrameReader::growing(io::Cursor::new(bytes), 1024, 1 << 20);
        r.fill().unwrap();
        r
    }

    #[test]
    fn gather_collects_payloads_up_to_closeok() {
        let mut bytes = ipc::encode(cmd::RECV, &[&ID.to_be_bytes(), b"ab"]);
        bytes.extend(ipc::encode(cmd::RECV, &[&ID.to_be_bytes()])); // empty: skipped
        bytes.extend(ipc::encode(cmd::RECV, &[&ID.to_be_bytes(), b"cd"]));
        bytes.extend(ipc::encode(cmd::CLOSE_OK, &[&ID.to_be_bytes()]));
        let mut r = frames(bytes);
        let mut ranges = Vec::new();
        let g = gather(&mut r, ID, &mut ranges);
        assert_eq!((g.ranges, g.closed, g.failure), (2, true, None));
        let text: Vec<&[u8]> = ranges.iter().map(|x| &r.buffer()[x.clone()]).collect();
        assert_eq!(text, [b"ab", b"cd"]);
    }

    #[test]
    fn gather_stops_at_max_iovecs() {
        let mut bytes = Vec::new();
        for _ in 0..MAX_IOVECS + 5 {
            bytes.extend(ipc::encode(cmd::RECV, &[&ID.to_be_bytes(), b"z"]));
        }
        let mut r = frames(bytes);
        let mut ranges = Vec::new();
        assert_eq!(gather(&mut r, ID, &mut ranges).ranges, MAX_IOVECS);
        assert_eq!(gather(&mut r, ID, &mut ranges).ranges, 5);
    }

    #[test]
    fn gather_names_what_went_wrong() {
        let cases: [(Vec<u8>, &str); 4] = [
            (ipc::encode(cmd::ERROR, &[&[0, 1], b"boom"]), "daemon error: boom"),
            (
                ipc::encode(cmd::RECV, &[&9u32.to_be_bytes(), b"x"]),
                "for connection 9",
            ),
            (ipc::encode(cmd::RECV, &[&[1, 2]]), "without a connection id"),
            (ipc::encode(0x7F, &[]), "unexpected message 0x7F"),
        ];
        for (bytes, want) in cases {
            let mut r = frames(bytes);
            let g = gather(&mut r, ID, &mut Vec::new());
            assert!(
                g.failure.as_deref().is_some_and(|f| f.contains(want)),
                "{want}: {g:?}"
            );
        }
    }
}
