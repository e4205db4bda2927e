//! Nothing exposed: listeners bind only mapped IPs, subnets that could
//! capture real traffic are refused, and the state directory cannot be
//! subverted. Each test in its own namespace.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use pilot_gateway::json::{self, Value};

/// Local addresses of the TCP sockets that process `pid` listens on.
fn listening_addrs(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(3) == Some(&"0A") && inodes.iter().any(|i| Some(&i.as_str()) == f.get(9))).then(|| {
                let (ip, port) = f[1].split_once(':').unwrap();
                let ip = u32::from_str_radix(ip, 16).unwrap();
                format!(
                    "{}:{}",
                    std::net::Ipv4Addr::from(u32::from_be(ip)),
                    u16::from_str_radix(port, 16).unwrap()
                )
            })
        })
        .collect()
}

#[test]
fn listeners_bind_only_mapped_ips() {
    netns();
    let dir = TempDir::new("sec-bind");
    let devd = Devd::start(&dir, &[]);
    let gw = Gw::new(&dir, &devd.socket);
    let p = gw.foreground(&dir, &["--ports", "8080,8443", A4, A5]);
    let mut addrs = listening_addrs(p.pid());
    addrs.sort();
    assert_eq!(
        addrs,
        ["10.4.0.1:8080", "10.4.0.1:8443", "10.4.0.2:8080", "10.4.0.2:8443"]
    );
    // And nothing answers on the wildcard or the loopback address.
    assert!(std::net::TcpStream::connect("127.0.0.1:8080").is_err());
}

