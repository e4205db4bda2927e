//! The control plane: background start, map/unmap/list/status/stop, shared
//! state, stale state, the pilotctl link. Each test in its own namespace.

mod common;

use std::io::Read;
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::*;
use pilot_gateway::json::{self, Value};

fn data(stdout: &str) -> Value {
    ok_data(stdout)
}

/// Runs a command that must fail; returns (exit status, stderr JSON).
fn fails_json(gw: &Gw, args: &[&str]) -> (i32, Value) {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = gw.run(&a);
    assert!(
        !out.status.success(),
        "{args:?} should fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let v = json::parse(err.trim()).unwrap_or_else(|e| panic!("stderr not JSON ({e}): {err}"));
    assert_eq!(v.get("status").and_then(Value::as_str), Some("error"));
    assert_eq!(v.get("message"), v.get("error"), "error repeats message");
    assert!(v.get("hint").is_some(), "every error has a hint: {err}");
    (out.status.code().unwrap_or(-1), v)
}

fn code(v: &Value) -> &str {
    v.get("code").and_then(Value::as_str).unwrap_or("")
}

fn msg(v: &Value) -> &str {
    v.get("message").and_then(Value::as_str).unwrap_or("")
}

fn alive(pid: u32) -> bool {
    pilot_gateway::sys::proc::start_time(pid).is_some()
}

/// devd with A4, A5, A6 routed to local services, plus a background gateway.
fn background(dir: &TempDir, start_args: &[&str]) -> (Devd, Gw, Service) {
    let svc = Service::start(8080, http);
    let devd = Devd::start(
        dir,
        &[
            "--route",
            "0:0000.0000.0004=127.0.0.1",
            "--route",
            "0:0000.0000.0005=127.0.0.1",
            "--route",
            "0:0000.0000.0006=127.0.0.1",
            "--host",
            "lab-b=0:0000.0000.0005",
        ],
    );
    let gw = Gw::new(dir, &devd.socket);
    let mut args = vec!["start", "--ports", "8080"];
    args.extend_from_slice(start_args);
    gw.ok(&args);
    (devd, gw, svc)
}

#[test]
fn full_lifecycle() {
    netns();
    let dir = TempDir::new("lifecycle");
    let (_devd, gw, _svc) = background(&dir, &["--json", A4]);
    let pid = gw.pid();
    assert!(alive(pid));
    assert!(has_alias("10.4.0.1"));

    let list = data(&gw.ok(&["--json", "list"]));
    assert_eq!(list.get("total").and_then(Value::as_u64), Some(1));
    assert!(gw.ok(&["list"]).contains("10.4.0.1 → 0:0000.0000.0004"));

    let m = data(&gw.ok(&["--json", "map", A5]));
    assert_eq!(m.get("local_ip").and_then(Value::as_str), Some("10.4.0.2"));
    let text = gw.ok(&["map", A6, "10.4.9.9"]);
    assert_eq!(text, "mapped 10.4.9.9 → 0:0000.0000.0006\n");
    let again = data(&gw.ok(&["--json", "map", A5]));
    assert_eq!(
        again.get("local_ip").and_then(Value::as_str),
        Some("10.4.0.2"),
        "mapping twice returns the IP"
    );
    assert_eq!(again.get("already_mapped"), Some(&Value::Bool(true)));
    let by_name = gw.ok(&["map", "lab-b"]);
    assert!(
        by_name.contains("10.4.0.2") && by_name.contains("already mapped"),
        "{by_name}"
    );

    for ip in ["10.4.0.1", "10.4.0.2", "10.4.9.9"] {
        let resp = http_get(&format!("{ip}:8080"), "/x");
        assert!(resp.contains("GET /x"), "{ip}: {resp}");
    }
    let list = data(&gw.ok(&["--json", "list"]));
    let rows = list.get("mappings").and_then(Value::as_array).unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        assert!(r.get("total").and_then(Value::as_u64).unwrap() >= 1, "{r}");
        assert!(r.get("bytes_down").and_then(Value::as_u64).unwrap() > 0, "{r}");
    }
    let status = data(&gw.ok(&["--json", "status"]));
    assert_eq!(
        status.get("daemon_reachable"),
        Some(&Value::Bool(true)),
        "{status}"
    );
    assert!(status.get("total").and_then(Value::as_u64).unwrap() >= 3);
    assert!(gw.ok(&["status"]).contains("gateway running"));

    // Unmap closes live connections on that IP and removes its alias.
    let mut open = connect("10.4.9.9:8080");
    assert!(
        wait_until(Duration::from_secs(10), || active(&gw, "10.4.9.9") == 1),
        "the gateway holds the open connection"
    );
    assert_eq!(
        gw.ok(&["unmap", "10.4.9.9"]),
        "unmapped 10.4.9.9 → 0:0000.0000.0006 (1 live connection cut)\n"
    );
    // The agent never answers (no request was sent), so only the gateway
    // can end this read, and with a reset (a cut stream never looks
    // complete): not EOF, not the read timeout.
    open.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    let read = open.read(&mut buf);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the open connection is reset: {read:?}"
    );
    assert!(!has_alias("10.4.9.9"));
    assert!(
        std::net::TcpStream::connect_timeout(&"10.4.9.9:8080".parse().unwrap(), Duration::from_secs(1))
            .is_err()
    );

    let stopped = data(&gw.ok(&["--json", "stop"]));
    assert_eq!(stopped.get("pid").and_then(Value::as_u64), Some(u64::from(pid)));
    assert!(!alive(pid));
    assert!(!has_alias("10.4.0.1") && !has_alias("10.4.0.2"));
    let (status, err) = fails_json(&gw, &["status"]);
    assert_eq!((status, code(&err)), (1, "not_running"));
}

