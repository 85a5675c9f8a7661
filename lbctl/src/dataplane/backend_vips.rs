//! Each backend's VIPs (`lb_bevip_v1`, `lb_bevip6_v1`): what lets a flow keep one entry. A new
//! flow whose backend serves its VIP and no other VIP of its protocol (the usual case) takes no
//! reverse entry; the backend's replies find the flow's own entry through the VIP named here.
//!
//! The record must never leave out a VIP a backend serves while the programs use it: a flow to
//! that other VIP and a lean flow could then share the backend's side of a connection unseen.
//! So the writer adds a VIP before the membership that makes the backend serve it, and the
//! loader adds every VIP of the pinned memberships before any program runs (an older agent
//! writes memberships without it). A VIP stays in the record `Writer`'s grace after the backend
//! stopped serving it, so that the replies of its lean flows still come from the VIP, as a
//! reverse entry would make them; a VIP recorded that the backend no longer serves only makes
//! its new flows keep reverse entries.
use super::{
    maps::{KernelState, Key, words6},
    spec::open_map,
};
use crate::{
    error::{Error, Result},
    model::{Proto, Vip},
};
use aya::maps::{HashMap, IterableMap, MapData};
use lb_common::{
    self as common, BACKEND_VIPS, BackendKey, BackendKey6, BackendVips, BackendVips6, VipKey,
    VipKey6,
};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::Path,
};

/// A backend's entry of the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The backend's slot.
    pub id: u32,
    /// The VIPs it serves, or served lately.
    pub vips: BTreeSet<Vip>,
    /// No lean flow to a VIP that shares it with another of its protocol can hold it
    /// (`lb_common::BACKEND_NO_LEAN`). False unless known; it holds for a backend of one VIP
    /// a protocol too, as the writer's memory of whether it may later say so.
    pub no_lean: bool,
}

/// What the record holds or should hold, by backend.
pub(super) type Served = BTreeMap<SocketAddr, Record>;

/// The backends' VIPs in `state`: every backend that is a member of a service (draining
/// included), with its id and the VIPs of those services.
pub(super) fn served(state: &KernelState) -> Served {
    let mut out = Served::new();
    for (vip, svc) in &state.services {
        for (addr, (id, _)) in &svc.backends {
            out.entry(*addr)
                .or_insert_with(|| Record {
                    id: *id,
                    vips: BTreeSet::new(),
                    no_lean: false,
                })
                .vips
                .insert(*vip);
        }
    }
    out
}

/// A backend's entry as the maps key and hold it.
type Entry = super::sys::Family<BackendKey, BackendVips, BackendKey6, BackendVips6>;

/// The entry of record `rec` of the backend `addr` (the first `BACKEND_VIPS` VIPs named, all
/// counted; a VIP of the other family, which no service can give a backend, is left out).
/// `no_lean` is written only for a backend that serves several VIPs of a protocol, the only
/// one the programs ask about: a backend of one VIP a protocol reads the same to programs that
/// know no such bit.
fn entry(addr: SocketAddr, rec: &Record) -> Entry {
    let keys = rec.vips.iter().map(Key::of);
    let shares = [Proto::Tcp, Proto::Udp]
        .into_iter()
        .any(|p| rec.vips.iter().filter(|v| v.proto == p).nth(1).is_some());
    let flag = if rec.no_lean && shares {
        common::BACKEND_NO_LEAN
    } else {
        0
    };
    let count = rec.vips.len() as u32 | flag;
    let id = rec.id;
    match addr {
        SocketAddr::V4(a) => {
            let mut named = keys.filter_map(|k| match k {
                Key::V4(k) => Some(k),
                Key::V6(_) => None,
            });
            let none = VipKey {
                addr: 0,
                port: 0,
                proto: 0,
                _pad: 0,
            };
            let vips = std::array::from_fn(|_| named.next().unwrap_or(none));
            Entry::V4(key4(a), BackendVips { id, count, vips })
        }
        SocketAddr::V6(a) => {
            let mut named = keys.filter_map(|k| match k {
                Key::V6(k) => Some(k),
                Key::V4(_) => None,
            });
            let none = VipKey6 {
                addr: [0; 4],
                port: 0,
                proto: 0,
                _pad: 0,
            };
            let vips = std::array::from_fn(|_| named.next().unwrap_or(none));
            Entry::V6(key6(a), BackendVips6 { id, count, vips })
        }
    }
}

fn key4(a: SocketAddrV4) -> BackendKey {
    BackendKey {
        addr: u32::from(*a.ip()).to_be(),
        port: a.port().to_be(),
        _pad: 0,
    }
}

fn key6(a: SocketAddrV6) -> BackendKey6 {
    BackendKey6 {
        addr: words6(*a.ip()),
        port: a.port().to_be(),
        _pad: 0,
    }
}

/// The record an entry holds (naming only the first `BACKEND_VIPS` VIPs of a backend that
/// serves more).
fn record<K: Copy>(
    id: u32,
    count: u32,
    vips: &[K; BACKEND_VIPS],
    key: impl Fn(K) -> Key,
) -> Record {
    let served = count & !common::BACKEND_NO_LEAN;
    Record {
        id,
        vips: vips
            .iter()
            .take(served as usize)
            .filter_map(|k| key(*k).vip())
            .collect(),
        no_lean: count & common::BACKEND_NO_LEAN != 0,
    }
}

