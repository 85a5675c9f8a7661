//! From Marathon app definitions (with their tasks) to services.
//!
//! The rules follow DC/OS: a port's labels whose key starts with `VIP`/`vip` declare VIPs; the
//! backends of a port depend on the app's networking mode (see `port_specs`). One app with bad
//! data yields problems naming it, and never stops the other apps from being served.
use crate::{
    error::{Error, Result},
    model::{BackendSpec, BackendState, Desired, Proto, ServiceSpec, Vip, same_family},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs},
};

/// Settings of the derivation.
#[derive(Clone, Debug)]
pub struct Options {
    /// IP VIPs must lie in one of these ranges (the named-VIP pool is always allowed).
    pub vip_ranges: Vec<Cidr>,
    /// Named VIPs get addresses from this IPv4 pool.
    pub named_pool: Cidr,
    /// The framework part of a named VIP's DNS name.
    pub framework: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            vip_ranges: DEFAULT_VIP_RANGES
                .iter()
                .map(|s| s.parse().expect("default ranges parse"))
                .collect(),
            named_pool: "11.0.0.0/8".parse().expect("default pool parses"),
            framework: "marathon".into(),
        }
    }
}

pub const DEFAULT_VIP_RANGES: [&str; 4] =
    ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"];

/// An address range such as `172.16.0.0/12`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.len as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.len as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a CIDR range (expected ADDRESS/LENGTH)"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{a}` in `{s}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("`{l}` in `{s}` is not a prefix length from 0 to {max}"))?;
        Ok(Cidr { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Something in the document that could not be turned into a service or backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub app: Option<String>,
    pub task: Option<String>,
    pub port_index: Option<usize>,
    pub label: Option<String>,
    pub value: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "app {}", self.app.as_deref().unwrap_or("(no id)"))?;
        if let Some(t) = &self.task {
            write!(f, ", task {t}")?;
        }
        if let Some(i) = self.port_index {
            write!(f, ", port {i}")?;
        }
        if let Some(l) = &self.label {
            write!(f, ", label {l}")?;
            if let Some(v) = &self.value {
                write!(f, "={v:?}")?;
            }
        }
        write!(f, ": {}", self.reason)
    }
}

/// What one app contributes: VIPs with their backends, and its problems.
#[derive(Clone, Debug, Default)]
pub struct AppResult {
    pub id: String,
    pub vips: Vec<AppVip>,
    pub problems: Vec<Problem>,
    /// A port or label of this app is broken, so its declared VIPs are uncertain. The agent keeps
    /// serving what this app had before instead of applying a partial view.
    pub config_broken: bool,
}

#[derive(Clone, Debug)]
pub struct AppVip {
    pub target: VipTarget,
    pub proto: Proto,
    pub backends: Vec<BackendSpec>,
}

/// The address part of a VIP label.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum VipTarget {
    Ip(SocketAddr),
    /// A named VIP: its DNS name and port; the address is allocated when all names are known.
    Named {
        dns: String,
        port: u16,
    },
}

/// Parses a Marathon document: a `/v2/apps` body (`{"apps": [...]}`), a `/v2/apps/{id}` body
/// (`{"app": {...}}`), a `/v2/groups` body, one app, or an array of apps. Returns the apps
/// with absolute ids, each still as JSON so that one malformed app cannot hide the others.
pub fn parse_document(text: &str, what: &str) -> Result<Vec<(String, Value)>> {
    let doc: Value = serde_json::from_str(text).map_err(|e| Error::Document {
        what: what.to_string(),
        reason: format!("invalid JSON: {e}"),
    })?;
    let mut apps = Vec::new();
    match &doc {
        Value::Array(items) => collect_apps(items, "/", &mut apps),
        Value::Object(o) if o.contains_key("app") => {
            collect_apps(std::slice::from_ref(&o["app"]), "/", &mut apps)
        }
        Value::Object(o) if o.contains_key("apps") || o.contains_key("groups") => {
            collect_group(&doc, "/", &mut apps, 0)
        }
        Value::Object(o) if o.contains_key("id") => {
            collect_apps(std::slice::from_ref(&doc), "/", &mut apps)
        }
        _ => {
            return Err(Error::Document {
                what: what.to_string(),
                reason: "expected {\"apps\": [...]}, {\"app\": {...}}, a group, an app or an array of apps".into(),
            });
        }
    }
    Ok(apps)
}

