//! When a pilot connection may be closed without losing what was sent to
//! it: one poller asks the daemon (Info's `conn_list`) for every
//! connection that is closing, and each connection's own thread waits for
//! its verdict.
//!
//! # What the daemon does (Feb-2026; upstream `pkg/daemon`)
//!
//! - `CloseConnection` (daemon.go) sends FIN at once — only if the
//!   connection is ESTABLISHED — and moves it to TIME_WAIT. `retxLoop`
//!   retransmits for ESTABLISHED connections only, so every segment not yet
//!   acknowledged at Close is never sent again: the reader gets a correct
//!   prefix, then FIN (measured: 3 of 6 downloads of 3 MB short).
//! - `SendData` → `nagleFlush` keeps a write smaller than a segment up to
//!   `NagleTimeout` (40 ms) while earlier data is unacknowledged; such data
//!   is in neither `in_flight` nor `bytes_sent` yet. Send is handled inline
//!   on the sender's session and blocks while the window is full, so our
//!   later Send frames can sit unread in that session's socket.
//! - Info (`handleInfo` in ipc.go, from `PortManager.ConnectionList` in
//!   ports.go) lists every connection the daemon holds, whoever owns it,
//!   as `conn_list`: per `id`, `state` (ESTABLISHED, TIME_WAIT, SYN_SENT …),
//!   `in_flight` (bytes unacknowledged: `BytesInFlight`), `unacked`
//!   (segments), `bytes_sent` (payload put into segments, counted in
//!   `sendSegment`), `bytes_recv`, and congestion details.
//! - An accepted connection is ESTABLISHED before its Accept is written
//!   (`handleStreamPacket`, on the SYN), but the *dialer* learns it only
//!   when the SYN-ACK arrives and its `DialConnection` looks again, every
//!   10 ms (`DialCheckInterval`). A FIN that arrives first moves the
//!   dialer's connection to TIME_WAIT and its dial never completes: it
//!   waits out its retries (measured: a Close within a few ms of the
//!   Accept costs the dialer its whole dial timeout, 10 s; 300 ms after
//!   the Accept it reaches the dialer in 0.30 s). The serving side cannot
//!   see this window in `conn_list`.
//!
//! # What we do
//!
//! - [`Closer::wait_delivered`], after a connection's last Send and before
//!   its Close: the Close waits until the daemon lists the connection
//!   ESTABLISHED with `in_flight == 0`, `unacked == 0` and `bytes_sent` at
//!   least what we sent (so nothing waits in the Nagle buffer or unread in
//!   our session; a daemon without `bytes_sent` gets at least the Nagle
//!   interval after the last Send instead), in two successive answers (the
//!   daemon counts `bytes_sent` a moment before it tracks the segment as
//!   unacknowledged, and reads the two under different locks). A
//!   connection that left ESTABLISHED (the peer closed; TIME_WAIT) gets
//!   its Close at once: nothing more would be retransmitted anyway.
//! - The wait is bounded by the close linger (`--close-linger`, default
//!   [`DEFAULT_LINGER`]): past it the Close goes out anyway and the caller
//!   counts `close_unconfirmed`. While the daemon reports progress
//!   (`bytes_sent - in_flight` growing), the limit moves to what the
//!   outstanding bytes need at the measured rate plus the linger again,
//!   never beyond [`LINGER_CAP`] × the linger.
//! - [`Closer::wait_established`], for a connection an exposure cannot
//!   serve: its Close waits [`ACCEPT_SETTLE`] after the Accept (the value
//!   measured to reach the dialer), or less once the daemon shows data
//!   from the dialer (`bytes_recv > 0`: a dialer sends only once its dial
//!   completed) or the connection gone or closed by the dialer.
//!   [`Closer::close_when_established`] is the same without blocking, for
//!   a thread that must not wait (an exposure's session reader refusing a
//!   peer): the poller runs the given close when the time comes.
//! - One poller for all: one thread and one IPC session of its own
//!   (opened through `ipc::connect_by`, with the daemon's uid seen at
//!   start, only while something is closing), one Info exchange per
//!   interval whatever the number of closing connections, each with an
//!   overall deadline, no sooner than [`MIN_INTERVAL`] (or
//!   [`ROUND_SHARE`] times the last exchange's duration: a daemon with
//!   thousands of connections answers with megabytes) after the previous
//!   one. The reply is read in the session's buffer by `conn_list::scan`,
//!   which takes out only the entries of the connections asked about (the
//!   daemon lists all it holds, TIME_WAIT ones for 10 to 25 s: see
//!   `conn_list`'s notes). Each waiting thread is woken alone once its
//!   verdict is in, and a new close wakes the poller only when it has no
//!   round planned.
//! - Close mode, shown by `status`: `confirmed` once an Info reply had a
//!   `conn_list` with these fields; `immediate` for a daemon whose Info has
//!   no `conn_list` (daemons before Feb-2026) or whose entries lack
//!   `state`, `in_flight` or `unacked` — a newer daemon that drains before
//!   its FIN is expected to stop reporting them or to drop the list, and is
//!   detected the same way; `unknown` until the daemon first answered.
//!   Immediate mode closes at once (today's behaviour) and is checked again
//!   every [`REDETECT`].

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::conn_list::scan;
pub use crate::conn_list::{Entry, Seen, Snapshot};
use crate::ipc::Session;
use crate::json::Value;
use crate::sys::user::Uid;

