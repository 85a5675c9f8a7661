//! What the load balancer should serve, independent of where it came from.
use serde::Serialize;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
/// A transport protocol a VIP serves.
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::PROTO_TCP,
            Proto::Udp => lb_common::PROTO_UDP,
        }
    }
    /// The protocol of an IP protocol number, when it is TCP or UDP.
    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            lb_common::PROTO_TCP => Some(Proto::Tcp),
            lb_common::PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
    /// `tcp` or `udp`.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A virtual service: address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vip {
    /// Address and port.
    pub addr: SocketAddr,
    /// Protocol.
    pub proto: Proto,
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.proto, self.addr)
    }
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
/// Whether a backend takes new flows.
pub enum BackendState {
    /// Takes new flows.
    Active,
    /// Keeps its flows, takes no new ones.
    Draining,
}

impl BackendState {
    /// `active` or `draining`.
    pub fn name(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
        }
    }
}

/// One backend of a service, with where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// Where the backend listens.
    pub addr: SocketAddr,
    /// Whether it takes new flows.
    pub state: BackendState,
    /// The app whose task it is (shared by the app's backends and the services they join).
    pub app: Arc<str>,
    /// The task's id.
    pub task: Arc<str>,
}

/// A service to serve: its VIP, where it came from, and its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The VIP.
    pub vip: Vip,
    /// The DNS name of a named VIP.
    pub name: Option<String>,
    /// The apps that declare this VIP.
    pub apps: BTreeSet<String>,
    /// The backends, by address.
    pub backends: BTreeMap<SocketAddr, BackendSpec>,
}

impl ServiceSpec {
    /// A service without apps or backends.
    pub fn new(vip: Vip, name: Option<String>) -> Self {
        ServiceSpec {
            vip,
            name,
            apps: BTreeSet::new(),
            backends: BTreeMap::new(),
        }
    }

    /// Adds a backend; if two tasks name the same address, the one that takes new flows wins.
    pub fn add_backend(&mut self, b: BackendSpec) {
        match self.backends.get(&b.addr) {
            Some(old) if old.state <= b.state => {}
            _ => {
                self.backends.insert(b.addr, b);
            }
        }
    }

    /// What the data plane needs of this service: its backends and their states.
    pub fn wanted(&self) -> BTreeMap<SocketAddr, BackendState> {
        self.backends.iter().map(|(a, b)| (*a, b.state)).collect()
    }
}

/// Everything the load balancer should serve.
pub type Desired = BTreeMap<Vip, ServiceSpec>;

/// True when `ip` is of the same family as `other`.
pub fn same_family(ip: IpAddr, other: IpAddr) -> bool {
    ip.is_ipv4() == other.is_ipv4()
}
