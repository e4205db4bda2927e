//! The commands (`start`, `map`, `unmap`, `expose`, `unexpose`, `list`,
//! `status`, `stop`, help, version): what each does with the state, the running gateway and the
//! daemon. Rendering is `output.rs`; the background start `background.rs`.
//!
//! The control plane is a protocol over the state directory (see
//! `state.rs`): change `state.json` under the lock, signal the gateway,
//! wait until it reports the change applied (or why not).

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::address::PilotAddr;
use crate::background;
use crate::cli::{self, Args, Command, Expose, Target};
use crate::config::Settings;
use crate::daemon;
use crate::error::{Code, Error, Result};
use crate::gateway;
use crate::help;
use crate::json::Value;
use crate::log::{self, Format};
use crate::output::{self, Output};
use crate::privilege;
use crate::state::{Exposed, Mapping, State, StateDir};
use crate::stats::Stats;
use crate::subnet;
use crate::sys::{self, fs::FileLock, proc::ProcId};

/// How long a command waits for the gateway to apply a change.
const APPLY_WAIT: Duration = Duration::from_secs(10);
/// How long `map ADDR` waits for the daemon's trust list before it maps
/// without it (with a warning saying trust could not be checked).
const MAP_CHECK_WAIT: Duration = Duration::from_secs(2);
/// How long `stop` waits for the gateway to exit.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// Entry point of the `pilot-gateway` binary; returns the exit status.
pub fn main(argv: Vec<OsString>) -> i32 {
    let argv0 = argv
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rest: Vec<OsString> = argv.iter().skip(1).cloned().collect();
    // Even a malformed command line gets its error in the requested form.
    let wants_json = rest
        .iter()
        .any(|a| a == "--json" || a == "-json" || a == "--json=true" || a == "-json=true");
    let args = match cli::parse(&argv0, rest.clone()) {
        Ok(a) => a,
        Err(e) => {
            Output { json: wants_json }.error(&e);
            return e.code.exit_status();
        }
    };
    let out = Output { json: args.json };
    match run(&args, &out, &argv0, &rest) {
        Ok(()) => 0,
        Err(e) => {
            out.error(&e);
            e.code.exit_status()
        }
    }
}

/// The merged settings, with the logger started as they say.
fn settings(args: &Args) -> Result<Settings> {
    let s = Settings::from_args(args)?;
    log::init(s.log_level, s.log_format);
    Ok(s)
}

fn run(args: &Args, out: &Output, argv0: &str, raw: &[OsString]) -> Result<()> {
    let command = args.command.clone().unwrap_or(Command::Help(None));
    match command {
        Command::Help(topic) => {
            let text = match topic.as_deref() {
                None => help::USAGE,
                Some(t) => help::command_help(t).ok_or_else(|| {
                    Error::usage(format!("no help for unknown command {t:?}"))
                        .hint("see: pilot-gateway --help")
                })?,
            };
            print!("{text}");
            Ok(())
        }
        Command::Version => {
            let v = env!("CARGO_PKG_VERSION");
            out.ok(
                Value::obj([("version", Value::from(v))]),
                &format!("pilot-gateway {v}\n"),
            );
            Ok(())
        }
        _ if !sys::proc::proc_available() => Err(Error::new(
            Code::NotSupported,
            "/proc is not mounted (or not this system's): pilot-gateway needs it to tell a live gateway from a dead one, and refuses to guess",
        )
        .hint("mount proc on /proc (mount -t proc proc /proc), or run the command where it is mounted")),
        Command::Start { targets, legacy } => start(args, out, targets, legacy, argv0, raw),
        Command::Map { target, ip } => map(args, out, &target, ip.as_deref()),
        Command::Unmap { ip } => unmap(args, out, &ip),
        Command::Expose(req) => expose(args, out, &req),
        Command::Unexpose { port } => unexpose(args, out, &port),
        Command::List => list(args, out),
        Command::Status => status(args, out),
        Command::Stop => stop(args, out),
    }
}

fn parse_secs(flag: &str, text: Option<&str>, default: f64) -> Result<Duration> {
    let Some(text) = text else {
        return Ok(Duration::from_secs_f64(default));
    };
    match text.trim_end_matches('s').parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(Error::invalid(format!(
            "{flag} {text:?} is not a number of seconds between 0 and 86400"
        ))
        .hint(format!("for example: {flag} 10"))),
    }
}

fn start(
    args: &Args,
    out: &Output,
    targets: Vec<Target>,
    legacy: bool,
    argv0: &str,
    raw: &[OsString],
) -> Result<()> {
    let cfg = start_config(args, &targets)?;
    if background::is_detached() {
        return background::run_detached(cfg, targets);
    }
    if args.foreground || legacy {
        return gateway::run(cfg, targets, &mut |report| {
            let data = output::report_json(report);
            out.warnings(&report.warnings);
            out.ok(data.clone(), &output::start_text(&data));
        });
    }
    let data = background::spawn(&cfg, argv0, raw)?;
    let warnings: Vec<String> = data
        .get("warnings")
        .and_then(Value::as_array)
        .unwrap_or_default()
        .iter()
        .filter_map(|w| w.as_str().map(str::to_string))
        .collect();
    out.warnings(&warnings);
    out.ok(data.clone(), &output::start_text(&data));
    Ok(())
}