#[test]
fn fifty_parallel_maps() {
    netns();
    let dir = TempDir::new("parallel");
    let (devd, gw, _svc) = background(&dir, &[]);
    let socket = devd.socket.clone();
    let state = gw.state.clone();
    let workers: Vec<_> = (0..50u32)
        .map(|i| {
            let (socket, state) = (socket.clone(), state.clone());
            thread::spawn(move || {
                let gw = Gw::handle(state, socket);
                let addr = format!("0:0000.0001.{:04X}", i);
                data(&gw.ok(&["--json", "map", &addr]))
                    .get("local_ip")
                    .and_then(Value::as_str)
                    .unwrap()
                    .to_string()
            })
        })
        .collect();
    let mut ips: Vec<String> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 50, "50 distinct IPs");
    let list = data(&gw.ok(&["--json", "list"]));
    assert_eq!(list.get("total").and_then(Value::as_u64), Some(50));
    for ip in &ips {
        assert!(
            std::net::TcpStream::connect(format!("{ip}:8080")).is_ok(),
            "{ip} listens"
        );
    }
    drop(devd);
    gw.stop_quietly();
}

#[test]
fn a_killed_gateway_is_noticed_and_cleaned_up() {
    netns();
    let dir = TempDir::new("killed");
    let (_devd, gw, _svc) = background(&dir, &[A4, A5]);
    let pid = gw.pid();
    // SAFETY: killing the gateway we started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(5), || !alive(pid)));
    assert!(has_alias("10.4.0.1"), "SIGKILL leaves aliases behind");
    // Our aliases carry our label: the next start removes only those.
    let lo = lo_addrs();
    for ip in ["10.4.0.1", "10.4.0.2"] {
        assert!(lo.contains(&format!("inet {ip}/32 scope global lo:pgw")), "{lo}");
    }
    for cmd in ["list", "status", "stop"] {
        let (status, err) = fails_json(&gw, &[cmd]);
        assert_eq!((status, code(&err)), (1, "not_running"), "{cmd}");
        assert!(msg(&err).contains("exited without cleaning up"), "{cmd}: {err}");
    }
    let out = data(&gw.ok(&["--json", "start", "--ports", "8080", A6]));
    let cleaned = out.get("cleaned").and_then(Value::as_array).unwrap();
    assert_eq!(cleaned.len(), 2, "{out}");
    assert!(!has_alias("10.4.0.2"), "leftover alias removed");
    assert!(
        http_get("10.4.0.1:8080", "/again").contains("GET /again"),
        "the new gateway serves"
    );
    gw.stop_quietly();
}

