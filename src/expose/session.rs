//! An exposure's daemon session: opening it and Binding the port, the
//! shared writer every connection on the port sends through ([`Link`]),
//! and the Unbind exchange that releases the port.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::address::PilotAddr;
use crate::engine::{Frame, PilotSide};
use crate::error::{Code, Error, Result};
use crate::ipc::{self, cmd, FrameReader};

use super::lock;

/// Bound on one frame write to the daemon, and by default on the whole
/// Bind exchange (connect, Bind, its answer).
pub const IPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a Bind in progress looks whether the exposure was stopped.
const BIND_POLL: Duration = Duration::from_millis(100);

fn unreachable(socket: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::new(
        Code::DaemonUnreachable,
        format!("daemon socket {}: {e}", socket.display()),
    )
    .hint("is the Pilot daemon running, as this user?")
}

/// The write half of a session, shared by every connection on it.
pub struct Link {
    pub stream: UnixStream,
    /// Held for one frame, so frames from many threads stay whole; it
    /// guards what each connection sent lately (to name a stall's culprit).
    lock: Mutex<Recent>,
    /// Set when a frame could not be written within `IPC_TIMEOUT`: the
    /// daemon stopped reading the session. Names the likely culprit.
    pub stalled: OnceLock<String>,
    /// Where this session's Unbind stands; the reader thread records the
    /// answer and wakes the asker through `unbind_answered`.
    unbind: Mutex<Unbind>,
    unbind_answered: Condvar,
}

/// A session's Unbind. At most one is ever sent per session, so an answer
/// (UnbindOK, or an Error about Unbind) can only be for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unbind {
    /// Not asked.
    Bound,
    /// Sent, no answer yet.
    Asked,
    /// UnbindOK: the port is free; accepted connections go on.
    Released,
    /// `unknown command: 0x37` (the Feb-2026 daemon): close the session.
    Unknown,
    /// Refused, failed to send, or the session ended first.
    Failed,
}

/// Data bytes each connection sent in the current window of
/// `IPC_TIMEOUT` (bounded by the connections live in one window).
#[derive(Default)]
struct Recent {
    since: Option<Instant>,
    bytes: HashMap<u32, (PilotAddr, u64)>,
}

impl Link {
    pub fn new(stream: UnixStream) -> Link {
        Link {
            stream,
            lock: Mutex::new(Recent::default()),
            stalled: OnceLock::new(),
            unbind: Mutex::new(Unbind::Bound),
            unbind_answered: Condvar::new(),
        }
    }

    /// Sends Unbind (once per session) and waits up to `wait` for the
    /// reader thread to see the answer; whether the port was released.
    /// Never waits longer than `wait` for other writers either: a writer
    /// blocked on a daemon that stopped reading holds the write lock.
    pub fn unbind(&self, port: u16, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut st = lock(&self.unbind);
        if *st == Unbind::Bound {
            *st = Unbind::Asked;
            drop(st);
            let frame = ipc::encode(cmd::UNBIND, &[&port.to_be_bytes()]);
            if !self.send_by(&frame, deadline) {
                self.unbind_answer(Unbind::Failed);
            }
            st = lock(&self.unbind);
        }
        while *st == Unbind::Asked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = match self.unbind_answered.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        *st == Unbind::Released
    }

    /// Records the answer to an Unbind in flight (and nothing otherwise).
    pub fn unbind_answer(&self, answer: Unbind) {
        let mut st = lock(&self.unbind);
        if *st == Unbind::Asked {
            *st = answer;
        }
        drop(st);
        self.unbind_answered.notify_all();
    }

    pub fn unbind_asked(&self) -> bool {
        *lock(&self.unbind) == Unbind::Asked
    }

    /// Like `send`, but gives up (sending nothing) when the write lock
    /// stays taken until `deadline`.
    fn send_by(&self, frame: &[u8], deadline: Instant) -> bool {
        let _recent = loop {
            match self.lock.try_lock() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(1));
                }
                Err(std::sync::TryLockError::WouldBlock) => return false,
            }
        };
        // The write itself is bounded by the same deadline (we hold the
        // write lock, so no other writer sees the shorter timeout): a daemon
        // that stopped reading must not make `stop` wait the full
        // IPC_TIMEOUT. A frame cut short ends the session, as in `send`.
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = self
            .stream
            .set_write_timeout(Some(left.max(Duration::from_millis(10))));
        let ok = (&self.stream).write_all(frame).is_ok();
        let _ = self.stream.set_write_timeout(Some(IPC_TIMEOUT));
        if !ok {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        ok
    }

    /// Writes one whole frame (`from`: the connection whose data it
    /// carries); a failed write ends the session (a partial frame would
    /// corrupt it), which the reader then sees.
    ///
    /// The daemon handles Send inline, so a peer that does not read can
    /// block the daemon's reading of the whole session: nothing written
    /// after that gets through, Close of the culprit included. Such a
    /// write times out; the session is then given up (the port re-bound
    /// at once), naming the connection that sent the most lately.
    pub fn send(&self, frame: &[u8], from: Option<(u32, PilotAddr)>) -> bool {
        let result = {
            let mut recent = lock(&self.lock);
            if let Some((conn, peer)) = from {
                recent.count(conn, peer, frame.len());
            }
            let r = (&self.stream).write_all(frame);
            if matches!(&r, Err(e) if ipc::is_timeout(e)) {
                let _ = self.stalled.set(recent.culprit());
            }
            r
        };
        if result.is_err() {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        result.is_ok()
    }
}

