//! The floor for benchmarks: an XDP program that does nothing but pass the packet. `cargo xtask
//! bench` runs it on the same packets as `lb_xdp` to measure what BPF_PROG_TEST_RUN itself costs.
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn lb_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
