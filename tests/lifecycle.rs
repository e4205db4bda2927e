//! How connections end when the client goes first (issue 12): a client that
//! closed its socket frees its threads, daemon session, agent stream and
//! `--max-conns` slot at once; one that only shut down writing still gets
//! the agent's whole reply; `--half-closed-timeout` bounds the rest. Each
//! test in its own namespace.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use pilot_gateway::json::Value;

const ROUTE: [&str; 2] = ["--route", "0:0000.0000.0004=127.0.0.1"];
/// The delayed reply a half-closed client must receive whole.
const REPLY_LEN: usize = 256 * 1024;

/// Agent streams that saw their end (the gateway closed the pilot stream),
/// one counter per agent (tests run in parallel in one process).
static REPLIED_EOFS: AtomicU64 = AtomicU64::new(0);
static SILENT_EOFS: AtomicU64 = AtomicU64::new(0);

/// Agent: answers the first read, then stays silent and open until the
/// stream is closed.
fn reply_then_silent(mut c: TcpStream) {
    let mut b = [0u8; 64];
    let Ok(n) = c.read(&mut b) else { return };
    if n == 0 || c.write_all(&b[..n]).is_err() {
        return;
    }
    while matches!(c.read(&mut b), Ok(n) if n > 0) {}
    REPLIED_EOFS.fetch_add(1, Ordering::Relaxed);
}

/// Agent: reads the request, then (it cannot see the client's half-close)
/// replies after 300 ms with REPLY_LEN bytes and closes.
fn delayed_reply(mut c: TcpStream) {
    let mut b = [0u8; 64];
    if !matches!(c.read(&mut b), Ok(n) if n > 0) {
        return;
    }
    thread::sleep(Duration::from_millis(300));
    let _ = c.write_all(&pattern(12, REPLY_LEN));
}

/// Agent: reads and never answers, until the stream is closed.
fn silent(mut c: TcpStream) {
    let mut b = [0u8; 64];
    while matches!(c.read(&mut b), Ok(n) if n > 0) {}
    SILENT_EOFS.fetch_add(1, Ordering::Relaxed);
}

/// Agent: reads and never answers (not counted).
fn mute(mut c: TcpStream) {
    let mut b = [0u8; 64];
    while matches!(c.read(&mut b), Ok(n) if n > 0) {}
}

/// Connects, sends a request and waits for the reply of the same length.
fn exchange(addr: &str, req: &[u8]) -> TcpStream {
    let mut s = connect(addr);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    let mut b = vec![0u8; req.len()];
    s.read_exact(&mut b)
        .unwrap_or_else(|e| panic!("no reply via {addr}: {e}"));
    assert_eq!(b, req);
    s
}

#[test]
fn closed_clients_are_freed_at_once_half_closed_ones_get_the_whole_reply() {
    netns();
    let dir = TempDir::new("lifecycle-churn");
    let _agent = Service::start(8080, reply_then_silent);
    let _slow = Service::start(8081, delayed_reply);
    let devd = Devd::start(&dir, &ROUTE);
    let gw = Gw::new(&dir, &devd.socket);
    let log = dir.path("access.log");
    let log_arg = log.display().to_string();
    let p = gw.foreground(
        &dir,
        &[
            "--ports",
            "8080,8081",
            "--max-conns",
            "100",
            "--access-log",
            &log_arg,
            A4,
        ],
    );
    let base = settled_threads(p.pid());
    // Every connection is closed by the client while the agent says
    // nothing more: were any held, the 101st would be refused.
    let mut last_close = Instant::now();
    for i in 0..1000u32 {
        let s = exchange("10.4.0.1:8080", format!("request {i:5}").as_bytes());
        drop(s);
        last_close = Instant::now();
    }
    let freed = wait_until(Duration::from_secs(1), || proc_field(p.pid(), "Threads:") == base);
    let took = last_close.elapsed();
    assert!(
        freed,
        "threads {} one second after the last close (baseline {base})",
        proc_field(p.pid(), "Threads:")
    );
    eprintln!("back to {base} threads {took:?} after the last close");
    assert_eq!(active(&gw, "10.4.0.1"), 0, "list shows every connection ended");
    assert!(
        wait_until(Duration::from_secs(5), || REPLIED_EOFS.load(Ordering::Relaxed)
            == 1000),
        "every agent stream was closed: {}",
        REPLIED_EOFS.load(Ordering::Relaxed)
    );
    let st = status(&gw);
    assert_eq!((n(&st, "refused"), n(&st, "idle_timeouts")), (0, 0), "{st}");
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("outcome=client_closed")
            .count()
            == 1000),
        "the access log records each as client_closed"
    );

    // A client that only shut down writing still gets the whole reply,
    // sent after its half-close.
    let mut half = connect("10.4.0.1:8081");
    half.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    half.write_all(b"GET").unwrap();
    half.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    half.read_to_end(&mut got).expect("a clean end after the reply");
    assert_eq!(got.len(), REPLY_LEN);
    assert!(got == pattern(12, REPLY_LEN), "the reply arrives intact");
}

