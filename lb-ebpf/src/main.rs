//! The load balancer's XDP program: parse, translate, forward; one place turns the outcome into
//! a verdict and counts it.
#![no_std]
#![no_main]

mod af;
mod csum;
mod floor;
mod frag;
mod fwd;
mod icmp;
mod maps;
mod nat;
mod parse;
mod sock;
mod sock_maps;

use af::{Ip4, Ip6, Route};
use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_redirect, macros::xdp, programs::XdpContext,
};
use fwd::Forward;
use lb_common::Stat;
use maps::count;
use nat::Translated;
use parse::Parsed;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match parse::parse(&ctx) {
        Ok(Parsed::V4(p)) => verdict(&ctx, &p, nat::translate(&p)),
        Ok(Parsed::V6(p)) => verdict(&ctx, &p, nat::translate(&p)),
        Ok(Parsed::Icmp4(e)) => verdict(&ctx, &Ip4(e.ip), icmp::translate(&e)),
        Ok(Parsed::Icmp6(e)) => verdict(&ctx, &Ip6(e.ip), icmp::translate6(&e)),
        Ok(Parsed::Frag4(ip)) => verdict(&ctx, &Ip4(ip), frag::translate(ip)),
        Err(_) => {
            count(Stat::PassNotOurs);
            xdp_action::XDP_PASS
        }
    }
}

/// The one place that turns a translation's outcome into a verdict (forwarding what was
/// rewritten) and counts it.
#[inline(always)]
fn verdict<R: Route>(ctx: &XdpContext, packet: &R, translated: Translated) -> u32 {
    #[cfg(feature = "log")]
    match &translated {
        Translated::Rewritten(s) => {
            aya_log_ebpf::debug!(ctx, "lb: rewritten, outcome {}", *s as u32)
        }
        Translated::Drop(s) => aya_log_ebpf::debug!(ctx, "lb: dropped, reason {}", *s as u32),
        Translated::NotOurs => {}
    }
    match translated {
        Translated::NotOurs => {
            count(Stat::PassNotOurs);
            xdp_action::XDP_PASS
        }
        Translated::Drop(reason) => {
            count(reason);
            xdp_action::XDP_DROP
        }
        Translated::Rewritten(how) => {
            count(how);
            match fwd::forward(ctx, packet) {
                Forward::Tx => {
                    count(Stat::Tx);
                    xdp_action::XDP_TX
                }
                Forward::Redirect(ifindex) => {
                    count(Stat::Redirect);
                    // SAFETY: a plain helper call.
                    unsafe { bpf_redirect(ifindex, 0) as u32 }
                }
                Forward::Stack => {
                    count(Stat::RewrittenToStack);
                    xdp_action::XDP_PASS
                }
            }
        }
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