/// Upstream's `NagleTimeout`: how long a small write may wait unsent.
pub const NAGLE: Duration = Duration::from_millis(40);
/// The default `--close-linger`: a few seconds covers a retransmission or
/// two (upstream's RTO starts at 1 s and doubles).
pub const DEFAULT_LINGER: Duration = Duration::from_secs(5);
/// A close never lingers beyond this many times the linger, however
/// steadily a slow peer takes data.
pub const LINGER_CAP: u32 = 12;
/// Info exchanges are at least this far apart: the Nagle interval. Each
/// round costs the daemon and us in proportion to every connection it
/// lists (TIME_WAIT ones for 10 to 25 s: thousands under churn), so
/// fewer rounds is the saving; and a close asked about in one round is
/// asked again in the next at least [`NAGLE`] later, past its last Send's
/// Nagle interval, where one quiet answer is enough: two rounds settle
/// any close whose bytes are delivered, as with closer rounds.
pub const MIN_INTERVAL: Duration = NAGLE;
/// Rounds are at least this many times the last exchange's duration
/// apart, so Info takes at most about a tenth of the daemon's time (and
/// of the poller's) however long its list: a daemon listing 5,000
/// connections answers with 4 MB (15 ms from pilot-devd), and at three
/// times, as before, every new connection's p99 latency through the
/// gateway grew fivefold under churn (`make bench`, docs/PERFORMANCE.md).
/// Closes then wait a few rounds of that length; short lists are
/// unaffected ([`MIN_INTERVAL`] is longer).
pub const ROUND_SHARE: u32 = 10;
/// Overall deadline of one exchange (connect included).
pub const EXCHANGE_DEADLINE: Duration = Duration::from_secs(2);
/// How long after an Accept a Close reliably reaches the dialer (measured
/// on the real overlay, PROTOCOL.md).
pub const ACCEPT_SETTLE: Duration = Duration::from_millis(300);
/// The poller's session is closed after this long with nothing closing.
const IDLE_KEEP: Duration = Duration::from_secs(5);
/// Deferred closes held at most; beyond, a close goes out at once.
pub const MAX_DEFERRED: usize = 4096;
/// How often an `immediate` daemon is asked again (it may be upgraded).
pub const REDETECT: Duration = Duration::from_secs(30);
/// The largest Info reply read: ~500 bytes per connection, for the
/// daemon's 4096 connections plus those in TIME_WAIT.
pub const MAX_INFO: usize = 8 << 20;
const STACK: usize = 256 * 1024;

/// How this daemon's connections are closed (for `status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The daemon has not answered an Info yet.
    Unknown,
    /// Its `conn_list` tells what is delivered: Close waits for it.
    Confirmed,
    /// It cannot tell: Close at once.
    Immediate,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Unknown => "unknown",
            Mode::Confirmed => "confirmed",
            Mode::Immediate => "immediate",
        }
    }
}

/// How [`Closer::wait_delivered`] ended: the caller sends Close in every case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The daemon reported everything sent acknowledged.
    Delivered,
    /// Not confirmed, and why (for the log): count it as `close_unconfirmed`.
    Unconfirmed(String),
    /// This daemon cannot tell (`immediate` mode): closed at once, as before.
    Immediate,
}

/// How [`Closer::wait_established`] ended: the caller sends Close now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The dialer's data reached the daemon: its dial had completed.
    DataSeen,
    /// [`ACCEPT_SETTLE`] passed since the Accept.
    Waited,
    /// The dialer closed already (or the daemon forgot the connection).
    PeerGone,
}

impl Snapshot {
    /// The mode this reply shows, if it shows one.
    fn mode(&self) -> Mode {
        match self {
            Snapshot::Blind => Mode::Immediate,
            Snapshot::Listed(m) if m.iter().any(|(_, e)| e.is_none()) => Mode::Immediate,
            Snapshot::Listed(_) => Mode::Confirmed,
        }
    }
}

const ESTABLISHED: &str = "ESTABLISHED";

/// A connection whose Close waits for its data to be delivered: the
/// decision, apart from any I/O.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Bytes we sent on it (the payload of all its Send frames).
    pub sent: u64,
    pub last_send: Instant,
    linger: Duration,
    /// When the Close goes out unconfirmed, moved out by progress…
    pub deadline: Instant,
    /// …but never beyond this.
    cap: Instant,
    /// Successive answers that showed everything delivered.
    quiet: u8,
    /// Bytes acknowledged at the last answer, and when.
    acked: Option<(u64, Instant)>,
    /// `in_flight` at the last answer.
    in_flight: Option<u64>,
}

impl Delivery {
    pub fn new(sent: u64, last_send: Instant, now: Instant, linger: Duration) -> Delivery {
        Delivery {
            sent,
            last_send,
            linger,
            deadline: now + linger,
            cap: now + linger * LINGER_CAP,
            quiet: 0,
            acked: None,
            in_flight: None,
        }
    }

    /// Reads one answer, taken at `at` (when the Info was sent): the
    /// outcome, or `None` to wait for the next one.
    pub fn decide(&mut self, seen: Seen<'_>, at: Instant) -> Option<Outcome> {
        let e = match seen {
            Seen::Blind => return Some(Outcome::Immediate),
            Seen::Missing => {
                return Some(Outcome::Unconfirmed(
                    "the daemon no longer lists the connection".into(),
                ))
            }
            Seen::Entry(e) => e,
        };
        let all_sent = match e.bytes_sent {
            Some(b) => b >= self.sent,
            None => at >= self.last_send + NAGLE,
        };
        let delivered = all_sent && e.in_flight == 0 && e.unacked == 0;
        self.in_flight = Some(e.in_flight);
        if e.state != ESTABLISHED {
            // Nothing is retransmitted any more: waiting cannot help.
            return Some(if delivered {
                Outcome::Delivered
            } else {
                Outcome::Unconfirmed(format!(
                    "the connection went {} with {} bytes unacknowledged",
                    e.state,
                    e.in_flight
                        .saturating_add(self.sent.saturating_sub(e.bytes_sent.unwrap_or(self.sent)))
                ))
            });
        }
        if delivered {
            self.quiet += 1;
            // Twice, or once when the daemon counts bytes sent and was
            // asked at least the Nagle interval after the last Send: by then
            // nothing can still sit in its Nagle buffer, uncounted by
            // `in_flight` (one Info round less per close under churn).
            if self.quiet >= 2 || (e.bytes_sent.is_some() && at >= self.last_send + NAGLE) {
                return Some(Outcome::Delivered);
            }
        } else {
            self.quiet = 0;
        }
        if let Some(b) = e.bytes_sent {
            let acked = b.saturating_sub(e.in_flight);
            if let Some((before, then)) = self.acked {
                let dt = at.saturating_duration_since(then).as_secs_f64();
                if acked > before && dt > 0.0 {
                    let rate = (acked - before) as f64 / dt;
                    // Numbers from the daemon: any size, never an overflow.
                    let left = e.in_flight.saturating_add(self.sent.saturating_sub(b));
                    let need = Duration::from_secs_f64((left as f64 / rate).min(1e6));
                    self.deadline = self.deadline.max((at + need + self.linger).min(self.cap));
                }
            }
            self.acked = Some((acked, at));
        }
        if at >= self.deadline {
            return Some(self.expired());
        }
        None
    }

