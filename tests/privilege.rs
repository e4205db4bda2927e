//! Current upstream daemons: same-UID only, a client cap, Cancel. The
//! gateway started as root runs as the daemon's user with two capabilities.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use pilot_gateway::json::{self, Value};

/// pilot-devd's one route here: agent 4 on loopback.
const ROUTE_A4: [&str; 2] = ["--route", "0:0000.0000.0004=127.0.0.1"];

fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
        .unwrap_or("")
}

fn check_switched(dir: &TempDir, socket: &std::path::Path, start_extra: &[&str]) {
    let _svc = Service::start(8080, http);
    let gw = Gw::new(dir, socket);
    let mut args = vec!["--json", "start", "--ports", "80,8080"];
    args.extend_from_slice(start_extra);
    args.push(A4);
    let out = gw.ok(&args);
    let v = json::parse(out.trim()).unwrap();
    let data = v.get("data").unwrap();
    assert_eq!(data.get("user").and_then(Value::as_str), Some("nobody"), "{out}");
    assert_eq!(
        data.get("capabilities").unwrap().to_string(),
        r#"["cap_net_admin","cap_net_bind_service"]"#
    );
    let pid = gw.pid();
    let st = proc_status(pid);
    assert!(field(&st, "Uid:").starts_with("65534"), "{st}");
    assert_eq!(field(&st, "Groups:"), "", "supplementary groups dropped");
    for f in ["CapEff:", "CapPrm:", "CapAmb:"] {
        assert_eq!(field(&st, f), "0000000000001400", "{f} in {st}");
    }
    assert!(has_alias("10.4.0.1"));
    assert!(http_get("10.4.0.1:8080", "/priv").contains("GET /priv"));
    // Port 80 was bound with CAP_NET_BIND_SERVICE; the service is not there.
    let _ = connect("10.4.0.1:80");
    // Root may steer it, and so may its user.
    assert!(gw.ok(&["map", A5]).contains("10.4.0.2"));
    let as_nobody = as_nobody(GATEWAY)
        .args(["--state-dir"])
        .arg(&gw.state)
        .args(["list"])
        .output()
        .unwrap();
    assert!(
        as_nobody.status.success(),
        "{}",
        String::from_utf8_lossy(&as_nobody.stderr)
    );
    assert!(String::from_utf8_lossy(&as_nobody.stdout).contains("total: 2"));
    assert!(gw.ok(&["stop"]).contains("stopped"));
    assert!(!has_alias("10.4.0.1") && !has_alias("10.4.0.2"));
}

#[test]
fn root_gateway_runs_as_the_daemon_user_with_two_capabilities() {
    netns();
    let dir = TempDir::new("switch");
    let (socket, _devd) = devd_as_nobody(&dir, &ROUTE_A4);
    check_switched(&dir, &socket, &[]);
}

#[test]
fn explicit_user_flag() {
    netns();
    let dir = TempDir::new("userflag");
    let (socket, _devd) = devd_as_nobody(&dir, &ROUTE_A4);
    check_switched(&dir, &socket, &["--user", "nobody"]);
}

#[test]
fn a_root_gateway_refused_by_the_daemon_says_so_at_start() {
    netns();
    let dir = TempDir::new("refused");
    let (socket, _devd) = devd_as_nobody(&dir, &ROUTE_A4);
    let gw = Gw::new(&dir, &socket);
    let out = gw.run(&["--json", "start", "--no-user-switch", "--ports", "8080", A4]);
    assert_eq!(out.status.code(), Some(1));
    let err = json::parse(String::from_utf8_lossy(&out.stderr).trim()).unwrap();
    assert_eq!(
        err.get("code").and_then(Value::as_str),
        Some("permission_denied"),
        "{err}"
    );
    let msg = err.get("message").and_then(Value::as_str).unwrap();
    assert!(msg.contains("own user") && msg.contains("nobody"), "{msg}");
    assert!(!has_alias("10.4.0.1"), "nothing left behind");
}

