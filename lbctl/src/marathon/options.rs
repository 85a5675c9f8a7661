//! The settings of the derivation: which IP VIPs are allowed, the named-VIP pool, the framework
//! name in named VIPs' DNS names.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Settings of the derivation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// IP VIPs must lie in one of these ranges (the named-VIP pool is always allowed).
    pub vip_ranges: Vec<Cidr>,
    /// Named VIPs get addresses from this IPv4 pool.
    pub named_pool: Cidr,
    /// The framework part of a named VIP's DNS name.
    pub framework: String,
    /// The addresses of the load balancer's own interfaces: a VIP equal to one is refused (it
    /// would capture the host's own traffic). The agent fills this at each snapshot
    /// ([`local_addresses`]); empty for `lbctl render`.
    pub local_addrs: Vec<IpAddr>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            vip_ranges: DEFAULT_VIP_RANGES.to_vec(),
            named_pool: DEFAULT_NAMED_POOL,
            framework: "marathon".into(),
            local_addrs: Vec::new(),
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

/// Why `ip` can never be a VIP whatever the ranges allow, or None when it may be one: the
/// unspecified address, "this network" (0.0.0.0/8), loopback, link-local, multicast, the
/// limited broadcast and the reserved 240.0.0.0/4; for IPv6 `::`, `::1`, fe80::/10, ff00::/8,
/// and IPv4-mapped forms (`::ffff:a.b.c.d`) of the IPv4 ones.
pub fn special_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_unspecified() || o[0] == 0 {
                Some("the unspecified or \"this network\" address (0.0.0.0/8)")
            } else if v4.is_loopback() {
                Some("a loopback address (127.0.0.0/8)")
            } else if v4.is_link_local() {
                Some("a link-local address (169.254.0.0/16, where cloud metadata lives)")
            } else if v4.is_multicast() {
                Some("a multicast address (224.0.0.0/4)")
            } else if v4.is_broadcast() {
                Some("the broadcast address")
            } else if o[0] >= 240 {
                Some("a reserved address (240.0.0.0/4)")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            if let Some(v4) = v6.to_ipv4_mapped() {
                return special_address(IpAddr::V4(v4))
                    .map(|_| "an IPv4-mapped form of a special IPv4 address");
            }
            if v6.is_unspecified() {
                Some("the unspecified address (::)")
            } else if v6.is_loopback() {
                Some("the loopback address (::1)")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("a link-local address (fe80::/10)")
            } else if v6.is_multicast() {
                Some("a multicast address (ff00::/8)")
            } else {
                None
            }
        }
    }
}

/// The addresses of this network namespace's interfaces (`getifaddrs(3)`), for
/// [`Options::local_addrs`].
pub fn local_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

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

    #[test]
    fn special_addresses_are_named() {
        for a in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(special_address(a.parse().unwrap()).is_some(), "{a}");
        }
        for a in [
            "10.0.0.1",
            "172.16.0.1",
            "8.8.8.8",
            "fd00::1",
            "2001:db8::1",
            "fec0::1",
        ] {
            assert_eq!(special_address(a.parse().unwrap()), None, "{a}");
        }
    }

    #[test]
    fn local_addresses_include_loopback() {
        let all = local_addresses().unwrap();
        assert!(all.contains(&"127.0.0.1".parse().unwrap()), "{all:?}");
    }
}
