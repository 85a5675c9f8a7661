//! Header parsing with a bounds check before every read.
use crate::hook::Hook;
use core::mem::size_of;

pub const ETH_HLEN: usize = 14;
/// Where the IPv4 header checksum is, in bytes from the packet's start.
pub const IP_CHECK_OFF: usize = ETH_HLEN + 10;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV6_HLEN: usize = 40;
const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// BE.
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    /// BE.
    pub tot_len: u16,
    pub id: u16,
    /// BE.
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    /// BE.
    pub saddr: u32,
    /// BE.
    pub daddr: u32,
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub version_class_flow: u32,
    /// BE.
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    /// BE, four 32-bit words.
    pub saddr: [u32; 4],
    /// BE.
    pub daddr: [u32; 4],
}

/// The first 8 bytes of TCP and UDP: ports, then (UDP) length and checksum.
#[repr(C)]
pub struct Ports {
    /// BE.
    pub sport: u16,
    /// BE.
    pub dport: u16,
}

/// Offset of the checksum in the L4 header.
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;
pub const TCP_HLEN: usize = 20;
const TCP_SYN: u8 = 0x02;
pub const UDP_HLEN: usize = 8;

/// A pointer to a `T` at `off` bytes into the packet, if the packet holds all of it.
#[inline(always)]
pub fn ptr_at<C: Hook, T>(ctx: &C, off: usize) -> Option<*mut T> {
    let start = ctx.start();
    let end = ctx.end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// The TCP or UDP part of a packet.
pub struct L4 {
    pub ports: *mut Ports,
    /// The L4 checksum, or null for UDP without a checksum.
    pub csum: *mut u16,
    /// Where the L4 checksum is, in bytes from the packet's start.
    pub csum_off: usize,
    pub proto: u8,
    /// The whole TCP or UDP header is in the frame.
    pub full: bool,
    /// Bytes of header TCP or UDP needs at least.
    pub hlen: usize,
    /// A TCP segment without SYN: it belongs to an established flow.
    pub established: bool,
    /// A TCP segment's FIN and RST bits (`lb_common::END_CLIENT_FIN`, `END_RESET`); 0 for UDP.
    pub end: u16,
    /// A whole TCP header with SYN set.
    pub syn: bool,
}

/// What the load balancer needs of an IPv4 TCP or UDP packet.
pub struct Packet {
    pub ip: *mut Ipv4Hdr,
    pub l4: L4,
    /// The IP header says the datagram is longer than its headers need, and the frame holds it.
    pub consistent: bool,
    /// A fragment: the first one (which has ports) or any later one.
    pub fragment: bool,
}

/// What the load balancer needs of an IPv6 TCP or UDP packet (no extension headers).
pub struct Packet6 {
    pub ip: *mut Ipv6Hdr,
    pub l4: L4,
    /// The payload length fits the headers and the frame.
    pub consistent: bool,
}

/// What the main programs (`lb_xdp`, `lb_tc`) find in a frame.
pub enum Parsed {
    V4(Packet),
    /// An ICMP error about an IPv4 TCP or UDP packet.
    Icmp4(IcmpError),
    /// A later fragment (no ports) of an IPv4 TCP or UDP datagram.
    Frag4(*mut Ipv4Hdr),
    /// An IPv6 frame, for the IPv6 programs (`parse6` reads it there).
    Ipv6,
}

/// What the IPv6 programs (`lb_xdp6`, `lb_tc6`) find in a frame.
pub enum Parsed6 {
    V6(Packet6),
    /// An ICMPv6 error about an IPv6 TCP or UDP packet.
    Icmp6(Icmp6Error),
}

/// An ICMPv6 error and the packet it is about.
pub struct Icmp6Error {
    pub ip: *mut Ipv6Hdr,
    pub icmp: *mut IcmpHdr,
    pub inner: *mut Ipv6Hdr,
    pub ports: *mut Ports,
    pub proto: u8,
}

#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub csum: u16,
    pub rest: u32,
}

const ICMP_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// An ICMP error and the packet it is about (its IP header and ports, as the ICMP carries them).
pub struct IcmpError {
    pub ip: *mut Ipv4Hdr,
    pub icmp: *mut IcmpHdr,
    pub inner: *mut Ipv4Hdr,
    pub ports: *mut Ports,
    pub proto: u8,
}

