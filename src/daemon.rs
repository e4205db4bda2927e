//! Questions the gateway and its commands ask the daemon: is it there
//! (Health, or Info on older daemons), what does a hostname resolve to,
//! which peers does it trust. Each opens or borrows one IPC session and
//! turns the daemon's answers into the crate's errors.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::address::PilotAddr;
use crate::error::{Code, Error, Result};
use crate::ipc::{IpcError, Peer, Session};
use crate::json::Value;
use crate::sys::user::Uid;

/// Connects to the daemon and checks that it answers: Health on newer
/// daemons, Info on older ones (which answer Health with an Error frame).
/// `expect`: the daemon's uid seen at start (see `ipc::connect_by`); a
/// socket served by another uid is refused as unreachable.
pub fn probe(
    socket: &Path,
    source: &str,
    timeout: Duration,
    expect: Option<Uid>,
) -> Result<(Session, Value)> {
    let unreachable = |e: &dyn std::fmt::Display| unreachable(socket, source, e);
    let mut s = Session::connect_within(socket, timeout, expect).map_err(|e| unreachable(&e))?;
    s.set_timeout(Some(timeout)).map_err(|e| unreachable(&e))?;
    let answer = match s.health() {
        Ok(v) => Ok(v),
        Err(IpcError::Daemon(_)) | Err(IpcError::Unexpected { .. }) => {
            // Info lists every connection the daemon holds, closed ones
            // for 10 to 25 s (`conn_list`'s notes): megabytes on a busy
            // daemon, beyond the 1 MiB a frame may otherwise have.
            s.set_max_reply(crate::closing::MAX_INFO);
            s.info()
        }
        Err(e) => Err(e),
    };
    match answer {
        Ok(v) => Ok((s, v)),
        Err(e) if e.is_closed() => Err(Error::new(
            Code::PermissionDenied,
            format!(
                "the Pilot daemon at {} ({source}) closed the session without answering: newer daemons accept only clients running as their own user{}",
                socket.display(),
                peer_note(s.peer())
            ),
        )
        .hint("run the gateway as the daemon's user (as root it switches automatically unless --no-user-switch; or pass --user NAME)")),
        Err(e) if e.is_timeout() => Err(Error::new(
            Code::Timeout,
            format!("the Pilot daemon at {} ({source}) did not answer within {timeout:?}", socket.display()),
        )
        .hint("check that the daemon is healthy")),
        Err(e) => Err(unreachable(&e)),
    }
}

fn unreachable(socket: &Path, source: &str, e: &dyn std::fmt::Display) -> Error {
    let text = e.to_string();
    let message = format!(
        "cannot reach the Pilot daemon at {} ({source}): {text}",
        socket.display()
    );
    // EACCES: the socket is there but not ours to open; starting a daemon
    // would not help, the daemon's user would.
    if text.contains("os error 13") || text.contains("Permission denied") {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(socket).ok().map(|m| {
            let who = crate::sys::user::user_by_uid(crate::sys::user::Uid(m.uid()))
                .map_or(format!("uid {}", m.uid()), |u| u.name);
            (who, m.mode() & 0o777)
        });
        let (who, mode) = owner.map_or_else(
            || ("the daemon's user".to_string(), String::new()),
            |(w, m)| (w, format!(", mode {m:o}")),
        );
        return Error::new(Code::PermissionDenied, message).hint(format!(
            "the socket belongs to {who}{mode}, the user the Pilot daemon runs as: run the command as that user (sudo -u {who} pilot-gateway …) or as root"
        ));
    }
    Error::new(Code::DaemonUnreachable, message)
        .hint("start the Pilot daemon, or point to its socket with --socket PATH (or PILOT_SOCKET)")
}

/// Who serves the daemon socket: the peer credentials of one connection,
/// made before anything else at start (as root, before any user switch).
/// Newer daemons close a client of another uid right away, but the
/// credentials are the listener's and known as soon as connect(2)
/// returns, so this works whoever we are. Nothing is sent.
pub fn identify(socket: &Path, source: &str, timeout: Duration) -> Result<Peer> {
    let s = Session::connect_within(socket, timeout, None).map_err(|e| unreachable(socket, source, &e))?;
    s.peer()
        .ok_or_else(|| Error::internal("a connected session without peer credentials"))
}

