//! `pilot-devd`: a stand-in for the Pilot daemon, for trying and testing
//! the gateway on one machine. It is not the overlay: a dial to a pilot
//! address connects to a local TCP endpoint chosen by `--route`.
//!
//! It speaks the daemon's IPC protocol as PROTOCOL.md describes the newer
//! (v1.9+) daemons, so that a test passing against it passes against the
//! real one:
//!
//! - many clients, each in its own thread; requests of one client are
//!   dispatched concurrently (a pending Dial does not block Sends);
//! - Recv frames carry at most 4096 data bytes; a service that closes
//!   yields its remaining data, then an unsolicited CloseOK;
//! - Close is idempotent and always answered with CloseOK (twice, on a live
//!   connection, as the real daemon may);
//! - Send never answers; an unknown command gets an Error frame;
//! - a frame over 1 MiB drops the client, as does a client that has not
//!   drained its socket within 10 s;
//! - at most `--max-clients` clients (accept, then close at once beyond);
//!   clients of another UID are closed without a reply (SO_PEERCRED);
//! - Cancel (0x2B) abandons the client's pending dials; Health answers.
//!
//! Serving a port (PROTOCOL.md "Serving a port"): Bind gives the client a
//! port (BindOK), or Error `port N already bound` when another client — or
//! the daemon's own services, which hold 7, 1001 and 1002 from start —
//! holds it. `--inbound LOCALTCP=ADDR:PORT` stands in for remote peers:
//! each TCP connection to LOCALTCP arrives at the client that bound PORT as
//! Accept (from ADDR, an ephemeral remote port counting up from 49152),
//! then Recv frames of at most 4096 bytes, then an unsolicited CloseOK when
//! the TCP side closes (no half-close, as on the overlay); nobody bound →
//! the TCP connection is reset. Send and Close work as for dialed
//! connections. Accepted connections count towards the client's 4096. The
//! client's session ending frees its ports and closes their connections.
//! Unbind (0x37) is an unknown command, as on the Feb-2026 daemon, unless
//! `--unbind` makes devd behave like newer daemons (UnbindOK; connections
//! already accepted keep flowing).
//!
//! Info reports `conn_list` (every connection the daemon holds, in the
//! real daemon's shape) unless `--no-conn-list`; `--lossy-close MS`
//! delays every Send by MS and loses what a Close catches undelivered, as
//! the Feb-2026 daemon does (see `conns.rs` for both).
//!
//! `--misbehave MODE` breaks the protocol on purpose, for fault tests.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pilot_gateway::address::PilotAddr;
use pilot_gateway::ipc::{self, cmd, FrameReader, IpcError};
use pilot_gateway::json::Value;
use pilot_gateway::sys;

use crate::conns::{Conn, Track};

use dial::*;
use ports::*;

/// Largest data chunk per Recv frame, as the real daemon sends.
pub const RECV_CHUNK: usize = 4096;
/// The real daemon's per-write deadline towards a client.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Pilot connections one client may hold (upstream's limit).
const MAX_CONNS_PER_CLIENT: usize = 4096;
const STACK: usize = 128 * 1024;
/// Ports the daemon's own services hold from start (echo, data exchange,
/// event stream): a client's Bind of one fails as on the real daemon.
const SERVICE_PORTS: [u16; 3] = [7, 1001, 1002];
/// How long a connection the client closed keeps draining its TCP peer.
const CLOSED_DRAIN: Duration = Duration::from_secs(2);
/// How often closed connections are swept out of `conn_list` (upstream
/// `DefaultIdleSweepInterval`; see `Daemon::sweep`).
const SWEEP_INTERVAL: Duration = Duration::from_secs(15);
/// First remote port of inbound connections (the ephemeral range).
const EPHEMERAL_START: u16 = 49152;

/// `--inbound`: TCP connections to `listen` arrive as pilot connections
/// from `addr` to our port `port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inbound {
    pub listen: SocketAddr,
    pub addr: PilotAddr,
    pub port: u16,
}

