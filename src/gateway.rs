//! The running gateway: brings mappings up and down, owns every listener,
//! and answers the signals that the other commands send.
//!
//! One process owns the data path. It starts under the state lock, checks
//! everything before touching the system, then adds aliases and binds
//! listeners; if any step fails it undoes the earlier ones and exits with
//! the reason. Afterwards its main thread only waits for signals:
//!
//! | signal        | meaning                                               |
//! |---------------|-------------------------------------------------------|
//! | SIGHUP        | state.json changed: apply the difference              |
//! | SIGUSR2       | write live counters to stats.json                     |
//! | SIGUSR1       | reopen the access log (rotation)                      |
//! | SIGTERM/INT   | close listeners and connections, remove our aliases   |

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;

use crate::address::PilotAddr;
use crate::alias::Aliases;
use crate::bridge::{Hub, Limits, Listener, Table};
use crate::error::{Code, Error, Result};
use crate::ipc::{IpcError, Session};
use crate::json::Value;
use crate::state::{self, Dir, Mapping, State};
use crate::subnet::{self, needs_alias};
use crate::sys::{ProcId, Signals};
use crate::{error, info, warn};

/// Everything `start` needs, validated.
pub struct Config {
    pub socket: PathBuf,
    /// Where the socket path came from (for error messages).
    pub socket_source: String,
    pub state_dir: PathBuf,
    pub subnet: Ipv4Network,
    pub ports: Vec<u16>,
    pub max_conns: usize,
    pub dial_timeout: Duration,
    pub idle_timeout: Duration,
    /// `--access-log PATH` (`-` for stderr) and its format; opened after
    /// any user switch, so rotation reopens work as the same user.
    pub access_log: Option<(String, crate::log::Format)>,
    /// `--user NAME`: run as this user (from root).
    pub user: Option<String>,
    /// `--no-user-switch`: stay root even if the daemon is another user's.
    pub no_user_switch: bool,
}

/// A mapping the user asked for: an address (perhaps from a hostname) and
/// perhaps a chosen local IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub ip: Option<Ipv4Addr>,
}

/// What `start` reports once everything is up.
pub struct Report {
    pub pid: u32,
    pub subnet: Ipv4Network,
    pub ports: Vec<u16>,
    pub mappings: Vec<Mapping>,
    pub warnings: Vec<String>,
    pub cleaned: Vec<String>,
    pub user: Option<String>,
    pub capabilities: Vec<String>,
    pub socket: PathBuf,
}

impl Report {
    pub fn to_json(&self) -> Value {
        Value::obj([
            ("pid", self.pid.into()),
            ("subnet", self.subnet.to_string().into()),
            (
                "ports",
                Value::Arr(self.ports.iter().map(|&p| p.into()).collect()),
            ),
            (
                "mappings",
                Value::Arr(self.mappings.iter().map(mapping_json).collect()),
            ),
            ("socket", self.socket.display().to_string().into()),
            ("user", self.user.clone().into()),
            ("capabilities", self.capabilities.clone().into()),
            ("warnings", self.warnings.clone().into()),
            ("cleaned", self.cleaned.clone().into()),
        ])
    }
}

pub fn mapping_json(m: &Mapping) -> Value {
    let mut v = vec![
        ("local_ip", Value::from(m.local_ip.to_string())),
        ("pilot_addr", m.pilot_addr.to_string().into()),
    ];
    if let Some(h) = &m.hostname {
        v.push(("hostname", h.clone().into()));
    }
    Value::obj(v)
}

/// A mapping that is up: its listeners and its connections.
struct Live {
    addr: PilotAddr,
    alias_ours: bool,
    listeners: Vec<Listener>,
    table: Arc<Table>,
}

struct Gateway {
    me: ProcId,
    dir: Dir,
    socket: PathBuf,
    subnet: Ipv4Network,
    ports: Vec<u16>,
    hub: Arc<Hub>,
    aliases: Aliases,
    live: BTreeMap<Ipv4Addr, Live>,
    started: Instant,
    stats_seq: u64,
}

