//! One exposed connection: an inbound pilot connection Accepted on the
//! exposure's shared session, bridged to the local service. The engine
//! ([`crate::engine`]) does what map does too (the service→peer copy
//! loop, the idle timeout, Close, the cleanup); this is what only expose
//! has: the bounded queue between the session's reader thread and the
//! service, and its pacing.
//!
//! - peer→service: the session's reader thread parses Recv frames and
//!   [`Conn::push`]es their data into the connection's queue; it never
//!   writes to a local socket. The connection's writer thread drains the
//!   queue into the service. When a queue is at its bound, the reader
//!   waits for room only as long as that service keeps taking data: one
//!   that takes nothing for `stall` (1 s) has stopped reading and is
//!   reset, so the others wait at most that long and the daemon (which
//!   drops a client that does not drain for 10 s) never drops the
//!   session. A service that reads, only slower than the daemon delivers,
//!   paces the session while its queue is full instead of being reset:
//!   without per-connection flow control in the protocol, the only
//!   alternatives are unbounded memory or cutting a working transfer.
//! - service→peer: [`engine::copy_to_pilot`], Send frames of at most
//!   64 KiB under the session's writer lock, held for one frame. The
//!   service's EOF becomes Close; its output after the peer closed has
//!   nowhere to go and is dropped until the linger is over.