    /// The outcome once the deadline passed.
    fn expired(&self) -> Outcome {
        let what = match self.in_flight {
            Some(n) => format!("{n} bytes still in flight"),
            None => "the daemon did not answer".into(),
        };
        Outcome::Unconfirmed(format!(
            "not confirmed delivered within the close linger ({}s): {what}",
            self.linger.as_secs_f64()
        ))
    }
}

/// The decision for a Close that waits for the dialer's dial to complete.
pub fn settle(seen: Seen<'_>) -> Option<Settled> {
    match seen {
        Seen::Blind => None,
        Seen::Missing => Some(Settled::PeerGone),
        Seen::Entry(e) if e.state != ESTABLISHED => Some(Settled::PeerGone),
        Seen::Entry(e) if e.bytes_recv.unwrap_or(0) > 0 => Some(Settled::DataSeen),
        Seen::Entry(_) => None,
    }
}

enum Kind {
    Delivery(Delivery),
    Settle { until: Instant },
}

enum Done {
    Closed(Outcome),
    Settled(Settled),
}

/// What a deferred close runs once settled (see
/// [`Closer::close_when_established`]).
pub type Then = Box<dyn FnOnce() + Send>;

/// One connection waiting, as the poller sees it.
struct Slot {
    conn: u32,
    /// Only answers asked after this count (the last Send came before).
    since: Instant,
    kind: Kind,
    done: Option<Done>,
    /// A deferred close: no thread waits, the poller runs this.
    then: Option<Then>,
    /// The thread waiting for the verdict, woken (alone) when it comes:
    /// a condition variable shared by all would wake every waiting
    /// connection at every round (hundreds under churn).
    waiter: Option<thread::Thread>,
}

impl Slot {
    fn deadline(&self) -> Instant {
        match &self.kind {
            Kind::Delivery(d) => d.deadline,
            Kind::Settle { until } => *until,
        }
    }
}

struct Shared {
    slots: HashMap<u64, Slot>,
    next: u64,
    mode: Mode,
    /// When the mode was last learnt from the daemon.
    checked: Option<Instant>,
    stopped: bool,
    /// Info exchanges made.
    exchanges: u64,
    /// The poller has work and sleeps only until its next round, which
    /// takes in any slot registered meanwhile: no need to wake it.
    busy: bool,
}

/// Opens the poller's session to the daemon.
pub type Connect = Box<dyn Fn() -> io::Result<Session> + Send + Sync>;

struct Inner {
    connect: Connect,
    linger: Duration,
    shared: Mutex<Shared>,
    /// Wakes the poller: something to ask about, or stop.
    poller: Condvar,
    unconfirmed: AtomicU64,
    /// This node's own address (Info's `address`), from the first answer.
    local: Option<crate::address::PilotAddr>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The one poller of a gateway; share it (`Arc`) with every connection.
/// Dropping it stops the poller (without waiting for an exchange in
/// progress: signals and `stop` never wait on the daemon).
pub struct Closer {
    inner: Arc<Inner>,
}

impl Closer {
    /// Starts the poller for the daemon at `socket`, served by `daemon_uid`
    /// (the uid seen at start: `ipc::connect_by` refuses any other). It
    /// asks the daemon once, here, for the mode (on a session closed right
    /// after, so the running gateway's descriptors and daemon clients do
    /// not change behind its back: at most [`EXCHANGE_DEADLINE`]), then
    /// only while something is closing.
    pub fn start(socket: PathBuf, daemon_uid: Uid, linger: Duration) -> io::Result<Closer> {
        Closer::with_connect(
            Box::new(move || {
                let mut s = Session::connect_within(&socket, EXCHANGE_DEADLINE, Some(daemon_uid))?;
                s.set_timeout(Some(EXCHANGE_DEADLINE))?;
                s.set_max_reply(MAX_INFO);
                Ok(s)
            }),
            linger,
        )
    }

    /// [`start`](Closer::start) with another way to reach the daemon (tests).
    pub fn with_connect(connect: Connect, linger: Duration) -> io::Result<Closer> {
        // The first answer, once, as a tree: the node's address, and the
        // mode (a `conn_list`, even empty, says `confirmed`).
        let mut tree = None;
        let first = exchange(&connect, &mut None, &mut |raw| {
            tree = crate::json::parse_bytes(raw).ok()
        });
        let (mode, checked, local) = match (first, tree) {
            (Ok(()), Some(v)) => (
                if matches!(v.get("conn_list"), Some(Value::Arr(_) | Value::Null)) {
                    Mode::Confirmed
                } else {
                    Mode::Immediate
                },
                Some(Instant::now()),
                v.get("address")
                    .and_then(Value::as_str)
                    .and_then(|a| a.parse().ok()),
            ),
            _ => (Mode::Unknown, None, None),
        };
        let inner = Arc::new(Inner {
            connect,
            linger,
            shared: Mutex::new(Shared {
                slots: HashMap::new(),
                next: 0,
                mode,
                checked,
                stopped: false,
                exchanges: 1,
                busy: false,
            }),
            poller: Condvar::new(),
            unconfirmed: AtomicU64::new(0),
            local,
        });
        let i2 = inner.clone();
        thread::Builder::new()
            .name("close-poller".into())
            .stack_size(STACK)
            .spawn(move || poll(&i2))?;
        Ok(Closer { inner })
    }

    pub fn mode(&self) -> Mode {
        self.inner.lock().mode
    }

    /// This node's own pilot address, if the daemon's first Info gave it
    /// (PROXY headers name it as the destination).
    pub fn local_addr(&self) -> Option<crate::address::PilotAddr> {
        self.inner.local
    }

    pub fn linger(&self) -> Duration {
        self.inner.linger
    }