#[test]
fn daemon_client_cap_resets_extra_clients_and_recovers() {
    netns();
    let dir = TempDir::new("clientcap");
    let _svc = Service::start(8080, echo);
    let devd = Devd::start(
        &dir,
        &["--route", "0:0000.0000.0004=127.0.0.1", "--max-clients", "5"],
    );
    let gw = Gw::new(&dir, &devd.socket);
    // The held clients close their sockets; the agent (an echo server) never
    // closes, so their sessions end at the idle limit.
    let _p = gw.foreground(&dir, &["--ports", "8080", "--idle-timeout", "1", A4]);
    // The gateway's start-up sessions (probe, first health check) must be
    // gone before the test counts the daemon's five client slots.
    settled_threads(devd.proc.pid());
    let mut held = Vec::new();
    for i in 0..5 {
        let mut s = connect("10.4.0.1:8080");
        s.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap_or_else(|e| panic!("client {i}: {e}"));
        held.push(s);
    }
    for _ in 0..5 {
        assert!(
            reset_soon("10.4.0.1:8080", Duration::from_secs(2)),
            "over the daemon's cap: a prompt reset"
        );
    }
    let log = std::fs::read_to_string(dir.path("gateway.log")).unwrap();
    assert!(log.contains("limit"), "the logged reason names the limit: {log}");
    drop(held);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let Ok(mut s) = std::net::TcpStream::connect("10.4.0.1:8080") else {
                return false;
            };
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut b = [0u8; 4];
            s.write_all(b"pong").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"pong"
        }),
        "served again once the load drops"
    );
}

#[test]
fn dial_timeout_resets_the_client_and_sends_cancel() {
    netns();
    let dir = TempDir::new("cancel");
    let devd = Devd::start(
        &dir,
        &[
            "--route",
            "0:0000.0000.0004=127.0.0.1",
            "--dial-delay",
            "0:0000.0000.0004=20000",
        ],
    );
    let gw = Gw::new(&dir, &devd.socket);
    let _p = gw.foreground(&dir, &["--ports", "8080", "--dial-timeout", "1", A4]);
    let t = Instant::now();
    assert!(reset_soon("10.4.0.1:8080", Duration::from_secs(5)));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "reset at the timeout, not before: {took:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || devd.log().contains("cancel received")),
        "{}",
        devd.log()
    );
}

/// Issue 18: a daemon run by root used to leave the gateway with every
/// capability (CapEff 000001fffeffffff). Now it stays uid 0 but holds the
/// two it needs, with the bounding set cut, securebits locked and
/// NO_NEW_PRIVS on; `status` says so. The same for `--no-user-switch`.
#[test]
fn root_daemon_gateway_keeps_two_capabilities() {
    for extra in [&[][..], &["--no-user-switch"][..], &["--user", "root"][..]] {
        netns();
        let dir = TempDir::new("rootcaps");
        let _svc = Service::start(8080, http);
        let devd = Devd::start(&dir, &ROUTE_A4);
        let gw = Gw::new(&dir, &devd.socket);
        let mut args = vec!["start", "--ports", "80,8080"];
        args.extend_from_slice(extra);
        args.push(A4);
        gw.ok(&args);
        let pid = gw.pid();
        let st = proc_status(pid);
        assert!(field(&st, "Uid:").starts_with("0\t0\t0\t0"), "{st}");
        for f in ["CapEff:", "CapPrm:", "CapAmb:", "CapBnd:", "CapInh:"] {
            let v = u64::from_str_radix(field(&st, f), 16).unwrap();
            assert_eq!(v & !0x1400, 0, "{f} in {st} ({extra:?})");
        }
        assert_eq!(field(&st, "CapEff:"), "0000000000001400", "{st}");
        assert_eq!(field(&st, "NoNewPrivs:"), "1", "{st}");
        // Securebits locked: check through /proc/PID/status is not
        // possible, so the gateway works and its `ip` children can add
        // aliases (CAP_NET_ADMIN kept as ambient).
        assert!(http_get("10.4.0.1:8080", "/rootcaps").contains("GET /rootcaps"));
        assert!(gw.ok(&["map", A5]).contains("10.4.0.2"));
        assert!(has_alias("10.4.0.2"));
        let s = status(&gw);
        assert_eq!(s.get("uid").and_then(Value::as_u64), Some(0), "{s}");
        assert_eq!(
            s.get("capabilities").unwrap().to_string(),
            r#"["cap_net_bind_service","cap_net_admin"]"#,
            "{s}"
        );
        assert_eq!(
            s.get("capabilities_bounding").and_then(Value::as_str),
            Some("0000000000001400")
        );
        assert_eq!(s.get("no_new_privs").and_then(Value::as_bool), Some(true));
        let text = gw.ok(&["status"]);
        assert!(
            text.contains(
                "runs as uid 0 with capabilities cap_net_bind_service, cap_net_admin, no new privileges"
            ),
            "{text}"
        );
        assert!(gw.ok(&["stop"]).contains("stopped"));
        assert!(!has_alias("10.4.0.1") && !has_alias("10.4.0.2"));
    }
}

