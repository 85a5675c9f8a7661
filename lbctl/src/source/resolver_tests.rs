//! Tests of the caching resolver with a fake lookup that can hang on chosen names.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use crate::marathon::{Options, Snapshot, merge};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fake lookup: `node-N` is 198.18.N.2, `gone` has no address, and any name starting with
/// `slow` hangs until the gate opens. Counts lookups per name and the most under way at once.
#[derive(Default)]
struct Fake {
    gate: Mutex<bool>,
    opened: Condvar,
    asked: Mutex<HashMap<String, usize>>,
    now: AtomicUsize,
    most: AtomicUsize,
}

impl Fake {
    fn lookup(&self, h: &str) -> Option<IpAddr> {
        *self.asked.lock().unwrap().entry(h.to_string()).or_default() += 1;
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
        if h.starts_with("slow") {
            let mut open = self.gate.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
        self.now.fetch_sub(1, Ordering::SeqCst);
        let n: u8 = h.strip_prefix("node-").and_then(|n| n.parse().ok())?;
        Some(IpAddr::from([198, 18, n, 2]))
    }

    fn open(&self) {
        *self.gate.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn asked(&self, h: &str) -> usize {
        self.asked.lock().unwrap().get(h).copied().unwrap_or(0)
    }
}

fn resolver(cfg: ResolverConfig) -> (CachedResolver, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let f = fake.clone();
    (CachedResolver::new(cfg, move |h: &str| f.lookup(h)), fake)
}

fn cfg(timeout_ms: u64) -> ResolverConfig {
    ResolverConfig {
        timeout: Duration::from_millis(timeout_ms),
        ..Default::default()
    }
}

fn ip(n: u8) -> Lookup {
    Lookup::Found(IpAddr::from([198, 18, n, 2]))
}

/// Waits (bounded) until `ok`.
fn eventually(what: &str, ok: impl Fn() -> bool) {
    let end = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < end, "{what}: not within 5 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_hanging_name_times_out_alone_and_is_picked_up_later() {
    let (r, fake) = resolver(cfg(200));
    let late = Arc::new(AtomicUsize::new(0));
    let l = late.clone();
    r.on_late(move || {
        l.fetch_add(1, Ordering::SeqCst);
    });
    let t = Instant::now();
    let got = r.resolve_all(&["node-1", "slow-1", "gone", "198.18.9.9", "node-2"]);
    let took = t.elapsed();
    assert_eq!(
        got,
        [
            ip(1),
            Lookup::TimedOut,
            Lookup::NoAddress,
            Lookup::Found(IpAddr::from([198, 18, 9, 9])),
            ip(2)
        ]
    );
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(700),
        "took {took:?}"
    );
    // The next snapshot while it still hangs: the same at once (not waited for again), and the
    // name is not asked twice.
    let t = Instant::now();
    assert_eq!(
        r.resolve_all(&["slow-1", "node-1"]),
        [Lookup::TimedOut, ip(1)]
    );
    assert!(t.elapsed() < Duration::from_millis(100), "waited again");
    assert_eq!(fake.asked("slow-1"), 1);
    assert_eq!(late.load(Ordering::SeqCst), 0);
    // It ends in the background: the source is asked for a fresh snapshot, which finds the
    // answer (here: no address) at once.
    fake.open();
    eventually("the late hook", || late.load(Ordering::SeqCst) == 1);
    let t = Instant::now();
    assert_eq!(r.resolve_all(&["slow-1"]), [Lookup::NoAddress]);
    assert!(t.elapsed() < Duration::from_millis(100));
    assert_eq!(fake.asked("slow-1"), 1, "answered from the cache");
    assert_eq!(fake.asked("node-1"), 1);
}

#[test]
fn answers_are_cached_for_their_ttl() {
    let (r, fake) = resolver(ResolverConfig {
        timeout: Duration::from_millis(500),
        ttl: Duration::from_millis(300),
        negative_ttl: Duration::from_millis(100),
        workers: 2,
    });
    let t0 = Instant::now();
    assert_eq!(
        r.resolve_all(&["node-3", "gone"]),
        [ip(3), Lookup::NoAddress]
    );
    assert_eq!(
        r.resolve_all(&["node-3", "gone"]),
        [ip(3), Lookup::NoAddress]
    );
    assert_eq!((fake.asked("node-3"), fake.asked("gone")), (1, 1));
    // "No address" expires first.
    std::thread::sleep(Duration::from_millis(150));
    r.resolve_all(&["node-3", "gone"]);
    if t0.elapsed() < Duration::from_millis(290) {
        assert_eq!((fake.asked("node-3"), fake.asked("gone")), (1, 2));
    }
    std::thread::sleep(Duration::from_millis(200));
    r.resolve_all(&["node-3"]);
    assert_eq!(fake.asked("node-3"), 2);
}

/// An address whose renewal hangs keeps serving: a slow resolver never takes a known backend
/// away.
#[test]
fn an_expired_address_serves_while_its_renewal_hangs() {
    let fake = Arc::new(Fake::default());
    let f = fake.clone();
    let first = Arc::new(Mutex::new(true));
    let r = CachedResolver::new(
        ResolverConfig {
            timeout: Duration::from_millis(100),
            ttl: Duration::from_millis(50),
            ..Default::default()
        },
        move |h: &str| {
            let mut first = first.lock().unwrap();
            if *first {
                *first = false;
                return Some(IpAddr::from([198, 18, 7, 2]));
            }
            drop(first);
            f.lookup(&format!("slow-{h}"))
        },
    );
    assert_eq!(r.resolve_all(&["node-7"]), [ip(7)]);
    std::thread::sleep(Duration::from_millis(80));
    assert_eq!(r.resolve_all(&["node-7"]), [ip(7)]);
    eventually("the renewal started", || fake.asked("slow-node-7") == 1);
    fake.open();
}

#[test]
fn lookups_under_way_are_bounded_by_the_workers() {
    let (r, fake) = resolver(ResolverConfig {
        timeout: Duration::from_millis(100),
        workers: 2,
        ..Default::default()
    });
    let names: Vec<String> = (0..10).map(|i| format!("slow-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let got = r.resolve_all(&refs);
    assert!(got.iter().all(|l| *l == Lookup::TimedOut), "{got:?}");
    assert_eq!(fake.most.load(Ordering::SeqCst), 2);
    fake.open();
    eventually("every name looked up", || {
        names.iter().all(|n| fake.asked(n) == 1)
    });
    assert!(fake.most.load(Ordering::SeqCst) <= 2);
}

/// A whole snapshot: one app's task host hangs; the snapshot is read within the deadline, that
/// app has a problem naming the host, the other app is served.
#[test]
fn a_snapshot_is_derived_within_the_deadline() {
    let (r, fake) = resolver(cfg(300));
    let doc = r#"{"apps": [
      {"id": "/a", "portDefinitions": [{"labels": {"VIP_0": "172.16.0.1:80"}}],
       "tasks": [{"id": "a1", "host": "slow.invalid", "ports": [31000], "state": "TASK_RUNNING"}]},
      {"id": "/b", "portDefinitions": [{"labels": {"VIP_0": "172.16.0.2:80"}}],
       "tasks": [{"id": "b1", "host": "node-4", "ports": [31000], "state": "TASK_RUNNING"}]}]}"#;
    let t = Instant::now();
    let snapshot = Snapshot::read(doc, "doc", &r).unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_millis(800), "took {took:?}");
    let opts = Options::default();
    let d = merge(&snapshot.derive_apps(&opts), &opts);
    let served: Vec<(String, Vec<String>)> = d
        .services
        .iter()
        .map(|(v, s)| {
            let b = s.backends.keys().map(|a| a.to_string()).collect();
            (v.to_string(), b)
        })
        .collect();
    assert_eq!(
        served,
        [
            ("tcp 172.16.0.1:80".to_string(), vec![]),
            (
                "tcp 172.16.0.2:80".to_string(),
                vec!["198.18.4.2:31000".to_string()]
            )
        ]
    );
    assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
    let p = d.problems[0].to_string();
    assert!(
        p.starts_with("app /a, task a1") && p.contains("\"slow.invalid\" did not resolve in time"),
        "{p}"
    );
    fake.open();
}
