//! Rebuild the BPF object when bpf-linker changes (a new LLVM means new code generation).
//!
//! Link flags of the BPF object: bpf-linker passes `--bpf-expand-memcpy-in-order` to LLVM by
//! default, which keeps every memcpy/memset/memmove of a struct as a call to a byte-at-a-time
//! loop (27 call sites in the object without the flag below, 5 on the IPv4 tracked path).
//! `--disable-expand-memcpy-in-order` lets LLVM expand them into word-sized loads and stores; the
//! verifier and the packet tests accept the result, and the per-packet cost drops.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    }
}
