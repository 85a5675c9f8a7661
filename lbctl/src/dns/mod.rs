//! The agent's DNS server for named VIPs: authoritative for `l4lb.thisdcos.directory`
//! (`<name>.<framework>.l4lb.thisdcos.directory` answers the named VIP's address), names
//! outside it REFUSED or forwarded to upstream servers. The wire format is hickory-proto's.
//!
//! - `zone`: the zone's data and what a query gets from it (pure).
//! - `server`: UDP and TCP listeners on a tokio runtime, every resource bounded.
//!
//! The reconcile loop publishes the named VIPs it applied ([`ZoneHandle::publish`]); the
//! listeners read the zone as it was published last, so a change is answered as soon as it is
//! applied.
mod server;
mod zone;

pub use server::{Bound, bind, serve};
pub use zone::{EDNS_PAYLOAD, Reply, ZONE, Zone, answer, encode, formerr, fqdn, query, udp_limit};

use crate::{
    api::ResolveOutput,
    error::{Error, Result},
    model::Desired,
};
use hickory_proto::rr::{RData, RecordType};
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

/// Default time to live of the answers, in seconds.
pub const DEFAULT_TTL: u32 = 5;

/// The DNS server's settings (built by `config`).
#[derive(Debug, Clone, PartialEq)]
pub struct DnsConfig {
    /// Where to answer, UDP and TCP on each (none: no server).
    pub listen: Vec<SocketAddr>,
    /// Time to live of the answers (and of negative answers), in seconds.
    pub ttl: u32,
    /// Where names outside the zone are sent (none: they are REFUSED).
    pub upstream: Vec<SocketAddr>,
    /// How long an upstream server gets to answer before the next one is asked.
    pub upstream_timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: Vec::new(),
            ttl: DEFAULT_TTL,
            upstream: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
        }
    }
}

/// The zone as last published, shared by the reconcile loop (which publishes) and the
/// listeners and status socket (which read). Cloning gives another handle on the same zone.
#[derive(Clone, Debug)]
pub struct ZoneHandle {
    zone: Arc<RwLock<Arc<Zone>>>,
    names: Arc<Mutex<BTreeSet<(String, IpAddr)>>>,
    forwarding: bool,
    serving: bool,
}

impl Default for ZoneHandle {
    fn default() -> Self {
        ZoneHandle::new(&DnsConfig::default())
    }
}

impl ZoneHandle {
    /// An empty zone for the server `cfg` describes.
    pub fn new(cfg: &DnsConfig) -> ZoneHandle {
        let ns_addrs = cfg
            .listen
            .iter()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        ZoneHandle {
            zone: Arc::new(RwLock::new(Arc::new(Zone::new(cfg.ttl, ns_addrs)))),
            names: Arc::default(),
            forwarding: !cfg.upstream.is_empty(),
            serving: !cfg.listen.is_empty(),
        }
    }

    /// The zone as last published.
    pub fn current(&self) -> Arc<Zone> {
        match self.zone.read() {
            Ok(z) => z.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether names outside the zone are forwarded.
    pub fn forwarding(&self) -> bool {
        self.forwarding
    }

    /// Makes the named services of `services` the zone's names; the serial grows when they
    /// changed. Returns true when they did. A service without a name at an address that had
    /// one (a removal held by the guard puts the kernel's services back, nameless) keeps it.
    pub fn publish(&self, services: &Desired) -> bool {
        let mut last = match self.names.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut wanted = BTreeSet::new();
        for s in services.values() {
            let ip = s.vip.addr.ip();
            match &s.name {
                Some(name) => {
                    wanted.insert((name.clone(), ip));
                }
                None => wanted.extend(last.iter().filter(|(_, a)| *a == ip).cloned()),
            }
        }
        if *last == wanted {
            return false;
        }
        let old = self.current();
        let serial = match old.serial().wrapping_add(1) {
            0 => 1,
            s => s,
        };
        let (zone, bad) = old.with_names(wanted.iter().map(|(n, ip)| (n.as_str(), *ip)), serial);
        for name in bad {
            tracing::warn!(%name, "named VIP not served by DNS: not a valid name in the zone");
        }
        tracing::info!(names = zone.len(), serial, "DNS zone updated");
        match self.zone.write() {
            Ok(mut z) => *z = Arc::new(zone),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(zone),
        }
        *last = wanted;
        true
    }

    /// What the server answers for `name` of type `record_type` (`A` when `None`).
    pub fn resolve(&self, name: &str, record_type: Option<&str>) -> Result<ResolveOutput> {
        let rtype_text = record_type.unwrap_or("A").to_ascii_uppercase();
        let rtype: RecordType = rtype_text
            .parse()
            .map_err(|_| Error::Config(format!("`{rtype_text}` is not a DNS record type")))?;
        let qname =
            fqdn(name).map_err(|e| Error::Config(format!("`{name}` is not a DNS name: {e}")))?;
        let zone = self.current();
        let mut out = ResolveOutput {
            name: name.to_string(),
            record_type: rtype.to_string(),
            serial: zone.serial(),
            serving: self.serving,
            ..Default::default()
        };
        match answer(&zone, &query(qname, rtype), self.forwarding) {
            Reply::Answer(m) => {
                out.rcode = format!("{:?}", m.metadata.response_code);
                for r in &m.answers {
                    out.ttl = r.ttl;
                    match &r.data {
                        RData::A(a) => out.addresses.push(a.0.to_string()),
                        RData::AAAA(a) => out.addresses.push(a.0.to_string()),
                        other => out.addresses.push(other.to_string()),
                    }
                }
            }
            Reply::Forward => out.rcode = "Forwarded".into(),
            Reply::Drop => out.rcode = "Dropped".into(),
        }
        Ok(out)
    }
}
