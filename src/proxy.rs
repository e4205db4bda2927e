//! The PROXY protocol, version 2 (HAProxy's `proxy-protocol.txt`, section
//! 2.2): the header an exposure with `--proxy-protocol` sends to its local
//! service before any data, so the service learns which overlay peer is
//! calling instead of seeing every client as 127.0.0.1. nginx
//! (`listen … proxy_protocol`, `$proxy_protocol_addr`), HAProxy
//! (`accept-proxy`), Envoy, Traefik, Postfix and Dovecot read it.
//!
//! ```text
//! offset  size  field
//!      0    12  signature  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
//!     12     1  21         version 2, command PROXY
//!     13     1  21         AF_INET6, STREAM
//!     14     2  length     of what follows, big-endian: 36 + TLVs
//!     16    16  source      the peer's pilot address as IPv6 (see below)
//!     32    16  destination this node's pilot address as IPv6 (:: if unknown)
//!     48     2  source port      the peer's pilot port
//!     50     2  destination port the exposed pilot port
//!     52     …  TLV E0: type 0xE0, 2-byte length, the peer's address as
//!               text, `N:NNNN.HHHH.LLLL` (as the gateway prints it)
//! ```
//!
//! Pilot addresses are 48 bits (16-bit network, 32-bit node), so each maps
//! to one IPv6 address under the unique-local prefix [`PREFIX`]
//! (`fd70:696c:6f74::/80`; `70 69 6c 6f 74` is "pilot" in ASCII):
//! `fd70:696c:6f74::NNNN:HHHH:LLLL`, the last three groups being exactly
//! the address's three hex groups. A service that only logs the source
//! address (`$proxy_protocol_addr`) still shows something unique per peer,
//! and a person can read the pilot address back from it.

use std::net::Ipv6Addr;

use crate::address::PilotAddr;

/// The 12-byte signature that starts every version 2 header.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// The custom TLV type carrying the peer's pilot address as text (0xE0 is
/// the first of the range the specification leaves to applications).
pub const TLV_PILOT_ADDR: u8 = 0xE0;
/// The /80 prefix pilot addresses are placed under (first five groups).
pub const PREFIX: [u16; 5] = [0xfd70, 0x696c, 0x6f74, 0, 0];

/// The IPv6 address that stands for a pilot address in PROXY headers.
pub fn ipv6_of(addr: PilotAddr) -> Ipv6Addr {
    let w = addr.to_wire(); // network (2 bytes), node (4 bytes), big-endian
    let g = |i: usize| u16::from_be_bytes([w[i], w[i + 1]]);
    let [a, b, c, d, e] = PREFIX;
    Ipv6Addr::new(a, b, c, d, e, g(0), g(2), g(4))
}

/// The pilot address an IPv6 address from [`ipv6_of`] stands for; `None`
/// for an address outside [`PREFIX`].
pub fn pilot_of(ip: Ipv6Addr) -> Option<PilotAddr> {
    let s = ip.segments();
    if s[..5] != PREFIX {
        return None;
    }
    let mut w = [0u8; 6];
    for (i, g) in s[5..].iter().enumerate() {
        w[2 * i..2 * i + 2].copy_from_slice(&g.to_be_bytes());
    }
    PilotAddr::from_wire(&w)
}

/// The whole header for one inbound connection: `peer` called from its
/// port `peer_port` to our exposed port `port`; `local` is this node's own
/// address when known.
pub fn header(peer: PilotAddr, peer_port: u16, local: Option<PilotAddr>, port: u16) -> Vec<u8> {
    let text = peer.to_string();
    let tlv_len = 3 + text.len();
    let mut h = Vec::with_capacity(16 + 36 + tlv_len);
    h.extend_from_slice(&SIGNATURE);
    h.push(0x21); // version 2 (high nibble), command PROXY (low nibble)
    h.push(0x21); // AF_INET6 (high nibble), STREAM (low nibble)
    h.extend_from_slice(&((36 + tlv_len) as u16).to_be_bytes());
    h.extend_from_slice(&ipv6_of(peer).octets());
    h.extend_from_slice(&local.map_or(Ipv6Addr::UNSPECIFIED, ipv6_of).octets());
    h.extend_from_slice(&peer_port.to_be_bytes());
    h.extend_from_slice(&port.to_be_bytes());
    h.push(TLV_PILOT_ADDR);
    h.extend_from_slice(&(text.len() as u16).to_be_bytes());
    h.extend_from_slice(text.as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pilot_addresses_map_to_readable_ipv6_and_back() {
        let a = PilotAddr::new(1, 0x0002_0003);
        let ip = ipv6_of(a);
        assert_eq!(ip.to_string(), "fd70:696c:6f74::1:2:3");
        assert_eq!(pilot_of(ip), Some(a));
        let b: PilotAddr = "65535:FFFF.1234.ABCD".parse().unwrap();
        assert_eq!(ipv6_of(b).to_string(), "fd70:696c:6f74::ffff:1234:abcd");
        assert_eq!(pilot_of(ipv6_of(b)), Some(b));
        assert_eq!(pilot_of("fd70:696c:6f75::1:2:3".parse().unwrap()), None);
        assert_eq!(pilot_of(Ipv6Addr::LOCALHOST), None);
    }

    #[test]
    fn header_byte_by_byte() {
        let peer = PilotAddr::new(0, 1);
        let local = PilotAddr::new(0, 2);
        let h = header(peer, 49159, Some(local), 8000);
        let text = b"0:0000.0000.0001";
        let mut want = Vec::new();
        want.extend_from_slice(b"\r\n\r\n\0\r\nQUIT\n");
        want.extend_from_slice(&[0x21, 0x21]);
        want.extend_from_slice(&(36u16 + 3 + text.len() as u16).to_be_bytes());
        want.extend_from_slice(&[0xfd, 0x70, 0x69, 0x6c, 0x6f, 0x74, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0xfd, 0x70, 0x69, 0x6c, 0x6f, 0x74, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        want.extend_from_slice(&[0xc0, 0x07, 0x1f, 0x40]);
        want.extend_from_slice(&[0xE0, 0, text.len() as u8]);
        want.extend_from_slice(text);
        assert_eq!(h, want);
        assert_eq!(h.len(), 16 + usize::from(u16::from_be_bytes([h[14], h[15]])));
    }

    #[test]
    fn unknown_local_address_is_unspecified() {
        let h = header(PilotAddr::new(3, 0xFFFF_FFFE), 1, None, 80);
        assert_eq!(&h[32..48], &[0u8; 16]);
        assert_eq!(&h[48..52], &[0, 1, 0, 80]);
    }
}
