//! The data path: listeners on mapped IPs, and the bridge that relays each
//! accepted TCP connection to the same port of its agent.
//!
//! Life of one connection:
//!
//! 1. A listener thread (one per mapped IP and port, bound to that IP only)
//!    accepts it. Over `--max-conns` it is reset at once and counted.
//! 2. A new thread opens its *own* IPC session to the daemon and sends
//!    Dial. A session per connection means a slow or dead agent (the daemon
//!    retries for up to ~30 s) never stalls another connection. If the dial
//!    fails or `--dial-timeout` passes (then Cancel is sent), the client is
//!    reset and the daemon's reason logged.
//! 3. That thread spawns the agent→client thread and itself copies
//!    client→agent: two threads per connection, bounded buffers (16 KiB,
//!    doubling up to 256 KiB while busy), no queue.
//!    - client→agent: `read` into `buf[9..]`, write the Send header into
//!      `buf[..9]`, one `write` of the whole frame.
//!    - agent→client: Recv frames are parsed in the session's read buffer
//!      and their payloads written to the client with one `writev`, straight
//!      from where the socket read put them.
//! 4. Endings. Pilot streams have no half-close:
//!    - client shuts its sending side: we stop sending and keep delivering
//!      the agent's reply until the agent closes or the idle limit passes;
//!    - agent closes (CloseOK): the client's side is shut for writing; the
//!      client then has a short linger to close its side too;
//!    - anything else (daemon gone, protocol error, client reset, idle):
//!      both sides are torn down and the client is *reset*, so it never
//!      mistakes a cut stream for a complete one.
//! 5. The last of the two threads to finish deregisters the connection,
//!    sends Close and drops the session (the daemon then frees everything
//!    that session held).

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::address::PilotAddr;
use crate::ipc::{self, cmd, FrameReader, IpcError};
use crate::{debug, warn};

/// Stack of each connection thread. The threads keep their buffers on the
/// heap and never recurse, so a small stack is plenty; it keeps thousands
/// of connections cheap in address space.
pub const THREAD_STACK: usize = 128 * 1024;
/// Buffers start small, so thousands of idle connections stay cheap, and
/// double (up to the limit) whenever one read fills them, so a busy
/// connection soon moves data in large gulps with few syscalls. Sizes
/// chosen with `make bench` (see README).
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
/// Idle limit once the client has shut its sending side. Pilot streams
/// cannot pass the half-close on, and a client that closed its socket looks
/// the same as one that only shut down writing, so an agent that has nothing
/// more to say would otherwise hold its pilot connection (and a daemon
/// client slot) for the whole `--idle-timeout`.
pub const HALF_CLOSED_IDLE: Duration = Duration::from_secs(30);

/// Settings that every connection shares.
#[derive(Clone, Debug)]
pub struct Limits {
    pub socket: PathBuf,
    pub max_conns: usize,
    pub dial_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Gateway-wide state of the data path.
pub struct Hub {
    pub limits: Limits,
    /// Bridged connections alive now, for `--max-conns`.
    pub active: AtomicUsize,
    /// Connections refused because of `--max-conns`.
    pub refused: AtomicU64,
    /// Connections that have ended (for deciding when to return memory).
    pub finished: AtomicU64,
    next_id: AtomicU64,
    pub access: Option<crate::access::AccessLog>,
}

impl Hub {
    pub fn new(limits: Limits, access: Option<crate::access::AccessLog>) -> Arc<Hub> {
        Arc::new(Hub {
            limits,
            active: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            access,
        })
    }

    /// Takes a connection slot, or `false` when `--max-conns` are in use.
    fn try_acquire(&self) -> bool {
        self.active
            .fetch_update(Relaxed, Relaxed, |n| (n < self.limits.max_conns).then_some(n + 1))
            .is_ok()
    }
}

/// Counters of one mapping: live connections plus what finished ones moved.
#[derive(Default)]
pub struct Table {
    live: Mutex<HashMap<u64, Arc<Conn>>>,
    pub total: AtomicU64,
    pub dial_failures: AtomicU64,
    pub idle_timeouts: AtomicU64,
    done_up: AtomicU64,
    done_down: AtomicU64,
}

/// A snapshot of one mapping's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub active: u64,
    pub total: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub dial_failures: u64,
    pub idle_timeouts: u64,
}

