//! The commands that change what the gateway serves: `map`, `unmap`,
//! `expose`, `unexpose` (under the state lock, then SIGHUP and a wait for
//! the gateway to apply it).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::address::PilotAddr;
use crate::cli::{Args, Expose};
use crate::daemon;
use crate::error::{Code, Error, Result};
use crate::gateway;
use crate::json::Value;
use crate::output::{self, Output};
use crate::state::{Exposed, Mapping, State, StateDir};
use crate::subnet;
use crate::sys::fs::FileLock;

use super::*;

pub(super) fn map(args: &Args, out: &Output, target: &str, ip: Option<&str>) -> Result<()> {
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

    let (lock, mut st) = lock_live_state(&dir)?;
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
pub(super) fn change_ports(
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
pub(super) fn ask_daemon(
    st: &State,
    target: &str,
    warnings: &mut Vec<String>,
) -> Result<(PilotAddr, Option<String>)> {
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
pub(super) enum MapOutcome {
    New,
    Existing,
    /// The mapping's ports changed, from these.
    PortsChanged(Vec<u16>),
}

pub(super) fn report_map(
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

pub(super) fn unmap(args: &Args, out: &Output, ip_text: &str) -> Result<()> {
    let ip: Ipv4Addr = ip_text.parse().map_err(|_| {
        Error::invalid(format!(
            "invalid local IP {ip_text:?}: expected an IPv4 address such as 10.4.0.1"
        ))
        .hint("see the mapped IPs with: pilot-gateway list")
    })?;
    let (dir, _) = running(args)?;
    let (lock, mut st) = lock_live_state(&dir)?;
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
pub(super) fn expose(args: &Args, out: &Output, req: &Expose) -> Result<()> {
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
        proxy_protocol: req.proxy_protocol,
        generation: 0,
    };
    let (lock, mut st) = lock_live_state(&dir)?;
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
pub(super) fn unexpose(args: &Args, out: &Output, port: &str) -> Result<()> {
    let port = port.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| {
        Error::invalid(format!("pilot port {port:?} is not a number from 1 to 65535"))
            .hint("see the exposed ports with: pilot-gateway list")
    })?;
    let (dir, _) = running(args)?;
    let (lock, mut st) = lock_live_state(&dir)?;
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
pub(super) fn apply_removal(
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
pub(super) enum Removal {
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

/// Takes the state lock and reads the state under it, which must still be
/// a live gateway's: what every change starts from.
fn lock_live_state(dir: &StateDir) -> Result<(FileLock, State)> {
    let lock = dir.lock()?;
    let st = dir
        .read()?
        .ok_or_else(|| Error::new(Code::NotRunning, "the gateway stopped meanwhile"))?;
    check_alive(&st)?;
    Ok((lock, st))
}
