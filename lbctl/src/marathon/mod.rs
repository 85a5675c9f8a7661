//! From Marathon documents to the services to serve: one pipeline for the agent, `lbctl render`
//! and `lbctl simulate --apps`.
//!
//! 1. **read** ([`Snapshot::read`]): parse the document ([`document`]) and resolve the task host
//!    names derivation will need with a [`Resolve`] the caller passes (the only stage that may
//!    block: the agent does it on its source threads, never in its reconcile loop);
//! 2. **derive** ([`Snapshot::derive_apps`], pure): what each app contributes. A port's labels
//!    whose key starts with `VIP`/`vip` declare VIPs ([`labels`]); the backends of a port depend
//!    on the app's networking mode ([`networking`]) and its tasks' states ([`tasks`]). One app
//!    with bad data yields problems naming it, and never stops the other apps from being served;
//! 3. **merge** ([`merge()`], pure): apps naming the same VIP share one service; named VIPs get
//!    addresses. The result, [`Derived`], is the desired state.
//!
//! [`desired_state`] runs the three; the agent runs them with its last-good step between 2 and 3,
//! deriving only the apps that changed ([`AppCache`]).
mod derive;
mod document;
mod incremental;
mod labels;
mod merge;
mod names;
mod networking;
mod options;
mod problem;
mod snapshot;
mod tasks;

pub use derive::{AppResult, AppVip, derive_app};
pub use document::{DocApp, parse_document};
pub use incremental::{Merged, Merger};
pub use labels::{VipTarget, domain_frag, parse_vip_label};
pub use merge::{Derived, allocate_names, merge, merge_with};
pub use names::{Assigned, Collision, NameBook, book_path};
pub use options::{
    Cidr, DEFAULT_NAMED_POOL, DEFAULT_VIP_RANGES, Options, local_addresses, special_address,
};
pub use problem::Problem;
pub use snapshot::{AppCache, Snapshot};
pub use tasks::{Hosts, Lookup, Resolve, SystemResolver};

use crate::error::Result;

/// The whole pipeline: read `text` (resolving task hosts with `resolver`), derive every app,
/// merge. Returns each app's contribution and the desired state.
pub fn derive_with(
    text: &str,
    what: &str,
    opts: &Options,
    resolver: &dyn Resolve,
) -> Result<(Vec<AppResult>, Derived)> {
    let apps = Snapshot::read(text, what, resolver)?.derive_apps(opts);
    let derived = merge(&apps, opts);
    Ok((apps, derived))
}

/// The desired state a document yields (the pipeline of [`derive_with`]).
pub fn desired_state(
    text: &str,
    what: &str,
    opts: &Options,
    resolver: &dyn Resolve,
) -> Result<Derived> {
    derive_with(text, what, opts, resolver).map(|(_, derived)| derived)
}

