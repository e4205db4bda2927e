//! The commands that look at the gateway or end it: `list`, `status`,
//! `stop`, and what they show of drains in progress.

use std::time::{Duration, Instant};

use crate::cli::Args;
use crate::error::{Code, Error, Result};
use crate::gateway;
use crate::json::Value;
use crate::output::{self, Output};
use crate::privilege;
use crate::state::{State, StateDir};
use crate::stats::Stats;
use crate::subnet;

use super::*;

/// The entry of `draining.json` of `what`, as the gateway `pid` wrote it.
pub(super) fn draining_entry(dir: &StateDir, pid: u32, what: &str) -> Option<Value> {
    let note = dir.read_note_max(gateway::DRAINING_NOTE, gateway::DRAINING_NOTE_MAX)?;
    if note.get("pid").and_then(Value::as_u64) != Some(u64::from(pid)) {
        return None;
    }
    find_draining(&note, what)
}

/// The draining entry (mapping or exposure) named `what` (an IP, or
/// `port N`).
pub(super) fn find_draining(note: &Value, what: &str) -> Option<Value> {
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
pub(super) fn drain_done(note: &Value, what: &str, generation: u64) -> Option<u64> {
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
pub(super) fn draining_text(e: &Value) -> String {
    let active = e.get("active").and_then(Value::as_u64).unwrap_or(0);
    let left = e.get("secs_left").and_then(Value::as_f64).unwrap_or(0.0);
    let conns = if active == 1 {
        "1 live connection".to_string()
    } else {
        format!("{active} live connections")
    };
    let refused = match e.get("refused").and_then(Value::as_u64) {
        Some(n) if n > 0 => format!(", {n} new refused"),
        _ => String::new(),
    };
    format!("{conns}, {left:.1}s left{refused}")
}

/// The text form of a `cut` count: nothing when none was cut.
pub(super) fn cut_note(cut: u64) -> String {
    match cut {
        0 => String::new(),
        1 => " (1 live connection cut)".into(),
        n => format!(" ({n} live connections cut)"),
    }
}

/// `--drain SECS` of stop, unmap and unexpose (0 without it).
pub(super) fn drain_secs(args: &Args) -> Result<Duration> {
    match &args.drain {
        None => Ok(Duration::ZERO),
        Some(_) => parse_secs("--drain", args.drain.as_deref(), 0.0),
    }
}

/// Leaves the drain time for the gateway, which reads it when it handles
/// the signal that follows (and removes it).
pub(super) fn request_drain(dir: &StateDir, drain: Duration) -> Result<()> {
    if drain.is_zero() {
        dir.remove("drain");
        return Ok(());
    }
    let note = Value::obj([("secs", Value::from(drain.as_secs_f64()))]);
    dir.write_atomic("drain", &format!("{note}\n"))
}

/// Asks the gateway for fresh counters (SIGUSR2) and reads them.
pub(super) fn fetch_stats(dir: &StateDir, st: &State) -> Result<Stats> {
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

pub(super) fn list(args: &Args, out: &Output) -> Result<()> {
    let (dir, st) = running(args)?;
    let stats = fetch_stats(&dir, &st)?;
    let (data, text) = output::list(&st, &stats);
    out.ok(data, &text);
    Ok(())
}

pub(super) fn status(args: &Args, out: &Output) -> Result<()> {
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
pub(super) fn add_draining(dir: &StateDir, data: &mut Value, text: &mut String, pid: u32) {
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
pub(super) fn add_limits(dir: &StateDir, data: &mut Value, text: &mut String) {
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
pub(super) fn draining_lines(note: &Value) -> Vec<String> {
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
pub(super) fn await_stopping(dir: &StateDir, st: &State) -> Result<Option<Value>> {
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
pub(super) fn report_stopping(out: &Output, st: &State, drain: Duration, note: &Value) -> Result<()> {
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
pub(super) fn add_privileges(data: &mut Value, text: &mut String, pid: u32) {
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

pub(super) fn stop(args: &Args, out: &Output) -> Result<()> {
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
