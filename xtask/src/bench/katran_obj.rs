//! Katran's BPF object for the side-by-side section (`katran.rs`): fetched and built by the bench
//! in a scratch directory outside the sources (target/katran/COMMIT), never committed.
//!
//! Where the source comes from, first match wins: `LB_BENCH_KATRAN_OBJECT` (a ready
//! `balancer.bpf.o`), the object already built for the pinned commit, `LB_BENCH_KATRAN_SRC` (a
//! Katran source tree, or a git directory holding the pinned commit), a `git clone` of Katran.
//! The build follows Katran's own recipe (`build_bpf_modules_opensource.sh` and
//! `katran/lib/Makefile-bpf`): its headers copied into `include/`, `clang -O2 -emit-llvm` with the
//! Makefile's defines and warnings, then `llc -march=bpf`, with clang-19 (installed with apt-get
//! when missing). Only the BPF object is built, not the C++ library.
use super::sys;
use anyhow::{Context as _, Result, bail, ensure};
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The Katran commit the bench builds (2026-08-22).
pub const COMMIT: &str = "19f08fec82fb7b5fb14d935a80057bdc0897c8de";
const URL: &str = "https://github.com/facebookincubator/katran";
/// A Katran source tree (with `katran/lib/bpf`) or a git directory holding `COMMIT`.
pub const SRC_ENV: &str = "LB_BENCH_KATRAN_SRC";
/// A ready Katran `balancer.bpf.o`, used as it is.
pub const OBJECT_ENV: &str = "LB_BENCH_KATRAN_OBJECT";
const CLANG: &str = "clang-19";
const LLC: &str = "llc-19";
/// The parts of the Katran tree the BPF build reads.
const PARTS: [&str; 2] = ["katran/lib/bpf", "katran/lib/linux_includes"];

/// A Katran object and where it came from.
#[derive(Clone, Debug)]
pub struct Object {
    pub path: PathBuf,
    pub origin: String,
}

/// The Katran object, building it when `build` is set and it is not there yet; `Err` says why
/// there is none (the section is then skipped, loudly).
pub fn find(ws: &Path, build: bool) -> Result<Object, String> {
    if let Some(p) = std::env::var_os(OBJECT_ENV) {
        let path = PathBuf::from(p);
        return if path.is_file() {
            Ok(Object {
                origin: format!("{OBJECT_ENV}={}", path.display()),
                path,
            })
        } else {
            Err(format!(
                "{OBJECT_ENV} names {}, which is no file",
                path.display()
            ))
        };
    }
    let dir = ws.join("target/katran").join(COMMIT);
    let path = dir.join("balancer.bpf.o");
    let origin = format!(
        "Katran {COMMIT}, built in {}",
        dir.strip_prefix(ws).unwrap_or(&dir).display()
    );
    if path.is_file() {
        return Ok(Object { path, origin });
    }
    if !build {
        return Err(format!(
            "no Katran object at {} (a full `cargo xtask bench` builds it; --quick only uses a \
             cached one)",
            path.display()
        ));
    }
    match build_in(&dir, &path) {
        Ok(()) => Ok(Object { path, origin }),
        Err(e) => Err(format!("building Katran's object failed: {e:#}")),
    }
}