/// A route: dials to `addr` (on `port`, or any port) go to `host` (on
/// `host_port`, or the same port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub addr: PilotAddr,
    pub port: Option<u16>,
    pub host: IpAddr,
    pub host_port: Option<u16>,
}

/// Ways to break the protocol on purpose (see `--help`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehave {
    Oversize,
    Truncated,
    UnknownCmd,
    RecvUnknownId,
    ShortDialOk,
    Flood,
}

impl Misbehave {
    pub fn parse(s: &str) -> Option<Misbehave> {
        Some(match s {
            "oversize" => Misbehave::Oversize,
            "truncated" => Misbehave::Truncated,
            "unknown-cmd" => Misbehave::UnknownCmd,
            "recv-unknown-id" => Misbehave::RecvUnknownId,
            "short-dialok" => Misbehave::ShortDialOk,
            "flood" => Misbehave::Flood,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub socket: PathBuf,
    pub routes: Vec<Route>,
    pub untrusted: HashSet<PilotAddr>,
    /// Dials to these addresses fail with this exact error text (which
    /// may hold control characters: tests check they are escaped).
    pub dial_error: HashMap<PilotAddr, String>,
    pub dial_delay: Duration,
    pub dial_delay_for: HashMap<PilotAddr, Duration>,
    pub hosts: HashMap<String, PilotAddr>,
    pub max_clients: usize,
    pub any_uid: bool,
    pub node_id: u32,
    pub hostname: String,
    pub misbehave: Option<Misbehave>,
    /// `--misbehave ADDR=MODE`: only dials to ADDR misbehave.
    pub misbehave_for: HashMap<PilotAddr, Misbehave>,
    /// Log every connection and dial, not only refusals and cancels.
    pub verbose: bool,
    pub inbound: Vec<Inbound>,
    /// Answer Unbind (0x37) as newer daemons do.
    pub unbind: bool,
    /// `--lossy-close MS`: Sends delivered MS late, lost at Close.
    pub lossy_close: Option<Duration>,
    /// `--no-conn-list`: Info without `conn_list`, as older daemons.
    pub no_conn_list: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            socket: PathBuf::from("/tmp/pilot.sock"),
            routes: Vec::new(),
            untrusted: HashSet::new(),
            dial_error: HashMap::new(),
            dial_delay: Duration::ZERO,
            dial_delay_for: HashMap::new(),
            hosts: HashMap::new(),
            max_clients: 1024,
            any_uid: false,
            node_id: 1,
            hostname: "devd".into(),
            misbehave: None,
            misbehave_for: HashMap::new(),
            verbose: false,
            inbound: Vec::new(),
            unbind: false,
            lossy_close: None,
            no_conn_list: false,
        }
    }
}

impl Config {
    /// Parses `ADDR=HOST` or `ADDR:PORT=HOST:PORT`.
    pub fn parse_route(text: &str) -> Result<Route, String> {
        let bad = |why: &str| format!("--route {text:?}: {why} (expected ADDR=HOST or ADDR:PORT=HOST:PORT)");
        let (left, right) = text.split_once('=').ok_or_else(|| bad("missing '='"))?;
        // ADDR itself contains one ':'; a second one introduces the port.
        let (addr, port) = match left.rsplit_once(':') {
            Some((a, p)) if a.contains(':') => (a, Some(p.parse::<u16>().map_err(|_| bad("bad port"))?)),
            _ => (left, None),
        };
        let addr: PilotAddr = addr.parse().map_err(|e| bad(&format!("{e}")))?;
        let (host, host_port) = if let Ok(ip) = right.parse::<IpAddr>() {
            (ip, None)
        } else {
            let sa: SocketAddr = right.parse().map_err(|_| bad("bad HOST or HOST:PORT"))?;
            (sa.ip(), Some(sa.port()))
        };
        if port.is_some() != host_port.is_some() {
            return Err(bad("give a port on both sides, or on neither"));
        }
        Ok(Route {
            addr,
            port,
            host,
            host_port,
        })
    }

