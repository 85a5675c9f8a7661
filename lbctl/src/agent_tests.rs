//! The reconciler: an app fetched alone is applied as the whole document with that app changed
//! would be, and an app the last document did not have is left for a snapshot.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::{Sync, WHOLE_EVERY};
use crate::{
    dataplane::{
        Writer,
        fake_store::{self, FakeStore},
    },
    marathon::{Options, Snapshot},
    model::{BackendState, Vip},
};
use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

fn no_dns(_: &str) -> Option<IpAddr> {
    None
}

fn read(text: &str) -> Snapshot {
    Snapshot::read(text, "test", &no_dns).unwrap()
}

/// App `i` with a task on each of `hosts` (198.18.1.H, port 31000 + i); its VIP is shared
/// with the apps whose number is the same modulo 4.
fn app(i: usize, hosts: &[u8]) -> Value {
    let tasks: Vec<Value> = hosts
        .iter()
        .enumerate()
        .map(|(k, h)| {
            json!({
                "id": format!("app{i}.t{k}"),
                "appId": format!("/t/app{i}"),
                "host": format!("198.18.1.{h}"),
                "ports": [31000 + i],
                "state": "TASK_RUNNING",
                "startedAt": "2026-01-01T00:00:00.000Z"
            })
        })
        .collect();
    json!({
        "id": format!("/t/app{i}"),
        "instances": hosts.len(),
        "portDefinitions": [{
            "port": 0,
            "protocol": "tcp",
            "labels": {"VIP_0": format!("172.16.0.{}:80", i % 4 + 1)}
        }],
        "tasks": tasks
    })
}

fn served(w: &Writer<FakeStore>) -> BTreeMap<Vip, BTreeMap<SocketAddr, BackendState>> {
    w.state()
        .services
        .iter()
        .map(|(v, s)| {
            (
                *v,
                s.backends.iter().map(|(a, (_, st))| (*a, *st)).collect(),
            )
        })
        .collect()
}

fn writer() -> Writer<FakeStore> {
    fake_store::writer(13, 64, 256, 1024)
}

#[test]
fn an_app_alone_is_applied_as_its_document_would_be() {
    let opts = Options::default();
    let mut apps: Vec<Value> = (0..12).map(|i| app(i, &[1, 2, i as u8 + 3])).collect();
    // `alone` gets each change as the app alone, `whole` as the whole document.
    let (mut alone, mut whole) = (Sync::default(), Sync::default());
    let (mut aw, mut ww) = (writer(), writer());
    let first = read(&json!({ "apps": apps }).to_string());
    alone.apply(&first, &opts, &mut aw);
    whole.apply(&first, &opts, &mut ww);
    let broken = |a: &mut Value| a["portDefinitions"][0]["labels"]["VIP_0"] = json!("nonsense");
    // (app, change, whether it changes what is served)
    type Step = (usize, Box<dyn Fn(&mut Value)>, bool);
    let steps: Vec<Step> = vec![
        (3, Box::new(|a| *a = app(3, &[1, 2, 40])), true),
        (3, Box::new(|a| *a = app(3, &[1])), true),
        (7, Box::new(|a| *a = app(7, &[])), true),
        (11, Box::new(|a| *a = app(11, &[5, 6, 7, 8, 9])), true),
        // A broken definition keeps what the app had, and says why.
        (5, Box::new(broken), false),
        (5, Box::new(|a| *a = app(5, &[50])), true),
        (
            0,
            Box::new(|a| a["tasks"][0]["host"] = json!("198.18.1.77")),
            true,
        ),
    ];
    for (k, (i, change, writes)) in steps.iter().enumerate() {
        change(&mut apps[*i]);
        let got = alone
            .apply_app(
                &read(&json!({ "app": apps[*i] }).to_string()),
                &opts,
                &mut aw,
            )
            .expect("an app of the last document");
        let want = whole.apply(&read(&json!({ "apps": apps }).to_string()), &opts, &mut ww);
        assert_eq!(served(&aw), served(&ww), "step {k}");
        assert_eq!(got.0, want.0, "step {k}: problems");
        assert!(got.1.failed.is_empty(), "step {k}: {:?}", got.1.failed);
        assert_eq!(!got.1.is_noop(), *writes, "step {k}: {:?}", got.1);
        let says = got.0.iter().any(|p| p.to_string().contains("nonsense"));
        assert_eq!(says, !writes, "step {k}: {:?}", got.0);
    }
    // An app the last document did not have: left for a snapshot, nothing written.
    let before = served(&aw);
    let new = read(&json!({ "app": app(99, &[1]) }).to_string());
    assert!(alone.apply_app(&new, &opts, &mut aw).is_none());
    assert_eq!(served(&aw), before);
}

