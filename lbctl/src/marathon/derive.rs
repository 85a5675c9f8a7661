//! What one app contributes: for each port with VIP labels, the VIPs it declares and the
//! backends its tasks give. Pure: task host names are read from `Hosts`, resolved beforehand
//! (`host_names` says which ones this app needs).
use super::{
    document::DocApp,
    labels::{VipTarget, label_text, parse_protocol, parse_vip_label, vip_labels},
    networking::{BackendPort, port_specs},
    options::Options,
    problem::Problem,
    tasks::{Hosts, is_name, port_number, task_state},
};
use crate::model::{BackendSpec, Proto, same_family};
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

/// What one app contributes: VIPs with their backends, and its problems.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppResult {
    /// The app's absolute id.
    pub id: String,
    /// One entry per (VIP, protocol) the app declares.
    pub vips: Vec<AppVip>,
    /// What could not be used, naming where.
    pub problems: Vec<Problem>,
    /// A port or label of this app is broken, so its declared VIPs are uncertain. The agent keeps
    /// serving what this app had before instead of applying a partial view.
    pub config_broken: bool,
    /// Every address the app's tasks have (their hosts' and their own, whatever their state):
    /// no VIP may equal one, lest it capture the task's traffic.
    pub task_addrs: BTreeSet<IpAddr>,
    /// When the app's configuration last changed, as Marathon says (ISO 8601): the order in
    /// which new named VIPs get addresses.
    pub since: Option<String>,
}

/// One VIP of an app with the backends of the port that declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppVip {
    /// The VIP's address, or its name until addresses are allocated.
    pub target: VipTarget,
    /// The protocol served.
    pub proto: Proto,
    /// The backends of the port, those of the VIP's address family only.
    pub backends: Vec<BackendSpec>,
    /// The index of the port that declares it.
    pub port_index: usize,
    /// The label that declares it.
    pub label: String,
}

/// The task host names to resolve before deriving this app: the hosts (not IP addresses) of
/// its serving tasks, when one of its ports with VIP labels uses host ports.
pub(crate) fn host_names<'a>(app: &'a DocApp, out: &mut BTreeSet<&'a str>) {
    let Ok(def) = &app.def else { return };
    let Ok(ports) = port_specs(def) else { return };
    let uses_hosts = ports.iter().any(|p| {
        matches!(p.backend, Ok(BackendPort::Host(_))) && !vip_labels(&p.labels).is_empty()
    });
    if app.id.is_empty() || !uses_hosts {
        return;
    }
    let health = def.has_health_checks();
    for task in def.tasks.iter().flatten() {
        if let Some(host) = task.host.as_deref()
            && is_name(host)
            && task_state(task, health).is_some()
        {
            out.insert(host);
        }
    }
}

/// Every task host name `derive_app` looks up in `Hosts` for this app (a superset of
/// [`host_names`]: the hosts of all its tasks, whose addresses no VIP may take): its result
/// depends on the document only through the app's text and what these names resolved to.
pub(crate) fn names_read<'a>(app: &'a DocApp, out: &mut BTreeSet<&'a str>) {
    let Ok(def) = &app.def else { return };
    for task in def.tasks.iter().flatten() {
        if let Some(host) = task.host.as_deref().filter(|h| is_name(h)) {
            out.insert(host);
        }
    }
}

