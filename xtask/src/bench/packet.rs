//! Ethernet / IPv4 or IPv6 / TCP or UDP frames with correct checksums, built byte by byte, and
//! the addresses read back from a frame the program rewrote.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub type Mac = [u8; 6];

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// What a frame carries above IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A TCP SYN: the first packet of a connection.
    Syn,
    /// A TCP ACK with a small payload: a packet of an established connection.
    Ack,
    /// A UDP datagram with a small payload.
    Udp,
}

const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\n";
const ETH_HLEN: usize = 14;
const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;

/// A frame from `src` to `dst` (both IPv4 or both IPv6), between MAC addresses `smac` and `dmac`.
pub fn frame(kind: Kind, src: SocketAddr, dst: SocketAddr, smac: Mac, dmac: Mac) -> Vec<u8> {
    let payload: &[u8] = if kind == Kind::Syn { &[] } else { PAYLOAD };
    let (proto, mut l4) = match kind {
        Kind::Syn | Kind::Ack => {
            let flags: u8 = if kind == Kind::Syn { 0x02 } else { 0x10 };
            let mut h = Vec::with_capacity(20 + payload.len());
            h.extend(src.port().to_be_bytes());
            h.extend(dst.port().to_be_bytes());
            h.extend(0x1000_0000u32.to_be_bytes()); // sequence number
            h.extend((if kind == Kind::Ack { 0x2000_0000u32 } else { 0 }).to_be_bytes());
            h.push(5 << 4); // data offset: 5 words, no options
            h.push(flags);
            h.extend(64240u16.to_be_bytes()); // window
            h.extend([0, 0, 0, 0]); // checksum, urgent pointer
            h.extend(payload);
            (PROTO_TCP, h)
        }
        Kind::Udp => {
            let mut h = Vec::with_capacity(8 + payload.len());
            h.extend(src.port().to_be_bytes());
            h.extend(dst.port().to_be_bytes());
            h.extend(((8 + payload.len()) as u16).to_be_bytes());
            h.extend([0, 0]);
            h.extend(payload);
            (PROTO_UDP, h)
        }
    };
    let csum_at = if proto == PROTO_TCP { 16 } else { 6 };
    let mut c = l4_checksum(src.ip(), dst.ip(), proto, &l4);
    if proto == PROTO_UDP && c == 0 {
        c = 0xffff; // 0 means "no checksum" in UDP
    }
    l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    let (ethertype, ip) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (ETH_IPV4, ipv4_header(s, d, proto, l4.len())),
        (IpAddr::V6(s), IpAddr::V6(d)) => (ETH_IPV6, ipv6_header(s, d, proto, l4.len())),
        _ => panic!("{src} and {dst} are of different families"),
    };
    let mut f = Vec::with_capacity(ETH_HLEN + ip.len() + l4.len());
    f.extend(dmac);
    f.extend(smac);
    f.extend(ethertype.to_be_bytes());
    f.extend(ip);
    f.extend(l4);
    f
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + l4_len) as u16).to_be_bytes());
    ip.extend([0x12, 0x34, 0x40, 0x00]); // id, don't fragment
    ip.extend([64, proto, 0, 0]); // ttl, protocol, checksum
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let c = fold(sum(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip
}

fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4_len: usize) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0]; // version, traffic class, flow label
    ip.extend((l4_len as u16).to_be_bytes());
    ip.extend([proto, 64]); // next header, hop limit
    ip.extend(src.octets());
    ip.extend(dst.octets());
    ip
}

/// The IP header's length and the L4 bytes' range of a frame, and its addresses.
fn layout(f: &[u8]) -> Option<(usize, usize, u8, IpAddr, IpAddr)> {
    let ip = f.get(ETH_HLEN..)?;
    match u16::from_be_bytes([*f.get(12)?, *f.get(13)?]) {
        ETH_IPV4 => {
            let ihl = ((*ip.first()? & 0x0f) as usize) * 4;
            let total = u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]) as usize;
            let a: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let b: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            Some((ihl, total, ip[9], IpAddr::from(a), IpAddr::from(b)))
        }
        ETH_IPV6 => {
            let total = 40 + u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]) as usize;
            let a: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let b: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            Some((40, total, ip[6], IpAddr::from(a), IpAddr::from(b)))
        }
        _ => None,
    }
}

/// The IP and L4 addresses of a frame: (protocol, source, destination).
pub fn addresses(f: &[u8]) -> Option<(u8, SocketAddr, SocketAddr)> {
    let (hlen, _, proto, src, dst) = layout(f)?;
    let l4 = f.get(ETH_HLEN + hlen..ETH_HLEN + hlen + 4)?;
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    Some((
        proto,
        SocketAddr::new(src, port(0)),
        SocketAddr::new(dst, port(2)),
    ))
}

/// True when the IPv4 header checksum (if any) and the L4 checksum of `f` verify.
pub fn checksums_ok(f: &[u8]) -> bool {
    let Some((hlen, total, proto, src, dst)) = layout(f) else {
        return false;
    };
    let ip = &f[ETH_HLEN..];
    let Some(l4) = ip.get(hlen..total) else {
        return false;
    };
    let header_ok = src.is_ipv6() || fold(sum(&ip[..hlen], 0)) == 0;
    let udp_none = src.is_ipv4() && proto == PROTO_UDP && l4.get(6..8) == Some(&[0, 0]);
    header_ok && (udp_none || l4_checksum(src, dst, proto, l4) == 0)
}

fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.extend([0, proto]);
            pseudo.extend((l4.len() as u16).to_be_bytes());
        }
        (s, d) => {
            pseudo.extend(to_v6(s).octets());
            pseudo.extend(to_v6(d).octets());
            pseudo.extend((l4.len() as u32).to_be_bytes());
            pseudo.extend([0, 0, 0, proto]);
        }
    }
    fold(sum(l4, sum(&pseudo, 0)))
}

fn to_v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

fn sum(bytes: &[u8], mut acc: u32) -> u32 {
    for pair in bytes.chunks(2) {
        let hi = pair[0] as u32;
        let lo = pair.get(1).copied().unwrap_or(0) as u32;
        acc += (hi << 8) | lo;
    }
    acc
}

/// The ones' complement of the folded sum.
fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_verify_and_read_back() {
        for (src, dst) in [
            ("198.18.0.2:40000", "172.16.0.1:8080"),
            ("[2001:2::2]:40000", "[fd00:172:16::1]:8080"),
        ] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            for kind in [Kind::Syn, Kind::Ack, Kind::Udp] {
                let f = frame(kind, src, dst, [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]);
                assert!(checksums_ok(&f), "{kind:?} {src}");
                let proto = if kind == Kind::Udp {
                    PROTO_UDP
                } else {
                    PROTO_TCP
                };
                assert_eq!(addresses(&f), Some((proto, src, dst)));
                let mut bad = f.clone();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert!(!checksums_ok(&bad), "{kind:?} {src}");
            }
        }
    }

    #[test]
    fn known_ip_checksum() {
        // The example header of RFC 1071's usual illustration (Wikipedia, "IPv4 header checksum").
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(fold(sum(&h, 0)), 0xb861);
    }
}