/// Connects to the daemon and checks that it answers: Health on newer
/// daemons, Info on older ones (which answer Health with an Error frame).
pub fn probe_daemon(socket: &std::path::Path, source: &str, timeout: Duration) -> Result<(Session, Value)> {
    let unreachable = |e: &dyn std::fmt::Display| {
        Error::new(
            Code::DaemonUnreachable,
            format!(
                "cannot reach the Pilot daemon at {} ({source}): {e}",
                socket.display()
            ),
        )
        .hint("start the Pilot daemon, or point to its socket with --socket PATH (or PILOT_SOCKET)")
    };
    let mut s = Session::connect(socket).map_err(|e| unreachable(&e))?;
    s.set_timeout(Some(timeout)).map_err(|e| unreachable(&e))?;
    let answer = match s.health() {
        Ok(v) => Ok(v),
        Err(IpcError::Daemon(_)) | Err(IpcError::Unexpected { .. }) => s.info(),
        Err(e) => Err(e),
    };
    match answer {
        Ok(v) => Ok((s, v)),
        Err(e) if e.is_closed() => Err(Error::new(
            Code::PermissionDenied,
            format!(
                "the Pilot daemon at {} ({source}) closed the session without answering: newer daemons accept only clients running as their own user{}",
                socket.display(),
                socket_owner_note(socket)
            ),
        )
        .hint("run the gateway as the daemon's user (as root it switches automatically unless --no-user-switch; or pass --user NAME)")),
        Err(e) if e.is_timeout() => Err(Error::new(
            Code::Timeout,
            format!("the Pilot daemon at {} ({source}) did not answer within {timeout:?}", socket.display()),
        )
        .hint("check that the daemon is healthy")),
        Err(e) => Err(unreachable(&e)),
    }
}

fn socket_owner_note(socket: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(socket) {
        Ok(m) => {
            let owner = crate::sys::user_by_uid(m.uid()).map_or(format!("uid {}", m.uid()), |u| u.name);
            format!(
                " (the socket belongs to {owner}; we run as uid {})",
                crate::sys::euid()
            )
        }
        Err(_) => String::new(),
    }
}

/// Checks `targets` against the daemon's trusted peers; one warning per
/// untrusted address, or one saying the list could not be read.
pub fn trust_warnings(session: &mut Session, addrs: &[PilotAddr]) -> Vec<String> {
    match session.trusted_peers() {
        Ok(trusted) => addrs
            .iter()
            .filter(|a| !trusted.contains(a))
            .map(|a| {
                format!(
                    "{a} is not a trusted peer of this node; connections to it will fail until trust is established (pilotctl handshake {a})"
                )
            })
            .collect(),
        Err(e) => vec![format!("could not check trust with the daemon: {e}")],
    }
}

/// Resolves a target name: a strict pilot address, or a hostname looked up
/// through the daemon.
pub fn resolve_target(session: Option<&mut Session>, name: &str) -> Result<(PilotAddr, Option<String>)> {
    let addr = if PilotAddr::looks_like_address(name) {
        name.parse::<PilotAddr>().map_err(|e| {
            Error::invalid(e.to_string())
                .hint("pilot addresses look like 0:0000.0000.0004 (see: pilotctl info)")
        })?
    } else {
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_');
        if !valid {
            return Err(
                Error::invalid(format!("{name:?} is neither a pilot address nor a hostname"))
                    .hint("pilot addresses look like 0:0000.0000.0004; hostnames like lab-b"),
            );
        }
        let session = session.ok_or_else(|| Error::internal("no daemon session to resolve hostnames"))?;
        let addr = session.resolve(name).map_err(|e| match e {
            IpcError::Daemon(msg) => {
                Error::new(Code::NotFound, format!("cannot resolve hostname {name:?}: {msg}"))
                    .hint("check the name with: pilotctl find NAME")
            }
            e => Error::new(
                Code::DaemonUnreachable,
                format!("cannot resolve hostname {name:?}: {e}"),
            ),
        })?;
        return check_mappable(addr).map(|a| (a, Some(name.to_string())));
    };
    check_mappable(addr).map(|a| (a, None))
}