fn peer_note(peer: Option<Peer>) -> String {
    match peer {
        Some(p) => {
            let owner = crate::sys::user::user_by_uid(p.uid).map_or(format!("uid {}", p.uid), |u| u.name);
            format!(
                " (the daemon runs as {owner}; we run as uid {})",
                crate::sys::user::euid()
            )
        }
        None => String::new(),
    }
}

/// Checks `addrs` against the daemon's trusted peers; one warning per
/// untrusted address, or one saying the list could not be read.
pub fn trust_warnings(session: &mut Session, addrs: &[PilotAddr]) -> Vec<String> {
    match session.trusted_peers() {
        Ok(trusted) => addrs
            .iter()
            .filter(|a| !trusted.contains(a))
            .map(|a| {
                format!(
                    "{a} is not a trusted peer of this node; connections to it will fail until trust is established (pilotctl handshake {a})"
                )
            })
            .collect(),
        Err(e) => vec![format!("could not check trust with the daemon: {e}")],
    }
}

/// Resolves `--allow` peers (addresses, or hostnames through the daemon,
/// on one session opened only when a hostname needs it). Each comes back
/// with the hostname it was given by, for display.
pub fn resolve_peers(
    socket: &Path,
    peers: &[String],
    expect: Option<Uid>,
) -> Result<Vec<(PilotAddr, Option<String>)>> {
    let mut session = None;
    let mut out: Vec<(PilotAddr, Option<String>)> = Vec::new();
    for p in peers {
        if session.is_none() && !PilotAddr::looks_like_address(p) {
            session = Some(probe(socket, "the daemon socket", Duration::from_secs(5), expect)?.0);
        }
        let (addr, name) = resolve_target(session.as_mut(), p).map_err(|mut e| {
            e.message = format!("--allow {p:?}: {}", e.message);
            e
        })?;
        if !out.iter().any(|(a, _)| *a == addr) {
            out.push((addr, name));
        }
    }
    Ok(out)
}

/// Resolves a target name: a strict pilot address, or a hostname looked up
/// through the daemon.
pub fn resolve_target(session: Option<&mut Session>, name: &str) -> Result<(PilotAddr, Option<String>)> {
    let addr = if PilotAddr::looks_like_address(name) {
        name.parse::<PilotAddr>().map_err(|e| {
            Error::invalid(e.to_string())
                .hint("pilot addresses look like 0:0000.0000.0004 (see: pilotctl info)")
        })?
    } else {
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_');
        if !valid {
            return Err(
                Error::invalid(format!("{name:?} is neither a pilot address nor a hostname"))
                    .hint("pilot addresses look like 0:0000.0000.0004; hostnames like lab-b"),
            );
        }
        let session = session.ok_or_else(|| Error::internal("no daemon session to resolve hostnames"))?;
        let addr = session.resolve(name).map_err(|e| match e {
            IpcError::Daemon(msg) => {
                Error::new(Code::NotFound, format!("cannot resolve hostname {name:?}: {msg}"))
                    .hint("check the name with: pilotctl find NAME")
            }
            e => Error::new(
                Code::DaemonUnreachable,
                format!("cannot resolve hostname {name:?}: {e}"),
            ),
        })?;
        return check_mappable(addr).map(|a| (a, Some(name.to_string())));
    };
    check_mappable(addr).map(|a| (a, None))
}

fn check_mappable(addr: PilotAddr) -> Result<PilotAddr> {
    if addr.is_broadcast() {
        return Err(
            Error::invalid(format!("{addr} is a broadcast address; map a single node"))
                .hint("broadcast addresses carry no TCP streams"),
        );
    }
    if addr.is_zero() {
        return Err(Error::invalid(format!(
            "{addr} is the zero address, which names no node"
        )));
    }
    Ok(addr)
}