fn collect_group(group: &Value, parent: &str, out: &mut Vec<(String, Value)>, depth: usize) {
    let base = match group.get("id").and_then(Value::as_str) {
        Some(id) => absolute(id, parent),
        None => parent.to_string(),
    };
    if let Some(Value::Array(apps)) = group.get("apps") {
        collect_apps(apps, &base, out);
    }
    if depth < 64
        && let Some(Value::Array(groups)) = group.get("groups")
    {
        for g in groups {
            collect_group(g, &base, out, depth + 1);
        }
    }
}

fn collect_apps(items: &[Value], parent: &str, out: &mut Vec<(String, Value)>) {
    for app in items {
        let id = match app.get("id").and_then(Value::as_str) {
            Some(id) => absolute(id, parent),
            None => String::new(),
        };
        out.push((id, app.clone()));
    }
}

/// An app id made absolute against its enclosing group.
fn absolute(id: &str, parent: &str) -> String {
    let id = id.trim();
    if id.starts_with('/') {
        return id.trim_end_matches('/').to_string();
    }
    let parent = parent.trim_end_matches('/');
    format!("{parent}/{}", id.trim_end_matches('/'))
}

// ---------------------------------------------------------------------------------------------
// The parts of an app definition this derivation reads. Unknown fields are ignored.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct App {
    port_definitions: Option<Vec<PortDefinition>>,
    ports: Option<Vec<Value>>,
    container: Option<Container>,
    networks: Option<Vec<Network>>,
    ip_address: Option<IpAddressSpec>,
    health_checks: Option<Vec<Value>>,
    tasks: Option<Vec<Task>>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct PortDefinition {
    protocol: Option<String>,
    labels: Option<BTreeMap<String, Value>>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct PortMapping {
    container_port: Option<i64>,
    host_port: Option<i64>,
    protocol: Option<String>,
    labels: Option<BTreeMap<String, Value>>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct Container {
    port_mappings: Option<Vec<PortMapping>>,
    docker: Option<Docker>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct Docker {
    network: Option<String>,
    port_mappings: Option<Vec<PortMapping>>,
}

/// Marathon ≤ 1.4: `ipAddress` puts the app on a container network; its `discovery.ports` are
/// the container ports.
#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct IpAddressSpec {
    discovery: Option<Discovery>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct Discovery {
    ports: Option<Vec<DiscoveryPort>>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct DiscoveryPort {
    number: Option<i64>,
    protocol: Option<String>,
    labels: Option<BTreeMap<String, Value>>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct Network {
    mode: Option<String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct Task {
    id: Option<String>,
    host: Option<String>,
    ports: Option<Vec<Value>>,
    state: Option<String>,
    started_at: Option<Value>,
    ip_addresses: Option<Vec<TaskIp>>,
    health_check_results: Option<Vec<HealthResult>>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct TaskIp {
    ip_address: Option<String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct HealthResult {
    alive: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Host,
    Bridge,
    Container,
}

/// Where a port's backends listen.
#[derive(Clone, Copy, Debug)]
enum BackendPort {
    /// The task's host address and the k-th of its allocated host ports (`task.ports[k]`).
    Host(usize),
    /// Each task IP address and this container port.
    Container(u16),
}

struct PortSpec {
    index: usize,
    protocol: Option<String>,
    labels: BTreeMap<String, Value>,
    backend: BackendPort,
}

/// Derives what one app contributes.
pub fn derive_app(id: &str, app: &Value, opts: &Options) -> AppResult {
    let mut res = AppResult {
        id: id.to_string(),
        ..Default::default()
    };
    let app_problem = |reason: String| Problem {
        app: Some(id.to_string()).filter(|s| !s.is_empty()),
        task: None,
        port_index: None,
        label: None,
        value: None,
        reason,
    };
    if id.is_empty() {
        res.problems.push(app_problem("the app has no `id`".into()));
        res.config_broken = true;
        return res;
    }
    let app: App = match App::deserialize(app) {
        Ok(a) => a,
        Err(e) => {
            res.problems
                .push(app_problem(format!("not a valid app definition: {e}")));
            res.config_broken = true;
            return res;
        }
    };
    let ports = match port_specs(&app) {
        Ok(p) => p,
        Err(reason) => {
            res.problems.push(app_problem(reason));
            res.config_broken = true;
            return res;
        }
    };
    let tasks: Vec<&Task> = app.tasks.iter().flatten().collect();
    let has_health_checks = app.health_checks.as_ref().is_some_and(|h| !h.is_empty());
    // Task addresses are resolved once per task, whatever number of ports use them.
    let mut hosts: BTreeMap<usize, Option<IpAddr>> = BTreeMap::new();
    for port in &ports {
        let mut vip_labels: Vec<(&String, &Value)> = port
            .labels
            .iter()
            .filter(|(k, _)| k.starts_with("VIP") || k.starts_with("vip"))
            .collect();
        vip_labels.sort_by(|a, b| a.0.cmp(b.0));
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
                Ok(t) => targets.push(t),
                Err(reason) => {
                    res.problems.push(problem(key, &text, reason));
                    res.config_broken = true;
                }
            }
        }
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            continue;
        }
        // Backends of this port, per address family.
        let mut backends = Vec::new();
        for (ti, task) in tasks.iter().enumerate() {
            let task_id = task.id.clone().unwrap_or_default();
            let Some(state) = task_state(task, has_health_checks) else {
                continue;
            };
            let task_problem = |reason: String| Problem {
                app: Some(id.to_string()),
                task: Some(task_id.clone()),
                port_index: Some(port.index),
                label: None,
                value: None,
                reason,
            };
            match port.backend {
                BackendPort::Host(k) => {
                    let host = hosts
                        .entry(ti)
                        .or_insert_with(|| task.host.as_deref().and_then(resolve));
                    let Some(ip) = *host else {
                        res.problems.push(task_problem(format!(
                            "task host {:?} is not an address and does not resolve",
                            task.host.as_deref().unwrap_or("")
                        )));
                        continue;
                    };
                    match task
                        .ports
                        .as_ref()
                        .and_then(|p| p.get(k))
                        .and_then(port_number)
                    {
                        Some(p) => backends.push(BackendSpec {
                            addr: SocketAddr::new(ip, p),
                            state,
                            app: id.to_string(),
                            task: task_id.clone(),
                        }),
                        None => res.problems.push(task_problem(format!(
                            "the task has no allocated host port #{k} (its `ports` are {})",
                            serde_json::to_string(&task.ports).unwrap_or_default()
                        ))),
                    }
                }
                BackendPort::Container(cp) => {
                    for ip in task.ip_addresses.iter().flatten() {
                        if let Some(addr) = ip
                            .ip_address
                            .as_deref()
                            .and_then(|a| a.parse::<IpAddr>().ok())
                        {
                            backends.push(BackendSpec {
                                addr: SocketAddr::new(addr, cp),
                                state,
                                app: id.to_string(),
                                task: task_id.clone(),
                            });
                        }
                    }
                }
            }
        }
        for target in targets {
            for &proto in &protos {
                let family_ok = |b: &&BackendSpec| match &target {
                    VipTarget::Ip(a) => same_family(a.ip(), b.addr.ip()),
                    VipTarget::Named { .. } => b.addr.is_ipv4(),
                };
                res.vips.push(AppVip {
                    target: target.clone(),
                    proto,
                    backends: backends.iter().filter(family_ok).cloned().collect(),
                });
            }
        }
    }
    res
}

fn label_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn port_number(v: &Value) -> Option<u16> {
    v.as_u64()
        .filter(|p| (1..=65535).contains(p))
        .map(|p| p as u16)
}

fn resolve(host: &str) -> Option<IpAddr> {
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

/// The state of a task as a backend, or None when it must not be one.
fn task_state(task: &Task, has_health_checks: bool) -> Option<BackendState> {
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

/// The ports of an app, with where each one's backends listen.
fn port_specs(app: &App) -> Result<Vec<PortSpec>, String> {
    let mode = networking_mode(app)?;
    let labels = |l: &Option<BTreeMap<String, Value>>| l.clone().unwrap_or_default();
    if mode == Mode::Host {
        // `ports` (legacy, plain numbers) carries no labels, so no VIPs.
        return Ok(app
            .port_definitions
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, d)| PortSpec {
                index: i,
                protocol: d.protocol.clone(),
                labels: labels(&d.labels),
                backend: BackendPort::Host(i),
            })
            .collect());
    }
    let mappings = app
        .container
        .as_ref()
        .and_then(|c| {
            c.port_mappings
                .as_ref()
                .or_else(|| c.docker.as_ref().and_then(|d| d.port_mappings.as_ref()))
        })
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut specs = Vec::new();
    if mappings.is_empty() && mode == Mode::Container {
        // Legacy container networking: the discovery ports are container ports.
        let ports = app
            .ip_address
            .as_ref()
            .and_then(|a| a.discovery.as_ref())
            .and_then(|d| d.ports.as_ref());
        for (i, p) in ports.into_iter().flatten().enumerate() {
            if let Some(n) = p.number.filter(|n| (1..=65535).contains(n)) {
                specs.push(PortSpec {
                    index: i,
                    protocol: p.protocol.clone(),
                    labels: labels(&p.labels),
                    backend: BackendPort::Container(n as u16),
                });
            }
        }
        return Ok(specs);
    }
    let mut host_ports = 0;
    for (i, m) in mappings.iter().enumerate() {
        // In bridge mode every mapping gets a host port (absent means 0: allocate one).
        let has_host_port = mode == Mode::Bridge || m.host_port.is_some();
        let backend = if has_host_port {
            host_ports += 1;
            BackendPort::Host(host_ports - 1)
        } else {
            match m.container_port.filter(|p| (1..=65535).contains(p)) {
                Some(p) => BackendPort::Container(p as u16),
                None => {
                    // No host port and no fixed container port: nothing to reach.
                    continue;
                }
            }
        };
        specs.push(PortSpec {
            index: i,
            protocol: m.protocol.clone(),
            labels: labels(&m.labels),
            backend,
        });
    }
    Ok(specs)
}

fn networking_mode(app: &App) -> Result<Mode, String> {
    if let Some(networks) = app.networks.as_ref().filter(|n| !n.is_empty()) {
        let modes: BTreeSet<&str> = networks
            .iter()
            .map(|n| n.mode.as_deref().unwrap_or("container"))
            .collect();
        if modes.len() > 1 {
            return Err(format!(
                "`networks` mixes modes ({}); Marathon does not allow that",
                modes.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        return match modes.into_iter().next() {
            Some("host") => Ok(Mode::Host),
            Some("container/bridge") => Ok(Mode::Bridge),
            Some("container") => Ok(Mode::Container),
            Some(other) => Err(format!("unknown network mode `{other}`")),
            None => Ok(Mode::Host),
        };
    }
    let docker = app.container.as_ref().and_then(|c| c.docker.as_ref());
    match docker.and_then(|d| d.network.as_deref()) {
        Some("HOST") => return Ok(Mode::Host),
        Some("BRIDGE") => return Ok(Mode::Bridge),
        Some("USER") => return Ok(Mode::Container),
        Some(other) if !other.is_empty() => {
            return Err(format!("unknown docker network `{other}`"));
        }
        _ => {}
    }
    if app.ip_address.is_some() {
        return Ok(Mode::Container);
    }
    Ok(Mode::Host)
}

fn parse_protocol(p: Option<&str>) -> Result<Vec<Proto>, String> {
    let p = p.unwrap_or("tcp");
    let mut out = Vec::new();
    for part in p.split(',') {
        let proto = match part.trim().to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => {
                return Err(format!(
                    "protocol `{other}` cannot have a VIP (only tcp, udp, or both)"
                ));
            }
        };
        if !out.contains(&proto) {
            out.push(proto);
        }
    }
    out.sort();
    Ok(out)
}

/// Parses a VIP label's value: `HOST:PORT`, split at the last colon; `[v6]:PORT` accepted.
pub fn parse_vip_label(value: &str, opts: &Options) -> Result<VipTarget, String> {
    let value = value.trim();
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT".to_string())?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("port `{port}` is not a number from 1 to 65535"))?;
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        let allowed =
            opts.vip_ranges.iter().any(|r| r.contains(ip)) || opts.named_pool.contains(ip);
        if !allowed {
            return Err(format!(
                "{ip} is outside the allowed VIP ranges ({}); a VIP there would capture a real host's traffic",
                opts.vip_ranges
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        return Ok(VipTarget::Ip(SocketAddr::new(ip, port)));
    }
    if host.contains(':') || host.contains('[') || host.contains(']') {
        return Err(format!("`{host}` is neither an IP address nor a name"));
    }
    let frag = domain_frag(host);
    if frag.is_empty() {
        return Err(format!("`{host}` gives an empty DNS name"));
    }
    Ok(VipTarget::Named {
        dns: format!(
            "{frag}.{}.l4lb.thisdcos.directory",
            domain_frag(&opts.framework)
        ),
        port,
    })
}

/// A name turned into DNS labels the way DC/OS does it.
pub fn domain_frag(name: &str) -> String {
    name.split('.')
        .map(|part| {
            let mut s: String = part
                .chars()
                .filter_map(|c| match c {
                    'A'..='Z' => Some(c.to_ascii_lowercase()),
                    'a'..='z' | '0'..='9' | '-' => Some(c),
                    '_' => Some('-'),
                    _ => None,
                })
                .collect();
            s = s.trim_matches('-').to_string();
            s.truncate(63);
            s.trim_end_matches('-').to_string()
        })
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(".")
}

/// Everything a document yields.
#[derive(Clone, Debug, Default)]
pub struct Derived {
    pub services: Desired,
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

/// Derives a whole document.
pub fn derive(text: &str, what: &str, opts: &Options) -> Result<(Vec<AppResult>, Derived)> {
    let apps = parse_document(text, what)?;
    let results: Vec<AppResult> = apps
        .iter()
        .map(|(id, app)| derive_app(id, app, opts))
        .collect();
    let derived = merge(&results, opts);
    Ok((results, derived))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options::default()
    }

    #[test]
    fn labels_split_at_the_last_colon() {
        assert_eq!(
            parse_vip_label("172.16.0.1:8080", &opts()),
            Ok(VipTarget::Ip("172.16.0.1:8080".parse().unwrap()))
        );
        assert_eq!(
            parse_vip_label("fd01:d::1:80", &opts()),
            Ok(VipTarget::Ip("[fd01:d::1]:80".parse().unwrap()))
        );
        assert_eq!(
            parse_vip_label("[fd01:d::1]:80", &opts()),
            Ok(VipTarget::Ip("[fd01:d::1]:80".parse().unwrap()))
        );
    }

    #[test]
    fn bad_ports_are_named() {
        let e = parse_vip_label("172.16.0.1:http", &opts()).unwrap_err();
        assert!(e.contains("`http`"), "{e}");
        assert!(parse_vip_label("172.16.0.1:0", &opts()).is_err());
        assert!(parse_vip_label("172.16.0.1:65536", &opts()).is_err());
        assert!(parse_vip_label("missing-port", &opts()).is_err());
        assert!(parse_vip_label("invalid-port::1234", &opts()).is_err());
    }

    #[test]
    fn vips_outside_the_allowed_ranges_are_refused() {
        let e = parse_vip_label("8.8.8.8:53", &opts()).unwrap_err();
        assert!(e.contains("outside the allowed VIP ranges"), "{e}");
        let mut o = opts();
        o.vip_ranges = vec!["8.8.8.0/24".parse().unwrap()];
        assert!(parse_vip_label("8.8.8.8:53", &o).is_ok());
        assert!(parse_vip_label("172.16.0.1:53", &o).is_err());
        // The named pool is always allowed.
        assert!(parse_vip_label("11.1.2.3:80", &o).is_ok());
    }

    #[test]
    fn names_become_dcos_dns_labels() {
        assert_eq!(domain_frag("/dcos-101/app2"), "dcos-101app2");
        assert_eq!(domain_frag("/web.kibana"), "web.kibana");
        assert_eq!(domain_frag("/mygroup/myapp"), "mygroupmyapp");
        assert_eq!(domain_frag("My_App"), "my-app");
        assert_eq!(domain_frag("-a-..b-"), "a.b");
        assert_eq!(domain_frag(&"x".repeat(70)).len(), 63);
        assert_eq!(
            parse_vip_label("/acme:10000", &opts()),
            Ok(VipTarget::Named {
                dns: "acme.marathon.l4lb.thisdcos.directory".into(),
                port: 10000
            })
        );
    }

    #[test]
    fn protocols() {
        assert_eq!(parse_protocol(None), Ok(vec![Proto::Tcp]));
        assert_eq!(
            parse_protocol(Some("udp,tcp")),
            Ok(vec![Proto::Tcp, Proto::Udp])
        );
        assert_eq!(
            parse_protocol(Some("tcp,udp")),
            Ok(vec![Proto::Tcp, Proto::Udp])
        );
        assert!(parse_protocol(Some("sctp")).is_err());
    }

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

    fn host_app(label: &str) -> Value {
        serde_json::json!({
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
        let r = derive_app("/web", &host_app("172.16.0.1:8080"), &opts());
        assert!(!r.config_broken);
        assert_eq!(r.vips.len(), 1);
        let b: Vec<(String, BackendState)> = r.vips[0]
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.state))
            .collect();
        assert_eq!(
            b,
            vec![
                ("198.18.1.11:31000".to_string(), BackendState::Active),
                ("198.18.1.13:31002".to_string(), BackendState::Draining),
            ]
        );
        // The task without its port is a problem naming the task; the others carry on.
        assert_eq!(r.problems.len(), 1);
        assert_eq!(r.problems[0].task.as_deref(), Some("t4"));
    }

    #[test]
    fn a_bad_label_names_app_port_and_label() {
        let r = derive_app("/web", &host_app("172.16.0.1:http"), &opts());
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
    fn task_hosts_are_resolved_or_reported() {
        let mut app = host_app("172.16.0.1:8080");
        app["tasks"][0]["host"] = "localhost".into();
        app["tasks"][1] = serde_json::json!({"id": "gone", "host": "no-such-host.invalid",
            "ports": [31001], "state": "TASK_RUNNING"});
        let r = derive_app("/web", &app, &opts());
        let addrs: Vec<String> = r.vips[0]
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect();
        assert_eq!(addrs, vec!["127.0.0.1:31000", "198.18.1.13:31002"]);
        let p = r
            .problems
            .iter()
            .find(|p| p.task.as_deref() == Some("gone"))
            .expect("problem");
        assert!(p.reason.contains("no-such-host.invalid"), "{p}");
        assert!(!r.config_broken, "a task problem must not hold the app");
    }

    #[test]
    fn health_checks_decide_the_state() {
        let app = serde_json::json!({
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
        let r = derive_app("/h", &app, &opts());
        let got: Vec<(String, BackendState)> = r.vips[0]
            .backends
            .iter()
            .map(|b| (b.task.clone(), b.state))
            .collect();
        assert_eq!(
            got,
            vec![
                ("ok".into(), BackendState::Active),
                ("sick".into(), BackendState::Draining),
                ("old".into(), BackendState::Active),
            ]
        );
    }

    #[test]
    fn same_vip_in_two_apps_is_one_service() {
        let mut blue = host_app("172.16.0.1:8080");
        blue["id"] = "/blue".into();
        let mut green = host_app("172.16.0.1:8080");
        green["id"] = "/green".into();
        green["tasks"][0]["host"] = "198.18.2.11".into();
        let doc = serde_json::json!({"apps": [blue, green]}).to_string();
        let (_, d) = derive(&doc, "test", &opts()).unwrap();
        assert_eq!(d.services.len(), 1);
        let svc = d.services.values().next().unwrap();
        assert_eq!(svc.apps.len(), 2);
        assert_eq!(svc.backends.len(), 3);
    }

    #[test]
    fn not_json_is_a_clear_error() {
        let e = derive("{\"apps\": [", "apps.json", &opts())
            .unwrap_err()
            .to_string();
        assert!(e.contains("apps.json") && e.contains("invalid JSON"), "{e}");
        let e = derive("42", "apps.json", &opts()).unwrap_err().to_string();
        assert!(e.contains("not a Marathon document"), "{e}");
    }

    #[test]
    fn group_ids_are_resolved() {
        let doc = r#"{"id": "/", "groups": [{"id": "/qa", "apps": [{"id": "web"}], "groups": [
            {"id": "db", "apps": [{"id": "/abs"}, {"id": "mysql"}]}]}]}"#;
        let ids: Vec<String> = parse_document(doc, "g")
            .unwrap()
            .into_iter()
            .map(|a| a.0)
            .collect();
        assert_eq!(ids, vec!["/qa/web", "/abs", "/qa/db/mysql"]);
    }
}
