//! The live counters: `Counters` for one group of connections (a mapping
//! today; an exposure can keep its own), and `Stats`, the snapshot the
//! gateway writes to `stats.json` on SIGUSR2 and the commands read back.
//!
//! Writer and reader share these types and so the key names: a field the
//! reader cannot find is an error that names it, never a silent 0.
//!
//! `stats.json` (one object):
//!
//! | key                  | what                                              |
//! |----------------------|---------------------------------------------------|
//! | `seq`                | bumped on every write, so a reader sees a new one |
//! | `pid`                | the gateway that wrote it                         |
//! | `uptime_secs`        | since the gateway started                         |
//! | the `Counters` keys  | totals over every mapping                         |
//! | `refused`            | connections refused at `--max-conns` (forwarded and exposed), or reset because descriptors ran out |
//! | `max_conns`          | the limit in force (lowered to fit the descriptor limit), one budget for forwarded connections, exposed connections and exposures' daemon sessions |
//! | `conns_in_use`       | slots of that budget taken now                    |
//! | `max_conns_requested`| the limit asked for with `--max-conns`            |
//! | `max_exposed`        | `--max-exposed` in force: slots the expose side (exposures' sessions and exposed connections) may hold |
//! | `max_per_peer`       | `--max-per-peer` in force: exposed connections one peer node may hold |
//! | `exposed_in_use`     | slots the expose side holds now                   |
//! | `refused_max_exposed`| exposed connections refused at `--max-exposed`    |
//! | `refused_per_peer`   | exposed connections refused at `--max-per-peer`   |
//! | `allow_remote`       | whether clients from other hosts are served       |
//! | `access_log_dropped` | access-log lines dropped because the writer lagged |
//! | `daemon`             | `{reachable, reply}` or `{reachable:false, error}`, with `checked_secs_ago` |
//! | `close_mode`         | `confirmed`, `immediate` or `unknown` (see `closing`) |
//! | `close_linger_ms`    | `--close-linger`                                  |
//! | `close_unconfirmed`  | Closes sent before the daemon confirmed delivery (linger passed, daemon gone) |
//! | `mappings`           | `[{local_ip, pilot_addr, …Counters keys}]`        |
//! | `exposures`          | `[{port, target, state, reason, …exposure counter keys}]` (not in the totals: they count the other direction) |
//! | `errors`             | `{last: [{local_ip, port, error, at}], recent: [{local_ip, port, error, at, count}]}`: failed dials, see [`Errors`] |

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::AddAssign;

use crate::address::PilotAddr;
use crate::error::Error;
use crate::expose::Counters as ExposureCounters;
use crate::json::Value;

/// Counters of one group of connections: live ones plus what finished ones
/// moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections open now.
    pub active: u64,
    /// Connections accepted (and not refused) so far.
    pub total: u64,
    /// Bytes client→agent.
    pub bytes_up: u64,
    /// Bytes agent→client.
    pub bytes_down: u64,
    pub dial_failures: u64,
    pub idle_timeouts: u64,
    /// Clients refused because they came from another host.
    pub refused_remote: u64,
    /// Clients reset because no thread could be started for them.
    pub spawn_failures: u64,
}

impl AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.active += o.active;
        self.total += o.total;
        self.bytes_up += o.bytes_up;
        self.bytes_down += o.bytes_down;
        self.dial_failures += o.dial_failures;
        self.idle_timeouts += o.idle_timeouts;
        self.refused_remote += o.refused_remote;
        self.spawn_failures += o.spawn_failures;
    }
}

