//! Header parsing with a bounds check before every read.
use aya_ebpf::programs::XdpContext;
use core::mem::size_of;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

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
pub const UDP_HLEN: usize = 8;

/// A pointer to a `T` at `off` bytes into the packet, if the packet holds all of it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// What the load balancer needs of an IPv4 TCP or UDP packet.
pub struct Packet {
    pub ip: *mut Ipv4Hdr,
    pub ports: *mut Ports,
    /// The L4 checksum, or null for UDP without a checksum.
    pub l4_csum: *mut u16,
    pub proto: u8,
    /// The IP header says the datagram is longer than its headers need, and the frame holds it.
    pub consistent: bool,
    /// A fragment: the first one (which has ports) or any later one.
    pub fragment: bool,
}

/// Why a packet is not one the load balancer looks at.
pub enum NotOurs {
    NotIpv4,
    /// IPv4, but not TCP or UDP, or too short to show its ports.
    NoPorts,
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, NotOurs> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(NotOurs::NotIpv4)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).proto }) != ETH_P_IP {
        return Err(NotOurs::NotIpv4);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(NotOurs::NotIpv4)?;
    let (version_ihl, proto, frag_off, tot_len) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).proto,
            (*ip).frag_off,
            (*ip).tot_len,
        )
    };
    if version_ihl >> 4 != 4 {
        return Err(NotOurs::NotIpv4);
    }
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if ihl < size_of::<Ipv4Hdr>() {
        return Err(NotOurs::NotIpv4);
    }
    let frag = u16::from_be(frag_off);
    let fragment = frag & (IP_MF | IP_OFFSET) != 0;
    if frag & IP_OFFSET != 0 {
        // A later fragment carries no ports; it cannot be matched to a VIP.
        return Err(NotOurs::NoPorts);
    }
    let l4 = ETH_HLEN + ihl;
    let (hlen, csum_off) = match proto {
        lb_common::PROTO_TCP => (TCP_HLEN, TCP_CSUM_OFF),
        lb_common::PROTO_UDP => (UDP_HLEN, UDP_CSUM_OFF),
        _ => return Err(NotOurs::NoPorts),
    };
    let ports: *mut Ports = ptr_at(ctx, l4).ok_or(NotOurs::NoPorts)?;
    let full_l4 = match proto {
        lb_common::PROTO_TCP => ptr_at::<[u8; TCP_HLEN]>(ctx, l4).is_some(),
        _ => ptr_at::<[u8; UDP_HLEN]>(ctx, l4).is_some(),
    };
    let ip_len = u16::from_be(tot_len) as usize;
    let consistent =
        full_l4 && ip_len >= ihl + hlen && ETH_HLEN + ip_len <= ctx.data_end() - ctx.data();
    let mut l4_csum: *mut u16 = core::ptr::null_mut();
    if full_l4 {
        if let Some(c) = ptr_at::<u16>(ctx, l4 + csum_off) {
            // UDP over IPv4 may go without a checksum (0): it must stay 0.
            if proto == lb_common::PROTO_TCP || unsafe { *c } != 0 {
                l4_csum = c;
            }
        }
    }
    Ok(Packet {
        ip,
        ports,
        l4_csum,
        proto,
        consistent,
        fragment,
    })
}
