//! Folding the apps' contributions into services: one service per VIP whatever number of apps
//! name it, and addresses for named VIPs, the same on every agent given the same names.
use super::{
    derive::AppResult,
    labels::VipTarget,
    names::{Assigned, NameBook},
    options::Cidr,
    options::Options,
    problem::Problem,
};
use crate::model::{Desired, ServiceSpec, Vip};
use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
};

/// Everything a document yields.
#[derive(Clone, Debug, Default)]
pub struct Derived {
    /// The services to serve, by VIP.
    pub services: Desired,
    /// What could not be used, naming where.
    pub problems: Vec<Problem>,
}

/// Folds the apps' contributions into services: apps naming the same VIP share one service whose
/// backends are the union; named VIPs get their addresses from the pool, with an in-memory
/// [`NameBook`] (the agent keeps its book across documents: [`merge_with`]).
pub fn merge<A: Borrow<AppResult>>(apps: &[A], opts: &Options) -> Derived {
    merge_with(apps, opts, &mut NameBook::in_memory())
}

/// [`merge`] with the named VIPs' addresses kept in `book`. A VIP is refused, with a problem
/// naming app, port and label, when its address is one of a task's (of any app of the
/// document) or of the load balancer's own host: it would capture their traffic.
pub fn merge_with<A: Borrow<AppResult>>(
    apps: &[A],
    opts: &Options,
    book: &mut NameBook,
) -> Derived {
    let apps: Vec<&AppResult> = apps.iter().map(Borrow::borrow).collect();
    merge_placing(&apps, opts, book).0
}

/// Where one app's VIPs went: the services they joined and the problems placing them made.
#[derive(Clone, Debug, Default)]
pub(crate) struct Placed {
    /// For each VIP placed: its index in the app's `vips`, and the service it joined.
    pub(crate) joined: Vec<(usize, Vip)>,
    /// Why the others were not (in the order of the app's VIPs).
    pub(crate) problems: Vec<Problem>,
}

/// What a whole merge knows beside its result, for the next one (`incremental`).
pub(crate) struct Placing {
    /// Each app's placement, in document order.
    pub(crate) apps: Vec<Placed>,
    /// True when this merge placed a new name (its collision is told once) or left one without
    /// an address: the next merge must place names again.
    pub(crate) names_moving: bool,
    /// The named VIPs' addresses.
    pub(crate) named: HashSet<IpAddr>,
}

/// [`merge_with`], with where each app's VIPs went.
pub(crate) fn merge_placing(
    apps: &[&AppResult],
    opts: &Options,
    book: &mut NameBook,
) -> (Derived, Placing) {
    // Each name, with the earliest time an app carrying it last changed its configuration.
    let mut wanted: BTreeMap<String, Option<String>> = BTreeMap::new();
    for app in apps {
        for v in &app.vips {
            if let VipTarget::Named { dns, .. } = &v.target {
                let since = wanted
                    .entry(dns.clone())
                    .or_insert_with(|| app.since.clone());
                if let Some(t) = &app.since
                    && since.as_ref().is_none_or(|s| t < s)
                {
                    *since = Some(t.clone());
                }
            }
        }
    }
    // The addresses of the tasks and of this host: no VIP may capture them.
    let mut captured: HashSet<IpAddr> = apps
        .iter()
        .flat_map(|a| a.task_addrs.iter().copied())
        .collect();
    captured.extend(opts.local_addrs.iter().copied());
    // A new name takes none of those, nor an IP VIP's.
    let ip_vips: HashSet<IpAddr> = apps
        .iter()
        .flat_map(|a| &a.vips)
        .filter_map(|v| match &v.target {
            VipTarget::Ip(a) => Some(a.ip()),
            VipTarget::Named { .. } => None,
        })
        .collect();
    let taken = |ip| captured.contains(&ip) || ip_vips.contains(&ip);
    let assigned = book.assign_with(&wanted, &taken, opts.named_pool);
    let mut out = Derived::default();
    let mut collided = BTreeSet::new();
    let mut placing = Placing {
        apps: Vec::with_capacity(apps.len()),
        names_moving: !assigned.collisions.is_empty()
            || wanted.keys().any(|n| !assigned.addrs.contains_key(n)),
        named: assigned.addrs.values().copied().collect(),
    };
    let is_captured = |ip: IpAddr| captured.contains(&ip);
    // Placed first, all together, then the services built: the placements (which the agent
    // keeps) are not strewn among the services (which it drops), which would keep the heap's
    // pages from going back to the system.
    for app in apps {
        let placed = place(app, &assigned, &mut collided, &is_captured, opts);
        placing.apps.push(placed);
    }
    for (app, placed) in apps.iter().zip(&placing.apps) {
        out.problems.extend(app.problems.iter().cloned());
        out.problems.extend(placed.problems.iter().cloned());
        join(&mut out.services, app, placed);
    }
    (out, placing)
}

