//! Empty on purpose: this library target exists so that `lbctl` can name `lb-ebpf` as a
//! build-dependency, which makes cargo rebuild the BPF object when this crate changes.
#![no_std]
