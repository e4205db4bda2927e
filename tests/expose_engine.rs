//! The exposure engine (src/expose.rs) against pilot-devd: inbound
//! connections arrive through `--inbound`, reach a local service through
//! the engine, and go back byte-exact.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use pilot_gateway::address::PilotAddr;
use pilot_gateway::daemon;
use pilot_gateway::engine::Ending;
use pilot_gateway::error::Code;
use pilot_gateway::expose::{self, Ended, Exposure, Options, State};
use pilot_gateway::ipc::{self, cmd, FrameReader};

const P9: &str = "0:0000.0000.0009";
const P8: &str = "0:0000.0000.0008";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn devd(dir: &TempDir, extra: &[&str]) -> Devd {
    let mut args = vec!["--inbound", "127.0.0.1:7100=0:0000.0000.0009:80"];
    args.extend_from_slice(extra);
    Devd::start(dir, &args)
}

fn expose(d: &Devd, port: u16, target: &str, opts: Options) -> Exposure {
    Exposure::start(&d.socket, port, addr(target), opts).unwrap()
}

#[test]
fn sixty_four_mib_both_ways_byte_exact() {
    netns();
    let dir = TempDir::new("expose-64");
    let _src = Service::start(8000, source);
    let _snk = Service::start(8001, verify);
    let d = devd(&dir, &["--inbound", "127.0.0.1:7101=0:0000.0000.0009:81"]);
    let down = expose(&d, 80, "127.0.0.1:8000", Options::default());
    let up = expose(&d, 81, "127.0.0.1:8001", Options::default());
    const LEN: usize = 64 << 20;
    let uploader = thread::spawn(|| upload_whole("127.0.0.1:7101", LEN));
    let (got, hash) = download("127.0.0.1:7100", LEN);
    assert_eq!((got, hash), (LEN, expected_download(LEN)), "download byte-exact");
    let (count, first_diff) = uploader.join().unwrap();
    assert_eq!((count, first_diff), (LEN as u64, u64::MAX), "upload byte-exact");
    assert!(wait_until(Duration::from_secs(10), || {
        down.counters().active == 0 && up.counters().active == 0
    }));
    let (dc, uc) = (down.counters(), up.counters());
    assert_eq!((dc.total, uc.total), (1, 1));
    assert_eq!(dc.bytes_out, LEN as u64);
    assert_eq!(uc.bytes_in, LEN as u64 + 8);
    assert_eq!((dc.slow_resets, uc.slow_resets, dc.refused), (0, 0, 0));
}

#[test]
fn fifty_connections_one_slow_reader_is_reset_the_rest_complete() {
    netns();
    let dir = TempDir::new("expose-slow");
    // The service: its first connection never reads; the others echo.
    let svc = NeverReadsFirst::start(8000, 50);
    let d = devd(&dir, &[]);
    let ex = expose(&d, 80, "127.0.0.1:8000", Options::default());
    // Pours data at the slow one until the engine resets it (bounded).
    let pouring = pour("127.0.0.1:7100");
    assert!(wait_until(Duration::from_secs(10), || svc.accepted() == 1));
    echoes_byte_exact("127.0.0.1:7100", 49);
    assert!(
        wait_until(Duration::from_secs(60), || ex.counters().slow_resets == 1),
        "the slow reader was not reset: {:?}",
        ex.counters()
    );
    let mut held = svc.take_held();
    assert!(
        sees_reset(&mut held, Duration::from_secs(10)),
        "the slow service side sees a reset"
    );
    pouring.join().unwrap();
    assert!(wait_until(Duration::from_secs(10), || ex.counters().active == 0));
    let c = ex.counters();
    assert_eq!((c.total, c.slow_resets, c.connect_failures), (50, 1, 0));
    assert_eq!(ex.state(), State::Bound);
}