/// Every `openat` a process made before its first `setresuid`, from a
/// `strace -f` log (openat, setresuid and close traced), that reached into
/// `state`: by its path, or relative to a descriptor of the state
/// directory itself (opened by its full path, or as the last step of a
/// component-by-component walk, whose last name is `state`).
fn opens_before_switch(log: &str, state: &str) -> Vec<String> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut switched = BTreeSet::new();
    let mut state_fds: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut bad = Vec::new();
    for line in log.lines() {
        let Some((pid, call)) = line.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        if call.starts_with("setresuid(") {
            switched.insert(pid.to_string());
        }
        let fds = state_fds.entry(pid.to_string()).or_default();
        if let Some(fd) = call.strip_prefix("close(").and_then(|r| r.split(')').next()) {
            fds.remove(fd);
            continue;
        }
        if !call.starts_with("openat(") {
            continue;
        }
        let dirfd = call["openat(".len()..].split(',').next().unwrap_or("");
        let result = call.rsplit("= ").next().unwrap_or("").trim().to_string();
        let names_state =
            call.contains(&format!("\"{state}\"")) || (dirfd != "AT_FDCWD" && call.contains(", \"state\", "));
        if switched.contains(pid) {
            continue;
        }
        if fds.contains(dirfd) || call.contains(&format!("\"{state}/")) {
            bad.push(line.to_string());
        }
        if names_state && call.contains("O_DIRECTORY") {
            fds.insert(result);
        }
    }
    bad
}

/// Runs `pilot-gateway ARGS` under `strace -f`; returns the trace.
fn traced(gw: &Gw, dir: &TempDir, tag: &str, args: &[&str]) -> (std::process::Output, String) {
    let log = dir.path(&format!("strace-{tag}"));
    let mut c = std::process::Command::new("strace");
    c.args(["-f", "-qq", "-e", "trace=openat,open,setresuid,close", "-o"])
        .arg(&log);
    c.arg(GATEWAY)
        .arg("--state-dir")
        .arg(&gw.state)
        .arg("--socket")
        .arg(&gw.socket)
        .args(args)
        .stdin(std::process::Stdio::null());
    let out = c.output().unwrap();
    (out, std::fs::read_to_string(&log).unwrap_or_default())
}