/// Before any document there is no place for an app: a snapshot must come first.
#[test]
fn an_app_before_any_document_waits_for_one() {
    let mut sync = Sync::default();
    let mut w = writer();
    let one = read(&json!({ "app": app(1, &[1]) }).to_string());
    assert!(sync.apply_app(&one, &Options::default(), &mut w).is_none());
    assert!(served(&w).is_empty());
}

/// The periodic whole apply runs only when due, after a document, and finds what the apps
/// applied alone left: the same state, nothing to write. It then waits `WHOLE_EVERY` again.
#[test]
fn the_whole_check_runs_when_due_and_finds_the_apps_applied_alone() {
    let opts = Options::default();
    let mut sync = Sync::default();
    let mut w = writer();
    let t0 = std::time::Instant::now();
    assert!(sync.check_whole(t0, &opts, &mut w).is_none(), "no document");
    let mut apps: Vec<Value> = (0..8).map(|i| app(i, &[1, 2])).collect();
    sync.apply(&read(&json!({ "apps": apps }).to_string()), &opts, &mut w);
    let now = std::time::Instant::now();
    let almost = now + WHOLE_EVERY - std::time::Duration::from_secs(1);
    assert!(sync.check_whole(almost, &opts, &mut w).is_none());
    apps[2] = app(2, &[1, 2, 30]);
    let alone = read(&json!({ "app": apps[2] }).to_string());
    let got = sync.apply_app(&alone, &opts, &mut w).expect("a known app");
    assert_eq!(got.1.changed.len(), 1, "{:?}", got.1);
    let before = served(&w);
    let due = now + WHOLE_EVERY;
    let wholes = sync.merger.counts().0;
    let (problems, applied) = sync.check_whole(due, &opts, &mut w).expect("due");
    assert_eq!(sync.merger.counts().0, wholes + 1, "a whole merge");
    assert!(problems.is_empty(), "{problems:?}");
    assert!(
        applied.is_noop() && applied.failed.is_empty(),
        "{applied:?}"
    );
    assert_eq!(applied.unchanged, before.len());
    assert_eq!(served(&w), before);
    // A whole document of the same apps says the same.
    let mut fresh = (Sync::default(), writer());
    fresh.0.apply(
        &read(&json!({ "apps": apps }).to_string()),
        &opts,
        &mut fresh.1,
    );
    assert_eq!(served(&fresh.1), before);
    // The clock starts again from the check.
    let after = due + WHOLE_EVERY - std::time::Duration::from_secs(1);
    assert!(sync.check_whole(after, &opts, &mut w).is_none());
    assert!(sync.check_whole(due + WHOLE_EVERY, &opts, &mut w).is_some());
}

/// A large removal held by the guard is confirmed only by a document: neither an app fetched
/// alone nor the periodic whole check re-applies the last document as if it were a new one.
#[test]
fn only_a_document_confirms_a_held_removal() {
    let opts = Options::default();
    let mut sync = Sync::new(crate::guard::RemovalPolicy {
        max_fraction: 0.5,
        floor: 2,
        confirm: std::time::Duration::ZERO,
    });
    let mut w = writer();
    // Apps 0..8 over VIPs 172.16.0.1..4 (app i on VIP i % 4 + 1): four services.
    let mut apps: Vec<Value> = (0..8).map(|i| app(i, &[1, 2])).collect();
    sync.apply(&read(&json!({ "apps": apps }).to_string()), &opts, &mut w);
    assert_eq!(served(&w).len(), 4);
    // A document with apps 0 and 4 alone would remove three of the four services: held.
    let few: Vec<Value> = vec![apps[0].clone(), apps[4].clone()];
    sync.apply(&read(&json!({ "apps": few }).to_string()), &opts, &mut w);
    assert!(sync.hold().is_some(), "the removal is held");
    assert_eq!(served(&w).len(), 4);
    // App 0 changes, fetched alone: applied, and the removal stays held.
    apps[0] = app(0, &[1, 2, 3]);
    let alone = read(&json!({ "app": apps[0] }).to_string());
    assert!(sync.apply_app(&alone, &opts, &mut w).is_some());
    assert!(sync.hold().is_some(), "an app alone confirmed the removal");
    assert_eq!(served(&w).len(), 4);
    let later = std::time::Instant::now() + WHOLE_EVERY;
    let _ = sync.check_whole(later, &opts, &mut w);
    assert!(
        sync.hold().is_some(),
        "the whole check confirmed the removal"
    );
    assert_eq!(served(&w).len(), 4);
    // A document that agrees does.
    let few: Vec<Value> = vec![apps[0].clone(), apps[4].clone()];
    sync.apply(&read(&json!({ "apps": few }).to_string()), &opts, &mut w);
    assert!(sync.hold().is_none());
    assert_eq!(served(&w).len(), 1);
}
