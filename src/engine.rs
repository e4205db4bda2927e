//! The connection engine: what every bridged connection shares, whichever
//! way it goes. A *map* connection (`relay`) is a local TCP client that we
//! Dial an agent for, on a pilot session of its own; an *exposed* one
//! (`expose::conn`) is an inbound pilot connection Accepted on the
//! exposure's shared session that we connect to a local service for.
//! Both are "a TCP socket on one side, a pilot stream on the other", and
//! this module is everything that does not care which:
//!
//! - [`Ending`]: how a connection ended, the same words in the event log,
//!   the access log and the counters, both directions;
//! - [`Core`]: the state both threads of a connection share (the TCP
//!   socket, the idle clock, byte counts, the pilot connection id, the
//!   first abnormal ending);
//! - [`Bridge`]: the few things a direction supplies (how to write a frame
//!   to its pilot side, how to tear itself down);
//! - [`copy_to_pilot`]: the TCP→pilot copy loop, with the idle timeout;
//!   [`write_to_local`] and [`linger_after_remote_close`]: the pilot→TCP
//!   side's writes and its end;
//! - [`send_close`] / [`Core::close_once`]: the ONE place a pilot Close is
//!   sent for a connection, after what must happen first (see "Closing");
//! - [`finish`]: the cleanup both directions run exactly once (Close,
//!   log line, access-log record through the direction's hook);
//! - [`warn_source`]: the rate limiter for every line a client or a peer
//!   can cause at will (per kind *and* per source), and
//!   [`flush_suppressed`] for the periodic "N similar suppressed" line.
//!
//! Where the directions really differ stays with them: who dials (Dial on
//! a session per connection vs Accept on the shared session, with its
//! bounded queue and pacing), the local-client check vs the allow-list,
//! what a TCP EOF means (a client's half-close vs a service's end).
//!
//! # Closing (issue 19; the daemon's side is in `closing`'s module notes)
//!
//! The Feb-2026 daemon (upstream `pkg/daemon/daemon.go`,
//! `CloseConnection`) sends FIN at once on Close and stops retransmitting
//! (`retxLoop` serves ESTABLISHED connections only), so whatever is still
//! unacknowledged or in its Nagle buffer is lost: the reader gets a prefix.
//! And a Close within a few ms of an Accept reaches the dialer before its
//! dial completed, so it waits out its whole dial timeout. Hence
//! [`Core::close_once`], the one way a connection's Close goes out:
//!
//! - a *normal* ending (no ending recorded, `Ok` or `ClientClosed`: the
//!   TCP side finished sending and every byte read from it was Sent) with
//!   bytes sent waits in [`Closer::wait_delivered`] until the daemon lists
//!   them delivered (bounded by `--close-linger`; past it the Close goes
//!   out anyway and a rate-limited `close_unconfirmed` line is logged);
//! - any connection Accepted less than `closing::ACCEPT_SETTLE` ago (an
//!   exposure's target down, a service that closes at once, a reset right
//!   away) waits in [`Closer::wait_established`] so the dialer sees the
//!   close at once instead of after its dial timeout; refusals decided on
//!   the exposure's session reader use [`Closer::close_when_established`]
//!   (`expose::accept`), which must not block;
//! - everything else (resets, teardown by `unmap`/`stop`, the peer already
//!   closed) closes at once: nothing more is worth delivering.
//!
//! Without a closer (its thread could not start; unit tests) or on a daemon
//! whose Info cannot tell (`closing::Mode::Immediate`: no `conn_list`, as
//! before Feb-2026, or devd `--no-conn-list`), every Close is immediate,
//! as it always was.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::closing::{self, Closer, Outcome};
use crate::ipc::{self, cmd};
use crate::log::{suppressed_note, Level, RateLimit};
use crate::sys;

/// Stack of each connection thread. The threads keep their buffers on the
/// heap and never recurse, so a small stack is plenty; it keeps thousands
/// of connections cheap in address space. Measured: the integration tests
/// (debug builds, which use far more stack than release) and `make bench`
/// run with 16 KiB; four times that leaves margin. (A smaller size would
/// not lower RSS, and glibc's cache of exited threads' stacks, 40 MiB,
/// would hold more of them.) What an idle thread touches, measured with
/// smaps and pagemap at 5,000 idle connections: with glibc, two pages,
/// whatever our frames: glibc puts its thread descriptor (2,368 bytes)
/// and the static TLS block (with its surplus for dlopen) at the top of
/// the stack, so the first frame is already ~3.6 KiB down and std's start
/// frames reach the second page; with musl (`make static`), one page.
pub const THREAD_STACK: usize = 64 * 1024;

/// Buffers exist only while data moves: a thread waits for its socket in
/// poll(2) without one, allocates it when the socket is readable, and
/// gives it back once the socket has stayed drained for [`KEEP_WARM`], so
/// an idle connection holds none. They start small and double (up to the
/// limit) whenever one read fills them, so a busy connection soon moves
/// data in large gulps with few syscalls. Sizes chosen with `make bench`
/// (see docs/PERFORMANCE.md).
pub const BUFFER_START: usize = 16 * 1024;

/// How long a drained socket may stay quiet before its buffer is given
/// back. A busy stream drains for a moment between reads (its sender has
/// not caught up yet): giving the buffer back then and allocating it
/// zeroed again a moment later cost the download thread a third of its
/// CPU in memset (perf, `make bench`). An idle connection still holds
/// none: only for this long after its last read.
pub const KEEP_WARM: Duration = Duration::from_millis(10);

/// Whether `fd` becomes readable within [`KEEP_WARM`]: `false` means the
/// caller's buffer may go back (an error counts as readable: the next
/// read reports it).
pub fn readable_soon(fd: &impl AsRawFd) -> bool {
    sys::net::wait_readable(fd, KEEP_WARM).unwrap_or(true)
}

/// How long the TCP side may keep its socket open after the pilot side
/// has closed (CloseOK), to finish reading what it was sent.
pub const LINGER: Duration = Duration::from_secs(2);

