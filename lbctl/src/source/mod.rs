//! Where Marathon's state comes from: a file on disk ([`file`]), or a live Marathon
//! ([`marathon`]: snapshots, and its event stream, [`events`], followed by tasks on the agent's
//! tokio runtime, [`watch`]). The file source runs on a thread of its own. Each hands the
//! reconcile loop [`Update`]s: documents already read, with their task hosts resolved (by a
//! cache with a deadline, [`resolver`], on a thread between the source and the agent, with
//! worker threads of its own), or failures. Opening a source (building the HTTP client, reading its CA
//! file) is apart from starting it, so that the agent can refuse a bad source before it touches
//! the kernel.
pub mod events;
pub mod file;
pub mod limits;
pub mod marathon;
pub mod resolver;
mod update;
mod watch;

pub use update::Update;

use crate::error::Result;
use marathon::{Client, ClientConfig, redact};
use std::{
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool, mpsc},
    time::Duration,
};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

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
                // Marathon sends keep-alives: a stream silent for `limits.stream_idle` is
                // reopened.
                Opening::Marathon {
                    client: Arc::new(Client::new(client.clone())?),
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
    /// Starts the source (the file's thread, or Marathon's tasks on `runtime`); it sends to
    /// `tx` until `stop` is set (the file) or `cancel` is cancelled (Marathon), or `tx`'s
    /// receiver is gone, each document's task hosts resolved as `resolve` says (an app `cache`
    /// holds is not read again: the names it needs are known). Returns the
    /// handle that asks for a fresh snapshot (also asked for when a slow host name resolves at
    /// last).
    pub fn start(
        self,
        tx: mpsc::Sender<Update>,
        stop: Arc<AtomicBool>,
        resolve: resolver::ResolverConfig,
        cache: crate::marathon::AppCache,
        runtime: &Handle,
        cancel: CancellationToken,
    ) -> Refresh {
        let (read_tx, read_rx) = mpsc::channel::<Update>();
        let refresh = self.start_reading(read_tx, stop, runtime, cancel);
        let resolver = resolver::CachedResolver::system(resolve);
        let asker = refresh.clone();
        resolver.on_late(move || asker.request());
        std::thread::spawn(move || {
            while let Ok(mut update) = read_rx.recv() {
                match &mut update {
                    Update::Document {
                        snapshot: Ok(snapshot),
                        ..
                    } => snapshot.resolve_hosts_with(&resolver, Some(&cache)),
                    Update::App { snapshot, .. } => snapshot.resolve_hosts(&resolver),
                    _ => {}
                }
                if tx.send(update).is_err() {
                    return;
                }
            }
        });
        refresh
    }

    /// Starts what reads documents: the file's thread, or Marathon's two tasks.
    fn start_reading(
        self,
        tx: mpsc::Sender<Update>,
        stop: Arc<AtomicBool>,
        runtime: &Handle,
        cancel: CancellationToken,
    ) -> Refresh {
        match self.0 {
            Opening::File { path, poll } => {
                let again = Arc::new(AtomicBool::new(false));
                let flag = again.clone();
                std::thread::spawn(move || file::watch_file_with(path, poll, tx, stop, flag));
                Refresh(Asker::File(again))
            }
            Opening::Marathon {
                client,
                resync,
                debounce,
            } => {
                let triggers = Arc::new(watch::Triggers::default());
                runtime.spawn(watch::follow_events(
                    client.clone(),
                    triggers.clone(),
                    cancel.clone(),
                ));
                let every = watch::Fetching { resync, debounce };
                runtime.spawn(watch::fetch_snapshots(
                    client,
                    every,
                    triggers.clone(),
                    tx,
                    cancel,
                ));
                Refresh(Asker::Marathon(triggers))
            }
        }
    }
}

/// Asks a started source for a fresh snapshot (the removal guard's confirmation): the file is
/// re-read and sent even when unchanged; Marathon is fetched as after an event.
#[derive(Clone)]
pub struct Refresh(Asker);

#[derive(Clone)]
enum Asker {
    File(Arc<AtomicBool>),
    Marathon(Arc<watch::Triggers>),
}

impl Refresh {
    /// Asks for a fresh snapshot; it comes as any other update.
    pub fn request(&self) {
        match &self.0 {
            Asker::File(again) => again.store(true, std::sync::atomic::Ordering::Relaxed),
            Asker::Marathon(triggers) => {
                triggers.all();
            }
        }
    }
}
