//! The commands: what each one does with the state, the running gateway
//! and the daemon, and how its result is shown.
//!
//! The control plane is a protocol over the state directory (see
//! `state.rs`): change `state.json` under the lock, signal the gateway,
//! wait until it reports the change applied (or why not).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{self, Args, Command};
use crate::config::{self, FileConfig};
use crate::error::{Code, Error, Result};
use crate::gateway::{self, Target};
use crate::json::{self, Value};
use crate::log::{self, Format, Level};
use crate::state::{self, Dir, Mapping, State};
use crate::subnet;
use crate::sys::ProcId;

/// How long a command waits for the gateway to apply a change.
const APPLY_WAIT: Duration = Duration::from_secs(10);
/// How long `stop` waits for the gateway to exit.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// How long a background `start` waits for the gateway to be ready.
const READY_WAIT: Duration = Duration::from_secs(60);
/// Set in the environment of the background gateway that `start` spawns.
const DETACHED_ENV: &str = "PILOT_GATEWAY_DETACHED";

/// Prints results and errors in the chosen form.
pub struct Out {
    pub json: bool,
}

impl Out {
    /// `{"status":"ok","data":…}` on stdout, or the text for people.
    pub fn ok(&self, data: Value, text: &str) {
        let mut stdout = std::io::stdout().lock();
        let _ = if self.json {
            writeln!(
                stdout,
                "{}",
                Value::obj([("status", Value::from("ok")), ("data", data)])
            )
        } else {
            write!(stdout, "{text}")
        };
        let _ = stdout.flush();
    }

    pub fn error(&self, e: &Error) {
        let mut stderr = std::io::stderr().lock();
        let _ = if self.json {
            writeln!(stderr, "{}", error_json(e))
        } else {
            let hint = e
                .hint
                .as_ref()
                .map(|h| format!("hint: {h}\n"))
                .unwrap_or_default();
            write!(stderr, "error: {}\n{hint}", e.message)
        };
    }

    /// Warnings go to stderr in text mode; in JSON they are in `data`.
    fn warnings(&self, warnings: &[String]) {
        if !self.json {
            for w in warnings {
                eprintln!("warning: {w}");
            }
        }
    }
}

/// The JSON error envelope; `error` repeats the message, as upstream does.
pub fn error_json(e: &Error) -> Value {
    let mut v = vec![
        ("status", Value::from("error")),
        ("code", e.code.as_str().into()),
        ("message", e.message.clone().into()),
        ("error", e.message.clone().into()),
    ];
    if let Some(h) = &e.hint {
        v.push(("hint", h.clone().into()));
    }
    Value::obj(v)
}

fn error_from_json(v: &Value) -> Error {
    let text = |k| v.get(k).and_then(Value::as_str).map(str::to_string);
    let mut e = Error::new(
        Code::from_name(&text("code").unwrap_or_default()),
        text("message").unwrap_or_else(|| "the gateway failed to start".into()),
    );
    e.hint = text("hint");
    e
}

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
            Out { json: wants_json }.error(&e);
            return e.code.exit_status();
        }
    };
    let out = Out { json: args.json };
    match run(&args, &out, &argv0, &rest) {
        Ok(()) => 0,
        Err(e) => {
            out.error(&e);
            e.code.exit_status()
        }
    }
}

/// Settings merged from flags, `-config FILE` and defaults.
struct Settings {
    socket: PathBuf,
    socket_source: String,
    subnet: String,
    ports: String,
    state_dir: PathBuf,
}