/// The session itself as a pilot side, for frames no connection's data
/// is in (the Close of an Accept that is refused): they name no culprit.
/// A connection's own frames go through its `Conn`, which names it.
impl PilotSide for Link {
    fn send(&self, frame: &[u8], _what: Frame) -> Result<()> {
        if Link::send(self, frame, None) {
            Ok(())
        } else {
            Err(lost_while_sending())
        }
    }
}

/// Why a frame could not go out on an exposure's session.
pub(super) fn lost_while_sending() -> Error {
    Error::new(Code::DaemonUnreachable, "daemon session lost while sending")
}

impl Recent {
    fn count(&mut self, conn: u32, peer: PilotAddr, n: usize) {
        let now = Instant::now();
        if !self.since.is_some_and(|t| now.duration_since(t) <= IPC_TIMEOUT) {
            (self.since, self.bytes) = (Some(now), HashMap::new());
        }
        self.bytes.entry(conn).or_insert((peer, 0)).1 += n as u64;
    }

    /// The connection that sent the most in this window, described.
    fn culprit(&self) -> String {
        match self.bytes.iter().max_by_key(|(_, (_, n))| *n) {
            Some((conn, (peer, n))) => {
                format!("likely culprit: connection {conn} from {peer}, {n} bytes sent lately")
            }
            None => "no connection sent data lately".into(),
        }
    }
}

/// Opens a session (to a daemon of uid `expect`, when given) and Binds
/// `port` on it, all by `deadline` (one overall bound: a daemon that
/// trickles its answer cannot stretch it), giving up early once
/// `abandoned` says so (looked at every `BIND_POLL`).
pub fn open(
    socket: &Path,
    port: u16,
    expect: Option<crate::sys::user::Uid>,
    deadline: Instant,
    abandoned: &dyn Fn() -> bool,
) -> Result<(FrameReader<UnixStream>, Arc<Link>)> {
    let io_err = |e: io::Error| unreachable(socket, &e);
    let stream = crate::sys::net::unix_socket().map_err(io_err)?;
    ipc::connect_by(&stream, socket, deadline, abandoned, expect).map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            Error::new(Code::PermissionDenied, e.to_string())
                .hint("the daemon's socket is served by another user now; restart the gateway once the daemon is back")
        } else {
            unreachable(socket, &e)
        }
    })?;
    // One socket under both descriptors: its timeouts are shared.
    let mut writer = stream.try_clone().map_err(io_err)?;
    let bind = ipc::encode(cmd::BIND, &[&port.to_be_bytes()]);
    writer
        .set_write_timeout(Some(left(deadline, socket)?))
        .map_err(io_err)?;
    writer.write_all(&bind).map_err(io_err)?;
    writer.set_write_timeout(Some(IPC_TIMEOUT)).map_err(io_err)?;
    let mut reader = FrameReader::growing(stream, 16 * 1024, 256 * 1024);
    let (command, range) = bind_reply(&mut reader, socket, deadline, abandoned)?;
    let payload = &reader.buffer()[range];
    match command {
        cmd::BIND_OK if payload.get(..2) == Some(&port.to_be_bytes()[..]) => {}
        cmd::ERROR => {
            let text = ipc::error_text(payload);
            let code = if text.contains("already bound") {
                Code::PortInUse
            } else {
                Code::ConnectionFailed
            };
            return Err(Error::new(code, format!("bind pilot port {port}: {text}"))
                .hint("choose another port, or stop the program that holds it"));
        }
        c => {
            return Err(Error::internal(format!(
                "bind pilot port {port}: unexpected reply 0x{c:02X}"
            )))
        }
    }
    reader.get_ref().set_read_timeout(None).map_err(io_err)?;
    Ok((reader, Arc::new(Link::new(writer))))
}

/// What is left before `deadline`, or the error of a daemon too slow.
fn left(deadline: Instant, socket: &Path) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(unreachable(
            socket,
            &"no answer to Bind in time (is the daemon stalled?)",
        ));
    }
    Ok(left)
}

