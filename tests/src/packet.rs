//! Ethernet frames for the packet tests, built field by field with every length and checksum
//! computed here. A fixture's expected output is built the same way, from the same description
//! with the rewritten fields changed, so that no expectation is taken from the program under test.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

pub type Mac = [u8; 6];

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
/// "More fragments" in the IPv4 flags and fragment offset field.
pub const IP_MF: u16 = 0x2000;
pub const IP_DF: u16 = 0x4000;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_PSH: u8 = 0x08;

/// What follows the IPv4 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
    },
    /// `checksum: false` sends the datagram without a checksum (0), as IPv4 allows.
    Udp { checksum: bool },
    /// No transport header is built: the payload is all there is (another protocol, or a later
    /// fragment).
    Raw { proto: u8 },
}

/// An Ethernet + IPv4 frame, described by its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub eth_dst: Mac,
    pub eth_src: Mac,
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset, as in the header (host order).
    pub frag: u16,
    pub ttl: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// IPv4 options; their length must be a multiple of 4.
    pub options: Vec<u8>,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// Written as the IP total length instead of the real one (the checksums are computed over
    /// what is built either way).
    pub tot_len: Option<u16>,
    /// Added (ones' complement) to the correct L4 checksum: a corrupted packet.
    pub l4_csum_error: u16,
}

pub const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0xc0, 0x01];
pub const ROUTER_MAC: Mac = [0x02, 0, 0, 0, 0xc0, 0xfe];

impl Frame {
    fn new(src: SocketAddrV4, dst: SocketAddrV4, l4: L4) -> Frame {
        Frame {
            eth_dst: ROUTER_MAC,
            eth_src: CLIENT_MAC,
            tos: 0,
            id: 0x1234,
            frag: IP_DF,
            ttl: 64,
            src: *src.ip(),
            dst: *dst.ip(),
            options: Vec::new(),
            sport: src.port(),
            dport: dst.port(),
            l4,
            payload: Vec::new(),
            tot_len: None,
            l4_csum_error: 0,
        }
    }

    /// A TCP segment with `flags` (sequence numbers fixed, window 64240).
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Frame {
        let l4 = L4::Tcp {
            seq: 0x0102_0304,
            ack: if flags & TCP_ACK != 0 { 0x0a0b_0c0d } else { 0 },
            flags,
            window: 64240,
        };
        Frame::new(src, dst, l4)
    }

