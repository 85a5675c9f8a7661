//! The two tasks that follow a live Marathon on the agent's tokio runtime: one reads the event
//! stream and sends a trigger for every relevant event, one fetches snapshots (on start, every
//! resync, once a burst of triggers is quiet) and hands them to the agent's channel. Both end when
//! the runtime's cancellation token is cancelled or the other end of their channel is gone.
use super::{marathon::Client, update::Update};
use crate::marathon::Snapshot;
use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

/// The most apps fetched one by one after a burst of events: more changed apps are fetched
/// with one snapshot.
pub(crate) const MAX_APP_FETCHES: usize = 16;

/// What the snapshot task is asked for and has not fetched yet: a full snapshot, or some apps
/// alone. Asking never waits and is never lost; asking for more than [`MAX_APP_FETCHES`]
/// apps asks for a snapshot.
#[derive(Default)]
pub(crate) struct Triggers {
    wanted: Mutex<Wanted>,
    notify: Notify,
    /// The snapshot task is gone: asking is pointless.
    closed: AtomicBool,
}

#[derive(Default, Debug, PartialEq, Eq)]
pub(crate) struct Wanted {
    /// A full snapshot.
    pub all: bool,
    /// These apps alone (empty when `all`).
    pub apps: BTreeSet<String>,
}

impl Triggers {
    /// Asks for a full snapshot. False when the snapshot task is gone.
    pub(crate) fn all(&self) -> bool {
        self.want(|w| {
            w.all = true;
            w.apps.clear();
        })
    }

    /// Asks for the app `id` alone. False when the snapshot task is gone.
    pub(crate) fn app(&self, id: &str) -> bool {
        self.want(|w| {
            if !w.all {
                w.apps.insert(id.to_string());
                if w.apps.len() > MAX_APP_FETCHES {
                    w.all = true;
                    w.apps.clear();
                }
            }
        })
    }

    fn want(&self, f: impl FnOnce(&mut Wanted)) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return false;
        }
        f(&mut self.lock());
        // Stored as a permit when the snapshot task is not waiting: no ask is lost.
        self.notify.notify_one();
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Wanted> {
        // A plain value: a panic elsewhere leaves it whole.
        self.wanted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes what is asked for.
    pub(crate) fn take(&self) -> Wanted {
        std::mem::take(&mut *self.lock())
    }
}

