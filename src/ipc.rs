//! The Pilot daemon's local IPC protocol (see `shared/PROTOCOL.md`).
//!
//! ```text
//! frame   = length:u32be  message[length]          length ≤ 1 MiB; 0 is ignored
//! message = command:u8    payload
//! address = network:u16be node:u32be               (6 bytes)
//!
//! 0x01 Bind        → port:u16be
//! 0x02 BindOK      ← port:u16be                   (or Error `port N already bound`)
//! 0x05 Accept      ← port:u16be, conn:u32be, address, remote_port:u16be
//!                                                 (unsolicited, on the binding session)
//! 0x03 Dial        → address, port:u16be
//! 0x04 DialOK      ← conn:u32be
//! 0x06 Send        → conn:u32be, data             (no reply, even on failure)
//! 0x07 Recv        ← conn:u32be, data             (≤ 4096 data bytes each)
//! 0x08 Close       → conn:u32be
//! 0x09 CloseOK     ← conn:u32be                   (also unsolicited: the peer closed)
//! 0x0A Error       ← code:u16be, UTF-8 text        (no conn id)
//! 0x0D Info        → (empty)            0x0E InfoOK      ← JSON
//! 0x0F Handshake   → sub:u8, payload    0x10 HandshakeOK ← JSON
//! 0x11 Resolve     → hostname bytes     0x12 ResolveOK   ← JSON
//! 0x21 Health      → (empty)            0x22 HealthOK    ← JSON   (newer daemons)
//! 0x2B Cancel      → (empty)            abandons this session's pending dials
//! 0x37 Unbind      → port:u16be         0x38 UnbindOK    ← port:u16be (newer
//!                  daemons; the Feb-2026 one answers Error `unknown command: 0x37`)
//! ```
//!
//! After BindOK, every inbound connection to the port arrives on the binding
//! session: Accept, its data as Recv, its end as an unsolicited CloseOK;
//! replies go as Send and Close on that session. Closing the session frees
//! the port and every connection on it.
//!
//! Replies carry no request id, so a session has at most one request in
//! flight. The data path uses one session per bridged connection (a pending
//! Dial blocks a whole session on older daemons).

use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::address::PilotAddr;
use crate::json;
use crate::sys::user::Uid;

/// Largest message (command byte + payload) either side accepts.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Largest data chunk we put in one Send: upstream's driver cuts at
/// 1 MiB − 64, which leaves room for the header.
pub const MAX_SEND_DATA: usize = MAX_MESSAGE - 64;
/// Length prefix + command byte + connection id: the header of Send and Recv.
pub const DATA_HEADER: usize = 9;

pub mod cmd {
    pub const BIND: u8 = 0x01;
    pub const BIND_OK: u8 = 0x02;
    pub const ACCEPT: u8 = 0x05;
    pub const DIAL: u8 = 0x03;
    pub const DIAL_OK: u8 = 0x04;
    pub const SEND: u8 = 0x06;
    pub const RECV: u8 = 0x07;
    pub const CLOSE: u8 = 0x08;
    pub const CLOSE_OK: u8 = 0x09;
    pub const ERROR: u8 = 0x0A;
    pub const INFO: u8 = 0x0D;
    pub const INFO_OK: u8 = 0x0E;
    pub const HANDSHAKE: u8 = 0x0F;
    pub const HANDSHAKE_OK: u8 = 0x10;
    pub const RESOLVE: u8 = 0x11;
    pub const RESOLVE_OK: u8 = 0x12;
    pub const HEALTH: u8 = 0x21;
    pub const HEALTH_OK: u8 = 0x22;
    pub const CANCEL: u8 = 0x2B;
    pub const UNBIND: u8 = 0x37;
    pub const UNBIND_OK: u8 = 0x38;

    /// Handshake sub-command: list trusted peers.
    pub const HS_TRUSTED: u8 = 0x05;
}