fn check_mappable(addr: PilotAddr) -> Result<PilotAddr> {
    if addr.is_broadcast() {
        return Err(
            Error::invalid(format!("{addr} is a broadcast address; map a single node"))
                .hint("broadcast addresses carry no TCP streams"),
        );
    }
    if addr.is_zero() {
        return Err(Error::invalid(format!(
            "{addr} is the zero address, which names no node"
        )));
    }
    Ok(addr)
}

/// Runs the gateway until SIGTERM/SIGINT. `ready` is called once every
/// alias and listener is up; errors before that are returned, with
/// everything undone.
pub fn run(cfg: Config, targets: Vec<Target>, ready: &mut dyn FnMut(&Report)) -> Result<()> {
    // First, so that a SIGHUP from a fast `map` never hits the default action.
    let signals = Signals::install(&[
        libc::SIGHUP,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ])
    .map_err(|e| Error::internal(format!("cannot install signal handlers: {e}")))?;
    let mut dir = Dir::open(&cfg.state_dir, true)?;
    let mut switched = None;
    if let Some(user) = crate::privilege::target_user(cfg.user.as_deref(), cfg.no_user_switch, &cfg.socket)? {
        dir.chown(user.uid, user.gid)?;
        switched = Some(crate::privilege::switch_to(&user)?);
        info!(
            "running as {} with capabilities {}",
            user.name,
            crate::privilege::KEPT.join(",")
        );
    }
    let lock = dir.lock()?;
    let mut cleaned = Vec::new();
    let aliases = Aliases::default();
    match dir.read()? {
        Some(prev) if prev.gateway.is_alive() => {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("a gateway is already running (pid {})", prev.gateway.pid),
            )
            .hint("stop it first: pilot-gateway stop"))
        }
        Some(prev) => {
            // A gateway that died without cleaning up: remove its aliases.
            for m in prev.mappings.iter().filter(|m| m.alias_added) {
                match aliases.remove(m.local_ip) {
                    Ok(()) => cleaned.push(m.local_ip.to_string()),
                    Err(e) => warn!("could not remove leftover alias {}: {e}", m.local_ip),
                }
            }
            info!(
                "cleaned up after gateway pid {} that exited without cleanup (aliases removed: {})",
                prev.gateway.pid,
                if cleaned.is_empty() {
                    "none".to_string()
                } else {
                    cleaned.join(", ")
                }
            );
            dir.remove("state.json");
            dir.remove("stats.json");
        }
        None => {}
    }

    let (mut session, _) = probe_daemon(
        &cfg.socket,
        &cfg.socket_source,
        cfg.dial_timeout.max(Duration::from_secs(2)),
    )?;

    // Resolve and allocate everything before touching the system.
    let mut mappings: Vec<Mapping> = Vec::new();
    let mut used = BTreeSet::new();
    for t in targets.iter().filter(|t| t.ip.is_some()) {
        let ip = t.ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        if !subnet::is_assignable(cfg.subnet, ip) {
            subnet::parse_local_ip(&ip.to_string(), cfg.subnet)?;
        }
        if !used.insert(ip) {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("local IP {ip} is given twice"),
            ));
        }
    }
    for t in &targets {
        let (addr, hostname) = resolve_target(Some(&mut session), &t.name)?;
        if let Some(m) = mappings.iter().find(|m| m.pilot_addr == addr) {
            if t.ip.is_some_and(|ip| ip != m.local_ip) {
                return Err(Error::new(
                    Code::AlreadyExists,
                    format!("{addr} is given twice with different local IPs"),
                ));
            }
            continue; // the same address twice maps once
        }
        let local_ip = match t.ip {
            Some(ip) => ip,
            None => {
                let ip = subnet::next_free(cfg.subnet, &used)?;
                used.insert(ip);
                ip
            }
        };
        mappings.push(Mapping {
            local_ip,
            pilot_addr: addr,
            hostname,
            alias_added: false,
            generation: 0,
        });
    }
    let addrs: Vec<PilotAddr> = mappings.iter().map(|m| m.pilot_addr).collect();
    let mut warnings = if addrs.is_empty() {
        Vec::new()
    } else {
        trust_warnings(&mut session, &addrs)
    };
    drop(session);
    if needs_alias(cfg.subnet) {
        subnet::check_no_overlap(cfg.subnet)?;
    }
    for w in &warnings {
        warn!("{w}");
    }
    let access = match &cfg.access_log {
        Some((path, format)) => Some(crate::access::AccessLog::open(path, *format).map_err(|e| {
            Error::io(format!("cannot open access log {path}"), &e).hint("check the path and its permissions")
        })?),
        None => None,
    };

    let me = ProcId::current();
    let limits = Limits {
        socket: cfg.socket.clone(),
        max_conns: cfg.max_conns,
        dial_timeout: cfg.dial_timeout,
        idle_timeout: cfg.idle_timeout,
    };
    let mut gw = Gateway {
        me,
        dir,
        socket: cfg.socket.clone(),
        subnet: cfg.subnet,
        ports: cfg.ports.clone(),
        hub: Hub::new(limits, access),
        aliases,
        live: BTreeMap::new(),
        started: Instant::now(),
        stats_seq: 0,
    };
    let mut st = State {
        gateway: me,
        started_at: state::now_unix(),
        socket: cfg.socket.clone(),
        subnet: cfg.subnet,
        ports: cfg.ports.clone(),
        max_conns: cfg.max_conns,
        user: switched
            .as_ref()
            .map(|s: &crate::privilege::Switched| s.user.clone()),
        generation: 0,
        applied: 0,
        mappings,
        failures: Vec::new(),
    };
    // Record which aliases we are about to add *before* adding them, so a
    // gateway killed half-way leaves enough behind for the next start to
    // clean up.
    gw.plan_aliases(&mut st.mappings);
    gw.dir.write(&st)?;
    for i in 0..st.mappings.len() {
        let m = st.mappings[i].clone();
        if let Err(e) = gw.bring_up(&m) {
            gw.shutdown();
            gw.dir.remove("state.json");
            return Err(e);
        }
        st.mappings[i].alias_added = gw.live.get(&m.local_ip).is_some_and(|l| l.alias_ours);
    }
    if let Err(e) = gw.dir.write(&st) {
        gw.shutdown();
        gw.dir.remove("state.json");
        return Err(e);
    }
    drop(lock);

    for m in &st.mappings {
        info!("mapped {} → {}", m.local_ip, m.pilot_addr);
    }
    info!(
        "gateway running (pid {}): subnet {}, ports {}, daemon {} ({})",
        me.pid,
        cfg.subnet,
        subnet::format_ports(&cfg.ports),
        cfg.socket.display(),
        cfg.socket_source
    );
    if st.mappings.is_empty() {
        warnings.push("no mappings yet: add them with `pilot-gateway map ADDR`".into());
    }
    ready(&Report {
        pid: me.pid,
        subnet: cfg.subnet,
        ports: cfg.ports,
        mappings: st.mappings.clone(),
        warnings,
        cleaned,
        user: switched.as_ref().map(|s| s.user.clone()),
        capabilities: switched.map(|s| s.capabilities).unwrap_or_default(),
        socket: cfg.socket,
    });

    let (mut trimmed_at, mut last_seen) = (0, 0);
    loop {
        // Once a burst of connections is over (no connection ended for a
        // whole wait), give the memory they freed back to the system.
        let finished = gw.hub.finished.load(Relaxed);
        if finished == last_seen && finished - trimmed_at >= 256 {
            crate::bridge::release_memory();
            trimmed_at = finished;
        }
        last_seen = finished;
        for sig in signals.wait(Duration::from_secs(5)) {
            match sig {
                libc::SIGHUP => gw.apply(),
                libc::SIGUSR2 => gw.write_stats(),
                libc::SIGUSR1 => {
                    if let Some(a) = &gw.hub.access {
                        a.reopen();
                    }
                }
                libc::SIGTERM | libc::SIGINT => {
                    info!("stopping (signal {sig})");
                    let _lock = gw.dir.lock();
                    gw.shutdown();
                    gw.dir.remove("state.json");
                    gw.dir.remove("stats.json");
                    info!("stopped");
                    return Ok(());
                }
                _ => {}
            }
        }
    }
}

