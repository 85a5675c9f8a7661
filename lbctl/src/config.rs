//! The agent's configuration: one set of structs that clap reads from the command line and serde
//! reads from a TOML file (whose keys are the flags' names with `_` for `-`). Flags override the
//! file, the file overrides the defaults; [`Settings::overridden_by`] names every field, so a new
//! one does not compile until it is merged. The result is checked and turned into an
//! [`AgentConfig`].
use crate::{
    agent::{AgentConfig, Source},
    dataplane,
    error::{Error, Result},
    marathon::{Cidr, Options},
    source::{
        limits::Limits,
        marathon::{Auth, ClientConfig},
    },
};
use lb_common as common;
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, ops::RangeInclusive, path::PathBuf, time::Duration};

/// Allowed values of `poll_ms` (milliseconds).
pub const POLL_MS: RangeInclusive<u64> = 10..=3_600_000;
/// Allowed values of `resync_secs`.
pub const RESYNC_SECS: RangeInclusive<u64> = 1..=86_400;
/// Allowed values of `debounce_ms`.
pub const DEBOUNCE_MS: RangeInclusive<u64> = 0..=600_000;
/// Allowed values of `timeout_secs`.
pub const TIMEOUT_SECS: RangeInclusive<u64> = 1..=3_600;
/// Allowed values of `stream_idle_secs`.
pub const STREAM_IDLE_SECS: RangeInclusive<u64> = 1..=3_600;
/// Allowed values of `max_snapshot_mib`.
pub const MAX_SNAPSHOT_MIB: RangeInclusive<u64> = 1..=4_096;
/// Allowed values of `max_event_line_kib`.
pub const MAX_EVENT_LINE_KIB: RangeInclusive<u64> = 1..=1_048_576;
/// Allowed values of `ring_size` (it must also be a prime).
pub const RING_SIZE: RangeInclusive<i64> = 3..=common::MAX_RING_SIZE as i64;
/// Allowed values of `flow_table_size`.
pub const FLOW_TABLE_SIZE: RangeInclusive<i64> =
    common::MIN_FLOW_TABLE as i64..=common::MAX_FLOW_TABLE as i64;
/// Allowed values of `max_services`.
pub const MAX_SERVICES: RangeInclusive<i64> = 1..=common::LIMIT_SERVICES as i64;
/// Allowed values of `max_backends`.
pub const MAX_BACKENDS: RangeInclusive<i64> = 1..=common::LIMIT_BACKENDS as i64;
/// Allowed values of `max_members`.
pub const MAX_MEMBERS: RangeInclusive<i64> = 1..=common::LIMIT_MEMBERS as i64;

/// Every setting of the agent, all optional: the flags of `lbctl agent` and the keys of its
/// TOML file (see examples/agent.toml).
#[derive(clap::Args, Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Settings {
    /// A `GET /v2/apps?embed=apps.tasks` body on disk, followed as it changes (instead of
    /// --marathon).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apps: Option<PathBuf>,
    /// A Marathon base URL (repeatable; tried in order).
    #[arg(long)]
    pub marathon: Vec<String>,
    /// An interface to load balance on (repeatable): `NAME` lets the agent choose the hook (XDP
    /// in native mode on a NIC whose driver takes it, TC on virtual devices), `NAME:xdp` or
    /// `NAME:tc` forces one.
    #[arg(long, value_name = "NAME[:xdp|:tc]")]
    pub iface: Vec<String>,
    /// Where the data plane's maps and links are pinned [default: /sys/fs/bpf/lb].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin_dir: Option<PathBuf>,
    /// How Marathon's apps become services.
    #[command(flatten)]
    #[serde(flatten)]
    pub derive: DeriveSettings,
    /// How often --apps is checked for changes, in ms [default: 250].
    #[arg(long, value_parser = clap::value_parser!(u64).range(POLL_MS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_ms: Option<u64>,
    /// Full Marathon snapshot interval, in s [default: 30].
    #[arg(long, value_parser = clap::value_parser!(u64).range(RESYNC_SECS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_secs: Option<u64>,
    /// Quiet time after a Marathon event before fetching, in ms [default: 500].
    #[arg(long, value_parser = clap::value_parser!(u64).range(DEBOUNCE_MS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debounce_ms: Option<u64>,
    /// Total deadline of each Marathon request (connect, headers and body), in s
    /// [default: 10]; on expiry the next URL is tried.
    #[arg(long, value_parser = clap::value_parser!(u64).range(TIMEOUT_SECS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// PEM CA certificates for an HTTPS Marathon.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The status socket [default: /run/lb/agent.sock, or /run/lb/<pin dir name>.sock].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_socket: Option<PathBuf>,
    /// Serve Prometheus metrics on ADDRESS:PORT (off by default).
    #[arg(long, value_name = "ADDRESS:PORT", value_parser = socket_address)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Relay the data plane's per-packet debug log (needs a build with `--features bpf-log`).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bpf_log: Option<bool>,
    /// The data plane's tables.
    #[command(flatten)]
    #[serde(flatten)]
    pub table: TableSettings,
    /// Snapshot guards: large removals held until confirmed, task host resolution.
    #[command(flatten)]
    #[serde(flatten)]
    pub guard: GuardSettings,
    /// Marathon credentials: in the file only, never on the command line.
    #[arg(skip)]
    pub auth: AuthSettings,
    /// Deadlines and size limits of what the agent reads.
    #[command(flatten)]
    #[serde(flatten)]
    pub limits: LimitSettings,
    /// The DNS server of named VIPs.
    #[command(flatten)]
    #[serde(flatten)]
    pub dns: DnsSettings,
    /// The local (socket-level) path.
    #[command(flatten)]
    #[serde(flatten)]
    pub local: LocalSettings,
    /// Keys of the file that are no setting: refused by [`Settings::from_toml`]. (serde cannot
    /// deny unknown fields of a struct with flattened parts, so they are caught here.)
    #[arg(skip)]
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, toml::Value>,
}

