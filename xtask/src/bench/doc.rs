//! Marathon documents (`GET /v2/apps?embed=apps.tasks` bodies) of any size, the input of the
//! real control plane in every section of the bench.
use std::net::{Ipv4Addr, SocketAddr};

/// One host-networking app whose only port carries one VIP label.
#[derive(Clone, Debug)]
pub struct App {
    pub id: String,
    pub vip: SocketAddr,
    /// The port's protocol: "tcp", "udp" or "udp,tcp" (then the VIP is two services).
    pub protocol: &'static str,
    /// One running task per backend, listening on the backend's port.
    pub tasks: Vec<SocketAddr>,
}

/// The `i`-th VIP address: 172.16.0.1, 172.16.0.2, ... 250 per /24, inside 172.16.0.0/12.
pub fn vip_addr(i: usize) -> Ipv4Addr {
    assert!(
        i < 250 * 256 * 16,
        "more VIPs than 172.16.0.0/12 holds this way"
    );
    let third = i / 250;
    Ipv4Addr::new(
        172,
        16 + (third / 256) as u8,
        (third % 256) as u8,
        (i % 250 + 1) as u8,
    )
}

/// The JSON text of a document with `apps`.
pub fn document(apps: &[App]) -> String {
    let apps: Vec<serde_json::Value> = apps.iter().map(app_json).collect();
    serde_json::json!({ "apps": apps }).to_string()
}

/// The JSON text of `GET /v2/apps/{id}?embed=app.tasks` for `app`: `{"app": {...}}`.
pub fn app_document(app: &App) -> String {
    serde_json::json!({ "app": app_json(app) }).to_string()
}

fn app_json(app: &App) -> serde_json::Value {
    let slug = app.id.trim_start_matches('/').replace('/', "_");
    let tasks: Vec<serde_json::Value> = app
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({
                "id": format!("{slug}.task{i}"),
                "appId": app.id,
                "host": t.ip().to_string(),
                "ports": [t.port()],
                "state": "TASK_RUNNING",
                "startedAt": "2026-01-01T00:00:00.000Z"
            })
        })
        .collect();
    serde_json::json!({
        "id": app.id,
        "instances": tasks.len(),
        "portDefinitions": [{
            "port": 0,
            "protocol": app.protocol,
            "name": "default",
            "labels": {"VIP_0": app.vip.to_string()}
        }],
        "tasks": tasks
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_are_distinct_and_in_range() {
        let all: std::collections::BTreeSet<Ipv4Addr> = (0..20_000).map(vip_addr).collect();
        assert_eq!(all.len(), 20_000);
        for a in all {
            let o = a.octets();
            assert!(o[0] == 172 && (16..32).contains(&o[1]) && o[3] != 0 && o[3] != 255);
        }
    }

    #[test]
    fn the_control_plane_reads_it() {
        let apps = vec![App {
            id: "/bench/a0".into(),
            vip: SocketAddr::new(vip_addr(0).into(), 8080),
            protocol: "udp,tcp",
            tasks: vec![
                "198.19.0.2:8080".parse().unwrap(),
                "198.19.0.3:8080".parse().unwrap(),
            ],
        }];
        let opts = lbctl::marathon::Options::default();
        let (_, d) = lbctl::marathon::derive(&document(&apps), "bench", &opts).unwrap();
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert_eq!(d.services.len(), 2);
        assert!(d.services.values().all(|s| s.backends.len() == 2));
    }
}