    /// A UDP datagram, with or without a checksum.
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, checksum: bool) -> Frame {
        Frame::new(src, dst, L4::Udp { checksum })
    }

    /// Bytes of protocol `proto` with no transport header built (ports are 0 and unused).
    pub fn raw(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Frame {
        Frame::new(
            SocketAddrV4::new(src, 0),
            SocketAddrV4::new(dst, 0),
            L4::Raw { proto },
        )
        .payload(payload)
    }

    pub fn payload(mut self, p: &[u8]) -> Frame {
        self.payload = p.to_vec();
        self
    }
    pub fn ttl(mut self, ttl: u8) -> Frame {
        self.ttl = ttl;
        self
    }
    pub fn frag(mut self, frag: u16) -> Frame {
        self.frag = frag;
        self
    }
    pub fn options(mut self, o: &[u8]) -> Frame {
        assert_eq!(o.len() % 4, 0, "IPv4 options come in 32-bit words");
        assert!(o.len() <= 40, "at most 40 bytes of IPv4 options");
        self.options = o.to_vec();
        self
    }
    pub fn tot_len(mut self, n: u16) -> Frame {
        self.tot_len = Some(n);
        self
    }
    pub fn l4_csum_error(mut self, e: u16) -> Frame {
        self.l4_csum_error = e;
        self
    }
    /// Source and destination MAC addresses.
    pub fn macs(mut self, src: Mac, dst: Mac) -> Frame {
        self.eth_src = src;
        self.eth_dst = dst;
        self
    }
    /// The destination address and port replaced, as the load balancer does towards a backend.
    pub fn to(mut self, dst: SocketAddrV4) -> Frame {
        self.dst = *dst.ip();
        self.dport = dst.port();
        self
    }
    /// The source address and port replaced, as the load balancer does to a reply.
    pub fn from(mut self, src: SocketAddrV4) -> Frame {
        self.src = *src.ip();
        self.sport = src.port();
        self
    }
    /// Forwarded as a router does: one hop less, new MAC addresses.
    pub fn hop(self, src: Mac, dst: Mac) -> Frame {
        let ttl = self.ttl - 1;
        self.ttl(ttl).macs(src, dst)
    }

    pub fn source(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.src, self.sport)
    }
    pub fn destination(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.dst, self.dport)
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Raw { proto } => proto,
        }
    }

    fn segment(&self) -> Vec<u8> {
        let mut s = Vec::new();
        match self.l4 {
            L4::Tcp {
                seq,
                ack,
                flags,
                window,
            } => {
                s.extend(self.sport.to_be_bytes());
                s.extend(self.dport.to_be_bytes());
                s.extend(seq.to_be_bytes());
                s.extend(ack.to_be_bytes());
                s.push(5 << 4); // data offset: 5 words, no options
                s.push(flags);
                s.extend(window.to_be_bytes());
                s.extend([0, 0, 0, 0]); // checksum, urgent pointer
            }
            L4::Udp { .. } => {
                s.extend(self.sport.to_be_bytes());
                s.extend(self.dport.to_be_bytes());
                s.extend(((8 + self.payload.len()) as u16).to_be_bytes());
                s.extend([0, 0]);
            }
            L4::Raw { .. } => {}
        }
        s.extend(&self.payload);
        let check = match self.l4 {
            L4::Tcp { .. } => Some((16, false)),
            L4::Udp { checksum: true } => Some((6, true)),
            L4::Udp { checksum: false } | L4::Raw { .. } => None,
        };
        if let Some((off, udp)) = check {
            let mut c = l4_checksum(&self.src.octets(), &self.dst.octets(), self.proto(), &s);
            if self.l4_csum_error != 0 {
                // The checksum field is a ones' complement sum; an error adds to it that way.
                c = fold(c as u32 + self.l4_csum_error as u32);
            }
            if c == 0 && udp {
                c = 0xffff; // 0 would mean "no checksum"
            }
            s[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
        s
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let segment = self.segment();
        let ihl = 20 + self.options.len();
        let tot_len = self.tot_len.unwrap_or((ihl + segment.len()) as u16);
        let mut ip = Vec::with_capacity(ihl);
        ip.push(0x40 | (ihl / 4) as u8);
        ip.push(self.tos);
        ip.extend(tot_len.to_be_bytes());
        ip.extend(self.id.to_be_bytes());
        ip.extend(self.frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.proto());
        ip.extend([0, 0]);
        ip.extend(self.src.octets());
        ip.extend(self.dst.octets());
        ip.extend(&self.options);
        let c = !fold(word_sum(&ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = ethernet(self.eth_dst, self.eth_src, ETH_P_IP);
        f.extend(ip);
        f.extend(segment);
        f
    }
}

fn ethernet(dst: Mac, src: Mac, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend(dst);
    f.extend(src);
    f.extend(ethertype.to_be_bytes());
    f
}

/// The TCP/UDP checksum of `segment` (its checksum field 0) from `src` to `dst`.
fn l4_checksum(src: &[u8], dst: &[u8], proto: u8, segment: &[u8]) -> u16 {
    let mut sum = word_sum(src, 0);
    sum = word_sum(dst, sum);
    sum = word_sum(&[0, proto], sum);
    sum = word_sum(&(segment.len() as u16).to_be_bytes(), sum);
    !fold(word_sum(segment, sum))
}

/// Adds `data` as big-endian 16-bit words (an odd last byte padded with zero) to `sum`.
fn word_sum(data: &[u8], mut sum: u32) -> u32 {
    for w in data.chunks(2) {
        let hi = w[0] as u32;
        let lo = w.get(1).copied().unwrap_or(0) as u32;
        sum += hi << 8 | lo;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Recomputes the checksums of an IPv4 frame changed by hand: the header's, when the frame holds
/// the header, and the TCP/UDP one (a UDP 0 left alone), when it holds the whole unfragmented
/// datagram. Anything else is left as it is.
pub fn fix_checksums(f: &mut [u8]) {
    if f.len() < ETH_HLEN + 20 || f[12..14] != ETH_P_IP.to_be_bytes() || f[14] >> 4 != 4 {
        return;
    }
    let ihl = (f[14] & 0x0f) as usize * 4;
    if ihl < 20 || f.len() < ETH_HLEN + ihl {
        return;
    }
    f[24..26].fill(0);
    let c = !fold(word_sum(&f[14..14 + ihl], 0));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let tot_len = u16::from_be_bytes([f[16], f[17]]) as usize;
    let (l4, end) = (ETH_HLEN + ihl, ETH_HLEN + tot_len);
    let unfragmented = u16::from_be_bytes([f[20], f[21]]) & 0x3fff == 0;
    let off = match f[23] {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => return,
    };
    if !unfragmented || end > f.len() || end < l4 + off + 2 {
        return;
    }
    if f[23] == IPPROTO_UDP && f[l4 + off..l4 + off + 2] == [0, 0] {
        return;
    }
    f[l4 + off..l4 + off + 2].fill(0);
    let mut c = l4_checksum(&f[26..30], &f[30..34], f[23], &f[l4..end]);
    if c == 0 && f[23] == IPPROTO_UDP {
        c = 0xffff;
    }
    f[l4 + off..l4 + off + 2].copy_from_slice(&c.to_be_bytes());
}

/// An ARP request: who has `target`? tell `sender`.
pub fn arp_request(sender_mac: Mac, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet([0xff; 6], sender_mac, ETH_P_ARP);
    f.extend([0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet, IPv4, 6, 4, request
    f.extend(sender_mac);
    f.extend(sender.octets());
    f.extend([0; 6]);
    f.extend(target.octets());
    f
}

/// An IPv6 TCP SYN (its TCP checksum left 0: nothing in these tests reads it).
pub fn ipv6_tcp_syn(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = ethernet(ROUTER_MAC, CLIENT_MAC, ETH_P_IPV6);
    f.extend([0x60, 0, 0, 0]);
    f.extend(20u16.to_be_bytes());
    f.push(IPPROTO_TCP);
    f.push(64);
    f.extend(src.octets());
    f.extend(dst.octets());
    f.extend(sport.to_be_bytes());
    f.extend(dport.to_be_bytes());
    f.extend([
        0, 0, 0, 1, 0, 0, 0, 0, 0x50, TCP_SYN, 0xfa, 0xf0, 0, 0, 0, 0,
    ]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum;

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn built_frames_verify() {
        let frames = [
            Frame::tcp(a("198.18.0.2:40000"), a("172.16.0.1:8080"), TCP_SYN),
            Frame::tcp(a("198.18.0.2:40000"), a("172.16.0.1:8080"), TCP_ACK).payload(b"odd"),
            Frame::udp(a("198.18.0.2:53"), a("172.16.0.1:8080"), true).payload(b"hello"),
            Frame::udp(a("198.18.0.2:53"), a("172.16.0.1:8080"), false).payload(b"hello"),
            Frame::tcp(a("198.18.0.2:1"), a("172.16.0.1:2"), TCP_SYN).options(&[1, 1, 1, 0]),
        ];
        for f in frames {
            let b = f.build();
            assert_eq!(checksum::verify(&b), Ok(()), "{f:?}");
        }
    }

    #[test]
    fn a_known_header_checksum() {
        // The classic example header (Wikipedia, "IPv4 header checksum"): checksum 0xb861.
        let f = Frame::raw(
            Ipv4Addr::new(192, 168, 0, 1),
            Ipv4Addr::new(192, 168, 0, 199),
            17,
            &[0; 95],
        );
        let f = Frame {
            id: 0,
            frag: IP_DF,
            ..f
        };
        let b = f.build();
        assert_eq!(&b[14..34][..4], &[0x45, 0, 0, 0x73]);
        assert_eq!(&b[24..26], &[0xb8, 0x61]);
    }

    #[test]
    fn fixing_checksums_makes_frames_verify() {
        let f = Frame::udp(a("198.18.0.2:53"), a("172.16.0.1:8080"), true).payload(b"hello");
        let mut b = f.build();
        b[30] ^= 0x40; // the destination address
        b[44] ^= 0x01; // the payload
        assert!(checksum::verify(&b).is_err());
        fix_checksums(&mut b);
        assert_eq!(checksum::verify(&b), Ok(()));
    }

    #[test]
    fn errors_show_in_the_checksum() {
        let f = Frame::tcp(a("198.18.0.2:40000"), a("172.16.0.1:8080"), TCP_SYN);
        assert!(checksum::verify(&f.clone().l4_csum_error(7).build()).is_err());
        assert!(checksum::verify(&f.tot_len(100).build()).is_err());
    }
}