    /// Parses `LOCALTCP=ADDR:PORT`, e.g. `127.0.0.1:7100=0:0000.0000.0009:80`.
    pub fn parse_inbound(text: &str) -> Result<Inbound, String> {
        let bad = |why: &str| format!("--inbound {text:?}: {why} (expected LOCALTCP=ADDR:PORT)");
        let (left, right) = text.split_once('=').ok_or_else(|| bad("missing '='"))?;
        let listen: SocketAddr = left.parse().map_err(|_| bad("bad LOCALTCP (IP:PORT)"))?;
        let (addr, port) = right.rsplit_once(':').ok_or_else(|| bad("missing :PORT"))?;
        let port = port.parse::<u16>().map_err(|_| bad("bad port"))?;
        let addr: PilotAddr = addr.parse().map_err(|e| bad(&format!("{e}")))?;
        Ok(Inbound { listen, addr, port })
    }

    /// Where a dial to `addr:port` goes: a per-port route first.
    pub fn target(&self, addr: PilotAddr, port: u16) -> Option<SocketAddr> {
        let exact = self
            .routes
            .iter()
            .find(|r| r.addr == addr && r.port == Some(port));
        let any = self.routes.iter().find(|r| r.addr == addr && r.port.is_none());
        exact
            .or(any)
            .map(|r| SocketAddr::new(r.host, r.host_port.unwrap_or(port)))
    }

    fn misbehaviour(&self, addr: PilotAddr) -> Option<Misbehave> {
        self.misbehave_for.get(&addr).copied().or(self.misbehave)
    }

    fn known(&self, addr: PilotAddr) -> bool {
        self.routes.iter().any(|r| r.addr == addr)
    }

    fn trusted(&self) -> Vec<PilotAddr> {
        let mut v: Vec<PilotAddr> = self
            .routes
            .iter()
            .map(|r| r.addr)
            .filter(|a| !self.untrusted.contains(a))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

fn log(msg: std::fmt::Arguments<'_>) {
    let line = format!("pilot-devd: {msg}\n");
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

macro_rules! say { ($($t:tt)*) => { log(format_args!($($t)*)) } }

struct Daemon {
    cfg: Config,
    clients: AtomicUsize,
    next_conn: AtomicU32,
    /// Bound ports and the client that holds each.
    ports: Mutex<HashMap<u16, Arc<Client>>>,
    next_remote_port: AtomicU16,
    /// Local ports of dialed connections (ephemeral, as upstream's).
    next_local_port: AtomicU16,
    /// Every connection, of every client, for Info's `conn_list`; closed
    /// ones stay (TIME_WAIT) until reaped.
    all: Mutex<HashMap<u32, Arc<Track>>>,
    /// The sweep tick `all` was last swept at.
    swept_at: Mutex<Instant>,
    started: Instant,
    euid: sys::user::Uid,
}

/// A listening socket at `path`, mode 0600, that appears there only once
/// it accepts: bound under a temporary name beside it, then linked into
/// place. Whoever waits for the path to exist (the tests do) can connect
/// at once; `bind(2)` alone creates the file before `listen(2)`, and a
/// connect in between is refused. The mode comes from the umask as the
/// socket is created, never from a chmod by path (which follows a link
/// swapped in meanwhile); link(2), unlike rename(2), replaces nothing
/// that holds `path` already, as bind(2) would not. Where the temporary
/// name cannot be bound (too long for a socket address) `path` is bound
/// directly. Called while no other devd thread creates files (the umask
/// is the process's; the signal thread only removes the socket).
fn bind_listening(path: &Path) -> io::Result<UnixListener> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let before = sys::fs::set_umask(0o177);
    let bound = match UnixListener::bind(&tmp) {
        Ok(l) => Ok((l, true)),
        Err(_) => UnixListener::bind(path).map(|l| (l, false)),
    };
    sys::fs::set_umask(before);
    let (listener, temporary) = bound?;
    if temporary {
        let placed = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        placed?;
    }
    Ok(listener)
}

/// Binds the socket (removing a stale one) and serves until the process ends.
pub fn serve(cfg: Config) -> io::Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(&cfg.socket) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(&cfg.socket)?;
        }
    }
    let listener = bind_listening(&cfg.socket)?;
    say!(
        "listening on {} ({} routes)",
        cfg.socket.display(),
        cfg.routes.len()
    );
    let d = Arc::new(Daemon {
        cfg,
        clients: AtomicUsize::new(0),
        next_conn: AtomicU32::new(1),
        ports: Mutex::new(HashMap::new()),
        next_remote_port: AtomicU16::new(EPHEMERAL_START),
        next_local_port: AtomicU16::new(EPHEMERAL_START),
        all: Mutex::new(HashMap::new()),
        swept_at: Mutex::new(Instant::now()),
        started: Instant::now(),
        euid: sys::user::euid(),
    });
    for inbound in d.cfg.inbound.clone() {
        let tcp = TcpListener::bind(inbound.listen)?;
        say!("inbound: {} → {}:{}", inbound.listen, inbound.addr, inbound.port);
        let d2 = d.clone();
        thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || accept_inbound(&d2, &tcp, &inbound))?;
    }
    loop {
        crate::faults::gate(&listener, None);
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                say!("accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let Some(stream) = crate::faults::gate(&listener, Some(stream)) else {
            continue;
        };
        if !d.cfg.any_uid {
            match sys::net::peer_uid(&stream) {
                Some(uid) if uid == d.euid => {}
                uid => {
                    say!(
                        "refused client of uid {uid:?}: this daemon accepts only its own uid {}",
                        d.euid
                    );
                    continue; // dropped: closed without a reply
                }
            }
        }
        let n = d.clients.fetch_add(1, Relaxed) + 1;
        if n > d.cfg.max_clients {
            d.clients.fetch_sub(1, Relaxed);
            say!(
                "client limit reached ({} clients): closing the new one",
                d.cfg.max_clients
            );
            continue;
        }
        let d2 = d.clone();
        let spawned = thread::Builder::new().stack_size(STACK).spawn(move || {
            client(&d2, stream);
            d2.clients.fetch_sub(1, Relaxed);
        });
        if spawned.is_err() {
            d.clients.fetch_sub(1, Relaxed);
        }
    }
}

