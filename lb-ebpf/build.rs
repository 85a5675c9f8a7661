//! Rebuild the BPF object when bpf-linker changes (a new LLVM means new code generation).
//!
//! Link flags of the BPF object: bpf-linker passes `--bpf-expand-memcpy-in-order` to LLVM by
//! default, which keeps every struct memcpy/memset/memmove as a call to a byte-at-a-time loop.
//! `--disable-expand-memcpy-in-order` lets LLVM expand them into word-sized loads and stores and
//! saved about 70 ns per packet (issue 12), but with the path-MTU stage in the program LLVM 22 then
//! emits a read of a register nothing wrote on one path (`R5 !read_ok`) and the verifier refuses
//! the program (seen by e2e_pmtu and e2e_bpf_log). So the flag is off until that is understood;
//! `LB_EBPF_EXPAND_MEMCPY=1` turns it on to try it again.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    println!("cargo:rerun-if-env-changed=LB_EBPF_EXPAND_MEMCPY");
    let bpf = std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf");
    if bpf && std::env::var("LB_EBPF_EXPAND_MEMCPY").as_deref() == Ok("1") {
        println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    }
}
