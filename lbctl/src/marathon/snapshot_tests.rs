//! The cache must never change what a document yields: every test here compares what the
//! cached path gives with a derivation from scratch.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use crate::marathon::merge;
use std::{cell::RefCell, net::IpAddr};

fn fresh(text: &str, opts: &Options, resolver: &dyn Resolve) -> Vec<AppResult> {
    Snapshot::read(text, "doc", resolver)
        .unwrap()
        .derive_apps(opts)
}

/// The agent's path: parse, resolve with the cache, derive with it.
fn cached(
    text: &str,
    opts: &Options,
    resolver: &dyn Resolve,
    cache: &AppCache,
) -> Vec<Arc<AppResult>> {
    let mut s = Snapshot::parse(text, "doc").unwrap();
    s.resolve_hosts_with(resolver, Some(cache));
    s.derive_cached(opts, cache)
}

fn same(a: &[Arc<AppResult>], b: &[AppResult], what: &str) {
    let a: Vec<&AppResult> = a.iter().map(|r| &**r).collect();
    let b: Vec<&AppResult> = b.iter().collect();
    assert_eq!(a, b, "{what}");
}

fn app(id: &str, vip: &str, hosts: &[&str]) -> String {
    let tasks: Vec<String> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            format!(
                r#"{{"id": "{id}.{i}", "host": "{h}", "ports": [31000], "state": "TASK_RUNNING"}}"#
            )
        })
        .collect();
    format!(
        r#"{{"id": "{id}", "portDefinitions": [{{"labels": {{"VIP_0": "{vip}"}}}}], "tasks": [{}]}}"#,
        tasks.join(", ")
    )
}

fn doc(apps: &[String]) -> String {
    format!(r#"{{"apps": [{}]}}"#, apps.join(", "))
}

const NO_NAMES: fn(&str) -> Option<IpAddr> = |_| None;

/// Every render fixture, derived through one cache in turn (each after the previous, then all
/// again in reverse): the same apps, problems and services as from scratch every time.
#[test]
fn cached_derivation_equals_fresh_over_every_fixture() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/marathon/render");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.to_string_lossy().to_string();
        if name.ends_with(".json") && !name.ends_with(".expect.json") {
            let text = std::fs::read_to_string(&path).unwrap();
            if Snapshot::parse(&text, &name).is_ok() {
                docs.push((name, text));
            }
        }
    }
    assert!(docs.len() >= 50, "only {} fixtures", docs.len());
    let resolver = |h: &str| (h == "node-1").then(|| IpAddr::from([198, 18, 1, 1]));
    let opts = Options::default();
    let cache = AppCache::default();
    let order = docs.iter().chain(docs.iter().rev()).chain(docs.iter());
    for (name, text) in order {
        let got = cached(text, &opts, &resolver, &cache);
        let want = fresh(text, &opts, &resolver);
        same(&got, &want, name);
        assert_eq!(
            merge(&got, &opts).services,
            merge(&want, &opts).services,
            "{name}"
        );
    }
}

#[test]
fn only_the_app_that_changed_is_derived_again() {
    let mut apps: Vec<String> = (0..20)
        .map(|i| {
            app(
                &format!("/a{i}"),
                &format!("172.16.0.{}:80", i + 1),
                &["198.18.1.2", "198.18.1.3"],
            )
        })
        .collect();
    let opts = Options::default();
    let cache = AppCache::default();
    let before = cached(&doc(&apps), &opts, &NO_NAMES, &cache);
    assert_eq!(cache.len(), 20);
    apps[7] = app("/a7", "172.16.0.8:80", &["198.18.1.2", "198.18.9.9"]);
    let text = doc(&apps);
    let after = cached(&text, &opts, &NO_NAMES, &cache);
    same(&after, &fresh(&text, &opts, &NO_NAMES), "after the change");
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_eq!(Arc::ptr_eq(b, a), i != 7, "app {i}");
    }
    // The removed app leaves the cache; a document with it again derives it anew.
    apps.remove(3);
    let after = cached(&doc(&apps), &opts, &NO_NAMES, &cache);
    assert_eq!(cache.len(), 19);
    assert_eq!(after.len(), 19);
}