#[test]
fn subnets_that_could_capture_real_traffic_are_refused() {
    netns();
    let dir = TempDir::new("sec-subnet");
    let devd = Devd::start(&dir, &[]);
    let gw = Gw::new(&dir, &devd.socket);
    run_ok("ip", &["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    run_ok("ip", &["addr", "add", "10.4.5.1/24", "dev", "v0"]);
    let err = |args: &[&str]| {
        let out = gw
            .cmd()
            .args(["--json", "start", "--foreground"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        json::parse(String::from_utf8_lossy(&out.stderr).trim()).unwrap()
    };
    let v = err(&["--ports", "8080", A4]);
    assert_eq!(
        v.get("code").and_then(Value::as_str),
        Some("address_in_use"),
        "{v}"
    );
    let msg = v.get("message").and_then(Value::as_str).unwrap();
    assert!(msg.contains("v0") && msg.contains("10.4.5.0/24"), "{msg}");
    assert!(!lo_addrs().contains("10.4."), "nothing aliased");
    let v = err(&["--subnet", "198.18.0.0/24", "--ports", "8080", A4]);
    assert!(
        v.get("message")
            .and_then(Value::as_str)
            .unwrap()
            .contains("outside the private"),
        "{v}"
    );
    assert!(v
        .get("hint")
        .and_then(Value::as_str)
        .unwrap()
        .contains("--allow-any-subnet"));
    // With the explicit flag it is the user's choice.
    let p = gw.foreground(
        &dir,
        &[
            "--subnet",
            "198.18.0.0/24",
            "--allow-any-subnet",
            "--ports",
            "8080",
            A4,
        ],
    );
    assert!(has_alias("198.18.0.1"));
    drop(p);
}

#[test]
fn the_state_directory_cannot_be_subverted() {
    netns();
    let dir = TempDir::new("sec-state");
    let devd = Devd::start(&dir, &[]);
    let start = |state: &std::path::Path| {
        let out = Command::new(GATEWAY)
            .arg("--socket")
            .arg(&devd.socket)
            .arg("--state-dir")
            .arg(state)
            .args(["start", "--foreground", "--ports", "8080", A4])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A symlink instead of the directory.
    let real = dir.path("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let link = dir.path("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    assert!(start(&link).contains("symbolic link"));
    // Loose permissions.
    let loose = dir.path("loose");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    assert!(start(&loose).contains("loose permissions"));
    // A state file planted as a symlink is not followed.
    let victim = dir.path("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, real.join("state.json")).unwrap();
    let e = start(&real);
    assert!(e.contains("state.json"), "{e}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    // A directory owned by someone else (checked as an unprivileged user).
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let theirs = dir.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65533), Some(65533)).unwrap();
    let out = as_nobody(GATEWAY)
        .args(["--state-dir"])
        .arg(&theirs)
        .arg("list")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("owned by uid 65533") && e.contains("refusing"), "{e}");
    // Files it creates are 0600 in a 0700 directory.
    let ok = dir.path("ok");
    let gw = Gw::handle(ok.clone(), devd.socket.clone());
    let _g = gw.foreground(&dir, &["--ports", "8080", A4]);
    for f in ["state.json", "lock"] {
        let mode = std::fs::metadata(ok.join(f)).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "{f}"
        );
    }
}

#[test]
fn a_corrupt_state_file_is_kept_named_and_never_dropped() {
    netns();
    let dir = TempDir::new("sec-corrupt");
    let devd = Devd::start(&dir, &[]);
    let gw = Gw::new(&dir, &devd.socket);
    std::fs::create_dir(&gw.state).unwrap();
    std::fs::set_permissions(&gw.state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    for content in [
        "",
        "{\"version\":1,\"mappings\":[",
        "{\"version\":9}",
        &"x".repeat(17 << 20),
    ] {
        std::fs::write(gw.state.join("state.json"), content).unwrap();
        for args in [&["list"][..], &["start", "--foreground", "--ports", "8080", A4]] {
            let out = gw.run(args);
            assert_eq!(out.status.code(), Some(1));
            let e = String::from_utf8_lossy(&out.stderr);
            assert!(
                e.contains("state.json") && e.contains("left as it is") && e.contains("hint:"),
                "{e}"
            );
        }
        assert_eq!(
            std::fs::read(gw.state.join("state.json")).unwrap().len(),
            content.len(),
            "left as it was"
        );
        // Nothing is written beside it: no copies for an attacker to aim.
        let names: Vec<String> = std::fs::read_dir(&gw.state)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains("bad")), "{names:?}");
    }
}

#[test]
fn no_shell_anywhere() {
    // Every process we start is named explicitly with an argument vector.
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for bad in ["\"sh\"", "\"/bin/sh\"", "\"bash\"", "\"-c\""] {
                assert!(!text.contains(bad), "{}: {bad}", path.display());
            }
        }
    }
}

/// Runs `pilot-gateway ARGS` (with the state directory and socket of `gw`)
/// in a private mount namespace whose /proc is an empty tmpfs.
fn without_proc(gw: &Gw, args: &[&str]) -> std::process::Output {
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount -t tmpfs none /proc && exec \"$@\"")
        .arg("sh")
        .arg(GATEWAY)
        .arg("--state-dir")
        .arg(&gw.state)
        .arg("--socket")
        .arg(&gw.socket)
        .args(args);
    c.output().unwrap()
}

