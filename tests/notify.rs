//! systemd readiness (issue 21): a foreground gateway started with
//! NOTIFY_SOCKET sends READY=1 with a STATUS= line once it serves,
//! RELOADING=1 (with MONOTONIC_USEC=) then READY=1 around each SIGHUP
//! reconcile, STOPPING=1 when stopping, and WATCHDOG=1 pings when
//! WATCHDOG_USEC asks for them. A fake notify socket stands in for
//! systemd: a path, and an abstract (`@`) name. Each test in its own
//! network namespace (abstract socket names belong to it too).

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

/// Datagrams received until one contains `want` (bounded); all of them.
fn until(sock: &UnixDatagram, want: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = m.lines().any(|l| l == want);
            seen.push(m);
            if done {
                return seen;
            }
        }
    }
    panic!("no {want:?} within {limit:?}; got {seen:?}");
}

/// The whole readiness conversation of one gateway, with `sock` bound
/// where `name` (NOTIFY_SOCKET's value) points.
fn conversation(tag: &str, sock: UnixDatagram, name: &str) {
    let dir = TempDir::new(tag);
    let _agent = Service::start(8080, echo);
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    let mut p = gw.foreground_with(&dir, &["--ports", "8080", A4], |c| {
        c.env("NOTIFY_SOCKET", name);
    });
    let got = until(&sock, "READY=1", Duration::from_secs(10));
    let ready = got.last().unwrap();
    assert!(
        ready.contains("STATUS=1 mappings, 0 exposures, 0 connections"),
        "{ready}"
    );
    assert!(short_exchange("10.4.0.1:8080"), "it serves once READY=1 was sent");

    // A reconcile (`map` signals SIGHUP): RELOADING=1 with the monotonic
    // clock, then READY=1 with the new status.
    gw.ok(&["map", A5]);
    let got = until(&sock, "READY=1", Duration::from_secs(10));
    let reloading = got
        .iter()
        .find(|m| m.lines().any(|l| l == "RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1 before READY=1: {got:?}"));
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC= with RELOADING=1: {reloading}"));
    assert!(usec > 0);
    assert!(got.last().unwrap().contains("STATUS=2 mappings"), "{got:?}");

    p.signal(libc::SIGTERM);
    until(&sock, "STOPPING=1", Duration::from_secs(10));
    assert!(
        p.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()),
        "{}",
        p.stderr()
    );
}

#[test]
fn readiness_reload_and_stop_on_a_path_socket() {
    netns();
    let dir = TempDir::new("notify-sock");
    let path = dir.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    conversation("notify-path", sock, path.to_str().unwrap());
}

#[test]
fn readiness_on_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    netns();
    let name = format!("pgw-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    conversation("notify-abstract", sock, &format!("@{name}"));
}

/// WATCHDOG_USEC=400000: a ping at least every 200 ms or so while the
/// gateway is healthy, a longer timeout for the length of a drain, and no
/// pings for a WATCHDOG_PID that is not ours.
#[test]
fn watchdog_pings_while_alive() {
    netns();
    let dir = TempDir::new("notify-watchdog");
    let path = dir.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let devd = Devd::start(&dir, &routes());
    let gw = Gw::new(&dir, &devd.socket);
    let mut p = gw.foreground_with(&dir, &["--ports", "8080", A4], |c| {
        c.env("NOTIFY_SOCKET", &path).env("WATCHDOG_USEC", "400000");
    });
    until(&sock, "READY=1", Duration::from_secs(10));
    let start = Instant::now();
    let mut pings = 0;
    while pings < 5 {
        until(&sock, "WATCHDOG=1", Duration::from_secs(2));
        pings += 1;
    }
    // Five pings at a 200 ms period: about a second, never the 5 s wait.
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());

    // A drain runs in the background (issue 18): the main thread keeps
    // pinging through it, so the watchdog's timeout needs no stretching.
    let _agent = Service::start(8080, echo);
    gw.ok(&["map", A5]);
    let mut held = connect("10.4.0.2:8080");
    assert!(still_echoes(&mut held));
    let g2 = Gw::handle(gw.state.clone(), gw.socket.clone());
    let unmap = std::thread::spawn(move || g2.ok(&["unmap", "--drain", "2", "--wait", "10.4.0.2"]));
    let during = Instant::now();
    for _ in 0..5 {
        let seen = until(&sock, "WATCHDOG=1", Duration::from_secs(1));
        assert!(!seen.iter().any(|m| m.contains("WATCHDOG_USEC=")), "{seen:?}");
    }
    assert!(
        during.elapsed() < Duration::from_secs(2),
        "pinged through the drain"
    );
    drop(held);
    unmap.join().unwrap();
    // A WATCHDOG_PID naming another process: no pings for us.
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(20)).is_some());
    let dir2 = TempDir::new("notify-watchdog2");
    let gw2 = Gw::new(&dir2, &devd.socket);
    let _p2 = gw2.foreground_with(&dir2, &["--ports", "8080", A5], |c| {
        c.env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "400000")
            .env("WATCHDOG_PID", "1");
    });
    until(&sock, "READY=1", Duration::from_secs(10));
    sock.set_read_timeout(Some(Duration::from_millis(1200))).unwrap();
    let mut buf = [0u8; 4096];
    if let Ok(n) = sock.recv(&mut buf) {
        let m = String::from_utf8_lossy(&buf[..n]);
        assert!(!m.contains("WATCHDOG=1"), "pinged for another pid: {m}");
    }
}