fn settings(args: &Args) -> Result<Settings> {
    let file = match &args.config {
        Some(path) => config::read_config(path)?,
        None => FileConfig::default(),
    };
    let level = args.log_level.clone().or(file.log_level.clone());
    let format = args.log_format.clone().or(file.log_format.clone());
    let level = match level {
        Some(l) => Level::parse(&l).ok_or_else(|| {
            Error::invalid(format!("invalid log level {l:?}")).hint("use one of: error, warn, info, debug")
        })?,
        None => Level::Info,
    };
    let format = match format {
        Some(f) => Format::parse(&f)
            .ok_or_else(|| Error::invalid(format!("invalid log format {f:?}")).hint("use text or json"))?,
        None => Format::Text,
    };
    log::init(level, format);
    let config_source = args
        .config
        .as_ref()
        .map(|p| format!("from \"socket\" in -config {}", p.display()));
    let flag = match (&args.socket, &file.socket, &config_source) {
        (Some(p), _, _) => Some((p.clone(), "from --socket".to_string())),
        (None, Some(p), Some(src)) => Some((PathBuf::from(p), src.clone())),
        _ => None,
    };
    let (socket, socket_source) =
        config::resolve_socket(flag.as_ref().map(|(p, s)| (p.as_path(), s.as_str())));
    Ok(Settings {
        socket,
        socket_source,
        subnet: args
            .subnet
            .clone()
            .or(file.subnet)
            .unwrap_or_else(|| subnet::DEFAULT_SUBNET.into()),
        ports: args
            .ports
            .clone()
            .or(file.ports)
            .unwrap_or_else(|| subnet::DEFAULT_PORTS.into()),
        state_dir: state::resolve_dir(args.state_dir.as_deref()),
    })
}

fn run(args: &Args, out: &Out, argv0: &str, raw: &[OsString]) -> Result<()> {
    let command = args.command.clone().unwrap_or(Command::Help(None));
    match command {
        Command::Help(topic) => {
            let text = match topic.as_deref() {
                None => cli::USAGE,
                Some(t) => cli::command_help(t).ok_or_else(|| {
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
        Command::Start { targets, legacy } => start(args, out, targets, legacy, argv0, raw),
        Command::Map { target, ip } => map(args, out, &target, ip.as_deref()),
        Command::Unmap { ip } => unmap(args, out, &ip),
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
    out: &Out,
    targets: Vec<Target>,
    legacy: bool,
    argv0: &str,
    raw: &[OsString],
) -> Result<()> {
    let s = settings(args)?;
    // Check every argument before anything is touched.
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
    let access_format = match &args.access_log_format {
        None => Format::Text,
        Some(f) => Format::parse(f).ok_or_else(|| {
            Error::invalid(format!("invalid --access-log-format {f:?}")).hint("use text or json")
        })?,
    };
    for t in &targets {
        if crate::address::PilotAddr::looks_like_address(&t.name) {
            gateway::resolve_target(None, &t.name)?;
        }
        if let Some(ip) = t.ip {
            subnet::parse_local_ip(&ip.to_string(), subnet)?;
        }
    }
    let cfg = gateway::Config {
        socket: s.socket,
        socket_source: s.socket_source,
        state_dir: s.state_dir,
        subnet,
        ports,
        max_conns,
        dial_timeout,
        idle_timeout,
        access_log: args.access_log.clone().map(|p| (p, access_format)),
        user: args.user.clone(),
        no_user_switch: args.no_user_switch,
    };
    if std::env::var_os(DETACHED_ENV).is_some() {
        return run_detached(cfg, targets);
    }
    if args.foreground || legacy {
        return gateway::run(cfg, targets, &mut |report| {
            let data = report.to_json();
            out.warnings(&report.warnings);
            out.ok(data.clone(), &start_text(&data));
        });
    }
    let data = spawn_background(&cfg, argv0, raw)?;
    let warnings: Vec<String> = data
        .get("warnings")
        .and_then(Value::as_array)
        .unwrap_or_default()
        .iter()
        .filter_map(|w| w.as_str().map(str::to_string))
        .collect();
    out.warnings(&warnings);
    out.ok(data.clone(), &start_text(&data));
    Ok(())
}

/// The text form of a start report (rendered from its JSON, so that the
/// foreground and background paths print the same).
fn start_text(data: &Value) -> String {
    let get = |k| {
        data.get(k)
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .unwrap_or_default()
    };
    let mut text = String::new();
    for c in data.get("cleaned").and_then(Value::as_array).unwrap_or_default() {
        text += &format!(
            "removed leftover alias {} of a gateway that exited without cleanup\n",
            c.as_str().unwrap_or("?")
        );
    }
    for m in data.get("mappings").and_then(Value::as_array).unwrap_or_default() {
        text += &mapping_line(m);
        text.push('\n');
    }
    let ports: Vec<String> = data
        .get("ports")
        .and_then(Value::as_array)
        .unwrap_or_default()
        .iter()
        .map(|p| p.to_string())
        .collect();
    text += &format!("gateway running (pid {})\n", get("pid"));
    text += &format!("  subnet: {}\n  ports: {}\n", get("subnet"), ports.join(","));
    if let Some(user) = data.get("user").and_then(Value::as_str) {
        let caps: Vec<&str> = data
            .get("capabilities")
            .and_then(Value::as_array)
            .unwrap_or_default()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        text += &format!("  running as user {user} with capabilities {}\n", caps.join(", "));
    }
    text
}

fn mapping_line(m: &Value) -> String {
    let s = |k| m.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let host = m
        .get("hostname")
        .and_then(Value::as_str)
        .map(|h| format!(" ({h})"))
        .unwrap_or_default();
    format!("mapped {} → {}{host}", s("local_ip"), s("pilot_addr"))
}

/// The background gateway: runs, and reports readiness (or the error) as
/// one JSON line on stdout, which is a pipe to the `start` that spawned it.
fn run_detached(cfg: gateway::Config, targets: Vec<Target>) -> Result<()> {
    let result = gateway::run(cfg, targets, &mut |report| {
        let line = Value::obj([("status", Value::from("ok")), ("data", report.to_json())]);
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
        // Detach: nobody reads our stdout after this line.
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            use std::os::fd::AsRawFd;
            // SAFETY: dup2 onto stdout of a file we just opened.
            unsafe { libc::dup2(null.as_raw_fd(), 1) };
        }
    });
    if let Err(e) = &result {
        // Tell the waiting `start` why; it prints the error in its own form.
        println!("{}", error_json(e));
        crate::error!("{e}");
    }
    result
}

/// Starts the gateway as a detached child and waits for its readiness line.
fn spawn_background(cfg: &gateway::Config, argv0: &str, raw: &[OsString]) -> Result<Value> {
    let dir = Dir::open(&cfg.state_dir, true)?;
    if let Some(st) = dir.read()? {
        if st.gateway.is_alive() {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("a gateway is already running (pid {})", st.gateway.pid),
            )
            .hint("stop it first: pilot-gateway stop"));
        }
    }
    let log_path = dir.log_file();
    let log = dir.open_file(
        "gateway.log",
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true),
    )?;
    let exe = std::env::current_exe()
        .map_err(|e| Error::internal(format!("cannot find our own executable: {e}")))?;
    let mut cmd = Process::new(exe);
    cmd.arg0(argv0)
        .args(raw)
        .env(DETACHED_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    // SAFETY: setsid() is async-signal-safe; it detaches the gateway from
    // our terminal and process group.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::internal(format!("cannot start the gateway process: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::internal("no pipe to the gateway process"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let see_log = format!("see {}", log_path.display());
    let line = match rx.recv_timeout(READY_WAIT) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::new(
                Code::Timeout,
                format!("the gateway did not become ready within {READY_WAIT:?}"),
            )
            .hint(see_log));
        }
    };
    let reply = json::parse(line.trim()).ok();
    match reply {
        Some(v) if v.get("status").and_then(Value::as_str) == Some("ok") => {
            Ok(v.get("data").cloned().unwrap_or(Value::Null))
        }
        Some(v) => {
            let _ = child.wait();
            Err(error_from_json(&v))
        }
        None => {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last = tail.lines().last().unwrap_or("").to_string();
            Err(Error::internal(format!(
                "the gateway exited before it was ready ({status}): {last}"
            ))
            .hint(see_log))
        }
    }
}