/// Issue 18: without /proc every liveness check answered "dead", so a
/// second `start` removed a live gateway's state. Now every command
/// refuses with a clear error, and the live gateway is untouched.
#[test]
fn without_proc_commands_refuse_instead_of_guessing() {
    netns();
    let dir = TempDir::new("sec-noproc");
    let devd = Devd::start(&dir, &["--route", "0:0000.0000.0004=127.0.0.1"]);
    let gw = Gw::new(&dir, &devd.socket);
    gw.ok(&["start", "--ports", "8080", A4]);
    let pid = gw.pid();
    for args in [
        &["--json", "start", "--ports", "8080", A4][..],
        &["--json", "status"][..],
        &["--json", "stop"][..],
    ] {
        let out = without_proc(&gw, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let v = json::parse(err.trim()).unwrap_or_else(|e| panic!("{e}: {err}"));
        assert_eq!(
            v.get("code").and_then(Value::as_str),
            Some("not_supported"),
            "{v}"
        );
        assert!(
            v.get("message")
                .and_then(Value::as_str)
                .unwrap()
                .contains("/proc is not mounted"),
            "{v}"
        );
    }
    assert_eq!(gw.pid(), pid, "the live gateway's state is still there");
    assert!(gw.ok(&["status"]).contains(&format!("pid {pid}")));
    gw.ok(&["stop"]);
}

/// Issue 18, secure opens: `--access-log` and `--config` are opened
/// component by component. A symlink as the last component, a FIFO, a
/// directory on the way that another user owns (holding a link they
/// control) or that anyone may write without the sticky bit: each is
/// refused with a message naming it, never followed or waited on.
#[test]
fn access_log_and_config_are_opened_securely() {
    use std::os::unix::fs::{chown, symlink, PermissionsExt};
    netns();
    let dir = TempDir::new("sec-open");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let devd = Devd::start(&dir, &["--route", "0:0000.0000.0004=127.0.0.1"]);
    let gw = Gw::new(&dir, &devd.socket);
    let victim = dir.path("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    // A directory of nobody's with a link to the victim's directory.
    let theirs = dir.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    symlink(&dir.0, theirs.join("up")).unwrap();
    // A directory anyone may write, without the sticky bit.
    let open = dir.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    symlink(&victim, dir.path("link.log")).unwrap();
    run_ok("mkfifo", &[dir.path("fifo.log").to_str().unwrap()]);
    let cases = [
        (dir.path("link.log"), "symbolic link"),
        (dir.path("fifo.log"), "not a regular file"),
        (theirs.join("up").join("victim"), "belongs to uid 65534"),
        (open.join("access.log"), "may be written by others"),
    ];
    for (path, why) in &cases {
        let out = gw
            .cmd()
            .args([
                "--json",
                "start",
                "--foreground",
                "--ports",
                "8080",
                "--access-log",
            ])
            .arg(path)
            .arg(A4)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{path:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{path:?}: {err}");
        assert!(!gw.state.join("state.json").exists());
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    // --config: the same walk (the file itself must be root's or ours).
    std::fs::write(dir.path("cfg.json"), "{\"subnet\": \"10.9.0.0/16\"}").unwrap();
    symlink(dir.path("cfg.json"), dir.path("cfg-link.json")).unwrap();
    for (path, why) in [
        (dir.path("cfg-link.json"), "symbolic link"),
        (theirs.join("up").join("cfg.json"), "belongs to uid 65534"),
        (dir.path("fifo.log"), "not a regular file"),
    ] {
        let out = gw
            .cmd()
            .args(["--json", "--config"])
            .arg(&path)
            .arg("status")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{path:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{path:?}: {err}");
    }
    // A good access log still works, created 0640 and appended to.
    let log = dir.path("ok.log");
    gw.ok(&[
        "start",
        "--ports",
        "8080",
        "--access-log",
        log.to_str().unwrap(),
        A4,
    ]);
    assert!(log.exists());
    gw.ok(&["stop"]);
}

/// Issue 18, secure opens: a state directory reached through a directory
/// anyone may write (no sticky bit), or through another user's link, is
/// refused before anything is created or read.
#[test]
fn state_directory_path_is_walked_securely() {
    use std::os::unix::fs::{chown, symlink, PermissionsExt};
    netns();
    let dir = TempDir::new("sec-statepath");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let devd = Devd::start(&dir, &[]);
    let open = dir.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let theirs = dir.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::create_dir(dir.path("real")).unwrap();
    symlink(dir.path("real"), theirs.join("up")).unwrap();
    for (state, why) in [
        (open.join("state"), "may be written by others"),
        (theirs.join("up").join("state"), "belongs to uid 65534"),
    ] {
        let gw = Gw::handle(state.clone(), devd.socket.clone());
        let out = gw.run(&["--json", "start", "--foreground", "--ports", "8080"]);
        assert_eq!(out.status.code(), Some(1), "{state:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{state:?}: {err}");
        assert!(!state.exists(), "nothing created: {state:?}");
    }
    assert!(!dir.path("real").join("state").exists());
}

/// Issue 18: a dead gateway's alias that some process held a socket on
/// when the next gateway started was left, and never removed later. Now
/// it is tried again on every SIGHUP and idle tick, and goes once unused.
#[test]
fn a_stale_alias_in_use_at_start_is_removed_once_unused() {
    netns();
    let dir = TempDir::new("sec-stale");
    let devd = Devd::start(
        &dir,
        &[
            "--route",
            "0:0000.0000.0004=127.0.0.1",
            "--route",
            "0:0000.0000.0005=127.0.0.1",
        ],
    );
    let gw = Gw::new(&dir, &devd.socket);
    let mut p = gw.foreground(&dir, &["--ports", "8080", A4]);
    assert!(has_alias("10.4.0.1"));
    p.signal(libc::SIGKILL);
    assert!(p.wait_exit(Duration::from_secs(5)).is_some());
    // Someone holds a socket on the leftover address.
    let holder = std::net::TcpListener::bind("10.4.0.1:9999").unwrap();
    let mut p = gw.foreground(&dir, &["--ports", "8080", A5, "10.4.0.2"]);
    assert!(has_alias("10.4.0.1"), "kept while in use");
    assert!(
        p.stderr().contains("tried again once it is unused"),
        "{}",
        p.stderr()
    );
    drop(holder);
    // A SIGHUP (any `map`/`unmap`) tries again at once; idle ticks too.
    let _ = gw.run(&["unmap", "10.4.0.9"]);
    assert!(
        wait_until(Duration::from_secs(8), || !has_alias("10.4.0.1")),
        "removed once unused: {}",
        p.stderr()
    );
    assert!(has_alias("10.4.0.2"));
    assert!(p.stderr().contains("removed leftover alias 10.4.0.1"));
    gw.ok(&["stop"]);
    assert!(p.wait_exit(Duration::from_secs(5)).is_some());
}

/// The security documents are true line by line only if every test the
/// trust-boundary table of docs/THREAT_MODEL.md names exists: in each row's
/// last cell, each `path.rs` names a file, each name after it a `fn` in that
/// file. The table may grow but never name fewer tests than the 67 it named
/// when it moved out of SECURITY.md. SECURITY.md keeps its reporting policy
/// and links only to headings that exist.
#[test]
fn security_md_names_only_tests_that_exist() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = std::fs::read_to_string(root.join("docs/THREAT_MODEL.md")).unwrap();
    let start = model.find("\n## Trust boundaries\n").unwrap();
    let section = &model[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |e| e + 1)];
    let mut named = std::collections::BTreeSet::new();
    let mut rows = 0;
    for line in section
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| boundary"))
    {
        rows += 1;
        let cell = line
            .trim_end()
            .trim_end_matches('|')
            .rsplit('|')
            .next()
            .unwrap_or("");
        let mut file: Option<(&str, String)> = None;
        for (i, tok) in cell.split('`').enumerate() {
            if i % 2 == 0 {
                continue;
            }
            if tok.ends_with(".rs") {
                assert!(
                    root.join(tok).exists(),
                    "docs/THREAT_MODEL.md names {tok}, which does not exist"
                );
                file = Some((tok, std::fs::read_to_string(root.join(tok)).unwrap()));
                continue;
            }
            let Some((path, src)) = &file else { continue };
            if !tok.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            assert!(
                src.contains(&format!("fn {tok}(")),
                "docs/THREAT_MODEL.md names test {tok}, not in {path}: {line}"
            );
            named.insert((path.to_string(), tok.to_string()));
        }
    }
    assert!(rows >= 12, "only {rows} trust boundaries in the table");
    assert!(named.len() >= 67, "only {} tests named", named.len());

    // Every heading a link may point to, as the repository host spells it.
    let slug = |h: &str| -> String {
        h.trim_start_matches('#')
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect()
    };
    let anchors: Vec<String> = model.lines().filter(|l| l.starts_with('#')).map(slug).collect();
    let security = std::fs::read_to_string(root.join("SECURITY.md")).unwrap();
    assert!(security.contains("\n## Reporting a vulnerability\n"));
    assert!(security.contains("](docs/THREAT_MODEL.md)"));
    for (doc, prefix) in [(&security, "](docs/THREAT_MODEL.md#"), (&model, "](#")] {
        for link in doc.split(prefix).skip(1) {
            let anchor = &link[..link.find(')').unwrap()];
            assert!(
                anchors.iter().any(|a| a == anchor),
                "a link to #{anchor}, which docs/THREAT_MODEL.md has no heading for"
            );
        }
    }
}
