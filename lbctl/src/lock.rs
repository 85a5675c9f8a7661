//! One agent per data plane: an exclusive lock (`flock`) on a file in the run directory for the
//! pin directory, and one next to the status socket, taken before the agent touches anything.
//!
//! The pin directory is on bpffs, which holds only BPF objects, so its lock lives in
//! [`RUN_DIR`], named after the pin directory's path. The kernel releases a `flock` when its
//! holder exits, however it exits: a lock file left by a dead agent (it still names that agent's
//! pid) is simply locked again by the next one, which then writes its own pid there. The files
//! are never removed: removing a lock file another process is about to lock would let two
//! processes each lock a different file of the same name.
use crate::error::{Error, Result};
use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Component, Path, PathBuf},
    time::Duration,
};

/// The directory of the lock files of pin directories (next to the default status socket).
pub const RUN_DIR: &str = "/run/lb";

/// An exclusive lock, held until dropped (or until the process exits).
#[derive(Debug)]
pub struct Lock {
    /// The open lock file: closing it releases the lock.
    _file: File,
    path: PathBuf,
}

impl Lock {
    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a lock guards, for the message a second agent gets.
#[derive(Debug, Clone, Copy)]
pub enum Guarded<'a> {
    /// The data plane pinned in this directory.
    PinDir(&'a Path),
    /// This status socket.
    Socket(&'a Path),
}

impl Guarded<'_> {
    /// Where the lock file of what is guarded lives.
    pub fn lock_path(&self) -> PathBuf {
        match self {
            Guarded::PinDir(dir) => Path::new(RUN_DIR).join(format!("{}.lock", escape(dir))),
            Guarded::Socket(socket) => {
                let mut name = socket.as_os_str().to_owned();
                name.push(".lock");
                PathBuf::from(name)
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Guarded::PinDir(dir) => format!("the data plane pinned at {}", dir.display()),
            Guarded::Socket(socket) => format!("the status socket {}", socket.display()),
        }
    }
}

/// Takes the lock of `what` without waiting: refused, naming the holder's pid and the lock file
/// and saying `hint` (what to do), while another process holds it.
pub fn acquire(what: Guarded<'_>, hint: &'static str) -> Result<Lock> {
    let path = what.lock_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(|e| Error::io(format!("opening the lock file {}", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(Error::Locked {
                what: what.describe(),
                pid: holder_pid(&mut file),
                path,
                hint,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::io(format!("locking {}", path.display()), e));
        }
    }
    if let Some(old) = read_pid(&mut file) {
        tracing::info!(
            lock = %path.display(),
            pid = old,
            "took over a lock file left by a process that no longer runs (the kernel released its lock when it exited)"
        );
    }
    let own = std::process::id();
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(format!("{own}\n").as_bytes()))
        .map_err(|e| Error::io(format!("writing the pid into {}", path.display()), e))?;
    Ok(Lock { _file: file, path })
}

/// The holder's pid: the kernel's (`/proc/locks` names the process that holds the `flock` of
/// this file's inode), else the one the holder wrote. A holder writes its pid right after it
/// takes the lock, so until then the file is empty or still names a previous, dead holder: the
/// kernel's answer is right from the first instant.
fn holder_pid(file: &mut File) -> Option<u32> {
    if let Some(pid) = file.metadata().ok().and_then(|m| kernel_holder(&m)) {
        return Some(pid);
    }
    for _ in 0..20 {
        if let Some(pid) = read_pid(file) {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The pid of the `flock` write lock on the file of `meta` in `/proc/locks`, whose lines read
/// `1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF` (major and minor in hex).
fn kernel_holder(meta: &std::fs::Metadata) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(3) == Some(&"WRITE") && f.get(5) == Some(&id.as_str()))
            .then(|| f.get(4).and_then(|p| p.parse().ok()))
            .flatten()
    })
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// A path as one file name: `/sys/fs/bpf/lb` becomes `sys-fs-bpf-lb` (as systemd escapes
/// paths): `/` between components becomes `-`; a byte other than a letter, a digit, `_` or `.`
/// becomes `\xNN`, so that two different paths never share a name. The path is made absolute
/// and its `.` components and trailing `/` are dropped, so that one directory spelled two ways
/// gets one lock.
fn escape(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir)
        .or_else(|_| std::path::absolute(dir))
        .unwrap_or_else(|_| dir.to_path_buf());
    let parts: Vec<String> = dir
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for (j, b) in part.bytes().enumerate() {
            let keep = b.is_ascii_alphanumeric() || b == b'_' || (b == b'.' && j > 0);
            if keep {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    if out.is_empty() { "-".into() } else { out }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn pin_dirs_map_to_distinct_file_names() {
        assert_eq!(escape(Path::new("/sys/fs/bpf/lb")), "sys-fs-bpf-lb");
        assert_eq!(escape(Path::new("/sys/fs/bpf/lb/")), "sys-fs-bpf-lb");
        assert_eq!(escape(Path::new("/sys/fs/bpf/./lb")), "sys-fs-bpf-lb");
        assert_eq!(escape(Path::new("/sys/fs/bpf/a-b")), "sys-fs-bpf-a\\x2db");
        assert_ne!(
            escape(Path::new("/sys/fs/bpf/a-b")),
            escape(Path::new("/sys/fs/bpf/a/b"))
        );
        assert_eq!(
            Guarded::PinDir(Path::new("/sys/fs/bpf/lb")).lock_path(),
            Path::new("/run/lb/sys-fs-bpf-lb.lock")
        );
        assert_eq!(
            Guarded::Socket(Path::new("/run/lb/agent.sock")).lock_path(),
            Path::new("/run/lb/agent.sock.lock")
        );
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_and_a_released_lock_is_taken() {
        let dir = std::env::temp_dir().join(format!("lbctl-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let first = acquire(Guarded::Socket(&socket), "").unwrap();
        // flock locks belong to the open file: a second open in this process is refused too.
        match acquire(Guarded::Socket(&socket), "") {
            Err(Error::Locked { pid, path, .. }) => {
                assert_eq!(pid, Some(std::process::id()));
                assert_eq!(path, dir.join("agent.sock.lock"));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        // A holder that has not written its pid yet (the file names a dead one): the kernel's
        // answer wins.
        std::fs::write(first.path(), "999999999\n").unwrap();
        match acquire(Guarded::Socket(&socket), "") {
            Err(Error::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        let again = acquire(Guarded::Socket(&socket), "").unwrap();
        let text = std::fs::read_to_string(again.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
