//! The agent's tokio runtime: the signals that stop it, and the services it answers (the DNS
//! server, the status socket) as tasks. A cancellation token tells every task to end; it is
//! cancelled by SIGINT or SIGTERM, by whoever sets the agent's shutdown flag, and when the
//! runtime is dropped.
use crate::error::{Error, Result};
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The runtime and its cancellation token. Dropping it cancels the token and stops the tasks.
pub struct AgentRuntime {
    runtime: tokio::runtime::Runtime,
    cancel: CancellationToken,
}

impl AgentRuntime {
    /// Starts the runtime (two worker threads) and the task that turns SIGINT and SIGTERM, or
    /// `shutdown` set by anyone else, into `shutdown` set and the token cancelled.
    pub fn start(shutdown: Arc<AtomicBool>) -> Result<AgentRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lb-agent-rt")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the agent's tokio runtime", e))?;
        let cancel = CancellationToken::new();
        let (mut int, mut term) = {
            use tokio::signal::unix::{SignalKind, signal};
            let _guard = runtime.enter();
            let int = signal(SignalKind::interrupt())
                .map_err(|e| Error::io("installing the SIGINT handler", e))?;
            let term = signal(SignalKind::terminate())
                .map_err(|e| Error::io("installing the SIGTERM handler", e))?;
            (int, term)
        };
        let token = cancel.clone();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = int.recv() => {
                        tracing::info!("SIGINT: stopping");
                        break;
                    }
                    _ = term.recv() => {
                        tracing::info!("SIGTERM: stopping");
                        break;
                    }
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        if shutdown.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                }
            }
            shutdown.store(true, Ordering::Relaxed);
            token.cancel();
        });
        Ok(AgentRuntime { runtime, cancel })
    }

    /// Where tasks are spawned.
    pub fn handle(&self) -> Handle {
        self.runtime.handle().clone()
    }

    /// Cancelled when the agent stops.
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

impl Drop for AgentRuntime {
    /// Cancels the token; the runtime, dropped next, stops its tasks.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