/// Derives what one app contributes; task hosts are looked up in `hosts`.
pub fn derive_app(app: &DocApp, opts: &Options, hosts: &Hosts) -> AppResult {
    let id = app.id.as_str();
    let mut res = AppResult {
        id: id.to_string(),
        ..Default::default()
    };
    let broken = |mut res: AppResult, reason: String| {
        res.problems.push(Problem::of_app(id, reason));
        res.config_broken = true;
        res
    };
    if id.is_empty() {
        return broken(res, "the app has no `id`".into());
    }
    let def = match &app.def {
        Ok(a) => a,
        Err(reason) => return broken(res, reason.clone()),
    };
    let ports = match port_specs(def) {
        Ok(p) => p,
        Err(reason) => return broken(res, reason),
    };
    let tasks = def.tasks.as_deref().unwrap_or(&[]);
    // One copy of the id for all the app's backends.
    let app_name: Arc<str> = id.into();
    res.since = def.config_since();
    for task in tasks {
        let own = task.ip_addresses.iter().flatten();
        let own = own.filter_map(|ip| ip.ip_address.as_deref()?.parse::<IpAddr>().ok());
        res.task_addrs.extend(own);
        res.task_addrs
            .extend(task.host.as_deref().and_then(|h| hosts.get(h)));
    }
    let has_health_checks = def.has_health_checks();
    // The VIPs the app's served ports declare: a label Marathon ignores (a port definition of a
    // bridge app, say) is no problem when a served port declares the same VIP (Marathon's
    // legacy responses echo port mappings' labels there).
    let served: BTreeSet<String> = ports
        .iter()
        .filter(|p| p.backend.is_ok())
        .flat_map(|p| {
            vip_labels(&p.labels)
                .into_iter()
                .map(|(_, v)| label_text(v))
        })
        .collect();
    for port in &ports {
        let vip_labels = vip_labels(&port.labels);
        if vip_labels.is_empty() {
            continue;
        }
        let problem = |label: &str, value: &str, reason: String| Problem {
            app: Some(id.to_string()),
            task: None,
            port_index: Some(port.index),
            label: Some(label.to_string()),
            value: Some(value.to_string()),
            reason,
        };
        let port_backend = match &port.backend {
            Ok(b) => *b,
            Err(reason) => {
                for (k, v) in &vip_labels {
                    let text = label_text(v);
                    if !served.contains(&text) {
                        res.problems.push(problem(k, &text, reason.clone()));
                    }
                }
                continue;
            }
        };
        let protos = match parse_protocol(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(reason) => {
                for (k, v) in &vip_labels {
                    res.problems
                        .push(problem(k, &label_text(v), reason.clone()));
                }
                res.config_broken = true;
                continue;
            }
        };
        let mut targets = Vec::new();
        for (key, value) in &vip_labels {
            let text = label_text(value);
            match parse_vip_label(&text, opts) {
                Ok(t) => targets.push((t, key.to_string())),
                Err(reason) => {
                    res.problems.push(problem(key, &text, reason));
                    res.config_broken = true;
                }
            }
        }
        targets.sort();
        targets.dedup_by(|a, b| a.0 == b.0);
        if targets.is_empty() {
            continue;
        }
        // Backends of this port, per address family.
        let mut backends = Vec::new();
        for task in tasks {
            let task_id = task.id.clone().unwrap_or_default();
            let task_name: Arc<str> = task_id.as_str().into();
            let Some(state) = task_state(task, has_health_checks) else {
                continue;
            };
            let backend = |addr: SocketAddr| BackendSpec {
                addr,
                state,
                app: app_name.clone(),
                task: task_name.clone(),
            };
            let task_problem = |reason: String| Problem {
                app: Some(id.to_string()),
                task: Some(task_id.clone()),
                port_index: Some(port.index),
                label: None,
                value: None,
                reason,
            };
            match port_backend {
                BackendPort::Host(k) => {
                    let Some(ip) = task.host.as_deref().and_then(|h| hosts.get(h)) else {
                        let host = task.host.as_deref().unwrap_or("");
                        res.problems.push(task_problem(if hosts.timed_out(host) {
                            format!(
                                "task host {host:?} did not resolve in time; it is retried in \
                                 the background and served once it resolves"
                            )
                        } else {
                            format!("task host {host:?} is not an address and does not resolve")
                        }));
                        continue;
                    };
                    match task
                        .ports
                        .as_ref()
                        .and_then(|p| p.get(k))
                        .and_then(port_number)
                    {
                        Some(p) => backends.push(backend(SocketAddr::new(ip, p))),
                        None => res.problems.push(task_problem(format!(
                            "the task has no allocated host port #{k} (its `ports` are {})",
                            serde_json::to_string(&task.ports).unwrap_or_default()
                        ))),
                    }
                }
                BackendPort::Container(cp) => {
                    let addrs = task
                        .ip_addresses
                        .iter()
                        .flatten()
                        .filter_map(|ip| ip.ip_address.as_deref()?.parse::<IpAddr>().ok());
                    let before = backends.len();
                    backends.extend(addrs.map(|a| backend(SocketAddr::new(a, cp))));
                    if backends.len() == before {
                        res.problems.push(task_problem(
                            "the task has no `ipAddresses`: container networking reaches tasks at their own addresses".into(),
                        ));
                    }
                }
            }
        }
        for (target, label) in targets {
            let family_ok = |b: &&BackendSpec| match &target {
                VipTarget::Ip(a) => same_family(a.ip(), b.addr.ip()),
                VipTarget::Named { .. } => b.addr.is_ipv4(),
            };
            // A task with addresses, none of the VIP's family, is no backend of it: say so.
            let kept: BTreeSet<&str> = backends
                .iter()
                .filter(family_ok)
                .map(|b| &*b.task)
                .collect();
            let mut left_out: Vec<&str> = backends
                .iter()
                .map(|b| &*b.task)
                .filter(|t| !kept.contains(t))
                .collect();
            left_out.dedup();
            for task in left_out {
                res.problems.push(Problem {
                    app: Some(id.to_string()),
                    task: Some(task.to_string()),
                    port_index: Some(port.index),
                    label: Some(label.clone()),
                    value: None,
                    reason: "the task has no address of the VIP's family (named VIPs are IPv4)"
                        .into(),
                });
            }
            for &proto in &protos {
                res.vips.push(AppVip {
                    target: target.clone(),
                    proto,
                    backends: backends.iter().filter(family_ok).cloned().collect(),
                    port_index: port.index,
                    label: label.clone(),
                });
            }
        }
    }
    res
}