/// One client session. One descriptor serves reading and writing; the
/// lock keeps frames from several connection threads whole.
struct Client {
    write_lock: Mutex<()>,
    conns: Mutex<HashMap<u32, Arc<Conn>>>,
    /// Dials in flight; Cancel or the session's end sets their flag.
    pending: Mutex<Vec<Arc<AtomicBool>>>,
    closed: AtomicBool,
    stream: UnixStream,
}

impl Client {
    /// Writes one whole frame; a client that cannot take it is dropped.
    fn send(&self, frame: &[u8]) -> bool {
        if self.closed.load(Relaxed) {
            return false;
        }
        let ok = match self.write_lock.lock() {
            Ok(_held) => crate::faults::write_frame(&self.stream, frame),
            Err(_) => false,
        };
        if !ok && !self.closed.swap(true, Relaxed) {
            say!("dropping a client that did not read for {WRITE_DEADLINE:?} (or went away)");
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        ok
    }

    fn error(&self, msg: &str) {
        self.send(&ipc::encode(cmd::ERROR, &[&1u16.to_be_bytes(), msg.as_bytes()]));
    }

    fn reply_json(&self, command: u8, v: &Value) {
        self.send(&ipc::encode(command, &[v.to_string().as_bytes()]));
    }
}

/// Reads a client's session through the shared handle.
struct ClientRead(Arc<Client>);

impl Read for ClientRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.0.stream).read(buf)
    }
}

