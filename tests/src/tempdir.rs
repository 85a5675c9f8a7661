//! A test's temporary directory, `/tmp/lbtest-<name>-<pid>`: made fresh, removed when the test
//! passes, kept (and named on stderr) when it fails.
use std::{
    ops::Deref,
    path::{Path, PathBuf},
};

/// A temporary directory for one test; removed on drop unless the thread is panicking.
#[derive(Debug)]
pub struct TestDir(PathBuf);

impl TestDir {
    /// Creates `/tmp/lbtest-<name>-<pid>` fresh (an old one of the same path removed first).
    pub fn new(name: &str) -> TestDir {
        let dir = std::env::temp_dir().join(format!("lbtest-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TestDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for debugging", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A temporary file removed on drop unless the thread is panicking (then kept, and named on
/// stderr).
#[derive(Debug)]
pub struct TestFile(PathBuf);

impl TestFile {
    /// `path`, removed first if it exists.
    pub fn new(path: PathBuf) -> TestFile {
        let _ = std::fs::remove_file(&path);
        TestFile(path)
    }
}

impl Deref for TestFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestFile {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestFile {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for debugging", self.0.display());
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
