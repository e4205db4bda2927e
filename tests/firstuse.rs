//! First use (issue 20): ports per mapping (changed live), flags a command
//! does not use, failures shown where people look, several gateways and
//! squatted addresses on one host, and the messages a new user meets.
//! Each test in its own network namespace.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use pilot_gateway::json::{self, Value};

fn ports_of(v: &Value) -> Vec<u64> {
    v.get("ports")
        .and_then(Value::as_array)
        .unwrap_or_default()
        .iter()
        .filter_map(Value::as_u64)
        .collect()
}

fn row<'a>(list: &'a Value, ip: &str) -> &'a Value {
    list.get("mappings")
        .and_then(Value::as_array)
        .unwrap_or_default()
        .iter()
        .find(|m| m.get("local_ip").and_then(Value::as_str) == Some(ip))
        .unwrap_or_else(|| panic!("no mapping {ip} in {list}"))
}

fn refused(addr: &str) -> bool {
    TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)).is_err()
}

/// Runs a command that must fail with `--json`: (exit status, error object).
fn fails(gw: &Gw, args: &[&str]) -> (i32, Value) {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = gw.run(&a);
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    let v = json::parse(err.trim()).unwrap_or_else(|e| panic!("stderr not JSON ({e}): {err}"));
    (out.status.code().unwrap_or(-1), v)
}

fn text<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

#[test]
fn ports_per_mapping_change_live_and_keep_connections() {
    netns();
    let dir = TempDir::new("ports-per-mapping");
    let _svcs: Vec<Service> = [8080, 9000, 9001].map(|p| Service::start(p, echo)).into();
    let mut args = routes();
    args.extend([
        "--route",
        "0:0000.0000.0006=127.0.0.1",
        "--host",
        "lab-b=0:0000.0000.0005",
    ]);
    let devd = Devd::start(&dir, &args);
    let gw = Gw::new(&dir, &devd.socket);
    let started = gw.data(&["start", "--ports", "8080", A4, "--map", "lab-b,ports=9000"]);
    let mappings = started.get("mappings").and_then(Value::as_array).unwrap();
    assert_eq!(ports_of(&mappings[0]), vec![8080], "{started}");
    assert_eq!(ports_of(&mappings[1]), vec![9000], "{started}");
    assert_eq!(mappings[1].get("own_ports"), Some(&Value::Bool(true)));

    // Each mapping listens on its own ports only.
    assert!(still_echoes(&mut connect("10.4.0.1:8080")));
    assert!(refused("10.4.0.1:9000"));
    assert!(still_echoes(&mut connect("10.4.0.2:9000")));
    assert!(refused("10.4.0.2:8080"));

    // state.json records them.
    let st = json::parse(&std::fs::read_to_string(gw.state.join("state.json")).unwrap()).unwrap();
    let recorded = row(&st, "10.4.0.2");
    assert_eq!(ports_of(recorded), vec![9000], "{st}");
    assert_eq!(row(&st, "10.4.0.1").get("ports"), Some(&Value::Null), "{st}");

    // A new mapping with its own ports and IP (the command of the issue).
    let m = gw.data(&["map", A6, "10.4.0.9", "--ports", "9001"]);
    assert_eq!(ports_of(&m), vec![9001], "{m}");
    assert!(still_echoes(&mut connect("10.4.0.9:9001")));
    assert!(refused("10.4.0.9:8080"));

    // Changed live: a connection on a kept port stays up throughout.
    let mut held = connect("10.4.0.1:8080");
    assert!(still_echoes(&mut held));
    let text_out = gw.ok(&["map", A4, "--ports", "8080,9001"]);
    assert_eq!(
        text_out,
        "mapped 10.4.0.1 → 0:0000.0000.0004, ports 8080,9001 (ports changed from 8080)\n"
    );
    assert!(still_echoes(&mut connect("10.4.0.1:9001")));
    assert!(still_echoes(&mut held), "the kept port's connection survives");
    // Removing 8080: its listener stops, the live connection stays.
    let m = gw.data(&["map", A4, "--ports", "9001"]);
    assert_eq!(ports_of(&m), vec![9001]);
    let before: Vec<u64> = m
        .get("ports_before")
        .and_then(Value::as_array)
        .unwrap_or_default()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(before, vec![8080, 9001], "{m}");
    assert!(refused("10.4.0.1:8080"));
    assert!(
        still_echoes(&mut held),
        "a live connection on a removed port is left alone"
    );
    assert!(still_echoes(&mut connect("10.4.0.1:9001")));
    // The same ports again: nothing to change.
    let same = gw.data(&["map", A4, "--ports", "9001"]);
    assert_eq!(same.get("already_mapped"), Some(&Value::Bool(true)));
    assert!(same.get("ports_before").is_none());

    // A port that cannot be bound changes nothing and says why.
    let _squat = std::net::TcpListener::bind("10.4.0.1:9000").unwrap();
    let (status, e) = fails(&gw, &["map", A4, "--ports", "9000,9001"]);
    assert_eq!(status, 1);
    assert_eq!(text(&e, "code"), "address_in_use", "{e}");
    assert!(still_echoes(&mut connect("10.4.0.1:9001")));
    let list = gw.data(&["list"]);
    assert_eq!(ports_of(row(&list, "10.4.0.1")), vec![9001], "{list}");
    assert_eq!(row(&list, "10.4.0.1").get("own_ports"), Some(&Value::Bool(true)));
    assert_eq!(ports_of(row(&list, "10.4.0.2")), vec![9000]);

    // Back to the gateway's ports: given as the gateway's own list.
    let m = gw.data(&["map", A6, "--ports", "8080"]);
    assert_eq!(ports_of(&m), vec![8080]);
    assert_eq!(m.get("own_ports"), Some(&Value::Bool(false)), "{m}");
    assert!(still_echoes(&mut connect("10.4.0.9:8080")));
    assert!(refused("10.4.0.9:9001"));

    let list_text = gw.ok(&["list"]);
    assert!(
        list_text.contains("10.4.0.1 → 0:0000.0000.0004  ports 9001 (own)  active"),
        "{list_text}"
    );
    let status_text = gw.ok(&["status"]);
    assert!(
        status_text.contains("own ports: 10.4.0.2 → 0:0000.0000.0005: 9000"),
        "{status_text}"
    );
    let status = gw.data(&["status"]);
    assert_eq!(
        status
            .get("mapping_ports")
            .and_then(Value::as_array)
            .map(<[Value]>::len),
        Some(3),
        "{status}"
    );
    drop(held);
}

