//! Which local services an exposure may publish: the target policy,
//! checked when an exposure is asked for (`expose`, `start --expose`,
//! state.json) and again when it starts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnetwork::Ipv4Network;

use crate::error::{Code, Error, Result};
use crate::sys;

/// The address a target is checked and served at: an IPv4-mapped IPv6
/// address (`[::ffff:10.4.0.1]`) is the IPv4 address it stands for, so no
/// check is passed by spelling an address another way.
pub fn canonical(target: SocketAddr) -> SocketAddr {
    SocketAddr::new(target.ip().to_canonical(), target.port())
}

/// Refuses targets that cannot work, that lead into the gateway's own
/// mappings (`own`: its subnet) or another gateway's (an alias labelled
/// `lo:pgw…`) (both refused even with `allow_remote`: every admitted peer
/// would become a client of the mapped agents, with this node's
/// identity), or that leave this host unasked.
pub fn check_target(target: SocketAddr, allow_remote: bool, own: Option<Ipv4Network>) -> Result<()> {
    let target = canonical(target);
    let ip = target.ip();
    if target.port() == 0 || ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255u8; 4]) {
        return Err(Error::new(
            Code::BadTarget,
            format!("target {target} is not a TCP service address"),
        )
        .hint("give the service's address and port, e.g. 127.0.0.1:8000"));
    }
    // 127.0.0.1 is never mapped, even in a 127.0.0.0/8 subnet.
    if let (IpAddr::V4(v4), Some(net)) = (ip, own) {
        if net.contains(v4) && v4 != Ipv4Addr::LOCALHOST {
            return Err(Error::new(
                Code::BadTarget,
                format!("target {target} is inside the gateway's subnet {net}: it would relay inbound peers to mapped agents"),
            )
            .hint("expose the service itself (e.g. 127.0.0.1:PORT); --allow-remote-target does not allow this"));
        }
    }
    // Another gateway's mappings lead to agents just the same.
    if let Some(label) = gateway_alias(ip) {
        return Err(Error::new(
            Code::BadTarget,
            format!("target {target} is a pilot gateway's mapped address (loopback alias labelled {label}): it would relay inbound peers to a mapped agent"),
        )
        .hint("expose the service itself (e.g. 127.0.0.1:PORT); --allow-remote-target does not allow this"));
    }
    crate::registry::check_not_gateway_listener(target)?; // any running gateway's subnet, 127.x included
    if !allow_remote && !on_this_host(ip) {
        return Err(
            Error::new(Code::BadTarget, format!("target {target} is not on this host"))
                .hint("expose a local service, or pass --allow-remote-target to publish another host's"),
        );
    }
    Ok(())
}

/// The label of `ip` if it is an address on this host labelled by a
/// gateway (`lo:pgw…`, any state directory's: see [`crate::alias`]).
fn gateway_alias(ip: IpAddr) -> Option<String> {
    let IpAddr::V4(v4) = ip else { return None };
    sys::net::interface_addresses()
        .ok()?
        .into_iter()
        .find(|a| a.addr == v4 && a.interface.starts_with(crate::alias::LABEL_PREFIX))
        .map(|a| a.interface)
}

/// Whether `ip` is loopback (127.0.0.0/8, ::1) or an address an interface
/// of this host has. Never "a socket can bind it": with
/// `ip_nonlocal_bind` every bind succeeds.
fn on_this_host(ip: IpAddr) -> bool {
    ip.is_loopback() || sys::net::host_ips().is_ok_and(|all| all.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_target_must_be_a_tcp_service_address() {
        for bad in [
            "127.0.0.1:0",
            "0.0.0.0:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "[::]:80",
        ] {
            let e = check_target(addr(bad), true, None).unwrap_err();
            assert_eq!(e.code, Code::BadTarget, "{bad}");
        }
    }

    #[test]
    fn the_gateways_own_subnet_is_refused_even_with_allow_remote() {
        let own = Some("127.77.0.0/16".parse().unwrap());
        assert!(check_target(addr("127.77.0.5:80"), true, own).is_err());
        assert!(
            check_target(addr("[::ffff:127.77.0.5]:80"), true, own).is_err(),
            "no bypass by spelling"
        );
        assert!(check_target(addr("127.0.0.1:80"), false, Some("127.0.0.0/8".parse().unwrap())).is_ok());
    }

    #[test]
    fn another_host_needs_allow_remote_target() {
        assert!(check_target(addr("192.0.2.1:80"), false, None).is_err());
        assert!(check_target(addr("192.0.2.1:80"), true, None).is_ok());
        assert!(check_target(addr("127.0.0.1:8000"), false, None).is_ok());
        assert!(check_target(addr("[::1]:8000"), false, None).is_ok());
    }

    #[test]
    fn an_ipv4_mapped_target_is_served_as_ipv4() {
        assert_eq!(canonical(addr("[::ffff:127.0.0.1]:80")), addr("127.0.0.1:80"));
        assert_eq!(canonical(addr("[::1]:80")), addr("[::1]:80"));
    }
}
