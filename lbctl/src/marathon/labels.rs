//! VIP labels: which labels of a port declare VIPs, what their values mean (an IP VIP or a
//! named one, with its DC/OS DNS name), and which protocols a port may have a VIP for.
use super::{
    document::Labels,
    options::{Options, special_address},
};
use crate::model::Proto;
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};

/// The address part of a VIP label.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum VipTarget {
    /// An IP VIP: its address and port.
    Ip(SocketAddr),
    /// A named VIP: its DNS name and port; the address is allocated when all names are known.
    Named {
        /// `<name>.<framework>.l4lb.thisdcos.directory`.
        dns: String,
        /// The VIP's port.
        port: u16,
    },
}

/// The labels of a port that declare VIPs (key starting with `VIP` or `vip`), sorted by key.
pub(crate) fn vip_labels(labels: &Labels) -> Vec<(&String, &Value)> {
    // A BTreeMap iterates in key order already.
    labels
        .iter()
        .filter(|(k, _)| k.starts_with("VIP") || k.starts_with("vip"))
        .collect()
}

/// A label's value as text: a string as it is, anything else as its JSON.
pub(crate) fn label_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The protocols of a port (`tcp` when absent; `udp,tcp` means both), sorted.
pub(crate) fn parse_protocol(p: Option<&str>) -> Result<Vec<Proto>, String> {
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
        if let Some(what) = special_address(ip) {
            return Err(format!(
                "{ip} is {what}, which can never be a VIP whatever the allowed ranges"
            ));
        }
        if opts.named_pool.contains(ip) {
            return Err(format!(
                "{ip} is in the named-VIP pool {}, whose addresses belong to named VIPs only",
                opts.named_pool
            ));
        }
        if opts.local_addrs.contains(&ip) {
            return Err(format!(
                "{ip} is an address of the load balancer's own host; a VIP there would capture its traffic"
            ));
        }
        if !opts.vip_ranges.iter().any(|r| r.contains(ip)) {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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
        // The named pool is never allowed to IP VIPs, whatever the ranges say.
        for ranges in [
            vec![],
            vec!["11.0.0.0/8".parse().unwrap()],
            vec!["0.0.0.0/0".parse().unwrap()],
        ] {
            o.vip_ranges = ranges;
            let e = parse_vip_label("11.1.2.3:80", &o).unwrap_err();
            assert!(e.contains("named-VIP pool 11.0.0.0/8"), "{e}");
        }
    }

    #[test]
    fn special_and_local_addresses_are_refused_whatever_the_ranges() {
        let mut o = opts();
        o.vip_ranges = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
        for v in [
            "0.0.0.0:80",
            "127.0.0.1:80",
            "255.255.255.255:80",
            "224.0.0.1:80",
            "240.1.2.3:80",
            "169.254.169.254:80",
            "[::]:80",
            "[::1]:80",
            "[ff02::1]:80",
            "[fe80::1]:80",
            "[::ffff:127.0.0.1]:80",
        ] {
            let e = parse_vip_label(v, &o).unwrap_err();
            assert!(e.contains("can never be a VIP"), "{v}: {e}");
        }
        assert!(parse_vip_label("8.8.8.8:53", &o).is_ok());
        o.local_addrs = vec!["198.18.0.1".parse().unwrap()];
        let e = parse_vip_label("198.18.0.1:80", &o).unwrap_err();
        assert!(e.contains("load balancer's own host"), "{e}");
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
    fn only_vip_labels_count() {
        let labels: Labels = serde_json::from_str(
            r#"{"vip_b": "/b:1", "HAPROXY_GROUP": "x", "VIP_0": "/a:1", "VIPX": 7}"#,
        )
        .unwrap();
        let keys: Vec<&str> = vip_labels(&labels)
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, ["VIPX", "VIP_0", "vip_b"]);
        assert_eq!(label_text(&Value::from(7)), "7");
        assert_eq!(label_text(&Value::from("/a:1")), "/a:1");
    }
}