#[test]
fn allow_list_refuses_unlisted_and_admits_listed() {
    netns();
    let dir = TempDir::new("expose-allow");
    let _svc = Service::start(8000, echo);
    let d = devd(
        &dir,
        &[
            "--inbound",
            "127.0.0.1:7101=0:0000.0000.0008:80",
            "--host",
            "lab-a=0:0000.0000.0009",
        ],
    );
    let entries = ["lab-a".to_string(), "0:0000.0000.0007".to_string()];
    // The gateway's resolver (the daemon's uid checked on its connect).
    let resolve = |e: &[String]| daemon::resolve_peers(&d.socket, e, Some(pilot_gateway::sys::user::euid()));
    let allow: HashSet<PilotAddr> = resolve(&entries).unwrap().into_iter().map(|(a, _)| a).collect();
    let want: HashSet<PilotAddr> = [P9.parse().unwrap(), "0:0000.0000.0007".parse().unwrap()].into();
    assert_eq!(allow, want);
    let err = resolve(&["nosuch".to_string()]).unwrap_err();
    assert_eq!(err.code, Code::NotFound);

    let ended: Arc<Mutex<Vec<Ended>>> = Arc::default();
    let e2 = ended.clone();
    let opts = Options {
        allow: Some(allow),
        on_end: Some(Arc::new(move |e: &Ended| e2.lock().unwrap().push(e.clone()))),
        ..Options::default()
    };
    let ex = expose(&d, 80, "127.0.0.1:8000", opts);
    // Node 8 is not listed: closed at once, without reaching the service.
    let mut s = connect("127.0.0.1:7101");
    let _ = s.write_all(b"hello");
    let mut buf = [0u8; 5];
    assert!(
        !matches!(s.read(&mut buf), Ok(n) if n > 0),
        "an unlisted peer got data"
    );
    assert!(short_exchange("127.0.0.1:7100"), "the listed peer is admitted");
    assert!(wait_until(Duration::from_secs(10), || ex.counters().active == 0));
    let c = ex.counters();
    assert_eq!((c.refused, c.total), (1, 1));
    let ended = ended.lock().unwrap();
    let refused: Vec<_> = ended
        .iter()
        .filter(|e| matches!(e.outcome, Ending::Refused(_)))
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].peer, P8.parse().unwrap());
    assert!(ended
        .iter()
        .any(|e| e.outcome == Ending::Ok && e.peer == P9.parse().unwrap() && e.bytes_in == 5));
}

#[test]
fn a_bound_port_is_port_in_use_and_targets_are_checked() {
    netns();
    let dir = TempDir::new("expose-inuse");
    let d = devd(&dir, &[]);
    let _ex = expose(&d, 80, "127.0.0.1:8000", Options::default());
    for port in [80, 7, 1001] {
        let err = Exposure::start(&d.socket, port, addr("127.0.0.1:8000"), Options::default())
            .err()
            .unwrap();
        assert_eq!(err.code, Code::PortInUse, "port {port}: {err:?}");
        assert!(err.message.contains("already bound"), "{}", err.message);
    }
    for bad in [
        "0.0.0.0:8000",
        "[::ffff:0.0.0.0]:8000",
        "[::]:8000",
        "127.0.0.1:0",
        "192.0.2.1:80",
        "[::ffff:192.0.2.1]:80",
        "[2001:db8::1]:80",
    ] {
        let err = Exposure::start(&d.socket, 81, addr(bad), Options::default())
            .err()
            .unwrap();
        assert_eq!(err.code, Code::BadTarget, "{bad}");
    }
    assert!(expose::check_target(addr("192.0.2.1:80"), true, None).is_ok());
    assert!(expose::check_target(addr("[::ffff:127.0.0.1]:80"), false, None).is_ok());
    // The gateway's own subnet is refused even with --allow-remote-target,
    // except 127.0.0.1 (never mapped, also in a 127.0.0.0/8 subnet).
    let own = Some("10.4.0.0/16".parse().unwrap());
    for bad in ["10.4.0.1:9090", "[::ffff:10.4.0.1]:9090"] {
        let err = expose::check_target(addr(bad), true, own).unwrap_err();
        assert_eq!(err.code, Code::BadTarget, "{bad}");
    }
    let own = Some("127.0.0.0/8".parse().unwrap());
    assert!(expose::check_target(addr("127.0.0.2:80"), false, own).is_err());
    assert!(expose::check_target(addr("127.0.0.1:80"), false, own).is_ok());
    // Another gateway's mapped address (a loopback alias labelled lo:pgw…)
    // is refused too, even with --allow-remote-target; an unlabelled
    // alias is an ordinary address of this host.
    run_ok(
        "ip",
        &[
            "addr",
            "add",
            "10.9.0.5/32",
            "dev",
            "lo",
            "label",
            "lo:pgwdeadbeef",
        ],
    );
    run_ok("ip", &["addr", "add", "10.9.0.6/32", "dev", "lo"]);
    for allow_remote in [false, true] {
        let err = expose::check_target(addr("10.9.0.5:8000"), allow_remote, None).unwrap_err();
        assert_eq!(err.code, Code::BadTarget);
        assert!(err.message.contains("lo:pgwdeadbeef"), "{}", err.message);
    }
    let err = Exposure::start(&d.socket, 81, addr("[::ffff:10.9.0.5]:8000"), Options::default())
        .err()
        .unwrap();
    assert_eq!(err.code, Code::BadTarget);
    assert!(expose::check_target(addr("10.9.0.6:8000"), false, None).is_ok());
    let gone = dir.path("nothing.sock");
    let err = Exposure::start(&gone, 81, addr("127.0.0.1:8000"), Options::default())
        .err()
        .unwrap();
    assert_eq!(err.code, Code::DaemonUnreachable);
}

