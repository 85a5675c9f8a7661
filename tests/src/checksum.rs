//! Checksum verification written apart from the packet builder: full recomputation over the IPv4
//! header and over the TCP/UDP (and ICMPv6) pseudo-header and segment, IPv4 or IPv6, never
//! incremental. Sums even and odd
//! bytes separately (RFC 1071, "byte order independence"), so that it shares no code or method
//! with `packet`. Also reads a frame's addresses back, for checking where a rewritten frame goes.
use std::net::{IpAddr, SocketAddr};

/// The ones' complement sum of `parts` taken as one byte string, with 0 written as 0xffff (the
/// two zeros of ones' complement are one value here). A correct checksum makes it 0xffff.
pub fn residue(parts: &[&[u8]]) -> u16 {
    let (mut even, mut odd) = (0u64, 0u64);
    let mut at = 0usize;
    for part in parts {
        for b in *part {
            if at.is_multiple_of(2) {
                even += *b as u64;
            } else {
                odd += *b as u64;
            }
            at += 1;
        }
    }
    let mut s = (even << 8) + odd;
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    if s == 0 { 0xffff } else { s as u16 }
}

/// Where the IP header(s) and the payload lie in a frame, read without trusting anything.
pub struct Layout {
    pub ipv6: bool,
    /// Bytes of IP header, IPv4 options or every IPv6 extension header included: the transport
    /// header starts at 14 + `hlen`.
    pub hlen: usize,
    /// The datagram's length by its IP header: IPv4 total length, IPv6 40 + payload length.
    pub ip_len: usize,
    /// The transport protocol (for IPv6, the last header's "next header").
    pub proto: u8,
    /// Any fragment: more fragments follow, or the offset is not 0.
    pub fragment: bool,
}

pub fn layout(frame: &[u8]) -> Result<Layout, String> {
    match frame.get(12..14) {
        Some([0x86, 0xdd]) => layout6(frame),
        _ => layout4(frame),
    }
}

fn layout4(frame: &[u8]) -> Result<Layout, String> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return Err("not an Ethernet frame with an IPv4 header".into());
    }
    let ihl = (frame[14] & 0x0f) as usize * 4;
    if frame[14] >> 4 != 4 || ihl < 20 || frame.len() < 14 + ihl {
        return Err(format!("bad IPv4 version/IHL byte {:#04x}", frame[14]));
    }
    let frag = u16::from_be_bytes([frame[20], frame[21]]);
    Ok(Layout {
        ipv6: false,
        hlen: ihl,
        ip_len: u16::from_be_bytes([frame[16], frame[17]]) as usize,
        proto: frame[23],
        fragment: frag & 0x3fff != 0,
    })
}

/// Follows the extension headers (hop-by-hop, routing, destination options: length in their
/// second byte; fragment: 8 bytes) to the transport protocol.
fn layout6(frame: &[u8]) -> Result<Layout, String> {
    if frame.len() < 54 || frame[14] >> 4 != 6 {
        return Err("not an Ethernet frame with an IPv6 header".into());
    }
    let (mut next, mut at, mut fragment) = (frame[20], 54, false);
    loop {
        let len = match next {
            0 | 43 | 60 => frame.get(at + 1).map(|l| (*l as usize + 1) * 8),
            44 => {
                if let Some(f) = frame.get(at + 2..at + 4) {
                    // Offset (13 bits) or "more fragments" (the lowest bit).
                    fragment |= u16::from_be_bytes([f[0], f[1]]) & 0xfff9 != 0;
                }
                Some(8)
            }
            _ => break,
        };
        match len {
            Some(len) if frame.len() >= at + len => {
                next = frame[at];
                at += len;
            }
            _ => return Err(format!("IPv6 extension header {next} cut by the frame")),
        }
    }
    Ok(Layout {
        ipv6: true,
        hlen: at - 14,
        ip_len: 40 + u16::from_be_bytes([frame[18], frame[19]]) as usize,
        proto: next,
        fragment,
    })
}

/// The residue of the IPv4 header's checksum (IPv6 has none: always right).
pub fn ip_residue(frame: &[u8], l: &Layout) -> u16 {
    if l.ipv6 {
        return 0xffff;
    }
    residue(&[&frame[14..14 + l.hlen]])
}