/// How Marathon's apps become services: shared by `lbctl agent`, `render` and `simulate`.
#[derive(clap::Args, Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct DeriveSettings {
    /// Allowed range for IP VIPs (repeatable); replaces the defaults 10.0.0.0/8, 172.16.0.0/12,
    /// 192.168.0.0/16 and fc00::/7. Never allowed whatever the ranges: the named-VIP pool and
    /// special addresses (README "VIP rules").
    #[arg(long, value_name = "CIDR", value_parser = cidr)]
    pub vip_range: Vec<String>,
    /// The pool named VIPs get addresses from [default: 11.0.0.0/8].
    #[arg(long, value_name = "CIDR", value_parser = cidr)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub named_vip_pool: Option<String>,
    /// The framework part of named VIPs' DNS names [default: marathon].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub framework: Option<String>,
}

/// The Maglev and flow tables and the room of the data plane: every agent of a cluster must use
/// the same ring size and seed.
#[derive(clap::Args, Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct TableSettings {
    /// Slots of the largest Maglev tables: a prime up to 131071 [default: 16381]. A service gets
    /// 100 slots per active backend (251 at least, in steps of the largest primes below powers of
    /// two), at most this many. The kernel holds one table of 4 bytes per slot for each service
    /// with backends.
    #[arg(long, value_parser = clap::value_parser!(u32).range(RING_SIZE))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ring_size: Option<u32>,
    /// The Maglev seed [default: built in].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maglev_seed: Option<u64>,
    /// Tracked flows per direction and family [default: 262144].
    #[arg(long, value_parser = clap::value_parser!(u32).range(FLOW_TABLE_SIZE))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_table_size: Option<u32>,
    /// Services the data plane can hold [default: 1024]. Each with backends takes a table of
    /// ring size x 4 bytes of kernel memory (64 KiB at the default ring size).
    #[arg(long, value_parser = clap::value_parser!(u32).range(MAX_SERVICES))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_services: Option<u32>,
    /// Distinct backends (address, port) the data plane can hold [default: 4096].
    #[arg(long, value_parser = clap::value_parser!(u32).range(MAX_BACKENDS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_backends: Option<u32>,
    /// (service, backend) memberships the data plane can hold [default: 65536].
    #[arg(long, value_parser = clap::value_parser!(u32).range(MAX_MEMBERS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_members: Option<u32>,
}

