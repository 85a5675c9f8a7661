//! ICMP errors about translated flows, made to fit the translation so that path-MTU discovery,
//! unreachables and time-exceeded work through a VIP.
//!
//! An error quotes the packet it is about. Reversed, that packet's 5-tuple is either a reply key
//! (the quoted packet went from a client to a backend: the error travels to the client, which must
//! see its VIP in the quote) or a flow key (the quoted packet was a reply from a VIP to a client:
//! the error travels to the flow's backend, which must see itself in the quote). The quoted L4
//! checksum is left as it is: receivers do not check it, and the ICMP checksum stays right.
use crate::{
    af::Family,
    csum,
    hook::Hook,
    maps,
    nat::{ReplyOf, Translated},
    parse::{IP_CHECK_OFF, Icmp6Error, IcmpError, Packet, Packet6},
};
use lb_common::{Flow, Flow6, Stat};

#[inline(always)]
pub fn translate<C: Hook>(ctx: &C, e: &IcmpError) -> Translated {
    // SAFETY: every pointer of an IcmpError was bounds checked by parse().
    let (src, dst, sport, dport) = unsafe {
        (
            (*e.inner).saddr,
            (*e.inner).daddr,
            (*e.ports).sport,
            (*e.ports).dport,
        )
    };
    let reversed = Flow {
        src: dst,
        dst: src,
        sport: dport,
        dport: sport,
        proto: e.proto,
        _pad: [0; 3],
    };
    match target::<Packet>(&reversed) {
        Some(Target::Client(vip, vport)) => {
            // About a packet to a backend: the client must see its VIP.
            quote_dst(e, vip, vport);
            // When the backend itself reports, it speaks as the VIP.
            set_outer(ctx, e, false, dst, vip);
            Translated::Rewritten(Stat::IcmpToClient)
        }
        Some(Target::Backend(addr, port)) => {
            // About a reply from the VIP: the backend must see itself.
            quote_src(e, addr, port);
            set_outer(ctx, e, true, src, addr);
            Translated::Rewritten(Stat::IcmpToBackend)
        }
        None => Translated::Pass(Stat::PassNotOurs),
    }
}

/// Where an error quoting a packet goes, by the quoted packet's 5-tuple reversed.
pub enum Target<A> {
    /// The quoted packet went to a backend: the error goes to the client, quoting the VIP.
    Client(A, u16),
    /// The quoted packet was a reply from a VIP: the error goes to this backend.
    Backend(A, u16),
}

#[inline(always)]
pub fn target<P: Family>(reversed: &P::Flow) -> Option<Target<P::Addr>> {
    match crate::nat::reply_of::<P>(reversed, false) {
        Some(ReplyOf::Reverse(vip, vport, _) | ReplyOf::Lean(vip, vport, _)) => {
            return Some(Target::Client(vip, vport));
        }
        None => {}
    }
    let entry = P::tracked(reversed)?;
    if !maps::is_member(entry.service(), entry.backend()) {
        return None;
    }
    let (addr, port) = P::backend(entry.backend())?;
    Some(Target::Backend(addr, port))
}

// SAFETY (for every dereference below): the pointers of an IcmpError were bounds checked by
// parse().

/// Rewrites the quoted destination (address and port).
#[inline(always)]
fn quote_dst(e: &IcmpError, addr: u32, port: u16) {
    unsafe {
        let (old, old_port) = ((*e.inner).daddr, (*e.ports).dport);
        (*e.inner).daddr = addr;
        (*e.ports).dport = port;
        quoted_changed(e, old, addr, old_port, port);
    }
}

/// Rewrites the quoted source (address and port).
#[inline(always)]
fn quote_src(e: &IcmpError, addr: u32, port: u16) {
    unsafe {
        let (old, old_port) = ((*e.inner).saddr, (*e.ports).sport);
        (*e.inner).saddr = addr;
        (*e.ports).sport = port;
        quoted_changed(e, old, addr, old_port, port);
    }
}

/// Fixes the quoted IP header's checksum and the ICMP checksum (which covers the whole quote)
/// after an address and a port of the quote changed.
#[inline(always)]
fn quoted_changed(e: &IcmpError, old: u32, new: u32, old_port: u16, port: u16) {
    unsafe {
        let old_check = (*e.inner).check;
        let check = csum::replace4(old_check, old, new);
        (*e.inner).check = check;
        let mut c = csum::replace4((*e.icmp).csum, old, new);
        c = csum::replace2(c, old_check, check);
        (*e.icmp).csum = csum::replace2(c, old_port, port);
    }
}

/// Replaces the outer destination (`dst`) or source address when it is `old` (last: the outer
/// header's checksum goes through the hook).
#[inline(always)]
fn set_outer<C: Hook>(ctx: &C, e: &IcmpError, dst: bool, old: u32, new: u32) {
    let ip = e.ip;
    unsafe {
        let field = if dst {
            &mut (*ip).daddr
        } else {
            &mut (*ip).saddr
        };
        if *field == old {
            *field = new;
            ctx.csum_l3(&raw mut (*ip).check, IP_CHECK_OFF, csum::diff4(old, new));
        }
    }
}

/// The same for ICMPv6, whose checksum also covers the outer addresses (pseudo-header) and
/// whose quoted IPv6 header has no checksum.
#[inline(always)]
pub fn translate6(e: &Icmp6Error) -> Translated {
    let (src, dst, sport, dport) = unsafe {
        (
            (*e.inner).saddr,
            (*e.inner).daddr,
            (*e.ports).sport,
            (*e.ports).dport,
        )
    };
    let reversed = Flow6 {
        src: dst,
        dst: src,
        sport: dport,
        dport: sport,
        proto: e.proto,
        _pad: [0; 3],
    };
    match target::<Packet6>(&reversed) {
        Some(Target::Client(vip, vport)) => {
            unsafe {
                (*e.inner).daddr = vip;
                (*e.ports).dport = vport;
            }
            fix6(e, dst, vip, dport, vport);
            set_outer6(e, false, dst, vip);
            Translated::Rewritten(Stat::IcmpToClient)
        }
        Some(Target::Backend(addr, port)) => {
            unsafe {
                (*e.inner).saddr = addr;
                (*e.ports).sport = port;
            }
            fix6(e, src, addr, sport, port);
            set_outer6(e, true, src, addr);
            Translated::Rewritten(Stat::IcmpToBackend)
        }
        None => Translated::Pass(Stat::PassNotOurs),
    }
}

/// The ICMPv6 checksum after a quoted address and port changed.
#[inline(always)]
fn fix6(e: &Icmp6Error, old: [u32; 4], new: [u32; 4], old_port: u16, port: u16) {
    unsafe {
        let mut c = (*e.icmp).csum;
        for i in 0..4 {
            c = csum::replace4(c, old[i], new[i]);
        }
        (*e.icmp).csum = csum::replace2(c, old_port, port);
    }
}

/// Replaces the outer destination (`dst`) or source address when it is `old`; the ICMPv6
/// checksum covers it through the pseudo-header.
#[inline(always)]
fn set_outer6(e: &Icmp6Error, dst: bool, old: [u32; 4], new: [u32; 4]) {
    unsafe {
        let field = if dst {
            &mut (*e.ip).daddr
        } else {
            &mut (*e.ip).saddr
        };
        if *field == old {
            *field = new;
            let mut c = (*e.icmp).csum;
            for i in 0..4 {
                c = csum::replace4(c, old[i], new[i]);
            }
            (*e.icmp).csum = c;
        }
    }
}