/// The pipeline with the system's resolver.
pub fn derive(text: &str, what: &str, opts: &Options) -> Result<(Vec<AppResult>, Derived)> {
    derive_with(text, what, opts, &SystemResolver)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::{cell::RefCell, collections::BTreeMap, net::IpAddr};

    #[test]
    fn the_resolver_is_asked_once_per_name_and_only_at_read() {
        let doc = r#"{"apps": [
          {"id": "/a", "portDefinitions": [{"labels": {"VIP_0": "172.16.0.1:80"}}, {"labels": {"VIP_1": "172.16.0.2:80"}}],
           "tasks": [{"id": "a1", "host": "node-1", "ports": [31000, 31001], "state": "TASK_RUNNING"},
                     {"id": "a2", "host": "198.18.1.2", "ports": [31000, 31001], "state": "TASK_RUNNING"}]},
          {"id": "/b", "portDefinitions": [{"labels": {"VIP_0": "172.16.0.1:80"}}],
           "tasks": [{"id": "b1", "host": "node-1", "ports": [32000], "state": "TASK_RUNNING"},
                     {"id": "b2", "host": "node-2", "ports": [32000], "state": "TASK_RUNNING"}]}]}"#;
        let asked = RefCell::new(Vec::new());
        let resolver = |h: &str| {
            asked.borrow_mut().push(h.to_string());
            (h == "node-1").then(|| IpAddr::from([198, 18, 1, 1]))
        };
        let snapshot = Snapshot::read(doc, "doc", &resolver).unwrap();
        assert_eq!(*asked.borrow(), ["node-1", "node-2"]);
        let d = merge(
            &snapshot.derive_apps(&Options::default()),
            &Options::default(),
        );
        assert_eq!(asked.borrow().len(), 2, "deriving asked again");
        let vip = |s: &str| crate::model::Vip {
            addr: s.parse().unwrap(),
            proto: crate::model::Proto::Tcp,
        };
        let backends = |s: &str| -> Vec<String> {
            d.services[&vip(s)]
                .backends
                .keys()
                .map(|a| a.to_string())
                .collect()
        };
        assert_eq!(
            backends("172.16.0.1:80"),
            ["198.18.1.1:31000", "198.18.1.1:32000", "198.18.1.2:31000"]
        );
        assert_eq!(
            backends("172.16.0.2:80"),
            ["198.18.1.1:31001", "198.18.1.2:31001"]
        );
        assert_eq!(d.problems.len(), 1);
        assert_eq!(d.problems[0].task.as_deref(), Some("b2"));
    }

    #[test]
    fn not_a_document_is_a_clear_error() {
        let never = |h: &str| -> Option<IpAddr> { panic!("resolver asked for {h}") };
        let e = desired_state("{\"apps\": [", "apps.json", &Options::default(), &never)
            .unwrap_err()
            .to_string();
        assert!(e.contains("apps.json") && e.contains("invalid JSON"), "{e}");
    }

    /// Task hosts given as addresses in `doc` replaced by names (`node-<address>`), with the
    /// table that resolves them back.
    fn hosts_by_name(doc: &mut serde_json::Value, table: &mut BTreeMap<String, IpAddr>) {
        use serde_json::Value;
        match doc {
            Value::Object(o) => {
                if let Some(Value::Array(tasks)) = o.get_mut("tasks") {
                    for t in tasks {
                        let ip = t
                            .get("host")
                            .and_then(Value::as_str)
                            .and_then(|h| h.parse().ok());
                        if let Some(ip) = ip {
                            let name = format!("node-{ip}").replace([':', '.'], "-");
                            t["host"] = Value::from(name.clone());
                            table.insert(name, ip);
                        }
                    }
                }
                o.values_mut().for_each(|v| hosts_by_name(v, table));
            }
            Value::Array(a) => a.iter_mut().for_each(|v| hosts_by_name(v, table)),
            _ => {}
        }
    }

    /// Over every render fixture, with its task hosts turned into names: the names read before
    /// deriving are all those derivation looks up, so the result is the one the addresses give.
    #[test]
    fn hosts_by_name_derive_as_hosts_by_address() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/marathon/render");
        let (mut documents, mut renamed) = (0, 0);
        for entry in std::fs::read_dir(&dir).expect("tests/fixtures/marathon/render") {
            let path = entry.unwrap().path();
            let name = path.to_string_lossy().to_string();
            if !name.ends_with(".json") || name.ends_with(".expect.json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let no_names = |h: &str| -> Option<IpAddr> { panic!("{name}: asked for {h}") };
            let Ok(by_address) = desired_state(&text, &name, &Options::default(), &no_names) else {
                continue;
            };
            let mut table = BTreeMap::new();
            hosts_by_name(&mut doc, &mut table);
            let resolver = |h: &str| table.get(h).copied();
            let by_name =
                desired_state(&doc.to_string(), &name, &Options::default(), &resolver).unwrap();
            assert_eq!(by_name.services, by_address.services, "{name}");
            assert_eq!(by_name.problems, by_address.problems, "{name}");
            documents += 1;
            renamed += table.len();
        }
        assert!(documents >= 50, "only {documents} fixtures read");
        assert!(
            renamed >= 50,
            "only {renamed} task hosts renamed: the test proves little"
        );
    }
}
