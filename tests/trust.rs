//! Trust boundaries (issue 11): nothing a local unprivileged user controls
//! may steer a root-run command. Each test runs the attack as `nobody`
//! (setpriv) against a gateway that a root `start` gave to nobody, in the
//! test's own network namespace (and, for the socket squat, its own mount
//! namespace with a private /tmp). Every attack here once worked.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use pilot_gateway::json::{self, Value};

/// Kills, when dropped, every process whose command line names `dir`: the
/// background gateways a test started. A test that fails half-way through
/// an attack leaves a state file that `stop` rightly refuses, so the
/// usual cleanup cannot be relied on.
struct Reaper(String);

impl Reaper {
    fn new(dir: &TempDir) -> Reaper {
        Reaper(dir.0.to_string_lossy().into_owned())
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if pid as u32 != std::process::id() && String::from_utf8_lossy(&cmdline).contains(&self.0) {
                // SAFETY: signals to processes this test started (root).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Runs `prog args…` as nobody; the attacker's step.
fn attacker(prog: &str, args: &[&str]) -> Output {
    as_nobody(prog).args(args).stdin(Stdio::null()).output().unwrap()
}

fn attacker_ok(prog: &str, args: &[&str]) {
    let out = attacker(prog, args);
    assert!(
        out.status.success(),
        "nobody: {prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// nobody writes `bytes` to `path` (creating or truncating it).
fn attacker_write(path: &Path, bytes: &[u8]) {
    let mut c = as_nobody("tee")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(bytes).unwrap();
    assert!(
        c.wait().unwrap().success(),
        "nobody could not write {}",
        path.display()
    );
}

/// Runs a gateway command as root, bounded by timeout(1): a hang is a
/// failure (exit 124), never a stuck test.
fn root_bounded(gw: &Gw, args: &[&str]) -> Output {
    let mut c = Command::new("timeout");
    c.args(["-s", "KILL", "30", GATEWAY])
        .arg("--state-dir")
        .arg(&gw.state)
        .arg("--socket")
        .arg(&gw.socket)
        .args(args)
        .stdin(Stdio::null());
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn state(gw: &Gw) -> Value {
    json::parse(&std::fs::read_to_string(gw.state.join("state.json")).unwrap()).unwrap()
}

fn set(v: &mut Value, key: &str, to: Value) {
    let Value::Obj(pairs) = v else {
        panic!("not an object")
    };
    match pairs.iter_mut().find(|(k, _)| k == key) {
        Some((_, slot)) => *slot = to,
        None => pairs.push((key.into(), to)),
    }
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap()
}

fn mapping(ip: &str, addr: &str, alias_added: bool, generation: u64) -> Value {
    Value::obj([
        ("local_ip", Value::from(ip)),
        ("pilot_addr", addr.into()),
        ("hostname", Value::Null),
        ("alias_added", alias_added.into()),
        ("ports", Value::Null),
        ("generation", generation.into()),
    ])
}

fn alive(pid: u32) -> bool {
    pilot_gateway::sys::proc::start_time(pid).is_some()
}

fn owner(p: &Path) -> u32 {
    std::os::unix::fs::MetadataExt::uid(&std::fs::symlink_metadata(p).unwrap())
}

/// A root start that the gateway's user then owns: the gateway runs as
/// nobody and the state directory is nobody's.
fn gateway_of_nobody(dir: &TempDir, socket: &Path, extra: &[&str]) -> Gw {
    let gw = Gw::new(dir, socket);
    let mut args = vec!["start", "--ports", "8080"];
    args.extend_from_slice(extra);
    args.push(A4);
    gw.ok(&args);
    assert_eq!(owner(&gw.state), NOBODY);
    gw
}

/// Hole 1: the gateway's user plants names in the state directory; root
/// commands must never write through them, hang on them, or read without
/// bound from them.
#[test]
fn root_never_writes_through_planted_names() {
    netns();
    let dir = TempDir::new("trust-links");
    let _reaper = Reaper::new(&dir);
    let (socket, _devd) = devd_as_nobody(&dir, &routes());
    let gw = gateway_of_nobody(&dir, &socket, &[]);
    let pid = gw.pid();
    let valid = std::fs::read_to_string(gw.state.join("state.json")).unwrap();
    let st = |n: &str| gw.state.join(n);
    let p = |f: &Path| f.to_str().unwrap().to_string();

    // stats.json → /dev/zero, then a huge stats.json, with the gateway
    // stopped so it cannot replace them: `list` fails, bounded.
    attacker_ok("kill", &["-STOP", &pid.to_string()]);
    attacker_ok("ln", &["-sf", "/dev/zero", &p(&st("stats.json"))]);
    let out = root_bounded(&gw, &["list"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("stats.json") && stderr(&out).contains("symbolic link"),
        "{}",
        stderr(&out)
    );
    attacker_ok("rm", &["-f", &p(&st("stats.json"))]);
    attacker_ok("truncate", &["-s", "64M", &p(&st("stats.json"))]);
    let out = root_bounded(&gw, &["list"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("larger than"), "{}", stderr(&out));
    attacker_ok("kill", &["-CONT", &pid.to_string()]);

    // A FIFO named state.json does not hang `status`.
    attacker_ok("rm", &["-f", &p(&st("state.json"))]);
    attacker_ok("mkfifo", &[&p(&st("state.json"))]);
    let out = root_bounded(&gw, &["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not a regular file"), "{}", stderr(&out));

    // The gateway dies; garbage state and links planted toward root-owned
    // paths (the temp dir is root's, 0755: nobody cannot write there).
    attacker_ok("kill", &["-KILL", &pid.to_string()]);
    assert!(wait_until(Duration::from_secs(10), || !alive(pid)));
    let precious = dir.path("precious");
    std::fs::write(&precious, "precious").unwrap();
    let targets = [
        dir.path("victim-bad"),
        dir.path("victim-stats"),
        dir.path("victim-tmp"),
    ];
    attacker_ok("rm", &["-f", &p(&st("state.json")), &p(&st("stats.json"))]);
    attacker_write(&st("state.json"), b"{garbage");
    attacker_ok("ln", &["-s", &p(&targets[0]), &p(&st("state.json.bad-1"))]);
    attacker_ok("ln", &["-s", &p(&targets[1]), &p(&st("stats.json"))]);
    attacker_ok(
        "ln",
        &["-s", &p(&targets[2]), &p(&st(&format!(".state.json.{}.tmp", 1)))],
    );
    attacker_ok("ln", &["-sf", &p(&precious), &p(&st("gateway.log"))]);
    for args in [
        &["status"][..],
        &["list"],
        &["map", A5],
        &["stop"],
        &["start", "--ports", "8080", A4],
    ] {
        let out = root_bounded(&gw, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("left as it is"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    for t in &targets {
        assert!(!t.exists(), "{} was created", t.display());
    }
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "precious");

    // A valid (dead) state again: root `start` replaces the planted
    // gateway.log link instead of truncating its target, and cleans up.
    attacker_ok("rm", &["-f", &p(&st("state.json"))]);
    attacker_write(&st("state.json"), valid.as_bytes());
    gw.ok(&["start", "--ports", "8080", A4]);
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "precious");
    let log = std::fs::symlink_metadata(st("gateway.log")).unwrap();
    assert!(log.file_type().is_file(), "gateway.log is a fresh file");
    for t in &targets {
        assert!(!t.exists(), "{} was created", t.display());
    }
    gw.ok(&["stop"]);
}

/// Hole 2: a forged pid (and its public start time) in state.json never
/// makes a command signal a process that is not our gateway.
#[test]
fn a_forged_pid_is_never_signalled() {
    netns();
    let dir = TempDir::new("trust-pid");
    let _reaper = Reaper::new(&dir);
    let (socket, _devd) = devd_as_nobody(&dir, &routes());
    let gw = gateway_of_nobody(&dir, &socket, &[]);
    let valid = std::fs::read_to_string(gw.state.join("state.json")).unwrap();
    let mut roots = Command::new("sleep");
    let root_victim = Proc::spawn(roots.arg("120"), dir.path("sleep-root.log"));
    let mut nobodys = as_nobody("sleep");
    let nobody_victim = Proc::spawn(nobodys.arg("120"), dir.path("sleep-nobody.log"));
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{}/status", nobody_victim.pid()))
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.contains("65534")))
    }));
    for victim in [&root_victim, &nobody_victim] {
        let mut st = state(&gw);
        set(&mut st, "pid", victim.pid().into());
        let start_time = pilot_gateway::sys::proc::start_time(victim.pid()).unwrap();
        set(&mut st, "start_time", start_time.into());
        attacker_ok("rm", &["-f", gw.state.join("state.json").to_str().unwrap()]);
        attacker_write(&gw.state.join("state.json"), format!("{st}\n").as_bytes());
        for args in [&["list"][..], &["stop"], &["map", A5], &["unmap", "10.4.0.1"]] {
            let out = root_bounded(&gw, args);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
            assert!(
                stderr(&out).contains("not signalled"),
                "{args:?}: {}",
                stderr(&out)
            );
            // The gateway's user gets the same answer.
            let mut c = as_nobody(GATEWAY);
            let out = c.arg("--state-dir").arg(&gw.state).args(args).output().unwrap();
            assert_eq!(out.status.code(), Some(1), "nobody {args:?}: {}", stderr(&out));
        }
        assert!(alive(victim.pid()), "victim {} was killed", victim.pid());
    }
    attacker_ok("rm", &["-f", gw.state.join("state.json").to_str().unwrap()]);
    attacker_write(&gw.state.join("state.json"), valid.as_bytes());
    assert!(gw.ok(&["stop"]).contains("stopped"));
    assert!(alive(root_victim.pid()) && alive(nobody_victim.pid()));
}

/// Hole 3: a socket bound first at the default /tmp/pilot.sock by a local
/// user is not taken for the daemon's by a root `start`. Runs in a private
/// mount namespace with its own /tmp, so the host's /tmp is never touched.
#[test]
fn a_squatted_default_socket_is_not_trusted_by_root() {
    netns();
    let script = format!(
        r#"
{tmp}setpriv --reuid=65534 --regid=65534 --clear-groups "$DEVD" --socket /tmp/pilot.sock --any-uid --route {a4}=127.0.0.1 2>/dev/null &
squatter=$!
i=0; while [ ! -S /tmp/pilot.sock ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
run() {{ echo "== $*"; env -u HOME -u XDG_RUNTIME_DIR -u PILOT_SOCKET -u PILOT_HOME -u PILOT_GATEWAY_STATE_DIR timeout -s KILL 20 "$GW" --state-dir /tmp/state "$@" 2>&1; echo "rc=$?"; }}
run start --foreground --ports 8080 {a4}
run start --foreground --no-user-switch --ports 8080 {a4}
run start --foreground --user daemon --ports 8080 {a4}
ls -d /tmp/state 2>/dev/null && echo "state-dir-created"
run start --user nobody --ports 8080 {a4}
run stop
kill $squatter; wait
"#,
        tmp = private_tmp_shell(),
        a4 = A4
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let parts: Vec<&str> = text.split("== ").skip(1).collect();
    assert_eq!(parts.len(), 5, "{text}{}", stderr(&out));
    for refused in &parts[..2] {
        assert!(refused.contains("rc=1"), "{refused}");
        assert!(
            refused.contains("default search")
                && refused.contains("--socket PATH")
                && refused.contains("--user NAME"),
            "{refused}"
        );
    }
    assert!(
        parts[2].contains("rc=1") && parts[2].contains("not to --user daemon"),
        "{}",
        parts[2]
    );
    assert!(!text.contains("state-dir-created"), "nothing was created: {text}");
    // Naming the daemon's user is how to say "that socket is the daemon's".
    assert!(
        parts[3].contains("rc=0") && parts[3].contains("nobody"),
        "{}",
        parts[3]
    );
    assert!(parts[4].contains("rc=0"), "{}", parts[4]);
}

/// Hole 5: mappings appended to state.json by the gateway's user are
/// validated against the gateway's own subnet before any alias or
/// listener; a forged dead-pid state never makes `start` remove an
/// address that is not one of ours.
#[test]
fn mappings_from_the_state_file_are_validated() {
    netns();
    let dir = TempDir::new("trust-validate");
    let _reaper = Reaper::new(&dir);
    let (socket, _devd) = devd_as_nobody(&dir, &routes());
    let gw = gateway_of_nobody(&dir, &socket, &["--subnet", "10.4.0.0/16"]);
    let pid = gw.pid();
    let mut st = state(&gw);
    let g = num(&st, "generation");
    let forged = [
        ("8.8.8.8", "0:0000.0000.0005"),
        ("0.0.0.0", "0:0000.0000.0006"),
        ("10.5.0.1", "0:0000.0000.0007"),
        ("10.4.255.255", "0:0000.0000.0008"),
        ("10.4.0.1", "0:0000.0000.0009"),
    ];
    let Some(Value::Arr(list)) = st.get("mappings").cloned() else {
        panic!()
    };
    let mut list = list;
    for (i, (ip, addr)) in forged.iter().enumerate() {
        list.push(mapping(ip, addr, false, g + 1 + i as u64));
    }
    set(&mut st, "mappings", Value::Arr(list));
    set(&mut st, "generation", (g + forged.len() as u64).into());
    set(&mut st, "subnet", "8.0.0.0/6".into());
    let file = gw.state.join("state.json");
    attacker_ok("rm", &["-f", file.to_str().unwrap()]);
    attacker_write(&file, format!("{st}\n").as_bytes());
    attacker_ok("kill", &["-HUP", &pid.to_string()]);
    let want = g + forged.len() as u64;
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| json::parse(&t).ok())
            .is_some_and(|v| v.get("applied").and_then(Value::as_u64) == Some(want))
    }));
    let lo = lo_addrs();
    for ip in ["8.8.8.8", "0.0.0.0", "10.5.0.1", "10.4.255.255"] {
        assert!(!lo.contains(&format!("inet {ip}/")), "{ip} added: {lo}");
    }
    let listening = run_ok("ss", &["-Hltn"]);
    for bad in ["8.8.8.8:", "0.0.0.0:8080", "*:8080", "10.5.0.1:", "10.4.255.255:"] {
        assert!(!listening.contains(bad), "{bad} listens: {listening}");
    }
    let st = state(&gw);
    assert_eq!(st.get("subnet").and_then(Value::as_str), Some("10.4.0.0/16"));
    let failures = st.get("failures").unwrap().to_string();
    for i in 0..forged.len() as u64 {
        assert!(
            failures.contains(&format!("\"generation\":{}", g + 1 + i)),
            "{failures}"
        );
    }
    assert!(
        failures.contains("not an assignable address") && failures.contains("mapped twice"),
        "{failures}"
    );
    // The gateway stays sane: a real map still works, the first one still serves.
    assert!(gw.ok(&["map", A5]).contains("10.4.0.2"));
    gw.ok(&["stop"]);

    // Forged dead-pid states claim the administrator's addresses as ours.
    let admin = [
        ("192.168.77.1/32", "10.4.0.0/16", "192.168.77.1"),
        ("10.4.0.9/24", "10.4.0.0/16", "10.4.0.9"),
        ("8.8.4.4/32", "8.8.4.0/24", "8.8.4.4"),
        ("127.0.0.5/32", "127.0.0.0/8", "127.0.0.5"),
    ];
    for (cidr, _, _) in &admin {
        run_ok("ip", &["addr", "add", cidr, "dev", "lo"]);
    }
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    for (cidr, subnet, ip) in &admin {
        let mut st = state_template(dead_pid, subnet);
        set(&mut st, "mappings", Value::Arr(vec![mapping(ip, A6, true, 1)]));
        attacker_ok("rm", &["-f", file.to_str().unwrap()]);
        attacker_write(&file, format!("{st}\n").as_bytes());
        gw.ok(&["start", "--ports", "8080", "--subnet", "10.4.0.0/16", A4]);
        gw.ok(&["stop"]);
        assert!(
            lo_addrs().contains(&format!("inet {cidr}")),
            "{cidr} was removed: {}",
            lo_addrs()
        );
    }
}

fn state_template(pid: u32, subnet: &str) -> Value {
    Value::obj([
        ("version", Value::from(3u64)),
        ("pid", pid.into()),
        ("start_time", 1u64.into()),
        ("started_at", 1u64.into()),
        ("socket", "/nonexistent".into()),
        ("subnet", subnet.into()),
        ("ports", Value::Arr(vec![8080u64.into()])),
        ("max_conns", 10u64.into()),
        ("half_closed_timeout_secs", 10u64.into()),
        ("user", Value::Null),
        ("daemon_uid", 0u64.into()),
        ("generation", 1u64.into()),
        ("applied", 1u64.into()),
        ("mappings", Value::Arr(vec![])),
        ("exposures", Value::Arr(vec![])),
        ("failures", Value::Arr(vec![])),
    ])
}

/// Six parallel starts with no state directory yet: exactly one runs, the
/// others say "already running" (never "File exists"). The race is tight,
/// so it is run a few times, each on a fresh directory.
#[test]
fn parallel_starts_on_a_fresh_directory() {
    netns();
    let dir = TempDir::new("trust-eexist");
    let _reaper = Reaper::new(&dir);
    let devd = Devd::start(&dir, &["--route", "0:0000.0000.0004=127.0.0.1"]);
    for round in 0..3 {
        let gw = Gw::handle(dir.path(&format!("state-{round}")), devd.socket.clone());
        let outs: Vec<Output> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|_| {
                    let h = Gw::handle(gw.state.clone(), gw.socket.clone());
                    s.spawn(move || h.run(&["start", "--ports", "8080", A4]))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ok = outs.iter().filter(|o| o.status.success()).count();
        let all: String = outs.iter().map(stderr).collect();
        gw.stop_quietly();
        assert_eq!(ok, 1, "{all}");
        assert!(!all.contains("File exists"), "{all}");
        for o in outs.iter().filter(|o| !o.status.success()) {
            assert!(stderr(o).contains("already running"), "{}", stderr(o));
        }
    }
}

/// A daemon's error text with a newline and an escape sequence neither
/// forges a log line nor reaches the log raw.
#[test]
fn daemon_error_text_is_escaped_in_the_log() {
    netns();
    let dir = TempDir::new("trust-escape");
    let devd = Devd::start(
        &dir,
        &[
            "--dial-error",
            "0:0000.0000.0004=nope\\nINFO forged line\\e[31mred",
        ],
    );
    let gw = Gw::new(&dir, &devd.socket);
    let p = gw.foreground(&dir, &["--subnet", "127.77.0.0/16", "--ports", "8080", A4]);
    assert!(reset_soon("127.77.0.1:8080", Duration::from_secs(10)));
    assert!(wait_until(Duration::from_secs(10), || p
        .stderr()
        .contains("forged")));
    let log = p.stderr();
    assert!(!log.contains('\u{1b}'), "raw ESC in the log: {log:?}");
    assert!(
        log.lines().all(|l| !l.starts_with("INFO forged")),
        "forged line: {log}"
    );
    assert!(log.contains("nope\\nINFO forged line\\x1b[31mred"), "{log}");
}

/// `--config /dev/zero` and a 10 MiB config file fail at once with a
/// clear error instead of being read without bound.
#[test]
fn config_files_are_bounded() {
    let dir = TempDir::new("trust-config");
    let big = dir.path("big.json");
    std::fs::write(&big, vec![b' '; 10 << 20]).unwrap();
    let fifo = dir.path("fifo.json");
    run_ok("mkfifo", &[fifo.to_str().unwrap()]);
    for (file, want) in [
        (Path::new("/dev/zero"), "not a regular file"),
        (big.as_path(), "larger than 64 KiB"),
        (fifo.as_path(), "not a regular file"),
    ] {
        let out = Command::new("timeout")
            .args(["-s", "KILL", "20", GATEWAY, "--state-dir"])
            .arg(dir.path("state"))
            .arg("--config")
            .arg(file)
            .arg("list")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}: {}", file.display(), stderr(&out));
        assert!(
            stderr(&out).contains(want),
            "{}: {}",
            file.display(),
            stderr(&out)
        );
    }
}

/// `--subnet 127.0.0.0/8` never hands out 127.0.0.1 (nor its network or
/// broadcast address), and `map ADDR 127.0.0.1` is refused.
#[test]
fn loopback_subnet_never_hands_out_127_0_0_1() {
    netns();
    let dir = TempDir::new("trust-127");
    let _reaper = Reaper::new(&dir);
    let devd = Devd::start(&dir, &["--route", "0:0000.0000.0004=127.0.0.1"]);
    let gw = Gw::new(&dir, &devd.socket);
    let out = gw.ok(&["start", "--subnet", "127.0.0.0/8", "--ports", "8080", A4]);
    assert!(out.contains("127.0.0.2"), "{out}");
    let out = gw.run(&["map", A5, "127.0.0.1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("127.0.0.1"), "{}", stderr(&out));
    let out = gw.run(&["map", A5, "127.255.255.255"]);
    assert!(!out.status.success());
    gw.ok(&["stop"]);
}

/// Text from the state file (a hostname the gateway's user forged) reaches
/// root's terminal escaped: no escape sequence, no forged line.
#[test]
fn state_text_is_escaped_on_the_terminal() {
    netns();
    let dir = TempDir::new("trust-tty");
    let _reaper = Reaper::new(&dir);
    let (socket, _devd) = devd_as_nobody(&dir, &routes());
    let gw = gateway_of_nobody(&dir, &socket, &[]);
    let mut st = state(&gw);
    let Some(Value::Arr(mut list)) = st.get("mappings").cloned() else {
        panic!()
    };
    set(
        &mut list[0],
        "hostname",
        "lab\u{1b}]0;owned\u{7}\ntotal: 999".into(),
    );
    set(&mut st, "mappings", Value::Arr(list));
    let file = gw.state.join("state.json");
    attacker_ok("rm", &["-f", file.to_str().unwrap()]);
    attacker_write(&file, format!("{st}\n").as_bytes());
    let out = gw.ok(&["list"]);
    assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
    assert!(!out.lines().any(|l| l.starts_with("total: 999")), "{out}");
    assert!(out.contains("lab\\x1b]0;owned\\x07\\ntotal: 999"), "{out}");
    gw.ok(&["stop"]);
}
