//! The agent: check every setting and open every resource, then attach the data plane, then
//! keep the kernel maps equal to what the Marathon document says, applying only differences,
//! until asked to stop. The sources (`source`) read and resolve documents on their own
//! threads; the reconcile loop here derives, merges and writes.
use crate::{
    dataplane::{self, Applied, Store, Writer},
    dns,
    error::{Error, Result},
    guard::{RemovalGuard, RemovalPolicy, Verdict},
    marathon::{self, AppResult, Merged, Options, Problem, Snapshot},
    metrics::{self, Metrics},
    model::Desired,
    source::Update,
    status::{self, AgentStatus},
};
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

pub use crate::source::Source;

/// Everything the agent runs with, checked (built from the settings by `config`).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where Marathon's state comes from.
    pub source: Source,
    /// The interfaces to attach to.
    pub ifaces: Vec<String>,
    /// Where the data plane's maps and links are pinned.
    pub pin_dir: PathBuf,
    /// The derivation's settings.
    pub options: Options,
    /// The status socket (mode 0600).
    pub status_socket: PathBuf,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The Maglev tables' size and seed.
    pub table: dataplane::TableConfig,
    /// Show the data plane's per-packet debug log (needs a build with the `bpf-log` feature).
    pub bpf_log: bool,
    /// When a snapshot's removal is large enough to be held until confirmed.
    pub removal: RemovalPolicy,
    /// How task host names are resolved (cache and deadline).
    pub resolve: crate::source::resolver::ResolverConfig,
    /// The DNS server of named VIPs (off when it listens nowhere).
    pub dns: dns::DnsConfig,
    /// The cgroup whose sockets the local path serves (None: off).
    pub local: Option<PathBuf>,
    /// What happens to the local path's connected sockets whose backend left.
    pub local_backend_gone: dataplane::BackendGone,
}

