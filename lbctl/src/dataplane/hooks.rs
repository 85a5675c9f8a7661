//! Which hook each interface gets: XDP (in the driver, before the kernel makes a socket buffer)
//! or TC (`clsact` ingress through a tcx link, on the socket buffer). `--iface NAME` chooses
//! (`auto`): XDP in native mode on a device that is not virtual and whose driver takes it, TC on
//! veth, bridges, bonds, VLANs, tun/tap, dummy and anything else virtual, and on any device whose
//! driver refuses native XDP. `NAME:xdp` and `NAME:tc` force one.
//!
//! Why: traffic made on this host or by containers and carried by virtual devices holds partial
//! checksums (CHECKSUM_PARTIAL, finished by the device); XDP cannot see that and its incremental
//! update corrupts them. TC updates them through the socket buffer's helpers, which know.
use super::sys;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The program an interface runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookKind {
    /// `lb_xdp`, through an XDP link.
    Xdp,
    /// `lb_tc`, through a tcx ingress link.
    Tc,
}

impl HookKind {
    /// Both kinds.
    pub const ALL: [HookKind; 2] = [HookKind::Xdp, HookKind::Tc];

    /// `xdp` or `tc`.
    pub fn name(self) -> &'static str {
        match self {
            HookKind::Xdp => "xdp",
            HookKind::Tc => "tc",
        }
    }

    /// The other kind.
    pub fn other(self) -> HookKind {
        match self {
            HookKind::Xdp => HookKind::Tc,
            HookKind::Tc => HookKind::Xdp,
        }
    }
}

impl fmt::Display for HookKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What `--iface` asked for one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookChoice {
    /// Decide from the device (the default).
    Auto,
    /// `NAME:xdp` or `NAME:tc`.
    Forced(HookKind),
}

/// One `--iface` value: `NAME`, `NAME:auto`, `NAME:xdp` or `NAME:tc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceSpec {
    /// The interface's name.
    pub name: String,
    /// The hook asked for.
    pub choice: HookChoice,
}

impl IfaceSpec {
    /// Reads an `--iface` value; a suffix other than `auto`, `xdp` or `tc` is an error naming it.
    pub fn parse(text: &str) -> Result<IfaceSpec> {
        let (name, choice) = match text.rsplit_once(':') {
            None => (text, HookChoice::Auto),
            Some((name, "auto")) => (name, HookChoice::Auto),
            Some((name, "xdp")) => (name, HookChoice::Forced(HookKind::Xdp)),
            Some((name, "tc")) => (name, HookChoice::Forced(HookKind::Tc)),
            Some((_, other)) => {
                return Err(Error::Config(format!(
                    "--iface {text}: unknown hook \"{other}\" (give NAME, NAME:auto, NAME:xdp or NAME:tc)"
                )));
            }
        };
        if name.is_empty() {
            return Err(Error::Config(format!("--iface {text}: no interface name")));
        }
        Ok(IfaceSpec {
            name: name.to_string(),
            choice,
        })
    }

    /// Reads every `--iface` value; an interface named twice is an error.
    pub fn parse_all(texts: &[String]) -> Result<Vec<IfaceSpec>> {
        let mut out: Vec<IfaceSpec> = Vec::new();
        for t in texts {
            let spec = IfaceSpec::parse(t)?;
            if out.iter().any(|s| s.name == spec.name) {
                return Err(Error::Config(format!(
                    "--iface {}: interface given twice",
                    spec.name
                )));
            }
            out.push(spec);
        }
        Ok(out)
    }
}

/// Every `--iface` value is well formed and names an interface that exists.
pub fn check_ifaces(texts: &[String]) -> Result<()> {
    for spec in IfaceSpec::parse_all(texts)? {
        sys::if_index(&spec.name)?;
    }
    Ok(())
}

/// The hook an interface got, and why: the agent's status (`lbctl status`) and `lbctl list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IfaceHook {
    /// The interface.
    pub iface: String,
    /// Its hook.
    pub hook: HookKind,
    /// Why that hook.
    pub reason: String,
}

/// Drivers of virtual devices (what `ethtool -i` names them).
const VIRTUAL: [&str; 14] = [
    "veth",
    "bridge",
    "bonding",
    "802.1Q VLAN Driver",
    "tun",
    "dummy",
    "macvlan",
    "ipvlan",
    "vxlan",
    "geneve",
    "wireguard",
    "team",
    "vrf",
    "ifb",
];

