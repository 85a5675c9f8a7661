//! The local path (socket-level load balancing): the cgroup `sock_addr` programs of the BPF
//! object attached to a cgroup v2 directory through pinned bpf links (`link_sock_<program>`), as
//! the XDP program is attached to interfaces: a link already pinned for the same cgroup is
//! updated in place to run the new program (adopted, never unattached), a link pinned for another
//! cgroup (or not asked for any more) is detached, and `down` detaches them all.
use super::{
    load::{Programs, load_programs},
    local_sys,
    maps::words6,
    pins::{detach_local, sock_link_path, sock_links, unpin_link},
    sizing::TableConfig,
};
use crate::error::{Error, Result};
use crate::model::Vip;
use aya::programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, links::FdLink};
use lb_common as common;
use serde::{Deserialize, Serialize};
use std::{
    net::{IpAddr, SocketAddr},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// What `attach_local` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalAttached {
    /// The cgroup the programs are attached to (None: the local path is off).
    pub cgroup: Option<PathBuf>,
    /// Programs whose pinned link now runs the new program (adopted, hitless).
    pub replaced: Vec<String>,
    /// Programs attached for the first time.
    pub attached: Vec<String>,
    /// Links detached: pinned for another cgroup, or the local path is off now.
    pub detached: Vec<String>,
}

/// The root of the cgroup v2 hierarchy in `mounts` (the text of /proc/self/mounts): the first
/// `cgroup2` mount. Hybrid hosts mount it at /sys/fs/cgroup/unified, unified ones at
/// /sys/fs/cgroup.
pub fn cgroup2_root_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, kind) = (fields.next()?, fields.next()?, fields.next()?);
        // /proc/self/mounts writes a space in a path as \040.
        (kind == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// The root of this machine's cgroup v2 hierarchy, from /proc/self/mounts.
pub fn default_cgroup() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| Error::io("reading /proc/self/mounts", e))?;
    cgroup2_root_in(&mounts).ok_or_else(|| {
        Error::Config(
            "--local: no cgroup2 file system is mounted (see /proc/self/mounts); mount one or give --cgroup".into(),
        )
    })
}

/// Refuses a `--cgroup` that is not a directory of the cgroup v2 hierarchy.
pub fn check_cgroup(cgroup: &Path) -> Result<()> {
    if cgroup.join("cgroup.controllers").is_file() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "--cgroup {}: not a cgroup v2 directory (it has no cgroup.controllers); give a directory under the cgroup2 mount (see /proc/self/mounts)",
        cgroup.display()
    )))
}

/// Where the local path is attached, as the kernel says: the cgroup id (inode of the cgroup
/// directory) of each pinned link. Empty when the local path is off.
pub fn local_state(dir: &Path) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for (program, path) in sock_links(dir)? {
        let fd = local_sys::open_pin(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let link = local_sys::cgroup_link(fd.as_fd())
            .map_err(|e| Error::io(format!("reading the link {}", path.display()), e))?;
        out.push((program, link.cgroup_id));
    }
    Ok(out)
}

/// Attaches the cgroup programs to `cgroup` (None: detaches them), with the maps pinned in
/// `dir` (the data plane `attach` loaded). A link pinned for the same cgroup is updated in
/// place; one pinned for another cgroup is detached first.
pub fn attach_local(
    dir: &Path,
    cgroup: Option<&Path>,
    table: &TableConfig,
) -> Result<LocalAttached> {
    let Some(cgroup) = cgroup else {
        return Ok(LocalAttached {
            detached: detach_local(dir)?,
            ..LocalAttached::default()
        });
    };
    check_cgroup(cgroup)?;
    let dir_file = std::fs::File::open(cgroup)
        .map_err(|e| Error::io(format!("opening the cgroup {}", cgroup.display()), e))?;
    let cgroup_id = dir_file
        .metadata()
        .map_err(|e| Error::io(format!("reading the cgroup {}", cgroup.display()), e))?
        .ino();
    // The maps, and none of the packet programs: only the cgroup programs below are loaded.
    let mut ebpf = load_programs(dir, table, Programs::NONE)?;
    let mut out = LocalAttached {
        cgroup: Some(cgroup.to_path_buf()),
        ..LocalAttached::default()
    };
    let at = Target {
        dir,
        cgroup,
        file: &dir_file,
        id: cgroup_id,
    };
    for name in common::PROG_SOCK {
        let step = attach_one!(ebpf, CgroupSockAddr, name, at);
        out.record(name, step?);
    }
    let step = attach_one!(ebpf, CgroupSock, common::PROG_SOCK_RELEASE, at);
    out.record(common::PROG_SOCK_RELEASE, step?);
    Ok(out)
}

/// Where `attach_one!` attaches.
struct Target<'a> {
    dir: &'a Path,
    cgroup: &'a Path,
    file: &'a std::fs::File,
    id: u64,
}

/// What `attach_one!` did with a program's link.
enum Step {
    /// The pinned link (of the same cgroup) runs the new program.
    Replaced,
    /// Attached through a new pinned link.
    Attached,
    /// The pinned link was for another cgroup: detached, then attached here.
    Moved,
}

