//! Settings of the DNS server of named VIPs (issue 11). Part of `config` ([`super::Settings`]
//! flattens [`DnsSettings`]).
use super::{Layered, in_range, socket_address};
use crate::{
    dns::DnsConfig,
    error::{Error, Result},
};
use serde::{Deserialize, Serialize};
use std::{net::SocketAddr, ops::RangeInclusive};

/// Allowed values of `dns_ttl`.
pub const DNS_TTL: RangeInclusive<u64> = 0..=86_400;

/// Where and how the agent answers DNS for `l4lb.thisdcos.directory`.
#[derive(clap::Args, Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct DnsSettings {
    /// Answer DNS for the named VIPs (UDP and TCP) on ADDRESS:PORT (repeatable; off by
    /// default).
    #[arg(long, value_name = "ADDRESS:PORT", value_parser = socket_address)]
    pub dns_listen: Vec<String>,
    /// Time to live of the DNS answers, in s [default: 5].
    #[arg(long, value_parser = clap::value_parser!(u64).range(DNS_TTL))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_ttl: Option<u64>,
    /// Forward names outside l4lb.thisdcos.directory to this DNS server, ADDRESS:PORT
    /// (repeatable; tried in order); without one they are REFUSED.
    #[arg(long, value_name = "ADDRESS:PORT", value_parser = socket_address)]
    pub dns_upstream: Vec<String>,
}

impl Layered for DnsSettings {
    fn under(self, upper: Self) -> Self {
        let DnsSettings {
            dns_listen,
            dns_ttl,
            dns_upstream,
        } = upper;
        DnsSettings {
            dns_listen: self.dns_listen.under(dns_listen),
            dns_ttl: self.dns_ttl.under(dns_ttl),
            dns_upstream: self.dns_upstream.under(dns_upstream),
        }
    }
}

impl DnsSettings {
    /// The DNS server's settings, checked.
    pub fn dns(&self) -> Result<DnsConfig> {
        let addrs = |key: &str, list: &[String]| -> Result<Vec<SocketAddr>> {
            list.iter()
                .map(|a| {
                    a.parse()
                        .map_err(|_| Error::Config(format!("{key} `{a}` is not ADDRESS:PORT")))
                })
                .collect()
        };
        let ttl = in_range("dns_ttl", self.dns_ttl.unwrap_or(5), DNS_TTL)?;
        Ok(DnsConfig {
            listen: addrs("dns_listen", &self.dns_listen)?,
            ttl: ttl as u32,
            upstream: addrs("dns_upstream", &self.dns_upstream)?,
            ..DnsConfig::default()
        })
    }
}
