//! The incremental merge must give what a whole merge gives, document after document.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use crate::{
    marathon::{AppVip, Problem, merge_with},
    model::{BackendSpec, BackendState, Proto},
};
use std::net::SocketAddr;

/// What a reconciler does with a merge: `served` becomes the whole result, or takes the changes.
/// Returns the problems.
fn apply(served: &mut Desired, merged: Merged) -> Vec<Problem> {
    match merged {
        Merged::Whole(d) => {
            *served = d.services;
            d.problems
        }
        Merged::Changed { services, problems } => {
            for (vip, spec) in services {
                match spec {
                    Some(spec) => served.insert(vip, spec),
                    None => served.remove(&vip),
                };
            }
            problems
        }
    }
}

/// A small deterministic generator (xorshift64*), so that a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An app with 1–2 VIPs drawn from a few addresses (so that apps share services), sometimes
/// named, with backends drawn from a few addresses (so that apps share backends, in either
/// state), task addresses that now and then are a VIP's (which refuses that VIP), and
/// sometimes a problem of its own.
fn app(rng: &mut Rng, id: usize, named: bool) -> AppResult {
    let id = format!("/app{id}");
    let mut task_addrs = BTreeSet::new();
    let vips = (0..1 + rng.below(2))
        .map(|k| {
            let target = if named && rng.below(8) == 0 {
                VipTarget::Named {
                    dns: format!("n{}.marathon.l4lb.thisdcos.directory", rng.below(3)),
                    port: 80,
                }
            } else {
                let ip = IpAddr::from([172, 16, 0, 1 + rng.below(6) as u8]);
                VipTarget::Ip(SocketAddr::new(ip, 80 + rng.below(2) as u16))
            };
            let backends = (0..1 + rng.below(3))
                .map(|t| {
                    let ip = IpAddr::from([198, 18, 1, 1 + rng.below(8) as u8]);
                    task_addrs.insert(ip);
                    BackendSpec {
                        addr: SocketAddr::new(ip, 31000 + rng.below(2) as u16),
                        state: if rng.below(3) == 0 {
                            BackendState::Draining
                        } else {
                            BackendState::Active
                        },
                        app: id.as_str().into(),
                        task: format!("{id}.{k}.{t}").into(),
                    }
                })
                .collect();
            AppVip {
                target,
                proto: if rng.below(4) == 0 {
                    Proto::Udp
                } else {
                    Proto::Tcp
                },
                backends,
                port_index: k as usize,
                label: format!("VIP_{k}"),
            }
        })
        .collect();
    if rng.below(12) == 0 {
        task_addrs.insert(IpAddr::from([172, 16, 0, 1 + rng.below(6) as u8]));
    }
    let problems = if rng.below(8) == 0 {
        vec![Problem::of_app(&id, "a problem of its own".into())]
    } else {
        Vec::new()
    };
    AppResult {
        id,
        vips,
        problems,
        config_broken: false,
        task_addrs,
        since: (rng.below(2) == 0).then(|| format!("2026-01-0{}", 1 + rng.below(9))),
    }
}

/// Random documents, each a few apps away from the last (apps changed, now and then one
/// added or removed, now and then the host's addresses changed): the incremental merge equals
/// a whole merge with a book of its own every time.
#[test]
fn incremental_merges_equal_whole_merges() {
    for seed in 1..=12u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let named = seed % 2 == 0;
        let mut apps: Vec<Arc<AppResult>> =
            (0..40).map(|i| Arc::new(app(&mut rng, i, named))).collect();
        let mut next_id = apps.len();
        let mut opts = Options::default();
        let mut merger = Merger::default();
        let mut served = Desired::new();
        let (mut book, mut fresh_book) = (NameBook::in_memory(), NameBook::in_memory());
        for step in 0..300 {
            match rng.below(20) {
                0 => {
                    apps.push(Arc::new(app(&mut rng, next_id, named)));
                    next_id += 1;
                }
                1 if apps.len() > 5 => {
                    apps.remove(rng.below(apps.len() as u64) as usize);
                }
                2 => {
                    opts.local_addrs = vec![IpAddr::from([172, 16, 0, 1 + rng.below(6) as u8])];
                }
                _ => {
                    for _ in 0..1 + rng.below(3) {
                        let i = rng.below(apps.len() as u64) as usize;
                        let id = apps[i].id.trim_start_matches("/app").parse().unwrap();
                        apps[i] = Arc::new(app(&mut rng, id, named));
                    }
                }
            }
            let problems = apply(&mut served, merger.merge(&apps, &opts, &mut book, false));
            let want = merge_with(&apps, &opts, &mut fresh_book);
            assert_eq!(served, want.services, "seed {seed} step {step}");
            assert_eq!(problems, want.problems, "seed {seed} step {step}");
        }
        let (whole, incremental) = merger.counts();
        // Named apps change in about a third of the steps of the seeds that have them.
        assert!(
            incremental > if named { 40 } else { 150 },
            "seed {seed}: only {incremental} incremental merges ({whole} whole): the test proves little"
        );
    }
}

/// A task that moves onto a declared VIP's address refuses that VIP (a whole merge): the
/// service goes, with the problem, and comes back when the task leaves.
#[test]
fn a_task_taking_a_vip_address_is_seen() {
    let mut rng = Rng(7);
    let mut a = app(&mut rng, 1, false);
    a.vips.truncate(1);
    let vip = match a.vips[0].target {
        VipTarget::Ip(s) => s,
        VipTarget::Named { .. } => unreachable!(),
    };
    a.task_addrs
        .retain(|ip| ip.to_string().starts_with("198.18."));
    let mut b = app(&mut rng, 2, false);
    b.vips.clear();
    b.task_addrs = BTreeSet::from([IpAddr::from([198, 18, 9, 9])]);
    let opts = Options::default();
    let mut merger = Merger::default();
    let mut book = NameBook::in_memory();
    let mut served = Desired::new();
    let has_vip = |d: &Desired| d.keys().any(|v| v.addr == vip);
    let apps = vec![Arc::new(a.clone()), Arc::new(b.clone())];
    apply(&mut served, merger.merge(&apps, &opts, &mut book, false));
    assert!(has_vip(&served));
    b.task_addrs.insert(vip.ip());
    let apps = vec![Arc::new(a.clone()), Arc::new(b.clone())];
    let problems = apply(&mut served, merger.merge(&apps, &opts, &mut book, false));
    assert!(!has_vip(&served));
    assert!(problems.iter().any(|p| p.reason.contains("capture")));
    b.task_addrs.remove(&vip.ip());
    let apps = vec![Arc::new(a), Arc::new(b)];
    apply(&mut served, merger.merge(&apps, &opts, &mut book, false));
    assert!(has_vip(&served));
}

/// An app is found by its id only where exactly one app of the last merge has it.
#[test]
fn an_app_is_found_where_it_alone_has_its_id() {
    let mut rng = Rng(7);
    let mut merger = Merger::default();
    assert_eq!(merger.position("/app0"), None, "before any merge");
    let apps: Vec<Arc<AppResult>> = [0, 1, 2, 1]
        .iter()
        .map(|&id| Arc::new(app(&mut rng, id, false)))
        .collect();
    let mut book = NameBook::in_memory();
    merger.merge(&apps, &Options::default(), &mut book, true);
    assert_eq!(merger.position("/app0"), Some(0));
    assert_eq!(merger.position("/app2"), Some(2));
    assert_eq!(merger.position("/app1"), None, "two apps have it");
    assert_eq!(merger.position("/app3"), None, "no app has it");
}
