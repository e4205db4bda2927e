//! Listeners: one socket per mapped IP and port, bound to that IP only,
//! each with a thread blocked in `accept` that hands every connection to
//! the relay (`relay.rs`), or resets it beyond `--max-conns`.

use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::access::Record;
use crate::address::PilotAddr;
use crate::relay::{self, Connections, DataPath, THREAD_STACK};
use crate::{sys, warn};

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
        let socket = Arc::new(TcpListener::bind((ip, port))?);
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

    /// Stops accepting and waits for the accept thread.
    pub fn stop(&mut self) {
        self.stopping.store(true, Relaxed);
        // Shutting the socket down wakes the accept thread. The socket stays
        // open until both Arcs are gone, so the fd cannot be reused under us.
        sys::shutdown_listener(&self.socket);
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
        let accepted = socket.accept();
        if stopping.load(Relaxed) {
            return;
        }
        let (tcp, client) = match accepted {
            Ok(a) => a,
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::ConnectionAborted =>
            {
                continue
            }
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning,
                // doubling up to a second, then try again.
                warn!("accept on {}: {e}; retrying in {backoff:?}", local_name(socket));
                thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(5);
        if !data_path.try_acquire() {
            let n = data_path.refused.fetch_add(1, Relaxed) + 1;
            warn!(
                "refused connection from {client} to {}: --max-conns {} reached ({n} refused so far)",
                local_name(socket),
                data_path.settings.max_conns
            );
            if let Some(log) = &data_path.access {
                let local = socket.local_addr().ok();
                log.write(&Record::without_data(
                    client,
                    local,
                    pilot,
                    "refused",
                    "--max-conns reached",
                ));
            }
            relay::reset(tcp);
            continue;
        }
        relay::serve(tcp, client, local, pilot, data_path, conns);
    }
}

fn local_name(socket: &TcpListener) -> String {
    socket.local_addr().map_or_else(|_| "?".into(), |a| a.to_string())
}
