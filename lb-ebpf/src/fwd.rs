//! Forwarding of a rewritten packet with the kernel's FIB.
use crate::parse::{EthHdr, Ipv4Hdr, Packet, ptr_at};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::generated::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use core::mem::{size_of, zeroed};

const AF_INET: u8 = 2;

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
pub fn forward(ctx: &XdpContext, p: &Packet) -> Forward {
    let ip: *mut Ipv4Hdr = p.ip;
    // SAFETY: ip was bounds checked by parse(); eth lies before it.
    unsafe {
        if (*ip).ttl <= 1 {
            return Forward::Stack;
        }
        let mut fib: bpf_fib_lookup = zeroed();
        fib.family = AF_INET;
        fib.l4_protocol = (*ip).proto;
        fib.__bindgen_anon_1.tot_len = u16::from_be((*ip).tot_len);
        fib.__bindgen_anon_3.ipv4_src = (*ip).saddr;
        fib.__bindgen_anon_4.ipv4_dst = (*ip).daddr;
        fib.ifindex = ctx.ingress_ifindex() as u32;
        let rc = fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        );
        if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
            return Forward::Stack;
        }
        // Decrement the TTL as a router does, with the checksum fixed the kernel's way.
        let check = (*ip).check as u32 + (0x0100u16).to_be() as u32;
        (*ip).check = (check + (check >= 0xffff) as u32) as u16;
        (*ip).ttl -= 1;
        let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
            return Forward::Stack;
        };
        (*eth).dst = fib.dmac;
        (*eth).src = fib.smac;
        if fib.ifindex == ctx.ingress_ifindex() as u32 {
            Forward::Tx
        } else {
            Forward::Redirect(fib.ifindex)
        }
    }
}