/// Everything that can go wrong on a session.
#[derive(Debug)]
pub enum IpcError {
    /// The socket failed; `TimedOut`/`WouldBlock` mean a read timeout passed.
    Io(io::Error),
    /// The daemon closed the session at a frame boundary.
    Closed,
    /// The daemon closed the session in the middle of a frame.
    Truncated,
    /// A length prefix above [`MAX_MESSAGE`].
    TooLong(usize),
    /// A message too short for its command's fixed fields.
    Short { cmd: u8, len: usize },
    /// A command we did not expect at this point.
    Unexpected { cmd: u8, wanted: &'static str },
    /// A reply whose JSON or address could not be read.
    BadReply(String),
    /// The daemon's Error frame text.
    Daemon(String),
}

impl IpcError {
    /// Whether the daemon ended the session (EOF, reset, broken pipe):
    /// what newer daemons do to a client of another UID or beyond their cap.
    pub fn is_closed(&self) -> bool {
        match self {
            IpcError::Closed | IpcError::Truncated => true,
            IpcError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, IpcError::Io(e) if is_timeout(e))
    }
}

/// Whether an I/O error is a read or write timeout: SO_RCVTIMEO and
/// SO_SNDTIMEO expiring show as WouldBlock (EAGAIN) on Linux, TimedOut
/// elsewhere.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

impl std::fmt::Display for IpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IpcError::Io(e) => write!(f, "{e}"),
            IpcError::Closed => f.write_str("the daemon closed the IPC session"),
            IpcError::Truncated => f.write_str("the daemon closed the IPC session in the middle of a frame"),
            IpcError::TooLong(n) => write!(f, "frame of {n} bytes exceeds the 1 MiB limit"),
            IpcError::Short { cmd, len } => write!(f, "message 0x{cmd:02X} too short ({len} bytes)"),
            IpcError::Unexpected { cmd, wanted } => {
                write!(f, "unexpected message 0x{cmd:02X} while waiting for {wanted}")
            }
            IpcError::BadReply(s) => write!(f, "malformed reply: {s}"),
            IpcError::Daemon(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for IpcError {}

impl From<io::Error> for IpcError {
    fn from(e: io::Error) -> IpcError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            IpcError::Truncated
        } else {
            IpcError::Io(e)
        }
    }
}

/// Builds one whole frame (length, command, payload parts) in one buffer,
/// so it goes out with a single write.
pub fn encode(command: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(command);
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// Writes the 9-byte Send header for `data_len` bytes of data into
/// `buf[..9]`; the data itself must already sit at `buf[9..9 + data_len]`.
/// The caller then writes `buf[..9 + data_len]` in one call.
pub fn put_send_header(buf: &mut [u8], conn: u32, data_len: usize) {
    debug_assert!(data_len <= MAX_SEND_DATA);
    buf[..4].copy_from_slice(&((data_len + 5) as u32).to_be_bytes());
    buf[4] = cmd::SEND;
    buf[5..9].copy_from_slice(&conn.to_be_bytes());
}

/// Reads the big-endian u32 at the start of `b` (a connection id).
pub fn be_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

/// Splits one frame off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, or
/// `Ok(Some((cmd, payload_range, consumed)))`. Empty frames (length 0) are
/// skipped, as the daemon skips them. Pure and allocation-free: the same
/// function serves the data path, the control client, `pilot-devd` and the
/// fuzz target.
pub fn split_frame(buf: &[u8]) -> Result<Option<(u8, Range<usize>, usize)>, IpcError> {
    split_frame_within(buf, MAX_MESSAGE)
}

/// [`split_frame`] with another limit than the daemon's: a reader that
/// must take a larger reply (see [`FrameReader::set_max_message`]).
pub fn split_frame_within(buf: &[u8], max: usize) -> Result<Option<(u8, Range<usize>, usize)>, IpcError> {
    let mut at = 0;
    loop {
        let Some(len) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > max {
            return Err(IpcError::TooLong(len));
        }
        if len == 0 {
            at += 4;
            continue;
        }
        if buf.len() < at + 4 + len {
            return Ok(None);
        }
        let command = buf[at + 4];
        return Ok(Some((command, at + 5..at + 4 + len, at + 4 + len)));
    }
}

/// Buffered reader of frames. It hands out frames as ranges of its own
/// buffer, so a Recv payload is written to the client straight from where
/// the socket read put it — no copy, no allocation per frame.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The size the buffer may grow to for throughput; beyond it only to
    /// hold one large frame, and back down once that frame is consumed.
    limit: usize,
    /// The size it starts with, and never goes below when allocated again.
    initial: usize,
    /// The size to allocate again after [`release`](FrameReader::release).
    regrow: usize,
    /// The largest message taken ([`MAX_MESSAGE`] unless raised).
    max: usize,
}

impl<R: Read> FrameReader<R> {
    /// A reader with a fixed buffer of `capacity` bytes.
    pub fn new(inner: R, capacity: usize) -> FrameReader<R> {
        FrameReader::growing(inner, capacity, capacity)
    }

