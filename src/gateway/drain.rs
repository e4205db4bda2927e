//! Drains in the background: `unmap --drain S`, `unexpose --drain S` and
//! `stop --drain S` stop new connections at once and let the live ones
//! finish for up to S seconds, while the main thread goes on answering
//! signals (a `map`, `status`, another `stop`): nothing waits for a drain
//! under the state lock or in a signal handler.
//!
//! A draining mapping or exposure leaves the running set (so the state
//! file and every apply no longer see it) for [`Draining`], which the main
//! loop polls every [`POLL`]: once its connections are gone, or its time is
//! up, it is torn down as an unmap or unexpose without a drain would be
//! (what is still live then is cut and counted).
//!
//! `draining.json` (a note beside `state.json`, rewritten whenever the set
//! changes and on every SIGUSR2, so `status` shows it fresh):
//!
//! | key         | what                                                     |
//! |-------------|----------------------------------------------------------|
//! | `pid`       | the gateway that wrote it                                |
//! | `stopping`  | whether a `stop --drain` is under way                    |
//! | `mappings`  | `[{local_ip, pilot_addr, active, secs_left, generation}]`|
//! | `exposures` | `[{port, target, active, refused, secs_left, generation}]` (`refused`: Accepts refused while draining) |
//! | `done`      | the last [`DONE_KEPT`] drains that ended: `[{what, generation, cut}]` (`what`: the local IP, or `port N`) |

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::json::Value;
use crate::{info, warn};

use super::{Gateway, RunningExposure, RunningMapping};

/// How often the main loop looks at drains while any runs.
pub(super) const POLL: Duration = Duration::from_millis(100);
/// How many ended drains `draining.json` remembers (for `--wait`).
const DONE_KEPT: usize = 64;
/// The note's name.
pub const NOTE: &str = "draining.json";
/// Largest `draining.json` a command reads.
pub const NOTE_MAX: u64 = 1 << 20;

/// What drains now.
#[derive(Default)]
pub(super) struct Draining {
    maps: BTreeMap<Ipv4Addr, (RunningMapping, Instant, u64)>,
    exposures: BTreeMap<u16, (RunningExposure, Instant, u64)>,
    /// Set by `stop --drain`: once nothing drains any more, the gateway
    /// stops. Holds the connections cut so far by drains that ran out.
    pub(super) stopping: Option<usize>,
    done: VecDeque<(String, u64, usize)>,
}

impl Draining {
    pub(super) fn is_empty(&self) -> bool {
        self.maps.is_empty() && self.exposures.is_empty()
    }
}

impl Gateway {
    /// Whether mapping `ip` drains now.
    pub(super) fn draining_has(&self, ip: Ipv4Addr) -> bool {
        self.draining.maps.contains_key(&ip)
    }

    /// Stops accepting on mapping `ip` and lets its connections finish in
    /// the background for up to `wait`.
    pub(super) fn drain_mapping(&mut self, ip: Ipv4Addr, wait: Duration, generation: u64) {
        let Some(mut m) = self.running.remove(&ip) else {
            return;
        };
        for l in &mut m.listeners {
            l.stop();
        }
        info!(
            "draining {ip} → {} for up to {:.1}s ({} live connections)",
            m.addr,
            wait.as_secs_f64(),
            m.conns.counters().active
        );
        self.draining
            .maps
            .insert(ip, (m, Instant::now() + wait, generation));
    }

    /// Stops admitting on exposure `port` and lets its connections finish
    /// in the background for up to `wait`.
    pub(super) fn drain_exposure(&mut self, port: u16, wait: Duration, generation: u64) {
        let Some(r) = self.exposed.remove(&port) else {
            return;
        };
        r.engine.stop_admitting();
        info!(
            "draining pilot port {port} → {} for up to {:.1}s ({} live connections)",
            r.spec.target,
            wait.as_secs_f64(),
            r.engine.counters().active
        );
        self.draining
            .exposures
            .insert(port, (r, Instant::now() + wait, generation));
    }

