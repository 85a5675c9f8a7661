//! The library's errors. Each says what was being done and to what.
use std::path::PathBuf;

/// Everything the library can fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A Marathon document could not be parsed.
    #[error("{what} is not a Marathon document: {reason}")]
    Document {
        /// Where it came from.
        what: String,
        /// Why.
        reason: String,
    },
    /// The binary carries no BPF object.
    #[error(
        "this lbctl was built without its BPF data plane (AYA_BUILD_SKIP); rebuild with `cargo xtask build`"
    )]
    NoDataPlane,
    /// The BPF object could not be loaded.
    #[error("loading the BPF data plane ({table}): {source}")]
    Load {
        /// The table settings it was loaded with.
        table: String,
        /// Why.
        source: Box<aya::EbpfError>,
    },
    /// The tables asked for would take too much kernel memory.
    #[error("the data plane asked for ({table}) needs {needed_mib} MiB of kernel memory for its Maglev tables, more than half of the {available_mib} MiB available: lower --max-services or --ring-size (each service with backends takes a table of ring size x 4 bytes)", needed_mib = needed >> 20, available_mib = available >> 20)]
    Memory {
        /// Bytes the Maglev tables need.
        needed: u64,
        /// Bytes of memory available.
        available: u64,
        /// The table settings asked for.
        table: String,
    },
    /// An operation on the XDP program failed.
    #[error("{what}: {source}")]
    Program {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: aya::programs::ProgramError,
    },
    /// An operation on a map failed.
    #[error("{what}: {source}")]
    Map {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: aya::maps::MapError,
    },
    /// Pinning failed.
    #[error("{what}: {source}")]
    Pin {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: aya::pin::PinError,
    },
    /// An operation on a link failed.
    #[error("{what}: {source}")]
    Link {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: aya::programs::links::LinkError,
    },
    /// Another system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// No data plane is pinned in the directory.
    #[error(
        "no load balancer is pinned at {0} (is the agent running? start it with `lbctl agent`)"
    )]
    NotRunning(PathBuf),
    /// The caller may not open the maps.
    #[error(
        "permission denied opening {0}: lbctl needs root (or CAP_BPF and CAP_SYS_ADMIN) to read the kernel maps"
    )]
    NotPermitted(PathBuf),
    /// No agent answers on the status socket.
    #[error(
        "the agent is not running: no status socket answers at {0} (start it with `lbctl agent`)"
    )]
    AgentNotRunning(PathBuf),
    /// Maps of another layout version are pinned.
    #[error("{dir} holds maps of another layout version ({maps}) left by a different agent version; this agent will not read them as its own. Run that version's `lbctl down`, or `lbctl down --pin-dir {dir}` and remove them (tracked flows are then lost), or give this agent another --pin-dir", dir = dir.display())]
    Layout {
        /// The pin directory.
        dir: PathBuf,
        /// The maps of another version.
        maps: String,
    },
    /// The pinned data plane has other table settings than asked for.
    #[error("the data plane pinned at {dir} was created with {pinned}, not {asked}: start the agent with the same --ring-size, --maglev-seed, --flow-table-size, --max-services, --max-backends and --max-members, or run `lbctl down --pin-dir {dir}` first (tracked flows are then lost)", dir = dir.display())]
    Table {
        /// The pin directory.
        dir: PathBuf,
        /// The settings it was created with.
        pinned: String,
        /// The settings asked for.
        asked: String,
    },
    /// A map of the data plane has no room left.
    #[error("the data plane is full: {0}")]
    Full(String),
    /// Marathon could not be reached or answered wrong.
    #[error("Marathon: {0}")]
    Marathon(String),
    /// A setting is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// An interface named in the settings does not exist.
    #[error("interface {0} does not exist")]
    NoInterface(String),

    // One agent per data plane (issue 14, items 3 and 9).
    /// Another process holds the lock of the data plane or of the status socket.
    #[error("{what} is in use by another lbctl ({holder}; lock file {path}): {hint}", holder = match pid { Some(p) => format!("pid {p}"), None => "pid unknown".into() }, path = path.display())]
    Locked {
        /// What the lock guards.
        what: String,
        /// The holder's pid, as written in the lock file.
        pid: Option<u32>,
        /// The lock file.
        path: PathBuf,
        /// What to do.
        hint: &'static str,
    },
    /// A map pinned under one of our names has another layout: another program made it.
    #[error("{path} is not this load balancer's map: it is {has}, this agent needs {needs}. It was made by something else (or by a build of another layout that kept the name); if nothing uses it, remove it (`rm {path}`), or give this agent another --pin-dir", path = path.display())]
    ForeignMap {
        /// The pinned map.
        path: PathBuf,
        /// What it is (type, key and value sizes, flags).
        has: String,
        /// What the spec table says it must be.
        needs: String,
    },
}

/// The library's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The kernel or the file system refused for lack of privilege (EACCES or EPERM anywhere in
    /// the chain of causes): the caller is not root, or lacks CAP_BPF / CAP_NET_ADMIN.
    pub fn not_permitted(&self) -> bool {
        if matches!(self, Error::NotPermitted(_)) {
            return true;
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::PermissionDenied
                    || io.raw_os_error() == Some(libc::EPERM)
                {
                    return true;
                }
                // An io::Error wrapping another error reports the wrapped one's source, not the
                // wrapped one itself.
                if let Some(inner) = io.get_ref() {
                    cause = Some(inner);
                    continue;
                }
            }
            cause = e.source();
        }
        false
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
    pub(crate) fn map(what: impl Into<String>, source: aya::maps::MapError) -> Self {
        Error::Map {
            what: what.into(),
            source,
        }
    }
    pub(crate) fn program(what: impl Into<String>, source: aya::programs::ProgramError) -> Self {
        Error::Program {
            what: what.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Error;
    use std::io::{Error as IoError, ErrorKind};

    #[test]
    fn eacces_and_eperm_anywhere_in_the_causes_are_not_permitted() {
        let eacces = Error::io("creating /run/lb", IoError::from_raw_os_error(libc::EACCES));
        let eperm = Error::io("loading", IoError::from_raw_os_error(libc::EPERM));
        let denied = Error::io("x", IoError::new(ErrorKind::PermissionDenied, "no"));
        let nested = Error::io(
            "outer",
            IoError::other(IoError::from_raw_os_error(libc::EPERM)),
        );
        for e in [eacces, eperm, denied, nested] {
            assert!(e.not_permitted(), "{e}");
        }
        let other = Error::io("x", IoError::from_raw_os_error(libc::ENOENT));
        assert!(!other.not_permitted());
        assert!(!Error::Config("bad".into()).not_permitted());
    }
}