    /// A reader that starts with `initial` bytes and doubles its buffer,
    /// up to `limit`, whenever one read fills it: an idle connection stays
    /// small, a busy one soon reads in large gulps.
    pub fn growing(inner: R, initial: usize, limit: usize) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: vec![0; initial.max(8)],
            start: 0,
            end: 0,
            limit: limit.max(initial.max(8)),
            initial: initial.max(8),
            regrow: initial.max(8),
            max: MAX_MESSAGE,
        }
    }

    /// Takes messages up to `max` bytes. The daemon's writer has no limit
    /// of its own (upstream `ipcutil.Write`), and an Info reply lists every
    /// connection it holds, so it can outgrow the 1 MiB a request may have.
    /// The buffer grown for such a message is kept for the next one: a
    /// session that takes them takes them again and again (the close
    /// poller, an Info every few tens of milliseconds under churn), and
    /// freeing it each time costs a fresh zeroed buffer and its page
    /// faults per reply, more than reading the reply (PERFORMANCE.md).
    pub fn set_max_message(&mut self, max: usize) {
        self.max = max.max(MAX_MESSAGE);
        self.limit = self.limit.max(self.max.saturating_add(4));
    }

    /// Gives the buffer back when no partial frame is pending in it, so an
    /// idle session holds no memory; the next [`fill`](FrameReader::fill)
    /// allocates half the size it had grown to (at least the initial
    /// size): a busy stream grows it again within a few reads.
    pub fn release(&mut self) {
        if self.start == self.end && !self.buf.is_empty() {
            self.regrow = (self.buf.len().min(self.limit) / 2).max(self.initial);
            self.buf = Vec::new();
            self.start = 0;
            self.end = 0;
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The buffer that ranges returned by [`next_buffered`] index into.
    /// Valid until the next [`fill`].
    ///
    /// [`next_buffered`]: FrameReader::next_buffered
    /// [`fill`]: FrameReader::fill
    pub fn buffer(&self) -> &[u8] {
        &self.buf
    }

    /// The next frame already in the buffer, without reading the socket.
    pub fn next_buffered(&mut self) -> Result<Option<(u8, Range<usize>)>, IpcError> {
        // Consume empty frames now, so a partial frame always starts at
        // `start` with its real length (`fill` sizes the buffer from it).
        while self.buf.get(self.start..self.start + 4) == Some(&[0; 4]) && self.start + 4 <= self.end {
            self.start += 4;
        }
        let Some((command, range, used)) = split_frame_within(&self.buf[self.start..self.end], self.max)?
        else {
            return Ok(None);
        };
        let base = self.start;
        self.start += used;
        Ok(Some((command, range.start + base..range.end + base)))
    }

    /// Reads more bytes from the socket. Invalidates earlier ranges: it
    /// moves a partial frame to the front, grows the buffer when one frame
    /// is larger than it (and shrinks back to the limit once that frame is
    /// done), and doubles it up to the limit after a read that filled it.
    pub fn fill(&mut self) -> Result<(), IpcError> {
        if self.buf.is_empty() {
            self.buf = vec![0; self.regrow];
        } else if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > self.limit {
                self.buf.truncate(self.limit);
                self.buf.shrink_to_fit();
            }
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            // Still full: the pending frame is bigger than the buffer.
            if self.end == self.buf.len() {
                let want = match self.buf.get(..4) {
                    Some(h) => 4 + u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize,
                    None => self.buf.len() * 2,
                };
                self.buf.resize(want.min(4 + self.max), 0);
            }
        }
        loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) if self.start == self.end => return Err(IpcError::Closed),
                Ok(0) => return Err(IpcError::Truncated),
                Ok(n) => {
                    self.end += n;
                    if self.end == self.buf.len() && self.buf.len() < self.limit {
                        let grown = (self.buf.len() * 2).min(self.limit);
                        self.buf.resize(grown, 0);
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(IpcError::Io(e)),
            }
        }
    }

    /// The next frame, reading as needed.
    pub fn read_frame(&mut self) -> Result<(u8, Range<usize>), IpcError> {
        loop {
            if let Some(frame) = self.next_buffered()? {
                return Ok(frame);
            }
            self.fill()?;
        }
    }

    /// The next frame, all its reads together bounded by `deadline`:
    /// `arm` sets the socket's read timeout to what is left before each
    /// read, since a per-read timeout alone restarts with every byte a
    /// crawling daemon trickles. A `TimedOut` error once it has passed.
    pub fn read_frame_by(
        &mut self,
        deadline: Instant,
        arm: impl Fn(Duration) -> io::Result<()>,
    ) -> Result<(u8, Range<usize>), IpcError> {
        loop {
            if let Some(frame) = self.next_buffered()? {
                return Ok(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(IpcError::Io(io::ErrorKind::TimedOut.into()));
            }
            arm(left)?;
            self.fill()?;
        }
    }
}

