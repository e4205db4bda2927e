//! Pilot connections as the daemon tracks them: what Info's `conn_list`
//! reports, and `--lossy-close MS`, which reproduces how the Feb-2026
//! daemon loses data at Close.
//!
//! What the real daemon does (upstream `pkg/daemon`, Feb-2026 tree):
//!
//! - Info's reply (`ipc.go`, `handleInfo`) always carries `conn_list`: one
//!   object per connection the daemon holds — every client's, not only the
//!   asker's (`ports.go`, `PortManager.ConnectionList`) — with `id`,
//!   `local_port`, `remote_addr`, `remote_port`, `state`, `cong_win`,
//!   `ssthresh`, `in_flight` (bytes of the segments not yet acknowledged,
//!   `Connection.BytesInFlight`), `srtt_ms`, `rttvar_ms`, `unacked` (how
//!   many such segments), `ooo_buf`, `peer_recv_win`, `recv_win`,
//!   `in_recovery`, `bytes_sent` (payload bytes put into segments, counted
//!   in `sendSegment`; data still in the Nagle buffer is not in it),
//!   `bytes_recv`, `segs_sent`, `segs_recv`, `retransmits`, `fast_retx`,
//!   `sack_recv`, `sack_sent`, `dup_acks`. State names (`ConnState.String`):
//!   CLOSED, LISTEN, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT,
//!   TIME_WAIT. A client only ever sees ESTABLISHED and TIME_WAIT for its
//!   own connections: DialOK comes once the dial is ESTABLISHED
//!   (`DialConnection`), and an accepted connection is ESTABLISHED before
//!   its Accept is written (`handleStreamPacket` sets it when it answers
//!   the SYN). A connection closed by either side stays listed in
//!   TIME_WAIT until `idleSweepLoop` reaps it (`TimeWaitDuration`, 10 s).
//! - Send (`SendData` → `nagleFlush` → `sendSegment`) runs inline on the
//!   client's session and blocks while the window is full, so a client's
//!   later frames wait unread in its socket.
//! - Close (`CloseConnection`) sends FIN at once if ESTABLISHED and moves
//!   the connection to TIME_WAIT; `retxLoop` retransmits only for
//!   ESTABLISHED connections, so whatever was unacknowledged (or still in
//!   the Nagle buffer, flushed after up to `NagleTimeout`, 40 ms) is never
//!   sent again: the reader gets a prefix, then FIN.
//! - The dialing daemon polls its connection's state every 10 ms
//!   (`DialCheckInterval`) until ESTABLISHED; a FIN that arrives before it
//!   looked (right behind the SYN-ACK, or instead of a lost one) moves the
//!   connection to TIME_WAIT, so the dial never sees ESTABLISHED and waits
//!   out its retries (`dial timeout`). Measured: a Close within a few
//!   milliseconds of the Accept is lost that way; 300 ms after it, it
//!   reaches the dialer.
//!
//! What devd does: without `--lossy-close`, a Send is written to the TCP
//! peer at once (in_flight and unacked stay 0) and Close shuts the TCP
//! side after what was written — today's behaviour — while `conn_list` is
//! reported as the real daemon does (`--no-conn-list` leaves it out, as
//! daemons older than Feb-2026 do). With `--lossy-close MS`:
//!
//! - every Send is delivered to the TCP peer MS later; until then it
//!   counts in `in_flight` (bytes) and `unacked` (4096-byte segments), and
//!   a Send waits while 2 MiB (upstream's `MaxRecvWin`) are in flight;
//! - a Close drops whatever is still undelivered (the TCP peer reads a
//!   prefix, then EOF);
//! - an accepted connection is, for MS after its Accept, still being
//!   dialed on the far side: the TCP peer's data is not read yet (a dialer
//!   cannot send before its dial completes), and a Close then is lost —
//!   the TCP peer hears nothing until [`LOST_DIAL_WAIT`] passes (its dial
//!   timing out) and is then reset. As on the real daemon, the accepted
//!   connection shows ESTABLISHED throughout: the serving side cannot see
//!   the window, it can only wait it out (or see the dialer's data).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use pilot_gateway::address::PilotAddr;
use pilot_gateway::json::Value;

