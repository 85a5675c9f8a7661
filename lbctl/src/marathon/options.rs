//! The settings of the derivation: which IP VIPs are allowed, the named-VIP pool, the framework
//! name in named VIPs' DNS names.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Settings of the derivation.
#[derive(Clone, Debug)]
pub struct Options {
    /// IP VIPs must lie in one of these ranges (the named-VIP pool is always allowed).
    pub vip_ranges: Vec<Cidr>,
    /// Named VIPs get addresses from this IPv4 pool.
    pub named_pool: Cidr,
    /// The framework part of a named VIP's DNS name.
    pub framework: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            vip_ranges: DEFAULT_VIP_RANGES.to_vec(),
            named_pool: DEFAULT_NAMED_POOL,
            framework: "marathon".into(),
        }
    }
}

/// The ranges IP VIPs may use unless told otherwise: the private IPv4 ranges (RFC 1918) and
/// unique local IPv6 addresses (RFC 4193), so that a VIP never captures a real host's traffic.
pub const DEFAULT_VIP_RANGES: [Cidr; 4] = [
    Cidr::v4(Ipv4Addr::new(10, 0, 0, 0), 8),
    Cidr::v4(Ipv4Addr::new(172, 16, 0, 0), 12),
    Cidr::v4(Ipv4Addr::new(192, 168, 0, 0), 16),
    Cidr {
        addr: IpAddr::V6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0)),
        len: 7,
    },
];

/// The pool named VIPs get their addresses from unless told otherwise (as DC/OS does).
pub const DEFAULT_NAMED_POOL: Cidr = Cidr::v4(Ipv4Addr::new(11, 0, 0, 0), 8);

/// An address range such as `172.16.0.0/12`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The range's address (bits past `len` are ignored).
    pub addr: IpAddr,
    /// The prefix length: up to 32 for IPv4, 128 for IPv6.
    pub len: u8,
}

impl Cidr {
    const fn v4(addr: Ipv4Addr, len: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(addr),
            len,
        }
    }

    /// True when `ip` is in this range (never for an address of the other family).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.len as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.len as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a CIDR range (expected ADDRESS/LENGTH)"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{a}` in `{s}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("`{l}` in `{s}` is not a prefix length from 0 to {max}"))?;
        Ok(Cidr { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_documented_ranges() {
        let shown: Vec<String> = DEFAULT_VIP_RANGES.iter().map(Cidr::to_string).collect();
        assert_eq!(
            shown,
            ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
        );
        assert_eq!(DEFAULT_NAMED_POOL.to_string(), "11.0.0.0/8");
    }

    #[test]
    fn ranges_parse_and_contain() {
        let r: Cidr = "172.16.0.0/12".parse().unwrap();
        assert!(r.contains("172.31.255.255".parse().unwrap()));
        assert!(!r.contains("172.32.0.0".parse().unwrap()));
        assert!(!r.contains("fc00::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let e = "10.0.0.0/33".parse::<Cidr>().unwrap_err();
        assert!(e.contains("`33`") && e.contains("0 to 32"), "{e}");
        let e = "10.0.0.0".parse::<Cidr>().unwrap_err();
        assert!(e.contains("ADDRESS/LENGTH"), "{e}");
        let e = "ten/8".parse::<Cidr>().unwrap_err();
        assert!(e.contains("`ten`"), "{e}");
    }
}