    /// Closes that went out unconfirmed so far.
    pub fn unconfirmed(&self) -> u64 {
        self.inner.unconfirmed.load(Relaxed)
    }

    /// Info exchanges made so far.
    pub fn exchanges(&self) -> u64 {
        self.inner.lock().exchanges
    }

    /// Blocks the calling connection thread until connection `conn` may be
    /// closed: everything it sent (`sent` bytes, the last at `last_send`)
    /// delivered, or the linger passed, or the daemon cannot tell. Call it
    /// after the last Send, then send Close whatever it returns.
    pub fn wait_delivered(&self, conn: u32, sent: u64, last_send: Instant) -> Outcome {
        if sent == 0 {
            return Outcome::Delivered; // nothing to lose
        }
        {
            let sh = self.inner.lock();
            let recent = sh.checked.is_some_and(|t| t.elapsed() < REDETECT);
            if sh.stopped || (sh.mode == Mode::Immediate && recent) {
                return Outcome::Immediate;
            }
        }
        let now = Instant::now();
        let kind = Kind::Delivery(Delivery::new(sent, last_send, now, self.inner.linger));
        let out = match self.wait(conn, kind) {
            Some(Done::Closed(o)) => o,
            Some(Done::Settled(_)) => Outcome::Immediate,
            None => Outcome::Immediate,
        };
        if matches!(out, Outcome::Unconfirmed(_)) {
            self.inner.unconfirmed.fetch_add(1, Relaxed);
        }
        out
    }

    /// Blocks the calling thread until a Close of the inbound connection
    /// `conn`, accepted at `accepted`, reaches its dialer (see the module
    /// notes): at most until [`ACCEPT_SETTLE`] after the Accept.
    pub fn wait_established(&self, conn: u32, accepted: Instant) -> Settled {
        let until = accepted + ACCEPT_SETTLE;
        let blind = {
            let sh = self.inner.lock();
            sh.stopped || sh.mode == Mode::Immediate
        };
        if blind || Instant::now() >= until {
            thread::sleep(until.saturating_duration_since(Instant::now()));
            return Settled::Waited;
        }
        match self.wait(conn, Kind::Settle { until }) {
            Some(Done::Settled(s)) => s,
            _ => Settled::Waited,
        }
    }

    /// [`wait_established`](Closer::wait_established) without blocking,
    /// for a thread that must not wait (an exposure's session reader):
    /// the poller thread runs `close` once the Close would reach the
    /// dialer, at most [`ACCEPT_SETTLE`] after `accepted`. `close` must be
    /// quick and bounded (write the Close frame under the session's writer
    /// lock, with its deadline). Beyond [`MAX_DEFERRED`] pending, or once
    /// the closer stopped, `close` runs at once, here.
    pub fn close_when_established(&self, conn: u32, accepted: Instant, close: Then) {
        let mut sh = self.inner.lock();
        let pending = sh.slots.values().filter(|s| s.then.is_some()).count();
        if sh.stopped || pending >= MAX_DEFERRED {
            drop(sh);
            return close();
        }
        let ticket = sh.next;
        sh.next += 1;
        sh.slots.insert(
            ticket,
            Slot {
                conn,
                since: Instant::now(),
                kind: Kind::Settle {
                    until: accepted + ACCEPT_SETTLE,
                },
                done: None,
                then: Some(close),
                waiter: None,
            },
        );
        // Always: its deadline may come before the poller's next wake-up.
        self.inner.poller.notify_one();
    }

    /// Ends the longest-waiting [`wait_delivered`](Closer::wait_delivered)
    /// now, unconfirmed: a new connection took its room in `--max-conns`
    /// (`relay::DataPath`'s lingering closes). `false` when none waits.
    pub fn cut_oldest(&self) -> bool {
        let mut sh = self.inner.lock();
        let oldest = sh
            .slots
            .iter_mut()
            .filter(|(_, s)| s.done.is_none() && matches!(s.kind, Kind::Delivery(_)))
            .min_by_key(|(&t, _)| t);
        let Some((_, slot)) = oldest else { return false };
        slot.done = Some(Done::Closed(Outcome::Unconfirmed(
            "cut short: every --max-conns slot was needed".into(),
        )));
        if let Some(t) = &slot.waiter {
            t.unpark();
        }
        true
    }

