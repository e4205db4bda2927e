//! The command line: parsing (three spellings of it) and help.
//!
//! The same program answers to
//! - `pilot-gateway [FLAGS] COMMAND …` — flags before or after the command;
//! - `pilotctl [--json] gateway COMMAND …` and `pilotctl extras gateway …`
//!   when invoked through a link named `pilotctl`;
//! - upstream's standalone form, `pilot-gateway -socket S -subnet C run ADDR…`,
//!   with one dash as Go's flag package writes it.
//!
//! Single-dash long flags are rewritten to double-dash before `lexopt`
//! sees them, so one parser serves all forms.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use lexopt::prelude::*;

use crate::error::{Code, Error, Result};

/// A mapping the user asked for on `start`: an address or a hostname, and
/// perhaps a chosen local IP and its own ports (`--map`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    /// The mapping's own ports; `None`: the gateway's `--ports`.
    pub ports: Option<Vec<u16>>,
}

impl Target {
    /// `start --map ADDR[,ip=IP][,ports=P+P…]`: one mapping with its own
    /// local IP and ports. `,` separates the options, so ports are joined
    /// with `+` (as `--expose`'s peers are); bare numbers after `ports=`
    /// continue its list too (`ports=80,9000`).
    pub fn parse_map(spec: &str) -> Result<Target> {
        let hint = "for example: --map lab-b,ports=80+9000 or --map 0:0000.0000.0004,ip=10.4.0.7,ports=22";
        let mut parts = spec.split(',');
        let name = parts.next().unwrap_or_default().trim();
        if name.is_empty() || name.contains('=') {
            return Err(Error::usage(format!(
                "--map {spec:?} does not start with a pilot address or hostname"
            ))
            .hint(hint));
        }
        let mut t = Target {
            name: name.to_string(),
            ip: None,
            ports: None,
        };
        let mut in_ports = false;
        for opt in parts {
            match opt.split_once('=') {
                Some(("ip", ip)) => {
                    in_ports = false;
                    t.ip = Some(ip.parse().map_err(|_| {
                        Error::usage(format!("--map {spec:?}: ip={ip:?} is not an IPv4 address")).hint(hint)
                    })?);
                }
                Some(("ports", list)) => {
                    in_ports = true;
                    t.ports = Some(crate::subnet::parse_ports(&list.replace('+', ","))?);
                }
                None if in_ports && !opt.is_empty() => {
                    let more = crate::subnet::parse_ports(&opt.replace('+', ","))?;
                    let ports = t.ports.get_or_insert_with(Vec::new);
                    for p in more {
                        if !ports.contains(&p) {
                            ports.push(p);
                        }
                    }
                }
                _ => {
                    return Err(Error::usage(format!("--map {spec:?}: unknown option {opt:?}"))
                        .hint(format!("the options are ip=IP and ports=P+P…; {hint}")))
                }
            }
        }
        Ok(t)
    }
}

/// An exposure the user asked for (`expose`, `start --expose`): pilot port
/// `port` serves the local TCP service `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expose {
    pub port: u16,
    pub target: SocketAddr,
    /// `--allow` entries as given (addresses or hostnames); `None`: no
    /// list, whoever the daemon lets in.
    pub allow: Option<Vec<String>>,
    pub allow_remote_target: bool,
    /// `--proxy-protocol` / `,proxy`: a PROXY v2 header before any data.
    pub proxy_protocol: bool,
}

impl Expose {
    /// `PILOT_PORT` and `[HOST:]PORT` of `expose`; a bare PORT is on
    /// 127.0.0.1, HOST is an IP address (`[::1]:22` for IPv6) or localhost.
    pub fn parse(port: &str, target: &str) -> Result<Expose> {
        let port = port.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| {
            Error::invalid(format!("pilot port {port:?} is not a number from 1 to 65535"))
                .hint("for example: pilot-gateway expose 80 127.0.0.1:8000")
        })?;
        let bad = || {
            Error::new(
                Code::BadTarget,
                format!("target {target:?} is not [HOST:]PORT (HOST an IP address, PORT 1-65535)"),
            )
            .hint("for example 8000 (meaning 127.0.0.1:8000), 127.0.0.1:22 or [::1]:5432")
        };
        let target = if let Ok(p) = target.parse::<u16>() {
            SocketAddr::from((Ipv4Addr::LOCALHOST, p))
        } else if let Some(p) = target.strip_prefix("localhost:") {
            SocketAddr::from((Ipv4Addr::LOCALHOST, p.parse::<u16>().map_err(|_| bad())?))
        } else {
            crate::expose::canonical(target.parse::<SocketAddr>().map_err(|_| bad())?)
        };
        if target.port() == 0 {
            return Err(bad());
        }
        Ok(Expose {
            port,
            target,
            allow: None,
            allow_remote_target: false,
            proxy_protocol: false,
        })
    }

    /// `start --expose P=[HOST:]PORT[,allow=PEER+PEER…][,proxy]`: `+` separates
    /// peers because `,` separates the exposure's options.
    pub fn parse_start(spec: &str) -> Result<Expose> {
        let mut parts = spec.split(',');
        let head = parts.next().unwrap_or_default();
        let (port, target) = head.split_once('=').ok_or_else(|| {
            Error::usage(format!("--expose {spec:?} is not PILOT_PORT=[HOST:]PORT")).hint(
                "for example: --expose 80=8000 or --expose 2222=127.0.0.1:22,allow=lab-a+0:0000.0000.0007",
            )
        })?;
        let mut e = Expose::parse(port, target)?;
        for opt in parts {
            match opt.split_once('=') {
                Some(("allow", peers)) => e.allow = Some(split_peers(peers, '+')?),
                None if opt == "proxy" => e.proxy_protocol = true,
                _ => {
                    return Err(Error::usage(format!("--expose {spec:?}: unknown option {opt:?}"))
                        .hint("the options are allow=PEER+PEER… and proxy"))
                }
            }
        }
        Ok(e)
    }

    /// Whether the target is this host's loopback (the safe default).
    pub fn is_loopback(&self) -> bool {
        match self.target.ip() {
            IpAddr::V4(ip) => ip.is_loopback(),
            IpAddr::V6(ip) => ip.is_loopback(),
        }
    }
}

