//! systemd's readiness protocol (sd_notify(3)), for `Type=notify` units:
//! when systemd starts the gateway it names a Unix datagram socket in
//! `NOTIFY_SOCKET`, and the gateway sends it one datagram per message,
//! newline-separated `KEY=VALUE` lines:
//!
//! | message                          | sent                                   |
//! |----------------------------------|----------------------------------------|
//! | `READY=1`                        | every listener bound, daemon checked   |
//! | `STATUS=…`                       | with READY and after each change       |
//! | `RELOADING=1` + `MONOTONIC_USEC=`| a SIGHUP reconcile begins              |
//! | `READY=1`                        | … and is done                          |
//! | `STOPPING=1`                     | SIGTERM/SIGINT: stopping begins        |
//! | `WATCHDOG=1`                     | every half `WATCHDOG_USEC`, while alive|
//! | `WATCHDOG_USEC=`                 | longer for a drain's wait, then back   |
//!
//! A name starting with `@` is an abstract socket (Linux), the `@` standing
//! for the leading NUL byte. The variables are removed from our
//! environment at once, so that no child (`ip`) inherits them and talks
//! to systemd in our name. Sending never blocks and never fails the
//! gateway: a lost notification costs systemd's view, not the service.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use crate::sys::proc::monotonic_usec;

/// Where notifications go, and the watchdog's period if one is asked for.
pub struct Notifier {
    socket: UnixDatagram,
    to: SocketAddr,
    /// Half of `WATCHDOG_USEC`: systemd's advice for the ping interval.
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    last_status: String,
}

impl Notifier {
    /// Takes `NOTIFY_SOCKET` (and `WATCHDOG_USEC`/`WATCHDOG_PID`) out of
    /// the environment; a notifier when the socket is named and usable.
    /// Call it before any thread starts (changing the environment is not
    /// safe while another thread reads it).
    pub fn from_env() -> Option<Notifier> {
        let name = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let for_pid = std::env::var("WATCHDOG_PID").ok();
        for k in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(k);
        }
        let to = address(name?.as_encoded_bytes())?;
        // WATCHDOG_PID, when set, names the process the watchdog is for: a
        // child started with our environment is not it.
        let ours = for_pid.map_or(true, |p| p.trim() == std::process::id().to_string());
        let watchdog = usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && ours)
            .map(|u| Duration::from_micros(u / 2));
        let socket = UnixDatagram::unbound().ok()?;
        // Never block the main thread on a stalled receiver.
        socket.set_nonblocking(true).ok()?;
        Some(Notifier {
            socket,
            to,
            watchdog,
            last_ping: None,
            last_status: String::new(),
        })
    }

    /// Sends one message (lines `KEY=VALUE`), best effort.
    pub fn send(&self, message: &str) {
        let _ = self.socket.send_to_addr(message.as_bytes(), &self.to);
    }

    /// `READY=1` with the current status line.
    pub fn ready(&mut self, status: String) {
        self.send(&format!("READY=1\nSTATUS={status}"));
        self.last_status = status;
    }

    /// A SIGHUP reconcile begins: `RELOADING=1` with the monotonic time,
    /// which systemd ≥ 253 requires to match the reload to its request.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// `STATUS=…`, only when it changed.
    pub fn status(&mut self, status: String) {
        if status != self.last_status {
            self.send(&format!("STATUS={status}"));
            self.last_status = status;
        }
    }

    /// How long the main thread may wait before the next watchdog ping is
    /// due (`None`: no watchdog).
    pub fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Pings the watchdog if a ping is due and `alive` holds: systemd
    /// restarts a gateway whose accept loops or daemon check have died.
    pub fn watchdog(&mut self, alive: impl FnOnce() -> bool) {
        let Some(period) = self.watchdog else { return };
        if self.last_ping.is_some_and(|t| t.elapsed() < period) {
            return;
        }
        if alive() {
            self.send("WATCHDOG=1");
            self.last_ping = Some(Instant::now());
        }
    }
}

impl Notifier {
    /// Before the main thread blocks for up to `d` (a drain, which pings
    /// nothing meanwhile): systemd's watchdog timeout grows by `d` for that
    /// long (`WATCHDOG_USEC=`, systemd ≥ 236), so a drain is not taken for
    /// a hang. [`Notifier::watchdog_back`] restores it.
    pub fn watchdog_stretch(&self, d: Duration) {
        if let Some(period) = self.watchdog {
            let usec = (period * 2 + d).as_micros();
            self.send(&format!("WATCHDOG_USEC={usec}\nWATCHDOG=1"));
        }
    }

    /// The usual watchdog timeout again, with a ping.
    pub fn watchdog_back(&mut self) {
        if let Some(period) = self.watchdog {
            self.send(&format!("WATCHDOG_USEC={}\nWATCHDOG=1", (period * 2).as_micros()));
            self.last_ping = Some(Instant::now());
        }
    }
}

/// The socket address `NOTIFY_SOCKET` names: a path, or `@name` for an
/// abstract socket (Linux only).
fn address(name: &[u8]) -> Option<SocketAddr> {
    match name {
        [] => None,
        [b'@', rest @ ..] => abstract_address(rest),
        path => {
            let path = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
            // Only absolute paths, as sd_notify accepts.
            path.is_absolute().then(|| SocketAddr::from_pathname(path).ok())?
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(name: &[u8]) -> Option<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name).ok()
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_address(_: &[u8]) -> Option<SocketAddr> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(address(b"").is_none());
        assert!(address(b"relative/path").is_none());
        assert_eq!(
            address(b"/run/systemd/notify").and_then(|a| a.as_pathname().map(|p| p.to_path_buf())),
            Some("/run/systemd/notify".into())
        );
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let a = address(b"@sd-notify").unwrap();
            assert_eq!(a.as_abstract_name(), Some(&b"sd-notify"[..]));
        }
    }

    #[test]
    fn monotonic_is_counting() {
        let a = monotonic_usec();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_usec() > a && a > 0);
    }
}