/// Both directions of a counters struct whose JSON keys are its field
/// names: `$list` gives them in output order, `$read` reads them back from
/// an object. One list of names serves both, so they cannot drift apart,
/// and the struct literal in `$read` fails to build if it misses a field.
macro_rules! json_counters {
    ($ty:ident, $list:ident, $read:ident: $($f:ident),+ $(,)?) => {
        fn $list(c: &$ty) -> [(&'static str, u64); [$(stringify!($f)),+].len()] {
            [$((stringify!($f), c.$f)),+]
        }

        fn $read(v: &Value) -> Result<$ty, Error> {
            Ok($ty { $($f: num(v, stringify!($f))?),+ })
        }
    };
}

json_counters!(Counters, counter_fields, counters_from_json:
    active, total, bytes_up, bytes_down, dial_failures, idle_timeouts,
    refused_remote, spawn_failures);

json_counters!(ExposureCounters, exposure_fields, exposure_counters_from_json:
    active, total, bytes_in, bytes_out, refused, over_limit, refused_draining,
    slow_resets, connect_failures, idle_timeouts, rebinds, session_stalls);

impl Counters {
    /// The counters under their JSON keys, in output order.
    pub fn fields(&self) -> [(&'static str, u64); 8] {
        counter_fields(self)
    }

    /// The JSON pairs, to put into an object beside other keys.
    pub fn json_pairs(&self) -> Vec<(&'static str, Value)> {
        self.fields().iter().map(|&(k, n)| (k, n.into())).collect()
    }

    /// Reads the counters from an object that holds their keys.
    pub fn from_json(v: &Value) -> Result<Counters, Error> {
        counters_from_json(v)
    }
}

/// The counters of one mapping, as `stats.json` lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingStats {
    pub local_ip: Ipv4Addr,
    pub pilot_addr: PilotAddr,
    pub counters: Counters,
}

/// The counters of one exposure, as `stats.json` lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExposureStats {
    pub port: u16,
    pub target: SocketAddr,
    /// `bound`, `rebinding` or `stopped`.
    pub state: String,
    /// Why it is rebinding (empty when bound).
    pub reason: String,
    pub counters: ExposureCounters,
}

impl ExposureStats {
    /// The counters under their JSON keys, in output order.
    pub fn fields(&self) -> [(&'static str, u64); 12] {
        exposure_fields(&self.counters)
    }

    pub fn to_json(&self) -> Value {
        let mut v = vec![
            ("port", Value::from(self.port)),
            ("target", self.target.to_string().into()),
            ("state", self.state.clone().into()),
            ("reason", self.reason.clone().into()),
        ];
        v.extend(self.fields().iter().map(|&(k, n)| (k, Value::from(n))));
        Value::obj(v)
    }

    pub fn from_json(e: &Value) -> Result<ExposureStats, Error> {
        let text = |k: &str| {
            e.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(format!("an exposure lacks \"{k}\"")))
        };
        Ok(ExposureStats {
            port: u16::try_from(num(e, "port")?).map_err(|_| bad("an exposure has a bad \"port\""))?,
            target: text("target")?
                .parse()
                .map_err(|_| bad("an exposure has a bad \"target\""))?,
            state: text("state")?,
            reason: text("reason")?,
            counters: exposure_counters_from_json(e)?,
        })
    }
}

/// One `stats.json` snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub seq: u64,
    pub pid: u32,
    pub uptime_secs: u64,
    /// The sum over `mappings`.
    pub totals: Counters,
    pub refused: u64,
    pub max_conns: u64,
    pub max_conns_requested: u64,
    /// Slots of the shared `max_conns` budget taken now.
    pub conns_in_use: u64,
    pub max_exposed: u64,
    pub max_per_peer: u64,
    pub exposed_in_use: u64,
    pub refused_max_exposed: u64,
    pub refused_per_peer: u64,
    pub allow_remote: bool,
    pub access_log_dropped: u64,
    /// The daemon's health as last checked (a thread of its own checks it,
    /// so writing the counters never waits for the daemon).
    pub daemon: Value,
    /// How Closes are sent (`closing::Mode`, as text).
    pub close_mode: String,
    pub close_linger_ms: u64,
    pub close_unconfirmed: u64,
    pub mappings: Vec<MappingStats>,
    pub exposures: Vec<ExposureStats>,
    /// The last failed dial per mapping and the last few distinct ones.
    pub errors: Errors,
}

impl Stats {
    /// The counters of the mapping on `ip` (zero for one that is not up).
    pub fn mapping(&self, ip: Ipv4Addr) -> Counters {
        self.mappings
            .iter()
            .find(|m| m.local_ip == ip)
            .map(|m| m.counters)
            .unwrap_or_default()
    }

    /// The counters of the exposure of `port`, if it runs.
    pub fn exposure(&self, port: u16) -> Option<&ExposureStats> {
        self.exposures.iter().find(|e| e.port == port)
    }

