//! Being the `pilot-gateway` binary that current upstream `pilotctl` runs:
//! the standalone `run`/`map` form with Go-style flags, `-config`, and the
//! socket search order. Each test in its own namespace.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A stand-in for upstream `pilotctl extras gateway start|map`: finds the
/// gateway binary as upstream does ($PILOT_GATEWAY_BIN, next to itself,
/// then $PATH) and runs it with upstream's arguments.
const STAND_IN: &str = r#"#!/bin/sh
set -e
find_bin() {
    if [ -n "$PILOT_GATEWAY_BIN" ]; then echo "$PILOT_GATEWAY_BIN"; return; fi
    here=$(dirname "$0")
    if [ -x "$here/pilot-gateway" ]; then echo "$here/pilot-gateway"; return; fi
    command -v pilot-gateway
}
bin=$(find_bin)
[ "$1 $2" = "extras gateway" ] || { echo "usage: pilotctl extras gateway start|map" >&2; exit 2; }
shift 2
cmd=$1; shift
case $cmd in
    start) exec "$bin" -socket "$PILOT_SOCKET" -subnet "$SUBNET" -ports "$PORTS" run "$@" ;;
    map)   exec "$bin" -socket "$PILOT_SOCKET" map "$@" ;;
    *)     echo "unknown: $cmd" >&2; exit 2 ;;
esac
"#;

fn write_script(path: &Path) {
    std::fs::write(path, STAND_IN).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

fn devd(dir: &TempDir) -> Devd {
    Devd::start(
        dir,
        &[
            "--route",
            "0:0000.0000.0004=127.0.0.1",
            "--route",
            "0:0000.0000.0005=127.0.0.1",
            "--route",
            "0:0000.0000.0006=127.0.0.1",
        ],
    )
}

/// Runs the stand-in `start` in the background and waits until it serves.
fn upstream_start(dir: &TempDir, script: &Path, env: &[(&str, &str)], devd: &Devd, addrs: &[&str]) -> Proc {
    let mut c = Command::new(script);
    c.args(["extras", "gateway", "start"])
        .args(addrs)
        .stdout(Stdio::null());
    c.env("PILOT_SOCKET", &devd.socket)
        .env("SUBNET", "10.7.0.0/16")
        .env("PORTS", "8080");
    c.env("PILOT_GATEWAY_STATE_DIR", dir.path("state"));
    for (k, v) in env {
        c.env(k, v);
    }
    let p = Proc::spawn(&mut c, dir.path("upstream-gw.log"));
    assert!(
        wait_until(Duration::from_secs(20), || std::net::TcpStream::connect(
            "10.7.0.1:8080"
        )
        .is_ok()),
        "gateway did not come up: {}",
        p.stderr()
    );
    p
}

fn upstream_map(dir: &TempDir, script: &Path, devd: &Devd, addr: &str) -> String {
    let out = Command::new(script)
        .args(["extras", "gateway", "map", addr])
        .env("PILOT_SOCKET", &devd.socket)
        .env("PILOT_GATEWAY_STATE_DIR", dir.path("state"))
        .env("PILOT_GATEWAY_BIN", GATEWAY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "map: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn upstream_pilotctl_finds_and_drives_us_three_ways() {
    netns();
    let _svc = Service::start(8080, http);
    for how in ["env", "beside", "path"] {
        let dir = TempDir::new(&format!("upstream-{how}"));
        let d = devd(&dir);
        let bindir = dir.path("bin");
        std::fs::create_dir_all(&bindir).unwrap();
        let script = bindir.join("pilotctl");
        write_script(&script);
        let path_dir = dir.path("pathdir");
        std::fs::create_dir_all(&path_dir).unwrap();
        let env: Vec<(&str, String)> = match how {
            "env" => vec![("PILOT_GATEWAY_BIN", GATEWAY.to_string())],
            "beside" => {
                std::os::unix::fs::symlink(GATEWAY, bindir.join("pilot-gateway")).unwrap();
                vec![]
            }
            _ => {
                std::os::unix::fs::symlink(GATEWAY, path_dir.join("pilot-gateway")).unwrap();
                vec![(
                    "PATH",
                    format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", path_dir.display()),
                )]
            }
        };
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut p = upstream_start(&dir, &script, &env, &d, &[A4, "10.7.0.9", A5]);
        assert!(
            http_get("10.7.0.9:8080", "/a").contains("GET /a"),
            "{how}: the address given with an IP"
        );
        assert!(
            http_get("10.7.0.1:8080", "/b").contains("GET /b"),
            "{how}: the next free IP"
        );
        let mapped = upstream_map(&dir, &script, &d, A6);
        assert_eq!(mapped, "mapped 10.7.0.2 → 0:0000.0000.0006\n", "{how}");
        assert!(http_get("10.7.0.2:8080", "/c").contains("GET /c"), "{how}");
        let gw = Gw::new(&dir, &d.socket);
        let list = gw.ok(&["list"]);
        for line in [
            "10.7.0.9 → 0:0000.0000.0004",
            "10.7.0.1 → 0:0000.0000.0005",
            "10.7.0.2 → 0:0000.0000.0006",
        ] {
            assert!(list.contains(line), "{how}: {list}");
        }
        p.signal(libc::SIGTERM);
        assert!(
            p.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()),
            "{how}"
        );
        assert!(!has_alias("10.7.0.1"), "{how}: aliases removed on SIGTERM");
    }
}

#[test]
fn legacy_run_prints_mapped_lines_then_running() {
    netns();
    let dir = TempDir::new("legacy");
    let d = devd(&dir);
    let mut c = Command::new(GATEWAY);
    c.args([
        "-socket",
        d.socket.to_str().unwrap(),
        "--subnet=10.8.0.0/24",
        "-ports=8080",
        "-log-level",
        "debug",
    ])
    .args(["-log-format=json", "run", A4, A5])
    .env("PILOT_GATEWAY_STATE_DIR", dir.path("state"))
    .stdout(Stdio::piped());
    let mut p = Proc::spawn(&mut c, dir.path("gw.log"));
    assert!(wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect("10.8.0.2:8080").is_ok()
    }));
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(20)).is_some());
    let mut out = String::new();
    std::io::Read::read_to_string(p.child.stdout.as_mut().unwrap(), &mut out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "mapped 10.8.0.1 → 0:0000.0000.0004", "{out}");
    assert_eq!(lines[1], "mapped 10.8.0.2 → 0:0000.0000.0005", "{out}");
    assert!(lines[2].starts_with("gateway running"), "{out}");
    // -log-format=json: every log line on stderr is a JSON object.
    let log = p.stderr();
    assert!(!log.is_empty());
    for l in log.lines() {
        assert!(pilot_gateway::json::parse(l).is_ok(), "not JSON: {l}");
    }
}

