//! Prometheus metrics (opt-in, `--metrics-listen ADDR`): the data plane's counters read from the
//! pinned maps at every scrape, and the agent's sync and reconcile figures.
use crate::{dataplane::Maps, status};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::sync::atomic::{AtomicU64, Ordering};

type Labels = Vec<(String, String)>;

/// The agent's metrics, kept between scrapes.
pub struct Metrics {
    registry: Registry,
    /// One family per distinct family of `lb_common::COUNTERS`, in their order.
    counters: Vec<(&'static str, Family<Labels, Counter>)>,
    services: Gauge,
    backends: Family<Labels, Gauge>,
    capacity: Family<Labels, Gauge>,
    in_use: Family<Labels, Gauge>,
    flows: Gauge,
    vip_filter_bits: Family<Labels, Gauge>,
    unserved: Gauge,
    service_packets: Family<Labels, Counter>,
    service_bytes: Family<Labels, Counter>,
    service_new_flows: Family<Labels, Counter>,
    backend_packets: Family<Labels, Counter>,
    backend_bytes: Family<Labels, Counter>,
    backend_new_flows: Family<Labels, Counter>,
    service_local: Family<Labels, Counter>,
    backend_local: Family<Labels, Counter>,
    sync_age: Gauge<f64, AtomicU64>,
    sync_errors: Counter,
    // Snapshot guards.
    held_removals: Counter,
    removal_held: Gauge,
    /// Observed by the agent after each reconcile.
    pub reconcile: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered, with nothing counted yet.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let mut counters: Vec<(&'static str, Family<Labels, Counter>)> = Vec::new();
        for c in &lb_common::COUNTERS {
            let family = c.metric.family;
            if counters.iter().all(|(name, _)| *name != family.name) {
                let f = Family::default();
                registry.register(family.name, family.help, f.clone());
                counters.push((family.name, f));
            }
        }
        let m = Metrics {
            counters,
            services: Gauge::default(),
            backends: Family::default(),
            capacity: Family::default(),
            in_use: Family::default(),
            flows: Gauge::default(),
            vip_filter_bits: Family::default(),
            unserved: Gauge::default(),
            service_packets: Family::default(),
            service_bytes: Family::default(),
            service_new_flows: Family::default(),
            backend_packets: Family::default(),
            backend_bytes: Family::default(),
            backend_new_flows: Family::default(),
            service_local: Family::default(),
            backend_local: Family::default(),
            sync_age: Gauge::default(),
            sync_errors: Counter::default(),
            held_removals: Counter::default(),
            removal_held: Gauge::default(),
            reconcile: Histogram::new([0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            registry: Registry::default(),
        };
        registry.register(
            "lb_services",
            "Services in the kernel maps",
            m.services.clone(),
        );
        registry.register(
            "lb_backends",
            "Service backends in the kernel maps, by state",
            m.backends.clone(),
        );
        registry.register(
            "lb_capacity",
            "What the data plane was sized for (--max-services, --max-backends, --max-members)",
            m.capacity.clone(),
        );
        registry.register(
            "lb_in_use",
            "Services, distinct backends and memberships in the kernel maps",
            m.in_use.clone(),
        );
        registry.register("lb_flows", "Flows in the flow table", m.flows.clone());
        for (name, help, f) in [
            (
                "lb_service_packets",
                "Packets clients sent to a VIP",
                &m.service_packets,
            ),
            (
                "lb_service_bytes",
                "IP bytes clients sent to a VIP",
                &m.service_bytes,
            ),
            (
                "lb_service_new_flows",
                "New flows to a VIP",
                &m.service_new_flows,
            ),
            (
                "lb_backend_packets",
                "Packets clients sent to a backend",
                &m.backend_packets,
            ),
            (
                "lb_backend_bytes",
                "IP bytes clients sent to a backend",
                &m.backend_bytes,
            ),
            (
                "lb_backend_new_flows",
                "New flows given to a backend",
                &m.backend_new_flows,
            ),
            (
                "lb_service_local_connections",
                "Connections the local (cgroup) path made to a VIP",
                &m.service_local,
            ),
            (
                "lb_backend_local_connections",
                "Connections the local (cgroup) path gave a backend",
                &m.backend_local,
            ),
        ] {
            registry.register(name, help, f.clone());
        }
        registry.register(
            "lb_marathon_sync_age_seconds",
            "Seconds since the last Marathon document was applied",
            m.sync_age.clone(),
        );
        registry.register(
            "lb_marathon_sync_errors",
            "Marathon fetches or documents that failed",
            m.sync_errors.clone(),
        );
        registry.register(
            "lb_reconcile_duration_seconds",
            "Time to derive a document and write its differences to the kernel",
            m.reconcile.clone(),
        );
        registry.register(
            "lb_vip_filter_bits",
            "Bits of the VIP filter (lb_vipf_v1): set, and set with no service on them (stale)",
            m.vip_filter_bits.clone(),
        );
        registry.register(
            "lb_services_unserved",
            "Services in the maps whose VIP filter bit is clear, so the programs pass their \
             packets (left by an agent that does not know the filter; restart the agent)",
            m.unserved.clone(),
        );
        // Snapshot guards.
        registry.register(
            "lb_marathon_held_removals",
            "Large removals held until a later snapshot confirmed them (--max-removal)",
            m.held_removals.clone(),
        );
        registry.register(
            "lb_marathon_removal_held",
            "1 while a large removal is held, else 0",
            m.removal_held.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Sets the data plane's counters, each in the family and under the label its descriptor
    /// names.
    pub fn record_counters(&self, values: &[(lb_common::Counter, u64)]) {
        for (c, value) in values {
            let Some((_, family)) = self
                .counters
                .iter()
                .find(|(name, _)| *name == c.metric.family.name)
            else {
                continue; // every family of COUNTERS was registered by `new`
            };
            let labels: Labels = c
                .metric
                .label
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            family
                .get_or_create(&labels)
                .inner()
                .store(*value, Ordering::Relaxed);
        }
    }

    /// Reads the kernel's counters and the agent's status into the metrics, and encodes them.
    pub fn render(&self, maps: Option<&Maps>, status: &status::AgentStatus) -> String {
        if let Some(maps) = maps {
            // One read of the kernel per scrape (the flow tables walked once).
            let kernel = maps.inspect(true);
            if let Ok(k) = &kernel {
                self.record_counters(&k.counters);
            }
            if let Ok((state, table)) = kernel.as_ref().map(|k| (&k.state, k.table)) {
                for (resource, used, room, _) in state.usage().against(&table) {
                    let l: Labels = vec![("resource".into(), resource.into())];
                    self.in_use.get_or_create(&l).set(used as i64);
                    self.capacity.get_or_create(&l).set(room as i64);
                }
            }
            if let Ok(Some(f)) = maps.filter_check() {
                for (which, n) in [("set", f.set), ("stale", f.stale)] {
                    self.vip_filter_bits
                        .get_or_create(&vec![("bits".into(), which.into())])
                        .set(n as i64);
                }
                self.unserved.set(f.unmarked.len() as i64);
            }
            if let Ok(views) = kernel.as_ref().map(|k| &k.services) {
                self.services.set(views.len() as i64);
                self.flows.set(views.iter().map(|v| v.flows as i64).sum());
                let mut by_state = std::collections::BTreeMap::new();
                let set = |f: &Family<Labels, Counter>, l: &Labels, v: u64| {
                    f.get_or_create(l).inner().store(v, Ordering::Relaxed);
                };
                // Services and backends that left must not linger with their last values.
                for f in [
                    &self.service_packets,
                    &self.service_bytes,
                    &self.service_new_flows,
                    &self.backend_packets,
                    &self.backend_bytes,
                    &self.backend_new_flows,
                    &self.service_local,
                    &self.backend_local,
                ] {
                    f.clear();
                }
                for v in views {
                    let l: Labels = vec![
                        ("vip".into(), v.vip.clone()),
                        ("protocol".into(), v.protocol.name().into()),
                    ];
                    set(&self.service_packets, &l, v.packets);
                    set(&self.service_bytes, &l, v.bytes);
                    set(&self.service_new_flows, &l, v.new_flows);
                    set(&self.service_local, &l, v.local_connections);
                    for b in &v.backends {
                        *by_state.entry(b.state.name()).or_insert(0i64) += 1;
                        let l: Labels = vec![("backend".into(), b.address.clone())];
                        set(&self.backend_packets, &l, b.packets);
                        set(&self.backend_bytes, &l, b.bytes);
                        set(&self.backend_new_flows, &l, b.new_flows);
                        set(&self.backend_local, &l, b.local_connections);
                    }
                }
                for st in ["active", "draining"] {
                    self.backends
                        .get_or_create(&vec![("state".into(), st.into())])
                        .set(by_state.get(st).copied().unwrap_or(0));
                }
            }
        }
        let age = status
            .last_sync
            .map(|t| status::now().saturating_sub(t) as f64)
            .unwrap_or(f64::NAN);
        self.sync_age.set(age);
        self.sync_errors
            .inner()
            .store(status.sync_errors, Ordering::Relaxed);
        self.held_removals
            .inner()
            .store(status.held_removals, Ordering::Relaxed);
        self.removal_held
            .set(i64::from(status.holding_removal.is_some()));
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

pub use crate::metrics_server::{bind, serve};

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Each counter of the table appears under its own metric and label, the lost flows too.
    #[test]
    fn every_counter_is_exported_where_its_descriptor_says() {
        let m = Metrics::new();
        let values: Vec<(lb_common::Counter, u64)> = lb_common::COUNTERS
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, 100 + i as u64))
            .collect();
        m.record_counters(&values);
        let text = m.render(None, &status::AgentStatus::default());
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        let scrape = prometheus_parse::Scrape::parse(lines.into_iter().map(Ok)).expect("parses");
        let value = |metric: &str, label: Option<(&str, &str)>| {
            let found: Vec<f64> = scrape
                .samples
                .iter()
                .filter(|s| s.metric == metric)
                .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                    ref other => panic!("unexpected {other:?}"),
                })
                .collect();
            assert_eq!(found.len(), 1, "{metric} {label:?} in\n{text}");
            found[0]
        };
        // Names written out: a renamed metric breaks dashboards, so it must break this test.
        assert_eq!(
            value("lb_packets_total", Some(("outcome", "pass_not_ours"))),
            100.0
        );
        assert_eq!(
            value("lb_packets_total", Some(("outcome", "new_flow"))),
            101.0
        );
        assert_eq!(
            value("lb_dropped_packets_total", Some(("reason", "no_backend"))),
            105.0
        );
        assert_eq!(
            value("lb_packets_total", Some(("outcome", "icmp_to_backend"))),
            113.0
        );
        assert_eq!(
            value("lb_packets_total", Some(("outcome", "port_clash_moved"))),
            115.0
        );
        assert_eq!(
            value("lb_dropped_packets_total", Some(("reason", "port_clash"))),
            116.0
        );
        assert_eq!(value("lb_flows_lost_total", None), 117.0);
        // The flow tables' under pressure.
        assert_eq!(value("lb_flows_moved_total", None), 118.0);
        assert_eq!(value("lb_flows_evicted_total", None), 119.0);
        // The local path's, apart from the packet counters.
        assert_eq!(
            value("lb_local_connections_total", Some(("outcome", "connect"))),
            120.0
        );
        assert_eq!(
            value("lb_local_failures_total", Some(("reason", "no_backend"))),
            123.0
        );
        let exported = scrape
            .samples
            .iter()
            .filter(|s| {
                [
                    "lb_packets_total",
                    "lb_dropped_packets_total",
                    "lb_flows_lost_total",
                    "lb_flows_moved_total",
                    "lb_flows_evicted_total",
                    "lb_local_connections_total",
                    "lb_local_failures_total",
                ]
                .contains(&s.metric.as_str())
            })
            .count();
        assert_eq!(exported, lb_common::COUNTERS.len());
    }

    #[test]
    fn renders_parseable_text() {
        let m = Metrics::new();
        m.reconcile.observe(0.002);
        let st = status::AgentStatus {
            last_sync: Some(status::now()),
            sync_errors: 3,
            ..Default::default()
        };
        let text = m.render(None, &st);
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        let scrape = prometheus_parse::Scrape::parse(lines.into_iter().map(Ok)).expect("parses");
        let errors = scrape
            .samples
            .iter()
            .find(|s| s.metric == "lb_marathon_sync_errors_total")
            .expect("sync errors");
        // OpenMetrics names the family without `_total`, so the parser may not tie the type to
        // the sample: the value is what matters.
        let v = match errors.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("unexpected {other:?}"),
        };
        assert_eq!(v, 3.0);
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.metric.starts_with("lb_reconcile_duration_seconds"))
        );
    }

    /// Snapshot guards: the held removals counted, and whether one is held now.
    #[test]
    fn held_removals_are_exported() {
        let m = Metrics::new();
        let st = status::AgentStatus {
            held_removals: 2,
            holding_removal: Some(crate::api::RemovalHold::default()),
            ..Default::default()
        };
        let text = m.render(None, &st);
        let value = |name: &str| {
            let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
                .expect("parses");
            match scrape.samples.iter().find(|s| s.metric == name)?.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            }
        };
        assert_eq!(value("lb_marathon_held_removals_total"), Some(2.0));
        assert_eq!(value("lb_marathon_removal_held"), Some(1.0));
        let text = m.render(None, &status::AgentStatus::default());
        assert!(text.contains("lb_marathon_removal_held 0"), "{text}");
    }
}
