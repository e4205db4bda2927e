//! The commands (`start`, `map`, `unmap`, `expose`, `unexpose`, `list`,
//! `status`, `stop`, help, version): what each does with the state, the running gateway and the
//! daemon. Rendering is `output.rs`; the background start `background.rs`.
//!
//! The control plane is a protocol over the state directory (see
//! `state.rs`): change `state.json` under the lock, signal the gateway,
//! wait until it reports the change applied (or why not).

use std::ffi::OsString;
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
use crate::state::{State, StateDir};
use crate::subnet;
use crate::sys::{self, proc::ProcId};

mod change;
mod show;
use change::*;
use show::*;

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
    if gateway::prepare_only() {
        let given = gateway::give_state_dir(&cfg)?;
        let dir = cfg.state_dir.display();
        let text = match &given {
            Some(u) => format!("state directory {dir} given to {} (uid {})\n", u.name, u.uid),
            None => format!("state directory {dir}: nothing to give\n"),
        };
        let data = Value::obj([
            ("state_dir", Value::from(dir.to_string())),
            ("given_to", given.map(|u| u64::from(u.uid.0)).into()),
        ]);
        out.ok(data, &text);
        return Ok(());
    }
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

/// `--max-exposed` or `--max-per-peer`: a number from 1 to `most` (the
/// budget it is a share of, named `of`); `None` when not given.
fn parse_budget(flag: &str, text: Option<&str>, most: usize, of: &str) -> Result<Option<usize>> {
    let Some(t) = text else { return Ok(None) };
    match t.parse::<usize>() {
        Ok(n) if (1..=most).contains(&n) => Ok(Some(n)),
        Ok(n) if n > most => Err(Error::invalid(format!(
            "{flag} {n} is larger than {of} ({most}): it is a share of it"
        ))
        .hint(format!("give {flag} a number from 1 to {most}, or raise {of}"))),
        _ => Err(
            Error::invalid(format!("{flag} {t:?} is not a number from 1 to {most}"))
                .hint(format!("for example: {flag} {}", (most / 2).max(1))),
        ),
    }
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
    let max_exposed = parse_budget(
        "--max-exposed",
        args.max_exposed.as_deref(),
        max_conns,
        "--max-conns",
    )?;
    // Checked against the --max-exposed it would run with (its default
    // when not given), so an impossible pair is refused here, not capped.
    let exposed_cap = max_exposed.unwrap_or(crate::limits::fit_exposed(max_conns, max_conns, None, None).0);
    let over = if max_exposed.is_some() {
        "--max-exposed"
    } else {
        "--max-exposed (by default half of --max-conns)"
    };
    let max_per_peer = parse_budget("--max-per-peer", args.max_per_peer.as_deref(), exposed_cap, over)?;
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
        max_exposed,
        max_per_peer,
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
