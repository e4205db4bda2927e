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
//!   TIME_WAIT until `idleSweepLoop` (daemon.go) reaps it: that loop runs
//!   every `DefaultIdleSweepInterval` (15 s, a ticker from daemon start)
//!   and drops, through `StaleConnections` (ports.go), the TIME_WAIT
//!   connections closed more than `TimeWaitDuration` (10 s) before the
//!   tick — so a closed connection is listed for 10 to 25 s, however many
//!   there are (nothing caps them). A reset (RST) drops one at once.
//!   Keys come sorted: `handleInfo` marshals one Go map per connection.
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

/// Upstream's segment size (`MaxSegmentSize`): `unacked` counts these.
const MSS: usize = 4096;
/// Upstream's largest receive window (`MaxRecvWin`, 512 segments): a Send
/// waits while this much is in flight, as `sendSegment` waits for window.
const WINDOW: usize = 512 * MSS;
/// How long a closed connection stays listed at least (upstream
/// `TimeWaitDuration`); see `Daemon::sweep` for when it goes.
pub const TIME_WAIT: Duration = Duration::from_secs(10);
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
            track: Arc::new(Track::new(id, (local_port, remote, remote_port), accepted)),
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
    fn new(id: u32, (local_port, remote, remote_port): (u16, PilotAddr, u16), accepted: bool) -> Track {
        Track {
            id,
            local_port,
            remote,
            remote_port,
            accepted: accepted.then(Instant::now),
            st: Mutex::new(St::default()),
            cv: Condvar::new(),
        }
    }

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

    /// Whether a sweep at `tick` drops it: in TIME_WAIT for more than
    /// [`TIME_WAIT`] then (upstream `StaleConnections`: `now.Sub(la) >
    /// timeWaitDur`).
    pub fn stale_at(&self, tick: Instant) -> bool {
        stale(self.closed_at(), tick)
    }

    /// When it went to TIME_WAIT (`None`: ESTABLISHED).
    pub fn closed_at(&self) -> Option<Instant> {
        self.st().closed_at
    }

    /// Appends the connection's `conn_list` entry to `out`, in the real
    /// daemon's shape: `handleInfo` marshals a Go map per connection, so
    /// the keys come sorted (`encoding/json` sorts map keys). Written
    /// straight as text: Info lists every connection, thousands under
    /// churn, up to 40 times a second while the gateway's close poller
    /// waits on some.
    pub fn write_entry(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        let st = self.st();
        let state = if st.closed_at.is_some() {
            "TIME_WAIT"
        } else {
            "ESTABLISHED"
        };
        let win = WINDOW as u64;
        // An address's text is digits, hex, ':' and '.': nothing to escape.
        let _ = write!(
            out,
            "{{\"bytes_recv\":{},\"bytes_sent\":{},\"cong_win\":{win},\"dup_acks\":0,\"fast_retx\":0,\
             \"id\":{},\"in_flight\":{},\"in_recovery\":false,\"local_port\":{},\"ooo_buf\":0,\
             \"peer_recv_win\":{win},\"recv_win\":{win},\"remote_addr\":\"{}\",\
             \"remote_port\":{},\"retransmits\":0,\"rttvar_ms\":0,\"sack_recv\":0,\"sack_sent\":0,\
             \"segs_recv\":{},\"segs_sent\":{},\"srtt_ms\":0,\"ssthresh\":{win},\"state\":\"{state}\",\
             \"unacked\":{}}}",
            st.bytes_recv,
            st.bytes_sent,
            self.id,
            st.in_flight,
            self.local_port,
            self.remote,
            self.remote_port,
            st.segs_recv,
            st.segs_sent,
            st.unacked,
        );
    }
}

/// Whether a connection closed at `closed_at` (`None`: open) is dropped by
/// a sweep at `tick` (upstream `StaleConnections`).
fn stale(closed_at: Option<Instant>, tick: Instant) -> bool {
    closed_at.is_some_and(|t| tick.saturating_duration_since(t) > TIME_WAIT)
}

/// The latest tick, at or before `now`, of a ticker of `every` started at
/// `started` (upstream's `idleSweepLoop` ticker).
pub fn last_tick(started: Instant, now: Instant, every: Duration) -> Instant {
    let ticks = now.saturating_duration_since(started).as_nanos() / every.as_nanos().max(1);
    started + every * u32::try_from(ticks).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_connection_is_listed_10_to_25_s_as_upstream_sweeps() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let every = Duration::from_secs(15);
        assert_eq!(last_tick(t0, s(14), every), t0);
        assert_eq!(last_tick(t0, s(15), every), s(15));
        assert_eq!(last_tick(t0, s(44), every), s(30));
        // Closed 1 s after start: the 15 s tick drops it (14 s > 10 s).
        assert!(!stale(Some(s(1)), t0));
        assert!(stale(Some(s(1)), s(15)));
        // Closed at 6 s: 9 s at the first tick, so listed until the second.
        assert!(!stale(Some(s(6)), s(15)));
        assert!(stale(Some(s(6)), s(30)));
        // Exactly 10 s is not more than 10 s; open ones stay.
        assert!(!stale(Some(s(5)), s(15)));
        assert!(!stale(None, s(1000)));
    }

    #[test]
    fn the_entry_is_the_real_daemons_with_its_keys_sorted() {
        let t = Track::new(7, (49152, PilotAddr::new(0, 4), 80), false);
        let mut out = Vec::new();
        t.write_entry(&mut out);
        let out = String::from_utf8(out).unwrap();
        let v = pilot_gateway::json::parse(&out).unwrap();
        let pilot_gateway::json::Value::Obj(pairs) = &v else {
            panic!("{out}")
        };
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
        assert_eq!(keys.len(), 24);
        assert_eq!(v.get("id").and_then(|v| v.as_u64()), Some(7));
        assert_eq!(v.get("state").and_then(|v| v.as_str()), Some("ESTABLISHED"));
        assert_eq!(
            v.get("remote_addr").and_then(|v| v.as_str()),
            Some("0:0000.0000.0004")
        );
        t.end();
        let mut out = Vec::new();
        t.write_entry(&mut out);
        assert!(String::from_utf8(out).unwrap().contains(r#""state":"TIME_WAIT""#));
    }
}
