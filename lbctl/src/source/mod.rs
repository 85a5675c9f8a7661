//! Where Marathon's state comes from: a file on disk ([`file`]), or a live Marathon
//! ([`marathon`]: snapshots, and its event stream, [`events`]). Each source runs on threads of
//! its own and hands the reconcile loop [`Update`]s: documents already read, with their task
//! hosts resolved, or failures. Opening a source (building the HTTP client, reading its CA
//! file) is apart from starting it, so that the agent can refuse a bad source before it touches
//! the kernel.
pub mod events;
pub mod file;
pub mod limits;
pub mod marathon;
mod update;

pub use update::Update;

use crate::error::Result;
use marathon::{Client, ClientConfig, redact};
use std::{
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool, mpsc},
    time::Duration,
};

/// Where the Marathon state comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A `/v2/apps?embed=apps.tasks` body on disk, re-read when it changes.
    File {
        /// The file.
        path: PathBuf,
        /// How often it is checked for changes.
        poll: Duration,
    },
    /// A live Marathon: a snapshot on start and every `resync`, and one `debounce` after each
    /// relevant event of its event stream.
    Marathon {
        /// How to reach it.
        client: ClientConfig,
        /// The interval of full snapshots.
        resync: Duration,
        /// The quiet time after an event before a snapshot is fetched.
        debounce: Duration,
    },
}

impl Source {
    /// The source for people and the status (URLs without credentials).
    pub fn describe(&self) -> String {
        match self {
            Source::File { path, .. } => format!("file {}", path.display()),
            Source::Marathon { client, .. } => format!(
                "marathon {}",
                client
                    .urls
                    .iter()
                    .map(|u| redact(u))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Opens what the source needs (for a live Marathon, the HTTP client: a URL is given and
    /// the CA file reads), without starting it.
    pub fn open(&self) -> Result<Opened> {
        Ok(Opened(match self {
            Source::File { path, poll } => Opening::File {
                path: path.clone(),
                poll: *poll,
            },
            Source::Marathon {
                client,
                resync,
                debounce,
            } => {
                // Marathon sends keep-alives: a stream silent this long is reopened.
                let idle = client.limits.stream_idle;
                Opening::Marathon {
                    client: Arc::new(Client::new(client.clone(), idle)?),
                    resync: *resync,
                    debounce: *debounce,
                }
            }
        }))
    }
}

/// A source opened and not yet started.
pub struct Opened(Opening);

enum Opening {
    File {
        path: PathBuf,
        poll: Duration,
    },
    Marathon {
        client: Arc<Client>,
        resync: Duration,
        debounce: Duration,
    },
}

impl Opened {
    /// Starts the source's threads; they send to `tx` until `stop` is set or `tx`'s receiver is
    /// gone.
    pub fn start(self, tx: mpsc::Sender<Update>, stop: Arc<AtomicBool>) {
        match self.0 {
            Opening::File { path, poll } => {
                std::thread::spawn(move || file::watch_file(path, poll, tx, stop));
            }
            Opening::Marathon {
                client,
                resync,
                debounce,
            } => {
                let (trigger_tx, trigger_rx) = mpsc::channel();
                let (c, s) = (client.clone(), stop.clone());
                std::thread::spawn(move || marathon::follow_events(&c, trigger_tx, &s));
                std::thread::spawn(move || {
                    marathon::fetch_snapshots(&client, resync, debounce, trigger_rx, tx, &stop)
                });
            }
        }
    }
}