/// Upstream's segment size (`MaxSegmentSize`): `unacked` counts these.
const MSS: usize = 4096;
/// Upstream's largest receive window (`MaxRecvWin`, 512 segments): a Send
/// waits while this much is in flight, as `sendSegment` waits for window.
const WINDOW: usize = 512 * MSS;
/// How long a closed connection stays listed (upstream `TimeWaitDuration`).
const TIME_WAIT: Duration = Duration::from_secs(10);
/// A dialer whose Close was lost waits this long, then gives up (the
/// dial timeout the issue measured through a gateway: 10 s).
pub const LOST_DIAL_WAIT: Duration = Duration::from_secs(10);
const STACK: usize = 128 * 1024;

/// One pilot connection: its TCP stand-in and what `conn_list` reports.
pub struct Conn {
    pub id: u32,
    pub tcp: TcpStream,
    /// What `conn_list` shows. Info's list holds only this, so a closed
    /// connection listed in TIME_WAIT does not keep its TCP socket open
    /// (a peer still writing to it must see it gone).
    pub track: Arc<Track>,
}

/// A connection's `conn_list` entry and what its Sends wait on.
pub struct Track {
    pub id: u32,
    pub local_port: u16,
    pub remote: PilotAddr,
    pub remote_port: u16,
    /// When it was accepted (`None`: dialed by a client).
    pub accepted: Option<Instant>,
    st: Mutex<St>,
    /// Wakes the delivery thread and Sends waiting for window.
    cv: Condvar,
}

#[derive(Default)]
struct St {
    /// `None` while ESTABLISHED; when it went to TIME_WAIT.
    closed_at: Option<Instant>,
    bytes_sent: u64,
    bytes_recv: u64,
    segs_sent: u64,
    segs_recv: u64,
    /// `--lossy-close`: sent, not yet delivered, with when each is due.
    queue: VecDeque<(Instant, Vec<u8>)>,
    in_flight: usize,
    unacked: usize,
    delivering: bool,
}

fn segments(n: usize) -> usize {
    n.div_ceil(MSS)
}

impl Conn {
    pub fn new(
        id: u32,
        tcp: TcpStream,
        (local_port, remote, remote_port): (u16, PilotAddr, u16),
        accepted: bool,
    ) -> Arc<Conn> {
        Arc::new(Conn {
            id,
            tcp,
            track: Arc::new(Track {
                id,
                local_port,
                remote,
                remote_port,
                accepted: accepted.then(Instant::now),
                st: Mutex::new(St::default()),
                cv: Condvar::new(),
            }),
        })
    }

    fn st(&self) -> MutexGuard<'_, St> {
        self.track.st()
    }

    pub fn dialing(&self, lossy: Option<Duration>) -> bool {
        self.track.dialing(lossy)
    }

    pub fn received(&self, n: usize) {
        self.track.received(n)
    }

    pub fn end(&self) -> bool {
        self.track.end()
    }

    /// A client's Send. Without `lossy`: written at once. With it: queued
    /// for delivery `lossy` later, waiting while the window is full (a
    /// session that ended, `gone`, stops the wait).
    pub fn send(self: &Arc<Conn>, data: &[u8], lossy: Option<Duration>, gone: &AtomicBool) -> io::Result<()> {
        let Some(delay) = lossy else {
            (&self.tcp).write_all(data)?;
            let mut st = self.st();
            st.bytes_sent += data.len() as u64;
            st.segs_sent += segments(data.len()) as u64;
            return Ok(());
        };
        let mut st = self.st();
        while st.in_flight > 0 && st.in_flight + data.len() > WINDOW && st.closed_at.is_none() {
            if gone.load(Relaxed) {
                return Ok(());
            }
            st = self
                .track
                .cv
                .wait_timeout(st, Duration::from_millis(100))
                .map_or_else(|p| p.into_inner().0, |(g, _)| g);
        }
        if st.closed_at.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection not established",
            ));
        }
        st.queue.push_back((Instant::now() + delay, data.to_vec()));
        st.bytes_sent += data.len() as u64;
        st.segs_sent += segments(data.len()) as u64;
        st.in_flight += data.len();
        st.unacked += segments(data.len());
        if !st.delivering {
            let me = self.clone();
            let spawned = thread::Builder::new()
                .stack_size(STACK)
                .spawn(move || me.deliver());
            st.delivering = spawned.is_ok();
        }
        self.track.cv.notify_all();
        Ok(())
    }

    /// `--lossy-close`: writes each queued Send once it is due, then counts
    /// it delivered (acknowledged). Ends when the connection closes.
    fn deliver(&self) {
        loop {
            let data = {
                let mut st = self.st();
                loop {
                    if st.closed_at.is_some() {
                        st.delivering = false;
                        return;
                    }
                    let now = Instant::now();
                    let wait = match st.queue.front() {
                        Some((due, _)) if *due <= now => break,
                        Some((due, _)) => *due - now,
                        None => Duration::from_secs(1),
                    };
                    st = self
                        .track
                        .cv
                        .wait_timeout(st, wait)
                        .map_or_else(|p| p.into_inner().0, |(g, _)| g);
                }
                match st.queue.pop_front() {
                    Some((_, d)) => d,
                    None => continue,
                }
            };
            // A TCP peer that does not read keeps it in flight, as a peer
            // that does not acknowledge does.
            let ok = (&self.tcp).write_all(&data).is_ok();
            let mut st = self.st();
            st.in_flight = st.in_flight.saturating_sub(data.len());
            st.unacked = st.unacked.saturating_sub(segments(data.len()));
            self.track.cv.notify_all();
            if !ok {
                st.delivering = false;
                return;
            }
        }
    }

    /// Our Close: the TCP peer sees EOF after what was delivered — or,
    /// when the Close is lost (`--lossy-close`, within the dial window),
    /// nothing until [`LOST_DIAL_WAIT`], then a reset.
    pub fn close(self: &Arc<Conn>, lossy: Option<Duration>, drain: Duration) {
        let lost = self.dialing(lossy);
        self.end();
        if !lost {
            let _ = self.tcp.shutdown(Shutdown::Write);
            let _ = self.tcp.set_read_timeout(Some(drain));
            return;
        }
        let me = self.clone();
        let _ = thread::Builder::new().stack_size(STACK).spawn(move || {
            thread::sleep(LOST_DIAL_WAIT);
            pilot_gateway::sys::net::set_linger_zero(&me.tcp);
            let _ = me.tcp.shutdown(Shutdown::Both);
        });
    }
}

