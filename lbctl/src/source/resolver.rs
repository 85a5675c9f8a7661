//! The agent's resolver of task host names: a cache (answers kept for a TTL, "no address" for a
//! shorter one) in front of the system's resolver, asked on a few worker threads of its own,
//! with a deadline per snapshot (a name one snapshot waited out is not waited for again until it
//! ends). A name that does not resolve in time is a problem of the apps
//! whose tasks run there (`Lookup::TimedOut`); it does not delay the rest of the snapshot. Its
//! lookup goes on in the background, and when it ends the source is asked for a fresh snapshot
//! (the `late` hook), which then finds the answer in the cache. An expired answer is still used
//! while its renewal is under way, so a slow resolver never takes a known backend away.
use crate::marathon::{Lookup, Resolve, SystemResolver};
use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// How the agent resolves task host names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolverConfig {
    /// How long one snapshot waits for its names.
    pub timeout: Duration,
    /// How long an address is kept.
    pub ttl: Duration,
    /// How long "no address" is kept.
    pub negative_ttl: Duration,
    /// The most lookups under way at once (threads).
    pub workers: usize,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            timeout: Duration::from_millis(1000),
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            workers: 4,
        }
    }
}

/// How long an idle worker thread waits for a name before it ends.
const IDLE: Duration = Duration::from_secs(30);

/// The lookup the cache stands in front of.
type LookupFn = dyn Fn(&str) -> Option<IpAddr> + Send + Sync;
/// Called when a lookup that a snapshot stopped waiting for ends.
type LateFn = dyn Fn() + Send + Sync;

/// A caching resolver with a deadline (see the module). Clones share the cache.
#[derive(Clone)]
pub struct CachedResolver {
    inner: Arc<Inner>,
}

struct Inner {
    lookup: Box<LookupFn>,
    cfg: ResolverConfig,
    state: Mutex<State>,
    changed: Condvar,
    late: Mutex<Option<Box<LateFn>>>,
}

#[derive(Default)]
struct State {
    cache: HashMap<String, Entry>,
    /// Names waiting for a worker.
    queue: VecDeque<String>,
    /// Names queued or being looked up.
    in_flight: HashSet<String>,
    /// Names in flight that a snapshot stopped waiting for: `late` is called when they end.
    given_up: HashSet<String>,
    /// Worker threads alive.
    workers: usize,
}

#[derive(Clone, Copy)]
struct Entry {
    answer: Option<IpAddr>,
    at: Instant,
}

impl CachedResolver {
    /// The system's resolver behind a cache.
    pub fn system(cfg: ResolverConfig) -> CachedResolver {
        CachedResolver::new(cfg, move |h: &str| SystemResolver.resolve(h))
    }

    /// `lookup` behind a cache.
    pub fn new(
        cfg: ResolverConfig,
        lookup: impl Fn(&str) -> Option<IpAddr> + Send + Sync + 'static,
    ) -> CachedResolver {
        CachedResolver {
            inner: Arc::new(Inner {
                lookup: Box::new(lookup),
                cfg: ResolverConfig {
                    workers: cfg.workers.max(1),
                    ..cfg
                },
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                late: Mutex::new(None),
            }),
        }
    }

    /// Calls `late` whenever a lookup that a snapshot stopped waiting for ends (the agent asks
    /// its source for a fresh snapshot then).
    pub fn on_late(&self, late: impl Fn() + Send + Sync + 'static) {
        if let Ok(mut l) = self.inner.late.lock() {
            *l = Some(Box::new(late));
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A worker never panics while holding the lock; if one did, the cache is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a cached answer is still fresh at `now`.
    fn fresh(&self, e: &Entry, now: Instant) -> bool {
        let ttl = match e.answer {
            Some(_) => self.inner.cfg.ttl,
            None => self.inner.cfg.negative_ttl,
        };
        now.duration_since(e.at) < ttl
    }

    /// Queues `name` for a worker (unless it is under way), starting one if there is room.
    fn enqueue(&self, st: &mut State, name: &str) {
        if !st.in_flight.insert(name.to_string()) {
            return;
        }
        st.queue.push_back(name.to_string());
        if st.workers < self.inner.cfg.workers {
            st.workers += 1;
            let me = self.clone();
            std::thread::spawn(move || me.work());
        }
        self.inner.changed.notify_all();
    }

    /// A worker: looks names up until none came for `IDLE`.
    fn work(self) {
        let mut st = self.state();
        loop {
            let Some(name) = st.queue.pop_front() else {
                let (next, timeout) = self
                    .inner
                    .changed
                    .wait_timeout(st, IDLE)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                st = next;
                if timeout.timed_out() && st.queue.is_empty() {
                    st.workers -= 1;
                    return;
                }
                continue;
            };
            drop(st);
            let answer = (self.inner.lookup)(&name);
            st = self.state();
            st.cache.insert(
                name.clone(),
                Entry {
                    answer,
                    at: Instant::now(),
                },
            );
            st.in_flight.remove(&name);
            let late = st.given_up.remove(&name);
            self.inner.changed.notify_all();
            if late {
                drop(st);
                tracing::info!(host = %name, resolved = ?answer, "a slow task host name resolved; asking for a fresh snapshot");
                if let Ok(l) = self.inner.late.lock()
                    && let Some(l) = l.as_ref()
                {
                    l();
                }
                st = self.state();
            }
        }
    }
}

impl Resolve for CachedResolver {
    fn resolve(&self, host: &str) -> Option<IpAddr> {
        match self.resolve_all(&[host]).first() {
            Some(Lookup::Found(ip)) => Some(*ip),
            _ => None,
        }
    }

    /// Answers from the cache; looks up the names it lacks (or whose answer expired) on the
    /// workers, waiting for them at most the timeout, all together.
    fn resolve_all(&self, hosts: &[&str]) -> Vec<Lookup> {
        let deadline = Instant::now() + self.inner.cfg.timeout;
        let mut st = self.state();
        let now = Instant::now();
        let mut waiting = Vec::new();
        for h in hosts {
            if h.parse::<IpAddr>().is_ok() {
                continue;
            }
            match st.cache.get(*h) {
                Some(e) if self.fresh(e, now) => {}
                // An earlier snapshot already waited it out: no snapshot waits for it again.
                _ if st.given_up.contains(*h) => {}
                _ => {
                    self.enqueue(&mut st, h);
                    waiting.push(*h);
                }
            }
        }
        while waiting.iter().any(|h| st.in_flight.contains(*h)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .inner
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        hosts
            .iter()
            .map(|h| {
                if let Ok(ip) = h.parse::<IpAddr>() {
                    return Lookup::Found(ip);
                }
                let pending = st.in_flight.contains(*h);
                if pending {
                    st.given_up.insert(h.to_string());
                }
                match (st.cache.get(*h).map(|e| e.answer), pending) {
                    // Expired, renewal under way: the old address still serves.
                    (Some(Some(ip)), _) => Lookup::Found(ip),
                    (_, true) => Lookup::TimedOut,
                    _ => Lookup::NoAddress,
                }
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "resolver_tests.rs"]
mod tests;
