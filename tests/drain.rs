//! Issue 18: drains never block. `unmap --drain`, `unexpose --drain` and
//! `stop --drain` run in the background of the running gateway: the
//! command returns at once with what drains (or waits with `--wait`,
//! without holding the state lock), `status` shows the drain with the
//! time left, and a `map`, a `status` or a SIGTERM during a drain is
//! served within a second (SIGTERM ends the drain and cuts).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use pilot_gateway::json::Value;

/// The bound on a command served during a drain. The promise is "within a
/// second"; what the tests must catch is a command that waits for the
/// drain (30 or 60 s here), so they allow five on a shared, loaded machine.
const PROMPT: Duration = Duration::from_secs(5);

/// A live connection through `addr`: an echo answered once.
fn live(addr: &str) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    s
}

/// Runs `gw ARGS` and returns (its `data`, how long it took).
fn timed(gw: &Gw, args: &[&str]) -> (Value, Duration) {
    let t = Instant::now();
    let d = gw.data(args);
    (d, t.elapsed())
}

/// Whether process `pid` is gone (or a zombie waiting to be reaped).
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

fn draining(status: &Value, kind: &str) -> Vec<Value> {
    status
        .get("draining")
        .and_then(|d| d.get(kind))
        .and_then(Value::as_array)
        .unwrap_or_default()
        .to_vec()
}

#[test]
fn unmap_drain_returns_at_once_and_the_control_plane_stays_live() {
    netns();
    let dir = TempDir::new("drain-bg");
    let _svc = Service::start(8080, echo);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    gw.ok(&["start", "--ports", "8080", A4, A5]);
    let mut c = live("10.4.0.2:8080");
    let (d, took) = timed(&gw, &["unmap", "--drain", "60", "10.4.0.2"]);
    assert!(took < PROMPT, "unmap --drain returned in {took:?}");
    let entry = d.get("draining").cloned().unwrap_or(Value::Null);
    assert_eq!(entry.get("active").and_then(Value::as_u64), Some(1), "{d}");
    assert!(
        entry.get("secs_left").and_then(Value::as_f64).unwrap() > 50.0,
        "{d}"
    );
    // The live connection goes on; new ones are refused.
    c.write_all(b"y").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    assert!(TcpStream::connect_timeout(&"10.4.0.2:8080".parse().unwrap(), Duration::from_secs(1)).is_err());
    // status and map are served within a second during the drain.
    let (s, took) = timed(&gw, &["status"]);
    assert!(took < PROMPT, "status took {took:?}");
    let maps = draining(&s, "mappings");
    assert_eq!(maps.len(), 1, "{s}");
    assert_eq!(maps[0].get("local_ip").and_then(Value::as_str), Some("10.4.0.2"));
    let left = maps[0].get("secs_left").and_then(Value::as_f64).unwrap();
    assert!(left > 50.0 && left <= 60.0, "{s}");
    let text = gw.ok(&["status"]);
    assert!(
        text.contains("draining 10.4.0.2 → 0:0000.0000.0005: 1 live connection"),
        "{text}"
    );
    let (m, took) = timed(&gw, &["map", A6]);
    assert!(took < PROMPT, "map took {took:?}");
    // The draining IP is not handed out again while it drains... or if it
    // is, the drain of it ends first; either way the new mapping works.
    let ip = m.get("local_ip").and_then(Value::as_str).unwrap().to_string();
    assert!(has_alias(&ip));
    // SIGTERM (a plain stop) during the drain: served at once, cuts it.
    let (d, took) = timed(&gw, &["stop"]);
    assert!(took < PROMPT, "stop took {took:?}");
    assert!(n(&d, "cut") >= 1, "{d}");
    assert!(sees_reset(&mut c, Duration::from_secs(5)) || c.read(&mut b).map_or(true, |n| n == 0));
    assert!(!has_alias("10.4.0.1") && !has_alias("10.4.0.2"));
}

