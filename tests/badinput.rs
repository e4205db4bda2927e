//! Bad input to `start`: each gets a clear message, its code, exit 1, and
//! leaves nothing behind (no alias, no state, no process).

mod common;

use common::*;
use pilot_gateway::json::{self, Value};

/// Runs `start --foreground ARGS` (foreground: a bug that starts anyway
/// would hang here rather than pass) and returns (exit, code, message, hint).
fn start_fails(gw: &Gw, args: &[&str]) -> (i32, String, String, String) {
    let out = gw.cmd().args(["--json", "start"]).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v = json::parse(stderr.lines().last().unwrap_or("").trim())
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {stderr}"));
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    (
        out.status.code().unwrap_or(-1),
        s("code"),
        s("message"),
        s("hint"),
    )
}

fn nothing_left(gw: &Gw) {
    assert!(!gw.state.join("state.json").exists(), "no state left behind");
    assert!(
        !lo_addrs().contains("10.4."),
        "no alias left behind: {}",
        lo_addrs()
    );
}

#[test]
fn malformed_arguments_are_refused_before_anything_happens() {
    netns();
    let dir = TempDir::new("bad-args");
    let devd = Devd::start(&dir, &["--route", "0:0000.0000.0004=127.0.0.1"]);
    let gw = Gw::new(&dir, &devd.socket);
    let cases: &[(&[&str], &str, &str)] = &[
        (&["0:0000.0004"], "invalid_argument", "found 2"),
        (&["0:0000.0000.00zz"], "invalid_argument", "exactly 4 hex"),
        (&["1:0000.0000.0004"], "invalid_argument", "does not match"),
        (&["--ports", "0", A4], "invalid_argument", "port 0"),
        (&["--ports", "65536", A4], "invalid_argument", "above 65535"),
        (&["--ports", "http", A4], "invalid_argument", "not a number"),
        (&["--ports", "", A4], "invalid_argument", "empty"),
        (
            &["--subnet", "10.4.0.0/40", A4],
            "invalid_argument",
            "invalid subnet",
        ),
        (&["--subnet", "fd00::/64", A4], "not_supported", "IPv6"),
        (
            &["--subnet", "10.4.0.0/31", A4],
            "invalid_argument",
            "no usable host",
        ),
        (
            &["--subnet", "10.4.0.0/32", A4],
            "invalid_argument",
            "no usable host",
        ),
        (
            &["--subnet", "10.4.0.1/16", A4],
            "invalid_argument",
            "canonical form is 10.4.0.0/16",
        ),
        (
            &["--subnet", "10.4.0.0/30", A4, A5, A6],
            "subnet_exhausted",
            "is full",
        ),
        (&["--max-conns", "0", A4], "invalid_argument", "--max-conns"),
        // Issue 18: the expose side's budgets (exit 1 with invalid_argument,
        // as every bad value of start; exit 2 is for a malformed line).
        (
            &["--max-exposed", "0", A4],
            "invalid_argument",
            "--max-exposed \"0\" is not a number from 1 to 1000",
        ),
        (
            &["--max-exposed", "half", A4],
            "invalid_argument",
            "--max-exposed \"half\" is not a number",
        ),
        (
            &["--max-conns", "10", "--max-exposed", "11", A4],
            "invalid_argument",
            "--max-exposed 11 is larger than --max-conns (10)",
        ),
        (
            &["--max-per-peer", "0", A4],
            "invalid_argument",
            "--max-per-peer \"0\" is not a number from 1 to 500",
        ),
        (
            &["--max-per-peer", "-3", A4],
            "invalid_argument",
            "--max-per-peer \"-3\" is not a number",
        ),
        (
            &["--max-conns", "10", "--max-per-peer", "6", A4],
            "invalid_argument",
            "--max-per-peer 6 is larger than --max-exposed (by default half of --max-conns) (5)",
        ),
        (
            &["--max-exposed", "4", "--max-per-peer", "5", A4],
            "invalid_argument",
            "--max-per-peer 5 is larger than --max-exposed (4)",
        ),
        (
            &["--dial-timeout", "soon", A4],
            "invalid_argument",
            "--dial-timeout",
        ),
        (
            &[A4, "10.9.0.1"],
            "invalid_argument",
            "outside the gateway's subnet",
        ),
    ];
    for (args, code, msg) in cases {
        let (status, c, m, hint) = start_fails(&gw, args);
        assert_eq!((status, c.as_str()), (1, *code), "{args:?}: {m}");
        assert!(m.contains(msg), "{args:?}: {m}");
        assert!(!hint.is_empty(), "{args:?}: no hint");
        nothing_left(&gw);
    }
    // Usage errors exit 2.
    let out = gw.cmd().args(["start", "--frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn environment_failures_say_what_to_do() {
    netns();
    let dir = TempDir::new("bad-env");
    let gw = Gw::new(&dir, &dir.path("no-daemon.sock"));
    let (status, code, msg, hint) = start_fails(&gw, &[A4]);
    assert_eq!((status, code.as_str()), (1, "daemon_unreachable"));
    assert!(
        msg.contains("no-daemon.sock") && hint.contains("--socket"),
        "{msg} / {hint}"
    );
    nothing_left(&gw);

    let devd = Devd::start(&dir, &["--route", "0:0000.0000.0004=127.0.0.1"]);
    let gw = Gw::new(&dir, &devd.socket);
    // A port in use: a listener already holds port 8080 (on every
    // address, so no socket sits on 10.4.0.1 itself and nothing tells
    // in advance), 10.4.0.1 is an alias that existed before (and must
    // survive), and the first mapping (10.4.0.2:8081) comes up before the
    // second fails. (A listener on 10.4.0.1 itself makes an automatic
    // address step past it and an explicit one fail before anything is
    // touched: tests/firstuse.rs.)
    run_ok("ip", &["addr", "add", "10.4.0.1/32", "dev", "lo"]);
    let busy = std::net::TcpListener::bind("0.0.0.0:8080").unwrap();
    let (status, code, msg, _) = start_fails(
        &gw,
        &[
            "--ports",
            "8080",
            "--map",
            "0:0000.0000.0004,ip=10.4.0.2,ports=8081",
            "--map",
            "0:0000.0000.0005,ip=10.4.0.1",
        ],
    );
    assert_eq!((status, code.as_str()), (1, "address_in_use"), "{msg}");
    assert!(msg.contains("10.4.0.1:8080"), "{msg}");
    assert!(has_alias("10.4.0.1"), "the pre-existing alias stays");
    assert!(!has_alias("10.4.0.2"), "our other alias was undone");
    assert!(!gw.state.join("state.json").exists());
    drop(busy);
    run_ok("ip", &["addr", "del", "10.4.0.1/32", "dev", "lo"]);
}

#[test]
fn unprivileged_users_get_permission_errors_with_hints() {
    netns();
    let dir = TempDir::new("bad-priv");
    // Sticky like /tmp: a state directory under a directory anyone may
    // write without it is refused (sys::fs::open_secure).
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    // Daemon and gateway both run as nobody: talking works, privilege does not.
    let sock = dir.path("devd.sock");
    let mut c = as_nobody(DEVD);
    c.args(["--socket"]).arg(&sock);
    c.args(["--route", "0:0000.0000.0004=127.0.0.1"]);
    let _devd = Proc::spawn(&mut c, dir.path("devd.log"));
    assert!(wait_until(std::time::Duration::from_secs(10), || sock.exists()));
    let start_as_nobody = |args: &[&str]| {
        let out = as_nobody(GATEWAY)
            .args(["--json", "--socket"])
            .arg(&sock)
            .arg("--state-dir")
            .arg(dir.path("nobody-state"))
            .args(["start", "--foreground"])
            .args(args)
            .output()
            .unwrap();
        let v = json::parse(String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")).unwrap();
        (out.status.code(), v)
    };
    let (status, v) = start_as_nobody(&["--ports", "8080", A4]);
    assert_eq!(status, Some(1));
    assert_eq!(
        v.get("code").and_then(Value::as_str),
        Some("permission_denied"),
        "{v}"
    );
    assert!(
        v.get("hint")
            .and_then(Value::as_str)
            .unwrap()
            .contains("127.0.0.0/8"),
        "{v}"
    );
    // Inside 127/8 no alias is needed, but port 80 still needs privilege.
    let (status, v) = start_as_nobody(&["--subnet", "127.77.0.0/16", "--ports", "80", A4]);
    assert_eq!(status, Some(1));
    assert_eq!(
        v.get("code").and_then(Value::as_str),
        Some("permission_denied"),
        "{v}"
    );
    assert!(
        v.get("message")
            .and_then(Value::as_str)
            .unwrap()
            .contains("below 1024"),
        "{v}"
    );
    assert!(!lo_addrs().contains("10.4."));
}