    pub fn to_json(&self) -> Value {
        let mappings = self
            .mappings
            .iter()
            .map(|m| {
                let mut v = vec![
                    ("local_ip", Value::from(m.local_ip.to_string())),
                    ("pilot_addr", m.pilot_addr.to_string().into()),
                ];
                v.extend(m.counters.json_pairs());
                Value::obj(v)
            })
            .collect();
        let mut v = vec![
            ("seq", Value::from(self.seq)),
            ("pid", self.pid.into()),
            ("uptime_secs", self.uptime_secs.into()),
        ];
        v.extend(self.totals.json_pairs());
        v.extend([
            ("refused", self.refused.into()),
            ("max_conns", self.max_conns.into()),
            ("max_conns_requested", self.max_conns_requested.into()),
            ("conns_in_use", self.conns_in_use.into()),
            ("max_exposed", self.max_exposed.into()),
            ("max_per_peer", self.max_per_peer.into()),
            ("exposed_in_use", self.exposed_in_use.into()),
            ("refused_max_exposed", self.refused_max_exposed.into()),
            ("refused_per_peer", self.refused_per_peer.into()),
            ("allow_remote", self.allow_remote.into()),
            ("access_log_dropped", self.access_log_dropped.into()),
            ("daemon", self.daemon.clone()),
            ("close_mode", self.close_mode.clone().into()),
            ("close_linger_ms", self.close_linger_ms.into()),
            ("close_unconfirmed", self.close_unconfirmed.into()),
            ("mappings", Value::Arr(mappings)),
            (
                "exposures",
                Value::Arr(self.exposures.iter().map(ExposureStats::to_json).collect()),
            ),
            ("errors", self.errors.to_json()),
        ]);
        Value::obj(v)
    }

    /// Reads a snapshot; the error names the field that is wrong.
    pub fn from_json(v: &Value) -> Result<Stats, Error> {
        let mut mappings = Vec::new();
        for m in v
            .get("mappings")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("\"mappings\" is missing or not a list"))?
        {
            let text = |k: &str| {
                m.get(k)
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("a mapping lacks \"{k}\"")))
            };
            mappings.push(MappingStats {
                local_ip: text("local_ip")?
                    .parse()
                    .map_err(|_| bad("a mapping has a bad \"local_ip\""))?,
                pilot_addr: text("pilot_addr")?
                    .parse()
                    .map_err(|e: crate::address::AddrError| bad(e.to_string()))?,
                counters: Counters::from_json(m)?,
            });
        }
        Ok(Stats {
            seq: num(v, "seq")?,
            pid: u32::try_from(num(v, "pid")?).map_err(|_| bad("\"pid\" is out of range"))?,
            uptime_secs: num(v, "uptime_secs")?,
            totals: Counters::from_json(v)?,
            refused: num(v, "refused")?,
            max_conns: num(v, "max_conns")?,
            max_conns_requested: num(v, "max_conns_requested")?,
            conns_in_use: num(v, "conns_in_use")?,
            max_exposed: num(v, "max_exposed")?,
            max_per_peer: num(v, "max_per_peer")?,
            exposed_in_use: num(v, "exposed_in_use")?,
            refused_max_exposed: num(v, "refused_max_exposed")?,
            refused_per_peer: num(v, "refused_per_peer")?,
            allow_remote: v
                .get("allow_remote")
                .and_then(Value::as_bool)
                .ok_or_else(|| bad("\"allow_remote\" is missing or not true/false"))?,
            access_log_dropped: num(v, "access_log_dropped")?,
            daemon: v
                .get("daemon")
                .cloned()
                .ok_or_else(|| bad("\"daemon\" is missing"))?,
            close_mode: v
                .get("close_mode")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("\"close_mode\" is missing or not text"))?
                .to_string(),
            close_linger_ms: num(v, "close_linger_ms")?,
            close_unconfirmed: num(v, "close_unconfirmed")?,
            mappings,
            exposures: v
                .get("exposures")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("\"exposures\" is missing or not a list"))?
                .iter()
                .map(ExposureStats::from_json)
                .collect::<Result<_, _>>()?,
            errors: Errors::from_json(v.get("errors").ok_or_else(|| bad("\"errors\" is missing"))?)?,
        })
    }
}

/// What is wrong with a stats file's content (the caller names the file).
fn bad(why: impl Into<String>) -> Error {
    Error::internal(why)
}

