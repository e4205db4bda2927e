//! Serving a port: Bind, Unbind, and inbound connections (`--inbound`)
//! arriving as Accept on the session that bound their port.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use pilot_gateway::ipc::{self, cmd};
use pilot_gateway::sys;

use crate::conns::Conn;

use super::*;

pub(super) fn port_of(payload: &[u8]) -> Option<u16> {
    payload.get(..2).map(|p| u16::from_be_bytes([p[0], p[1]]))
}

/// Bind: one owner per port; the daemon's own services hold theirs.
pub(super) fn bind(d: &Daemon, c: &Arc<Client>, payload: &[u8]) {
    let Some(port) = port_of(payload) else {
        c.error("bind: short payload");
        return;
    };
    let taken = {
        let mut ports = d.ports.lock().unwrap_or_else(|p| p.into_inner());
        let taken = SERVICE_PORTS.contains(&port) || ports.contains_key(&port);
        if !taken {
            ports.insert(port, c.clone());
        }
        taken
    };
    if taken {
        c.error(&format!("port {port} already bound"));
    } else {
        if d.cfg.verbose {
            say!("bind {port}");
        }
        c.send(&ipc::encode(cmd::BIND_OK, &[&port.to_be_bytes()]));
    }
}

/// Unbind (newer daemons, `--unbind`): frees the port; connections
/// already accepted on it keep flowing.
pub(super) fn unbind(d: &Daemon, c: &Arc<Client>, payload: &[u8]) {
    let Some(port) = port_of(payload) else {
        c.error("unbind: short payload");
        return;
    };
    let owned = {
        let mut ports = d.ports.lock().unwrap_or_else(|p| p.into_inner());
        let owned = ports.get(&port).is_some_and(|o| Arc::ptr_eq(o, c));
        if owned {
            ports.remove(&port);
        }
        owned
    };
    if owned {
        c.send(&ipc::encode(cmd::UNBIND_OK, &[&port.to_be_bytes()]));
    } else {
        c.error("unbind: port is not owned by this client");
    }
}

/// The session ended: free its ports, abandon its dials, close its
/// connections.
pub(super) fn session_ended(d: &Daemon, c: &Arc<Client>) {
    c.closed.store(true, Relaxed);
    d.ports
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|_, owner| !Arc::ptr_eq(owner, c));
    if let Ok(p) = c.pending.lock() {
        for flag in p.iter() {
            flag.store(true, Relaxed);
        }
    }
    if let Ok(mut m) = c.conns.lock() {
        for (_, t) in m.drain() {
            t.end();
            let _ = t.tcp.shutdown(Shutdown::Both);
        }
    }
    let _ = c.stream.shutdown(Shutdown::Both);
    if d.cfg.verbose {
        say!("client disconnected");
    }
}

/// Accepts TCP connections standing in for remote peers of `--inbound`.
pub(super) fn accept_inbound(d: &Arc<Daemon>, listener: &TcpListener, inbound: &Inbound) {
    for tcp in listener.incoming() {
        let tcp = match tcp {
            Ok(t) => t,
            Err(e) => {
                say!("inbound accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let (d2, inbound) = (d.clone(), inbound.clone());
        let spawned = thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || inbound_conn(&d2, tcp, &inbound));
        if spawned.is_err() {
            say!("inbound: out of threads");
        }
    }
}

/// One inbound connection: Accept to the port's owner, then relay.
pub(super) fn inbound_conn(d: &Daemon, tcp: TcpStream, inbound: &Inbound) {
    let owner = d
        .ports
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&inbound.port)
        .cloned();
    let Some(c) = owner.filter(|c| !c.closed.load(Relaxed)) else {
        if d.cfg.verbose {
            say!("inbound to port {}: nobody bound it, reset", inbound.port);
        }
        return sys::net::reset(tcp);
    };
    let id = d.next_conn.fetch_add(1, Relaxed);
    let mut m = c.conns.lock().unwrap_or_else(|p| p.into_inner());
    // A session that ended meanwhile has already closed its connections.
    if m.len() >= MAX_CONNS_PER_CLIENT || c.closed.load(Relaxed) {
        drop(m);
        say!(
            "inbound to port {}: client gone or at {MAX_CONNS_PER_CLIENT} connections, reset",
            inbound.port
        );
        return sys::net::reset(tcp);
    }
    let _ = tcp.set_nodelay(true);
    let remote_port = d
        .next_remote_port
        .fetch_update(Relaxed, Relaxed, |p| {
            Some(p.checked_add(1).unwrap_or(EPHEMERAL_START))
        })
        .unwrap_or(EPHEMERAL_START);
    let conn = Conn::new(id, tcp, (inbound.port, inbound.addr, remote_port), true);
    m.insert(id, conn.clone());
    drop(m);
    d.register(&conn);
    if d.cfg.verbose {
        say!(
            "inbound connection {id} from {}:{remote_port} to port {}",
            inbound.addr,
            inbound.port
        );
    }
    c.send(&ipc::encode(
        cmd::ACCEPT,
        &[
            &inbound.port.to_be_bytes(),
            &id.to_be_bytes(),
            &inbound.addr.to_wire(),
            &remote_port.to_be_bytes(),
        ],
    ));
    // `--lossy-close`: the far side's dial completes only MS after the
    // Accept; a dialer cannot send before that.
    if let Some(ms) = d.cfg.lossy_close {
        thread::sleep(ms);
    }
    relay_to_client(&c, &conn);
}