#[test]
fn config_file_sets_flags_and_the_command_line_wins() {
    netns();
    let dir = TempDir::new("config");
    let d = devd(&dir);
    let cfg = dir.path("gw.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"socket":"{}","subnet":"10.9.0.0/16","ports":"8080,8081","log_level":"warn","log-format":"text"}}"#,
            d.socket.display()
        ),
    )
    .unwrap();
    let gw = Gw::new(&dir, &d.socket);
    let run = |args: &[&str]| {
        Command::new(GATEWAY)
            .env("PILOT_GATEWAY_STATE_DIR", &gw.state)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["-config", cfg.to_str().unwrap(), "start", A4]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mapped 10.9.0.1") && text.contains("ports: 8080,8081"),
        "{text}"
    );
    assert!(std::net::TcpStream::connect("10.9.0.1:8081").is_ok());
    run(&["stop"]);
    let out = run(&[
        "-config",
        cfg.to_str().unwrap(),
        "-ports",
        "8082",
        "--subnet=10.10.0.0/16",
        "start",
        A4,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mapped 10.10.0.1") && text.contains("ports: 8082\n"),
        "{text}"
    );
    run(&["stop"]);
    for (content, want) in [
        ("{\"sockett\":\"x\"}", "unknown key \"sockett\""),
        ("{\"ports\":8080}", "\"ports\" must be a string"),
        ("not json", "not valid JSON"),
    ] {
        std::fs::write(&cfg, content).unwrap();
        let out = run(&["-config", cfg.to_str().unwrap(), "start", A4]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(want) && err.contains("gw.json"), "{err}");
    }
}

#[test]
fn unreachable_daemon_errors_name_the_path_and_its_source() {
    netns();
    let dir = TempDir::new("socketsrc");
    let home = dir.path("home");
    std::fs::create_dir_all(home.join(".pilot")).unwrap();
    std::fs::write(
        home.join(".pilot/config.json"),
        r#"{"socket":"/nowhere/config.sock"}"#,
    )
    .unwrap();
    let run = |env: &[(&str, &str)], extra: &[&str]| {
        let mut c = Command::new(GATEWAY);
        c.env_remove("PILOT_SOCKET")
            .env_remove("PILOT_HOME")
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", "/nowhere-xdg");
        c.env("PILOT_GATEWAY_STATE_DIR", dir.path("state"));
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c
            .args(extra)
            .args(["start", "--ports", "8080", A4])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(
        &[("PILOT_SOCKET", "/nowhere/env.sock")],
        &["--socket", "/nowhere/flag.sock"],
    );
    assert!(e.contains("/nowhere/flag.sock (from --socket)"), "{e}");
    let e = run(&[("PILOT_SOCKET", "/nowhere/env.sock")], &[]);
    assert!(e.contains("/nowhere/env.sock (from $PILOT_SOCKET)"), "{e}");
    let e = run(&[], &[]);
    assert!(
        e.contains("/nowhere/config.sock (from \"socket\" in") && e.contains(".pilot/config.json"),
        "{e}"
    );
    let e = run(&[("PILOT_HOME", "/nowhere-home")], &[]);
    assert!(
        e.contains("/tmp/pilot.sock (the default)") || e.contains("pilot.sock"),
        "{e}"
    );
    assert!(e.contains("daemon"), "{e}");
}
