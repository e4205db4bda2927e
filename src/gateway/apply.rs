//! Applying `state.json` to what runs: the SIGHUP diff of mappings and
//! exposures, and bringing each one up or tearing it down.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::alias::{self};
use crate::error::{Code, Error, Result};
use crate::expose::{self, Exposure};
use crate::json::Value;
use crate::listener::Listener;
use crate::relay::Connections;
use crate::state::{Entry, Exposed, Mapping, State};
use crate::subnet::{self, needs_alias};
use crate::{error, info, warn};

use super::{
    bind_error, ExposedSlots, Gateway, RunningExposure, RunningMapping, SessionSlot, APPLY_BIND_BUDGET,
    EXPOSE_STOP_WAIT, REBIND_WAIT,
};

impl Gateway {
    /// Marks which of `mappings` will get an alias from us: those whose IP
    /// is not configured yet.
    pub(super) fn plan_aliases(&self, mappings: &mut [Mapping]) {
        let alias = needs_alias(self.subnet);
        for m in mappings
            .iter_mut()
            .filter(|m| !self.running.contains_key(&m.local_ip))
        {
            m.alias_added = alias && !subnet::is_local_address(m.local_ip).unwrap_or(false);
        }
    }

    /// Refuses a mapping whose listeners (one descriptor per port) would
    /// not fit the room the descriptor limit leaves (see [`limits::fit_max_conns`]).
    pub(super) fn check_listener_room(&self, ip: Ipv4Addr, more: usize) -> Result<()> {
        let listening: usize = self.running.values().map(|r| r.listeners.len()).sum();
        if (listening + more) as u64 <= self.listener_room {
            return Ok(());
        }
        Err(Error::new(
            Code::ConnectionFailed,
            format!(
                "cannot listen on {ip}: {more} more listener(s) do not fit the open-file limit beside {listening} listening now, {} connection slots and the headroom",
                self.data_path.settings.max_conns
            ),
        )
        .hint("raise the open-file limit (ulimit -n, or LimitNOFILE= in systemd) and restart the gateway, or unmap another address first"))
    }

