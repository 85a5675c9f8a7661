//! The load balancer's programs: `lb_xdp` (XDP) and `lb_tc` (TC `clsact` ingress) run the same
//! stages, written once over `hook::Hook`: parse, translate, forward. One place turns the
//! outcome into an action and counts it; each hook maps the action to its verdict. Each hands an
//! IPv6 frame to its IPv6 half (`lb_xdp6`, `lb_tc6`) with a tail call: the kernel verifies two
//! smaller programs, side by side, faster than one holding both families. A flow's packet too big
//! for its next hop goes on the same way to the hook's path-MTU program (`lb_xdp_pmtu`,
//! `lb_tc_pmtu`), which turns it into an ICMP error: that rare work is verified once, from one
//! state, instead of after every way a half can reach its outcome.
#![no_std]
#![no_main]

mod af;
mod clock;
mod csum;
mod floor;
mod flows;
mod frag;
mod fwd;
mod hook;
mod icmp;
mod maps;
mod nat;
mod parse;
mod pmtu;
mod sock;
mod sock_maps;

use af::{Ip4, Ip6};
use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    programs::{TcContext, XdpContext},
};
use fwd::Forward;
use hook::{Action, Hook};
use lb_common::Stat;
use maps::count;
use nat::Translated;
use parse::{ETH_HLEN, Ipv4Hdr, Ipv6Hdr, Parsed, Parsed6, ptr_at};

// The two entry points are written out as aya's `#[xdp]` and `#[classifier]` would write them
// (the symbol names the program, the section its type), but with the stages in their own body:
// the macros wrap the body in an inner function, which LLVM keeps as a BPF-to-BPF call because
// it is too large to inline, so every packet paid a call and a return more.

