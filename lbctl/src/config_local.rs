//! Settings of the local path (issue 15): socket-level load balancing for the processes of a
//! cgroup. Part of `config` ([`super::Settings`] flattens [`LocalSettings`]).
use super::Layered;
use crate::{dataplane, error::Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The local path: connect()/sendmsg() to a VIP rewritten at the socket for the processes of a
/// cgroup v2 tree (east-west), beside or instead of the gateway path of --iface.
#[derive(clap::Args, Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct LocalSettings {
    /// Load balance the sockets of the processes in --cgroup (every network namespace).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<bool>,
    /// The cgroup v2 directory whose processes --local serves [default: the root of the cgroup2
    /// mount in /proc/self/mounts, the production setting].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// A connected socket (TCP, connected UDP) of --local whose backend left its service (task
    /// gone or unhealthy; a draining one keeps its connections): `end` ends it at once (the
    /// application sees ECONNABORTED and its next connect() gets a live backend), `keep`
    /// leaves it connected to the address that left [default: end].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_backend_gone: Option<dataplane::BackendGone>,
}

impl Layered for LocalSettings {
    fn under(self, upper: Self) -> Self {
        let LocalSettings {
            local,
            cgroup,
            local_backend_gone,
        } = upper;
        LocalSettings {
            local: self.local.under(local),
            cgroup: self.cgroup.under(cgroup),
            local_backend_gone: self.local_backend_gone.under(local_backend_gone),
        }
    }
}

impl LocalSettings {
    /// What happens to a connected socket of the local path whose backend left.
    pub fn backend_gone(&self) -> dataplane::BackendGone {
        self.local_backend_gone.unwrap_or_default()
    }

    /// The cgroup the local path serves, or None when it is off. The default (the root of the
    /// cgroup2 mount) is logged, so that the operator sees which hierarchy was used.
    pub fn cgroup(&self) -> Result<Option<PathBuf>> {
        if !self.local.unwrap_or(false) {
            if let Some(c) = &self.cgroup {
                return Err(crate::Error::Config(format!(
                    "--cgroup {} without --local: add --local to serve that cgroup",
                    c.display()
                )));
            }
            return Ok(None);
        }
        let cgroup = match &self.cgroup {
            Some(c) => c.clone(),
            None => {
                let root = dataplane::default_cgroup()?;
                tracing::info!(cgroup = %root.display(), "--local without --cgroup: the root of the cgroup2 mount");
                root
            }
        };
        dataplane::check_cgroup(&cgroup)?;
        Ok(Some(cgroup))
    }
}
