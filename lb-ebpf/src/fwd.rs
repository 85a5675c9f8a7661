//! Forwarding of a rewritten packet with the kernel's FIB.
use crate::{
    af::Route,
    parse::{EthHdr, ptr_at},
};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::generated::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use core::mem::{size_of, zeroed};

pub enum Forward {
    /// Out of the interface it came in on.
    Tx,
    /// Out of another interface.
    Redirect(u32),
    /// The FIB had no complete answer (no neighbour yet, TTL expiring, no route): the kernel's own
    /// forwarding takes the rewritten packet, and resolves or reports as it always does.
    Stack,
}

#[inline(always)]
pub fn forward<R: Route>(ctx: &XdpContext, p: &R) -> Forward {
    if p.hop_limit() <= 1 {
        return Forward::Stack;
    }
    // SAFETY: a zeroed plain C struct, filled and handed to the helper.
    let mut fib: bpf_fib_lookup = unsafe { zeroed() };
    p.fib_params(&mut fib);
    fib.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: the helper reads and writes `fib`, of the size given.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Forward::Stack;
    }
    p.decrement_hop_limit();
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Forward::Stack;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst = fib.dmac;
        (*eth).src = fib.smac;
    }
    if fib.ifindex == ctx.ingress_ifindex() as u32 {
        Forward::Tx
    } else {
        Forward::Redirect(fib.ifindex)
    }
}
