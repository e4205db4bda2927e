//! The local side of the mapping table: which subnet the gateway hands IPs
//! out of, which TCP ports it listens on, and which addresses are this
//! host's own (for telling local clients from other hosts').
//!
//! Every check here runs before the gateway touches the system, so a typo
//! never leaves half a configuration behind.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnetwork::{IpNetwork, Ipv4Network};

use crate::error::{Code, Error, Result};

/// The upstream gateway's default subnet and port list.
pub const DEFAULT_SUBNET: &str = "10.4.0.0/16";
pub const DEFAULT_PORTS: &str = "80,443,1000,1001,1002,7,8080,8443";

/// Ranges where a gateway subnet is expected: RFC 1918 private space,
/// RFC 6598 shared (CGNAT) space and loopback. Anything else could shadow
/// real hosts on the internet, so it needs `--allow-any-subnet`.
const EXPECTED_RANGES: [(Ipv4Addr, u8); 5] = [
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
];

/// Parses and checks a subnet: IPv4, canonical (no host bits), with room
/// for at least two hosts, inside the expected ranges unless `allow_any`.
pub fn parse_subnet(text: &str, allow_any: bool) -> Result<Ipv4Network> {
    let net: IpNetwork = text.parse().map_err(|e| {
        Error::invalid(format!("invalid subnet {text:?}: {e}"))
            .hint("write it as an IPv4 CIDR block, e.g. --subnet 10.4.0.0/16")
    })?;
    let net = match net {
        IpNetwork::V4(n) => n,
        IpNetwork::V6(_) => {
            return Err(Error::new(
                Code::NotSupported,
                format!("IPv6 subnet {text:?} is not supported yet"),
            )
            .hint("use an IPv4 subnet, e.g. --subnet 10.4.0.0/16"))
        }
    };
    if !text.contains('/') {
        return Err(Error::invalid(format!("subnet {text:?} has no prefix length"))
            .hint("write it as a CIDR block, e.g. --subnet 10.4.0.0/16"));
    }
    if net.prefix() > 30 {
        return Err(Error::invalid(format!(
            "subnet {text} has no usable host addresses (a /{} leaves none once the network and broadcast addresses are excluded)",
            net.prefix()
        ))
        .hint("use a prefix of /30 or shorter, e.g. --subnet 10.4.0.0/16"));
    }
    if net.ip() != net.network() {
        return Err(Error::invalid(format!(
            "subnet {text} has host bits set; its canonical form is {}/{}",
            net.network(),
            net.prefix()
        ))
        .hint(format!("pass --subnet {}/{}", net.network(), net.prefix())));
    }
    let expected = EXPECTED_RANGES.iter().any(|&(ip, prefix)| {
        Ipv4Network::new(ip, prefix).is_ok_and(|r| net.prefix() >= prefix && r.contains(net.network()))
    });
    if !expected && !allow_any {
        return Err(Error::invalid(format!(
            "subnet {text} is outside the private (10/8, 172.16/12, 192.168/16), shared (100.64/10) and loopback (127/8) ranges; its addresses could belong to real hosts"
        ))
        .hint("choose a private subnet, or pass --allow-any-subnet if you mean it"));
    }
    Ok(net)
}

/// Whether addresses in `net` need a loopback alias: on Linux all of
/// 127.0.0.0/8 already routes to `lo`, so no alias (and no root) is needed.
pub fn needs_alias(net: Ipv4Network) -> bool {
    !(cfg!(target_os = "linux") && net.network().is_loopback())
}

/// Whether `ip` may be handed out from `net`: inside it, neither its
/// network nor its broadcast address, and never 127.0.0.1 (the host's own
/// loopback address, which local services listen on).
pub fn is_assignable(net: Ipv4Network, ip: Ipv4Addr) -> bool {
    net.contains(ip) && ip != net.network() && ip != net.broadcast() && ip != Ipv4Addr::LOCALHOST
}

/// The lowest assignable address of `net` not in `used`, from `.1` up.
pub fn next_free(net: Ipv4Network, used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr> {
    let first = u32::from(net.network()) + 1;
    let last = u32::from(net.broadcast()) - 1;
    // Bounded by the subnet size; `used` holds at most that many entries,
    // so the scan ends within `used.len() + 1` steps.
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|&ip| !used.contains(&ip) && is_assignable(net, ip))
        .ok_or_else(|| {
            Error::new(
                Code::SubnetExhausted,
                format!(
                    "subnet {net} is full: all {} addresses are mapped",
                    last - first + 1
                ),
            )
            .hint("unmap an address, or start the gateway with a larger --subnet")
        })
}