    /// Ends the drains whose connections are gone or whose time is up
    /// (every one if `all`); returns how many connections were cut.
    pub(super) fn finish_drains(&mut self, all: bool) -> usize {
        let now = Instant::now();
        let ips: Vec<Ipv4Addr> = self
            .draining
            .maps
            .iter()
            .filter(|(_, (m, by, _))| all || *by <= now || m.conns.counters().active == 0)
            .map(|(ip, _)| *ip)
            .collect();
        let ports: Vec<u16> = self
            .draining
            .exposures
            .iter()
            .filter(|(_, (r, by, _))| all || *by <= now || r.engine.counters().active == 0)
            .map(|(p, _)| *p)
            .collect();
        if ips.is_empty() && ports.is_empty() {
            return 0;
        }
        let mut cut = 0;
        for ip in ips {
            if let Some((m, _, generation)) = self.draining.maps.remove(&ip) {
                let n = self.close_mapping(ip, m);
                self.draining.done.push_back((ip.to_string(), generation, n));
                cut += n;
            }
        }
        for port in ports {
            if let Some((r, _, generation)) = self.draining.exposures.remove(&port) {
                let n = Self::close_exposure(port, r);
                self.draining
                    .done
                    .push_back((format!("port {port}"), generation, n));
                cut += n;
            }
        }
        while self.draining.done.len() > DONE_KEPT {
            self.draining.done.pop_front();
        }
        if let Some(so_far) = &mut self.draining.stopping {
            *so_far += cut;
        }
        self.write_draining_note();
        cut
    }

    /// Ends a drain of `ip` at once (it is being mapped again).
    pub(super) fn end_drain_of_ip(&mut self, ip: Ipv4Addr) {
        if let Some((m, _, generation)) = self.draining.maps.remove(&ip) {
            let n = self.close_mapping(ip, m);
            self.draining.done.push_back((ip.to_string(), generation, n));
            self.write_draining_note();
        }
    }

    /// Ends a drain of `port` at once (it is being exposed again).
    pub(super) fn end_drain_of_port(&mut self, port: u16) {
        if let Some((r, _, generation)) = self.draining.exposures.remove(&port) {
            let n = Self::close_exposure(port, r);
            self.draining
                .done
                .push_back((format!("port {port}"), generation, n));
            self.write_draining_note();
        }
    }

    /// `stop --drain`: everything drains, then the gateway stops.
    pub(super) fn start_stopping(&mut self, wait: Duration) {
        self.draining.stopping = Some(0);
        let ips: Vec<Ipv4Addr> = self.running.keys().copied().collect();
        for ip in ips {
            self.drain_mapping(ip, wait, 0);
        }
        let ports: Vec<u16> = self.exposed.keys().copied().collect();
        for port in ports {
            self.drain_exposure(port, wait, 0);
        }
        // Drains already under way keep their own (earlier or later)
        // deadlines, capped by this one.
        let by = Instant::now() + wait;
        for (_, d, _) in self.draining.maps.values_mut() {
            *d = (*d).min(by);
        }
        for (_, d, _) in self.draining.exposures.values_mut() {
            *d = (*d).min(by);
        }
        self.write_draining_note();
    }

    /// Writes `draining.json` (see the module docs).
    pub(super) fn write_draining_note(&self) {
        let now = Instant::now();
        let left = |by: &Instant| Value::from(by.saturating_duration_since(now).as_secs_f64());
        let maps = self
            .draining
            .maps
            .iter()
            .map(|(ip, (m, by, generation))| {
                Value::obj([
                    ("local_ip", Value::from(ip.to_string())),
                    ("pilot_addr", m.addr.to_string().into()),
                    ("active", m.conns.counters().active.into()),
                    ("secs_left", left(by)),
                    ("generation", (*generation).into()),
                ])
            })
            .collect();
        let exposures = self
            .draining
            .exposures
            .iter()
            .map(|(port, (r, by, generation))| {
                Value::obj([
                    ("port", Value::from(*port)),
                    ("target", r.spec.target.to_string().into()),
                    ("active", r.engine.counters().active.into()),
                    // Accepts still arriving, refused (peers can cause
                    // them at will: counted, as every refusal is).
                    ("refused", r.engine.counters().refused_draining.into()),
                    ("secs_left", left(by)),
                    ("generation", (*generation).into()),
                ])
            })
            .collect();
        let done = self
            .draining
            .done
            .iter()
            .map(|(what, generation, cut)| {
                Value::obj([
                    ("what", Value::from(what.as_str())),
                    ("generation", (*generation).into()),
                    ("cut", (*cut).into()),
                ])
            })
            .collect();
        let note = Value::obj([
            ("pid", Value::from(self.me.pid)),
            ("stopping", self.draining.stopping.is_some().into()),
            ("mappings", Value::Arr(maps)),
            ("exposures", Value::Arr(exposures)),
            ("done", Value::Arr(done)),
        ]);
        if let Err(e) = self.dir.write_atomic(NOTE, &format!("{note}\n")) {
            warn!("{e}");
        }
    }
}