/// Checks every argument of `start` before anything is touched.
fn start_config(args: &Args, targets: &[Target]) -> Result<gateway::Config> {
    let s = settings(args)?;
    let subnet = subnet::parse_subnet(&s.subnet, args.allow_any_subnet)?;
    let ports = subnet::parse_ports(&s.ports)?;
    let max_conns = match &args.max_conns {
        None => 1000,
        Some(t) => t
            .parse::<usize>()
            .ok()
            .filter(|&n| (1..=1_000_000).contains(&n))
            .ok_or_else(|| {
                Error::invalid(format!("--max-conns {t:?} is not a number from 1 to 1000000"))
                    .hint("for example: --max-conns 1000")
            })?,
    };
    let dial_timeout = parse_secs("--dial-timeout", args.dial_timeout.as_deref(), 10.0)?;
    let idle_timeout = parse_secs("--idle-timeout", args.idle_timeout.as_deref(), 300.0)?;
    // A client that only shut down writing normally reads its reply within
    // moments; one that closed is freed at once (sock_diag), so this only
    // bounds an agent with nothing more to say to a still-open client, or
    // every half-close where the kernel cannot be asked. 10 s (HAProxy
    // users often pick 1-30 s for `timeout client-fin`) frees such slots
    // three times faster than the old fixed 30 s.
    let half_closed_timeout = parse_secs("--half-closed-timeout", args.half_closed_timeout.as_deref(), 10.0)?;
    // How long a Close waits for the daemon to report what was sent
    // delivered (`closing`): a few seconds covers a retransmission or two.
    let close_linger = parse_secs(
        "--close-linger",
        args.close_linger.as_deref(),
        crate::closing::DEFAULT_LINGER.as_secs_f64(),
    )?;
    let access_format = match &args.access_log_format {
        None => Format::Text,
        Some(f) => Format::parse(f).ok_or_else(|| {
            Error::invalid(format!("invalid --access-log-format {f:?}")).hint("use text or json")
        })?,
    };
    let mut exposures = Vec::new();
    for spec in &args.expose {
        let mut e = Expose::parse_start(spec)?;
        e.allow_remote_target = args.allow_remote_target;
        crate::expose::check_target(e.target, e.allow_remote_target, Some(subnet))?;
        exposures.push(e);
    }
    for t in targets {
        if PilotAddr::looks_like_address(&t.name) {
            daemon::resolve_target(None, &t.name)?;
        }
        if let Some(ip) = t.ip {
            subnet::parse_local_ip(&ip.to_string(), subnet)?;
        }
    }
    Ok(gateway::Config {
        socket: s.socket,
        socket_searched: crate::config::is_searched(&s.socket_source),
        socket_source: s.socket_source,
        state_dir: s.state_dir,
        subnet,
        ports,
        max_conns,
        dial_timeout,
        idle_timeout,
        half_closed_timeout,
        close_linger,
        access_log: args.access_log.clone().map(|p| (p, access_format)),
        user: args.user.clone(),
        no_user_switch: args.no_user_switch,
        allow_remote: args.allow_remote,
        exposures,
    })
}

/// Opens the state directory and returns the running gateway's state, or
/// `not_running` (saying so when a dead gateway left state behind).
///
/// Drop first, then read: as root with a directory that belongs to another
/// user (the gateway's), the only things done as root are opening the
/// directory itself (`O_DIRECTORY|O_NOFOLLOW`) and an fstat of it for its
/// owner; then the command becomes that owner for good (no groups, no
/// capabilities) before it opens any file inside, reads a byte of it,
/// writes, signals or talks to the daemon. Whatever the user planted in
/// the directory, root never parses it and the command can do no more than
/// the user could. No thread exists yet (the switch needs that).
fn running(args: &Args) -> Result<(StateDir, State)> {
    let s = settings(args)?;
    let dir = StateDir::open(&s.state_dir, false).map_err(|e| roots_gateway_hint(e, args))?;
    let (uid, gid) = dir.owner();
    privilege::become_owner(uid, gid)?;
    let st = dir.read()?.ok_or_else(|| {
        roots_gateway_hint(
            Error::new(
                Code::NotRunning,
                format!("no gateway is running (state directory {})", dir.path.display()),
            )
            .hint("start one with: pilot-gateway start"),
            args,
        )
    })?;
    check_alive(&st)?;
    check_ours(&st, uid)?;
    Ok((dir, st))
}

/// Where root's gateway keeps its state (`state::resolve_dir` as root).
const ROOT_STATE_DIR: &str = "/run/pilot-gateway";

/// A non-root command that found no gateway of its own, where the default
/// directory was used: if root's state directory exists, says so and
/// suggests sudo (the README's commands run as root).
fn roots_gateway_hint(e: Error, args: &Args) -> Error {
    let default_dir = args.state_dir.is_none()
        && !std::env::var_os("PILOT_GATEWAY_STATE_DIR").is_some_and(|v| !v.is_empty());
    let roots = std::path::Path::new(ROOT_STATE_DIR);
    // lstat: a link planted there is not root's directory.
    let exists = std::fs::symlink_metadata(roots).is_ok_and(|m| m.is_dir());
    if e.code != Code::NotRunning || sys::user::euid().is_root() || !default_dir || !exists {
        return e;
    }
    let cmd = match &args.command {
        Some(Command::Status) => "status",
        Some(Command::Stop) => "stop",
        Some(Command::Map { .. }) => "map …",
        Some(Command::Unmap { .. }) => "unmap …",
        Some(Command::Expose(_)) => "expose …",
        Some(Command::Unexpose { .. }) => "unexpose …",
        _ => "list",
    };
    let mut e = e;
    e.message = format!(
        "{}; root's gateway keeps its state in {ROOT_STATE_DIR}",
        e.message
    );
    e.hint(format!(
        "to see or steer root's gateway, run the command as root: sudo pilot-gateway {cmd}"
    ))
}