#[test]
fn a_half_closed_client_that_closes_later_is_freed_within_a_second() {
    netns();
    let dir = TempDir::new("lifecycle-half");
    let _agent = Service::start(8080, silent);
    let devd = Devd::start(&dir, &ROUTE);
    let gw = Gw::new(&dir, &devd.socket);
    // A long half-closed limit: only noticing the close can free it.
    let p = gw.foreground(&dir, &["--ports", "8080", "--half-closed-timeout", "60", A4]);
    let base = settled_threads(p.pid());
    let mut c = connect("10.4.0.1:8080");
    c.write_all(b"hello").unwrap();
    assert!(wait_until(Duration::from_secs(5), || active(&gw, "10.4.0.1") == 1));
    c.shutdown(Shutdown::Write).unwrap();
    // Half-closed: kept (it may still read a reply), re-checked meanwhile.
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(active(&gw, "10.4.0.1"), 1, "a half-closed client is kept");
    assert_eq!(proc_field(p.pid(), "Threads:"), base + 2);
    assert_eq!(SILENT_EOFS.load(Ordering::Relaxed), 0);
    drop(c);
    let closed = Instant::now();
    let freed = wait_until(Duration::from_secs(1), || proc_field(p.pid(), "Threads:") == base);
    let took = closed.elapsed();
    assert!(
        freed,
        "still {} threads 1 s after the close",
        proc_field(p.pid(), "Threads:")
    );
    eprintln!("freed {took:?} after the close");
    assert_eq!(active(&gw, "10.4.0.1"), 0);
    assert!(wait_until(Duration::from_secs(5), || SILENT_EOFS
        .load(Ordering::Relaxed)
        == 1));
    let st = status(&gw);
    assert_eq!(
        n(&st, "idle_timeouts"),
        0,
        "ended by the close, not a timer: {st}"
    );
}

#[test]
fn half_closed_timeout_ends_a_silent_half_closed_client() {
    netns();
    let dir = TempDir::new("lifecycle-timeout");
    let _agent = Service::start(8080, mute);
    let devd = Devd::start(&dir, &ROUTE);
    let gw = Gw::new(&dir, &devd.socket);
    let _p = gw.foreground(
        &dir,
        &[
            "--ports",
            "8080",
            "--idle-timeout",
            "60",
            "--half-closed-timeout",
            "1",
            A4,
        ],
    );
    let st = status(&gw);
    assert_eq!(
        st.get("half_closed_timeout_secs").and_then(Value::as_f64),
        Some(1.0)
    );
    assert!(gw.ok(&["status"]).contains("after 1s without data"));
    let mut open = connect("10.4.0.1:8080");
    open.write_all(b"x").unwrap();
    let mut half = connect("10.4.0.1:8080");
    half.write_all(b"x").unwrap();
    assert!(wait_until(Duration::from_secs(5), || active(&gw, "10.4.0.1") == 2));
    half.shutdown(Shutdown::Write).unwrap();
    let t = Instant::now();
    assert!(
        sees_reset(&mut half, Duration::from_secs(5)),
        "a silent half-closed client is closed at --half-closed-timeout"
    );
    assert!(t.elapsed() >= Duration::from_millis(900), "not before its limit");
    assert!(wait_until(Duration::from_secs(5), || n(
        &status(&gw),
        "idle_timeouts"
    ) == 1));
    assert_eq!(active(&gw, "10.4.0.1"), 1, "the open client is untouched");
}