#[test]
fn a_daemon_restart_rebinds() {
    netns();
    let dir = TempDir::new("expose-restart");
    let _svc = Service::start(8000, echo);
    let d = devd(&dir, &[]);
    let ex = expose(&d, 80, "127.0.0.1:8000", Options::default());
    assert!(short_exchange("127.0.0.1:7100"));
    drop(d); // killed and reaped
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            ex.state(),
            State::Rebinding(_)
        )),
        "{:?}",
        ex.state()
    );
    let d = devd(&dir, &[]);
    assert!(
        wait_until(Duration::from_secs(20), || ex.state() == State::Bound),
        "{:?}",
        ex.state()
    );
    assert_eq!(ex.counters().rebinds, 1);
    assert!(short_exchange("127.0.0.1:7100"), "new inbound connections work");
    assert!(!try_bind(&d.socket, 80).unwrap(), "the port is ours again");
}

#[test]
fn stop_frees_the_port() {
    netns();
    let dir = TempDir::new("expose-stop");
    let _svc = Service::start(8000, echo);
    let d = devd(&dir, &[]);
    let mut ex = expose(&d, 80, "127.0.0.1:8000", Options::default());
    assert!(short_exchange("127.0.0.1:7100"));
    // A live connection is cut by stop.
    let mut live = connect("127.0.0.1:7100");
    live.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    live.read_exact(&mut b).unwrap();
    assert!(!try_bind(&d.socket, 80).unwrap());
    ex.stop(Duration::from_secs(5));
    assert_eq!(ex.state(), State::Stopped);
    assert_eq!(ex.counters().active, 0);
    assert!(can_bind(&d.socket, 80), "another program can bind the port now");
    let mut rest = Vec::new();
    let _ = live.read_to_end(&mut rest);
}

/// On a daemon with Unbind, a drain releases the port at once: another
/// program Binds it while the live connection goes on; stop then leaves
/// that program's Bind alone.
#[test]
fn a_drain_releases_the_port_with_unbind_and_live_connections_go_on() {
    netns();
    let dir = TempDir::new("expose-unbind");
    let _svc = Service::start(8000, echo);
    let d = devd(&dir, &["--unbind"]);
    let mut ex = expose(&d, 80, "127.0.0.1:8000", Options::default());
    let mut live = connect("127.0.0.1:7100");
    assert!(still_echoes(&mut live));
    ex.stop_admitting();
    assert!(!ex.is_admitting());
    // UnbindOK came before stop_admitting returned: no polling.
    let other = hold_port(&d.socket, 80).expect("another program Binds the port at once");
    assert!(
        still_echoes(&mut live),
        "the live connection goes on after Unbind"
    );
    assert_eq!(ex.counters().active, 1);
    assert!(ex.release(), "released stays released (no second Unbind)");
    ex.stop(Duration::from_secs(5));
    assert_eq!(ex.state(), State::Stopped);
    assert!(
        !try_bind(&d.socket, 80).unwrap(),
        "the other program still holds the port"
    );
    drop(other);
}