/// Deadlines and limits: how long the event stream may stay silent, and how large a snapshot
/// and an event line may be.
#[derive(clap::Args, Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct LimitSettings {
    /// Seconds Marathon's event stream may stay without a byte (Marathon sends keep-alives)
    /// before it is reopened [default: 60].
    #[arg(long, value_parser = clap::value_parser!(u64).range(STREAM_IDLE_SECS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_idle_secs: Option<u64>,
    /// The largest Marathon snapshot read, in MiB [default: 256]; a larger one is refused
    /// and the last good state kept.
    #[arg(long, value_parser = clap::value_parser!(u64).range(MAX_SNAPSHOT_MIB))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_snapshot_mib: Option<u64>,
    /// The longest event stream line kept, in KiB [default: 1024]; a longer one is skipped
    /// (its event still triggers a snapshot).
    #[arg(long, value_parser = clap::value_parser!(u64).range(MAX_EVENT_LINE_KIB))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_event_line_kib: Option<u64>,
}

impl LimitSettings {
    /// The limits, checked (the file's values get the ranges the flags get from clap).
    pub fn limits(&self) -> Result<Limits> {
        let d = Limits::default();
        let idle = in_range(
            "stream_idle_secs",
            self.stream_idle_secs.unwrap_or(d.stream_idle.as_secs()),
            STREAM_IDLE_SECS,
        )?;
        let snapshot = in_range(
            "max_snapshot_mib",
            self.max_snapshot_mib.unwrap_or(d.max_snapshot >> 20),
            MAX_SNAPSHOT_MIB,
        )?;
        let line = in_range(
            "max_event_line_kib",
            self.max_event_line_kib
                .unwrap_or(d.max_event_line as u64 >> 10),
            MAX_EVENT_LINE_KIB,
        )?;
        Ok(Limits {
            stream_idle: Duration::from_secs(idle),
            max_snapshot: snapshot << 20,
            max_event_line: (line << 10) as usize,
        })
    }
}

impl Layered for LimitSettings {
    fn under(self, upper: Self) -> Self {
        let LimitSettings {
            stream_idle_secs,
            max_snapshot_mib,
            max_event_line_kib,
        } = upper;
        LimitSettings {
            stream_idle_secs: self.stream_idle_secs.under(stream_idle_secs),
            max_snapshot_mib: self.max_snapshot_mib.under(max_snapshot_mib),
            max_event_line_kib: self.max_event_line_kib.under(max_event_line_kib),
        }
    }
}