/// Bound on writing the Close frame when a connection is cleaned up, so
/// a daemon that stopped reading cannot hold a cleanup for long.
const CLOSE_WRITE: Duration = Duration::from_secs(1);

/// How a connection ended, for the event log, the access log and the
/// counters: one vocabulary for both directions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Both sides finished normally.
    Ok,
    /// The TCP side closed its socket (not just its sending side): nobody
    /// can read a reply, so the stream was closed at once. A normal end.
    ClientClosed,
    /// Map: the daemon could not open the stream to the agent.
    DialFailed(String),
    /// Expose: the local service could not be reached.
    ConnectFailed(String),
    /// Never admitted (allow-list, limits, draining, another host).
    Refused(String),
    /// Cut: both sides torn down, the TCP side reset.
    Reset(String),
    /// Nothing moved either way for `--idle-timeout`.
    IdleTimeout,
    /// The client shut its sending side and nothing came back for
    /// `--half-closed-timeout`.
    HalfClosedTimeout,
}

impl Ending {
    pub fn label(&self) -> &'static str {
        match self {
            Ending::Ok => "ok",
            Ending::ClientClosed => "client_closed",
            Ending::DialFailed(_) => "dial_failed",
            Ending::ConnectFailed(_) => "connect_failed",
            Ending::Refused(_) => "refused",
            Ending::Reset(_) => "reset",
            Ending::IdleTimeout => "idle_timeout",
            Ending::HalfClosedTimeout => "half_closed_timeout",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Ending::DialFailed(r) | Ending::ConnectFailed(r) | Ending::Refused(r) | Ending::Reset(r) => r,
            Ending::Ok | Ending::ClientClosed | Ending::IdleTimeout | Ending::HalfClosedTimeout => "",
        }
    }

    /// Whether either timer ended it (counted as `idle_timeouts`).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Ending::IdleTimeout | Ending::HalfClosedTimeout)
    }

    /// Normal ends are debug detail; timeouts are worth an info line; a
    /// cut, failed or refused connection is a warning (rate-limited: see
    /// [`report`]). A failed dial is warned about where it fails, with
    /// what was dialled (and refusals where they are refused).
    fn level(&self) -> Level {
        match self {
            Ending::Ok | Ending::ClientClosed | Ending::DialFailed(_) | Ending::Refused(_) => Level::Debug,
            Ending::IdleTimeout | Ending::HalfClosedTimeout => Level::Info,
            Ending::ConnectFailed(_) | Ending::Reset(_) => Level::Warn,
        }
    }
}

/// What a frame carries, for the pilot side's writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A Send frame of this connection's data.
    Data,
    /// The Close frame (see [`send_close`]).
    Close,
}

/// Where a connection's frames for the daemon go: its own session (map)
/// or the exposure's shared one (expose).
pub trait PilotSide: Send + Sync {
    /// Writes one whole frame; `Err` says why the session cannot go on.
    fn send(&self, frame: &[u8], what: Frame) -> crate::error::Result<()>;
}

/// Sends Close for pilot connection `id` on `side`. This is the one
/// function through which the engine closes a pilot connection, in both
/// directions (cleanup, a service's end, refused Accepts). What must
/// happen before a Close (waiting until the daemon reports the
/// connection's bytes delivered, or its Accept settled) is done by the
/// callers: [`Core::close_once`] and `expose::accept` (module notes,
/// "Closing").
pub fn send_close(side: &dyn PilotSide, id: u32) -> bool {
    side.send(&ipc::encode(cmd::CLOSE, &[&id.to_be_bytes()]), Frame::Close)
        .is_ok()
}

/// The state one connection's threads share, whichever the direction.
#[derive(Default)]
pub struct Core {
    /// The TCP side: set at once for a map client, once connected for an
    /// exposed connection's service.
    pub tcp: OnceLock<TcpStream>,
    started: OnceLock<Instant>,
    /// Milliseconds since `started` of the last byte moved either way.
    last_active: AtomicU64,
    /// Bytes TCP→pilot (map: up; expose: out) and pilot→TCP.
    pub to_pilot: AtomicU64,
    pub from_pilot: AtomicU64,
    /// The pilot connection id, once known (DialOK, Accept).
    pub pilot_conn: OnceLock<u32>,
    /// CloseOK seen: the daemon has forgotten the connection.
    pub remote_closed: AtomicBool,
    /// When the first CloseOK came: the TCP side's [`LINGER`] counts from it.
    remote_closed_at: OnceLock<Instant>,
    close_sent: AtomicBool,
    /// Microseconds since `started` of the end of the last Send.
    last_send: AtomicU64,
    /// Decides when the Close may go out (see "Closing"); none: at once.
    pub closer: OnceLock<std::sync::Arc<Closer>>,
    /// When the daemon Accepted this (inbound) connection.
    pub accepted: OnceLock<Instant>,
    /// The connection's `--max-conns` slot, freed by [`finish`].
    slot: Mutex<Option<Slot>>,
    /// The TCP→pilot thread has ended.
    pub local_done: AtomicBool,
    /// The first ending other than a plain `Ok`; none means it ended normally.
    pub ending: OnceLock<Ending>,
    /// The threads, woken from a wait when the other side ends.
    reader: OnceLock<thread::Thread>,
    writer: OnceLock<thread::Thread>,
}

impl Core {
    pub fn new() -> Core {
        let c = Core::default();
        let _ = c.started.set(Instant::now());
        c
    }

    pub fn started(&self) -> Instant {
        *self.started.get_or_init(Instant::now)
    }

    pub fn tcp(&self) -> Option<&TcpStream> {
        self.tcp.get()
    }

    pub fn touch(&self) {
        self.last_active
            .store(self.started().elapsed().as_millis() as u64, Relaxed);
    }

