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
//!
//! Each mapping that is up is a `RunningMapping`: its listeners
//! (`listener.rs`) and its connections (`relay.rs`); each exposure a
//! `RunningExposure` (the engine in `expose.rs`). SIGUSR2 writes the
//! counters of both as one `stats::Stats`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;

use crate::access::AccessLog;
use crate::address::PilotAddr;
use crate::alias::{self, Aliases};
use crate::cli::{Expose, Target};
use crate::daemon;
use crate::error::{Code, Error, Result};
use crate::expose::{self, Exposure};
use crate::ipc::Peer;
use crate::json::Value;
use crate::listener::{self, Listener};
use crate::privilege::{self, Switched};
use crate::relay::{ConnSettings, Connections, DataPath};
use crate::state::{self, Entry, Exposed, Mapping, State, StateDir};
use crate::stats::{Counters, ExposureStats, MappingStats, Stats};
use crate::subnet::{self, needs_alias};
use crate::sys::{self, proc::ProcId, signal::Signals};
use crate::{error, info, warn};

/// Everything `start` needs, validated.
pub struct Config {
    /// The daemon's IPC socket.
    pub socket: PathBuf,
    /// Where the socket path came from (for error messages).
    pub socket_source: String,
    /// Whether the default search found the socket (see
    /// `privilege::target_user`: such a socket is trusted less).
    pub socket_searched: bool,
    pub state_dir: PathBuf,
    pub subnet: Ipv4Network,
    pub ports: Vec<u16>,
    pub max_conns: usize,
    pub dial_timeout: Duration,
    pub idle_timeout: Duration,
    pub half_closed_timeout: Duration,
    /// `--access-log PATH` (`-` for stderr) and its format; opened after
    /// any user switch, so rotation reopens work as the same user.
    pub access_log: Option<(String, crate::log::Format)>,
    /// `--user NAME`: run as this user (from root).
    pub user: Option<String>,
    /// `--no-user-switch`: stay root even if the daemon is another user's.
    pub no_user_switch: bool,
    /// `--allow-remote`: serve clients from other hosts too.
    pub allow_remote: bool,
    /// `--expose`: local services to serve on pilot ports (targets checked;
    /// `--allow` hostnames are resolved at start-up, through the daemon).
    pub exposures: Vec<Expose>,
}

/// What `start` reports once everything is up (`output.rs` renders it).
pub struct Report {
    pub pid: u32,
    pub subnet: Ipv4Network,
    pub ports: Vec<u16>,
    pub mappings: Vec<Mapping>,
    pub exposures: Vec<Exposed>,
    pub warnings: Vec<String>,
    /// Leftover aliases of a dead gateway that were removed.
    pub cleaned: Vec<String>,
    pub user: Option<String>,
    pub capabilities: Vec<String>,
    pub socket: PathBuf,
}

/// A mapping that is up: its listeners and its connections.
struct RunningMapping {
    addr: PilotAddr,
    /// Whether we added the alias (and so remove it).
    alias_ours: bool,
    listeners: Vec<Listener>,
    conns: Arc<Connections>,
}

/// An exposure that runs: what the state file asked for, its engine, and
/// the connection slot its daemon session holds.
struct RunningExposure {
    spec: Exposed,
    engine: Exposure,
    _session: SessionSlot,
}

/// `--max-conns` is one budget of descriptors, 2 per slot: a forwarded
/// connection (client and its daemon session) and an exposed one (its
/// local socket) take a slot each from the same counter, and so does each
/// exposure's own daemon session (its socket and the writer's duplicate),
/// for as long as the exposure runs. Forwarded and exposed connections
/// together therefore never need more descriptors than the fit allows.
struct SharedSlots(Arc<DataPath>);

impl expose::Slots for SharedSlots {
    fn try_acquire(&self) -> bool {
        let ok = self.0.try_acquire();
        if !ok {
            self.0.refused.fetch_add(1, Relaxed);
        }
        ok
    }