impl Gateway {
    /// Marks which of `mappings` will get an alias from us: those whose IP
    /// is not configured yet.
    fn plan_aliases(&self, mappings: &mut [Mapping]) {
        let alias = needs_alias(self.subnet);
        for m in mappings
            .iter_mut()
            .filter(|m| !self.live.contains_key(&m.local_ip))
        {
            m.alias_added = alias && !subnet::is_local_address(m.local_ip).unwrap_or(false);
        }
    }

    /// Adds the alias (if needed) and binds every port on `m.local_ip`.
    /// On failure nothing of this mapping is left.
    fn bring_up(&mut self, m: &Mapping) -> Result<()> {
        let ip = m.local_ip;
        let alias_ours = if needs_alias(self.subnet) {
            // `plan_aliases` set alias_added exactly when the IP was not
            // configured yet; otherwise it exists and is not ours.
            self.aliases.add(ip, !m.alias_added)?
        } else {
            false
        };
        let table = Arc::new(Table::default());
        let mut listeners = Vec::with_capacity(self.ports.len());
        for &port in &self.ports {
            match Listener::start(ip, port, m.pilot_addr, self.hub.clone(), table.clone()) {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    drop(listeners); // stops the ones already listening
                    if alias_ours {
                        let _ = self.aliases.remove(ip);
                    }
                    return Err(bind_error(ip, port, &e));
                }
            }
        }
        self.live.insert(
            ip,
            Live {
                addr: m.pilot_addr,
                alias_ours,
                listeners,
                table,
            },
        );
        Ok(())
    }

    /// Stops a mapping: listeners, live connections, then our alias.
    fn tear_down(&mut self, ip: Ipv4Addr) {
        let Some(mut live) = self.live.remove(&ip) else {
            return;
        };
        for l in &mut live.listeners {
            l.stop();
        }
        live.table.close_all(Duration::from_secs(5));
        if live.alias_ours {
            if let Err(e) = self.aliases.remove(ip) {
                error!("{e}");
            }
        }
        info!("unmapped {ip} → {}", live.addr);
    }

    fn shutdown(&mut self) {
        let ips: Vec<Ipv4Addr> = self.live.keys().copied().collect();
        // Stop accepting everywhere first, then close connections.
        for live in self.live.values_mut() {
            for l in &mut live.listeners {
                l.stop();
            }
        }
        for ip in ips {
            self.tear_down(ip);
        }
    }

    /// Applies state.json to the running set (SIGHUP).
    fn apply(&mut self) {
        let Ok(_lock) = self.dir.lock().map_err(|e| error!("cannot apply changes: {e}")) else {
            return;
        };
        let mut st = match self.dir.read() {
            Ok(Some(st)) if st.gateway == self.me => st,
            Ok(_) => {
                error!(
                    "state file no longer names this gateway (pid {}); ignoring SIGHUP",
                    self.me.pid
                );
                return;
            }
            Err(e) => {
                error!("cannot apply changes: {e}");
                return;
            }
        };
        let wanted: BTreeSet<Ipv4Addr> = st.mappings.iter().map(|m| m.local_ip).collect();
        let gone: Vec<Ipv4Addr> = self
            .live
            .keys()
            .filter(|ip| !wanted.contains(ip))
            .copied()
            .collect();
        for ip in gone {
            self.tear_down(ip);
        }
        // Also re-map an IP whose address changed (unmap + map in one go).
        let changed: Vec<Ipv4Addr> = st
            .mappings
            .iter()
            .filter(|m| self.live.get(&m.local_ip).is_some_and(|l| l.addr != m.pilot_addr))
            .map(|m| m.local_ip)
            .collect();
        for ip in changed {
            self.tear_down(ip);
        }
        let before = st.mappings.clone();
        self.plan_aliases(&mut st.mappings);
        if st.mappings != before {
            if let Err(e) = self.dir.write(&st) {
                error!("cannot apply changes: {e}");
                return;
            }
        }
        let mut failed = Vec::new();
        for m in st.mappings.iter_mut() {
            if self.live.contains_key(&m.local_ip) {
                continue;
            }
            let m2 = m.clone();
            match self.bring_up(&m2) {
                Ok(()) => {
                    m.alias_added = self.live.get(&m.local_ip).is_some_and(|l| l.alias_ours);
                    info!("mapped {} → {}", m.local_ip, m.pilot_addr);
                }
                Err(e) => {
                    warn!("cannot map {} → {}: {e}", m.local_ip, m.pilot_addr);
                    failed.push((m.local_ip, m.generation, e));
                }
            }
        }
        for (ip, generation, e) in failed {
            st.mappings.retain(|m| m.local_ip != ip);
            st.record_failure(generation, e);
        }
        st.applied = st.generation;
        if let Err(e) = self.dir.write(&st) {
            error!("cannot record applied changes: {e}");
        }
    }

    /// Writes live counters to stats.json (SIGUSR2).
    fn write_stats(&mut self) {
        self.stats_seq += 1;
        let mut totals = crate::bridge::Counters::default();
        let mappings: Vec<Value> = self
            .live
            .iter()
            .map(|(ip, l)| {
                let c = l.table.counters();
                totals.active += c.active;
                totals.total += c.total;
                totals.bytes_up += c.bytes_up;
                totals.bytes_down += c.bytes_down;
                totals.dial_failures += c.dial_failures;
                totals.idle_timeouts += c.idle_timeouts;
                Value::obj([
                    ("local_ip", Value::from(ip.to_string())),
                    ("pilot_addr", l.addr.to_string().into()),
                    ("active", c.active.into()),
                    ("total", c.total.into()),
                    ("bytes_up", c.bytes_up.into()),
                    ("bytes_down", c.bytes_down.into()),
                    ("dial_failures", c.dial_failures.into()),
                    ("idle_timeouts", c.idle_timeouts.into()),
                ])
            })
            .collect();
        let daemon = match probe_daemon(&self.socket, "from the state file", Duration::from_secs(1)) {
            Ok((_, v)) => Value::obj([("reachable", Value::from(true)), ("reply", v)]),
            Err(e) => Value::obj([("reachable", Value::from(false)), ("error", e.message.into())]),
        };
        let v = Value::obj([
            ("seq", Value::from(self.stats_seq)),
            ("pid", self.me.pid.into()),
            ("uptime_secs", self.started.elapsed().as_secs().into()),
            ("active", totals.active.into()),
            ("total", totals.total.into()),
            ("bytes_up", totals.bytes_up.into()),
            ("bytes_down", totals.bytes_down.into()),
            ("dial_failures", totals.dial_failures.into()),
            ("idle_timeouts", totals.idle_timeouts.into()),
            ("refused", self.hub.refused.load(Relaxed).into()),
            ("max_conns", self.hub.limits.max_conns.into()),
            (
                "access_log_dropped",
                self.hub
                    .access
                    .as_ref()
                    .map_or(0, |a| a.dropped.load(Relaxed))
                    .into(),
            ),
            ("daemon", daemon),
            ("mappings", Value::Arr(mappings)),
        ]);
        if let Err(e) = self.dir.write_atomic("stats.json", &format!("{v}\n")) {
            error!("cannot write counters: {e}");
        }
    }
}

/// Explains a bind failure in the user's terms.
fn bind_error(ip: Ipv4Addr, port: u16, e: &std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => Error::new(
            Code::AddressInUse,
            format!("cannot listen on {ip}:{port}: the port is already in use"),
        )
        .hint("stop whatever listens there, or choose other --ports"),
        std::io::ErrorKind::PermissionDenied => Error::new(
            Code::PermissionDenied,
            format!("cannot listen on {ip}:{port}: ports below 1024 need root or CAP_NET_BIND_SERVICE"),
        )
        .hint("run as root, or use --ports with ports of 1024 and above"),
        std::io::ErrorKind::AddrNotAvailable => Error::new(
            Code::Internal,
            format!("cannot listen on {ip}:{port}: {ip} is not configured on this host"),
        )
        .hint("the loopback alias is missing; check `ip addr show lo`"),
        _ => Error::new(Code::Internal, format!("cannot listen on {ip}:{port}: {e}")),
    }
}