fn client(d: &Arc<Daemon>, stream: UnixStream) {
    let _ = stream.set_write_timeout(Some(WRITE_DEADLINE));
    let c = Arc::new(Client {
        write_lock: Mutex::new(()),
        conns: Mutex::new(HashMap::new()),
        pending: Mutex::new(Vec::new()),
        closed: AtomicBool::new(false),
        stream,
    });
    if d.cfg.verbose {
        say!("client connected");
    }
    // Up to 256 KiB: a client's 64 KiB Send frames, several per read. It
    // starts small and doubles while reads fill it: most clients send a few
    // small frames, and a quarter-MiB buffer zeroed for each of thousands of
    // short sessions costs more than the sessions (page faults whenever
    // they overlap, as when a gateway's Close waits for delivery).
    let mut reader = FrameReader::growing(ClientRead(c.clone()), 4096, 256 * 1024);
    loop {
        let (command, range) = match reader.read_frame() {
            Ok(f) => f,
            Err(IpcError::TooLong(n)) => {
                say!("frame of {n} bytes exceeds 1 MiB: dropping the client");
                break;
            }
            Err(_) => break,
        };
        dispatch(d, &c, command, &reader.buffer()[range]);
    }
    session_ended(d, &c);
}

/// Handles one request of a client.
fn dispatch(d: &Arc<Daemon>, c: &Arc<Client>, command: u8, payload: &[u8]) {
    match command {
        cmd::DIAL => dial(d, c, payload),
        cmd::SEND => send(d, c, payload),
        cmd::CLOSE => close(d, c, payload),
        cmd::BIND => bind(d, c, payload),
        cmd::UNBIND if d.cfg.unbind => unbind(d, c, payload),
        cmd::INFO => reply_info(d, c),
        cmd::HEALTH => c.reply_json(
            cmd::HEALTH_OK,
            &Value::obj([
                ("status", Value::from("ok")),
                ("uptime_secs", d.started.elapsed().as_secs().into()),
                ("clients", d.clients.load(Relaxed).into()),
            ]),
        ),
        cmd::HANDSHAKE => match payload.first() {
            Some(&cmd::HS_TRUSTED) => c.reply_json(cmd::HANDSHAKE_OK, &trusted(d)),
            Some(&sub) => c.error(&format!(
                "handshake: sub-command 0x{sub:02X} not supported by pilot-devd"
            )),
            None => c.error("handshake: missing sub-command"),
        },
        cmd::RESOLVE => resolve(d, c, payload),
        cmd::CANCEL => {
            let pending = c
                .pending
                .lock()
                .map(|mut p| std::mem::take(&mut *p))
                .unwrap_or_default();
            for flag in &pending {
                flag.store(true, Relaxed);
            }
            say!("cancel received ({} pending dials abandoned)", pending.len());
        }
        other => c.error(&format!("unknown command: 0x{other:02X}")),
    }
}

/// Send: inline and in order; a failed send is only logged.
fn send(d: &Daemon, c: &Client, payload: &[u8]) {
    let Some(id) = ipc::be_u32(payload) else { return };
    let conn = c.conns.lock().ok().and_then(|m| m.get(&id).cloned());
    match conn {
        Some(t) => {
            if let Err(e) = t.send(&payload[4..], d.cfg.lossy_close, &c.closed) {
                if d.cfg.verbose {
                    say!("send on connection {id}: {e}");
                }
            }
        }
        None if d.cfg.verbose => say!("send: connection {id} not found"),
        None => {}
    }
}

/// Close: idempotent, always answered with CloseOK; on a live connection
/// with two identical CloseOK frames, as the real daemon does (PROTOCOL.md),
/// so clients' tolerance of the second is exercised.
fn close(d: &Daemon, c: &Client, payload: &[u8]) {
    let Some(id) = ipc::be_u32(payload) else {
        c.error("close: short payload");
        return;
    };
    let conn = c.conns.lock().ok().and_then(|mut m| m.remove(&id));
    if let Some(t) = conn {
        // The TCP side sees the end (FIN after what was delivered; with
        // `--lossy-close`, nothing at all within the dial window).
        // Its relay thread reads and discards what the peer still sends
        // for a short while, as the overlay drops data sent to a closed
        // stream; shutting the reading side instead could leave a peer
        // that is still sending stuck on a zero window until the
        // kernel's FIN-WAIT-2 timeout.
        t.close(d.cfg.lossy_close, CLOSED_DRAIN);
        c.send(&ipc::encode(cmd::CLOSE_OK, &[&id.to_be_bytes()]));
    }
    c.send(&ipc::encode(cmd::CLOSE_OK, &[&id.to_be_bytes()]));
}

