//! The two tasks that follow a live Marathon on the agent's tokio runtime: one reads the event
//! stream and sends a trigger for every relevant event, one fetches snapshots (on start, every
//! resync, once a burst of triggers is quiet) and hands them to the agent's channel. Both end when
//! the runtime's cancellation token is cancelled or the other end of their channel is gone.
use super::{
    events::{OVERSIZED_EVENT, RELEVANT_EVENTS},
    marathon::Client,
    update::Update,
};
use std::{
    sync::{Arc, mpsc},
    time::Duration,
};
use tokio::{
    sync::mpsc::{Receiver, Sender, error::TrySendError},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

/// The triggers that may wait for the snapshot task: more add nothing (a snapshot is due anyway).
pub(crate) const TRIGGERS: usize = 64;

/// The longest wait between two attempts to open the event stream.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Sends a trigger without waiting. False when the snapshot task is gone.
pub(crate) fn trigger(tx: &Sender<()>) -> bool {
    !matches!(tx.try_send(()), Err(TrySendError::Closed(())))
}

/// Follows Marathon's event stream, sending a trigger for every event that may change apps or
/// tasks. A lost stream is reopened at once; a stream that cannot be opened is retried with
/// backoff (1 s doubling to 30 s).
pub(crate) async fn follow_events(client: Arc<Client>, tx: Sender<()>, cancel: CancellationToken) {
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
                loop {
                    let event = tokio::select! {
                        _ = cancel.cancelled() => return,
                        event = stream.next_event() => event,
                    };
                    match event {
                        Ok(t) if RELEVANT_EVENTS.contains(&t.as_str()) || t == OVERSIZED_EVENT => {
                            tracing::debug!(event = %t, "Marathon event");
                            if !trigger(&tx) {
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

/// What ended a wait for the next snapshot.
enum Woken {
    /// The resync (or retry) time came.
    Due,
    /// A trigger came.
    Triggered,
    /// No trigger can come any more.
    NoTriggers,
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
/// after a trigger (at most 4 times that after the first). Failures are retried with backoff,
/// and never turn into an empty state. The document is parsed on a blocking thread.
pub(crate) async fn fetch_snapshots(
    client: Arc<Client>,
    every: Fetching,
    mut triggers: Receiver<()>,
    tx: mpsc::Sender<Update>,
    cancel: CancellationToken,
) {
    let mut next = Instant::now();
    let mut backoff = Duration::from_secs(1);
    let mut triggers_open = true;
    loop {
        let woken = tokio::select! {
            _ = cancel.cancelled() => Woken::Cancelled,
            _ = tokio::time::sleep_until(next) => Woken::Due,
            t = triggers.recv(), if triggers_open => match t {
                Some(()) => Woken::Triggered,
                None => Woken::NoTriggers,
            },
        };
        match woken {
            Woken::Cancelled => return,
            // No event stream any more: plain periodic snapshots.
            Woken::NoTriggers => {
                triggers_open = false;
                continue;
            }
            Woken::Due => {}
            Woken::Triggered => {
                // Debounce: wait until no trigger came for `debounce`, at most 4 times that.
                let until = Instant::now() + every.debounce * 4;
                loop {
                    let quiet = tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep_until(until) => true,
                        t = tokio::time::timeout(every.debounce, triggers.recv()) => !matches!(t, Ok(Some(()))),
                    };
                    if quiet {
                        break;
                    }
                }
            }
        }
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