/// Most addresses an automatic allocation looks past because someone else
/// uses them, so that a host full of squatters costs a bounded number of
/// socket dumps.
const MAX_SKIPPED: usize = 1024;

/// Why `ip` is in use by someone other than this gateway, if it is: a
/// TCP socket some process holds is bound to it (another gateway's
/// listeners, any program's, or a socket bound with IP_FREEBIND before the
/// address even exists: no privilege needed), or it is on loopback with
/// another gateway's label ([`alias::Label`]) and the kernel cannot tell
/// whether it is used. `ours`: this gateway's alias label. An alias nobody
/// holds a socket on (an administrator's, or one a dead gateway left) is
/// not in use: the gateway uses it and leaves it, as
/// `alias::check_not_another_gateways` does.
pub fn in_use_by_other(ip: Ipv4Addr, ours: &str) -> Option<String> {
    use crate::alias::Label;
    let label = crate::sys::net::interface_addresses()
        .ok()
        .and_then(|addrs| {
            addrs.into_iter().find(|a| {
                a.addr == ip && a.loopback && matches!(Label::of(&a.interface, ours), Label::OtherGateway)
            })
        })
        .map(|a| a.interface);
    match (crate::sys::sock_diag::tcp_sockets_on(ip), label) {
        (Ok(0), _) | (Err(_), None) => None,
        (Ok(n), None) => Some(format!("{n} TCP socket(s) of another program are bound to it")),
        (Ok(n), Some(label)) => Some(format!(
            "it belongs to another gateway (its alias, label {label}, with {n} TCP socket(s) open)"
        )),
        (Err(e), Some(label)) => Some(format!(
            "it belongs to another gateway (its alias, label {label}; whether it is in use cannot be checked: {e})"
        )),
    }
}

/// The lowest assignable address of `net` that is neither in `used` (this
/// gateway's mappings) nor in use by anyone else ([`in_use_by_other`]):
/// automatic addresses step past a squatted IP to the next.
pub fn next_unused(net: Ipv4Network, used: &BTreeSet<Ipv4Addr>, ours: &str) -> Result<Ipv4Addr> {
    let mut skip = used.clone();
    for _ in 0..=MAX_SKIPPED {
        let ip = next_free(net, &skip)?;
        match in_use_by_other(ip, ours) {
            None => return Ok(ip),
            Some(why) => {
                crate::debug!("skipping {ip} for an automatic address: {why}");
                skip.insert(ip);
            }
        }
    }
    Err(Error::new(
        Code::SubnetExhausted,
        format!("no free address in {net}: the first {MAX_SKIPPED} candidates are used by other programs"),
    )
    .hint("give the gateway a subnet of its own with --subnet, e.g. 10.5.0.0/16"))
}

/// Refuses an explicitly chosen `ip` that someone else uses
/// ([`in_use_by_other`]), with `address_in_use`.
pub fn check_ip_free(ip: Ipv4Addr, ours: &str) -> Result<()> {
    match in_use_by_other(ip, ours) {
        None => Ok(()),
        Some(why) => Err(Error::new(
            Code::AddressInUse,
            format!("local IP {ip} is in use: {why}"),
        )
        .hint("choose another local IP, or leave it out to get the next free one (`ss -tlnp` shows who holds it); beside another gateway, give this one a subnet of its own (--subnet)")),
    }
}

