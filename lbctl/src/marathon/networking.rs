//! An app's networking mode (host, bridge, container; current and legacy forms) and, from it,
//! its ports: which labels each carries and where each port's backends listen.
use super::document::{App, Labels};
use std::collections::BTreeSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Host,
    Bridge,
    Container,
}

/// Where a port's backends listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackendPort {
    /// The task's host address and the k-th of its allocated host ports (`task.ports[k]`).
    Host(usize),
    /// Each task IP address and this container port.
    Container(u16),
}

/// One port of an app.
#[derive(Debug)]
pub(crate) struct PortSpec {
    /// Its index among the app's port definitions, port mappings or discovery ports.
    pub(crate) index: usize,
    pub(crate) protocol: Option<String>,
    pub(crate) labels: Labels,
    pub(crate) backend: BackendPort,
}

/// The ports of an app, with where each one's backends listen.
pub(crate) fn port_specs(app: &App) -> Result<Vec<PortSpec>, String> {
    let mode = networking_mode(app)?;
    let labels = |l: &Option<Labels>| l.clone().unwrap_or_default();
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

pub(crate) fn networking_mode(app: &App) -> Result<Mode, String> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn app(json: &str) -> App {
        App::deserialize(&serde_json::from_str::<serde_json::Value>(json).unwrap()).unwrap()
    }

    fn backends(json: &str) -> Vec<(usize, BackendPort)> {
        port_specs(&app(json))
            .unwrap()
            .iter()
            .map(|p| (p.index, p.backend))
            .collect()
    }

    #[test]
    fn modes_current_and_legacy() {
        let mode = |j: &str| networking_mode(&app(j));
        assert_eq!(mode("{}"), Ok(Mode::Host));
        assert_eq!(
            mode(r#"{"networks": [{"mode": "container/bridge"}]}"#),
            Ok(Mode::Bridge)
        );
        assert_eq!(
            mode(r#"{"networks": [{"name": "dcos"}]}"#),
            Ok(Mode::Container)
        );
        assert_eq!(
            mode(r#"{"container": {"docker": {"network": "BRIDGE"}}}"#),
            Ok(Mode::Bridge)
        );
        assert_eq!(mode(r#"{"ipAddress": {}}"#), Ok(Mode::Container));
        let e = mode(r#"{"networks": [{"mode": "host"}, {"mode": "container"}]}"#).unwrap_err();
        assert!(e.contains("mixes modes (container, host)"), "{e}");
        let e = mode(r#"{"container": {"docker": {"network": "WEIRD"}}}"#).unwrap_err();
        assert!(e.contains("`WEIRD`"), "{e}");
    }

    #[test]
    fn where_each_port_listens() {
        // Host networking: the k-th port definition is the task's k-th host port.
        assert_eq!(
            backends(r#"{"portDefinitions": [{}, {}]}"#),
            [(0, BackendPort::Host(0)), (1, BackendPort::Host(1))]
        );
        // Bridge: every mapping has a host port.
        assert_eq!(
            backends(
                r#"{"networks": [{"mode": "container/bridge"}],
                    "container": {"portMappings": [{"containerPort": 80}, {"containerPort": 81}]}}"#
            ),
            [(0, BackendPort::Host(0)), (1, BackendPort::Host(1))]
        );
        // Container: only mappings with a host port take one; the others are container ports,
        // and a mapping with neither is skipped (its index stays its own).
        assert_eq!(
            backends(
                r#"{"networks": [{"mode": "container"}], "container": {"portMappings": [
                    {"containerPort": 80}, {"containerPort": 0}, {"containerPort": 82, "hostPort": 0}]}}"#
            ),
            [(0, BackendPort::Container(80)), (2, BackendPort::Host(0))]
        );
        // Legacy container networking: discovery ports.
        assert_eq!(
            backends(r#"{"ipAddress": {"discovery": {"ports": [{"number": 9000}]}}}"#),
            [(0, BackendPort::Container(9000))]
        );
    }
}
