//! Project tasks: `cargo xtask setup | build | test | demo | bench`.
//!
//! Every task first runs `setup`, which installs what is missing and is a no-op in seconds when
//! nothing is: the nightly toolchain's rust-src (the BPF target builds `core` from source),
//! bpf-linker built against the nightly's own libLLVM, and the Debian packages the tests use.
use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

#[cfg(feature = "lab")]
mod bench;
#[cfg(feature = "lab")]
mod demo;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the BPF toolchain and the test tools where missing.
    Setup,
    /// Build everything (the BPF object is built by lbctl's build script).
    Build,
    /// Build, then run every test: unit tests and the privileged end-to-end tests (as root).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build, then show the load balancer at work in a sandbox of network namespaces.
    Demo,
    /// Measure this project next to baselines (floor program, iptables, nftables) in one run and
    /// write BENCHMARKS.md (as root).
    Bench {
        /// A short smoke run at small sizes; writes target/bench/BENCHMARKS.quick.md instead.
        #[arg(long)]
        quick: bool,
        /// Also write every result as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Run only this section (xdp, control, e2e, dns, local, hooks, katran or live); writes to
        /// target/bench/ only.
        #[arg(long, value_name = "SECTION")]
        only: Option<String>,
    },
}

const BPF_LINKER_VERSION: &str = "0.13.0";
const NIGHTLY: &str = "nightly";
/// Debian packages, by a command each provides. The last three are the bench's baselines
/// (iptables with both back ends, nftables) and its throughput tool.
const PACKAGES: [(&str, &str); 8] = [
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("ethtool", "ethtool"),
    ("nsenter", "util-linux"),
    ("sysctl", "procps"),
    ("iptables-legacy", "iptables"),
    ("nft", "nftables"),
    ("iperf3", "iperf3"),
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let start = Instant::now();
    #[cfg(feature = "lab")]
    if let Task::Bench { quick, json, only } = &cli.task
        && bench::is_release_child()
    {
        // Started by the task below, after setup and build.
        let opts = bench::Options {
            quick: *quick,
            json: json.clone(),
            only: only.clone(),
        };
        return bench::run(&workspace(), &opts);
    }
    if std::env::var_os(SETUP_DONE).is_none() {
        setup()?;
    }
    match cli.task {
        Task::Setup => {}
        Task::Build => build()?,
        Task::Test { args } => {
            build()?;
            let mut tally = test(&args)?;
            // The bench's smoke run, so that CI keeps it working; counted as one more test.
            if tally.failed == 0 {
                if !is_root() {
                    eprintln!("xtask: SKIPPED the bench smoke run: it needs root");
                    tally.skipped += 1;
                } else if let Err(e) = lab(&["bench", "--quick"]) {
                    eprintln!("xtask: FAILED the bench smoke run: {e:#}");
                    tally.failed += 1;
                } else {
                    tally.passed += 1;
                }
            }
            println!("{tally}");
            eprintln!("xtask: test finished in {:.0?}", start.elapsed());
            if tally.failed > 0 || !tally.complete {
                std::process::exit(1);
            }
        }
        Task::Demo => {
            build()?;
            #[cfg(feature = "lab")]
            demo::run(&workspace().join("target/debug/lbctl"))?;
            #[cfg(not(feature = "lab"))]
            lab(&["demo"])?;
        }
        Task::Bench { quick, json, only } => {
            build()?;
            #[cfg(feature = "lab")]
            bench::run(&workspace(), &bench::Options { quick, json, only })?;
            #[cfg(not(feature = "lab"))]
            {
                let mut args = vec!["bench".to_string()];
                if quick {
                    args.push("--quick".into());
                }
                if let Some(j) = json {
                    args.push("--json".into());
                    args.push(std::path::absolute(j)?.display().to_string());
                }
                if let Some(o) = only {
                    args.push("--only".into());
                    args.push(o);
                }
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                lab(&refs)?;
            }
        }
    }
    Ok(())
}

/// Set in the environment of an xtask this one started after its own setup.
const SETUP_DONE: &str = "XTASK_SETUP_DONE";

/// Runs `cargo xtask ARGS` again, built with the `lab` feature (the demo and the bench), now that
/// setup has installed what building lbctl needs.
#[cfg(not(feature = "lab"))]
fn lab(args: &[&str]) -> Result<()> {
    run(Command::new("cargo")
        .current_dir(workspace())
        .args(["run", "--quiet", "-p", "xtask", "--features", "lab", "--"])
        .args(args)
        .env(SETUP_DONE, "1"))
}

