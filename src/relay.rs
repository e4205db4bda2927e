//! The relay: one accepted TCP connection bridged to the same port of its
//! agent, through its own IPC session (`listener.rs` accepts and hands
//! connections here).
//!
//! Life of one connection:
//!
//! 1. [`serve`] registers it in its group's [`Connections`] and starts a
//!    thread, which opens its *own* IPC session to the daemon and sends
//!    Dial. A session per connection means a slow or dead agent (the daemon
//!    retries for up to ~30 s) never stalls another connection. If the dial
//!    fails or `--dial-timeout` passes (then Cancel is sent), the client is
//!    reset and the daemon's reason logged.
//! 2. That thread spawns the agent→client thread and itself copies
//!    client→agent: two threads per connection, no queue, buffers only
//!    while data moves (16 KiB, doubling up to 256 KiB while busy; an idle
//!    thread waits in poll(2) without one).
//!    - client→agent: `read` into `buf[9..]`, write the Send header into
//!      `buf[..9]`, one `write` of the whole frame.
//!    - agent→client: Recv frames are parsed in the session's read buffer
//!      and their payloads written to the client with one `writev`, straight
//!      from where the socket read put them.
//! 3. Endings. Pilot streams have no half-close:
//!    - client's EOF ([`client_eof`]): if the kernel says the client closed
//!      its socket, the stream ends at once (`client_closed`); if it only
//!      shut its sending side, we stop sending and keep delivering the
//!      agent's reply until the agent closes, the client closes (looked at
//!      again every ≤ 500 ms) or `--half-closed-timeout` passes;
//!    - agent closes (CloseOK): the client's side is shut for writing; the
//!      client then has a short linger to close its side too;
//!    - anything else (daemon gone, protocol error, client reset, idle):
//!      both sides are torn down and the client is *reset*, so it never
//!      mistakes a cut stream for a complete one.
//! 4. The last of the two threads to finish drops the [`ConnCleanup`]: it
//!    sends Close, moves the byte counts into the group's totals, frees the
//!    slot, logs, writes the access-log record and drops the session (the
//!    daemon then frees everything that session held).

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::access::{AccessLog, Record};
use crate::address::PilotAddr;
use crate::ipc::{self, cmd, FrameReader, IpcError};
use crate::log::RateLimit;
use crate::stats::Counters;
use crate::sys::sock_diag::{self, PeerState};
use crate::{debug, subnet, sys, warn, warn_limited};

/// Stack of each connection thread. The threads keep their buffers on the
/// heap and never recurse, so a small stack is plenty; it keeps thousands
/// of connections cheap in address space. Measured: the integration tests
/// (debug builds, which use far more stack than release) and `make bench`
/// run with 16 KiB; four times that leaves margin. (A smaller size would
/// not lower RSS, and glibc's cache of exited threads' stacks, 40 MiB,
/// would hold more of them.) What an idle thread touches, measured with
/// smaps and pagemap at 5,000 idle connections: with glibc, two pages,
/// whatever our frames: glibc puts its thread descriptor (2,368 bytes)
/// and the static TLS block (with its surplus for dlopen) at the top of
/// the stack, so the first frame is already ~3.6 KiB down and std's start
/// frames reach the second page; with musl (`make static`), one page.
pub const THREAD_STACK: usize = 64 * 1024;