/// Reads the daemon's answer to Bind by `deadline`, re-arming the read
/// timeout before every read (a per-read timeout restarts with each byte).
fn bind_reply(
    reader: &mut FrameReader<UnixStream>,
    socket: &Path,
    deadline: Instant,
    abandoned: &dyn Fn() -> bool,
) -> Result<(u8, std::ops::Range<usize>)> {
    loop {
        if let Some(frame) = reader.next_buffered().map_err(|e| unreachable(socket, &e))? {
            return Ok(frame);
        }
        if abandoned() {
            return Err(Error::new(Code::DaemonUnreachable, "the exposure was stopped"));
        }
        let wait = left(deadline, socket)?.min(BIND_POLL);
        let io_err = |e: io::Error| unreachable(socket, &e);
        reader.get_ref().set_read_timeout(Some(wait)).map_err(io_err)?;
        match reader.fill() {
            Ok(()) => {}
            Err(e) if e.is_timeout() => {}
            Err(e) => return Err(unreachable(socket, &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::read_frame;

    fn link() -> (Arc<Link>, UnixStream) {
        let (ours, daemon) = UnixStream::pair().unwrap();
        daemon.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (Arc::new(Link::new(ours)), daemon)
    }

    #[test]
    fn unbind_is_sent_once_and_its_answer_wakes_the_asker() {
        let (l, mut d) = link();
        let l2 = l.clone();
        let t = thread::spawn(move || l2.unbind(80, Duration::from_secs(5)));
        assert_eq!(read_frame(&mut d), Some((cmd::UNBIND, vec![0, 80])));
        assert!(wait(|| l.unbind_asked()));
        l.unbind_answer(Unbind::Released);
        assert!(t.join().unwrap());
        // Asked again: no second frame, the same answer.
        assert!(l.unbind(80, Duration::from_millis(50)));
    }

    fn wait(f: impl Fn() -> bool) -> bool {
        crate::testkit::wait_until(Duration::from_secs(5), f)
    }

    #[test]
    fn an_unbind_without_answer_gives_up_in_time() {
        let (l, _d) = link();
        let start = Instant::now();
        assert!(!l.unbind(80, Duration::from_millis(100)));
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_daemon_without_unbind_answers_unknown() {
        let (l, _d) = link();
        let l2 = l.clone();
        let t = thread::spawn(move || l2.unbind(80, Duration::from_secs(5)));
        assert!(wait(|| l.unbind_asked()));
        l.unbind_answer(Unbind::Unknown);
        assert!(!t.join().unwrap());
    }

    #[test]
    fn an_answer_nobody_asked_for_is_ignored() {
        let (l, _d) = link();
        l.unbind_answer(Unbind::Released);
        assert!(!l.unbind_asked());
        assert_eq!(*lock(&l.unbind), Unbind::Bound);
    }

    #[test]
    fn a_daemon_that_stops_reading_stalls_the_session_naming_the_culprit() {
        let (l, _d) = link();
        l.stream
            .set_write_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let frame = vec![0u8; 64 * 1024];
        let peer = PilotAddr::new(0, 9);
        let mut sent = 0;
        while l.send(&frame, Some((42, peer))) {
            sent += 1;
            assert!(sent < 10_000, "the socket buffer is bounded");
        }
        let why = l.stalled.get().expect("stalled");
        assert!(
            why.contains("connection 42") && why.contains("0:0000.0000.0009"),
            "{why}"
        );
    }

    #[test]
    fn the_culprit_is_who_sent_most_in_the_window() {
        let mut r = Recent::default();
        r.count(1, PilotAddr::new(0, 1), 10);
        r.count(2, PilotAddr::new(0, 2), 500);
        r.count(1, PilotAddr::new(0, 1), 10);
        assert!(r.culprit().starts_with("likely culprit: connection 2"));
        assert_eq!(Recent::default().culprit(), "no connection sent data lately");
    }

    #[test]
    fn bind_is_answered_or_refused() {
        let dir = crate::testkit::scratch();
        let (path, l) = crate::testkit::daemon(&dir);
        let daemon = thread::spawn(move || {
            for answer in [&[cmd::BIND_OK][..], &[cmd::ERROR]] {
                let mut s = crate::testkit::session(&l);
                assert_eq!(read_frame(&mut s).map(|f| f.0), Some(cmd::BIND));
                if answer[0] == cmd::BIND_OK {
                    crate::testkit::send(&mut s, cmd::BIND_OK, &[&[0, 80]]);
                } else {
                    crate::testkit::send(&mut s, cmd::ERROR, &[&[0, 1], b"port 80 already bound"]);
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        let by = Instant::now() + Duration::from_secs(5);
        assert!(open(&path, 80, Some(crate::sys::user::euid()), by, &|| false).is_ok());
        let err = open(&path, 80, None, by, &|| false).err().unwrap();
        assert_eq!(err.code, Code::PortInUse);
        daemon.join().unwrap();
        let gone = dir.join("nobody.sock");
        let err = open(&gone, 80, None, by, &|| false).err().unwrap();
        assert_eq!(err.code, Code::DaemonUnreachable);
    }

    #[test]
    fn a_silent_daemon_fails_bind_by_the_deadline() {
        let dir = crate::testkit::scratch();
        let (path, l) = crate::testkit::daemon(&dir);
        let _hold = thread::spawn(move || {
            let s = l.accept();
            thread::sleep(Duration::from_secs(3));
            drop(s);
        });
        let start = Instant::now();
        let by = start + Duration::from_millis(300);
        let err = open(&path, 80, None, by, &|| false).err().unwrap();
        assert_eq!(err.code, Code::DaemonUnreachable);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