/// Turns an Error frame's payload into its text (the 2-byte code carries
/// no meaning yet).
pub fn error_text(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
    let text = text.trim();
    if text.is_empty() {
        "the daemon reported an error without a message".to_string()
    } else {
        // The daemon's words reach logs and terminals: no raw control
        // characters (a newline would forge a log line, ESC a terminal
        // escape sequence).
        crate::escape::escape_control(text)
    }
}

/// The daemon's identity as the gateway knows it: the uid and gid of the
/// process serving its socket (its peer credentials), read on the first
/// connection of a start. A path says nothing about who serves it now:
/// anyone may bind a socket at a path in a directory they can write
/// (`/tmp`) while the daemon is away. So every later connection checks its
/// peer against the uid seen at start (see [`connect_by`]).
pub use crate::sys::net::Peer;

/// Connects a socket from `sys::net::unix_socket` to the daemon by `deadline`,
/// makes it blocking, and returns who serves it (its peer credentials).
/// Every connection to the daemon goes through here.
///
/// `expect`: the daemon's uid seen at start. A peer of another uid is
/// refused (`PermissionDenied`, nothing sent to it): whatever serves the
/// path now is not the daemon we trusted. `None` only for the first
/// connection of a start, which learns the uid (and applies the trust
/// rules of `privilege::target_user` to it). Peer credentials that cannot
/// be read fail the connection either way.
///
/// A blocking Unix connect to a daemon whose backlog is full (stalled,
/// stopped) waits forever; the non-blocking one fails with EAGAIN, and we
/// retry with a short backoff until the deadline (or until `abandoned`
/// says to stop), then fail with `TimedOut`.
pub fn connect_by(
    stream: &UnixStream,
    path: &Path,
    deadline: Instant,
    abandoned: &dyn Fn() -> bool,
    expect: Option<Uid>,
) -> io::Result<Peer> {
    let mut pause = Duration::from_millis(1);
    loop {
        match crate::sys::net::unix_connect(stream, path) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let now = Instant::now();
                if now >= deadline || abandoned() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the daemon accepts no connections (its backlog is full: stalled or stopped?)",
                    ));
                }
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
    let peer = check_peer(stream, path, expect)?;
    stream.set_nonblocking(false)?;
    Ok(peer)
}

/// The peer credentials of a connected daemon socket, checked against
/// the daemon's uid seen at start (see [`connect_by`]).
fn check_peer(stream: &UnixStream, path: &Path, expect: Option<Uid>) -> io::Result<Peer> {
    let peer = crate::sys::net::peer_ids(stream).map_err(|e| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("cannot read the peer credentials of {}: {e}", path.display()),
        )
    })?;
    match expect {
        Some(want) if want != peer.uid => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            identity_mismatch(path, peer.uid, want),
        )),
        _ => Ok(peer),
    }
}

/// The message for a daemon socket served by another uid than at start.
pub fn identity_mismatch(path: &Path, uid: Uid, want: Uid) -> String {
    format!(
        "the process now serving {} runs as uid {uid}, not the daemon's uid {want} seen at start: refusing it",
        path.display()
    )
}

/// One client session with the daemon, for requests and replies.
///
/// Each exchange (a request and its reply) has one overall deadline: the
/// socket timeout is set to what is left before every read and write, so a
/// daemon that trickles its reply a byte at a time cannot stretch an
/// exchange past its budget (a per-read timeout restarts with every byte).
pub struct Session {
    reader: FrameReader<UnixStream>,
    writer: UnixStream,
    /// Who serves the socket (`None` for a session made from a stream).
    peer: Option<Peer>,
    /// The budget of one exchange (`None`: unbounded).
    budget: Option<Duration>,
    /// When the exchange in progress must be over.
    deadline: Option<Instant>,
}

/// Read buffer of a session: large enough for many 4 KiB Recv frames per
/// read, small enough for thousands of idle connections.
pub const READ_BUFFER: usize = 32 * 1024;

impl Session {
    /// Connects within `timeout`, to a daemon of uid `expect` (see
    /// [`connect_by`]).
    pub fn connect_within(path: &Path, timeout: Duration, expect: Option<Uid>) -> io::Result<Session> {
        let stream = crate::sys::net::unix_socket()?;
        let peer = connect_by(&stream, path, Instant::now() + timeout, &|| false, expect)?;
        let mut s = Session::from_stream(stream)?;
        s.peer = Some(peer);
        Ok(s)
    }

