//! The removal guard: a valid snapshot that would remove most of what the load balancer serves
//! at once (a Marathon answering `{"apps": []}` after a restart, a truncated file) is not
//! applied until a second snapshot, fetched at least `confirm` later, agrees.
//!
//! A removal is *large* when it removes at least `floor` services and more than `max_fraction`
//! of the services served. While a large removal is held, everything else the snapshot says is
//! applied (additions, backend changes, small removals are not held back: only the services the
//! large removal would take away are kept as the kernel has them). A later snapshot *agrees*
//! when its own removal is still large and removes every service the held one did (the same
//! or more); once one fetched at least `confirm` after the first agrees, the newest snapshot is
//! applied whole. A later snapshot that removes too little ends the hold (its removals are
//! applied as any small one); one that removes a different large set starts a new hold.
use crate::{
    api::RemovalHold,
    dataplane::KernelState,
    model::{Desired, ServiceSpec, Vip},
    status,
};
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

/// The services a hold lists in the status (the count is always exact).
const LISTED: usize = 20;

/// When a removal is large, and how long it is held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RemovalPolicy {
    /// A removal of more than this fraction of the services served is large (0 to 1).
    pub max_fraction: f64,
    /// A removal of fewer services than this is never held (small clusters).
    pub floor: usize,
    /// How long after the first snapshot a confirming one must be fetched.
    pub confirm: Duration,
}

impl Default for RemovalPolicy {
    fn default() -> Self {
        RemovalPolicy {
            max_fraction: 0.5,
            floor: 5,
            confirm: Duration::from_secs(10),
        }
    }
}

impl RemovalPolicy {
    /// True when removing `removing` of `served` services is large.
    pub fn is_large(&self, removing: usize, served: usize) -> bool {
        removing > 0
            && removing >= self.floor
            && removing as f64 > self.max_fraction * served as f64
    }
}

/// A large removal being held.
#[derive(Debug, Clone)]
struct Hold {
    since: Instant,
    since_unix: u64,
    removing: BTreeSet<Vip>,
    served: usize,
    /// The source was asked for a confirming snapshot.
    refresh_asked: bool,
}

/// What the guard decided for one snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing large to hold: the snapshot is applied as it is.
    Apply,
    /// A large removal is held: the desired state was given back the services it would remove.
    Holding(RemovalHold),
    /// A held large removal was confirmed: the snapshot is applied whole.
    Confirmed {
        /// Services removed.
        removing: usize,
        /// Seconds since the first snapshot that asked for it.
        held_secs: u64,
    },
}

/// The guard's state between snapshots.
#[derive(Debug, Default)]
pub struct RemovalGuard {
    policy: RemovalPolicy,
    hold: Option<Hold>,
    /// Holds started since the start.
    started: u64,
}

impl RemovalGuard {
    /// A guard applying `policy`.
    pub fn new(policy: RemovalPolicy) -> RemovalGuard {
        RemovalGuard {
            policy,
            hold: None,
            started: 0,
        }
    }

    /// True when removing `removing` of the `served` services is a large removal (held).
    pub fn would_hold(&self, removing: usize, served: usize) -> bool {
        self.policy.is_large(removing, served)
    }

    /// Checks `desired` against what the kernel serves (`served`) at `now`. When the removal it
    /// asks for is large and not yet confirmed, the services it would remove are put back into
    /// `desired` as the kernel serves them.
    pub fn check(&mut self, served: &KernelState, desired: &mut Desired, now: Instant) -> Verdict {
        let verdict = self.judge(served, desired, now);
        let kept = self.kept(served, desired);
        desired.extend(kept.into_iter().map(|s| (s.vip, s)));
        verdict
    }