/// The residue of the TCP/UDP/ICMPv6 checksum over the pseudo-header (length from the IP
/// header) and the frame's bytes from the transport header up to offset `end` (the datagram's
/// end, or the frame's when comparing two frames that differ only within the headers).
pub fn l4_residue(frame: &[u8], l: &Layout, end: usize) -> u16 {
    let start = 14 + l.hlen;
    let end = end.clamp(start, frame.len());
    let segment = &frame[start.min(frame.len())..end];
    if l.ipv6 {
        let len = (l.ip_len as u32).wrapping_sub(l.hlen as u32).to_be_bytes();
        residue(&[&frame[22..54], &len, &[0, 0, 0, l.proto], segment])
    } else {
        let len = (l.ip_len as u16).wrapping_sub(l.hlen as u16).to_be_bytes();
        residue(&[&frame[26..34], &[0, l.proto], &len, segment])
    }
}

/// Offset of the transport checksum field in the frame, if the protocol has one covered by the
/// pseudo-header (TCP, UDP, and for IPv6 ICMPv6).
pub fn l4_csum_offset(l: &Layout) -> Option<usize> {
    match (l.proto, l.ipv6) {
        (6, _) => Some(14 + l.hlen + 16),
        (17, _) => Some(14 + l.hlen + 6),
        (58, true) => Some(14 + l.hlen + 2),
        _ => None,
    }
}

/// Whether `frame` holds a whole, well-formed IP datagram: its length covers its headers (the
/// transport header too, for an unfragmented datagram with a checksum) and fits the frame.
pub fn whole(frame: &[u8]) -> bool {
    let Ok(l) = layout(frame) else {
        return false;
    };
    let min = match (l4_csum_offset(&l), l.fragment, l.proto) {
        (Some(_), false, 6) => 20,
        (Some(_), false, 17) => 8,
        (Some(_), false, _) => 4,
        _ => 0,
    };
    l.ip_len >= l.hlen + min && 14 + l.ip_len <= frame.len()
}

/// Verifies a whole IP datagram in a frame: the IPv4 header checksum, and for an unfragmented
/// datagram the transport checksum (an IPv4 UDP checksum of 0 means none was sent; IPv6 has no
/// such thing).
pub fn verify(frame: &[u8]) -> Result<(), String> {
    let l = layout(frame)?;
    if !whole(frame) {
        return Err(format!(
            "IP length {} does not fit the {}-byte frame or the headers",
            l.ip_len,
            frame.len()
        ));
    }
    let r = ip_residue(frame, &l);
    if r != 0xffff {
        return Err(format!("IPv4 header checksum wrong (residue {r:#06x})"));
    }
    let Some(off) = l4_csum_offset(&l) else {
        return Ok(());
    };
    if l.fragment {
        return Ok(());
    }
    if l.proto == 17 && frame[off..off + 2] == [0, 0] {
        return if l.ipv6 {
            Err("IPv6 UDP without a checksum".into())
        } else {
            Ok(())
        };
    }
    let r = l4_residue(frame, &l, 14 + l.ip_len);
    if r != 0xffff {
        let name = match l.proto {
            6 => "TCP",
            17 => "UDP",
            _ => "ICMPv6",
        };
        return Err(format!("{name} checksum wrong (residue {r:#06x})"));
    }
    Ok(())
}

/// The transport protocol and the source and destination (address, port) of a TCP or UDP
/// frame, read without trusting it.
pub fn addresses(frame: &[u8]) -> Result<(u8, SocketAddr, SocketAddr), String> {
    let l = layout(frame)?;
    let short = || format!("a {}-byte frame is too short for its headers", frame.len());
    let ports = frame.get(14 + l.hlen..14 + l.hlen + 4).ok_or_else(short)?;
    let port = |o: usize| u16::from_be_bytes([ports[o], ports[o + 1]]);
    let (src, dst): (IpAddr, IpAddr) = if l.ipv6 {
        let a: [u8; 16] = frame[22..38].try_into().map_err(|_| short())?;
        let b: [u8; 16] = frame[38..54].try_into().map_err(|_| short())?;
        (a.into(), b.into())
    } else {
        let a: [u8; 4] = frame[26..30].try_into().map_err(|_| short())?;
        let b: [u8; 4] = frame[30..34].try_into().map_err(|_| short())?;
        (a.into(), b.into())
    };
    Ok((
        l.proto,
        SocketAddr::new(src, port(0)),
        SocketAddr::new(dst, port(2)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residue_of_rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2 (before complementing).
        assert_eq!(
            residue(&[&[0x00, 0x01, 0xf2, 0x03], &[0xf4, 0xf5, 0xf6, 0xf7]]),
            0xddf2
        );
        // Split at an odd offset, the bytes still pair the same way.
        assert_eq!(
            residue(&[&[0x00, 0x01, 0xf2], &[0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
            0xddf2
        );
    }
}