/// Whether the recorded pid is our gateway: a process of the directory's
/// owner (real and effective uid) running this program. The state file is
/// the owner's to write, so without this a forged pid would make us signal
/// any process. Where `/proc/PID/exe` cannot be read (a non-root command
/// looking at a gateway that switched from root is not allowed to), the
/// uid and start time must do: kill(2) from that user reaches only that
/// user's own processes anyway.
fn check_ours(st: &State, owner: sys::user::Uid) -> Result<()> {
    let pid = st.gateway.pid;
    let refuse = |why: String| {
        Error::new(
            Code::PermissionDenied,
            format!("the state file names pid {pid}, which {why}; it is not signalled"),
        )
        .hint("the state directory may have been tampered with: stop the gateway with `kill` after checking the pid, then remove the directory")
    };
    if !cfg!(target_os = "linux") {
        return Ok(());
    }
    match sys::proc::process_uids(pid) {
        Some((real, effective)) if real == owner && effective == owner => {}
        Some((real, _)) => {
            return Err(refuse(format!(
                "runs as uid {real}, not as the gateway's user (uid {owner})"
            )))
        }
        None => return Err(refuse("cannot be looked up".into())),
    }
    match sys::proc::runs_same_program(pid) {
        Some(true) => Ok(()),
        // Say what differs: a copy with the same bytes elsewhere would
        // have passed, so this is another program.
        Some(false) => Err(refuse(format!(
            "runs {}, whose contents differ from this program ({})",
            sys::proc::exe_path(pid).map_or_else(|| "an unknown program".into(), |p| p.display().to_string()),
            std::env::current_exe().map_or_else(|_| "?".into(), |p| p.display().to_string()),
        ))),
        None if !sys::user::euid().is_root() => Ok(()),
        None => Err(refuse("cannot be identified".into())),
    }
}

fn check_alive(st: &State) -> Result<()> {
    if st.gateway.is_alive() {
        return Ok(());
    }
    let leftovers: Vec<String> = st
        .mappings
        .iter()
        .filter(|m| m.alias_added)
        .map(|m| m.local_ip.to_string())
        .collect();
    let note = if leftovers.is_empty() {
        String::new()
    } else {
        format!("; it left aliases behind ({})", leftovers.join(", "))
    };
    Err(Error::new(
        Code::NotRunning,
        format!(
            "the gateway (pid {}) is not running: it exited without cleaning up{note}",
            st.gateway.pid
        ),
    )
    .hint("`pilot-gateway start` cleans up what it left and starts fresh"))
}

/// Signals the gateway, explaining a refusal.
fn signal(st: &State, sig: i32) -> Result<()> {
    st.gateway.signal(sig).map_err(|e| {
        if e.raw_os_error() == Some(libc::EPERM) {
            let who = st.user.clone().unwrap_or_else(|| "another user".into());
            Error::new(
                Code::PermissionDenied,
                format!(
                    "not allowed to signal the gateway (pid {}, running as {who})",
                    st.gateway.pid
                ),
            )
            .hint("run the command as root or as the gateway's user")
        } else {
            Error::new(
                Code::NotRunning,
                format!("the gateway (pid {}) is gone: {e}", st.gateway.pid),
            )
            .hint("start one with: pilot-gateway start")
        }
    })
}

/// Waits until the gateway has applied `generation`; returns its state.
fn wait_applied(dir: &StateDir, gw: ProcId, generation: u64, wait: Duration) -> Result<State> {
    let deadline = Instant::now() + wait;
    loop {
        let st = dir.read()?;
        match st {
            Some(st) if st.gateway == gw && st.applied >= generation => return Ok(st),
            Some(st) if st.gateway == gw && gw.is_alive() => {}
            _ => {
                return Err(Error::new(
                    Code::NotRunning,
                    format!("the gateway (pid {}) exited before applying the change", gw.pid),
                )
                .hint(format!("see {}", dir.log_file().display())))
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::new(
                Code::Timeout,
                format!(
                    "the gateway (pid {}) did not apply the change within {wait:?}; it stays requested",
                    gw.pid
                ),
            )
            .hint(format!("see {}", dir.log_file().display())));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn map(args: &Args, out: &Output, target: &str, ip: Option<&str>) -> Result<()> {
    let (dir, st) = running(args)?;
    let mut warnings = Vec::new();
    if let Some(sub) = &args.subnet {
        if subnet::parse_subnet(sub, true).ok() != Some(st.subnet) {
            warnings.push(format!(
                "--subnet {sub} ignored: the running gateway uses {}",
                st.subnet
            ));
        }
    }
    // `--ports` of `map` are the mapping's own ports.
    let ports = args.ports.as_deref().map(subnet::parse_ports).transpose()?;
    // The gateway's own list means "the gateway's ports" (upstream's
    // wrapper passes -ports to every command).
    let ports = ports.map(|p| (p != st.ports).then_some(p));
    let (addr, hostname) = ask_daemon(&st, target, &mut warnings)?;
    let wanted_ip = ip.map(|t| subnet::parse_local_ip(t, st.subnet)).transpose()?;

    let lock = dir.lock()?;
    let mut st = dir
        .read()?
        .ok_or_else(|| Error::new(Code::NotRunning, "the gateway stopped meanwhile"))?;
    check_alive(&st)?;
    if let Some(m) = st.find_addr(addr).cloned() {
        if wanted_ip.is_some_and(|ip| ip != m.local_ip) {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("{addr} is already mapped to {}", m.local_ip),
            )
            .hint(format!("unmap it first: pilot-gateway unmap {}", m.local_ip)));
        }
        if let Some(ports) = ports.clone().filter(|p| *p != m.ports) {
            return change_ports(&dir, lock, st, m, ports, out, warnings);
        }
        drop(lock);
        // Already mapped (perhaps by a command still waiting): same answer.
        let st = wait_applied(&dir, st.gateway, m.generation, APPLY_WAIT)?;
        if let Some(e) = st.failure(m.generation) {
            return Err(e.clone());
        }
        return report_map(out, &m, &st.ports, warnings, MapOutcome::Existing);
    }
    let local_ip = match wanted_ip {
        Some(ip) => {
            if let Some(other) = st.find_ip(ip) {
                return Err(Error::new(
                    Code::AlreadyExists,
                    format!("local IP {ip} is already mapped to {}", other.pilot_addr),
                )
                .hint("choose another IP, or leave it out to get the next free one"));
            }
            subnet::check_ip_free(ip, &crate::alias::label_for(dir.identity()?))?;
            ip
        }
        None => {
            // An address still draining is not handed out again (that
            // would end its drain); named explicitly, it may be.
            let mut used = st.used_ips();
            let note = dir.read_note_max(gateway::DRAINING_NOTE, gateway::DRAINING_NOTE_MAX);
            used.extend(
                note.as_ref()
                    .and_then(|n| n.get("mappings").and_then(Value::as_array))
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|e| {
                        e.get("local_ip")
                            .and_then(Value::as_str)?
                            .parse::<Ipv4Addr>()
                            .ok()
                    }),
            );
            subnet::next_unused(st.subnet, &used, &crate::alias::label_for(dir.identity()?))?
        }
    };
    st.generation += 1;
    let m = Mapping {
        local_ip,
        pilot_addr: addr,
        hostname,
        alias_added: false,
        ports: ports.flatten(),
        generation: st.generation,
    };
    st.mappings.push(m.clone());
    dir.write(&st)?;
    drop(lock);
    signal(&st, libc::SIGHUP)?;
    let st = wait_applied(&dir, st.gateway, m.generation, APPLY_WAIT)?;
    if let Some(e) = st.failure(m.generation) {
        return Err(e.clone());
    }
    report_map(out, &m, &st.ports, warnings, MapOutcome::New)
}