/// Places `app`'s VIPs: a named one at its address in `assigned` (a problem when the pool had
/// none for it, and, once per name in `collided`, when it collided); none at an address that
/// `captured` says is a task's or this host's.
pub(crate) fn place(
    app: &AppResult,
    assigned: &Assigned,
    collided: &mut BTreeSet<String>,
    captured: &dyn Fn(IpAddr) -> bool,
    opts: &Options,
) -> Placed {
    let mut out = Placed::default();
    for (k, v) in app.vips.iter().enumerate() {
        let problem = |value: String, reason: String| Problem {
            app: Some(app.id.clone()),
            task: None,
            port_index: Some(v.port_index),
            label: Some(v.label.clone()),
            value: Some(value),
            reason,
        };
        let (addr, name) = match &v.target {
            VipTarget::Ip(a) => (*a, None),
            VipTarget::Named { dns, port } => match assigned.addrs.get(dns.as_str()) {
                Some(ip) => (SocketAddr::new(*ip, *port), Some(dns)),
                None => {
                    let reason = format!("the named-VIP pool {} is full", opts.named_pool);
                    out.problems.push(problem(dns.clone(), reason));
                    continue;
                }
            },
        };
        if let Some(c) = assigned.collisions.iter().find(|c| Some(&c.name) == name)
            && collided.insert(c.name.clone())
        {
            let reason = format!(
                "named VIP {} collides at {} with a name that holds it; it got {}",
                c.name, c.home, c.got
            );
            out.problems.push(problem(c.name.clone(), reason));
        }
        if captured(addr.ip()) {
            let whose = if opts.local_addrs.contains(&addr.ip()) {
                "the load balancer's own host"
            } else {
                "a task"
            };
            let reason = format!(
                "{} is an address of {whose}; a VIP there would capture its traffic",
                addr.ip()
            );
            out.problems.push(problem(addr.to_string(), reason));
            continue;
        }
        let vip = Vip {
            addr,
            proto: v.proto,
        };
        out.joined.push((k, vip));
    }
    out
}

/// Adds what `app` gives the services where `placed` says its VIPs go.
pub(crate) fn join(services: &mut Desired, app: &AppResult, placed: &Placed) {
    for &(k, vip) in &placed.joined {
        let v = &app.vips[k];
        let svc = services
            .entry(vip)
            .or_insert_with(|| ServiceSpec::new(vip, service_name(v)));
        svc.apps.insert(app.id.clone());
        for b in &v.backends {
            svc.add_backend(b.clone());
        }
    }
}

/// The DNS name of the service a VIP of an app joins (a named VIP's).
fn service_name(v: &super::derive::AppVip) -> Option<String> {
    match &v.target {
        VipTarget::Named { dns, .. } => Some(dns.clone()),
        VipTarget::Ip(_) => None,
    }
}

