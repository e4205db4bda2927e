//! Issue 19 end to end, through the real gateway binary and pilot-devd
//! `--lossy-close 200` (devd delivers every Send 200 ms late, drops what
//! is undelivered at Close, and loses a Close sent within 200 ms of an
//! Accept, as the Feb-2026 daemon does): the engine's Close waits until
//! the daemon reports the bytes delivered (`engine` "Closing",
//! `closing`), in both directions, and a connection an exposure cannot
//! serve is closed once the dialer can hear it. devd `--no-conn-list`
//! (a daemon that cannot tell) gets the old immediate Close, and shows
//! the loss.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use pilot_gateway::json::Value;

const FOUR_MIB: usize = 4 << 20;
/// devd turns connections here into inbound ones from P9 to pilot port 80.
const IN80: &str = "127.0.0.1:7100";

fn devd(dir: &TempDir, extra: &[&str]) -> Devd {
    let mut args = vec![
        "--inbound",
        "127.0.0.1:7100=0:0000.0000.0009:80",
        "--route",
        "0:0000.0000.0004=127.0.0.1",
    ];
    args.extend_from_slice(extra);
    Devd::start(dir, &args)
}

/// A service that writes `FOUR_MIB` pattern bytes as soon as it accepts,
/// then closes (as an HTTP/1.0 server does after its last write).
fn writes_then_closes(mut c: TcpStream) {
    let _ = c.write_all(&pattern(19, FOUR_MIB));
}

/// Reads a stream to its end (EOF, reset or `limit` of silence).
fn read_all(mut t: TcpStream, limit: Duration) -> Vec<u8> {
    t.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match t.read(&mut buf) {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Downloads through the exposure on pilot port 80 (devd `--inbound`).
fn download_exposed() -> Vec<u8> {
    read_all(connect(IN80), Duration::from_secs(15))
}

fn close_mode(gw: &Gw) -> String {
    let mut mode = String::new();
    wait_until(Duration::from_secs(5), || {
        mode = status(gw)
            .get("close_mode")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        mode != "unknown" && !mode.is_empty()
    });
    mode
}

#[test]
fn a_service_that_writes_four_mib_and_closes_reaches_the_dialer_whole() {
    netns();
    let dir = TempDir::new("close-expose");
    let _svc = Service::start(8000, writes_then_closes);
    let d = devd(&dir, &["--lossy-close", "200"]);
    let gw = Gw::new(&dir, &d.socket);
    gw.data(&["start", "--expose", "80=8000"]);
    assert_eq!(close_mode(&gw), "confirmed");
    let want = pattern(19, FOUR_MIB);
    for round in 0..2 {
        let got = download_exposed();
        assert!(
            got == want,
            "round {round}: {} of {} bytes, prefix intact: {}",
            got.len(),
            want.len(),
            got == want[..got.len().min(want.len())]
        );
    }
    assert_eq!(n(&status(&gw), "close_unconfirmed"), 0);
}

#[test]
fn with_a_daemon_that_cannot_tell_the_close_is_immediate_and_loses_the_tail() {
    netns();
    let dir = TempDir::new("close-expose-old");
    let _svc = Service::start(8000, writes_then_closes);
    let d = devd(&dir, &["--lossy-close", "200", "--no-conn-list"]);
    let gw = Gw::new(&dir, &d.socket);
    gw.data(&["start", "--expose", "80=8000"]);
    assert_eq!(close_mode(&gw), "immediate");
    let want = pattern(19, FOUR_MIB);
    let got = download_exposed();
    assert!(
        got.len() < want.len(),
        "all {} bytes arrived: the immediate close lost nothing",
        got.len()
    );
    assert!(got == want[..got.len()], "what arrived is not a prefix");
}

/// The agent side of the map direction: counts what arrives until EOF.
fn counting_agent(port: u16) -> mpsc::Receiver<Vec<u8>> {
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        if let Ok((t, _)) = l.accept() {
            drop(l); // free the port before reporting: the next round binds it
            let _ = tx.send(read_all(t, Duration::from_secs(20)));
        }
    });
    rx
}

