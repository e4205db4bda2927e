//! pilot-devd speaks the daemon's IPC protocol as PROTOCOL.md describes
//! it: checked here frame by frame with the crate's own client.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::*;
use pilot_gateway::address::PilotAddr;
use pilot_gateway::ipc::{self, cmd, FrameReader, IpcError, Session};
use pilot_gateway::json::Value;

fn a4() -> PilotAddr {
    A4.parse().unwrap()
}

fn session(d: &Devd) -> Session {
    let mut s = Session::connect_within(&d.socket, Duration::from_secs(10), None).unwrap();
    s.set_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// A data session as the relay opens one (its own Dial frame, then frames
/// both ways), where `Session` is the control client.
struct Raw {
    r: FrameReader<UnixStream>,
    w: UnixStream,
}

impl Raw {
    fn open(d: &Devd) -> Raw {
        let s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            w: s.try_clone().unwrap(),
            r: FrameReader::new(s, 64 * 1024),
        }
    }

    fn send(&mut self, command: u8, parts: &[&[u8]]) {
        self.w.write_all(&ipc::encode(command, parts)).unwrap();
    }

    fn frame(&mut self) -> (u8, Vec<u8>) {
        let (c, range) = self.r.read_frame().unwrap();
        (c, self.r.buffer()[range].to_vec())
    }

    fn dial(&mut self, addr: PilotAddr, port: u16) -> Result<u32, IpcError> {
        self.send(cmd::DIAL, &[&addr.to_wire(), &port.to_be_bytes()]);
        let (c, payload) = self.frame();
        ipc::dial_reply(c, &payload)
    }
}

fn routes(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec![
        "--route",
        "0:0000.0000.0004=127.0.0.1",
        "--host",
        "lab-b=0:0000.0000.0005",
    ];
    v.extend_from_slice(extra);
    v
}

/// Reads frames until `want`, collecting Recv data; returns (data, frames).
fn read_until(r: &mut FrameReader<UnixStream>, want: u8) -> (Vec<u8>, usize) {
    let mut data = Vec::new();
    for n in 0..100_000 {
        let (c, range) = r.read_frame().unwrap();
        let p = &r.buffer()[range];
        if c == want {
            return (data, n);
        }
        assert_eq!(c, cmd::RECV, "unexpected 0x{c:02X}");
        assert!(p.len() - 4 <= 4096, "Recv frames carry at most 4096 data bytes");
        data.extend_from_slice(&p[4..]);
    }
    panic!("no 0x{want:02X}");
}

#[test]
fn dial_send_recv_and_unsolicited_close() {
    netns();
    let dir = TempDir::new("devd-echo");
    let _svc = Service::start(7000, source);
    let d = Devd::start(&dir, &routes(&[]));
    let mut s = Raw::open(&d);
    let id = s.dial(a4(), 7000).unwrap();
    let Raw { mut r, mut w } = s;
    let mut frame = vec![0u8; 9 + 8];
    frame[9..].copy_from_slice(&(100_000u64).to_be_bytes());
    ipc::put_send_header(&mut frame, id, 8);
    w.write_all(&frame).unwrap();
    // The service sends 100,000 bytes and closes: data, then CloseOK.
    let (data, frames) = read_until(&mut r, cmd::CLOSE_OK);
    assert_eq!(data, pattern(7, 1 << 20)[..100_000]);
    assert!(frames >= 25, "4 KiB frames");
    // Close after the remote closed, and on an unknown id: CloseOK too.
    for cid in [id, 999_999] {
        w.write_all(&ipc::encode(cmd::CLOSE, &[&cid.to_be_bytes()]))
            .unwrap();
        let (c, range) = r.read_frame().unwrap();
        assert_eq!((c, &r.buffer()[range]), (cmd::CLOSE_OK, &cid.to_be_bytes()[..]));
    }
}

#[test]
fn close_of_a_live_connection_is_answered() {
    netns();
    let dir = TempDir::new("devd-close");
    let _svc = Service::start(7001, echo);
    let d = Devd::start(&dir, &routes(&[]));
    let mut s = Raw::open(&d);
    let id = s.dial(a4(), 7001).unwrap();
    s.send(cmd::CLOSE, &[&id.to_be_bytes()]);
    let (c, _) = s.frame();
    assert_eq!(c, cmd::CLOSE_OK);
}