fn resolve(d: &Daemon, c: &Client, payload: &[u8]) {
    let name = String::from_utf8_lossy(payload).into_owned();
    match d.cfg.hosts.get(&name) {
        Some(a) => c.reply_json(
            cmd::RESOLVE_OK,
            &Value::obj([
                ("address", Value::from(a.to_string())),
                ("hostname", name.into()),
                ("node_id", a.node.into()),
                ("public", true.into()),
                ("type", "resolve_hostname_ok".into()),
            ]),
        ),
        None => c.error(&format!("resolve hostname {name:?}: not found")),
    }
}

impl Daemon {
    /// Lists a new connection in `conn_list`.
    fn register(&self, conn: &Conn) {
        let mut all = self.all.lock().unwrap_or_else(|p| p.into_inner());
        self.sweep(&mut all);
        all.insert(conn.id, conn.track.clone());
    }

    /// Drops closed connections as upstream's `idleSweepLoop` does: on
    /// each tick of a 15 s ticker started with the daemon, every one that
    /// had been in TIME_WAIT for more than 10 s (`conns.rs` notes). Run
    /// lazily, whenever the list is read or grows, for the ticks passed
    /// since the last sweep (the latest tick decides: an earlier one drops
    /// a subset of what it drops), so Info shows what the real daemon
    /// would list at that moment. No cap: a devd that serves thousands of
    /// short connections a second lists tens of thousands, as the real
    /// daemon would at that rate.
    fn sweep(&self, all: &mut HashMap<u32, Arc<Track>>) {
        let tick = crate::conns::last_tick(self.started, Instant::now(), SWEEP_INTERVAL);
        let mut last = self.swept_at.lock().unwrap_or_else(|p| p.into_inner());
        if tick <= *last {
            return;
        }
        *last = tick;
        all.retain(|_, c| !c.stale_at(tick));
    }

    /// Appends Info's `conn_list` to `out`: every connection, by id.
    fn write_conn_list(&self, out: &mut Vec<u8>) {
        // Written outside the lock: every Dial and Accept registers under
        // it, and a long list takes a millisecond or more to write.
        let mut list: Vec<Arc<Track>> = {
            let mut all = self.all.lock().unwrap_or_else(|p| p.into_inner());
            self.sweep(&mut all);
            all.values().cloned().collect()
        };
        list.sort_unstable_by_key(|c| c.id);
        out.push(b'[');
        for (i, c) in list.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            c.write_entry(out);
        }
        out.push(b']');
    }
}