fn num(v: &Value, key: &str) -> Result<u64, Error> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(format!("\"{key}\" is missing or not a whole number")))
}

// ---- Failed dials: where people look (`list`, `status`) ----

/// One failed dial as shown: on which mapped IP and port, why, when (Unix
/// seconds), and how often this same error happened (in `recent`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialError {
    pub local_ip: Ipv4Addr,
    pub port: u16,
    pub error: String,
    pub at: u64,
    pub count: u64,
}

/// The last failed dial of each mapped IP, and the last [`RECENT`]
/// distinct errors (the same text again moves to the front and counts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Errors {
    pub last: Vec<DialError>,
    pub recent: Vec<DialError>,
}

/// How many distinct recent errors `status` shows.
pub const RECENT: usize = 5;
/// Bound on the per-IP table (a mapping that goes away leaves its entry
/// until the table is full; then it starts afresh).
const MAX_LAST: usize = 4096;
/// Bound on one error's text (it can carry the daemon's words).
const MAX_TEXT: usize = 300;

static ERRORS: std::sync::Mutex<Errors> = std::sync::Mutex::new(Errors {
    last: Vec::new(),
    recent: Vec::new(),
});

/// Records a failed dial (called by the relay where it counts one).
pub fn note_dial_failure(local_ip: std::net::IpAddr, port: u16, why: &str) {
    let std::net::IpAddr::V4(local_ip) = local_ip else {
        return;
    };
    let mut error: String = why.chars().take(MAX_TEXT).collect();
    if error.len() < why.len() {
        error.push('…');
    }
    let at = crate::state::now_unix();
    let Ok(mut e) = ERRORS.lock() else {
        return;
    };
    if e.last.len() >= MAX_LAST {
        e.last.clear();
    }
    let entry = DialError {
        local_ip,
        port,
        error,
        at,
        count: 1,
    };
    e.last.retain(|x| x.local_ip != local_ip);
    e.last.push(entry.clone());
    let count = match e.recent.iter().position(|x| x.error == entry.error) {
        Some(i) => e.recent.remove(i).count + 1,
        None => 1,
    };
    e.recent.insert(0, DialError { count, ..entry });
    e.recent.truncate(RECENT);
}

/// What has been recorded, for `stats.json`.
pub fn dial_errors() -> Errors {
    ERRORS.lock().map(|e| e.clone()).unwrap_or_default()
}

impl DialError {
    /// One failed dial, as stats.json and the commands' JSON show it.
    pub fn to_json(&self) -> Value {
        Value::obj([
            ("local_ip", Value::from(self.local_ip.to_string())),
            ("port", self.port.into()),
            ("error", self.error.clone().into()),
            ("at", self.at.into()),
            ("count", self.count.into()),
        ])
    }
}

impl Errors {
    /// The last failed dial on `ip`, if any.
    pub fn last_on(&self, ip: Ipv4Addr) -> Option<&DialError> {
        self.last.iter().find(|e| e.local_ip == ip)
    }

    fn to_json(&self) -> Value {
        let list = |l: &[DialError]| Value::Arr(l.iter().map(DialError::to_json).collect());
        Value::obj([("last", list(&self.last)), ("recent", list(&self.recent))])
    }

