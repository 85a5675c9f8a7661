//! The agent's watch on the flow tables' evictions of flows in use (`lb_ftpres_v1`): a table
//! that evicts flows in use is too small for the flows that use it, and the operator should
//! hear of it in the log, not only from a counter nobody graphs.
use super::maps::Maps;
use crate::error::Result;
use std::{
    path::Path,
    time::{Duration, Instant},
};

/// How often the agent reads the counter.
pub const EVICTIONS_READ_EVERY: Duration = Duration::from_secs(10);
/// The least time between two warnings: a table too small for a while warns once a minute,
/// with the count since the warning before.
pub const EVICTIONS_WARN_EVERY: Duration = Duration::from_secs(60);

/// When to warn, from the counter's readings (no kernel: `EvictionWatch` reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictionNotes {
    /// The count the last warning covered (or the first reading).
    told: u64,
    /// When the last warning was given.
    warned: Option<Instant>,
}

impl EvictionNotes {
    /// Notes starting from `evicted`, the count at start: what an earlier agent's run saw is
    /// not warned of again.
    pub fn new(evicted: u64) -> EvictionNotes {
        EvictionNotes {
            told: evicted,
            warned: None,
        }
    }

    /// Given the count `evicted` read at `now`: the flows in use evicted since the last warning
    /// (with the total), when there are some and the last warning is `EVICTIONS_WARN_EVERY`
    /// old. A count below the last (the map made again) starts over from it.
    pub fn note(&mut self, evicted: u64, now: Instant) -> Option<(u64, u64)> {
        if evicted < self.told {
            self.told = evicted;
            return None;
        }
        let new = evicted - self.told;
        let quiet = self
            .warned
            .is_none_or(|w| now.duration_since(w) >= EVICTIONS_WARN_EVERY);
        if new == 0 || !quiet {
            return None;
        }
        self.told = evicted;
        self.warned = Some(now);
        Some((new, evicted))
    }
}

/// Reads the data plane's evictions every `EVICTIONS_READ_EVERY` and logs a warning that names
/// `--flow-table-size` when flows in use were evicted (`EvictionNotes`).
pub struct EvictionWatch {
    maps: Maps,
    notes: EvictionNotes,
    flows: u32,
    next: Instant,
}

impl EvictionWatch {
    /// A watch of the data plane pinned in `dir`.
    pub fn open(dir: &Path) -> Result<EvictionWatch> {
        let maps = Maps::open(dir)?;
        let [_, evicted] = maps.flow_pressure()?;
        let flows = maps.table()?.flows;
        Ok(EvictionWatch {
            maps,
            notes: EvictionNotes::new(evicted),
            flows,
            next: Instant::now() + EVICTIONS_READ_EVERY,
        })
    }

    /// Reads the counter if it is time, and warns as `EvictionNotes` says.
    pub fn poll(&mut self, now: Instant) {
        if now < self.next {
            return;
        }
        self.next = now + EVICTIONS_READ_EVERY;
        match self.maps.flow_pressure() {
            Ok([_, evicted]) => {
                if let Some((new, total)) = self.notes.note(evicted, now) {
                    tracing::warn!(
                        evicted = new,
                        since_made = total,
                        flow_table_size = self.flows,
                        "the flow tables evicted flows in use to make room for new flows (their \
                         next packets may go to another backend if their service changed): raise \
                         --flow-table-size"
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading the flow tables' evictions"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Evictions warn once, then at most once a minute with the count since the last warning;
    /// what was evicted before the start is not warned of.
    #[test]
    fn evictions_warn_at_most_once_a_minute_with_the_count_since() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut n = EvictionNotes::new(5);
        assert_eq!(n.note(5, at(10)), None, "nothing new since the start");
        assert_eq!(n.note(8, at(20)), Some((3, 8)));
        assert_eq!(
            n.note(9, at(30)),
            None,
            "within a minute of the last warning"
        );
        assert_eq!(n.note(12, at(79)), None);
        assert_eq!(
            n.note(12, at(80)),
            Some((4, 12)),
            "the count since the last one"
        );
        assert_eq!(n.note(12, at(200)), None, "none new");
        assert_eq!(n.note(2, at(210)), None, "the counter started over");
        assert_eq!(n.note(3, at(220)), Some((1, 3)));
    }
}
