//! The data path end to end: client → pilot-gateway → pilot-devd → service,
//! each test in its own network namespace.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::*;

/// devd routing A4 to local services, a foreground gateway mapping `addrs`.
fn setup(dir: &TempDir, devd_args: &[&str], gw_args: &[&str]) -> (Devd, Gw, Proc) {
    let mut args = vec!["--route", "0:0000.0000.0004=127.0.0.1"];
    args.extend_from_slice(devd_args);
    let devd = Devd::start(dir, &args);
    let gw = Gw::new(dir, &devd.socket);
    let p = gw.foreground(dir, gw_args);
    (devd, gw, p)
}

#[test]
fn http_get_through_the_gateway() {
    netns();
    let dir = TempDir::new("http");
    let _svc = Service::start(8080, http);
    let (_devd, _gw, _p) = setup(&dir, &[], &["--ports", "8080,9999", A4]);
    let resp = http_get("10.4.0.1:8080", "/hello");
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    assert!(
        resp.contains("hello from the agent: GET /hello HTTP/1.1"),
        "{resp}"
    );
    // Real curl, as a user would (when installed).
    if let Ok(out) = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "http://10.4.0.1:8080/curl"])
        .output()
    {
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("GET /curl"),
            "{out:?}"
        );
    }
}

#[test]
fn bulk_transfers_are_byte_exact_both_ways() {
    netns();
    let dir = TempDir::new("bulk");
    let _src = Service::start(9000, source);
    let _snk = Service::start(9001, sink);
    let (_devd, _gw, _p) = setup(&dir, &[], &["--ports", "9000,9001", A4]);
    for len in [1 << 20, 64 << 20] {
        let (got, hash) = download("10.4.0.1:9000", len);
        assert_eq!(got, len, "download length");
        assert_eq!(hash, expected_download(len), "download content");
        let ((count, hash), sent) = upload("10.4.0.1:9001", len, 99);
        assert_eq!(count, len as u64, "upload length");
        assert_eq!(hash, sent, "upload content");
    }
}

#[test]
fn client_half_close_still_receives_the_whole_reply() {
    netns();
    let dir = TempDir::new("halfclose");
    let _svc = Service::start(8080, http);
    let _src = Service::start(9000, source);
    let (_devd, _gw, _p) = setup(&dir, &[], &["--ports", "8080,9000", A4]);
    let mut s = connect("10.4.0.1:8080");
    s.write_all(b"GET /half HTTP/1.0\r\n\r\n").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.contains("GET /half"), "{resp}");
    // A 4 MiB reply after the half-close arrives whole too.
    let mut s = connect("10.4.0.1:9000");
    s.write_all(&(4u64 << 20).to_be_bytes()).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), 4 << 20);
}

#[test]
fn agent_closing_first_gives_data_then_eof() {
    netns();
    let dir = TempDir::new("agentclose");
    // The agent writes a greeting and closes without reading anything.
    let _svc = Service::start(8081, |mut c| {
        let _ = c.write_all(b"bye\n");
    });
    let (_devd, _gw, _p) = setup(&dir, &[], &["--ports", "8081", A4]);
    let mut s = connect("10.4.0.1:8081");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("a clean EOF, not a reset");
    assert_eq!(got, b"bye\n");
}

#[test]
fn failed_dials_reset_at_once_and_spare_other_agents() {
    netns();
    let dir = TempDir::new("faildial");
    let _svc = Service::start(8080, echo);
    // A5 is untrusted, A6 unknown to the daemon.
    let (devd, _gw, _p) = setup(&dir, &["--untrusted", A5], &["--ports", "8080", A4, A5, A6]);
    // A connection to the good agent, open across the failures.
    let mut good = connect("10.4.0.1:8080");
    good.write_all(b"before").unwrap();
    for ip in ["10.4.0.2:8080", "10.4.0.3:8080"] {
        assert!(
            reset_soon(ip, Duration::from_secs(1)),
            "{ip}: expected a reset within a second"
        );
    }
    good.write_all(b" after").unwrap();
    let mut buf = [0u8; 12];
    good.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"before after");
    let log = std::fs::read_to_string(dir.path("gateway.log")).unwrap();
    assert!(log.contains("trust"), "the daemon's reason is logged: {log}");
    assert!(log.contains("registry") || log.contains("resolve"), "{log}");
    drop(devd);
}

