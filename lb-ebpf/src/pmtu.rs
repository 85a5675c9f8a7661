//! Path MTU through a VIP. When the FIB says a translated packet is larger than its next hop's
//! MTU (`Forward::TooBig`) and it may not be fragmented (IPv4 with DF set; IPv6 always), the load
//! balancer answers the sender itself, as a router would, but quoting the packet as the sender
//! sent it: the kernel's own error would quote the translated packet, which the sender does not
//! recognise (a path-MTU black hole).
//!
//! - A packet to a backend: "fragmentation needed" (ICMP 3/4) or "packet too big" (ICMPv6 2/0)
//!   goes to the client, from the VIP, quoting client -> VIP:port.
//! - A reply from a backend: the error goes to the backend, from the client's address (which the
//!   backend's routers already route toward the load balancer), quoting backend -> client.
//!
//! The packet is turned into the error in place: cut to the quote, room opened for the new IP
//! and ICMP headers (`Hook::resize`), sent back out of the interface it came in on to the MAC it
//! came from. The quote has a fixed length, as much as the minimum datagram holds (576 bytes
//! for IPv4, RFC 1812; 1280 for IPv6, RFC 4443), so the checksums are sums over fixed spans
//! (`bpf_csum_diff`). A packet shorter than that (a next hop with an MTU below it) is left to
//! the kernel.
use crate::{
    hook::Hook,
    icmp::{Target, target},
    parse::{ETH_HLEN, EthHdr, IP_OFFSET, IcmpHdr, Ipv4Hdr, Ipv6Hdr, Packet, Packet6, Ports},
};
use aya_ebpf::helpers::generated::bpf_csum_diff;
use lb_common::{Flow, Flow6, PROTO_TCP, PROTO_UDP};

/// Bytes of the offending packet an IPv4 error quotes: 576 - 20 (IP) - 8 (ICMP).
pub const QUOTE4: usize = 548;
/// Bytes an ICMPv6 error quotes: 1280 - 40 (IPv6) - 8 (ICMPv6).
pub const QUOTE6: usize = 1232;
const IP4_DF: u16 = 0x4000;
const ICMP_PROTO: u8 = 1;
const ICMP6_PROTO: u8 = 58;
/// The TTL / hop limit of the errors.
const TTL: u8 = 64;

/// What became of a packet too big for its next hop.
pub enum Answer {
    /// Turned into an ICMP error to its sender: send it back out.
    Sent,
    /// Left to the kernel (fragments it, or finds the packet not ours to answer).
    Kernel,
    /// Broken while being turned (the kernel refused to resize it): drop it.
    Broken,
}

/// Whether a rewritten packet of IP protocol `proto` is a flow's (TCP or UDP), which only the
/// translation of a flow rewrites whole (the data plane's other rewrites are of ICMP errors and
/// of later fragments).
#[inline(always)]
fn flow_proto(proto: u8) -> bool {
    proto == PROTO_TCP || proto == PROTO_UDP
}