    /// How long until `idle` passes without a byte; `None` if it has.
    pub fn idle_left(&self, idle: Duration) -> Option<Duration> {
        let since = self
            .started()
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_active.load(Relaxed)));
        idle.checked_sub(since).filter(|d| !d.is_zero())
    }

    pub fn is_over(&self) -> bool {
        self.ending.get().is_some()
    }

    /// Records an abnormal ending (the first one wins) and makes the TCP
    /// side reset when it closes; shutting its reading side wakes a thread
    /// in a read without sending a FIN, which could pass for a complete
    /// stream. The direction then wakes what else waits ([`Bridge::fail`]).
    pub fn fail_tcp(&self, ending: Ending) {
        let _ = self.ending.set(ending);
        if let Some(tcp) = self.tcp.get() {
            sys::net::set_linger_zero(tcp);
            let _ = tcp.shutdown(Shutdown::Read);
        }
        self.wake();
    }

    /// Registers the calling thread as the TCP→pilot (`reader`) or the
    /// pilot→TCP (`writer`) thread, for [`Core::wake`].
    pub fn register_reader(&self) {
        let _ = self.reader.set(thread::current());
    }

    pub fn register_writer(&self) {
        let _ = self.writer.set(thread::current());
    }

    /// Wakes both threads from a parked wait.
    pub fn wake(&self) {
        self.reader.get().inspect(|t| t.unpark());
        self.writer.get().inspect(|t| t.unpark());
    }

    /// Sends Close once, unless the daemon has ended the connection.
    pub fn close_once(&self, side: &dyn PilotSide) {
        let Some(&id) = self.pilot_conn.get() else { return };
        if self.remote_closed.load(Relaxed) || self.close_sent.swap(true, Relaxed) {
            return;
        }
        if let Some(closer) = self.closer.get() {
            self.before_close(closer, id);
            if self.remote_closed.load(Relaxed) {
                return; // the peer closed meanwhile: the daemon forgot it
            }
        }
        send_close(side, id);
    }

    /// Waits, as the module notes ("Closing") say, until a Close of `id`
    /// loses nothing; bounded by the closer (`--close-linger`, or
    /// `closing::ACCEPT_SETTLE` after an Accept).
    fn before_close(&self, closer: &Closer, id: u32) {
        let normal = matches!(self.ending.get(), None | Some(Ending::Ok | Ending::ClientClosed));
        let sent = self.to_pilot.load(Relaxed);
        if normal && sent > 0 {
            if let Outcome::Unconfirmed(why) = closer.wait_delivered(id, sent, self.last_send()) {
                report(
                    Level::Warn,
                    "close_unconfirmed",
                    "",
                    format_args!("pilot connection {id}: closed before the daemon confirmed delivery ({sent} B sent): {why}"),
                );
            }
            return;
        }
        if let Some(&at) = self.accepted.get() {
            if at.elapsed() < closing::ACCEPT_SETTLE {
                closer.wait_established(id, at);
            }
        }
    }

    /// When the last Send ended (the start, before any).
    pub fn last_send(&self) -> Instant {
        self.started() + Duration::from_micros(self.last_send.load(Relaxed))
    }

    fn sent_now(&self) {
        self.last_send
            .store(self.started().elapsed().as_micros() as u64, Relaxed);
    }
}

/// What a direction supplies to the engine.
pub trait Bridge: PilotSide {
    fn core(&self) -> &Core;
    /// Ends the connection abnormally: [`Core::fail_tcp`] plus whatever
    /// else of this direction must wake (its session, its queue).
    fn fail(&self, ending: Ending);
}

/// The TCP side reached EOF, or sent data after the pilot side closed.
#[derive(Debug, PartialEq, Eq)]
pub enum CopyEnd {
    /// EOF from the TCP side.
    Eof,
    /// Torn down, idle, or failed: the ending is recorded.
    Over,
    /// Data arrived after CloseOK and the linger is over.
    LateData,
}

/// Waits, without a buffer, until `fd` has something to read. `false` once
/// the connection is over: torn down elsewhere, or idle past `idle`.
pub fn wait_readable(b: &dyn Bridge, fd: &impl AsRawFd, idle: Duration) -> bool {
    let c = b.core();
    loop {
        if c.is_over() {
            return false;
        }
        let Some(left) = c.idle_left(idle) else {
            b.fail(Ending::IdleTimeout);
            return false;
        };
        match sys::net::wait_readable(fd, left.max(Duration::from_millis(10))) {
            Ok(true) => return true,
            Ok(false) => {} // timed out or interrupted: check the limits again
            Err(e) => {
                b.fail(Ending::Reset(format!("poll: {e}")));
                return false;
            }
        }
    }
}

/// Copies TCP→pilot: reads into `buf[9..]`, writes the Send header into
/// `buf[..9]`, one frame per read, until EOF or the end. While the TCP
/// side is quiet the thread waits in poll(2) and holds no buffer (see
/// [`BUFFER_START`]), and the idle limit applies. `max` bounds one read
/// (one frame's data). Data after CloseOK cannot be delivered: it is
/// dropped until the linger is over (`drop_late`) or ends the loop.
pub fn copy_to_pilot(b: &dyn Bridge, idle: Duration, max: usize, drop_late: bool) -> CopyEnd {
    let c = b.core();
    let (Some(&id), Some(tcp)) = (c.pilot_conn.get(), c.tcp()) else {
        return CopyEnd::Over;
    };
    c.register_reader();
    let mut buf = Vec::new();
    let mut size = BUFFER_START.min(max);
    let mut r = tcp;
    loop {
        if buf.is_empty() {
            if !wait_readable(b, tcp, idle) {
                return CopyEnd::Over;
            }
            buf = vec![0u8; ipc::DATA_HEADER + size];
        }
        match r.read(&mut buf[ipc::DATA_HEADER..]) {
            // A teardown shuts the reading side: that EOF is not the TCP side's.
            Ok(0) if c.is_over() => return CopyEnd::Over,
            Ok(0) => return CopyEnd::Eof,
            Ok(n) => {
                if c.remote_closed.load(Relaxed) {
                    if !drop_late || lingered(c) {
                        return CopyEnd::LateData;
                    }
                    continue;
                }
                ipc::put_send_header(&mut buf, id, n);
                if let Err(why) = b.send(&buf[..ipc::DATA_HEADER + n], Frame::Data) {
                    b.fail(Ending::Reset(why.message));
                    return CopyEnd::Over;
                }
                c.to_pilot.fetch_add(n as u64, Relaxed);
                c.sent_now();
                c.touch();
                if ipc::DATA_HEADER + n == buf.len() && n < max {
                    size = (size * 2).min(max);
                    buf.resize(ipc::DATA_HEADER + size, 0);
                } else if !readable_soon(tcp) {
                    // Drained and quiet: give the buffer back; a busy
                    // stream grows it again within a few reads.
                    size = (size / 2).max(BUFFER_START.min(max));
                    buf = Vec::new();
                }
            }
            // poll said readable, so a timeout is a spurious wake-up: wait
            // again (and check the idle limit) without the buffer.
            Err(e) if ipc::is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => buf = Vec::new(),
            Err(e) => {
                // Shut down by the other thread or from outside, or a reset.
                if !c.is_over() && !c.remote_closed.load(Relaxed) {
                    b.fail(Ending::Reset(format!("reading the TCP side: {e}")));
                }
                return CopyEnd::Over;
            }
        }
    }
}

