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

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;

use crate::address::PilotAddr;
use crate::alias::{self, Aliases};
use crate::cli::{Expose, Target};
use crate::closing::{Closer, Mode};
use crate::daemon;
use crate::engine;
use crate::error::{Code, Error, Result};
use crate::expose::{self, Exposure};
use crate::json::Value;
use crate::limits;
use crate::listener::{self, Listener};
use crate::notify::Notifier;
use crate::privilege::Switched;
use crate::relay::{Connections, DataPath};
use crate::state::{self, Exposed, Mapping, State, StateDir};
use crate::stats::{Counters, ExposureStats, MappingStats, Stats};
use crate::subnet::{self, needs_alias};
use crate::sys::{self, proc::ProcId, signal::Signals};
use crate::{error, info, warn};

mod apply;
mod drain;
mod start;

pub use drain::{NOTE as DRAINING_NOTE, NOTE_MAX as DRAINING_NOTE_MAX};

/// The note of the limits the gateway fitted `--max-conns` to at start
/// (`limits.rs`): `{nproc_limit, nproc_others, max_conns_nproc_fit}`.
pub const LIMITS_NOTE: &str = "limits.json";

use start::{
    clean_up_after_dead_gateway, conn_settings, open_access_log, open_state_dir_as_user, plan_exposures,
    plan_mappings,
};
pub use start::{give_state_dir, prepare_only, prepare_state_dir, PREPARE_ENV};

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
    /// `--max-exposed` and `--max-per-peer` as given (`None`: the
    /// defaults, see [`limits::fit_exposed`]).
    pub max_exposed: Option<usize>,
    pub max_per_peer: Option<usize>,
    pub dial_timeout: Duration,
    pub idle_timeout: Duration,
    pub half_closed_timeout: Duration,
    /// `--close-linger`: the bound of a Close waiting for delivery (the
    /// gateway's [`Closer`] holds it; the connection engine asks that).
    pub close_linger: Duration,
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
    /// The mapping's own ports as they run (`None`: the gateway's).
    own_ports: Option<Vec<u16>>,
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
///
/// Overlay peers must not take local clients' room (issue 18): the expose
/// side (sessions and connections) holds at most `--max-exposed` slots,
/// so `max_conns - max_exposed` always remain for forwarded connections,
/// and one peer node at most `--max-per-peer` connections
/// ([`DataPath::take_exposed`]).
struct ExposedSlots(Arc<DataPath>);

impl expose::Budget for ExposedSlots {
    fn admit(&self, peer: PilotAddr) -> std::result::Result<engine::Slot, engine::Refusal> {
        self.0.take_exposed(Some(peer))?;
        Ok(engine::Slot::adopt(Arc::new(PeerSlot(self.0.clone(), peer))))
    }
}

/// One exposed connection's slot, for its peer.
struct PeerSlot(Arc<DataPath>, PilotAddr);

impl engine::Slots for PeerSlot {
    fn try_acquire(&self) -> bool {
        self.0.take_exposed(Some(self.1)).is_ok()
    }

    /// Also counts a finished connection, so memory is trimmed after a
    /// burst of exposed connections as after forwarded ones.
    fn release(&self) {
        self.0.release_exposed(Some(self.1));
    }

    /// The peer's share goes back at once; the room in `--max-conns`
    /// stays while the Close waits (`engine::finish`).
    fn linger(&self) {
        self.0.linger_exposed(Some(self.1));
    }

    fn end_linger(&self) {
        self.0.end_linger();
    }
}

/// The slot of an exposure's daemon session; given back when dropped.
struct SessionSlot(Arc<DataPath>);

