//! Ethernet frames for the packet tests, IPv4 or IPv6, built field by field with every length and
//! checksum computed here. A fixture's expected output is built the same way, from the same
//! description with the rewritten fields changed, so that no expectation is taken from the program
//! under test.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub type Mac = [u8; 6];

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers' "next header" values.
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_DSTOPTS: u8 = 60;
/// "More fragments" in the IPv4 flags and fragment offset field.
pub const IP_MF: u16 = 0x2000;
pub const IP_DF: u16 = 0x4000;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_PSH: u8 = 0x08;

/// What follows the IP header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
    },
    /// `checksum: false` sends the datagram without a checksum (0), as IPv4 allows (IPv6 does not:
    /// its receivers discard such datagrams).
    Udp { checksum: bool },
    /// No transport header is built: the payload is all there is (another protocol, or a later
    /// fragment).
    Raw { proto: u8 },
}

/// An IPv6 extension header, between the fixed header and the transport header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options (next header 0): these options, padded to a multiple of 8 bytes.
    HopByHop(Vec<u8>),
    /// Destination options (60): these options, padded likewise.
    DstOpts(Vec<u8>),
    /// A fragment header (44): offset in 8-byte units, "more fragments", identification. Offset 0
    /// without "more fragments" is an atomic fragment (RFC 6946): the whole datagram.
    Fragment { offset: u16, more: bool, id: u32 },
}

/// The IPv6 router alert option (RFC 2711), as MLD carries it in a hop-by-hop header.
pub const ROUTER_ALERT6: [u8; 4] = [5, 2, 0, 0];

impl Ext {
    fn code(&self) -> u8 {
        match self {
            Ext::HopByHop(_) => IPPROTO_HOPOPTS,
            Ext::DstOpts(_) => IPPROTO_DSTOPTS,
            Ext::Fragment { .. } => IPPROTO_FRAGMENT,
        }
    }

    /// The header's bytes, followed by a header of type `next`.
    fn bytes(&self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop(opts) | Ext::DstOpts(opts) => {
                let len = (2 + opts.len()).div_ceil(8) * 8;
                let mut h = vec![next, (len / 8 - 1) as u8];
                h.extend(opts);
                match len - h.len() {
                    0 => {}
                    1 => h.push(0), // Pad1
                    n => h.extend([&[1, (n - 2) as u8][..], &vec![0; n - 2]].concat()), // PadN
                }
                h
            }
            Ext::Fragment { offset, more, id } => {
                let mut h = vec![next, 0];
                h.extend((offset << 3 | *more as u16).to_be_bytes());
                h.extend(id.to_be_bytes());
                h
            }
        }
    }
}

/// An Ethernet frame with an IPv4 or IPv6 header (the family of its addresses), described by its
/// fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub eth_dst: Mac,
    pub eth_src: Mac,
    /// IPv4 type of service; IPv6 traffic class.
    pub tos: u8,
    /// IPv4 only.
    pub id: u16,
    /// IPv4 only: flags and fragment offset, as in the header (host order).
    pub frag: u16,
    /// IPv6 only: the flow label (20 bits).
    pub flow_label: u32,
    /// IPv4 TTL; IPv6 hop limit.
    pub ttl: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 options; their length must be a multiple of 4.
    pub options: Vec<u8>,
    /// IPv6 extension headers, in order.
    pub ext: Vec<Ext>,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// Written as the IP header's length field (IPv4 total length, IPv6 payload length) instead
    /// of the real one (the checksums are computed over what is built either way).
    pub tot_len: Option<u16>,
    /// Added (ones' complement) to the correct L4 checksum: a corrupted packet.
    pub l4_csum_error: u16,
}

pub const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0xc0, 0x01];
pub const ROUTER_MAC: Mac = [0x02, 0, 0, 0, 0xc0, 0xfe];

impl Frame {
    fn new(src: SocketAddr, dst: SocketAddr, l4: L4) -> Frame {
        assert_eq!(src.is_ipv6(), dst.is_ipv6(), "{src} -> {dst}: one family");
        Frame {
            eth_dst: ROUTER_MAC,
            eth_src: CLIENT_MAC,
            tos: 0,
            id: 0x1234,
            frag: IP_DF,
            flow_label: 0x5_4321,
            ttl: 64,
            src: src.ip(),
            dst: dst.ip(),
            options: Vec::new(),
            ext: Vec::new(),
            sport: src.port(),
            dport: dst.port(),
            l4,
            payload: Vec::new(),
            tot_len: None,
            l4_csum_error: 0,
        }
    }