/// Opens the state directory and returns the running gateway's state, or
/// `not_running` (saying so when a dead gateway left state behind).
fn running(args: &Args) -> Result<(Dir, State)> {
    let s = settings(args)?;
    let dir = Dir::open(&s.state_dir, false)?;
    let st = dir.read()?.ok_or_else(|| {
        Error::new(
            Code::NotRunning,
            format!("no gateway is running (state directory {})", dir.path.display()),
        )
        .hint("start one with: pilot-gateway start")
    })?;
    check_alive(&st)?;
    Ok((dir, st))
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
fn wait_applied(dir: &Dir, gw: ProcId, generation: u64) -> Result<State> {
    let deadline = Instant::now() + APPLY_WAIT;
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
                    "the gateway (pid {}) did not apply the change within {APPLY_WAIT:?}; it stays requested",
                    gw.pid
                ),
            )
            .hint(format!("see {}", dir.log_file().display())));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn map(args: &Args, out: &Out, target: &str, ip: Option<&str>) -> Result<()> {
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
    // Resolve and check trust before taking the lock: these ask the daemon.
    let mut session =
        gateway::probe_daemon(&st.socket, "from the state file", Duration::from_secs(5)).map(|(s, _)| s);
    let (addr, hostname) = match &mut session {
        Ok(s) => gateway::resolve_target(Some(s), target)?,
        Err(e) if !crate::address::PilotAddr::looks_like_address(target) => return Err(e.clone()),
        Err(_) => gateway::resolve_target(None, target)?,
    };
    match &mut session {
        Ok(s) => warnings.extend(gateway::trust_warnings(s, &[addr])),
        Err(e) => warnings.push(format!("could not check trust: {}", e.message)),
    }
    drop(session);
    let wanted_ip = ip.map(|t| subnet::parse_local_ip(t, st.subnet)).transpose()?;

    let lock = dir.lock()?;
    let mut st = dir
        .read()?
        .ok_or_else(|| Error::new(Code::NotRunning, "the gateway stopped meanwhile"))?;
    check_alive(&st)?;
    if let Some(m) = st.find_addr(addr).cloned() {
        drop(lock);
        if wanted_ip.is_some_and(|ip| ip != m.local_ip) {
            return Err(Error::new(
                Code::AlreadyExists,
                format!("{addr} is already mapped to {}", m.local_ip),
            )
            .hint(format!("unmap it first: pilot-gateway unmap {}", m.local_ip)));
        }
        // Already mapped (perhaps by a command still waiting): same answer.
        let st = wait_applied(&dir, st.gateway, m.generation)?;
        if let Some(e) = st.failure(m.generation) {
            return Err(e.clone());
        }
        return report_map(out, &m, warnings, true);
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
            ip
        }
        None => subnet::next_free(st.subnet, &st.used_ips())?,
    };
    st.generation += 1;
    let m = Mapping {
        local_ip,
        pilot_addr: addr,
        hostname,
        alias_added: false,
        generation: st.generation,
    };
    st.mappings.push(m.clone());
    dir.write(&st)?;
    drop(lock);
    signal(&st, libc::SIGHUP)?;
    let st = wait_applied(&dir, st.gateway, m.generation)?;
    if let Some(e) = st.failure(m.generation) {
        return Err(e.clone());
    }
    report_map(out, &m, warnings, false)
}