/// Whether the slow agent's service has been reached (its dial completed).
static SLOW_REACHED: AtomicBool = AtomicBool::new(false);

fn slow_service(c: std::net::TcpStream) {
    SLOW_REACHED.store(true, Ordering::SeqCst);
    http(c);
}

#[test]
fn a_slow_dial_does_not_delay_other_mappings() {
    netns();
    let dir = TempDir::new("slowdial");
    let _svc = Service::start(8080, http);
    let _slow_svc = Service::start(8090, slow_service);
    let (devd, _gw, _p) = setup(
        &dir,
        &[
            "--route",
            "0:0000.0000.0005:8080=127.0.0.1:8090",
            "--dial-delay",
            "0:0000.0000.0005=3000",
        ],
        &["--ports", "8080", A4, A5],
    );
    let idle = settled_threads(devd.proc.pid());
    let slow = thread::spawn(|| http_get("10.4.0.2:8080", "/slow"));
    // The daemon serves the gateway's session for the slow connection in
    // one thread and its pending dial in another: both exist now.
    assert!(
        wait_until(Duration::from_secs(5), || proc_field(devd.proc.pid(), "Threads:")
            >= idle + 2),
        "the slow dial reached the daemon"
    );
    let fast = http_get("10.4.0.1:8080", "/fast");
    assert!(fast.contains("GET /fast"), "{fast}");
    assert!(
        !SLOW_REACHED.load(Ordering::SeqCst),
        "the slow dial, started first, was still pending when the fast request finished"
    );
    assert!(slow.join().unwrap().contains("GET /slow"));
    assert!(SLOW_REACHED.load(Ordering::SeqCst));
}

#[test]
fn aliases_live_while_running_and_only_ours_are_removed() {
    netns();
    let dir = TempDir::new("alias");
    run_ok("ip", &["addr", "add", "10.4.0.2/32", "dev", "lo"]);
    let _svc = Service::start(8080, http);
    let (_devd, _gw, mut p) = setup(
        &dir,
        &["--route", "0:0000.0000.0005=127.0.0.1"],
        &["--ports", "8080", A4, A5],
    );
    assert!(has_alias("10.4.0.1") && has_alias("10.4.0.2"));
    assert!(
        http_get("10.4.0.2:8080", "/pre").contains("GET /pre"),
        "the existing alias is used"
    );
    p.signal(libc::SIGTERM);
    let status = p
        .wait_exit(Duration::from_secs(20))
        .expect("gateway exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(!has_alias("10.4.0.1"), "our alias is removed");
    assert!(
        has_alias("10.4.0.2"),
        "the alias that existed before is left alone"
    );
}

#[test]
fn two_hundred_concurrent_connections() {
    netns();
    let dir = TempDir::new("concurrent");
    let _svc = Service::start(8080, echo);
    let (_devd, _gw, _p) = setup(&dir, &[], &["--ports", "8080", A4]);
    let workers: Vec<_> = (0..200u64)
        .map(|i| {
            thread::spawn(move || {
                let data = pattern(i + 1, 256 << 10);
                let mut s = connect("10.4.0.1:8080");
                let mut w = s.try_clone().unwrap();
                let d2 = data.clone();
                let writer = thread::spawn(move || w.write_all(&d2).unwrap());
                let mut back = vec![0u8; data.len()];
                s.read_exact(&mut back).unwrap();
                writer.join().unwrap();
                assert!(back == data, "connection {i}: echoed bytes differ");
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}
