//! `expose --proxy-protocol` (issue 20 item 4) end to end: the gateway's
//! exposure sends a PROXY protocol v2 header to the service before any
//! data, checked byte by byte against a header built here by hand from
//! the specification (HAProxy's proxy-protocol.txt, section 2.2), and read
//! by a real consumer, nginx (`listen … proxy_protocol`), run as a
//! separate process in the test's network namespace.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;
use pilot_gateway::json::Value;

/// devd turns connections here into inbound ones from P9 to pilot port 80.
const IN80: &str = "127.0.0.1:7100";
const P9: &str = "0:0000.0000.0009";

fn devd(dir: &TempDir) -> Devd {
    Devd::start(dir, &["--inbound", "127.0.0.1:7100=0:0000.0000.0009:80"])
}

/// The header expected for a connection from P9 (pilot port `from`) to
/// pilot port 80 of devd's node 0:0000.0000.0001, written out field by
/// field.
fn expected(from: u16) -> Vec<u8> {
    let mut h = vec![
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, // version 2, PROXY
        0x21, // AF_INET6, STREAM
        0x00, 55, // 16 + 16 + 2 + 2 addresses, + TLV 3 + 16
    ];
    // Source fd70:696c:6f74::9 (the peer), destination fd70:696c:6f74::1 (us).
    for node in [9u8, 1] {
        h.extend_from_slice(&[
            0xfd, 0x70, 0x69, 0x6c, 0x6f, 0x74, 0, 0, 0, 0, 0, 0, 0, 0, 0, node,
        ]);
    }
    h.extend_from_slice(&from.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h.extend_from_slice(&[0xE0, 0x00, 16]);
    h.extend_from_slice(P9.as_bytes());
    h
}

/// Accepts `n` connections on 8000; for each, sends back everything read
/// before the client's "END" marker (the header plus the client's data).
fn recording_service(n: usize) -> mpsc::Receiver<Vec<u8>> {
    let l = TcpListener::bind("127.0.0.1:8000").unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for _ in 0..n {
            let Ok((mut t, _)) = l.accept() else { return };
            t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(b"END") {
                match t.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                }
            }
            let _ = t.write_all(b"ok");
            let _ = tx.send(got);
        }
    });
    rx
}

fn exposure_row(gw: &Gw) -> Value {
    gw.data(&["list"])
        .get("exposures")
        .and_then(Value::as_array)
        .and_then(|r| r.first().cloned())
        .expect("an exposure")
}

#[test]
fn the_service_reads_the_proxy_v2_header_first_byte_by_byte() {
    netns();
    let dir = TempDir::new("proxy-bytes");
    let got = recording_service(2);
    let d = devd(&dir);
    let gw = Gw::new(&dir, &d.socket);
    gw.data(&["start", "--expose", "80=8000,proxy"]);
    let row = exposure_row(&gw);
    assert_eq!(
        row.get("proxy_protocol").and_then(Value::as_bool),
        Some(true),
        "{row}"
    );
    assert!(gw.ok(&["list"]).contains("proxy-protocol"));
    // devd numbers its inbound connections' ports from 49152 up.
    for from in [49152u16, 49153] {
        let mut c = connect(IN80);
        c.write_all(b"hello END").unwrap();
        let mut reply = [0u8; 2];
        c.read_exact(&mut reply).unwrap();
        let seen = got.recv_timeout(Duration::from_secs(10)).unwrap();
        let want = expected(from);
        assert!(seen.len() >= want.len(), "only {} bytes: {seen:02x?}", seen.len());
        for (i, (a, b)) in seen.iter().zip(&want).enumerate() {
            assert_eq!(a, b, "byte {i} of the header: {seen:02x?}");
        }
        assert_eq!(
            &seen[want.len()..],
            b"hello END",
            "the data follows the header, intact"
        );
    }

    // Without the option: the data only. `expose` takes it as a flag.
    gw.ok(&["unexpose", "80"]);
    let plain = recording_service_on_next();
    gw.data(&["expose", "80", "8001"]);
    assert_eq!(
        exposure_row(&gw).get("proxy_protocol").and_then(Value::as_bool),
        Some(false)
    );
    let mut c = connect(IN80);
    c.write_all(b"plain END").unwrap();
    assert_eq!(plain.recv_timeout(Duration::from_secs(10)).unwrap(), b"plain END");
    gw.ok(&["unexpose", "80"]);
    let e = gw.data(&["expose", "80", "8000", "--proxy-protocol"]);
    assert_eq!(
        e.get("proxy_protocol").and_then(Value::as_bool),
        Some(true),
        "{e}"
    );
    assert!(std::fs::read_to_string(gw.state.join("state.json"))
        .unwrap()
        .contains("\"proxy_protocol\":true"));
}

/// A plain recording service on 8001.
fn recording_service_on_next() -> mpsc::Receiver<Vec<u8>> {
    let l = TcpListener::bind("127.0.0.1:8001").unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        if let Ok((mut t, _)) = l.accept() {
            t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(b"END") {
                match t.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                }
            }
            let _ = tx.send(got);
        }
    });
    rx
}

fn nginx() -> Option<&'static str> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// nginx's configuration: one server that reads the PROXY header and
/// answers with the source address it carried, logging it too.
fn nginx_conf(prefix: &Path) -> String {
    let p = prefix.display();
    format!(
        "daemon off;
master_process off;
pid {p}/nginx.pid;
error_log stderr;
events {{ worker_connections 64; }}
http {{
    log_format pp '$proxy_protocol_addr $proxy_protocol_port \"$request\" $status';
    access_log {p}/access.log pp;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    default_type text/plain;
    server {{
        listen 127.0.0.1:8000 proxy_protocol;
        location / {{ return 200 \"$proxy_protocol_addr\\n\"; }}
    }}
}}
"
    )
}

#[test]
fn nginx_reads_the_callers_pilot_address_from_the_header() {
    let Some(bin) = nginx() else {
        eprintln!(
            "\n\n*** SKIPPED: nginx is not installed (scripts/deps.sh test installs nginx-light); \
             the PROXY header was NOT checked against a real consumer ***\n"
        );
        return;
    };
    netns();
    let dir = TempDir::new("proxy-nginx");
    let prefix = dir.path("nginx");
    std::fs::create_dir_all(&prefix).unwrap();
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&prefix)).unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg("stderr")
        .stdout(Stdio::null());
    let ng = Proc::spawn(&mut cmd, dir.path("nginx.err"));
    assert!(
        wait_until(Duration::from_secs(10), || TcpStream::connect("127.0.0.1:8000")
            .is_ok()),
        "nginx did not come up: {}",
        ng.stderr()
    );
    let d = devd(&dir);
    let gw = Gw::new(&dir, &d.socket);
    gw.data(&["start", "--expose", "80=8000,proxy"]);
    let resp = http_get(IN80, "/who");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}\nnginx: {}", ng.stderr());
    assert!(resp.ends_with("fd70:696c:6f74::9\n"), "{resp}");
    let log = prefix.join("access.log");
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("fd70:696c:6f74::9 49152 \"GET /who"))
        }),
        "access log: {:?}",
        std::fs::read_to_string(&log)
    );
    drop(ng);
}