    /// Registers a slot and waits for its verdict or its deadline.
    fn wait(&self, conn: u32, kind: Kind) -> Option<Done> {
        let inner = &self.inner;
        let mut sh = inner.lock();
        let ticket = sh.next;
        sh.next += 1;
        sh.slots.insert(
            ticket,
            Slot {
                conn,
                since: Instant::now(),
                kind,
                done: None,
                then: None,
                waiter: Some(thread::current()),
            },
        );
        if !sh.busy {
            inner.poller.notify_one();
        }
        loop {
            let stopped = sh.stopped;
            let slot = sh.slots.get(&ticket)?;
            if slot.done.is_some() || stopped {
                break;
            }
            let now = Instant::now();
            let deadline = slot.deadline();
            if now >= deadline {
                break;
            }
            // The poller unparks this thread when the verdict is in (or it
            // stops); a wake-up for any other reason just looks again.
            drop(sh);
            thread::park_timeout(deadline - now);
            sh = inner.lock();
        }
        let slot = sh.slots.remove(&ticket)?;
        Some(match (slot.done, slot.kind) {
            (Some(done), _) => done,
            (None, Kind::Delivery(d)) => Done::Closed(d.expired()),
            (None, Kind::Settle { .. }) => Done::Settled(Settled::Waited),
        })
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        let mut sh = self.inner.lock();
        sh.stopped = true;
        sh.slots
            .values()
            .filter_map(|s| s.waiter.as_ref())
            .for_each(thread::Thread::unpark);
        drop(sh);
        self.inner.poller.notify_all();
    }
}

/// The poller: one Info exchange per round while anything waits.
fn poll(inner: &Inner) {
    let mut session: Option<Session> = None;
    let mut next_at = Instant::now();
    loop {
        // `asked` is taken under the lock that registers slots, so a slot
        // counts this answer only if it was among those asked about.
        let (wanted, asked) = {
            let mut sh = inner.lock();
            loop {
                if sh.stopped {
                    // Deferred closes go out now rather than never.
                    let run: Vec<Then> = sh.slots.values_mut().filter_map(|s| s.then.take()).collect();
                    drop(sh);
                    for close in run {
                        close();
                    }
                    return;
                }
                let now = Instant::now();
                // Deferred closes that are settled or due: run them, unlocked.
                let due: Vec<u64> = sh
                    .slots
                    .iter()
                    .filter(|(_, s)| s.then.is_some() && (s.done.is_some() || now >= s.deadline()))
                    .map(|(&t, _)| t)
                    .collect();
                if !due.is_empty() {
                    let run: Vec<Then> = due
                        .iter()
                        .filter_map(|t| sh.slots.remove(t).and_then(|s| s.then))
                        .collect();
                    drop(sh);
                    for close in run {
                        close();
                    }
                    sh = inner.lock();
                    continue;
                }
                // An `immediate` daemon has nothing to say about deferred
                // closes: they only wait out their time.
                let blind = sh.mode == Mode::Immediate;
                let work = sh
                    .slots
                    .values()
                    .any(|s| s.done.is_none() && !(blind && s.then.is_some()));
                if work && now >= next_at {
                    break;
                }
                let earliest = sh
                    .slots
                    .values()
                    .filter(|s| s.then.is_some())
                    .map(Slot::deadline)
                    .min();
                sh.busy = work;
                let nap = if work { next_at - now } else { IDLE_KEEP };
                let nap = earliest.map_or(nap, |e| nap.min(e.saturating_duration_since(now)));
                let (g, timeout) = inner.poller.wait_timeout(sh, nap).map_or_else(
                    |p| {
                        let (g, t) = p.into_inner();
                        (g, t.timed_out())
                    },
                    |(g, t)| (g, t.timed_out()),
                );
                sh = g;
                if !work && timeout && sh.slots.is_empty() && session.take().is_some() {
                    // Nothing closing for a while: the session and the large
                    // Info replies it read go, and so does the heap they grew.
                    crate::sys::proc::release_memory();
                }
            }
            let wanted = sh
                .slots
                .values()
                .filter(|s| s.done.is_none())
                .map(|s| s.conn)
                .collect::<Vec<u32>>();
            (wanted, Instant::now())
        };
        // Only the entries asked for are read out of the reply (`conn_list`
        // module notes: the daemon lists every connection it holds).
        let mut snap = Ok(Snapshot::Blind);
        let answer = exchange(&inner.connect, &mut session, &mut |raw| snap = scan(raw, &wanted))
            .and_then(|()| snap.map_err(|e| bad_reply(&e)));
        let took = asked.elapsed();
        next_at = Instant::now() + MIN_INTERVAL.max(took * ROUND_SHARE);
        let mut sh = inner.lock();
        sh.exchanges += 1;
        match &answer {
            Ok(snap) => {
                sh.mode = snap.mode();
                sh.checked = Some(Instant::now());
            }
            Err(_) => session = None,
        }
        for slot in sh.slots.values_mut() {
            if slot.done.is_some() || slot.since > asked {
                continue;
            }
            slot.done = match (&answer, &mut slot.kind) {
                (Ok(snap), Kind::Delivery(d)) => d.decide(snap.seen(slot.conn), asked).map(Done::Closed),
                (Ok(snap), Kind::Settle { .. }) => settle(snap.seen(slot.conn)).map(Done::Settled),
                (Err(e), Kind::Delivery(_)) => Some(Done::Closed(Outcome::Unconfirmed(format!(
                    "cannot ask the daemon: {e}"
                )))),
                (Err(_), Kind::Settle { .. }) => None,
            };
            if let (Some(_), Some(t)) = (&slot.done, &slot.waiter) {
                t.unpark();
            }
        }
    }
}

/// One Info exchange on the poller's session (opened if needed): `read`
/// gets the InfoOK payload, unparsed, in the session's buffer.
fn exchange(
    connect: &Connect,
    session: &mut Option<Session>,
    read: &mut dyn FnMut(&[u8]),
) -> crate::error::Result<()> {
    use crate::error::{Code, Error};
    let s = match session {
        Some(s) => s,
        None => session.insert(connect().map_err(|e| Error::io("connecting to the daemon", &e))?),
    };
    s.info_with(read)
        .map_err(|e| Error::new(Code::DaemonUnreachable, e.to_string()))
}

/// An Info reply that is not JSON, as the error a broken exchange gives.
fn bad_reply(e: &dyn std::fmt::Display) -> crate::error::Error {
    crate::error::Error::new(crate::error::Code::DaemonUnreachable, format!("InfoOK: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::{cmd, encode, FrameReader};
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;

    fn entry(state: &str, in_flight: u64, unacked: u64, bytes_sent: u64) -> Entry {
        Entry {
            state: state.into(),
            in_flight,
            unacked,
            bytes_sent: Some(bytes_sent),
            bytes_recv: Some(0),
        }
    }

    #[test]
    fn parses_conn_list_as_the_real_daemon_writes_it() {
        // The real entry from PROTOCOL.md, and one that lacks the fields.
        let v = br#"{"node_id":1,"conn_list":[{"id":40,"state":"ESTABLISHED","local_port":9000,
            "remote_addr":"0:0000.0000.0001","remote_port":49181,"bytes_sent":503808,
            "bytes_recv":8,"in_flight":225280,"unacked":55,"cong_win":90112},
            {"id":41,"state":"ESTABLISHED"},{"id":42,"state":"TIME_WAIT","in_flight":0,"unacked":0}]}"#;
        let parse_info = |v: &[u8], wanted: &[u32]| scan(v, wanted).unwrap();
        let snap = parse_info(v, &[40, 41, 43]);
        let Snapshot::Listed(m) = &snap else { panic!() };
        let m: HashMap<u32, Option<Entry>> = m.iter().cloned().collect();
        assert_eq!(
            m[&40],
            Some(Entry {
                state: "ESTABLISHED".into(),
                in_flight: 225280,
                unacked: 55,
                bytes_sent: Some(503808),
                bytes_recv: Some(8),
            })
        );
        assert_eq!(m[&41], None);
        assert!(!m.contains_key(&42), "not asked for");
        assert!(matches!(snap.seen(43), Seen::Missing));
        assert!(matches!(snap.seen(41), Seen::Blind));
        assert_eq!(snap.mode(), Mode::Immediate, "an entry without the fields");
        assert_eq!(parse_info(v, &[40]).mode(), Mode::Confirmed);
        let old = br#"{"node_id":1,"connections":0}"#;
        assert_eq!(parse_info(old, &[40]), Snapshot::Blind);
        let null = br#"{"conn_list":null}"#;
        assert_eq!(parse_info(null, &[1]), Snapshot::Listed(Vec::new()));
    }