/// `--allow` peers: `sep`-separated addresses or hostnames, none empty.
pub fn split_peers(text: &str, sep: char) -> Result<Vec<String>> {
    let peers: Vec<String> = text.split(sep).map(|p| p.trim().to_string()).collect();
    if peers.iter().any(String::is_empty) {
        return Err(Error::usage(format!("--allow {text:?} has an empty entry"))
            .hint("list peers as ADDR|HOSTNAME,… for example --allow lab-a,0:0000.0000.0007"));
    }
    Ok(peers)
}

/// Every flag and the commands that use it (`*`: every command), in one
/// table: a flag given to a command not listed is refused, naming the
/// commands it belongs to; an unknown flag gets the nearest known one.
/// `run` counts as `start`. Go-style `-flag` forms are accepted too.
/// `map` takes `--subnet` because upstream's `map` is called with it
/// (checked against the running gateway's), and `--ports` as the
/// mapping's own ports.
const FLAGS: &[(&str, &[&str])] = &[
    ("json", &["*"]),
    ("socket", &["*"]),
    ("state-dir", &["*"]),
    ("config", &["*"]),
    ("log-level", &["*"]),
    ("log-format", &["*"]),
    ("help", &["*"]),
    ("version", &["*"]),
    ("subnet", &["start", "map"]),
    ("ports", &["start", "map"]),
    ("map", &["start"]),
    ("foreground", &["start"]),
    ("max-conns", &["start"]),
    ("max-exposed", &["start"]),
    ("max-per-peer", &["start"]),
    ("dial-timeout", &["start"]),
    ("idle-timeout", &["start"]),
    ("half-closed-timeout", &["start"]),
    ("close-linger", &["start"]),
    ("access-log", &["start"]),
    ("access-log-format", &["start"]),
    ("user", &["start"]),
    ("no-user-switch", &["start"]),
    ("allow-any-subnet", &["start"]),
    ("allow-remote", &["start"]),
    ("expose", &["start"]),
    ("allow", &["expose"]),
    ("allow-remote-target", &["expose", "start"]),
    ("proxy-protocol", &["expose"]),
    ("drain", &["stop", "unmap", "unexpose"]),
    ("wait", &["stop", "unmap", "unexpose"]),
];

/// The commands a flag belongs to, if it is one.
fn flag_commands(name: &str) -> Option<&'static [&'static str]> {
    FLAGS.iter().find(|(f, _)| *f == name).map(|(_, c)| *c)
}

fn is_flag(name: &str) -> bool {
    flag_commands(name).is_some()
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_string(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// Refuses the first flag given that `cmd` does not use.
fn check_flags_fit(given: &[String], cmd: &str) -> Result<()> {
    let as_cmd = if cmd == "run" { "start" } else { cmd };
    for name in given {
        let Some(cmds) = flag_commands(name) else {
            continue;
        };
        if !cmds.contains(&"*") && !cmds.contains(&as_cmd) {
            return Err(Error::usage(format!(
                "--{name} is an option of {}, not of {cmd}",
                and_list(cmds)
            ))
            .hint(format!("see: pilot-gateway {cmd} --help")));
        }
    }
    Ok(())
}

/// The known flag nearest to an unknown one (`--port` → `--ports`), if
/// one is close: a prefix either way, or at most two edits apart.
fn nearest_flag(unknown: &str) -> Option<&'static str> {
    let unknown = unknown.trim_start_matches('-');
    let unknown = unknown.split('=').next().unwrap_or_default();
    if unknown.len() < 2 {
        return None;
    }
    FLAGS
        .iter()
        .map(|(f, _)| (*f, edit_distance(unknown, f)))
        .filter(|(f, d)| *d <= 2 || f.starts_with(unknown) || unknown.starts_with(f))
        .min_by_key(|(_, d)| *d)
        .map(|(f, _)| f)
}

/// Levenshtein distance (flag names are short: the table is tiny).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `start`, or upstream's `run` (`legacy`: foreground, upstream output).
    Start {
        targets: Vec<Target>,
        legacy: bool,
    },
    Map {
        target: String,
        ip: Option<String>,
    },
    Unmap {
        ip: String,
    },
    /// `expose PILOT_PORT [HOST:]PORT` (`--allow`, `--allow-remote-target`
    /// are filled in from the flags).
    Expose(Expose),
    Unexpose {
        port: String,
    },
    List,
    Status,
    Stop,
    Help(Option<String>),
    Version,
}