/// The longest wait between two attempts to open the event stream.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Follows Marathon's event stream: an event about one app's tasks asks for that app, any other
/// event that may change apps or tasks for a snapshot. A lost stream is reopened at once; a
/// stream that cannot be opened is retried with backoff (1 s doubling to 30 s). An event stream
/// (re)opened asks for a snapshot: what happened while none was open is not known.
pub(crate) async fn follow_events(
    client: Arc<Client>,
    triggers: Arc<Triggers>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let opened = tokio::select! {
            _ = cancel.cancelled() => return,
            opened = client.events() => opened,
        };
        match opened {
            Ok(mut stream) => {
                tracing::info!(source = %stream.source, "following Marathon's event stream");
                backoff = Duration::from_secs(1);
                if !triggers.all() {
                    return;
                }
                loop {
                    let event = tokio::select! {
                        _ = cancel.cancelled() => return,
                        event = stream.next_event() => event,
                    };
                    match event {
                        Ok(e) if e.relevant() => {
                            tracing::debug!(event = %e.kind, app = ?e.app, "Marathon event");
                            let asked = match e.about_app() {
                                Some(app) => triggers.app(app),
                                None => triggers.all(),
                            };
                            if !asked {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %crate::secrets::text(&e.to_string()), "event stream lost; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::secrets::text(&e.to_string()), retry_in = ?backoff, "cannot open Marathon's event stream");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Waits until nothing was asked for `debounce`, at most 4 times that (or the agent stops).
async fn debounce(triggers: &Triggers, debounce: Duration, cancel: &CancellationToken) {
    let until = Instant::now() + debounce * 4;
    loop {
        let quiet = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(until) => true,
            t = tokio::time::timeout(debounce, triggers.notify.notified()) => t.is_err(),
        };
        if quiet {
            return;
        }
    }
}

/// What ended a wait for the next snapshot.
enum Woken {
    /// The resync (or retry) time came.
    Due,
    /// Something was asked for.
    Triggered,
    /// The agent stops.
    Cancelled,
}

/// The settings of [`fetch_snapshots`].
pub(crate) struct Fetching {
    /// The interval of full snapshots.
    pub resync: Duration,
    /// The quiet time after a trigger before a snapshot is fetched.
    pub debounce: Duration,
}

/// Fetches a full snapshot on start, every `resync`, and once things are quiet for `debounce`
/// after one is asked for (at most 4 times that after the first ask). Apps asked for alone are
/// fetched at once, each with `GET /v2/apps/{id}`, and handed over as [`Update::App`]; an app
/// Marathon does not have, or one that cannot be fetched or read, asks for a snapshot instead.
/// Snapshot failures are retried with backoff, and never turn into an empty state. Documents are
/// parsed on a blocking thread. Everything is fetched in turn, so updates reach the agent in the
/// order Marathon gave them.
pub(crate) async fn fetch_snapshots(
    client: Arc<Client>,
    every: Fetching,
    triggers: Arc<Triggers>,
    tx: mpsc::Sender<Update>,
    cancel: CancellationToken,
) {
    /// Tells the askers when this task ends.
    struct Closing(Arc<Triggers>);
    impl Drop for Closing {
        fn drop(&mut self) {
            self.0.closed.store(true, Ordering::Relaxed);
        }
    }
    let _closing = Closing(triggers.clone());
    let mut next = Instant::now();
    let mut backoff = Duration::from_secs(1);
    loop {
        let woken = tokio::select! {
            _ = cancel.cancelled() => Woken::Cancelled,
            _ = tokio::time::sleep_until(next) => Woken::Due,
            _ = triggers.notify.notified() => Woken::Triggered,
        };
        match woken {
            Woken::Cancelled => return,
            Woken::Due => {}
            Woken::Triggered => {
                // Taken at once: a snapshot asked for after this wakes the loop again.
                let wanted = triggers.take();
                if wanted.all {
                    debounce(&triggers, every.debounce, &cancel).await;
                    if cancel.is_cancelled() {
                        return;
                    }
                } else {
                    for id in wanted.apps {
                        let update = tokio::select! {
                            _ = cancel.cancelled() => return,
                            got = fetch_app(&client, &id) => got,
                        };
                        let Some(update) = update else {
                            // A snapshot brings this app and the rest (and, if Marathon is down,
                            // says so once instead of each app waiting for its deadline).
                            triggers.all();
                            break;
                        };
                        if tx.send(update).is_err() {
                            return;
                        }
                    }
                    continue;
                }
            }
        }
        // The snapshot covers whatever was asked until now.
        triggers.take();
        let mut failed = Vec::new();
        let fetched = tokio::select! {
            _ = cancel.cancelled() => return,
            fetched = client.snapshot_noting(&mut failed) => fetched,
        };
        if fetched.is_ok() && !failed.is_empty() {
            // Another URL answered: the state is good, but the status shows the one at fault.
            if tx.send(Update::Degraded(failed.join("; "))).is_err() {
                return;
            }
        }
        let update = match fetched {
            Ok((text, from)) => {
                backoff = Duration::from_secs(1);
                next = Instant::now() + every.resync;
                // Parsing a large document is CPU work: off the async threads.
                let parsed =
                    tokio::task::spawn_blocking(move || Update::document(text, from)).await;
                match parsed {
                    Ok(update) => update,
                    Err(e) => Update::Failed(format!("parsing the snapshot: {e}")),
                }
            }
            Err(e) => {
                next = Instant::now() + backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                Update::Failed(e.to_string())
            }
        };
        if tx.send(update).is_err() {
            return;
        }
    }
}

/// The app `id` alone, read, as an update; None when it must come with a snapshot instead (the
/// reason is logged).
async fn fetch_app(client: &Client, id: &str) -> Option<Update> {
    let (text, from) = match client.app(id).await {
        Ok(Some(got)) => got,
        Ok(None) => {
            tracing::debug!(app = %id, "Marathon has no such app (or no app id): fetching a snapshot");
            return None;
        }
        Err(e) => {
            tracing::warn!(app = %id, error = %crate::secrets::text(&e.to_string()), "cannot fetch the app alone: fetching a snapshot");
            return None;
        }
    };
    match Snapshot::parse_owned(text, &from) {
        Ok(snapshot) if snapshot.app_ids() == [id] => Some(Update::App {
            snapshot,
            // What the status shows as where the last sync came from.
            from: format!("{from} (the app {id} alone)"),
        }),
        Ok(_) => {
            tracing::warn!(app = %id, %from, "the answer for the app is not that app alone: fetching a snapshot");
            None
        }
        Err(e) => {
            tracing::warn!(app = %id, error = %e, "the answer for the app is not an app: fetching a snapshot");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Apps asked for are kept until taken; more than `MAX_APP_FETCHES` of them, or a snapshot,
    /// is a snapshot; once the snapshot task is gone, asking says so.
    #[tokio::test]
    async fn asks_are_kept_until_taken() {
        let t = Triggers::default();
        assert!(t.app("/a") && t.app("/b") && t.app("/a"));
        // The permit stored by the asks wakes a task that waits only now.
        tokio::time::timeout(Duration::from_secs(1), t.notify.notified())
            .await
            .expect("a stored wake-up");
        let w = t.take();
        assert!(!w.all);
        assert_eq!(w.apps.into_iter().collect::<Vec<_>>(), ["/a", "/b"]);
        assert_eq!(t.take(), Wanted::default());

        for i in 0..=MAX_APP_FETCHES {
            t.app(&format!("/app{i}"));
        }
        assert_eq!(
            t.take(),
            Wanted {
                all: true,
                apps: BTreeSet::new()
            }
        );
        t.all();
        t.app("/late");
        assert_eq!(
            t.take(),
            Wanted {
                all: true,
                apps: BTreeSet::new()
            },
            "an app asked with a snapshot pending comes with the snapshot"
        );
        t.closed.store(true, Ordering::Relaxed);
        assert!(!t.app("/a") && !t.all());
    }
}
