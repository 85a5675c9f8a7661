//! Addresses of named VIPs that never move while their name lives.
//!
//! A name's first choice (its "home") is the pool address its FNV-1a hash points to; when that
//! address is held, the next free one is taken (linear probing) and the collision is reported.
//! Once given, an address stays with its name until no app carries the name any more: a name
//! that arrives later, whatever it sorts like, never takes an address that is held. The
//! assignments are kept in a [`NameBook`], which the agent stores in a file so that they
//! survive restarts. New names of one document are placed in the order their apps' configuration
//! last changed (as Marathon reports it), then by name, so agents that watched the same Marathon
//! history reach the same addresses.
use super::options::Cidr;
use crate::error::{Error, Result};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

/// The named VIPs' addresses, kept while their names live (and, with a file, across restarts).
#[derive(Debug, Default)]
pub struct NameBook {
    addrs: BTreeMap<String, Ipv4Addr>,
    path: Option<PathBuf>,
    dirty: bool,
}

/// A name that did not get its home address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collision {
    /// The name that moved on.
    pub name: String,
    /// The address its hash points to.
    pub home: IpAddr,
    /// The address it got instead.
    pub got: IpAddr,
}

/// What [`NameBook::assign`] gives.
#[derive(Debug, Default)]
pub struct Assigned {
    /// The address of every name that has one.
    pub addrs: BTreeMap<String, IpAddr>,
    /// Names placed in this call away from their home address.
    pub collisions: Vec<Collision>,
}

impl NameBook {
    /// A book kept in memory only (`lbctl render`, tests).
    pub fn in_memory() -> NameBook {
        NameBook::default()
    }

