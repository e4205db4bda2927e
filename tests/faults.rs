//! Faults survived: the daemon dying, agents that stall, idle and greedy
//! clients, connection churn, a killed gateway, control-plane storms, and a
//! daemon that breaks the protocol. Each test in its own namespace.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use common::*;
use pilot_gateway::json::{self, Value};

fn gateway_log(dir: &TempDir) -> String {
    std::fs::read_to_string(dir.path("gateway.log")).unwrap_or_default()
}

#[test]
fn daemon_death_closes_affected_clients_and_recovery_needs_no_restart() {
    netns();
    let dir = TempDir::new("daemon-death");
    let _src = Service::start(9000, source);
    let _echo = Service::start(8080, echo_once);
    let mut devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    let mut p = gw.foreground(&dir, &["--ports", "8080,9000", A4]);
    let mut s = connect("10.4.0.1:9000");
    s.write_all(&(1u64 << 30).to_be_bytes()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    s.read_exact(&mut buf).unwrap();
    devd.proc.child.kill().unwrap();
    devd.proc.child.wait().unwrap();
    // The client sees the end promptly (reset or EOF), never a hang.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut ended = false;
    for _ in 0..100_000 {
        match s.read(&mut buf) {
            Ok(0) => {
                ended = true;
                break;
            }
            Ok(_) => {}
            Err(e) => {
                assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "the client hangs");
                ended = true;
                break;
            }
        }
    }
    assert!(ended);
    assert!(p.child.try_wait().unwrap().is_none(), "the gateway stays up");
    assert!(!short_exchange("10.4.0.1:8080"), "no daemon: no service");
    let devd2 = Devd::start(&dir, &routes());
    assert!(
        wait_until(Duration::from_secs(5), || short_exchange("10.4.0.1:8080")),
        "works again"
    );
    drop(devd2);
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(20)).is_some());
}

#[test]
fn an_agent_that_never_reads_stalls_only_its_own_connection() {
    netns();
    let dir = TempDir::new("stall");
    let _sink = Service::start(9100, never_reads);
    let _src = Service::start(9000, source);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    let p = gw.foreground(&dir, &["--ports", "9000,9100", A4, A5]);
    let rss_before = proc_field(p.pid(), "VmRSS:");
    let pusher = thread::spawn(|| {
        let mut s = connect("10.4.0.1:9100");
        s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        let chunk = vec![7u8; 1 << 20];
        let mut pushed = 0usize;
        while pushed < 1 << 30 {
            match s.write(&chunk) {
                Ok(n) => pushed += n,
                Err(_) => break, // stalled: flow control reached the client
            }
        }
        pushed
    });
    // Meanwhile another agent's download runs at full speed, byte-exact.
    let (got, hash) = download("10.4.0.2:9000", 128 << 20);
    assert_eq!((got, hash), (128 << 20, expected_download(128 << 20)));
    let pushed = pusher.join().unwrap();
    assert!(pushed < 1 << 30, "the stalled agent cannot absorb 1 GiB");
    let rss_after = proc_field(p.pid(), "VmRSS:");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "gateway memory bounded: {rss_before} → {rss_after} KiB"
    );
}

#[test]
fn idle_and_half_closed_clients_are_closed_and_counted() {
    netns();
    let dir = TempDir::new("idle");
    let _echo = Service::start(8080, echo);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    let p = gw.foreground(&dir, &["--ports", "8080", "--idle-timeout", "1", A4]);
    let threads_before = proc_field(p.pid(), "Threads:");
    let mut silent = connect("10.4.0.1:8080");
    let mut half = connect("10.4.0.1:8080");
    half.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    half.read_exact(&mut b).unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(
        sees_reset(&mut silent, Duration::from_secs(5)),
        "a silent client is closed at the idle limit"
    );
    assert!(
        sees_reset(&mut half, Duration::from_secs(5)),
        "a half-closed client is closed at the idle limit"
    );
    assert!(wait_until(Duration::from_secs(5), || n(
        &status(&gw),
        "idle_timeouts"
    ) == 2));
    assert_eq!(n(&status(&gw), "active"), 0);
    assert!(
        wait_until(Duration::from_secs(5), || proc_field(p.pid(), "Threads:")
            == threads_before),
        "threads freed"
    );
}

#[test]
fn max_conns_refuses_extra_clients_at_once() {
    netns();
    let dir = TempDir::new("maxconns");
    let _echo = Service::start(8080, echo);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    let _p = gw.foreground(&dir, &["--ports", "8080", "--max-conns", "3", A4]);
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = connect("10.4.0.1:8080");
            s.write_all(b"hi").unwrap();
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            s
        })
        .collect();
    assert!(
        reset_soon("10.4.0.1:8080", Duration::from_secs(1)),
        "the fourth is refused at once"
    );
    for s in &mut held {
        s.write_all(b"ok").unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ok", "existing connections are unaffected");
    }
    let st = status(&gw);
    assert_eq!((n(&st, "refused"), n(&st, "active")), (1, 3), "{st}");
    assert!(gw.ok(&["status"]).contains("refused 1"));
}

