//! What differs between the two hooks the stages run in: XDP (a frame, before the kernel has a
//! socket buffer) and TC (`clsact` ingress, on the socket buffer). The stages (`parse`, `nat`,
//! `icmp`, `frag`, `fwd`) are written once over `Hook`; only packet access, the checksum updates,
//! the FIB lookup's length and the verdict differ.
//!
//! Checksums: a TCP or UDP checksum on a socket buffer may be partial (CHECKSUM_PARTIAL: the
//! field holds only the pseudo-header's sum and the device completes it). XDP cannot know, so it
//! updates the field as a full checksum; TC updates it through `bpf_l4_csum_replace`, which
//! knows, with the change of the addresses marked as a pseudo-header change (`BPF_F_PSEUDO_HDR`)
//! and the change of the ports not. The helpers move the packet: a stage calls them last, and
//! whatever runs after re-reads the headers (`fwd` does).
use crate::csum;
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::generated::{
        bpf_redirect, bpf_redirect_neigh, bpf_skb_adjust_room, bpf_skb_change_tail,
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};

/// What a packet's outcome asks of the hook.
pub enum Action {
    /// To the kernel as it is (untouched, or rewritten for the kernel to forward).
    Pass,
    Drop,
    /// Out of this interface, layer 2 header set.
    Out(u32),
    /// Out of this interface; the kernel resolves the neighbour and sets the layer 2 header.
    Neigh(u32),
    /// Back out of the interface it came in on, layer 2 header set, as a redirect in both hooks
    /// (for the few packets the data plane makes itself: `pmtu`'s errors). Not XDP_TX: on a
    /// veth, XDP_TX hands the frame to the peer's queue but wakes the peer only if the peer
    /// runs an XDP program itself (`veth_xdp_flush`); a peer with GRO alone takes the frame in
    /// at the next redirect into it, seconds later. A redirect wakes it at once
    /// (`ndo_xdp_xmit` with flush).
    Back,
}

pub trait Hook: EbpfContext {
    /// The hook can hand a packet to the kernel's neighbour output (`Action::Neigh`).
    const NEIGH: bool;

    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// The whole packet's length (TC: also what is not in the linear part).
    fn packet_len(&self) -> usize;
    /// The payload bytes of each segment a segmentation-offload packet becomes (0: not one).
    fn gso_size(&self) -> u32;
    fn ingress(&self) -> u32;
    /// Makes the headers readable in place (TC: pulls them into the linear part).
    fn prepare(&self);
    /// The IP length the FIB lookup checks against the route's MTU; 0 asks the kernel to check
    /// the socket buffer itself (which knows about segmentation offload).
    fn fib_len(ip_len: u16) -> u16;
    /// The IPv4 header checksum at byte `off` (`check` in place) after the header changed by
    /// `diff` (a one's complement sum of the differences, `csum::diff4`).
    fn csum_l3(&self, check: *mut u16, off: usize, diff: u32);
    /// The TCP or UDP checksum at byte `off` (`check` in place) after the pseudo-header's
    /// addresses changed by `addrs` and the header's ports by `ports`.
    fn csum_l4(&self, check: *mut u16, off: usize, udp: bool, addrs: u32, ports: u32);
    /// The hook's return code for `action`.
    fn verdict(&self, action: Action) -> i32;
    /// Cuts the packet to `len` bytes, then opens `room` bytes between the Ethernet header and
    /// the IP header (`pmtu` turns a packet into an ICMP error quoting it). The Ethernet header's
    /// bytes are undefined afterwards; false if the kernel refused (the packet is then unusable).
    /// Moves the packet: every pointer into it must be taken again.
    fn resize(&self, room: u32, len: u32) -> bool;
    /// Hands the frame to this hook's IPv6 program (a tail call: no return when it is there).
    /// Returns only when the program array's slot is empty, which it is not once the loader
    /// filled it (before any program that calls it is attached) while the array is pinned.
    fn to_v6(&self);
    /// Hands a flow's packet too big for its next hop to this hook's path-MTU program (a tail
    /// call, as `to_v6`: no return when it is there).
    fn to_pmtu(&self);
}