    pub fn from_stream(stream: UnixStream) -> io::Result<Session> {
        let writer = stream.try_clone()?;
        Ok(Session {
            reader: FrameReader::new(stream, READ_BUFFER),
            writer,
            peer: None,
            budget: None,
            deadline: None,
        })
    }

    /// Takes replies up to `max` bytes (see [`FrameReader::set_max_message`]).
    pub fn set_max_reply(&mut self, max: usize) {
        self.reader.set_max_message(max);
    }

    /// Who serves the daemon socket, as read when connecting.
    pub fn peer(&self) -> Option<Peer> {
        self.peer
    }

    /// Bounds every later exchange (request and whole reply) to `t` in
    /// total (`None`: forever).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.budget = t;
        self.writer.set_read_timeout(t)?;
        self.writer.set_write_timeout(t)
    }

    /// Sets the socket timeouts to what is left of the exchange's budget;
    /// a timeout error once it has run out.
    fn arm(&self) -> Result<(), IpcError> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(IpcError::Io(io::ErrorKind::TimedOut.into()));
        }
        self.writer.set_read_timeout(Some(left))?;
        self.writer.set_write_timeout(Some(left))?;
        Ok(())
    }

    /// Sends one message, starting a new exchange (and its deadline).
    pub fn send(&mut self, command: u8, parts: &[&[u8]]) -> Result<(), IpcError> {
        self.deadline = self.budget.map(|b| Instant::now() + b);
        self.arm()?;
        self.writer.write_all(&encode(command, parts))?;
        Ok(())
    }

    /// The next frame of the reply, within the exchange's deadline.
    fn read_reply(&mut self) -> Result<(u8, Range<usize>), IpcError> {
        let Some(deadline) = self.deadline else {
            return self.reader.read_frame();
        };
        let writer = &self.writer;
        self.reader
            .read_frame_by(deadline, |t| writer.set_read_timeout(Some(t)))
    }

    /// Sends a request and waits for its reply `want`; an Error frame
    /// becomes [`IpcError::Daemon`]. Returns the reply's payload.
    fn request(
        &mut self,
        command: u8,
        parts: &[&[u8]],
        want: u8,
        name: &'static str,
    ) -> Result<Vec<u8>, IpcError> {
        let mut out = Vec::new();
        self.request_with(command, parts, (want, name), &mut |p| out = p.to_vec())?;
        Ok(out)
    }

    /// [`request`](Session::request), handing the reply's payload to
    /// `read` in the session's buffer.
    fn request_with(
        &mut self,
        command: u8,
        parts: &[&[u8]],
        (want, name): (u8, &'static str),
        read: &mut dyn FnMut(&[u8]),
    ) -> Result<(), IpcError> {
        self.send(command, parts)?;
        let (got, range) = self.read_reply()?;
        let payload = &self.reader.buffer()[range];
        match got {
            c if c == want => {
                read(payload);
                Ok(())
            }
            cmd::ERROR => Err(IpcError::Daemon(error_text(payload))),
            c => Err(IpcError::Unexpected { cmd: c, wanted: name }),
        }
    }

    fn request_json(
        &mut self,
        command: u8,
        parts: &[&[u8]],
        want: u8,
        name: &'static str,
    ) -> Result<json::Value, IpcError> {
        let reply = self.request(command, parts, want, name)?;
        json::parse_bytes(&reply).map_err(|e| IpcError::BadReply(format!("{name}: {e}")))
    }

    pub fn info(&mut self) -> Result<json::Value, IpcError> {
        self.request_json(cmd::INFO, &[], cmd::INFO_OK, "InfoOK")
    }

    /// Info's reply, unparsed, handed to `read` in the session's buffer
    /// (no copy): for a reader that wants a few fields of a large reply
    /// (`conn_list::scan`).
    pub fn info_with(&mut self, read: &mut dyn FnMut(&[u8])) -> Result<(), IpcError> {
        self.request_with(cmd::INFO, &[], (cmd::INFO_OK, "InfoOK"), read)
    }

    pub fn health(&mut self) -> Result<json::Value, IpcError> {
        self.request_json(cmd::HEALTH, &[], cmd::HEALTH_OK, "HealthOK")
    }

    /// The daemon's trusted peers.
    pub fn trusted_peers(&mut self) -> Result<Vec<PilotAddr>, IpcError> {
        let v = self.request_json(
            cmd::HANDSHAKE,
            &[&[cmd::HS_TRUSTED]],
            cmd::HANDSHAKE_OK,
            "HandshakeOK",
        )?;
        parse_trusted(&v)
    }

    /// Resolves a hostname to an address through the daemon's registry.
    pub fn resolve(&mut self, hostname: &str) -> Result<PilotAddr, IpcError> {
        let v = self.request_json(
            cmd::RESOLVE,
            &[hostname.as_bytes()],
            cmd::RESOLVE_OK,
            "ResolveHostnameOK",
        )?;
        let text = v
            .get("address")
            .and_then(json::Value::as_str)
            .ok_or_else(|| IpcError::BadReply("ResolveHostnameOK has no \"address\"".into()))?;
        text.parse().map_err(|e| IpcError::BadReply(format!("{e}")))
    }
}