    fn from_json(v: &Value) -> Result<Errors, Error> {
        let list = |key: &str| -> Result<Vec<DialError>, Error> {
            let items = v
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| bad(format!("\"errors\".\"{key}\" is missing or not a list")))?;
            items
                .iter()
                .take(MAX_LAST)
                .map(|e| {
                    Ok(DialError {
                        local_ip: e
                            .get("local_ip")
                            .and_then(Value::as_str)
                            .and_then(|t| t.parse().ok())
                            .ok_or_else(|| bad("an error lacks \"local_ip\""))?,
                        port: u16::try_from(num(e, "port")?)
                            .map_err(|_| bad("an error has a bad \"port\""))?,
                        error: e
                            .get("error")
                            .and_then(Value::as_str)
                            .ok_or_else(|| bad("an error lacks \"error\""))?
                            .to_string(),
                        at: num(e, "at")?,
                        count: num(e, "count")?,
                    })
                })
                .collect()
        };
        Ok(Errors {
            last: list("last")?,
            recent: list("recent")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Stats {
        let c = Counters {
            active: 1,
            total: 2,
            bytes_up: 3,
            bytes_down: 4,
            dial_failures: 5,
            idle_timeouts: 6,
            refused_remote: 7,
            spawn_failures: 8,
        };
        let mut totals = Counters::default();
        totals += c;
        totals += c;
        Stats {
            seq: 9,
            pid: 42,
            uptime_secs: 7,
            totals,
            refused: 8,
            max_conns: 1000,
            max_conns_requested: 1000,
            conns_in_use: 3,
            max_exposed: 500,
            max_per_peer: 50,
            exposed_in_use: 2,
            refused_max_exposed: 4,
            refused_per_peer: 5,
            allow_remote: false,
            access_log_dropped: 0,
            daemon: Value::obj([("reachable", Value::from(true))]),
            close_mode: "confirmed".into(),
            close_linger_ms: 5000,
            close_unconfirmed: 3,
            mappings: vec![MappingStats {
                local_ip: Ipv4Addr::new(10, 4, 0, 1),
                pilot_addr: PilotAddr::new(0, 4),
                counters: c,
            }],
            exposures: vec![ExposureStats {
                port: 80,
                target: "127.0.0.1:8000".parse().unwrap(),
                state: "rebinding".into(),
                reason: "daemon gone".into(),
                counters: crate::expose::Counters {
                    active: 1,
                    total: 2,
                    bytes_in: 3,
                    bytes_out: 4,
                    refused: 5,
                    over_limit: 6,
                    refused_draining: 8,
                    slow_resets: 7,
                    connect_failures: 8,
                    idle_timeouts: 11,
                    rebinds: 9,
                    session_stalls: 10,
                },
            }],
            errors: Errors {
                last: vec![DialError {
                    local_ip: Ipv4Addr::new(10, 4, 0, 1),
                    port: 80,
                    error: "resolve node 4: registry: request failed".into(),
                    at: 1_700_000_000,
                    count: 1,
                }],
                recent: vec![DialError {
                    local_ip: Ipv4Addr::new(10, 4, 0, 1),
                    port: 80,
                    error: "resolve node 4: registry: request failed".into(),
                    at: 1_700_000_000,
                    count: 3,
                }],
            },
        }
    }

    #[test]
    fn round_trip_and_sums() {
        let s = sample();
        assert_eq!(s.totals.bytes_down, 8);
        let text = s.to_json().to_string();
        assert_eq!(Stats::from_json(&crate::json::parse(&text).unwrap()).unwrap(), s);
        assert_eq!(s.mapping(Ipv4Addr::new(10, 4, 0, 1)).total, 2);
        assert_eq!(s.mapping(Ipv4Addr::new(10, 4, 0, 2)), Counters::default());
        assert_eq!(s.exposure(80).map(|e| e.counters.slow_resets), Some(7));
    }

    #[test]
    fn dial_errors_keep_the_last_per_ip_and_distinct_recent_ones() {
        let ip = |n| std::net::IpAddr::from([10, 99, 0, n]);
        for i in 0..8u8 {
            note_dial_failure(ip(1), 80, &format!("error {}", i % 2));
        }
        note_dial_failure(ip(2), 9000, &"x".repeat(1000));
        let e = dial_errors();
        let on1 = e.last_on(Ipv4Addr::new(10, 99, 0, 1)).unwrap();
        assert_eq!(on1.error, "error 1");
        let two = e.last_on(Ipv4Addr::new(10, 99, 0, 2)).unwrap();
        assert!(two.error.chars().count() <= MAX_TEXT + 1 && two.port == 9000);
        let mine: Vec<&DialError> = e.recent.iter().filter(|d| d.error.starts_with("error")).collect();
        assert_eq!(mine.len(), 2, "{e:?}");
        assert_eq!(mine.iter().map(|d| d.count).sum::<u64>(), 8);
        assert!(e.recent.len() <= RECENT);
    }

    #[test]
    fn a_missing_counter_is_named_not_zero() {
        let text = sample()
            .to_json()
            .to_string()
            .replace("\"bytes_up\"", "\"bytes_upp\"");
        let e = Stats::from_json(&crate::json::parse(&text).unwrap()).unwrap_err();
        assert!(e.message.contains("bytes_up"), "{e}");
    }
}
