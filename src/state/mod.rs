//! The state directory: the shared state between the running gateway and
//! the commands that steer it.
//!
//! ```text
//! STATE_DIR/            mode 0700, owned by the gateway's user
//!   lock                flock(2) held around every read-modify-write
//!   state.json          desired configuration + the gateway's identity (0600)
//!   stats.json          live counters, written by the gateway on SIGUSR2 (0600)
//!   gateway.log         the background gateway's stderr
//! ```
//!
//! `state.json` is the single source of truth for what should be mapped.
//! A command changes it under the lock, bumps `generation`, and signals the
//! gateway (SIGHUP); the gateway applies the difference under the lock,
//! records a result for each generation it could not apply, and sets
//! `applied`. Writes are atomic (temporary file, fsync, rename), so readers
//! that only look (list, status, waiting commands) need no lock.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use crate::address::PilotAddr;
use crate::error::{Code, Error};
use crate::json::Value;
use crate::sys::proc::ProcId;
use crate::sys::user::Uid;

mod dir;
pub use dir::{resolve_dir, StateDir};

/// Version of the state file format, written and read; a file of any
/// other version is refused. (3: version 2 had no `ports` per mapping,
/// version 1, never released, no `exposures`.)
pub const VERSION: u64 = 3;
/// Most ports one mapping (or the gateway) listens on: a listener is a
/// descriptor and a thread, and a planted state file must not make the
/// gateway open thousands.
pub const MAX_PORTS: usize = 256;
/// Largest state file we read. 1 MiB holds several thousand mappings; a
/// bigger file is refused before it is read, so a planted one cannot make
/// a command eat memory.
const MAX_FILE: u64 = 1 << 20;
/// How many apply results are kept for waiting commands.
const MAX_RESULTS: usize = 256;

/// One mapping as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub local_ip: Ipv4Addr,
    pub pilot_addr: PilotAddr,
    /// The hostname it was mapped by, if any (shown in reports).
    pub hostname: Option<String>,
    /// Whether the gateway added the loopback alias (and so must remove it).
    pub alias_added: bool,
    /// The mapping's own ports (`map … --ports`); `None`: the gateway's.
    pub ports: Option<Vec<u16>>,
    /// The generation that added this mapping, or last changed its ports.
    pub generation: u64,
}

impl Mapping {
    /// The ports this mapping listens on: its own, else the gateway's.
    pub fn ports_or<'a>(&'a self, gateway: &'a [u16]) -> &'a [u16] {
        self.ports.as_deref().unwrap_or(gateway)
    }
}

/// Why a port list (the gateway's or a mapping's) cannot be used: empty,
/// port 0, a port twice, or more than [`MAX_PORTS`].
pub fn check_ports(ports: &[u16]) -> Option<String> {
    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
    if ports.is_empty() {
        Some("the port list is empty".into())
    } else if ports.contains(&0) {
        Some("port 0 is not a valid port".into())
    } else if distinct.len() != ports.len() {
        Some("a port is listed twice".into())
    } else if ports.len() > MAX_PORTS {
        Some(format!(
            "{} ports are more than the {MAX_PORTS} allowed",
            ports.len()
        ))
    } else {
        None
    }
}

/// One exposure as recorded: pilot port `port` of this node serves the
/// local TCP service `target` (`pilot-gateway expose`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposed {
    pub port: u16,
    pub target: SocketAddr,
    /// Admit only these peers (`None`: whoever the daemon lets in), each
    /// with the hostname it was given by, if any (for display only: the
    /// address is what is enforced).
    pub allow: Option<Vec<(PilotAddr, Option<String>)>>,
    /// The target may be another host (`--allow-remote-target`).
    pub allow_remote_target: bool,
    /// Send the service a PROXY protocol v2 header first (`--proxy-protocol`).
    pub proxy_protocol: bool,
    /// The generation that added this exposure.
    pub generation: u64,
}