/// Runs until `shutdown` is set. The data plane stays pinned and forwarding when this returns.
///
/// Everything that can be refused is refused before the kernel is touched: `--bpf-log` in a
/// build without it, an interface that does not exist, the source (its URLs and CA file), another
/// agent holding the pin directory's or the status socket's lock (`lock`), the status socket and
/// the metrics listener. Only then is the data plane loaded (or resized) and attached.
pub fn run(cfg: &AgentConfig, shutdown: Arc<AtomicBool>) -> Result<()> {
    // Signals (SIGINT, SIGTERM) set `shutdown` from here on; the status socket and the DNS
    // server are tasks of this runtime.
    fix_heap_thresholds();
    let runtime = crate::runtime::AgentRuntime::start(shutdown.clone())?;
    let bpf_log = BpfLog::check(cfg.bpf_log, !cfg.ifaces.is_empty())?;
    dataplane::check_ifaces(&cfg.ifaces)?;
    let source = cfg.source.open()?;
    // One agent per data plane: both locks are held until this returns (or the process dies).
    let _locks = take_locks(cfg)?;
    let status_socket = status::bind(&cfg.status_socket)?;
    let metrics_listener = cfg.metrics_listen.map(metrics::bind).transpose()?;
    let dns_listener = dns::bind(&cfg.dns.listen)?;
    let names = marathon::NameBook::open(&marathon::book_path(&cfg.status_socket))?;
    check_forwarding();
    // The source starts now: the first document is fetched, parsed and its task hosts resolved
    // on the source's threads while the kernel verifies the programs (a few hundred ms). It
    // waits in the channel until the loop below takes it.
    let cache = marathon::AppCache::default();
    let (tx, rx) = mpsc::channel();
    let refresh = source.start(
        tx,
        shutdown.clone(),
        cfg.resolve,
        cache.clone(),
        &runtime.handle(),
        runtime.token(),
    );

    let zone = dns::ZoneHandle::new(&cfg.dns);
    let mut sync = Sync {
        names,
        zone: zone.clone(),
        cache,
        ..Sync::new(cfg.removal)
    };

    // Now the kernel.
    let Started {
        attached,
        local,
        mut writer,
        first,
        mut held,
    } = start_data_plane(cfg, &mut sync, &rx)?;
    bpf_log.start(attached.program_id, &runtime.handle(), runtime.token())?;
    let mut gone = dataplane::GoneWatch::new(
        &cfg.pin_dir,
        cfg.local.as_deref(),
        cfg.local_backend_gone,
        writer.state(),
    );
    let shared: status::Shared = Arc::new(std::sync::Mutex::new(AgentStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        started_at: status::now(),
        source: cfg.source.describe(),
        pin_dir: cfg.pin_dir.display().to_string(),
        interfaces: cfg.ifaces.clone(),
        hooks: attached.hooks.clone(),
        program_id: attached.program_id,
        local,
        ..Default::default()
    }));
    status::serve(
        status_socket,
        shared.clone(),
        zone.clone(),
        &runtime.handle(),
        runtime.token(),
    )?;
    tracing::info!(socket = %cfg.status_socket.display(), "status socket ready");
    let metrics = Arc::new(std::sync::Mutex::new(Metrics::new()));
    if let Some(listener) = metrics_listener {
        let bound = metrics::serve(
            listener,
            metrics.clone(),
            shared.clone(),
            cfg.pin_dir.clone(),
            &runtime.handle(),
            runtime.token(),
        )?;
        tracing::info!(listen = %bound, "serving Prometheus metrics at /metrics");
    }
    if !dns_listener.addrs.is_empty() {
        let addrs = dns_listener.addrs.clone();
        dns::serve(
            dns_listener,
            zone.clone(),
            &cfg.dns,
            &runtime.handle(),
            runtime.token(),
        )?;
        tracing::info!(listen = ?addrs, zone = dns::ZONE, "serving DNS for the named VIPs");
    }
    if let Some((took, outcome, from)) = first {
        record_outcome(&shared, &metrics, &sync, took, Ok(outcome), from);
        release_free_heap();
    }
    // The flow tables are the packet programs': only an agent with interfaces drives them.
    let mut evictions = match cfg.ifaces.is_empty() {
        true => None,
        false => dataplane::EvictionWatch::open(&cfg.pin_dir)
            .inspect_err(
                |e| tracing::warn!(error = %e, "the flow tables' evictions will not be watched"),
            )
            .ok(),
    };
    while !shutdown.load(Ordering::Relaxed) {
        if let Some(w) = evictions.as_mut() {
            w.poll(Instant::now());
        }
        if sync.confirmation_due(Instant::now()) {
            tracing::info!("asking the source for a snapshot to confirm the held removal");
            refresh.request();
        }
        let received = match held.take() {
            Some(update) => Ok(update),
            None => rx.recv_timeout(Duration::from_millis(100)),
        };
        // `document`: a whole document, whose reading freed much memory.
        let (t, outcome, from, document) = match received {
            Ok(Update::Document { snapshot, from }) => {
                let t = Instant::now();
                let outcome = match snapshot {
                    Ok(snapshot) => Ok(sync.apply(&snapshot, &cfg.options, &mut writer)),
                    Err(e) => {
                        let e = crate::secrets::text(&e);
                        tracing::error!(error = %e, "ignoring this version of the document; the kernel keeps serving the last good state");
                        Err(e)
                    }
                };
                (t, outcome, from, true)
            }
            Ok(Update::App { snapshot, from }) => {
                let t = Instant::now();
                match sync.apply_app(&snapshot, &cfg.options, &mut writer) {
                    Some(done) => (t, Ok(done), from, false),
                    None => {
                        tracing::debug!(%from, "an app the last document did not have: asking for a snapshot");
                        refresh.request();
                        continue;
                    }
                }
            }
            Ok(Update::Failed(e)) => {
                // Whatever the source quoted, no URL's credentials reach the log or the status.
                let e = crate::secrets::text(&e);
                tracing::error!(error = %e, "no Marathon state this time; the kernel keeps serving the last good state");
                if let Ok(mut st) = shared.lock() {
                    record_error(&mut st, e);
                }
                continue;
            }
            Ok(Update::Degraded(e)) => {
                let e = crate::secrets::text(&e);
                tracing::error!(error = %e, "a Marathon URL failed; the next one was tried");
                if let Ok(mut st) = shared.lock() {
                    st.last_error = Some(e);
                    st.last_error_at = Some(status::now());
                }
                continue;
            }
            Err(RecvTimeoutError::Timeout) => {
                check_whole(&mut sync, cfg, &mut writer, &shared, gone.as_mut());
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if let (Ok(done), Some(g)) = (&outcome, gone.as_mut()) {
            g.after(&done.1, writer.state());
        }
        let took = t.elapsed().as_secs_f64();
        record_outcome(&shared, &metrics, &sync, took, outcome, from);
        if document {
            release_free_heap();
        }
    }
    tracing::info!("agent stopping; the data plane stays pinned and keeps forwarding");
    Ok(())
}

/// The relay of the data plane's aya-log records (per packet: for debugging only), checked
/// before the kernel is touched and started once the program is attached.
struct BpfLog {
    wanted: bool,
}

impl BpfLog {
    /// Refuses `--bpf-log` in a build without the data plane's log, or without an interface
    /// (`ifaces`): the log is the XDP and TC programs', which only an interface loads.
    fn check(wanted: bool, ifaces: bool) -> Result<BpfLog> {
        if wanted && !cfg!(feature = "bpf-log") {
            return Err(Error::Config(
                "--bpf-log needs an lbctl built with its data-plane log: `cargo build -p lbctl --features bpf-log`"
                    .into(),
            ));
        }
        if wanted && !ifaces {
            return Err(Error::Config(
                "--bpf-log relays the log of the XDP and TC programs: give an --iface (the local path's programs have no log)"
                    .into(),
            ));
        }
        Ok(BpfLog { wanted })
    }

    /// Relays program `program_id`'s records to this process's log until `stop`: a task of
    /// `runtime` that reads the records when the log's ring buffer is readable (`AsyncFd`).
    #[cfg(feature = "bpf-log")]
    fn start(
        self,
        program_id: u32,
        runtime: &tokio::runtime::Handle,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<()> {
        if !self.wanted {
            return Ok(());
        }
        let logger = aya_log::EbpfLogger::init_from_id(program_id).map_err(|e| {
            Error::Config(format!(
                "reading the data plane's log of program {program_id}: {e}"
            ))
        })?;
        let mut ready = {
            let _guard = runtime.enter();
            // SAFETY: the fd is the logger's own ring buffer, open from `init_from_id` until
            // the logger is dropped, which only the AsyncFd that owns it does.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    logger,
                    tokio::io::Interest::READABLE,
                )
            }
            .map_err(|e| Error::io("watching the data plane's log", e.into_parts().1))?
        };
        tracing::warn!(
            "relaying the data plane's per-packet debug log (costly: for debugging only)"
        );
        runtime.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    r = ready.readable_mut() => match r {
                        Ok(mut guard) => {
                            guard.get_inner_mut().flush();
                            guard.clear_ready();
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "the data plane's log cannot be read any more");
                            break;
                        }
                    },
                }
            }
        });
        Ok(())
    }

    /// Nothing to relay: `check` refused the flag in this build.
    #[cfg(not(feature = "bpf-log"))]
    fn start(
        self,
        _program_id: u32,
        _runtime: &tokio::runtime::Handle,
        _stop: tokio_util::sync::CancellationToken,
    ) -> Result<()> {
        debug_assert!(!self.wanted, "check() refuses --bpf-log in this build");
        Ok(())
    }
}