// Per-connection warnings clients can cause at will: rate-limited, one
// limit per kind (the counters still count every one).
static DIAL_FAILED: RateLimit = RateLimit::new();
static SPAWN_FAILED: RateLimit = RateLimit::new();
/// Buffers exist only while data moves: a thread waits for its socket in
/// poll(2) without one, allocates it when the socket is readable, and
/// gives it back once a read has drained the socket, so an idle connection
/// holds none. They start small and double (up to the limit) whenever one
/// read fills them, so a busy connection soon moves data in large gulps
/// with few syscalls. Sizes chosen with `make bench` (see README).
pub const BUFFER_START: usize = 16 * 1024;
/// client→agent limit: one read, plus the 9-byte Send header in front, is
/// one Send frame of at most 256 KiB (the daemon accepts up to 1 MiB).
pub const UP_BUFFER: usize = 256 * 1024 - ipc::DATA_HEADER;
/// agent→client limit: dozens of 4 KiB Recv frames per read.
pub const DOWN_BUFFER: usize = 256 * 1024;
/// Most Recv payloads gathered into one `writev`.
const MAX_IOVECS: usize = 64;
/// How long a client may keep its side open after the agent has closed.
const LINGER: Duration = Duration::from_secs(2);
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
    pub dial_timeout: Duration,
    pub idle_timeout: Duration,
    /// `--half-closed-timeout`: idle limit once the client has shut its
    /// sending side but still holds its socket.
    pub half_closed_timeout: Duration,
    /// `--allow-remote`: serve clients from other hosts too.
    pub allow_remote: bool,
}

/// Gateway-wide state of the data path, shared by every listener and
/// connection: settings, connection slots, the access log.
pub struct DataPath {
    pub settings: ConnSettings,
    /// Bridged connections alive now, for `--max-conns`.
    pub active: AtomicUsize,
    /// Connections refused because of `--max-conns`.
    pub refused: AtomicU64,
    /// Connections that have ended (for deciding when to return memory).
    pub finished: AtomicU64,
    next_id: AtomicU64,
    pub access: Option<AccessLog>,
}

impl DataPath {
    pub fn new(settings: ConnSettings, access: Option<AccessLog>) -> Arc<DataPath> {
        Arc::new(DataPath {
            settings,
            active: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            access,
        })
    }

    /// Takes a connection slot, or `false` when `--max-conns` are in use.
    pub fn try_acquire(&self) -> bool {
        self.active
            .fetch_update(Relaxed, Relaxed, |n| {
                (n < self.settings.max_conns).then_some(n + 1)
            })
            .is_ok()
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
            up += c.up.load(Relaxed);
            down += c.down.load(Relaxed);
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

    /// Waits up to `wait` for the live connections to end on their own
    /// (`--drain`: the listeners have stopped accepting already).
    pub fn drain(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && !self.live.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Tears down every live connection and waits (bounded) until their
    /// threads have finished. Returns how many were cut.
    pub fn close_all(&self, wait: Duration) -> usize {
        let conns: Vec<Arc<Conn>> = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            live.values().cloned().collect()
        };
        for c in &conns {
            c.abort("closed by the gateway");
        }
        let deadline = Instant::now() + wait;
        for round in 1.. {
            if self.live.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                return conns.len();
            }
            if Instant::now() >= deadline {
                break;
            }
            if round % 20 == 0 {
                conns.iter().for_each(|c| c.unblock_writer());
            }
            thread::sleep(Duration::from_millis(5));
        }
        warn!("connections still closing after {wait:?}");
        conns.len()
    }
}

/// How a connection ended, for the logs and the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    Ok,
    /// The client closed its socket (not just its sending side): nobody
    /// can read a reply, so the stream is closed at once. A normal end.
    ClientClosed,
    DialFailed(String),
    Reset(String),
    IdleTimeout,
}

impl Ending {
    pub fn label(&self) -> &'static str {
        match self {
            Ending::Ok => "ok",
            Ending::ClientClosed => "client_closed",
            Ending::DialFailed(_) => "dial_failed",
            Ending::Reset(_) => "reset",
            Ending::IdleTimeout => "idle_timeout",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Ending::DialFailed(r) | Ending::Reset(r) => r,
            Ending::Ok | Ending::ClientClosed | Ending::IdleTimeout => "",
        }
    }
}

/// One bridged connection, shared by its two threads and its mapping's
/// group's [`Connections`] (so `unmap` and `stop` can tear it down).
pub struct Conn {
    pub id: u64,
    pub client: SocketAddr,
    pub local: SocketAddr,
    pub pilot: PilotAddr,
    tcp: TcpStream,
    ipc: UnixStream,
    started: Instant,
    /// Milliseconds since `started` of the last byte moved either way.
    last_active: AtomicU64,
    pub up: AtomicU64,
    pub down: AtomicU64,
    /// The pilot connection id, once the dial succeeded.
    pilot_conn: OnceLock<u32>,
    agent_closed: AtomicBool,
    client_done: AtomicBool,
    /// The client→agent thread, woken from its half-closed wait when the
    /// agent closes or the connection is torn down.
    client_thread: OnceLock<thread::Thread>,
    /// The first ending other than a plain `Ok`; none means it ended normally.
    ending: OnceLock<Ending>,
}