/// `map ADDR --ports L` on an existing mapping with other ports: records
/// the new ports under a new generation and has the gateway open the added
/// ports and close the removed ones (live connections stay).
fn change_ports(
    dir: &StateDir,
    lock: FileLock,
    mut st: State,
    old: Mapping,
    ports: Option<Vec<u16>>,
    out: &Output,
    warnings: Vec<String>,
) -> Result<()> {
    st.generation += 1;
    let generation = st.generation;
    let Some(m) = st.mappings.iter_mut().find(|m| m.local_ip == old.local_ip) else {
        return Err(Error::internal("the mapping vanished under the lock"));
    };
    m.ports = ports;
    m.generation = generation;
    let m = m.clone();
    dir.write(&st)?;
    drop(lock);
    signal(&st, libc::SIGHUP)?;
    let st = wait_applied(dir, st.gateway, generation, APPLY_WAIT)?;
    if let Some(e) = st.failure(generation) {
        return Err(e.clone());
    }
    let before = old.ports_or(&st.ports).to_vec();
    report_map(out, &m, &st.ports, warnings, MapOutcome::PortsChanged(before))
}

/// Resolves `target` and checks trust, before the lock is taken: these
/// ask the daemon. A pilot address needs no daemon to resolve, so an
/// unreachable daemon only costs the trust check then.
fn ask_daemon(st: &State, target: &str, warnings: &mut Vec<String>) -> Result<(PilotAddr, Option<String>)> {
    // An address needs the daemon only for the trust warning: a short
    // wait keeps `map` fast when the daemon is slow (the mapping is made
    // anyway). A hostname cannot be mapped without its answer.
    let wait = if PilotAddr::looks_like_address(target) {
        MAP_CHECK_WAIT
    } else {
        Duration::from_secs(5)
    };
    let mut session =
        daemon::probe(&st.socket, "from the state file", wait, Some(st.daemon_uid)).map(|(s, _)| s);
    let (addr, hostname) = match &mut session {
        Ok(s) => daemon::resolve_target(Some(s), target)?,
        Err(e) if !PilotAddr::looks_like_address(target) => return Err(e.clone()),
        Err(_) => daemon::resolve_target(None, target)?,
    };
    match &mut session {
        Ok(s) => warnings.extend(daemon::trust_warnings(s, &[addr])),
        Err(e) => warnings.push(format!("could not check trust: {}", e.message)),
    }
    Ok((addr, hostname))
}

/// What `map` did.
enum MapOutcome {
    New,
    Existing,
    /// The mapping's ports changed, from these.
    PortsChanged(Vec<u16>),
}

fn report_map(
    out: &Output,
    m: &Mapping,
    gateway_ports: &[u16],
    warnings: Vec<String>,
    outcome: MapOutcome,
) -> Result<()> {
    let mut data = output::mapping_json(m, gateway_ports);
    if let Value::Obj(pairs) = &mut data {
        pairs.push((
            "already_mapped".into(),
            (!matches!(outcome, MapOutcome::New)).into(),
        ));
        if let MapOutcome::PortsChanged(before) = &outcome {
            pairs.push(("ports_before".into(), crate::state::ports_json(before)));
        }
        pairs.push(("warnings".into(), warnings.clone().into()));
    }
    out.warnings(&warnings);
    let note = match &outcome {
        MapOutcome::New => String::new(),
        MapOutcome::Existing => " (already mapped)".into(),
        MapOutcome::PortsChanged(before) => {
            format!(" (ports changed from {})", subnet::format_ports(before))
        }
    };
    out.ok(data.clone(), &format!("{}{note}\n", output::mapping_line(&data)));
    Ok(())
}

