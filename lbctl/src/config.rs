//! The agent's configuration: a TOML file whose keys mirror the command-line flags, with the
//! flags overriding it, then checked and turned into an `AgentConfig`.
use crate::{
    agent::{AgentConfig, Source},
    dataplane,
    error::{Error, Result},
    marathon::{Cidr, Options},
    marathon_client::{Auth, ClientConfig},
};
use serde::{Deserialize, Serialize};
use std::{path::PathBuf, time::Duration};

/// Every setting, all optional; also the shape of the TOML file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// A `/v2/apps?embed=apps.tasks` body on disk (instead of `marathon`).
    pub apps: Option<PathBuf>,
    /// Marathon base URLs, tried in order.
    pub marathon: Vec<String>,
    /// Interfaces to attach to.
    pub iface: Vec<String>,
    pub pin_dir: Option<PathBuf>,
    /// Allowed IP VIP ranges; replaces the defaults when given.
    pub vip_range: Vec<String>,
    /// The pool named VIPs get addresses from (default 11.0.0.0/8).
    pub named_vip_pool: Option<String>,
    /// The framework part of named VIPs' DNS names (default `marathon`).
    pub framework: Option<String>,
    /// How often `apps` is checked for changes (ms, default 250).
    pub poll_ms: Option<u64>,
    /// Full Marathon snapshot interval (s, default 30).
    pub resync_secs: Option<u64>,
    /// Quiet time after an event before fetching (ms, default 500).
    pub debounce_ms: Option<u64>,
    /// Connect and read timeout of Marathon requests (s, default 10).
    pub timeout_secs: Option<u64>,
    /// PEM CA certificates for an HTTPS Marathon.
    pub ca_file: Option<PathBuf>,
    /// Slots of each service's Maglev table: a prime up to 131071 (default 16381). The kernel
    /// holds two tables of 4 bytes per slot for every possible service (`max_services`):
    /// 128 MiB at the defaults.
    pub ring_size: Option<u32>,
    /// Services (VIP, port, protocol) the data plane can hold (default 1024).
    pub max_services: Option<u32>,
    /// Distinct backends (address, port) it can hold (default 4096).
    pub max_backends: Option<u32>,
    /// (service, backend) memberships it can hold (default 65536).
    pub max_members: Option<u32>,
    /// The Maglev seed; every agent of a cluster must use the same one (default: built in).
    pub maglev_seed: Option<u64>,
    /// Tracked flows per direction and family (default 262144; LRU beyond).
    pub flow_table_size: Option<u32>,
    /// Relay the data plane's per-packet debug log (builds with the `bpf-log` feature only).
    pub bpf_log: Option<bool>,
    /// The status socket [default: /run/lb/agent.sock, or /run/lb/<pin dir name>.sock].
    pub status_socket: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9100); off by default.
    pub metrics_listen: Option<String>,
    pub auth: AuthSettings,
}

/// Marathon credentials. The environment (LBCTL_DCOS_TOKEN, LBCTL_MARATHON_USER and
/// LBCTL_MARATHON_PASSWORD) is used when the file has none.
#[derive(Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// A file holding the DC/OS token (read at start).
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

impl Settings {
    pub fn from_file(path: &std::path::Path) -> Result<Settings> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// `self` with every setting `over` gives replacing it.
    pub fn overridden_by(mut self, over: Settings) -> Settings {
        macro_rules! take {
            ($($f:ident),*) => {$(
                if over.$f.is_some() { self.$f = over.$f; }
            )*};
        }
        take!(
            apps,
            pin_dir,
            named_vip_pool,
            framework,
            poll_ms,
            resync_secs,
            debounce_ms,
            timeout_secs,
            ca_file,
            ring_size,
            max_services,
            max_backends,
            max_members,
            maglev_seed,
            flow_table_size,
            bpf_log,
            status_socket,
            metrics_listen
        );
        for (mine, theirs) in [
            (&mut self.marathon, over.marathon),
            (&mut self.iface, over.iface),
            (&mut self.vip_range, over.vip_range),
        ] {
            if !theirs.is_empty() {
                *mine = theirs;
            }
        }
        self
    }

    /// The effective settings as TOML, secrets hidden (`lbctl agent --print-config`).
    pub fn to_toml_redacted(&self) -> String {
        let mut s = self.clone();
        for secret in [&mut s.auth.password, &mut s.auth.token] {
            if secret.is_some() {
                *secret = Some("(hidden)".into());
            }
        }
        toml::to_string_pretty(&s).unwrap_or_default()
    }