impl Table {
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
        }
    }

    /// Tears down every live connection and waits (bounded) until their
    /// threads have finished.
    pub fn close_all(&self, wait: Duration) {
        let conns: Vec<Arc<Conn>> = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            live.values().cloned().collect()
        };
        for c in &conns {
            c.abort("closed by the gateway");
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if self.live.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
        warn!("connections still closing after {wait:?}");
    }
}

/// How a connection ended, for the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    DialFailed(String),
    Reset(String),
    IdleTimeout,
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::DialFailed(_) => "dial_failed",
            Outcome::Reset(_) => "reset",
            Outcome::IdleTimeout => "idle_timeout",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Outcome::DialFailed(r) | Outcome::Reset(r) => r,
            Outcome::Ok | Outcome::IdleTimeout => "",
        }
    }
}

/// One bridged connection, shared by its two threads and its mapping's
/// table (so `unmap` and `stop` can tear it down).
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
    outcome: OnceLock<Outcome>,
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
    fn fail(&self, outcome: Outcome) {
        let _ = self.outcome.set(outcome);
        set_linger_zero(&self.tcp);
        let _ = self.tcp.shutdown(Shutdown::Read);
        let _ = self.ipc.shutdown(Shutdown::Both);
    }

    /// Tears the connection down from outside (unmap, stop). This also
    /// shuts the writing side, to wake a thread blocked writing to a client
    /// that does not read.
    pub fn abort(&self, why: &str) {
        self.fail(Outcome::Reset(why.to_string()));
        let _ = self.tcp.shutdown(Shutdown::Write);
    }
}

/// Hands freed heap memory back to the system. glibc keeps what thousands
/// of connection threads freed in its per-thread arenas; without this, RSS
/// after a burst stays near its peak. The gateway's main thread calls it
/// now and then after many connections have ended. Other C libraries
/// return memory on their own or offer no such call.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// SO_LINGER with a zero timeout: `close` then sends RST instead of FIN,
/// telling the client the stream did not end normally.
fn set_linger_zero(tcp: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Resets and closes a client we will not serve.
fn reset(tcp: TcpStream) {
    set_linger_zero(&tcp);
    drop(tcp);
}

/// Shared (in an `Arc`) by both threads of a connection; when the last one
/// lets go, `drop` cleans up exactly once.
struct Finish {
    conn: Arc<Conn>,
    hub: Arc<Hub>,
    table: Arc<Table>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let c = &self.conn;
        if let (Some(&id), false) = (c.pilot_conn.get(), c.agent_closed.load(Relaxed)) {
            let mut w = &c.ipc;
            let _ = w.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = w.write_all(&ipc::encode(cmd::CLOSE, &[&id.to_be_bytes()]));
        }
        {
            let mut live = self.table.live.lock().unwrap_or_else(|p| p.into_inner());
            self.table.done_up.fetch_add(c.up.load(Relaxed), Relaxed);
            self.table.done_down.fetch_add(c.down.load(Relaxed), Relaxed);
            live.remove(&c.id);
        }
        self.hub.active.fetch_sub(1, Relaxed);
        self.hub.finished.fetch_add(1, Relaxed);
        let outcome = c.outcome.get().cloned().unwrap_or(Outcome::Ok);
        if outcome == Outcome::IdleTimeout {
            self.table.idle_timeouts.fetch_add(1, Relaxed);
        }
        // Normal ends are debug detail; a cut stream is worth a warning.
        let level = match outcome {
            Outcome::Ok | Outcome::DialFailed(_) => crate::log::Level::Debug,
            Outcome::IdleTimeout => crate::log::Level::Info,
            Outcome::Reset(_) => crate::log::Level::Warn,
        };
        crate::log::log(
            level,
            format_args!(
                "connection {} from {} to {} port {} ended: {} {} (up {} B, down {} B, {:?})",
                c.id,
                c.client,
                c.pilot,
                c.local.port(),
                outcome.label(),
                outcome.reason(),
                c.up.load(Relaxed),
                c.down.load(Relaxed),
                c.started.elapsed()
            ),
        );
        if let Some(log) = &self.hub.access {
            log.record(c, &outcome, c.started.elapsed());
        }
    }
}