/// Refuses `net` when a running gateway (another state directory's)
/// already uses an overlapping subnet: the registry of root's gateways
/// says so ([`crate::registry`]), or one has an address in it (its alias
/// carries a gateway label other than `ours` and a process holds sockets
/// on it; a dead gateway's leftover alias, with none, does not count). A
/// non-root gateway with no mapping yet is seen by neither; its first
/// `map` of a shared IP is still refused
/// (`alias::check_not_another_gateways`). The hint names a free subnet.
pub fn check_no_other_gateway(net: Ipv4Network, ours: &str) -> Result<()> {
    use crate::alias::Label;
    let me = std::process::id();
    let registered: Vec<crate::registry::Entry> = crate::registry::running()
        .into_iter()
        // Any local user may bind a registry name, so an entry counts here
        // only inside 127.0.0.0/8 (gateways there add no alias, and a
        // forged one blocks no more than a real user gateway could);
        // elsewhere the labelled aliases, which only root adds, are the
        // evidence.
        .filter(|e| e.pid != me && e.subnet.prefix() >= 8 && e.subnet.network().is_loopback())
        .collect();
    let addrs = crate::sys::net::interface_addresses().unwrap_or_default();
    let why = if let Some(e) = registered.iter().find(|e| e.subnet.overlaps(net)) {
        format!(
            "subnet {net} overlaps {} of the running gateway pid {}",
            e.subnet, e.pid
        )
    } else if let Some(other) = addrs.iter().find(|a| {
        cfg!(target_os = "linux")
            && a.loopback
            && net.contains(a.addr)
            && matches!(Label::of(&a.interface, ours), Label::OtherGateway)
            && !matches!(crate::sys::sock_diag::tcp_sockets_on(a.addr), Ok(0))
    }) {
        format!(
            "subnet {net} overlaps a running gateway's: its alias {} (label {}) is in it",
            other.addr, other.interface
        )
    } else {
        return Ok(());
    };
    let taken: Vec<Ipv4Network> = addrs
        .iter()
        .filter_map(|a| Ipv4Network::new(a.addr, 32).ok())
        .chain(registered.iter().map(|e| e.subnet))
        .collect();
    let free = free_subnet(&taken).map_or_else(|| "another private /16".to_string(), |n| n.to_string());
    Err(Error::new(Code::AddressInUse, why).hint(format!(
        "give this gateway its own subnet: --subnet {free} (free on this host); `ip addr show label 'lo:pgw*'` lists every gateway's aliases"
    )))
}

/// The first 10.N.0.0/16 (N from 4) overlapping none of `taken` and no
/// interface's network.
fn free_subnet(taken: &[Ipv4Network]) -> Option<Ipv4Network> {
    let nets = non_loopback_addresses().unwrap_or_default();
    (4..=255u8)
        .filter_map(|n| Ipv4Network::new(Ipv4Addr::new(10, n, 0, 0), 16).ok())
        .find(|net| !taken.iter().any(|t| net.overlaps(*t)) && !nets.iter().any(|(_, i)| net.overlaps(*i)))
}

/// Parses a local IP for `map ADDR IP`, checked against the subnet.
pub fn parse_local_ip(text: &str, net: Ipv4Network) -> Result<Ipv4Addr> {
    let ip: IpAddr = text.parse().map_err(|_| {
        Error::invalid(format!(
            "invalid local IP {text:?}: expected an IPv4 address such as 10.4.0.7"
        ))
        .hint(format!(
            "give an address inside {net}, or leave it out to get the next free one"
        ))
    })?;
    let IpAddr::V4(ip) = ip else {
        return Err(Error::new(
            Code::NotSupported,
            format!("IPv6 local IP {text} is not supported yet"),
        ));
    };
    if !net.contains(ip) {
        return Err(
            Error::invalid(format!("local IP {ip} is outside the gateway's subnet {net}")).hint(format!(
                "choose an address inside {net}, or leave it out to get the next free one"
            )),
        );
    }
    if ip == net.network() || ip == net.broadcast() {
        let which = if ip == net.network() {
            "network"
        } else {
            "broadcast"
        };
        return Err(
            Error::invalid(format!("local IP {ip} is the {which} address of {net}"))
                .hint("choose a host address of the subnet"),
        );
    }
    if ip == Ipv4Addr::LOCALHOST {
        return Err(Error::invalid(
            "local IP 127.0.0.1 is the host's own loopback address; it is never mapped",
        )
        .hint(format!("choose another address inside {net}")));
    }
    Ok(ip)
}

