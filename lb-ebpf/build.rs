//! Rebuild the BPF object when bpf-linker changes (a new LLVM means new code generation).
//!
//! Link flags of the BPF object: bpf-linker passes `--bpf-expand-memcpy-in-order` to LLVM by
//! default, which keeps every struct memcpy/memset/memmove as a call to a byte-at-a-time loop.
//! `--disable-expand-memcpy-in-order` lets LLVM expand them into word-sized loads and stores
//! (no call to `memcpy`/`memset`/`memmove` is left in the programs) and saves about 70 ns per
//! IPv4 packet and 120 per IPv6 one (issue 12, BENCHMARKS.md). `LB_EBPF_EXPAND_MEMCPY=0` builds
//! without it, to compare or to rule it out when the verifier refuses a change.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    println!("cargo:rerun-if-env-changed=LB_EBPF_EXPAND_MEMCPY");
    let bpf = std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf");
    if bpf && std::env::var("LB_EBPF_EXPAND_MEMCPY").as_deref() != Ok("0") {
        println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    }
}