/// Addresses for named VIPs placed all at once, in name order (no history): each name starts
/// at the pool address its FNV-1a hash points to, moving to the next free address on a
/// collision (with another name or one of `taken`). Network and broadcast addresses of the
/// pool are skipped.
pub fn allocate_names(
    names: &BTreeSet<&str>,
    taken: &BTreeSet<IpAddr>,
    pool: Cidr,
) -> BTreeMap<String, IpAddr> {
    let wanted = names.iter().map(|n| (n.to_string(), None)).collect();
    NameBook::in_memory().assign(&wanted, taken, pool).addrs
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::marathon::{derive::derive_value, tasks::Hosts};
    use serde_json::json;

    #[test]
    fn named_allocation_is_deterministic_and_collision_free() {
        let pool: Cidr = "11.0.0.0/30".parse().unwrap(); // two usable addresses
        let names: BTreeSet<&str> = ["a", "b"].into_iter().collect();
        let one = allocate_names(&names, &BTreeSet::new(), pool);
        let two = allocate_names(&names, &BTreeSet::new(), pool);
        assert_eq!(one, two);
        assert_eq!(one.len(), 2);
        assert_ne!(one["a"], one["b"]);
        for ip in one.values() {
            assert!(pool.contains(*ip));
            assert_ne!(*ip, "11.0.0.0".parse::<IpAddr>().unwrap());
            assert_ne!(*ip, "11.0.0.3".parse::<IpAddr>().unwrap());
        }
    }

    #[test]
    fn named_vips_are_known_addresses() {
        // FNV-1a of the name, modulo the usable addresses of 11.0.0.0/8, plus one: the same on
        // every agent and every release (computed apart from this code, written out here).
        let names = BTreeSet::from(["acme.marathon.l4lb.thisdcos.directory"]);
        let got = allocate_names(&names, &BTreeSet::new(), "11.0.0.0/8".parse().unwrap());
        let want: IpAddr = "11.157.99.94".parse().unwrap();
        assert_eq!(got["acme.marathon.l4lb.thisdcos.directory"], want);
    }

    fn app(id: &str, label: &str, host: &str) -> AppResult {
        let def = json!({"id": id, "portDefinitions": [{"labels": {"VIP_0": label}}],
            "tasks": [{"id": "t", "host": host, "ports": [31000], "state": "TASK_RUNNING"}]});
        derive_value(id, &def, &Hosts::default())
    }

    #[test]
    fn same_vip_in_two_apps_is_one_service() {
        let apps = [
            app("/blue", "172.16.0.1:8080", "198.18.1.11"),
            app("/green", "172.16.0.1:8080", "198.18.2.11"),
        ];
        let d = merge(&apps, &Options::default());
        assert_eq!(d.services.len(), 1);
        let svc = d.services.values().next().unwrap();
        assert_eq!(svc.apps.iter().collect::<Vec<_>>(), ["/blue", "/green"]);
        let backends: Vec<String> = svc.backends.keys().map(|a| a.to_string()).collect();
        assert_eq!(backends, ["198.18.1.11:31000", "198.18.2.11:31000"]);
    }

    #[test]
    fn a_full_pool_is_a_problem_naming_the_app() {
        let opts = Options {
            named_pool: "11.0.0.0/30".parse().unwrap(),
            ..Default::default()
        };
        let apps = [
            app("/a", "/a:80", "198.18.1.1"),
            app("/b", "/b:80", "198.18.1.2"),
            app("/c", "/c:80", "198.18.1.3"),
        ];
        let d = merge(&apps, &opts);
        assert_eq!(d.services.len(), 2);
        assert_eq!(d.problems.len(), 1);
        assert!(
            d.problems[0].reason.contains("11.0.0.0/30 is full"),
            "{:?}",
            d.problems
        );
    }

    /// Item 4 of issue 14: a VIP on a task's address (of any app) or on the load balancer's
    /// own address is refused with a problem naming app, port and label; the app whose
    /// service it is keeps it.
    #[test]
    fn a_vip_on_a_task_or_local_address_is_refused() {
        let opts = Options {
            local_addrs: vec!["10.9.9.9".parse().unwrap()],
            ..Default::default()
        };
        let apps = [
            app("/victim", "172.16.0.1:80", "10.0.0.5"),
            app("/thief", "10.0.0.5:31000", "198.18.2.2"),
            app("/host-thief", "10.9.9.9:22", "198.18.2.3"),
        ];
        let d = merge(&apps, &opts);
        let served: Vec<String> = d.services.keys().map(|v| v.addr.to_string()).collect();
        assert_eq!(served, ["172.16.0.1:80"]);
        assert_eq!(
            d.services
                .values()
                .next()
                .unwrap()
                .apps
                .iter()
                .collect::<Vec<_>>(),
            ["/victim"]
        );
        let shown: Vec<(Option<&str>, Option<usize>, Option<&str>)> = d
            .problems
            .iter()
            .map(|p| (p.app.as_deref(), p.port_index, p.label.as_deref()))
            .collect();
        assert_eq!(
            shown,
            [
                (Some("/thief"), Some(0), Some("VIP_0")),
                (Some("/host-thief"), Some(0), Some("VIP_0"))
            ]
        );
        assert!(
            d.problems[0]
                .reason
                .contains("10.0.0.5 is an address of a task"),
            "{:?}",
            d.problems
        );
        assert!(
            d.problems[1].reason.contains("load balancer's own host"),
            "{:?}",
            d.problems
        );
    }

    /// Item 10 of issue 14 through `merge_with`: a named VIP keeps its address when a name that
    /// sorts earlier and hashes to it arrives; the newcomer's collision is a problem.
    #[test]
    fn a_named_vip_keeps_its_address_when_an_earlier_name_arrives() {
        let opts = Options {
            named_pool: "11.0.0.0/30".parse().unwrap(),
            ..Default::default()
        };
        let dns = |n: &str| format!("{n}.marathon.l4lb.thisdcos.directory");
        let home = |n: &str| {
            allocate_names(
                &BTreeSet::from([dns(n).as_str()]),
                &BTreeSet::new(),
                opts.named_pool,
            )[&dns(n)]
        };
        let late = "zz";
        let early = (0..100)
            .map(|i| format!("a{i}"))
            .find(|n| home(n) == home(late))
            .unwrap();
        let mut book = NameBook::in_memory();
        let first = merge_with(&[app("/z", "/zz:80", "198.18.1.1")], &opts, &mut book);
        let held = first.services.keys().next().unwrap().addr;
        let both = [
            app("/z", "/zz:80", "198.18.1.1"),
            app("/a", &format!("/{early}:80"), "198.18.1.2"),
        ];
        let second = merge_with(&both, &opts, &mut book);
        let owner: Vec<&String> = second
            .services
            .iter()
            .filter(|(v, _)| v.addr == held)
            .flat_map(|(_, s)| &s.apps)
            .collect();
        assert_eq!(owner, ["/z"]);
        assert_eq!(second.problems.len(), 1, "{:?}", second.problems);
        assert_eq!(second.problems[0].app.as_deref(), Some("/a"));
        assert!(
            second.problems[0].reason.contains("collides at"),
            "{:?}",
            second.problems
        );
        // Without the book (every name new, in name order) the earlier name would take it.
        let fresh = merge(&both, &opts);
        let owner: Vec<&String> = fresh
            .services
            .iter()
            .filter(|(v, _)| v.addr == held)
            .flat_map(|(_, s)| &s.apps)
            .collect();
        assert_eq!(owner, ["/a"]);
    }
}
