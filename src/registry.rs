//! Which pilot gateways run in this network namespace, and on which
//! subnets: so an exposure never relays overlay peers into another
//! gateway's mappings — 127.x gateways included, which add no labelled
//! alias (`alias.rs`) that would give them away.
//!
//! How: every running gateway listens on one Linux *abstract* Unix stream
//! socket (no file anywhere, nothing in /run to create, clean or trust)
//! named
//!
//! ```text
//! pilot-gateway/1/PID/SUBNET/NONCE     e.g. pilot-gateway/1/4242/127.77.0.0_16/9f3c…
//! ```
//!
//! (SUBNET with `_` for `/`; NONCE 16 random hex digits, so nobody can bind
//! a gateway's name before it does). The kernel removes the name when the
//! process exits, however it exits: an entry is never stale. Abstract
//! names belong to a network namespace, exactly the scope in which a
//! gateway's listeners can be reached. Anyone lists them in
//! `/proc/net/unix` (no privilege needed, whatever user the gateways run as).
//!
//! Trust: any local user may bind such a name. An entry counts only when
//! (see [`is_live_gateway`]):
//!
//! - a stream socket listens under it, and the kernel says (SO_PEERCRED of
//!   a connection to it) that the process that listens is the PID the
//!   name claims — or its backlog is full, so it cannot be asked;
//! - that PID exists (kill(PID, 0));
//! - where `/proc` shows the process, it is named `pilot-gateway` or
//!   `pilotctl` (`/proc/PID/comm`).
//!
//! None of this needs another user's `/proc/PID`: under hidepid (the
//! unit's `ProtectProc=invisible`), where other users' processes are
//! hidden, a gateway still sees every other gateway, counted on the
//! kernel's word for its pid (its name cannot be read there). Outside
//! 127.0.0.0/8 an entry counts only for addresses on loopback (see
//! [`is_gateway_listener`]); a forged one can therefore only make
//! exposures into a loopback subnet, or onto loopback addresses, be
//! refused — what any local user may cause anyway by running a real
//! gateway on a 127.x subnet (a refusal, never a relay) — and cannot hide
//! a real gateway (which holds its own name). Doubt counts an entry (a
//! refusal), never drops it. Not Linux: no abstract names; only the
//! checks of `expose.rs` apply there.
//!
//! API (also meant for a subnet-clash check at start):
//! - [`register`]: the gateway's own entry, held for its lifetime;
//! - [`running`]: every live gateway's pid and subnet;
//! - [`is_gateway_listener`] / [`check_not_gateway_listener`]: whether an
//!   address is (could be) one of their mapped addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnetwork::Ipv4Network;

use crate::error::{Code, Error, Result};

/// The name's prefix, with the format's version.
const PREFIX: &str = "pilot-gateway/1/";

/// A running gateway, as its registry name says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub pid: u32,
    pub subnet: Ipv4Network,
}

/// Our own entry: the listening abstract socket (its name goes with it).
#[derive(Debug)]
pub struct Registration {
    #[cfg(target_os = "linux")]
    socket: std::os::unix::net::UnixListener,
}

impl Registration {
    /// Accepts and closes the connections others made to learn our pid
    /// ([`is_live_gateway`]), so the backlog does not fill; non-blocking,
    /// at most a backlog's worth per call. The gateway's main loop calls
    /// it on every turn.
    pub fn answer(&self) {
        #[cfg(target_os = "linux")]
        for _ in 0..ANSWER_MAX {
            if self.socket.accept().is_err() {
                break;
            }
        }
    }
}

/// The registration's backlog: room for the checks of many exposures
/// between two turns of the main loop; past it a check cannot ask, and
/// counts the entry. Bounds the kernel memory others can make us hold.
#[cfg(target_os = "linux")]
const BACKLOG: i32 = 64;
/// Connections [`Registration::answer`] takes per call: a few backlogs'
/// worth (more arrive while it runs).
#[cfg(target_os = "linux")]
const ANSWER_MAX: usize = 4 * BACKLOG as usize;