thread_local! {
    /// The Info reply being written, kept by the client's thread between
    /// Infos: a poller asks for megabytes tens of times a second, and a
    /// fresh buffer each time costs more in page faults than the writing.
    static INFO_FRAME: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Answers Info: the fields of [`info`] and, unless `--no-conn-list`,
/// `conn_list`.
fn reply_info(d: &Daemon, c: &Client) {
    let fields = info(d, c).to_string();
    INFO_FRAME.with_borrow_mut(|frame| {
        frame.clear();
        frame.extend_from_slice(&[0, 0, 0, 0, cmd::INFO_OK]);
        frame.extend_from_slice(fields.as_bytes());
        if !d.cfg.no_conn_list && frame.last() == Some(&b'}') {
            frame.pop();
            frame.extend_from_slice(b",\"conn_list\":");
            d.write_conn_list(frame);
            frame.push(b'}');
        }
        let len = u32::try_from(frame.len() - 4).unwrap_or(u32::MAX);
        frame[..4].copy_from_slice(&len.to_be_bytes());
        c.send(frame);
        // A burst of thousands of connections is not kept for good.
        if frame.capacity() > 16 << 20 {
            *frame = Vec::new();
        }
    });
}

fn info(d: &Daemon, c: &Client) -> Value {
    let addr = PilotAddr::new(0, d.cfg.node_id);
    let v = vec![
        ("node_id", Value::from(d.cfg.node_id)),
        ("address", addr.to_string().into()),
        ("hostname", d.cfg.hostname.clone().into()),
        ("uptime_secs", d.started.elapsed().as_secs().into()),
        ("connections", c.conns.lock().map_or(0, |m| m.len()).into()),
        (
            "ports",
            (SERVICE_PORTS.len() + d.ports.lock().map_or(0, |p| p.len())).into(),
        ),
        ("peers", d.cfg.trusted().len().into()),
        ("encrypt", true.into()),
        (
            "version",
            format!("pilot-devd {}", env!("CARGO_PKG_VERSION")).into(),
        ),
        ("transport", "devd".into()),
        ("endpoint", d.cfg.socket.display().to_string().into()),
        ("features", Value::Arr(vec!["dgram_confirm".into()])),
    ];
    Value::obj(v)
}

fn trusted(d: &Daemon) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.as_secs());
    let peers = d
        .cfg
        .trusted()
        .into_iter()
        .map(|a| {
            Value::obj([
                ("approved_at", Value::from(now)),
                ("mutual", true.into()),
                ("network", a.network.into()),
                ("node_id", a.node.into()),
                (
                    "public_key",
                    "cGlsb3QtZGV2ZCBzdGFuZC1pbiBrZXkgLS0tLS0tLS0=".into(),
                ),
            ])
        })
        .collect();
    Value::obj([("trusted", Value::Arr(peers))])
}

fn misbehave(c: &Client, m: Misbehave, id: u32) {
    match m {
        Misbehave::Oversize => {
            c.send(&(2u32 << 20).to_be_bytes());
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        Misbehave::Truncated => {
            let f = ipc::encode(cmd::RECV, &[&id.to_be_bytes(), b"this frame is cut short"]);
            c.send(&f[..f.len() / 2]);
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        Misbehave::UnknownCmd => {
            c.send(&ipc::encode(0x7F, &[b"?"]));
        }
        Misbehave::RecvUnknownId => {
            c.send(&ipc::encode(
                cmd::RECV,
                &[&(id.wrapping_add(1_000_000)).to_be_bytes(), b"stray"],
            ));
        }
        Misbehave::Flood => {
            let frame = ipc::encode(cmd::RECV, &[&id.to_be_bytes(), &[0u8; RECV_CHUNK]]);
            // Ends when the client stops reading for 10 s or goes away.
            while c.send(&frame) {}
        }
        Misbehave::ShortDialOk => {}
    }
}

// After `say!`, which the parts use (macro_rules scope is textual).
mod dial;
mod ports;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = Config::parse_route("0:0000.0000.0004=127.0.0.1").unwrap();
        assert_eq!((r.port, r.host_port), (None, None));
        let r = Config::parse_route("0:0000.0000.0004:80=127.0.0.1:8080").unwrap();
        assert_eq!((r.port, r.host_port), (Some(80), Some(8080)));
        assert!(Config::parse_route("0:0000.0000.0004:80=127.0.0.1").is_err());
        assert!(Config::parse_route("0:0000.0000.0004").is_err());
        assert!(Config::parse_route("0:0000.0000.04=127.0.0.1").is_err());
        let cfg = Config {
            routes: vec![
                Config::parse_route("0:0000.0000.0004=127.0.0.1").unwrap(),
                Config::parse_route("0:0000.0000.0004:80=127.0.0.2:8080").unwrap(),
            ],
            ..Config::default()
        };
        let a = PilotAddr::new(0, 4);
        assert_eq!(cfg.target(a, 80), Some("127.0.0.2:8080".parse().unwrap()));
        assert_eq!(cfg.target(a, 81), Some("127.0.0.1:81".parse().unwrap()));
        assert_eq!(cfg.target(PilotAddr::new(0, 5), 80), None);
    }
}