/// The parsed command line. Values stay as text here; each command checks
/// the ones it uses, so errors name the flag.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Args {
    pub json: bool,
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub subnet: Option<String>,
    pub ports: Option<String>,
    pub foreground: bool,
    pub max_conns: Option<String>,
    /// `--max-exposed N`: slots of `--max-conns` exposures may hold.
    pub max_exposed: Option<String>,
    /// `--max-per-peer N`: exposed connections one peer node may hold.
    pub max_per_peer: Option<String>,
    pub dial_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub half_closed_timeout: Option<String>,
    /// `--close-linger SECS` (see `closing`).
    pub close_linger: Option<String>,
    pub access_log: Option<String>,
    pub access_log_format: Option<String>,
    pub user: Option<String>,
    pub no_user_switch: bool,
    pub allow_any_subnet: bool,
    pub allow_remote: bool,
    /// `start --expose SPEC`, repeatable, as given.
    pub expose: Vec<String>,
    /// `expose --allow PEERS`.
    pub allow: Option<String>,
    /// `expose`/`start --allow-remote-target`.
    pub allow_remote_target: bool,
    /// `expose --proxy-protocol`.
    pub proxy_protocol: bool,
    /// `stop`/`unmap`/`unexpose --drain SECS`.
    pub drain: Option<String>,
    /// `stop`/`unmap`/`unexpose --wait`: wait for the drain to end.
    pub wait: bool,
    pub command: Option<Command>,
    /// Invoked as `pilotctl` (affects help text only).
    pub pilotctl: bool,
    /// `start --map SPEC`, repeatable, as given.
    pub map: Vec<String>,
    /// The flags given (names without dashes), to refuse those the
    /// command does not use.
    given: Vec<String>,
}

/// Rewrites Go-style `-flag` / `-flag=value` to `--flag…` for known flags.
fn normalize(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut done = false;
    for a in args {
        // Known flags, and any other `-word` of two letters or more, so
        // that an unknown one is named as a whole (with a suggestion)
        // rather than as a bundle of short options.
        let rewrite = !done
            && a.to_str().is_some_and(|s| {
                let name = s
                    .get(1..)
                    .unwrap_or_default()
                    .split('=')
                    .next()
                    .unwrap_or_default();
                s.starts_with('-')
                    && !s.starts_with("--")
                    && (is_flag(name)
                        || (name.len() >= 2 && name.chars().all(|c| c.is_ascii_lowercase() || c == '-')))
            });
        if a == "--" {
            done = true;
        }
        if rewrite {
            let mut s = OsString::from("-");
            s.push(&a);
            out.push(s);
        } else {
            out.push(a);
        }
    }
    out
}

fn usage_err(e: lexopt::Error) -> Error {
    let (msg, near) = match e {
        lexopt::Error::UnexpectedOption(o) => {
            let near = nearest_flag(&o);
            (format!("unknown flag {o}"), near)
        }
        lexopt::Error::MissingValue { option: Some(o) } => (format!("flag {o} needs a value"), None),
        other => (other.to_string(), None),
    };
    match near {
        Some(f) => Error::usage(format!("{msg}: did you mean --{f}?")).hint(format!(
            "--{f} is an option of {}; see: pilot-gateway --help",
            flag_commands(f).map_or_else(String::new, |c| {
                if c.contains(&"*") {
                    "every command".into()
                } else {
                    and_list(c)
                }
            })
        )),
        None => Error::usage(msg).hint("see: pilot-gateway --help"),
    }
}

/// A boolean flag: `--json`, or Go's `-json=true` / `-json=false`.
fn flag_bool(p: &mut lexopt::Parser, name: &str) -> Result<bool> {
    match p.optional_value() {
        None => Ok(true),
        Some(v) => match v.to_str() {
            Some("true" | "1" | "t" | "T" | "TRUE" | "True") => Ok(true),
            Some("false" | "0" | "f" | "F" | "FALSE" | "False") => Ok(false),
            _ => Err(Error::usage(format!(
                "--{name} takes no value (or =true / =false), got {v:?}"
            ))),
        },
    }
}

fn text(p: &mut lexopt::Parser) -> Result<String> {
    p.value()
        .map_err(usage_err)?
        .into_string()
        .map_err(|v| Error::usage(format!("value {v:?} is not valid UTF-8")))
}

