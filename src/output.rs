//! How results are shown: the JSON envelopes (`{"status":"ok","data":…}`
//! and the error form with code, message and hint) and the text for
//! people, for every command's result.

use std::io::Write;

use crate::error::{Code, Error};
use crate::escape::escape_control;
use crate::gateway::Report;
use crate::json::Value;
use crate::state::{Exposed, Mapping, State};
use crate::stats::{DialError, ExposureStats, Stats};
use crate::subnet;

/// Prints results and errors in the chosen form.
pub struct Output {
    pub json: bool,
}

impl Output {
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
            // Line by line, escaped: the text shows values from the state
            // file and the daemon (hostnames, user, socket path, reasons),
            // which must not carry escape sequences to a terminal.
            text.split_inclusive('\n')
                .try_for_each(|line| match line.strip_suffix('\n') {
                    Some(l) => writeln!(stdout, "{}", escape_control(l)),
                    None => write!(stdout, "{}", escape_control(line)),
                })
        };
        let _ = stdout.flush();
    }

    pub fn error(&self, e: &Error) {
        let mut stderr = std::io::stderr().lock();
        let _ = if self.json {
            writeln!(stderr, "{}", error_json(e))
        } else {
            // Escaped: messages can carry text from outside (the daemon's).
            let hint = e
                .hint
                .as_ref()
                .map(|h| format!("hint: {}\n", escape_control(h)))
                .unwrap_or_default();
            write!(stderr, "error: {}\n{hint}", escape_control(&e.message))
        };
    }

    /// Warnings go to stderr in text mode; in JSON they are in `data`.
    pub fn warnings(&self, warnings: &[String]) {
        if !self.json {
            for w in warnings {
                eprintln!("warning: {}", escape_control(w));
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

/// Reads an error envelope back (from the background gateway).
pub fn error_from_json(v: &Value) -> Error {
    let text = |k| v.get(k).and_then(Value::as_str).map(str::to_string);
    let mut e = Error::new(
        Code::from_name(&text("code").unwrap_or_default()),
        text("message").unwrap_or_else(|| "the gateway failed to start".into()),
    );
    e.hint = text("hint");
    e
}

/// The text form of a start report (rendered from its JSON, so that the
/// foreground and background paths print the same).
pub fn start_text(data: &Value) -> String {
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
    for e in data
        .get("exposures")
        .and_then(Value::as_array)
        .unwrap_or_default()
    {
        let s = |k| {
            e.get(k).map_or_else(
                || "?".to_string(),
                |v| v.as_str().map_or_else(|| v.to_string(), str::to_string),
            )
        };
        text += &format!("exposed pilot port {} → {}\n", s("port"), s("target"));
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

pub fn mapping_line(m: &Value) -> String {
    let s = |k| m.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let host = m
        .get("hostname")
        .and_then(Value::as_str)
        .map(|h| format!(" ({h})"))
        .unwrap_or_default();
    // Only a mapping's own ports are named: the gateway's are in its report.
    let own = if m.get("own_ports").and_then(Value::as_bool) == Some(true) {
        format!(", ports {}", ports_text(m))
    } else {
        String::new()
    };
    format!("mapped {} → {}{host}{own}", s("local_ip"), s("pilot_addr"))
}

/// `ports` of a JSON object as `80,443`.
fn ports_text(v: &Value) -> String {
    v.get("ports")
        .and_then(Value::as_array)
        .unwrap_or_default()
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The JSON form of a start report.
pub fn report_json(r: &Report) -> Value {
    Value::obj([
        ("pid", r.pid.into()),
        ("subnet", r.subnet.to_string().into()),
        ("ports", Value::Arr(r.ports.iter().map(|&p| p.into()).collect())),
        (
            "mappings",
            Value::Arr(r.mappings.iter().map(|m| mapping_json(m, &r.ports)).collect()),
        ),
        (
            "exposures",
            Value::Arr(r.exposures.iter().map(exposure_json).collect()),
        ),
        ("socket", r.socket.display().to_string().into()),
        ("user", r.user.clone().into()),
        ("capabilities", r.capabilities.clone().into()),
        ("warnings", r.warnings.clone().into()),
        ("cleaned", r.cleaned.clone().into()),
    ])
}

/// A mapping as commands report it: with the ports it listens on (its
/// own, or the gateway's `gateway_ports`) and whether they are its own.
pub fn mapping_json(m: &Mapping, gateway_ports: &[u16]) -> Value {
    let mut v = vec![
        ("local_ip", Value::from(m.local_ip.to_string())),
        ("pilot_addr", m.pilot_addr.to_string().into()),
        ("ports", crate::state::ports_json(m.ports_or(gateway_ports))),
        ("own_ports", m.ports.is_some().into()),
    ];
    if let Some(h) = &m.hostname {
        v.push(("hostname", h.clone().into()));
    }
    Value::obj(v)
}

/// An exposure as commands report it: as the state file records it (port,
/// target, the allow-list (null: none) with the hostname each peer was given
/// by, allow_remote_target, proxy_protocol) without the generation, which is internal.
pub fn exposure_json(e: &Exposed) -> Value {
    let mut v = e.to_json();
    if let Value::Obj(pairs) = &mut v {
        pairs.retain(|(k, _)| k != "generation");
    }
    v
}

/// The peers an exposure admits, for people: names where given.
fn allow_text(e: &Exposed) -> String {
    match &e.allow {
        None => "any peer the daemon lets in".into(),
        Some(l) => l
            .iter()
            .map(|(a, name)| match name {
                Some(n) => format!("{n} ({a})"),
                None => a.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// `expose`'s text: what is served, and to whom.
pub fn exposure_line(e: &Exposed, already: bool) -> String {
    let already = if already { " (already exposed)" } else { "" };
    format!(
        "exposed pilot port {} → {}{already}\n  allowed: {}\n{}",
        e.port,
        e.target,
        allow_text(e),
        if e.proxy_protocol {
            "  PROXY protocol v2 header sent to the service first\n"
        } else {
            ""
        }
    )
}

/// One exposure with its live counters (zero and `starting` when the
/// gateway has not reported it yet), as JSON and as a line of text.
fn exposure_row(e: &Exposed, stats: &Stats) -> (Value, String) {
    let none = ExposureStats {
        port: e.port,
        target: e.target,
        state: "starting".into(),
        reason: String::new(),
        counters: Default::default(),
    };
    let x = stats.exposure(e.port).unwrap_or(&none);
    let mut row = exposure_json(e);
    if let Value::Obj(pairs) = &mut row {
        pairs.push(("state".into(), x.state.clone().into()));
        pairs.push(("reason".into(), x.reason.clone().into()));
        for (k, n) in x.fields() {
            pairs.push((k.into(), n.into()));
        }
    }
    let c = &x.counters;
    let state = if x.reason.is_empty() {
        x.state.clone()
    } else {
        format!("{} ({})", x.state, escape_control(&x.reason))
    };
    let text = format!(
        "pilot port {} → {}  {state}  active {} total {} in {} B out {} B refused {} slow resets {}  allowed: {}{}\n",
        e.port,
        e.target,
        c.active,
        c.total,
        c.bytes_in,
        c.bytes_out,
        c.refused,
        c.slow_resets,
        escape_control(&allow_text(e)),
        if e.proxy_protocol { "  proxy-protocol" } else { "" },
    );
    (row, text)
}

/// Every exposure with its counters: JSON rows and text lines.
fn exposure_rows(st: &State, stats: &Stats) -> (Vec<Value>, String) {
    let mut text = String::new();
    let rows = st
        .exposures
        .iter()
        .map(|e| {
            let (row, line) = exposure_row(e, stats);
            text += &line;
            row
        })
        .collect();
    (rows, text)
}

/// `list`: every mapping with its counters, as JSON data and as text.
pub fn list(st: &State, stats: &Stats) -> (Value, String) {
    let mut text = String::new();
    let mut rows = Vec::new();
    for m in &st.mappings {
        let c = stats.mapping(m.local_ip);
        let mut row = mapping_json(m, &st.ports);
        if let Value::Obj(pairs) = &mut row {
            for (k, n) in c.fields().into_iter().filter(|(k, _)| *k != "idle_timeouts") {
                pairs.push((k.into(), n.into()));
            }
        }
        let host = m
            .hostname
            .as_ref()
            .map(|h| format!(" ({})", escape_control(h)))
            .unwrap_or_default();
        let last = stats.errors.last_on(m.local_ip);
        if let Value::Obj(pairs) = &mut row {
            pairs.push(("last_error".into(), last.map_or(Value::Null, DialError::to_json)));
        }
        text += &format!(
            "{} → {}{host}  ports {}{}  active {} total {} up {} B down {} B failed dials {}\n",
            m.local_ip,
            m.pilot_addr,
            subnet::format_ports(m.ports_or(&st.ports)),
            if m.ports.is_some() { " (own)" } else { "" },
            c.active,
            c.total,
            c.bytes_up,
            c.bytes_down,
            c.dial_failures
        );
        if let Some(e) = last {
            text += &format!(
                "    last error ({}s ago, port {}): {}\n",
                crate::state::now_unix().saturating_sub(e.at),
                e.port,
                escape_control(&e.error)
            );
        }
        rows.push(row);
    }
    let (exposures, exposed_text) = exposure_rows(st, stats);
    if rows.is_empty() {
        text = "no mappings\n".into();
    } else {
        text += &format!("total: {}\n", rows.len());
    }
    if !exposures.is_empty() {
        text += &format!("exposures: {}\n{exposed_text}", exposures.len());
    }
    let n = rows.len();
    (
        Value::obj([
            ("mappings", Value::Arr(rows)),
            ("total", n.into()),
            ("exposures", Value::Arr(exposures)),
        ]),
        text,
    )
}

/// `status`'s lines for the mappings with their own ports, and for the
/// last few distinct failed dials.
fn status_extra_text(st: &State, stats: &Stats) -> String {
    let mut text = String::new();
    for m in st.mappings.iter().filter(|m| m.ports.is_some()) {
        text += &format!(
            "  own ports: {} → {}: {}\n",
            m.local_ip,
            m.pilot_addr,
            subnet::format_ports(m.ports_or(&st.ports))
        );
    }
    if !stats.errors.recent.is_empty() {
        text += "  recent errors:\n";
        let now = crate::state::now_unix();
        for e in &stats.errors.recent {
            let times = if e.count > 1 {
                format!(", {} times", e.count)
            } else {
                String::new()
            };
            text += &format!(
                "    {}:{} ({}s ago{times}): {}\n",
                e.local_ip,
                e.port,
                now.saturating_sub(e.at),
                escape_control(&e.error)
            );
        }
    }
    text
}

/// `status`: the gateway, its daemon and its totals, as JSON data and text.
pub fn status(st: &State, stats: &Stats) -> (Value, String) {
    let t = &stats.totals;
    let reachable = stats
        .daemon
        .get("reachable")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut data = vec![
        ("running", Value::from(true)),
        ("pid", st.gateway.pid.into()),
        ("uptime_secs", stats.uptime_secs.into()),
        ("socket", st.socket.display().to_string().into()),
        ("daemon_reachable", reachable.into()),
        ("daemon", stats.daemon.clone()),
        ("subnet", st.subnet.to_string().into()),
        ("ports", Value::Arr(st.ports.iter().map(|&p| p.into()).collect())),
        ("user", st.user.clone().into()),
        ("mappings", st.mappings.len().into()),
        ("max_conns", stats.max_conns.into()),
        ("max_conns_requested", stats.max_conns_requested.into()),
        ("conns_in_use", stats.conns_in_use.into()),
        ("max_exposed", stats.max_exposed.into()),
        ("max_per_peer", stats.max_per_peer.into()),
        ("exposed_in_use", stats.exposed_in_use.into()),
        ("refused_max_exposed", stats.refused_max_exposed.into()),
        ("refused_per_peer", stats.refused_per_peer.into()),
        ("allow_remote", stats.allow_remote.into()),
        (
            "half_closed_timeout_secs",
            st.half_closed_timeout.as_secs_f64().into(),
        ),
        ("close_mode", stats.close_mode.clone().into()),
        (
            "close_linger_secs",
            (stats.close_linger_ms as f64 / 1000.0).into(),
        ),
        ("close_unconfirmed", stats.close_unconfirmed.into()),
    ];
    data.extend(t.json_pairs());
    data.push(("refused", stats.refused.into()));
    let (exposures, exposed_text) = exposure_rows(st, stats);
    let daemon_text = daemon_text(stats, reachable);
    let (max, remote) = limits_text(stats);
    let text = format!(
        "gateway running (pid {}, up {}s)\n  socket: {} (daemon {daemon_text})\n  subnet: {}\n  ports: {}\n  mappings: {}\n  connections: active {} (max {max}), total {}, refused {}, failed dials {}, idle timeouts {}, thread failures {}\n  clients from other hosts: {remote}\n  bytes: up {}, down {}\n  half-closed clients: closed at once when they close, else after {}s without data\n",
        st.gateway.pid,
        stats.uptime_secs,
        st.socket.display(),
        st.subnet,
        subnet::format_ports(&st.ports),
        st.mappings.len(),
        t.active,
        t.total,
        stats.refused,
        t.dial_failures,
        t.idle_timeouts,
        t.spawn_failures,
        t.bytes_up,
        t.bytes_down,
        st.half_closed_timeout.as_secs_f64(),
    );
    let text = format!(
        "{text}  exposed side: {} of {} slots in use (while an exposure runs, the rest is local clients' and theirs only), at most {} per peer; refused at --max-exposed {}, at --max-per-peer {}\n  closing: {}\n",
        stats.exposed_in_use,
        stats.max_exposed,
        stats.max_per_peer,
        stats.refused_max_exposed,
        stats.refused_per_peer,
        close_text(stats)
    );
    let text = text + &status_extra_text(st, stats);
    data.push((
        "mapping_ports",
        Value::Arr(st.mappings.iter().map(|m| mapping_json(m, &st.ports)).collect()),
    ));
    data.push((
        "recent_errors",
        Value::Arr(stats.errors.recent.iter().map(DialError::to_json).collect()),
    ));
    let text = if exposures.is_empty() {
        text
    } else {
        format!(
            "{text}  exposures: {}\n{}",
            exposures.len(),
            indent(&exposed_text)
        )
    };
    data.push(("exposures", Value::Arr(exposures)));
    (Value::obj(data), text)
}

/// The daemon's health as `status` shows it: reachable or why not, and
/// how long ago the gateway checked.
fn daemon_text(stats: &Stats, reachable: bool) -> String {
    let text = if reachable {
        "reachable".to_string()
    } else {
        let why = stats.daemon.get("error").and_then(Value::as_str).unwrap_or("?");
        format!("unreachable: {why}")
    };
    match stats.daemon.get("checked_secs_ago").and_then(Value::as_u64) {
        Some(age) => format!("{text}, checked {age}s ago"),
        None => text,
    }
}

/// How pilot connections are closed (`closing`), for `status`.
fn close_text(stats: &Stats) -> String {
    let linger = stats.close_linger_ms as f64 / 1000.0;
    let how = match stats.close_mode.as_str() {
        "confirmed" => format!(
            "confirmed (each Close waits until the daemon reports the data delivered, up to {linger}s without progress)"
        ),
        "immediate" => "immediate (this daemon does not report what it has delivered)".to_string(),
        other => format!("{other} (the daemon has not answered yet)"),
    };
    format!("{how}, {} closed unconfirmed", stats.close_unconfirmed)
}

/// `--max-conns` in force (and why it is lower than asked, if it is), and
/// what happens to clients from other hosts.
fn limits_text(stats: &Stats) -> (String, String) {
    let max = if stats.max_conns == stats.max_conns_requested {
        stats.max_conns.to_string()
    } else {
        format!(
            "{}, lowered from {} to fit the open-file limit",
            stats.max_conns, stats.max_conns_requested
        )
    };
    // One budget: forwarded and exposed connections and each exposure's
    // daemon session all take slots of it, each side within its share.
    let max = format!(
        "{max}, split with exposed ports: {} slots in use",
        stats.conns_in_use
    );
    let remote = if stats.allow_remote {
        "served (--allow-remote)".to_string()
    } else {
        format!("refused {}", stats.totals.refused_remote)
    };
    (max, remote)
}

fn indent(lines: &str) -> String {
    lines.lines().map(|l| format!("    {l}\n")).collect()
}
