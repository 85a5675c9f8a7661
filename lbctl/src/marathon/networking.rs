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
    /// Where its backends listen, or why nothing there can be reached or served (the port's
    /// VIP labels are then each a problem saying so).
    pub(crate) backend: Result<BackendPort, String>,
}

/// The ports of an app, with where each one's backends listen.
pub(crate) fn port_specs(app: &App) -> Result<Vec<PortSpec>, String> {
    let mode = networking_mode(app)?;
    let labels = |l: &Option<Labels>| l.clone().unwrap_or_default();
    let definitions = app.port_definitions.iter().flatten().enumerate();
    if mode == Mode::Host {
        // `ports` (legacy, plain numbers) carries no labels, so no VIPs.
        let mut specs: Vec<PortSpec> = definitions
            .map(|(i, d)| PortSpec {
                index: i,
                protocol: d.protocol.clone(),
                labels: labels(&d.labels),
                backend: Ok(BackendPort::Host(i)),
            })
            .collect();
        // Marathon ignores port mappings in host networking: their labels are dropped.
        for (i, m) in container_mappings(app).iter().enumerate() {
            specs.push(PortSpec {
                index: i,
                protocol: m.protocol.clone(),
                labels: labels(&m.labels),
                backend: Err("the app uses host networking, where Marathon ignores `portMappings`; put the label on `portDefinitions`".into()),
            });
        }
        return Ok(specs);
    }
    // Marathon ignores port definitions outside host networking: their labels are dropped.
    let mut specs: Vec<PortSpec> = definitions
        .map(|(i, d)| PortSpec {
            index: i,
            protocol: d.protocol.clone(),
            labels: labels(&d.labels),
            backend: Err(format!(
                "the app uses {} networking, where Marathon ignores `portDefinitions`; put the label on the port mapping",
                if mode == Mode::Bridge { "bridge" } else { "container" }
            )),
        })
        .collect();
    let mappings = container_mappings(app);
    if mappings.is_empty() && mode == Mode::Container {
        // Legacy container networking: the discovery ports are container ports.
        let ports = app
            .ip_address
            .as_ref()
            .and_then(|a| a.discovery.as_ref())
            .and_then(|d| d.ports.as_ref());
        for (i, p) in ports.into_iter().flatten().enumerate() {
            let backend = match p.number {
                Some(n @ 1..=65535) => Ok(BackendPort::Container(n as u16)),
                Some(n) => Err(format!(
                    "discovery port number {n} is not a port from 1 to 65535"
                )),
                None => Err("the discovery port has no `number`".into()),
            };
            specs.push(PortSpec {
                index: i,
                protocol: p.protocol.clone(),
                labels: labels(&p.labels),
                backend,
            });
        }
        return Ok(specs);
    }
    let mut host_ports = 0;
    for (i, m) in mappings.iter().enumerate() {
        // In bridge mode every mapping gets a host port (absent means 0: allocate one).
        let has_host_port = mode == Mode::Bridge || m.host_port.is_some();
        let backend = if has_host_port {
            host_ports += 1;
            Ok(BackendPort::Host(host_ports - 1))
        } else {
            match m.container_port {
                Some(p @ 1..=65535) => Ok(BackendPort::Container(p as u16)),
                // No host port and no fixed container port: nothing to reach.
                Some(p) => Err(format!(
                    "container port {p} without a host port: container networking reaches tasks at a fixed container port from 1 to 65535"
                )),
                None => Err("the port mapping has neither `containerPort` nor `hostPort`".into()),
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

/// The app's container port mappings (current or legacy Docker form).
fn container_mappings(app: &App) -> &[super::document::PortMapping] {
    app.container
        .as_ref()
        .and_then(|c| {
            c.port_mappings
                .as_ref()
                .or_else(|| c.docker.as_ref().and_then(|d| d.port_mappings.as_ref()))
        })
        .map(Vec::as_slice)
        .unwrap_or(&[])
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
            .filter_map(|p| Some((p.index, p.backend.clone().ok()?)))
            .collect()
    }

    /// The ports nothing can be served from, with why.
    fn dropped(json: &str) -> Vec<(usize, String)> {
        port_specs(&app(json))
            .unwrap()
            .into_iter()
            .filter_map(|p| Some((p.index, p.backend.err()?)))
            .collect()
    }

    #[test]
    fn ports_marathon_ignores_or_that_reach_nothing_say_why() {
        let d = dropped(
            r#"{"networks": [{"mode": "container/bridge"}], "portDefinitions": [{}, {}],
                "container": {"portMappings": [{"containerPort": 80}]}}"#,
        );
        assert_eq!(d.len(), 2);
        assert!(
            d[1].1
                .contains("bridge networking, where Marathon ignores `portDefinitions`"),
            "{d:?}"
        );
        let d = dropped(r#"{"container": {"portMappings": [{"containerPort": 80}]}}"#);
        assert!(
            d[0].1
                .contains("host networking, where Marathon ignores `portMappings`"),
            "{d:?}"
        );
        let d = dropped(
            r#"{"networks": [{"mode": "container"}], "container": {"portMappings": [
                {"containerPort": 0}, {}]}}"#,
        );
        assert_eq!(d[0].0, 0);
        assert!(
            d[0].1.contains("container port 0 without a host port"),
            "{d:?}"
        );
        assert!(
            d[1].1.contains("neither `containerPort` nor `hostPort`"),
            "{d:?}"
        );
        let d = dropped(r#"{"ipAddress": {"discovery": {"ports": [{"number": 70000}, {}]}}}"#);
        assert!(
            d[0].1.contains("70000 is not a port from 1 to 65535"),
            "{d:?}"
        );
        assert!(d[1].1.contains("no `number`"), "{d:?}");
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
