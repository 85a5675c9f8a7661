//! Builds the BPF object (lb-ebpf) with the nightly toolchain and bpf-linker, so that a plain
//! stable `cargo build` produces an `lbctl` with the data plane embedded. `cargo xtask setup`
//! installs what this needs; `AYA_BUILD_SKIP=1` skips it where no BPF toolchain exists (the
//! binary then refuses to load a data plane).
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = meta
        .packages
        .iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf is not in the workspace"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("lb-ebpf has no directory"))?;
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some() {
        // An empty object: the loader says clearly that this build has no data plane.
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join("lb-ebpf"), b"")?;
    }
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_BPF_LOG");
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_BPF_LOG").is_some() {
        &["log"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: root.as_str(),
            features,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
