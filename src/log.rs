//! Event log: one line per event on stderr, as text or JSON, for journald
//! or a log file.
//!
//! Level and format are process-wide settings (atomics), so logging needs
//! no handle passed around and costs one relaxed load when disabled. The
//! line is built first and written with one call, so lines from different
//! threads never interleave.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Some(Format::Text),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static FORMAT: AtomicU8 = AtomicU8::new(Format::Text as u8);

pub fn init(level: Level, format: Format) {
    LEVEL.store(level as u8, Ordering::Relaxed);
    FORMAT.store(format as u8, Ordering::Relaxed);
}

pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

pub fn format() -> Format {
    if FORMAT.load(Ordering::Relaxed) == Format::Json as u8 {
        Format::Json
    } else {
        Format::Text
    }
}

/// Writes one event line to stderr (if `level` is enabled). A text line is
/// always one line: control characters in the message are escaped.
pub fn log(level: Level, msg: std::fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let mut line = String::with_capacity(128);
    let time = rfc3339(SystemTime::now());
    match format() {
        Format::Text => {
            let msg = crate::escape::escape_control(&msg.to_string());
            let _ = writeln!(line, "{time} {:<5} {msg}", level.as_str().to_uppercase());
        }
        Format::Json => {
            let v = json::Value::obj([
                ("time", json::Value::from(time)),
                ("level", level.as_str().into()),
                ("msg", msg.to_string().into()),
            ]);
            let _ = writeln!(line, "{v}");
        }
    }
    // Nothing sensible to do if stderr is gone.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// A rate limit for one kind of warning that clients can cause at will
/// (a refused or failed connection): any local user can open connections
/// in a loop, and one line each would grow the log (in /run, or the
/// journal) without bound. A token bucket: bursts of up to
/// [`RateLimit::BURST`] lines, then one a second; the next line that gets
/// through says how many were suppressed. Counters (`status`) still count
/// every event. One `static` per kind, used through [`warn_limited!`].
pub struct RateLimit {
    bucket: Mutex<Bucket>,
}

struct Bucket {
    /// Lines that may be written now, in thousandths.
    credit: u64,
    /// When `credit` was last refilled (`None`: never used, full).
    at: Option<Instant>,
    /// Lines suppressed since the last one written.
    suppressed: u64,
}

impl RateLimit {
    pub const BURST: u64 = 10;

    pub const fn new() -> RateLimit {
        RateLimit {
            bucket: Mutex::new(Bucket {
                credit: RateLimit::BURST * 1000,
                at: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` if a line may be written now, `n` lines having been
    /// suppressed since the last one; `None` (and one more suppressed) if not.
    pub fn allow(&self) -> Option<u64> {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(at) = b.at {
            let refill = now
                .duration_since(at)
                .as_millis()
                .min(u128::from(RateLimit::BURST * 1000));
            b.credit = (b.credit + refill as u64).min(RateLimit::BURST * 1000);
        }
        b.at = Some(now);
        if b.credit < 1000 {
            b.suppressed += 1;
            return None;
        }
        b.credit -= 1000;
        Some(std::mem::take(&mut b.suppressed))
    }
}

impl Default for RateLimit {
    fn default() -> RateLimit {
        RateLimit::new()
    }
}

/// The note a rate-limited line carries about the lines suppressed before it.
pub fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar lines suppressed)")
    }
}

/// `warn!` through a [`RateLimit`]: `warn_limited!(LIMIT, "…", args)`.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $($t:tt)*) => {
        if let Some(n) = $limit.allow() {
            $crate::log::log(
                $crate::log::Level::Warn,
                format_args!("{}{}", format_args!($($t)*), $crate::log::suppressed_note(n)),
            )
        }
    };
}

#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Error, format_args!($($t)*)) } }
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Warn, format_args!($($t)*)) } }
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Info, format_args!($($t)*)) } }
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Debug, format_args!($($t)*)) } }

/// `2026-11-24T19:42:56.123Z` — UTC, millisecond precision.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_time() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_535_615_250);
        assert_eq!(rfc3339(t), "2026-11-24T15:53:35.250Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn rate_limit_allows_a_burst_then_counts_what_it_suppresses() {
        let limit = RateLimit::new();
        for _ in 0..RateLimit::BURST {
            assert_eq!(limit.allow(), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(limit.allow(), None);
        }
        // A second later one more line gets through, with the count.
        limit.bucket.lock().unwrap().at = Some(Instant::now() - Duration::from_millis(1000));
        assert_eq!(limit.allow(), Some(5));
        assert_eq!(limit.allow(), None);
        assert_eq!(suppressed_note(0), "");
        assert_eq!(suppressed_note(3), " (3 similar lines suppressed)");
    }

    #[test]
    fn parses_levels() {
        assert_eq!(Level::parse("WARN"), Some(Level::Warn));
        assert_eq!(Level::parse("verbose"), None);
        assert_eq!(Format::parse("json"), Some(Format::Json));
        assert!(Level::Error < Level::Debug);
    }
}
