//! Merging document after document, redoing only the services that the apps that changed
//! touch: what keeps a one-task change at 10,000 apps from rebuilding 10,000 services.
//!
//! The merger keeps no services: it keeps where each app's VIPs went and which apps join each
//! service, and hands over either a whole [`Derived`] or the services that changed.
//!
//! A merge is whole ([`merge_placing`]) when the caller asks, when nothing came before, when the options changed,
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
    problem::Problem,
};
use crate::model::{Desired, ServiceSpec, Vip};
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

/// What a merge gives.
#[derive(Debug)]
pub enum Merged {
    /// Every service, and the problems.
    Whole(Derived),
    /// Only the services that changed since the last merge (None: gone), and all the problems.
    Changed {
        /// Each service rebuilt or gone, by VIP.
        services: Vec<(Vip, Option<ServiceSpec>)>,
        /// The document's problems (as a whole merge gives them).
        problems: Vec<Problem>,
    },
}

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
    /// A hash of each app's id, in the apps' order: finding an app reads these, not every app
    /// (10,000 of them spread over the heap took 0.4 ms).
    id_hashes: Vec<u64>,
    problems: Vec<Problem>,
    placed: Vec<Placed>,
    names_moving: bool,
    named: HashSet<IpAddr>,
    /// For each service, the apps that join it.
    joins: HashMap<Vip, Joiners>,
    /// Each task address, with the number of apps that have it.
    task_addrs: HashMap<IpAddr, u32>,
    /// Each IP VIP address declared, with the number of declarations.
    declared: HashMap<IpAddr, u32>,
}

impl Merger {
    /// Merges `apps`: what [`super::merge_with`] gives with `book`, or (unless `whole`) what
    /// changed in it since the last merge.
    pub fn merge(
        &mut self,
        apps: &[Arc<AppResult>],
        opts: &Options,
        book: &mut NameBook,
        whole: bool,
    ) -> Merged {
        let changed = match self.last.as_mut() {
            Some(last) if !whole => last.update(apps, opts),
            _ => None,
        };
        self.counts[usize::from(changed.is_some())] += 1;
        match (changed, &self.last) {
            (Some(services), Some(last)) => Merged::Changed {
                services,
                problems: last.problems.clone(),
            },
            _ => {
                let (derived, last) = Last::whole(apps, opts, book);
                self.last = Some(last);
                Merged::Whole(derived)
            }
        }
    }

    /// The apps of the last merge, in their order (none before the first).
    pub fn apps(&self) -> &[Arc<AppResult>] {
        self.last.as_ref().map_or(&[], |l| &l.apps)
    }

    /// Where the app `id` is among the apps of the last merge; None when no app or more than
    /// one has that id.
    pub fn position(&self, id: &str) -> Option<usize> {
        let last = self.last.as_ref()?;
        let h = id_hash(id);
        let mut at = last
            .id_hashes
            .iter()
            .enumerate()
            .filter(|&(i, x)| *x == h && last.apps[i].id == id)
            .map(|(i, _)| i);
        match (at.next(), at.next()) {
            (Some(i), None) => Some(i),
            _ => None,
        }
    }

    /// How many merges were whole, and how many incremental.
    pub fn counts(&self) -> (u64, u64) {
        (self.counts[0], self.counts[1])
    }
}

/// The apps (indices, ascending) that join a service: most services have one, kept without a
/// memory allocation of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Joiners {
    One(usize),
    Many(Vec<usize>),
}

impl Joiners {
    fn as_slice(&self) -> &[usize] {
        match self {
            Joiners::One(i) => std::slice::from_ref(i),
            Joiners::Many(v) => v,
        }
    }

    /// Adds app `i` in its place; true when it was not there.
    fn add(&mut self, i: usize) -> bool {
        let mut list = self.as_slice().to_vec();
        let Err(at) = list.binary_search(&i) else {
            return false;
        };
        list.insert(at, i);
        *self = Joiners::Many(list);
        true
    }

