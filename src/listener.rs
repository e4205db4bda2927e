//! Listeners: one socket per mapped IP and port, bound to that IP only,
//! each with a thread waiting for clients (see [`POLL`]) that hands every
//! connection to
//! the relay (`relay.rs`), or resets it: a client from another host
//! (unless `--allow-remote`), beyond `--max-conns`, or when the process is
//! out of descriptors.
//!
//! Why check the client's address: Linux accepts packets for an address
//! on `lo` arriving on any interface, so a neighbour that routes our subnet
//! to this host would otherwise reach the agents with this host's pilot
//! identity. Binding to `lo` (SO_BINDTODEVICE) would drop them silently;
//! the check lets us count and log them.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::access::{Record, Side};
use crate::address::PilotAddr;
use crate::log::RateLimit;
use crate::relay::{self, Connections, DataPath, THREAD_STACK};
use crate::{subnet, sys, warn_limited, warn_source};

/// A listening socket on one mapped IP and port, with its accept thread.
pub struct Listener {
    pub ip: Ipv4Addr,
    pub port: u16,
    socket: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Binds `ip:port` (that IP only, never a wildcard) and starts accepting.
    pub fn start(
        ip: Ipv4Addr,
        port: u16,
        pilot: PilotAddr,
        data_path: Arc<DataPath>,
        conns: Arc<Connections>,
    ) -> io::Result<Listener> {
        let socket = TcpListener::bind((ip, port))?;
        // Accepts follow a poll (see [`POLL`]), non-blocking: a client that
        // left the queue meanwhile must not leave the thread blocked in
        // accept(2), where it would hold a descriptor number.
        socket.set_nonblocking(true)?;
        let socket = Arc::new(socket);
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (socket, stopping) = (socket.clone(), stopping.clone());
            thread::Builder::new()
                .name(format!("listen {ip}:{port}"))
                .stack_size(THREAD_STACK)
                .spawn(move || accept_loop(&socket, &stopping, pilot, &data_path, &conns))?
        };
        Ok(Listener {
            ip,
            port,
            socket,
            stopping,
            thread: Some(thread),
        })
    }

    /// Whether [`Listener::stop`] has run.
    pub fn is_stopped(&self) -> bool {
        self.thread.is_none()
    }

    /// Whether the accept thread still runs (for systemd's watchdog).
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops accepting and waits for the accept thread: at once on Linux
    /// (the shutdown wakes its poll), within the [`POLL`] interval elsewhere.
    pub fn stop(&mut self) {
        self.stopping.store(true, Relaxed);
        // On Linux, shutting the socket down wakes the thread's accept. The
        // socket stays open until both Arcs are gone, so the fd cannot be
        // reused under us.
        sys::net::shutdown_listener(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    socket: &TcpListener,
    stopping: &AtomicBool,
    pilot: PilotAddr,
    data_path: &Arc<DataPath>,
    conns: &Arc<Connections>,
) {
    // Every connection arrives at the address we bound.
    let Ok(local) = socket.local_addr() else { return };
    let mut backoff = Duration::from_millis(5);
    loop {
        if !wait_for_client(socket, stopping, POLL) {
            return;
        }
        let accepted = socket.accept();
        if stopping.load(Relaxed) {
            return;
        }
        let (tcp, client) = match accepted {
            Ok(a) => a,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::ConnectionAborted =>
            {
                continue
            }
            Err(e) if is_out_of_fds(&e) && shed_one(socket, data_path) => continue,
            Err(e) => {
                // Out of memory (or of descriptors with no reserve left,
                // or a poll that failed): wait instead of spinning,
                // doubling up to a second, then try again.
                warn_limited!(
                    ACCEPT_FAILED,
                    "accept on {}: {e}; retrying in {backoff:?}",
                    local_name(socket)
                );
                thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                // A reserve used up while nothing was free comes back
                // once something is.
                open_reserve();
                continue;
            }
        };
        backoff = Duration::from_millis(5);
        // BSDs hand out accepted sockets with the listener's O_NONBLOCK;
        // the relay's threads block on theirs (Linux never inherits it).
        #[cfg(not(target_os = "linux"))]
        if tcp.set_nonblocking(false).is_err() {
            sys::net::reset(tcp);
            continue;
        }
        if !data_path.settings.allow_remote && !subnet::is_local_client(client.ip(), local.ip()) {
            refuse_remote(tcp, client, local, pilot, data_path, conns);
            continue;
        }
        if !data_path.try_acquire() {
            let n = data_path.refused.fetch_add(1, Relaxed) + 1;
            let s = &data_path.settings;
            let share = data_path.forwarded_share();
            let reached = if share < s.max_conns {
                format!(
                    "the forwarded share of --max-conns reached ({share}: --max-exposed {} is kept for exposures)",
                    s.max_exposed
                )
            } else {
                format!("--max-conns {} reached", s.max_conns)
            };
            warn_source!(
                "refused_max_conns",
                client.ip(),
                "refused connection from {client} to {local}: {reached} ({n} refused so far)"
            );
            if let Some(log) = &data_path.access {
                let side = Side::Map {
                    client,
                    local: Some(local),
                };
                log.write(&Record::without_data(
                    side,
                    pilot,
                    "refused",
                    "--max-conns reached",
                ));
            }
            sys::net::reset(tcp);
            continue;
        }
        relay::serve(tcp, client, local, pilot, data_path, conns);
    }
}

/// How long an accept thread waits in poll(2) before it looks at its stop
/// flag. It waits for clients there, never in accept(2): Linux's accept
/// claims a descriptor number before it waits, so an idle listener
/// blocked in it held a number — out of descriptors, the very one another
/// listener's [`shed_one`] had just freed to reset a client, whose reserve
/// then could not be taken back (its clients hung in the backlog: seen in
/// CI). On Linux `stop`'s shutdown(2) wakes the poll at once (POLLHUP), so
/// the interval is only a fallback; macOS and FreeBSD wake nothing on a
/// listener's shutdown, and there 100 ms bounds how long a `stop` takes,
/// at the cost of ten wake-ups a second per idle listener.
const POLL: Duration = if cfg!(target_os = "linux") {
    Duration::from_secs(1)
} else {
    Duration::from_millis(100)
};

/// Waits until a client may be waiting on `socket` (`true`), or until
/// `stopping` is set (`false`), checking the flag at least every `wake`.
/// A failed poll counts as "may be waiting": the accept then says what
/// failed, and the caller backs off.
fn wait_for_client(socket: &TcpListener, stopping: &AtomicBool, wake: Duration) -> bool {
    loop {
        let ready = sys::net::wait_readable(socket, wake).unwrap_or(true);
        if stopping.load(Relaxed) {
            return false;
        }
        if ready {
            return true;
        }
    }
}

fn local_name(socket: &TcpListener) -> String {
    socket.local_addr().map_or_else(|_| "?".into(), |a| a.to_string())
}

fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// One descriptor kept open (on /dev/null) for the moment we run out:
/// closing it lets `shed_one` accept the waiting client and reset it,
/// so clients are refused at once instead of waiting in the backlog.
/// Process-wide, as the descriptor table is. Opened by [`open_reserve`].
static RESERVE: Mutex<Option<File>> = Mutex::new(None);

/// Opens the reserve descriptor (first thing at start, again after each
/// use, and after an accept that failed without it).
pub fn open_reserve() {
    let mut r = RESERVE.lock().unwrap_or_else(|p| p.into_inner());
    if r.is_none() {
        *r = File::open("/dev/null").ok();
    }
}

/// How long an accept thread out of descriptors waits for a client before
/// it tries `accept` again (which succeeds once descriptors are freed).
const SHED_WAIT: Duration = Duration::from_millis(100);

/// Out of descriptors: waits up to [`SHED_WAIT`] for a client; if one
/// comes, frees the reserve, accepts the client without blocking, resets
/// it, and takes the reserve back. `accept(2)` claims a descriptor before
/// it waits, so EMFILE comes back even when no client is waiting: only
/// the bounded poll waits, and never with the reserve's lock held, so
/// other listeners shed their clients meanwhile and `stop`'s shutdown ends
/// the wait (poll reports the hang-up on Linux; elsewhere the wait is
/// bounded anyway). `false` if the reserve is gone or the socket failed
/// (the caller then backs off).
fn shed_one(socket: &TcpListener, data_path: &DataPath) -> bool {
    match sys::net::wait_readable(socket, SHED_WAIT) {
        Ok(true) => {}
        Ok(false) => return true, // nobody came: try accept again
        Err(_) => return false,
    }
    let mut reserve = RESERVE.lock().unwrap_or_else(|p| p.into_inner());
    if reserve.is_none() {
        return false;
    }
    *reserve = None; // frees the descriptor the accept needs
                     // The socket is non-blocking: a client that left the queue since the
                     // poll cannot leave us blocked here with the lock held.
    let accepted = socket.accept();
    if let Ok((tcp, client)) = accepted {
        let n = data_path.refused.fetch_add(1, Relaxed) + 1;
        warn_source!(
            "refused_no_fds",
            client.ip(),
            "refused connection from {client} to {}: out of file descriptors ({n} refused so far)",
            local_name(socket)
        );
        sys::net::reset(tcp);
    }
    *reserve = File::open("/dev/null").ok();
    true
}

// Accept failures are not caused per client; refusals, which clients
// cause at will, go through `engine::report` (per kind and per client).
static ACCEPT_FAILED: RateLimit = RateLimit::new();

fn refuse_remote(
    tcp: std::net::TcpStream,
    client: SocketAddr,
    local: SocketAddr,
    pilot: PilotAddr,
    data_path: &DataPath,
    conns: &Connections,
) {
    conns.refused_remote.fetch_add(1, Relaxed);
    sys::net::reset(tcp);
    warn_source!(
        "refused_remote",
        client.ip(),
        "refused connection from {client} to {local}: not a local client (start with --allow-remote to serve other hosts)"
    );
    if let Some(log) = &data_path.access {
        let side = Side::Map {
            client,
            local: Some(local),
        };
        log.write(&Record::without_data(
            side,
            pilot,
            "refused",
            "client from another host",
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// The wait every platform relies on: a client wakes it, and a stop
    /// flag alone (no shutdown, as on macOS and FreeBSD) ends it within
    /// the wake interval.
    #[test]
    fn a_waiting_accept_thread_sees_clients_and_a_stop_without_shutdown() {
        let socket = Arc::new(TcpListener::bind("127.0.0.1:0").unwrap());
        socket.set_nonblocking(true).unwrap();
        let stopping = Arc::new(AtomicBool::new(false));
        let wake = Duration::from_millis(20);
        let _client = std::net::TcpStream::connect(socket.local_addr().unwrap()).unwrap();
        assert!(wait_for_client(&socket, &stopping, wake), "a client is waiting");
        socket.accept().unwrap();
        let (s, f) = (socket.clone(), stopping.clone());
        let waiter = thread::spawn(move || {
            let t = Instant::now();
            (wait_for_client(&s, &f, wake), t.elapsed())
        });
        thread::sleep(Duration::from_millis(100));
        stopping.store(true, Relaxed);
        let (ready, waited) = waiter.join().unwrap();
        assert!(!ready, "stopping");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    /// What Linux's `stop` relies on: shutdown(2) wakes a thread waiting
    /// for clients at once, long before its poll interval.
    #[cfg(target_os = "linux")]
    #[test]
    fn shutdown_wakes_a_waiting_accept_thread_on_linux() {
        let socket = Arc::new(TcpListener::bind("127.0.0.1:0").unwrap());
        socket.set_nonblocking(true).unwrap();
        let (s, stopping) = (socket.clone(), Arc::new(AtomicBool::new(false)));
        let f = stopping.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let t = Instant::now();
            let ready = wait_for_client(&s, &f, Duration::from_secs(60));
            tx.send((ready, t.elapsed()))
        });
        thread::sleep(Duration::from_millis(100));
        stopping.store(true, Relaxed);
        sys::net::shutdown_listener(&socket);
        // Bounded: a wait the shutdown did not end fails here, not hangs.
        let (ready, waited) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(!ready, "stopping");
        assert!(waited < Duration::from_secs(10), "{waited:?}");
    }
}