/// What to try on one interface: `(kind, reason)`. Pure: `driver` and `bus` are what
/// `ethtool -i` says (a virtual device has no bus). An `auto` XDP is attached in native mode and
/// falls back to TC if the driver refuses it (`Plan::fallback`).
pub fn plan(spec: &IfaceSpec, driver: &str, bus: &str) -> Plan {
    let virtual_dev = bus.is_empty() || VIRTUAL.contains(&driver);
    match spec.choice {
        HookChoice::Forced(kind) => Plan {
            kind,
            native_only: false,
            reason: format!("forced ({}:{kind})", spec.name),
            warn_veth: kind == HookKind::Xdp && driver == "veth",
        },
        HookChoice::Auto if virtual_dev => Plan {
            kind: HookKind::Tc,
            native_only: false,
            reason: format!(
                "auto: {} is a virtual device (driver {driver}): TC keeps partial checksums right",
                spec.name
            ),
            warn_veth: false,
        },
        HookChoice::Auto => Plan {
            kind: HookKind::Xdp,
            native_only: true,
            reason: format!("auto: driver {driver} on {bus} runs XDP natively"),
            warn_veth: false,
        },
    }
}

/// What `plan` decided for one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The hook to attach.
    pub kind: HookKind,
    /// XDP in native (driver) mode only; if the driver refuses, TC (`fallback`).
    pub native_only: bool,
    /// Why.
    pub reason: String,
    /// XDP forced on a veth: its peer must not offload transmit checksums.
    pub warn_veth: bool,
}

impl Plan {
    /// The plan after the driver refused native XDP with `error`.
    pub fn fallback(&self, driver: &str, error: &str) -> Plan {
        Plan {
            kind: HookKind::Tc,
            native_only: false,
            reason: format!("auto: driver {driver} refused native XDP ({error})"),
            warn_veth: false,
        }
    }
}

/// `plan` for an interface of this host. A device that does not say what its driver is gets
/// what a virtual device gets (TC works on every device).
pub fn plan_for(spec: &IfaceSpec) -> Result<(Plan, String)> {
    let (driver, bus) = match sys::if_driver(&spec.name) {
        Ok(found) => found,
        Err(Error::NoInterface(name)) => return Err(Error::NoInterface(name)),
        Err(e) => {
            tracing::debug!(iface = %spec.name, error = %e, "no driver information");
            ("unknown".to_string(), String::new())
        }
    };
    Ok((plan(spec, &driver, &bus), driver))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn iface_values() {
        let s = IfaceSpec::parse("l0").unwrap();
        assert_eq!((s.name.as_str(), s.choice), ("l0", HookChoice::Auto));
        let s = IfaceSpec::parse("l0:tc").unwrap();
        assert_eq!(s.choice, HookChoice::Forced(HookKind::Tc));
        let s = IfaceSpec::parse("eth0.100:xdp").unwrap();
        assert_eq!(
            (s.name.as_str(), s.choice),
            ("eth0.100", HookChoice::Forced(HookKind::Xdp))
        );
        assert_eq!(
            IfaceSpec::parse("l0:auto").unwrap().choice,
            HookChoice::Auto
        );
        let e = IfaceSpec::parse("l0:ebpf").unwrap_err().to_string();
        assert!(e.contains("l0:ebpf") && e.contains("\"ebpf\""), "{e}");
        assert!(IfaceSpec::parse(":tc").is_err());
        let e = IfaceSpec::parse_all(&["a".into(), "a:tc".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn auto_gives_tc_to_virtual_devices_and_xdp_to_nics() {
        let auto = |name: &str| IfaceSpec::parse(name).unwrap();
        for driver in [
            "veth",
            "bridge",
            "bonding",
            "802.1Q VLAN Driver",
            "tun",
            "dummy",
        ] {
            let p = plan(&auto("x"), driver, "");
            assert_eq!(p.kind, HookKind::Tc, "{driver}");
            assert!(p.reason.contains("virtual"), "{}", p.reason);
        }
        // A virtual driver with a bus name still counts as virtual; a NIC gets native XDP.
        assert_eq!(plan(&auto("x"), "tun", "tap").kind, HookKind::Tc);
        let p = plan(&auto("eth0"), "ixgbe", "0000:01:00.0");
        assert_eq!((p.kind, p.native_only), (HookKind::Xdp, true));
        let f = p.fallback("ixgbe", "Operation not supported");
        assert_eq!(f.kind, HookKind::Tc);
        assert!(f.reason.contains("refused native XDP"), "{}", f.reason);
    }

    #[test]
    fn forced_hooks_and_the_veth_warning() {
        let p = plan(&IfaceSpec::parse("v:xdp").unwrap(), "veth", "");
        assert_eq!((p.kind, p.warn_veth), (HookKind::Xdp, true));
        assert!(p.reason.contains("forced"), "{}", p.reason);
        let p = plan(&IfaceSpec::parse("e:tc").unwrap(), "ixgbe", "0000:01:00.0");
        assert_eq!((p.kind, p.warn_veth), (HookKind::Tc, false));
        let p = plan(&IfaceSpec::parse("e:xdp").unwrap(), "ixgbe", "0000:01:00.0");
        assert!(!p.warn_veth && !p.native_only);
    }
}