#[cfg(feature = "lab")]
fn lab(args: &[&str]) -> Result<()> {
    let quick = args.contains(&"--quick");
    bench::run(
        &workspace(),
        &bench::Options {
            quick,
            json: None,
            only: None,
        },
    )
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).as_deref() == Some("0")
}

fn setup() -> Result<()> {
    let sysroot = output(Command::new("rustc").args([
        &format!("+{NIGHTLY}"),
        "--print",
        "sysroot",
    ]))
    .context(
        "the `nightly` toolchain is missing: the BPF target needs it (`rustup toolchain list`)",
    )?;
    let sysroot = PathBuf::from(sysroot);
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        eprintln!("xtask: installing rust-src for {NIGHTLY}");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    // `cargo xtask test` runs the workspace lints through clippy.
    if output(Command::new("cargo").args(["clippy", "--version"])).is_none() {
        eprintln!("xtask: installing clippy");
        run(Command::new("rustup").args(["component", "add", "clippy"]))?;
    }
    ensure_bpf_linker(&sysroot)?;
    ensure_packages()
}

/// bpf-linker must use the same LLVM as the nightly rustc that emits the bitcode: it is built
/// from crates.io against the nightly's own libLLVM, and runs under `rustup run nightly`, which
/// puts that library on the loader path. A stamp records which libLLVM it was built against.
fn ensure_bpf_linker(sysroot: &Path) -> Result<()> {
    let lib = std::fs::read_dir(sysroot.join("lib"))
        .context("reading the nightly sysroot")?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .context("no libLLVM.so.* in the nightly sysroot's lib directory")?;
    let want = format!(
        "bpf-linker {BPF_LINKER_VERSION} {}",
        lib.file_name().unwrap_or_default().to_string_lossy()
    );
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let stamp = cargo_home.join("bpf-linker.llvm");
    let works = output(Command::new("rustup").args(["run", NIGHTLY, "bpf-linker", "--version"]))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if works && std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {}",
        lib.display()
    );
    let prefix = workspace().join("target/xtask/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)
        .with_context(|| format!("linking {} to {}", link.display(), lib.display()))?;
    let major = lib
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libLLVM.so."))
        .and_then(|v| v.split(['.', '-']).next())
        .context("cannot read the LLVM version from the library's name")?
        .to_string();
    run(Command::new("cargo")
        .args([
            "install",
            "--force",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))?;
    std::fs::write(&stamp, want)?;
    Ok(())
}

fn have(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|d| d.join(cmd).is_file())
    })
}

fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        eprintln!(
            "xtask: missing Debian packages {missing:?}; the privileged tests need them (run as root to install)"
        );
        return Ok(());
    }
    eprintln!("xtask: installing {missing:?}");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn build() -> Result<()> {
    run(Command::new("cargo")
        .current_dir(workspace())
        .args(["build", "--quiet"]))
}

/// The workspace lints (`[workspace.lints]`: no unwrap/expect outside tests, documented public
/// items) on the crates that opt into them; a denied lint fails the test run.
fn lint() -> Result<()> {
    run(Command::new("cargo").current_dir(workspace()).args([
        "clippy",
        "--quiet",
        "-p",
        "lb-common",
        "-p",
        "lbctl",
        "--all-targets",
    ]))
    .context("the workspace lints (cargo clippy -p lb-common -p lbctl --all-targets)")
}

/// What a test run counted.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    passed: u64,
    failed: u64,
    skipped: u64,
    /// False when `cargo test` failed without a failing test to show for it (a build error, a
    /// crashed test binary): the run is a failure whatever the counts say.
    complete: bool,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

impl Tally {
    /// Adds a libtest summary line, `test result: ok. 3 passed; 0 failed; 1 ignored; ...`
    /// (`FAILED.` instead of `ok.` when a test failed); other lines are ignored.
    fn add_libtest_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                // `#[ignore]`d tests did not run: skipped too.
                "ignored" => self.skipped += n,
                _ => {}
            }
        }
    }

    /// Moves the tests that reported themselves skipped (one name a line in `list`) from
    /// passed, where libtest counted them, to skipped.
    fn add_skips(&mut self, list: &str) {
        let n = list.lines().filter(|l| !l.trim().is_empty()).count() as u64;
        self.passed = self.passed.saturating_sub(n);
        self.skipped += n;
    }
}

