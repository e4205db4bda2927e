//! Dialing: Dial (blocking its session or not, as the daemon does), the
//! connection once established, and its Recv frames to the client.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pilot_gateway::address::PilotAddr;
use pilot_gateway::ipc::{self, cmd};

use crate::conns::Conn;

use super::*;

/// Handles a Dial in its own thread (newer daemons dispatch concurrently).
pub(super) fn dial(d: &Arc<Daemon>, c: &Arc<Client>, payload: &[u8]) {
    let (Some(addr), Some(port)) = (
        PilotAddr::from_wire(payload),
        payload.get(6..8).map(|p| u16::from_be_bytes([p[0], p[1]])),
    ) else {
        c.error("dial: short payload");
        return;
    };
    let cancelled = Arc::new(AtomicBool::new(false));
    if let Ok(mut p) = c.pending.lock() {
        p.push(cancelled.clone());
    }
    let (d2, c2) = (d.clone(), c.clone());
    let spawned = thread::Builder::new().stack_size(STACK).spawn(move || {
        let (d, c) = (d2, c2);
        let result = dial_blocking(&d, &c, addr, port, &cancelled);
        if let Ok(mut p) = c.pending.lock() {
            p.retain(|f| !Arc::ptr_eq(f, &cancelled));
        }
        if cancelled.load(Relaxed) {
            return; // abandoned: nothing is sent
        }
        match result {
            Ok(tcp) => established(&d, &c, addr, port, tcp),
            Err(msg) => {
                if d.cfg.verbose {
                    say!("dial {addr}:{port} failed: {msg}");
                }
                c.error(&msg);
            }
        }
    });
    if spawned.is_err() {
        c.error("dial: out of threads");
    }
}

pub(super) fn dial_blocking(
    d: &Daemon,
    c: &Client,
    addr: PilotAddr,
    port: u16,
    cancelled: &AtomicBool,
) -> Result<TcpStream, String> {
    let delay = d
        .cfg
        .dial_delay_for
        .get(&addr)
        .copied()
        .unwrap_or(d.cfg.dial_delay);
    let until = Instant::now() + delay;
    // Bounded by `delay`; wakes every 10 ms to honour Cancel.
    while Instant::now() < until {
        if cancelled.load(Relaxed) || c.closed.load(Relaxed) {
            return Err("dial cancelled".into());
        }
        thread::sleep((until - Instant::now()).min(Duration::from_millis(10)));
    }
    if c.conns.lock().map_or(0, |m| m.len()) >= MAX_CONNS_PER_CLIENT {
        return Err(format!(
            "dial: too many connections (limit {MAX_CONNS_PER_CLIENT} per client)"
        ));
    }
    if let Some(text) = d.cfg.dial_error.get(&addr) {
        return Err(text.clone());
    }
    if d.cfg.untrusted.contains(&addr) {
        return Err(format!(
            "dial {addr}: node has not established trust with us (run: pilotctl handshake {addr})"
        ));
    }
    let Some(target) = d.cfg.target(addr, port) else {
        return Err(if d.cfg.known(addr) {
            "dial: connection refused".into()
        } else {
            format!("resolve node {}: registry: request failed", addr.node)
        });
    };
    match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Err("dial: connection refused".into()),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Err("dial timeout".into()),
        Err(e) => Err(format!("dial: {e}")),
    }
}

/// The dial succeeded: answer DialOK and relay service → client.
pub(super) fn established(d: &Daemon, c: &Arc<Client>, addr: PilotAddr, port: u16, tcp: TcpStream) {
    let id = d.next_conn.fetch_add(1, Relaxed);
    let _ = tcp.set_nodelay(true);
    let local_port = d
        .next_local_port
        .fetch_update(Relaxed, Relaxed, |p| {
            Some(p.checked_add(1).unwrap_or(EPHEMERAL_START))
        })
        .unwrap_or(EPHEMERAL_START);
    let conn = Conn::new(id, tcp, (local_port, addr, port), false);
    if let Ok(mut m) = c.conns.lock() {
        m.insert(id, conn.clone());
    }
    d.register(&conn);
    if d.cfg.verbose {
        say!("dial {addr}:{port} ok: connection {id}");
    }
    match d.cfg.misbehaviour(addr) {
        Some(Misbehave::ShortDialOk) => {
            c.send(&ipc::encode(cmd::DIAL_OK, &[&id.to_be_bytes()[..2]]));
            return;
        }
        Some(m) => {
            c.send(&ipc::encode(cmd::DIAL_OK, &[&id.to_be_bytes()]));
            misbehave(c, m, id);
            return;
        }
        None => {
            c.send(&ipc::encode(cmd::DIAL_OK, &[&id.to_be_bytes()]));
        }
    }
    relay_to_client(c, &conn);
}

/// Service → client. Frames carry at most 4096 data bytes, as the real
/// daemon's do; a read of up to 16 of them is framed into one buffer and
/// written with one call, so the stand-in costs few syscalls per byte and
/// does not limit the gateway's measurements. When the service closes,
/// the remaining data has gone out, then an unsolicited CloseOK follows.
/// The read buffer starts at one chunk and grows to 16 while reads fill
/// it: most connections carry little, and thousands of short ones each
/// zeroing 64 KiB cost more than their data.
pub(super) fn relay_to_client(c: &Client, conn: &Conn) {
    let (id, tcp) = (conn.id, &conn.tcp);
    let mut data = vec![0u8; RECV_CHUNK];
    let mut out = Vec::new();
    loop {
        let n = match (&*tcp).read(&mut data) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if n == data.len() && data.len() < 16 * RECV_CHUNK {
            let grown = data.len() * 2;
            data.resize(grown, 0);
        }
        if !c.conns.lock().is_ok_and(|m| m.contains_key(&id)) {
            continue; // closed by the client: discarded
        }
        conn.received(n);
        out.clear();
        for chunk in data[..n].chunks(RECV_CHUNK) {
            out.extend_from_slice(&((chunk.len() + 5) as u32).to_be_bytes());
            out.push(cmd::RECV);
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(chunk);
        }
        if !c.send(&out) {
            break;
        }
    }
    // Still registered: the remote side closed, so tell the client.
    let ours = c.conns.lock().ok().and_then(|mut m| m.remove(&id)).is_some();
    if ours {
        conn.end();
        let _ = tcp.shutdown(Shutdown::Both);
        c.send(&ipc::encode(cmd::CLOSE_OK, &[&id.to_be_bytes()]));
    }
}