/// Whether the TCP side has had its [`LINGER`] since the remote closed.
fn lingered(c: &Core) -> bool {
    c.remote_closed_at.get().is_some_and(|t| t.elapsed() >= LINGER)
}

impl Core {
    /// CloseOK (the daemon may send two: the first one counts).
    pub fn mark_remote_closed(&self) {
        let _ = self.remote_closed_at.set(Instant::now());
        self.remote_closed.store(true, Relaxed);
    }

    /// Gives the connection its slot of a shared budget, freed by [`finish`].
    pub fn hold(&self, slot: Slot) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(slot);
    }
}

/// How long a blocked write to the TCP side waits before it looks again
/// whether the connection was cut or has been idle too long.
pub const WRITE_POLL: Duration = Duration::from_millis(500);

/// Writes `slices` to the TCP side with as few `writev`s as the kernel
/// allows, counting every byte taken as progress (`took`) and activity.
/// The socket's write timeout is [`WRITE_POLL`]: a write blocked on a
/// peer that does not read looks every so often whether the connection
/// was cut, and gives up once nothing was taken for `idle`.
pub fn write_to_local(
    c: &Core,
    mut slices: &mut [io::IoSlice<'_>],
    idle: Duration,
    took: &mut dyn FnMut(usize),
) -> Result<(), Ending> {
    let Some(mut tcp) = c.tcp() else {
        return Err(Ending::Reset("no TCP side".into()));
    };
    while !slices.is_empty() {
        match tcp.write_vectored(slices) {
            Ok(0) => return Err(Ending::Reset("the TCP side took nothing".into())),
            Ok(n) => {
                c.from_pilot.fetch_add(n as u64, Relaxed);
                c.touch();
                took(n);
                io::IoSlice::advance_slices(&mut slices, n);
            }
            Err(e) if ipc::is_timeout(&e) => {
                if let Some(ending) = c.ending.get() {
                    return Err(ending.clone());
                }
                if c.idle_left(idle).is_none() {
                    return Err(Ending::IdleTimeout);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Ending::Reset(format!("writing to the TCP side: {e}"))),
        }
    }
    Ok(())
}

/// The pilot side closed (CloseOK) and everything it sent has been
/// written: shut the TCP side for writing (it reads EOF), give it
/// [`LINGER`] to finish and close its side, then shut its reading side so
/// the TCP→pilot thread ends too. A normal end: no reset.
pub fn linger_after_remote_close(c: &Core) {
    c.mark_remote_closed();
    let Some(tcp) = c.tcp() else { return };
    let _ = tcp.shutdown(Shutdown::Write);
    c.wake(); // the reader may be waiting half-closed
    let deadline = c.remote_closed_at.get().copied().unwrap_or_else(Instant::now) + LINGER;
    while !c.local_done.load(Relaxed) && !c.is_over() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        thread::park_timeout(deadline - now);
    }
    let _ = tcp.shutdown(Shutdown::Read);
}

/// Connection slots of one budget (the gateway's `--max-conns`, which map
/// and expose draw on alike).
pub trait Slots: Send + Sync {
    /// Takes a slot; `false` when none is free.
    fn try_acquire(&self) -> bool;
    /// Gives back a slot `try_acquire` took.
    fn release(&self);
    /// Gives back a slot's share (the forwarded side's, a peer's) but
    /// keeps its room in the whole budget for a Close that waits (see
    /// [`finish`]), until [`end_linger`](Slots::end_linger). By default
    /// the slot is simply released.
    fn linger(&self) {
        self.release();
    }
    /// Gives back the room [`linger`](Slots::linger) kept.
    fn end_linger(&self) {}
}

/// Why a budget refused a connection: the kind its warning is
/// rate-limited under (see [`report`]), and the reason.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: &'static str,
    pub why: String,
}

/// One slot taken from a [`Slots`]; given back when dropped.
pub struct Slot(Option<std::sync::Arc<dyn Slots>>);

/// The room a closing connection keeps in the budget while its Close
/// waits ([`Slots::linger`]); given back when dropped.
pub struct Lingering(std::sync::Arc<dyn Slots>);

impl Drop for Lingering {
    fn drop(&mut self) {
        self.0.end_linger();
    }
}

impl Slot {
    /// Takes a slot of `slots`, or `None` when none is free.
    pub fn take(slots: &std::sync::Arc<dyn Slots>) -> Option<Slot> {
        slots.try_acquire().then(|| Slot(Some(slots.clone())))
    }

    /// A slot `try_acquire` already took (the listener takes it before
    /// it accepts the rest of the work).
    pub fn adopt(slots: std::sync::Arc<dyn Slots>) -> Slot {
        Slot(Some(slots))
    }

