//! The access log: one line per finished connection (`--access-log`).
//!
//! Connection threads never wait for it: they format the line and hand it
//! to a writer thread through a bounded queue with `try_send`. If the disk
//! or pipe is slower than the traffic, lines are dropped and counted (the
//! count is logged), never buffered without bound and never blocking.
//! SIGUSR1 makes the writer reopen the file, for log rotation. Callers
//! hand it a plain [`Record`] (one type for both directions); it knows
//! nothing of the data path.

use std::fs::File;
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
        let file = target.as_deref().map(open_append).transpose()?;
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

    /// Formats `r` and queues it for the writer; never blocks. Inbound
    /// text lines start with `inbound` so they never read as a map line.
    pub fn write(&self, r: &Record<'_>) {
        self.send(line(self.format, r));
    }
}

/// The line for `r` in `format`, ending in a newline.
fn line(format: Format, r: &Record<'_>) -> String {
    let time = rfc3339(SystemTime::now());
    let ms = r.duration.as_secs_f64() * 1000.0;
    let (pilot, to, from, outcome) = (r.pilot, r.to_pilot, r.from_pilot, r.outcome);
    match (format, &r.side) {
            (Format::Text, Side::Map { client, local }) => {
                let local_ip = local.map_or_else(|| "-".to_string(), |a| a.ip().to_string());
                let port = local.map_or(0, |a| a.port());
                format!(
                    "{time} client={client} local={local_ip}:{port} pilot={pilot}:{port} up={to} down={from} duration_ms={ms:.1} outcome={outcome}{}\n",
                    text_reason(r.reason)
                )
            }
            (Format::Text, Side::Expose { peer_port, port, target }) => format!(
                "{time} inbound peer={pilot}:{peer_port} pilot_port={port} target={target} in={from} out={to} duration_ms={ms:.1} outcome={outcome}{}\n",
                text_reason(r.reason)
            ),
            (Format::Json, Side::Map { client, local }) => {
                let local_ip = local.map_or_else(|| "-".to_string(), |a| a.ip().to_string());
                let v = vec![
                    ("time", Value::from(time)),
                    ("client", client.to_string().into()),
                    ("local_ip", local_ip.into()),
                    ("port", local.map_or(0, |a| a.port()).into()),
                    ("pilot_addr", pilot.to_string().into()),
                    ("bytes_up", to.into()),
                    ("bytes_down", from.into()),
                ];
                json_line(v, ms, outcome, r.reason)
            }
            (Format::Json, Side::Expose { peer_port, port, target }) => {
                let v = vec![
                    ("time", Value::from(time)),
                    ("direction", "inbound".into()),
                    ("peer", pilot.to_string().into()),
                    ("peer_port", (*peer_port).into()),
                    ("pilot_port", (*port).into()),
                    ("target", target.to_string().into()),
                    ("bytes_in", from.into()),
                    ("bytes_out", to.into()),
                ];
                json_line(v, ms, outcome, r.reason)
            }
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

/// Which way a connection went, with what only that direction knows.
#[derive(Clone, Debug)]
pub enum Side {
    /// A local client bridged to an agent: the client, and the mapped
    /// address and port it arrived at (if known).
    Map {
        client: SocketAddr,
        local: Option<SocketAddr>,
    },
    /// A peer of the overlay that reached the local service `target` on
    /// pilot `port` (inbound).
    Expose {
        peer_port: u16,
        port: u16,
        target: SocketAddr,
    },
}

/// One access-log line, either direction: a connection that ended, or one
/// that never carried data (refused, failed dial or connect).
#[derive(Clone, Debug)]
pub struct Record<'a> {
    pub side: Side,
    /// The agent (map) or the peer (expose).
    pub pilot: PilotAddr,
    /// Bytes towards the pilot side (map: up; expose: out) and from it.
    pub to_pilot: u64,
    pub from_pilot: u64,
    pub duration: Duration,
    /// The ending's label (`engine::Ending`): `ok`, `reset`, …
    pub outcome: &'a str,
    pub reason: &'a str,
}

impl<'a> Record<'a> {
    /// A connection that ended before any data moved.
    pub fn without_data(side: Side, pilot: PilotAddr, outcome: &'a str, reason: &'a str) -> Record<'a> {
        Record {
            side,
            pilot,
            to_pilot: 0,
            from_pilot: 0,
            duration: Duration::ZERO,
            outcome,
            reason,
        }
    }
}