    /// The book stored at `path`: its assignments when the file exists, none when it does not.
    /// A file that cannot be read or is not a book is an error naming it.
    pub fn open(path: &Path) -> Result<NameBook> {
        let addrs = match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                Error::io(
                    format!(
                        "reading the named-VIP assignments in {} (remove the file to let names get new addresses)",
                        path.display()
                    ),
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(Error::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(NameBook {
            addrs,
            path: Some(path.to_path_buf()),
            dirty: false,
        })
    }

    /// The assignments, by name.
    pub fn addrs(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.addrs
    }

    /// Gives every name of `wanted` (name, when its app's configuration last changed) an
    /// address of `pool`, a new name never one of `taken`: names already in the book keep theirs; the
    /// others are placed by (time, name), a missing time last. Names not wanted any more leave
    /// the book, freeing their addresses. A name the full pool cannot hold gets none.
    pub fn assign(
        &mut self,
        wanted: &BTreeMap<String, Option<String>>,
        taken: &BTreeSet<IpAddr>,
        pool: Cidr,
    ) -> Assigned {
        self.assign_with(wanted, &|ip| taken.contains(&ip), pool)
    }

    /// [`NameBook::assign`] with the addresses a new name may not take given by `taken`, asked
    /// only when a name needs an address.
    pub fn assign_with(
        &mut self,
        wanted: &BTreeMap<String, Option<String>>,
        taken: &dyn Fn(IpAddr) -> bool,
        pool: Cidr,
    ) -> Assigned {
        let mut out = Assigned::default();
        let before = self.addrs.len();
        // A held address stays even when a task or the host now has it too: the VIP is then
        // refused (see `merge_with`), but the name does not move.
        self.addrs
            .retain(|name, ip| wanted.contains_key(name) && pool.contains(IpAddr::V4(*ip)));
        self.dirty |= self.addrs.len() != before;
        let Some((base, usable)) = pool_range(pool) else {
            return out;
        };
        let mut used: BTreeSet<u32> = self.addrs.values().map(|ip| u32::from(*ip)).collect();
        let mut new: Vec<(Option<&String>, &String)> = wanted
            .iter()
            .filter(|(name, _)| !self.addrs.contains_key(*name))
            .map(|(name, since)| (since.as_ref(), name))
            .collect();
        // Times first (a missing one last), then names.
        new.sort_by(|a, b| (a.0.is_none(), a.0, a.1).cmp(&(b.0.is_none(), b.0, b.1)));
        for (_, name) in new {
            let hash = fnv1a(name);
            let home = base + 1 + (hash % usable) as u32;
            for probe in 0..usable.min(1 << 20) {
                let ip = base + 1 + ((hash + probe) % usable) as u32;
                if !taken(IpAddr::V4(Ipv4Addr::from(ip))) && used.insert(ip) {
                    self.addrs.insert(name.clone(), Ipv4Addr::from(ip));
                    self.dirty = true;
                    if ip != home {
                        out.collisions.push(Collision {
                            name: name.clone(),
                            home: IpAddr::V4(Ipv4Addr::from(home)),
                            got: IpAddr::V4(Ipv4Addr::from(ip)),
                        });
                    }
                    break;
                }
            }
        }
        out.addrs = self
            .addrs
            .iter()
            .map(|(n, ip)| (n.clone(), IpAddr::V4(*ip)))
            .collect();
        out
    }

    /// Writes the book to its file when it changed (write, then rename: never half a file).
    pub fn save(&mut self) -> Result<()> {
        let Some(path) = self.path.as_ref().filter(|_| self.dirty) else {
            return Ok(());
        };
        let what = || format!("storing the named-VIP assignments in {}", path.display());
        let text = serde_json::to_string_pretty(&self.addrs)
            .map_err(|e| Error::io(what(), std::io::Error::other(e)))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| Error::io(what(), e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(what(), e))?;
        self.dirty = false;
        Ok(())
    }
}

/// Where the agent whose status socket is `status_socket` keeps its book: beside the socket,
/// named after it (`/run/lb/agent.sock` keeps `/run/lb/agent.named-vips.json`).
pub fn book_path(status_socket: &Path) -> PathBuf {
    status_socket.with_extension("named-vips.json")
}

/// The pool's first address and its number of usable addresses (network and broadcast
/// skipped), or None for a pool that is not IPv4 or too small.
fn pool_range(pool: Cidr) -> Option<(u32, u64)> {
    let IpAddr::V4(base) = pool.addr else {
        return None;
    };
    let host_bits = 32 - pool.len as u32;
    if host_bits < 2 {
        return None;
    }
    let base = u32::from(base) & (u32::MAX.checked_shl(host_bits).unwrap_or(0));
    Some((base, (1u64 << host_bits) - 2))
}

/// The 64-bit FNV-1a hash of `name`.
fn fnv1a(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A tiny xorshift64 generator: the same sequence from the same seed.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// 1,000 names added and removed in random orders, with a pool small enough that they
    /// collide often, the book stored and reopened between documents: no living name's address
    /// ever changes, no two living names share one, and each stays in the pool.
    #[test]
    fn a_living_name_never_moves() {
        let dir = std::env::temp_dir().join(format!("lbctl-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("named-vips.json");
        let _ = std::fs::remove_file(&path);
        let pool: Cidr = "11.0.0.0/21".parse().unwrap(); // 2,046 addresses for 1,000 names
        let all: Vec<String> = (0..1000)
            .map(|i| format!("app-{i}.marathon.l4lb.thisdcos.directory"))
            .collect();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut living: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut seen: BTreeMap<String, IpAddr> = BTreeMap::new();
        let (mut collisions, mut moves_checked) = (0, 0);
        let mut book = NameBook::open(&path).unwrap();
        for round in 0..400 {
            // Add a few, remove a few, in random order; sometimes restart (reopen the file).
            for _ in 0..rng.below(12) {
                let n = &all[rng.below(all.len())];
                let since = format!("2026-01-01T00:{:02}:00Z", rng.below(60));
                living.entry(n.clone()).or_insert(Some(since));
            }
            for _ in 0..rng.below(8) {
                if living.is_empty() {
                    break;
                }
                let k = living.keys().nth(rng.below(living.len())).unwrap().clone();
                living.remove(&k);
                seen.remove(&k);
            }
            if round % 7 == 0 {
                book.save().unwrap();
                book = NameBook::open(&path).unwrap();
            }
            let got = book.assign(&living, &BTreeSet::new(), pool);
            collisions += got.collisions.len();
            assert_eq!(got.addrs.len(), living.len(), "round {round}");
            let distinct: BTreeSet<&IpAddr> = got.addrs.values().collect();
            assert_eq!(
                distinct.len(),
                got.addrs.len(),
                "round {round}: two names share an address"
            );
            for (name, ip) in &got.addrs {
                assert!(pool.contains(*ip));
                if let Some(before) = seen.insert(name.clone(), *ip) {
                    assert_eq!(before, *ip, "round {round}: {name} moved");
                    moves_checked += 1;
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            collisions >= 20,
            "only {collisions} collisions: the test proves little"
        );
        assert!(moves_checked >= 10_000, "only {moves_checked} checks");
    }

    /// The case of the issue: a name that sorts earlier arrives on a held address. Without the
    /// book (names placed in name order) the held name would move; with it, the newcomer moves.
    #[test]
    fn a_newcomer_that_sorts_earlier_does_not_take_a_held_address() {
        let pool: Cidr = "11.0.0.0/30".parse().unwrap(); // two usable addresses
        // Find two names with the same home address, the later one sorting first.
        let home = |n: &str| 1 + fnv1a(n) % 2;
        let late = "zz".to_string();
        let early = (0..100)
            .map(|i| format!("a{i}"))
            .find(|n| home(n) == home(&late))
            .unwrap();
        let mut book = NameBook::in_memory();
        let first = book.assign(
            &BTreeMap::from([(late.clone(), None)]),
            &BTreeSet::new(),
            pool,
        );
        let held = first.addrs[&late];
        let both = BTreeMap::from([(late.clone(), None), (early.clone(), None)]);
        let second = book.assign(&both, &BTreeSet::new(), pool);
        assert_eq!(second.addrs[&late], held);
        assert_ne!(second.addrs[&early], held);
        assert_eq!(second.collisions.len(), 1);
        assert_eq!(second.collisions[0].name, early);
        assert_eq!(second.collisions[0].home, held);
        // Names new in one document go by time, not by name.
        let mut fresh = NameBook::in_memory();
        let timed = BTreeMap::from([
            (late.clone(), Some("2026-01-01T00:00:00Z".to_string())),
            (early.clone(), Some("2026-02-01T00:00:00Z".to_string())),
        ]);
        assert_eq!(
            fresh.assign(&timed, &BTreeSet::new(), pool).addrs[&late],
            held
        );
    }

    /// Two agents: one watched names arrive one document at a time (each with the time its app
    /// took the label), the other starts fresh on the last document. In a pool small enough for
    /// collisions, both reach the same addresses.
    #[test]
    fn agents_with_the_same_history_agree() {
        let pool: Cidr = "11.0.0.0/24".parse().unwrap();
        let mut rng = XorShift(42);
        let mut watcher = NameBook::in_memory();
        let mut wanted = BTreeMap::new();
        let mut collisions = 0;
        for minute in 0..200 {
            let name = format!("svc-{}", rng.next() % 100_000);
            wanted.entry(name).or_insert(Some(format!(
                "2026-01-01T{:02}:{:02}:00Z",
                minute / 60,
                minute % 60
            )));
            collisions += watcher
                .assign(&wanted, &BTreeSet::new(), pool)
                .collisions
                .len();
        }
        let fresh = NameBook::in_memory().assign(&wanted, &BTreeSet::new(), pool);
        assert_eq!(
            fresh.addrs,
            watcher.assign(&wanted, &BTreeSet::new(), pool).addrs
        );
        assert!(collisions >= 10, "only {collisions} collisions");
    }

    #[test]
    fn a_book_that_is_not_one_is_an_error_naming_the_file() {
        let path =
            std::env::temp_dir().join(format!("lbctl-names-bad-{}.json", std::process::id()));
        std::fs::write(&path, "not json").unwrap();
        let e = NameBook::open(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("remove the file"),
            "{e}"
        );
    }
}
