//! Every JSON document that leaves lbctl: the agent's status socket and each `--json` output.
//! The types here are the documentation of those shapes; scripts and tests rely on their field
//! names, so renaming a field is a breaking change. Parts that other modules own (the kernel's
//! views, Marathon's problems, an apply's outcome) are re-exported here so that every shape can
//! be found from this module.
pub use crate::dataplane::{
    Applied, BackendView, FlowView, HookKind, IfaceHook, LocalAttached, Removed, ServiceView,
    TableConfig, Usage,
};
pub use crate::marathon::Problem;
pub use crate::model::{BackendState, Proto};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The data plane's counters by name (`lb_common::COUNTERS`), summed over CPUs: the output of
/// `lbctl stats --json`, and the `counters` of the status and of `lbctl status --json`.
pub type Counters = BTreeMap<String, u64>;

/// Counters as [`Counters`].
pub fn counters(values: &[(lb_common::Counter, u64)]) -> Counters {
    values
        .iter()
        .map(|(c, v)| (c.name.to_string(), *v))
        .collect()
}

/// One line of `lbctl stats --watch --json`: each counter's growth per second since the line
/// before, by name.
pub type Rates = BTreeMap<String, f64>;

/// What the agent's status socket answers (one document per connection).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    /// The agent's lbctl version.
    pub version: String,
    /// The agent's process id.
    pub pid: u32,
    /// Unix time the agent started.
    pub started_at: u64,
    /// Where Marathon's state comes from.
    pub source: String,
    /// Where the data plane is pinned.
    pub pin_dir: String,
    /// Interfaces the data plane is attached to, as `--iface` gave them.
    pub interfaces: Vec<String>,
    /// The hook (XDP or TC) each interface got, and why.
    #[serde(default)]
    pub hooks: Vec<IfaceHook>,
    /// The kernel's id of the program attached (the XDP program's when any interface runs XDP,
    /// else the TC program's; 0 with no interface: the local path alone).
    pub program_id: u32,
    /// The local path: the cgroup its programs are attached to (none: off), and what the start
    /// did to their links.
    #[serde(default)]
    pub local: LocalAttached,
    /// Unix time of the last document that was read and applied.
    pub last_sync: Option<u64>,
    /// Where that document came from.
    pub last_sync_from: Option<String>,
    /// The last error reading or applying a document.
    pub last_error: Option<String>,
    /// Unix time of that error.
    pub last_error_at: Option<u64>,
    /// Documents that could not be read or applied, since the start.
    pub sync_errors: u64,
    /// Seconds the last reconcile took (derive + kernel writes).
    pub last_reconcile_seconds: f64,
    /// What the last reconcile changed in the kernel.
    pub last_apply: Option<Applied>,
    /// What in the last document could not become a service or backend.
    pub problems: Vec<Problem>,
    /// What the kernel serves now, read from the maps when the status is asked for.
    #[serde(default)]
    pub services: Vec<ServiceView>,
    /// The data plane's counters, read when the status is asked for.
    #[serde(default)]
    pub counters: Counters,
    // --- Snapshot guards (issue 14, items 1 and 7) ---
    /// The large removal the agent is holding until a later snapshot confirms it, if any.
    #[serde(default)]
    pub holding_removal: Option<RemovalHold>,
    /// Large removals held since the start (each counted once, when its hold began).
    #[serde(default)]
    pub held_removals: u64,
}

/// A large removal held by the agent: a snapshot would remove more than `--max-removal` of the
/// services served (and at least `--max-removal-floor`); the services stay served until a
/// snapshot fetched from `confirm_from` on agrees.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RemovalHold {
    /// Unix time of the first snapshot that asked for it.
    pub since: u64,
    /// Services it would remove.
    pub removing: usize,
    /// Services served when it was asked for.
    pub served: usize,
    /// Unix time from which a snapshot can confirm it.
    pub confirm_from: u64,
    /// The services it would remove (at most 20 listed).
    pub services: Vec<String>,
}

