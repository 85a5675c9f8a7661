//! Connected sockets whose backend left (issue 15, item 4). The kernel runs no cgroup program on
//! a connected socket's sends, so the local path cannot move a connected TCP or UDP socket to
//! another backend; left alone it keeps sending to an address that no longer serves. With
//! `--local-backend-gone end` (the default) the agent ends such sockets right after it removed
//! the backend from the service: the application gets ECONNABORTED at once and its next
//! connect() is given a live backend. `keep` leaves them as they are.
//!
//! Only sockets the local path connected are ever ended: a socket is ended when (1) its peer is
//! the backend that left, (2) the local path's reverse map (`lb_sockrv_v1`) holds an entry for
//! its cookie and that backend, written by the connect program, and (3) that entry names the VIP
//! of the service the backend left. A socket connected to the backend's own address (no VIP),
//! or by a process outside the served cgroup, has no such entry and is never touched.
//!
//! The sockets are found through sock_diag (`local_diag`) in every network namespace that a
//! process of the served cgroup tree is in, and ended with SOCK_DESTROY.
use super::{
    local_diag::{Diag, DiagSock},
    maps::{KernelState, words6},
    spec::open_map,
    writer::Applied,
};
use crate::error::{Error, Result};
use crate::model::{Proto, Vip};
use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};
use lb_common::{self as common, FlowEntry, ReplyEntry6, SockKey, SockStat};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// What the agent does with a connected socket of the local path whose backend left its service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendGone {
    /// End it (SOCK_DESTROY): the application sees ECONNABORTED and connects again.
    #[default]
    End,
    /// Leave it connected to the address that left (the application finds out by itself).
    Keep,
}

/// Watches the backends the services have, and ends the local path's connected sockets of each
/// that leaves (`BackendGone::End`).
pub struct GoneWatch {
    dir: PathBuf,
    cgroup: PathBuf,
    served: BTreeSet<(Vip, SocketAddr)>,
}

/// What one round of ending sockets did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Sockets ended.
    pub ended: u64,
    /// Network namespaces looked in.
    pub namespaces: usize,
    /// What could not be done, with why.
    pub failed: Vec<String>,
}

impl GoneWatch {
    /// A watch of the services in `state` (the writer's), or None when there is nothing to do:
    /// the local path is off (`cgroup` None) or the mode is `keep`.
    pub fn new(
        dir: &Path,
        cgroup: Option<&Path>,
        mode: BackendGone,
        state: &KernelState,
    ) -> Option<GoneWatch> {
        let cgroup = cgroup?;
        (mode == BackendGone::End).then(|| GoneWatch {
            dir: dir.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
            served: served(state),
        })
    }

    /// After the writer applied `applied`: ends the connected sockets of every backend that left
    /// its service (a backend that drains stays: its connections are kept by design), logs and
    /// counts them (`local_ended`).
    pub fn after(&mut self, applied: &Applied, state: &KernelState) {
        if applied.added.is_empty() && applied.changed.is_empty() && applied.removed.is_empty() {
            return;
        }
        let now = served(state);
        let gone: Vec<(Vip, SocketAddr)> = self.served.difference(&now).copied().collect();
        self.served = now;
        if gone.is_empty() {
            return;
        }
        let t = std::time::Instant::now();
        match end_sockets(&self.dir, &self.cgroup, &gone) {
            Ok(out) => {
                for f in &out.failed {
                    tracing::warn!(problem = %f, "a socket whose backend left could not be ended");
                }
                tracing::info!(
                    backends = gone.len(),
                    ended = out.ended,
                    namespaces = out.namespaces,
                    took_ms = t.elapsed().as_millis() as u64,
                    "ended the local path's connected sockets of backends that left (ECONNABORTED)"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "could not end the connected sockets of backends that left; they keep their backend")
            }
        }
    }
}

/// Every (service, backend) the services of `state` have, draining ones included.
fn served(state: &KernelState) -> BTreeSet<(Vip, SocketAddr)> {
    state
        .services
        .iter()
        .flat_map(|(vip, s)| s.backends.keys().map(move |b| (*vip, *b)))
        .collect()
}

/// An address as the local path's maps key it: (family, address words as in memory, port BE).
type Addr = (u8, [u32; 4], u16);

