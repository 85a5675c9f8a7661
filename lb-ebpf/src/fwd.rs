//! Forwarding of a rewritten packet: the next hop (outgoing interface and MAC addresses) of its
//! destination, from a cache the program fills from the kernel's FIB (`bpf_fib_lookup`), or from
//! the FIB itself when the cache has no fresh answer.
//!
//! The cache (`NEXT_HOPS`, an LRU hash not pinned: each loaded program starts with an empty one)
//! is keyed by the destination address and the ingress interface, the inputs the FIB's answer
//! depends on for this program apart from policy rules on the source (see below). An entry is used
//! for at most `lb_common::NEXT_HOP_MAX_AGE_NS` after the FIB gave it: a route or neighbour change
//! is followed within that bound. It is used only for packets no longer than the longest one the
//! FIB approved for it, so the FIB's MTU check still decides for every longer packet. The FIB's
//! refusals (no neighbour yet, no route, fragmentation needed) are never cached: such a packet goes
//! to the kernel's own forwarding as before, every time. IPv6 packets from a source the FIB never
//! forwards from (multicast, link-local, loopback) always ask the FIB.
//!
//! Both programs use the cache. XDP gives the FIB the packet's IP length, and an entry serves
//! packets up to the longest length the FIB approved for it. TC gives the FIB no length (the
//! kernel then checks the socket buffer itself and gives back the device's MTU): an entry
//! filled by TC keeps that MTU, and a TC packet takes it only when it passes the same check
//! (`fits`); a TC packet whose neighbour is not resolved yet is never cached, it goes out by
//! `bpf_redirect_neigh` as before.
//!
//! Limit: policy-routing rules that choose a route by the source address, the L4 protocol or
//! ports (`ip rule add from ...`) are applied to the packet that filled the entry; another source
//! to the same destination through the same ingress interface reuses that answer until it ages
//! out. Rules on the destination, the ingress interface (`iif`) and every route and neighbour
//! change are followed.
use crate::{
    af::Route,
    clock::now_ns,
    hook::Hook,
    maps::{NEAR_HOPS, NEXT_HOPS},
    parse::{ETH_HLEN, EthHdr, ptr_at},
};
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup,
    },
    helpers::generated::bpf_fib_lookup as fib_lookup,
};
use core::mem::{size_of, zeroed};
use lb_common::{NEAR_HOP_BITS, NEXT_HOP_MAX_AGE_NS, Stat};

/// Every variant has a payload: where variants meet, LLVM keeps the payload in one register
/// and may spill it, and the verifier refuses to store a register that a payload-less variant
/// left unset (as `nat::Translated::Pass`).
pub enum Forward {
    /// Out of the interface it came in on (given).
    Tx(u32),
    /// Out of another interface.
    Redirect(u32),
    /// Out of this interface, whose neighbour the kernel resolves (TC only: `bpf_redirect_neigh`).
    Neigh(u32),
    /// Larger than the next hop's MTU (given): `pmtu` answers or leaves it to the kernel.
    TooBig(u32),
    /// The FIB had no complete answer (no neighbour yet, TTL expiring, no route): the kernel's own
    /// forwarding takes the rewritten packet, and resolves or reports as it always does. Always
    /// `Stat::RewrittenToStack`, the counter it is counted in.
    Stack(Stat),
}

/// Key of `NEXT_HOPS`: a destination and the interface the packet came in on.
#[repr(C)]
#[derive(Clone, Copy, PartialEq)]
pub struct NextHopKey {
    /// The destination address as in the packet (BE); an IPv4 address in the first word, the
    /// others 0.
    addr: [u32; 4],
    ifindex: u32,
    /// AF_INET or AF_INET6, and 1 << 16 for the TC program's entries: the two programs' entries
    /// check different things (a length, an MTU), so each has its own.
    family: u32,
}

/// Value of `NEXT_HOPS`: the FIB's answer and when it was given.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NextHop {
    dmac: [u8; 6],
    smac: [u8; 6],
    /// The outgoing interface.
    ifindex: u32,
    /// The longest IP length (`tot_len` of the lookup) the FIB approved for this entry (XDP; TC
    /// gives no length: 0).
    max_len: u16,
    _pad: [u8; 2],
    /// The outgoing device's MTU, as the FIB gave it to TC (XDP entries: 0).
    mtu: u32,
    /// The programs' clock (`clock::now_ns`) at the lookup.
    stamp: u64,
}