fn report_map(out: &Out, m: &Mapping, warnings: Vec<String>, existing: bool) -> Result<()> {
    let mut data = gateway::mapping_json(m);
    if let Value::Obj(pairs) = &mut data {
        pairs.push(("already_mapped".into(), existing.into()));
        pairs.push(("warnings".into(), warnings.clone().into()));
    }
    out.warnings(&warnings);
    let note = if existing { " (already mapped)" } else { "" };
    out.ok(data.clone(), &format!("{}{note}\n", mapping_line(&data)));
    Ok(())
}

fn unmap(args: &Args, out: &Out, ip_text: &str) -> Result<()> {
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
    st.mappings.retain(|x| x.local_ip != ip);
    st.generation += 1;
    let generation = st.generation;
    dir.write(&st)?;
    drop(lock);
    signal(&st, libc::SIGHUP)?;
    wait_applied(&dir, st.gateway, generation)?;
    let data = gateway::mapping_json(&m);
    out.ok(data, &format!("unmapped {} → {}\n", m.local_ip, m.pilot_addr));
    Ok(())
}

/// Asks the gateway for fresh counters (SIGUSR2) and reads them.
fn fetch_stats(dir: &Dir, st: &State) -> Result<Value> {
    let before = dir
        .read_stats()
        .and_then(|v| v.get("seq").and_then(Value::as_u64));
    signal(st, libc::SIGUSR2)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = dir.read_stats() {
            let seq = v.get("seq").and_then(Value::as_u64);
            if seq != before && v.get("pid").and_then(Value::as_u64) == Some(u64::from(st.gateway.pid)) {
                return Ok(v);
            }
        }
        if Instant::now() >= deadline || !st.gateway.is_alive() {
            return Err(Error::new(
                Code::Timeout,
                format!("the gateway (pid {}) did not report its counters", st.gateway.pid),
            )
            .hint(format!("see {}", dir.log_file().display())));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn list(args: &Args, out: &Out) -> Result<()> {
    let (dir, st) = running(args)?;
    let stats = fetch_stats(&dir, &st)?;
    let live = stats
        .get("mappings")
        .and_then(Value::as_array)
        .unwrap_or_default();
    let counter = |ip: &str, k: &str| {
        live.iter()
            .find(|m| m.get("local_ip").and_then(Value::as_str) == Some(ip))
            .and_then(|m| m.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let mut text = String::new();
    let mut rows = Vec::new();
    for m in &st.mappings {
        let ip = m.local_ip.to_string();
        let mut row = gateway::mapping_json(m);
        if let Value::Obj(pairs) = &mut row {
            for k in ["active", "total", "bytes_up", "bytes_down", "dial_failures"] {
                pairs.push((k.into(), counter(&ip, k).into()));
            }
        }
        let host = m.hostname.as_ref().map(|h| format!(" ({h})")).unwrap_or_default();
        text += &format!(
            "{ip} → {}{host}  active {} total {} up {} B down {} B\n",
            m.pilot_addr,
            counter(&ip, "active"),
            counter(&ip, "total"),
            counter(&ip, "bytes_up"),
            counter(&ip, "bytes_down")
        );
        rows.push(row);
    }
    if rows.is_empty() {
        text = "no mappings\n".into();
    } else {
        text += &format!("total: {}\n", rows.len());
    }
    let n = rows.len();
    out.ok(
        Value::obj([("mappings", Value::Arr(rows)), ("total", n.into())]),
        &text,
    );
    Ok(())
}

fn status(args: &Args, out: &Out) -> Result<()> {
    let (dir, st) = running(args)?;
    let stats = fetch_stats(&dir, &st)?;
    let n = |k: &str| stats.get(k).and_then(Value::as_u64).unwrap_or(0);
    let daemon = stats.get("daemon").cloned().unwrap_or(Value::Null);
    let reachable = daemon.get("reachable").and_then(Value::as_bool).unwrap_or(false);
    let data = Value::obj([
        ("running", Value::from(true)),
        ("pid", st.gateway.pid.into()),
        ("uptime_secs", n("uptime_secs").into()),
        ("socket", st.socket.display().to_string().into()),
        ("daemon_reachable", reachable.into()),
        ("daemon", daemon.clone()),
        ("subnet", st.subnet.to_string().into()),
        ("ports", Value::Arr(st.ports.iter().map(|&p| p.into()).collect())),
        ("user", st.user.clone().into()),
        ("mappings", st.mappings.len().into()),
        ("max_conns", st.max_conns.into()),
        ("active", n("active").into()),
        ("total", n("total").into()),
        ("bytes_up", n("bytes_up").into()),
        ("bytes_down", n("bytes_down").into()),
        ("dial_failures", n("dial_failures").into()),
        ("idle_timeouts", n("idle_timeouts").into()),
        ("refused", n("refused").into()),
    ]);
    let daemon_text = if reachable {
        "reachable".to_string()
    } else {
        format!(
            "unreachable: {}",
            daemon.get("error").and_then(Value::as_str).unwrap_or("?")
        )
    };
    let text = format!(
        "gateway running (pid {}, up {}s)\n  socket: {} (daemon {daemon_text})\n  subnet: {}\n  ports: {}\n  mappings: {}\n  connections: active {} (max {}), total {}, refused {}, failed dials {}, idle timeouts {}\n  bytes: up {}, down {}\n",
        st.gateway.pid,
        n("uptime_secs"),
        st.socket.display(),
        st.subnet,
        subnet::format_ports(&st.ports),
        st.mappings.len(),
        n("active"),
        st.max_conns,
        n("total"),
        n("refused"),
        n("dial_failures"),
        n("idle_timeouts"),
        n("bytes_up"),
        n("bytes_down"),
    );
    out.ok(data, &text);
    Ok(())
}

fn stop(args: &Args, out: &Out) -> Result<()> {
    let (dir, st) = running(args)?;
    signal(&st, libc::SIGTERM)?;
    let deadline = Instant::now() + STOP_WAIT;
    while st.gateway.is_alive() {
        if Instant::now() >= deadline {
            return Err(Error::new(
                Code::Timeout,
                format!(
                    "the gateway (pid {}) did not exit within {STOP_WAIT:?}",
                    st.gateway.pid
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
    out.ok(
        Value::obj([("pid", Value::from(st.gateway.pid)), ("stopped", true.into())]),
        &format!("gateway stopped (pid {})\n", st.gateway.pid),
    );
    Ok(())
}