/// Parses `argv[1..]`; `argv0` decides whether we are `pilotctl`.
pub fn parse(argv0: &str, args: Vec<OsString>) -> Result<Args> {
    let mut a = Args {
        pilotctl: std::path::Path::new(argv0)
            .file_name()
            .is_some_and(|n| n == "pilotctl"),
        ..Args::default()
    };
    let (mut words, help) = read_flags(&mut a, args)?;
    if a.pilotctl {
        strip_pilotctl_prefix(&mut words, help || a.command == Some(Command::Version))?;
    }
    if a.command == Some(Command::Version) {
        return Ok(a);
    }
    let mut words = words.into_iter();
    let cmd = words.next();
    let rest: Vec<String> = words.collect();
    if help || cmd.as_deref() == Some("help") {
        let topic = if cmd.as_deref() == Some("help") {
            rest.first().cloned()
        } else {
            cmd
        };
        a.command = Some(Command::Help(topic));
        return Ok(a);
    }
    let Some(cmd) = cmd else {
        return Err(Error::usage("no command given")
            .hint("usage: pilot-gateway start|stop|map|unmap|expose|unexpose|list|status (see --help)"));
    };
    // Known commands only: an unknown one is named as such below.
    if command_words().contains(&cmd.as_str()) {
        check_flags_fit(&a.given, &cmd)?;
    }
    let mut command = parse_command(&cmd, &rest)?;
    match &mut command {
        Command::Expose(e) => {
            e.allow = a.allow.as_deref().map(|t| split_peers(t, ',')).transpose()?;
            e.allow_remote_target = a.allow_remote_target;
            e.proxy_protocol = a.proxy_protocol;
        }
        Command::Start { targets, .. } => {
            for spec in &a.map {
                targets.push(Target::parse_map(spec)?);
            }
        }
        _ => {}
    }
    a.command = Some(command);
    Ok(a)
}

/// The command words `parse_command` knows.
fn command_words() -> &'static [&'static str] {
    &[
        "start", "run", "map", "unmap", "expose", "unexpose", "list", "status", "stop", "version",
    ]
}

/// Reads every flag into `a`; returns the other words and whether help
/// was asked for.
fn read_flags(a: &mut Args, args: Vec<OsString>) -> Result<(Vec<String>, bool)> {
    let mut words: Vec<String> = Vec::new();
    let mut help = false;
    let mut p = lexopt::Parser::from_args(normalize(args));
    while let Some(arg) = p.next().map_err(usage_err)? {
        if let Long(name) = &arg {
            a.given.push((*name).to_string());
        }
        match arg {
            Long("json") => a.json = flag_bool(&mut p, "json")?,
            Short('h') | Long("help") => help = true,
            Short('V') | Long("version") => a.command = Some(Command::Version),
            Long("socket") => a.socket = Some(text(&mut p)?.into()),
            Long("state-dir") => a.state_dir = Some(text(&mut p)?.into()),
            Long("config") => a.config = Some(text(&mut p)?.into()),
            Long("log-level") => a.log_level = Some(text(&mut p)?),
            Long("log-format") => a.log_format = Some(text(&mut p)?),
            Long("subnet") => a.subnet = Some(text(&mut p)?),
            Long("ports") => a.ports = Some(text(&mut p)?),
            Long("foreground") => a.foreground = flag_bool(&mut p, "foreground")?,
            Long("max-conns") => a.max_conns = Some(text(&mut p)?),
            Long("max-exposed") => a.max_exposed = Some(text(&mut p)?),
            Long("max-per-peer") => a.max_per_peer = Some(text(&mut p)?),
            Long("dial-timeout") => a.dial_timeout = Some(text(&mut p)?),
            Long("idle-timeout") => a.idle_timeout = Some(text(&mut p)?),
            Long("half-closed-timeout") => a.half_closed_timeout = Some(text(&mut p)?),
            Long("close-linger") => a.close_linger = Some(text(&mut p)?),
            Long("access-log") => a.access_log = Some(text(&mut p)?),
            Long("access-log-format") => a.access_log_format = Some(text(&mut p)?),
            Long("user") => a.user = Some(text(&mut p)?),
            Long("no-user-switch") => a.no_user_switch = flag_bool(&mut p, "no-user-switch")?,
            Long("allow-any-subnet") => a.allow_any_subnet = flag_bool(&mut p, "allow-any-subnet")?,
            Long("allow-remote") => a.allow_remote = flag_bool(&mut p, "allow-remote")?,
            Long("drain") => a.drain = Some(text(&mut p)?),
            Long("wait") => a.wait = flag_bool(&mut p, "wait")?,
            Long("expose") => a.expose.push(text(&mut p)?),
            Long("map") => a.map.push(text(&mut p)?),
            Long("allow") => a.allow = Some(text(&mut p)?),
            Long("allow-remote-target") => a.allow_remote_target = flag_bool(&mut p, "allow-remote-target")?,
            Long("proxy-protocol") => a.proxy_protocol = flag_bool(&mut p, "proxy-protocol")?,
            Value(v) => words.push(
                v.into_string()
                    .map_err(|v| Error::usage(format!("argument {v:?} is not valid UTF-8")))?,
            ),
            other => return Err(usage_err(other.unexpected())),
        }
    }
    Ok((words, help))
}