/// `lbctl list --json`.
#[derive(Debug, Clone, Serialize)]
pub struct ListOutput {
    /// The hook each interface runs (from the pinned links; why, from the agent if it answers).
    pub interfaces: Vec<IfaceHook>,
    /// What the kernel serves, service by service.
    pub services: Vec<ServiceView>,
}

/// `lbctl status --json`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusOutput {
    /// What the agent's status socket answered.
    pub agent: AgentStatus,
    /// What lbctl read from the pinned maps itself.
    pub kernel: KernelOutput,
}

/// The kernel part of `lbctl status --json`: its figures, or why they could not be read.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum KernelOutput {
    /// The maps were read.
    Read(KernelSummary),
    /// They were not.
    Unreadable {
        /// Why.
        error: String,
    },
}

/// What the data plane holds and what it was sized for.
#[derive(Debug, Clone, Serialize)]
pub struct KernelSummary {
    /// Services in the kernel.
    pub services: usize,
    /// Services, distinct backends and memberships in use.
    pub in_use: Usage,
    /// The tables' sizes and the room they were created with.
    pub sizes: TableConfig,
    /// Chunks of Maglev tables the kernel holds (16 tables each, made as services get backends).
    #[serde(default)]
    pub table_chunks: usize,
    /// Bytes of kernel memory the Maglev tables take: those chunks.
    pub table_bytes: u64,
    /// The counters.
    pub counters: Counters,
    /// The VIP filter (`lb_vipf_v1`) against the services; null for a data plane without it.
    pub vip_filter: Option<crate::dataplane::FilterCheck>,
}

/// `lbctl problems --json`.
#[derive(Debug, Clone, Serialize)]
pub struct ProblemsOutput {
    /// What in the last document could not become a service or backend.
    pub problems: Vec<Problem>,
    /// Services the document asked for that the data plane could not take (full, or a failed
    /// write), with why: they keep what they had.
    pub not_applied: Vec<String>,
}

/// `lbctl flows --json`.
#[derive(Debug, Clone, Serialize)]
pub struct FlowsOutput {
    /// The tracked flows, at most `--limit`.
    pub flows: Vec<FlowView>,
}

/// `lbctl simulate --json` (printed on one line).
#[derive(Debug, Clone, Serialize)]
pub struct SimulateOutput {
    /// The VIP, ADDRESS:PORT.
    pub vip: String,
    /// Its protocol.
    pub protocol: Proto,
    /// The client, ADDRESS:PORT.
    pub client: String,
    /// The backend a new flow from the client would reach; null when none would.
    pub backend: Option<String>,
    /// `gateway` (a packet through the XDP program) or `local` (a socket call of a process in
    /// the local path's cgroup).
    pub path: String,
    /// What that path would do, in a line.
    pub outcome: String,
}

/// `lbctl render --json`: the services a Marathon document yields.
#[derive(Debug, Clone, Serialize)]
pub struct RenderOutput {
    /// One per VIP and protocol.
    pub services: Vec<RenderedService>,
    /// What in the document could not become a service or backend.
    pub problems: Vec<Problem>,
}

/// A service of [`RenderOutput`].
#[derive(Debug, Clone, Serialize)]
pub struct RenderedService {
    /// The VIP, ADDRESS:PORT (a named VIP's address comes from the pool).
    pub vip: String,
    /// Its protocol.
    pub protocol: Proto,
    /// The VIP's name, for a named VIP.
    pub name: Option<String>,
    /// The apps whose tasks serve it.
    pub apps: BTreeSet<String>,
    /// Its backends.
    pub backends: Vec<RenderedBackend>,
}

/// A backend of [`RenderedService`].
#[derive(Debug, Clone, Serialize)]
pub struct RenderedBackend {
    /// ADDRESS:PORT.
    pub address: String,
    /// The app of its task.
    pub app: String,
    /// Its task's id.
    pub task: String,
    /// Whether it takes new flows.
    pub state: BackendState,
}