impl Conn {
    fn touch(&self) {
        self.last_active
            .store(self.started.elapsed().as_millis() as u64, Relaxed);
    }

    /// How long until the idle limit passes; `None` if it has passed.
    fn idle_left(&self, idle: Duration) -> Option<Duration> {
        let since = self
            .started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_active.load(Relaxed)));
        idle.checked_sub(since).filter(|d| !d.is_zero())
    }

    /// Ends the connection abnormally: the first reason wins, and the client
    /// gets a reset when the socket closes. Shutting the reading sides wakes
    /// both threads without sending the client a FIN, which it could take
    /// for a complete stream.
    fn fail(&self, ending: Ending) {
        let _ = self.ending.set(ending);
        sys::net::set_linger_zero(&self.tcp);
        let _ = self.tcp.shutdown(Shutdown::Read);
        let _ = self.ipc.shutdown(Shutdown::Both);
        self.wake_client_thread();
    }

    fn wake_client_thread(&self) {
        if let Some(t) = self.client_thread.get() {
            t.unpark();
        }
    }

    /// Tears the connection down from outside (unmap, stop): the client
    /// gets a reset, never a FIN it could take for a complete stream.
    pub fn abort(&self, why: &str) {
        self.fail(Ending::Reset(why.to_string()));
        self.unblock_writer();
    }

    /// Wakes the agent→client thread if it may be blocked writing to a
    /// client that does not read. Only shutting the socket's writing side
    /// does that, and it queues a FIN: behind unsent data the client cannot
    /// read that FIN before the reset that follows at once, so it is done
    /// only then. With nothing unsent no write is blocked, and the client
    /// sees just the reset. (`close_all` asks again, for a write that
    /// started after this check.)
    fn unblock_writer(&self) {
        if sys::net::unsent_bytes(&self.tcp).map_or(true, |n| n > 0) {
            let _ = self.tcp.shutdown(Shutdown::Write);
        }
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
        if let (Some(&id), false) = (c.pilot_conn.get(), c.agent_closed.load(Relaxed)) {
            let mut w = &c.ipc;
            let _ = w.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = w.write_all(&ipc::encode(cmd::CLOSE, &[&id.to_be_bytes()]));
        }
        {
            let mut live = self.group.live.lock().unwrap_or_else(|p| p.into_inner());
            self.group.done_up.fetch_add(c.up.load(Relaxed), Relaxed);
            self.group.done_down.fetch_add(c.down.load(Relaxed), Relaxed);
            live.remove(&c.id);
        }
        self.data_path.active.fetch_sub(1, Relaxed);
        self.data_path.finished.fetch_add(1, Relaxed);
        let ending = c.ending.get().cloned().unwrap_or(Ending::Ok);
        if ending == Ending::IdleTimeout {
            self.group.idle_timeouts.fetch_add(1, Relaxed);
        }
        self.report(&ending);
    }
}

impl ConnCleanup {
    /// Logs how the connection ended and writes its access-log record.
    fn report(&self, ending: &Ending) {
        let c = &self.conn;
        let (up, down, duration) = (c.up.load(Relaxed), c.down.load(Relaxed), c.started.elapsed());
        // Normal ends are debug detail; a cut stream is worth a warning.
        let level = match ending {
            Ending::Ok | Ending::ClientClosed | Ending::DialFailed(_) => crate::log::Level::Debug,
            Ending::IdleTimeout => crate::log::Level::Info,
            Ending::Reset(_) => crate::log::Level::Warn,
        };
        crate::log::log(
            level,
            format_args!(
                "connection {} from {} to {} port {} ended: {} {} (up {up} B, down {down} B, {duration:?})",
                c.id,
                c.client,
                c.pilot,
                c.local.port(),
                ending.label(),
                ending.reason(),
            ),
        );
        if let Some(log) = &self.data_path.access {
            log.write(&Record {
                client: c.client,
                local: Some(c.local),
                pilot: c.pilot,
                up,
                down,
                duration,
                outcome: ending.label(),
                reason: ending.reason(),
            });
        }
    }
}