impl Exposed {
    /// The allow-list as the engine takes it.
    pub fn allow_set(&self) -> Option<std::collections::HashSet<PilotAddr>> {
        self.allow.as_ref().map(|l| l.iter().map(|(a, _)| *a).collect())
    }

    /// Whether `other` asks for the same service (target, peers, remote).
    pub fn same_service(&self, other: &Exposed) -> bool {
        self.port == other.port
            && self.target == other.target
            && self.allow_set() == other.allow_set()
            && self.allow_remote_target == other.allow_remote_target
            && self.proxy_protocol == other.proxy_protocol
    }

    /// The exposure as the state file records it; commands report the same
    /// without `generation` (`output::exposure_json`).
    pub fn to_json(&self) -> Value {
        let allow = self.allow.as_ref().map(|l| {
            Value::Arr(
                l.iter()
                    .map(|(a, name)| {
                        Value::obj([
                            ("addr", Value::from(a.to_string())),
                            ("name", name.clone().into()),
                        ])
                    })
                    .collect(),
            )
        });
        Value::obj([
            ("port", Value::from(self.port)),
            ("target", self.target.to_string().into()),
            ("allow", allow.unwrap_or(Value::Null)),
            ("allow_remote_target", self.allow_remote_target.into()),
            ("proxy_protocol", self.proxy_protocol.into()),
            ("generation", self.generation.into()),
        ])
    }

    /// Reads one exposure; the error says which field is wrong.
    pub fn from_json(e: &Value) -> Result<Exposed, Error> {
        let port = e
            .get("port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| bad("an exposure has a bad \"port\""))?;
        let target = text(e, "target")?
            .parse()
            .map_err(|_| bad("an exposure has a bad \"target\""))?;
        let allow = match e.get("allow") {
            None | Some(Value::Null) => None,
            Some(list) => {
                let mut peers = Vec::new();
                for p in list
                    .as_array()
                    .ok_or_else(|| bad("an exposure's \"allow\" is not a list"))?
                {
                    let addr = text(p, "addr")?
                        .parse::<PilotAddr>()
                        .map_err(|e| bad(format!("an exposure's allow entry: {e}")))?;
                    peers.push((addr, p.get("name").and_then(Value::as_str).map(str::to_string)));
                }
                Some(peers)
            }
        };
        Ok(Exposed {
            port,
            target,
            allow,
            allow_remote_target: e
                .get("allow_remote_target")
                .and_then(Value::as_bool)
                .ok_or_else(|| bad("an exposure lacks \"allow_remote_target\""))?,
            // Absent in state files written before it existed: off.
            proxy_protocol: match e.get("proxy_protocol") {
                None => false,
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| bad("an exposure's \"proxy_protocol\" is not true or false"))?,
            },
            generation: num(e, "generation")?,
        })
    }
}

/// The gateway's answer to a generation it could not apply: why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyFailure {
    pub generation: u64,
    pub error: Error,
}

/// An entry of the state file that fails [`State::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub entry: Entry,
    pub generation: u64,
    pub why: String,
}

/// Which entry of the state file, by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `State::mappings[index]`, with its local IP.
    Mapping { index: usize, local_ip: Ipv4Addr },
    /// `State::exposures[index]`, with its pilot port.
    Exposure { index: usize, port: u16 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    pub gateway: ProcId,
    /// Unix time the gateway started.
    pub started_at: u64,
    pub socket: PathBuf,
    pub subnet: Ipv4Network,
    pub ports: Vec<u16>,
    pub max_conns: usize,
    /// `--half-closed-timeout`.
    pub half_closed_timeout: Duration,
    /// The user the gateway runs as, when it switched from root.
    pub user: Option<String>,
    /// The daemon's uid, from the peer credentials seen at start: commands
    /// refuse a socket served by another uid (`ipc::connect_by`).
    pub daemon_uid: Uid,
    pub generation: u64,
    pub applied: u64,
    pub mappings: Vec<Mapping>,
    pub exposures: Vec<Exposed>,
    pub failures: Vec<ApplyFailure>,
}