/// Uploads `data` to the mapped agent, then closes the socket fully (no
/// half-close): the gateway sees the client gone and closes the stream.
fn upload_and_close(data: &[u8]) {
    let mut c = connect("10.4.0.1:9001");
    c.write_all(data).unwrap();
    drop(c);
}

#[test]
fn an_upload_of_four_mib_then_a_full_close_reaches_the_agent_whole() {
    netns();
    let dir = TempDir::new("close-map");
    let d = devd(&dir, &["--lossy-close", "200"]);
    let gw = Gw::new(&dir, &d.socket);
    let _p = gw.foreground(&dir, &["--ports", "9001", A4]);
    assert_eq!(close_mode(&gw), "confirmed");
    let data = pattern(29, FOUR_MIB);
    for round in 0..2 {
        let agent = counting_agent(9001);
        upload_and_close(&data);
        let got = agent.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(
            got == data,
            "round {round}: the agent got {} of {} bytes",
            got.len(),
            data.len()
        );
    }

    let dir2 = TempDir::new("close-map-old");
    let d2 = Devd::start(
        &dir2,
        &[
            "--lossy-close",
            "200",
            "--no-conn-list",
            "--route",
            "0:0000.0000.0005=127.0.0.1",
        ],
    );
    let gw2 = Gw::new(&dir2, &d2.socket);
    let _p2 = gw2.foreground(
        &dir2,
        &["--ports", "9002", "--subnet", "10.5.0.0/16", "0:0000.0000.0005"],
    );
    assert_eq!(close_mode(&gw2), "immediate");
    let l = TcpListener::bind("127.0.0.1:9002").unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        if let Ok((t, _)) = l.accept() {
            drop(l); // free the port before reporting: the next round binds it
            let _ = tx.send(read_all(t, Duration::from_secs(20)));
        }
    });
    let mut c = connect("10.5.0.1:9002");
    c.write_all(&data).unwrap();
    drop(c);
    let got = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(
        got.len() < data.len(),
        "immediate close: all {} bytes arrived anyway",
        got.len()
    );
    assert!(got == data[..got.len()], "what arrived is not a prefix");
}

/// Connects to the exposure and returns how long until its close (EOF
/// or reset) arrives, at most `limit`.
fn closed_within(limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut t = connect(IN80);
    t.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match t.read(&mut b) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(start.elapsed()),
            Err(_) => return None,
        }
    }
}

fn closes_at_once(_c: TcpStream) {}

#[test]
fn a_connection_the_exposure_cannot_serve_fails_within_a_second() {
    netns();
    let dir = TempDir::new("close-fast");
    let d = devd(&dir, &["--lossy-close", "200"]);
    let gw = Gw::new(&dir, &d.socket);
    // Target down: nothing listens on 8000.
    gw.data(&["start", "--expose", "80=8000"]);
    for what in ["target down", "target down again"] {
        let took = closed_within(Duration::from_secs(3));
        assert!(
            took.is_some_and(|t| t < Duration::from_secs(1)),
            "{what}: {took:?}"
        );
    }
    // A service that accepts and closes at once.
    let svc = Service::start(8000, closes_at_once);
    let took = closed_within(Duration::from_secs(3));
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(1)),
        "closes at once: {took:?}"
    );
    drop(svc);
    // A peer outside --allow (refused on the session reader).
    gw.ok(&["unexpose", "80"]);
    gw.data(&["expose", "80", "8000", "--allow", "0:0000.0000.0008"]);
    let took = closed_within(Duration::from_secs(3));
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(1)),
        "not allowed: {took:?}"
    );
    let row = gw.data(&["list"]);
    assert!(row.to_string().contains("\"refused\":1"), "{row}");
}