fn addr_key(a: SocketAddr) -> Addr {
    match a.ip() {
        IpAddr::V4(v4) => (
            common::SOCK_FAMILY_V4,
            [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            a.port().to_be(),
        ),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => addr_key(SocketAddr::new(v4.into(), a.port())),
            None => (common::SOCK_FAMILY_V6, words6(v6), a.port().to_be()),
        },
    }
}

/// The peer of a listed socket as the maps key it (an IPv4-mapped peer is an IPv4 one).
fn peer_key(s: &DiagSock) -> Addr {
    let mapped = s.dst[0] == 0 && s.dst[1] == 0 && s.dst[2] == u32::to_be(0x0000_ffff);
    if s.family == AF_INET as u8 || mapped {
        let a = if mapped { s.dst[3] } else { s.dst[0] };
        (common::SOCK_FAMILY_V4, [a, 0, 0, 0], s.dport)
    } else {
        (common::SOCK_FAMILY_V6, s.dst, s.dport)
    }
}

/// (protocol, backend) -> the VIPs (address words, port BE) it left.
type Left = BTreeMap<(u8, Addr), BTreeSet<([u32; 4], u16)>>;

const AF_INET: i32 = libc::AF_INET;
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE_WAIT: u32 = 8;

/// Ends the connected sockets of the local path whose (VIP, backend) is in `gone`, in every
/// network namespace of the processes of `cgroup`'s tree, with the maps pinned in `dir`.
pub fn end_sockets(dir: &Path, cgroup: &Path, gone: &[(Vip, SocketAddr)]) -> Result<Ended> {
    let mut wanted: Left = BTreeMap::new();
    for (vip, backend) in gone {
        let (_, v, port) = addr_key(vip.addr);
        wanted
            .entry((vip.proto.number(), addr_key(*backend)))
            .or_default()
            .insert((v, port));
    }
    let mut rev: HashMap<MapData, SockKey, ReplyEntry6> = open_map(dir, common::MAP_SOCK_REV)?;
    let mut fwd: HashMap<MapData, SockKey, FlowEntry> = open_map(dir, common::MAP_SOCK_FWD)?;
    let mut out = Ended::default();
    let protos: BTreeSet<u8> = wanted.keys().map(|(p, _)| *p).collect();
    for (ns, ns_file) in namespaces(cgroup)? {
        out.namespaces += 1;
        let mut diag = match Diag::open_in(&ns_file) {
            Ok(d) => d,
            Err(e) => {
                out.failed
                    .push(format!("{ns}: opening a sock_diag socket: {e}"));
                continue;
            }
        };
        for &proto in &protos {
            // A connected UDP socket is ESTABLISHED; a TCP one may still be connecting or have
            // its peer's FIN unread.
            let states = if proto == Proto::Udp.number() {
                1 << TCP_ESTABLISHED
            } else {
                (1 << TCP_ESTABLISHED) | (1 << TCP_SYN_SENT) | (1 << TCP_CLOSE_WAIT)
            };
            for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
                let socks = match diag.list(family, proto, states) {
                    Ok(s) => s,
                    Err(e) => {
                        out.failed.push(format!(
                            "{ns}: listing sockets (family {family}, protocol {proto}): {e}"
                        ));
                        continue;
                    }
                };
                for s in socks {
                    let (fam, addr, port) = peer_key(&s);
                    let Some(vips) = wanted.get(&(proto, (fam, addr, port))) else {
                        continue;
                    };
                    let key = SockKey {
                        cookie: s.cookie,
                        addr,
                        port,
                        family: fam,
                        proto,
                        _pad: 0,
                    };
                    // Only a socket the local path connected to this backend for a VIP it left.
                    let Ok(vip) = rev.get(&key, 0) else {
                        continue;
                    };
                    if !vips.contains(&(vip.vip_addr, vip.vip_port)) {
                        continue;
                    }
                    match diag.destroy(&s) {
                        Ok(()) => {
                            out.ended += 1;
                            tracing::debug!(cookie = s.cookie, proto, namespace = %ns, "ended a socket whose backend left");
                        }
                        // Closed meanwhile: nothing left to end.
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => {
                            out.failed.push(format!("{ns}: socket {}: {e}", s.cookie));
                            continue;
                        }
                    }
                    // Its entries go with it (a destroyed UDP socket is no longer connected, so
                    // the release program would not find them).
                    let _ = rev.remove(&key);
                    let _ = fwd.remove(&SockKey {
                        addr: vip.vip_addr,
                        port: vip.vip_port,
                        ..key
                    });
                }
            }
        }
    }
    if out.ended > 0 {
        count_ended(dir, out.ended)?;
    }
    Ok(out)
}