#[test]
fn an_unrelated_live_pid_is_never_signalled() {
    netns();
    let dir = TempDir::new("unrelated");
    let devd = Devd::start(&dir, &[]);
    let gw = Gw::new(&dir, &devd.socket);
    let mut sleeper = Proc::spawn(Command::new("sleep").arg("60"), dir.path("sleep.log"));
    std::fs::create_dir_all(&gw.state).unwrap();
    std::fs::set_permissions(&gw.state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    // The recorded start time is not the sleeper's: as if the pid was reused.
    let start = pilot_gateway::sys::proc::start_time(sleeper.pid()).unwrap();
    let state = format!(
        r#"{{"version":3,"pid":{},"start_time":{},"started_at":0,"socket":"/x","subnet":"10.4.0.0/16","ports":[80],"max_conns":10,"half_closed_timeout_secs":10,"user":null,"daemon_uid":0,"generation":0,"applied":0,"mappings":[],"exposures":[],"failures":[]}}"#,
        sleeper.pid(),
        start + 1
    );
    std::fs::write(gw.state.join("state.json"), state).unwrap();
    for cmd in ["stop", "list", "status"] {
        let (_, err) = fails_json(&gw, &[cmd]);
        assert_eq!(code(&err), "not_running", "{cmd}");
    }
    let (_, err) = fails_json(&gw, &["map", A4]);
    assert_eq!(code(&err), "not_running");
    assert!(
        sleeper.child.try_wait().unwrap().is_none(),
        "the unrelated process is still alive"
    );
}

#[test]
fn error_paths_have_codes_and_hints() {
    netns();
    let dir = TempDir::new("errors");
    let (_devd, gw, _svc) = background(&dir, &["--subnet", "10.4.0.0/29", A4]);
    let cases: &[(&[&str], &str, &str)] = &[
        (&["start", A5], "already_exists", "already running"),
        (&["map", "0:0000.0000.04"], "invalid_argument", "exactly 4 hex"),
        (
            &["map", A5, "10.9.0.1"],
            "invalid_argument",
            "outside the gateway's subnet",
        ),
        (&["map", A5, "10.4.0.0"], "invalid_argument", "network address"),
        (&["map", A5, "10.4.0.7"], "invalid_argument", "broadcast address"),
        (
            &["map", A5, "10.4.0.1"],
            "already_exists",
            "already mapped to 0:0000.0000.0004",
        ),
        (
            &["map", A4, "10.4.0.5"],
            "already_exists",
            "0:0000.0000.0004 is already mapped to 10.4.0.1",
        ),
        (&["map", A5, "banana"], "invalid_argument", "invalid local IP"),
        (&["map", "no-such-host"], "not_found", "cannot resolve hostname"),
        (&["map", "0:0000.FFFF.FFFF"], "invalid_argument", "broadcast"),
        (&["unmap", "10.4.0.6"], "not_found", "no mapping for 10.4.0.6"),
        (&["unmap", "10.4.0"], "invalid_argument", "invalid local IP"),
    ];
    for (args, want_code, want_msg) in cases {
        let (status, err) = fails_json(&gw, args);
        assert_eq!((status, code(&err)), (1, *want_code), "{args:?}: {err}");
        assert!(msg(&err).contains(want_msg), "{args:?}: {err}");
        // The same error in text form, on stderr, with a hint.
        let out = gw.run(args);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            text.starts_with("error: ") && text.contains(want_msg) && text.contains("\nhint: "),
            "{text}"
        );
    }
    // Fill the /29 (6 hosts): 10.4.0.1 is taken, 5 more fit, the next is refused.
    for i in 0..5 {
        gw.ok(&["map", &format!("0:0000.0002.{i:04X}")]);
    }
    let (_, err) = fails_json(&gw, &["map", "0:0000.0003.0000"]);
    assert_eq!(code(&err), "subnet_exhausted");
    // A port the gateway cannot bind is reported by the gateway itself.
    gw.ok(&["unmap", "10.4.0.6"]);
    run_ok("ip", &["addr", "add", "10.4.0.6/32", "dev", "lo"]);
    let _busy = std::net::TcpListener::bind("10.4.0.6:8080").unwrap();
    let (_, err) = fails_json(&gw, &["map", "0:0000.0004.0000", "10.4.0.6"]);
    assert_eq!(code(&err), "address_in_use", "{err}");
    assert!(has_alias("10.4.0.6"), "the alias that existed before stays");
    let list = data(&gw.ok(&["--json", "list"]));
    assert_eq!(
        list.get("total").and_then(Value::as_u64),
        Some(5),
        "the failed mapping is not kept"
    );
    gw.ok(&["stop"]);
    let (status, err) = fails_json(&gw, &["stop"]);
    assert_eq!((status, code(&err)), (1, "not_running"));
    let (status, err) = fails_json(&gw, &["list", "--bogus"]);
    assert_eq!((status, code(&err)), (2, "invalid_argument"));
}

#[test]
fn the_pilotctl_link_runs_every_command() {
    netns();
    let dir = TempDir::new("pilotctl");
    let _svc = Service::start(8080, http);
    let devd = Devd::start(
        &dir,
        &[
            "--route",
            "0:0000.0000.0004=127.0.0.1",
            "--route",
            "0:0000.0000.0005=127.0.0.1",
        ],
    );
    let link = dir.path("pilotctl");
    std::os::unix::fs::symlink(GATEWAY, &link).unwrap();
    let state = dir.path("state");
    let ctl = |args: &[&str]| {
        let out = Command::new(&link)
            .env("PILOT_GATEWAY_STATE_DIR", &state)
            .env("PILOT_SOCKET", &devd.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pilotctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(ctl(&["gateway", "start", "--ports", "8080", A4]).contains("mapped 10.4.0.1 → 0:0000.0000.0004"));
    assert!(data(&ctl(&["--json", "gateway", "map", A5]))
        .get("local_ip")
        .is_some());
    assert!(ctl(&["gateway", "list", "--json"]).contains("10.4.0.2"));
    assert!(ctl(&["extras", "gateway", "list"]).contains("total: 2"));
    assert!(http_get("10.4.0.2:8080", "/ctl").contains("GET /ctl"));
    assert!(ctl(&["gateway", "status"]).contains("gateway running"));
    assert!(ctl(&["gateway", "unmap", "10.4.0.2"]).contains("unmapped 10.4.0.2"));
    assert!(ctl(&["gateway", "stop"]).contains("gateway stopped"));
    assert!(ctl(&["gateway", "--help"]).contains("Usage"));
}