impl State {
    pub fn find_exposure(&self, port: u16) -> Option<&Exposed> {
        self.exposures.iter().find(|e| e.port == port)
    }

    pub fn used_ips(&self) -> BTreeSet<Ipv4Addr> {
        self.mappings.iter().map(|m| m.local_ip).collect()
    }

    pub fn find_ip(&self, ip: Ipv4Addr) -> Option<&Mapping> {
        self.mappings.iter().find(|m| m.local_ip == ip)
    }

    pub fn find_addr(&self, addr: PilotAddr) -> Option<&Mapping> {
        self.mappings.iter().find(|m| m.pilot_addr == addr)
    }

    /// Checks everything in the file that could steer the system, against
    /// `subnet` — the running gateway's own, from memory, never the file's.
    /// Returns the mappings that must not be applied, each with why: an IP
    /// that is not assignable in the subnet (outside it, its network or
    /// broadcast address, 127.0.0.1) or that appears twice, or an address
    /// mapped twice; and the exposures that must not be applied: port 0,
    /// a port exposed twice, a target that is not a service address of
    /// this host (unless the entry says `allow_remote_target`). Nothing in
    /// the file is trusted before this; it is the one entry point for
    /// validation.
    pub fn validate(&self, subnet: Ipv4Network) -> Vec<Invalid> {
        let mut bad = self.validate_mappings(subnet);
        let mut ports = BTreeSet::new();
        for (index, e) in self.exposures.iter().enumerate() {
            let why = if e.port == 0 {
                Some("pilot port 0 cannot be exposed".to_string())
            } else if !ports.insert(e.port) {
                Some(format!("pilot port {} is exposed twice", e.port))
            } else {
                crate::expose::check_target(e.target, e.allow_remote_target, Some(subnet))
                    .err()
                    .map(|err| format!("pilot port {}: {}", e.port, err.message))
            };
            if let Some(why) = why {
                bad.push(Invalid {
                    entry: Entry::Exposure { index, port: e.port },
                    generation: e.generation,
                    why,
                });
            }
        }
        bad
    }

    fn validate_mappings(&self, subnet: Ipv4Network) -> Vec<Invalid> {
        let mut ips = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        let mut bad = Vec::new();
        for (index, m) in self.mappings.iter().enumerate() {
            let why = if !crate::subnet::is_assignable(subnet, m.local_ip) {
                Some(format!(
                    "local IP {} is not an assignable address of the gateway's subnet {subnet}",
                    m.local_ip
                ))
            } else if !ips.insert(m.local_ip) {
                Some(format!("local IP {} is mapped twice", m.local_ip))
            } else if !addrs.insert(m.pilot_addr) {
                Some(format!("{} is mapped twice", m.pilot_addr))
            } else {
                m.ports
                    .as_deref()
                    .and_then(check_ports)
                    .map(|why| format!("local IP {}: {why}", m.local_ip))
            };
            if let Some(why) = why {
                bad.push(Invalid {
                    entry: Entry::Mapping {
                        index,
                        local_ip: m.local_ip,
                    },
                    generation: m.generation,
                    why,
                });
            }
        }
        bad
    }

    /// Records that `generation` failed, keeping the list bounded.
    pub fn record_failure(&mut self, generation: u64, error: Error) {
        self.failures.push(ApplyFailure { generation, error });
        let excess = self.failures.len().saturating_sub(MAX_RESULTS);
        self.failures.drain(..excess);
    }

    pub fn failure(&self, generation: u64) -> Option<&Error> {
        self.failures
            .iter()
            .find(|o| o.generation == generation)
            .map(|o| &o.error)
    }