/// Where `lbtest::privileged_or_skip` lists the tests it skipped (the variable is
/// `lbtest::SKIPS_FILE_ENV`; xtask cannot name it, as its plain build does not depend on lbtest).
const SKIPS_FILE_ENV: &str = "LBTEST_SKIPS_FILE";

fn test(args: &[String]) -> Result<Tally> {
    let ws = workspace();
    // The build with the data plane's debug log, for the test of `lbctl agent --bpf-log`: built
    // first, kept aside, then the ordinary build again (cargo keeps both cached).
    run(Command::new("cargo").current_dir(&ws).args([
        "build",
        "--quiet",
        "-p",
        "lbctl",
        "--features",
        "bpf-log",
    ]))?;
    let log_bin = ws.join("target/debug/lbctl-bpf-log");
    std::fs::copy(ws.join("target/debug/lbctl"), &log_bin).context("keeping the bpf-log build")?;
    build()?;
    lint()?;
    let mut tally = cargo_test(&ws, &log_bin, &[], &[], args)?;
    // The second pass: the main end-to-end tests again with XDP forced on far ends tuned for it
    // (the first pass ran them on TC, interfaces as Linux makes them), so both hooks stay covered.
    eprintln!("xtask: second pass, {XDP_PASS_TESTS:?} with {HOOK_ENV}=xdp");
    let mut second = vec!["-p", "tests"];
    for t in XDP_PASS_TESTS {
        second.extend(["--test", t]);
    }
    let xdp = cargo_test(&ws, &log_bin, &second, &[(HOOK_ENV, "xdp")], args)?;
    tally.passed += xdp.passed;
    tally.failed += xdp.failed;
    tally.skipped += xdp.skipped;
    tally.complete &= xdp.complete;
    Ok(tally)
}

/// Where `lbtest::Hooks::from_env` reads the hook its labs force (`lbtest::HOOK_ENV`).
const HOOK_ENV: &str = "LBTEST_HOOK";
/// The end-to-end tests run a second time with XDP forced (`HOOK_ENV=xdp`).
const XDP_PASS_TESTS: [&str; 2] = ["e2e_foundation", "e2e_ipv6"];

/// Runs `cargo test TARGETS -- ARGS` with `env`, passing its output through and counting it.
fn cargo_test(
    ws: &Path,
    log_bin: &Path,
    targets: &[&str],
    env: &[(&str, &str)],
    args: &[String],
) -> Result<Tally> {
    use std::io::{BufRead as _, BufReader};
    let skips = ws.join("target/xtask/skipped-tests");
    std::fs::create_dir_all(ws.join("target/xtask"))?;
    std::fs::write(&skips, "").context("emptying the skip list")?;
    // Every test binary runs (--no-fail-fast), so that the counts cover them all; their output
    // is passed through as it comes, and the summary lines are counted on the way.
    let mut child = Command::new("cargo")
        .current_dir(ws)
        .args(["test", "--quiet", "--no-fail-fast"])
        .args(targets)
        .env("LBCTL_BIN", ws.join("target/debug/lbctl"))
        .env("LBCTL_LOG_BIN", log_bin)
        .env(SKIPS_FILE_ENV, &skips)
        .envs(env.iter().copied())
        .arg("--")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let mut tally = Tally::default();
    let stdout = child.stdout.take().context("cargo test's output")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        tally.add_libtest_line(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    let skipped = std::fs::read_to_string(&skips).context("reading the skip list")?;
    for name in skipped.lines() {
        eprintln!("xtask: SKIPPED {name}: needs root");
    }
    tally.add_skips(&skipped);
    tally.complete = status.success() || tally.failed > 0;
    if !status.success() && tally.failed == 0 {
        eprintln!("xtask: cargo test failed ({status}) without a failing test: see above");
    }
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn counts_libtest_summaries_and_skips() {
        let mut t = Tally::default();
        for line in [
            "running 3 tests",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test result: FAILED. 10 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9.5s",
            "   test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "test something ... ok",
        ] {
            t.add_libtest_line(line);
        }
        t.add_skips("a_privileged_test\nanother\n\n");
        assert_eq!((t.passed, t.failed, t.skipped), (11, 2, 3));
        assert_eq!(t.to_string(), "11 passed, 2 failed, 3 skipped");
    }
}
