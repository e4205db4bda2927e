//! pilot-devd `--lossy-close MS` reproduces how the Feb-2026 daemon loses
//! data at Close (PROTOCOL.md "Closing"; `src/bin/pilot-devd/conns.rs`),
//! and Info's `conn_list` reports what is outstanding — checked with a raw
//! IPC client, no gateway.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use pilot_gateway::ipc::{self, cmd};
use pilot_gateway::json::{self, Value};

const INBOUND: &str = "127.0.0.1:7100";
const FOUR_MIB: usize = 4 << 20;

fn devd(dir: &TempDir, extra: &[&str]) -> Devd {
    let mut args = vec![
        "--inbound",
        "127.0.0.1:7100=0:0000.0000.0009:80",
        "--route",
        "0:0000.0000.0004:80=127.0.0.1:7200",
    ];
    args.extend_from_slice(extra);
    Devd::start(dir, &args)
}

/// Sends `data` on `conn` in the largest frames the daemon takes.
fn send_all(s: &mut Raw, conn: u32, data: &[u8]) {
    for chunk in data.chunks(ipc::MAX_SEND_DATA) {
        s.send(cmd::SEND, &[&conn.to_be_bytes(), chunk]);
    }
}

fn close(s: &mut Raw, conn: u32) {
    s.send(cmd::CLOSE, &[&conn.to_be_bytes()]);
}

/// Info on a session of its own; the `conn_list` entry of `conn`.
fn info(d: &Devd) -> Value {
    let mut s = Raw::open(d);
    s.send(cmd::INFO, &[]);
    let (c, p) = s.frame();
    assert_eq!(c, cmd::INFO_OK);
    json::parse_bytes(&p).unwrap()
}

fn entry(d: &Devd, conn: u32) -> Value {
    let v = info(d);
    let list = v.get("conn_list").and_then(Value::as_array).expect("conn_list");
    list.iter()
        .find(|e| e.get("id").and_then(Value::as_u64) == Some(u64::from(conn)))
        .cloned()
        .unwrap_or_else(|| panic!("connection {conn} not in {v}"))
}

fn num(e: &Value, k: &str) -> u64 {
    e.get(k)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{k} in {e}"))
}

fn state(e: &Value) -> String {
    e.get("state").and_then(Value::as_str).unwrap_or("?").to_string()
}

/// Reads a TCP stream to its end (EOF or reset).
fn read_all(mut t: TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match t.read(&mut buf) {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// An inbound connection accepted on port 80, past the dial window.
fn accepted(d: &Devd, window: Duration) -> (Raw, u32, TcpStream) {
    let mut s = Raw::open(d);
    assert_eq!(s.bind(80), Ok(80));
    let tcp = connect(INBOUND);
    let a = s.accept();
    thread::sleep(window);
    (s, a.conn, tcp)
}

#[test]
fn send_then_close_at_once_delivers_only_a_prefix() {
    netns();
    let dir = TempDir::new("lossy-trunc");
    let d = devd(&dir, &["--lossy-close", "200"]);
    let (mut s, conn, tcp) = accepted(&d, Duration::from_millis(300));
    let reader = thread::spawn(move || read_all(tcp));
    let data = pattern(19, FOUR_MIB);
    send_all(&mut s, conn, &data);
    close(&mut s, conn);
    let got = reader.join().unwrap();
    assert!(
        got.len() < data.len(),
        "all {} bytes arrived: the close lost nothing",
        got.len()
    );
    assert!(got == data[..got.len()], "what arrived is not a prefix");

    // The map direction too: a dialed connection whose service reads all.
    let svc = TcpListener::bind("127.0.0.1:7200").unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (t, _) = svc.accept().unwrap();
        t.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        tx.send(read_all(t).len()).unwrap();
    });
    let mut m = Raw::open(&d);
    m.send(cmd::DIAL, &[&[0, 0, 0, 0, 0, 4], &80u16.to_be_bytes()]);
    let (c, p) = m.frame();
    assert_eq!(c, cmd::DIAL_OK);
    let id = ipc::be_u32(&p).unwrap();
    send_all(&mut m, id, &data);
    close(&mut m, id);
    let n = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(n < data.len(), "dialed: all {n} bytes arrived");
}

