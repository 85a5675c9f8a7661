//! Merging document after document, redoing only the services that the apps that changed
//! touch: what keeps a one-task change at 10,000 apps from rebuilding 10,000 services.
//!
//! A merge is whole ([`merge_placing`]) when nothing came before, when the options changed,
//! when apps came, went or moved in the document, when an app that changed has a named VIP
//! (names are placed together), when the last merge placed a name or could not, when a task
//! address that comes or goes is the address of a declared VIP (whose placement it changes),
//! or when many apps changed. Otherwise each changed app's VIPs are placed again and each
//! service that it joined or leaves is rebuilt from the apps that join it, in document order,
//! as the whole merge would build it. The tests hold the two to the same result.
use super::{
    derive::AppResult,
    labels::VipTarget,
    merge::{Derived, Placed, join, merge_placing, place},
    names::{Assigned, NameBook},
    options::Options,
};
use crate::model::Vip;
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

/// The merge of the last document, kept to merge the next one.
#[derive(Default)]
pub struct Merger {
    last: Option<Last>,
    /// Whole merges and incremental ones since the start.
    counts: [u64; 2],
}

struct Last {
    opts: Options,
    apps: Vec<Arc<AppResult>>,
    derived: Derived,
    placed: Vec<Placed>,
    names_moving: bool,
    named: HashSet<IpAddr>,
    /// For each service, the apps (indices, ascending) that join it.
    joins: HashMap<Vip, Vec<usize>>,
    /// Each task address, with the number of apps that have it.
    task_addrs: HashMap<IpAddr, u32>,
    /// Each IP VIP address declared, with the number of declarations.
    declared: HashMap<IpAddr, u32>,
}

impl Merger {
    /// Merges `apps` (the same result as [`super::merge_with`] with `book`).
    pub fn merge(
        &mut self,
        apps: Vec<Arc<AppResult>>,
        opts: &Options,
        book: &mut NameBook,
    ) -> &Derived {
        let updated = self
            .last
            .as_mut()
            .is_some_and(|last| last.update(&apps, opts));
        self.counts[usize::from(updated)] += 1;
        let last = match self.last.take() {
            Some(last) if updated => last,
            _ => Last::whole(apps, opts, book),
        };
        &self.last.insert(last).derived
    }

    /// How many merges were whole, and how many incremental.
    pub fn counts(&self) -> (u64, u64) {
        (self.counts[0], self.counts[1])
    }
}

fn has_named(app: &AppResult) -> bool {
    app.vips
        .iter()
        .any(|v| matches!(v.target, VipTarget::Named { .. }))
}

fn declared_ips(app: &AppResult) -> impl Iterator<Item = IpAddr> + '_ {
    app.vips.iter().filter_map(|v| match &v.target {
        VipTarget::Ip(a) => Some(a.ip()),
        VipTarget::Named { .. } => None,
    })
}

/// Adds `by` to `ip`'s count, dropping it at zero.
fn count(counts: &mut HashMap<IpAddr, u32>, ip: IpAddr, by: i64) {
    let n = i64::from(counts.get(&ip).copied().unwrap_or(0)) + by;
    match u32::try_from(n) {
        Ok(n) if n > 0 => {
            counts.insert(ip, n);
        }
        _ => {
            counts.remove(&ip);
        }
    }
}