/// Answers an IPv4 packet (after translation) too big for `mtu`.
#[inline(always)]
pub fn answer4<C: Hook>(ctx: &C, mtu: u16) -> Answer {
    let Some(ip) = ptr_at::<C, Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Answer::Kernel;
    };
    // SAFETY (every dereference of a header pointer here): bounds checked by ptr_at.
    let (ihl, tot_len, df, later, proto, src, dst) = unsafe {
        (
            ((*ip).version_ihl & 0x0f) as usize * 4,
            u16::from_be((*ip).tot_len) as usize,
            u16::from_be((*ip).frag_off) & IP4_DF != 0,
            u16::from_be((*ip).frag_off) & IP_OFFSET != 0,
            (*ip).proto,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    // Only a flow's packet (TCP or UDP with its ports: not an ICMP error the data plane
    // translated, not a later fragment) is answered. A header claiming more than the packet
    // holds is not quoted (the kernel reports it).
    if !df
        || !flow_proto(proto)
        || later
        || tot_len < QUOTE4
        || ihl < 20
        || ctx.packet_len() < ETH_HLEN + QUOTE4
    {
        return Answer::Kernel;
    }
    let Some(ports) = ptr_at::<C, Ports>(ctx, ETH_HLEN + ihl) else {
        return Answer::Kernel;
    };
    let (sport, dport) = unsafe { ((*ports).sport, (*ports).dport) };
    let reversed = Flow {
        src: dst,
        dst: src,
        sport: dport,
        dport: sport,
        proto,
        _pad: [0; 3],
    };
    // The quote as the sender sent it, and who the error goes to, from whom.
    let (from, to) = match target::<Packet>(&reversed) {
        Some(Target::Client(vip, vport)) => {
            restore4(ctx, ip, ihl, proto, true, vip, vport);
            (vip, src)
        }
        Some(Target::Backend(addr, port)) => {
            restore4(ctx, ip, ihl, proto, false, addr, port);
            (dst, addr)
        }
        None => return Answer::Kernel,
    };
    let Some(macs) = swapped_macs(ctx) else {
        return Answer::Kernel;
    };
    if !ctx.resize(20 + 8, (ETH_HLEN + QUOTE4) as u32) {
        return Answer::Broken;
    }
    let (Some(eth), Some(ip), Some(icmp)) = (
        ptr_at::<C, EthHdr>(ctx, 0),
        ptr_at::<C, Ipv4Hdr>(ctx, ETH_HLEN),
        ptr_at::<C, IcmpHdr>(ctx, ETH_HLEN + 20),
    ) else {
        return Answer::Broken;
    };
    unsafe {
        *eth = EthHdr {
            dst: macs.0,
            src: macs.1,
            proto: crate::parse::ETH_P_IP.to_be(),
        };
        *ip = Ipv4Hdr {
            version_ihl: 0x45,
            // Precedence "internetwork control", as the kernel's own errors.
            tos: 0xc0,
            tot_len: ((20 + 8 + QUOTE4) as u16).to_be(),
            id: 0,
            frag_off: 0,
            ttl: TTL,
            proto: ICMP_PROTO,
            check: 0,
            saddr: from,
            daddr: to,
        };
        *icmp = IcmpHdr {
            kind: 3,
            code: 4,
            csum: 0,
            // Unused (16 bits), then the next hop's MTU.
            rest: (mtu as u32).to_be(),
        };
    }
    let (h, a, b) = (
        sum::<C, 20>(ctx, ETH_HLEN, 0),
        sum::<C, 512>(ctx, ETH_HLEN + 20, 0),
        sum::<C, { 8 + QUOTE4 - 512 }>(ctx, ETH_HLEN + 20 + 512, 0),
    );
    if h < 0 || a < 0 || b < 0 {
        return Answer::Broken;
    }
    unsafe {
        (*ip).check = !fold(h as u32);
        (*icmp).csum = !fold(crate::csum::add(a as u32, b as u32));
    }
    Answer::Sent
}

/// Answers an IPv6 packet (after translation) too big for `mtu`.
#[inline(always)]
pub fn answer6<C: Hook>(ctx: &C, mtu: u16) -> Answer {
    let (Some(ip), Some(ports)) = (
        ptr_at::<C, Ipv6Hdr>(ctx, ETH_HLEN),
        ptr_at::<C, Ports>(ctx, ETH_HLEN + 40),
    ) else {
        return Answer::Kernel;
    };
    let (len, proto, src, dst, sport, dport) = unsafe {
        (
            u16::from_be((*ip).payload_len) as usize + 40,
            (*ip).next_header,
            (*ip).saddr,
            (*ip).daddr,
            (*ports).sport,
            (*ports).dport,
        )
    };
    // Only a flow's packet (TCP or UDP: not an ICMPv6 error the data plane translated).
    if !flow_proto(proto) || len < QUOTE6 || ctx.packet_len() < ETH_HLEN + QUOTE6 {
        return Answer::Kernel;
    }
    let reversed = Flow6 {
        src: dst,
        dst: src,
        sport: dport,
        dport: sport,
        proto,
        _pad: [0; 3],
    };
    let (from, to) = match target::<Packet6>(&reversed) {
        Some(Target::Client(vip, vport)) => {
            restore6(ctx, ip, proto, true, vip, vport);
            (vip, src)
        }
        Some(Target::Backend(addr, port)) => {
            restore6(ctx, ip, proto, false, addr, port);
            (dst, addr)
        }
        None => return Answer::Kernel,
    };
    let Some(macs) = swapped_macs(ctx) else {
        return Answer::Kernel;
    };
    if !ctx.resize(40 + 8, (ETH_HLEN + QUOTE6) as u32) {
        return Answer::Broken;
    }
    let (Some(eth), Some(ip), Some(icmp)) = (
        ptr_at::<C, EthHdr>(ctx, 0),
        ptr_at::<C, Ipv6Hdr>(ctx, ETH_HLEN),
        ptr_at::<C, IcmpHdr>(ctx, ETH_HLEN + 40),
    ) else {
        return Answer::Broken;
    };
    const PAYLOAD: usize = 8 + QUOTE6;
    unsafe {
        *eth = EthHdr {
            dst: macs.0,
            src: macs.1,
            proto: crate::parse::ETH_P_IPV6.to_be(),
        };
        *ip = Ipv6Hdr {
            version_class_flow: 0x6000_0000u32.to_be(),
            payload_len: (PAYLOAD as u16).to_be(),
            next_header: ICMP6_PROTO,
            hop_limit: TTL,
            saddr: from,
            daddr: to,
        };
        *icmp = IcmpHdr {
            kind: 2,
            code: 0,
            csum: 0,
            rest: (mtu as u32).to_be(),
        };
    }
    // The pseudo-header: both addresses, the payload's length and the next header (32-bit BE
    // words each, summed as one since they cannot carry).
    let pseudo = ((PAYLOAD + ICMP6_PROTO as usize) as u32).to_be();
    let (addrs, a, b, c) = (
        sum::<C, 32>(ctx, ETH_HLEN + 8, pseudo),
        sum::<C, 512>(ctx, ETH_HLEN + 40, 0),
        sum::<C, 512>(ctx, ETH_HLEN + 40 + 512, 0),
        sum::<C, { PAYLOAD - 1024 }>(ctx, ETH_HLEN + 40 + 1024, 0),
    );
    if addrs < 0 || a < 0 || b < 0 || c < 0 {
        return Answer::Broken;
    }
    let add = crate::csum::add;
    let all = add(add(addrs as u32, a as u32), add(b as u32, c as u32));
    unsafe { (*icmp).csum = !fold(all) };
    Answer::Sent
}

use crate::parse::ptr_at;

/// A segmentation-offload packet (TC) whose segments would be larger than `mtu`: the kernel's
/// FIB check passes any such packet (it is cut up later), so the segments are checked here, as
/// the kernel's own forwarding does. Their IP length: the IP and TCP headers plus `gso_size`.
#[inline(always)]
pub fn segments_too_big<C: Hook>(ctx: &C, mtu: u32) -> bool {
    let gso = ctx.gso_size();
    if gso == 0 {
        return false;
    }
    let Some(eth) = ptr_at::<C, EthHdr>(ctx, 0) else {
        return false;
    };
    // SAFETY (every dereference here): bounds checked by ptr_at.
    let (l3, proto) = match u16::from_be(unsafe { (*eth).proto }) {
        crate::parse::ETH_P_IP => match ptr_at::<C, Ipv4Hdr>(ctx, ETH_HLEN) {
            Some(ip) => unsafe { (((*ip).version_ihl & 0x0f) as usize * 4, (*ip).proto) },
            None => return false,
        },
        crate::parse::ETH_P_IPV6 => match ptr_at::<C, Ipv6Hdr>(ctx, ETH_HLEN) {
            Some(ip) => (40, unsafe { (*ip).next_header }),
            None => return false,
        },
        _ => return false,
    };
    if proto != PROTO_TCP {
        // Only TCP's segments are sized by gso_size plus its header (checked here).
        return false;
    }
    // The TCP data offset.
    let Some(doff) = ptr_at::<C, u8>(ctx, ETH_HLEN + l3 + 12) else {
        return false;
    };
    let l4 = unsafe { (*doff >> 4) as u32 * 4 };
    l3 as u32 + l4 + gso > mtu
}

/// The frame's MACs, swapped: (the sender's, ours).
#[inline(always)]
fn swapped_macs<C: Hook>(ctx: &C) -> Option<([u8; 6], [u8; 6])> {
    let eth = ptr_at::<C, EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { Some(((*eth).src, (*eth).dst)) }
}

/// Puts the destination (`dst`) or source address and port back as the sender sent them, with
/// the IP and L4 checksums (plain arithmetic: the packet is only quoted from now on).
#[inline(always)]
fn restore4<C: Hook>(
    ctx: &C,
    ip: *mut Ipv4Hdr,
    ihl: usize,
    proto: u8,
    dst: bool,
    addr: u32,
    port: u16,
) {
    let Some(ports) = ptr_at::<C, Ports>(ctx, ETH_HLEN + ihl) else {
        return;
    };
    // SAFETY: bounds checked by the callers' and this ptr_at.
    let (old, old_port) = unsafe {
        if dst {
            let old = ((*ip).daddr, (*ports).dport);
            (*ip).daddr = addr;
            (*ports).dport = port;
            old
        } else {
            let old = ((*ip).saddr, (*ports).sport);
            (*ip).saddr = addr;
            (*ports).sport = port;
            old
        }
    };
    unsafe { (*ip).check = crate::csum::replace4((*ip).check, old, addr) };
    let (addrs, ports) = (
        crate::csum::diff4(old, addr),
        crate::csum::diff2(old_port, port),
    );
    restore_l4(ctx, ETH_HLEN + ihl, proto, addrs, ports);
}

/// The same for IPv6 (no IP checksum).
#[inline(always)]
fn restore6<C: Hook>(ctx: &C, ip: *mut Ipv6Hdr, proto: u8, dst: bool, addr: [u32; 4], port: u16) {
    let Some(ports) = ptr_at::<C, Ports>(ctx, ETH_HLEN + 40) else {
        return;
    };
    let (old, old_port) = unsafe {
        if dst {
            let old = ((*ip).daddr, (*ports).dport);
            (*ip).daddr = addr;
            (*ports).dport = port;
            old
        } else {
            let old = ((*ip).saddr, (*ports).sport);
            (*ip).saddr = addr;
            (*ports).sport = port;
            old
        }
    };
    let (addrs, ports) = (
        crate::csum::diff_words(&old, &addr),
        crate::csum::diff2(old_port, port),
    );
    restore_l4(ctx, ETH_HLEN + 40, proto, addrs, ports);
}

/// The quoted TCP or UDP checksum after the address change `addrs` and the port change `ports`
/// (a UDP checksum of 0, none, stays), through the hook as on the way in: in TC a partial
/// checksum (CHECKSUM_PARTIAL, the client's veth) gets the address change only, so the quote
/// holds the value the client's stack wrote. The helpers move the packet: callers take their
/// pointers again afterwards.
#[inline(always)]
fn restore_l4<C: Hook>(ctx: &C, l4: usize, proto: u8, addrs: u32, ports: u32) {
    let off = match proto {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        _ => return,
    };
    let Some(check) = ptr_at::<C, u16>(ctx, l4 + off) else {
        return;
    };
    // SAFETY: bounds checked by ptr_at.
    if proto == PROTO_UDP && unsafe { *check } == 0 {
        return;
    }
    ctx.csum_l4(check, l4 + off, proto == PROTO_UDP, addrs, ports);
}

/// The one's complement sum (unfolded, in the low 32 bits) of `N` bytes at `off`, added to
/// `seed`, or a negative value when they are not in the packet; `N` a multiple of 4 and at most
/// 512 (the helper's limit). Not an `Option`: the callers compute several sums before they check
/// them, and a `None`'s unset payload is a register the verifier refuses to spill.
#[inline(always)]
fn sum<C: Hook, const N: usize>(ctx: &C, off: usize, seed: u32) -> i64 {
    let Some(p) = ptr_at::<C, [u8; N]>(ctx, off) else {
        return -1;
    };
    // SAFETY: the helper reads N bytes the bounds check covered.
    unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p as *mut u32, N as u32, seed) }
}

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}