/// On a daemon with Unbind, stop frees the port before it returns, so a
/// Bind right after it (a changed exposure restarting) succeeds at once.
#[test]
fn stop_with_unbind_frees_the_port_before_returning() {
    netns();
    let dir = TempDir::new("expose-unbind-stop");
    let _svc = Service::start(8000, echo);
    let d = devd(&dir, &["--unbind"]);
    for _ in 0..3 {
        let mut ex = expose(&d, 80, "127.0.0.1:8000", Options::default());
        assert!(short_exchange("127.0.0.1:7100"));
        ex.stop(Duration::from_secs(5));
        let again = Exposure::start(&d.socket, 80, addr("127.0.0.1:8000"), Options::default());
        let mut again = again.expect("a Bind right after stop succeeds");
        assert!(short_exchange("127.0.0.1:7100"));
        again.stop(Duration::from_secs(5));
    }
}

/// A daemon without Unbind (Feb 2026) answers it `unknown command`: the
/// session goes on, the drain refuses Accepts as before, and the port is
/// freed when stop closes the session.
#[test]
fn without_unbind_a_drain_holds_the_port_until_stop() {
    netns();
    let dir = TempDir::new("expose-no-unbind");
    let _svc = Service::start(8000, echo);
    let d = devd(&dir, &[]);
    let mut ex = expose(&d, 80, "127.0.0.1:8000", Options::default());
    let mut live = connect("127.0.0.1:7100");
    assert!(still_echoes(&mut live));
    ex.stop_admitting();
    assert!(!ex.release(), "no Unbind on this daemon");
    assert!(
        still_echoes(&mut live),
        "the unknown command did not end the session"
    );
    assert!(hold_port(&d.socket, 80).is_none(), "the port is still ours");
    assert!(
        !short_exchange("127.0.0.1:7100"),
        "new connections are refused while draining"
    );
    assert!(wait_until(Duration::from_secs(5), || ex
        .counters()
        .refused_draining
        == 1));
    assert_eq!(ex.state(), State::Bound);
    ex.stop(Duration::from_secs(5));
    assert_eq!(ex.state(), State::Stopped);
    assert!(
        can_bind(&d.socket, 80),
        "the port is free once the session closed"
    );
    let mut rest = Vec::new();
    let _ = live.read_to_end(&mut rest);
}

/// An Accept for a port this session did not Bind is a protocol error:
/// that connection is closed unserved, and the session goes on.
#[test]
fn an_accept_for_another_port_is_closed_unserved() {
    let dir = TempDir::new("expose-wrongport");
    let path = dir.path("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let fake = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = FrameReader::new(s, 64 * 1024);
        assert_eq!(r.read_frame().unwrap().0, cmd::BIND);
        w.write_all(&ipc::encode(cmd::BIND_OK, &[&80u16.to_be_bytes()]))
            .unwrap();
        let from = [0u8, 0, 0, 0, 0, 9];
        let accept = |port: u16, conn: u32| {
            ipc::encode(
                cmd::ACCEPT,
                &[
                    &port.to_be_bytes(),
                    &conn.to_be_bytes(),
                    &from,
                    &49152u16.to_be_bytes(),
                ],
            )
        };
        w.write_all(&accept(81, 5)).unwrap();
        let (c, range) = r.read_frame().unwrap();
        let closed = (c, r.buffer()[range].to_vec());
        w.write_all(&ipc::encode(cmd::CLOSE_OK, &[&5u32.to_be_bytes()]))
            .unwrap();
        closed
    });
    let ex = Exposure::start(&path, 80, addr("127.0.0.1:8000"), Options::default()).unwrap();
    let (c, payload) = fake.join().unwrap();
    assert_eq!((c, payload), (cmd::CLOSE, 5u32.to_be_bytes().to_vec()));
    let n = ex.counters();
    assert_eq!((n.total, n.active, n.connect_failures), (0, 0, 0));
}

/// A peer that never reads blocks the daemon's inline Send, and with it
/// the whole session (a protocol limitation: no per-connection flow
/// control). The engine gives the session up after its write deadline,
/// counts the stall, names the culprit, and re-binds as soon as the
/// daemon lets go of the port; the port then serves again.
#[test]
fn a_stalled_session_is_counted_and_the_port_rebound() {
    netns();
    let dir = TempDir::new("expose-stall");
    let _svc = Service::start(8000, echo_or_flood);
    let d = devd(&dir, &[]);
    let ex = expose(&d, 80, "127.0.0.1:8000", Options::default());
    assert!(short_exchange("127.0.0.1:7100"));
    let mut hog = connect("127.0.0.1:7100");
    hog.write_all(b"BIG").unwrap();
    let stalled = wait_until(Duration::from_secs(40), || ex.counters().session_stalls == 1);
    assert!(stalled, "{:?} {:?}", ex.counters(), ex.state());
    // The daemon frees the port once its Send to the hog fails.
    drop(hog);
    let back = wait_until(Duration::from_secs(20), || {
        ex.state() == State::Bound && ex.counters().rebinds == 1
    });
    assert!(back, "{:?} {:?}", ex.counters(), ex.state());
    assert!(short_exchange("127.0.0.1:7100"));
}