impl SessionSlot {
    fn take(dp: &Arc<DataPath>, port: u16) -> Result<SessionSlot> {
        match dp.take_exposed(None) {
            Ok(()) => Ok(SessionSlot(dp.clone())),
            Err(refusal) => Err(Error::new(
                Code::ConnectionFailed,
                format!(
                    "no connection slot for the daemon session of pilot port {port}: {}",
                    refusal.why
                ),
            )
            .hint("each exposure's session takes one slot of --max-exposed (and of --max-conns): raise them (and the open-file limit), or wait for connections to end")),
        }
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.release_exposed(None);
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
/// The main thread's longest wait for a signal (shorter with a watchdog).
const SIGNAL_WAIT: Duration = Duration::from_secs(5);

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
    /// Decides when connections may be closed (`closing`); `None` if its
    /// thread could not start (every Close is then immediate). The data
    /// path holds it too, for every connection (`engine`, "Closing").
    closer: Option<Arc<Closer>>,
    /// Descriptors left for listeners (see [`limits::fit_max_conns`]).
    listener_room: u64,
    /// systemd's notification socket, when it started us (`Type=notify`).
    notify: Option<Notifier>,
    /// Mappings and exposures draining in the background (`drain.rs`).
    draining: drain::Draining,
    /// Our entry in the registry of running gateways, held until we exit.
    registration: crate::registry::Registration,
    /// A dead predecessor's aliases left because a process held a socket
    /// on them: tried again on every SIGHUP and every idle tick.
    stale_aliases: Vec<Ipv4Addr>,
    stale_tried: Instant,
}

/// Runs the gateway until SIGTERM/SIGINT. `ready` is called once every
/// alias and listener is up; errors before that are returned, with
/// everything undone.
pub fn run(cfg: Config, targets: Vec<Target>, ready: &mut dyn FnMut(&Report)) -> Result<()> {
    // Before any thread: it takes NOTIFY_SOCKET out of the environment.
    let notify = Notifier::from_env();
    // First, so that a SIGHUP from a fast `map` never hits the default action.
    let signals = Signals::install(&[
        libc::SIGHUP,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ])
    .map_err(|e| Error::internal(format!("cannot install signal handlers: {e}")))?;
    // Before anything else opens a file: the reserve gets the lowest free
    // number, below any limit the gateway can later run into (even one
    // lowered under it by prlimit), so giving it up always lets one
    // accept through.
    listener::open_reserve();
    let (dir, switched, daemon) = open_state_dir_as_user(&cfg)?;
    let lock = dir.lock()?;
    if crate::background::creates_own_log() {
        // A root `start` opened nothing in this (our user's) directory:
        // refuse beside a live gateway before replacing its log.
        if let Some(prev) = dir.read()?.filter(|p| p.gateway.is_alive()) {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("a gateway is already running (pid {})", prev.gateway.pid),
            )
            .hint("stop it first: pilot-gateway stop"));
        }
        let log = dir.create_log()?;
        sys::proc::redirect_stderr(&log).map_err(|e| Error::io("cannot write gateway.log", &e))?;
    }
    let aliases = Aliases::labelled(alias::label_for(dir.identity()?));
    let (cleaned, stale_aliases) = clean_up_after_dead_gateway(&dir, &aliases, cfg.subnet)?;
    // After the cleanup of our own leftovers: a running gateway on an
    // overlapping subnet (the registry, or its live aliases).
    subnet::check_no_other_gateway(cfg.subnet, &aliases.label)?;
    // Known to every other gateway of this namespace from now on, so none
    // exposes a target in our subnet (`registry.rs`).
    let registration = crate::registry::register(cfg.subnet)
        .map_err(|e| Error::internal(format!("cannot register the gateway (abstract socket): {e}")))?;
    let (mappings, mut warnings) = plan_mappings(&cfg, &targets, daemon.uid, &aliases.label)?;
    let exposures = plan_exposures(&cfg, daemon.uid)?;
    if needs_alias(cfg.subnet) {
        subnet::check_no_overlap(cfg.subnet)?;
    }
    for w in &warnings {
        warn!("{w}");
    }
    let access = open_access_log(&cfg)?;
    // Each mapping listens on its own ports or the gateway's.
    let listeners: usize = mappings.iter().map(|m| m.ports_or(&cfg.ports).len()).sum();
    let (max_conns, listener_room) =
        limits::fit_max_conns(cfg.max_conns, listeners.max(cfg.ports.len()), 1, &mut warnings);
    let listeners = listeners.max(cfg.ports.len()) as u64;
    let (max_conns, threads) = limits::fit_threads(max_conns, listeners, sys::user::euid().0, &mut warnings);
    // For `status`, which shows both limits beside --max-conns.
    let note = Value::obj([
        ("nproc_limit", threads.limit.into()),
        ("nproc_others", threads.others.into()),
        ("max_conns_nproc_fit", threads.fit.map(|f| f as u64).into()),
    ]);
    if let Err(e) = dir.write_atomic(LIMITS_NOTE, &format!("{note}\n")) {
        warn!("{e}");
    }
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
        closer: None,
        listener_room,
        notify,
        draining: drain::Draining::default(),
        registration,
        stale_aliases,
        stale_tried: Instant::now(),
    };
    // Before the listeners and exposures: every connection's Close goes
    // through it from the first one (`engine`, "Closing").
    gw.closer = Closer::start(cfg.socket.clone(), daemon.uid, cfg.close_linger)
        .map(Arc::new)
        .map_err(|e| warn!("cannot start the close poller (every close is immediate): {e}"))
        .ok();
    if let Some(c) = &gw.closer {
        let _ = gw.data_path.closer.set(c.clone());
    }
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
    let status = gw.status_line();
    if let Some(n) = &mut gw.notify {
        n.ready(status);
    }
    gw.serve(&signals);
    Ok(())
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
            half_closed_timeout: cfg.half_closed_timeout,
            user: switched.map(|s| s.user.clone()),
            daemon_uid: self.data_path.settings.daemon_uid,
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

    /// What systemd shows for the unit (`systemctl status`).
    fn status_line(&self) -> String {
        format!(
            "{} mappings, {} exposures, {} connections",
            self.running.len(),
            self.exposed.len(),
            self.data_path.active.load(Relaxed)
        )
    }

    /// Keeps systemd's view current: the status line when it changed, and
    /// a watchdog ping while every accept loop runs and the daemon health
    /// thread still answers (a check requested at one ping must have been
    /// done by the next).
    fn tell_systemd(&mut self) {
        let status = self.status_line();
        let Some(n) = &mut self.notify else { return };
        n.status(status);
        let (running, health) = (&self.running, &self.health);
        let within = n.watchdog_period().unwrap_or_default() + daemon::HEALTH_TIMEOUT;
        n.watchdog(|| {
            let listening = running
                .values()
                .flat_map(|m| &m.listeners)
                .all(Listener::is_alive);
            listening && health.as_ref().is_some_and(|h| h.answered_within(within))
        });
    }

    /// The main thread from here on: waits for signals and answers them,
    /// until SIGTERM/SIGINT has stopped everything. Drains run in the
    /// background (`drain.rs`): while any runs, the loop wakes every
    /// [`drain::POLL`] to end those that are over, and every signal is
    /// still answered at once.
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
            // How many lines the rate limiter kept back lately, per kind.
            engine::flush_suppressed();
            // Other processes asking the registry who we are (`registry`).
            self.registration.answer();
            last_seen = finished;
            self.tell_systemd();
            let watchdog = self.notify.as_ref().and_then(Notifier::watchdog_period);
            let wait = if self.draining.is_empty() {
                SIGNAL_WAIT
            } else {
                drain::POLL
            };
            let sigs = signals.wait(watchdog.map_or(wait, |w| w.min(wait)));
            let tick = sigs.is_empty() && self.stale_tried.elapsed() >= Duration::from_secs(5);
            if tick || sigs.contains(&libc::SIGHUP) {
                self.stale_tried = Instant::now();
                self.retry_stale_aliases();
            }
            for sig in sigs {
                match sig {
                    libc::SIGHUP if self.draining.stopping.is_some() => {
                        warn!("stopping: changes to the state file are not applied any more");
                    }
                    libc::SIGHUP => {
                        if let Some(n) = &self.notify {
                            n.reloading();
                        }
                        self.apply();
                        let status = self.status_line();
                        if let Some(n) = &mut self.notify {
                            n.ready(status);
                        }
                    }
                    libc::SIGUSR2 => {
                        if !self.draining.is_empty() {
                            self.write_draining_note();
                        }
                        self.write_stats();
                    }
                    libc::SIGUSR1 => {
                        if let Some(a) = &self.data_path.access {
                            a.reopen();
                        }
                    }
                    libc::SIGTERM | libc::SIGINT => {
                        if let Some(n) = &self.notify {
                            n.send("STOPPING=1");
                        }
                        let drain = self.take_drain();
                        if !drain.is_zero() && self.draining.stopping.is_none() {
                            info!(
                                "stopping (signal {sig}) after a drain of up to {:.1}s",
                                drain.as_secs_f64()
                            );
                            self.start_stopping(drain);
                            continue;
                        }
                        info!("stopping (signal {sig})");
                        self.stop_now();
                        return;
                    }
                    _ => {}
                }
            }
            if !self.draining.is_empty() {
                self.finish_drains(false);
            }
            if self.draining.stopping.is_some() && self.draining.is_empty() {
                self.stop_now();
                return;
            }
        }
    }

    /// Removes the leftover aliases of a dead predecessor that were in use
    /// at start, once nobody holds a socket on them any more (same checks
    /// as at start: `alias::check_stale_alias`). An address we map
    /// ourselves meanwhile, or one that now fails for another reason, is
    /// dropped from the list.
    fn retry_stale_aliases(&mut self) {
        if self.stale_aliases.is_empty() {
            return;
        }
        let mut keep = Vec::new();
        for ip in std::mem::take(&mut self.stale_aliases) {
            if self.running.contains_key(&ip) || self.draining_has(ip) {
                continue;
            }
            if !subnet::is_local_address(ip).unwrap_or(true) {
                continue; // gone meanwhile
            }
            match alias::check_stale_alias(self.subnet, ip, &self.aliases.label) {
                Ok(()) => match self.aliases.remove(ip) {
                    Ok(()) => info!("removed leftover alias {ip} of a dead gateway, unused now"),
                    Err(e) => warn!("could not remove leftover alias {ip}: {e}"),
                },
                Err(why) if why.message.contains(alias::BUSY) => keep.push(ip),
                Err(why) => warn!("left address {ip} alone: {}", why.message),
            }
        }
        self.stale_aliases = keep;
    }

    /// Stops everything now (ending any drain), notes how many live
    /// connections were cut for `stop`, and removes the state.
    fn stop_now(&mut self) {
        let drained_cut = self.draining.stopping.unwrap_or(0);
        let cut_drains = self.finish_drains(true);
        let _lock = self.dir.lock();
        let cut = self.shutdown() + cut_drains + drained_cut;
        // For `stop`, which reports how many were cut.
        let note = Value::obj([("pid", Value::from(self.me.pid)), ("cut", cut.into())]);
        if let Err(e) = self.dir.write_atomic("stopped.json", &format!("{note}\n")) {
            warn!("{e}");
        }
        self.dir.remove("state.json");
        self.dir.remove("stats.json");
        self.dir.remove(drain::NOTE);
        self.dir.remove(LIMITS_NOTE);
        info!("stopped ({cut} live connections cut)");
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
            max_exposed: dp.settings.max_exposed as u64,
            max_per_peer: dp.settings.max_per_peer as u64,
            exposed_in_use: dp.exposed_in_use() as u64,
            refused_max_exposed: dp.refused_max_exposed.load(Relaxed),
            refused_per_peer: dp.refused_per_peer.load(Relaxed),
            allow_remote: dp.settings.allow_remote,
            access_log_dropped: dp.access.as_ref().map_or(0, |a| a.dropped.load(Relaxed)),
            daemon,
            close_mode: self
                .closer
                .as_ref()
                .map_or(Mode::Immediate, |c| c.mode())
                .as_str()
                .into(),
            close_linger_ms: self.closer.as_ref().map_or(0, |c| c.linger().as_millis() as u64),
            close_unconfirmed: self.closer.as_ref().map_or(0, |c| c.unconfirmed()),
            mappings,
            exposures: self.exposure_stats(),
            errors: crate::stats::dial_errors(),
        };
        if let Err(e) = self.dir.write_stats(&stats) {
            error!("cannot write counters: {e}");
        }
    }
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
