//! Forwarding of a rewritten packet with the kernel's FIB.
use crate::{
    af::Route,
    hook::Hook,
    parse::{EthHdr, ptr_at},
};
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup,
    },
    helpers::generated::bpf_fib_lookup as fib_lookup,
};
use core::mem::{size_of, zeroed};

pub enum Forward {
    /// Out of the interface it came in on.
    Tx,
    /// Out of another interface.
    Redirect(u32),
    /// Out of this interface, whose neighbour the kernel resolves (TC only: `bpf_redirect_neigh`).
    Neigh(u32),
    /// Larger than the next hop's MTU (given): `pmtu` answers or leaves it to the kernel.
    TooBig(u32),
    /// The FIB had no complete answer (no neighbour yet, TTL expiring, no route): the kernel's own
    /// forwarding takes the rewritten packet, and resolves or reports as it always does.
    Stack,
}

#[inline(always)]
pub fn forward<C: Hook, R: Route>(ctx: &C, p: &R) -> Forward {
    if p.hop_limit() <= 1 {
        return Forward::Stack;
    }
    // SAFETY: a zeroed plain C struct, filled and handed to the helper.
    let mut fib: bpf_fib_lookup = unsafe { zeroed() };
    p.fib_params::<C>(&mut fib);
    fib.ifindex = ctx.ingress();
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
        return Forward::Stack;
    }
    // SAFETY: on success without a length (TC) the helper wrote the device's MTU there.
    let mtu = unsafe { fib.__bindgen_anon_1.mtu_result } as u32;
    if C::NEIGH && crate::pmtu::segments_too_big(ctx, mtu) {
        return Forward::TooBig(mtu);
    }
    p.decrement_hop_limit();
    let Some(eth) = ptr_at::<C, EthHdr>(ctx, 0) else {
        return Forward::Stack;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst = fib.dmac;
        (*eth).src = fib.smac;
    }
    if fib.ifindex == ctx.ingress() {
        Forward::Tx
    } else {
        Forward::Redirect(fib.ifindex)
    }
}