    /// [`RemovalGuard::check`] without changing `desired`: the services to keep serving while
    /// a removal is held are given by [`RemovalGuard::kept`].
    pub fn judge(&mut self, served: &KernelState, desired: &Desired, now: Instant) -> Verdict {
        let removing: BTreeSet<Vip> = served
            .services
            .keys()
            .filter(|v| !desired.contains_key(v))
            .copied()
            .collect();
        let total = served.services.len();
        if !self.policy.is_large(removing.len(), total) {
            self.hold = None;
            return Verdict::Apply;
        }
        let agrees = |h: &Hold| removing.is_superset(&h.removing);
        match self.hold.take() {
            Some(h) if agrees(&h) && now.duration_since(h.since) >= self.policy.confirm => {
                return Verdict::Confirmed {
                    removing: removing.len(),
                    held_secs: now.duration_since(h.since).as_secs(),
                };
            }
            Some(h) if agrees(&h) => self.hold = Some(h),
            _ => {
                self.started += 1;
                self.hold = Some(Hold {
                    since: now,
                    since_unix: status::now(),
                    removing: removing.clone(),
                    served: total,
                    refresh_asked: false,
                })
            }
        }
        match self.held() {
            Some(h) => Verdict::Holding(h),
            None => Verdict::Apply,
        }
    }

    /// While a removal is held: each service the kernel serves that `desired` lacks, as the
    /// kernel serves it (nothing when no removal is held).
    pub fn kept(&self, served: &KernelState, desired: &Desired) -> Vec<ServiceSpec> {
        if self.hold.is_none() {
            return Vec::new();
        }
        let lacking = served
            .services
            .iter()
            .filter(|(v, _)| !desired.contains_key(v));
        lacking
            .map(|(vip, k)| {
                let mut spec = ServiceSpec::new(*vip, None);
                for (addr, (_, state)) in &k.backends {
                    spec.add_backend(crate::model::BackendSpec {
                        addr: *addr,
                        state: *state,
                        app: "(held: large removal)".into(),
                        task: "".into(),
                    });
                }
                spec
            })
            .collect()
    }

    /// The large removal being held, for the status.
    pub fn held(&self) -> Option<RemovalHold> {
        self.hold.as_ref().map(|h| RemovalHold {
            since: h.since_unix,
            removing: h.removing.len(),
            served: h.served,
            confirm_from: h.since_unix + self.policy.confirm.as_secs(),
            services: h.removing.iter().take(LISTED).map(Vip::to_string).collect(),
        })
    }

    /// Large removals held since the start (each counted when its hold began).
    pub fn started(&self) -> u64 {
        self.started
    }