impl Track {
    fn st(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the far side's dial is still in progress (`--lossy-close`).
    pub fn dialing(&self, lossy: Option<Duration>) -> bool {
        matches!((lossy, self.accepted), (Some(ms), Some(t)) if t.elapsed() < ms)
    }

    /// Data from the TCP peer, about to go out as Recv frames.
    pub fn received(&self, n: usize) {
        let mut st = self.st();
        st.bytes_recv += n as u64;
        st.segs_recv += segments(n) as u64;
    }

    /// Moves the connection to TIME_WAIT (either side closed) and drops
    /// what was not delivered. Returns whether it was still ESTABLISHED.
    pub fn end(&self) -> bool {
        let mut st = self.st();
        let was_open = st.closed_at.is_none();
        if was_open {
            st.closed_at = Some(Instant::now());
        }
        st.queue.clear();
        self.cv.notify_all();
        was_open
    }

    /// Whether it has been in TIME_WAIT long enough to be reaped.
    pub fn reaped(&self, now: Instant) -> bool {
        self.closed_at()
            .is_some_and(|t| now.saturating_duration_since(t) >= TIME_WAIT)
    }

    /// When it went to TIME_WAIT (`None`: ESTABLISHED).
    pub fn closed_at(&self) -> Option<Instant> {
        self.st().closed_at
    }

    /// The connection's `conn_list` entry, in the real daemon's shape.
    pub fn entry(&self) -> Value {
        let st = self.st();
        let state = if st.closed_at.is_some() {
            "TIME_WAIT"
        } else {
            "ESTABLISHED"
        };
        Value::obj([
            ("id", Value::from(self.id)),
            ("local_port", self.local_port.into()),
            ("remote_addr", self.remote.to_string().into()),
            ("remote_port", self.remote_port.into()),
            ("state", state.into()),
            ("cong_win", (WINDOW as u64).into()),
            ("ssthresh", (WINDOW as u64).into()),
            ("in_flight", st.in_flight.into()),
            ("srtt_ms", 0u64.into()),
            ("rttvar_ms", 0u64.into()),
            ("unacked", st.unacked.into()),
            ("ooo_buf", 0u64.into()),
            ("peer_recv_win", (WINDOW as u64).into()),
            ("recv_win", (WINDOW as u64).into()),
            ("in_recovery", false.into()),
            ("bytes_sent", st.bytes_sent.into()),
            ("bytes_recv", st.bytes_recv.into()),
            ("segs_sent", st.segs_sent.into()),
            ("segs_recv", st.segs_recv.into()),
            ("retransmits", 0u64.into()),
            ("fast_retx", 0u64.into()),
            ("sack_recv", 0u64.into()),
            ("sack_sent", 0u64.into()),
            ("dup_acks", 0u64.into()),
        ])
    }
}