/// Reads the daemon's answer to a Dial: DialOK's connection id, or the
/// Error frame's text.
pub fn dial_reply(command: u8, payload: &[u8]) -> Result<u32, IpcError> {
    match command {
        cmd::DIAL_OK => be_u32(payload).ok_or(IpcError::Short {
            cmd: cmd::DIAL_OK,
            len: payload.len(),
        }),
        cmd::ERROR => Err(IpcError::Daemon(error_text(payload))),
        c => Err(IpcError::Unexpected {
            cmd: c,
            wanted: "DialOK",
        }),
    }
}

/// One inbound connection, as an Accept frame announces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accept {
    /// Our bound port it arrived on.
    pub port: u16,
    pub conn: u32,
    pub remote: PilotAddr,
    pub remote_port: u16,
}

/// Reads an Accept payload: port:u16be, conn:u32be, address (6 bytes),
/// remote_port:u16be — 14 bytes; anything after them is ignored.
pub fn parse_accept(payload: &[u8]) -> Option<Accept> {
    let u16_at = |at: usize| payload.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    Some(Accept {
        port: u16_at(0)?,
        conn: be_u32(payload.get(2..)?)?,
        remote: PilotAddr::from_wire(payload.get(6..12)?)?,
        remote_port: u16_at(12)?,
    })
}