impl Hook for XdpContext {
    const NEIGH: bool = false;

    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.data_end() - self.data()
    }
    #[inline(always)]
    fn gso_size(&self) -> u32 {
        0
    }
    #[inline(always)]
    fn ingress(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn prepare(&self) {}
    #[inline(always)]
    fn fib_len(ip_len: u16) -> u16 {
        ip_len
    }
    #[inline(always)]
    fn csum_l3(&self, check: *mut u16, _off: usize, diff: u32) {
        // SAFETY: bounds checked by the caller's parse.
        unsafe { *check = csum::apply(*check, diff) };
    }
    #[inline(always)]
    fn csum_l4(&self, check: *mut u16, _off: usize, udp: bool, addrs: u32, ports: u32) {
        // SAFETY: bounds checked by the caller's parse.
        unsafe {
            let mut c = csum::apply(*check, csum::add(addrs, ports));
            if c == 0 && udp {
                // 0 means "no checksum" in UDP; the same sum is written as all ones.
                c = 0xffff;
            }
            *check = c;
        }
    }
    #[inline(always)]
    fn verdict(&self, action: Action) -> i32 {
        (match action {
            Action::Pass => xdp_action::XDP_PASS,
            Action::Drop => xdp_action::XDP_DROP,
            Action::Out(ifindex) if ifindex == self.ingress() => xdp_action::XDP_TX,
            // SAFETY: a plain helper call.
            Action::Out(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
            // Never asked of XDP (NEIGH is false).
            Action::Neigh(_) => xdp_action::XDP_PASS,
            // SAFETY: a plain helper call.
            Action::Back => unsafe { bpf_redirect(self.ingress(), 0) as u32 },
        }) as i32
    }
    #[inline(always)]
    fn resize(&self, room: u32, len: u32) -> bool {
        let cur = (self.end() - self.start()) as i32;
        // SAFETY: plain helper calls on this program's context.
        unsafe {
            bpf_xdp_adjust_tail(self.ctx, len as i32 - cur) == 0
                && bpf_xdp_adjust_head(self.ctx, -(room as i32)) == 0
        }
    }
    #[inline(always)]
    fn to_v6(&self) {
        // SAFETY: a tail call on this program's context into a program of its type.
        unsafe { crate::maps::V6_XDP.tail_call(self, 0) }
    }
    #[inline(always)]
    fn to_pmtu(&self) {
        // SAFETY: as in `to_v6`.
        unsafe { crate::maps::PMTU_XDP.tail_call(self, 0) }
    }
}

/// Largest header stack the stages read: Ethernet, IPv4 with options, ICMP, the quoted IPv4
/// header with options and its ports.
const HEADERS: u32 = 14 + 60 + 8 + 60 + 8;

impl Hook for TcContext {
    const NEIGH: bool = true;

    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.len() as usize
    }
    #[inline(always)]
    fn gso_size(&self) -> u32 {
        // SAFETY: a field of the context.
        unsafe { (*self.skb.skb).gso_size }
    }
    #[inline(always)]
    fn ingress(&self) -> u32 {
        // SAFETY: a field of the context.
        unsafe { (*self.skb.skb).ifindex }
    }
    #[inline(always)]
    fn prepare(&self) {
        let len = self.len();
        let want = if len < HEADERS { len } else { HEADERS };
        if ((self.end() - self.start()) as u32) < want {
            // A failure leaves the packet as it was: the stages then see less of it and pass it.
            let _ = self.skb.pull_data(want);
        }
    }
    #[inline(always)]
    fn fib_len(_ip_len: u16) -> u16 {
        0
    }
    #[inline(always)]
    fn csum_l3(&self, _check: *mut u16, off: usize, diff: u32) {
        // A failure (the offset outside the packet) cannot happen for a header parse checked.
        let _ = self.skb.l3_csum_replace(off, 0, diff as u64, 0);
    }
    #[inline(always)]
    fn csum_l4(&self, _check: *mut u16, off: usize, udp: bool, addrs: u32, ports: u32) {
        // Size 0: `to` is a difference already summed. For UDP, a field of 0 (no checksum)
        // stays 0 and a result of 0 is written as all ones.
        let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        let _ = self
            .skb
            .l4_csum_replace(off, 0, addrs as u64, BPF_F_PSEUDO_HDR as u64 | mangled);
        if ports != 0 {
            let _ = self.skb.l4_csum_replace(off, 0, ports as u64, mangled);
        }
    }
    #[inline(always)]
    fn verdict(&self, action: Action) -> i32 {
        match action {
            Action::Pass => TC_ACT_OK,
            Action::Drop => TC_ACT_SHOT,
            // SAFETY: plain helper calls; both answer TC_ACT_REDIRECT or TC_ACT_SHOT.
            Action::Out(ifindex) => unsafe { bpf_redirect(ifindex, 0) as i32 },
            Action::Neigh(ifindex) => unsafe {
                bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
            },
            Action::Back => unsafe { bpf_redirect(self.ingress(), 0) as i32 },
        }
    }
    #[inline(always)]
    fn resize(&self, room: u32, len: u32) -> bool {
        // Cutting first also ends segmentation offload (the kernel resets it for a packet whose
        // tail changed), so the room is not taken off each segment. Then the whole result is
        // made linear for direct access.
        // SAFETY: plain helper calls on this program's context.
        let resized = unsafe {
            bpf_skb_change_tail(self.skb.skb, len, 0) == 0
                && bpf_skb_adjust_room(self.skb.skb, room as i32, BPF_ADJ_ROOM_MAC, 0) == 0
        };
        resized && self.skb.pull_data(len + room).is_ok()
    }
    #[inline(always)]
    fn to_v6(&self) {
        // SAFETY: a tail call on this program's context into a program of its type.
        unsafe { crate::maps::V6_TC.tail_call(self, 0) }
    }
    #[inline(always)]
    fn to_pmtu(&self) {
        // SAFETY: as in `to_v6`.
        unsafe { crate::maps::PMTU_TC.tail_call(self, 0) }
    }
}