    pub fn to_json(&self) -> Value {
        let mappings = self
            .mappings
            .iter()
            .map(|m| {
                Value::obj([
                    ("local_ip", m.local_ip.to_string().into()),
                    ("pilot_addr", m.pilot_addr.to_string().into()),
                    ("hostname", m.hostname.clone().into()),
                    ("alias_added", m.alias_added.into()),
                    ("ports", m.ports.as_deref().map(ports_json).into()),
                    ("generation", m.generation.into()),
                ])
            })
            .collect();
        let failures = self
            .failures
            .iter()
            .map(|o| {
                Value::obj([
                    ("generation", o.generation.into()),
                    ("code", o.error.code.as_str().into()),
                    ("message", o.error.message.clone().into()),
                    ("hint", o.error.hint.clone().into()),
                ])
            })
            .collect();
        Value::obj([
            ("version", VERSION.into()),
            ("pid", self.gateway.pid.into()),
            ("start_time", self.gateway.start_time.into()),
            ("started_at", self.started_at.into()),
            ("socket", self.socket.display().to_string().into()),
            ("subnet", self.subnet.to_string().into()),
            ("ports", ports_json(&self.ports)),
            ("max_conns", self.max_conns.into()),
            (
                "half_closed_timeout_secs",
                self.half_closed_timeout.as_secs_f64().into(),
            ),
            ("user", self.user.clone().into()),
            ("daemon_uid", self.daemon_uid.0.into()),
            ("generation", self.generation.into()),
            ("applied", self.applied.into()),
            ("mappings", Value::Arr(mappings)),
            (
                "exposures",
                Value::Arr(self.exposures.iter().map(Exposed::to_json).collect()),
            ),
            ("failures", Value::Arr(failures)),
        ])
    }

    /// Reads a state file's JSON; the error says which field is wrong.
    pub fn from_json(v: &Value) -> Result<State, Error> {
        let version = num(v, "version")?;
        if version != VERSION {
            return Err(bad(format!(
                "format version {version}, but this pilot-gateway reads version {VERSION}"
            )));
        }
        let exposures = arr(v, "exposures")?
            .iter()
            .map(Exposed::from_json)
            .collect::<Result<_, _>>()?;
        let mut mappings = Vec::new();
        for m in arr(v, "mappings")? {
            mappings.push(Mapping {
                local_ip: text(m, "local_ip")?
                    .parse()
                    .map_err(|_| bad("a mapping has a bad \"local_ip\""))?,
                pilot_addr: text(m, "pilot_addr")?
                    .parse::<PilotAddr>()
                    .map_err(|e| bad(e.to_string()))?,
                hostname: m.get("hostname").and_then(Value::as_str).map(str::to_string),
                alias_added: m
                    .get("alias_added")
                    .and_then(Value::as_bool)
                    .ok_or_else(|| bad("a mapping lacks \"alias_added\""))?,
                // null: the gateway's ports; a list: the mapping's own.
                ports: match m.get("ports") {
                    None => return Err(bad("a mapping lacks \"ports\"")),
                    Some(Value::Null) => None,
                    Some(_) => Some(ports(m).map_err(|e| bad(format!("a mapping's {}", e.message)))?),
                },
                generation: num(m, "generation")?,
            });
        }
        let mut failures = Vec::new();
        for f in arr(v, "failures")? {
            let mut error = Error::new(Code::from_name(text(f, "code")?), text(f, "message")?);
            error.hint = f.get("hint").and_then(Value::as_str).map(str::to_string);
            failures.push(ApplyFailure {
                generation: num(f, "generation")?,
                error,
            });
        }
        let ports = ports(v)?;
        Ok(State {
            gateway: ProcId {
                pid: u32::try_from(num(v, "pid")?).map_err(|_| bad("\"pid\" is out of range"))?,
                start_time: num(v, "start_time")?,
            },
            started_at: num(v, "started_at")?,
            socket: PathBuf::from(text(v, "socket")?),
            subnet: text(v, "subnet")?
                .parse()
                .map_err(|_| bad("\"subnet\" is not a CIDR block"))?,
            ports,
            max_conns: num(v, "max_conns")? as usize,
            half_closed_timeout: v
                .get("half_closed_timeout_secs")
                .and_then(Value::as_f64)
                .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| bad("\"half_closed_timeout_secs\" is missing or not a positive number"))?,
            user: v.get("user").and_then(Value::as_str).map(str::to_string),
            daemon_uid: Uid(
                u32::try_from(num(v, "daemon_uid")?).map_err(|_| bad("\"daemon_uid\" is not a uid"))?
            ),
            generation: num(v, "generation")?,
            applied: num(v, "applied")?,
            mappings,
            exposures,
            failures,
        })
    }
}