/// Why a packet is not one the load balancer looks at.
pub enum NotOurs {
    /// Neither IPv4 nor IPv6, or a broken IP header.
    NotIp,
    /// Not TCP or UDP (for IPv6: not directly after the fixed header), a later fragment, or too
    /// short to show its ports.
    NoPorts,
}

#[inline(always)]
pub fn parse<C: Hook>(ctx: &C) -> Result<Parsed, NotOurs> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(NotOurs::NotIp)?;
    // SAFETY: bounds checked by ptr_at.
    match u16::from_be(unsafe { (*eth).proto }) {
        ETH_P_IP => parse4(ctx),
        ETH_P_IPV6 => Ok(Parsed::Ipv6),
        _ => Err(NotOurs::NotIp),
    }
}

#[inline(always)]
fn parse4<C: Hook>(ctx: &C) -> Result<Parsed, NotOurs> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(NotOurs::NotIp)?;
    // SAFETY: bounds checked by ptr_at.
    let (version_ihl, proto, frag_off, tot_len) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).proto,
            (*ip).frag_off,
            (*ip).tot_len,
        )
    };
    if version_ihl >> 4 != 4 {
        return Err(NotOurs::NotIp);
    }
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if ihl < size_of::<Ipv4Hdr>() {
        return Err(NotOurs::NotIp);
    }
    let frag = u16::from_be(frag_off);
    let fragment = frag & (IP_MF | IP_OFFSET) != 0;
    if frag & IP_OFFSET != 0 {
        // A later fragment carries no ports: it follows its first fragment, if that was ours.
        return match proto {
            lb_common::PROTO_TCP | lb_common::PROTO_UDP => Ok(Parsed::Frag4(ip)),
            _ => Err(NotOurs::NoPorts),
        };
    }
    if proto == lb_common::PROTO_ICMP && !fragment {
        return icmp_error(ctx, ip, ETH_HLEN + ihl).map(Parsed::Icmp4);
    }
    let l4 = l4_at(ctx, ETH_HLEN + ihl, proto)?;
    let ip_len = u16::from_be(tot_len) as usize;
    let consistent = l4.full && ip_len >= ihl + l4.hlen && ETH_HLEN + ip_len <= ctx.packet_len();
    Ok(Parsed::V4(Packet {
        ip,
        l4,
        consistent,
        fragment,
    }))
}

/// An ICMP error (unreachable, time exceeded, parameter problem) whose quoted packet is IPv4
/// TCP or UDP with its ports. Anything else ICMP (echo among them) is not ours.
#[inline(always)]
fn icmp_error<C: Hook>(ctx: &C, ip: *mut Ipv4Hdr, off: usize) -> Result<IcmpError, NotOurs> {
    let icmp: *mut IcmpHdr = ptr_at(ctx, off).ok_or(NotOurs::NoPorts)?;
    // SAFETY: bounds checked by ptr_at.
    match unsafe { (*icmp).kind } {
        ICMP_UNREACHABLE | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => {}
        _ => return Err(NotOurs::NoPorts),
    }
    let inner_off = off + size_of::<IcmpHdr>();
    let inner: *mut Ipv4Hdr = ptr_at(ctx, inner_off).ok_or(NotOurs::NoPorts)?;
    let (version_ihl, proto) = unsafe { ((*inner).version_ihl, (*inner).proto) };
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() {
        return Err(NotOurs::NoPorts);
    }
    if proto != lb_common::PROTO_TCP && proto != lb_common::PROTO_UDP {
        return Err(NotOurs::NoPorts);
    }
    let ports: *mut Ports = ptr_at(ctx, inner_off + ihl).ok_or(NotOurs::NoPorts)?;
    Ok(IcmpError {
        ip,
        icmp,
        inner,
        ports,
        proto,
    })
}