#[test]
fn errors_read_like_the_real_daemon() {
    netns();
    let dir = TempDir::new("devd-errors");
    let d = Devd::start(
        &dir,
        &routes(&[
            "--untrusted",
            "0:0000.0000.0006",
            "--route",
            "0:0000.0000.0006=127.0.0.1",
        ]),
    );
    let mut s = Raw::open(&d);
    let err = |r: Result<u32, IpcError>| match r {
        Err(IpcError::Daemon(m)) => m,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        err(s.dial("0:0000.0000.0077".parse().unwrap(), 80)),
        "resolve node 119: registry: request failed"
    );
    assert!(err(s.dial("0:0000.0000.0006".parse().unwrap(), 80)).contains("trust"));
    assert_eq!(err(s.dial(a4(), 1)), "dial: connection refused");
    let mut c = session(&d);
    assert_eq!(c.resolve("lab-b").unwrap(), "0:0000.0000.0005".parse().unwrap());
    assert!(matches!(c.resolve("nope"), Err(IpcError::Daemon(m)) if m.contains("not found")));
    s.send(0x7F, &[]);
    let (c, payload) = s.frame();
    assert_eq!(c, cmd::ERROR);
    assert_eq!(ipc::error_text(&payload), "unknown command: 0x7F");
}

#[test]
fn json_replies_have_the_real_shapes() {
    netns();
    let dir = TempDir::new("devd-json");
    let d = Devd::start(&dir, &routes(&["--untrusted", "0:0000.0000.0004"]));
    let mut s = session(&d);
    let info = s.info().unwrap();
    for k in [
        "node_id",
        "address",
        "hostname",
        "uptime_secs",
        "connections",
        "ports",
        "peers",
        "encrypt",
        "version",
        "features",
    ] {
        assert!(info.get(k).is_some(), "info lacks {k}: {info}");
    }
    let health = s.health().unwrap();
    assert_eq!(health.get("status").and_then(Value::as_str), Some("ok"));
    assert!(
        s.trusted_peers().unwrap().is_empty(),
        "A4 is untrusted, so nobody is"
    );
    let dir2 = TempDir::new("devd-json2");
    let d2 = Devd::start(&dir2, &routes(&[]));
    let mut s2 = session(&d2);
    assert_eq!(s2.trusted_peers().unwrap(), vec![a4()]);
}

#[test]
fn oversize_frames_drop_the_session() {
    netns();
    let dir = TempDir::new("devd-oversize");
    let d = Devd::start(&dir, &routes(&[]));
    let mut u = UnixStream::connect(&d.socket).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    u.write_all(&((1u32 << 20) + 1).to_be_bytes()).unwrap();
    let mut b = [0u8; 8];
    assert!(matches!(u.read(&mut b), Ok(0) | Err(_)), "dropped");
    // Exactly 1 MiB is still accepted (an unknown command gets an Error).
    let mut u = UnixStream::connect(&d.socket).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut big = vec![0u8; 4 + (1 << 20)];
    big[..4].copy_from_slice(&(1u32 << 20).to_be_bytes());
    big[4] = 0x7E;
    u.write_all(&big).unwrap();
    let mut r = FrameReader::new(u, 4096);
    assert_eq!(r.read_frame().unwrap().0, cmd::ERROR);
}

#[test]
fn client_cap_closes_extra_clients() {
    netns();
    let dir = TempDir::new("devd-cap");
    let d = Devd::start(&dir, &routes(&["--max-clients", "2"]));
    // Hold two answered sessions (the start-up probe may still count briefly).
    let mut held = Vec::new();
    assert!(wait_until(Duration::from_secs(5), || {
        let mut s = session(&d);
        if s.info().is_ok() {
            held.push(s);
        }
        held.len() == 2
    }));
    let mut c = session(&d);
    assert!(c.info().unwrap_err().is_closed(), "the third client reads EOF");
    held.pop();
    assert!(wait_until(Duration::from_secs(5), || session(&d).info().is_ok()));
    assert!(d.log().contains("client limit"));
}

#[test]
fn cancel_abandons_pending_dials_and_dials_run_concurrently() {
    netns();
    let dir = TempDir::new("devd-cancel");
    let _svc = Service::start(7002, echo);
    let d = Devd::start(
        &dir,
        &routes(&[
            "--route",
            "0:0000.0000.0005=127.0.0.1",
            "--dial-delay",
            "0:0000.0000.0005=3000",
        ]),
    );
    // A slow dial on one session does not hold up another session's dial.
    let mut slow_session = Raw::open(&d);
    slow_session.send(cmd::INFO, &[]);
    assert_eq!(
        slow_session.frame().0,
        cmd::INFO_OK,
        "its client thread is serving"
    );
    let serving = settled_threads(d.proc.pid());
    let slow = thread::spawn(move || slow_session.dial("0:0000.0000.0005".parse().unwrap(), 7002));
    // Each dial runs in a thread of its own: the slow one is pending once
    // that thread exists.
    assert!(
        wait_until(Duration::from_secs(5), || proc_field(d.proc.pid(), "Threads:")
            > serving),
        "the slow dial is pending in its own thread"
    );
    Raw::open(&d).dial(a4(), 7002).unwrap();
    assert!(
        !slow.is_finished(),
        "the fast dial, started after the slow one, finished first"
    );
    assert!(slow.join().unwrap().is_ok());
    // Cancel: the pending dial is abandoned and logged, nothing is sent.
    let mut s = session(&d);
    s.send(
        cmd::DIAL,
        &[
            &"0:0000.0000.0005".parse::<PilotAddr>().unwrap().to_wire(),
            &7002u16.to_be_bytes(),
        ],
    )
    .unwrap();
    thread::sleep(Duration::from_millis(100));
    s.send(cmd::CANCEL, &[]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || d
            .log()
            .contains("cancel received (1 pending dials abandoned)")),
        "{}",
        d.log()
    );
    s.set_timeout(Some(Duration::from_millis(3500))).unwrap();
    assert_eq!(
        s.health().unwrap().get("status").and_then(Value::as_str),
        Some("ok"),
        "no DialOK arrived first"
    );
}