#[test]
fn ten_thousand_short_connections_leave_nothing_behind() {
    netns();
    let dir = TempDir::new("churn");
    let _echo = Service::start(8080, echo_once);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    // 10.4.0.3 maps an address the daemon does not know: its dials fail.
    let p = gw.foreground(&dir, &["--ports", "8080", A4, A5, A6]);
    let round = |count: usize| {
        let workers: Vec<_> = (0..8)
            .map(|w| {
                thread::spawn(move || {
                    let mut failed_dials = 0;
                    for i in 0..count / 8 {
                        if (i + w) % 10 == 0 {
                            failed_dials += usize::from(!short_exchange("10.4.0.3:8080"));
                        } else {
                            let ip = if i % 2 == 0 {
                                "10.4.0.1:8080"
                            } else {
                                "10.4.0.2:8080"
                            };
                            assert!(short_exchange(ip), "exchange {i} via {ip}");
                        }
                    }
                    failed_dials
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum::<usize>()
    };
    let settle = || assert!(wait_until(Duration::from_secs(10), || n(&status(&gw), "active") == 0));
    // Warm up allocator arenas and thread caches, to the steady state of the
    // round below: connections whose Close waits for delivery keep their
    // threads a few Info rounds longer, so more stacks are cached at once.
    round(2400);
    settle();
    let pid = p.pid();
    let (fds, threads, rss) = (
        proc_fds(pid),
        proc_field(pid, "Threads:"),
        proc_field(pid, "VmRSS:"),
    );
    let failed = round(10_000);
    assert_eq!(failed, 1000, "every tenth dial fails");
    settle();
    assert!(
        wait_until(Duration::from_secs(5), || proc_fds(pid) == fds),
        "fds: {fds} → {}",
        proc_fds(pid)
    );
    assert!(
        wait_until(Duration::from_secs(5), || proc_field(pid, "Threads:") == threads),
        "threads leak"
    );
    // The close poller keeps its session (and the Info replies it read)
    // until nothing has been closing for 5 s, then returns that memory.
    assert!(
        wait_until(Duration::from_secs(10), || proc_field(pid, "VmRSS:")
            < rss + 8 * 1024),
        "RSS grew: {rss} → {} KiB",
        proc_field(pid, "VmRSS:")
    );
    let st = status(&gw);
    assert!(
        n(&st, "total") >= 10_800 && n(&st, "dial_failures") >= 1000,
        "{st}"
    );
}

#[test]
fn sigkill_under_load_then_start_cleans_up_and_serves() {
    netns();
    let dir = TempDir::new("sigkill-load");
    let _src = Service::start(9000, source);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    gw.ok(&["start", "--ports", "9000", A4, A5]);
    let pid = gw.pid() as i32;
    let load: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(|| {
                for _ in 0..1000 {
                    let Ok(mut s) = TcpStream::connect("10.4.0.1:9000") else {
                        return;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = s.write_all(&(8u64 << 20).to_be_bytes());
                    let mut sink = Vec::new();
                    if s.read_to_end(&mut sink).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    // SAFETY: killing the gateway this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    for l in load {
        l.join().unwrap();
    }
    assert!(has_alias("10.4.0.2"), "left behind by SIGKILL");
    let data = gw.data(&["start", "--ports", "9000", A5]);
    assert_eq!(
        data.get("cleaned").and_then(Value::as_array).map(<[Value]>::len),
        Some(2),
        "{data}"
    );
    assert!(!has_alias("10.4.0.2"));
    let (got, hash) = download("10.4.0.1:9000", 4 << 20);
    assert_eq!((got, hash), (4 << 20, expected_download(4 << 20)));
    let list = gw.ok(&["list"]);
    assert!(
        list.contains("10.4.0.1 → 0:0000.0000.0005") && list.contains("total: 1"),
        "{list}"
    );
    gw.ok(&["stop"]);
}

#[test]
fn control_storms_lose_nothing_and_spare_live_traffic() {
    netns();
    let dir = TempDir::new("storm");
    let _src = Service::start(9000, source);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    gw.ok(&["start", "--ports", "9000", A4]);
    let traffic = thread::spawn(|| download("10.4.0.1:9000", 512 << 20));
    let workers: Vec<_> = (0..8u32)
        .map(|w| {
            let (state, socket) = (gw.state.clone(), gw.socket.clone());
            thread::spawn(move || {
                let gw = Gw::handle(state, socket);
                let mut mine = Vec::new();
                for i in 0..6u32 {
                    let addr = format!("0:0000.00{:02X}.{i:04X}", w + 1);
                    let out = gw.ok(&["--json", "map", &addr]);
                    let ip = json::parse(out.trim())
                        .unwrap()
                        .get("data")
                        .unwrap()
                        .get("local_ip")
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_string();
                    mine.push(ip);
                    gw.ok(&["list"]);
                    if i % 2 == 1 {
                        let ip = mine.remove(0);
                        gw.ok(&["unmap", &ip]);
                    }
                }
                mine
            })
        })
        .collect();
    let mut kept: Vec<String> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    kept.sort();
    let (got, hash) = traffic.join().unwrap();
    assert_eq!(
        (got, hash),
        (512 << 20, expected_download(512 << 20)),
        "untouched mapping uninterrupted"
    );
    let list = json::parse(gw.ok(&["--json", "list"]).trim()).unwrap();
    let rows = list
        .get("data")
        .unwrap()
        .get("mappings")
        .and_then(Value::as_array)
        .unwrap()
        .to_vec();
    let mut listed: Vec<String> = rows
        .iter()
        .map(|r| r.get("local_ip").and_then(Value::as_str).unwrap().to_string())
        .filter(|ip| ip != "10.4.0.1")
        .collect();
    listed.sort();
    assert_eq!(listed, kept, "no lost update");
    for ip in &kept {
        assert!(TcpStream::connect(format!("{ip}:9000")).is_ok(), "{ip} listens");
    }
    gw.ok(&["stop"]);
}

#[test]
fn a_misbehaving_daemon_closes_only_the_affected_connection() {
    netns();
    let _src = Service::start(9000, source);
    let _echo = Service::start(8080, echo);
    for (mode, reason) in [
        ("oversize", "exceeds the 1 MiB limit"),
        ("truncated", "middle of a frame"),
        ("unknown-cmd", "unexpected message 0x7F"),
        ("recv-unknown-id", "daemon sent data for connection"),
        ("short-dialok", "too short"),
    ] {
        let dir = TempDir::new(&format!("misbehave-{mode}"));
        let mut args = routes();
        let m = format!("0:0000.0000.0005={mode}");
        args.extend(["--misbehave", &m]);
        let devd = Devd::start(&dir, &args);
        let gw = Gw::new(&dir, &devd.socket);
        let p = gw.foreground(&dir, &["--ports", "8080,9000", A4, A5]);
        let good = thread::spawn(|| download("10.4.0.1:9000", 64 << 20));
        // The client sends nothing: the failure comes from the daemon's side.
        let mut bad = connect("10.4.0.2:8080");
        bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 64];
        let end = bad.read(&mut b);
        assert!(
            matches!(end, Ok(0) | Err(_))
                && !matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{mode}: closed, not hung: {end:?}"
        );
        assert_eq!(
            good.join().unwrap(),
            (64 << 20, expected_download(64 << 20)),
            "{mode}: other connection intact"
        );
        assert!(
            wait_until(Duration::from_secs(5), || gateway_log(&dir).contains(reason)),
            "{mode}: {}",
            gateway_log(&dir)
        );
        assert!(short_exchange("10.4.0.1:8080"), "{mode}: the gateway carries on");
        drop(p);
    }
}

#[test]
fn a_recv_flood_keeps_gateway_memory_bounded() {
    netns();
    let dir = TempDir::new("flood");
    let _echo = Service::start(8080, echo);
    let devd = Devd::start(
        &dir,
        &[
            "--route",
            "0:0000.0000.0004=127.0.0.1",
            "--route",
            "0:0000.0000.0005=127.0.0.1",
            "--misbehave",
            "0:0000.0000.0005=flood",
        ],
    );
    let gw = Gw::new(&dir, &devd.socket);
    let p = gw.foreground(&dir, &["--ports", "8080", "--idle-timeout", "3", A4, A5]);
    let rss_before = proc_field(p.pid(), "VmRSS:");
    let mut flooded = connect("10.4.0.2:8080"); // never read from
    let _ = flooded.write_all(b"go");
    thread::sleep(Duration::from_secs(2));
    let rss_during = proc_field(p.pid(), "VmRSS:");
    assert!(
        rss_during < rss_before + 16 * 1024,
        "bounded: {rss_before} → {rss_during} KiB"
    );
    assert!(short_exchange("10.4.0.1:8080"), "other connections carry on");
    // The stalled client is cut once it has not read for the idle limit.
    assert!(
        wait_until(Duration::from_secs(15), || n(&status(&gw), "active") == 0),
        "flooded connection closed"
    );
    assert!(n(&status(&gw), "idle_timeouts") >= 1);
    drop(flooded);
}