#[test]
fn conn_list_shows_data_in_flight_until_delivered() {
    netns();
    let dir = TempDir::new("lossy-list");
    let d = devd(&dir, &["--lossy-close", "200"]);
    let (mut s, conn, tcp) = accepted(&d, Duration::from_millis(300));
    let reader = thread::spawn(move || read_all(tcp));
    let data = pattern(5, 300_000);
    send_all(&mut s, conn, &data);
    // Info is answered on another session, maybe before devd has read the
    // Send: wait (bounded) until it counts the bytes as sent.
    let mut e = entry(&d, conn);
    assert!(wait_until(Duration::from_secs(2), || {
        e = entry(&d, conn);
        num(&e, "bytes_sent") == data.len() as u64
    }));
    assert_eq!(state(&e), "ESTABLISHED");
    assert!(
        num(&e, "in_flight") > 0,
        "nothing in flight right after the Send: {e}"
    );
    assert!(num(&e, "unacked") > 0, "{e}");
    for k in [
        "local_port",
        "remote_port",
        "bytes_recv",
        "segs_sent",
        "segs_recv",
        "cong_win",
        "ssthresh",
        "srtt_ms",
        "rttvar_ms",
        "ooo_buf",
        "peer_recv_win",
        "recv_win",
        "retransmits",
        "fast_retx",
        "sack_recv",
        "sack_sent",
        "dup_acks",
    ] {
        num(&e, k);
    }
    assert!(e.get("remote_addr").and_then(Value::as_str).is_some());
    assert!(e.get("in_recovery").and_then(Value::as_bool).is_some());
    assert!(
        wait_until(Duration::from_secs(3), || {
            e = entry(&d, conn);
            num(&e, "in_flight") == 0 && num(&e, "unacked") == 0
        }),
        "still in flight: {e}"
    );
    // Delivered: now a Close loses nothing.
    close(&mut s, conn);
    assert_eq!(reader.join().unwrap(), data);
    e = entry(&d, conn);
    assert_eq!(state(&e), "TIME_WAIT", "a closed connection stays listed");
}