/// Adds `n` to the `local_ended` counter (the agent is its only writer: CPU 0's slot).
fn count_ended(dir: &Path, n: u64) -> Result<()> {
    let mut stats: PerCpuArray<MapData, u64> = open_map(dir, common::MAP_SOCK_STATS)?;
    let at = SockStat::Ended as u32;
    let mut values: Vec<u64> = stats
        .get(&at, 0)
        .map_err(|e| Error::map("reading the local path's counters", e))?
        .iter()
        .copied()
        .collect();
    if let Some(first) = values.first_mut() {
        *first += n;
    }
    let values =
        PerCpuValues::try_from(values).map_err(|e| Error::io("the local path's counters", e))?;
    stats
        .set(at, values, 0)
        .map_err(|e| Error::map("counting the ended sockets", e))
}

/// Bounds of the walk of the served cgroup tree.
const MAX_CGROUPS: usize = 100_000;
const MAX_PROCESSES: usize = 1_000_000;

/// One open /proc/PID/ns/net per network namespace the processes of `cgroup`'s tree are in,
/// with a name for the logs.
fn namespaces(cgroup: &Path) -> Result<Vec<(String, File)>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    let (mut walked, mut procs) = (0, 0);
    while let Some(dir) = dirs.pop() {
        walked += 1;
        if walked > MAX_CGROUPS {
            return Err(Error::Config(format!(
                "{}: more than {MAX_CGROUPS} cgroups below it",
                cgroup.display()
            )));
        }
        // A cgroup removed meanwhile is simply gone.
        let Ok(pids) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
            continue;
        };
        for pid in pids.split_whitespace() {
            procs += 1;
            if procs > MAX_PROCESSES {
                return Err(Error::Config(format!(
                    "{}: more than {MAX_PROCESSES} processes below it",
                    cgroup.display()
                )));
            }
            // A process that ended meanwhile has no namespace to look in.
            let Ok(f) = File::open(format!("/proc/{pid}/ns/net")) else {
                continue;
            };
            let Ok(m) = f.metadata() else { continue };
            if seen.insert((m.dev(), m.ino())) {
                out.push((format!("net:[{}] (pid {pid})", m.ino()), f));
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dataplane::KernelService;
    use crate::model::BackendState;

    fn vip(s: &str) -> Vip {
        Vip {
            addr: s.parse().unwrap(),
            proto: Proto::Tcp,
        }
    }

    fn state(backends: &[(&str, BackendState)]) -> KernelState {
        let mut s = KernelState::default();
        s.services.insert(
            vip("172.16.0.1:80"),
            KernelService {
                id: 0,
                table: lb_common::NO_TABLE,
                active: 0,
                backends: backends
                    .iter()
                    .enumerate()
                    .map(|(i, (a, st))| (a.parse().unwrap(), (i as u32, *st)))
                    .collect(),
                departures: 0,
            },
        );
        s
    }

    #[test]
    fn a_backend_that_leaves_is_gone_and_one_that_drains_is_not() {
        let before = served(&state(&[
            ("198.18.0.11:8080", BackendState::Active),
            ("198.18.0.12:8080", BackendState::Active),
        ]));
        let after = served(&state(&[
            ("198.18.0.11:8080", BackendState::Draining),
            ("198.18.0.13:8080", BackendState::Active),
        ]));
        let gone: Vec<_> = before.difference(&after).collect();
        assert_eq!(
            gone,
            [&(vip("172.16.0.1:80"), "198.18.0.12:8080".parse().unwrap())]
        );
    }

    #[test]
    fn peers_are_keyed_as_the_programs_key_them() {
        let v4 = addr_key("198.18.0.11:8080".parse().unwrap());
        assert_eq!(
            v4,
            (
                common::SOCK_FAMILY_V4,
                [u32::from_ne_bytes([198, 18, 0, 11]), 0, 0, 0],
                8080u16.to_be()
            )
        );
        // A v4-mapped address is its IPv4 one, as the programs see it.
        assert_eq!(addr_key("[::ffff:198.18.0.11]:8080".parse().unwrap()), v4);
        let v6 = addr_key("[2001:2::11]:8080".parse().unwrap());
        assert_eq!(v6.0, common::SOCK_FAMILY_V6);
        assert_eq!(v6.1[0], u32::from_ne_bytes([0x20, 0x01, 0, 2]));
    }
}