fn open_append(path: &std::path::Path) -> std::io::Result<File> {
    crate::sys::fs::open_secure_file(
        path,
        libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_NONBLOCK,
        0o640,
    )
}

static WRITE_FAILED: crate::log::RateLimit = crate::log::RateLimit::new();

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
        // Every connection writes a record, so a failing file (its disk
        // full, which clients' records can bring about) would otherwise
        // cost one warning per connection: rate-limited.
        if let Err(e) = result {
            crate::warn_limited!(WRITE_FAILED, "cannot write the access log: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(outcome: &'static str, reason: &'static str) -> Record<'static> {
        Record {
            side: Side::Map {
                client: "127.0.0.1:5000".parse().unwrap(),
                local: Some("10.4.0.1:80".parse().unwrap()),
            },
            pilot: PilotAddr::new(0, 4),
            to_pilot: 3,
            from_pilot: 5,
            duration: Duration::from_millis(12),
            outcome,
            reason,
        }
    }

    fn inbound() -> Record<'static> {
        Record {
            side: Side::Expose {
                peer_port: 4000,
                port: 80,
                target: "127.0.0.1:8000".parse().unwrap(),
            },
            pilot: PilotAddr::new(0, 9),
            to_pilot: 7,
            from_pilot: 11,
            duration: Duration::ZERO,
            outcome: "idle_timeout",
            reason: "",
        }
    }

    #[test]
    fn a_map_line_in_text() {
        let l = line(Format::Text, &map("reset", "cut"));
        assert!(l.contains(" client=127.0.0.1:5000 local=10.4.0.1:80 pilot=0:0000.0000.0004:80 up=3 down=5 duration_ms=12.0 outcome=reset reason=\"cut\"\n"), "{l}");
    }

    #[test]
    fn an_inbound_line_in_text_says_inbound() {
        let l = line(Format::Text, &inbound());
        assert!(l.contains(" inbound peer=0:0000.0000.0009:4000 pilot_port=80 target=127.0.0.1:8000 in=11 out=7 duration_ms=0.0 outcome=idle_timeout\n"), "{l}");
    }

    #[test]
    fn json_lines_keep_their_keys() {
        let v = crate::json::parse(line(Format::Json, &map("ok", "")).trim()).unwrap();
        assert_eq!(v.get("bytes_up").and_then(Value::as_u64), Some(3));
        assert_eq!(v.get("bytes_down").and_then(Value::as_u64), Some(5));
        assert_eq!(v.get("outcome").and_then(Value::as_str), Some("ok"));
        assert!(v.get("reason").is_none(), "no empty reason");
        let v = crate::json::parse(line(Format::Json, &inbound()).trim()).unwrap();
        assert_eq!(v.get("direction").and_then(Value::as_str), Some("inbound"));
        assert_eq!(v.get("bytes_in").and_then(Value::as_u64), Some(11));
        assert_eq!(v.get("bytes_out").and_then(Value::as_u64), Some(7));
    }

    #[test]
    fn a_record_without_data_moved_nothing() {
        let side = Side::Map {
            client: "127.0.0.1:1".parse().unwrap(),
            local: None,
        };
        let r = Record::without_data(side, PilotAddr::new(0, 4), "refused", "x");
        let l = line(Format::Text, &r);
        assert!(l.contains("local=-:0") && l.contains("up=0 down=0"), "{l}");
    }
}