/// The two maps, opened from their pins.
pub(super) struct BackendVipMaps {
    v4: HashMap<MapData, BackendKey, BackendVips>,
    v6: HashMap<MapData, BackendKey6, BackendVips6>,
}

impl BackendVipMaps {
    /// The maps pinned in `dir`; None for a data plane loaded from an object without them.
    pub(super) fn open(dir: &Path) -> Result<Option<BackendVipMaps>> {
        if !dir.join(common::MAP_BACKEND_VIPS).exists() {
            return Ok(None);
        }
        Ok(Some(BackendVipMaps {
            v4: open_map(dir, common::MAP_BACKEND_VIPS)?,
            v6: open_map(dir, common::MAP_BACKEND_VIPS6)?,
        }))
    }

    /// Writes the backend `addr`'s record `rec`; no VIPs: removes its entry.
    pub(super) fn set(&mut self, addr: SocketAddr, rec: &Record) -> Result<()> {
        let written = match (entry(addr, rec), rec.vips.is_empty()) {
            (Entry::V4(k, _), true) => return forget(&mut self.v4, &k, common::MAP_BACKEND_VIPS),
            (Entry::V6(k, _), true) => return forget(&mut self.v6, &k, common::MAP_BACKEND_VIPS6),
            (Entry::V4(k, v), false) => (self.v4.insert(k, v, 0), common::MAP_BACKEND_VIPS),
            (Entry::V6(k, v), false) => (self.v6.insert(k, v, 0), common::MAP_BACKEND_VIPS6),
        };
        match written {
            (Ok(()), _) => Ok(()),
            (Err(e), name) => Err(Error::map(format!("writing {name}"), e)),
        }
    }

    /// Writes records, as `set` one after the other: each run of one family in one write
    /// when none is empty (an empty one is a removal), else one at a time. Says how many were
    /// written before one failed.
    pub(super) fn set_many(&mut self, records: &[(SocketAddr, &Record)]) -> (usize, Result<()>) {
        if records.iter().any(|(_, rec)| rec.vips.is_empty()) {
            return super::writer::one_by_one(records, |(addr, rec)| self.set(*addr, rec));
        }
        let entries: Vec<Entry> = records.iter().map(|(a, rec)| entry(*a, rec)).collect();
        match super::sys::update_by_family(
            IterableMap::map(&self.v4),
            IterableMap::map(&self.v6),
            &entries,
        ) {
            Ok(()) => (records.len(), Ok(())),
            Err((n, e)) => (n, Err(Error::io("writing the backends' records", e))),
        }
    }

    /// What the maps hold.
    pub(super) fn read(&self) -> Result<Served> {
        let mut out = Served::new();
        for item in self.v4.iter() {
            let (k, v) =
                item.map_err(|e| Error::map(format!("reading {}", common::MAP_BACKEND_VIPS), e))?;
            let ip = Ipv4Addr::from(u32::from_be(k.addr));
            let addr = SocketAddr::new(ip.into(), u16::from_be(k.port));
            out.insert(addr, record(v.id, v.count, &v.vips, Key::V4));
        }
        for item in self.v6.iter() {
            let (k, v) =
                item.map_err(|e| Error::map(format!("reading {}", common::MAP_BACKEND_VIPS6), e))?;
            let ip = super::maps::addr6(k.addr);
            let addr = SocketAddr::new(ip.into(), u16::from_be(k.port));
            out.insert(addr, record(v.id, v.count, &v.vips, Key::V6));
        }
        Ok(out)
    }

    /// Adds to the maps every VIP of `want` they lack (under `want`'s slot), keeping the VIPs
    /// they hold besides. Returns what they hold then, and how many entries were written. An
    /// entry written does not say `no_lean`: the programs may have served those memberships
    /// already without it.
    pub(super) fn ensure(&mut self, want: &Served) -> Result<(Served, usize)> {
        let mut held = self.read()?;
        let mut written = 0;
        for (addr, w) in want {
            let had = held.get(addr);
            if had.is_some_and(|h| h.id == w.id && h.vips.is_superset(&w.vips)) {
                continue;
            }
            let mut vips = had.map(|h| h.vips.clone()).unwrap_or_default();
            vips.extend(w.vips.iter().copied());
            let all = Record {
                id: w.id,
                vips,
                no_lean: false,
            };
            if self.set(*addr, &all).is_err() {
                // A full map: the records of backends that serve nothing go first.
                self.drop_all_but(want, &mut held)?;
                self.set(*addr, &all)?;
            }
            held.insert(*addr, all);
            written += 1;
        }
        Ok((held, written))
    }

    /// Removes the records of the backends `want` does not name (from `held` too).
    fn drop_all_but(&mut self, want: &Served, held: &mut Served) -> Result<()> {
        let stale: Vec<SocketAddr> = held
            .keys()
            .filter(|a| !want.contains_key(*a))
            .copied()
            .collect();
        tracing::warn!(
            records = stale.len(),
            "backends' records full: those of backends that serve nothing are removed"
        );
        for addr in stale {
            self.set(addr, &Record::none())?;
            held.remove(&addr);
        }
        Ok(())
    }
}