/// Registers this process as a gateway on `subnet` (see the module docs).
#[cfg(target_os = "linux")]
pub fn register(subnet: Ipv4Network) -> std::io::Result<Registration> {
    use std::hash::{BuildHasher, Hasher};
    use std::os::linux::net::SocketAddrExt;
    // RandomState is seeded from the system's random source per process.
    let nonce = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let name = format!(
        "{PREFIX}{}/{}_{}/{nonce:016x}",
        std::process::id(),
        subnet.network(),
        subnet.prefix()
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let socket = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    socket.set_nonblocking(true)?;
    crate::sys::net::set_backlog(&socket, BACKLOG)?;
    Ok(Registration { socket })
}

#[cfg(not(target_os = "linux"))]
pub fn register(_subnet: Ipv4Network) -> std::io::Result<Registration> {
    Ok(Registration {})
}

/// Every live gateway of this network namespace (see the module docs for
/// what "live" means), ours included.
pub fn running() -> Vec<Entry> {
    // This thread's namespace (a thread may have its own), else the
    // process's.
    let Ok(table) = std::fs::read_to_string("/proc/thread-self/net/unix")
        .or_else(|_| std::fs::read_to_string("/proc/net/unix"))
    else {
        return Vec::new();
    };
    let mut out: Vec<Entry> = table
        .lines()
        .filter_map(|line| line.split_whitespace().nth(7)?.strip_prefix('@'))
        .filter_map(|name| Some((parse_name(name)?, name)))
        .filter(|(e, name)| is_live_gateway(e.pid, name))
        .map(|(e, _)| e)
        .collect();
    out.sort_by_key(|e| (e.pid, e.subnet));
    out.dedup();
    out
}

/// An entry from a registry name (without the leading `@`).
fn parse_name(name: &str) -> Option<Entry> {
    let mut parts = name.strip_prefix(PREFIX)?.split('/');
    let pid = parts.next()?.parse().ok()?;
    let (net, prefix) = parts.next()?.split_once('_')?;
    let subnet = Ipv4Network::new(net.parse().ok()?, prefix.parse().ok()?).ok()?;
    let nonce = parts.next()?;
    (nonce.len() == 16 && parts.next().is_none()).then_some(Entry { pid, subnet })
}

/// Whether the entry `name` (claiming `pid`) is a live gateway's, by the
/// rules of the module docs. Nothing here reads another process's /proc
/// entry unless /proc shows it: under hidepid the pid comes from the
/// kernel (SO_PEERCRED) and its existence from kill(pid, 0).
///
/// The name check: `pilot-gateway`, or `pilotctl` (the name of the
/// compatibility link, which the kernel takes for the process name when
/// it is what was run).
#[cfg(target_os = "linux")]
fn is_live_gateway(pid: u32, name: &str) -> bool {
    match crate::sys::net::abstract_listener_pid(name.as_bytes()) {
        Ok(p) if p == pid => {}
        // The name claims another process's pid.
        Ok(_) => return false,
        // Its backlog is full: cannot ask; counted (a refusal at most).
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        // No stream socket listens there: not a registration.
        Err(_) => return false,
    }
    if !crate::sys::proc::exists(pid) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => matches!(comm.trim_end(), "pilot-gateway" | "pilotctl"),
        // Hidden from us (hidepid): alive by the kernel's word, its name
        // unreadable; counted.
        Err(_) => true,
    }
}

#[cfg(not(target_os = "linux"))]
fn is_live_gateway(_pid: u32, _name: &str) -> bool {
    false
}

/// The running gateway `addr` would lead into: one whose subnet holds it
/// (any port: mappings may listen on any), 127.0.0.1, the network and the
/// broadcast address aside (never mapped). Outside 127.0.0.0/8 a mapped
/// address is a loopback alias, so there the address must also be one
/// (most carry a gateway's label and are refused for that already; this
/// catches an address that was configured before the gateway used it).
/// So a forged entry can cost at most what a real gateway any local user
/// may run costs: exposures into its loopback subnet, or onto loopback
/// addresses inside the subnet it claims.
pub fn is_gateway_listener(addr: SocketAddr) -> Option<Entry> {
    let IpAddr::V4(ip) = addr.ip() else {
        return None;
    };
    if ip == Ipv4Addr::LOCALHOST {
        return None;
    }
    let loopback: Ipv4Network = Ipv4Network::new(Ipv4Addr::new(127, 0, 0, 0), 8).ok()?;
    let on_lo = || {
        crate::sys::net::interface_addresses().is_ok_and(|all| all.iter().any(|a| a.addr == ip && a.loopback))
    };
    running().into_iter().find(|e| {
        e.subnet.contains(ip)
            && ip != e.subnet.network()
            && ip != e.subnet.broadcast()
            && (loopback.contains(e.subnet.network()) || on_lo())
    })
}