#[test]
fn other_uids_are_refused_unless_any_uid() {
    netns();
    let dir = TempDir::new("devd-uid");
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let run_as_nobody = |extra: &[&str]| {
        let sock = dir.path(&format!("n{}.sock", extra.len()));
        let mut c = as_nobody(DEVD);
        c.args(["--socket"]).arg(&sock).args(extra);
        let p = Proc::spawn(&mut c, dir.path(&format!("n{}.log", extra.len())));
        assert!(wait_until(Duration::from_secs(10), || sock.exists()));
        (sock, p)
    };
    let (sock, p) = run_as_nobody(&[]);
    let mut s = Session::connect_within(&sock, Duration::from_secs(10), None).unwrap();
    s.set_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(
        s.info().unwrap_err().is_closed(),
        "root is another uid: closed without a reply"
    );
    assert!(wait_until(Duration::from_secs(5), || p.stderr().contains("uid")));
    let (sock, _p2) = run_as_nobody(&["--any-uid"]);
    let mut s = Session::connect_within(&sock, Duration::from_secs(10), None).unwrap();
    s.set_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(s.info().is_ok());
}

/// The socket path appears only once devd accepts on it: a client that
/// waits for the path and connects at once is never refused. (`bind(2)`
/// creates the file before `listen(2)`; a test caught in between failed
/// with "Connection refused" in CI.) Tried over many starts, each watched
/// by a tight loop, since the window was microseconds wide.
#[test]
fn the_socket_appears_only_once_it_accepts() {
    let dir = TempDir::new("devd-appear");
    for i in 0..100 {
        let sock = dir.path(&format!("d{i}.sock"));
        let mut c = Command::new(DEVD);
        c.arg("--socket").arg(&sock);
        let _p = Proc::spawn(&mut c, dir.path(&format!("d{i}.log")));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(std::time::Instant::now() < deadline, "devd {i} made no socket");
            std::hint::spin_loop();
        }
        if let Err(e) = UnixStream::connect(&sock) {
            panic!("start {i}: the socket existed but refused a client: {e}");
        }
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::symlink_metadata(&sock).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "start {i}");
    }
    // A path that something else holds is left alone, as bind(2) would.
    let taken = dir.path("taken.sock");
    std::fs::write(&taken, "not a socket").unwrap();
    let mut c = Command::new(DEVD);
    c.arg("--socket").arg(&taken);
    let mut p = Proc::spawn(&mut c, dir.path("taken.log"));
    assert!(wait_until(Duration::from_secs(10), || p
        .child
        .try_wait()
        .unwrap()
        .is_some()));
    assert!(!p.child.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(&taken).unwrap(), "not a socket");
    let stray: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.ends_with(".sock") && !n.ends_with(".log"))
        .collect();
    assert!(stray.is_empty(), "temporary names left behind: {stray:?}");
}

/// Someone who can write the socket's directory plants a link at the
/// temporary name devd binds first (`SOCKET.PID`): devd follows nothing,
/// binds the socket in place instead, 0600, and the link's target is
/// untouched.
#[test]
fn a_planted_temporary_name_is_neither_followed_nor_fatal() {
    let dir = TempDir::new("devd-plant");
    let target = dir.path("target");
    std::fs::write(&target, "keep").unwrap();
    let sock = dir.path("d.sock");
    // The shell's pid is devd's after exec: the link is at SOCKET.PID.
    let script = format!(
        "ln -s '{}' '{}'.$$ && exec '{DEVD}' --socket '{}'",
        target.display(),
        sock.display(),
        sock.display()
    );
    let mut c = Command::new("bash");
    c.args(["-c", &script]);
    let p = Proc::spawn(&mut c, dir.path("d.log"));
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "{}",
        p.stderr()
    );
    UnixStream::connect(&sock).unwrap();
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    let tmeta = std::fs::metadata(&target).unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    assert!(tmeta.is_file());
    let planted = dir.path(&format!("d.sock.{}", p.pid()));
    assert!(std::fs::symlink_metadata(&planted)
        .unwrap()
        .file_type()
        .is_symlink());
}