#[test]
fn flags_a_command_does_not_use_are_refused() {
    // Parsing only: nothing runs, so no namespace is needed.
    for (args, want) in [
        (
            &["list", "--subnet", "10.9.0.0/16"][..],
            "--subnet is an option of start and map, not of list",
        ),
        (
            &["list", "--max-conns", "5"],
            "--max-conns is an option of start, not of list",
        ),
        (
            &["status", "--ports", "80"],
            "--ports is an option of start and map, not of status",
        ),
        (&["start", "--port", "80"], "did you mean --ports?"),
        (&["-port", "80", "run"], "did you mean --ports?"),
    ] {
        let out = Command::new(GATEWAY).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn failed_dials_show_in_list_and_status() {
    netns();
    let dir = TempDir::new("failed-dials");
    let _svc = Service::start(8080, echo);
    let mut args = routes();
    args.extend([
        "--dial-error",
        "0:0000.0000.0005=resolve node 5: registry: request failed",
    ]);
    let devd = Devd::start(&dir, &args);
    let gw = Gw::new(&dir, &devd.socket);
    gw.ok(&["start", "--ports", "8080", A4, A5]);
    for _ in 0..3 {
        assert!(reset_soon("10.4.0.2:8080", Duration::from_secs(10)));
    }
    assert!(wait_until(Duration::from_secs(10), || {
        n(row(&gw.data(&["list"]), "10.4.0.2"), "dial_failures") == 3
    }));
    let list = gw.ok(&["list"]);
    let line = list.lines().find(|l| l.starts_with("10.4.0.2 ")).unwrap();
    assert!(line.ends_with("failed dials 3"), "{list}");
    assert!(
        list.contains("last error") && list.contains("resolve node 5: registry: request failed"),
        "{list}"
    );
    let ok_line = list.lines().find(|l| l.starts_with("10.4.0.1 ")).unwrap();
    assert!(ok_line.ends_with("failed dials 0"), "{list}");
    let last = row(&gw.data(&["list"]), "10.4.0.2")
        .get("last_error")
        .cloned()
        .unwrap();
    assert_eq!(n(&last, "port"), 8080);
    assert!(
        text(&last, "error").contains("registry: request failed"),
        "{last}"
    );

    let status = gw.ok(&["status"]);
    assert!(status.contains("recent errors:"), "{status}");
    assert!(
        status.contains("10.4.0.2:8080") && status.contains("3 times") && status.contains("request failed"),
        "{status}"
    );
    let recent = gw.data(&["status"]);
    let recent = recent.get("recent_errors").and_then(Value::as_array).unwrap();
    assert_eq!(recent.len(), 1, "one distinct error");
    assert_eq!(n(&recent[0], "count"), 3);
}

/// A process of nobody's that binds `ip:port` with IP_FREEBIND (the
/// address need not exist; no privilege needed) and listens. Waits until
/// it holds the port.
fn squatter(dir: &TempDir, ip: &str, port: u16) -> Proc {
    let script = format!(
        "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_IP,15,1)\ns.bind(('{ip}',{port}))\ns.listen()\nprint('bound',flush=True)\ntime.sleep(120)\n"
    );
    let mut c = as_nobody("/usr/bin/python3");
    c.args(["-c", &script]).stdout(Stdio::piped());
    let mut p = Proc::spawn(&mut c, dir.path(&format!("squatter-{ip}.log")));
    let mut line = String::new();
    BufReader::new(p.child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "bound", "squatter: {}", p.stderr());
    p
}

#[test]
fn automatic_addresses_step_past_a_squatter_and_an_explicit_one_fails() {
    netns();
    let dir = TempDir::new("squatter");
    let _svc = Service::start(8080, http);
    let mut args = routes();
    args.extend(["--route", "0:0000.0000.0006=127.0.0.1"]);
    let devd = Devd::start(&dir, &args);
    let _squat = squatter(&dir, "10.4.0.1", 8080);
    let gw = Gw::new(&dir, &devd.socket);
    // A default start (default subnet and ports) with one address.
    let started = gw.data(&["start", A4]);
    let m = &started.get("mappings").and_then(Value::as_array).unwrap()[0];
    assert_eq!(text(m, "local_ip"), "10.4.0.2", "{started}");
    assert!(http_get("10.4.0.2:8080", "/x").contains("GET /x"));
    let m = gw.data(&["map", A5]);
    assert_eq!(text(&m, "local_ip"), "10.4.0.3", "{m}");
    let (status, e) = fails(&gw, &["map", A6, "10.4.0.1"]);
    assert_eq!(status, 1);
    assert_eq!(text(&e, "code"), "address_in_use", "{e}");
    assert!(
        text(&e, "message").contains("local IP 10.4.0.1 is in use")
            && text(&e, "message").contains("TCP socket"),
        "{e}"
    );
    assert!(!has_alias("10.4.0.1"));
}

#[test]
fn a_second_gateway_on_an_overlapping_subnet_is_refused_with_a_free_one() {
    netns();
    let dir = TempDir::new("two-gateways");
    let devd = Devd::start(&dir, &routes());
    let first = Gw::new(&dir, &devd.socket);
    first.ok(&["start", "--ports", "8080", A4]);
    let dir2 = TempDir::new("two-gateways-second");
    let second = Gw::new(&dir2, &devd.socket);
    let (status, e) = fails(&second, &["start", "--ports", "8081", A5]);
    assert_eq!(status, 1);
    assert_eq!(text(&e, "code"), "address_in_use", "{e}");
    assert!(
        text(&e, "message").contains("overlaps") && text(&e, "message").contains("running gateway"),
        "{e}"
    );
    assert!(text(&e, "hint").contains("--subnet 10.5.0.0/16"), "{e}");
    // The hint's subnet works.
    let started = second.data(&["start", "--ports", "8081", "--subnet", "10.5.0.0/16", A5]);
    assert_eq!(text(&started, "subnet"), "10.5.0.0/16");
    // A gateway that died leaves an alias nobody uses: not a running one.
    second.ok(&["stop"]);
}

#[test]
fn an_identical_binary_elsewhere_is_the_same_program() {
    netns();
    let dir = TempDir::new("copy");
    let _svc = Service::start(8080, http);
    let devd = Devd::start(&dir, &routes());
    let copy = dir.path("pilot-gateway-installed");
    std::fs::copy(GATEWAY, &copy).unwrap();
    let gw = Gw::new(&dir, &devd.socket);
    // Started by the copy, steered by the original. Another test thread's
    // fork may briefly hold the copy's write descriptor (until its exec):
    // exec then fails with ETXTBSY, so it is retried, a bounded number of times.
    let run = || {
        Command::new(&copy)
            .arg("--state-dir")
            .arg(&gw.state)
            .arg("--socket")
            .arg(&gw.socket)
            .args(["start", "--ports", "8080", A4])
            .stdin(Stdio::null())
            .output()
    };
    let mut out = run();
    for _ in 0..50 {
        match &out {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
                out = run();
            }
            _ => break,
        }
    }
    let out = out.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list = gw.ok(&["list"]);
    assert!(list.contains("10.4.0.1 → 0:0000.0000.0004"), "{list}");
    gw.ok(&["stop"]);
}

#[test]
fn permission_denied_on_the_daemon_socket_names_its_user() {
    netns();
    let dir = TempDir::new("socket-perm");
    let devd = Devd::start(&dir, &routes());
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&devd.socket, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let state = dir.path("nobody-state");
    let out = as_nobody(GATEWAY)
        .arg("--json")
        .arg("--state-dir")
        .arg(&state)
        .arg("--socket")
        .arg(&devd.socket)
        .args(["start", "--subnet", "127.77.0.0/16", "--ports", "18080"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let v = json::parse(err.trim()).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(text(&v, "code"), "permission_denied", "{v}");
    let hint = text(&v, "hint");
    assert!(
        hint.contains("belongs to root") && hint.contains("as that user"),
        "{v}"
    );
    assert!(!hint.contains("start the Pilot daemon"), "{v}");
}

#[test]
fn non_root_list_points_to_roots_gateway() {
    // In a mount namespace of its own with a private /run, so the host's
    // /run is never touched: root's state directory exists there, and
    // nobody (without state of its own) asks for the list.
    let script = format!(
        "mount -t tmpfs -o mode=755 tmpfs /run && mkdir -m 700 /run/pilot-gateway && \
         exec setpriv --reuid=65534 --regid=65534 --clear-groups env -u PILOT_GATEWAY_STATE_DIR XDG_RUNTIME_DIR=/nonexistent {GATEWAY} list"
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("root's gateway keeps its state in /run/pilot-gateway"),
        "{err}"
    );
    assert!(err.contains("sudo pilot-gateway list"), "{err}");
}

/// Runs `cmd` in the mount namespace of process `holder` (a private /run).
fn in_mount_ns(cmd: &mut Command, holder: u32) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let ns = std::fs::File::open(format!("/proc/{holder}/ns/mnt")).unwrap();
    // SAFETY: setns(2) between fork and exec, on a descriptor the closure
    // owns; no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn a_gateway_with_no_mapping_yet_is_found_through_the_registry() {
    netns();
    let dir = TempDir::new("registry");
    // A mount namespace whose /run is a fresh tmpfs: the host's /run is
    // never touched. Both gateways run inside it (their state directories
    // under /run, so they are recorded).
    let mut holder = Command::new("unshare");
    holder
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs -o mode=755 tmpfs /run && echo ready && exec sleep 120",
        ])
        .stdout(Stdio::piped());
    let mut holder = Proc::spawn(&mut holder, dir.path("holder.log"));
    let mut line = String::new();
    BufReader::new(holder.child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "{}", holder.stderr());
    let ns = holder.pid();
    let devd = Devd::start(&dir, &routes());
    let first = Gw::handle("/run/pilot-gateway-a".into(), devd.socket.clone());
    let _first = first.foreground_with(&dir, &["--ports", "18080", "--subnet", "127.77.0.0/16"], |c| {
        in_mount_ns(c, ns)
    });
    assert!(
        !std::path::Path::new("/run/pilot-gateway-a").exists(),
        "the test's own /run is untouched"
    );

    let second = Gw::handle("/run/pilot-gateway-b".into(), devd.socket.clone());
    let mut c = second.cmd();
    c.args([
        "--json",
        "start",
        "--foreground",
        "--ports",
        "18081",
        "--subnet",
        "127.77.0.0/16",
        A4,
    ]);
    in_mount_ns(&mut c, ns);
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let v = json::parse(err.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(text(&v, "code"), "address_in_use", "{v}");
    assert!(
        text(&v, "message").contains("overlaps 127.77.0.0/16 of the running gateway pid"),
        "{v}"
    );
    assert!(text(&v, "hint").contains("--subnet"), "{v}");

    // On the subnet the hint names, it starts.
    let mut c = second.cmd();
    c.args([
        "start",
        "--foreground",
        "--ports",
        "8081",
        "--subnet",
        "10.5.0.0/16",
        A4,
    ])
    .stdout(Stdio::piped());
    in_mount_ns(&mut c, ns);
    let mut p = Proc::spawn(&mut c, dir.path("second.log"));
    let mut line = String::new();
    let mut out = BufReader::new(p.child.stdout.take().unwrap());
    while !line.contains("gateway running") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "{}", p.stderr());
    }
    assert!(has_alias("10.5.0.1"));
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(20)).is_some());
}