    /// Takes app `i` out; false when none is left.
    fn remove(&mut self, i: usize) -> bool {
        let list: Vec<usize> = self
            .as_slice()
            .iter()
            .copied()
            .filter(|&j| j != i)
            .collect();
        *self = match list.as_slice() {
            [] => return false,
            [one] => Joiners::One(*one),
            _ => Joiners::Many(list),
        };
        true
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
    fn whole(apps: &[Arc<AppResult>], opts: &Options, book: &mut NameBook) -> (Derived, Last) {
        let refs: Vec<&AppResult> = apps.iter().map(|a| &**a).collect();
        let (derived, placing) = merge_placing(&refs, opts, book);
        let mut last = Last {
            opts: opts.clone(),
            problems: derived.problems.clone(),
            placed: placing.apps,
            names_moving: placing.names_moving,
            named: placing.named,
            joins: HashMap::new(),
            task_addrs: HashMap::new(),
            declared: HashMap::new(),
            apps: Vec::new(),
            id_hashes: apps.iter().map(|a| id_hash(&a.id)).collect(),
        };
        for (i, app) in apps.iter().enumerate() {
            for &(_, vip) in &last.placed[i].joined {
                match last.joins.get_mut(&vip) {
                    Some(j) if j.as_slice().last() == Some(&i) => {}
                    Some(j) => {
                        j.add(i);
                    }
                    None => {
                        last.joins.insert(vip, Joiners::One(i));
                    }
                }
            }
            for ip in &app.task_addrs {
                count(&mut last.task_addrs, *ip, 1);
            }
            for ip in declared_ips(app) {
                count(&mut last.declared, ip, 1);
            }
        }
        last.apps = apps.to_vec();
        (derived, last)
    }

    /// Merges `apps` from this merge when that gives what a whole merge would: the services
    /// that changed. None (and nothing changed) when it cannot.
    fn update(
        &mut self,
        apps: &[Arc<AppResult>],
        opts: &Options,
    ) -> Option<Vec<(Vip, Option<ServiceSpec>)>> {
        if self.names_moving || self.opts != *opts || apps.len() != self.apps.len() {
            return None;
        }
        let mut changed = Vec::new();
        for (i, (old, new)) in self.apps.iter().zip(apps).enumerate() {
            if Arc::ptr_eq(old, new) || **old == **new {
                continue;
            }
            if old.id != new.id || has_named(old) || has_named(new) {
                return None;
            }
            changed.push(i);
        }
        // Past this, a whole merge costs about as much.
        if changed.len() > 64 + apps.len() / 16 {
            return None;
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
                return None;
            }
        }
        // From here on the merge is incremental.
        for (ip, d) in delta {
            count(&mut self.task_addrs, ip, d);
        }
        let mut touched: BTreeSet<Vip> = BTreeSet::new();
        let none = Assigned::default();
        // Whether an app that changed has or had problems: the others' stay as they were.
        let mut problems_moved = false;
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
                if let Some(j) = self.joins.get_mut(&vip)
                    && !j.remove(i)
                {
                    self.joins.remove(&vip);
                }
                touched.insert(vip);
            }
            for &(_, vip) in &placed.joined {
                match self.joins.get_mut(&vip) {
                    Some(j) => {
                        j.add(i);
                    }
                    None => {
                        self.joins.insert(vip, Joiners::One(i));
                    }
                }
                touched.insert(vip);
            }
            let has = |app: &AppResult, placed: &Placed| {
                !app.problems.is_empty() || !placed.problems.is_empty()
            };
            problems_moved |= has(&self.apps[i], &self.placed[i]) || has(&apps[i], &placed);
            self.placed[i] = placed;
            // The others are the same apps (ids and contents), kept as they are.
            self.apps[i] = apps[i].clone();
        }
        let mut services = Vec::with_capacity(touched.len());
        for vip in touched {
            let Some(list) = self.joins.get(&vip) else {
                services.push((vip, None));
                continue;
            };
            let mut built = Desired::new();
            for &j in list.as_slice() {
                let only = Placed {
                    joined: self.placed[j]
                        .joined
                        .iter()
                        .filter(|(_, v)| *v == vip)
                        .copied()
                        .collect(),
                    problems: Vec::new(),
                };
                join(&mut built, &self.apps[j], &only);
            }
            services.push((vip, built.remove(&vip)));
        }
        if problems_moved {
            self.problems = self
                .apps
                .iter()
                .zip(&self.placed)
                .flat_map(|(app, placed)| app.problems.iter().chain(&placed.problems))
                .cloned()
                .collect();
        }
        Some(services)
    }
}

/// What [`Last::id_hashes`] holds for an app id.
fn id_hash(id: &str) -> u64 {
    use std::hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(id)
}

#[cfg(test)]
#[path = "incremental_tests.rs"]
mod tests;
