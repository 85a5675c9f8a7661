//! Builds the BPF object (lb-ebpf) with the nightly toolchain and bpf-linker, so that a plain
//! stable `cargo build` produces an `lbctl` with the data plane embedded. `cargo xtask setup`
//! installs what this needs; `AYA_BUILD_SKIP=1` skips it where no BPF toolchain exists (the
//! binary then refuses to load a data plane).
//!
//! The recipe is aya-build's (`aya_build::build_ebpf`: a nested `cargo build` of the BPF target
//! through `rustup run nightly`, its JSON messages read for the executables) with the code
//! generation flags in our hands: aya-build fixes the rustflags, and the one this needs,
//! `-Ctarget-cpu=v3`, cannot be given any other way (bpf-linker takes `--cpu` once, and rustc
//! passes it). BPF v3 (Linux 5.1 and later) has 32-bit registers and jumps: without them every
//! 32-bit value is widened by two shifts, and the programs are about 10 % longer (issue 12,
//! BENCHMARKS.md).
use anyhow::{Context as _, anyhow, bail};
use cargo_metadata::{Artifact, CompilerMessage, Message};
use std::{
    io::BufReader,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The BPF target (little endian: the hosts this runs on).
const TARGET: &str = "bpfel-unknown-none";

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
    let out = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some() {
        // An empty object: the loader says clearly that this build has no data plane.
        std::fs::write(out.join("lb-ebpf"), b"")?;
        return Ok(());
    }
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_BPF_LOG");
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_BPF_LOG").is_some() {
        &["log"]
    } else {
        &[]
    };
    // The BPF binaries are not a dependency cargo tracks: any change under lb-ebpf rebuilds.
    println!("cargo:rerun-if-changed={root}");
    build_ebpf(&out, features)
}

/// Builds lb-ebpf's executables for the BPF target and copies them into `out`.
fn build_ebpf(out: &Path, features: &[&str]) -> anyhow::Result<()> {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--package", "lb-ebpf"])
        .args(["--bins", "--release", "--message-format=json"])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .args(["--features", &features.join(",")])
        // Apart from OUT_DIR's files: cargo locks its target directory, and the outer build
        // holds the workspace's.
        .arg("--target-dir")
        .arg(out.join("lb-ebpf-target"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                &format!("--cfg=bpf_target_arch=\"{arch}\""),
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
                "-Ctarget-cpu=v3",
            ]
            .join("\x1f"),
        )
        // The outer build's compiler is the stable one: the nested build takes nightly's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| {
        format!("running {cmd:?} (`cargo xtask setup` installs rustup's nightly)")
    })?;
    let stdout = child.stdout.take().context("the nested build's output")?;
    let mut executables = Vec::new();
    for message in Message::parse_stream(BufReader::new(stdout)) {
        match message.context("the nested build's JSON messages")? {
            Message::CompilerArtifact(Artifact {
                executable: Some(exe),
                target,
                ..
            }) => executables.push((target.name, exe.into_std_path_buf())),
            Message::CompilerMessage(CompilerMessage { message, .. }) => {
                for line in message.rendered.unwrap_or_default().lines() {
                    println!("cargo:warning={line}");
                }
            }
            _ => {}
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    if executables.is_empty() {
        bail!("{cmd:?} built no executable");
    }
    for (name, exe) in executables {
        std::fs::copy(&exe, out.join(&name))
            .with_context(|| format!("copying {} into {}", exe.display(), out.display()))?;
    }
    Ok(())
}