use std::collections::VecDeque;
use std::io::{IoSlice, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::address::PilotAddr;
use crate::engine::{self, Bridge, CopyEnd, Core, Ending, Frame, PilotSide, THREAD_STACK};
use crate::{proxy, sys};

use super::session::Link;
use super::{lock, Ended, Shared};

/// Largest data chunk per Send frame (the daemon takes up to 1 MiB − 64).
const SEND_CHUNK: usize = 64 * 1024;
/// Recv payloads (4 KiB each) are gathered into queue chunks of this size.
const COALESCE: usize = 64 * 1024;

/// Data on its way to the local service.
#[derive(Default)]
struct Queue {
    chunks: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Bytes the local service has taken (every partial write counts):
    /// the writer's progress, whatever the service's pace.
    taken: u64,
    remote_closed: bool,
    cut: bool,
}

/// One exposed connection, shared by its threads and the reader thread.
pub struct Conn {
    pub id: u32,
    pub peer: PilotAddr,
    pub peer_port: u16,
    link: Arc<Link>,
    pub core: Core,
    queue: Mutex<Queue>,
    /// Data queued, remote closed or cut: for the writer.
    ready: Condvar,
    /// The service took data, or cut: for a reader waiting for room.
    room: Condvar,
}

/// A connection's data frames name it, so a stalled session can name the
/// connection that sent the most lately.
impl PilotSide for Conn {
    fn send(&self, frame: &[u8], what: Frame) -> crate::error::Result<()> {
        let from = (what == Frame::Data).then_some((self.id, self.peer));
        if self.link.send(frame, from) {
            Ok(())
        } else {
            Err(super::session::lost_while_sending())
        }
    }
}

impl Bridge for Conn {
    fn core(&self) -> &Core {
        &self.core
    }

    /// Ends the connection abnormally: the first reason wins and the local
    /// socket is reset when it closes. Only its reading side is shut (a
    /// FIN could pass for a complete stream); the writer notices the cut
    /// within `engine::WRITE_POLL` even when blocked on a service that
    /// does not read.
    fn fail(&self, ending: Ending) {
        lock(&self.queue).cut = true;
        self.ready.notify_all();
        self.room.notify_all();
        self.core.fail_tcp(ending);
    }
}

impl Conn {
    pub fn new(id: u32, peer: PilotAddr, peer_port: u16, link: Arc<Link>) -> Conn {
        let core = Core::new();
        let _ = core.pilot_conn.set(id);
        Conn {
            id,
            peer,
            peer_port,
            link,
            core,
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            room: Condvar::new(),
        }
    }

    /// Queues data for the local service. A queue at its `limit` makes
    /// the caller wait for room while the service keeps reading (every
    /// byte it takes is progress); `false` once it has made none for
    /// `stall`. The clock starts only once the target is connected (a
    /// slow connect is bounded by its own timeout). Never waits on the
    /// socket itself.
    pub fn push(&self, data: &[u8], limit: usize, stall: Duration) -> bool {
        let mut q = lock(&self.queue);
        let (mut taken, mut deadline) = (q.taken, Instant::now() + stall);
        while !q.cut && q.bytes > 0 && q.bytes + data.len() > limit {
            if q.taken != taken || self.core.tcp().is_none() {
                (taken, deadline) = (q.taken, Instant::now() + stall);
            }
            let Some(left) = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
            else {
                return false;
            };
            q = match self.room.wait_timeout(q, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        if q.cut {
            return true; // being torn down: the data has nowhere to go
        }
        q.bytes += data.len();
        match q.chunks.back_mut() {
            Some(last) if last.len() + data.len() <= COALESCE => last.extend_from_slice(data),
            _ => q.chunks.push_back(data.to_vec()),
        }
        drop(q);
        self.ready.notify_one();
        true
    }

    /// CloseOK (the daemon may send two: the first one counts).
    pub fn remote_closed(&self) {
        self.core.mark_remote_closed();
        lock(&self.queue).remote_closed = true;
        self.ready.notify_all();
    }

    /// The service took `n` more bytes: progress for a waiting `push`.
    fn took(&self, n: usize) {
        lock(&self.queue).taken += n as u64;
        self.room.notify_all();
    }

    fn is_cut(&self) -> bool {
        lock(&self.queue).cut
    }

    /// Bytes queued now (tests).
    #[cfg(test)]
    #[allow(dead_code)]
    fn queued(&self) -> usize {
        lock(&self.queue).bytes
    }

    /// Next chunk for the service; `None` once the remote closed and the
    /// queue is empty; `Err` once cut.
    fn next_chunk(&self) -> Result<Option<Vec<u8>>, ()> {
        let mut q = lock(&self.queue);
        loop {
            if q.cut {
                return Err(());
            }
            if let Some(chunk) = q.chunks.pop_front() {
                q.bytes -= chunk.len();
                self.room.notify_one();
                return Ok(Some(chunk));
            }
            if q.remote_closed {
                return Ok(None);
            }
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Shared by a connection's threads; when the last lets go, `drop`
/// cleans up exactly once.
pub struct Finish {
    pub conn: Arc<Conn>,
    pub ex: Arc<Shared>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let (c, ex) = (&self.conn, &self.ex);
        // A `push` waiting for room (one that waits on a connect has no
        // stall clock) must not wait for a connection that is gone.
        lock(&c.queue).cut = true;
        c.room.notify_all();
        let ending = engine::finish(
            &**c,
            format_args!(
                "exposed connection {} from {}:{} to port {} ({})",
                c.id, c.peer, c.peer_port, ex.port, ex.target
            ),
            &c.peer.to_string(),
        );
        let (bytes_in, bytes_out) = (c.core.from_pilot.load(Relaxed), c.core.to_pilot.load(Relaxed));
        {
            let mut conns = lock(&ex.conns);
            ex.done_in.fetch_add(bytes_in, Relaxed);
            ex.done_out.fetch_add(bytes_out, Relaxed);
            if conns.get(&c.id).is_some_and(|x| Arc::ptr_eq(x, c)) {
                conns.remove(&c.id);
            }
        }
        ex.active.fetch_sub(1, Relaxed);
        if ending.is_timeout() {
            ex.idle_timeouts.fetch_add(1, Relaxed);
        }
        ex.ended(&Ended {
            port: ex.port,
            target: ex.target,
            conn: c.id,
            peer: c.peer,
            peer_port: c.peer_port,
            outcome: ending,
            bytes_in,
            bytes_out,
            duration: c.core.started().elapsed(),
        });
    }
}

/// The connection's thread: connects to the target, starts the
/// service→peer thread and itself feeds the queue to the local socket.
pub fn connect_then_relay(finish: Finish) {
    let (c, ex) = (&finish.conn, &finish.ex);
    let tcp = match connect(ex.target, ex.opts.connect_timeout) {
        Ok(t) => t,
        Err(e) => {
            ex.connect_failures.fetch_add(1, Relaxed);
            let _ = c
                .core
                .ending
                .set(Ending::ConnectFailed(format!("{}: {e}", ex.target)));
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_write_timeout(Some(engine::WRITE_POLL));
    if ex.opts.proxy_protocol {
        // Before any data, and before the writer thread exists: the first
        // bytes the service reads are the header (`proxy`, wire layout
        // there). ~70 bytes always fit a fresh socket's send buffer.
        let header = proxy::header(c.peer, c.peer_port, ex.opts.local_addr, ex.port);
        if let Err(e) = (&tcp).write_all(&header) {
            ex.connect_failures.fetch_add(1, Relaxed);
            let why = format!("{}: writing the PROXY header: {e}", ex.target);
            let _ = c.core.ending.set(Ending::ConnectFailed(why));
            sys::net::reset(tcp);
            return;
        }
    }
    let _ = c.core.tcp.set(tcp);
    c.core.touch();
    // A cut that came while we connected could not reach the socket.
    if c.is_cut() {
        c.fail(Ending::Reset("cut while connecting".into()));
        return;
    }
    let finish = Arc::new(finish);
    let f2 = finish.clone();
    let spawned = thread::Builder::new().stack_size(THREAD_STACK).spawn(move || {
        let c = &f2.conn;
        if engine::copy_to_pilot(&**c, f2.ex.opts.idle_timeout, SEND_CHUNK, true) == CopyEnd::Eof
            && !c.is_cut()
        {
            c.core.close_once(&**c);
        }
        c.core.local_done.store(true, Relaxed);
        c.core.wake();
    });
    if let Err(e) = spawned {
        finish.conn.fail(Ending::Reset(format!("no thread: {e}")));
        return;
    }
    finish.conn.core.register_writer();
    remote_to_local(&finish.conn, finish.ex.opts.idle_timeout);
}

/// Connects to the local service (the one place an exposed connection
/// reaches it; a test can point it anywhere).
fn connect(target: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&target, timeout)
}

/// Drains the connection's queue into the local socket; once the remote
/// closed and the queue is empty, lets the service finish.
fn remote_to_local(c: &Conn, idle: Duration) {
    loop {
        let chunk = match c.next_chunk() {
            Err(()) => return,
            Ok(None) => return engine::linger_after_remote_close(&c.core),
            Ok(Some(chunk)) => chunk,
        };
        let mut slices = [IoSlice::new(&chunk)];
        if let Err(why) = engine::write_to_local(&c.core, &mut slices, idle, &mut |n| c.took(n)) {
            if !c.is_cut() {
                c.fail(why);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::tcp_pair;
    use std::os::unix::net::UnixStream;

    fn conn() -> (Arc<Conn>, UnixStream) {
        let (ours, daemon) = UnixStream::pair().unwrap();
        let link = Arc::new(Link::new(ours));
        (Arc::new(Conn::new(3, PilotAddr::new(0, 9), 4000, link)), daemon)
    }

    #[test]
    fn data_under_the_bound_is_queued_and_coalesced() {
        let (c, _d) = conn();
        for _ in 0..100 {
            assert!(c.push(&[1u8; 1000], 512 * 1024, Duration::from_secs(1)));
        }
        assert_eq!(c.queued(), 100_000);
        let q = lock(&c.queue);
        assert!(q.chunks.len() <= 2 && q.chunks.iter().all(|ch| ch.len() <= COALESCE));
    }

    #[test]
    fn a_connected_service_that_takes_nothing_is_given_up_after_the_stall() {
        let (c, _d) = conn();
        let (ours, _service) = tcp_pair();
        let _ = c.core.tcp.set(ours);
        assert!(c.push(&[0u8; 1000], 1000, Duration::from_millis(100)));
        let start = Instant::now();
        assert!(
            !c.push(&[0u8; 10], 1000, Duration::from_millis(100)),
            "no progress: give up"
        );
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert_eq!(c.queued(), 1000, "the queue never exceeds its bound");
    }

    #[test]
    fn progress_keeps_a_full_queue_waiting_not_failing() {
        let (c, _d) = conn();
        let (ours, _service) = tcp_pair();
        let _ = c.core.tcp.set(ours);
        assert!(c.push(&[0u8; 1000], 1000, Duration::from_millis(100)));
        let c2 = c.clone();
        let taker = thread::spawn(move || {
            // Takes a little every 50 ms: slower than the stall, but progress.
            for _ in 0..6 {
                thread::sleep(Duration::from_millis(50));
                c2.took(1);
            }
            c2.next_chunk()
        });
        assert!(
            c.push(&[0u8; 10], 1000, Duration::from_millis(100)),
            "paced, not reset"
        );
        assert!(matches!(taker.join().unwrap(), Ok(Some(_))));
    }

    #[test]
    fn before_the_service_is_connected_a_full_queue_waits_until_cut() {
        let (c, _d) = conn();
        assert!(c.push(&[0u8; 1000], 1000, Duration::from_millis(50)));
        let c2 = c.clone();
        let t = thread::spawn(move || c2.push(&[0u8; 10], 1000, Duration::from_millis(50)));
        thread::sleep(Duration::from_millis(200));
        assert!(!t.is_finished(), "no stall clock while connecting");
        c.fail(Ending::Reset("stop".into()));
        assert!(t.join().unwrap(), "a cut connection takes (and drops) data");
    }

    #[test]
    fn after_closeok_the_queue_drains_then_ends() {
        let (c, _d) = conn();
        assert!(c.push(b"abc", 1000, Duration::from_secs(1)));
        c.remote_closed();
        c.remote_closed(); // a duplicate CloseOK changes nothing
        assert_eq!(c.next_chunk(), Ok(Some(b"abc".to_vec())));
        assert_eq!(c.next_chunk(), Ok(None));
        assert!(c.core.remote_closed.load(Relaxed));
    }

    #[test]
    fn a_cut_queue_gives_nothing_more() {
        let (c, _d) = conn();
        assert!(c.push(b"abc", 1000, Duration::from_secs(1)));
        c.fail(Ending::Reset("x".into()));
        assert_eq!(c.next_chunk(), Err(()));
        assert_eq!(c.core.ending.get(), Some(&Ending::Reset("x".into())));
    }

    #[test]
    fn its_frames_go_out_on_the_shared_session() {
        let (c, mut d) = conn();
        d.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut frame = vec![0u8; crate::ipc::DATA_HEADER + 2];
        frame[crate::ipc::DATA_HEADER..].copy_from_slice(b"hi");
        crate::ipc::put_send_header(&mut frame, 3, 2);
        c.send(&frame, Frame::Data).unwrap();
        let (cmd, body) = crate::testkit::read_frame(&mut d).unwrap();
        assert_eq!((cmd, &body[4..]), (crate::ipc::cmd::SEND, &b"hi"[..]));
        c.core.close_once(&*c);
        let (cmd, body) = crate::testkit::read_frame(&mut d).unwrap();
        assert_eq!((cmd, body), (crate::ipc::cmd::CLOSE, 3u32.to_be_bytes().to_vec()));
    }

    #[test]
    fn a_lost_session_is_a_reset_reason() {
        let (c, d) = conn();
        drop(d);
        let frame = crate::ipc::encode(crate::ipc::cmd::SEND, &[&[0u8; 8]]);
        assert!(c
            .send(&frame, Frame::Data)
            .unwrap_err()
            .message
            .contains("session lost"));
    }
}