    /// Turns the slot into the room its Close waits in ([`Slots::linger`]).
    pub fn linger(mut self) -> Option<Lingering> {
        self.0.take().map(|s| {
            s.linger();
            Lingering(s)
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.release();
        }
    }
}

/// The cleanup both directions run exactly once, when the last of a
/// connection's threads lets go: sends Close (unless the daemon ended the
/// connection), frees its slot, logs how it ended (rate-limited per kind
/// and per `source`) and returns the ending, for the direction's counters
/// and its access-log record.
pub fn finish(b: &dyn Bridge, what: fmt::Arguments<'_>, source: &str) -> Ending {
    let c = b.core();
    // The connection's share goes back before the Close, which may wait
    // for the daemon to confirm delivery (up to `--close-linger`, longer
    // while data moves): a client that closed frees its forwarded (or its
    // peer's) share at once (lifecycle tests; the churn row of `make
    // bench`). Its room in the whole `--max-conns` stays taken until the
    // Close, since the waiting connection still holds a thread and its
    // descriptors (and, forwarded, a daemon session): otherwise closes
    // that never confirm pile up outside every budget (tests/redteam.rs
    // `closes_waiting_for_delivery_stay_within_max_conns`). A connection
    // that finds no room takes the longest-waiting close's, which is cut
    // short (`relay::DataPath`, `Closer::cut_oldest`).
    let lingering = c
        .slot
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .and_then(Slot::linger);
    c.close_once(b);
    drop(lingering);
    let ending = c.ending.get().cloned().unwrap_or(Ending::Ok);
    let (to, from) = (c.to_pilot.load(Relaxed), c.from_pilot.load(Relaxed));
    report(
        ending.level(),
        ending.label(),
        source,
        format_args!(
            "{what} ended: {} {} ({to} B to the pilot side, {from} B from it, {:?})",
            ending.label(),
            ending.reason(),
            c.started().elapsed()
        ),
    );
    ending
}

/// Bound on the Close frame's write where a connection's session is its
/// own (see [`PilotSide::send`]).
pub fn close_write_bound() -> Duration {
    CLOSE_WRITE
}

// ---- rate-limited reporting ------------------------------------------

/// Lines per source (a client's IP, a peer's address) before its bucket
/// limits it, and how fast that bucket refills (one line per 10 s).
const SOURCE_BURST: u64 = 3;
const SOURCE_REFILL: Duration = Duration::from_secs(10);
/// Sources remembered per kind; past it the oldest are forgotten (the
/// kind's own limit still holds, so many sources cannot flood either).
const SOURCES: usize = 256;

/// A token bucket in thousandths of a line.
#[derive(Clone, Copy)]
struct Bucket {
    credit: u64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u64, now: Instant) -> Bucket {
        Bucket {
            credit: burst * 1000,
            at: now,
        }
    }

    /// Refills for the time passed (`per`: the time one line takes to
    /// come back) and says whether a line is available.
    fn refill(&mut self, burst: u64, per: Duration, now: Instant) -> bool {
        let gained = now.duration_since(self.at).as_micros() * 1000 / per.as_micros().max(1);
        self.credit = (self.credit + gained.min(u128::from(burst * 1000)) as u64).min(burst * 1000);
        self.at = now;
        self.credit >= 1000
    }
}

struct Kind {
    bucket: Bucket,
    sources: HashMap<String, Bucket>,
    suppressed: u64,
}

static KINDS: Mutex<Option<HashMap<&'static str, Kind>>> = Mutex::new(None);

/// Whether a line of `kind` from `source` may be written at `now`:
/// `Some(n)` with the number suppressed since the kind's last line, or
/// `None` (counted as suppressed). A line needs credit in both the kind's
/// bucket ([`RateLimit::BURST`], then one a second) and its source's
/// ([`SOURCE_BURST`], then one per [`SOURCE_REFILL`]).
fn allow(kind: &'static str, source: &str, now: Instant) -> Option<u64> {
    let mut kinds = KINDS.lock().unwrap_or_else(|p| p.into_inner());
    let k = kinds
        .get_or_insert_with(HashMap::new)
        .entry(kind)
        .or_insert_with(|| Kind {
            bucket: Bucket::full(RateLimit::BURST, now),
            sources: HashMap::new(),
            suppressed: 0,
        });
    let kind_ok = k.bucket.refill(RateLimit::BURST, Duration::from_secs(1), now);
    if k.sources.len() >= SOURCES && !k.sources.contains_key(source) {
        let oldest = k.sources.iter().min_by_key(|(_, b)| b.at).map(|(s, _)| s.clone());
        oldest.map(|s| k.sources.remove(&s));
    }
    let src = k
        .sources
        .entry(source.to_string())
        .or_insert_with(|| Bucket::full(SOURCE_BURST, now));
    let source_ok = src.refill(SOURCE_BURST, SOURCE_REFILL, now);
    if !(kind_ok && source_ok) {
        k.suppressed += 1;
        return None;
    }
    src.credit -= 1000;
    k.bucket.credit -= 1000;
    Some(std::mem::take(&mut k.suppressed))
}

/// Writes a line a client or a peer can cause at will, through the rate
/// limiter of its `kind` and `source`; a line that gets through says how
/// many of its kind were suppressed before it. Debug lines are not
/// limited (debug output is the operator's choice).
pub fn report(level: Level, kind: &'static str, source: &str, msg: fmt::Arguments<'_>) {
    if level == Level::Debug {
        return crate::log::log(level, msg);
    }
    if !crate::log::enabled(level) {
        return;
    }
    if let Some(n) = allow(kind, source, Instant::now()) {
        crate::log::log(level, format_args!("{msg}{}", suppressed_note(n)));
    }
}

/// `report` at warning level: `warn_source!(KIND, source, "…", args)`.
#[macro_export]
macro_rules! warn_source {
    ($kind:expr, $source:expr, $($t:tt)*) => {
        $crate::engine::report($crate::log::Level::Warn, $kind, &$source.to_string(), format_args!($($t)*))
    };
}

/// The least time between two rounds of "N similar lines suppressed"
/// lines: the main thread calls [`flush_suppressed`] on every signal too
/// (each `status` is one), so without it a loop of `status` calls during
/// a flood would write one summary per kind each time.
const FLUSH_EVERY: Duration = Duration::from_secs(5);
static FLUSHED: Mutex<Option<Instant>> = Mutex::new(None);