#[test]
fn unmap_drain_wait_prints_progress_without_holding_the_lock() {
    netns();
    let dir = TempDir::new("drain-wait");
    let _svc = Service::start(8080, echo);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    gw.ok(&["start", "--ports", "8080", A4, A5]);
    let c = live("10.4.0.2:8080");
    let mut cmd = gw.cmd();
    cmd.args(["unmap", "--drain", "30", "--wait", "10.4.0.2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let waiting = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    // The lock is free: a map and a status are served meanwhile.
    let (_, took) = timed(&gw, &["map", A6]);
    assert!(took < PROMPT, "map took {took:?}");
    let (_, took) = timed(&gw, &["status"]);
    assert!(took < PROMPT, "status took {took:?}");
    drop(c);
    let out = waiting.wait_with_output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("draining 10.4.0.2: 1 live connection"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("unmapped 10.4.0.2"), "{stdout}");
    assert!(!stdout.contains("cut"), "nothing cut: {stdout}");
    assert!(!has_alias("10.4.0.2"));
    gw.ok(&["stop"]);
}

#[test]
fn stop_drain_returns_at_once_and_a_second_stop_cuts() {
    netns();
    let dir = TempDir::new("drain-stop");
    let _svc = Service::start(8080, echo);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    gw.ok(&["start", "--ports", "8080", A4]);
    let pid = gw.pid();
    let mut c = live("10.4.0.1:8080");
    let (d, took) = timed(&gw, &["stop", "--drain", "60"]);
    assert!(took < PROMPT, "stop --drain took {took:?}");
    assert_eq!(d.get("stopping").and_then(Value::as_bool), Some(true), "{d}");
    let maps = d
        .get("draining")
        .and_then(|x| x.get("mappings"))
        .and_then(Value::as_array)
        .unwrap_or_default();
    assert_eq!(maps.len(), 1, "{d}");
    // status during the stop's drain: within a second, and says so.
    let (s, took) = timed(&gw, &["status"]);
    assert!(took < PROMPT, "status took {took:?}");
    assert_eq!(
        s.get("draining")
            .and_then(|x| x.get("stopping"))
            .and_then(Value::as_bool),
        Some(true),
        "{s}"
    );
    // A map is refused politely or ignored, never hangs.
    let t = Instant::now();
    let _ = gw.run(&["map", A5]);
    assert!(t.elapsed() < Duration::from_secs(12));
    let mut b = [0u8; 1];
    c.write_all(b"y").unwrap();
    c.read_exact(&mut b).unwrap();
    // A plain stop (SIGTERM) ends the drain and cuts what is live.
    let (d, took) = timed(&gw, &["stop"]);
    assert!(took < PROMPT, "stop took {took:?}");
    assert_eq!(n(&d, "cut"), 1, "{d}");
    assert!(gone(pid));
    assert!(!has_alias("10.4.0.1"));
}

#[test]
fn stop_drain_ends_by_itself_once_connections_are_gone() {
    netns();
    let dir = TempDir::new("drain-self");
    let _svc = Service::start(8080, echo);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    gw.ok(&["start", "--ports", "8080", A4]);
    let pid = gw.pid();
    let c = live("10.4.0.1:8080");
    let d = gw.data(&["stop", "--drain", "60"]);
    assert_eq!(d.get("stopping").and_then(Value::as_bool), Some(true), "{d}");
    drop(c);
    assert!(
        wait_until(Duration::from_secs(5), || gone(pid)),
        "the gateway exits once its last connection ended"
    );
    assert!(!has_alias("10.4.0.1"));
    assert!(!gw.state.join("state.json").exists());
}

#[test]
fn unexpose_drain_returns_at_once_and_status_shows_it() {
    netns();
    let dir = TempDir::new("drain-x");
    let _svc = Service::start(8000, echo);
    let devd = Devd::start(&dir, &["--inbound", "127.0.0.1:7100=0:0000.0000.0009:80"]);
    let gw = Gw::new(&dir, &devd.socket);
    gw.ok(&["start", "--expose", "80=8000"]);
    let mut c = live("127.0.0.1:7100");
    let (d, took) = timed(&gw, &["unexpose", "--drain", "60", "80"]);
    assert!(took < PROMPT, "unexpose --drain took {took:?}");
    assert_eq!(
        d.get("draining")
            .and_then(|e| e.get("active"))
            .and_then(Value::as_u64),
        Some(1),
        "{d}"
    );
    let (s, took) = timed(&gw, &["status"]);
    assert!(took < PROMPT, "status took {took:?}");
    let x = draining(&s, "exposures");
    assert_eq!(x.len(), 1, "{s}");
    assert_eq!(x[0].get("port").and_then(Value::as_u64), Some(80));
    let mut b = [0u8; 1];
    c.write_all(b"y").unwrap();
    c.read_exact(&mut b).unwrap();
    // Exposing the port again ends that drain first.
    let (_, took) = timed(&gw, &["expose", "80", "8000"]);
    assert!(took < Duration::from_secs(8), "expose took {took:?}");
    let s = status(&gw);
    assert!(draining(&s, "exposures").is_empty(), "{s}");
    gw.ok(&["stop"]);
}
