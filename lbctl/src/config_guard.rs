//! Settings of the snapshot guards (issue 14): large removals held until confirmed, and the
//! task host resolver's cache and deadline. Part of `config` ([`super::Settings`] flattens
//! [`GuardSettings`]).
use super::{Layered, in_range};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::{ops::RangeInclusive, time::Duration};

/// Allowed values of `max_removal_floor`.
pub const MAX_REMOVAL_FLOOR: RangeInclusive<u64> = 0..=1_000_000;
/// Allowed values of `removal_confirm_secs`.
pub const REMOVAL_CONFIRM_SECS: RangeInclusive<u64> = 0..=3_600;
/// Allowed values of `resolve_timeout_ms`.
pub const RESOLVE_TIMEOUT_MS: RangeInclusive<u64> = 1..=60_000;
/// Allowed values of `resolve_ttl_secs` and `resolve_negative_ttl_secs`.
pub const RESOLVE_TTL_SECS: RangeInclusive<u64> = 0..=86_400;

/// The guards on what one snapshot can do: a large removal is held until a later snapshot
/// confirms it.
#[derive(clap::Args, Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct GuardSettings {
    /// A snapshot removing more than this fraction of the services served (and at least
    /// --max-removal-floor of them) is held until a later one agrees; 1 turns the guard off
    /// [default: 0.5].
    #[arg(long, value_name = "FRACTION", value_parser = fraction)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_removal: Option<f64>,
    /// Removals of fewer services than this are never held (small clusters) [default: 5].
    #[arg(long, value_parser = clap::value_parser!(u64).range(MAX_REMOVAL_FLOOR))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_removal_floor: Option<u64>,
    /// How long after a held removal's first snapshot a confirming one must be fetched, in s
    /// [default: 10].
    #[arg(long, value_parser = clap::value_parser!(u64).range(REMOVAL_CONFIRM_SECS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removal_confirm_secs: Option<u64>,
    /// How long a snapshot waits for its task host names, in ms; a name not resolved by then
    /// is a problem of its apps and is resolved in the background [default: 1000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(RESOLVE_TIMEOUT_MS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolve_timeout_ms: Option<u64>,
    /// How long a task host's address is cached, in s [default: 60].
    #[arg(long, value_parser = clap::value_parser!(u64).range(RESOLVE_TTL_SECS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolve_ttl_secs: Option<u64>,
    /// How long "no address" for a task host is cached, in s [default: 5].
    #[arg(long, value_parser = clap::value_parser!(u64).range(RESOLVE_TTL_SECS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolve_negative_ttl_secs: Option<u64>,
}

impl Layered for GuardSettings {
    fn under(self, upper: Self) -> Self {
        let GuardSettings {
            max_removal,
            max_removal_floor,
            removal_confirm_secs,
            resolve_timeout_ms,
            resolve_ttl_secs,
            resolve_negative_ttl_secs,
        } = upper;
        GuardSettings {
            resolve_timeout_ms: self.resolve_timeout_ms.under(resolve_timeout_ms),
            resolve_ttl_secs: self.resolve_ttl_secs.under(resolve_ttl_secs),
            resolve_negative_ttl_secs: self
                .resolve_negative_ttl_secs
                .under(resolve_negative_ttl_secs),
            max_removal: self.max_removal.under(max_removal),
            max_removal_floor: self.max_removal_floor.under(max_removal_floor),
            removal_confirm_secs: self.removal_confirm_secs.under(removal_confirm_secs),
        }
    }
}

impl GuardSettings {
    /// The removal guard's policy, checked.
    pub fn removal(&self) -> Result<crate::guard::RemovalPolicy> {
        let d = crate::guard::RemovalPolicy::default();
        let max_fraction = match self.max_removal {
            Some(f) => {
                fraction(&f.to_string()).map_err(|e| Error::Config(format!("max_removal: {e}")))?
            }
            None => d.max_fraction,
        };
        let floor = in_range(
            "max_removal_floor",
            self.max_removal_floor.unwrap_or(d.floor as u64),
            MAX_REMOVAL_FLOOR,
        )?;
        let confirm = in_range(
            "removal_confirm_secs",
            self.removal_confirm_secs.unwrap_or(d.confirm.as_secs()),
            REMOVAL_CONFIRM_SECS,
        )?;
        Ok(crate::guard::RemovalPolicy {
            max_fraction,
            floor: floor as usize,
            confirm: Duration::from_secs(confirm),
        })
    }
}

impl GuardSettings {
    /// The task host resolver's settings, checked.
    pub fn resolver(&self) -> Result<crate::source::resolver::ResolverConfig> {
        let d = crate::source::resolver::ResolverConfig::default();
        let ms = |d: Duration| d.as_millis() as u64;
        Ok(crate::source::resolver::ResolverConfig {
            timeout: Duration::from_millis(in_range(
                "resolve_timeout_ms",
                self.resolve_timeout_ms.unwrap_or(ms(d.timeout)),
                RESOLVE_TIMEOUT_MS,
            )?),
            ttl: Duration::from_secs(in_range(
                "resolve_ttl_secs",
                self.resolve_ttl_secs.unwrap_or(d.ttl.as_secs()),
                RESOLVE_TTL_SECS,
            )?),
            negative_ttl: Duration::from_secs(in_range(
                "resolve_negative_ttl_secs",
                self.resolve_negative_ttl_secs
                    .unwrap_or(d.negative_ttl.as_secs()),
                RESOLVE_TTL_SECS,
            )?),
            workers: d.workers,
        })
    }
}

/// clap's check of a fraction: a number from 0 to 1.
fn fraction(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("`{s}` is not a fraction from 0 to 1")),
    }
}