/// An IPv6 frame's headers (the main program checked its Ethernet type).
#[inline(always)]
pub fn parse6<C: Hook>(ctx: &C) -> Result<Parsed6, NotOurs> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_HLEN).ok_or(NotOurs::NotIp)?;
    // SAFETY: bounds checked by ptr_at.
    let (first, next, payload_len) = unsafe {
        (
            (*ip).version_class_flow,
            (*ip).next_header,
            (*ip).payload_len,
        )
    };
    if u32::from_be(first) >> 28 != 6 {
        return Err(NotOurs::NotIp);
    }
    if next == PROTO_ICMPV6 {
        return icmp6_error(ctx, ip).map(Parsed6::Icmp6);
    }
    // Extension headers (fragments among them) are not followed: such packets pass untouched.
    let l4 = l4_at(ctx, ETH_HLEN + IPV6_HLEN, next)?;
    let len = u16::from_be(payload_len) as usize;
    let consistent = l4.full && len >= l4.hlen && ETH_HLEN + IPV6_HLEN + len <= ctx.packet_len();
    Ok(Parsed6::V6(Packet6 { ip, l4, consistent }))
}

const PROTO_ICMPV6: u8 = 58;
const ICMPV6_UNREACHABLE: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;

/// An ICMPv6 error (unreachable, packet too big, time exceeded, parameter problem) whose quoted
/// packet is IPv6 TCP or UDP (no extension headers) with its ports.
#[inline(always)]
fn icmp6_error<C: Hook>(ctx: &C, ip: *mut Ipv6Hdr) -> Result<Icmp6Error, NotOurs> {
    let off = ETH_HLEN + IPV6_HLEN;
    let icmp: *mut IcmpHdr = ptr_at(ctx, off).ok_or(NotOurs::NoPorts)?;
    // SAFETY: bounds checked by ptr_at.
    match unsafe { (*icmp).kind } {
        ICMPV6_UNREACHABLE
        | ICMPV6_PACKET_TOO_BIG
        | ICMPV6_TIME_EXCEEDED
        | ICMPV6_PARAMETER_PROBLEM => {}
        _ => return Err(NotOurs::NoPorts),
    }
    let inner_off = off + size_of::<IcmpHdr>();
    let inner: *mut Ipv6Hdr = ptr_at(ctx, inner_off).ok_or(NotOurs::NoPorts)?;
    let proto = unsafe { (*inner).next_header };
    if proto != lb_common::PROTO_TCP && proto != lb_common::PROTO_UDP {
        return Err(NotOurs::NoPorts);
    }
    let ports: *mut Ports = ptr_at(ctx, inner_off + IPV6_HLEN).ok_or(NotOurs::NoPorts)?;
    Ok(Icmp6Error {
        ip,
        icmp,
        inner,
        ports,
        proto,
    })
}

/// The TCP or UDP header at `off`.
#[inline(always)]
fn l4_at<C: Hook>(ctx: &C, off: usize, proto: u8) -> Result<L4, NotOurs> {
    let (hlen, csum_off) = match proto {
        lb_common::PROTO_TCP => (TCP_HLEN, TCP_CSUM_OFF),
        lb_common::PROTO_UDP => (UDP_HLEN, UDP_CSUM_OFF),
        _ => return Err(NotOurs::NoPorts),
    };
    let ports: *mut Ports = ptr_at(ctx, off).ok_or(NotOurs::NoPorts)?;
    let full = match proto {
        lb_common::PROTO_TCP => ptr_at::<C, [u8; TCP_HLEN]>(ctx, off).is_some(),
        _ => ptr_at::<C, [u8; UDP_HLEN]>(ctx, off).is_some(),
    };
    let mut csum: *mut u16 = core::ptr::null_mut();
    if full {
        if let Some(c) = ptr_at::<C, u16>(ctx, off + csum_off) {
            // A UDP datagram without a checksum (0) must keep none.
            if proto == lb_common::PROTO_TCP || unsafe { *c } != 0 {
                csum = c;
            }
        }
    }
    // SAFETY: the flags byte (offset 13) lies within the 20 bytes `full` checked. A plain
    // byte (0 when not TCP), not an Option: LLVM once merged the None case with a packet
    // pointer and the verifier refused the masking of it.
    let tcp = full && proto == lb_common::PROTO_TCP;
    let flags: u8 = if tcp {
        ptr_at::<C, [u8; 14]>(ctx, off).map_or(0, |h| unsafe { (*h)[13] })
    } else {
        0
    };
    let established = tcp && flags & TCP_SYN == 0;
    let syn = flags & TCP_SYN != 0;
    let end = flags as u16 & (lb_common::END_CLIENT_FIN | lb_common::END_RESET);
    Ok(L4 {
        ports,
        csum,
        csum_off: off + csum_off,
        proto,
        full,
        hlen,
        established,
        end,
        syn,
    })
}