/// Reads the trusted-peer list out of a HandshakeOK reply.
pub fn parse_trusted(v: &json::Value) -> Result<Vec<PilotAddr>, IpcError> {
    let list = match v.get("trusted") {
        Some(json::Value::Arr(a)) => a.as_slice(),
        // Go encodes an empty slice as null.
        Some(json::Value::Null) | None => &[],
        Some(other) => return Err(IpcError::BadReply(format!("\"trusted\" is {}", other.kind()))),
    };
    list.iter()
        .map(|peer| {
            let node = peer.get("node_id").and_then(json::Value::as_u64);
            let network = peer.get("network").and_then(json::Value::as_u64).unwrap_or(0);
            match (node.and_then(|n| u32::try_from(n).ok()), u16::try_from(network)) {
                (Some(node), Ok(network)) => Ok(PilotAddr::new(network, node)),
                _ => Err(IpcError::BadReply(format!(
                    "trusted peer without a valid node_id: {peer}"
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exchange_has_one_deadline_not_one_per_read() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut s = Session::from_stream(ours).unwrap();
        s.set_timeout(Some(Duration::from_millis(300))).unwrap();
        // A daemon that answers Info one byte every 50 ms: each read is
        // quick, the whole reply takes over a second.
        let daemon = std::thread::spawn(move || {
            let mut b = [0u8; 5];
            (&theirs).read_exact(&mut b).unwrap();
            for byte in encode(cmd::INFO_OK, &[b"{\"node_id\":1}"]) {
                if (&theirs).write_all(&[byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let e = s.info().unwrap_err();
        assert!(e.is_timeout(), "{e}");
        drop(s);
        daemon.join().unwrap();
    }

    #[test]
    fn a_socket_served_by_another_uid_than_at_start_is_refused() {
        let dir = std::env::temp_dir().join(format!("pgw-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let me = crate::sys::user::euid();
        let deadline = Instant::now() + Duration::from_secs(2);
        let s = crate::sys::net::unix_socket().unwrap();
        assert_eq!(connect_by(&s, &path, deadline, &|| false, None).unwrap().uid, me);
        let s = crate::sys::net::unix_socket().unwrap();
        assert_eq!(
            connect_by(&s, &path, deadline, &|| false, Some(me)).unwrap().uid,
            me
        );
        let other = Uid(me.0.wrapping_add(4242));
        let s = crate::sys::net::unix_socket().unwrap();
        let e = connect_by(&s, &path, deadline, &|| false, Some(other)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(e.to_string(), identity_mismatch(&path, me, other));
        assert!(e.to_string().contains(&format!(
            "runs as uid {me}, not the daemon's uid {other} seen at start"
        )));
        let e = Session::connect_within(&path, Duration::from_secs(2), Some(other))
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn encodes_dial() {
        let f = encode(
            cmd::DIAL,
            &[&PilotAddr::new(0, 4).to_wire(), &80u16.to_be_bytes()],
        );
        assert_eq!(f, [0, 0, 0, 9, 0x03, 0, 0, 0, 0, 0, 4, 0, 80]);
    }

    #[test]
    fn send_header_in_place() {
        let mut buf = [0u8; 12];
        buf[9..].copy_from_slice(b"abc");
        put_send_header(&mut buf, 7, 3);
        assert_eq!(buf, [0, 0, 0, 8, 0x06, 0, 0, 0, 7, b'a', b'b', b'c']);
    }

    #[test]
    fn parses_accept() {
        // The Feb-2026 daemon's sample: port 8000, conn 6, from node 1 port 49159.
        let p = [0x1f, 0x40, 0, 0, 0, 6, 0, 0, 0, 0, 0, 1, 0xc0, 0x07];
        let a = parse_accept(&p).unwrap();
        assert_eq!(
            a,
            Accept {
                port: 8000,
                conn: 6,
                remote: PilotAddr::new(0, 1),
                remote_port: 49159
            }
        );
        assert!(parse_accept(&p[..13]).is_none());
    }

    #[test]
    fn splits_frames() {
        assert!(split_frame(&[]).unwrap().is_none());
        assert!(split_frame(&[0, 0, 0]).unwrap().is_none());
        assert!(split_frame(&[0, 0, 0, 5, 4, 0]).unwrap().is_none());
        let buf = [0, 0, 0, 0, 0, 0, 0, 5, 4, 0, 0, 0, 9, 0xFF];
        let (c, r, used) = split_frame(&buf).unwrap().unwrap();
        assert_eq!((c, r, used), (cmd::DIAL_OK, 9..13, 13));
        let exact = (MAX_MESSAGE as u32).to_be_bytes();
        assert!(split_frame(&exact).unwrap().is_none());
        let over = (MAX_MESSAGE as u32 + 1).to_be_bytes();
        assert!(matches!(split_frame(&over), Err(IpcError::TooLong(n)) if n == MAX_MESSAGE + 1));
    }

    fn frames(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn reader_handles_split_and_large_frames() {
        let big = vec![7u8; 200_000];
        let input = frames(&[
            encode(cmd::RECV, &[&1u32.to_be_bytes(), b"hello"]),
            vec![0, 0, 0, 0],
            encode(cmd::RECV, &[&1u32.to_be_bytes(), &big]),
            encode(cmd::CLOSE_OK, &[&1u32.to_be_bytes()]),
        ]);
        // A reader that returns at most 3 bytes per read exercises every split point.
        struct Trickle(Vec<u8>, usize);
        impl Read for Trickle {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                let n = b
                    .len()
                    .min(3 + self.1 % 5000)
                    .min(self.0.len() - self.1.min(self.0.len()));
                let n = n.min(self.0.len() - self.1);
                b[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
                self.1 += n;
                Ok(n)
            }
        }
        let mut r = FrameReader::new(Trickle(input, 0), 64);
        let (c, range) = r.read_frame().unwrap();
        assert_eq!((c, &r.buffer()[range]), (cmd::RECV, &b"\0\0\0\x01hello"[..]));
        let (c, range) = r.read_frame().unwrap();
        assert_eq!(c, cmd::RECV);
        assert_eq!(&r.buffer()[range.start + 4..range.end], &big[..]);
        let (c, _) = r.read_frame().unwrap();
        assert_eq!(c, cmd::CLOSE_OK);
        assert!(matches!(r.read_frame(), Err(IpcError::Closed)));
        assert!(r.buffer().len() <= 64, "buffer shrinks back");
    }

    #[test]
    fn reader_grows_when_busy_up_to_its_limit() {
        let frames: Vec<u8> = (0..64)
            .flat_map(|_| encode(cmd::RECV, &[&1u32.to_be_bytes(), &[9u8; 4096]]))
            .collect();
        let mut r = FrameReader::growing(&frames[..], 1024, 16 * 1024);
        assert_eq!(r.buffer().len(), 1024);
        for _ in 0..64 {
            let (c, range) = r.read_frame().unwrap();
            assert_eq!((c, range.len()), (cmd::RECV, 4100));
        }
        assert_eq!(r.buffer().len(), 16 * 1024, "grew to the limit, no further");
        let close = encode(cmd::CLOSE_OK, &[&1u32.to_be_bytes()]);
        let mut idle = FrameReader::growing(&close[..], 1024, 16 * 1024);
        idle.read_frame().unwrap();
        assert_eq!(idle.buffer().len(), 1024, "a reader that never fills stays small");
    }

    #[test]
    fn a_reader_of_large_replies_keeps_its_buffer_for_the_next() {
        // The close poller's session: Info replies of megabytes, one after
        // another. Freeing the buffer after each cost a fresh zeroed one
        // and its page faults every round.
        let big = vec![5u8; 3 << 20];
        let input = frames(&[encode(cmd::INFO_OK, &[&big]), encode(cmd::INFO_OK, &[&big])]);
        let mut r = FrameReader::new(&input[..], 64 * 1024);
        r.set_max_message(8 << 20);
        let (_, range) = r.read_frame().unwrap();
        assert_eq!(range.len(), big.len());
        let at = r.buffer().as_ptr();
        let (_, range) = r.read_frame().unwrap();
        assert!(r.buffer()[range].iter().all(|&b| b == 5));
        assert_eq!(
            r.buffer().as_ptr(),
            at,
            "the second reply reused the first one's buffer"
        );
        assert!(matches!(r.read_frame(), Err(IpcError::Closed)));
        assert!(r.buffer().len() >= big.len(), "kept while the session lasts");
    }

    #[test]
    fn reader_gives_its_buffer_back_only_between_frames() {
        let two: Vec<u8> = (0..2)
            .flat_map(|_| encode(cmd::RECV, &[&1u32.to_be_bytes(), &[7u8; 3000]]))
            .collect();
        // Byte by byte at first: a partial frame must survive a release.
        let mut r = FrameReader::growing(&two[..], 1024, 16 * 1024);
        r.fill().unwrap();
        r.release();
        assert!(!r.buffer().is_empty(), "a partial frame keeps the buffer");
        let (_, range) = r.read_frame().unwrap();
        assert_eq!(range.len(), 3004);
        assert!(r.buffer()[range.start + 4..range.end].iter().all(|&b| b == 7));
        let grown = r.buffer().len();
        assert!(grown > 1024, "grew to hold the frame: {grown}");
        r.release();
        let (_, range) = r.read_frame().unwrap();
        assert_eq!(range.len(), 3004, "read into a freshly allocated buffer");
        r.release();
        assert!(r.buffer().is_empty(), "nothing pending: buffer given back");
        assert!(matches!(r.read_frame(), Err(IpcError::Closed)));
        let again = r.buffer().len();
        assert!(
            (1024..=grown).contains(&again),
            "allocated again, not larger: {again}"
        );
    }

    #[test]
    fn reader_reports_truncation_and_oversize() {
        let mut f = encode(cmd::RECV, &[&1u32.to_be_bytes(), b"hello"]);
        f.truncate(f.len() - 1);
        let mut r = FrameReader::new(&f[..], 64);
        assert!(matches!(r.read_frame(), Err(IpcError::Truncated)));
        let over = ((MAX_MESSAGE + 1) as u32).to_be_bytes();
        let mut r = FrameReader::new(&over[..], 64);
        assert!(matches!(r.read_frame(), Err(IpcError::TooLong(_))));
    }

    #[test]
    fn reads_error_text_and_trusted() {
        assert_eq!(error_text(b"\0\x01dial timeout"), "dial timeout");
        assert!(error_text(b"").contains("without a message"));
        let v = json::parse(r#"{"trusted":[{"network":0,"node_id":2},{"node_id":3}]}"#).unwrap();
        assert_eq!(
            parse_trusted(&v).unwrap(),
            [PilotAddr::new(0, 2), PilotAddr::new(0, 3)]
        );
        let v = json::parse(r#"{"trusted":null}"#).unwrap();
        assert!(parse_trusted(&v).unwrap().is_empty());
        let v = json::parse(r#"{"trusted":[{"node_id":-1}]}"#).unwrap();
        assert!(parse_trusted(&v).is_err());
        let v = json::parse(r#"{"trusted":5}"#).unwrap();
        assert!(parse_trusted(&v).is_err());
    }
}
