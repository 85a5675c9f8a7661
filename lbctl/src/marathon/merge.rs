//! Folding the apps' contributions into services: one service per VIP whatever number of apps
//! name it, and addresses for named VIPs, the same on every agent given the same names.
use super::{
    derive::AppResult, labels::VipTarget, options::Cidr, options::Options, problem::Problem,
};
use crate::model::{Desired, ServiceSpec, Vip};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
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
/// backends are the union; named VIPs get their addresses from the pool.
pub fn merge(apps: &[AppResult], opts: &Options) -> Derived {
    let names: BTreeSet<&str> = apps
        .iter()
        .flat_map(|a| &a.vips)
        .filter_map(|v| match &v.target {
            VipTarget::Named { dns, .. } => Some(dns.as_str()),
            VipTarget::Ip(_) => None,
        })
        .collect();
    let taken: BTreeSet<IpAddr> = apps
        .iter()
        .flat_map(|a| &a.vips)
        .filter_map(|v| match &v.target {
            VipTarget::Ip(a) => Some(a.ip()),
            VipTarget::Named { .. } => None,
        })
        .collect();
    let allocated = allocate_names(&names, &taken, opts.named_pool);
    let mut out = Derived::default();
    for app in apps {
        out.problems.extend(app.problems.iter().cloned());
        for v in &app.vips {
            let (addr, name) = match &v.target {
                VipTarget::Ip(a) => (*a, None),
                VipTarget::Named { dns, port } => match allocated.get(dns.as_str()) {
                    Some(ip) => (SocketAddr::new(*ip, *port), Some(dns.clone())),
                    None => {
                        out.problems.push(Problem {
                            app: Some(app.id.clone()),
                            task: None,
                            port_index: None,
                            label: None,
                            value: Some(dns.clone()),
                            reason: format!("the named-VIP pool {} is full", opts.named_pool),
                        });
                        continue;
                    }
                },
            };
            let vip = Vip {
                addr,
                proto: v.proto,
            };
            let svc = out
                .services
                .entry(vip)
                .or_insert_with(|| ServiceSpec::new(vip, name.clone()));
            svc.apps.insert(app.id.clone());
            for b in &v.backends {
                svc.add_backend(b.clone());
            }
        }
    }
    out
}

/// Addresses for named VIPs, the same on every agent given the same names: each name starts at
/// the pool address its FNV-1a hash points to, and names are placed in sorted order, moving to
/// the next free address on a collision (with another name or an IP VIP). Network and broadcast
/// addresses of the pool are skipped.
pub fn allocate_names(
    names: &BTreeSet<&str>,
    taken: &BTreeSet<IpAddr>,
    pool: Cidr,
) -> BTreeMap<String, IpAddr> {
    let mut out = BTreeMap::new();
    let IpAddr::V4(base) = pool.addr else {
        return out;
    };
    let host_bits = 32 - pool.len as u32;
    if host_bits < 2 {
        return out;
    }
    let size: u64 = 1 << host_bits;
    let base = u32::from(base) & (u32::MAX.checked_shl(host_bits).unwrap_or(0));
    let mut used: BTreeSet<IpAddr> = taken.clone();
    for name in names {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let usable = size - 2;
        for probe in 0..usable.min(1 << 20) {
            let off = 1 + (h + probe) % usable;
            let ip = IpAddr::V4(Ipv4Addr::from(base + off as u32));
            if used.insert(ip) {
                out.insert(name.to_string(), ip);
                break;
            }
        }
    }
    out
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
}