/// A change of what a host name resolves to derives again the apps that read it, a task that
/// does not serve included (its host's address is one no VIP may take).
#[test]
fn a_host_answer_that_changed_derives_its_apps_again() {
    let text = doc(&[
        app("/web", "172.16.0.1:80", &["node-1"]),
        // Its only task is not running: not a backend, but its host is one of its addresses.
        app("/idle", "172.16.0.2:80", &["node-2"]).replace("TASK_RUNNING", "TASK_STAGING"),
        app("/plain", "172.16.0.3:80", &["198.18.1.9"]),
    ]);
    let opts = Options::default();
    let cache = AppCache::default();
    let first = |h: &str| match h {
        "node-1" => Some(IpAddr::from([198, 18, 1, 1])),
        "node-2" => Some(IpAddr::from([198, 18, 1, 2])),
        _ => None,
    };
    let then = |h: &str| (h == "node-1").then(|| IpAddr::from([198, 18, 7, 7]));
    let a = cached(&text, &opts, &first, &cache);
    same(&a, &fresh(&text, &opts, &first), "first");
    let b = cached(&text, &opts, &then, &cache);
    same(&b, &fresh(&text, &opts, &then), "then");
    assert!(
        !Arc::ptr_eq(&a[0], &b[0]),
        "node-1 moved: /web derived again"
    );
    assert!(Arc::ptr_eq(&a[2], &b[2]), "/plain reads no name");
}

#[test]
fn other_options_derive_everything_again() {
    let text = doc(&[app("/a", "172.16.0.1:80", &["198.18.1.2"])]);
    let cache = AppCache::default();
    let a = cached(&text, &Options::default(), &NO_NAMES, &cache);
    let opts = Options {
        local_addrs: vec![IpAddr::from([172, 16, 0, 1])],
        ..Options::default()
    };
    let b = cached(&text, &opts, &NO_NAMES, &cache);
    same(&b, &fresh(&text, &opts, &NO_NAMES), "new options");
    assert!(!Arc::ptr_eq(&a[0], &b[0]));
    assert_ne!(
        a[0].problems, b[0].problems,
        "the VIP is now the host's own address"
    );
}

/// The same app text in two groups is two apps with two ids.
#[test]
fn the_same_text_in_another_group_is_another_app() {
    let one = r#"{"id": "web", "portDefinitions": [{"labels": {"VIP_0": "172.16.0.1:80"}}]}"#;
    let text = format!(
        r#"{{"id": "/", "groups": [{{"id": "/qa", "apps": [{one}]}}, {{"id": "/prod", "apps": [{one}]}}]}}"#
    );
    let cache = AppCache::default();
    let opts = Options::default();
    for _ in 0..2 {
        let got = cached(&text, &opts, &NO_NAMES, &cache);
        let ids: Vec<&str> = got.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["/qa/web", "/prod/web"]);
    }
}

/// An app the cache holds is not read again to know its host names: they are still resolved,
/// once each, for the document that holds it.
#[test]
fn a_known_app_still_has_its_hosts_resolved() {
    let text = doc(&[app("/a", "172.16.0.1:80", &["node-1", "node-2"])]);
    let asked = RefCell::new(Vec::new());
    let resolver = |h: &str| {
        asked.borrow_mut().push(h.to_string());
        Some(IpAddr::from([198, 18, 1, 1]))
    };
    let cache = AppCache::default();
    let opts = Options::default();
    let a = cached(&text, &opts, &resolver, &cache);
    let mut s = Snapshot::parse(&text, "doc").unwrap();
    s.resolve_hosts_with(&resolver, Some(&cache));
    assert!(matches!(s.apps[0].read, Read::Known(_)), "read again");
    assert_eq!(*asked.borrow(), ["node-1", "node-2", "node-1", "node-2"]);
    let b = s.derive_cached(&opts, &cache);
    assert!(Arc::ptr_eq(&a[0], &b[0]));
}
