//! pilot-devd serves ports as PROTOCOL.md "Serving a port" describes the
//! daemon: Bind, Accept of inbound connections (`--inbound`), their data
//! and endings, checked frame by frame with the crate's own codec.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use common::*;
use pilot_gateway::address::PilotAddr;
use pilot_gateway::ipc::{self, cmd};

const PEER: &str = "0:0000.0000.0009";
const INBOUND: &str = "127.0.0.1:7100";

fn devd(dir: &TempDir, extra: &[&str]) -> Devd {
    let mut args = vec!["--inbound", "127.0.0.1:7100=0:0000.0000.0009:80"];
    args.extend_from_slice(extra);
    Devd::start(dir, &args)
}

#[test]
fn bind_and_ports_already_bound() {
    netns();
    let dir = TempDir::new("devdin-bind");
    let d = devd(&dir, &[]);
    let mut a = Raw::open(&d);
    assert_eq!(a.bind(80), Ok(80));
    // The exact bytes of BindOK, as the Feb-2026 sample shows them.
    a.send(cmd::BIND, &[&8000u16.to_be_bytes()]);
    let (c, p) = a.frame();
    assert_eq!((c, p), (cmd::BIND_OK, vec![0x1f, 0x40]));
    assert_eq!(
        a.bind(80),
        Err("port 80 already bound".into()),
        "same client, twice"
    );
    let mut b = Raw::open(&d);
    assert_eq!(b.bind(80), Err("port 80 already bound".into()));
    for port in [7, 1001, 1002] {
        assert_eq!(b.bind(port), Err(format!("port {port} already bound")));
    }
    assert_eq!(b.bind(81), Ok(81));
}

#[test]
fn accept_then_data_both_ways_then_remote_close() {
    netns();
    let dir = TempDir::new("devdin-data");
    let d = devd(&dir, &[]);
    let mut s = Raw::open(&d);
    assert_eq!(s.bind(80), Ok(80));
    let mut tcp = connect(INBOUND);
    let a = s.accept();
    assert_eq!(a.port, 80);
    assert_eq!(a.remote, PEER.parse::<PilotAddr>().unwrap());
    assert!(a.remote_port >= 49152, "an ephemeral remote port");
    let up = pattern(3, 50_000);
    tcp.write_all(&up).unwrap();
    assert_eq!(s.recv(a.conn, up.len()), up);
    s.send(cmd::SEND, &[&a.conn.to_be_bytes(), b"reply-from-B\n"]);
    let mut got = [0u8; 13];
    tcp.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"reply-from-B\n");
    // The remote side closes: remaining data, then CloseOK unprompted.
    tcp.write_all(b"last words").unwrap();
    tcp.shutdown(Shutdown::Write).unwrap();
    assert_eq!(s.recv(a.conn, 10), b"last words");
    let (c, p) = s.frame();
    assert_eq!((c, p), (cmd::CLOSE_OK, a.conn.to_be_bytes().to_vec()));
    // A second inbound connection gets its own id and the next remote port.
    let _tcp2 = connect(INBOUND);
    let a2 = s.accept();
    assert_ne!(a2.conn, a.conn);
    assert_eq!(a2.remote_port, a.remote_port + 1);
}

#[test]
fn our_close_is_answered_and_closes_the_tcp_side() {
    netns();
    let dir = TempDir::new("devdin-close");
    let d = devd(&dir, &[]);
    let mut s = Raw::open(&d);
    assert_eq!(s.bind(80), Ok(80));
    let mut tcp = connect(INBOUND);
    let a = s.accept();
    s.send(cmd::CLOSE, &[&a.conn.to_be_bytes()]);
    // Two identical CloseOK frames, as the real daemon sends (PROTOCOL.md).
    for _ in 0..2 {
        let (c, p) = s.frame();
        assert_eq!((c, p), (cmd::CLOSE_OK, a.conn.to_be_bytes().to_vec()));
    }
    let mut rest = Vec::new();
    assert_eq!(
        tcp.read_to_end(&mut rest).unwrap(),
        0,
        "the TCP side sees the end"
    );
    // Idempotent: again, and on an unknown id (once each: not live).
    for id in [a.conn, 999_999] {
        s.send(cmd::CLOSE, &[&id.to_be_bytes()]);
        let (c, p) = s.frame();
        assert_eq!((c, p), (cmd::CLOSE_OK, id.to_be_bytes().to_vec()));
    }
}

#[test]
fn nobody_bound_resets_and_session_close_frees_the_port() {
    netns();
    let dir = TempDir::new("devdin-free");
    let d = devd(&dir, &[]);
    assert!(
        reset_soon(INBOUND, Duration::from_secs(5)),
        "nobody bound port 80"
    );
    let mut a = Raw::open(&d);
    assert_eq!(a.bind(80), Ok(80));
    let mut tcp = connect(INBOUND);
    let _ = a.accept();
    drop(a);
    // The session's end closes its connections and frees the port.
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest);
    let mut b = Raw::open(&d);
    let mut bound = Err(String::new());
    assert!(
        wait_until(Duration::from_secs(5), || {
            bound = b.bind(80);
            bound.is_ok()
        }),
        "port 80 not freed: {bound:?}"
    );
    let _tcp = connect(INBOUND);
    assert_eq!(b.accept().port, 80, "inbound now reaches the new owner");
}

#[test]
fn unbind_is_unknown_unless_enabled() {
    netns();
    let dir = TempDir::new("devdin-unbind");
    let d = devd(&dir, &[]);
    let mut s = Raw::open(&d);
    assert_eq!(s.bind(80), Ok(80));
    s.send(cmd::UNBIND, &[&80u16.to_be_bytes()]);
    let (c, p) = s.frame();
    assert_eq!(
        (c, ipc::error_text(&p).as_str()),
        (cmd::ERROR, "unknown command: 0x37")
    );

    let dir2 = TempDir::new("devdin-unbind2");
    let d2 = Devd::start(&dir2, &["--unbind"]);
    let mut s = Raw::open(&d2);
    assert_eq!(s.bind(8000), Ok(8000));
    s.send(cmd::UNBIND, &[&8000u16.to_be_bytes()]);
    let (c, p) = s.frame();
    assert_eq!((c, p), (cmd::UNBIND_OK, vec![0x1f, 0x40]));
    s.send(cmd::UNBIND, &[&8000u16.to_be_bytes()]);
    let (c, p) = s.frame();
    assert_eq!(
        (c, ipc::error_text(&p).as_str()),
        (cmd::ERROR, "unbind: port is not owned by this client")
    );
    let mut other = Raw::open(&d2);
    assert_eq!(other.bind(8000), Ok(8000), "an unbound port is free again");
}

#[test]
fn a_client_that_does_not_drain_is_dropped() {
    netns();
    let dir = TempDir::new("devdin-drain");
    let d = devd(&dir, &[]);
    let mut s = Raw::open(&d);
    assert_eq!(s.bind(80), Ok(80));
    let tcp = connect(INBOUND);
    let _ = s.accept();
    // Pour data in and never read the session: after the 10 s write
    // deadline devd drops the client, which ends the TCP side too.
    let writer = std::thread::spawn(move || {
        let mut tcp = tcp;
        let chunk = vec![0u8; 65536];
        for _ in 0..4096 {
            if tcp.write_all(&chunk).is_err() {
                return true;
            }
        }
        false
    });
    assert!(writer.join().unwrap(), "devd never dropped the client");
    assert!(d.log().contains("did not read"), "{}", d.log());
}