/// What is wrong with a state file's content (the caller names the file).
fn bad(why: impl Into<String>) -> Error {
    Error::internal(why)
}

/// A port list as the state file writes it.
pub fn ports_json(ports: &[u16]) -> Value {
    Value::Arr(ports.iter().map(|&p| p.into()).collect())
}

/// `"ports"` of `v`: a list of ports from 1 to 65535 (the rest of the
/// checks are [`check_ports`], in `validate`, so that a bad list fails only
/// its own mapping).
fn ports(v: &Value) -> Result<Vec<u16>, Error> {
    arr(v, "ports")?
        .iter()
        .map(|p| p.as_u64().and_then(|p| u16::try_from(p).ok()).filter(|&p| p > 0))
        .collect::<Option<Vec<u16>>>()
        .ok_or_else(|| bad("\"ports\" holds a value that is not a port"))
}

fn num(v: &Value, key: &str) -> Result<u64, Error> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(format!("\"{key}\" is missing or not a whole number")))
}

fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str, Error> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("\"{key}\" is missing or not a string")))
}

fn arr<'a>(v: &'a Value, key: &str) -> Result<&'a [Value], Error> {
    v.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("\"{key}\" is missing or not a list")))
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::json;

    pub(crate) fn sample() -> State {
        State {
            gateway: ProcId {
                pid: 42,
                start_time: 7,
            },
            started_at: 1,
            socket: "/tmp/pilot.sock".into(),
            subnet: "10.4.0.0/16".parse().unwrap(),
            ports: vec![80, 443],
            max_conns: 1000,
            half_closed_timeout: Duration::from_millis(2500),
            user: None,
            daemon_uid: Uid(65534),
            generation: 3,
            applied: 2,
            mappings: vec![Mapping {
                local_ip: Ipv4Addr::new(10, 4, 0, 1),
                pilot_addr: PilotAddr::new(0, 4),
                hostname: Some("lab-b".into()),
                alias_added: true,
                ports: Some(vec![9000, 80]),
                generation: 1,
            }],
            exposures: vec![Exposed {
                port: 2222,
                target: "127.0.0.1:22".parse().unwrap(),
                allow: Some(vec![
                    (PilotAddr::new(0, 7), Some("lab-a".into())),
                    (PilotAddr::new(0, 8), None),
                ]),
                allow_remote_target: false,
                proxy_protocol: true,
                generation: 2,
            }],
            failures: vec![ApplyFailure {
                generation: 3,
                error: Error::new(Code::AddressInUse, "port busy").hint("free it"),
            }],
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(
            State::from_json(&json::parse(&s.to_json().to_string()).unwrap()).unwrap(),
            s
        );
    }

    #[test]
    fn only_this_version_is_read_and_every_field_is_required() {
        let s = sample();
        let text = s.to_json().to_string();
        for old in ["1", "2"] {
            let v = text.replace("\"version\":3", &format!("\"version\":{old}"));
            let e = State::from_json(&json::parse(&v).unwrap()).unwrap_err();
            assert!(
                e.message.contains(&format!("format version {old}")),
                "{}",
                e.message
            );
        }
        let no_ports = text.replace(",\"ports\":[9000,80]", "");
        let e = State::from_json(&json::parse(&no_ports).unwrap()).unwrap_err();
        assert!(e.message.contains("a mapping lacks \"ports\""), "{}", e.message);
        for field in ["exposures", "daemon_uid", "half_closed_timeout_secs"] {
            let mut v = json::parse(&text).unwrap();
            if let Value::Obj(o) = &mut v {
                o.retain(|(k, _)| k != field);
            }
            let e = State::from_json(&v).unwrap_err();
            assert!(
                e.message.contains(&format!("\"{field}\" is missing")),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn mapping_ports_are_validated() {
        let mut s = sample();
        let good = s.mappings[0].clone();
        let with = |last: u8, ports: Option<Vec<u16>>| Mapping {
            local_ip: Ipv4Addr::new(10, 4, 0, last),
            pilot_addr: PilotAddr::new(0, u32::from(last) + 100),
            ports,
            ..good.clone()
        };
        s.mappings = vec![
            good.clone(),
            with(2, None),
            with(3, Some(vec![])),
            with(4, Some(vec![80, 80])),
            with(5, Some((1..=MAX_PORTS as u16 + 1).collect())),
            with(6, Some(vec![0])),
        ];
        let bad: Vec<String> = s.validate(s.subnet).into_iter().map(|b| b.why).collect();
        assert_eq!(bad.len(), 4, "{bad:?}");
        assert!(bad[0].contains("10.4.0.3") && bad[0].contains("empty"), "{bad:?}");
        assert!(bad[1].contains("twice"), "{bad:?}");
        assert!(bad[2].contains("more than"), "{bad:?}");
        assert!(bad[3].contains("port 0"), "{bad:?}");
        // Reading refuses what is not a port at all.
        let text = s.to_json().to_string().replace("[9000,80]", "[9000,\"x\"]");
        let e = State::from_json(&json::parse(&text).unwrap()).unwrap_err();
        assert!(e.message.contains("a mapping's \"ports\""), "{}", e.message);
    }

    #[test]
    fn validate_checks_exposures() {
        let mut s = sample();
        let good = s.exposures[0].clone();
        let with = |port: u16, target: &str, remote: bool| Exposed {
            port,
            target: target.parse().unwrap(),
            allow_remote_target: remote,
            generation: 9,
            ..good.clone()
        };
        s.exposures = vec![
            good.clone(),
            with(0, "127.0.0.1:80", false),
            with(2222, "127.0.0.1:80", false),
            with(81, "192.0.2.1:80", false),
            with(82, "192.0.2.1:80", true),
            with(83, "127.0.0.1:0", false),
            // The gateway's own mapped IPs: never, not even when remote.
            with(84, "10.4.0.1:9090", true),
            with(85, "[::ffff:10.4.0.1]:9090", true),
            with(86, "[::ffff:0.0.0.0]:80", true),
            with(87, "[::ffff:127.0.0.1]:80", false),
        ];
        let bad: Vec<(Entry, String)> = s
            .validate(s.subnet)
            .into_iter()
            .map(|b| (b.entry, b.why))
            .collect();
        let ports: Vec<u16> = bad
            .iter()
            .map(|(e, _)| match e {
                Entry::Exposure { port, .. } => *port,
                Entry::Mapping { .. } => panic!("mapping flagged: {bad:?}"),
            })
            .collect();
        assert_eq!(ports, vec![0, 2222, 81, 83, 84, 85, 86], "{bad:?}");
        assert!(bad[1].1.contains("exposed twice"), "{bad:?}");
        assert!(bad[2].1.contains("not on this host"), "{bad:?}");
        assert!(bad[4].1.contains("inside the gateway's subnet"), "{bad:?}");
        assert!(bad[5].1.contains("inside the gateway's subnet"), "{bad:?}");
    }
}