impl From<&crate::marathon::Derived> for RenderOutput {
    fn from(d: &crate::marathon::Derived) -> Self {
        RenderOutput {
            services: d
                .services
                .values()
                .map(|s| RenderedService {
                    vip: s.vip.addr.to_string(),
                    protocol: s.vip.proto,
                    name: s.name.clone(),
                    apps: s.apps.clone(),
                    backends: s
                        .backends
                        .values()
                        .map(|b| RenderedBackend {
                            address: b.addr.to_string(),
                            app: b.app.to_string(),
                            task: b.task.to_string(),
                            state: b.state,
                        })
                        .collect(),
                })
                .collect(),
            problems: d.problems.clone(),
        }
    }
}

/// `lbctl down --json` (printed on one line): what was detached and removed.
pub type DownOutput = Removed;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The fields scripts and tests read from `lbctl status --json`, written out.
    #[test]
    fn the_status_output_keeps_its_field_names() {
        let sizes = TableConfig::default();
        let read = StatusOutput {
            agent: AgentStatus::default(),
            kernel: KernelOutput::Read(KernelSummary {
                services: 2,
                in_use: Usage::default(),
                sizes,
                table_chunks: 1,
                table_bytes: 16 * sizes.table_bytes(),
                counters: counters(&[(lb_common::FLOWS_LOST, 7)]),
                vip_filter: Some(crate::dataplane::FilterCheck {
                    bits: 1 << 18,
                    set: 2,
                    stale: 0,
                    unmarked: vec!["tcp 172.16.0.1:80".into()],
                }),
            }),
        };
        let v = serde_json::to_value(&read).expect("serializes");
        assert_eq!(v["kernel"]["services"], 2);
        assert_eq!(v["kernel"]["counters"]["flows_lost"], 7);
        assert_eq!(v["kernel"]["sizes"]["size"], 16381);
        assert_eq!(v["kernel"]["table_chunks"], 1);
        assert_eq!(v["kernel"]["table_bytes"], 1u64 << 20);
        assert!(v["kernel"]["in_use"]["services"].is_u64(), "{v}");
        assert_eq!(v["kernel"]["vip_filter"]["set"], 2);
        assert_eq!(v["kernel"]["vip_filter"]["stale"], 0);
        assert_eq!(
            v["kernel"]["vip_filter"]["unmarked"][0],
            "tcp 172.16.0.1:80"
        );
        for key in [
            "program_id",
            "last_sync",
            "last_apply",
            "problems",
            "counters",
        ] {
            assert!(v["agent"].get(key).is_some(), "agent.{key} in {v}");
        }
        let failed = StatusOutput {
            agent: AgentStatus::default(),
            kernel: KernelOutput::Unreadable {
                error: "no maps".into(),
            },
        };
        let v = serde_json::to_value(&failed).expect("serializes");
        assert_eq!(v["kernel"], serde_json::json!({ "error": "no maps" }));
        // The socket's document reads back as itself.
        let st = AgentStatus {
            pid: 3,
            last_sync: Some(5),
            ..Default::default()
        };
        let back: AgentStatus =
            serde_json::from_str(&serde_json::to_string(&st).expect("serializes")).expect("parses");
        assert_eq!(back, st);
    }
}

/// `lbctl resolve NAME --json`: what the agent's DNS server answers for a name, asked through
/// the status socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ResolveOutput {
    /// The name asked for.
    pub name: String,
    /// The record type asked for (`A`, `AAAA`, ...).
    pub record_type: String,
    /// The response code: `NoError`, `NXDomain`, `Refused`, ...; `Forwarded` for a name
    /// outside the zone that the server sends to its upstream servers.
    pub rcode: String,
    /// The addresses answered.
    pub addresses: Vec<String>,
    /// Their time to live, in seconds (0 when there is none).
    pub ttl: u32,
    /// The zone's serial (it grows with every apply that changed a name).
    pub serial: u32,
    /// True when the agent serves DNS (`--dns-listen`); the answer is the same either way.
    pub serving: bool,
}