impl Last {
    fn whole(apps: Vec<Arc<AppResult>>, opts: &Options, book: &mut NameBook) -> Last {
        let refs: Vec<&AppResult> = apps.iter().map(|a| &**a).collect();
        let (derived, placing) = merge_placing(&refs, opts, book);
        let mut last = Last {
            opts: opts.clone(),
            derived,
            placed: placing.apps,
            names_moving: placing.names_moving,
            named: placing.named,
            joins: HashMap::new(),
            task_addrs: HashMap::new(),
            declared: HashMap::new(),
            apps: Vec::new(),
        };
        for (i, app) in apps.iter().enumerate() {
            for &(_, vip) in &last.placed[i].joined {
                let list = last.joins.entry(vip).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
            for ip in &app.task_addrs {
                count(&mut last.task_addrs, *ip, 1);
            }
            for ip in declared_ips(app) {
                count(&mut last.declared, ip, 1);
            }
        }
        last.apps = apps;
        last
    }

    /// Merges `apps` from this merge when that gives what a whole merge would; false (and
    /// nothing changed) when it cannot.
    fn update(&mut self, apps: &[Arc<AppResult>], opts: &Options) -> bool {
        if self.names_moving || self.opts != *opts || apps.len() != self.apps.len() {
            return false;
        }
        let mut changed = Vec::new();
        for (i, (old, new)) in self.apps.iter().zip(apps).enumerate() {
            if Arc::ptr_eq(old, new) || **old == **new {
                continue;
            }
            if old.id != new.id || has_named(old) || has_named(new) {
                return false;
            }
            changed.push(i);
        }
        // Past this, a whole merge costs about as much.
        if changed.len() > 64 + apps.len() / 16 {
            return false;
        }
        // The task addresses that come or go: a VIP declared there is placed otherwise.
        let mut delta: HashMap<IpAddr, i64> = HashMap::new();
        for &i in &changed {
            for ip in &self.apps[i].task_addrs {
                *delta.entry(*ip).or_default() -= 1;
            }
            for ip in &apps[i].task_addrs {
                *delta.entry(*ip).or_default() += 1;
            }
        }
        let local = |ip: &IpAddr| opts.local_addrs.contains(ip);
        let had = |ip: &IpAddr| self.task_addrs.contains_key(ip) || local(ip);
        let declared_now: HashSet<IpAddr> = changed
            .iter()
            .flat_map(|&i| declared_ips(&apps[i]))
            .collect();
        for (ip, d) in &delta {
            let now = i64::from(self.task_addrs.get(ip).copied().unwrap_or(0)) + d > 0 || local(ip);
            if now != had(ip)
                && (self.declared.contains_key(ip)
                    || declared_now.contains(ip)
                    || self.named.contains(ip))
            {
                return false;
            }
        }
        // From here on the merge is incremental.
        for (ip, d) in delta {
            count(&mut self.task_addrs, ip, d);
        }
        let mut touched: BTreeSet<Vip> = BTreeSet::new();
        let none = Assigned::default();
        for &i in &changed {
            for ip in declared_ips(&self.apps[i]) {
                count(&mut self.declared, ip, -1);
            }
            for ip in declared_ips(&apps[i]) {
                count(&mut self.declared, ip, 1);
            }
            let task_addrs = &self.task_addrs;
            let captured = |ip: IpAddr| task_addrs.contains_key(&ip) || local(&ip);
            let placed = place(&apps[i], &none, &mut BTreeSet::new(), &captured, opts);
            for &(_, vip) in &self.placed[i].joined {
                if let Some(list) = self.joins.get_mut(&vip) {
                    list.retain(|&j| j != i);
                }
                touched.insert(vip);
            }
            for &(_, vip) in &placed.joined {
                let list = self.joins.entry(vip).or_default();
                if let Err(at) = list.binary_search(&i) {
                    list.insert(at, i);
                }
                touched.insert(vip);
            }
            self.placed[i] = placed;
        }
        self.apps = apps.to_vec();
        for vip in touched {
            self.derived.services.remove(&vip);
            let Some(list) = self.joins.get(&vip).filter(|l| !l.is_empty()) else {
                self.joins.remove(&vip);
                continue;
            };
            for &j in list {
                let only = Placed {
                    joined: self.placed[j]
                        .joined
                        .iter()
                        .filter(|(_, v)| *v == vip)
                        .copied()
                        .collect(),
                    problems: Vec::new(),
                };
                join(&mut self.derived.services, &self.apps[j], &only);
            }
        }
        if !changed.is_empty() {
            self.derived.problems = self
                .apps
                .iter()
                .zip(&self.placed)
                .flat_map(|(app, placed)| app.problems.iter().chain(&placed.problems))
                .cloned()
                .collect();
        }
        true
    }
}

#[cfg(test)]
#[path = "incremental_tests.rs"]
mod tests;