/// Writes one "N similar lines suppressed" line per kind that suppressed
/// any since its last line, so a flood that stops still shows its size;
/// at most once per [`FLUSH_EVERY`]. The gateway's main thread calls it
/// every few seconds and on every signal.
pub fn flush_suppressed() {
    let now = Instant::now();
    let mut flushed = FLUSHED.lock().unwrap_or_else(|p| p.into_inner());
    if flushed.is_some_and(|at| now.duration_since(at) < FLUSH_EVERY) {
        return;
    }
    if write_suppressed() > 0 {
        *flushed = Some(now);
    }
}

/// Writes the summaries [`flush_suppressed`] writes, now; how many.
fn write_suppressed() -> usize {
    let pending: Vec<(&'static str, u64)> = {
        let mut kinds = KINDS.lock().unwrap_or_else(|p| p.into_inner());
        kinds
            .iter_mut()
            .flatten()
            .filter(|(_, k)| k.suppressed > 0)
            .map(|(name, k)| (*name, std::mem::take(&mut k.suppressed)))
            .collect()
    };
    for (kind, n) in &pending {
        crate::warn!("{n} similar lines ({kind}) suppressed");
    }
    pending.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::tcp_pair;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    #[test]
    fn a_buffer_is_given_back_only_after_a_quiet_keep_warm() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"more").unwrap();
        assert!(readable_soon(&a), "data waiting: keep the buffer");
        let mut got = [0u8; 4];
        (&a).read_exact(&mut got).unwrap();
        // Drained: the buffer goes back once KEEP_WARM passed quietly, not
        // before (a sender that catches up meanwhile finds it still there).
        let t = Instant::now();
        assert!(!readable_soon(&a));
        assert!(t.elapsed() >= KEEP_WARM);
    }

    /// A bridge whose pilot side is one end of a socket pair, read by the
    /// test as the daemon would.
    struct TestBridge {
        core: Core,
        pilot: UnixStream,
        sent_close: AtomicU64,
    }

    impl PilotSide for TestBridge {
        fn send(&self, frame: &[u8], what: Frame) -> crate::error::Result<()> {
            if what == Frame::Close {
                self.sent_close.fetch_add(1, Relaxed);
            }
            (&self.pilot)
                .write_all(frame)
                .map_err(|e| crate::error::Error::io("writing to the daemon", &e))
        }
    }

    impl Bridge for TestBridge {
        fn core(&self) -> &Core {
            &self.core
        }
        fn fail(&self, ending: Ending) {
            self.core.fail_tcp(ending);
        }
    }

    /// (bridge with its TCP side set and pilot id 7, the TCP peer, the daemon's end)
    fn bridge() -> (Arc<TestBridge>, TcpStream, UnixStream) {
        let (ours, theirs) = tcp_pair();
        let (pilot, daemon) = UnixStream::pair().unwrap();
        daemon.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let core = Core::new();
        let _ = core.tcp.set(ours);
        let _ = core.pilot_conn.set(7);
        let b = Arc::new(TestBridge {
            core,
            pilot,
            sent_close: AtomicU64::new(0),
        });
        (b, theirs, daemon)
    }

    fn frame(d: &mut UnixStream) -> (u8, Vec<u8>) {
        crate::testkit::read_frame(d).expect("a frame")
    }

    #[test]
    fn every_ending_has_one_label_for_both_directions() {
        let all = [
            (Ending::Ok, "ok"),
            (Ending::ClientClosed, "client_closed"),
            (Ending::DialFailed("x".into()), "dial_failed"),
            (Ending::ConnectFailed("x".into()), "connect_failed"),
            (Ending::Refused("x".into()), "refused"),
            (Ending::Reset("x".into()), "reset"),
            (Ending::IdleTimeout, "idle_timeout"),
            (Ending::HalfClosedTimeout, "half_closed_timeout"),
        ];
        for (e, label) in &all {
            assert_eq!(e.label(), *label);
        }
        let labels: std::collections::HashSet<_> = all.iter().map(|(e, _)| e.label()).collect();
        assert_eq!(labels.len(), all.len(), "labels are distinct");
    }

    #[test]
    fn reasons_belong_to_abnormal_endings_only() {
        assert_eq!(Ending::Reset("cut".into()).reason(), "cut");
        assert_eq!(Ending::Refused("allow".into()).reason(), "allow");
        assert_eq!(Ending::Ok.reason(), "");
        assert_eq!(Ending::HalfClosedTimeout.reason(), "");
    }

    #[test]
    fn both_timers_count_as_timeouts_and_log_at_info() {
        assert!(Ending::IdleTimeout.is_timeout() && Ending::HalfClosedTimeout.is_timeout());
        assert!(!Ending::Reset(String::new()).is_timeout());
        assert_eq!(Ending::IdleTimeout.level(), Level::Info);
        assert_eq!(Ending::Ok.level(), Level::Debug);
        assert_eq!(Ending::ClientClosed.level(), Level::Debug);
        assert_eq!(Ending::Reset(String::new()).level(), Level::Warn);
        assert_eq!(Ending::ConnectFailed(String::new()).level(), Level::Warn);
    }

    #[test]
    fn send_close_writes_one_close_frame() {
        let (b, _tcp, mut d) = bridge();
        assert!(send_close(&*b, 9));
        assert_eq!(frame(&mut d), (cmd::CLOSE, 9u32.to_be_bytes().to_vec()));
    }

    #[test]
    fn close_once_sends_close_once() {
        let (b, _tcp, mut d) = bridge();
        b.core.close_once(&*b);
        b.core.close_once(&*b);
        assert_eq!(frame(&mut d).0, cmd::CLOSE);
        assert_eq!(b.sent_close.load(Relaxed), 1);
    }

    #[test]
    fn no_close_after_the_daemon_closed_or_before_an_id() {
        let (b, _tcp, _d) = bridge();
        b.core.mark_remote_closed();
        b.core.close_once(&*b);
        assert_eq!(b.sent_close.load(Relaxed), 0);
        let c = Core::new();
        c.close_once(&*b); // no pilot connection yet: nothing to close
        assert_eq!(b.sent_close.load(Relaxed), 0);
    }

    #[test]
    fn the_idle_clock_restarts_with_every_byte() {
        let c = Core::new();
        assert!(c.idle_left(Duration::from_secs(5)).is_some());
        thread::sleep(Duration::from_millis(30));
        assert!(c.idle_left(Duration::from_millis(20)).is_none());
        c.touch();
        assert!(c.idle_left(Duration::from_millis(20)).is_some());
    }

    #[test]
    fn the_first_ending_wins() {
        let (b, _tcp, _d) = bridge();
        b.fail(Ending::IdleTimeout);
        b.fail(Ending::Reset("later".into()));
        assert_eq!(b.core.ending.get(), Some(&Ending::IdleTimeout));
    }

    #[test]
    fn copy_to_pilot_frames_the_tcp_sides_bytes_and_stops_at_eof() {
        let (b, mut tcp, mut d) = bridge();
        let b2 = b.clone();
        let t = thread::spawn(move || copy_to_pilot(&*b2, Duration::from_secs(5), 1024, false));
        tcp.write_all(b"hello").unwrap();
        let (c, body) = frame(&mut d);
        assert_eq!(c, cmd::SEND);
        assert_eq!(&body[..4], &7u32.to_be_bytes());
        assert_eq!(&body[4..], b"hello");
        tcp.shutdown(Shutdown::Write).unwrap();
        assert_eq!(t.join().unwrap(), CopyEnd::Eof);
        assert_eq!(b.core.to_pilot.load(Relaxed), 5);
    }

    #[test]
    fn copy_to_pilot_splits_reads_at_the_frame_limit() {
        let (b, mut tcp, mut d) = bridge();
        let b2 = b.clone();
        let t = thread::spawn(move || copy_to_pilot(&*b2, Duration::from_secs(5), 100, false));
        tcp.write_all(&[1u8; 1000]).unwrap();
        tcp.shutdown(Shutdown::Write).unwrap();
        let mut got = 0;
        while got < 1000 {
            let (c, body) = frame(&mut d);
            assert_eq!(c, cmd::SEND);
            assert!(body.len() - 4 <= 100, "a frame carries at most the limit");
            got += body.len() - 4;
        }
        assert_eq!(t.join().unwrap(), CopyEnd::Eof);
    }

    #[test]
    fn a_silent_connection_ends_at_the_idle_timeout() {
        let (b, mut tcp, _d) = bridge();
        let start = Instant::now();
        assert_eq!(
            copy_to_pilot(&*b, Duration::from_millis(200), 1024, false),
            CopyEnd::Over
        );
        assert_eq!(b.core.ending.get(), Some(&Ending::IdleTimeout));
        assert!(start.elapsed() < Duration::from_secs(3));
        // The TCP side is reset, not closed with a FIN.
        drop(b);
        let mut buf = [0u8; 4];
        assert!(tcp.read(&mut buf).is_err(), "reset, not EOF");
    }

    #[test]
    fn data_after_closeok_ends_the_copy_unless_dropped() {
        let (b, mut tcp, _d) = bridge();
        b.core.mark_remote_closed();
        tcp.write_all(b"late").unwrap();
        assert_eq!(
            copy_to_pilot(&*b, Duration::from_secs(5), 1024, false),
            CopyEnd::LateData
        );
        assert_eq!(b.core.to_pilot.load(Relaxed), 0, "nothing sent after CloseOK");
    }

    #[test]
    fn a_failed_send_resets_with_the_reason() {
        let (b, mut tcp, d) = bridge();
        drop(d);
        tcp.write_all(b"x").unwrap();
        assert_eq!(
            copy_to_pilot(&*b, Duration::from_secs(5), 1024, false),
            CopyEnd::Over
        );
        assert!(matches!(b.core.ending.get(), Some(Ending::Reset(r)) if r.contains("daemon")));
    }

    #[test]
    fn a_teardown_wakes_the_copy_loop() {
        let (b, _tcp, _d) = bridge();
        let b2 = b.clone();
        let t = thread::spawn(move || copy_to_pilot(&*b2, Duration::from_secs(30), 1024, false));
        thread::sleep(Duration::from_millis(50));
        b.fail(Ending::Reset("unmap".into()));
        assert_eq!(t.join().unwrap(), CopyEnd::Over);
        assert_eq!(b.core.ending.get(), Some(&Ending::Reset("unmap".into())));
    }

    #[test]
    fn write_to_local_counts_every_byte_taken() {
        let (b, mut tcp, _d) = bridge();
        let mut took = 0;
        let mut slices = [io::IoSlice::new(b"ab"), io::IoSlice::new(b"cde")];
        write_to_local(&b.core, &mut slices, Duration::from_secs(5), &mut |n| took += n).unwrap();
        assert_eq!((took, b.core.from_pilot.load(Relaxed)), (5, 5));
        let mut buf = [0u8; 5];
        tcp.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abcde");
    }

    #[test]
    fn a_stalled_writer_gives_up_at_the_idle_limit() {
        let (b, _tcp, _d) = bridge();
        b.core
            .tcp()
            .unwrap()
            .set_write_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let big = vec![0u8; 64 << 20];
        let mut slices = [io::IoSlice::new(&big)];
        let r = write_to_local(&b.core, &mut slices, Duration::from_millis(300), &mut |_| {});
        assert_eq!(r, Err(Ending::IdleTimeout));
        assert!(b.core.from_pilot.load(Relaxed) < big.len() as u64);
    }

    #[test]
    fn a_stalled_writer_notices_a_cut() {
        let (b, _tcp, _d) = bridge();
        b.core
            .tcp()
            .unwrap()
            .set_write_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let b2 = b.clone();
        let t = thread::spawn(move || {
            let big = vec![0u8; 64 << 20];
            let mut slices = [io::IoSlice::new(&big)];
            write_to_local(&b2.core, &mut slices, Duration::from_secs(30), &mut |_| {})
        });
        thread::sleep(Duration::from_millis(100));
        b.fail(Ending::Reset("stop".into()));
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn after_closeok_the_tcp_side_reads_eof_and_the_linger_ends_with_it() {
        let (b, mut tcp, _d) = bridge();
        let b2 = b.clone();
        let t = thread::spawn(move || {
            b2.core.register_writer();
            linger_after_remote_close(&b2.core)
        });
        let mut buf = [0u8; 4];
        assert_eq!(tcp.read(&mut buf).unwrap(), 0, "EOF: a complete stream");
        b.core.local_done.store(true, Relaxed);
        b.core.wake();
        let start = Instant::now();
        t.join().unwrap();
        assert!(start.elapsed() < LINGER);
        assert!(b.core.remote_closed.load(Relaxed));
    }

    #[test]
    fn the_linger_is_bounded() {
        let (b, _tcp, _d) = bridge();
        let start = Instant::now();
        linger_after_remote_close(&b.core);
        assert!(start.elapsed() >= LINGER && start.elapsed() < LINGER * 3);
    }

    struct Budget(AtomicU64, u64);
    impl Slots for Budget {
        fn try_acquire(&self) -> bool {
            self.0
                .fetch_update(Relaxed, Relaxed, |n| (n < self.1).then_some(n + 1))
                .is_ok()
        }
        fn release(&self) {
            self.0.fetch_sub(1, Relaxed);
        }
    }

    #[test]
    fn slots_are_taken_up_to_the_budget_and_freed_on_drop() {
        let budget: Arc<dyn Slots> = Arc::new(Budget(AtomicU64::new(0), 2));
        let a = Slot::take(&budget).unwrap();
        let _b = Slot::take(&budget).unwrap();
        assert!(Slot::take(&budget).is_none());
        drop(a);
        assert!(Slot::take(&budget).is_some());
    }

    #[test]
    fn finish_closes_frees_the_slot_and_returns_the_ending() {
        let budget = Arc::new(Budget(AtomicU64::new(0), 1));
        let dyn_budget: Arc<dyn Slots> = budget.clone();
        let (b, _tcp, mut d) = bridge();
        b.core.hold(Slot::take(&dyn_budget).unwrap());
        b.fail(Ending::Reset("x".into()));
        assert_eq!(
            finish(&*b, format_args!("test"), "src"),
            Ending::Reset("x".into())
        );
        assert_eq!(budget.0.load(Relaxed), 0, "slot freed");
        assert_eq!(frame(&mut d).0, cmd::CLOSE);
        // A normal end is `ok`.
        let (b, _tcp, _d) = bridge();
        assert_eq!(finish(&*b, format_args!("test"), "src"), Ending::Ok);
    }

    /// Lines that get through for `n` events of one kind, from `sources`
    /// sources in turn, spread evenly over `secs` seconds.
    fn flood(kind: &'static str, n: u32, sources: u32, secs: u64) -> u32 {
        let t0 = Instant::now();
        (0..n)
            .filter(|i| {
                let now = t0 + Duration::from_secs(secs) * *i / n;
                allow(kind, &format!("10.0.0.{}", i % sources), now).is_some()
            })
            .count() as u32
    }

    #[test]
    fn a_flood_from_one_source_is_limited_per_source() {
        // 1,500 events in 10 s from one client: its own bucket (3, then
        // one per 10 s) holds it to a handful.
        assert!(flood("t_one_source", 1500, 1, 10) <= 5);
    }

    #[test]
    fn a_flood_from_many_sources_is_limited_per_kind() {
        for (kind, secs) in [("t_many_1", 1), ("t_many_10", 10), ("t_many_60", 60)] {
            let lines = flood(kind, 1500, 1000, secs);
            assert!(lines <= 150 && lines <= 10 + secs as u32 + 1, "{kind}: {lines}");
        }
    }

    #[test]
    fn each_kind_a_peer_or_client_can_cause_is_limited() {
        // The kinds the gateway reports through the limiter: endings,
        // expose refusals, map refusals, failed dials.
        for kind in [
            "reset",
            "connect_failed",
            "dial_failed",
            "idle_timeout",
            "refused",
            "refused_peer",
            "refused_remote",
            "refused_max_conns",
            "refused_max_exposed",
            "refused_per_peer",
            "refused_draining",
            "half_closed_timeout",
        ] {
            // Unique names per test run: the limiter is process-wide.
            let name: &'static str = Box::leak(format!("t_{kind}").into_boxed_str());
            assert!(flood(name, 1500, 7, 5) <= 150, "{kind}");
        }
    }

    #[test]
    fn another_source_still_gets_a_line_through() {
        let t0 = Instant::now();
        for _ in 0..50 {
            allow("t_other", "noisy", t0);
        }
        assert!(allow("t_other", "quiet", t0 + Duration::from_secs(2)).is_some());
    }

    #[test]
    fn the_next_line_says_how_many_were_suppressed() {
        let t0 = Instant::now();
        let passed = (0..20).filter(|_| allow("t_count", "a", t0).is_some()).count() as u64;
        assert_eq!(passed, SOURCE_BURST);
        let n = allow("t_count", "a", t0 + SOURCE_REFILL).unwrap();
        assert_eq!(n, 20 - SOURCE_BURST);
    }

    #[test]
    fn flush_reports_and_clears_what_was_suppressed() {
        let t0 = Instant::now();
        for _ in 0..20 {
            allow("t_flush", "a", t0);
        }
        assert!(write_suppressed() >= 1);
        let kinds = KINDS.lock().unwrap();
        assert_eq!(kinds.as_ref().unwrap()["t_flush"].suppressed, 0);
    }

    #[test]
    fn sources_remembered_are_bounded() {
        let t0 = Instant::now();
        for i in 0..(SOURCES * 3) {
            allow("t_bounded", &i.to_string(), t0);
        }
        let kinds = KINDS.lock().unwrap();
        assert!(kinds.as_ref().unwrap()["t_bounded"].sources.len() <= SOURCES);
    }
}
