//! The agent: attach the data plane, then keep the kernel maps equal to what the Marathon
//! document says, applying only differences, until asked to stop.
use crate::{
    dataplane::Applied,
    dataplane::{self, Writer},
    error::Result,
    marathon::Problem,
    marathon::{self, AppResult, Options},
    marathon_client::{Client, ClientConfig, RELEVANT_EVENTS, redact},
    metrics::{self, Metrics},
    status::{self, AgentStatus},
};
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    time::{Duration, Instant, SystemTime},
};

/// Where the Marathon state comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A `/v2/apps?embed=apps.tasks` body on disk, re-read when it changes.
    File { path: PathBuf, poll: Duration },
    /// A live Marathon: a snapshot on start and every `resync`, and one `debounce` after each
    /// relevant event of its event stream.
    Marathon {
        client: ClientConfig,
        resync: Duration,
        debounce: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub source: Source,
    pub ifaces: Vec<String>,
    pub pin_dir: PathBuf,
    pub options: Options,
    /// The status socket (mode 0600).
    pub status_socket: PathBuf,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The Maglev tables' size and seed.
    pub table: dataplane::TableConfig,
    /// Show the data plane's per-packet debug log (needs a build with the `bpf-log` feature).
    pub bpf_log: bool,
}

impl Source {
    fn describe(&self) -> String {
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
}

/// What a source hands the reconciler.
enum Update {
    Document { text: String, from: String },
    Failed(String),
}

/// Runs until `shutdown` is set. The data plane stays pinned and forwarding when this returns.
pub fn run(cfg: &AgentConfig, shutdown: Arc<AtomicBool>) -> Result<()> {
    check_forwarding();
    let attached = dataplane::attach(&cfg.pin_dir, &cfg.ifaces, &cfg.table)?;
    tracing::info!(
        program_id = attached.program_id,
        attached = ?attached.attached,
        replaced = ?attached.replaced,
        detached = ?attached.detached,
        pin_dir = %cfg.pin_dir.display(),
        "data plane attached"
    );
    if cfg.bpf_log {
        follow_bpf_log(attached.program_id, shutdown.clone())?;
    }
    let mut writer = Writer::open(&cfg.pin_dir)?;
    tracing::info!(
        services = writer.state().services.len(),
        "adopted the services in the kernel maps"
    );
    let shared: status::Shared = Arc::new(std::sync::Mutex::new(AgentStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        started_at: status::now(),
        source: cfg.source.describe(),
        pin_dir: cfg.pin_dir.display().to_string(),
        interfaces: cfg.ifaces.clone(),
        program_id: attached.program_id,
        ..Default::default()
    }));
    status::serve(&cfg.status_socket, shared.clone(), shutdown.clone())?;
    tracing::info!(socket = %cfg.status_socket.display(), "status socket ready");
    let metrics = Arc::new(std::sync::Mutex::new(Metrics::new()));
    if let Some(addr) = cfg.metrics_listen {
        let bound = metrics::serve(
            addr,
            metrics.clone(),
            shared.clone(),
            cfg.pin_dir.clone(),
            shutdown.clone(),
        )?;
        tracing::info!(listen = %bound, "serving Prometheus metrics at /metrics");
    }
    let (tx, rx) = mpsc::channel();
    match &cfg.source {
        Source::File { path, poll } => {
            let (path, poll, stop) = (path.clone(), *poll, shutdown.clone());
            std::thread::spawn(move || watch_file(path, poll, tx, stop));
        }
        Source::Marathon {
            client,
            resync,
            debounce,
        } => {
            // The stream may be silent on a quiet cluster; after this long it is reopened.
            let idle = (*resync * 3).max(Duration::from_secs(10));
            let client = Arc::new(Client::new(client.clone(), idle)?);
            let (trigger_tx, trigger_rx) = mpsc::channel();
            let (c, stop) = (client.clone(), shutdown.clone());
            std::thread::spawn(move || follow_events(&c, trigger_tx, &stop));
            let (resync, debounce, stop) = (*resync, *debounce, shutdown.clone());
            std::thread::spawn(move || {
                fetch_snapshots(&client, resync, debounce, trigger_rx, tx, &stop)
            });
        }
    }
    let mut sync = Sync::default();
    while !shutdown.load(Ordering::Relaxed) {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Update::Document { text, from }) => {
                let t = Instant::now();
                let outcome = sync.apply(&text, &from, &cfg.options, &mut writer);
                let took = t.elapsed().as_secs_f64();
                if let Ok(m) = metrics.lock() {
                    m.reconcile.observe(took);
                }
                if let Ok(mut st) = shared.lock() {
                    st.last_reconcile_seconds = took;
                    match outcome {
                        Ok((problems, applied)) => {
                            st.last_sync = Some(status::now());
                            st.last_sync_from = Some(from);
                            st.problems = problems;
                            if !applied.failed.is_empty() {
                                st.last_error = Some(applied.failed.join("; "));
                                st.last_error_at = Some(status::now());
                            }
                            st.last_apply = Some(applied);
                        }
                        Err(e) => record_error(&mut st, e),
                    }
                }
            }
            Ok(Update::Failed(e)) => {
                tracing::error!(error = %e, "no Marathon state this time; the kernel keeps serving the last good state");
                if let Ok(mut st) = shared.lock() {
                    record_error(&mut st, e);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    tracing::info!("agent stopping; the data plane stays pinned and keeps forwarding");
    Ok(())
}

/// Relays the program's aya-log records (per packet: for debugging only) to this process's log.
#[cfg(feature = "bpf-log")]
fn follow_bpf_log(program_id: u32, stop: Arc<AtomicBool>) -> Result<()> {
    let mut logger = aya_log::EbpfLogger::init_from_id(program_id).map_err(|e| {
        crate::Error::Config(format!(
            "reading the data plane's log of program {program_id}: {e}"
        ))
    })?;
    tracing::warn!("relaying the data plane's per-packet debug log (costly: for debugging only)");
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            logger.flush();
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    Ok(())
}

#[cfg(not(feature = "bpf-log"))]
fn follow_bpf_log(_program_id: u32, _stop: Arc<AtomicBool>) -> Result<()> {
    Err(crate::Error::Config(
        "--bpf-log needs an lbctl built with its data-plane log: `cargo build -p lbctl --features bpf-log`"
            .into(),
    ))
}

fn record_error(st: &mut AgentStatus, e: String) {
    st.last_error = Some(e);
    st.last_error_at = Some(status::now());
    st.sync_errors += 1;
}

/// Sends the file's text whenever it changes; a read error is reported once until it changes.
fn watch_file(path: PathBuf, poll: Duration, tx: Sender<Update>, stop: Arc<AtomicBool>) {
    let mut last_seen: Option<(SystemTime, u64)> = None;
    let mut last_text: Option<String> = None;
    let mut last_error: Option<String> = None;
    let from = path.display().to_string();
    while !stop.load(Ordering::Relaxed) {
        let seen = std::fs::metadata(&path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if seen != last_seen || last_text.is_none() {
            last_seen = seen;
            let update = match std::fs::read_to_string(&path) {
                Ok(text) if Some(&text) != last_text.as_ref() => {
                    last_error = None;
                    last_text = Some(text.clone());
                    Some(Update::Document {
                        text,
                        from: from.clone(),
                    })
                }
                Ok(_) => None,
                Err(e) => {
                    let e = format!("cannot read {from}: {e}");
                    (last_error.as_ref() != Some(&e)).then(|| {
                        last_error = Some(e.clone());
                        Update::Failed(e)
                    })
                }
            };
            if let Some(u) = update
                && tx.send(u).is_err()
            {
                return;
            }
        }
        sleep_unless(&stop, poll);
    }
}

/// Follows Marathon's event stream, sending a trigger for every event that may change apps or
/// tasks; reconnects with backoff.
fn follow_events(client: &Client, trigger: Sender<()>, stop: &AtomicBool) {
    let mut backoff = Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) {
        match client.events() {
            Ok(mut stream) => {
                tracing::info!(source = %stream.source, "following Marathon's event stream");
                backoff = Duration::from_secs(1);
                loop {
                    match stream.next_event() {
                        Ok(t) if RELEVANT_EVENTS.contains(&t.as_str()) => {
                            tracing::debug!(event = %t, "Marathon event");
                            if trigger.send(()).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "event stream lost; reconnecting");
                            break;
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot open Marathon's event stream");
                sleep_unless(stop, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Fetches a full snapshot on start, every `resync`, and once things are quiet for `debounce`
/// after a trigger. Failures are retried with backoff, and never turn into an empty state.
fn fetch_snapshots(
    client: &Client,
    resync: Duration,
    debounce: Duration,
    triggers: Receiver<()>,
    tx: Sender<Update>,
    stop: &AtomicBool,
) {
    let mut next = Instant::now();
    let mut backoff = Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            match triggers.recv_timeout((next - now).min(Duration::from_millis(100))) {
                Ok(()) => {
                    // Debounce: wait until no trigger came for `debounce`, at most 4 times that.
                    let until = Instant::now() + debounce * 4;
                    while Instant::now() < until && triggers.recv_timeout(debounce).is_ok() {}
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    // No event stream any more: plain periodic snapshots.
                    sleep_unless(stop, next.saturating_duration_since(Instant::now()));
                }
            }
        }
        let update = match client.snapshot() {
            Ok((text, from)) => {
                backoff = Duration::from_secs(1);
                next = Instant::now() + resync;
                Update::Document { text, from }
            }
            Err(e) => {
                next = Instant::now() + backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                Update::Failed(e.to_string())
            }
        };
        if tx.send(update).is_err() {
            return;
        }
    }
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
    /// The problems of the previous document: each is logged once, when it appears.
    last_problems: Vec<Problem>,
    /// The resources that were at least 90% used after the previous apply: warned of once.
    nearly_full: Vec<&'static str>,
}

impl Sync {
    /// Derives `text` and writes the difference to the kernel. A document that cannot be read
    /// changes nothing; an app whose ports or labels are broken keeps what it had before.
    /// Returns the document's problems and what was written, or why the document was ignored.
    pub fn apply(
        &mut self,
        text: &str,
        what: &str,
        opts: &Options,
        writer: &mut Writer,
    ) -> std::result::Result<(Vec<Problem>, Applied), String> {
        let results = match marathon::parse_document(text, what) {
            Ok(apps) => apps
                .iter()
                .map(|(id, app)| marathon::derive_app(id, app, opts))
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::error!(error = %e, "ignoring this version of the document; the kernel keeps serving the last good state");
                return Err(e.to_string());
            }
        };
        let mut chosen = Vec::with_capacity(results.len());
        let mut next_good = BTreeMap::new();
        for r in results {
            for p in r
                .problems
                .iter()
                .filter(|p| !self.last_problems.contains(p))
            {
                tracing::error!(problem = %p, "bad Marathon data");
            }
            if r.config_broken
                && let Some(old) = self.last_good.get(&r.id)
            {
                tracing::warn!(app = %r.id, "keeping this app's last good services until its definition is fixed");
                next_good.insert(r.id.clone(), old.clone());
                chosen.push(old.clone());
                continue;
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
        let full = writer.state().usage().above(&writer.table(), 90);
        for (what, used, room, flag) in &full {
            if !self.nearly_full.contains(what) {
                tracing::warn!(
                    used,
                    room,
                    "the data plane's {what} are nearly all in use; raise {flag} (a new size needs `lbctl down` and drops tracked flows)"
                );
            }
        }
        self.nearly_full = full.iter().map(|f| f.0).collect();
        self.last_problems = derived.problems.clone();
        Ok((derived.problems, applied))
    }
}