fn unmap(args: &Args, out: &Output, ip_text: &str) -> Result<()> {
    let ip: Ipv4Addr = ip_text.parse().map_err(|_| {
        Error::invalid(format!(
            "invalid local IP {ip_text:?}: expected an IPv4 address such as 10.4.0.1"
        ))
        .hint("see the mapped IPs with: pilot-gateway list")
    })?;
    let (dir, _) = running(args)?;
    let lock = dir.lock()?;
    let mut st = dir
        .read()?
        .ok_or_else(|| Error::new(Code::NotRunning, "the gateway stopped meanwhile"))?;
    check_alive(&st)?;
    let Some(m) = st.find_ip(ip).cloned() else {
        return Err(Error::new(Code::NotFound, format!("no mapping for {ip}"))
            .hint("see the mapped IPs with: pilot-gateway list"));
    };
    let drain = drain_secs(args)?;
    let st_ports = st.ports.clone();
    st.mappings.retain(|x| x.local_ip != ip);
    let what = ip.to_string();
    let removal = apply_removal(&dir, lock, st, drain, &what, args.wait.then_some(out))?;
    out.ok(
        removal.json(output::mapping_json(&m, &st_ports)),
        &format!("unmapped {} → {}{}\n", m.local_ip, m.pilot_addr, removal.note()),
    );
    Ok(())
}

/// `expose`: records the exposure, has the gateway bind the port, and
/// reports it, or the gateway's error (port_in_use when the daemon or
/// another program holds the port).
fn expose(args: &Args, out: &Output, req: &Expose) -> Result<()> {
    let (dir, st) = running(args)?;
    crate::expose::check_target(req.target, req.allow_remote_target, Some(st.subnet))?;
    // Hostnames are resolved before the lock is taken: they ask the daemon.
    let allow = req
        .allow
        .as_ref()
        .map(|peers| daemon::resolve_peers(&st.socket, peers, Some(st.daemon_uid)))
        .transpose()?;
    let mut e = Exposed {
        port: req.port,
        target: req.target,
        allow,
        allow_remote_target: req.allow_remote_target,
        generation: 0,
    };
    let lock = dir.lock()?;
    let mut st = dir
        .read()?
        .ok_or_else(|| Error::new(Code::NotRunning, "the gateway stopped meanwhile"))?;
    check_alive(&st)?;
    if let Some(x) = st.find_exposure(e.port).cloned() {
        drop(lock);
        if !x.same_service(&e) {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("pilot port {} is already exposed → {}", x.port, x.target),
            )
            .hint(format!("unexpose it first: pilot-gateway unexpose {}", x.port)));
        }
        // Already exposed (perhaps by a command still waiting): same answer.
        let st = wait_applied(&dir, st.gateway, x.generation, APPLY_WAIT)?;
        if let Some(err) = st.failure(x.generation) {
            return Err(err.clone());
        }
        out.ok(output::exposure_json(&x), &output::exposure_line(&x, true));
        return Ok(());
    }
    st.generation += 1;
    e.generation = st.generation;
    st.exposures.push(e.clone());
    dir.write(&st)?;
    drop(lock);
    signal(&st, libc::SIGHUP)?;
    let st = wait_applied(&dir, st.gateway, e.generation, APPLY_WAIT)?;
    if let Some(err) = st.failure(e.generation) {
        return Err(err.clone());
    }
    out.ok(output::exposure_json(&e), &output::exposure_line(&e, false));
    Ok(())
}

/// `unexpose`: removes the exposure; the gateway closes its session, so
/// the daemon frees the port and resets its connections (after letting
/// them finish for up to `--drain` seconds, admitting no new ones).
fn unexpose(args: &Args, out: &Output, port: &str) -> Result<()> {
    let port = port.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| {
        Error::invalid(format!("pilot port {port:?} is not a number from 1 to 65535"))
            .hint("see the exposed ports with: pilot-gateway list")
    })?;
    let (dir, _) = running(args)?;
    let lock = dir.lock()?;
    let mut st = dir
        .read()?
        .ok_or_else(|| Error::new(Code::NotRunning, "the gateway stopped meanwhile"))?;
    check_alive(&st)?;
    let Some(e) = st.find_exposure(port).cloned() else {
        drop(lock);
        return Err(
            Error::new(Code::NotFound, format!("pilot port {port} is not exposed"))
                .hint("see the exposed ports with: pilot-gateway list"),
        );
    };
    let drain = drain_secs(args)?;
    st.exposures.retain(|x| x.port != port);
    let what = format!("port {port}");
    let removal = apply_removal(&dir, lock, st, drain, &what, args.wait.then_some(out))?;
    out.ok(
        removal.json(output::exposure_json(&e)),
        &format!("unexposed pilot port {port} → {}{}\n", e.target, removal.note()),
    );
    Ok(())
}