/// `pilotctl gateway …` | `pilotctl extras gateway …`: drops the prefix.
/// Bare `pilotctl --help` / `--version` need none.
fn strip_pilotctl_prefix(words: &mut Vec<String>, bare_ok: bool) -> Result<()> {
    let skip = match words.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["gateway", ..] => 1,
        ["extras", "gateway", ..] => 2,
        [] if bare_ok => 0,
        _ => {
            return Err(Error::usage("this pilotctl provides only the gateway commands")
                .hint("usage: pilotctl [--json] gateway start|stop|map|unmap|expose|unexpose|list|status …"))
        }
    };
    words.drain(..skip);
    Ok(())
}

/// The command word and its arguments.
fn parse_command(cmd: &str, rest: &[String]) -> Result<Command> {
    let n = rest.len();
    let arity = |min: usize, max: usize, form: &str| -> Result<()> {
        if n < min || n > max {
            Err(Error::usage(format!(
                "{cmd} takes {form}, got {n} argument{}",
                if n == 1 { "" } else { "s" }
            ))
            .hint(format!("usage: pilot-gateway {cmd} {form}")))
        } else {
            Ok(())
        }
    };
    Ok(match cmd {
        "start" | "run" => Command::Start {
            targets: parse_targets(rest)?,
            legacy: cmd == "run",
        },
        "map" => {
            arity(1, 2, "PILOT_ADDR [LOCAL_IP]")?;
            Command::Map {
                target: rest[0].clone(),
                ip: rest.get(1).cloned(),
            }
        }
        "unmap" => {
            arity(1, 1, "LOCAL_IP")?;
            Command::Unmap { ip: rest[0].clone() }
        }
        "expose" => {
            arity(2, 2, "PILOT_PORT [HOST:]PORT")?;
            Command::Expose(Expose::parse(&rest[0], &rest[1])?)
        }
        "unexpose" => {
            arity(1, 1, "PILOT_PORT")?;
            Command::Unexpose {
                port: rest[0].clone(),
            }
        }
        "list" => {
            arity(0, 0, "no arguments")?;
            Command::List
        }
        "status" => {
            arity(0, 0, "no arguments")?;
            Command::Status
        }
        "stop" => {
            arity(0, 0, "no arguments")?;
            Command::Stop
        }
        "version" => Command::Version,
        other => {
            return Err(Error::usage(format!("unknown command {other:?}"))
                .hint("commands: start, stop, map, unmap, expose, unexpose, list, status (see --help)"))
        }
    })
}