#[inline(always)]
pub fn forward<C: Hook, R: Route>(ctx: &C, p: &R) -> Forward {
    if p.hop_limit() <= 1 {
        return Forward::Stack(Stat::RewrittenToStack);
    }
    let ingress = ctx.ingress();
    let (addr, family) = p.destination();
    let key = NextHopKey {
        addr,
        ifindex: ingress,
        family: family as u32 | (C::NEIGH as u32) << 16,
    };
    let len = p.fib_len::<C>();
    let cacheable = p.cacheable();
    let now = now_ns();
    // SAFETY: the value is copied out at once; the program is the only writer and replaces
    // entries whole.
    let near = near_slot(&key);
    let fresh = |h: &NextHop| now.wrapping_sub(h.stamp) < NEXT_HOP_MAX_AGE_NS;
    // This CPU's copy, else the shared entry: another CPU may have asked the FIB since this
    // CPU's copy was taken (an aged copy must not hide a younger shared entry).
    let cached = if cacheable {
        near_hop(near, &key).filter(fresh).or_else(|| {
            let h = unsafe { NEXT_HOPS.get(&key) }.copied();
            if let Some(h) = h {
                keep_near(near, &key, &h);
            }
            h
        })
    } else {
        None
    };
    let hop = match cached {
        Some(h) if len <= h.max_len && fresh(&h) && (!C::NEIGH || fits(ctx, h.mtu)) => h,
        _ => {
            // SAFETY: a zeroed plain C struct, filled and handed to the helper.
            let mut fib: bpf_fib_lookup = unsafe { zeroed() };
            p.fib_params::<C>(&mut fib);
            fib.ifindex = ingress;
            // SAFETY: the helper reads and writes `fib`, of the size given.
            let rc = unsafe {
                fib_lookup(
                    ctx.as_ptr(),
                    &mut fib,
                    size_of::<bpf_fib_lookup>() as i32,
                    0,
                )
            };
            if C::NEIGH && rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
                // The route is known, the neighbour not yet: the kernel resolves it on the way out.
                p.decrement_hop_limit();
                return Forward::Neigh(fib.ifindex);
            }
            if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
                // SAFETY: the helper wrote the MTU in the union's place of the length.
                return Forward::TooBig(unsafe { fib.__bindgen_anon_1.mtu_result } as u32);
            }
            if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
                return Forward::Stack(Stat::RewrittenToStack);
            }
            // SAFETY: on success without a length (TC) the helper wrote the device's MTU there.
            let mtu = unsafe { fib.__bindgen_anon_1.mtu_result } as u32;
            if C::NEIGH && crate::pmtu::segments_too_big(ctx, mtu) {
                return Forward::TooBig(mtu);
            }
            let h = NextHop {
                dmac: fib.dmac,
                smac: fib.smac,
                ifindex: fib.ifindex,
                max_len: len,
                _pad: [0; 2],
                mtu: if C::NEIGH { mtu } else { 0 },
                stamp: now,
            };
            if cacheable {
                // A full table only means the next packet asks the FIB again.
                let _ = NEXT_HOPS.insert(&key, &h, 0);
                keep_near(near, &key, &h);
            }
            h
        }
    };
    p.decrement_hop_limit();
    let Some(eth) = ptr_at::<C, EthHdr>(ctx, 0) else {
        return Forward::Stack(Stat::RewrittenToStack);
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst = hop.dmac;
        (*eth).src = hop.smac;
    }
    if hop.ifindex == ingress {
        Forward::Tx(ingress)
    } else {
        Forward::Redirect(hop.ifindex)
    }
}

/// Whether a TC packet may take a cached next hop whose device has `mtu`: what the FIB helper
/// checks of a socket buffer when it is given no length (the whole buffer within the MTU, the
/// link header and a VLAN tag: `is_skb_forwardable`), and for a segmentation-offload packet,
/// which the helper passes, its segments (`pmtu::segments_too_big`). Else the FIB is asked, and
/// decides as it does for every uncached packet.
#[inline(always)]
fn fits<C: Hook>(ctx: &C, mtu: u32) -> bool {
    if ctx.gso_size() != 0 {
        return !crate::pmtu::segments_too_big(ctx, mtu);
    }
    ctx.packet_len() as u32 <= mtu + ETH_HLEN as u32 + VLAN_HLEN
}

/// A VLAN tag's length, which the kernel's check allows beyond the MTU.
const VLAN_HLEN: u32 = 4;

/// A slot of `NEAR_HOPS`: a copy of a `NEXT_HOPS` entry (its FIB time included, so the age bound
/// holds) with its key, 64 bytes (a cache line).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NearHop {
    key: NextHopKey,
    hop: NextHop,
    _pad: [u32; 2],
}

const _: () = assert!(core::mem::size_of::<NearHop>() == 64);

/// The `NEAR_HOPS` slot of a destination on this CPU: among the CPU's slots, a multiplicative
/// hash of its address words, the ingress interface and the family word (which also says which
/// program). The CPU cannot change while a program runs (it runs with migration disabled).
#[inline(always)]
fn near_slot(key: &NextHopKey) -> u32 {
    let a = key.addr[0] ^ key.addr[1].rotate_left(7) ^ key.addr[2].rotate_left(13) ^ key.addr[3];
    let h =
        (a ^ key.ifindex.rotate_left(16) ^ key.family.rotate_left(24)).wrapping_mul(0x9e37_79b1);
    // SAFETY: a helper without arguments.
    let cpu = unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() };
    (cpu << NEAR_HOP_BITS) | (h >> (32 - NEAR_HOP_BITS))
}

/// The next hop this CPU copied for `key` into its slot, if the slot holds that key.
#[inline(always)]
fn near_hop(slot: u32, key: &NextHopKey) -> Option<NextHop> {
    match NEAR_HOPS.get(slot) {
        Some(n) if n.key == *key => Some(n.hop),
        _ => None,
    }
}

/// Copies a next hop into this CPU's slot for `key`, replacing whatever it held.
#[inline(always)]
fn keep_near(slot: u32, key: &NextHopKey, hop: &NextHop) {
    if let Some(n) = NEAR_HOPS.get_ptr_mut(slot) {
        // SAFETY: this CPU's copy of an array slot; XDP and TC programs do not preempt each other
        // on one CPU, so no reader sees it half written.
        unsafe {
            (*n).key = *key;
            (*n).hop = *hop;
        }
    }
}