/// [`is_gateway_listener`] as the refusal `expose` gives.
pub fn check_not_gateway_listener(target: SocketAddr) -> Result<()> {
    match is_gateway_listener(target) {
        None => Ok(()),
        Some(e) => Err(Error::new(
            Code::BadTarget,
            format!(
                "target {target} is inside the subnet {} of the pilot gateway running as pid {}: it would relay inbound peers to a mapped agent",
                e.subnet, e.pid
            ),
        )
        .hint("expose the service itself (e.g. 127.0.0.1:PORT); --allow-remote-target does not allow this")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_strictly() {
        let e = parse_name("pilot-gateway/1/42/127.77.0.0_16/0123456789abcdef").unwrap();
        assert_eq!(e.pid, 42);
        assert_eq!(e.subnet.to_string(), "127.77.0.0/16");
        for bad in [
            "pilot-gateway/2/42/127.77.0.0_16/0123456789abcdef",
            "pilot-gateway/1/x/127.77.0.0_16/0123456789abcdef",
            "pilot-gateway/1/42/127.77.0.0/16/0123456789abcdef",
            "pilot-gateway/1/42/127.77.0.0_16/short",
            "pilot-gateway/1/42/127.77.0.0_99/0123456789abcdef",
            "pilot-gateway/1/42/127.77.0.0_16/0123456789abcdef/more",
        ] {
            assert!(parse_name(bad).is_none(), "{bad}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_registration_is_listed_while_held() {
        // The test binary is not named pilot-gateway: parse the table
        // directly rather than through `running`.
        let net: Ipv4Network = "127.99.0.0/16".parse().unwrap();
        let listed = || {
            std::fs::read_to_string("/proc/thread-self/net/unix")
                .unwrap()
                .lines()
                .filter_map(|l| parse_name(l.split_whitespace().nth(7)?.strip_prefix('@')?))
                .any(|e| e.pid == std::process::id() && e.subnet == net)
        };
        let r = register(net).unwrap();
        assert!(listed());
        drop(r);
        assert!(!listed());
    }

    /// What [`is_live_gateway`] asks the kernel instead of /proc: the pid
    /// that listens under a name (SO_PEERCRED), which a forged claim
    /// cannot change; a name bound by a socket that does not listen is
    /// not a registration; a full backlog says so (and `answer` empties
    /// it).
    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_names_the_pid_behind_a_registration() {
        use crate::sys::net::abstract_listener_pid;
        use std::os::linux::net::SocketAddrExt;
        let net: Ipv4Network = "127.98.0.0/16".parse().unwrap();
        let r = register(net).unwrap();
        let addr = r.socket.local_addr().unwrap();
        let name = addr.as_abstract_name().unwrap().to_vec();
        assert_eq!(abstract_listener_pid(&name).unwrap(), std::process::id());
        let mut full = false;
        for _ in 0..1024 {
            match abstract_listener_pid(&name) {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                    full = true;
                    break;
                }
            }
        }
        assert!(full, "the backlog never filled");
        r.answer();
        assert_eq!(abstract_listener_pid(&name).unwrap(), std::process::id());
        // Names of our own pid: other test processes share this namespace.
        let me = std::process::id();
        let dgram = format!("pilot-gateway/1/{me}/127.97.0.0_16/0123456789abcdef");
        let a = std::os::unix::net::SocketAddr::from_abstract_name(dgram.as_bytes()).unwrap();
        let _d = std::os::unix::net::UnixDatagram::bind_addr(&a).unwrap();
        assert!(abstract_listener_pid(dgram.as_bytes()).is_err());
        assert!(!is_live_gateway(me, &dgram));
        assert!(abstract_listener_pid(format!("pilot-gateway/none/{me}").as_bytes()).is_err());
    }
}