impl Record {
    /// A record naming nothing: writing it removes the backend's entry.
    fn none() -> Record {
        Record {
            id: 0,
            vips: BTreeSet::new(),
            no_lean: false,
        }
    }
}

/// Removes `key` from `map` (named `name`); a key that is not there is not an error.
fn forget<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &str,
) -> Result<()> {
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(Error::map(format!("removing from {name}"), e)),
    }
}

/// Adds to the pinned record in `dir` every VIP of the pinned memberships it lacks: called by
/// the loader before any program runs. Returns how many entries it wrote.
pub(super) fn sync_pinned(dir: &Path) -> Result<usize> {
    let Some(mut maps) = BackendVipMaps::open(dir)? else {
        return Ok(0);
    };
    let state = super::maps::Maps::open(dir)?.read()?;
    Ok(maps.ensure(&served(&state))?.1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vip(s: &str, proto: Proto) -> Vip {
        Vip {
            addr: s.parse().unwrap(),
            proto,
        }
    }

    fn rec(id: u32, vips: &[Vip], no_lean: bool) -> Record {
        Record {
            id,
            vips: vips.iter().copied().collect(),
            no_lean,
        }
    }

    #[test]
    fn an_entry_names_four_vips_and_counts_them_all() {
        let b: SocketAddr = "198.18.1.2:31000".parse().unwrap();
        let vips: Vec<Vip> = (1..=5)
            .map(|i| vip(&format!("172.16.0.{i}:80"), Proto::Tcp))
            .collect();
        let Entry::V4(key, value) = entry(b, &rec(7, &vips, false)) else {
            panic!("an IPv4 backend's entry");
        };
        assert_eq!(
            (key.addr, key.port),
            (
                u32::from_be_bytes([198, 18, 1, 2]).to_be(),
                31000u16.to_be()
            )
        );
        assert_eq!((value.id, value.count, value.served()), (7, 5, 5));
        let back = record(value.id, value.count, &value.vips, Key::V4);
        assert_eq!(back, rec(7, &vips[..4], false));
        // More VIPs than it names: no VIP is its only one.
        assert_eq!(value.single(Proto::Tcp.number()), None);
        let first = match Key::of(&vips[0]) {
            Key::V4(k) => k,
            Key::V6(_) => unreachable!(),
        };
        assert!(!value.sole(&first));
    }

    #[test]
    fn no_lean_is_a_bit_of_the_count_and_reads_back() {
        let b: SocketAddr = "198.18.1.2:31000".parse().unwrap();
        let vips = [
            vip("172.16.0.1:80", Proto::Tcp),
            vip("172.16.0.2:80", Proto::Tcp),
        ];
        let Entry::V4(_, value) = entry(b, &rec(9, &vips, true)) else {
            panic!("an IPv4 backend's entry");
        };
        assert_eq!(value.count, 2 | common::BACKEND_NO_LEAN);
        assert!(value.no_lean());
        assert_eq!(value.served(), 2);
        assert_eq!(
            record(value.id, value.count, &value.vips, Key::V4),
            rec(9, &vips, true)
        );
    }

    #[test]
    fn a_backend_of_one_vip_a_protocol_is_that_vips_alone() {
        let b: SocketAddr = "[2001:2::1:2]:31000".parse().unwrap();
        let tcp = vip("[fd00:172:16::1]:80", Proto::Tcp);
        let udp = vip("[fd00:172:16::1]:53", Proto::Udp);
        let Entry::V6(_, value) = entry(b, &rec(3, &[tcp, udp], false)) else {
            panic!("an IPv6 backend's entry");
        };
        let key = |v: &Vip| match Key::of(v) {
            Key::V6(k) => k,
            Key::V4(_) => unreachable!(),
        };
        assert_eq!(value.single(Proto::Tcp.number()), Some(key(&tcp)));
        assert_eq!(value.single(Proto::Udp.number()), Some(key(&udp)));
        assert!(value.sole(&key(&tcp)) && value.sole(&key(&udp)));
        assert!(!value.sole(&key(&vip("[fd00:172:16::2]:80", Proto::Tcp))));
        // And no program is told about lean flows it would not ask about.
        let Entry::V6(_, value) = entry(b, &rec(3, &[tcp, udp], true)) else {
            panic!("an IPv6 backend's entry");
        };
        assert_eq!(value.count, 2, "one VIP a protocol: no BACKEND_NO_LEAN");
        let other = vip("[fd00:172:16::2]:80", Proto::Tcp);
        let Entry::V6(_, value) = entry(b, &rec(3, &[tcp, other], true)) else {
            panic!("an IPv6 backend's entry");
        };
        assert_eq!(value.single(Proto::Tcp.number()), None, "two TCP VIPs");
        assert!(!value.sole(&key(&tcp)) && !value.sole(&key(&other)));
        assert!(value.no_lean());
    }
}