#[test]
fn a_close_right_after_accept_is_lost_and_the_dialer_waits() {
    netns();
    let dir = TempDir::new("lossy-accept");
    let d = devd(&dir, &["--lossy-close", "200"]);
    let (mut s, conn, mut tcp) = accepted(&d, Duration::ZERO);
    close(&mut s, conn);
    for _ in 0..2 {
        assert_eq!(s.frame(), (cmd::CLOSE_OK, conn.to_be_bytes().to_vec()));
    }
    // The real daemon shows an accepted connection ESTABLISHED at once:
    // the window is the dialer's, invisible here.
    tcp.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    let started = Instant::now();
    let mut b = [0u8; 1];
    let r = tcp.read(&mut b);
    assert!(
        matches!(&r, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "the dialer heard of the close after {:?}: {r:?}",
        started.elapsed()
    );

    // The same Close after the window reaches the dialer at once.
    let mut tcp2 = connect(INBOUND);
    let a2 = s.accept();
    thread::sleep(Duration::from_millis(300));
    close(&mut s, a2.conn);
    tcp2.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    assert_eq!(tcp2.read(&mut b).unwrap(), 0, "EOF within 1 s");
}

#[test]
fn without_the_flag_nothing_is_lost_and_conn_list_is_reported() {
    netns();
    let dir = TempDir::new("lossy-off");
    let d = devd(&dir, &[]);
    let (mut s, conn, tcp) = accepted(&d, Duration::ZERO);
    let reader = thread::spawn(move || read_all(tcp));
    let data = pattern(7, FOUR_MIB);
    send_all(&mut s, conn, &data);
    close(&mut s, conn);
    assert!(reader.join().unwrap() == data, "data lost without --lossy-close");
    let e = entry(&d, conn);
    assert_eq!(num(&e, "bytes_sent"), data.len() as u64);
    assert_eq!((num(&e, "in_flight"), num(&e, "unacked")), (0, 0));

    let dir2 = TempDir::new("lossy-nolist");
    let d2 = Devd::start(&dir2, &["--no-conn-list"]);
    let v = info(&d2);
    assert!(v.get("conn_list").is_none(), "{v}");
    assert!(v.get("node_id").is_some());
}

/// The gateway's close poller against devd: waiting for what
/// `conn_list` reports turns the truncated download above into a whole
/// one; devd without `conn_list` gets immediate closes.
#[test]
fn the_close_poller_confirms_delivery_through_devd() {
    use pilot_gateway::closing::{Closer, Mode, Outcome};
    netns();
    let dir = TempDir::new("lossy-closer");
    let d = devd(&dir, &["--lossy-close", "200"]);
    let me = pilot_gateway::sys::user::euid();
    let closer = Closer::start(d.socket.clone(), me, Duration::from_secs(5)).unwrap();
    let (mut s, conn, tcp) = accepted(&d, Duration::from_millis(300));
    let reader = thread::spawn(move || read_all(tcp));
    let data = pattern(23, FOUR_MIB);
    send_all(&mut s, conn, &data);
    let t = Instant::now();
    assert_eq!(
        closer.wait_delivered(conn, data.len() as u64, t),
        Outcome::Delivered
    );
    close(&mut s, conn);
    assert!(reader.join().unwrap() == data, "the confirmed close lost data");
    for _ in 0..2 {
        assert_eq!(s.frame(), (cmd::CLOSE_OK, conn.to_be_bytes().to_vec()));
    }
    assert_eq!(closer.mode(), Mode::Confirmed);

    // Fail fast: a Close that waited for the dialer reaches it.
    let mut tcp = connect(INBOUND);
    let a = s.accept();
    let accepted_at = Instant::now();
    closer.wait_established(a.conn, accepted_at);
    close(&mut s, a.conn);
    tcp.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(tcp.read(&mut b).unwrap(), 0, "EOF within 1 s of the wait");
    assert!(accepted_at.elapsed() < Duration::from_secs(1));

    let dir2 = TempDir::new("lossy-closer-old");
    let d2 = Devd::start(&dir2, &["--no-conn-list"]);
    let old = Closer::start(d2.socket.clone(), me, Duration::from_secs(5)).unwrap();
    assert!(wait_until(Duration::from_secs(5), || old.mode() == Mode::Immediate));
    assert_eq!(old.wait_delivered(1, 10, Instant::now()), Outcome::Immediate);
}

/// `status` shows how closes are sent, and `--close-linger`.
#[test]
fn status_shows_the_close_mode() {
    netns();
    for (extra, mode) in [(&[][..], "confirmed"), (&["--no-conn-list"][..], "immediate")] {
        let dir = TempDir::new("lossy-status");
        let d = Devd::start(&dir, extra);
        let gw = Gw::new(&dir, &d.socket);
        let _p = gw.foreground(&dir, &["--ports", "8080", "--close-linger", "2.5", A4]);
        let mut st = status(&gw);
        assert!(
            wait_until(Duration::from_secs(5), || {
                st = status(&gw);
                st.get("close_mode").and_then(Value::as_str) == Some(mode)
            }),
            "{st}"
        );
        assert_eq!(st.get("close_linger_secs").and_then(Value::as_f64), Some(2.5));
        assert_eq!(n(&st, "close_unconfirmed"), 0);
        assert!(gw.ok(&["status"]).contains(&format!("closing: {mode}")));
    }
}
