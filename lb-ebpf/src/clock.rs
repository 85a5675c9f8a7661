//! The programs' clock, for the two age bounds of the fast path (a flow's check note and a cached
//! next hop): the kernel's tick count (`bpf_jiffies64`, which the verifier turns into one load
//! of `jiffies`) times the length of a tick in ns, which the loader sets from the resolution of
//! `CLOCK_MONOTONIC_COARSE` (the tick's length). It advances as `bpf_ktime_get_coarse_ns` does,
//! once a tick, without that helper's two nested calls.
use aya_ebpf::helpers::generated::bpf_jiffies64;

/// The length of a tick in ns (`lb_common::GLOBAL_NS_PER_TICK`). Its default, 10 ms, is the
/// longest tick of the kernel's usual choices (HZ = 100): with a shorter real tick, time runs
/// faster and the bounds are kept shorter than they say, never longer.
#[unsafe(no_mangle)]
static LB_NS_PER_TICK: u64 = 10_000_000;

/// The time in ns, in steps of a tick, from an arbitrary origin.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a read of a constant the loader sets before the program is loaded (volatile: the
    // compiler must not fold the default in).
    let tick = unsafe { core::ptr::read_volatile(&LB_NS_PER_TICK) };
    // SAFETY: a helper without arguments.
    unsafe { bpf_jiffies64() }.wrapping_mul(tick)
}