    #[test]
    fn delivery_needs_two_quiet_answers_and_everything_sent() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = Delivery::new(1000, t0, t0, Duration::from_secs(5));
        // The daemon has not read all our Sends yet.
        assert_eq!(
            d.decide(Seen::Entry(&entry(ESTABLISHED, 0, 0, 600)), ms(10)),
            None
        );
        assert_eq!(
            d.decide(Seen::Entry(&entry(ESTABLISHED, 400, 1, 1000)), ms(20)),
            None
        );
        // Within the Nagle interval of the last Send, one quiet answer is
        // not enough; two are.
        assert_eq!(
            d.decide(Seen::Entry(&entry(ESTABLISHED, 0, 0, 1000)), ms(25)),
            None
        );
        assert_eq!(
            d.decide(Seen::Entry(&entry(ESTABLISHED, 0, 0, 1000)), ms(30)),
            Some(Outcome::Delivered)
        );
        // Past it, one quiet answer is, once everything was sent.
        let mut d = Delivery::new(1000, t0, t0, Duration::from_secs(5));
        assert_eq!(
            d.decide(Seen::Entry(&entry(ESTABLISHED, 0, 0, 600)), ms(50)),
            None
        );
        assert_eq!(
            d.decide(Seen::Entry(&entry(ESTABLISHED, 0, 0, 1000)), ms(60)),
            Some(Outcome::Delivered)
        );
        // Without bytes_sent: the Nagle interval after the last Send.
        let mut d = Delivery::new(10, t0, t0, Duration::from_secs(5));
        let mut e = entry(ESTABLISHED, 0, 0, 0);
        e.bytes_sent = None;
        assert_eq!(d.decide(Seen::Entry(&e), ms(10)), None);
        assert_eq!(d.decide(Seen::Entry(&e), ms(30)), None);
        assert_eq!(d.decide(Seen::Entry(&e), ms(45)), None);
        assert_eq!(d.decide(Seen::Entry(&e), ms(70)), Some(Outcome::Delivered));
    }

    #[test]
    fn delivery_gives_up_when_waiting_cannot_help_or_the_linger_passes() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut d = Delivery::new(1000, t0, t0, Duration::from_secs(5));
        assert!(matches!(
            d.decide(Seen::Entry(&entry("TIME_WAIT", 300, 2, 1000)), s(1)),
            Some(Outcome::Unconfirmed(w)) if w.contains("TIME_WAIT with 300 bytes")
        ));
        let mut d = Delivery::new(1000, t0, t0, Duration::from_secs(5));
        assert_eq!(
            d.decide(Seen::Entry(&entry("TIME_WAIT", 0, 0, 1000)), s(1)),
            Some(Outcome::Delivered),
            "the peer closed after taking everything"
        );
        assert_eq!(d.clone().decide(Seen::Blind, s(1)), Some(Outcome::Immediate));
        assert!(matches!(
            d.decide(Seen::Missing, s(1)),
            Some(Outcome::Unconfirmed(_))
        ));
        // No progress: unconfirmed at the linger.
        let mut d = Delivery::new(1000, t0, t0, Duration::from_secs(5));
        let stuck = entry(ESTABLISHED, 500, 1, 1000);
        assert_eq!(d.decide(Seen::Entry(&stuck), s(1)), None);
        assert_eq!(d.decide(Seen::Entry(&stuck), s(4)), None);
        assert!(matches!(
            d.decide(Seen::Entry(&stuck), s(5)),
            Some(Outcome::Unconfirmed(w)) if w.contains("close linger (5s)") && w.contains("500 bytes")
        ));
    }

    /// Red-team pass of issue 18: absurd counts from the daemon (u64::MAX
    /// in flight) neither overflow (a panic with overflow checks, a
    /// wrong count without) nor move the deadline past the cap.
    #[test]
    fn absurd_counts_from_the_daemon_neither_overflow_nor_pass_the_cap() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut d = Delivery::new(1000, t0, t0, Duration::from_secs(5));
        let e = entry("TIME_WAIT", u64::MAX, u64::MAX, 10);
        assert!(matches!(
            d.decide(Seen::Entry(&e), s(1)),
            Some(Outcome::Unconfirmed(w)) if w.contains(&format!("{} bytes", u64::MAX))
        ));
        let mut d = Delivery::new(u64::MAX, t0, t0, Duration::from_secs(5));
        assert_eq!(
            d.decide(Seen::Entry(&entry(ESTABLISHED, u64::MAX, 1, 0)), s(1)),
            None
        );
        assert_eq!(
            d.decide(Seen::Entry(&entry(ESTABLISHED, u64::MAX - 1, 1, u64::MAX)), s(2)),
            None
        );
        assert!(d.deadline <= s(60), "within the cap");
    }

    #[test]
    fn progress_moves_the_linger_to_what_the_rest_needs_within_the_cap() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        // 10 MB to go out at 100 kB/s: 100 s needed, capped at 12 × 5 s.
        let mut d = Delivery::new(10_000_000, t0, t0, Duration::from_secs(5));
        assert_eq!(
            d.decide(Seen::Entry(&entry(ESTABLISHED, 100_000, 25, 100_000)), s(1)),
            None
        );
        assert_eq!(
            d.decide(Seen::Entry(&entry(ESTABLISHED, 100_000, 25, 200_000)), s(2)),
            None
        );
        assert_eq!(d.deadline, s(60));
        // 1 MB left at 1 MB/s: 1 s plus the linger.
        let mut d = Delivery::new(2_000_000, t0, t0, Duration::from_secs(5));
        assert_eq!(d.decide(Seen::Entry(&entry(ESTABLISHED, 0, 0, 0)), s(1)), None);
        assert_eq!(
            d.decide(Seen::Entry(&entry(ESTABLISHED, 0, 0, 1_000_000)), s(2)),
            None
        );
        assert_eq!(d.deadline, s(8));
    }

    #[test]
    fn settle_waits_for_the_dialer() {
        let mut e = entry(ESTABLISHED, 0, 0, 0);
        assert_eq!(settle(Seen::Entry(&e)), None);
        e.bytes_recv = Some(80);
        assert_eq!(settle(Seen::Entry(&e)), Some(Settled::DataSeen));
        e.state = "TIME_WAIT".into();
        assert_eq!(settle(Seen::Entry(&e)), Some(Settled::PeerGone));
        assert_eq!(settle(Seen::Missing), Some(Settled::PeerGone));
        assert_eq!(settle(Seen::Blind), None);
    }

    /// A scripted daemon on one end of a socket pair: answers each Info
    /// with what `reply` returns (given the number of Infos so far), and
    /// reports each exchange on `asked`.
    fn scripted(reply: impl Fn(u64) -> Vec<u8> + Send + Sync + 'static) -> (Connect, mpsc::Receiver<u64>) {
        let (tx, rx) = mpsc::channel();
        let reply = Arc::new(reply);
        let n = Arc::new(AtomicU64::new(0));
        let connect: Connect = Box::new(move || {
            let (ours, theirs) = UnixStream::pair()?;
            let (reply, tx, n) = (reply.clone(), tx.clone(), n.clone());
            thread::spawn(move || {
                let mut r = FrameReader::new(theirs.try_clone().unwrap(), 4096);
                let mut w = theirs;
                while let Ok((c, _)) = r.read_frame() {
                    assert_eq!(c, cmd::INFO);
                    let i = n.fetch_add(1, Relaxed);
                    let _ = tx.send(i);
                    if w.write_all(&reply(i)).is_err() {
                        return;
                    }
                }
            });
            let mut s = Session::from_stream(ours)?;
            s.set_timeout(Some(Duration::from_secs(2)))?;
            Ok(s)
        });
        (connect, rx)
    }

    fn info_ok(json: &str) -> Vec<u8> {
        encode(cmd::INFO_OK, &[json.as_bytes()])
    }

    fn listing(conns: impl Iterator<Item = u32>, in_flight: u64, sent: u64) -> Vec<u8> {
        let list: Vec<String> = conns
            .map(|id| {
                format!(
                    r#"{{"id":{id},"state":"ESTABLISHED","in_flight":{in_flight},"unacked":{},"bytes_sent":{sent},"bytes_recv":0}}"#,
                    u64::from(in_flight > 0)
                )
            })
            .collect();
        info_ok(&format!(r#"{{"node_id":1,"conn_list":[{}]}}"#, list.join(",")))
    }

    fn wait_mode(c: &Closer, m: Mode) {
        let until = Instant::now() + Duration::from_secs(5);
        while c.mode() != m && Instant::now() < until {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(c.mode(), m);
    }

    #[test]
    fn confirmed_once_the_daemon_reports_it_delivered() {
        // Infos 0 (detection) and 1 still show data in flight.
        let (connect, _asked) = scripted(|i| listing(7..8, if i < 2 { 4096 } else { 0 }, 5000));
        let c = Closer::with_connect(connect, Duration::from_secs(5)).unwrap();
        wait_mode(&c, Mode::Confirmed);
        assert_eq!(c.wait_delivered(7, 0, Instant::now()), Outcome::Delivered);
        assert_eq!(c.exchanges(), 1, "nothing sent: no need to ask");
        let t = Instant::now();
        assert_eq!(c.wait_delivered(7, 5000, t), Outcome::Delivered);
        // Rounds are MIN_INTERVAL (the Nagle interval) apart: the first
        // quiet answer is already past it, and conclusive.
        assert!(c.exchanges() >= 3, "in flight, in flight, quiet");
        assert_eq!(c.unconfirmed(), 0);
    }

    #[test]
    fn unconfirmed_after_the_linger() {
        let (connect, _asked) = scripted(|_| listing(7..8, 4096, 5000));
        let c = Closer::with_connect(connect, Duration::from_millis(300)).unwrap();
        let t = Instant::now();
        let out = c.wait_delivered(7, 5000, t);
        assert!(
            matches!(&out, Outcome::Unconfirmed(w) if w.contains("4096 bytes")),
            "{out:?}"
        );
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(c.unconfirmed(), 1);
    }

    #[test]
    fn a_daemon_without_conn_list_gets_an_immediate_close() {
        let (connect, asked) = scripted(|_| info_ok(r#"{"node_id":1,"connections":3}"#));
        let c = Closer::with_connect(connect, Duration::from_secs(5)).unwrap();
        wait_mode(&c, Mode::Immediate);
        let before = c.exchanges();
        let t = Instant::now();
        assert_eq!(c.wait_delivered(7, 5000, t), Outcome::Immediate);
        assert!(t.elapsed() < Duration::from_millis(100));
        assert_eq!(c.exchanges(), before, "no exchange per close once known");
        drop(asked);
        // The fail-fast wait still waits for the dialer's dial.
        let accepted = Instant::now();
        assert_eq!(c.wait_established(7, accepted), Settled::Waited);
        assert!(accepted.elapsed() >= ACCEPT_SETTLE);
    }

    #[test]
    fn many_closing_connections_cost_one_info_per_interval() {
        // Everything delivered from the third Info on.
        let (connect, _asked) = scripted(|i| listing(0..1000, if i < 3 { 4096 } else { 0 }, 100));
        let c = Arc::new(Closer::with_connect(connect, Duration::from_secs(10)).unwrap());
        wait_mode(&c, Mode::Confirmed);
        let t = Instant::now();
        let threads: Vec<_> = (0..1000)
            .map(|id| {
                let c = c.clone();
                thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || c.wait_delivered(id, 100, t))
                    .unwrap()
            })
            .collect();
        for th in threads {
            assert_eq!(th.join().unwrap(), Outcome::Delivered);
        }
        let took = t.elapsed();
        let exchanges = c.exchanges();
        // One exchange per interval, whatever the number of connections.
        let bound = 2 + took.as_millis() as u64 / MIN_INTERVAL.as_millis() as u64;
        assert!(exchanges <= bound, "{exchanges} exchanges in {took:?}");
        assert!(exchanges < 100, "{exchanges} exchanges for 1000 closes");
    }

    #[test]
    fn a_slow_info_spaces_the_rounds_by_its_share() {
        // Each answer takes 25 ms, as a daemon listing thousands does: the
        // next round comes no sooner than ROUND_SHARE times that.
        const SLOW: Duration = Duration::from_millis(25);
        let at = Arc::new(Mutex::new(Vec::new()));
        let at2 = at.clone();
        let (connect, _asked) = scripted(move |_| {
            at2.lock().unwrap().push(Instant::now());
            thread::sleep(SLOW);
            listing(7..8, 4096, 5000)
        });
        let c = Closer::with_connect(connect, Duration::from_millis(1500)).unwrap();
        wait_mode(&c, Mode::Confirmed);
        let out = c.wait_delivered(7, 5000, Instant::now());
        assert!(matches!(out, Outcome::Unconfirmed(_)), "{out:?}");
        drop(c);
        // The first Info (the mode's detection, at start) is not a round.
        let at = at.lock().unwrap()[1..].to_vec();
        assert!(at.len() >= 3, "{} rounds", at.len());
        for gap in at.windows(2).map(|w| w[1] - w[0]) {
            assert!(gap >= SLOW * ROUND_SHARE, "rounds {gap:?} apart");
        }
    }

    #[test]
    fn an_error_frame_or_a_daemon_gone_leaves_the_close_unconfirmed_at_once() {
        let (connect, _asked) = scripted(|i| {
            if i == 0 {
                listing(0..0, 0, 0)
            } else {
                encode(cmd::ERROR, &[&1u16.to_be_bytes(), b"info marshal: broken"])
            }
        });
        let c = Closer::with_connect(connect, Duration::from_secs(5)).unwrap();
        wait_mode(&c, Mode::Confirmed);
        let t = Instant::now();
        let out = c.wait_delivered(7, 10, t);
        assert!(
            matches!(&out, Outcome::Unconfirmed(w) if w.contains("info marshal: broken")),
            "{out:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(1));

        // A daemon that is gone: connecting fails.
        let gone: Connect = Box::new(|| Err(io::Error::new(io::ErrorKind::ConnectionRefused, "refused")));
        let c = Closer::with_connect(gone, Duration::from_secs(5)).unwrap();
        let t = Instant::now();
        let out = c.wait_delivered(7, 10, t);
        assert!(
            matches!(&out, Outcome::Unconfirmed(w) if w.contains("refused")),
            "{out:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(c.mode(), Mode::Unknown);
        // A daemon that never answers: the linger still bounds the wait.
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let held = Mutex::new(Some(ours));
        let mute: Connect = Box::new(move || {
            let s = held.lock().unwrap().take().ok_or(io::ErrorKind::NotConnected)?;
            let mut s = Session::from_stream(s)?;
            s.set_timeout(Some(Duration::from_secs(1)))?;
            Ok(s)
        });
        let c = Closer::with_connect(mute, Duration::from_millis(200)).unwrap();
        let t = Instant::now();
        assert!(matches!(c.wait_delivered(7, 10, t), Outcome::Unconfirmed(_)));
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_deferred_close_runs_on_the_poller_once_settled() {
        let when = |c: &Closer, conn: u32| {
            let (tx, rx) = mpsc::channel();
            let accepted = Instant::now();
            c.close_when_established(
                conn,
                accepted,
                Box::new(move || tx.send(accepted.elapsed()).unwrap()),
            );
            rx.recv_timeout(Duration::from_secs(5)).unwrap()
        };
        // A daemon without conn_list: the settle time, no exchange for it.
        let (connect, _asked) = scripted(|_| info_ok(r#"{"node_id":1}"#));
        let c = Closer::with_connect(connect, Duration::from_secs(5)).unwrap();
        wait_mode(&c, Mode::Immediate);
        let took = when(&c, 9);
        assert!(took >= ACCEPT_SETTLE && took < ACCEPT_SETTLE * 2, "{took:?}");
        assert_eq!(c.exchanges(), 1);
        // Data from the dialer: at once.
        let (connect, _asked) = scripted(|_| {
            info_ok(
                r#"{"conn_list":[{"id":9,"state":"ESTABLISHED","in_flight":0,"unacked":0,"bytes_recv":5}]}"#,
            )
        });
        let c = Closer::with_connect(connect, Duration::from_secs(5)).unwrap();
        wait_mode(&c, Mode::Confirmed);
        assert!(when(&c, 9) < ACCEPT_SETTLE);
        // A closer that stops runs what it holds rather than dropping it
        // (here a daemon that cannot be reached, so nothing settles it).
        let gone: Connect = Box::new(|| Err(io::ErrorKind::ConnectionRefused.into()));
        let c = Closer::with_connect(gone, Duration::from_secs(5)).unwrap();
        let (tx, rx) = mpsc::channel();
        c.close_when_established(
            9,
            Instant::now() + Duration::from_secs(60),
            Box::new(move || tx.send(()).unwrap()),
        );
        thread::sleep(Duration::from_millis(100));
        assert!(rx.try_recv().is_err(), "ran before its time");
        drop(c);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn wait_established_ends_early_when_the_dialer_has_sent() {
        let (connect, _asked) = scripted(|_| {
            info_ok(
                r#"{"conn_list":[{"id":9,"state":"ESTABLISHED","in_flight":0,"unacked":0,"bytes_sent":0,"bytes_recv":77}]}"#,
            )
        });
        let c = Closer::with_connect(connect, Duration::from_secs(5)).unwrap();
        wait_mode(&c, Mode::Confirmed);
        let t = Instant::now();
        assert_eq!(c.wait_established(9, t), Settled::DataSeen);
        assert!(t.elapsed() < ACCEPT_SETTLE);
        // Not listed: the dialer is gone.
        assert_eq!(c.wait_established(10, Instant::now()), Settled::PeerGone);
    }
}
