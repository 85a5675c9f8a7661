//! Rebuild the BPF object when bpf-linker changes (a new LLVM means new code generation).
//!
//! Link flags of the BPF object: bpf-linker passes `--bpf-expand-memcpy-in-order` to LLVM by
//! default, which keeps every memcpy/memset/memmove of a struct as a call to a byte-at-a-time
//! loop (27 call sites in the object without the flag below, 5 on the IPv4 tracked path).
//! `--disable-expand-memcpy-in-order` lets LLVM expand them into word-sized loads and stores; the
//! verifier and the packet tests accept the result, and the per-packet cost drops.
//!
//! Not in the debug build with aya-log (feature `log`, lbctl's `bpf-log`): with the flag, the
//! verifier refuses that build of `lb_xdp` (`R5 !read_ok`: a register read on a path of the ICMP
//! stage where nothing wrote it; seen by e2e_bpf_log and e2e_ops), without it the same source
//! loads. That build exists to watch outcomes, not to be fast, so it keeps bpf-linker's default.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    let bpf = std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf");
    if bpf && std::env::var_os("CARGO_FEATURE_LOG").is_none() {
        println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    }
}