/// Marathon credentials. The environment (LBCTL_DCOS_TOKEN, LBCTL_MARATHON_USER and
/// LBCTL_MARATHON_PASSWORD) is used when the file has none.
#[derive(Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Basic auth user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Basic auth password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A DC/OS token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file holding the DC/OS token (read at start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "(hidden)"))
            .field("token", &self.token.as_ref().map(|_| "(hidden)"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// A setting given on two layers: the upper one wins where it says anything.
trait Layered {
    fn under(self, upper: Self) -> Self;
}

impl<T> Layered for Option<T> {
    fn under(self, upper: Self) -> Self {
        upper.or(self)
    }
}

/// A list given on the upper layer replaces the lower one whole.
impl<T> Layered for Vec<T> {
    fn under(self, upper: Self) -> Self {
        if upper.is_empty() { self } else { upper }
    }
}

impl Layered for DeriveSettings {
    fn under(self, upper: Self) -> Self {
        let DeriveSettings {
            vip_range,
            named_vip_pool,
            framework,
        } = upper;
        DeriveSettings {
            vip_range: self.vip_range.under(vip_range),
            named_vip_pool: self.named_vip_pool.under(named_vip_pool),
            framework: self.framework.under(framework),
        }
    }
}

impl Layered for TableSettings {
    fn under(self, upper: Self) -> Self {
        let TableSettings {
            ring_size,
            maglev_seed,
            flow_table_size,
            max_services,
            max_backends,
            max_members,
        } = upper;
        TableSettings {
            ring_size: self.ring_size.under(ring_size),
            maglev_seed: self.maglev_seed.under(maglev_seed),
            flow_table_size: self.flow_table_size.under(flow_table_size),
            max_services: self.max_services.under(max_services),
            max_backends: self.max_backends.under(max_backends),
            max_members: self.max_members.under(max_members),
        }
    }
}

impl Layered for AuthSettings {
    fn under(self, upper: Self) -> Self {
        let AuthSettings {
            user,
            password,
            token,
            token_file,
        } = upper;
        AuthSettings {
            user: self.user.under(user),
            password: self.password.under(password),
            token: self.token.under(token),
            token_file: self.token_file.under(token_file),
        }
    }
}

impl Settings {
    /// Reads a TOML file of settings.
    pub fn from_file(path: &std::path::Path) -> Result<Settings> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        Settings::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Parses TOML settings, refusing keys that are no setting.
    pub fn from_toml(text: &str) -> std::result::Result<Settings, String> {
        let s: Settings = toml::from_str(text).map_err(|e| e.to_string())?;
        if !s.unknown.is_empty() {
            let keys: Vec<&str> = s.unknown.keys().map(String::as_str).collect();
            return Err(format!(
                "unknown setting(s) {} (the keys are the flags of `lbctl agent` with `_` for `-`)",
                keys.join(", ")
            ));
        }
        Ok(s)
    }

    /// `self` (the file) with every setting `upper` (the flags) gives replacing it.
    pub fn overridden_by(self, upper: Settings) -> Settings {
        // Every field is named on both sides: a new setting does not compile until it is merged.
        let Settings {
            apps,
            marathon,
            iface,
            pin_dir,
            derive,
            poll_ms,
            resync_secs,
            debounce_ms,
            timeout_secs,
            ca_file,
            status_socket,
            metrics_listen,
            bpf_log,
            table,
            guard,
            auth,
            limits,
            dns,
            local,
            unknown,
        } = upper;
        Settings {
            apps: self.apps.under(apps),
            marathon: self.marathon.under(marathon),
            iface: self.iface.under(iface),
            pin_dir: self.pin_dir.under(pin_dir),
            derive: self.derive.under(derive),
            poll_ms: self.poll_ms.under(poll_ms),
            resync_secs: self.resync_secs.under(resync_secs),
            debounce_ms: self.debounce_ms.under(debounce_ms),
            timeout_secs: self.timeout_secs.under(timeout_secs),
            ca_file: self.ca_file.under(ca_file),
            status_socket: self.status_socket.under(status_socket),
            metrics_listen: self.metrics_listen.under(metrics_listen),
            bpf_log: self.bpf_log.under(bpf_log),
            table: self.table.under(table),
            guard: self.guard.under(guard),
            auth: self.auth.under(auth),
            limits: self.limits.under(limits),
            dns: self.dns.under(dns),
            local: self.local.under(local),
            unknown: self.unknown.into_iter().chain(unknown).collect(),
        }
    }

    /// The effective settings as TOML, secrets hidden (`lbctl agent --print-config`).
    pub fn to_toml_redacted(&self) -> Result<String> {
        let mut s = self.clone();
        s.marathon = s.marathon.iter().map(|u| crate::secrets::url(u)).collect();
        for secret in [&mut s.auth.password, &mut s.auth.token] {
            if secret.is_some() {
                *secret = Some("(hidden)".into());
            }
        }
        toml::to_string_pretty(&s).map_err(|e| Error::Config(format!("printing the settings: {e}")))
    }

    /// Checks every setting and builds what the agent runs with.
    pub fn agent_config(&self) -> Result<AgentConfig> {
        let local = self.local.cgroup()?;
        if self.iface.is_empty() && local.is_none() {
            return Err(Error::Config(
                "no interface: give at least one --iface, or --local".into(),
            ));
        }
        crate::dataplane::IfaceSpec::parse_all(&self.iface)?;
        // The file's values get the same ranges the flags get from clap.
        let poll_ms = in_range("poll_ms", self.poll_ms.unwrap_or(250), POLL_MS)?;
        let resync_secs = in_range("resync_secs", self.resync_secs.unwrap_or(30), RESYNC_SECS)?;
        let debounce_ms = in_range("debounce_ms", self.debounce_ms.unwrap_or(500), DEBOUNCE_MS)?;
        let timeout_secs = in_range(
            "timeout_secs",
            self.timeout_secs.unwrap_or(10),
            TIMEOUT_SECS,
        )?;
        let source = match (&self.apps, self.marathon.is_empty()) {
            (Some(_), false) => {
                return Err(Error::Config(
                    "give either --apps or --marathon, not both".into(),
                ));
            }
            (None, true) => {
                return Err(Error::Config(
                    "no source: give --apps FILE or --marathon URL".into(),
                ));
            }
            (Some(path), true) => Source::File {
                path: path.clone(),
                poll: Duration::from_millis(poll_ms),
            },
            (None, false) => Source::Marathon {
                client: ClientConfig {
                    urls: self.marathon.clone(),
                    auth: self.auth()?,
                    ca_file: self.ca_file.clone(),
                    timeout: Duration::from_secs(timeout_secs),
                    limits: self.limits.limits()?,
                },
                resync: Duration::from_secs(resync_secs),
                debounce: Duration::from_millis(debounce_ms),
            },
        };
        let pin_dir: PathBuf = self
            .pin_dir
            .clone()
            .unwrap_or_else(|| dataplane::DEFAULT_PIN_DIR.into());
        let metrics_listen =
            match &self.metrics_listen {
                Some(a) => Some(a.parse().map_err(|_| {
                    Error::Config(format!("metrics_listen `{a}` is not ADDRESS:PORT"))
                })?),
                None => None,
            };
        Ok(AgentConfig {
            source,
            ifaces: self.iface.clone(),
            status_socket: self
                .status_socket
                .clone()
                .unwrap_or_else(|| crate::status::default_socket_for(&pin_dir)),
            pin_dir,
            options: self.derive.options()?,
            metrics_listen,
            table: self.table.table()?,
            bpf_log: self.bpf_log.unwrap_or(false),
            removal: self.guard.removal()?,
            resolve: self.guard.resolver()?,
            dns: self.dns.dns()?,
            local,
            local_backend_gone: self.local.backend_gone(),
        })
    }

    fn auth(&self) -> Result<Auth> {
        let a = &self.auth;
        if let Some(t) = &a.token {
            return Ok(Auth::Token(t.clone()));
        }
        if let Some(path) = &a.token_file {
            let t = std::fs::read_to_string(path).map_err(|e| Error::Read {
                path: path.clone(),
                source: e,
            })?;
            return Ok(Auth::Token(t.trim().to_string()));
        }
        if let Some(user) = &a.user {
            return Ok(Auth::Basic {
                user: user.clone(),
                password: a.password.clone().unwrap_or_default(),
            });
        }
        Ok(Auth::from_env())
    }
}

impl DeriveSettings {
    /// The derivation options, checked.
    pub fn options(&self) -> Result<Options> {
        let mut options = Options::default();
        if !self.vip_range.is_empty() {
            options.vip_ranges = self
                .vip_range
                .iter()
                .map(|r| {
                    r.parse::<Cidr>()
                        .map_err(|e| Error::Config(format!("vip_range: {e}")))
                })
                .collect::<Result<_>>()?;
        }
        if let Some(p) = &self.named_vip_pool {
            options.named_pool = p
                .parse()
                .map_err(|e| Error::Config(format!("named_vip_pool: {e}")))?;
        }
        if let Some(f) = &self.framework {
            options.framework = f.clone();
        }
        Ok(options)
    }
}

impl TableSettings {
    /// The table settings, checked.
    pub fn table(&self) -> Result<dataplane::TableConfig> {
        let d = dataplane::TableConfig::default();
        dataplane::TableConfig::new(
            self.ring_size.unwrap_or(d.size),
            self.maglev_seed.unwrap_or(d.seed),
        )
        .and_then(|t| t.with_flows(self.flow_table_size.unwrap_or(d.flows)))
        .and_then(|t| {
            t.with_capacity(
                self.max_services.unwrap_or(d.services),
                self.max_backends.unwrap_or(d.backends),
                self.max_members.unwrap_or(d.members),
            )
        })
        .map_err(Error::Config)
    }
}

/// `value` if it lies in `range`, else an error naming the setting.
fn in_range(name: &str, value: u64, range: RangeInclusive<u64>) -> Result<u64> {
    match value {
        v if range.contains(&v) => Ok(value),
        _ => Err(Error::Config(format!(
            "{name} must be from {} to {} (not {value})",
            range.start(),
            range.end()
        ))),
    }
}

/// clap's check of a CIDR flag; the setting keeps the text the user gave.
fn cidr(s: &str) -> std::result::Result<String, String> {
    s.parse::<Cidr>().map(|_| s.to_string())
}

/// clap's check of an ADDRESS:PORT flag.
fn socket_address(s: &str) -> std::result::Result<String, String> {
    s.parse::<std::net::SocketAddr>()
        .map(|_| s.to_string())
        .map_err(|_| format!("`{s}` is not ADDRESS:PORT"))
}

#[path = "config_guard.rs"]
mod guard;
#[path = "config_local.rs"]
mod local;
pub use guard::{
    GuardSettings, MAX_REMOVAL_FLOOR, REMOVAL_CONFIRM_SECS, RESOLVE_TIMEOUT_MS, RESOLVE_TTL_SECS,
};
pub use local::LocalSettings;

#[path = "config_dns.rs"]
mod dns;
pub use dns::{DNS_TTL, DnsSettings};

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