fn build_in(dir: &Path, object: &Path) -> Result<()> {
    let src = dir.join("src");
    if !src.join(PARTS[0]).is_dir() {
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src)?;
        fetch_source(dir, &src)?;
    }
    ensure_clang()?;
    // The layout `build_bpf_modules_opensource.sh` makes: the tree, and its Linux headers
    // copied into include/.
    let build = dir.join("build");
    let _ = std::fs::remove_dir_all(&build);
    std::fs::create_dir_all(build.join("include"))?;
    std::fs::create_dir_all(build.join("bpf"))?;
    sys::run(&[
        "cp",
        "-r",
        &src.join("katran").to_string_lossy(),
        &build.to_string_lossy(),
    ])?;
    for e in std::fs::read_dir(src.join(PARTS[1]))? {
        let e = e?;
        std::fs::copy(e.path(), build.join("include").join(e.file_name()))?;
    }
    // Makefile-bpf: $(CLANG) $(INCLUDEFLAGS) $(EXTRA_CFLAGS) $(DEBUGBPF) -D__KERNEL__ ... -O2
    // -emit-llvm -c -g $< -o - | $(LLC) -march=bpf -filetype=obj -o $@ (no extra defines: the
    // default open-source build, IPIP encapsulation).
    let ir = Command::new(CLANG)
        .current_dir(&build)
        .args([
            "-Iusr/include",
            "-Iinclude",
            "-I.",
            "-DDEBUG",
            "-D__KERNEL__",
            "-Wno-unused-value",
            "-Wno-pointer-sign",
            "-Wno-compare-distinct-pointer-types",
            "-O2",
            "-emit-llvm",
            "-c",
            "-g",
            "katran/lib/bpf/balancer.bpf.c",
            "-o",
            "-",
        ])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {CLANG}"))?;
    ensure!(ir.status.success(), "{CLANG} failed ({})", ir.status);
    let out = build.join("bpf/balancer.bpf.o");
    sys::run_with_bytes(
        &[
            LLC,
            "-march=bpf",
            "-filetype=obj",
            "-o",
            &out.to_string_lossy(),
        ],
        &ir.stdout,
    )?;
    std::fs::rename(&out, object)?;
    eprintln!("bench: katran: built {}", object.display());
    Ok(())
}

/// Puts the pinned commit's BPF sources into `src`.
fn fetch_source(dir: &Path, src: &Path) -> Result<()> {
    let from = match std::env::var_os(SRC_ENV) {
        Some(p) => PathBuf::from(p),
        None => {
            let git = dir.join("git");
            if !git.join("HEAD").exists() {
                let _ = std::fs::remove_dir_all(&git);
                eprintln!("bench: katran: cloning {URL}");
                sys::run(&[
                    "timeout",
                    "300",
                    "git",
                    "clone",
                    "--quiet",
                    "--bare",
                    "--filter=blob:none",
                    URL,
                    &git.to_string_lossy(),
                ])
                .with_context(|| format!("cloning {URL} (set {SRC_ENV} to a local copy)"))?;
            }
            git
        }
    };
    if from.join(PARTS[0]).is_dir() {
        for part in PARTS {
            let to = src.join(part);
            std::fs::create_dir_all(to.parent().context("a part has a parent")?)?;
            sys::run(&[
                "cp",
                "-r",
                &from.join(part).to_string_lossy(),
                &to.to_string_lossy(),
            ])?;
        }
        eprintln!(
            "bench: katran: WARNING: {} is a source tree; its commit is not checked against {COMMIT}",
            from.display()
        );
        return Ok(());
    }
    // A git directory: the pinned commit's files.
    let tar = Command::new("git")
        .arg("--git-dir")
        .arg(&from)
        .args(["archive", "--format=tar", COMMIT])
        .args(PARTS)
        .stderr(Stdio::piped())
        .output()
        .context("running git archive")?;
    if !tar.status.success() {
        bail!(
            "{} has no Katran commit {COMMIT}: {}",
            from.display(),
            String::from_utf8_lossy(&tar.stderr).trim()
        );
    }
    sys::run_with_bytes(&["tar", "-x", "-C", &src.to_string_lossy()], &tar.stdout)?;
    Ok(())
}

/// Installs clang-19 and llc-19 with apt-get when they are missing.
fn ensure_clang() -> Result<()> {
    let have = |tool: &str| sys::run(&["which", tool]).is_ok();
    if have(CLANG) && have(LLC) {
        return Ok(());
    }
    eprintln!("bench: katran: installing clang-19 with apt-get");
    let install = ["apt-get", "install", "-y", "-q", "clang-19", "llvm-19"];
    if sys::run(&install).is_err() {
        sys::run(&["apt-get", "update", "-q"])?;
        sys::run(&install)?;
    }
    ensure!(have(CLANG) && have(LLC), "clang-19 installed but not found");
    Ok(())
}