    /// Adds the alias (if needed) and binds every port on `m.local_ip`.
    /// On failure nothing of this mapping is left.
    pub(super) fn bring_up(&mut self, m: &Mapping) -> Result<()> {
        let ip = m.local_ip;
        let ports = m.ports_or(&self.ports).to_vec();
        self.check_listener_room(ip, ports.len())?;
        let alias_ours = if needs_alias(self.subnet) {
            alias::check_not_another_gateways(ip, &self.aliases.label)?;
            // `plan_aliases` set alias_added exactly when the IP was not
            // configured yet; otherwise it exists and is not ours.
            self.aliases.add(ip, !m.alias_added)?
        } else {
            false
        };
        let conns = Arc::new(Connections::default());
        let mut listeners = Vec::with_capacity(ports.len());
        for &port in &ports {
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
                own_ports: m.ports.clone(),
                listeners,
                conns,
            },
        );
        Ok(())
    }

    /// Makes a running mapping listen on the ports `m` asks for now: opens
    /// the added ones first (on failure closes those again and changes
    /// nothing), then stops the listeners of removed ones. Connections stay
    /// as they are, on kept and removed ports alike: they end on their own.
    /// Returns the ports opened and closed (both empty: nothing to do).
    pub(super) fn change_ports(&mut self, m: &Mapping) -> Result<(Vec<u16>, Vec<u16>)> {
        let ip = m.local_ip;
        let wanted = m.ports_or(&self.ports).to_vec();
        let Some(r) = self.running.get(&ip) else {
            return Ok((Vec::new(), Vec::new()));
        };
        let have: Vec<u16> = r.listeners.iter().map(|l| l.port).collect();
        let added: Vec<u16> = wanted.iter().copied().filter(|p| !have.contains(p)).collect();
        let removed: Vec<u16> = have.iter().copied().filter(|p| !wanted.contains(p)).collect();
        if added.is_empty() && removed.is_empty() {
            if let Some(r) = self.running.get_mut(&ip) {
                r.own_ports = m.ports.clone();
            }
            return Ok((added, removed));
        }
        self.check_listener_room(ip, added.len())?;
        let (addr, conns) = (r.addr, r.conns.clone());
        let mut opened = Vec::with_capacity(added.len());
        for &port in &added {
            match Listener::start(ip, port, addr, self.data_path.clone(), conns.clone()) {
                Ok(l) => opened.push(l),
                Err(e) => return Err(bind_error(ip, port, &e)), // `opened` stop as dropped
            }
        }
        let Some(r) = self.running.get_mut(&ip) else {
            return Ok((Vec::new(), Vec::new()));
        };
        for l in r.listeners.iter_mut().filter(|l| removed.contains(&l.port)) {
            l.stop();
        }
        r.listeners.retain(|l| !removed.contains(&l.port));
        r.listeners.extend(opened);
        r.own_ports = m.ports.clone();
        Ok((added, removed))
    }

    /// Applies changed ports of mappings that run; a change that fails
    /// fails its generation and the mapping keeps the ports it has.
    fn apply_port_changes(&mut self, st: &mut State) {
        let mut failed = Vec::new();
        for m in st.mappings.iter_mut() {
            let Some(r) = self.running.get(&m.local_ip) else {
                continue;
            };
            if r.addr != m.pilot_addr || r.own_ports == m.ports {
                continue;
            }
            let before = r.own_ports.clone();
            match self.change_ports(m) {
                Ok((opened, closed)) if opened.is_empty() && closed.is_empty() => {}
                Ok((opened, closed)) => info!(
                    "ports of {} → {} now {} (opened {}, closed {})",
                    m.local_ip,
                    m.pilot_addr,
                    subnet::format_ports(m.ports_or(&self.ports)),
                    if opened.is_empty() {
                        "none".into()
                    } else {
                        subnet::format_ports(&opened)
                    },
                    if closed.is_empty() {
                        "none".into()
                    } else {
                        subnet::format_ports(&closed)
                    },
                ),
                Err(e) => {
                    warn!(
                        "cannot change the ports of {} → {}: {e}",
                        m.local_ip, m.pilot_addr
                    );
                    failed.push((m.generation, e));
                    m.ports = before;
                }
            }
        }
        for (generation, e) in failed {
            st.record_failure(generation, e);
        }
    }

    /// Binds the exposure's pilot port and starts serving it, giving up by
    /// `by`. `retry`: how long to retry a port the daemon still holds (a
    /// restart).
    pub(super) fn bring_up_exposure(&mut self, e: &Exposed, retry: Duration, by: Instant) -> Result<()> {
        let session = SessionSlot::take(&self.data_path, e.port)?;
        let dp = self.data_path.clone();
        let on_end: expose::OnEnd = Arc::new(move |end: &expose::Ended| {
            if let Some(a) = &dp.access {
                a.write(&end.record());
            }
        });
        let opts = expose::Options {
            allow: e.allow_set(),
            allow_remote_target: e.allow_remote_target,
            own_subnet: Some(self.subnet),
            daemon_uid: Some(self.data_path.settings.daemon_uid),
            budget: Some(Arc::new(ExposedSlots(self.data_path.clone()))),
            idle_timeout: self.data_path.settings.idle_timeout,
            on_end: Some(on_end),
            closer: self.data_path.closer.get().cloned(),
            proxy_protocol: e.proxy_protocol,
            local_addr: self.data_path.closer.get().and_then(|c| c.local_addr()),
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
    pub(super) fn tear_down_exposure(&mut self, port: u16) -> usize {
        let Some(r) = self.exposed.remove(&port) else {
            return 0;
        };
        Self::close_exposure(port, r)
    }

    /// Stops a running (or draining) exposure; returns how many live
    /// connections were cut.
    pub(super) fn close_exposure(port: u16, mut r: RunningExposure) -> usize {
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
    pub(super) fn apply_exposures(&mut self, st: &mut State) -> usize {
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
            // The port of a drain under way: that drain ends now (the
            // daemon would hold the port for it).
            self.end_drain_of_port(e.port);
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
    pub(super) fn tear_down(&mut self, ip: Ipv4Addr) -> usize {
        let Some(m) = self.running.remove(&ip) else {
            return 0;
        };
        self.close_mapping(ip, m)
    }

    /// Stops a running (or draining) mapping: listeners, live connections,
    /// then our alias. Returns how many live connections were cut.
    pub(super) fn close_mapping(&mut self, ip: Ipv4Addr, mut m: RunningMapping) -> usize {
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
    pub(super) fn stop_listening(&mut self, ips: Vec<Ipv4Addr>) {
        for (_, m) in self.running.iter_mut().filter(|(ip, _)| ips.contains(ip)) {
            for l in &mut m.listeners {
                l.stop();
            }
        }
    }

    /// Tears down the mappings `st` no longer wants and those whose
    /// address changed (an unmap and a map in one go). With a drain
    /// (`unmap --drain`, `unexpose --drain`), the mappings and exposures `st`
    /// no longer wants drain in the background instead (see `drain.rs`);
    /// without one, `apply_exposures` stops the exposures. Returns how many
    /// connections were cut.
    pub(super) fn retire(&mut self, st: &State) -> usize {
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
        let gone = if drain.is_zero() {
            gone
        } else {
            for ip in gone {
                self.drain_mapping(ip, drain, st.generation);
            }
            for port in unexposed {
                self.drain_exposure(port, drain, st.generation);
            }
            self.write_draining_note();
            Vec::new()
        };
        let changed = st.mappings.iter().filter(|m| {
            self.running
                .get(&m.local_ip)
                .is_some_and(|l| l.addr != m.pilot_addr)
        });
        let changed: Vec<Ipv4Addr> = changed.map(|m| m.local_ip).collect();
        gone.into_iter().chain(changed).map(|ip| self.tear_down(ip)).sum()
    }

    /// Applies state.json to the running set (SIGHUP).
    pub(super) fn apply(&mut self) {
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
        self.apply_port_changes(&mut st);
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
            // The address of a drain under way: that drain ends now (its
            // alias and listeners are the old mapping's).
            self.end_drain_of_ip(m2.local_ip);
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
    pub(super) fn drop_invalid(&self, st: &mut State) {
        st.subnet = self.subnet;
        st.ports = self.ports.clone();
        st.daemon_uid = self.data_path.settings.daemon_uid;
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