/// A listening socket on one mapped IP and port, with its accept thread.
pub struct Listener {
    pub ip: Ipv4Addr,
    pub port: u16,
    socket: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Binds `ip:port` (that IP only, never a wildcard) and starts accepting.
    pub fn start(
        ip: Ipv4Addr,
        port: u16,
        pilot: PilotAddr,
        hub: Arc<Hub>,
        table: Arc<Table>,
    ) -> io::Result<Listener> {
        let socket = Arc::new(TcpListener::bind((ip, port))?);
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (socket, stopping) = (socket.clone(), stopping.clone());
            thread::Builder::new()
                .name(format!("listen {ip}:{port}"))
                .stack_size(THREAD_STACK)
                .spawn(move || accept_loop(&socket, &stopping, pilot, &hub, &table))?
        };
        Ok(Listener {
            ip,
            port,
            socket,
            stopping,
            thread: Some(thread),
        })
    }

    /// Stops accepting and waits for the accept thread.
    pub fn stop(&mut self) {
        self.stopping.store(true, Relaxed);
        // shutdown() wakes a thread blocked in accept() (EINVAL on Linux).
        // The socket stays open until both Arcs are gone, so the fd cannot
        // be reused under us.
        // SAFETY: the fd is valid while `self.socket` lives.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    socket: &TcpListener,
    stopping: &AtomicBool,
    pilot: PilotAddr,
    hub: &Arc<Hub>,
    table: &Arc<Table>,
) {
    // Every connection arrives at the address we bound.
    let Ok(local) = socket.local_addr() else { return };
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = socket.accept();
        if stopping.load(Relaxed) {
            return;
        }
        let (tcp, client) = match accepted {
            Ok(a) => a,
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::ConnectionAborted =>
            {
                continue
            }
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning,
                // doubling up to a second, then try again.
                warn!("accept on {}: {e}; retrying in {backoff:?}", local_name(socket));
                thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(5);
        if !hub.try_acquire() {
            let n = hub.refused.fetch_add(1, Relaxed) + 1;
            warn!(
                "refused connection from {client} to {}: --max-conns {} reached ({n} refused so far)",
                local_name(socket),
                hub.limits.max_conns
            );
            if let Some(log) = &hub.access {
                log.refused(client, socket.local_addr().ok(), pilot);
            }
            reset(tcp);
            continue;
        }
        start_conn(tcp, client, local, pilot, hub, table);
    }
}

fn local_name(socket: &TcpListener) -> String {
    socket.local_addr().map_or_else(|_| "?".into(), |a| a.to_string())
}

/// Registers the connection and starts its first thread. From here on the
/// connection's slot in `hub.active` is released exactly once, whatever fails.
fn start_conn(
    tcp: TcpStream,
    client: SocketAddr,
    local: SocketAddr,
    pilot: PilotAddr,
    hub: &Arc<Hub>,
    table: &Arc<Table>,
) {
    let ipc = match UnixStream::connect(&hub.limits.socket) {
        Ok(s) => s,
        Err(e) => {
            let why = format!("cannot reach the daemon at {}: {e}", hub.limits.socket.display());
            table.dial_failures.fetch_add(1, Relaxed);
            table.total.fetch_add(1, Relaxed);
            warn!("dial {pilot} port {} for {client} failed: {why}", local.port());
            if let Some(log) = &hub.access {
                log.dial_failed(client, local, pilot, &why);
            }
            reset(tcp);
            hub.active.fetch_sub(1, Relaxed);
            return;
        }
    };
    let conn = Arc::new(Conn {
        id: hub.next_id.fetch_add(1, Relaxed),
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
        outcome: OnceLock::new(),
    });
    table.total.fetch_add(1, Relaxed);
    table
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(conn.id, conn.clone());
    let finish = Arc::new(Finish {
        conn: conn.clone(),
        hub: hub.clone(),
        table: table.clone(),
    });
    let spawned = thread::Builder::new()
        .stack_size(THREAD_STACK)
        .spawn(move || dial_then_relay(finish));
    if let Err(e) = spawned {
        // The dropped closure released `finish`, which cleaned up.
        warn!("cannot serve {client}: cannot start a thread: {e}");
        conn.abort("out of threads");
    }
}