    fn release(&self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// The slot of an exposure's daemon session; given back when dropped.
struct SessionSlot(Arc<DataPath>);

impl SessionSlot {
    fn take(dp: &Arc<DataPath>, port: u16) -> Result<SessionSlot> {
        if dp.try_acquire() {
            return Ok(SessionSlot(dp.clone()));
        }
        Err(Error::new(
            Code::ConnectionFailed,
            format!(
                "no connection slot for the daemon session of pilot port {port}: all {} are in use",
                dp.settings.max_conns
            ),
        )
        .hint("each exposure's session takes one --max-conns slot: raise --max-conns (and the open-file limit), or wait for connections to end"))
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// How long stopping an exposure waits for its connections to end.
const EXPOSE_STOP_WAIT: Duration = Duration::from_secs(5);
/// How long a restarted exposure retries a Bind the daemon still holds for
/// the session just closed (a daemon without Unbind frees the port once
/// it notices; with Unbind it is free before the stop returns).
const REBIND_WAIT: Duration = Duration::from_secs(3);
/// Bound on every exposure start-up (connect, Bind, its answer, retries)
/// of one SIGHUP apply together: it runs under the state lock, and the
/// commands that wait for it give up after 10 s, so a stalled daemon must
/// cost it well under that (and SIGTERM waits for the apply to end).
const APPLY_BIND_BUDGET: Duration = Duration::from_secs(4);
/// Bound on each exposure's Bind at start-up.
const START_BIND_WAIT: Duration = Duration::from_secs(10);

/// The running process: what runs, and what it needs to change it.
struct Gateway {
    me: ProcId,
    dir: StateDir,
    subnet: Ipv4Network,
    ports: Vec<u16>,
    data_path: Arc<DataPath>,
    aliases: Aliases,
    running: BTreeMap<Ipv4Addr, RunningMapping>,
    exposed: BTreeMap<u16, RunningExposure>,
    started: Instant,
    stats_seq: u64,
    /// `--max-conns` as asked (the data path holds the cap in force).
    max_conns_requested: usize,
    /// Checks the daemon off the main thread; `None` until it runs.
    health: Option<Arc<daemon::Health>>,
    /// Descriptors left for listeners (see [`fit_max_conns`]).
    listener_room: u64,
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
    let (dir, switched, daemon) = open_state_dir_as_user(&cfg)?;
    let lock = dir.lock()?;
    let aliases = Aliases::labelled(alias::label_for(dir.identity()?));
    let cleaned = clean_up_after_dead_gateway(&dir, &aliases, cfg.subnet)?;
    let (mappings, mut warnings) = plan_mappings(&cfg, &targets, daemon.uid)?;
    let exposures = plan_exposures(&cfg, daemon.uid)?;
    if needs_alias(cfg.subnet) {
        subnet::check_no_overlap(cfg.subnet)?;
    }
    for w in &warnings {
        warn!("{w}");
    }
    let access = open_access_log(&cfg)?;
    let (max_conns, listener_room) = fit_max_conns(&cfg, mappings.len(), &mut warnings);
    listener::open_reserve();
    let mut gw = Gateway {
        me: ProcId::current(),
        dir,
        subnet: cfg.subnet,
        ports: cfg.ports.clone(),
        data_path: DataPath::new(conn_settings(&cfg, max_conns, daemon.uid), access),
        aliases,
        running: BTreeMap::new(),
        exposed: BTreeMap::new(),
        started: Instant::now(),
        stats_seq: 0,
        max_conns_requested: cfg.max_conns,
        health: None,
        listener_room,
    };
    let st = gw.start_up(&cfg, (mappings, exposures), switched.as_ref())?;
    drop(lock);
    gw.health = daemon::Health::start(cfg.socket.clone(), daemon.uid)
        .map_err(|e| warn!("cannot start the daemon health thread: {e}"))
        .ok();
    for m in &st.mappings {
        info!("mapped {} → {}", m.local_ip, m.pilot_addr);
    }
    info!(
        "gateway running (pid {}): subnet {}, ports {}, daemon {} ({}, uid {})",
        gw.me.pid,
        cfg.subnet,
        subnet::format_ports(&cfg.ports),
        cfg.socket.display(),
        cfg.socket_source,
        daemon.uid
    );
    if st.mappings.is_empty() && st.exposures.is_empty() {
        warnings.push("no mappings yet: add them with `pilot-gateway map ADDR`".into());
    }
    ready(&Report {
        pid: gw.me.pid,
        subnet: cfg.subnet,
        ports: cfg.ports,
        mappings: st.mappings,
        exposures: st.exposures,
        warnings,
        cleaned,
        user: switched.as_ref().map(|s| s.user.clone()),
        capabilities: switched.map(|s| s.capabilities).unwrap_or_default(),
        socket: cfg.socket,
    });
    gw.serve(&signals);
    Ok(())
}

/// Learns who serves the daemon socket (its peer credentials, as we are
/// now: root before any switch), decides whom the gateway runs as, and
/// opens (creating) the state directory. Used by the gateway and by the
/// `start` that spawns it, so both refuse the same things before touching
/// anything: a daemon that is not one we may use (`privilege::target_user`),
/// and for a root start a directory owned by a user who is neither root
/// nor the gateway's user (that user's gateway, or a directory planted
/// for us).
pub fn prepare_state_dir(cfg: &Config) -> Result<(StateDir, Option<sys::user::User>, Peer)> {
    let daemon = daemon::identify(&cfg.socket, &cfg.socket_source, connect_budget(cfg))?;
    let user = privilege::target_user(
        cfg.user.as_deref(),
        cfg.no_user_switch,
        &cfg.socket,
        cfg.socket_searched,
        daemon,
    )?;
    let dir = StateDir::open(&cfg.state_dir, true)?;
    let owner = dir.owner().0;
    if owner != sys::user::euid() && owner != 0 && user.as_ref().map(|u| u.uid) != Some(owner) {
        let who = sys::user::user_by_uid(owner).map_or_else(|| format!("uid {owner}"), |u| u.name);
        return Err(Error::new(
            Code::PermissionDenied,
            format!(
                "state directory {} belongs to {who}, who is not the user this gateway would run as",
                cfg.state_dir.display()
            ),
        )
        .hint(format!(
            "stop that user's gateway, or remove {} (after checking what is in it), or pass --state-dir DIR",
            cfg.state_dir.display()
        )));
    }
    Ok((dir, user, daemon))
}

/// The budget of a start's exchanges with the daemon.
fn connect_budget(cfg: &Config) -> Duration {
    cfg.dial_timeout.max(Duration::from_secs(2))
}

/// Opens the state directory and, when we should run as another user,
/// gives it to that user and switches. No thread exists yet, which the
/// switch needs (capabilities are per thread).
fn open_state_dir_as_user(cfg: &Config) -> Result<(StateDir, Option<Switched>, Peer)> {
    let (mut dir, user, daemon) = prepare_state_dir(cfg)?;
    let Some(user) = user else {
        return Ok((dir, None, daemon));
    };
    dir.chown(user.uid, user.gid)?;
    let switched = privilege::switch_to(&user)?;
    info!(
        "running as {} with capabilities {}",
        user.name,
        privilege::KEPT.join(",")
    );
    Ok((dir, Some(switched), daemon))
}

/// Refuses to start beside a live gateway; after a dead one, removes the
/// aliases it recorded — only where it is safe (see `stale_alias_ok`) —
/// and its files. Returns the aliases removed. Runs after the switch to
/// the gateway's user, with only its two capabilities.
fn clean_up_after_dead_gateway(
    dir: &StateDir,
    aliases: &Aliases,
    subnet: Ipv4Network,
) -> Result<Vec<String>> {
    let Some(prev) = dir.read()? else {
        return Ok(Vec::new());
    };
    if prev.gateway.is_alive() {
        return Err(Error::new(
            Code::AlreadyExists,
            format!("a gateway is already running (pid {})", prev.gateway.pid),
        )
        .hint("stop it first: pilot-gateway stop"));
    }
    let invalid: BTreeSet<Ipv4Addr> = prev
        .validate(prev.subnet)
        .iter()
        .filter_map(|b| match b.entry {
            Entry::Mapping { local_ip, .. } => Some(local_ip),
            Entry::Exposure { .. } => None,
        })
        .collect();
    let mut cleaned = Vec::new();
    for m in prev.mappings.iter().filter(|m| m.alias_added) {
        if !subnet::is_local_address(m.local_ip).unwrap_or(true) {
            continue; // already gone
        }
        let label = if invalid.contains(&m.local_ip) {
            Err(format!(
                "it is not valid in the old state's subnet {}",
                prev.subnet
            ))
        } else {
            stale_alias_label(subnet, m.local_ip, &aliases.label)
        };
        let label = match label {
            Ok(label) => label,
            Err(why) => {
                warn!(
                    "left address {} alone: the old state file says the gateway added it, but {why}",
                    m.local_ip
                );
                continue;
            }
        };
        match aliases.remove_labelled(m.local_ip, &label) {
            Ok(()) => cleaned.push(m.local_ip.to_string()),
            Err(e) => warn!("could not remove leftover alias {}: {e}", m.local_ip),
        }
    }
    let removed = if cleaned.is_empty() {
        "none".to_string()
    } else {
        cleaned.join(", ")
    };
    info!(
        "cleaned up after gateway pid {} that exited without cleanup (aliases removed: {removed})",
        prev.gateway.pid
    );
    dir.remove("state.json");
    dir.remove("stats.json");
    Ok(cleaned)
}

/// Whether a dead gateway's recorded alias may be removed, and the label
/// to remove it with (`Err`: why not). The old state file was writable by
/// the gateway's user, so nothing in it is taken on its word (its subnet
/// least of all): the IP must be assignable in the *new* start's own
/// subnet (which the operator chose), outside 127.0.0.0/8, and sit on a
/// loopback interface as a /32. On Linux it must also carry this state
/// directory's label (`alias::label_for`), which only our own `ip addr add`
/// sets — an administrator's address (no label) or another gateway's
/// (another directory's label) is never removed, and the removal names
/// the label, so the kernel checks it again — or the plain `lo:pgw` of an
/// older version. And no process may hold a TCP socket on it ([`in_use`]):
/// a live gateway listens there. macOS has no labels: there the subnet
/// rule alone applies.
fn stale_alias_label(new: Ipv4Network, ip: Ipv4Addr, ours: &str) -> std::result::Result<String, String> {
    use alias::Label;
    if !subnet::is_assignable(new, ip) || ip.is_loopback() {
        return Err(format!("it is not in this start's subnet {new}"));
    }
    let found = sys::net::interface_addresses()
        .map_err(|e| format!("the interface addresses cannot be listed ({e})"))?
        .into_iter()
        .find(|a| a.addr == ip && a.loopback && a.prefix == 32)
        .ok_or_else(|| "it is not a /32 alias on loopback".to_string())?;
    if !cfg!(target_os = "linux") {
        return Ok(String::new());
    }
    let label = found.interface;
    match Label::of(&label, ours) {
        Label::Ours => match in_use(ip) {
            // Only this directory's gateway adds this label, and it is dead
            // (we hold its lock): a kernel that cannot be asked does not
            // keep our own leftover.
            Some(Err(why)) => Err(why),
            _ => Ok(label),
        },
        Label::Legacy => match in_use(ip) {
            Some(Ok(())) => Ok(label),
            Some(Err(why)) => Err(why),
            None => Err(format!("it carries the {label} label of an older version (any gateway's), and whether a program uses it cannot be checked")),
        },
        Label::OtherGateway => Err(format!("it carries another gateway's label {label} (another state directory)")),
        Label::Foreign => Err(format!("it does not carry this gateway's label {ours}")),
    }
}

/// Whether no process holds a TCP socket on `ip` (`Some(Ok)`), some does
/// (`Some(Err)`, why), or the kernel cannot tell (`None`, logged).
fn in_use(ip: Ipv4Addr) -> Option<std::result::Result<(), String>> {
    match sys::sock_diag::tcp_sockets_on(ip) {
        Ok(0) => Some(Ok(())),
        Ok(n) => Some(Err(format!(
            "{n} TCP socket(s) are bound to it: another gateway or program is live there"
        ))),
        Err(e) => {
            warn!("cannot ask the kernel which sockets use {ip}: {e}");
            None
        }
    }
}

/// Refuses `ip` if it is on loopback with another gateway's label (another
/// state directory's, or the plain `lo:pgw` of an older version) and that
/// gateway is live: a process holds a TCP socket on it (its listeners), or
/// the kernel cannot tell. Sharing it would mix the two gateways, and the
/// other's `stop` would pull it from under this one. A labelled address
/// nobody uses was left by a gateway that died: it is used as before, not
/// ours (never removed by us), with a warning.
fn check_not_another_gateways(ip: Ipv4Addr, ours: &str) -> Result<()> {
    use alias::Label;
    if !cfg!(target_os = "linux") {
        return Ok(());
    }
    let addrs = sys::net::interface_addresses()
        .map_err(|e| Error::internal(format!("cannot list interface addresses: {e}")))?;
    let Some(other) = addrs.iter().find(|a| {
        a.addr == ip
            && a.loopback
            && matches!(Label::of(&a.interface, ours), Label::OtherGateway | Label::Legacy)
    }) else {
        return Ok(());
    };
    let label = &other.interface;
    let why = match sys::sock_diag::tcp_sockets_on(ip) {
        Ok(0) => {
            warn!("using {ip}, labelled {label} by a gateway that no longer runs (no socket on it): it is not this gateway's alias and stays after it stops (remove it with `ip addr del {ip}/32 dev lo label {label}`)");
            return Ok(());
        }
        Ok(n) => format!("{n} TCP socket(s) are open on it"),
        Err(e) => format!("whether it is in use cannot be checked ({e})"),
    };
    Err(Error::new(
        Code::AddressInUse,
        format!(
            "local IP {ip} belongs to another gateway: it is on loopback with that gateway's label {label} (this one's is {ours}), and {why}"
        ),
    )
    .hint("give this gateway a subnet no other gateway uses (--subnet, e.g. 10.5.0.0/16) or another local IP; `ip addr show label 'lo:pgw*'` lists every gateway's aliases"))
}

/// Asks the daemon about every target and allocates local IPs, before
/// anything on the system is touched. Returns the mappings and the trust
/// warnings.
fn plan_mappings(cfg: &Config, targets: &[Target], daemon_uid: u32) -> Result<(Vec<Mapping>, Vec<String>)> {
    let (mut session, _) = daemon::probe(
        &cfg.socket,
        &cfg.socket_source,
        connect_budget(cfg),
        Some(daemon_uid),
    )?;
    let mut used = BTreeSet::new();
    for ip in targets.iter().filter_map(|t| t.ip) {
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
    let mut mappings: Vec<Mapping> = Vec::new();
    for t in targets {
        let (addr, hostname) = daemon::resolve_target(Some(&mut session), &t.name)?;
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
    let warnings = if addrs.is_empty() {
        Vec::new()
    } else {
        daemon::trust_warnings(&mut session, &addrs)
    };
    Ok((mappings, warnings))
}

/// The `--expose` requests as state entries: `--allow` hostnames resolved
/// through the daemon now, before any thread exists.
fn plan_exposures(cfg: &Config, daemon_uid: u32) -> Result<Vec<Exposed>> {
    let mut out: Vec<Exposed> = Vec::new();
    for e in &cfg.exposures {
        if out.iter().any(|x| x.port == e.port) {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("pilot port {} is given twice in --expose", e.port),
            ));
        }
        let allow = match &e.allow {
            Some(peers) => Some(daemon::resolve_peers(&cfg.socket, peers, Some(daemon_uid))?),
            None => None,
        };
        out.push(Exposed {
            port: e.port,
            target: e.target,
            allow,
            allow_remote_target: e.allow_remote_target,
            generation: 0,
        });
    }
    Ok(out)
}

fn open_access_log(cfg: &Config) -> Result<Option<AccessLog>> {
    let Some((path, format)) = &cfg.access_log else {
        return Ok(None);
    };
    AccessLog::open(path, *format).map(Some).map_err(|e| {
        Error::io(format!("cannot open access log {path}"), &e).hint("check the path and its permissions")
    })
}

fn conn_settings(cfg: &Config, max_conns: usize, daemon_uid: u32) -> ConnSettings {
    ConnSettings {
        daemon_socket: cfg.socket.clone(),
        daemon_uid,
        max_conns,
        dial_timeout: cfg.dial_timeout,
        idle_timeout: cfg.idle_timeout,
        half_closed_timeout: cfg.half_closed_timeout,
        allow_remote: cfg.allow_remote,
    }
}

/// Descriptors kept apart from connections: standard streams, the signal
/// pipe, the lock, state and counters files being written, the access log,
/// the reserve descriptor, a daemon health session, and slack. Listeners
/// come on top. This headroom is what keeps `stats.json` writable when
/// every connection slot is taken.
const FD_HEADROOM: u64 = 32;

/// Raises the descriptor limit as far as allowed and returns the
/// `--max-conns` that fits it (2 descriptors per slot: a forwarded
/// connection's client and daemon session, an exposed connection's local
/// socket, or an exposure's daemon session; see [`SharedSlots`]), with a
/// warning when that is lower than asked, and the descriptors left for
/// listeners (one each).
///
/// The rule for listeners: the cap is fitted around the listeners of the
/// mappings given at start; whatever the limit leaves beyond the cap and
/// the headroom is room for listeners, which every mapping brought up
/// later (`map`) must find, or it is refused (see
/// [`Gateway::check_listener_room`]). So a later `map` never eats the
/// descriptors of the slots or the headroom.
fn fit_max_conns(cfg: &Config, mappings: usize, warnings: &mut Vec<String>) -> (usize, u64) {
    let limit = match sys::proc::raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            warn!("cannot read the descriptor limit: {e}");
            return (cfg.max_conns, u64::MAX);
        }
    };
    let room = |conns: u64| limit.saturating_sub(FD_HEADROOM + 2 * conns);
    let listeners = (cfg.ports.len() * mappings.max(1)) as u64;
    let fit = (limit.saturating_sub(FD_HEADROOM + listeners) / 2).max(1);
    if fit >= cfg.max_conns as u64 {
        return (cfg.max_conns, room(cfg.max_conns as u64));
    }
    let w = format!(
        "--max-conns {} does not fit the limit of {limit} open files (2 per connection, forwarded or exposed, and per exposure, plus {} for listeners and files): serving at most {fit} at once; raise the limit (ulimit -n, or LimitNOFILE= in systemd) to serve more",
        cfg.max_conns,
        FD_HEADROOM + listeners
    );
    warn!("{w}");
    warnings.push(w);
    (fit as usize, room(fit))
}

impl Gateway {
    /// Records the first mappings and brings them up; on failure undoes
    /// everything and removes the state file.
    fn start_up(
        &mut self,
        cfg: &Config,
        (mappings, exposures): (Vec<Mapping>, Vec<Exposed>),
        switched: Option<&Switched>,
    ) -> Result<State> {
        let mut st = State {
            gateway: self.me,
            started_at: state::now_unix(),
            socket: cfg.socket.clone(),
            subnet: cfg.subnet,
            ports: cfg.ports.clone(),
            max_conns: cfg.max_conns,
            half_closed_timeout: Some(cfg.half_closed_timeout),
            user: switched.map(|s| s.user.clone()),
            daemon_uid: Some(self.data_path.settings.daemon_uid),
            generation: 0,
            applied: 0,
            mappings,
            exposures,
            failures: Vec::new(),
        };
        // Record which aliases we are about to add *before* adding them, so
        // a gateway killed half-way leaves enough behind for the next start
        // to clean up.
        self.plan_aliases(&mut st.mappings);
        self.dir.write(&st)?;
        let mut result = Ok(());
        for i in 0..st.mappings.len() {
            let m = st.mappings[i].clone();
            result = self.bring_up(&m);
            if result.is_err() {
                break;
            }
            st.mappings[i].alias_added = self.running.get(&m.local_ip).is_some_and(|r| r.alias_ours);
        }
        for e in &st.exposures {
            if result.is_ok() {
                let by = Instant::now() + START_BIND_WAIT;
                result = self.bring_up_exposure(e, Duration::ZERO, by);
            }
        }
        if let Err(e) = result.and_then(|()| self.dir.write(&st)) {
            self.shutdown();
            self.dir.remove("state.json");
            return Err(e);
        }
        Ok(st)
    }

    /// The main thread from here on: waits for signals and answers them,
    /// until SIGTERM/SIGINT has stopped everything.
    fn serve(&mut self, signals: &Signals) {
        let (mut trimmed_at, mut last_seen) = (0, 0);
        loop {
            // Once a burst of connections is over (no connection ended for
            // a whole wait), give the memory they freed back to the system.
            let finished = self.data_path.finished.load(Relaxed);
            if finished == last_seen && finished - trimmed_at >= 256 {
                sys::proc::release_memory();
                trimmed_at = finished;
            }
            last_seen = finished;
            for sig in signals.wait(Duration::from_secs(5)) {
                match sig {
                    libc::SIGHUP => self.apply(),
                    libc::SIGUSR2 => self.write_stats(),
                    libc::SIGUSR1 => {
                        if let Some(a) = &self.data_path.access {
                            a.reopen();
                        }
                    }
                    libc::SIGTERM | libc::SIGINT => {
                        info!("stopping (signal {sig})");
                        let drain = self.take_drain();
                        self.stop_listening(self.running.keys().copied().collect());
                        self.stop_admitting(&self.exposed.keys().copied().collect::<Vec<_>>());
                        self.drain(drain);
                        let _lock = self.dir.lock();
                        let cut = self.shutdown();
                        // For `stop`, which reports how many were cut.
                        let note = Value::obj([("pid", Value::from(self.me.pid)), ("cut", cut.into())]);
                        if let Err(e) = self.dir.write_atomic("stopped.json", &format!("{note}\n")) {
                            warn!("{e}");
                        }
                        self.dir.remove("state.json");
                        self.dir.remove("stats.json");
                        info!("stopped ({cut} live connections cut)");
                        return;
                    }
                    _ => {}
                }
            }
        }
    }

    /// Marks which of `mappings` will get an alias from us: those whose IP
    /// is not configured yet.
    fn plan_aliases(&self, mappings: &mut [Mapping]) {
        let alias = needs_alias(self.subnet);
        for m in mappings
            .iter_mut()
            .filter(|m| !self.running.contains_key(&m.local_ip))
        {
            m.alias_added = alias && !subnet::is_local_address(m.local_ip).unwrap_or(false);
        }
    }

    /// Refuses a mapping whose listeners (one descriptor per port) would
    /// not fit the room the descriptor limit leaves (see [`fit_max_conns`]).
    fn check_listener_room(&self, ip: Ipv4Addr) -> Result<()> {
        let listening: usize = self.running.values().map(|r| r.listeners.len()).sum();
        if (listening + self.ports.len()) as u64 <= self.listener_room {
            return Ok(());
        }
        Err(Error::new(
            Code::ConnectionFailed,
            format!(
                "cannot listen on {ip}: its {} listener(s) do not fit the open-file limit beside {listening} listening now, {} connection slots and the headroom",
                self.ports.len(),
                self.data_path.settings.max_conns
            ),
        )
        .hint("raise the open-file limit (ulimit -n, or LimitNOFILE= in systemd) and restart the gateway, or unmap another address first"))
    }

    /// Adds the alias (if needed) and binds every port on `m.local_ip`.
    /// On failure nothing of this mapping is left.
    fn bring_up(&mut self, m: &Mapping) -> Result<()> {
        let ip = m.local_ip;
        self.check_listener_room(ip)?;
        let alias_ours = if needs_alias(self.subnet) {
            check_not_another_gateways(ip, &self.aliases.label)?;
            // `plan_aliases` set alias_added exactly when the IP was not
            // configured yet; otherwise it exists and is not ours.
            self.aliases.add(ip, !m.alias_added)?
        } else {
            false
        };
        let conns = Arc::new(Connections::default());
        let mut listeners = Vec::with_capacity(self.ports.len());
        for &port in &self.ports {
            match Listener::start(ip, port, m.pilot_addr, self.data_path.clone(), conns.clone()) {
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
        self.running.insert(
            ip,
            RunningMapping {
                addr: m.pilot_addr,
                alias_ours,
                listeners,
                conns,
            },
        );
        Ok(())
    }

    /// Binds the exposure's pilot port and starts serving it, giving up by
    /// `by`. `retry`: how long to retry a port the daemon still holds (a
    /// restart).
    fn bring_up_exposure(&mut self, e: &Exposed, retry: Duration, by: Instant) -> Result<()> {
        let session = SessionSlot::take(&self.data_path, e.port)?;
        let dp = self.data_path.clone();
        let on_end: expose::OnEnd = Arc::new(move |end: &expose::Ended| {
            if let Some(a) = &dp.access {
                a.write_inbound(&crate::access::Inbound {
                    peer: end.peer,
                    peer_port: end.peer_port,
                    port: end.port,
                    target: end.target,
                    bytes_in: end.bytes_in,
                    bytes_out: end.bytes_out,
                    duration: end.duration,
                    outcome: end.outcome.label(),
                    reason: end.outcome.reason(),
                });
            }
        });
        let opts = expose::Options {
            allow: e.allow_set(),
            allow_remote_target: e.allow_remote_target,
            own_subnet: Some(self.subnet),
            daemon_uid: Some(self.data_path.settings.daemon_uid),
            slots: Some(Arc::new(SharedSlots(self.data_path.clone()))),
            on_end: Some(on_end),
            ..expose::Options::default()
        };
        let socket = &self.data_path.settings.daemon_socket;
        let deadline = (Instant::now() + retry).min(by);
        let engine = loop {
            let opts = expose::Options {
                bind_timeout: by.saturating_duration_since(Instant::now()),
                ..opts.clone()
            };
            match Exposure::start(socket, e.port, e.target, opts) {
                Err(err) if err.code == Code::PortInUse && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => break other?,
            }
        };
        self.exposed.insert(
            e.port,
            RunningExposure {
                spec: e.clone(),
                engine,
                _session: session,
            },
        );
        Ok(())
    }

    /// Stops serving `port`: the daemon frees it and its connections are
    /// reset. Returns how many live connections were cut.
    fn tear_down_exposure(&mut self, port: u16) -> usize {
        let Some(mut r) = self.exposed.remove(&port) else {
            return 0;
        };
        let cut = r.engine.counters().active as usize;
        r.engine.stop(EXPOSE_STOP_WAIT);
        info!(
            "stopped exposing pilot port {port} → {} ({cut} live connections cut)",
            r.spec.target
        );
        cut
    }

    /// Applies the exposures of `st`: stops those no longer wanted (or
    /// changed), starts the new ones, and fails the generation of each
    /// that cannot start (removing it from `st`). Returns how many live
    /// connections were cut.
    fn apply_exposures(&mut self, st: &mut State) -> usize {
        let stale: Vec<u16> = self
            .exposed
            .iter()
            .filter(|(port, r)| {
                st.find_exposure(**port)
                    .map_or(true, |e| !e.same_service(&r.spec))
            })
            .map(|(port, _)| *port)
            .collect();
        let mut cut = 0;
        for &port in &stale {
            cut += self.tear_down_exposure(port);
        }
        let mut failed = Vec::new();
        let by = Instant::now() + APPLY_BIND_BUDGET;
        for e in &st.exposures {
            if self.exposed.contains_key(&e.port) {
                continue;
            }
            let retry = if stale.contains(&e.port) {
                REBIND_WAIT
            } else {
                Duration::ZERO
            };
            if let Err(err) = self.bring_up_exposure(e, retry, by) {
                warn!("cannot expose pilot port {} → {}: {err}", e.port, e.target);
                failed.push((e.port, e.generation, err));
            }
        }
        for (port, generation, err) in failed {
            st.exposures.retain(|e| e.port != port);
            st.record_failure(generation, err);
        }
        cut
    }

    /// Stops a mapping: listeners, live connections, then our alias.
    /// Returns how many live connections were cut.
    fn tear_down(&mut self, ip: Ipv4Addr) -> usize {
        let Some(mut m) = self.running.remove(&ip) else {
            return 0;
        };
        for l in &mut m.listeners {
            l.stop();
        }
        let cut = m.conns.close_all(Duration::from_secs(5));
        if m.alias_ours {
            if let Err(e) = self.aliases.remove(ip) {
                error!("{e}");
            }
        }
        info!("unmapped {ip} → {} ({cut} live connections cut)", m.addr);
        cut
    }

    /// Stops accepting on the listeners of `ips`.
    fn stop_listening(&mut self, ips: Vec<Ipv4Addr>) {
        for (_, m) in self.running.iter_mut().filter(|(ip, _)| ips.contains(ip)) {
            for l in &mut m.listeners {
                l.stop();
            }
        }
    }

    /// Makes the exposures of `ports` refuse new connections (a drain).
    fn stop_admitting(&self, ports: &[u16]) {
        for (_, r) in self.exposed.iter().filter(|(p, _)| ports.contains(p)) {
            r.engine.stop_admitting();
        }
    }

    /// `--drain`: lets the live connections (of mappings whose listeners
    /// have stopped, and of exposures that no longer admit) finish for up
    /// to `wait` in all.
    fn drain(&self, wait: Duration) {
        if wait.is_zero() {
            return;
        }
        let deadline = Instant::now() + wait;
        for m in self
            .running
            .values()
            .filter(|m| m.listeners.iter().all(Listener::is_stopped))
        {
            m.conns.drain(deadline.saturating_duration_since(Instant::now()));
        }
        for r in self.exposed.values().filter(|r| !r.engine.is_admitting()) {
            r.engine.drain(deadline.saturating_duration_since(Instant::now()));
        }
    }

    /// The drain time `stop`/`unmap --drain` asked for (in the `drain`
    /// note they leave beside state.json before signalling), once.
    fn take_drain(&self) -> Duration {
        let secs = self
            .dir
            .read_note("drain")
            .and_then(|v| v.get("secs").and_then(Value::as_f64))
            .filter(|s| (0.0..=86_400.0).contains(s))
            .unwrap_or(0.0);
        self.dir.remove("drain");
        Duration::from_secs_f64(secs)
    }

    /// Stops everything; returns how many live connections were cut.
    fn shutdown(&mut self) -> usize {
        let ips: Vec<Ipv4Addr> = self.running.keys().copied().collect();
        // Stop accepting everywhere first, then close connections.
        self.stop_listening(ips.clone());
        let ports: Vec<u16> = self.exposed.keys().copied().collect();
        let exposed: usize = ports.into_iter().map(|p| self.tear_down_exposure(p)).sum();
        exposed + ips.into_iter().map(|ip| self.tear_down(ip)).sum::<usize>()
    }

    /// Tears down the mappings `st` no longer wants (after a drain, if
    /// `unmap --drain` asked for one) and those whose address changed (an
    /// unmap and a map in one go). Exposures `st` no longer wants are
    /// drained with them (`unexpose --drain`); `apply_exposures` then stops
    /// them. Returns how many connections were cut.
    fn retire(&mut self, st: &State) -> usize {
        let wanted: BTreeSet<Ipv4Addr> = st.mappings.iter().map(|m| m.local_ip).collect();
        let gone: Vec<Ipv4Addr> = self
            .running
            .keys()
            .filter(|ip| !wanted.contains(ip))
            .copied()
            .collect();
        let unexposed: Vec<u16> = self
            .exposed
            .keys()
            .filter(|p| st.find_exposure(**p).is_none())
            .copied()
            .collect();
        let drain = self.take_drain();
        self.stop_listening(gone.clone());
        self.stop_admitting(&unexposed);
        self.drain(drain);
        let changed = st.mappings.iter().filter(|m| {
            self.running
                .get(&m.local_ip)
                .is_some_and(|l| l.addr != m.pilot_addr)
        });
        let changed: Vec<Ipv4Addr> = changed.map(|m| m.local_ip).collect();
        gone.into_iter().chain(changed).map(|ip| self.tear_down(ip)).sum()
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
        self.drop_invalid(&mut st);
        let cut = self.retire(&st) + self.apply_exposures(&mut st);
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
            if self.running.contains_key(&m.local_ip) {
                continue;
            }
            let m2 = m.clone();
            match self.bring_up(&m2) {
                Ok(()) => {
                    m.alias_added = self.running.get(&m.local_ip).is_some_and(|l| l.alias_ours);
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
        // Whether an alias is ours is what we know, not what the file says.
        for m in st.mappings.iter_mut() {
            if let Some(r) = self.running.get(&m.local_ip) {
                m.alias_added = r.alias_ours;
            }
        }
        st.applied = st.generation;
        // For `unmap`, which reports how many were cut; written before the
        // state, whose `applied` is what the command waits for.
        let note = Value::obj([("generation", Value::from(st.generation)), ("cut", cut.into())]);
        if let Err(e) = self.dir.write_atomic("applied.json", &format!("{note}\n")) {
            warn!("{e}");
        }
        if let Err(e) = self.dir.write(&st) {
            error!("cannot record applied changes: {e}");
        }
    }

    /// The file is the user's to write: our own subnet, ports and daemon
    /// uid (from memory) stand, and mappings that fail validation are dropped before
    /// anything is touched, each failing its generation.
    fn drop_invalid(&self, st: &mut State) {
        st.subnet = self.subnet;
        st.ports = self.ports.clone();
        st.daemon_uid = Some(self.data_path.settings.daemon_uid);
        let invalid = st.validate(self.subnet);
        retain_by_index(&mut st.mappings, |index| {
            invalid
                .iter()
                .any(|b| matches!(b.entry, Entry::Mapping { index: i, .. } if i == index))
        });
        retain_by_index(&mut st.exposures, |index| {
            invalid
                .iter()
                .any(|b| matches!(b.entry, Entry::Exposure { index: i, .. } if i == index))
        });
        for bad in invalid {
            let what = match bad.entry {
                Entry::Mapping { .. } => "mapping",
                Entry::Exposure { .. } => "exposure",
            };
            warn!("refusing {what} from the state file: {}", bad.why);
            st.record_failure(bad.generation, Error::invalid(bad.why));
        }
    }

    /// Writes live counters to stats.json (SIGUSR2).
    fn write_stats(&mut self) {
        self.stats_seq += 1;
        let mut totals = Counters::default();
        let mappings = self
            .running
            .iter()
            .map(|(ip, m)| {
                let counters = m.conns.counters();
                totals += counters;
                MappingStats {
                    local_ip: *ip,
                    pilot_addr: m.addr,
                    counters,
                }
            })
            .collect();
        // Never the daemon itself: the health thread asks it, and a daemon
        // that stalls costs this write at most a short wait.
        let daemon = match &self.health {
            Some(h) => h.current(HEALTH_WAIT),
            None => Value::obj([("reachable", Value::from(false)), ("error", "not checked".into())]),
        };
        let dp = &self.data_path;
        let stats = Stats {
            seq: self.stats_seq,
            pid: self.me.pid,
            uptime_secs: self.started.elapsed().as_secs(),
            totals,
            refused: dp.refused.load(Relaxed),
            max_conns: dp.settings.max_conns as u64,
            max_conns_requested: self.max_conns_requested as u64,
            conns_in_use: dp.active.load(Relaxed) as u64,
            allow_remote: dp.settings.allow_remote,
            access_log_dropped: dp.access.as_ref().map_or(0, |a| a.dropped.load(Relaxed)),
            daemon,
            mappings,
            exposures: self.exposure_stats(),
        };
        if let Err(e) = self.dir.write_stats(&stats) {
            error!("cannot write counters: {e}");
        }
    }
}

/// Drops from `list` the entries whose index `dropped` names (indices as
/// they were before any was dropped).
fn retain_by_index<T>(list: &mut Vec<T>, dropped: impl Fn(usize) -> bool) {
    let mut index = 0;
    list.retain(|_| {
        index += 1;
        !dropped(index - 1)
    });
}

impl Gateway {
    fn exposure_stats(&self) -> Vec<ExposureStats> {
        self.exposed
            .values()
            .map(|r| {
                let (state, reason) = match r.engine.state() {
                    expose::State::Bound => ("bound", String::new()),
                    expose::State::Rebinding(why) => ("rebinding", why),
                    expose::State::Stopped => ("stopped", String::new()),
                };
                ExposureStats {
                    port: r.spec.port,
                    target: r.spec.target,
                    state: state.into(),
                    reason,
                    counters: r.engine.counters(),
                }
            })
            .collect()
    }
}

/// How long writing the counters waits for a fresh daemon health check
/// before it writes the last known one.
const HEALTH_WAIT: Duration = Duration::from_millis(300);

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
