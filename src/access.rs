//! The access log: one line per finished connection (`--access-log`).
//!
//! Connection threads never wait for it: they format the line and hand it
//! to a writer thread through a bounded queue with `try_send`. If the disk
//! or pipe is slower than the traffic, lines are dropped and counted (the
//! count is logged), never buffered without bound and never blocking.
//! SIGUSR1 makes the writer reopen the file, for log rotation. Callers
//! hand it a plain [`Record`]; it knows nothing of the data path.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::address::PilotAddr;
use crate::json::Value;
use crate::log::{rfc3339, Format};

/// Lines queued for the writer at most.
const QUEUE: usize = 4096;
/// Stack of the writer thread: it only writes lines and never recurses.
const WRITER_STACK: usize = 128 * 1024;

/// The access log's handle: queue lines with [`AccessLog::write`].
pub struct AccessLog {
    tx: SyncSender<String>,
    format: Format,
    pub dropped: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
}

impl AccessLog {
    /// Opens `path` (`-` for stderr) for appending and starts the writer.
    pub fn open(path: &str, format: Format) -> std::io::Result<AccessLog> {
        let target = if path == "-" {
            None
        } else {
            Some(PathBuf::from(path))
        };
        let file = target.as_ref().map(open_append).transpose()?;
        let (tx, rx) = sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let reopen = Arc::new(AtomicBool::new(false));
        let r2 = reopen.clone();
        std::thread::Builder::new()
            .name("access log".into())
            .stack_size(WRITER_STACK)
            .spawn(move || writer(rx, target, file, &r2))?;
        Ok(AccessLog {
            tx,
            format,
            dropped,
            reopen,
        })
    }

    /// Asks the writer to reopen the file before its next line (SIGUSR1).
    pub fn reopen(&self) {
        self.reopen.store(true, Relaxed);
        // Wake the writer even when no traffic flows.
        let _ = self.tx.try_send(String::new());
    }

    fn send(&self, line: String) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(line) {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Formats `r` and queues it for the writer; never blocks.
    pub fn write(&self, r: &Record<'_>) {
        let time = rfc3339(SystemTime::now());
        let local_ip = r.local.map_or_else(|| "-".to_string(), |a| a.ip().to_string());
        let port = r.local.map_or(0, |a| a.port());
        let ms = r.duration.as_secs_f64() * 1000.0;
        let (client, pilot, up, down, outcome) = (r.client, r.pilot, r.up, r.down, r.outcome);
        let line = match self.format {
            Format::Text => {
                let reason = text_reason(r.reason);
                format!(
                    "{time} client={client} local={local_ip}:{port} pilot={pilot}:{port} up={up} down={down} duration_ms={ms:.1} outcome={outcome}{reason}\n"
                )
            }
            Format::Json => {
                let v = vec![
                    ("time", Value::from(time)),
                    ("client", client.to_string().into()),
                    ("local_ip", local_ip.into()),
                    ("port", port.into()),
                    ("pilot_addr", pilot.to_string().into()),
                    ("bytes_up", up.into()),
                    ("bytes_down", down.into()),
                ];
                json_line(v, ms, outcome, r.reason)
            }
        };
        self.send(line);
    }
}

/// One access-log line for an exposed port's inbound connection: a peer
/// of the overlay reached the local service `target` on pilot `port`.
#[derive(Clone, Debug)]
pub struct Inbound<'a> {
    pub peer: PilotAddr,
    pub peer_port: u16,
    pub port: u16,
    pub target: SocketAddr,
    /// Bytes peer→service and service→peer.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
    /// `ok`, `reset`, `connect_failed`, `refused`.
    pub outcome: &'a str,
    pub reason: &'a str,
}

impl AccessLog {
    /// Formats an inbound record and queues it; never blocks. Text lines
    /// start with `inbound` so they never read as a forward connection.
    pub fn write_inbound(&self, r: &Inbound<'_>) {
        let time = rfc3339(SystemTime::now());
        let ms = r.duration.as_secs_f64() * 1000.0;
        let line = match self.format {
            Format::Text => {
                let reason = text_reason(r.reason);
                format!(
                    "{time} inbound peer={}:{} pilot_port={} target={} in={} out={} duration_ms={ms:.1} outcome={}{reason}\n",
                    r.peer, r.peer_port, r.port, r.target, r.bytes_in, r.bytes_out, r.outcome
                )
            }
            Format::Json => {
                let v = vec![
                    ("time", Value::from(time)),
                    ("direction", "inbound".into()),
                    ("peer", r.peer.to_string().into()),
                    ("peer_port", r.peer_port.into()),
                    ("pilot_port", r.port.into()),
                    ("target", r.target.to_string().into()),
                    ("bytes_in", r.bytes_in.into()),
                    ("bytes_out", r.bytes_out.into()),
                ];
                json_line(v, ms, r.outcome, r.reason)
            }
        };
        self.send(line);
    }
}

/// The text line's tail: ` reason="…"`, or nothing when there is none.
fn text_reason(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" reason={reason:?}")
    }
}

/// A JSON line: `v`, then the keys every record ends with (`duration_ms`
/// to a tenth, `outcome`, and `reason` only when there is one).
fn json_line(mut v: Vec<(&'static str, Value)>, ms: f64, outcome: &str, reason: &str) -> String {
    v.push(("duration_ms", ((ms * 10.0).round() / 10.0).into()));
    v.push(("outcome", outcome.into()));
    if !reason.is_empty() {
        v.push(("reason", reason.into()));
    }
    format!("{}\n", Value::obj(v))
}

/// One access-log line: a connection that ended, or one that never
/// carried data (refused, failed dial).
#[derive(Clone, Debug)]
pub struct Record<'a> {
    pub client: SocketAddr,
    /// The mapped address and port it arrived at, if known.
    pub local: Option<SocketAddr>,
    pub pilot: PilotAddr,
    pub up: u64,
    pub down: u64,
    pub duration: Duration,
    /// `ok`, `reset`, `idle_timeout`, `dial_failed`, `refused`.
    pub outcome: &'a str,
    pub reason: &'a str,
}

impl<'a> Record<'a> {
    /// A connection that ended before any data moved.
    pub fn without_data(
        client: SocketAddr,
        local: Option<SocketAddr>,
        pilot: PilotAddr,
        outcome: &'a str,
        reason: &'a str,
    ) -> Record<'a> {
        Record {
            client,
            local,
            pilot,
            up: 0,
            down: 0,
            duration: Duration::ZERO,
            outcome,
            reason,
        }
    }
}

fn open_append(path: &PathBuf) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

fn writer(rx: Receiver<String>, target: Option<PathBuf>, mut file: Option<File>, reopen: &AtomicBool) {
    for line in rx {
        if reopen.swap(false, Relaxed) {
            if let Some(path) = &target {
                match open_append(path) {
                    Ok(f) => file = Some(f),
                    Err(e) => crate::warn!("cannot reopen access log {}: {e}", path.display()),
                }
            }
        }
        if line.is_empty() {
            continue;
        }
        let result = match &mut file {
            Some(f) => f.write_all(line.as_bytes()),
            None => std::io::stderr().lock().write_all(line.as_bytes()),
        };
        if let Err(e) = result {
            crate::warn!("cannot write the access log: {e}");
        }
    }
}
