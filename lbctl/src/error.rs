//! The library's errors. Each says what was being done and to what.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} is not a Marathon document: {reason}")]
    Document { what: String, reason: String },
    #[error(
        "this lbctl was built without its BPF data plane (AYA_BUILD_SKIP); rebuild with `cargo xtask build`"
    )]
    NoDataPlane,
    #[error("loading the BPF data plane ({table}): {source}")]
    Load {
        table: String,
        source: Box<aya::EbpfError>,
    },
    #[error("the data plane asked for ({table}) needs {needed_mib} MiB of kernel memory for its Maglev tables, more than half of the {available_mib} MiB available: lower --max-services or --ring-size (each service takes 2 x ring size x 4 bytes)", needed_mib = needed >> 20, available_mib = available >> 20)]
    Memory {
        needed: u64,
        available: u64,
        table: String,
    },
    #[error("{what}: {source}")]
    Program {
        what: String,
        source: aya::programs::ProgramError,
    },
    #[error("{what}: {source}")]
    Map {
        what: String,
        source: aya::maps::MapError,
    },
    #[error("{what}: {source}")]
    Pin {
        what: String,
        source: aya::pin::PinError,
    },
    #[error("{what}: {source}")]
    Link {
        what: String,
        source: aya::programs::links::LinkError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "no load balancer is pinned at {0} (is the agent running? start it with `lbctl agent`)"
    )]
    NotRunning(PathBuf),
    #[error(
        "permission denied opening {0}: lbctl needs root (or CAP_BPF and CAP_SYS_ADMIN) to read the kernel maps"
    )]
    NotPermitted(PathBuf),
    #[error(
        "the agent is not running: no status socket answers at {0} (start it with `lbctl agent`)"
    )]
    AgentNotRunning(PathBuf),
    #[error("{dir} holds maps of another layout version ({maps}) left by a different agent version; this agent will not read them as its own. Run that version's `lbctl down`, or `lbctl down --pin-dir {dir}` and remove them (tracked flows are then lost), or give this agent another --pin-dir", dir = dir.display())]
    Layout { dir: PathBuf, maps: String },
    #[error("the data plane pinned at {dir} was created with {pinned}, not {asked}: start the agent with the same --ring-size, --maglev-seed, --flow-table-size, --max-services, --max-backends and --max-members, or run `lbctl down --pin-dir {dir}` first (tracked flows are then lost)", dir = dir.display())]
    Table {
        dir: PathBuf,
        pinned: String,
        asked: String,
    },
    #[error("the data plane is full: {0}")]
    Full(String),
    #[error("Marathon: {0}")]
    Marathon(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("interface {0} does not exist")]
    NoInterface(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
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