/// The locks of the pin directory and of the status socket, before anything is touched: a
/// second agent on either is refused, naming the first one's pid.
fn take_locks(cfg: &AgentConfig) -> Result<[crate::lock::Lock; 2]> {
    use crate::lock::{Guarded, acquire};
    let pins = acquire(
        Guarded::PinDir(&cfg.pin_dir),
        "stop that agent first, or give this one another --pin-dir",
    )?;
    let socket = acquire(
        Guarded::Socket(&cfg.status_socket),
        "stop that agent first, or give this one another --status-socket",
    )?;
    tracing::info!(
        pin_dir_lock = %pins.path().display(),
        socket_lock = %socket.path().display(),
        "this agent alone drives this data plane"
    );
    Ok([pins, socket])
}

/// What `start_data_plane` did: the programs attached, the writer of the maps, and what came
/// from the source while the kernel verified the programs.
struct Started {
    attached: dataplane::Attached,
    local: dataplane::LocalAttached,
    writer: Writer,
    /// The first document, when it was written before the programs were attached: how long
    /// that took (seconds), what it did, and where it came from.
    first: Option<(f64, (Vec<Problem>, Applied), String)>,
    /// What came from the source then and was not applied: the reconcile loop takes it first.
    held: Option<Update>,
}

/// Loads and attaches the programs (`attach`, `attach_local`) and opens the writer.
///
/// A fresh data plane (nothing pinned in the pin directory, so no program of ours runs on its
/// maps) gets its maps first, and the first document is written into them while the kernel
/// verifies the programs on another thread (a few hundred ms of CPU), instead of after. A pinned
/// one (a restart, an upgrade) keeps its running programs on its maps until the new ones are
/// attached, and only then is written to: programs of an older agent never see this one's
/// writes.
fn start_data_plane(
    cfg: &AgentConfig,
    sync: &mut Sync,
    rx: &mpsc::Receiver<Update>,
) -> Result<Started> {
    let attach =
        |made: Option<aya::Ebpf>| -> Result<(dataplane::Attached, dataplane::LocalAttached)> {
            let attached = match made {
                Some(made) => dataplane::attach_made(made, &cfg.pin_dir, &cfg.ifaces, &cfg.table)?,
                None => dataplane::attach(&cfg.pin_dir, &cfg.ifaces, &cfg.table)?,
            };
            tracing::info!(
                program_id = attached.program_id,
                attached = ?attached.attached,
                replaced = ?attached.replaced,
                detached = ?attached.detached,
                pin_dir = %cfg.pin_dir.display(),
                "data plane attached"
            );
            let local = dataplane::attach_local(&cfg.pin_dir, cfg.local.as_deref(), &cfg.table)?;
            tracing::info!(?local, "local path");
            Ok((attached, local))
        };
    if !dataplane::is_fresh(&cfg.pin_dir) {
        let (attached, local) = attach(None)?;
        dataplane::retire_predecessors(&cfg.pin_dir)?;
        let writer = Writer::open(&cfg.pin_dir)?;
        tracing::info!(
            services = writer.state().services.len(),
            "adopted the services in the kernel maps"
        );
        return Ok(Started {
            attached,
            local,
            writer,
            first: None,
            held: None,
        });
    }
    let made = dataplane::make_maps(&cfg.pin_dir, &cfg.table)?;
    let (done, writer, first, held) = std::thread::scope(|s| {
        let job = s.spawn(move || attach(Some(made)));
        // The verification starts first: opening the writer reads the new maps back.
        let mut writer = match Writer::open_made(&cfg.pin_dir) {
            Ok(w) => w,
            Err(e) => {
                // The programs attached meanwhile pass every packet: the maps hold no service.
                let _ = job.join();
                return Err(e);
            }
        };
        let (mut first, mut held) = (None, None);
        // Waits no longer than the verification: a document that comes later is the loop's.
        while !job.is_finished() {
            match rx.recv_timeout(Duration::from_millis(2)) {
                Ok(Update::Document {
                    snapshot: Ok(snapshot),
                    from,
                }) => {
                    let t = Instant::now();
                    let outcome = sync.apply(&snapshot, &cfg.options, &mut writer);
                    let took = t.elapsed().as_secs_f64();
                    tracing::info!(
                        ms = (took * 1e3) as u64,
                        "a fresh data plane: the first document was written while the kernel verified the programs"
                    );
                    first = Some((took, outcome, from));
                    break;
                }
                Ok(other) => {
                    held = Some(other);
                    break;
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let done = job
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((done, writer, first, held))
    })?;
    let (attached, local) = done?;
    Ok(Started {
        attached,
        local,
        writer,
        first,
        held,
    })
}

/// The periodic whole apply (`WHOLE_EVERY`), when it is due, while nothing else waits. It is not
/// a sync: the status keeps when and from where the last update came (a source that stopped
/// answering must still show as stale); only a service it could not apply is reported.
fn check_whole<S: Store>(
    sync: &mut Sync,
    cfg: &AgentConfig,
    writer: &mut Writer<S>,
    shared: &status::Shared,
    gone: Option<&mut dataplane::GoneWatch>,
) {
    let Some((_, applied)) = sync.check_whole(Instant::now(), &cfg.options, writer) else {
        return;
    };
    if let Some(g) = gone {
        g.after(&applied, writer.state());
    }
    if !applied.failed.is_empty()
        && let Ok(mut st) = shared.lock()
    {
        st.last_error = Some(applied.failed.join("; "));
        st.last_error_at = Some(status::now());
    }
}

/// Puts a reconcile's duration (`took`, seconds) and outcome in the metrics and the status.
fn record_outcome(
    shared: &status::Shared,
    metrics: &std::sync::Mutex<Metrics>,
    sync: &Sync,
    took: f64,
    outcome: std::result::Result<(Vec<Problem>, Applied), String>,
    from: String,
) {
    if let Ok(m) = metrics.lock() {
        m.reconcile.observe(took);
    }
    if let Ok(mut st) = shared.lock() {
        st.last_reconcile_seconds = took;
        st.holding_removal = sync.hold();
        st.held_removals = sync.held_removals();
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

fn record_error(st: &mut AgentStatus, e: String) {
    st.last_error = Some(e);
    st.last_error_at = Some(status::now());
    st.sync_errors += 1;
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

/// How often the reconciler merges and applies the whole state even when it could take only what
/// changed: a safety net that compares every service with the kernel's mirror. It runs while the
/// agent is idle (`Sync::check_whole`), so that an update does not wait for it (70 ms at 10,000
/// apps); an update pays for it only when the agent has not been idle for twice this long.
const WHOLE_EVERY: Duration = Duration::from_secs(60);

/// What a reconcile applies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// A document: the only kind that confirms a held removal.
    Document,
    /// An app fetched alone, in the place it had in the last document.
    App,
    /// The periodic whole apply of the last state, checked at this time.
    Check(Instant),
}

/// The reconciling state: what each app last contributed in good order.
#[derive(Default)]
pub struct Sync {
    /// Holds large removals until a later snapshot confirms them.
    guard: RemovalGuard,
    /// Each app's last good contribution, with the number of the document that last had it.
    last_good: HashMap<String, (u64, Arc<AppResult>)>,
    /// Documents reconciled.
    documents: u64,
    /// The apps of the last document with what each contributed: only the apps that changed
    /// are derived again. Shared with the source, which then does not read the others.
    cache: marathon::AppCache,
    /// The last merge: only the services the changed apps touch are built again.
    merger: marathon::Merger,
    /// When the last whole merge was applied (see `WHOLE_EVERY`).
    last_whole: Option<Instant>,
    /// The last apply failed nothing: the kernel holds what was merged.
    settled: bool,
    /// The problems of the previous document: each is logged once, when it appears.
    last_problems: Vec<Problem>,
    /// The resources that were at least 90% used after the previous apply: warned of once.
    nearly_full: Vec<&'static str>,
    /// The named VIPs' addresses, kept while their names live (stored beside the status socket).
    names: marathon::NameBook,
    /// The DNS zone, given the named VIPs of every apply.
    zone: dns::ZoneHandle,
}

impl Sync {
    /// A reconciler whose large removals are held as `removal` says. (`Sync::default()` holds
    /// them with the default policy.)
    pub fn new(removal: RemovalPolicy) -> Sync {
        Sync {
            guard: RemovalGuard::new(removal),
            ..Default::default()
        }
    }

    /// The large removal being held, if any.
    pub fn hold(&self) -> Option<crate::api::RemovalHold> {
        self.guard.held()
    }

    /// Large removals held since the start.
    pub fn held_removals(&self) -> u64 {
        self.guard.started()
    }

    /// The apps derived last, each under a key of its text and group (give it to
    /// [`Snapshot::resolve_hosts_with`]).
    pub fn cache(&self) -> &marathon::AppCache {
        &self.cache
    }

    /// True once per held removal, when a confirming snapshot may be fetched.
    pub fn confirmation_due(&mut self, now: Instant) -> bool {
        self.guard.confirmation_due(now)
    }

    /// Derives `snapshot` and writes the difference to the kernel. An app whose ports or labels
    /// are broken keeps what it had before; a large removal is held until confirmed (`guard`),
    /// the rest of the snapshot being applied meanwhile. Returns the document's problems and what was
    /// written.
    pub fn apply<S: Store>(
        &mut self,
        snapshot: &Snapshot,
        opts: &Options,
        writer: &mut Writer<S>,
    ) -> (Vec<Problem>, Applied) {
        let opts = &with_local_addrs(opts);
        let results = snapshot.derive_cached(opts, &self.cache);
        let mut chosen = Vec::with_capacity(results.len());
        self.documents += 1;
        let doc = self.documents;
        // The apps of this document, each counted once.
        let mut present = 0;
        for r in results {
            if self
                .last_good
                .get(&r.id)
                .is_none_or(|(seen, _)| *seen != doc)
            {
                present += 1;
            }
            chosen.push(self.choose(r, doc));
        }
        // The apps this document no longer has leave.
        if present != self.last_good.len() {
            self.last_good.retain(|_, (seen, _)| *seen == doc);
        }
        self.reconcile(&chosen, opts, writer, Pass::Document)
    }

    /// Applies one app fetched alone (`snapshot` holds it alone) in the place it had in the last
    /// document, as [`Sync::apply`] would apply that document with this app changed. None, and
    /// nothing changes, when the last document did not have the app exactly once (or there was
    /// none): only a full snapshot says where a new app goes.
    pub fn apply_app<S: Store>(
        &mut self,
        snapshot: &Snapshot,
        opts: &Options,
        writer: &mut Writer<S>,
    ) -> Option<(Vec<Problem>, Applied)> {
        let opts = &with_local_addrs(opts);
        let mut results = snapshot.derive_apps(opts);
        if results.len() != 1 {
            return None;
        }
        let r = Arc::new(results.remove(0));
        let i = self.merger.position(&r.id)?;
        let mut chosen = self.merger.apps().to_vec();
        chosen[i] = self.choose(r, self.documents);
        Some(self.reconcile(&chosen, opts, writer, Pass::App))
    }

    /// Merges and applies the whole of the last state (the apps of the last document, with those
    /// applied alone since) when the last whole apply is `WHOLE_EVERY` old at `now`; None when it
    /// is not due, or before any document.
    pub fn check_whole<S: Store>(
        &mut self,
        now: Instant,
        opts: &Options,
        writer: &mut Writer<S>,
    ) -> Option<(Vec<Problem>, Applied)> {
        let due = self
            .last_whole
            .is_some_and(|t| now.saturating_duration_since(t) >= WHOLE_EVERY);
        if !due || self.documents == 0 {
            return None;
        }
        tracing::debug!("the periodic whole apply");
        let opts = &with_local_addrs(opts);
        let chosen = self.merger.apps().to_vec();
        Some(self.reconcile(&chosen, opts, writer, Pass::Check(now)))
    }

    /// What app `r` contributes now: itself, or while its definition is broken (its ports or
    /// labels), what it last contributed in good order. Logs its new problems.
    fn choose(&mut self, r: Arc<AppResult>, doc: u64) -> Arc<AppResult> {
        for p in r
            .problems
            .iter()
            .filter(|p| !self.last_problems.contains(p))
        {
            tracing::error!(problem = %p, "bad Marathon data");
        }
        match self.last_good.get_mut(&r.id) {
            Some((seen, old)) if r.config_broken => {
                *seen = doc;
                tracing::warn!(app = %r.id, "keeping this app's last good services until its definition is fixed");
                // Its services as they were, its problems as they are now: the status must
                // say what is wrong with it.
                Arc::new(AppResult {
                    problems: r.problems.clone(),
                    ..(**old).clone()
                })
            }
            Some((seen, old)) => {
                *seen = doc;
                *old = r.clone();
                r
            }
            None => {
                self.last_good.insert(r.id.clone(), (doc, r.clone()));
                r
            }
        }
    }

    /// Merges the apps `chosen` (in document order) and writes what differs to the kernel; whole
    /// for a check, else as `WHOLE_EVERY` and the state say.
    fn reconcile<S: Store>(
        &mut self,
        chosen: &[Arc<AppResult>],
        opts: &Options,
        writer: &mut Writer<S>,
        pass: Pass,
    ) -> (Vec<Problem>, Applied) {
        let whole_at = match pass {
            Pass::Check(at) => Some(at),
            Pass::Document | Pass::App => None,
        };
        // The merge and the writer take only what changed, but whole now and then, and while
        // anything is left to settle (a held removal, a service that failed): only a whole
        // apply compares every service with the kernel's. The periodic one runs while the agent
        // is idle (`check_whole`); an update does it only if that could not run for long.
        let now = whole_at.unwrap_or_else(Instant::now);
        let whole = whole_at.is_some()
            || self.guard.held().is_some()
            || !self.settled
            || !writer.settled()
            || self
                .last_whole
                .is_none_or(|t| now.saturating_duration_since(t) >= 2 * WHOLE_EVERY);
        let mut merged = self.merger.merge(chosen, opts, &mut self.names, whole);
        if let Merged::Changed { services, .. } = &merged {
            let served = writer.state();
            let removing = services
                .iter()
                .filter(|(v, s)| s.is_none() && served.services.contains_key(v))
                .count();
            // A large removal is for the guard, which judges whole snapshots.
            if self.guard.would_hold(removing, served.services.len()) {
                merged = self.merger.merge(chosen, opts, &mut self.names, true);
            }
        }
        if let Err(e) = self.names.save() {
            tracing::error!(error = %e, "named-VIP addresses not stored; they hold until the agent restarts");
        }
        let (problems, applied) = match merged {
            Merged::Whole(derived) => {
                self.last_whole = Some(now);
                let applied =
                    self.apply_whole(&derived.services, writer, now, pass == Pass::Document);
                (derived.problems, applied)
            }
            Merged::Changed { services, problems } => (problems, writer.apply_changes(&services)),
        };
        self.settled = applied.failed.is_empty();
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
                    "the data plane's {what} are nearly all in use; raise {flag} (restarting the agent with the larger size moves services and tracked flows over; no connection breaks)"
                );
            }
        }
        self.nearly_full = full.iter().map(|f| f.0).collect();
        self.last_problems = problems.clone();
        (problems, applied)
    }

    /// Applies every service of `desired`, as the removal guard says: while a large removal is
    /// held, the services it would remove stay as they are served.
    fn apply_whole<S: Store>(
        &mut self,
        desired: &Desired,
        writer: &mut Writer<S>,
        now: Instant,
        document: bool,
    ) -> Applied {
        let was_held = self.guard.held();
        let verdict = match &was_held {
            // Only a document fetched later confirms a held removal: an app fetched alone, or
            // the periodic check, applies the apps of the document that asked for it.
            Some(h) if !document => Verdict::Holding(h.clone()),
            _ => self.guard.judge(writer.state(), desired, now),
        };
        let was_held = was_held.map(|h| h.since);
        match verdict {
            Verdict::Holding(h) if was_held != Some(h.since) => tracing::warn!(
                removing = h.removing,
                served = h.served,
                "holding a large removal: this snapshot would remove {} of the {} services \
                 served; they stay served until a snapshot fetched at least --removal-confirm-secs \
                 later agrees (the rest of the snapshot is applied)",
                h.removing,
                h.served
            ),
            Verdict::Holding(_) => {
                tracing::debug!("still holding the large removal until it can be confirmed")
            }
            Verdict::Confirmed {
                removing,
                held_secs,
            } => tracing::warn!(
                removing,
                held_secs,
                "a later snapshot confirmed the large removal: applying it"
            ),
            Verdict::Apply if was_held.is_some() => {
                tracing::info!("the held large removal was not confirmed; it is dropped")
            }
            Verdict::Apply => {}
        }
        let kept = self.guard.kept(writer.state(), desired);
        let with_kept;
        let services = if kept.is_empty() {
            desired
        } else {
            let mut all = desired.clone();
            all.extend(kept.into_iter().map(|s| (s.vip, s)));
            with_kept = all;
            &with_kept
        };
        let applied = writer.apply(services);
        self.zone.publish(services);
        applied
    }
}

/// Fixes glibc's thresholds for returning freed memory to the kernel at their defaults (128 KiB),
/// instead of letting them grow with the largest block freed (up to 32 MiB). A thread's arena
/// is trimmed only on its own frees, past that threshold, and never by `malloc_trim`: without
/// this, about 10 MiB that the thread loading the programs had freed at its end (measured:
/// VmRSS 20 MiB against 10 MiB for an agent serving one app) stayed resident for good.
fn fix_heap_thresholds() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt(3) sets the allocator's parameters; it is called before the agent's own
    // threads allocate, and touches no memory in use.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}

/// Hands the heap's free pages back to the system once a document was reconciled: its parse
/// (on a thread of the runtime, in an allocator arena of its own) frees tens of MiB at 10,000
/// apps, which glibc's allocator would otherwise keep as the agent's resident memory.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim(3) only returns free memory of the allocator's own arenas; it has no
    // preconditions and touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `opts` with the addresses of this host's interfaces, read now (a VIP equal to one is refused).
fn with_local_addrs(opts: &Options) -> Options {
    let mut opts = opts.clone();
    match marathon::local_addresses() {
        Ok(addrs) => opts.local_addrs.extend(addrs),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read this host's addresses; VIPs are not checked against them")
        }
    }
    opts
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