/// First thread of a connection: dial, start the agent→client thread, then
/// copy client→agent.
fn dial_then_relay(finish: Arc<Finish>) {
    let c = finish.conn.clone();
    let limits = &finish.hub.limits;
    let _ = c.tcp.set_nodelay(true);
    let port = c.local.port();
    let reader = match dial(&c, port, limits.dial_timeout) {
        Ok(r) => r,
        Err(_) if c.outcome.get().is_some() => return, // torn down by unmap or stop
        Err(why) => {
            finish.table.dial_failures.fetch_add(1, Relaxed);
            warn!("dial {} port {port} for {} failed: {why}", c.pilot, c.client);
            c.fail(Outcome::DialFailed(why));
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
    // The agent→client thread wakes at least this often to apply the
    // shorter half-closed limit once the client has stopped sending.
    let _ = c
        .ipc
        .set_read_timeout(Some(limits.idle_timeout.min(HALF_CLOSED_IDLE)));
    let _ = c.ipc.set_write_timeout(Some(limits.idle_timeout));
    let down = {
        let (c2, idle) = (c.clone(), limits.idle_timeout);
        let finish2 = finish.clone();
        thread::Builder::new().stack_size(THREAD_STACK).spawn(move || {
            agent_to_client(&c2, reader, idle);
            drop(finish2);
        })
    };
    let down = match down {
        Ok(t) => t,
        Err(e) => {
            c.fail(Outcome::Reset(format!("cannot start a thread: {e}")));
            return;
        }
    };
    client_to_agent(&c, limits.idle_timeout);
    c.client_done.store(true, Relaxed);
    down.thread().unpark();
    drop(finish);
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

/// Opens the pilot stream, with the dial bounded by `timeout`. Returns the
/// session's reader, which the agent→client thread takes over (with any
/// Recv frames that arrived right behind the DialOK).
fn dial(c: &Arc<Conn>, port: u16, timeout: Duration) -> Result<FrameReader<IpcRead>, String> {
    let _ = c.ipc.set_read_timeout(Some(timeout));
    let _ = c.ipc.set_write_timeout(Some(timeout));
    let mut reader = FrameReader::growing(IpcRead(c.clone()), BUFFER_START, DOWN_BUFFER);
    let reply = (&c.ipc)
        .write_all(&ipc::encode(
            cmd::DIAL,
            &[&c.pilot.to_wire(), &port.to_be_bytes()],
        ))
        .map_err(IpcError::from)
        .and_then(|()| reader.read_frame())
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
fn client_to_agent(c: &Conn, idle: Duration) {
    let Some(&id) = c.pilot_conn.get() else { return };
    let mut buf = vec![0u8; ipc::DATA_HEADER + BUFFER_START];
    let mut tcp = &c.tcp;
    loop {
        match tcp.read(&mut buf[ipc::DATA_HEADER..]) {
            // The client shut its sending side: stop sending, keep the
            // agent→client direction going (no half-close on pilot streams).
            Ok(0) => return,
            Ok(n) => {
                if c.agent_closed.load(Relaxed) {
                    // The agent is gone; these bytes can never be delivered.
                    c.fail(Outcome::Reset("client sent data after the agent closed".into()));
                    return;
                }
                ipc::put_send_header(&mut buf, id, n);
                if let Err(e) = (&c.ipc).write_all(&buf[..ipc::DATA_HEADER + n]) {
                    c.fail(Outcome::Reset(format!("writing to the daemon: {e}")));
                    return;
                }
                c.up.fetch_add(n as u64, Relaxed);
                c.touch();
                if ipc::DATA_HEADER + n == buf.len() && n < UP_BUFFER {
                    buf.resize((buf.len() * 2).min(ipc::DATA_HEADER + UP_BUFFER), 0);
                }
            }
            Err(e) if is_timeout(&e) => {
                if c.agent_closed.load(Relaxed) || c.outcome.get().is_some() {
                    return;
                }
                match c.idle_left(idle) {
                    Some(left) => {
                        let _ = c.tcp.set_read_timeout(Some(left.max(Duration::from_millis(10))));
                    }
                    None => {
                        c.fail(Outcome::IdleTimeout);
                        return;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Shut down by the other thread or by unmap, or a client reset.
                if c.outcome.get().is_none() && !c.agent_closed.load(Relaxed) {
                    c.fail(Outcome::Reset(format!("client: {e}")));
                }
                return;
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Copies agent→client until the agent closes or something fails.
fn agent_to_client(c: &Conn, mut reader: FrameReader<IpcRead>, idle: Duration) {
    let Some(&id) = c.pilot_conn.get() else { return };
    let mut ranges: [std::ops::Range<usize>; MAX_IOVECS] = std::array::from_fn(|_| 0..0);
    loop {
        // Gather every complete frame already buffered.
        let mut n = 0;
        let mut closed = false;
        let mut failure = None;
        while n < MAX_IOVECS {
            match reader.next_buffered() {
                Ok(None) => break,
                Ok(Some((cmd::RECV, r))) => match ipc::be_u32(&reader.buffer()[r.clone()]) {
                    Some(got) if got == id => {
                        if r.len() > 4 {
                            ranges[n] = r.start + 4..r.end;
                            n += 1;
                        }
                    }
                    Some(got) => {
                        failure = Some(format!("daemon sent data for connection {got}, expected {id}"));
                        break;
                    }
                    None => {
                        failure = Some("daemon sent a Recv frame without a connection id".into());
                        break;
                    }
                },
                Ok(Some((cmd::CLOSE_OK, _))) => {
                    closed = true;
                    break;
                }
                Ok(Some((cmd::ERROR, r))) => {
                    failure = Some(format!("daemon error: {}", ipc::error_text(&reader.buffer()[r])));
                    break;
                }
                Ok(Some((other, _))) => {
                    failure = Some(format!("daemon sent unexpected message 0x{other:02X}"));
                    break;
                }
                Err(e) => {
                    failure = Some(format!("daemon protocol error: {e}"));
                    break;
                }
            }
        }
        if n > 0 {
            if let Err(e) = write_ranges(&c.tcp, reader.buffer(), &mut ranges[..n], c) {
                let why = if is_timeout(&e) {
                    Outcome::IdleTimeout
                } else {
                    Outcome::Reset(format!("client: {e}"))
                };
                if c.outcome.get().is_none() {
                    c.fail(why);
                }
                return;
            }
            c.touch();
        }
        if let Some(why) = failure {
            c.fail(Outcome::Reset(why));
            return;
        }
        if closed {
            agent_closed(c);
            return;
        }
        if n == MAX_IOVECS {
            continue;
        }
        match reader.fill() {
            Ok(()) => {}
            Err(e) if e.is_timeout() => {
                if c.outcome.get().is_some() {
                    return;
                }
                let limit = if c.client_done.load(Relaxed) {
                    idle.min(HALF_CLOSED_IDLE)
                } else {
                    idle
                };
                match c.idle_left(limit) {
                    Some(left) => {
                        let next = left.min(HALF_CLOSED_IDLE).max(Duration::from_millis(10));
                        let _ = c.ipc.set_read_timeout(Some(next));
                    }
                    None => {
                        c.fail(Outcome::IdleTimeout);
                        return;
                    }
                }
            }
            Err(e) => {
                if c.outcome.get().is_none() {
                    let why = match e {
                        IpcError::Truncated => "the daemon closed the session in the middle of a frame".to_string(),
                        e if e.is_closed() => "the daemon closed the session (daemon restarted, or it dropped us: newer daemons drop a client that has not read for 10 s, which happens when the TCP client reads slowly)".to_string(),
                        e => format!("daemon: {e}"),
                    };
                    c.fail(Outcome::Reset(why));
                }
                return;
            }
        }
    }
}

/// Writes the payload ranges to the client with as few `writev`s as the
/// kernel allows, counting the bytes.
fn write_ranges(
    tcp: &TcpStream,
    buf: &[u8],
    ranges: &mut [std::ops::Range<usize>],
    c: &Conn,
) -> io::Result<()> {
    let mut slices: [IoSlice<'_>; MAX_IOVECS] = [IoSlice::new(&[]); MAX_IOVECS];
    for (s, r) in slices.iter_mut().zip(ranges.iter()) {
        *s = IoSlice::new(&buf[r.clone()]);
    }
    let mut slices = &mut slices[..ranges.len()];
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