    pub fn agent_config(&self) -> Result<AgentConfig> {
        if self.iface.is_empty() {
            return Err(Error::Config(
                "no interface: give at least one --iface".into(),
            ));
        }
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
                poll: Duration::from_millis(self.poll_ms.unwrap_or(250).max(10)),
            },
            (None, false) => Source::Marathon {
                client: ClientConfig {
                    urls: self.marathon.clone(),
                    auth: self.auth()?,
                    ca_file: self.ca_file.clone(),
                    timeout: Duration::from_secs(self.timeout_secs.unwrap_or(10).max(1)),
                },
                resync: Duration::from_secs(self.resync_secs.unwrap_or(30).max(1)),
                debounce: Duration::from_millis(self.debounce_ms.unwrap_or(500)),
            },
        };
        let mut options = Options::default();
        if !self.vip_range.is_empty() {
            options.vip_ranges = self
                .vip_range
                .iter()
                .map(|r| r.parse::<Cidr>().map_err(Error::Config))
                .collect::<Result<_>>()?;
        }
        if let Some(p) = &self.named_vip_pool {
            options.named_pool = p.parse().map_err(Error::Config)?;
        }
        if let Some(f) = &self.framework {
            options.framework = f.clone();
        }
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
            options,
            metrics_listen,
            table: self.table()?,
            bpf_log: self.bpf_log.unwrap_or(false),
        })
    }

    /// The Maglev table settings, checked.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.toml");
        let s = Settings::from_file(&p).expect("examples/agent.toml");
        let cfg = s.agent_config().expect("valid");
        assert!(matches!(cfg.source, Source::Marathon { .. }));
        assert_eq!(cfg.ifaces, vec!["eth0".to_string()]);
    }

    #[test]
    fn flags_override_the_file_and_secrets_stay_hidden() {
        let file: Settings = toml::from_str(
            "marathon = [\"http://m1:8080\"]\niface = [\"eth0\"]\n[auth]\nuser = \"lb\"\npassword = \"s3cret\"\n",
        )
        .unwrap();
        let flags = Settings {
            iface: vec!["eth1".into()],
            resync_secs: Some(5),
            status_socket: Some("/tmp/s.sock".into()),
            metrics_listen: Some("127.0.0.1:9100".into()),
            ..Default::default()
        };
        let s = file.overridden_by(flags);
        assert_eq!(s.iface, vec!["eth1".to_string()]);
        assert_eq!(s.marathon, vec!["http://m1:8080".to_string()]);
        assert_eq!(s.resync_secs, Some(5));
        let cfg = s.agent_config().expect("valid");
        assert_eq!(cfg.status_socket, PathBuf::from("/tmp/s.sock"));
        assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        let shown = s.to_toml_redacted();
        assert!(
            !shown.contains("s3cret") && shown.contains("(hidden)"),
            "{shown}"
        );
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn bad_settings_are_named() {
        let e = toml::from_str::<Settings>("ifaces = [\"eth0\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ifaces"), "{e}");
        let s = Settings {
            apps: Some("a.json".into()),
            marathon: vec!["http://m".into()],
            iface: vec!["eth0".into()],
            ..Default::default()
        };
        assert!(
            s.agent_config()
                .unwrap_err()
                .to_string()
                .contains("not both")
        );
        let s = Settings {
            apps: Some("a.json".into()),
            iface: vec!["eth0".into()],
            vip_range: vec!["10.0.0.0/33".into()],
            ..Default::default()
        };
        assert!(s.agent_config().unwrap_err().to_string().contains("33"));
    }

    #[test]
    fn sizes_come_from_the_file_and_the_flags() {
        let file: Settings = toml::from_str(
            "apps = \"a.json\"\niface = [\"eth0\"]\nring_size = 1021\nmax_services = 100000\nmax_backends = 50000\n",
        )
        .unwrap();
        let flags = Settings {
            max_members: Some(500_000),
            max_services: Some(20_000),
            ..Default::default()
        };
        let t = file
            .overridden_by(flags)
            .agent_config()
            .expect("valid")
            .table;
        assert_eq!(
            (t.size, t.services, t.backends, t.members),
            (1021, 20_000, 50_000, 500_000)
        );
        assert_eq!(t.ring_bytes(), 20_000 * 2 * 64 * 64);
        let defaults = Settings::default().table().expect("defaults");
        assert_eq!(defaults, dataplane::TableConfig::default());
        assert_eq!(
            defaults.ring_bytes(),
            128 << 20,
            "128 MiB of tables at the defaults"
        );
        let bad = Settings {
            max_backends: Some(0),
            ..Default::default()
        };
        let e = bad.table().unwrap_err().to_string();
        assert!(e.contains("backends must be from 1"), "{e}");
    }
}
