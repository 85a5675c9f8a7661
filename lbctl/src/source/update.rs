//! What a source hands the reconcile loop, and the wait its threads share.
use crate::marathon::Snapshot;
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

/// What a source hands the reconcile loop.
#[derive(Debug)]
pub enum Update {
    /// A document, read (its task hosts resolved by the time it reaches the agent), or why it
    /// is not a Marathon document.
    Document {
        /// The document ready to derive, or the reason it is not one.
        snapshot: Result<Snapshot, String>,
        /// Where it came from (a path, or a redacted URL).
        from: String,
    },
    /// One app, fetched alone after an event about its tasks (its task hosts resolved by the
    /// time it reaches the agent): the other apps stand as the last document had them.
    App {
        /// A document holding that app alone.
        snapshot: Snapshot,
        /// Where it came from (a redacted URL).
        from: String,
    },
    /// No document this time (Marathon unreachable, the file unreadable).
    Failed(String),
    /// A document came, but only after other URLs failed (no answer in time, too large): why.
    Degraded(String),
}

impl Update {
    /// Parses `text` for derivation. Its task hosts are resolved after, on the source's
    /// resolving thread (`Opened::start`), so that the reconcile loop never waits on DNS.
    pub fn document(text: String, from: String) -> Update {
        Update::Document {
            snapshot: Snapshot::parse_owned(text, &from).map_err(|e| e.to_string()),
            from,
        }
    }
}

/// Sleeps for `total`, returning early once `shutdown` is set.
pub(crate) fn sleep_unless(shutdown: &AtomicBool, total: Duration) {
    let end = Instant::now() + total;
    while !shutdown.load(Ordering::Relaxed) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50).min(total));
    }
}
