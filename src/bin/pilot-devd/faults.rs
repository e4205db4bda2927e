//! Fault modes that make pilot-devd behave like a daemon in trouble, for
//! tests of the gateway's bounds (`--help`: `--stall-accept`, `--trickle`).
//!
//! - Stalled (`--stall-accept`, toggled by SIGUSR1): the daemon stops
//!   accepting clients, and its backlog is cut to the minimum so it fills
//!   at once, as a SIGSTOPped or wedged daemon's does: a blocking connect
//!   then waits, a non-blocking one fails with EAGAIN.
//! - Trickling (`--trickle MS`): every frame to a client is written one
//!   byte at a time, MS apart, as a daemon that is alive but crawling.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::Duration;

use pilot_gateway::sys;

static STALLED: AtomicBool = AtomicBool::new(false);
static TRICKLE_MS: AtomicU64 = AtomicU64::new(0);
/// The backlog std's `UnixListener::bind` asks for, restored on unstall.
const NORMAL_BACKLOG: i32 = 128;

pub fn stall_from_start() {
    STALLED.store(true, Relaxed);
}

pub fn trickle(ms: u64) {
    TRICKLE_MS.store(ms, Relaxed);
}

/// SIGUSR1: stall, or resume.
pub fn toggle_stall() -> bool {
    !STALLED.fetch_xor(true, Relaxed)
}

/// Called by the accept loop before each accept and with each client it
/// accepted (`None` before accepting). While stalled, holds the client
/// unserved and accepts no one; returns the client to serve once not
/// stalled (clients held meanwhile are closed on resuming).
pub fn gate(listener: &UnixListener, client: Option<UnixStream>) -> Option<UnixStream> {
    if !STALLED.load(Relaxed) {
        return client;
    }
    let _ = sys::net::set_backlog(listener, 0);
    let held = client;
    while STALLED.load(Relaxed) {
        thread::sleep(Duration::from_millis(20));
    }
    let _ = sys::net::set_backlog(listener, NORMAL_BACKLOG);
    drop(held);
    None
}

/// Writes a frame, a byte at a time when trickling. `false` on failure.
pub fn write_frame(mut stream: &UnixStream, frame: &[u8]) -> bool {
    let ms = TRICKLE_MS.load(Relaxed);
    if ms == 0 {
        return stream.write_all(frame).is_ok();
    }
    for b in frame {
        if stream.write_all(std::slice::from_ref(b)).is_err() {
            return false;
        }
        thread::sleep(Duration::from_millis(ms));
    }
    true
}
