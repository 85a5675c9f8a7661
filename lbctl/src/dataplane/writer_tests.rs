//! The writer against a fake store that makes chosen map operations fail: after any failure the
//! writer's mirror equals what the store holds, no table a service has names a backend that is
//! not its member, and the next apply brings the store to what is wanted.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::{
    fake_store::FakeStore as Fake, maps::KernelState, sizing::TableConfig, writer::Writer,
};
use crate::model::{BackendSpec, BackendState, Desired, Proto, ServiceSpec, Vip};
use lb_common::{MEMBER_ACTIVE, MEMBER_DRAINING};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    ops::Range,
};

const RING: u32 = 13;

impl Fake {
    /// Slots of a service's table that name a backend that is not its member: a packet of a
    /// new flow would go there and be refused.
    fn non_members(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (v, s) in &self.services {
            for b in self.tables.get(&s.table).into_iter().flatten() {
                if !self.members.contains_key(&(s.id, *b)) {
                    out.push(format!("{v}: its table names backend {b}, not a member"));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn vip(s: &str) -> Vip {
    Vip {
        addr: addr(s),
        proto: Proto::Tcp,
    }
}

fn desired(services: &[(&str, &[(&str, BackendState)])]) -> Desired {
    services
        .iter()
        .map(|(v, backends)| {
            let mut spec = ServiceSpec::new(vip(v), None);
            for (b, state) in *backends {
                spec.add_backend(BackendSpec {
                    addr: addr(b),
                    state: *state,
                    app: "/app".into(),
                    task: format!("task-{b}").into(),
                });
            }
            (vip(v), spec)
        })
        .collect()
}

use BackendState::{Active as A, Draining as D};

fn before() -> Desired {
    desired(&[
        (
            "172.16.0.1:80",
            &[
                ("198.18.1.1:80", A),
                ("198.18.1.2:80", A),
                ("198.18.1.3:80", A),
            ],
        ),
        (
            "172.16.0.2:80",
            &[("198.18.1.2:80", A), ("198.18.1.4:80", A)],
        ),
        (
            "172.16.0.3:80",
            &[("198.18.1.5:80", D), ("198.18.1.6:80", A)],
        ),
    ])
}

/// A backend leaves (its membership is removed after the flip), one starts draining, one
/// arrives; a service leaves, one stays, one arrives.
fn after() -> Desired {
    desired(&[
        (
            "172.16.0.1:80",
            &[
                ("198.18.1.1:80", D),
                ("198.18.1.2:80", A),
                ("198.18.1.7:80", A),
            ],
        ),
        (
            "172.16.0.3:80",
            &[("198.18.1.5:80", D), ("198.18.1.6:80", A)],
        ),
        (
            "172.16.0.4:80",
            &[("198.18.1.8:80", A), ("198.18.1.2:80", A)],
        ),
    ])
}

fn writer() -> Writer<Fake> {
    super::fake_store::writer(RING, 8, 16, 64)
}

/// The mirror holds exactly what the store holds: services (an entry the store lacks only
/// for a service marked unlisted, with no active backend), memberships, live backend slots.
fn assert_mirror_follows(w: &Writer<Fake>, when: &str) {
    let (st, fake) = (w.state(), w.store());
    for (v, s) in &fake.services {
        let m = st.services.get(v).unwrap_or_else(|| {
            panic!("{when}: the store serves {v}, the mirror has no such service")
        });
        assert_eq!(
            (m.id, m.table, m.active),
            (s.id, s.table, s.active),
            "{when}: {v}: mirror (id, table, active) differs from the store"
        );
    }
    for (v, m) in &st.services {
        if !fake.services.contains_key(v) {
            assert!(w.is_unlisted(v), "{when}: {v} is in the mirror only");
            assert_eq!(m.active, 0, "{when}: {v} has no entry but active backends");
        }
    }
    let mirrored: BTreeMap<(u32, u32), u32> = st
        .services
        .values()
        .flat_map(|s| {
            s.backends.values().map(move |(bid, state)| {
                let m = match state {
                    A => MEMBER_ACTIVE,
                    D => MEMBER_DRAINING,
                };
                ((s.id, *bid), m)
            })
        })
        .collect();
    assert_eq!(mirrored, fake.members, "{when}: memberships");
    let slots: BTreeMap<u32, SocketAddr> = st.backend_ids.iter().map(|(a, i)| (*i, *a)).collect();
    assert_eq!(slots, fake.backends, "{when}: backend slots");
    let mut users = std::collections::HashMap::new();
    for a in st.services.values().flat_map(|s| s.backends.keys()) {
        *users.entry(*a).or_insert(0u32) += 1;
    }
    assert_eq!(
        &users,
        w.users(),
        "{when}: the services each backend is counted in"
    );
    let ids: BTreeSet<u32> = st.services.values().map(|s| s.id).collect();
    assert_eq!(
        ids.len(),
        st.services.len(),
        "{when}: two services share an id"
    );
    // Every membership's VIP is in its backend's record (a lean flow relies on it); a VIP
    // left over by a failure only costs reverse entries.
    for (v, s) in &st.services {
        for (a, (bid, _)) in &s.backends {
            let rec = fake.backend_vips.get(a);
            assert!(
                rec.is_some_and(|r| r.id == *bid && r.vips.contains(v)),
                "{when}: {a} is a member of {v} but its record is {rec:?}"
            );
        }
    }
}

/// The store serves exactly `want`: each service's entry, memberships and live table.
fn assert_serves(w: &Writer<Fake>, want: &Desired, when: &str) {
    let fake = w.store();
    let services: BTreeSet<Vip> = fake.services.keys().copied().collect();
    assert_eq!(services, want.keys().copied().collect(), "{when}: services");
    for (v, spec) in want {
        let s = fake.services[v];
        let slot = |a: &SocketAddr| {
            fake.backends
                .iter()
                .find(|(_, b)| *b == a)
                .map(|(i, _)| *i)
                .unwrap_or_else(|| panic!("{when}: {a} has no backend slot"))
        };
        let members: BTreeMap<u32, u32> = fake
            .members
            .iter()
            .filter(|((sid, _), _)| *sid == s.id)
            .map(|((_, b), m)| (*b, *m))
            .collect();
        let expected: BTreeMap<u32, u32> = spec
            .backends
            .values()
            .map(|b| {
                let m = if b.state == A {
                    MEMBER_ACTIVE
                } else {
                    MEMBER_DRAINING
                };
                (slot(&b.addr), m)
            })
            .collect();
        assert_eq!(members, expected, "{when}: {v}: memberships");
        let active: BTreeSet<u32> = spec
            .backends
            .values()
            .filter(|b| b.state == A)
            .map(|b| slot(&b.addr))
            .collect();
        assert_eq!(s.active as usize, active.len(), "{when}: {v}: active count");
        let table: BTreeSet<u32> = fake.tables[&s.table].iter().copied().collect();
        assert_eq!(
            table, active,
            "{when}: {v}: the table names exactly the active backends"
        );
    }
    // A backend slot lives as long as a service has the backend.
    let used: BTreeSet<SocketAddr> = want
        .values()
        .flat_map(|s| s.backends.keys().copied())
        .collect();
    let slots: BTreeSet<SocketAddr> = fake.backends.values().copied().collect();
    assert_eq!(slots, used, "{when}: backend slots");
    // Each backend's record names exactly the VIPs it serves, under its slot.
    let mut served: BTreeMap<SocketAddr, (u32, BTreeSet<Vip>)> = BTreeMap::new();
    for (v, spec) in want {
        for a in spec.backends.keys() {
            let id = fake.backends.iter().find(|(_, b)| *b == a).map(|(i, _)| *i);
            served
                .entry(*a)
                .or_insert((id.unwrap_or(u32::MAX), BTreeSet::new()))
                .1
                .insert(*v);
        }
    }
    let recorded: BTreeMap<SocketAddr, (u32, BTreeSet<Vip>)> = fake
        .backend_vips
        .iter()
        .map(|(a, r)| (*a, (r.id, r.vips.clone())))
        .collect();
    assert_eq!(recorded, served, "{when}: backends' VIPs");
    // Memory follows the services: a block taken only by a service with active backends.
    let taken: BTreeSet<u32> = fake.tables.keys().copied().collect();
    let named: BTreeSet<u32> = fake
        .services
        .values()
        .filter(|s| s.active > 0)
        .map(|s| s.table)
        .collect();
    assert_eq!(taken, named, "{when}: blocks taken");
    assert_eq!(
        fake.bad_frees,
        Vec::<u32>::new(),
        "{when}: blocks freed wrongly"
    );
}

/// How many store operations applying `after` over `before` takes.
fn operations() -> usize {
    let mut w = writer();
    assert!(w.apply(&before()).failed.is_empty());
    let start = w.store().ops;
    let applied = w.apply(&after());
    assert!(applied.failed.is_empty(), "{applied:?}");
    w.store().ops - start
}

fn run_with_failures(failing: impl Fn(usize) -> Range<usize>, what: &str) {
    let total = operations();
    assert!(total >= 15, "the scenario makes {total} operations");
    for n in 0..total {
        let when = format!("{what} at operation {n} of {total}");
        let mut w = writer();
        assert!(w.apply(&before()).failed.is_empty(), "{when}");
        let start = w.store().ops;
        w.store_mut().failing = failing(start + n);
        let applied = w.apply(&after());
        assert!(
            !applied.failed.is_empty(),
            "{when}: nothing failed: {applied:?}"
        );
        assert_mirror_follows(&w, &format!("{when}, after the failed apply"));
        assert_eq!(w.store().non_members(), Vec::<String>::new(), "{when}");
        w.store_mut().failing = 0..0;
        let applied = w.apply(&after());
        assert!(
            applied.failed.is_empty(),
            "{when}: the retry failed: {applied:?}"
        );
        assert_mirror_follows(&w, &format!("{when}, after the retry"));
        assert_serves(&w, &after(), &format!("{when}, after the retry"));
        assert!(
            w.apply(&after()).is_noop(),
            "{when}: a third apply wrote again"
        );
        // And back.
        assert!(w.apply(&before()).failed.is_empty(), "{when}");
        assert_serves(&w, &before(), &format!("{when}, back to the first state"));
    }
}

#[test]
fn one_failed_operation_leaves_the_mirror_equal_to_the_maps() {
    run_with_failures(|n| n..n + 1, "one failure");
}

#[test]
fn failures_from_an_operation_on_leave_the_mirror_equal_to_the_maps() {
    // Every operation from the n-th fails, the undoing ones too.
    run_with_failures(|n| n..usize::MAX, "failures from then on");
}

#[test]
fn a_failed_member_removal_after_the_switch_is_retried() {
    // The case of issue 10: the new table and entry went in, removing the departed backend
    // failed.
    let mut w = writer();
    assert!(w.apply(&before()).failed.is_empty());
    let start = w.store().ops;
    // Find the removal of 198.18.1.3's membership by replaying with each operation failing
    // until the failure names it and the service's entry already flipped.
    let total = operations();
    let mut seen = false;
    for n in 0..total {
        let mut w = writer();
        assert!(w.apply(&before()).failed.is_empty());
        w.store_mut().failing = start + n..start + n + 1;
        let applied = w.apply(&after());
        let failed = applied.failed.join("; ");
        if !failed.contains("remove_member") || !failed.contains("172.16.0.1:80") {
            continue;
        }
        seen = true;
        let v = vip("172.16.0.1:80");
        let departed = w.state().backend_ids[&addr("198.18.1.3:80")];
        let (id, table) = (w.store().services[&v].id, w.store().services[&v].table);
        assert!(
            !w.store().tables[&table].contains(&departed),
            "the new table is in place"
        );
        assert!(
            w.store().members.contains_key(&(id, departed)),
            "the membership whose removal failed is still there"
        );
        assert_mirror_follows(&w, "after the failed removal");
        w.store_mut().failing = 0..0;
        assert!(w.apply(&after()).failed.is_empty());
        assert!(
            !w.store().members.contains_key(&(id, departed)),
            "the retry removed it"
        );
        assert_serves(&w, &after(), "after the retry");
    }
    assert!(seen, "no operation removed 172.16.0.1:80's departed member");
}

/// A one-task change among many services writes that service alone: its memberships, one
/// table and its entry; the others are neither rebuilt nor written.
#[test]
fn a_one_task_change_writes_only_its_service() {
    let table = TableConfig::new(RING, 7)
        .unwrap()
        .with_capacity(64, 256, 1024)
        .unwrap();
    let mut w = Writer::with_store(Fake::default(), KernelState::default(), table);
    let spec = |moved: Option<&str>| -> Desired {
        (0..50)
            .map(|i| {
                let v = vip(&format!("172.16.1.{i}:80"));
                let mut s = ServiceSpec::new(v, None);
                for j in 0..3 {
                    let b = match (i, j, moved) {
                        (7, 1, Some(m)) => m.to_string(),
                        _ => format!("198.18.{i}.{j}:80"),
                    };
                    s.add_backend(BackendSpec {
                        addr: addr(&b),
                        state: A,
                        app: format!("/app{i}").into(),
                        task: format!("t{j}").into(),
                    });
                }
                (v, s)
            })
            .collect()
    };
    assert_eq!(w.apply(&spec(None)).added.len(), 50);
    let tables_before = w.store().tables.clone();
    let services_before = w.store().services.clone();
    let start = w.store().ops;
    let applied = w.apply(&spec(Some("198.18.99.1:80")));
    let changed = vip("172.16.1.7:80");
    assert_eq!(applied.changed, [changed.to_string()]);
    assert_eq!(applied.unchanged, 49);
    // New backend (counters, slot), 3 memberships, 1 table, 1 entry, the departed membership,
    // the service's departures count raised (read and raised in `lb_svcdep_v1`, then in the
    // entry), the departed backend's slot freed.
    assert_eq!(w.store().ops - start, 12, "operations of a one-task change");
    let written: Vec<u32> = w
        .store()
        .tables
        .iter()
        .filter(|(block, t)| tables_before.get(block) != Some(t))
        .map(|(block, _)| *block)
        .collect();
    let svc = w.store().services[&changed];
    assert_eq!(
        svc.departures,
        services_before[&changed].departures + 1,
        "a backend left: the service's departures count goes up"
    );
    assert_eq!(
        w.store().departures[&svc.id],
        svc.departures,
        "and its id's count in lb_svcdep_v1 with it"
    );
    assert_eq!(
        written,
        [svc.table],
        "only the changed service's table is written"
    );
    assert_eq!(w.store().tables.len(), 50, "its old block was given back");
    for (v, s) in &w.store().services {
        if *v != changed {
            assert_eq!(services_before[v], *s, "{v} was written");
        }
    }
    assert_mirror_follows(&w, "after the one-task change");
}

/// The changes between two desired states, as an incremental merge gives them.
fn changes(from: &Desired, to: &Desired) -> Vec<(Vip, Option<ServiceSpec>)> {
    let gone = from
        .keys()
        .filter(|v| !to.contains_key(v))
        .map(|v| (*v, None));
    let new = to
        .iter()
        .filter(|(v, s)| from.get(v) != Some(s))
        .map(|(v, s)| (*v, Some(s.clone())));
    gone.chain(new).collect()
}

/// Applying only what changed brings the maps where applying the whole state does (the same
/// services written, added, removed), and leaves the mirror equal to the maps.
#[test]
fn applying_the_changes_equals_applying_the_whole() {
    let (mut whole, mut part) = (writer(), writer());
    let steps = [Desired::new(), before(), after(), before(), Desired::new()];
    for pair in steps.windows(2) {
        let a = whole.apply(&pair[1]);
        let b = part.apply_changes(&changes(&pair[0], &pair[1]));
        assert_eq!(
            (&a.added, &a.changed, &a.removed, &a.failed, a.unchanged),
            (&b.added, &b.changed, &b.removed, &b.failed, b.unchanged)
        );
        assert_serves(&part, &pair[1], "changes applied");
        assert_mirror_follows(&part, "changes applied");
        assert_eq!(
            format!("{:?}", whole.state()),
            format!("{:?}", part.state())
        );
    }
}

#[test]
fn a_table_has_the_size_its_active_backends_give_it() {
    let mut w = super::fake_store::writer(lb_common::DEFAULT_RING_SIZE, 8, 512, 1024);
    let backends = |n: usize| -> Vec<(String, BackendState)> {
        (0..n)
            .map(|i| (format!("198.18.{}.{}:80", 1 + i / 200, 1 + i % 200), A))
            .collect()
    };
    let one = |n: usize| -> Desired {
        let b = backends(n);
        let b: Vec<(&str, BackendState)> = b.iter().map(|(a, s)| (a.as_str(), *s)).collect();
        desired(&[
            ("172.16.0.1:80", &b),
            ("172.16.0.2:80", &[("198.18.9.1:80", A)]),
        ])
    };
    // (active backends, class, slots): 100 slots a backend at least, in the class just above,
    // the configured size (class 0) from 164 backends on.
    for (n, class, slots) in [
        (5, 2, 509),
        (6, 3, 1021),
        (20, 4, 2039),
        (200, 0, 16381),
        (3, 2, 509),
    ] {
        let want = one(n);
        let applied = w.apply(&want);
        assert!(applied.failed.is_empty(), "{n}: {:?}", applied.failed);
        assert_serves(&w, &want, &format!("{n} backends"));
        let fake = w.store();
        let s = fake.services[&vip("172.16.0.1:80")];
        assert_eq!(lb_common::ref_class(s.table), class, "{n} backends");
        assert_eq!(fake.tables[&s.table].len(), slots, "{n} backends");
        let other = fake.services[&vip("172.16.0.2:80")];
        assert_eq!(
            fake.tables[&other.table].len(),
            251,
            "one backend: the smallest class"
        );
        // The table the service left went back: one table per service, no bad free.
        assert_eq!(fake.tables.len(), 2, "{n} backends");
        assert!(fake.bad_frees.is_empty(), "{n}: {:?}", fake.bad_frees);
    }
}

/// Tables an agent of another configured size or before size classes wrote (class 0) are
/// written again in the class their backends give, though the backends did not change: every
/// agent of this version then sends new flows alike.
#[test]
fn a_table_of_another_class_is_written_again() {
    let want = desired(&[("172.16.0.1:80", &[("198.18.1.1:80", A)])]);
    // At a configured size of 251, every table is of class 0.
    let mut old = super::fake_store::writer(251, 8, 16, 64);
    assert!(old.apply(&want).failed.is_empty());
    let state = old.state().clone();
    let mut store = std::mem::take(old.store_mut());
    store.ring = lb_common::DEFAULT_RING_SIZE;
    let s = store.services[&vip("172.16.0.1:80")];
    assert_eq!(lb_common::ref_class(s.table), 0);
    let table = TableConfig::new(lb_common::DEFAULT_RING_SIZE, 7)
        .unwrap()
        .with_capacity(8, 16, 64)
        .unwrap();
    let mut w = Writer::with_store(store, state, table);
    let applied = w.apply(&want);
    assert_eq!(applied.changed, vec!["tcp 172.16.0.1:80".to_string()]);
    let fake = w.store();
    let s = fake.services[&vip("172.16.0.1:80")];
    assert_eq!(
        lb_common::ref_class(s.table),
        1,
        "one backend: the smallest class"
    );
    assert_eq!(fake.tables.len(), 1, "the class 0 table went back");
    assert!(fake.bad_frees.is_empty(), "{:?}", fake.bad_frees);
    assert!(w.apply(&want).is_noop(), "and stays");
}

/// `lb_svcdep_v1`: a service's id holds its departures count; it goes up before the service
/// is removed, and the next service to take the id starts above it, so that no note the program
/// took for the id's earlier services holds for the new one.
#[test]
fn an_ids_departures_count_ends_the_notes_of_its_earlier_services() {
    let mut w = writer();
    let one = desired(&[("172.16.0.1:80", &[("198.18.1.1:80", A)])]);
    assert!(w.apply(&one).failed.is_empty());
    let first = w.store().services[&vip("172.16.0.1:80")];
    assert_eq!(w.store().departures[&first.id], first.departures);
    assert!(w.apply(&Desired::new()).failed.is_empty());
    let after_removal = w.store().departures[&first.id];
    assert_ne!(after_removal, first.departures, "raised before the removal");
    // Another VIP takes the id.
    let other = desired(&[("172.16.0.9:80", &[("198.18.1.1:80", A)])]);
    assert!(w.apply(&other).failed.is_empty());
    let second = w.store().services[&vip("172.16.0.9:80")];
    assert_eq!(second.id, first.id, "the id is reused");
    assert!(
        second.departures != first.departures && second.departures != after_removal,
        "{second:?} starts above {after_removal}"
    );
    assert_eq!(w.store().departures[&second.id], second.departures);
}

#[test]
fn a_backends_record_names_its_vips_before_it_serves_them_and_after_it_left() {
    // 198.18.1.2:80 serves two VIPs: its record names both; once it leaves one, only the other.
    let mut w = writer();
    let a = w.apply(&before());
    assert!(a.failed.is_empty(), "{:?}", a.failed);
    let rec = |w: &Writer<Fake>, b: &str| w.store().backend_vips.get(&addr(b)).cloned();
    let both: BTreeSet<Vip> = [vip("172.16.0.1:80"), vip("172.16.0.2:80")].into();
    assert_eq!(rec(&w, "198.18.1.2:80").map(|r| r.vips), Some(both));
    let one = desired(&[
        ("172.16.0.1:80", &[("198.18.1.1:80", A)]),
        ("172.16.0.2:80", &[("198.18.1.2:80", A)]),
    ]);
    // Within the grace, the record keeps the VIPs a backend left (its lean flows' replies still
    // come from the VIP), even once its slot is freed.
    w.set_record_grace(std::time::Duration::from_secs(3600));
    let a = w.apply(&one);
    assert!(a.failed.is_empty(), "{:?}", a.failed);
    assert_eq!(rec(&w, "198.18.1.2:80").map(|r| r.vips.len()), Some(2));
    assert_eq!(rec(&w, "198.18.1.3:80").map(|r| r.vips.len()), Some(1));
    assert!(
        !w.store()
            .backends
            .values()
            .any(|b| *b == addr("198.18.1.3:80"))
    );
    // After it, the next apply takes them out.
    w.set_record_grace(std::time::Duration::ZERO);
    let a = w.apply(&one);
    assert!(a.is_noop(), "{a:?}");
    assert_serves(&w, &one, "after leaving");
    assert_eq!(
        rec(&w, "198.18.1.2:80").map(|r| r.vips),
        Some([vip("172.16.0.2:80")].into())
    );
    assert_eq!(
        rec(&w, "198.18.1.3:80"),
        None,
        "a backend that left every VIP"
    );
    // A record that cannot be written stops the service's write before its membership.
    w.store_mut().vips_failing = true;
    let more = desired(&[
        (
            "172.16.0.1:80",
            &[("198.18.1.1:80", A), ("198.18.1.5:80", A)],
        ),
        ("172.16.0.2:80", &[("198.18.1.2:80", A)]),
    ]);
    let a = w.apply(&more);
    assert_eq!(a.failed.len(), 1, "{a:?}");
    assert_mirror_follows(&w, "a record that could not be written");
    assert!(
        !w.store().members.keys().any(|(_, b)| w
            .store()
            .backends
            .get(b)
            .is_some_and(|x| *x == addr("198.18.1.5:80"))),
        "a membership without its record"
    );
    w.store_mut().vips_failing = false;
    let a = w.apply(&more);
    assert!(a.failed.is_empty(), "{:?}", a.failed);
    assert_serves(&w, &more, "written again");
}

#[test]
fn a_record_says_no_lean_flow_only_while_the_backend_never_served_one_vip_alone() {
    let mut w = writer();
    let no_lean =
        |w: &Writer<Fake>, b: &str| w.store().backend_vips.get(&addr(b)).map(|r| r.no_lean);
    // 198.18.1.2:80 comes with two VIPs in one apply: both are recorded before either
    // membership, so it never served one alone.
    let two = desired(&[
        (
            "172.16.0.1:80",
            &[("198.18.1.1:80", A), ("198.18.1.2:80", A)],
        ),
        ("172.16.0.2:80", &[("198.18.1.2:80", A)]),
    ]);
    let a = w.apply(&two);
    assert!(a.failed.is_empty(), "{:?}", a.failed);
    assert_serves(&w, &two, "two VIPs at once");
    assert_eq!(no_lean(&w, "198.18.1.2:80"), Some(true));
    // 198.18.1.1:80 served 172.16.0.1 alone: once it serves a second VIP, lean flows to the
    // first may hold it.
    let three = desired(&[
        (
            "172.16.0.1:80",
            &[("198.18.1.1:80", A), ("198.18.1.2:80", A)],
        ),
        ("172.16.0.2:80", &[("198.18.1.2:80", A)]),
        ("172.16.0.3:80", &[("198.18.1.1:80", A)]),
    ]);
    let a = w.apply(&three);
    assert!(a.failed.is_empty(), "{:?}", a.failed);
    assert_eq!(no_lean(&w, "198.18.1.1:80"), Some(false));
    assert_eq!(no_lean(&w, "198.18.1.2:80"), Some(true), "unchanged");
    // And it keeps saying so when it is back to one VIP and then two again.
    w.set_record_grace(std::time::Duration::ZERO);
    let a = w.apply(&two);
    assert!(a.failed.is_empty(), "{:?}", a.failed);
    let a = w.apply(&three);
    assert!(a.failed.is_empty(), "{:?}", a.failed);
    assert_eq!(no_lean(&w, "198.18.1.1:80"), Some(false));
    // A VIP recorded ahead for a service that then fails is taken out again: the new
    // backend's slot, record and membership are written, its table (the fifth operation)
    // fails.
    let start = w.store().ops;
    w.store_mut().failing = start + 4..start + 5;
    let four = desired(&[
        (
            "172.16.0.1:80",
            &[("198.18.1.1:80", A), ("198.18.1.2:80", A)],
        ),
        ("172.16.0.2:80", &[("198.18.1.2:80", A)]),
        ("172.16.0.3:80", &[("198.18.1.1:80", A)]),
        ("172.16.0.4:80", &[("198.18.1.7:80", A)]),
    ]);
    let a = w.apply(&four);
    assert!(
        a.failed.len() == 1 && a.failed[0].contains("write_table"),
        "{a:?}"
    );
    assert_eq!(no_lean(&w, "198.18.1.7:80"), None);
    assert_mirror_follows(&w, "a service that failed after its record was written");
}

#[test]
fn a_service_that_fails_before_its_memberships_leaves_no_vip_recorded_ahead() {
    // Room for two services: the third fails when it takes an id, after its VIP was recorded
    // ahead for its backend and before any membership of it was written.
    let mut w = super::fake_store::writer(RING, 2, 16, 64);
    let three = desired(&[
        ("172.16.0.1:80", &[("198.18.1.1:80", A)]),
        ("172.16.0.2:80", &[("198.18.1.2:80", A)]),
        (
            "172.16.0.3:80",
            &[("198.18.1.3:80", A), ("198.18.1.1:80", A)],
        ),
    ]);
    let a = w.apply(&three);
    assert!(
        a.failed.len() == 1 && a.failed[0].starts_with("tcp 172.16.0.3:80"),
        "{a:?}"
    );
    assert_mirror_follows(&w, "a service without an id");
    let rec = |b: &str| w.store().backend_vips.get(&addr(b)).cloned();
    assert_eq!(
        rec("198.18.1.3:80"),
        None,
        "a backend of the failed service alone"
    );
    assert_eq!(
        rec("198.18.1.1:80").map(|r| r.vips),
        Some([vip("172.16.0.1:80")].into()),
        "a backend of another service too keeps only that one"
    );
}

/// An apply writes each backend's record once, with every VIP it gains, and none of them
/// again when its memberships are written.
#[test]
fn a_backend_record_is_written_once_an_apply() {
    let mut w = super::fake_store::writer(RING, 16, 16, 64);
    let both: &[(&str, BackendState)] = &[("198.18.1.1:80", A), ("198.18.1.2:80", A)];
    let three = desired(&[
        ("172.16.0.1:80", both),
        ("172.16.0.2:80", both),
        ("172.16.0.3:80", both),
    ]);
    let a = w.apply(&three);
    assert!(a.failed.is_empty() && a.added.len() == 3, "{a:?}");
    assert_eq!(w.store().vips_writes, 2, "one write per backend");
    for b in ["198.18.1.1:80", "198.18.1.2:80"] {
        let rec = w
            .store()
            .backend_vips
            .get(&addr(b))
            .cloned()
            .expect("a record");
        assert_eq!(rec.vips.len(), 3, "{b}");
        assert!(rec.no_lean, "{b}: came with three VIPs at once");
    }
    assert!(w.apply(&three).is_noop());
    assert_eq!(w.store().vips_writes, 2, "nothing to write again");
}

/// Four services new to the maps, two backends each (one shared by two services).
fn four_new() -> Desired {
    desired(&[
        (
            "172.16.0.1:80",
            &[("198.18.1.1:80", A), ("198.18.1.2:80", A)],
        ),
        (
            "172.16.0.2:80",
            &[("198.18.1.3:80", A), ("198.18.1.4:80", D)],
        ),
        (
            "172.16.0.3:80",
            &[("198.18.1.5:80", A), ("198.18.1.2:80", A)],
        ),
        (
            "172.16.0.4:80",
            &[("198.18.1.6:80", A), ("198.18.1.7:80", A)],
        ),
    ])
}

#[test]
fn new_services_written_step_by_step_fail_one_at_a_time() {
    // The first apply writes the four services' memberships in one write and their entries in
    // another: a failure at any operation fails only the services it is about; the others are
    // served, the mirror follows, and the next apply serves them all.
    let total = {
        let mut w = writer();
        let applied = w.apply(&four_new());
        assert!(applied.failed.is_empty(), "{applied:?}");
        w.store().ops
    };
    assert!(total >= 20, "the first apply makes {total} operations");
    for n in 0..total {
        let when = format!("one failure at operation {n} of {total}");
        let mut w = writer();
        w.store_mut().failing = n..n + 1;
        let applied = w.apply(&four_new());
        assert!(!applied.failed.is_empty(), "{when}: nothing failed");
        // Only the services named in `failed` are missing.
        let served: Desired = four_new()
            .into_iter()
            .filter(|(v, _)| {
                !applied
                    .failed
                    .iter()
                    .any(|f| f.starts_with(&format!("{v}:")))
            })
            .collect();
        assert_eq!(
            applied.added.len(),
            served.len(),
            "{when}: added {applied:?}"
        );
        // A failed membership or entry is one service's: the write of all of them goes on
        // without it.
        if applied
            .failed
            .iter()
            .any(|f| f.contains("set_member (") || f.contains("set_service ("))
        {
            assert_eq!(applied.failed.len(), 1, "{when}: {applied:?}");
        }
        assert_mirror_follows(&w, &format!("{when}, after the failed apply"));
        assert_eq!(w.store().non_members(), Vec::<String>::new(), "{when}");
        assert_serves(&w, &served, &format!("{when}: the others"));
        w.store_mut().failing = 0..0;
        let applied = w.apply(&four_new());
        assert!(applied.failed.is_empty(), "{when}: the retry: {applied:?}");
        assert_mirror_follows(&w, &format!("{when}, after the retry"));
        assert_serves(&w, &four_new(), &format!("{when}, after the retry"));
    }
}

#[test]
fn a_fresh_id_starts_at_its_zero_count_and_any_other_above_it() {
    // Maps made empty by this process: the first services' ids are fresh, no count is written.
    let mut w = writer();
    w.store_mut().made_empty = true;
    let applied = w.apply(&four_new());
    assert!(applied.failed.is_empty(), "{applied:?}");
    assert_eq!(w.store().departures, BTreeMap::new(), "no count written");
    assert!(w.store().services.values().all(|s| s.departures == 0));
    assert_mirror_follows(&w, "fresh ids");
    // A backend leaves one: its id's count goes above what the service had.
    let mut fewer = four_new();
    let one = vip("172.16.0.1:80");
    fewer
        .get_mut(&one)
        .unwrap()
        .backends
        .remove(&addr("198.18.1.1:80"));
    assert!(w.apply(&fewer).failed.is_empty());
    let id = w.store().services[&one].id;
    assert_eq!(w.store().departures.get(&id), Some(&1));
    assert_eq!(w.store().services[&one].departures, 1);
    // The service goes and another takes its id: it starts above the id's count.
    let mut without = fewer.clone();
    without.remove(&one);
    assert!(w.apply(&without).failed.is_empty());
    let mut other = without.clone();
    other.extend(desired(&[("172.16.0.9:80", &[("198.18.1.9:80", A)])]));
    assert!(w.apply(&other).failed.is_empty());
    let next = w.store().services[&vip("172.16.0.9:80")];
    assert_eq!(next.id, id, "the freed id is taken again");
    assert!(
        next.departures > 1 && w.store().departures.get(&id) == Some(&next.departures),
        "{next:?}"
    );
    assert_mirror_follows(&w, "an id taken again");
    // Maps adopted from before: every new service's id gets a count above the one it had.
    let mut w = writer();
    assert!(w.apply(&four_new()).failed.is_empty());
    assert!(w.store().services.values().all(|s| s.departures == 1));
    assert_eq!(w.store().departures.len(), 4);
}