/// Issue 18, "drop first, then read": root commands on a state directory
/// owned by the gateway's user open no file in it before they become that
/// user: map, list, status, expose, unexpose, unmap, stop, and start on the
/// existing directory (its parent opens nothing there; the gateway it
/// spawns switches first).
#[test]
fn root_commands_open_nothing_in_the_users_directory_before_switching() {
    netns();
    let dir = TempDir::new("dropfirst");
    let (socket, _devd) = devd_as_nobody(&dir, &ROUTE_A4);
    let gw = Gw::new(&dir, &socket);
    gw.ok(&["start", "--ports", "8080", A4]);
    gw.ok(&["stop"]);
    // The directory is nobody's now; every command below starts from it.
    let state = gw.state.display().to_string();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&gw.state).unwrap().uid(), NOBODY);
    // `start` under strace: the gateway stays traced until it stops, so
    // the trace is read after `stop`.
    let log = dir.path("strace-start");
    let mut c = std::process::Command::new("strace");
    c.args(["-f", "-qq", "-e", "trace=openat,open,setresuid,close", "-o"])
        .arg(&log);
    c.arg(GATEWAY)
        .arg("--state-dir")
        .arg(&gw.state)
        .arg("--socket")
        .arg(&gw.socket)
        .args(["start", "--ports", "8080", A4]);
    let mut start = Proc::spawn(&mut c, dir.path("strace-start.err"));
    assert!(
        wait_until(Duration::from_secs(20), || gw.run(&["status"]).status.success()),
        "start under strace: {}",
        start.stderr()
    );
    let mut checks = vec![("start".to_string(), String::new())];
    for (tag, args) in [
        ("map", &["map", A5][..]),
        ("list", &["list"][..]),
        ("status", &["status"][..]),
        ("expose", &["expose", "7001", "127.0.0.1:9"][..]),
        ("unexpose", &["unexpose", "7001"][..]),
        ("unmap", &["unmap", "10.4.0.2"][..]),
        ("stop", &["stop"][..]),
    ] {
        let (out, trace) = traced(&gw, &dir, tag, args);
        assert!(
            out.status.success(),
            "{tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(trace.contains("setresuid("), "{tag} never switched: {trace}");
        checks.push((tag.to_string(), trace));
    }
    assert!(
        start.wait_exit(Duration::from_secs(20)).is_some(),
        "strace of start ended"
    );
    checks[0].1 = std::fs::read_to_string(&log).unwrap();
    assert!(checks[0].1.contains("setresuid("), "{}", checks[0].1);
    for (tag, trace) in &checks {
        let bad = opens_before_switch(trace, &state);
        assert!(bad.is_empty(), "{tag} opened as root: {bad:#?}");
    }
}

/// Issue 18: a gateway switched from root kept root's RLIMIT_NPROC while
/// its threads counted against its user's, so a low `ulimit -u` of that
/// user turned into "out of threads" under load. Now it takes the user's
/// own limit (here the daemon's, the user's only process) and lowers
/// `--max-conns` to fit, with a warning, shown in `status`.
#[test]
fn the_users_process_limit_lowers_max_conns() {
    netns();
    let dir = TempDir::new("nproc-fit");
    let _svc = Service::start(8080, echo);
    let (socket, devd) = devd_as_nobody(&dir, &ROUTE_A4);
    let pid = devd.pid().to_string();
    // As nobody (the same user may lower its own process's limit).
    run_ok(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "prlimit",
            "--pid",
            &pid,
            "--nproc=80:",
        ],
    );
    let gw = Gw::new(&dir, &socket);
    let out = gw.run(&["--json", "start", "--ports", "8080", "--max-conns", "1000", A4]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(report.contains("RLIMIT_NPROC"), "warned: {report}");
    let st = status(&gw);
    assert_eq!(st.get("nproc_limit").and_then(Value::as_u64), Some(80), "{st}");
    let cap = n(&st, "max_conns");
    assert!((10..=36).contains(&cap), "{st}");
    assert_eq!(n(&st, "max_conns_requested"), 1000);
    let gpid = gw.pid();
    let lim = std::fs::read_to_string(format!("/proc/{gpid}/limits")).unwrap();
    assert!(
        lim.lines()
            .any(|l| l.starts_with("Max processes") && l.split_whitespace().nth(2) == Some("80")),
        "{lim}"
    );
    assert!(gw.ok(&["status"]).contains("threads: at most 80"));
    // Serving works within that limit. (Filling every slot is not tried
    // here: pilot-devd, the daemon, runs as the same user and spends two
    // threads of that user per client too, which no start-time fit can
    // foresee; a real daemon serves on a few threads.)
    assert!(short_exchange("10.4.0.1:8080"));
    let st = status(&gw);
    assert_eq!(n(&st, "spawn_failures"), 0, "{st}");
    gw.ok(&["stop"]);
}

/// The shipped unit's two steps (issue 18: its exposure ≤ 2.5 needs a
/// bounding set without CAP_CHOWN): `ExecStartPre=+` with
/// PILOT_GATEWAY_PREPARE_STATE_DIR=1 gives the root-owned state directory
/// (systemd's RuntimeDirectory) to the daemon's user, and the gateway,
/// which cannot chown, then starts as that user in it. Without the first
/// step the start fails and says what to do.
#[test]
fn a_gateway_without_cap_chown_starts_in_the_directory_the_unit_gave() {
    netns();
    let dir = TempDir::new("nochown");
    let (socket, _devd) = devd_as_nobody(&dir, &ROUTE_A4);
    let _svc = Service::start(8080, http);
    let gw = Gw::new(&dir, &socket);
    std::fs::create_dir(&gw.state).unwrap();
    std::fs::set_permissions(&gw.state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    // The unit's bounding set, as the unit names it, and its
    // NoNewPrivileges=yes.
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/pilot-gateway.service"),
    )
    .unwrap();
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap()
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(!caps.contains(&"+chown".to_string()), "{caps:?}");
    let bounding = format!("--bounding-set=-all,{}", caps.join(","));
    let no_chown = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args([bounding.as_str(), "--no-new-privs"])
            .arg(GATEWAY)
            .arg("--state-dir")
            .arg(&gw.state)
            .arg("--socket")
            .arg(&gw.socket)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let start = ["--json", "start", "--foreground", "--ports", "8080", A4];
    let out = no_chown(&start);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("PILOT_GATEWAY_PREPARE_STATE_DIR=1"), "{err}");
    assert!(!has_alias("10.4.0.1"), "nothing left behind");
    // ExecStartPre=+: full root, gives the directory and exits.
    let given = gw
        .cmd()
        .env("PILOT_GATEWAY_PREPARE_STATE_DIR", "1")
        .args(start)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&given.stdout);
    assert!(
        given.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&given.stderr)
    );
    assert_eq!(
        ok_data(&text).get("given_to").and_then(Value::as_u64),
        Some(65534),
        "{text}"
    );
    let meta = std::fs::metadata(&gw.state).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534);
    assert!(!has_alias("10.4.0.1"), "the preparation touched no network");
    assert!(
        std::fs::read_dir(&gw.state).unwrap().next().is_none(),
        "nor any file"
    );
    // ExecStart: the gateway, with no CAP_CHOWN to use.
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    let _p = gw.foreground_via(
        &dir,
        &[
            setpriv,
            std::path::Path::new(&bounding),
            std::path::Path::new("--no-new-privs"),
            std::path::Path::new(GATEWAY),
        ],
        &["--ports", "8080", A4],
    );
    let st = proc_status(gw.pid());
    assert!(field(&st, "Uid:").starts_with("65534"), "{st}");
    assert_eq!(field(&st, "CapBnd:"), "0000000000001400", "{st}");
    assert!(http_get("10.4.0.1:8080", "/nochown").contains("GET /nochown"));
    assert!(gw.ok(&["stop"]).contains("stopped"));
    // Without CAP_DAC_OVERRIDE the gateway could not open nobody's socket
    // (mode 0600) as root: it took the directory's owner for the daemon's
    // user and checked it once it was nobody. A daemon of another user
    // behind the socket is refused there, before anything is touched.
    let other = dir.path("u1234");
    std::fs::create_dir(&other).unwrap();
    std::os::unix::fs::chown(&other, Some(1234), Some(1234)).unwrap();
    let sock = other.join("devd.sock");
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid=1234", "--regid=1234", "--clear-groups", DEVD, "--socket"])
        .arg(&sock);
    let _devd1234 = Proc::spawn(&mut c, dir.path("devd1234.log"));
    assert!(wait_until(Duration::from_secs(10), || sock.exists()));
    let out = std::process::Command::new("setpriv")
        .args([bounding.as_str(), "--no-new-privs"])
        .arg(GATEWAY)
        .arg("--state-dir")
        .arg(&gw.state)
        .arg("--socket")
        .arg(&sock)
        .args(start)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("permission_denied") && err.contains("devd.sock"),
        "{err}"
    );
    assert!(!has_alias("10.4.0.1"), "nothing touched");
}
