//! Tasks as backends: whether a task serves (its state and health), its ports, and the
//! addresses of the hosts tasks run on. Host names are resolved before derivation, by a
//! `Resolve` the caller chooses (DNS for the agent and the commands, a table in tests), into
//! `Hosts`, which derivation reads: deriving never waits on DNS.
use super::document::Task;
use crate::model::BackendState;
use serde_json::Value;
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
};

/// Gives the address of a host name, or None when it has none.
pub trait Resolve {
    /// The address of `host` (an IPv4 one preferred), or None.
    fn resolve(&self, host: &str) -> Option<IpAddr>;

    /// What each of `hosts` resolves to, in order. By default each is asked of
    /// [`Resolve::resolve`] in turn; a resolver with a deadline (the agent's cache) answers
    /// [`Lookup::TimedOut`] for a name it could not resolve in time.
    fn resolve_all(&self, hosts: &[&str]) -> Vec<Lookup> {
        hosts
            .iter()
            .map(|h| match self.resolve(h) {
                Some(ip) => Lookup::Found(ip),
                None => Lookup::NoAddress,
            })
            .collect()
    }
}

/// What a host name resolved to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Its address.
    Found(IpAddr),
    /// It has none (or the resolver said so).
    NoAddress,
    /// The resolver did not answer within its deadline; it is asked again in the background.
    TimedOut,
}

/// Any function from a host name to an address resolves (a fixed table in tests).
impl<F: Fn(&str) -> Option<IpAddr>> Resolve for F {
    fn resolve(&self, host: &str) -> Option<IpAddr> {
        self(host)
    }
}

/// The system's resolver (`getaddrinfo`: /etc/hosts, then DNS). It blocks while it asks.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str) -> Option<IpAddr> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Some(ip);
        }
        let addrs: Vec<SocketAddr> = (host, 0).to_socket_addrs().ok()?.collect();
        // Prefer IPv4, as Marathon agents are addressed by it.
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .map(|a| a.ip())
    }
}

/// Task hosts' addresses, resolved before derivation. A host that is an IP address needs no
/// entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hosts(BTreeMap<String, Lookup>);

impl Hosts {
    /// Resolves each of `names` once with `resolver`.
    pub fn resolve<'a>(names: impl IntoIterator<Item = &'a str>, resolver: &dyn Resolve) -> Hosts {
        let names: Vec<&str> = names.into_iter().collect();
        let answers = resolver.resolve_all(&names);
        Hosts(
            names
                .iter()
                .zip(answers)
                .map(|(n, a)| (n.to_string(), a))
                .collect(),
        )
    }

    /// The address of `host`: itself when it is an IP address, else what it resolved to.
    pub fn get(&self, host: &str) -> Option<IpAddr> {
        host.parse().ok().or_else(|| match self.0.get(host) {
            Some(Lookup::Found(ip)) => Some(*ip),
            _ => None,
        })
    }

    /// What the name `host` resolved to, if it was asked.
    pub(crate) fn lookup(&self, host: &str) -> Option<Lookup> {
        self.0.get(host).copied()
    }

    /// True when `host` was not resolved in time (it is retried in the background).
    pub fn timed_out(&self, host: &str) -> bool {
        self.0.get(host) == Some(&Lookup::TimedOut)
    }

    /// The names that were resolved (whether or not they had an address).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// True when `host` needs resolving (it is not an IP address).
pub(crate) fn is_name(host: &str) -> bool {
    host.parse::<IpAddr>().is_err()
}

/// A port number in a task's `ports`, when it is one.
pub(crate) fn port_number(v: &Value) -> Option<u16> {
    v.as_u64()
        .filter(|p| (1..=65535).contains(p))
        .map(|p| p as u16)
}

/// The state of a task as a backend, or None when it must not be one.
pub(crate) fn task_state(task: &Task, has_health_checks: bool) -> Option<BackendState> {
    let running = match task.state.as_deref() {
        Some("TASK_RUNNING") => true,
        Some("TASK_KILLING") => return Some(BackendState::Draining),
        Some(_) => false,
        // Older Marathon versions send no state: a started task is running.
        None => task.started_at.as_ref().is_some_and(|s| !s.is_null()),
    };
    if !running {
        return None;
    }
    if !has_health_checks {
        return Some(BackendState::Active);
    }
    let results = task.health_check_results.as_deref().unwrap_or(&[]);
    if results.is_empty() {
        // Running, but not yet known to be healthy.
        return None;
    }
    if results.iter().all(|r| r.alive == Some(true)) {
        Some(BackendState::Active)
    } else {
        Some(BackendState::Draining)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn state(task: serde_json::Value, health: bool) -> Option<BackendState> {
        task_state(&Task::deserialize(&task).unwrap(), health)
    }

    #[test]
    fn states_without_health_checks() {
        use serde_json::json;
        assert_eq!(
            state(json!({"state": "TASK_RUNNING"}), false),
            Some(BackendState::Active)
        );
        assert_eq!(
            state(json!({"state": "TASK_KILLING"}), false),
            Some(BackendState::Draining)
        );
        assert_eq!(state(json!({"state": "TASK_STAGING"}), false), None);
        // Old Marathon: no state, but started.
        assert_eq!(
            state(json!({"startedAt": "2017-01-01T00:00:00Z"}), false),
            Some(BackendState::Active)
        );
        assert_eq!(state(json!({"startedAt": null}), false), None);
    }

    #[test]
    fn hosts_are_read_from_the_table() {
        let table: BTreeMap<&str, IpAddr> = [("node-1", "198.18.1.1".parse().unwrap())].into();
        let asked = std::cell::RefCell::new(Vec::new());
        let resolver = |h: &str| {
            asked.borrow_mut().push(h.to_string());
            table.get(h).copied()
        };
        let hosts = Hosts::resolve(["node-1", "gone"], &resolver);
        assert_eq!(*asked.borrow(), ["node-1", "gone"]);
        assert_eq!(hosts.get("node-1"), Some("198.18.1.1".parse().unwrap()));
        assert_eq!(hosts.get("gone"), None);
        assert_eq!(hosts.get("node-2"), None, "never resolved");
        assert_eq!(hosts.get("198.18.9.9"), Some("198.18.9.9".parse().unwrap()));
        assert_eq!(hosts.names().collect::<Vec<_>>(), ["gone", "node-1"]);
        assert!(!is_name("2001:2::1") && is_name("node-1"));
    }
}
