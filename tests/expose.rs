//! `expose` end to end, the way a user runs it: the pilot-gateway CLI
//! (`start --expose`, `expose`, `unexpose`, `list`, `status`) against
//! pilot-devd, whose `--inbound` turns local TCP connections into inbound
//! pilot connections from a chosen peer.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use common::*;
use pilot_gateway::json::Value;

const P9: &str = "0:0000.0000.0009";
const P8: &str = "0:0000.0000.0008";
/// devd turns connections here into inbound ones from P9 to pilot port 80.
const IN80: &str = "127.0.0.1:7100";

fn devd(dir: &TempDir, extra: &[&str]) -> Devd {
    let mut args = vec!["--inbound", "127.0.0.1:7100=0:0000.0000.0009:80"];
    args.extend_from_slice(extra);
    Devd::start(dir, &args)
}

/// The `list --json` row of pilot port `port`.
fn exposure(gw: &Gw, port: u64) -> Value {
    let list = gw.data(&["list"]);
    list.get("exposures")
        .and_then(Value::as_array)
        .and_then(|rows| {
            rows.iter()
                .find(|r| r.get("port").and_then(Value::as_u64) == Some(port))
        })
        .cloned()
        .unwrap_or_else(|| panic!("port {port} not listed: {list}"))
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no {key} in {v}"))
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Runs a command that must fail; returns its JSON error envelope.
fn fails(gw: &Gw, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = gw.run(&a);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
    pilot_gateway::json::parse(String::from_utf8_lossy(&out.stderr).trim()).unwrap()
}

#[test]
fn sixty_four_mib_both_ways_through_start_expose() {
    netns();
    let dir = TempDir::new("x-64");
    let _src = Service::start(8000, source);
    let _snk = Service::start(8001, verify);
    let d = devd(&dir, &["--inbound", "127.0.0.1:7101=0:0000.0000.0009:81"]);
    let gw = Gw::new(&dir, &d.socket);
    // A gateway with exposures only, no mappings; a bare port is 127.0.0.1.
    let started = gw.data(&["start", "--expose", "80=8000", "--expose", "81=127.0.0.1:8001"]);
    let rows = started.get("exposures").and_then(Value::as_array).unwrap();
    assert_eq!(rows.len(), 2, "{started}");
    assert_eq!(text(&rows[0], "target"), "127.0.0.1:8000");
    assert!(started.get("warnings").unwrap().to_string() == "[]", "{started}");
    const LEN: usize = 64 << 20;
    let uploader = thread::spawn(|| upload_whole("127.0.0.1:7101", LEN));
    let (got, hash) = download(IN80, LEN);
    assert_eq!((got, hash), (LEN, expected_download(LEN)), "download byte-exact");
    let (count, first_diff) = uploader.join().unwrap();
    assert_eq!((count, first_diff), (LEN as u64, u64::MAX), "upload byte-exact");
    assert!(wait_until(Duration::from_secs(10), || num(
        &exposure(&gw, 80),
        "active"
    ) == 0
        && num(&exposure(&gw, 81), "active") == 0));
    let (down, up) = (exposure(&gw, 80), exposure(&gw, 81));
    assert_eq!(num(&down, "bytes_out"), LEN as u64);
    assert_eq!(num(&up, "bytes_in"), LEN as u64 + 8);
    assert_eq!((num(&down, "total"), num(&up, "total")), (1, 1));
    assert_eq!(num(&down, "slow_resets") + num(&up, "slow_resets"), 0);
}

#[test]
fn fifty_connections_one_service_never_reads_only_it_is_reset() {
    netns();
    let dir = TempDir::new("x-slow");
    // The service: its first connection never reads; the others echo.
    let svc = NeverReadsFirst::start(8000, 50);
    let d = devd(&dir, &[]);
    let gw = Gw::new(&dir, &d.socket);
    gw.ok(&["start"]);
    gw.ok(&["expose", "80", "127.0.0.1:8000"]);
    // Pours data at the one that never reads until it is reset (bounded).
    let pouring = pour(IN80);
    assert!(wait_until(Duration::from_secs(10), || svc.accepted() == 1));
    echoes_byte_exact(IN80, 49);
    assert!(
        wait_until(Duration::from_secs(60), || num(&exposure(&gw, 80), "slow_resets")
            == 1),
        "the service that never reads was not reset: {}",
        exposure(&gw, 80)
    );
    let mut held = svc.take_held();
    assert!(
        sees_reset(&mut held, Duration::from_secs(10)),
        "its socket sees a reset"
    );
    pouring.join().unwrap();
    assert!(wait_until(Duration::from_secs(10), || num(
        &exposure(&gw, 80),
        "active"
    ) == 0));
    let row = exposure(&gw, 80);
    assert_eq!((num(&row, "total"), num(&row, "slow_resets")), (50, 1), "{row}");
    assert_eq!(text(&row, "state"), "bound");
}

/// Whether a connection through `via` gets the echo (admitted) or is
/// closed without data (refused).
fn admitted(via: &str) -> bool {
    let mut s = connect(via);
    let _ = s.write_all(b"hello");
    let mut buf = [0u8; 5];
    matches!(s.read_exact(&mut buf), Ok(()) if &buf == b"hello")
}

#[test]
fn allow_admits_listed_peers_by_hostname_and_address() {
    netns();
    let dir = TempDir::new("x-allow");
    let _svc = Service::start(8000, echo);
    let access = dir.path("access.log");
    let d = devd(
        &dir,
        &[
            "--inbound",
            "127.0.0.1:7101=0:0000.0000.0008:80",
            "--host",
            "lab-a=0:0000.0000.0009",
        ],
    );
    let gw = Gw::new(&dir, &d.socket);
    gw.ok(&["start", "--access-log", access.to_str().unwrap()]);
    // By hostname (resolved through the daemon): node 9 only.
    let e = gw.data(&["expose", "80", "8000", "--allow", "lab-a"]);
    assert_eq!(
        e.get("allow").unwrap().to_string(),
        format!(r#"[{{"addr":"{P9}","name":"lab-a"}}]"#)
    );
    assert!(admitted(IN80), "lab-a (node 9) is admitted");
    assert!(!admitted("127.0.0.1:7101"), "node 8 is refused");
    assert!(wait_until(Duration::from_secs(10), || num(
        &exposure(&gw, 80),
        "active"
    ) == 0));
    let row = exposure(&gw, 80);
    assert_eq!((num(&row, "total"), num(&row, "refused")), (1, 1), "{row}");
    let listed = gw.ok(&["list"]);
    assert!(listed.contains("allowed: lab-a (0:0000.0000.0009)"), "{listed}");
    // An unknown hostname is refused before anything changes.
    let err = fails(&gw, &["expose", "81", "8000", "--allow", "nosuch"]);
    assert_eq!(text(&err, "code"), "not_found", "{err}");
    // By address, through pilotctl's spelling: now node 8 only.
    gw.ok(&["unexpose", "80"]);
    let pilotctl = dir.path("pilotctl");
    std::os::unix::fs::symlink(GATEWAY, &pilotctl).unwrap();
    let out = std::process::Command::new(&pilotctl)
        .arg("--state-dir")
        .arg(&gw.state)
        .arg("--socket")
        .arg(&gw.socket)
        .args(["gateway", "expose", "80", "8000", "--allow", P8])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(admitted("127.0.0.1:7101"), "node 8 is admitted");
    assert!(!admitted(IN80), "node 9 is refused");
    gw.ok(&["stop"]);
    let log = std::fs::read_to_string(&access).unwrap();
    assert!(
        log.contains(&format!("inbound peer={P8}:")) && log.contains("outcome=refused"),
        "{log}"
    );
}

#[test]
fn a_port_already_bound_is_port_in_use() {
    netns();
    let dir = TempDir::new("x-inuse");
    let d = devd(&dir, &[]);
    let gw = Gw::new(&dir, &d.socket);
    // A start exposing into its own subnet is refused before anything runs.
    let err = fails(
        &gw,
        &["start", "--expose", "80=10.4.0.1:9090", "--allow-remote-target"],
    );
    assert_eq!(text(&err, "code"), "bad_target", "{err}");
    gw.ok(&["start"]);
    // The daemon's own ports, and one another program holds.
    use pilot_gateway::ipc::{self, cmd, FrameReader};
    let holder = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    holder.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&holder)
        .write_all(&ipc::encode(cmd::BIND, &[&90u16.to_be_bytes()]))
        .unwrap();
    let mut r = FrameReader::new(holder.try_clone().unwrap(), 1024);
    assert!(
        matches!(r.read_frame(), Ok((cmd::BIND_OK, _))),
        "another program holds 90"
    );
    for port in ["7", "1001", "1002", "90"] {
        let err = fails(&gw, &["expose", port, "8000"]);
        assert_eq!(text(&err, "code"), "port_in_use", "port {port}: {err}");
        assert!(text(&err, "message").contains("already bound"), "{err}");
    }
    // Nothing of a failed expose stays.
    assert_eq!(gw.data(&["list"]).get("exposures").unwrap().to_string(), "[]");
    gw.ok(&["expose", "80", "8000"]);
    assert_eq!(
        text(&fails(&gw, &["expose", "80", "8001"]), "code"),
        "already_exists"
    );
    gw.ok(&["expose", "80", "8000"]); // the same again: same answer
    for target in [
        "192.0.2.1:80",
        "127.0.0.1:0",
        "0.0.0.0:80",
        "[::ffff:0.0.0.0]:80",
        "localhost",
    ] {
        let err = fails(&gw, &["expose", "81", target]);
        assert_eq!(text(&err, "code"), "bad_target", "{target}: {err}");
    }
    // The gateway's own subnet (its mappings): refused even when remote
    // targets are allowed, with a message that says why.
    for target in ["10.4.0.1:9090", "[::ffff:10.4.0.1]:9090"] {
        let err = fails(&gw, &["expose", "81", target, "--allow-remote-target"]);
        assert_eq!(text(&err, "code"), "bad_target", "{target}: {err}");
        assert!(
            text(&err, "message").contains("inside the gateway's subnet"),
            "{err}"
        );
    }
    assert_eq!(text(&fails(&gw, &["unexpose", "81"]), "code"), "not_found");
    drop(holder);
}

#[test]
fn a_daemon_restart_rebinds() {
    netns();
    let dir = TempDir::new("x-restart");
    let _svc = Service::start(8000, echo);
    let d = devd(&dir, &[]);
    let gw = Gw::new(&dir, &d.socket);
    gw.ok(&["start", "--expose", "80=8000"]);
    assert!(short_exchange(IN80));
    drop(d); // killed and reaped
    assert!(
        wait_until(Duration::from_secs(10), || text(&exposure(&gw, 80), "state")
            == "rebinding"),
        "{}",
        exposure(&gw, 80)
    );
    let status = gw.ok(&["status"]);
    assert!(
        status.contains("pilot port 80 → 127.0.0.1:8000  rebinding ("),
        "{status}"
    );
    let _d = devd(&dir, &[]);
    assert!(
        wait_until(Duration::from_secs(20), || text(&exposure(&gw, 80), "state")
            == "bound"),
        "{}",
        exposure(&gw, 80)
    );
    assert_eq!(num(&exposure(&gw, 80), "rebinds"), 1);
    assert!(short_exchange(IN80), "new inbound connections work");
}

#[test]
fn list_and_status_show_exposures_and_unexpose_frees_the_port() {
    netns();
    let dir = TempDir::new("x-list");
    let _svc = Service::start(8000, echo);
    let d = devd(&dir, &[]);
    let gw = Gw::new(&dir, &d.socket);
    gw.ok(&["start", A4]);
    gw.ok(&["expose", "80", "8000"]);
    assert!(short_exchange(IN80));
    assert!(wait_until(Duration::from_secs(10), || num(
        &exposure(&gw, 80),
        "active"
    ) == 0));
    let row = exposure(&gw, 80);
    for (k, want) in [
        ("total", 1),
        ("bytes_in", 5),
        ("bytes_out", 5),
        ("refused", 0),
        ("slow_resets", 0),
    ] {
        assert_eq!(num(&row, k), want, "{k}: {row}");
    }
    assert_eq!(text(&row, "state"), "bound");
    let list = gw.ok(&["list"]);
    assert!(list.contains("10.4.0.1 → 0:0000.0000.0004"), "{list}");
    assert!(
        list.contains("pilot port 80 → 127.0.0.1:8000  bound  active 0 total 1 in 5 B out 5 B refused 0"),
        "{list}"
    );
    let status = gw.data(&["status"]);
    let rows = status.get("exposures").and_then(Value::as_array).unwrap();
    assert_eq!((rows.len(), num(&rows[0], "total")), (1, 1), "{status}");
    assert!(gw.ok(&["status"]).contains("exposures: 1"));
    // A live connection is cut by unexpose, and the port is free again.
    let mut live = connect(IN80);
    live.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    live.read_exact(&mut b).unwrap();
    let gone = gw.data(&["unexpose", "80"]);
    assert_eq!((num(&gone, "port"), num(&gone, "cut")), (80, 1), "{gone}");
    assert!(can_bind(&d.socket, 80), "another program can bind the port now");
    assert_eq!(gw.data(&["list"]).get("exposures").unwrap().to_string(), "[]");
    let mut rest = Vec::new();
    let _ = live.read_to_end(&mut rest);
}

#[test]
fn exposures_in_the_state_file_are_checked_again() {
    netns();
    let dir = TempDir::new("x-tamper");
    let d = devd(&dir, &[]);
    let gw = Gw::new(&dir, &d.socket);
    gw.ok(&["start"]);
    // Edit state.json by hand, as the gateway's user could: a LAN target
    // without allow_remote_target, and port 0.
    let path = gw.state.join("state.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let generation = num(&pilot_gateway::json::parse(&text).unwrap(), "generation");
    let bad = format!(
        r#""exposures":[{{"port":81,"target":"192.0.2.1:80","allow":null,"allow_remote_target":false,"generation":{g}}},{{"port":0,"target":"127.0.0.1:80","allow":null,"allow_remote_target":false,"generation":{g}}}]"#,
        g = generation + 1
    );
    let text = text.replace(r#""exposures":[]"#, &bad).replace(
        &format!(r#""generation":{generation},"applied""#),
        &format!(r#""generation":{},"applied""#, generation + 1),
    );
    assert!(text.contains("192.0.2.1"), "{text}");
    std::fs::write(&path, text).unwrap();
    // SIGHUP, as a command would send it.
    let pid = gw.pid() as i32;
    // SAFETY: signalling the gateway this test started.
    let r = unsafe { libc::kill(pid, libc::SIGHUP) };
    assert_eq!(r, 0);
    assert!(wait_until(Duration::from_secs(10), || {
        let v = pilot_gateway::json::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        num(&v, "applied") > generation
    }));
    let st = std::fs::read_to_string(&path).unwrap();
    assert!(st.contains(r#""exposures":[]"#), "{st}");
    assert!(
        st.contains("not on this host") && st.contains("pilot port 0"),
        "{st}"
    );
    assert!(can_bind(&d.socket, 81), "port 81 was never bound");
}

/// One inbound connection through `via` that has echoed once: live.
fn live(via: &str) -> TcpStream {
    let mut s = connect(via);
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    s
}

/// Whether a new inbound connection through `via` is refused at once
/// (closed or reset with no data) rather than served (echoed). One left
/// hanging fails the test.
fn refused_at_once(via: &str) -> bool {
    let mut s = connect(via);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"p");
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        Err(e) => panic!("a connection through {via} was left hanging: {e}"),
    }
}

/// Opens connections through `via` until one is refused (each admitted
/// one echoes and is closed); whether one was, within 200 tries.
fn until_refused(via: &str) -> bool {
    for _ in 0..200 {
        if refused_at_once(via) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn stop_and_unexpose_drain_exposed_connections() {
    netns();
    let dir = TempDir::new("x-drain");
    let _svc = Service::start(8000, echo);
    let access = dir.path("access.log");
    let d = devd(&dir, &["--inbound", "127.0.0.1:7101=0:0000.0000.0009:81"]);
    let gw = Gw::new(&dir, &d.socket);
    let log = access.to_str().unwrap();
    gw.ok(&[
        "start",
        "--access-log",
        log,
        "--expose",
        "80=8000",
        "--expose",
        "81=8000",
    ]);

    // unexpose --drain: new connections are refused at once, the live one
    // goes on; once it ends, the port is released with nothing cut.
    let mut a = live(IN80);
    let gw2 = Gw::handle(gw.state.clone(), gw.socket.clone());
    let unexposing = thread::spawn(move || gw2.data(&["unexpose", "--drain", "30", "--wait", "80"]));
    assert!(until_refused(IN80), "new connections are refused while draining");
    assert!(
        still_echoes(&mut a),
        "the live connection is not cut while draining"
    );
    drop(a);
    let gone = unexposing.join().unwrap();
    assert_eq!((num(&gone, "port"), num(&gone, "cut")), (80, 0), "{gone}");
    assert!(can_bind(&d.socket, 80), "the port is free after the drain");

    // stop --drain: the same for every exposure, and what is still live
    // when the drain is over is cut and counted.
    let mut b = live("127.0.0.1:7101");
    let gw2 = Gw::handle(gw.state.clone(), gw.socket.clone());
    let stopping = thread::spawn(move || gw2.data(&["stop", "--drain", "5", "--wait"]));
    assert!(until_refused("127.0.0.1:7101"), "refused while stopping");
    assert!(still_echoes(&mut b), "not cut while draining");
    let stopped = stopping.join().unwrap();
    assert_eq!(num(&stopped, "cut"), 1, "{stopped}");
    // Cut: the daemon ends the remote side (how is devd's to choose).
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let ended = b.read_to_end(&mut Vec::new());
    assert!(
        ended
            .as_ref()
            .map_or_else(|e| e.kind() == std::io::ErrorKind::ConnectionReset, |_| true),
        "the cut connection ends: {ended:?}"
    );
    let log = std::fs::read_to_string(&access).unwrap();
    let drained = log
        .lines()
        .filter(|l| l.contains("outcome=refused") && l.contains("draining"))
        .count();
    assert!(drained >= 2, "refusals while draining are logged: {log}");
}

/// With a daemon that has Unbind, `unexpose --drain` releases the port at
/// once: another program Binds it while the live exposed connection still
/// echoes, and the drain ends with nothing cut and no error.
#[test]
fn unexpose_drain_releases_the_port_at_once_where_the_daemon_has_unbind() {
    netns();
    let dir = TempDir::new("x-unbind");
    let _svc = Service::start(8000, echo);
    let d = devd(&dir, &["--unbind"]);
    let gw = Gw::new(&dir, &d.socket);
    gw.ok(&["start", "--expose", "80=8000"]);
    let mut a = live(IN80);
    let gw2 = Gw::handle(gw.state.clone(), gw.socket.clone());
    let unexposing = thread::spawn(move || gw2.data(&["unexpose", "--drain", "5", "--wait", "80"]));
    let mut other = None;
    assert!(
        wait_until(Duration::from_secs(4), || {
            other = hold_port(&d.socket, 80);
            other.is_some()
        }),
        "another program can Bind the port during the drain"
    );
    assert!(still_echoes(&mut a), "the live connection is not cut");
    assert!(!unexposing.is_finished(), "still draining");
    drop(a);
    let gone = unexposing.join().unwrap();
    assert_eq!((num(&gone, "port"), num(&gone, "cut")), (80, 0), "{gone}");
    assert!(
        hold_port(&d.socket, 80).is_none(),
        "the other program still holds it"
    );
    drop(other);
    gw.ok(&["stop"]);
}

/// One budget, split: with the open-file limit lowering `--max-conns`,
/// forwarded and exposed connections and the exposure's daemon session
/// draw on the lowered cap, each side within its share (`--max-exposed`
/// keeps its proportion), and a slot one side frees never serves the
/// other while an exposure runs.
#[test]
fn forwarded_and_exposed_connections_split_the_max_conns_budget() {
    netns();
    let dir = TempDir::new("x-budget");
    let _fwd = Service::start(8080, echo);
    let _svc = Service::start(8000, echo);
    let d = devd(&dir, &["--route", "0:0000.0000.0004=127.0.0.1"]);
    let gw = Gw::new(&dir, &d.socket);
    // Every exposed connection comes from one peer here: no per-peer cap
    // below the expose side's share (the cap is tested below).
    let args = [
        "--ports",
        "8080",
        "--max-conns",
        "1000",
        "--max-exposed",
        "500",
        "--max-per-peer",
        "500",
        "--expose",
        "80=8000",
        A4,
    ];
    let mut p = gw.foreground_with(&dir, &args, |c| nofile(c, 64));
    assert!(
        p.stderr().contains("does not fit the limit of 64 open files"),
        "{}",
        p.stderr()
    );
    let st = gw.data(&["status"]);
    let cap = num(&st, "max_conns");
    let exposed = num(&st, "max_exposed");
    assert!((4..1000).contains(&cap), "{st}");
    assert_eq!(exposed, cap / 2, "--max-exposed keeps its proportion: {st}");
    assert_eq!(num(&st, "max_per_peer"), exposed, "{st}");
    // The exposure's daemon session holds one slot of the expose side.
    assert_eq!(num(&st, "conns_in_use"), 1, "{st}");
    assert!(gw.ok(&["status"]).contains("split with exposed ports"));
    // Fill both shares.
    let forwarded = cap - exposed;
    let mut locals: Vec<TcpStream> = (0..forwarded).map(|_| live("10.4.0.1:8080")).collect();
    let mut peers: Vec<TcpStream> = (1..exposed).map(|_| live(IN80)).collect();
    let st = gw.data(&["status"]);
    assert_eq!(
        (num(&st, "conns_in_use"), num(&st, "active")),
        (cap, forwarded),
        "{st}"
    );
    // Over the cap, either kind is refused at once and counted.
    assert!(
        refused_at_once(IN80),
        "an exposed connection over the cap is refused"
    );
    assert!(
        reset_soon("10.4.0.1:8080", Duration::from_secs(5)),
        "a forwarded one is reset"
    );
    let row = exposure(&gw, 80);
    assert_eq!(
        (num(&row, "active"), num(&row, "over_limit")),
        (exposed - 1, 1),
        "{row}"
    );
    let st = gw.data(&["status"]);
    assert_eq!(
        (num(&st, "refused"), num(&st, "refused_max_exposed")),
        (1, 1),
        "{st}"
    );
    // A slot a peer frees does not serve a local client (their share is
    // in use), only another exposed connection.
    drop(peers.pop());
    assert!(wait_until(Duration::from_secs(10), || num(
        &gw.data(&["status"]),
        "conns_in_use"
    ) < cap));
    assert!(
        reset_soon("10.4.0.1:8080", Duration::from_secs(5)),
        "local clients keep to their share"
    );
    peers.push(live(IN80));
    // And a slot a local client frees serves local clients only.
    drop(locals.pop());
    assert!(wait_until(Duration::from_secs(10), || num(
        &gw.data(&["status"]),
        "conns_in_use"
    ) < cap));
    assert!(refused_at_once(IN80), "peers keep to theirs");
    assert!(
        short_exchange("10.4.0.1:8080"),
        "a freed forwarded slot serves a forwarded client"
    );
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(15)).is_some());
    drop((locals, peers));
}

#[test]
fn a_stalled_daemon_fails_expose_in_time_and_stop_still_works() {
    netns();
    let dir = TempDir::new("x-stall");
    let _svc = Service::start(8000, echo);
    let d = devd(&dir, &[]);
    let gw = Gw::new(&dir, &d.socket);
    gw.ok(&["start", "--expose", "80=8000"]);
    assert!(short_exchange(IN80));
    // The daemon stops accepting clients (as a wedged or stopped one).
    d.proc.signal(libc::SIGUSR1);
    // The Bind is bounded well under the command's own wait, so the
    // command reports the daemon, not a gateway that never answered.
    let err = fails(&gw, &["expose", "81", "8000"]);
    assert_eq!(text(&err, "code"), "daemon_unreachable", "{err}");
    assert!(short_exchange(IN80), "the bound exposure still serves");
    // SIGTERM while an apply waits for the stalled daemon: stop completes.
    let gw2 = Gw::handle(gw.state.clone(), gw.socket.clone());
    let pending = thread::spawn(move || gw2.run(&["--json", "expose", "82", "8000"]));
    let state = gw.state.join("state.json");
    assert!(wait_until(Duration::from_secs(10), || std::fs::read_to_string(
        &state
    )
    .is_ok_and(|s| s.contains(r#""port":82"#))));
    let stopped = gw.data(&["stop"]);
    assert_eq!(
        stopped.get("stopped").and_then(Value::as_bool),
        Some(true),
        "{stopped}"
    );
    let out = pending.join().unwrap();
    assert!(!out.status.success(), "{out:?}");
}

/// Issue 18: a peer that opens exposed connections and sends nothing no
/// longer holds them (and the `--max-conns` slots they take) forever:
/// `--idle-timeout` ends them as it ends mapped ones, counted.
#[test]
fn idle_exposed_connections_end_at_the_idle_timeout() {
    netns();
    let dir = TempDir::new("x-idle");
    let _svc = Service::start(8000, echo);
    let d = devd(&dir, &[]);
    let gw = Gw::new(&dir, &d.socket);
    gw.data(&["start", "--expose", "80=8000", "--idle-timeout", "1"]);
    let held: Vec<TcpStream> = (0..10).map(|_| connect(IN80)).collect();
    assert!(wait_until(Duration::from_secs(5), || num(
        &exposure(&gw, 80),
        "total"
    ) == 10));
    assert!(
        wait_until(Duration::from_secs(8), || {
            let row = exposure(&gw, 80);
            num(&row, "active") == 0 && num(&row, "idle_timeouts") == 10
        }),
        "{}",
        exposure(&gw, 80)
    );
    drop(held);
    assert!(short_exchange(IN80), "the exposure still serves");
    gw.ok(&["stop"]);
}

/// Whether a new inbound connection through `via` is refused within a
/// second of its first byte (the dialer sees the close that soon).
fn refused_within_a_second(via: &str) -> bool {
    let t = std::time::Instant::now();
    refused_at_once(via) && t.elapsed() < Duration::from_secs(1)
}

/// Issue 18: overlay peers holding every slot of `--max-exposed` do not
/// lock local clients out: the `--max-conns - --max-exposed` other slots
/// stay theirs. Further inbound connections are closed at once, counted
/// apart (`refused_max_exposed`) and shown in `status`.
#[test]
fn peers_holding_every_exposed_slot_do_not_lock_out_local_clients() {
    netns();
    let dir = TempDir::new("x-share");
    let _fwd = Service::start(8080, echo);
    let _svc = Service::start(8000, echo);
    let d = devd(
        &dir,
        &[
            "--route",
            "0:0000.0000.0004=127.0.0.1",
            "--inbound",
            "127.0.0.1:7102=0:0000.0000.0008:80",
        ],
    );
    let gw = Gw::new(&dir, &d.socket);
    let args = [
        "--ports",
        "8080",
        "--max-conns",
        "10",
        "--max-exposed",
        "4",
        "--max-per-peer",
        "4",
        "--expose",
        "80=8000",
        A4,
    ];
    let mut p = gw.foreground(&dir, &args);
    let st = gw.data(&["status"]);
    assert_eq!(
        (
            num(&st, "max_exposed"),
            num(&st, "max_per_peer"),
            num(&st, "exposed_in_use")
        ),
        (4, 4, 1),
        "the exposure's session holds one slot of the expose side: {st}"
    );
    // Peers take every exposed slot (3: the session holds the fourth).
    let mut peers: Vec<TcpStream> = (0..3).map(|_| live(IN80)).collect();
    assert!(refused_within_a_second(IN80), "a 4th exposed connection");
    assert!(
        refused_within_a_second("127.0.0.1:7102"),
        "another peer, too: the expose side is full"
    );
    // Local clients still get every one of the other 6 slots.
    let locals: Vec<TcpStream> = (0..6).map(|_| live("10.4.0.1:8080")).collect();
    let st = gw.data(&["status"]);
    assert_eq!(
        (
            num(&st, "conns_in_use"),
            num(&st, "exposed_in_use"),
            num(&st, "refused_max_exposed"),
            num(&st, "refused_per_peer"),
            num(&st, "refused")
        ),
        (10, 4, 2, 0, 0),
        "{st}"
    );
    assert_eq!(num(&exposure(&gw, 80), "over_limit"), 2);
    let text = gw.ok(&["status"]);
    assert!(
        text.contains("exposed side: 4 of 4 slots in use")
            && text.contains("refused at --max-exposed 2, at --max-per-peer 0"),
        "{text}"
    );
    // The whole budget is in use now: the next of either kind is refused.
    assert!(reset_soon("10.4.0.1:8080", Duration::from_secs(5)));
    // A local client that leaves frees its slot for local clients only:
    // peers still hold their whole share and get no more.
    drop(locals);
    assert!(wait_until(Duration::from_secs(10), || num(
        &gw.data(&["status"]),
        "conns_in_use"
    ) == 4));
    assert!(refused_within_a_second(IN80), "the expose side is still full");
    // A peer that leaves frees an exposed slot for any peer.
    drop(peers.pop());
    assert!(wait_until(Duration::from_secs(10), || num(
        &gw.data(&["status"]),
        "exposed_in_use"
    ) == 3));
    peers.push(live("127.0.0.1:7102"));
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(15)).is_some());
    drop(peers);
}

/// Issue 18: one peer node cannot hold more than `--max-per-peer`
/// exposed connections (over all exposures), while another peer still
/// gets in; its refusals are prompt and counted (`refused_per_peer`).
#[test]
fn one_peer_is_held_to_max_per_peer_while_another_gets_in() {
    netns();
    let dir = TempDir::new("x-peer");
    let _svc = Service::start(8000, echo);
    let d = devd(
        &dir,
        &[
            "--inbound",
            "127.0.0.1:7101=0:0000.0000.0009:81",
            "--inbound",
            "127.0.0.1:7102=0:0000.0000.0008:80",
        ],
    );
    let gw = Gw::new(&dir, &d.socket);
    gw.data(&[
        "start",
        "--max-per-peer",
        "2",
        "--expose",
        "80=8000",
        "--expose",
        "81=8000",
    ]);
    let st = gw.data(&["status"]);
    assert_eq!(
        (num(&st, "max_exposed"), num(&st, "max_per_peer")),
        (500, 2),
        "{st}"
    );
    // P9 on port 80 and on port 81: one cap over both exposures.
    let mut p9 = vec![live(IN80), live("127.0.0.1:7101")];
    assert!(refused_within_a_second(IN80), "P9's third connection");
    assert!(refused_within_a_second("127.0.0.1:7101"), "on the other port too");
    let p8: Vec<TcpStream> = (0..2).map(|_| live("127.0.0.1:7102")).collect();
    assert!(refused_within_a_second("127.0.0.1:7102"), "P8's third");
    let st = gw.data(&["status"]);
    assert_eq!(
        (
            num(&st, "refused_per_peer"),
            num(&st, "refused_max_exposed"),
            num(&st, "exposed_in_use")
        ),
        (3, 0, 6),
        "{st}"
    );
    assert!(gw.ok(&["status"]).contains("at most 2 per peer"));
    // P9's slot comes back when one of its connections ends.
    drop(p9.pop());
    assert!(wait_until(Duration::from_secs(10), || num(
        &gw.data(&["status"]),
        "exposed_in_use"
    ) == 5));
    p9.push(live(IN80));
    gw.ok(&["stop"]);
    drop((p9, p8));
}