    /// True once per hold, when the confirmation time has come: the agent then asks the source
    /// for a fresh snapshot (a re-read of the file; a Marathon fetch).
    pub fn confirmation_due(&mut self, now: Instant) -> bool {
        let confirm = self.policy.confirm;
        match &mut self.hold {
            Some(h) if !h.refresh_asked && now.duration_since(h.since) >= confirm => {
                h.refresh_asked = true;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{
        dataplane::KernelService,
        model::{BackendSpec, BackendState, Proto},
    };

    fn vip(i: u8) -> Vip {
        Vip {
            addr: format!("172.16.0.{i}:80").parse().unwrap(),
            proto: Proto::Tcp,
        }
    }

    fn backend(i: u8) -> std::net::SocketAddr {
        format!("198.18.{i}.2:31000").parse().unwrap()
    }

    /// The kernel serving services 1..=n, each with one backend.
    fn served(n: u8) -> KernelState {
        let mut k = KernelState::default();
        for i in 1..=n {
            let mut s = KernelService {
                id: i as u32,
                table: i as u32,
                active: 1,
                backends: Default::default(),
                departures: 0,
            };
            s.backends
                .insert(backend(i), (i as u32, BackendState::Active));
            k.services.insert(vip(i), s);
        }
        k
    }

    /// Desired services `ids`, with backend `b` each.
    fn desired(ids: impl IntoIterator<Item = u8>, b: u8) -> Desired {
        ids.into_iter()
            .map(|i| {
                let mut s = ServiceSpec::new(vip(i), None);
                s.add_backend(BackendSpec {
                    addr: backend(b),
                    state: BackendState::Active,
                    app: "/a".into(),
                    task: "t".into(),
                });
                (vip(i), s)
            })
            .collect()
    }

    fn policy() -> RemovalPolicy {
        RemovalPolicy {
            max_fraction: 0.5,
            floor: 3,
            confirm: Duration::from_secs(10),
        }
    }

    #[test]
    fn what_is_large() {
        let p = policy();
        assert!(!p.is_large(2, 2), "below the floor");
        assert!(
            !p.is_large(5, 10),
            "exactly the fraction is not more than it"
        );
        assert!(p.is_large(6, 10));
        assert!(p.is_large(3, 3));
        assert!(!p.is_large(0, 0));
    }

    #[test]
    fn an_empty_snapshot_is_held_until_a_later_one_agrees() {
        let mut g = RemovalGuard::new(policy());
        let k = served(10);
        let t0 = Instant::now();
        let mut d = Desired::new();
        let Verdict::Holding(h) = g.check(&k, &mut d, t0) else {
            panic!("not held")
        };
        assert_eq!((h.removing, h.served, h.services.len()), (10, 10, 10));
        // Every service is given back as the kernel serves it.
        assert_eq!(d.len(), 10);
        assert_eq!(
            d[&vip(4)].wanted(),
            [(backend(4), BackendState::Active)].into()
        );
        assert!(!g.confirmation_due(t0 + Duration::from_secs(9)));
        // Too early to confirm: still held, with its first time.
        let mut d = Desired::new();
        assert!(matches!(
            g.check(&k, &mut d, t0 + Duration::from_secs(5)),
            Verdict::Holding(ref h2) if h2.since == h.since
        ));
        assert!(g.confirmation_due(t0 + Duration::from_secs(10)));
        assert!(
            !g.confirmation_due(t0 + Duration::from_secs(11)),
            "asked once"
        );
        let mut d = Desired::new();
        assert_eq!(
            g.check(&k, &mut d, t0 + Duration::from_secs(10)),
            Verdict::Confirmed {
                removing: 10,
                held_secs: 10
            }
        );
        assert!(d.is_empty(), "confirmed: applied whole");
        assert!(g.held().is_none());
        assert_eq!(g.started(), 1);
    }

    #[test]
    fn other_changes_go_through_while_held() {
        let mut g = RemovalGuard::new(policy());
        let k = served(10);
        let t0 = Instant::now();
        // Keeps 1 and 2 (with a new backend), adds 20, removes 3..=10.
        let mut d = desired([1, 2, 20], 9);
        assert!(matches!(g.check(&k, &mut d, t0), Verdict::Holding(_)));
        assert_eq!(d.len(), 11);
        assert_eq!(d[&vip(1)].backends.keys().next(), Some(&backend(9)));
        assert!(d.contains_key(&vip(20)));
        assert_eq!(d[&vip(7)].backends.keys().next(), Some(&backend(7)));
    }

    #[test]
    fn a_small_removal_ends_the_hold_and_a_different_one_restarts_it() {
        let mut g = RemovalGuard::new(policy());
        let k = served(10);
        let t0 = Instant::now();
        assert!(matches!(
            g.check(&k, &mut desired([1, 2], 1), t0),
            Verdict::Holding(_)
        ));
        // Marathon is back: only one service goes. Applied; no hold.
        let mut d = desired(2..=10, 1);
        assert_eq!(
            g.check(&k, &mut d, t0 + Duration::from_secs(1)),
            Verdict::Apply
        );
        assert_eq!(d.len(), 9);
        assert!(g.held().is_none());
        // Removing 3..=10, then (later) 1..=8: not the same or more; a new hold starts.
        assert!(matches!(
            g.check(&k, &mut desired([1, 2], 1), t0 + Duration::from_secs(2)),
            Verdict::Holding(_)
        ));
        let t1 = t0 + Duration::from_secs(20);
        match g.check(&k, &mut desired([9, 10], 1), t1) {
            Verdict::Holding(h) => assert_eq!(h.removing, 8),
            other => panic!("{other:?}"),
        }
        // And that one confirms only `confirm` after it started.
        assert!(matches!(
            g.check(&k, &mut Desired::new(), t1 + Duration::from_secs(9)),
            Verdict::Holding(_)
        ));
        assert!(matches!(
            g.check(&k, &mut Desired::new(), t1 + Duration::from_secs(10)),
            Verdict::Confirmed { removing: 10, .. }
        ));
        assert_eq!(g.started(), 3);
    }

    #[test]
    fn below_the_floor_is_never_held() {
        let mut g = RemovalGuard::new(policy());
        let mut d = Desired::new();
        assert_eq!(g.check(&served(2), &mut d, Instant::now()), Verdict::Apply);
        assert!(d.is_empty());
    }
}
