//! The agent: attach the data plane, then keep the kernel maps equal to what the Marathon
//! document says, applying only differences, until asked to stop.
use crate::{
    dataplane::{self, Writer},
    error::Result,
    marathon::{self, AppResult, Options},
};
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime},
};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// A `/v2/apps?embed=apps.tasks` body on disk, re-read when it changes.
    pub apps_file: PathBuf,
    pub ifaces: Vec<String>,
    pub pin_dir: PathBuf,
    /// How often the file is checked for changes.
    pub poll: Duration,
    pub options: Options,
}

/// Runs until `shutdown` is set. The data plane stays pinned and forwarding when this returns.
pub fn run(cfg: &AgentConfig, shutdown: &AtomicBool) -> Result<()> {
    check_forwarding();
    let attached = dataplane::attach(&cfg.pin_dir, &cfg.ifaces)?;
    tracing::info!(
        program_id = attached.program_id,
        attached = ?attached.attached,
        replaced = ?attached.replaced,
        detached = ?attached.detached,
        pin_dir = %cfg.pin_dir.display(),
        "data plane attached"
    );
    let mut writer = Writer::open(&cfg.pin_dir)?;
    tracing::info!(
        services = writer.state().services.len(),
        "adopted the services in the kernel maps"
    );
    let mut sync = Sync::default();
    let mut last_seen: Option<(SystemTime, u64)> = None;
    let mut last_text: Option<String> = None;
    while !shutdown.load(Ordering::Relaxed) {
        let seen = std::fs::metadata(&cfg.apps_file)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if seen != last_seen || last_text.is_none() {
            last_seen = seen;
            match std::fs::read_to_string(&cfg.apps_file) {
                Ok(text) if Some(&text) != last_text.as_ref() => {
                    sync.apply(
                        &text,
                        &cfg.apps_file.display().to_string(),
                        &cfg.options,
                        &mut writer,
                    );
                    last_text = Some(text);
                }
                Ok(_) => {}
                Err(e) => {
                    if sync.last_error.as_deref() != Some("read") {
                        tracing::error!(
                            file = %cfg.apps_file.display(),
                            error = %e,
                            "cannot read the apps file; the kernel keeps serving the last good state"
                        );
                        sync.last_error = Some("read".into());
                    }
                }
            }
        }
        sleep_unless(shutdown, cfg.poll);
    }
    tracing::info!("agent stopping; the data plane stays pinned and keeps forwarding");
    Ok(())
}

fn sleep_unless(shutdown: &AtomicBool, total: Duration) {
    let end = Instant::now() + total;
    while !shutdown.load(Ordering::Relaxed) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50).min(total));
    }
}

fn check_forwarding() {
    match std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward") {
        Ok(v) if v.trim() == "1" => {}
        _ => tracing::warn!(
            "net.ipv4.ip_forward is not 1: packets the XDP program hands to the kernel (first \
             packets to a new neighbour) will not be forwarded"
        ),
    }
}

/// The reconciling state: what each app last contributed in good order.
#[derive(Default)]
pub struct Sync {
    last_good: BTreeMap<String, AppResult>,
    pub last_error: Option<String>,
}

impl Sync {
    /// Derives `text` and writes the difference to the kernel. A document that cannot be read
    /// changes nothing; an app whose ports or labels are broken keeps what it had before.
    pub fn apply(&mut self, text: &str, what: &str, opts: &Options, writer: &mut Writer) {
        let results = match marathon::parse_document(text, what) {
            Ok(apps) => apps
                .iter()
                .map(|(id, app)| marathon::derive_app(id, app, opts))
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::error!(error = %e, "ignoring this version of the document; the kernel keeps serving the last good state");
                self.last_error = Some(e.to_string());
                return;
            }
        };
        let mut chosen = Vec::with_capacity(results.len());
        let mut next_good = BTreeMap::new();
        for r in results {
            for p in &r.problems {
                tracing::error!(problem = %p, "bad Marathon data");
            }
            if r.config_broken {
                if let Some(old) = self.last_good.get(&r.id) {
                    tracing::warn!(app = %r.id, "keeping this app's last good services until its definition is fixed");
                    next_good.insert(r.id.clone(), old.clone());
                    chosen.push(old.clone());
                    continue;
                }
            }
            next_good.insert(r.id.clone(), r.clone());
            chosen.push(r);
        }
        self.last_good = next_good;
        let derived = marathon::merge(&chosen, opts);
        let applied = writer.apply(&derived.services);
        for s in &applied.added {
            tracing::info!(service = %s, "service added");
        }
        for s in &applied.changed {
            tracing::info!(service = %s, "service changed");
        }
        for s in &applied.removed {
            tracing::info!(service = %s, "service removed");
        }
        for s in &applied.failed {
            tracing::error!(service = %s, "service not applied; it keeps what it had");
        }
        if applied.is_noop() {
            tracing::debug!(unchanged = applied.unchanged, "no change");
        }
        self.last_error = if applied.failed.is_empty() {
            None
        } else {
            Some(applied.failed.join("; "))
        };
    }
}