    /// A TCP segment with `flags` (sequence numbers fixed, window 64240).
    pub fn tcp(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>, flags: u8) -> Frame {
        let l4 = L4::Tcp {
            seq: 0x0102_0304,
            ack: if flags & TCP_ACK != 0 { 0x0a0b_0c0d } else { 0 },
            flags,
            window: 64240,
        };
        Frame::new(src.into(), dst.into(), l4)
    }

    /// A UDP datagram, with or without a checksum.
    pub fn udp(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>, checksum: bool) -> Frame {
        Frame::new(src.into(), dst.into(), L4::Udp { checksum })
    }

    /// Bytes of protocol `proto` with no transport header built (ports are 0 and unused).
    pub fn raw(src: impl Into<IpAddr>, dst: impl Into<IpAddr>, proto: u8, payload: &[u8]) -> Frame {
        Frame::new(
            SocketAddr::new(src.into(), 0),
            SocketAddr::new(dst.into(), 0),
            L4::Raw { proto },
        )
        .payload(payload)
    }

    pub fn is_ipv6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// Bytes of IP header, IPv4 options or IPv6 extension headers included: the transport header
    /// starts this far after the Ethernet header.
    pub fn ip_hlen(&self) -> usize {
        if self.is_ipv6() {
            40 + self.ext.iter().map(|e| e.bytes(0).len()).sum::<usize>()
        } else {
            20 + self.options.len()
        }
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
        assert!(!self.is_ipv6(), "IPv6 has extension headers, not options");
        assert_eq!(o.len() % 4, 0, "IPv4 options come in 32-bit words");
        assert!(o.len() <= 40, "at most 40 bytes of IPv4 options");
        self.options = o.to_vec();
        self
    }
    /// An IPv6 extension header, after those already added.
    pub fn ext(mut self, e: Ext) -> Frame {
        assert!(self.is_ipv6(), "IPv4 has options, not extension headers");
        self.ext.push(e);
        self
    }
    /// The IP header's length field (IPv4 total length, IPv6 payload length) set to `n`.
    pub fn tot_len(mut self, n: u16) -> Frame {
        self.tot_len = Some(n);
        self
    }
    /// The IP header's length field set to say that `n` bytes follow the IP headers (IPv4
    /// options and IPv6 extension headers included in those), whatever the frame holds.
    pub fn l4_len(self, n: usize) -> Frame {
        let headers = if self.is_ipv6() {
            self.ip_hlen() - 40
        } else {
            self.ip_hlen()
        };
        self.tot_len((headers + n) as u16)
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
    pub fn to(mut self, dst: impl Into<SocketAddr>) -> Frame {
        let dst = dst.into();
        assert_eq!(dst.is_ipv6(), self.is_ipv6(), "{dst}: another family");
        self.dst = dst.ip();
        self.dport = dst.port();
        self
    }
    /// The source address and port replaced, as the load balancer does to a reply.
    pub fn from(mut self, src: impl Into<SocketAddr>) -> Frame {
        let src = src.into();
        assert_eq!(src.is_ipv6(), self.is_ipv6(), "{src}: another family");
        self.src = src.ip();
        self.sport = src.port();
        self
    }
    /// Forwarded as a router does: one hop less, new MAC addresses.
    /// One hop (TTL, hop limit) less, MAC addresses as they are.
    pub fn one_hop_older(self) -> Frame {
        let ttl = self.ttl - 1;
        self.ttl(ttl)
    }

    pub fn hop(self, src: Mac, dst: Mac) -> Frame {
        let ttl = self.ttl - 1;
        self.ttl(ttl).macs(src, dst)
    }

    pub fn source(&self) -> SocketAddr {
        SocketAddr::new(self.src, self.sport)
    }
    pub fn destination(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.dport)
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
            let mut c = l4_checksum(&octets(self.src), &octets(self.dst), self.proto(), &s);
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
        let (ethertype, ip) = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => (ETH_P_IP, self.ipv4_header(src, dst, &segment)),
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                (ETH_P_IPV6, self.ipv6_headers(src, dst, &segment))
            }
            (src, dst) => panic!("{src} -> {dst}: one family"),
        };
        let mut f = ethernet(self.eth_dst, self.eth_src, ethertype);
        f.extend(ip);
        f.extend(segment);
        f
    }

    fn ipv4_header(&self, src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> Vec<u8> {
        let ihl = self.ip_hlen();
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
        ip.extend(src.octets());
        ip.extend(dst.octets());
        ip.extend(&self.options);
        let c = !fold(word_sum(&ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip
    }

    /// The fixed header and the extension headers, chained by their "next header" fields.
    fn ipv6_headers(&self, src: Ipv6Addr, dst: Ipv6Addr, segment: &[u8]) -> Vec<u8> {
        let mut ext = Vec::new();
        for (i, e) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(self.proto(), Ext::code);
            ext.extend(e.bytes(next));
        }
        let payload_len = self.tot_len.unwrap_or((ext.len() + segment.len()) as u16);
        let first = 6 << 28 | (self.tos as u32) << 20 | self.flow_label & 0xf_ffff;
        let mut ip = Vec::with_capacity(40 + ext.len());
        ip.extend(first.to_be_bytes());
        ip.extend(payload_len.to_be_bytes());
        ip.push(self.ext.first().map_or(self.proto(), Ext::code));
        ip.push(self.ttl);
        ip.extend(src.octets());
        ip.extend(dst.octets());
        ip.extend(ext);
        ip
    }
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn ethernet(dst: Mac, src: Mac, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend(dst);
    f.extend(src);
    f.extend(ethertype.to_be_bytes());
    f
}

/// The TCP/UDP (or ICMPv6) checksum of `segment` (its checksum field 0) from `src` to `dst`, IPv4
/// or IPv6. The IPv6 pseudo-header's 32-bit length and 24 zero bits before the protocol sum to
/// the same words as IPv4's 16-bit length and zero byte, for any segment shorter than 64 KiB.
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

/// Recomputes the checksums of a frame changed by hand: an IPv4 header's, when the frame holds
/// the header, and the TCP/UDP one (a UDP 0 left alone), when the frame holds the whole
/// unfragmented datagram (for IPv6: with the transport header right after the fixed header).
/// Anything else is left as it is.
pub fn fix_checksums(f: &mut [u8]) {
    let Some((addrs, proto, l4, end)) = fix_ip_header(f) else {
        return;
    };
    let off = match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => return,
    };
    if end > f.len() || end < l4 + off + 2 {
        return;
    }
    if proto == IPPROTO_UDP && f[l4 + off..l4 + off + 2] == [0, 0] {
        return;
    }
    f[l4 + off..l4 + off + 2].fill(0);
    let (src, dst) = f[addrs.clone()].split_at(addrs.len() / 2);
    let mut c = l4_checksum(src, dst, proto, &f[l4..end]);
    if c == 0 && proto == IPPROTO_UDP {
        c = 0xffff;
    }
    f[l4 + off..l4 + off + 2].copy_from_slice(&c.to_be_bytes());
}

/// Fixes an IPv4 header's checksum; says where the transport checksum's inputs lie in an
/// unfragmented IPv4 or IPv6 datagram: the two addresses, the protocol, where the transport
/// header starts and where the datagram ends by its IP header.
fn fix_ip_header(f: &mut [u8]) -> Option<(std::ops::Range<usize>, u8, usize, usize)> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let version = *f.get(ETH_HLEN)? >> 4;
    match (ethertype, version) {
        (ETH_P_IP, 4) if f.len() >= ETH_HLEN + 20 => {
            let ihl = (f[14] & 0x0f) as usize * 4;
            if ihl < 20 || f.len() < ETH_HLEN + ihl {
                return None;
            }
            f[24..26].fill(0);
            let c = !fold(word_sum(&f[14..14 + ihl], 0));
            f[24..26].copy_from_slice(&c.to_be_bytes());
            let tot_len = u16::from_be_bytes([f[16], f[17]]) as usize;
            let unfragmented = u16::from_be_bytes([f[20], f[21]]) & 0x3fff == 0;
            unfragmented.then_some((26..34, f[23], ETH_HLEN + ihl, ETH_HLEN + tot_len))
        }
        (ETH_P_IPV6, 6) if f.len() >= ETH_HLEN + 40 => {
            let payload_len = u16::from_be_bytes([f[18], f[19]]) as usize;
            Some((22..54, f[20], ETH_HLEN + 40, ETH_HLEN + 40 + payload_len))
        }
        _ => None,
    }
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

/// An IPv6 neighbour solicitation from `sender` (with its link-layer address option): who has
/// `target`? Sent to the target's solicited-node multicast address, hop limit 255, with its
/// ICMPv6 checksum.
pub fn neighbour_solicitation(sender_mac: Mac, sender: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let group = Ipv6Addr::from([
        0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ]);
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend(t);
    icmp.extend([1, 1]); // source link-layer address, 8 bytes
    icmp.extend(sender_mac);
    let c = l4_checksum(&sender.octets(), &group.octets(), IPPROTO_ICMPV6, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mac = [0x33, 0x33, 0xff, t[13], t[14], t[15]];
    Frame::raw(sender, group, IPPROTO_ICMPV6, &icmp)
        .ttl(255)
        .macs(sender_mac, mac)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum;

    fn a(s: &str) -> SocketAddr {
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
            Frame::tcp(a("[2001:2::2]:40000"), a("[fd00::1]:8080"), TCP_SYN),
            Frame::tcp(a("[2001:2::2]:40000"), a("[fd00::1]:8080"), TCP_ACK).payload(b"odd"),
            Frame::udp(a("[2001:2::2]:53"), a("[fd00::1]:8080"), true).payload(b"hello"),
            Frame::tcp(a("[2001:2::2]:1"), a("[fd00::1]:2"), TCP_SYN)
                .ext(Ext::HopByHop(ROUTER_ALERT6.to_vec()))
                .ext(Ext::DstOpts(vec![]))
                .payload(b"behind two extension headers"),
            Frame::udp(a("[2001:2::2]:1"), a("[fd00::1]:2"), true)
                .ext(Ext::Fragment {
                    offset: 0,
                    more: false,
                    id: 7,
                })
                .payload(b"an atomic fragment"),
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
    fn ipv6_layout_by_hand() {
        let f = Frame::udp(a("[2001:2::2]:53"), a("[fd00::1]:8080"), true)
            .ext(Ext::HopByHop(ROUTER_ALERT6.to_vec()))
            .ext(Ext::Fragment {
                offset: 3,
                more: true,
                id: 0x0102_0304,
            })
            .payload(b"x");
        let b = f.build();
        assert_eq!(f.ip_hlen(), 40 + 8 + 8);
        assert_eq!(&b[12..14], &[0x86, 0xdd]);
        assert_eq!(&b[14..18], &[0x60, 0x05, 0x43, 0x21]); // version, class 0, flow label
        assert_eq!(&b[18..22], &[0, 16 + 9, IPPROTO_HOPOPTS, 64]);
        // Hop-by-hop: next is the fragment header, length 0 (8 bytes), router alert, PadN 2.
        assert_eq!(&b[54..62], &[IPPROTO_FRAGMENT, 0, 5, 2, 0, 0, 1, 0]);
        assert_eq!(&b[62..70], &[IPPROTO_UDP, 0, 0, 3 << 3 | 1, 1, 2, 3, 4]);
        assert_eq!(&b[70..74], &[0, 53, 0x1f, 0x90]);
        assert_eq!(b.len(), 14 + 40 + 16 + 9);
        let f = f.l4_len(4);
        assert_eq!(&f.build()[18..20], &[0, 16 + 4]);
    }

    #[test]
    fn fixing_checksums_makes_frames_verify() {
        let v4 = Frame::udp(a("198.18.0.2:53"), a("172.16.0.1:8080"), true).payload(b"hello");
        let v6 = Frame::tcp(a("[2001:2::2]:53"), a("[fd00::1]:8080"), TCP_ACK).payload(b"hello");
        // A destination address byte and a payload byte of each.
        for (f, at) in [(v4, [30, 44]), (v6, [53, 75])] {
            let mut b = f.build();
            for i in at {
                b[i] ^= 0x41;
            }
            assert!(checksum::verify(&b).is_err());
            fix_checksums(&mut b);
            assert_eq!(checksum::verify(&b), Ok(()));
        }
    }

    #[test]
    fn errors_show_in_the_checksum() {
        for (src, dst) in [
            ("198.18.0.2:40000", "172.16.0.1:8080"),
            ("[2001:2::2]:40000", "[fd00::1]:8080"),
        ] {
            let f = Frame::tcp(a(src), a(dst), TCP_SYN);
            assert!(checksum::verify(&f.clone().l4_csum_error(7).build()).is_err());
            assert!(checksum::verify(&f.clone().tot_len(100).build()).is_err());
            // The pseudo-header covers the addresses: another source, same checksum, is wrong.
            let mut b = f.build();
            let at = if f.is_ipv6() {
                14 + 8 + 15
            } else {
                14 + 12 + 3
            };
            b[at] ^= 1;
            assert!(checksum::verify(&b).is_err());
        }
        // IPv6 has no "no checksum" for UDP.
        let f = Frame::udp(a("[2001:2::2]:53"), a("[fd00::1]:8080"), false);
        assert!(checksum::verify(&f.build()).is_err());
    }

    #[test]
    fn a_neighbour_solicitation_verifies() {
        let target: Ipv6Addr = "fd00:172:16::1".parse().unwrap();
        let b = neighbour_solicitation(CLIENT_MAC, "2001:2::2".parse().unwrap(), target);
        assert_eq!(&b[0..6], &[0x33, 0x33, 0xff, 0, 0, 1]);
        assert_eq!(b[20], IPPROTO_ICMPV6);
        assert_eq!(
            &b[38..54],
            &"ff02::1:ff00:1".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(checksum::verify(&b), Ok(()));
    }
}
