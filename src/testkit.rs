//! Helpers for the engine's unit tests (no root, no network namespace):
//! TCP pairs on 127.0.0.1, a scratch directory, and a scripted daemon
//! side that reads and writes IPC frames on a Unix socket.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::ipc::{self, cmd};

/// A connected TCP pair on loopback: (ours, theirs).
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    (b, a)
}

/// A fresh directory for one test's sockets and files.
pub fn scratch() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "pgw-unit-{}-{}",
        std::process::id(),
        N.fetch_add(1, Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// One frame read from the daemon's side: (command, payload).
pub fn read_frame(s: &mut UnixStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).ok()?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let mut body = vec![0u8; len.checked_sub(1)?];
    s.read_exact(&mut body).ok()?;
    Some((head[4], body))
}

/// Reads frames until one of `command` (bounded by the socket's timeout).
pub fn expect_frame(s: &mut UnixStream, command: u8) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let (c, body) = read_frame(s)?;
        if c == command {
            return Some(body);
        }
    }
    None
}

pub fn send(s: &mut UnixStream, command: u8, parts: &[&[u8]]) {
    let _ = s.write_all(&ipc::encode(command, parts));
}

/// Recv frame for connection `id`.
pub fn recv(s: &mut UnixStream, id: u32, data: &[u8]) {
    send(s, cmd::RECV, &[&id.to_be_bytes(), data]);
}

/// A daemon socket in `dir` and its listener.
pub fn daemon(dir: &std::path::Path) -> (PathBuf, UnixListener) {
    let path = dir.join("daemon.sock");
    let l = UnixListener::bind(&path).expect("bind unix");
    (path, l)
}

/// Accepts one session with a read timeout, so no test can hang.
pub fn session(l: &UnixListener) -> UnixStream {
    let (s, _) = l.accept().expect("accept session");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

/// Waits (bounded) until `f` holds.
pub fn wait_until(limit: Duration, f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}