/// Registers the connection and starts its first thread. From here on the
/// connection's slot in `data_path.active` is released exactly once, whatever fails.
pub fn serve(
    tcp: TcpStream,
    client: SocketAddr,
    local: SocketAddr,
    pilot: PilotAddr,
    data_path: &Arc<DataPath>,
    group: &Arc<Connections>,
) {
    // Only the socket is made here; it is connected from the connection's
    // own thread (`connect_daemon`), so a stalled daemon never holds up the
    // accept thread. Failing here means we are out of descriptors.
    let ipc = match sys::net::unix_socket() {
        Ok(s) => s,
        Err(e) => {
            let why = format!("cannot open a socket for the daemon session: {e}");
            group.dial_failures.fetch_add(1, Relaxed);
            group.total.fetch_add(1, Relaxed);
            warn_limited!(
                DIAL_FAILED,
                "dial {pilot} port {} for {client} failed: {why}",
                local.port()
            );
            if let Some(log) = &data_path.access {
                log.write(&Record::without_data(
                    client,
                    Some(local),
                    pilot,
                    "dial_failed",
                    &why,
                ));
            }
            sys::net::reset(tcp);
            data_path.active.fetch_sub(1, Relaxed);
            return;
        }
    };
    let conn = Arc::new(Conn {
        id: data_path.next_id.fetch_add(1, Relaxed),
        client,
        local,
        pilot,
        tcp,
        ipc,
        started: Instant::now(),
        last_active: AtomicU64::new(0),
        up: AtomicU64::new(0),
        down: AtomicU64::new(0),
        pilot_conn: OnceLock::new(),
        agent_closed: AtomicBool::new(false),
        client_done: AtomicBool::new(false),
        client_thread: OnceLock::new(),
        ending: OnceLock::new(),
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
        warn_limited!(SPAWN_FAILED, "cannot serve {client}: cannot start a thread: {e}");
        // `fail`, not `abort`: no thread is blocked on the client, and
        // shutting its writing side would send a FIN before the reset.
        conn.fail(Ending::Reset(format!("cannot start a thread: {e}")));
    }
    drop(ours);
}

/// First thread of a connection: dial, start the agent→client thread, then
/// copy client→agent.
fn dial_then_relay(cleanup: Arc<ConnCleanup>) {
    let c = cleanup.conn.clone();
    let limits = &cleanup.data_path.settings;
    let _ = c.tcp.set_nodelay(true);
    let port = c.local.port();
    let reader = match dial(&c, port, limits) {
        Ok(r) => r,
        Err(_) if c.ending.get().is_some() => return, // torn down by unmap or stop
        Err(why) => {
            cleanup.group.dial_failures.fetch_add(1, Relaxed);
            warn_limited!(
                DIAL_FAILED,
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
    c.touch();
    let _ = c.tcp.set_read_timeout(Some(limits.idle_timeout));
    let _ = c.tcp.set_write_timeout(Some(limits.idle_timeout));
    let _ = c.ipc.set_read_timeout(Some(limits.idle_timeout));
    let _ = c.ipc.set_write_timeout(Some(limits.idle_timeout));
    let down = {
        let (c2, idle) = (c.clone(), limits.idle_timeout);
        let cleanup2 = cleanup.clone();
        thread::Builder::new().stack_size(THREAD_STACK).spawn(move || {
            agent_to_client(&c2, reader, idle);
            drop(cleanup2);
        })
    };
    let down = match down {
        Ok(t) => t,
        Err(e) => {
            cleanup.group.spawn_failures.fetch_add(1, Relaxed);
            c.fail(Ending::Reset(format!("cannot start a thread: {e}")));
            return;
        }
    };
    client_to_agent(&c, limits);
    c.client_done.store(true, Relaxed);
    down.thread().unpark();
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
    let abandoned = || c.ending.get().is_some();
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
            let _ = c.pilot_conn.set(id);
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

/// Copies client→agent until the client stops sending or something fails.
/// While the client is quiet the thread waits in poll(2) and holds no
/// buffer (see [`BUFFER_START`]).
fn client_to_agent(c: &Conn, limits: &ConnSettings) {
    let Some(&id) = c.pilot_conn.get() else { return };
    let _ = c.client_thread.set(thread::current());
    let mut buf = Vec::new();
    let mut size = BUFFER_START;
    let mut tcp = &c.tcp;
    loop {
        if buf.is_empty() {
            if !wait_readable(c, &c.tcp, limits.idle_timeout) {
                return;
            }
            buf = vec![0u8; ipc::DATA_HEADER + size];
        }
        match tcp.read(&mut buf[ipc::DATA_HEADER..]) {
            Ok(0) => return client_eof(c, limits),
            Ok(n) => {
                if c.agent_closed.load(Relaxed) {
                    // The agent is gone; these bytes can never be delivered.
                    c.fail(Ending::Reset("client sent data after the agent closed".into()));
                    return;
                }
                ipc::put_send_header(&mut buf, id, n);
                if let Err(e) = (&c.ipc).write_all(&buf[..ipc::DATA_HEADER + n]) {
                    c.fail(Ending::Reset(format!("writing to the daemon: {e}")));
                    return;
                }
                c.up.fetch_add(n as u64, Relaxed);
                c.touch();
                if ipc::DATA_HEADER + n == buf.len() && n < UP_BUFFER {
                    size = (size * 2).min(UP_BUFFER);
                    buf.resize(ipc::DATA_HEADER + size, 0);
                } else if !sys::net::readable_now(&c.tcp) {
                    // Drained: give the buffer back; a busy stream grows
                    // it again within a few reads.
                    size = (size / 2).max(BUFFER_START);
                    buf = Vec::new();
                }
            }
            // poll said readable, so a timeout is a spurious wake-up: wait
            // again (and check the idle limit) without the buffer.
            Err(e) if ipc::is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => buf = Vec::new(),
            Err(e) => {
                // Shut down by the other thread or by unmap, or a client reset.
                if c.ending.get().is_none() && !c.agent_closed.load(Relaxed) {
                    c.fail(Ending::Reset(format!("client: {e}")));
                }
                return;
            }
        }
    }
}

/// Waits, without a buffer, until `fd` has something to read. `false` once
/// the connection is over: torn down elsewhere, or idle past `idle`.
fn wait_readable(c: &Conn, fd: &impl AsRawFd, idle: Duration) -> bool {
    loop {
        if c.ending.get().is_some() {
            return false;
        }
        let Some(left) = c.idle_left(idle) else {
            c.fail(Ending::IdleTimeout);
            return false;
        };
        match sys::net::wait_readable(fd, left.max(Duration::from_millis(10))) {
            Ok(true) => return true,
            Ok(false) => {} // timed out or interrupted: check the limits again
            Err(e) => {
                c.fail(Ending::Reset(format!("poll: {e}")));
                return false;
            }
        }
    }
}

/// The client shut its sending side, or closed its socket: from a read
/// the two look the same, so ask the kernel about the client's own socket
/// (`sys::sock_diag`). Closed: nobody can read a reply, so end now (the
/// cleanup sends Close) instead of holding the agent's stream, a daemon
/// client slot and a `--max-conns` slot. Only half-closed: keep relaying
/// the agent's reply (pilot streams cannot pass a half-close on), looking
/// again now and then, so a client that closes later is freed then too,
/// until the agent closes or `half_closed` passes without a byte. Where
/// the kernel cannot be asked, only that timer ends it.
fn client_eof(c: &Conn, limits: &ConnSettings) {
    let half_closed = limits.half_closed_timeout.min(limits.idle_timeout);
    let mut ask = true;
    let mut pause = RECHECK_FIRST;
    loop {
        if c.agent_closed.load(Relaxed) || c.ending.get().is_some() {
            return;
        }
        if ask {
            match client_closed(c, limits.allow_remote) {
                Some(true) => {
                    let _ = c.ending.set(Ending::ClientClosed);
                    // Wakes the agent→client thread; our write side stays
                    // open for the cleanup's Close.
                    let _ = c.ipc.shutdown(Shutdown::Read);
                    return;
                }
                Some(false) => {}
                None => ask = false,
            }
        }
        let Some(left) = c.idle_left(half_closed) else {
            c.fail(Ending::IdleTimeout);
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
fn gather(reader: &mut FrameReader<IpcRead>, id: u32, ranges: &mut Vec<Range<usize>>) -> Gathered {
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
/// The payload ranges (and, in [`write_ranges`], the iovecs) live on the
/// heap, and only while data moves (like the read buffer): as 64-entry
/// arrays in these frames they pushed an idle thread's stack onto a second
/// page (measured with smaps on a musl build; see `fill_or_end`).
fn agent_to_client(c: &Conn, mut reader: FrameReader<IpcRead>, idle: Duration) {
    let Some(&id) = c.pilot_conn.get() else { return };
    let mut ranges = Vec::new();
    loop {
        let g = gather(&mut reader, id, &mut ranges);
        if g.ranges > 0 {
            if let Err(e) = write_ranges(&c.tcp, reader.buffer(), &ranges, c) {
                let why = if ipc::is_timeout(&e) {
                    Ending::IdleTimeout
                } else {
                    Ending::Reset(format!("client: {e}"))
                };
                if c.ending.get().is_none() {
                    c.fail(why);
                }
                return;
            }
            c.touch();
        }
        if let Some(why) = g.failure {
            c.fail(Ending::Reset(why));
            return;
        }
        if g.closed {
            agent_closed(c);
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
/// back first if the session is drained. `false` once the connection is
/// over: torn down elsewhere, idle past its limit, or the session broke.
fn fill_or_end(
    c: &Conn,
    reader: &mut FrameReader<IpcRead>,
    ranges: &mut Vec<Range<usize>>,
    idle: Duration,
) -> bool {
    if !sys::net::readable_now(&c.ipc) {
        reader.release();
        *ranges = Vec::new();
    }
    if !wait_readable(c, &c.ipc, idle) {
        return false;
    }
    match reader.fill() {
        Ok(()) => true,
        // poll said readable, so a timeout is a spurious wake-up.
        Err(e) if e.is_timeout() => true,
        Err(e) => {
            if c.ending.get().is_none() {
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

/// Writes the payload ranges to the client with as few `writev`s as the
/// kernel allows, counting the bytes.
fn write_ranges(tcp: &TcpStream, buf: &[u8], ranges: &[Range<usize>], c: &Conn) -> io::Result<()> {
    // One small allocation per batch of up to MAX_IOVECS frames, next to
    // the writev it feeds.
    let mut slices: Vec<IoSlice<'_>> = ranges.iter().map(|r| IoSlice::new(&buf[r.clone()])).collect();
    let mut slices = &mut slices[..];
    let mut w = tcp;
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                c.down.fetch_add(n as u64, Relaxed);
                IoSlice::advance_slices(&mut slices, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The agent closed its stream: everything it sent has been written to the
/// client. Shut the client's side for writing (it reads EOF), give it a
/// short linger to close its own side, then let both threads end.
fn agent_closed(c: &Conn) {
    c.agent_closed.store(true, Relaxed);
    let _ = c.tcp.shutdown(Shutdown::Write);
    c.wake_client_thread(); // it may be waiting half-closed
    let deadline = Instant::now() + LINGER;
    while !c.client_done.load(Relaxed) {
        let now = Instant::now();
        if now >= deadline {
            // Wakes the client→agent thread; no reset, the data is complete.
            let _ = c.tcp.shutdown(Shutdown::Read);
            return;
        }
        thread::park_timeout(deadline - now);
    }
}