/// `ADDR [IP] ADDR [IP] …`: an IPv4 address right after a target is the
/// local IP that target should get.
fn parse_targets(words: &[String]) -> Result<Vec<Target>> {
    let mut targets: Vec<Target> = Vec::new();
    for w in words {
        if let Ok(ip) = w.parse::<Ipv4Addr>() {
            match targets.last_mut() {
                Some(t) if t.ip.is_none() => t.ip = Some(ip),
                _ => {
                    return Err(
                        Error::usage(format!("local IP {ip} does not follow a pilot address"))
                            .hint("write the address first: ADDR [LOCAL_IP] …"),
                    )
                }
            }
        } else {
            targets.push(Target {
                name: w.clone(),
                ip: None,
                ports: None,
            });
        }
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::help::{command_help, USAGE};

    fn p(argv: &[&str]) -> Result<Args> {
        parse(argv[0], argv[1..].iter().map(OsString::from).collect())
    }

    fn t(name: &str, ip: Option<[u8; 4]>) -> Target {
        Target {
            name: name.into(),
            ip: ip.map(Ipv4Addr::from),
            ports: None,
        }
    }

    #[test]
    fn modern_form() {
        let a = p(&[
            "pilot-gateway",
            "--socket",
            "/s",
            "start",
            "--foreground",
            "--ports",
            "80",
            "0:0000.0000.0004",
        ])
        .unwrap();
        assert_eq!(a.socket, Some("/s".into()));
        assert!(a.foreground);
        assert_eq!(a.ports.as_deref(), Some("80"));
        assert_eq!(
            a.command,
            Some(Command::Start {
                targets: vec![t("0:0000.0000.0004", None)],
                legacy: false
            })
        );
        let a = p(&["pilot-gateway", "list", "--json"]).unwrap();
        assert!(a.json);
        assert_eq!(a.command, Some(Command::List));
    }

    #[test]
    fn go_form() {
        let a = p(&[
            "pilot-gateway",
            "-socket",
            "/s",
            "-subnet=10.9.0.0/16",
            "--ports",
            "80",
            "run",
            "0:0000.0000.0004",
            "10.9.0.7",
            "lab-b",
        ])
        .unwrap();
        assert_eq!(a.socket, Some("/s".into()));
        assert_eq!(a.subnet.as_deref(), Some("10.9.0.0/16"));
        assert_eq!(
            a.command,
            Some(Command::Start {
                targets: vec![t("0:0000.0000.0004", Some([10, 9, 0, 7])), t("lab-b", None)],
                legacy: true
            })
        );
        let a = p(&[
            "pilot-gateway",
            "-json=false",
            "-config",
            "c.json",
            "map",
            "0:0000.0000.0004",
        ])
        .unwrap();
        assert!(!a.json);
        assert_eq!(a.config, Some("c.json".into()));
    }

    #[test]
    fn pilotctl_forms() {
        for argv in [
            &["/usr/bin/pilotctl", "--json", "gateway", "list"][..],
            &["pilotctl", "gateway", "list", "--json"],
            &["pilotctl", "--json", "extras", "gateway", "list"],
        ] {
            let a = p(argv).unwrap();
            assert!(a.json && a.pilotctl, "{argv:?}");
            assert_eq!(a.command, Some(Command::List));
        }
        assert!(p(&["pilotctl", "info"])
            .unwrap_err()
            .message
            .contains("only the gateway"));
    }

    #[test]
    fn usage_errors() {
        for (argv, want) in [
            (&["pilot-gateway"][..], "no command"),
            (&["pilot-gateway", "frobnicate"], "unknown command"),
            (&["pilot-gateway", "--bogus", "list"], "unknown flag --bogus"),
            (
                &["pilot-gateway", "map"],
                "map takes PILOT_ADDR [LOCAL_IP], got 0",
            ),
            (
                &["pilot-gateway", "unmap", "1", "2"],
                "unmap takes LOCAL_IP, got 2",
            ),
            (
                &["pilot-gateway", "list", "--foreground"],
                "--foreground is an option of start",
            ),
            (
                &["pilot-gateway", "start", "10.4.0.1"],
                "does not follow a pilot address",
            ),
            (&["pilot-gateway", "start", "--ports"], "needs a value"),
            (&["pilot-gateway", "--json=maybe", "list"], "takes no value"),
        ] {
            let e = p(argv).unwrap_err();
            assert_eq!(e.code, crate::error::Code::Usage, "{argv:?}");
            assert!(e.message.contains(want), "{argv:?}: {}", e.message);
        }
    }

    #[test]
    fn unused_flags_are_refused_naming_their_commands() {
        for (argv, want) in [
            (
                &["pilot-gateway", "list", "--subnet", "10.9.0.0/16"][..],
                "--subnet is an option of start and map, not of list",
            ),
            (
                &["pilot-gateway", "status", "--ports", "80"],
                "--ports is an option of start and map, not of status",
            ),
            (
                &["pilot-gateway", "unmap", "10.4.0.1", "-ports=80"],
                "--ports is an option of start and map, not of unmap",
            ),
            (
                &["pilot-gateway", "list", "--max-conns", "5"],
                "--max-conns is an option of start, not of list",
            ),
            (
                &["pilot-gateway", "map", "x", "--map", "y"],
                "--map is an option of start, not of map",
            ),
            (
                &["pilot-gateway", "stop", "--allow", "a"],
                "--allow is an option of expose, not of stop",
            ),
            (
                &["pilotctl", "gateway", "list", "--drain", "1"],
                "--drain is an option of stop, unmap and unexpose, not of list",
            ),
        ] {
            let e = p(argv).unwrap_err();
            assert_eq!(e.code, crate::error::Code::Usage, "{argv:?}");
            assert!(e.message.contains(want), "{argv:?}: {}", e.message);
        }
        // What each command does use stays accepted.
        for argv in [
            &[
                "pilot-gateway",
                "map",
                "x",
                "--ports",
                "80",
                "--subnet",
                "10.4.0.0/16",
            ][..],
            &[
                "pilot-gateway",
                "-ports",
                "80",
                "-subnet",
                "10.9.0.0/16",
                "run",
                "x",
            ],
            &[
                "pilot-gateway",
                "--socket",
                "/s",
                "--state-dir",
                "/d",
                "--json",
                "list",
            ],
            &["pilot-gateway", "unexpose", "80", "--drain", "2"],
        ] {
            assert!(p(argv).is_ok(), "{argv:?}");
        }
    }

    #[test]
    fn unknown_flags_get_the_nearest_one() {
        for (argv, want) in [
            (
                &["pilot-gateway", "start", "--port", "80"][..],
                "unknown flag --port: did you mean --ports?",
            ),
            (
                &["pilot-gateway", "-port", "80", "run"],
                "unknown flag --port: did you mean --ports?",
            ),
            (
                &["pilot-gateway", "start", "--forground"],
                "did you mean --foreground?",
            ),
            (
                &["pilot-gateway", "stop", "--drian", "1"],
                "did you mean --drain?",
            ),
        ] {
            let e = p(argv).unwrap_err();
            assert_eq!(e.code, crate::error::Code::Usage, "{argv:?}");
            assert!(e.message.contains(want), "{argv:?}: {}", e.message);
        }
        let e = p(&["pilot-gateway", "--zzzzzzzz", "list"]).unwrap_err();
        assert!(!e.message.contains("did you mean"), "{}", e.message);
    }

    #[test]
    fn start_map_specs() {
        let a = p(&[
            "pilot-gateway",
            "start",
            "0:0000.0000.0004",
            "--map",
            "lab-b,ports=80,9000",
            "-map=0:0000.0000.0006,ip=10.4.0.9,ports=22+80",
        ])
        .unwrap();
        let want = |name: &str, ip: Option<[u8; 4]>, ports: Option<Vec<u16>>| Target { ports, ..t(name, ip) };
        assert_eq!(
            a.command,
            Some(Command::Start {
                targets: vec![
                    t("0:0000.0000.0004", None),
                    want("lab-b", None, Some(vec![80, 9000])),
                    want("0:0000.0000.0006", Some([10, 4, 0, 9]), Some(vec![22, 80])),
                ],
                legacy: false
            })
        );
        for bad in [
            "",
            "ip=10.4.0.1",
            "lab-b,ip=x",
            "lab-b,ports=0",
            "lab-b,bogus=1",
            "lab-b,80",
        ] {
            assert!(Target::parse_map(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_flag_in_both_spellings() {
        // (flag, a value or None for booleans, what it sets)
        let value_flags = [
            "socket",
            "state-dir",
            "config",
            "log-level",
            "log-format",
            "subnet",
            "ports",
            "max-conns",
            "max-exposed",
            "max-per-peer",
            "dial-timeout",
            "idle-timeout",
            "half-closed-timeout",
            "close-linger",
            "access-log",
            "access-log-format",
            "user",
        ];
        for name in value_flags {
            for form in [format!("-{name}"), format!("--{name}")] {
                for joined in [false, true] {
                    let mut argv = vec!["pilot-gateway".to_string()];
                    if joined {
                        argv.push(format!("{form}=V"));
                    } else {
                        argv.extend([form.clone(), "V".into()]);
                    }
                    argv.push("start".into());
                    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                    let a = p(&argv).unwrap_or_else(|e| panic!("{argv:?}: {}", e.message));
                    let got = match name {
                        "socket" => a.socket.map(|p| p.display().to_string()),
                        "state-dir" => a.state_dir.map(|p| p.display().to_string()),
                        "config" => a.config.map(|p| p.display().to_string()),
                        "log-level" => a.log_level,
                        "log-format" => a.log_format,
                        "subnet" => a.subnet,
                        "ports" => a.ports,
                        "max-conns" => a.max_conns,
                        "max-exposed" => a.max_exposed,
                        "max-per-peer" => a.max_per_peer,
                        "dial-timeout" => a.dial_timeout,
                        "idle-timeout" => a.idle_timeout,
                        "half-closed-timeout" => a.half_closed_timeout,
                        "close-linger" => a.close_linger,
                        "access-log" => a.access_log,
                        "access-log-format" => a.access_log_format,
                        _ => a.user,
                    };
                    assert_eq!(got.as_deref(), Some("V"), "{argv:?}");
                }
            }
        }
        for name in ["json", "foreground", "no-user-switch", "allow-any-subnet"] {
            for form in [
                format!("-{name}"),
                format!("--{name}"),
                format!("-{name}=true"),
                format!("--{name}=1"),
            ] {
                let a = p(&["pilot-gateway", &form, "start"]).unwrap();
                let got = match name {
                    "json" => a.json,
                    "foreground" => a.foreground,
                    "no-user-switch" => a.no_user_switch,
                    _ => a.allow_any_subnet,
                };
                assert!(got, "{form}");
            }
            let a = p(&["pilot-gateway", &format!("-{name}=false"), "start"]).unwrap();
            assert!(
                !(a.json || a.foreground || a.no_user_switch || a.allow_any_subnet),
                "{name}=false"
            );
        }
    }

    #[test]
    fn manual_and_help_cover_every_flag_and_command() {
        let manual = include_str!("../doc/pilot-gateway.8");
        let help = format!(
            "{USAGE}{}{}",
            command_help("start").unwrap_or_default(),
            command_help("stop").unwrap_or_default(),
        ) + command_help("expose").unwrap_or_default();
        for (flag, _) in FLAGS {
            let roff = format!("\\-\\-{}", flag.replace('-', "\\-"));
            assert!(manual.contains(&roff), "manual lacks --{flag}");
            assert!(help.contains(&format!("--{flag}")), "help lacks --{flag}");
        }
        for cmd in [
            "start", "run", "map", "unmap", "expose", "unexpose", "list", "status", "stop",
        ] {
            assert!(
                manual.contains(&format!(".BR {cmd}")) || manual.contains(&format!(".B {cmd}")),
                "manual lacks {cmd}"
            );
            assert!(command_help(cmd).is_some(), "no help for {cmd}");
        }
        for code in [
            "invalid_argument",
            "not_running",
            "daemon_unreachable",
            "subnet_exhausted",
            "address_in_use",
            "port_in_use",
            "bad_target",
        ] {
            assert!(manual.contains(code), "manual lacks {code}");
        }
    }

    #[test]
    fn expose_forms() {
        let a = p(&["pilot-gateway", "expose", "80", "8000"]).unwrap();
        let want = |port, target: &str, allow: Option<Vec<&str>>, remote| Expose {
            port,
            target: target.parse().unwrap(),
            allow: allow.map(|l| l.into_iter().map(String::from).collect()),
            allow_remote_target: remote,
            proxy_protocol: false,
        };
        assert_eq!(
            a.command,
            Some(Command::Expose(want(80, "127.0.0.1:8000", None, false)))
        );
        let a = p(&[
            "pilotctl",
            "gateway",
            "expose",
            "2222",
            "[::1]:22",
            "--allow",
            "lab-a,0:0000.0000.0007",
            "--allow-remote-target",
        ])
        .unwrap();
        assert_eq!(
            a.command,
            Some(Command::Expose(want(
                2222,
                "[::1]:22",
                Some(vec!["lab-a", "0:0000.0000.0007"]),
                true
            )))
        );
        assert_eq!(
            Expose::parse_start("2222=127.0.0.1:22,allow=lab-a+0:0000.0000.0007").unwrap(),
            want(
                2222,
                "127.0.0.1:22",
                Some(vec!["lab-a", "0:0000.0000.0007"]),
                false
            )
        );
        let a = p(&[
            "pilot-gateway",
            "start",
            "--expose",
            "80=8000",
            "-expose=81=8001",
            "--allow-remote-target",
        ])
        .unwrap();
        assert_eq!(a.expose, vec!["80=8000", "81=8001"]);
        assert!(a.allow_remote_target);
        assert_eq!(
            p(&["pilot-gateway", "unexpose", "80"]).unwrap().command,
            Some(Command::Unexpose { port: "80".into() })
        );
    }

    #[test]
    fn proxy_protocol_forms() {
        let a = p(&["pilot-gateway", "expose", "80", "8000", "--proxy-protocol"]).unwrap();
        assert!(matches!(a.command, Some(Command::Expose(e)) if e.proxy_protocol));
        let e = Expose::parse_start("80=8000,allow=lab-a,proxy").unwrap();
        assert!(e.proxy_protocol && e.allow == Some(vec!["lab-a".to_string()]));
        assert!(!Expose::parse_start("80=8000").unwrap().proxy_protocol);
        assert!(Expose::parse_start("80=8000,proxy=1").is_err());
        for argv in [
            &["pilot-gateway", "map", "0:0000.0000.0004", "--proxy-protocol"][..],
            &["pilot-gateway", "start", "--proxy-protocol"][..],
        ] {
            let err = p(argv).unwrap_err();
            assert!(
                err.to_string()
                    .contains("--proxy-protocol is an option of expose"),
                "{err}"
            );
        }
    }

    #[test]
    fn expose_errors() {
        for (argv, code, want) in [
            (
                &["pilot-gateway", "expose", "0", "8000"][..],
                "invalid_argument",
                "pilot port",
            ),
            (
                &["pilot-gateway", "expose", "80", "8000:x"],
                "bad_target",
                "not [HOST:]PORT",
            ),
            (
                &["pilot-gateway", "expose", "80", "127.0.0.1:0"],
                "bad_target",
                "not [HOST:]PORT",
            ),
            (
                &["pilot-gateway", "expose", "80"],
                "invalid_argument",
                "expose takes",
            ),
            (
                &["pilot-gateway", "expose", "80", "1", "--allow", "a,,b"],
                "invalid_argument",
                "empty entry",
            ),
            (
                &["pilot-gateway", "map", "0:0000.0000.0004", "--allow", "a"],
                "invalid_argument",
                "--allow is an option of expose",
            ),
            (
                &["pilot-gateway", "list", "--allow-remote-target"],
                "invalid_argument",
                "option of expose and start",
            ),
            (
                &["pilot-gateway", "expose", "80", "1", "--expose", "1=2"],
                "invalid_argument",
                "--expose is an option of start",
            ),
        ] {
            let e = p(argv).unwrap_err();
            assert_eq!(e.code.as_str(), code, "{argv:?}: {}", e.message);
            assert!(e.message.contains(want), "{argv:?}: {}", e.message);
        }
        assert!(Expose::parse_start("80").is_err());
        assert!(Expose::parse_start("80=8000,bogus=1").is_err());
    }

    #[test]
    fn help_and_version() {
        assert_eq!(
            p(&["pilot-gateway", "--help"]).unwrap().command,
            Some(Command::Help(None))
        );
        assert_eq!(
            p(&["pilot-gateway", "map", "--help"]).unwrap().command,
            Some(Command::Help(Some("map".into())))
        );
        assert_eq!(
            p(&["pilot-gateway", "help", "stop"]).unwrap().command,
            Some(Command::Help(Some("stop".into())))
        );
        assert_eq!(
            p(&["pilot-gateway", "--version"]).unwrap().command,
            Some(Command::Version)
        );
        for c in [
            "start", "run", "map", "unmap", "expose", "unexpose", "list", "status", "stop",
        ] {
            assert!(command_help(c).is_some());
        }
    }
}