/// Records a removal (an unmap or unexpose) already made to `st`, read
/// under `lock`: a new generation, written with the drain request; then has
/// the gateway apply it. Without a drain the apply cuts what is live, and
/// the count is reported. With one the gateway drains in the background
/// (`gateway/drain.rs`) and answers at once: the removal reports what is
/// draining, or with `--wait` (`wait`: the output for progress lines and
/// what drains, the IP or `port N`) waits for the drain to end, without
/// the lock, and reports how many were cut.
fn apply_removal(
    dir: &StateDir,
    lock: FileLock,
    mut st: State,
    drain: Duration,
    what: &str,
    wait: Option<&Output>,
) -> Result<Removal> {
    st.generation += 1;
    let generation = st.generation;
    request_drain(dir, drain)?;
    dir.write(&st)?;
    drop(lock);
    signal(&st, libc::SIGHUP)?;
    wait_applied(dir, st.gateway, generation, APPLY_WAIT)?;
    if drain.is_zero() {
        // The gateway notes how many connections the apply that handled
        // this change cut (several removals applied at once share one count).
        let cut = dir
            .read_note("applied.json")
            .filter(|v| v.get("generation").and_then(Value::as_u64) >= Some(generation))
            .and_then(|v| v.get("cut").and_then(Value::as_u64))
            .unwrap_or(0);
        return Ok(Removal::Cut(cut));
    }
    let Some(out) = wait else {
        let entry = draining_entry(dir, st.gateway.pid, what);
        return Ok(Removal::Draining(entry));
    };
    let deadline = Instant::now() + drain + APPLY_WAIT;
    let mut last_progress = Instant::now();
    loop {
        let note = dir.read_note_max(gateway::DRAINING_NOTE, gateway::DRAINING_NOTE_MAX);
        if let Some(cut) = note.as_ref().and_then(|n| drain_done(n, what, generation)) {
            return Ok(Removal::Cut(cut));
        }
        if !st.gateway.is_alive() {
            return Err(Error::new(
                Code::NotRunning,
                format!("the gateway (pid {}) exited during the drain", st.gateway.pid),
            )
            .hint(format!("see {}", dir.log_file().display())));
        }
        if Instant::now() >= deadline {
            return Err(Error::new(
                Code::Timeout,
                format!("the drain of {what} did not end within {:?}", drain + APPLY_WAIT),
            )
            .hint(format!("see {}", dir.log_file().display())));
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            if let Some(e) = note.as_ref().and_then(|n| find_draining(n, what)) {
                // Progress on stderr, so stdout holds the one result.
                if !out.json {
                    let line = format!("draining {what}: {}", draining_text(&e));
                    eprintln!("{}", crate::escape::escape_control(&line));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How a removal ended: cut (none or some), or draining in the background.
enum Removal {
    Cut(u64),
    /// The `draining.json` entry of the removal, if the gateway listed it
    /// (not when nothing was live: then the drain ended at once).
    Draining(Option<Value>),
}

impl Removal {
    /// The removal's report: `data` with `cut`, and `draining` (the entry:
    /// live connections, seconds left) when it drains in the background.
    fn json(&self, mut data: Value) -> Value {
        if let Value::Obj(pairs) = &mut data {
            match self {
                Removal::Cut(cut) => pairs.push(("cut".into(), (*cut).into())),
                Removal::Draining(entry) => {
                    pairs.push(("cut".into(), 0u64.into()));
                    pairs.push(("draining".into(), entry.clone().unwrap_or(Value::Null)));
                }
            }
        }
        data
    }

    fn note(&self) -> String {
        match self {
            Removal::Cut(cut) => cut_note(*cut),
            Removal::Draining(Some(e)) => format!(" (draining: {})", draining_text(e)),
            Removal::Draining(None) => String::new(),
        }
    }
}

/// The entry of `draining.json` of `what`, as the gateway `pid` wrote it.
fn draining_entry(dir: &StateDir, pid: u32, what: &str) -> Option<Value> {
    let note = dir.read_note_max(gateway::DRAINING_NOTE, gateway::DRAINING_NOTE_MAX)?;
    if note.get("pid").and_then(Value::as_u64) != Some(u64::from(pid)) {
        return None;
    }
    find_draining(&note, what)
}

/// The draining entry (mapping or exposure) named `what` (an IP, or
/// `port N`).
fn find_draining(note: &Value, what: &str) -> Option<Value> {
    let maps = note.get("mappings").and_then(Value::as_array).unwrap_or_default();
    let exposures = note
        .get("exposures")
        .and_then(Value::as_array)
        .unwrap_or_default();
    maps.iter()
        .find(|e| e.get("local_ip").and_then(Value::as_str) == Some(what))
        .or_else(|| {
            exposures.iter().find(|e| {
                e.get("port")
                    .and_then(Value::as_u64)
                    .map(|p| format!("port {p}"))
                    .as_deref()
                    == Some(what)
            })
        })
        .cloned()
}

/// The cut count of the ended drain of `what` started at `generation` or
/// later; `None` while it drains.
fn drain_done(note: &Value, what: &str, generation: u64) -> Option<u64> {
    if find_draining(note, what).is_some() {
        return None;
    }
    note.get("done")
        .and_then(Value::as_array)
        .unwrap_or_default()
        .iter()
        .rev()
        .find(|d| {
            d.get("what").and_then(Value::as_str) == Some(what)
                && d.get("generation").and_then(Value::as_u64) >= Some(generation)
        })
        .and_then(|d| d.get("cut").and_then(Value::as_u64))
}

/// "1 live connection, 4.2s left".
fn draining_text(e: &Value) -> String {
    let active = e.get("active").and_then(Value::as_u64).unwrap_or(0);
    let left = e.get("secs_left").and_then(Value::as_f64).unwrap_or(0.0);
    let conns = if active == 1 {
        "1 live connection".to_string()
    } else {
        format!("{active} live connections")
    };
    format!("{conns}, {left:.1}s left")
}

/// The text form of a `cut` count: nothing when none was cut.
fn cut_note(cut: u64) -> String {
    match cut {
        0 => String::new(),
        1 => " (1 live connection cut)".into(),
        n => format!(" ({n} live connections cut)"),
    }
}

/// `--drain SECS` of stop, unmap and unexpose (0 without it).
fn drain_secs(args: &Args) -> Result<Duration> {
    match &args.drain {
        None => Ok(Duration::ZERO),
        Some(_) => parse_secs("--drain", args.drain.as_deref(), 0.0),
    }
}

/// Leaves the drain time for the gateway, which reads it when it handles
/// the signal that follows (and removes it).
fn request_drain(dir: &StateDir, drain: Duration) -> Result<()> {
    if drain.is_zero() {
        dir.remove("drain");
        return Ok(());
    }
    let note = Value::obj([("secs", Value::from(drain.as_secs_f64()))]);
    dir.write_atomic("drain", &format!("{note}\n"))
}

/// Asks the gateway for fresh counters (SIGUSR2) and reads them.
fn fetch_stats(dir: &StateDir, st: &State) -> Result<Stats> {
    let before = dir.read_stats().ok().flatten().map(|s| s.seq);
    signal(st, libc::SIGUSR2)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut unreadable = None;
    loop {
        match dir.read_stats() {
            Ok(Some(s)) if Some(s.seq) != before && s.pid == st.gateway.pid => return Ok(s),
            Ok(_) => {}
            Err(e) => unreadable = Some(e),
        }
        if Instant::now() >= deadline || !st.gateway.is_alive() {
            return Err(unreadable.unwrap_or_else(|| {
                Error::new(
                    Code::Timeout,
                    format!("the gateway (pid {}) did not report its counters", st.gateway.pid),
                )
                .hint(format!("see {}", dir.log_file().display()))
            }));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn list(args: &Args, out: &Output) -> Result<()> {
    let (dir, st) = running(args)?;
    let stats = fetch_stats(&dir, &st)?;
    let (data, text) = output::list(&st, &stats);
    out.ok(data, &text);
    Ok(())
}

fn status(args: &Args, out: &Output) -> Result<()> {
    let (dir, st) = running(args)?;
    let stats = fetch_stats(&dir, &st)?;
    let (mut data, mut text) = output::status(&st, &stats);
    add_draining(&dir, &mut data, &mut text, st.gateway.pid);
    add_limits(&dir, &mut data, &mut text);
    add_privileges(&mut data, &mut text, st.gateway.pid);
    out.ok(data, &text);
    Ok(())
}

/// `status`: what drains in the background, with live connections and time
/// left (the gateway rewrites `draining.json` before the counters that
/// `status` has just asked for, so it is as fresh).
fn add_draining(dir: &StateDir, data: &mut Value, text: &mut String, pid: u32) {
    let note = dir
        .read_note_max(gateway::DRAINING_NOTE, gateway::DRAINING_NOTE_MAX)
        .filter(|n| n.get("pid").and_then(Value::as_u64) == Some(u64::from(pid)));
    let field = |k: &str| {
        note.as_ref()
            .and_then(|n| n.get(k).cloned())
            .unwrap_or(Value::Arr(Vec::new()))
    };
    let stopping = note
        .as_ref()
        .and_then(|n| n.get("stopping").and_then(Value::as_bool))
        .unwrap_or(false);
    if let Value::Obj(pairs) = data {
        pairs.push((
            "draining".into(),
            Value::obj([
                ("stopping", Value::from(stopping)),
                ("mappings", field("mappings")),
                ("exposures", field("exposures")),
            ]),
        ));
    }
    if stopping {
        *text += "  stopping: draining, then exiting (`pilot-gateway stop` cuts at once)\n";
    }
    for line in note.as_ref().map(draining_lines).unwrap_or_default() {
        *text += &format!("  draining {line}\n");
    }
}

/// `status`: the thread limit (RLIMIT_NPROC) the gateway fitted
/// `--max-conns` to at start, beside the descriptor limit `output.rs` shows.
fn add_limits(dir: &StateDir, data: &mut Value, text: &mut String) {
    let Some(note) = dir.read_note(gateway::LIMITS_NOTE) else {
        return;
    };
    let limit = note.get("nproc_limit").and_then(Value::as_u64);
    let fit = note.get("max_conns_nproc_fit").and_then(Value::as_u64);
    if let Value::Obj(pairs) = data {
        pairs.push(("nproc_limit".into(), limit.into()));
        pairs.push(("max_conns_nproc_fit".into(), fit.into()));
    }
    if let (Some(limit), Some(fit)) = (limit, fit) {
        *text += &format!(
            "  threads: at most {limit} for the gateway's user (RLIMIT_NPROC): room for {fit} connections\n"
        );
    }
}

/// One line per draining mapping or exposure of a `draining.json` note.
fn draining_lines(note: &Value) -> Vec<String> {
    let list = |k: &str| note.get(k).and_then(Value::as_array).unwrap_or_default().to_vec();
    let maps = list("mappings").into_iter().map(|e| {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        format!("{} → {}: {}", s("local_ip"), s("pilot_addr"), draining_text(&e))
    });
    let exposures = list("exposures").into_iter().map(|e| {
        let port = e.get("port").and_then(Value::as_u64).unwrap_or(0);
        let target = e.get("target").and_then(Value::as_str).unwrap_or("?");
        format!("pilot port {port} → {target}: {}", draining_text(&e))
    });
    maps.chain(exposures).collect()
}

/// After `stop --drain`'s SIGTERM: waits (bounded) until the gateway says
/// it is stopping, and returns its `draining.json`; `None` if it has
/// exited already (nothing was live).
fn await_stopping(dir: &StateDir, st: &State) -> Result<Option<Value>> {
    let deadline = Instant::now() + APPLY_WAIT;
    loop {
        if !st.gateway.is_alive() {
            return Ok(None);
        }
        if let Some(note) = dir
            .read_note_max(gateway::DRAINING_NOTE, gateway::DRAINING_NOTE_MAX)
            .filter(|n| n.get("pid").and_then(Value::as_u64) == Some(u64::from(st.gateway.pid)))
            .filter(|n| n.get("stopping").and_then(Value::as_bool) == Some(true))
        {
            return Ok(Some(note));
        }
        if Instant::now() >= deadline {
            return Err(Error::new(
                Code::Timeout,
                format!(
                    "the gateway (pid {}) did not start stopping within {APPLY_WAIT:?}",
                    st.gateway.pid
                ),
            )
            .hint(format!("see {}", dir.log_file().display())));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `stop --drain` without `--wait`: the gateway drains in the background
/// and exits when done; the report says what drains.
fn report_stopping(out: &Output, st: &State, drain: Duration, note: &Value) -> Result<()> {
    let field = |k: &str| note.get(k).cloned().unwrap_or(Value::Arr(Vec::new()));
    let lines = draining_lines(note);
    out.ok(
        Value::obj([
            ("pid", Value::from(st.gateway.pid)),
            ("stopped", false.into()),
            ("stopping", true.into()),
            ("drain_secs", drain.as_secs_f64().into()),
            (
                "draining",
                Value::obj([("mappings", field("mappings")), ("exposures", field("exposures"))]),
            ),
            ("cut", 0u64.into()),
        ]),
        &format!(
            "gateway stopping (pid {}): draining for up to {:.1}s, then it exits; `pilot-gateway status` shows the drain, `pilot-gateway stop` cuts at once\n{}",
            st.gateway.pid,
            drain.as_secs_f64(),
            lines.iter().map(|l| format!("  draining {l}\n")).collect::<String>()
        ),
    );
    Ok(())
}

/// `status`: the uid and capabilities the gateway runs with, as the kernel
/// shows them for the live process (`/proc/PID/status`), not as recorded.
fn add_privileges(data: &mut Value, text: &mut String, pid: u32) {
    let Some(p) = privilege::describe(pid) else {
        return;
    };
    let caps = p.names();
    if let Value::Obj(pairs) = data {
        pairs.push(("uid".into(), p.uid.into()));
        pairs.push(("capabilities".into(), caps.clone().into()));
        pairs.push((
            "capabilities_permitted".into(),
            format!("{:016x}", p.permitted).into(),
        ));
        pairs.push((
            "capabilities_bounding".into(),
            format!("{:016x}", p.bounding).into(),
        ));
        pairs.push((
            "capabilities_ambient".into(),
            format!("{:016x}", p.ambient).into(),
        ));
        pairs.push(("no_new_privs".into(), p.no_new_privs.into()));
    }
    let caps = if caps.is_empty() {
        "none".to_string()
    } else {
        caps.join(", ")
    };
    let nnp = if p.no_new_privs { ", no new privileges" } else { "" };
    *text += &format!("  runs as uid {} with capabilities {caps}{nnp}\n", p.uid);
}

fn stop(args: &Args, out: &Output) -> Result<()> {
    let (dir, st) = running(args)?;
    let drain = drain_secs(args)?;
    request_drain(&dir, drain)?;
    signal(&st, libc::SIGTERM)?;
    if !drain.is_zero() && !args.wait {
        if let Some(note) = await_stopping(&dir, &st)? {
            return report_stopping(out, &st, drain, &note);
        }
    }
    let deadline = Instant::now() + STOP_WAIT + drain;
    let mut last_progress = Instant::now();
    while st.gateway.is_alive() {
        if !drain.is_zero() && !out.json && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            if let Some(note) = dir.read_note_max(gateway::DRAINING_NOTE, gateway::DRAINING_NOTE_MAX) {
                // Text from a file the gateway's user writes: escaped.
                for line in draining_lines(&note) {
                    eprintln!("draining {}", crate::escape::escape_control(&line));
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::new(
                Code::Timeout,
                format!(
                    "the gateway (pid {}) did not exit within {:?}",
                    st.gateway.pid,
                    STOP_WAIT + drain
                ),
            )
            .hint(format!(
                "see {}; `kill -9 {}` forces it, and the next start cleans up",
                dir.log_file().display(),
                st.gateway.pid
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let left: Vec<String> = st
        .mappings
        .iter()
        .filter(|m| m.alias_added && subnet::is_local_address(m.local_ip).unwrap_or(false))
        .map(|m| m.local_ip.to_string())
        .collect();
    if !left.is_empty() {
        return Err(Error::internal(format!(
            "the gateway (pid {}) exited but its aliases are still there: {}",
            st.gateway.pid,
            left.join(", ")
        ))
        .hint("`pilot-gateway start` removes them, or `ip addr del IP/32 dev lo`"));
    }
    // The gateway's note of how many live connections it cut on the way out.
    let cut = dir
        .read_note("stopped.json")
        .filter(|v| v.get("pid").and_then(Value::as_u64) == Some(u64::from(st.gateway.pid)))
        .and_then(|v| v.get("cut").and_then(Value::as_u64))
        .unwrap_or(0);
    dir.remove("stopped.json");
    out.ok(
        Value::obj([
            ("pid", Value::from(st.gateway.pid)),
            ("stopped", true.into()),
            ("cut", cut.into()),
        ]),
        &format!("gateway stopped (pid {}){}\n", st.gateway.pid, cut_note(cut)),
    );
    Ok(())
}
