//! Checksum verification written apart from the packet builder: full recomputation over the IPv4
//! header and over the TCP/UDP pseudo-header and segment, never incremental. Sums even and odd
//! bytes separately (RFC 1071, "byte order independence"), so that it shares no code or method
//! with `packet`.

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

/// Where the IPv4 header and its payload lie in a frame, read without trusting anything.
pub struct Layout {
    pub ihl: usize,
    pub tot_len: usize,
    pub proto: u8,
    /// Any fragment: more fragments follow, or the offset is not 0.
    pub fragment: bool,
}

pub fn layout(frame: &[u8]) -> Result<Layout, String> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return Err("not an Ethernet frame with an IPv4 header".into());
    }
    let ihl = (frame[14] & 0x0f) as usize * 4;
    if frame[14] >> 4 != 4 || ihl < 20 || frame.len() < 14 + ihl {
        return Err(format!("bad IPv4 version/IHL byte {:#04x}", frame[14]));
    }
    let frag = u16::from_be_bytes([frame[20], frame[21]]);
    Ok(Layout {
        ihl,
        tot_len: u16::from_be_bytes([frame[16], frame[17]]) as usize,
        proto: frame[23],
        fragment: frag & 0x3fff != 0,
    })
}

/// The residue of the IPv4 header's checksum.
pub fn ip_residue(frame: &[u8], l: &Layout) -> u16 {
    residue(&[&frame[14..14 + l.ihl]])
}

/// The residue of the TCP/UDP checksum over the pseudo-header (length from the IP header) and the
/// frame's bytes from the transport header up to offset `end` (the datagram's end, or the
/// frame's when comparing two frames that differ only within the headers).
pub fn l4_residue(frame: &[u8], l: &Layout, end: usize) -> u16 {
    let start = 14 + l.ihl;
    let end = end.clamp(start, frame.len());
    let len = (l.tot_len as u16).wrapping_sub(l.ihl as u16).to_be_bytes();
    residue(&[
        &frame[26..34],
        &[0, l.proto],
        &len,
        &frame[start.min(frame.len())..end],
    ])
}

/// Offset of the TCP/UDP checksum field in the frame, if the protocol has one.
pub fn l4_csum_offset(l: &Layout) -> Option<usize> {
    match l.proto {
        6 => Some(14 + l.ihl + 16),
        17 => Some(14 + l.ihl + 6),
        _ => None,
    }
}

/// Whether `frame` holds a whole, well-formed IPv4 datagram: its total length covers its headers
/// (the transport header too, for an unfragmented TCP or UDP datagram) and fits the frame.
pub fn whole(frame: &[u8]) -> bool {
    let Ok(l) = layout(frame) else {
        return false;
    };
    let min = match (l4_csum_offset(&l), l.fragment, l.proto) {
        (Some(_), false, 6) => 20,
        (Some(_), false, _) => 8,
        _ => 0,
    };
    l.tot_len >= l.ihl + min && 14 + l.tot_len <= frame.len()
}

/// Verifies a whole IPv4 datagram in a frame: the header checksum, and for an unfragmented TCP or
/// UDP datagram the transport checksum (a UDP checksum of 0 means none was sent).
pub fn verify(frame: &[u8]) -> Result<(), String> {
    let l = layout(frame)?;
    if !whole(frame) {
        return Err(format!(
            "IP total length {} does not fit the {}-byte frame or the headers",
            l.tot_len,
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
        return Ok(());
    }
    let r = l4_residue(frame, &l, 14 + l.tot_len);
    if r != 0xffff {
        return Err(format!(
            "{} checksum wrong (residue {r:#06x})",
            if l.proto == 6 { "TCP" } else { "UDP" }
        ));
    }
    Ok(())
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
