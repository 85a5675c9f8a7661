//! The floors for benchmarks: programs that do nothing but pass the packet. `cargo xtask bench`
//! runs them on the same packets as `lb_xdp` and `lb_tc` to measure what BPF_PROG_TEST_RUN itself
//! costs for each hook (TC's includes making a socket buffer of the frame).
use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn lb_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn lb_tc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}