/// Parses a comma-separated port list (`80,443,8080`). Duplicates are
/// dropped, keeping the first; order is kept.
pub fn parse_ports(text: &str) -> Result<Vec<u16>> {
    let hint = "give a comma-separated list of ports from 1 to 65535, e.g. --ports 80,443,8080";
    if text.trim().is_empty() {
        return Err(Error::invalid("the port list is empty").hint(hint));
    }
    let mut seen = BTreeSet::new();
    let mut ports = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        let port = match item.parse::<u32>() {
            Ok(0) => return Err(Error::invalid("port 0 is not a valid port").hint(hint)),
            Ok(p) if p > 65535 => return Err(Error::invalid(format!("port {p} is above 65535")).hint(hint)),
            Ok(p) => p as u16,
            Err(_) if item.is_empty() => {
                return Err(Error::invalid(format!("the port list {text:?} has an empty entry")).hint(hint))
            }
            Err(_) => return Err(Error::invalid(format!("port {item:?} is not a number")).hint(hint)),
        };
        if seen.insert(port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

/// Formats a port list back to its comma form.
pub fn format_ports(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// IPv4 addresses configured on interfaces other than loopback, with the
/// interface name (from `getifaddrs`).
pub fn non_loopback_addresses() -> std::io::Result<Vec<(String, Ipv4Network)>> {
    let mut out = Vec::new();
    for a in crate::sys::net::interface_addresses()? {
        if !a.loopback {
            if let Ok(net) = Ipv4Network::new(a.addr, a.prefix) {
                out.push((a.interface, net));
            }
        }
    }
    Ok(out)
}

/// Whether `ip` is configured on any interface.
pub fn is_local_address(ip: Ipv4Addr) -> std::io::Result<bool> {
    Ok(crate::sys::net::interface_addresses()?
        .iter()
        .any(|a| a.addr == ip))
}

/// Refuses a subnet that overlaps an address of a non-loopback interface:
/// aliasing it on `lo` would capture that network's real traffic.
pub fn check_no_overlap(net: Ipv4Network) -> Result<()> {
    let addrs = non_loopback_addresses()
        .map_err(|e| Error::internal(format!("cannot list interface addresses: {e}")))?;
    for (name, iface) in addrs {
        if net.overlaps(iface) {
            return Err(Error::new(
                Code::AddressInUse,
                format!(
                    "subnet {net} overlaps {}/{} (address {} on interface {name}); aliasing it on loopback would capture that network's traffic",
                    iface.network(),
                    iface.prefix(),
                    iface.ip()
                ),
            )
            .hint("choose a subnet no interface uses, e.g. --subnet 10.4.0.0/16 or a 127.x.0.0/16 block"));
        }
    }
    Ok(())
}

/// Addresses configured on this host, as last read.
struct LocalAddrs {
    addrs: Vec<Ipv4Addr>,
    read_at: Option<Instant>,
}

static LOCAL_ADDRS: Mutex<LocalAddrs> = Mutex::new(LocalAddrs {
    addrs: Vec::new(),
    read_at: None,
});

/// How often, at most, a miss re-reads the interfaces: a flood of SYNs
/// from another host must not make us dump them in a loop.
const LOCAL_ADDRS_REFRESH: Duration = Duration::from_millis(100);

/// Whether a client comes from this host. A local client normally uses
/// the listener's own IP as its source, or a loopback one; any other
/// source must be configured on one of our interfaces.
pub fn is_local_client(client: IpAddr, listener: IpAddr) -> bool {
    let IpAddr::V4(ip) = client else { return false };
    if client == listener || ip.is_loopback() {
        return true;
    }
    let mut cache = LOCAL_ADDRS.lock().unwrap_or_else(|p| p.into_inner());
    if cache.addrs.contains(&ip) {
        return true;
    }
    if cache.read_at.is_some_and(|t| t.elapsed() < LOCAL_ADDRS_REFRESH) {
        return false;
    }
    cache.read_at = Some(Instant::now());
    if let Ok(all) = crate::sys::net::interface_addresses() {
        cache.addrs = all.into_iter().map(|a| a.addr).collect();
    }
    cache.addrs.contains(&ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(r: Result<impl std::fmt::Debug>) -> String {
        r.unwrap_err().message
    }

    #[test]
    fn subnets() {
        let n = parse_subnet("10.4.0.0/16", false).unwrap();
        assert_eq!((n.network(), n.prefix()), (Ipv4Addr::new(10, 4, 0, 0), 16));
        assert!(parse_subnet("127.77.0.0/16", false).is_ok());
        assert!(parse_subnet("100.64.1.0/24", false).is_ok());
        assert!(msg(parse_subnet("10.4.0.1/16", false)).contains("canonical form is 10.4.0.0/16"));
        assert!(msg(parse_subnet("10.4.0.0/31", false)).contains("no usable host"));
        assert!(msg(parse_subnet("10.4.0.0/32", false)).contains("no usable host"));
        assert!(msg(parse_subnet("10.4.0.0", false)).contains("no prefix"));
        assert!(msg(parse_subnet("10.4.0.0/33", false)).contains("invalid subnet"));
        assert!(msg(parse_subnet("banana", false)).contains("invalid subnet"));
        let v6 = parse_subnet("fd00::/64", false).unwrap_err();
        assert_eq!(v6.code, Code::NotSupported);
        assert!(msg(parse_subnet("8.8.8.0/24", false)).contains("outside the private"));
        assert!(parse_subnet("8.8.8.0/24", true).is_ok());
        // A block bigger than 10/8 is not inside the expected range.
        assert!(parse_subnet("8.0.0.0/6", false).is_err());
    }

    #[test]
    fn allocation_skips_network_broadcast_and_used() {
        let n = parse_subnet("10.4.0.0/30", false).unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(next_free(n, &used).unwrap(), Ipv4Addr::new(10, 4, 0, 1));
        used.insert(Ipv4Addr::new(10, 4, 0, 1));
        assert_eq!(next_free(n, &used).unwrap(), Ipv4Addr::new(10, 4, 0, 2));
        used.insert(Ipv4Addr::new(10, 4, 0, 2));
        let e = next_free(n, &used).unwrap_err();
        assert_eq!(e.code, Code::SubnetExhausted);
    }

    #[test]
    fn local_ips() {
        let n = parse_subnet("10.4.0.0/16", false).unwrap();
        assert_eq!(parse_local_ip("10.4.3.4", n).unwrap(), Ipv4Addr::new(10, 4, 3, 4));
        assert!(msg(parse_local_ip("10.5.0.1", n)).contains("outside"));
        assert!(msg(parse_local_ip("10.4.0.0", n)).contains("network address"));
        assert!(msg(parse_local_ip("10.4.255.255", n)).contains("broadcast address"));
        assert!(msg(parse_local_ip("10.4.0", n)).contains("invalid local IP"));
        assert_eq!(parse_local_ip("::1", n).unwrap_err().code, Code::NotSupported);
        let lo = parse_subnet("127.0.0.0/8", false).unwrap();
        assert!(msg(parse_local_ip("127.0.0.1", lo)).contains("loopback"));
        assert!(!is_assignable(lo, Ipv4Addr::LOCALHOST));
        assert_eq!(
            next_free(lo, &BTreeSet::new()).unwrap(),
            Ipv4Addr::new(127, 0, 0, 2)
        );
    }

    #[test]
    fn ports() {
        assert_eq!(parse_ports("80,443,80, 8080").unwrap(), [80, 443, 8080]);
        assert_eq!(
            parse_ports(DEFAULT_PORTS).unwrap(),
            [80, 443, 1000, 1001, 1002, 7, 8080, 8443]
        );
        assert!(msg(parse_ports("")).contains("empty"));
        assert!(msg(parse_ports("80,,81")).contains("empty entry"));
        assert!(msg(parse_ports("0")).contains("port 0"));
        assert!(msg(parse_ports("65536")).contains("above 65535"));
        assert!(msg(parse_ports("http")).contains("not a number"));
        assert_eq!(format_ports(&[80, 443]), "80,443");
    }

    #[test]
    fn local_clients_are_told_from_other_hosts() {
        let listener = IpAddr::from([10, 4, 0, 1]);
        assert!(is_local_client(listener, listener));
        assert!(is_local_client(IpAddr::from([127, 0, 0, 9]), listener));
        assert!(!is_local_client(IpAddr::from([203, 0, 113, 7]), listener));
        assert!(
            !is_local_client("::1".parse().unwrap(), listener),
            "we serve IPv4 only"
        );
        if let Some(a) = crate::sys::net::interface_addresses()
            .unwrap()
            .iter()
            .find(|a| !a.loopback)
        {
            assert!(is_local_client(IpAddr::V4(a.addr), listener), "{a:?}");
        }
    }
}
