//! Pilot addresses: `N:NNNN.HHHH.LLLL` in text, 6 bytes on the wire.
//!
//! Text form: the network id in decimal, a colon, then three groups of
//! exactly four hex digits — the network id again, the node id's high 16
//! bits, its low 16 bits. The two spellings of the network must agree; a
//! mismatch almost always means a typo, so it is refused rather than guessed.
//! Output uses uppercase hex, as the daemon does; input accepts either case.
//!
//! Wire form (PROTOCOL.md, "Transport"): 2-byte network id, 4-byte node id,
//! both big-endian.

use std::fmt;
use std::str::FromStr;

/// A node on the Pilot overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PilotAddr {
    pub network: u16,
    pub node: u32,
}

/// Node id that addresses every node of a network.
pub const BROADCAST_NODE: u32 = 0xFFFF_FFFF;

impl PilotAddr {
    pub fn new(network: u16, node: u32) -> PilotAddr {
        PilotAddr { network, node }
    }

    pub fn to_wire(self) -> [u8; 6] {
        let n = self.network.to_be_bytes();
        let h = self.node.to_be_bytes();
        [n[0], n[1], h[0], h[1], h[2], h[3]]
    }

    /// Reads the first six bytes of `b`; `None` if there are fewer.
    pub fn from_wire(b: &[u8]) -> Option<PilotAddr> {
        let b: &[u8; 6] = b.get(..6)?.try_into().ok()?;
        Some(PilotAddr {
            network: u16::from_be_bytes([b[0], b[1]]),
            node: u32::from_be_bytes([b[2], b[3], b[4], b[5]]),
        })
    }

    pub fn is_broadcast(self) -> bool {
        self.node == BROADCAST_NODE
    }

    pub fn is_zero(self) -> bool {
        self.network == 0 && self.node == 0
    }

    /// Whether `s` looks like an attempt at an address rather than a
    /// hostname: it has the colon-and-dots shape. Used to decide whether a
    /// `map` argument is parsed strictly or resolved through the daemon.
    pub fn looks_like_address(s: &str) -> bool {
        s.contains(':') || (s.contains('.') && s.bytes().all(|c| c.is_ascii_hexdigit() || c == b'.'))
    }
}

impl fmt::Display for PilotAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{:04X}.{:04X}.{:04X}",
            self.network,
            self.network,
            self.node >> 16,
            self.node & 0xFFFF
        )
    }
}

/// Why a string is not a pilot address; the `Display` text is the whole
/// message shown to the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddrError {
    pub input: String,
    pub reason: String,
}

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid pilot address {:?}: {} (expected N:NNNN.HHHH.LLLL, e.g. 0:0000.0000.0004)",
            self.input, self.reason
        )
    }
}

impl std::error::Error for AddrError {}

impl FromStr for PilotAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<PilotAddr, AddrError> {
        let fail = |reason: String| AddrError {
            input: s.to_string(),
            reason,
        };
        let (net_dec, rest) = s
            .split_once(':')
            .ok_or_else(|| fail("missing ':' after the network number".into()))?;
        if net_dec.is_empty() || net_dec.len() > 5 || !net_dec.bytes().all(|c| c.is_ascii_digit()) {
            return Err(fail(format!(
                "network {net_dec:?} is not a decimal number from 0 to 65535"
            )));
        }
        let network: u16 = net_dec
            .parse()
            .map_err(|_| fail(format!("network {net_dec} is larger than 65535")))?;
        let groups: Vec<&str> = rest.split('.').collect();
        if groups.len() != 3 {
            return Err(fail(format!(
                "expected 3 dot-separated hex groups after ':', found {}",
                groups.len()
            )));
        }
        let mut v = [0u16; 3];
        for (slot, g) in v.iter_mut().zip(&groups) {
            if g.len() != 4 || !g.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(fail(format!("group {g:?} is not exactly 4 hex digits")));
            }
            *slot = u16::from_str_radix(g, 16).map_err(|_| fail(format!("group {g:?} is not hex")))?;
        }
        if v[0] != network {
            return Err(fail(format!(
                "network {network} does not match hex network group {} (= {})",
                groups[0], v[0]
            )));
        }
        Ok(PilotAddr {
            network,
            node: (u32::from(v[1]) << 16) | u32::from(v[2]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        let a: PilotAddr = "0:0000.0000.0004".parse().unwrap();
        assert_eq!(a, PilotAddr::new(0, 4));
        assert_eq!(a.to_string(), "0:0000.0000.0004");
        let b: PilotAddr = "258:0102.abcd.EF01".parse().unwrap();
        assert_eq!(b, PilotAddr::new(258, 0xABCD_EF01));
        assert_eq!(b.to_string(), "258:0102.ABCD.EF01");
        let max: PilotAddr = "65535:FFFF.FFFF.FFFF".parse().unwrap();
        assert!(max.is_broadcast());
        assert_eq!(max.to_string(), "65535:FFFF.FFFF.FFFF");
    }

    #[test]
    fn wire_round_trip() {
        let a = PilotAddr::new(0x0102, 0x0304_0506);
        assert_eq!(a.to_wire(), [1, 2, 3, 4, 5, 6]);
        assert_eq!(PilotAddr::from_wire(&[1, 2, 3, 4, 5, 6, 7]), Some(a));
        assert_eq!(PilotAddr::from_wire(&[1, 2, 3, 4, 5]), None);
    }

    #[test]
    fn rejects_malformed() {
        let cases = [
            ("", "missing ':'"),
            ("0000.0000.0004", "missing ':'"),
            (":0000.0000.0004", "not a decimal"),
            ("-1:0000.0000.0004", "not a decimal"),
            ("70000:0000.0000.0004", "larger than 65535"),
            ("0:0000.0004", "found 2"),
            ("0:0000.0000.0000.0004", "found 4"),
            ("0:0000.0000.004", "exactly 4 hex"),
            ("0:0000.0000.00004", "exactly 4 hex"),
            ("0:0000.0000.00g4", "exactly 4 hex"),
            ("0:0000.0000.+004", "exactly 4 hex"),
            ("1:0000.0000.0004", "does not match"),
            ("16:0016.0000.0004", "does not match"),
            ("0:0000.0000.0004 ", "exactly 4 hex"),
        ];
        for (input, want) in cases {
            let err = input.parse::<PilotAddr>().unwrap_err().to_string();
            assert!(err.contains(want), "{input:?}: {err}");
            assert!(err.contains("N:NNNN.HHHH.LLLL"), "{err}");
        }
    }

    #[test]
    fn decimal_and_hex_network_agree() {
        // 0x0010 is 16: the two spellings agree, so this is valid.
        assert_eq!("16:0010.0000.0004".parse(), Ok(PilotAddr::new(16, 4)));
    }

    #[test]
    fn shape_detection() {
        assert!(PilotAddr::looks_like_address("0:0000.0000.0004"));
        assert!(PilotAddr::looks_like_address("0000.0000.0004"));
        assert!(!PilotAddr::looks_like_address("lab-b"));
        assert!(!PilotAddr::looks_like_address("agent.example"));
    }
}