/// Derives an app given as JSON with the default options (for tests).
#[cfg(test)]
pub(crate) fn derive_value(id: &str, app: &serde_json::Value, hosts: &Hosts) -> AppResult {
    derive_app(&DocApp::new(id, app), &Options::default(), hosts)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::model::BackendState::{Active, Draining};
    use serde_json::{Value, json};

    /// The first VIP's backends by (address, state).
    fn addrs(r: &AppResult) -> Vec<(String, crate::model::BackendState)> {
        r.vips[0]
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.state))
            .collect()
    }

    fn host_app(label: &str) -> Value {
        json!({
            "id": "/web",
            "portDefinitions": [{"port": 0, "labels": {"VIP_0": label}}],
            "tasks": [
                {"id": "t1", "host": "198.18.1.11", "ports": [31000], "state": "TASK_RUNNING"},
                {"id": "t2", "host": "198.18.1.12", "ports": [31001], "state": "TASK_STAGING"},
                {"id": "t3", "host": "198.18.1.13", "ports": [31002], "state": "TASK_KILLING"},
                {"id": "t4", "host": "198.18.1.14", "ports": [], "state": "TASK_RUNNING"}
            ]
        })
    }

    #[test]
    fn host_networking_backends() {
        let r = derive_value("/web", &host_app("172.16.0.1:8080"), &Hosts::default());
        assert!(!r.config_broken);
        assert_eq!(r.vips.len(), 1);
        assert_eq!(
            addrs(&r),
            [
                ("198.18.1.11:31000".to_string(), Active),
                ("198.18.1.13:31002".to_string(), Draining),
            ]
        );
        // The task without its port is a problem naming the task; the others carry on.
        assert_eq!(r.problems.len(), 1);
        assert_eq!(r.problems[0].task.as_deref(), Some("t4"));
    }

    #[test]
    fn a_bad_label_names_app_port_and_label() {
        let r = derive_value("/web", &host_app("172.16.0.1:http"), &Hosts::default());
        assert!(r.config_broken);
        assert!(r.vips.is_empty());
        let p = &r.problems[0];
        assert_eq!(p.app.as_deref(), Some("/web"));
        assert_eq!(p.port_index, Some(0));
        assert_eq!(p.label.as_deref(), Some("VIP_0"));
        assert_eq!(p.value.as_deref(), Some("172.16.0.1:http"));
        let shown = p.to_string();
        assert!(
            shown.contains("/web") && shown.contains("port 0") && shown.contains("VIP_0"),
            "{shown}"
        );
    }

    #[test]
    fn task_hosts_come_from_the_resolved_table() {
        let mut app = host_app("172.16.0.1:8080");
        app["tasks"][0]["host"] = "node-1".into();
        app["tasks"][1] = json!({"id": "gone", "host": "no-such-host",
            "ports": [31001], "state": "TASK_RUNNING"});
        let doc = DocApp::new("/web", &app);
        let mut names = BTreeSet::new();
        host_names(&doc, &mut names);
        assert_eq!(names, BTreeSet::from(["no-such-host", "node-1"]));
        let table = |h: &str| (h == "node-1").then(|| IpAddr::from([198, 18, 7, 1]));
        let hosts = Hosts::resolve(names, &table);
        let r = derive_app(&doc, &Options::default(), &hosts);
        assert_eq!(
            addrs(&r),
            [
                ("198.18.7.1:31000".to_string(), Active),
                ("198.18.1.13:31002".to_string(), Draining),
            ]
        );
        let p = r
            .problems
            .iter()
            .find(|p| p.task.as_deref() == Some("gone"))
            .expect("problem");
        assert!(
            p.reason.contains("\"no-such-host\" is not an address"),
            "{p}"
        );
        assert!(!r.config_broken, "a task problem must not hold the app");
    }

    #[test]
    fn only_the_hosts_derivation_reads_are_named() {
        // Addresses, a task that does not serve, and an app without VIPs need no resolving.
        let mut app = host_app("172.16.0.1:8080");
        app["tasks"][1]["host"] = "staging-node".into();
        let no_vip = json!({"id": "/plain", "portDefinitions": [{"port": 0}],
            "tasks": [{"id": "t", "host": "node-9", "ports": [1], "state": "TASK_RUNNING"}]});
        // Container ports are reached at the task's own addresses, not its host's.
        let container = json!({"id": "/c", "networks": [{"mode": "container"}],
            "container": {"portMappings": [{"containerPort": 80, "labels": {"VIP_0": "10.0.0.1:80"}}]},
            "tasks": [{"id": "t", "host": "node-8", "state": "TASK_RUNNING",
                       "ipAddresses": [{"ipAddress": "9.0.0.1"}]}]});
        let apps = [
            DocApp::new("/web", &app),
            DocApp::new("/plain", &no_vip),
            DocApp::new("/c", &container),
        ];
        let mut names = BTreeSet::new();
        for a in &apps {
            host_names(a, &mut names);
        }
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn health_checks_decide_the_state() {
        let app = json!({
            "id": "/h",
            "healthChecks": [{"protocol": "HTTP"}],
            "portDefinitions": [{"labels": {"VIP_0": "10.0.0.1:80"}}],
            "tasks": [
                {"id": "ok", "host": "198.18.1.1", "ports": [1], "state": "TASK_RUNNING",
                 "healthCheckResults": [{"alive": true}]},
                {"id": "sick", "host": "198.18.1.2", "ports": [2], "state": "TASK_RUNNING",
                 "healthCheckResults": [{"alive": true}, {"alive": false}]},
                {"id": "new", "host": "198.18.1.3", "ports": [3], "state": "TASK_RUNNING"},
                {"id": "old", "host": "198.18.1.4", "ports": [4], "startedAt": "2017-01-01T00:00:00Z",
                 "healthCheckResults": [{"alive": true}]}
            ]
        });
        let r = derive_value("/h", &app, &Hosts::default());
        let got: Vec<(String, crate::model::BackendState)> = r.vips[0]
            .backends
            .iter()
            .map(|b| (b.task.to_string(), b.state))
            .collect();
        assert_eq!(
            got,
            vec![
                ("ok".into(), Active),
                ("sick".into(), Draining),
                ("old".into(), Active),
            ]
        );
    }

    #[test]
    fn an_app_without_id_or_of_the_wrong_shape_is_broken() {
        let r = derive_value("", &json!({"cmd": "x"}), &Hosts::default());
        assert!(r.config_broken);
        assert_eq!(r.problems[0].reason, "the app has no `id`");
        assert_eq!(r.problems[0].app, None);
        let r = derive_value("/w", &json!({"tasks": "many"}), &Hosts::default());
        assert!(r.config_broken);
        assert!(
            r.problems[0]
                .reason
                .starts_with("not a valid app definition"),
            "{:?}",
            r.problems
        );
    }

    /// Item 8 of issue 14: each VIP label that yields no service and each running task that
    /// yields no backend is a problem saying why (these all vanished silently before).
    #[test]
    fn every_dropped_label_and_task_is_a_problem() {
        type Seen = (Option<usize>, Option<String>, Option<String>, String);
        let why = |app: Value| -> Vec<Seen> {
            derive_value("/x", &app, &Hosts::default())
                .problems
                .into_iter()
                .map(|p| (p.port_index, p.label, p.task, p.reason))
                .collect()
        };
        let bridge = why(json!({"networks": [{"mode": "container/bridge"}],
            "portDefinitions": [{"labels": {"VIP_0": "10.0.0.1:80"}}],
            "container": {"portMappings": [{"containerPort": 80}]}}));
        assert_eq!(bridge.len(), 1, "{bridge:?}");
        assert_eq!(
            (bridge[0].0, bridge[0].1.as_deref()),
            (Some(0), Some("VIP_0"))
        );
        assert!(
            bridge[0].3.contains("ignores `portDefinitions`"),
            "{bridge:?}"
        );
        let port0 = why(json!({"networks": [{"mode": "container"}],
            "container": {"portMappings": [{"containerPort": 0, "labels": {"VIP_0": "10.0.0.1:80"}}]}}));
        assert!(port0[0].3.contains("container port 0"), "{port0:?}");
        let discovery = why(json!({"ipAddress": {"discovery": {"ports": [
            {"number": 70000, "labels": {"vip": "10.0.0.1:80"}}]}}}));
        assert_eq!(discovery[0].1.as_deref(), Some("vip"));
        assert!(discovery[0].3.contains("70000"), "{discovery:?}");
        let no_ips = why(json!({"networks": [{"mode": "container"}],
            "container": {"portMappings": [{"containerPort": 80, "labels": {"VIP_0": "10.0.0.1:80"}}]},
            "tasks": [{"id": "t1", "host": "198.18.1.1", "state": "TASK_RUNNING"},
                      {"id": "t2", "host": "198.18.1.2", "state": "TASK_RUNNING", "ipAddresses": []},
                      {"id": "t3", "state": "TASK_RUNNING", "ipAddresses": [{"ipAddress": "9.0.0.3"}]}]}));
        let tasks: Vec<&str> = no_ips.iter().filter_map(|p| p.2.as_deref()).collect();
        assert_eq!(tasks, ["t1", "t2"], "{no_ips:?}");
        assert!(no_ips[0].3.contains("no `ipAddresses`"), "{no_ips:?}");
        // An IPv6-only task is no backend of an IPv4 VIP.
        let v6 = why(json!({"networks": [{"mode": "container"}],
            "container": {"portMappings": [{"containerPort": 80, "labels": {"VIP_0": "10.0.0.1:80"}}]},
            "tasks": [{"id": "t6", "state": "TASK_RUNNING", "ipAddresses": [{"ipAddress": "fd00::6"}]},
                      {"id": "t4", "state": "TASK_RUNNING", "ipAddresses": [{"ipAddress": "9.0.0.4"}]}]}));
        assert_eq!(v6.len(), 1, "{v6:?}");
        assert_eq!(
            (v6[0].1.as_deref(), v6[0].2.as_deref()),
            (Some("VIP_0"), Some("t6"))
        );
        assert!(v6[0].3.contains("no address of the VIP's family"), "{v6:?}");
        // A label Marathon echoes on the port definitions of a bridge app, declared on the port
        // mapping too, is served: no problem.
        let echoed = why(json!({"container": {"docker": {"network": "BRIDGE",
                "portMappings": [{"containerPort": 80, "labels": {"vip": "10.0.0.1:80"}}]}},
            "portDefinitions": [{"labels": {"vip": "10.0.0.1:80"}}]}));
        assert!(echoed.is_empty(), "{echoed:?}");
    }
}