#[unsafe(no_mangle)]
#[unsafe(link_section = "xdp")]
pub fn lb_xdp(ctx: *mut xdp_md) -> u32 {
    run(&XdpContext::new(ctx)) as u32
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier")]
pub fn lb_tc(ctx: *mut __sk_buff) -> i32 {
    run(&TcContext::new(ctx))
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "xdp")]
pub fn lb_xdp6(ctx: *mut xdp_md) -> u32 {
    run6(&XdpContext::new(ctx)) as u32
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier")]
pub fn lb_tc6(ctx: *mut __sk_buff) -> i32 {
    run6(&TcContext::new(ctx))
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "xdp")]
pub fn lb_xdp_pmtu(ctx: *mut xdp_md) -> u32 {
    run_pmtu(&XdpContext::new(ctx)) as u32
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier")]
pub fn lb_tc_pmtu(ctx: *mut __sk_buff) -> i32 {
    run_pmtu(&TcContext::new(ctx))
}

#[inline(always)]
fn run<C: Hook>(ctx: &C) -> i32 {
    ctx.prepare();
    let translated = match parse::parse(ctx) {
        Ok(Parsed::V4(p)) => nat::translate(ctx, &p),
        Ok(Parsed::Icmp4(e)) => icmp::translate(ctx, &e),
        Ok(Parsed::Frag4(ip)) => frag::translate(ctx, ip),
        Ok(Parsed::Ipv6) => {
            ctx.to_v6();
            // Only without the IPv6 program (see `Hook::to_v6`): the frame passes untouched.
            Translated::Pass(Stat::PassNotOurs)
        }
        Err(_) => Translated::Pass(Stat::PassNotOurs),
    };
    let action = outcome(ctx, false, translated);
    ctx.verdict(action)
}

/// `run` for an IPv6 frame, in the IPv6 programs.
#[inline(always)]
fn run6<C: Hook>(ctx: &C) -> i32 {
    // Done already by the program that tail-called this one, and then only a length compared
    // (XDP: nothing); kept so that this program is right on its own as well.
    ctx.prepare();
    let translated = match parse::parse6(ctx) {
        Ok(Parsed6::V6(p)) => nat::translate(ctx, &p),
        Ok(Parsed6::Icmp6(e)) => icmp::translate6(&e),
        Err(_) => Translated::Pass(Stat::PassNotOurs),
    };
    let action = outcome(ctx, true, translated);
    ctx.verdict(action)
}

/// A rewritten packet of a flow that `outcome` found too big for its next hop, handed over by
/// tail call (`too_big`). Nothing comes along a tail call but the packet, so its next hop is
/// asked again for the MTU (the same answer, bar a route changed in between, which `way_out`
/// then follows); the packet's own IP version tells its family.
#[inline(always)]
fn run_pmtu<C: Hook>(ctx: &C) -> i32 {
    ctx.prepare();
    // SAFETY: bounds checked by ptr_at.
    let v6 = match ptr_at::<C, Ipv4Hdr>(ctx, ETH_HLEN) {
        Some(ip) => (unsafe { (*ip).version_ihl }) >> 4 == 6,
        None => false,
    };
    let action = way_out(ctx, v6, |mtu| answer(ctx, v6, mtu as u16));
    ctx.verdict(action)
}

/// The one place that turns a translation's outcome into an action (forwarding what was
/// rewritten) and counts it.
#[inline(always)]
fn outcome<C: Hook>(ctx: &C, v6: bool, translated: Translated) -> Action {
    #[cfg(feature = "log")]
    match &translated {
        Translated::Rewritten(s) => {
            aya_log_ebpf::debug!(ctx, "lb: rewritten, outcome {}", *s as u32)
        }
        Translated::Drop(s) => aya_log_ebpf::debug!(ctx, "lb: dropped, reason {}", *s as u32),
        Translated::Pass(_) => {}
    }
    match translated {
        Translated::Pass(stat) => {
            count(stat);
            Action::Pass
        }
        Translated::Drop(reason) => {
            count(reason);
            Action::Drop
        }
        Translated::Rewritten(how) => {
            count(how);
            way_out(ctx, v6, |_| too_big(ctx))
        }
    }
}

/// Where a rewritten packet goes: out to its next hop, to the kernel, or (too big for the hop)
/// what `big` makes of it, given the hop's MTU.
#[inline(always)]
fn way_out<C: Hook>(ctx: &C, v6: bool, big: impl FnOnce(u32) -> Action) -> Action {
    // The headers are read again: in TC the checksum helpers moved the packet.
    let forward = if v6 {
        match ptr_at::<C, Ipv6Hdr>(ctx, ETH_HLEN) {
            Some(ip) => fwd::forward(ctx, &Ip6(ip)),
            None => Forward::Stack(Stat::RewrittenToStack),
        }
    } else {
        match ptr_at::<C, Ipv4Hdr>(ctx, ETH_HLEN) {
            Some(ip) => fwd::forward(ctx, &Ip4(ip)),
            None => Forward::Stack(Stat::RewrittenToStack),
        }
    };
    match forward {
        Forward::Tx(ifindex) => {
            count(Stat::Tx);
            Action::Out(ifindex)
        }
        Forward::Redirect(ifindex) => {
            count(Stat::Redirect);
            Action::Out(ifindex)
        }
        Forward::Neigh(ifindex) => {
            count(Stat::Redirect);
            Action::Neigh(ifindex)
        }
        Forward::Stack(stat) => {
            count(stat);
            Action::Pass
        }
        Forward::TooBig(mtu) => big(mtu),
    }
}

/// A rewritten packet too big for its next hop goes to the hook's path-MTU program (`run_pmtu`,
/// a tail call that does not return), which tells a flow's packet from the rest by the packet
/// itself: nothing of the translation stays live here, so the verifier's states that differ only
/// in how the packet was translated meet again before the way out. When that program's slot is
/// empty (no load filled it, which no attached program meets), the packet goes to the kernel,
/// which fragments or reports it.
#[inline(always)]
fn too_big<C: Hook>(ctx: &C) -> Action {
    ctx.to_pmtu();
    count(Stat::RewrittenToStack);
    Action::Pass
}

/// What became of a rewritten packet too big for `mtu` (`pmtu`): an ICMP error to its sender,
/// sent back out, or the packet to the kernel, which fragments or reports it (not a flow's
/// packet, IPv4 without DF, or a packet shorter than the error's quote).
#[inline(always)]
fn answer<C: Hook>(ctx: &C, v6: bool, mtu: u16) -> Action {
    let answer = if v6 {
        pmtu::answer6(ctx, mtu)
    } else {
        pmtu::answer4(ctx, mtu)
    };
    match answer {
        pmtu::Answer::Sent => {
            count(Stat::IcmpTooBig);
            Action::Back
        }
        pmtu::Answer::Kernel => {
            count(Stat::RewrittenToStack);
            Action::Pass
        }
        // Only when the kernel refused to resize it: its headers are no longer usable.
        pmtu::Answer::Broken => Action::Drop,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