/// The daemon's health as seen from a running gateway, checked by a thread
/// of its own: the gateway's main thread answers signals and must never
/// wait for a daemon that stalls or trickles its replies. Checks run on
/// demand ([`Health::current`]); each is bounded by [`HEALTH_TIMEOUT`].
pub struct Health {
    state: Mutex<HealthState>,
    changed: Condvar,
}

struct HealthState {
    /// `{reachable, reply}` or `{reachable: false, error}`.
    last: Value,
    checked: Option<Instant>,
    wanted: bool,
}

/// Budget of one health check (the whole exchange, not one read).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

impl Health {
    /// Starts the checking thread (after any user switch), with a first
    /// check under way. `daemon_uid`: the daemon's uid seen at start; a
    /// socket served by another uid is reported unreachable.
    pub fn start(socket: PathBuf, daemon_uid: Uid) -> std::io::Result<Arc<Health>> {
        let h = Arc::new(Health {
            state: Mutex::new(HealthState {
                last: Value::obj([
                    ("reachable", Value::from(false)),
                    ("error", "not checked yet".into()),
                ]),
                checked: None,
                wanted: true,
            }),
            changed: Condvar::new(),
        });
        let h2 = h.clone();
        std::thread::Builder::new()
            .name("daemon health".into())
            .stack_size(256 * 1024)
            .spawn(move || h2.run(&socket, daemon_uid))?;
        Ok(h)
    }

    fn run(&self, socket: &Path, daemon_uid: Uid) {
        loop {
            {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                while !st.wanted {
                    st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                st.wanted = false;
            }
            let last = match probe(socket, "from the state file", HEALTH_TIMEOUT, Some(daemon_uid)) {
                Ok((_, v)) => Value::obj([("reachable", Value::from(true)), ("reply", v)]),
                Err(e) => Value::obj([("reachable", Value::from(false)), ("error", e.message.into())]),
            };
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.last = last;
            st.checked = Some(Instant::now());
            self.changed.notify_all();
        }
    }

    /// Whether the checking thread finished a check within `d`; asks for
    /// the next one without waiting (the watchdog's proof that it lives).
    pub fn answered_within(&self, d: Duration) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.wanted = true;
        self.changed.notify_all();
        st.checked.is_some_and(|t| t.elapsed() <= d)
    }

    /// Asks for a fresh check and waits for it at most `wait`; returns the
    /// last known health with `checked_secs_ago` (absent if never checked).
    pub fn current(&self, wait: Duration) -> Value {
        let deadline = Instant::now() + wait;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let before = st.checked;
        st.wanted = true;
        self.changed.notify_all();
        while st.checked == before {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut v = st.last.clone();
        if let (Value::Obj(pairs), Some(t)) = (&mut v, st.checked) {
            pairs.push(("checked_secs_ago".into(), t.elapsed().as_secs().into()));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::{cmd, encode};
    use crate::testkit::{read_frame, scratch};
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    #[test]
    fn an_old_daemon_answering_with_a_large_info_is_reached() {
        // A Feb-2026 daemon: no Health (an Error frame), and an Info that
        // lists thousands of connections (2 MiB).
        let dir = scratch();
        let sock = dir.join("daemon.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let daemon = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let (h, _) = read_frame(&mut c).unwrap();
            assert_eq!(h, cmd::HEALTH);
            c.write_all(&encode(
                cmd::ERROR,
                &[&1u16.to_be_bytes(), b"unknown command: 0x40"],
            ))
            .unwrap();
            let (i, _) = read_frame(&mut c).unwrap();
            assert_eq!(i, cmd::INFO);
            let entry = r#"{"id":1,"state":"TIME_WAIT","in_flight":0,"unacked":0}"#;
            let list = vec![entry; (2 << 20) / entry.len()].join(",");
            let json = format!(r#"{{"node_id":7,"conn_list":[{list}]}}"#);
            c.write_all(&encode(cmd::INFO_OK, &[json.as_bytes()])).unwrap();
        });
        let (_, v) = probe(&sock, "test", Duration::from_secs(5), None).unwrap();
        assert_eq!(v.get("node_id").and_then(Value::as_u64), Some(7));
        daemon.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