/// Service: says "tick" every 0.3 s until it cannot (at most a minute).
fn ticker(mut c: TcpStream) {
    for _ in 0..200 {
        if c.write_all(b"tick\n").is_err() {
            return;
        }
        thread::sleep(Duration::from_millis(300));
    }
}

/// Service: says "tick" once, then neither reads nor closes for 30 s.
fn ticks_once_then_idles(mut c: TcpStream) {
    let _ = c.write_all(b"tick\n");
    thread::sleep(Duration::from_secs(30));
}

#[test]
fn after_the_peer_closes_a_service_that_goes_on_is_let_go_within_linger() {
    netns();
    let dir = TempDir::new("expose-linger");
    let _talker = Service::start(8000, ticker);
    let _idler = Service::start(8001, ticks_once_then_idles);
    let d = devd(&dir, &["--inbound", "127.0.0.1:7101=0:0000.0000.0009:81"]);
    let talks = expose(&d, 80, "127.0.0.1:8000", Options::default());
    let idles = expose(&d, 81, "127.0.0.1:8001", Options::default());
    for to in ["127.0.0.1:7100", "127.0.0.1:7101"] {
        let mut peer = connect(to);
        let mut tick = [0u8; 5];
        peer.read_exact(&mut tick).unwrap();
        assert_eq!(&tick, b"tick\n");
    } // the peers close: CloseOK for both
      // The services' LINGER (2 s) from the CloseOK, plus a margin; before
      // the fix both stayed live (and held their slots) for good.
    for ex in [&talks, &idles] {
        assert!(
            wait_until(Duration::from_secs(8), || ex.counters().active == 0),
            "still live after the peer closed: {:?}",
            ex.counters()
        );
        assert_eq!((ex.counters().total, ex.counters().slow_resets), (1, 0));
    }
}

/// Fixes the receive buffer of the listener's connections at a few KiB
/// (no autotuning), so the kernel holds little of what a slow service
/// has not read yet.
fn small_receive_buffer(l: &std::net::TcpListener) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 8192;
    // SAFETY: a valid socket and a c_int option of the size given.
    let r = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
}

#[test]
fn a_service_that_reads_slowly_is_paced_not_reset() {
    netns();
    // Loopback's 64 KiB segments let the kernel buffer megabytes towards
    // the service (its send buffer grows with them): an Ethernet MTU keeps
    // that small, so the queue's bound is what the slow service meets.
    run_ok("ip", &["link", "set", "lo", "mtu", "1500"]);
    let dir = TempDir::new("expose-slowread");
    let svc = std::net::TcpListener::bind("127.0.0.1:8000").unwrap();
    small_receive_buffer(&svc);
    thread::spawn(move || {
        if let Ok((c, _)) = svc.accept() {
            // About 50 KiB/s: slower than a queue chunk of 64 KiB per 1 s stall period.
            verify_paced(c, 4096, Duration::from_millis(80));
        }
    });
    let d = devd(&dir, &[]);
    // A small queue, so the bound is reached at once and pacing decides.
    let opts = Options {
        queue_bytes: 64 * 1024,
        ..Options::default()
    };
    let ex = expose(&d, 80, "127.0.0.1:8000", opts);
    const LEN: usize = 640 * 1024;
    let (count, first_diff) = upload_whole("127.0.0.1:7100", LEN);
    assert_eq!((count, first_diff), (LEN as u64, u64::MAX), "byte-exact");
    assert!(wait_until(Duration::from_secs(10), || ex.counters().active == 0));
    let c = ex.counters();
    assert_eq!((c.total, c.slow_resets, c.bytes_in), (1, 0, LEN as u64 + 8));
}
