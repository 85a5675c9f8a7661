//! Commands, namespaces, pins and /proc readings for the bench. Everything the bench creates is
//! named `lbbench-<pid>-...` and removed by a guard's `Drop`, also when a section fails; what a
//! killed run left is removed by the next one.
use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// Runs a command; its standard output, or an error with its standard error.
pub fn run(args: &[&str]) -> Result<String> {
    run_with_input(args, None)
}

/// Runs a command with `input` on its standard input.
pub fn run_with_input(args: &[&str], input: Option<&str>) -> Result<String> {
    run_fed(args, input.map(str::as_bytes))
}

/// Runs a command with the bytes `input` on its standard input.
pub fn run_with_bytes(args: &[&str], input: &[u8]) -> Result<String> {
    run_fed(args, Some(input))
}

fn run_fed(args: &[&str], input: Option<&[u8]>) -> Result<String> {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {args:?}"))?;
    if let Some(text) = input {
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin
            .write_all(text)
            .with_context(|| format!("writing to {args:?}"))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err: String = err.lines().take(10).collect::<Vec<_>>().join("\n");
        bail!("{args:?} failed ({}): {err}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command, ignoring whether it works (for cleanup).
pub fn run_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs a command inside network namespace `ns`.
pub fn in_ns(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    run(&all)
}

/// The name of something this run creates: `lbbench-<pid>-<what>`.
pub fn name(what: &str) -> String {
    format!("lbbench-{}-{what}", std::process::id())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(what: &str) -> Result<Netns> {
        let ns = Netns { name: name(what) };
        run(&["ip", "netns", "add", &ns.name])?;
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        run_quiet(&["ip", "netns", "del", &self.name]);
    }
}

/// A pin directory under /sys/fs/bpf: on drop, whatever is pinned there is detached and unpinned
/// with `lbctl::dataplane::down`, and the directory removed.
pub struct Pins {
    pub dir: PathBuf,
}

impl Pins {
    pub fn new(what: &str) -> Pins {
        Pins {
            dir: Path::new("/sys/fs/bpf").join(name(what)),
        }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        remove_pins(&self.dir);
    }
}

/// Removes the pins in `dir` and the directory, then what an agent on it left in /run/lb: the
/// pin directory's lock file, and its default status socket with its lock file and named-VIP
/// book (no agent of this run uses `dir` any more).
fn remove_pins(dir: &Path) {
    if dir.exists() {
        if let Err(e) = lbctl::dataplane::down(dir) {
            eprintln!("bench: removing the pins in {}: {e}", dir.display());
        }
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = std::fs::remove_file(lbctl::lock::Guarded::PinDir(dir).lock_path());
    lbtest::remove_socket_files(&lbctl::status::default_socket_for(dir));
}

/// Removes namespaces and pin directories that an earlier, killed bench run left behind.
pub fn remove_leftovers() {
    let dead = |name: &str| {
        name.strip_prefix("lbbench-")
            .and_then(|r| r.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            })
    };
    if let Ok(list) = run(&["ip", "netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if dead(ns) {
                run_quiet(&["ip", "netns", "del", ns]);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            if dead(&e.file_name().to_string_lossy()) {
                remove_pins(&e.path());
            }
        }
    }
}

/// A `key: value` field of /proc/<pid>/status in kB (VmRSS, VmHWM, ...).
pub fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    field(&text, key)?
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The value of `key:` in a /proc text of `key: value` lines.
pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// Keeps the calling thread on one CPU, so that the kernel's timings are not split by migrations.
pub fn pin_thread_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_setaffinity(0) affects this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Where the numbers came from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory: String,
    pub date_utc: String,
    pub commit: String,
    pub rustc: String,
    pub tools: Vec<String>,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let first_line = |args: &[&str]| {
        run(args)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_else(|| format!("({} not available)", args[0]))
    };
    let dirty = run(&["git", "status", "--porcelain", "--untracked-files=no"])
        .map(|s| s.lines().count())
        .unwrap_or(0);
    let mut commit = first_line(&["git", "rev-parse", "--short=12", "HEAD"]);
    if dirty > 0 {
        commit.push_str(&format!(
            " (plus uncommitted changes to {dirty} tracked files)"
        ));
    }
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: field(&cpuinfo, "model name")
            .unwrap_or("unknown")
            .to_string(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        memory: field(&meminfo, "MemTotal")
            .and_then(|v| v.trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or("unknown".into(), |kb| {
                format!("{:.1} GiB", kb / (1024.0 * 1024.0))
            }),
        date_utc: first_line(&["date", "-u", "+%Y-%m-%d %H:%M:%S UTC"]),
        commit,
        rustc: first_line(&["rustc", "--version"]),
        tools: vec![
            first_line(&["iptables", "--version"]),
            first_line(&["iptables-legacy", "--version"]),
            first_line(&["nft", "--version"]),
            first_line(&["iperf3", "--version"]),
        ],
    }
}