impl LocalAttached {
    fn record(&mut self, name: &str, step: Step) {
        let name = name.to_string();
        match step {
            Step::Replaced => self.replaced.push(name),
            Step::Attached => self.attached.push(name),
            Step::Moved => {
                self.detached.push(name.clone());
                self.attached.push(name);
            }
        }
    }
}

/// Loads program `$name` of `$ebpf` (a `$ty`: the cgroup program types share these methods but
/// no trait) and attaches it to the target's cgroup through its pinned link: updated in place
/// when pinned for the same cgroup, else (re)attached and pinned. A `Result<Step>`.
macro_rules! attach_one {
    ($ebpf:expr, $ty:ty, $name:expr, $at:expr) => {
        (|| -> Result<Step> {
            let (name, at) = ($name, &$at);
            let prog: &mut $ty = $ebpf
                .program_mut(name)
                .ok_or_else(|| {
                    Error::program(
                        format!("finding the cgroup program {name}"),
                        aya::programs::ProgramError::NotLoaded,
                    )
                })?
                .try_into()
                .map_err(|e| Error::program(format!("the cgroup program {name}"), e))?;
            prog.load()
                .map_err(|e| Error::program(format!("loading the cgroup program {name}"), e))?;
            let path = sock_link_path(at.dir, name);
            let mut step = Step::Attached;
            if path.exists() {
                let link = local_sys::open_pin(&path)
                    .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
                let info = local_sys::cgroup_link(link.as_fd())
                    .map_err(|e| Error::io(format!("reading the link {}", path.display()), e))?;
                if info.cgroup_id == at.id {
                    let fd = prog
                        .fd()
                        .map_err(|e| Error::program(format!("the cgroup program {name}"), e))?;
                    local_sys::link_update(link.as_fd(), fd.as_fd()).map_err(|e| {
                        Error::io(format!("replacing the program of {}", path.display()), e)
                    })?;
                    return Ok(Step::Replaced);
                }
                drop(link);
                unpin_link(&path)?;
                step = Step::Moved;
            }
            // A bpf link to a cgroup takes no attach flags ("single"); links coexist with any
            // other program attached to the same cgroup all the same.
            let id = prog
                .attach(at.file, CgroupAttachMode::Single)
                .map_err(|e| {
                    Error::program(format!("attaching {name} to {}", at.cgroup.display()), e)
                })?;
            let link = prog
                .take_link(id)
                .map_err(|e| Error::program(format!("taking the link of {name}"), e))?;
            let fd: FdLink = link.try_into().map_err(|e| Error::Link {
                what: format!("the link of {name} is not a bpf link"),
                source: e,
            })?;
            fd.pin(&path).map_err(|e| Error::Pin {
                what: format!("pinning the link of {name} at {}", path.display()),
                source: e,
            })?;
            Ok(step)
        })()
    };
}
use attach_one;

/// The VIP as the local path's programs see it: an IPv4-mapped IPv6 VIP is its IPv4 one.
pub fn local_vip(vip: &Vip) -> Vip {
    match vip.addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => Vip {
                addr: SocketAddr::new(v4.into(), a.port()),
                proto: vip.proto,
            },
            None => *vip,
        },
        SocketAddr::V4(_) => *vip,
    }
}

/// The table slot hash the local path computes for a socket with `cookie` asking for `vip`
/// (`lb_common::sock_hash`, fed as the programs feed it).
pub fn local_hash(vip: &Vip, cookie: u64) -> u32 {
    let vip = local_vip(vip);
    let addr = match vip.addr.ip() {
        IpAddr::V4(a) => [u32::from(a).to_be(), 0, 0, 0],
        IpAddr::V6(a) => words6(a),
    };
    common::sock_hash(cookie, &addr, vip.addr.port().to_be(), vip.proto.number())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_v4_mapped_vip_is_its_ipv4_vip() {
        let v4 = Vip {
            addr: "172.16.0.1:80".parse().unwrap(),
            proto: crate::model::Proto::Tcp,
        };
        let mapped = Vip {
            addr: "[::ffff:172.16.0.1]:80".parse().unwrap(),
            proto: crate::model::Proto::Tcp,
        };
        assert_eq!(local_vip(&mapped), v4);
        assert_eq!(local_hash(&mapped, 7), local_hash(&v4, 7));
        // As the program feeds it: address and port as in memory (BE), the rest zero.
        assert_eq!(
            local_hash(&v4, 7),
            common::sock_hash(
                7,
                &[u32::from_ne_bytes([172, 16, 0, 1]), 0, 0, 0],
                80u16.to_be(),
                6
            )
        );
    }

    #[test]
    fn the_cgroup2_root_is_found_on_hybrid_and_unified_hosts() {
        let hybrid = "sysfs /sys sysfs rw 0 0\n\
            tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n\
            cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n";
        assert_eq!(
            cgroup2_root_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_root_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_root_in("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
        assert_eq!(
            cgroup2_root_in("none /a\\040b cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/a b"))
        );
    }
}
