//! The kernel side as user space sees it: loading and attaching the XDP program, the pinned maps,
//! reading what they hold, and writing the difference between what they hold and what is wanted.
use crate::{
    error::{Error, Result},
    maglev,
    model::{BackendState, Desired, Proto, Vip},
};
use aya::{
    EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    self as common, BACKEND_LIVE, Backend, Flow, FlowEntry, MEMBER_ACTIVE, MEMBER_DRAINING, Member,
    MemberKey, Service, Stat, Traffic, VipKey,
};
use lb_common::{Backend6, VipKey6};
use serde::Serialize;
use std::net::{IpAddr, Ipv6Addr, SocketAddrV6};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
const LINK_PREFIX: &str = "link_xdp_";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The BPF object built by build.rs.
static EBPF: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Makes sure `dir` can hold pins: mounts bpffs on /sys/fs/bpf when none is mounted there.
pub fn ensure_pin_dir(dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).map_err(|e| Error::io("creating /sys/fs/bpf", e))?;
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: plain mount(2) with static C strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(Error::io(
                "mounting bpffs on /sys/fs/bpf",
                std::io::Error::last_os_error(),
            ));
        }
        tracing::info!("mounted bpffs on /sys/fs/bpf");
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs(2) into a zeroed struct.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// What `attach` did.
#[derive(Debug, Clone, Serialize)]
pub struct Attached {
    pub program_id: u32,
    /// Interfaces whose existing pinned link now runs this program (adopted, hitless).
    pub replaced: Vec<String>,
    /// Interfaces attached for the first time.
    pub attached: Vec<String>,
    /// Interfaces attached before but not asked for now: detached.
    pub detached: Vec<String>,
}

/// Loads the XDP program (reusing maps already pinned in `dir`, so that an agent restart keeps
/// every service and flow), and attaches it to `ifaces` through pinned bpf links. A link already
/// pinned for an interface is updated in place to run the new program, which never leaves the
/// interface without a program.
pub fn attach(dir: &Path, ifaces: &[String], table: &TableConfig) -> Result<Attached> {
    let foreign = foreign_layouts(dir);
    if !foreign.is_empty() {
        return Err(Error::Layout {
            dir: dir.to_path_buf(),
            maps: foreign.join(", "),
        });
    }
    // A data plane pinned with other room (not other tables) is moved to the new sizes.
    let (mut ebpf, old_flows) = match crate::resize::needed(dir, table)? {
        Some(pinned) => {
            let (ebpf, old) = crate::resize::prepare(dir, &pinned, table)?;
            (ebpf, Some(old))
        }
        None => (load_with(dir, table)?, None),
    };
    let prog = xdp_program(&mut ebpf)?;
    let program_id = prog
        .info()
        .map_err(|e| Error::program("reading the XDP program's id", e))?
        .id();
    let mut out = Attached {
        program_id,
        replaced: Vec::new(),
        attached: Vec::new(),
        detached: Vec::new(),
    };
    for iface in ifaces {
        let path = link_path(dir, iface);
        if path.exists() {
            let pinned = PinnedLink::from_pin(&path).map_err(|e| Error::Link {
                what: format!("opening the pinned link {}", path.display()),
                source: e,
            })?;
            let fd: FdLink = pinned.into();
            let link = XdpLink::try_from(fd).map_err(|e| Error::Link {
                what: format!("the pinned link {} is not an XDP link", path.display()),
                source: e,
            })?;
            prog.attach_to_link(link)
                .map_err(|e| Error::program(format!("replacing the program on {iface}"), e))?;
            out.replaced.push(iface.clone());
        } else {
            let index = if_index(iface)?;
            let id = prog
                .attach_to_if_index(index, XdpMode::default())
                .map_err(|e| Error::program(format!("attaching XDP to {iface}"), e))?;
            let link = prog
                .take_link(id)
                .map_err(|e| Error::program(format!("taking the link on {iface}"), e))?;
            let fd: FdLink = link.try_into().map_err(|e| Error::Link {
                what: format!("the link on {iface} is not a bpf link (netlink attach?)"),
                source: e,
            })?;
            fd.pin(&path).map_err(|e| Error::Pin {
                what: format!("pinning the link of {iface} at {}", path.display()),
                source: e,
            })?;
            out.attached.push(iface.clone());
        }
    }
    for (iface, path) in pinned_links(dir)? {
        if !ifaces.contains(&iface) {
            unpin_link(&path)?;
            out.detached.push(iface);
        }
    }
    if let Some(old) = old_flows {
        // The links run the new program now: flows the old one made meanwhile move over too.
        let n = old.copy_into(dir)?;
        tracing::debug!(flows = n, "flow entries copied after the program switch");
    }
    Ok(out)
}

/// Loads the XDP program into the kernel without attaching it, with its maps pinned in `dir`
/// (reused when already there). `attach` uses it; so do packet tests, which run the program with
/// BPF_PROG_TEST_RUN after filling the maps through `Writer`.
pub fn load(dir: &Path) -> Result<aya::Ebpf> {
    load_with(dir, &TableConfig::default())
}

/// `load` with a Maglev table size and seed. A data plane already pinned in `dir` keeps its own:
/// asking for others is refused, with what to do.
pub fn load_with(dir: &Path, table: &TableConfig) -> Result<aya::Ebpf> {
    if EBPF.is_empty() {
        return Err(Error::NoDataPlane);
    }
    ensure_pin_dir(dir)?;
    if let Ok(pinned) = pinned_table(dir)
        && pinned != *table
    {
        return Err(Error::Table {
            dir: dir.to_path_buf(),
            pinned: pinned.to_string(),
            asked: table.to_string(),
        });
    }
    if !dir.join(common::MAP_RING).exists() {
        check_memory(table)?;
    }
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(dir);
    for (map, entries) in table.map_sizes() {
        loader.map_max_entries(map, entries);
    }
    let mut ebpf = loader.load(EBPF).map_err(|e| Error::Load {
        table: table.to_string(),
        source: Box::new(e),
    })?;
    let mut config: Array<MapData, u32> = open_map(dir, common::MAP_CONFIG)?;
    for (i, v) in [
        (common::CFG_SEED_LOW, table.seed as u32),
        (common::CFG_SEED_HIGH, (table.seed >> 32) as u32),
        (common::CFG_FLOWS, table.flows),
        (common::CFG_SERVICES, table.services),
        (common::CFG_BACKENDS, table.backends),
        (common::CFG_MEMBERS, table.members),
        // Last: the program treats a size of 0 as "not configured yet".
        (common::CFG_RING_SIZE, table.size),
    ] {
        config
            .set(i, v, 0)
            .map_err(|e| Error::map("writing lb_cfg_v2", e))?;
    }
    xdp_program(&mut ebpf)?
        .load()
        .map_err(|e| Error::program("loading the XDP program into the kernel", e))?;
    Ok(ebpf)
}

/// The Maglev table a data plane pinned in `dir` uses.
pub(crate) fn pinned_table(dir: &Path) -> Result<TableConfig> {
    let config: Array<MapData, u32> = open_map(dir, common::MAP_CONFIG)?;
    table_of(&config)
}

fn table_of(config: &Array<MapData, u32>) -> Result<TableConfig> {
    let get = |i| {
        config
            .get(&i, 0)
            .map_err(|e| Error::map("reading lb_cfg_v2", e))
    };
    let size = get(common::CFG_RING_SIZE)?;
    if size == 0 {
        return Err(Error::NotRunning(PathBuf::new()));
    }
    Ok(TableConfig {
        size,
        seed: get(common::CFG_SEED_LOW)? as u64 | (get(common::CFG_SEED_HIGH)? as u64) << 32,
        flows: get(common::CFG_FLOWS)?,
        services: get(common::CFG_SERVICES)?,
        backends: get(common::CFG_BACKENDS)?,
        members: get(common::CFG_MEMBERS)?,
    })
}

/// Refuses tables the machine cannot hold, before the kernel is asked for them: creating maps of
/// gigabytes would otherwise fail late with a bare ENOMEM, or take the machine's memory.
fn check_memory(table: &TableConfig) -> Result<()> {
    let needed = table.ring_bytes();
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024);
    match available {
        Some(avail) if needed > avail / 2 => Err(Error::Memory {
            needed,
            available: avail,
            table: table.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The data plane's sizes: the services' Maglev tables (size, a prime, and seed), the flow
/// tables, and how many services, backends and memberships the maps hold. All are fixed when the
/// maps are created; `lb_cfg_v2` records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TableConfig {
    pub size: u32,
    pub seed: u64,
    /// Entries of each flow table (tracked flows per direction and family).
    pub flows: u32,
    /// Services (VIP, port, protocol) of both families together.
    pub services: u32,
    /// Distinct backends (address, port) of both families together.
    pub backends: u32,
    /// (service, backend) memberships.
    pub members: u32,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            size: common::DEFAULT_RING_SIZE,
            seed: maglev::DEFAULT_SEED,
            flows: common::MAX_FLOWS,
            services: common::DEFAULT_MAX_SERVICES,
            backends: common::DEFAULT_MAX_BACKENDS,
            members: common::DEFAULT_MAX_MEMBERS,
        }
    }
}

impl TableConfig {
    /// Checks that `size` is a prime from 3 to 131071.
    pub fn new(size: u32, seed: u64) -> std::result::Result<TableConfig, String> {
        let prime = size >= 3
            && (2..)
                .take_while(|d| d * d <= size)
                .all(|d| !size.is_multiple_of(d));
        if !prime || size > common::MAX_RING_SIZE {
            return Err(format!(
                "the Maglev table size must be a prime from 3 to {} (not {size})",
                common::MAX_RING_SIZE
            ));
        }
        Ok(TableConfig {
            size,
            seed,
            ..TableConfig::default()
        })
    }

    /// The same holding `services` services, `backends` backends and `members` memberships,
    /// checked against the limits and against the width of the table map's index.
    pub fn with_capacity(
        self,
        services: u32,
        backends: u32,
        members: u32,
    ) -> std::result::Result<TableConfig, String> {
        for (what, n, max) in [
            ("services", services, common::LIMIT_SERVICES),
            ("backends", backends, common::LIMIT_BACKENDS),
            ("memberships", members, common::LIMIT_MEMBERS),
        ] {
            if !(1..=max).contains(&n) {
                return Err(format!(
                    "the number of {what} must be from 1 to {max} (not {n})"
                ));
            }
        }
        let t = TableConfig {
            services,
            backends,
            members,
            ..self
        };
        if common::ring_entries(services, self.size) > u32::MAX as u64 {
            return Err(format!(
                "{services} services with Maglev tables of {} slots exceed what one map can index; lower --max-services or --ring-size",
                self.size
            ));
        }
        Ok(t)
    }

    /// Bytes of the Maglev tables (`lb_ring_v2`), the largest map by far: 2 tables of `size`
    /// slots of 4 bytes per service.
    pub fn ring_bytes(&self) -> u64 {
        common::ring_entries(self.services, self.size)
            * std::mem::size_of::<common::RingChunk>() as u64
    }

    /// The maps whose size is set when they are created, and that size.
    fn map_sizes(&self) -> [(&'static str, u32); 12] {
        [
            (
                common::MAP_RING,
                common::ring_entries(self.services, self.size) as u32,
            ),
            (common::MAP_FLOWS, self.flows),
            (common::MAP_REPLIES, self.flows),
            (common::MAP_FLOWS6, self.flows),
            (common::MAP_REPLIES6, self.flows),
            (common::MAP_SERVICES, self.services),
            (common::MAP_SERVICES6, self.services),
            (common::MAP_SERVICE_TRAFFIC, self.services),
            (common::MAP_BACKENDS, self.backends),
            (common::MAP_BACKENDS6, self.backends),
            (common::MAP_BACKEND_TRAFFIC, self.backends),
            (common::MAP_MEMBERS, self.members),
        ]
    }

    /// The same with flow tables of `flows` entries (1024 to 16 Mi).
    pub fn with_flows(self, flows: u32) -> std::result::Result<TableConfig, String> {
        if !(common::MIN_FLOW_TABLE..=common::MAX_FLOW_TABLE).contains(&flows) {
            return Err(format!(
                "the flow table size must be from {} to {} (not {flows})",
                common::MIN_FLOW_TABLE,
                common::MAX_FLOW_TABLE
            ));
        }
        Ok(TableConfig { flows, ..self })
    }
}

impl std::fmt::Display for TableConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Maglev tables of {} slots (seed {:#x}, {:.1} MiB), flow tables of {}, room for {} services, {} backends and {} memberships",
            self.size,
            self.seed,
            self.ring_bytes() as f64 / (1 << 20) as f64,
            self.flows,
            self.services,
            self.backends,
            self.members
        )
    }
}

/// `lb_ring_v2`, created BPF_F_MMAPABLE: a table is written by mapping just its pages into the
/// writer's memory and copying it there, instead of the kernel copying and checking it element
/// by element (BPF_MAP_UPDATE_BATCH took 2.5 times as long for a whole apply). Only the pages of
/// one table are mapped at a time, so the agent's RSS does not grow by the kernel's tables.
struct RingMap {
    map: MapData,
    elements: usize,
    page: usize,
}

impl RingMap {
    fn open(dir: &Path) -> Result<RingMap> {
        let path = dir.join(common::MAP_RING);
        let map = MapData::from_pin(&path).map_err(|e| Error::map("opening lb_ring_v2", e))?;
        let info = map
            .info()
            .map_err(|e| Error::map("reading lb_ring_v2's description", e))?;
        if info.value_size() as usize != std::mem::size_of::<common::RingChunk>() {
            return Err(Error::Layout {
                dir: dir.to_path_buf(),
                maps: format!(
                    "{} with {}-byte values",
                    common::MAP_RING,
                    info.value_size()
                ),
            });
        }
        let page = page_size();
        Ok(RingMap {
            map,
            elements: info.max_entries() as usize,
            page,
        })
    }

    /// Writes `chunks` into consecutive elements from `first`. The caller publishes them with a
    /// map update (the service's flip), a system call, which comes after these stores.
    fn write(&mut self, first: u32, chunks: &[common::RingChunk]) -> Result<()> {
        let size = std::mem::size_of::<common::RingChunk>();
        let first = first as usize;
        if first
            .checked_add(chunks.len())
            .is_none_or(|end| end > self.elements)
        {
            return Err(Error::io(
                "writing a Maglev table",
                std::io::Error::other(format!(
                    "elements {first}..{} are outside lb_ring_v2 ({} elements)",
                    first + chunks.len(),
                    self.elements
                )),
            ));
        }
        let window = Window::map(
            &self.map,
            first * size,
            std::mem::size_of_val(chunks),
            self.page,
            true,
        )?;
        // SAFETY: the window holds exactly the bytes of elements first..first + chunks.len(),
        // writable; `chunks` is a separate allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(chunks.as_ptr(), window.ptr.cast(), chunks.len());
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf(3) has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize
}

/// Bytes of an mmapable array map's values mapped into this process; unmapped on drop.
pub(crate) struct Window {
    /// The first byte asked for.
    pub(crate) ptr: *mut u8,
    base: *mut libc::c_void,
    len: usize,
}

impl Window {
    /// Maps `len` bytes of `map`'s values from byte `start` (any alignment; the mapping is
    /// widened to pages). The caller keeps within the map's values.
    pub(crate) fn map(
        map: &MapData,
        start: usize,
        len: usize,
        page: usize,
        writable: bool,
    ) -> Result<Window> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let offset = start / page * page;
        let mapped = start + len - offset;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a shared mapping of pages of the map's values; the kernel checks the range
        // against the map's mmapable area and refuses maps created without BPF_F_MMAPABLE.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                prot,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::io(
                "mapping lb_ring_v2's tables into memory",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Window {
            // SAFETY: `start - offset` is within the `mapped` bytes just mapped.
            ptr: unsafe { base.cast::<u8>().add(start - offset) },
            base,
            len: mapped,
        })
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// The XDP program of a loaded object.
pub fn xdp_program(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(common::PROG_XDP)
        .ok_or_else(|| {
            Error::program(
                "finding the XDP program",
                aya::programs::ProgramError::NotLoaded,
            )
        })?
        .try_into()
        .map_err(|e| Error::program("the XDP program", e))
}

fn if_index(iface: &str) -> Result<u32> {
    let c = std::ffi::CString::new(iface).map_err(|_| Error::NoInterface(iface.to_string()))?;
    // SAFETY: if_nametoindex(3) reads a C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(Error::NoInterface(iface.to_string())),
        i => Ok(i),
    }
}

fn link_path(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{iface}"))
}

/// The interfaces with a pinned link in `dir`.
pub fn pinned_links(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(iface) = name.strip_prefix(LINK_PREFIX) {
            out.push((iface.to_string(), entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn unpin_link(path: &Path) -> Result<()> {
    let link = PinnedLink::from_pin(path).map_err(|e| Error::Link {
        what: format!("opening {}", path.display()),
        source: e,
    })?;
    // Removing the pin and closing the last descriptor detaches the program.
    link.unpin()
        .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
    Ok(())
}

/// What `down` removed.
#[derive(Debug, Default, Serialize)]
pub struct Removed {
    pub links: Vec<String>,
    pub maps: Vec<String>,
}

/// Detaches every program the agent attached and removes every pin in `dir`.
pub fn down(dir: &Path) -> Result<Removed> {
    let mut out = Removed::default();
    // What a resize that was interrupted left beside the pins.
    let staging = dir.join(crate::resize::STAGING);
    if staging.is_dir() {
        down(&staging)?;
    }
    for (iface, path) in pinned_links(dir)? {
        unpin_link(&path)?;
        out.links.push(iface);
    }
    for name in common::ALL_MAPS {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => out.maps.push(name.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("removing {}", dir.display()), e)),
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The pinned maps
// ---------------------------------------------------------------------------------------------

/// The maps the agent writes and `lbctl` reads, opened from their pins.
pub struct Maps {
    services: HashMap<MapData, VipKey, Service>,
    backends: Array<MapData, Backend>,
    ring: Array<MapData, common::RingChunk>,
    members: HashMap<MapData, MemberKey, Member>,
    stats: PerCpuArray<MapData, u64>,
    flows: HashMap<MapData, Flow, FlowEntry>,
    service_traffic: PerCpuArray<MapData, Traffic>,
    backend_traffic: PerCpuArray<MapData, Traffic>,
    services6: HashMap<MapData, VipKey6, Service>,
    backends6: Array<MapData, Backend6>,
    flows6: HashMap<MapData, lb_common::Flow6, FlowEntry>,
    lost: PerCpuArray<MapData, u64>,
    config: Array<MapData, u32>,
}

pub(crate) fn open_map<M>(dir: &Path, name: &str) -> Result<M>
where
    M: TryFrom<Map, Error = MapError>,
{
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| match &e {
        MapError::SyscallError(s) if s.io_error.kind() == std::io::ErrorKind::NotFound => {
            Error::NotRunning(dir.to_path_buf())
        }
        MapError::SyscallError(s) if s.io_error.kind() == std::io::ErrorKind::PermissionDenied => {
            Error::NotPermitted(path.clone())
        }
        _ => Error::map(format!("opening {}", path.display()), e),
    })?;
    let map = Map::from_map_data(data).map_err(|e| Error::map(format!("reading {name}"), e))?;
    M::try_from(map).map_err(|e| Error::map(format!("{name} has an unexpected layout"), e))
}

impl Maps {
    pub fn open(dir: &Path) -> Result<Maps> {
        match std::fs::metadata(dir) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Error::NotPermitted(dir.to_path_buf()));
            }
            Err(_) => return Err(Error::NotRunning(dir.to_path_buf())),
        }
        Ok(Maps {
            services: open_map(dir, common::MAP_SERVICES)?,
            backends: open_map(dir, common::MAP_BACKENDS)?,
            ring: open_map(dir, common::MAP_RING)?,
            members: open_map(dir, common::MAP_MEMBERS)?,
            stats: open_map(dir, common::MAP_STATS)?,
            flows: open_map(dir, common::MAP_FLOWS)?,
            service_traffic: open_map(dir, common::MAP_SERVICE_TRAFFIC)?,
            backend_traffic: open_map(dir, common::MAP_BACKEND_TRAFFIC)?,
            services6: open_map(dir, common::MAP_SERVICES6)?,
            backends6: open_map(dir, common::MAP_BACKENDS6)?,
            flows6: open_map(dir, common::MAP_FLOWS6)?,
            lost: open_map(dir, common::MAP_FLOWS_LOST)?,
            config: open_map(dir, common::MAP_CONFIG)?,
        })
    }

    /// The counters of `lb_stats_v1`, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>> {
        Stat::ALL
            .iter()
            .map(|s| {
                let v = self
                    .stats
                    .get(&(*s as u32), 0)
                    .map_err(|e| Error::map("reading lb_stats_v1", e))?;
                Ok((*s, v.iter().sum()))
            })
            .collect()
    }

    /// The Maglev table size and seed this data plane was loaded with.
    pub fn table(&self) -> Result<TableConfig> {
        table_of(&self.config)
    }

    /// Packets of established TCP flows that found no flow entry (evicted while alive, or older
    /// than this data plane), summed over CPUs.
    pub fn flows_lost(&self) -> Result<u64> {
        let v = self
            .lost
            .get(&0, 0)
            .map_err(|e| Error::map("reading lb_lost_v1", e))?;
        Ok(v.iter().sum())
    }

    /// Every counter of `lb_common::COUNTERS`, read from the map its descriptor names and summed
    /// over CPUs.
    pub fn counters(&self) -> Result<Vec<(common::Counter, u64)>> {
        common::COUNTERS
            .iter()
            .map(|c| {
                let map = match c.map {
                    common::MAP_STATS => &self.stats,
                    common::MAP_FLOWS_LOST => &self.lost,
                    other => {
                        return Err(Error::Config(format!(
                            "counter {} names {other}, which is not a counter map",
                            c.name
                        )));
                    }
                };
                let v = map
                    .get(&c.index, 0)
                    .map_err(|e| Error::map(format!("reading {} of {}", c.name, c.map), e))?;
                Ok((*c, v.iter().sum()))
            })
            .collect()
    }

    /// What the kernel serves now.
    pub fn read(&self) -> Result<KernelState> {
        let mut state = KernelState::default();
        let mut by_id: BTreeMap<u32, Vip> = BTreeMap::new();
        let mut found: Vec<(Vip, Service)> = Vec::new();
        for item in self.services.iter() {
            let (k, v) = item.map_err(|e| Error::map("reading lb_svc_v1", e))?;
            if let Some(vip) = Key::V4(k).vip() {
                found.push((vip, v));
            }
        }
        for item in self.services6.iter() {
            let (k, v) = item.map_err(|e| Error::map("reading lb_svc6_v1", e))?;
            if let Some(vip) = Key::V6(k).vip() {
                found.push((vip, v));
            }
        }
        for (vip, v) in found {
            by_id.insert(v.id, vip);
            state.services.insert(
                vip,
                KernelService {
                    id: v.id,
                    half: v.ring_half,
                    active: v.active,
                    backends: BTreeMap::new(),
                },
            );
        }
        for item in self.members.iter() {
            let (k, m) = item.map_err(|e| Error::map("reading lb_member_v1", e))?;
            let Some(vip) = by_id.get(&k.service) else {
                continue;
            };
            let Some(addr) = self.backend_at(k.backend, vip.addr.is_ipv6())? else {
                continue;
            };
            state.backend_ids.insert(addr, k.backend);
            let st = if m.state == MEMBER_DRAINING {
                BackendState::Draining
            } else {
                BackendState::Active
            };
            if let Some(svc) = state.services.get_mut(vip) {
                svc.backends.insert(addr, (k.backend, st));
            }
        }
        Ok(state)
    }

    /// The live backend in slot `id` of the IPv4 or IPv6 backend array.
    fn backend_at(&self, id: u32, v6: bool) -> Result<Option<SocketAddr>> {
        if v6 {
            let be = self
                .backends6
                .get(&id, 0)
                .map_err(|e| Error::map("reading lb_be6_v1", e))?;
            Ok((be.flags & BACKEND_LIVE != 0).then(|| {
                SocketAddr::V6(SocketAddrV6::new(
                    addr6(be.addr),
                    u16::from_be(be.port),
                    0,
                    0,
                ))
            }))
        } else {
            let be = self
                .backends
                .get(&id, 0)
                .map_err(|e| Error::map("reading lb_be_v1", e))?;
            Ok((be.flags & BACKEND_LIVE != 0).then(|| backend_addr(&be)))
        }
    }

    fn service(&self, key: &Key) -> Result<Option<Service>> {
        let got = match key {
            Key::V4(k) => self.services.get(k, 0),
            Key::V6(k) => self.services6.get(k, 0),
        };
        match got {
            Ok(s) => Ok(Some(s)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(Error::map("reading the services", e)),
        }
    }

    /// The tracked flows (client -> VIP -> backend), at most `limit`, optionally of one VIP.
    pub fn flows(&self, vip: Option<&Vip>, limit: usize) -> Result<Vec<FlowView>> {
        let state = self.read()?;
        let by_id: BTreeMap<u32, (&Vip, &KernelService)> =
            state.services.iter().map(|(v, s)| (s.id, (v, s))).collect();
        let mut out = Vec::new();
        for (client, to, proto, e) in self.flow_entries() {
            if vip.is_some_and(|v| v.addr != to || v.proto != proto) {
                continue;
            }
            let backend = by_id.get(&e.service).and_then(|(_, s)| {
                s.backends
                    .iter()
                    .find(|(_, (id, _))| *id == e.backend)
                    .map(|(a, (_, st))| (a.to_string(), st.name()))
            });
            out.push(FlowView {
                protocol: proto,
                client: client.to_string(),
                vip: to.to_string(),
                backend: backend.as_ref().map(|b| b.0.clone()),
                backend_state: backend.map(|b| b.1.to_string()),
            });
            if out.len() >= limit {
                break;
            }
        }
        out.sort_by(|a, b| (&a.vip, &a.client).cmp(&(&b.vip, &b.client)));
        Ok(out)
    }

    /// Every tracked flow of both families as (client, VIP, protocol, entry). Entries evicted while
    /// the tables are walked are skipped.
    fn flow_entries(
        &self,
    ) -> impl Iterator<Item = (SocketAddr, SocketAddr, Proto, FlowEntry)> + '_ {
        let v4 = self.flows.iter().flatten().filter_map(|(k, e)| {
            let ip = |a: u32, p: u16| {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(u32::from_be(a))), u16::from_be(p))
            };
            Some((
                ip(k.src, k.sport),
                ip(k.dst, k.dport),
                Proto::from_number(k.proto)?,
                e,
            ))
        });
        let v6 = self.flows6.iter().flatten().filter_map(|(k, e)| {
            let ip = |a: [u32; 4], p: u16| SocketAddr::new(IpAddr::V6(addr6(a)), u16::from_be(p));
            Some((
                ip(k.src, k.sport),
                ip(k.dst, k.dport),
                Proto::from_number(k.proto)?,
                e,
            ))
        });
        v4.chain(v6)
    }

    /// Backend slots that are live but serve no service (left by an agent that stopped midway).
    fn orphan_backends(&self, state: &KernelState, backends: u32) -> Result<Vec<u32>> {
        let used: BTreeSet<u32> = state.backend_ids.values().copied().collect();
        let mut out = Vec::new();
        for id in 0..backends {
            let live =
                self.backend_at(id, false)?.is_some() || self.backend_at(id, true)?.is_some();
            if live && !used.contains(&id) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// The backend a new flow from `src` to `vip` would get, with the kernel's own hash and table.
    pub fn pick(&self, vip: &Vip, src: impl Into<SocketAddr>) -> Result<Option<SocketAddr>> {
        let key = Key::of(vip);
        let Some(h) = key.hash(src.into()) else {
            return Ok(None);
        };
        let Some(svc) = self.service(&key)? else {
            return Ok(None);
        };
        if svc.active == 0 {
            return Ok(None);
        }
        let size = self.table()?.size;
        let (element, lane) = common::ring_index(svc.id, svc.ring_half, h % size, size);
        let chunk = self
            .ring
            .get(&element, 0)
            .map_err(|e| Error::map("reading lb_ring_v2", e))?;
        self.backend_at(chunk[lane as usize], vip.addr.is_ipv6())
    }
}

/// A VIP as the kernel keys it.
#[derive(Clone, Copy, Debug)]
enum Key {
    V4(VipKey),
    V6(VipKey6),
}

impl Key {
    fn of(vip: &Vip) -> Key {
        let (port, proto) = (vip.addr.port().to_be(), vip.proto.number());
        match vip.addr.ip() {
            IpAddr::V4(a) => Key::V4(VipKey {
                addr: u32::from(a).to_be(),
                port,
                proto,
                _pad: 0,
            }),
            IpAddr::V6(a) => Key::V6(VipKey6 {
                addr: words6(a),
                port,
                proto,
                _pad: 0,
            }),
        }
    }

    fn vip(&self) -> Option<Vip> {
        let (addr, port, proto) = match self {
            Key::V4(k) => (
                IpAddr::V4(Ipv4Addr::from(u32::from_be(k.addr))),
                k.port,
                k.proto,
            ),
            Key::V6(k) => (IpAddr::V6(addr6(k.addr)), k.port, k.proto),
        };
        Some(Vip {
            addr: SocketAddr::new(addr, u16::from_be(port)),
            proto: Proto::from_number(proto)?,
        })
    }

    /// The kernel's flow hash of a new flow from `src` (None when the families differ).
    fn hash(&self, src: SocketAddr) -> Option<u32> {
        let sport = src.port().to_be();
        match (self, src.ip()) {
            (Key::V4(k), IpAddr::V4(s)) => Some(common::flow_hash(
                u32::from(s).to_be(),
                k.addr,
                sport,
                k.port,
                k.proto,
            )),
            (Key::V6(k), IpAddr::V6(s)) => Some(common::flow_hash6(
                &words6(s),
                &k.addr,
                sport,
                k.port,
                k.proto,
            )),
            _ => None,
        }
    }
}

/// An IPv6 address as the four BE words the packet (and the maps) hold.
fn words6(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

fn addr6(w: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

fn backend_addr(be: &Backend) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(be.addr)),
        u16::from_be(be.port),
    ))
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelService {
    pub id: u32,
    pub half: u32,
    pub active: u32,
    /// Backend address -> (backend id, state).
    pub backends: BTreeMap<SocketAddr, (u32, BackendState)>,
}

impl KernelService {
    fn wanted(&self) -> BTreeMap<SocketAddr, BackendState> {
        self.backends.iter().map(|(a, (_, s))| (*a, *s)).collect()
    }
}

/// The services the kernel maps hold.
#[derive(Debug, Clone, Default)]
pub struct KernelState {
    pub services: BTreeMap<Vip, KernelService>,
    pub backend_ids: BTreeMap<SocketAddr, u32>,
}

impl KernelState {
    /// How much of the data plane's room this state takes.
    pub fn usage(&self) -> Usage {
        Usage {
            services: self.services.len() as u32,
            backends: self.backend_ids.len() as u32,
            members: self
                .services
                .values()
                .map(|s| s.backends.len() as u32)
                .sum(),
        }
    }
}

/// Services, distinct backends and memberships in use: compare with the `TableConfig`'s.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub services: u32,
    pub backends: u32,
    pub members: u32,
}

impl Usage {
    /// Each resource as (name, in use, room, the flag that sets the room).
    pub fn against(&self, room: &TableConfig) -> [(&'static str, u32, u32, &'static str); 3] {
        [
            ("services", self.services, room.services, "--max-services"),
            ("backends", self.backends, room.backends, "--max-backends"),
            ("memberships", self.members, room.members, "--max-members"),
        ]
    }

    /// The resources at least `percent`% used.
    pub fn above(
        &self,
        room: &TableConfig,
        percent: u64,
    ) -> Vec<(&'static str, u32, u32, &'static str)> {
        self.against(room)
            .into_iter()
            .filter(|(_, used, cap, _)| *used as u64 * 100 >= *cap as u64 * percent)
            .collect()
    }
}

/// What one `apply` changed.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Applied {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: usize,
    /// Services that could not be written, with why. The kernel keeps what it had for them.
    pub failed: Vec<String>,
}

impl Applied {
    pub fn is_noop(&self) -> bool {
        self.added.is_empty()
            && self.changed.is_empty()
            && self.removed.is_empty()
            && self.failed.is_empty()
    }
}

/// Writes differences into the maps, keeping a mirror of what they hold.
pub struct Writer {
    maps: Maps,
    state: KernelState,
    table: TableConfig,
    service_ids: IdPool,
    backend_ids: IdPool,
    ring: RingMap,
}

fn member_of(st: BackendState) -> Member {
    Member {
        state: match st {
            BackendState::Active => MEMBER_ACTIVE,
            BackendState::Draining => MEMBER_DRAINING,
        },
        _pad: 0,
    }
}

/// Ids below a limit: the lowest free one is given out first, in O(log n) however many are used.
#[derive(Debug)]
struct IdPool {
    /// Ids below `next` that are free again.
    free: BTreeSet<u32>,
    next: u32,
    limit: u32,
    what: &'static str,
}

impl IdPool {
    fn new(used: impl IntoIterator<Item = u32>, limit: u32, what: &'static str) -> IdPool {
        let used: BTreeSet<u32> = used.into_iter().collect();
        let next = used.last().map_or(0, |m| m + 1);
        IdPool {
            free: (0..next).filter(|i| !used.contains(i)).collect(),
            next,
            limit,
            what,
        }
    }

    fn take(&mut self) -> Result<u32> {
        if let Some(id) = self.free.pop_first() {
            return Ok(id);
        }
        if self.next >= self.limit {
            return Err(Error::Full(format!(
                "all {} {} slots are in use (raise --max-{}s)",
                self.limit, self.what, self.what
            )));
        }
        self.next += 1;
        Ok(self.next - 1)
    }

    fn give_back(&mut self, id: u32) {
        if id < self.next {
            self.free.insert(id);
        }
    }
}

impl Writer {
    /// Opens the maps pinned in `dir` and adopts what they hold.
    pub fn open(dir: &Path) -> Result<Writer> {
        let maps = Maps::open(dir)?;
        let state = maps.read()?;
        let table = maps.table()?;
        let service_ids = IdPool::new(
            state.services.values().map(|s| s.id),
            table.services,
            "service",
        );
        let backend_ids = IdPool::new(
            state.backend_ids.values().copied(),
            table.backends,
            "backend",
        );
        let mut w = Writer {
            maps,
            state,
            table,
            service_ids,
            backend_ids,
            ring: RingMap::open(dir)?,
        };
        for id in w.maps.orphan_backends(&w.state, table.backends)? {
            w.clear_backend(id)?;
        }
        Ok(w)
    }

    pub fn state(&self) -> &KernelState {
        &self.state
    }

    /// The sizes of the data plane this writer writes.
    pub fn table(&self) -> TableConfig {
        self.table
    }

    /// Makes the kernel serve `desired`, writing only the services that differ. A service that
    /// cannot be written is reported and keeps what it had; the others go on.
    pub fn apply(&mut self, desired: &Desired) -> Applied {
        let mut out = Applied::default();
        let wanted: BTreeMap<Vip, BTreeMap<SocketAddr, BackendState>> =
            desired.iter().map(|(v, s)| (*v, s.wanted())).collect();
        let gone: Vec<Vip> = self
            .state
            .services
            .keys()
            .filter(|v| !wanted.contains_key(v))
            .copied()
            .collect();
        for vip in gone {
            match self.remove_service(&vip) {
                Ok(()) => out.removed.push(vip.to_string()),
                Err(e) => out.failed.push(format!("{vip}: {e}")),
            }
        }
        for (vip, backends) in &wanted {
            let existed = match self.state.services.get(vip) {
                Some(cur) if cur.wanted() == *backends => {
                    out.unchanged += 1;
                    continue;
                }
                Some(_) => true,
                None => false,
            };
            match self.write_service(vip, backends) {
                Ok(()) if existed => out.changed.push(vip.to_string()),
                Ok(()) => out.added.push(vip.to_string()),
                Err(e) => out.failed.push(format!("{vip}: {e}")),
            }
        }
        if let Err(e) = self.collect_backends() {
            out.failed.push(format!("freeing unused backends: {e}"));
        }
        out
    }

    fn write_service(
        &mut self,
        vip: &Vip,
        backends: &BTreeMap<SocketAddr, BackendState>,
    ) -> Result<()> {
        let key = Key::of(vip);
        let (id, half) = match self.state.services.get(vip) {
            Some(cur) => (cur.id, cur.half ^ 1),
            None => {
                let id = self.service_ids.take()?;
                if let Err(e) = self.maps.reset_traffic(true, id) {
                    self.service_ids.give_back(id);
                    return Err(e);
                }
                (id, 0)
            }
        };
        let mut touched = Vec::new();
        let (members, svc) = match self.stage(&key, id, half, backends, &mut touched) {
            Ok(done) => done,
            Err(e) => {
                self.undo_members(vip, id, &touched);
                if !self.state.services.contains_key(vip) {
                    self.service_ids.give_back(id);
                }
                return Err(e);
            }
        };
        // 4. Memberships of backends that left: their flows move on their next packet.
        let left: Vec<u32> = self
            .state
            .services
            .get(vip)
            .map(|cur| {
                cur.backends
                    .iter()
                    .filter(|(addr, _)| !members.contains_key(*addr))
                    .map(|(_, (bid, _))| *bid)
                    .collect()
            })
            .unwrap_or_default();
        for bid in left {
            self.remove_member(id, bid)?;
        }
        self.state.services.insert(
            *vip,
            KernelService {
                id,
                half,
                active: svc.active,
                backends: members,
            },
        );
        Ok(())
    }

    /// Steps 1 to 3 of `write_service`: memberships, the unused table, the switch. Every
    /// membership written is pushed to `touched`, so that a failure can be undone.
    #[allow(clippy::type_complexity)]
    fn stage(
        &mut self,
        key: &Key,
        id: u32,
        half: u32,
        backends: &BTreeMap<SocketAddr, BackendState>,
        touched: &mut Vec<(SocketAddr, u32)>,
    ) -> Result<(BTreeMap<SocketAddr, (u32, BackendState)>, Service)> {
        // 1. Backend slots and memberships first, so the new table only points at live slots.
        let mut members = BTreeMap::new();
        for (addr, st) in backends {
            let bid = self.backend_id(*addr)?;
            touched.push((*addr, bid));
            let m = member_of(*st);
            self.maps
                .members
                .insert(
                    MemberKey {
                        service: id,
                        backend: bid,
                    },
                    m,
                    0,
                )
                .map_err(|e| match &e {
                    // A full hash map refuses a new key with E2BIG.
                    MapError::SyscallError(c) if c.io_error.raw_os_error() == Some(libc::E2BIG) => {
                        Error::Full(format!(
                            "all {} membership slots are in use (raise --max-members)",
                            self.table.members
                        ))
                    }
                    _ => Error::map("writing lb_member_v1", e),
                })?;
            members.insert(*addr, (bid, *st));
        }
        // 2. The table the service does not use now.
        let active: Vec<(SocketAddr, u32)> = members
            .iter()
            .filter(|(_, (_, st))| *st == BackendState::Active)
            .map(|(a, (id, _))| (*a, *id))
            .collect();
        let names: Vec<String> = active.iter().map(|(a, _)| a.to_string()).collect();
        let slots = maglev::table(&names, self.table.size, self.table.seed);
        if !slots.is_empty() {
            let mut chunks = vec![
                [0u32; common::RING_LANES as usize];
                slots.len().div_ceil(common::RING_LANES as usize)
            ];
            for (i, b) in slots.iter().enumerate() {
                chunks[i / common::RING_LANES as usize][i % common::RING_LANES as usize] =
                    active[*b as usize].1;
            }
            let (first, _) = common::ring_index(id, half, 0, self.table.size);
            self.ring.write(first, &chunks)?;
        }
        // 3. One update switches the service to the new table.
        let svc = Service {
            id,
            ring_half: half,
            active: active.len() as u32,
            _pad: 0,
        };
        match *key {
            Key::V4(k) => self.maps.services.insert(k, svc, 0),
            Key::V6(k) => self.maps.services6.insert(k, svc, 0),
        }
        .map_err(|e| Error::map("writing the service", e))?;
        Ok((members, svc))
    }

    /// Puts back the memberships a failed `write_service` changed: the service keeps exactly
    /// what it had (a membership that stayed behind would keep a flow on a backend no table has).
    fn undo_members(&mut self, vip: &Vip, id: u32, touched: &[(SocketAddr, u32)]) {
        let cur = self
            .state
            .services
            .get(vip)
            .map(|s| s.backends.clone())
            .unwrap_or_default();
        for (addr, bid) in touched {
            let undone = match cur.get(addr) {
                Some((_, st)) => self
                    .maps
                    .members
                    .insert(
                        MemberKey {
                            service: id,
                            backend: *bid,
                        },
                        member_of(*st),
                        0,
                    )
                    .map_err(|e| Error::map("writing lb_member_v1", e)),
                None => self.remove_member(id, *bid),
            };
            if let Err(e) = undone {
                tracing::warn!(service = %vip, error = %e, "could not undo a membership");
            }
        }
    }

    fn remove_service(&mut self, vip: &Vip) -> Result<()> {
        let Some(cur) = self.state.services.get(vip).cloned() else {
            return Ok(());
        };
        let removed = match Key::of(vip) {
            Key::V4(k) => self.maps.services.remove(&k),
            Key::V6(k) => self.maps.services6.remove(&k),
        };
        match removed {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(Error::map("removing a service", e)),
        }
        for (bid, _) in cur.backends.values() {
            self.remove_member(cur.id, *bid)?;
        }
        self.state.services.remove(vip);
        self.service_ids.give_back(cur.id);
        Ok(())
    }

    fn remove_member(&mut self, service: u32, backend: u32) -> Result<()> {
        match self.maps.members.remove(&MemberKey { service, backend }) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(Error::map("removing from lb_member_v1", e)),
        }
    }

    fn backend_id(&mut self, addr: SocketAddr) -> Result<u32> {
        if let Some(id) = self.state.backend_ids.get(&addr) {
            return Ok(*id);
        }
        let id = self.backend_ids.take()?;
        let written = self
            .maps
            .reset_traffic(false, id)
            .and_then(|()| self.maps.set_backend(id, Some(addr)));
        if let Err(e) = written {
            self.backend_ids.give_back(id);
            return Err(e);
        }
        self.state.backend_ids.insert(addr, id);
        Ok(id)
    }

    fn clear_backend(&mut self, id: u32) -> Result<()> {
        self.maps.set_backend(id, None)
    }

    /// Frees backend slots no service uses any more.
    fn collect_backends(&mut self) -> Result<()> {
        let used: BTreeSet<SocketAddr> = self
            .state
            .services
            .values()
            .flat_map(|s| s.backends.keys().copied())
            .collect();
        let unused: Vec<(SocketAddr, u32)> = self
            .state
            .backend_ids
            .iter()
            .filter(|(a, _)| !used.contains(a))
            .map(|(a, i)| (*a, *i))
            .collect();
        for (addr, id) in unused {
            self.clear_backend(id)?;
            self.state.backend_ids.remove(&addr);
            self.backend_ids.give_back(id);
        }
        Ok(())
    }
}

/// A tracked flow as `lbctl flows` shows it. `backend` is None when the flow's backend left its
/// service: the flow moves to a live backend on its next packet.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FlowView {
    pub protocol: Proto,
    pub client: String,
    pub vip: String,
    pub backend: Option<String>,
    pub backend_state: Option<String>,
}

/// Pinned maps in `dir` whose names look like ours but with another layout version: an agent of
/// another version left them, and this one must not read them as its own.
pub fn foreign_layouts(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.starts_with("lb_") && n.contains("_v") && !common::ALL_MAPS.contains(&n.as_str())
        })
        .collect();
    out.sort();
    out
}

/// A service as `lbctl list` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ServiceView {
    pub vip: String,
    pub protocol: Proto,
    pub id: u32,
    /// Backends that take new flows.
    pub active: u32,
    /// Tracked flows now.
    pub flows: u64,
    /// What clients sent to this VIP: packets, IP bytes, new flows.
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BackendView {
    pub address: String,
    pub state: BackendState,
    /// Tracked flows of this service on this backend now.
    pub flows: u64,
    /// What clients sent to this backend (through any VIP): packets, IP bytes, new flows.
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl Maps {
    /// The services with their counters and, per backend, its tracked flows (the flow table is
    /// walked once, at most `MAX_FLOWS` entries).
    pub fn views(&self) -> Result<Vec<ServiceView>> {
        self.views_of(&self.read()?)
    }

    /// `views` of a state already read.
    pub fn views_of(&self, state: &KernelState) -> Result<Vec<ServiceView>> {
        let mut flows: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        for (_, _, _, e) in self.flow_entries() {
            *flows.entry((e.service, e.backend)).or_insert(0) += 1;
        }
        state
            .services
            .iter()
            .map(|(vip, s)| {
                let t = self.traffic(&self.service_traffic, s.id)?;
                let backends = s
                    .backends
                    .iter()
                    .map(|(a, (id, st))| {
                        let bt = self.traffic(&self.backend_traffic, *id)?;
                        Ok(BackendView {
                            address: a.to_string(),
                            state: *st,
                            flows: flows.get(&(s.id, *id)).copied().unwrap_or(0),
                            packets: bt.packets,
                            bytes: bt.bytes,
                            new_flows: bt.new_flows,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(ServiceView {
                    vip: vip.addr.to_string(),
                    protocol: vip.proto,
                    id: s.id,
                    active: s.active,
                    flows: backends.iter().map(|b| b.flows).sum(),
                    packets: t.packets,
                    bytes: t.bytes,
                    new_flows: t.new_flows,
                    backends,
                })
            })
            .collect()
    }

    fn traffic(&self, map: &PerCpuArray<MapData, Traffic>, id: u32) -> Result<Traffic> {
        let per_cpu = map
            .get(&id, 0)
            .map_err(|e| Error::map("reading the traffic counters", e))?;
        Ok(per_cpu.iter().fold(Traffic::default(), |a, t| Traffic {
            packets: a.packets + t.packets,
            bytes: a.bytes + t.bytes,
            new_flows: a.new_flows + t.new_flows,
        }))
    }

    /// Writes backend slot `id` (in the array of the address's family), or clears it in both.
    fn set_backend(&mut self, id: u32, addr: Option<SocketAddr>) -> Result<()> {
        let (v4, v6) = match addr {
            Some(SocketAddr::V4(a)) => (Some((u32::from(*a.ip()).to_be(), a.port().to_be())), None),
            Some(SocketAddr::V6(a)) => (None, Some((words6(*a.ip()), a.port().to_be()))),
            None => (None, None),
        };
        if v4.is_some() || addr.is_none() {
            let (a, p) = v4.unwrap_or_default();
            let be = Backend {
                addr: a,
                port: p,
                flags: if v4.is_some() { BACKEND_LIVE } else { 0 },
                _pad: 0,
            };
            self.backends
                .set(id, be, 0)
                .map_err(|e| Error::map("writing lb_be_v1", e))?;
        }
        if v6.is_some() || addr.is_none() {
            let (a, p) = v6.unwrap_or_default();
            let be = Backend6 {
                addr: a,
                port: p,
                flags: if v6.is_some() { BACKEND_LIVE } else { 0 },
                _pad: 0,
            };
            self.backends6
                .set(id, be, 0)
                .map_err(|e| Error::map("writing lb_be6_v1", e))?;
        }
        Ok(())
    }

    /// Zeroes a service's or backend's counters when its slot is given out.
    fn reset_traffic(&mut self, service: bool, id: u32) -> Result<()> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| Error::io("counting CPUs", e))?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![Traffic::default(); n])
            .map_err(|e| Error::io("per-CPU values", e))?;
        let map = if service {
            &mut self.service_traffic
        } else {
            &mut self.backend_traffic
        };
        map.set(id, zeros, 0)
            .map_err(|e| Error::map("zeroing the traffic counters", e))
    }
}

/// The backend a new flow from `src` would get, computed in user space from a service as derived
/// from Marathon: the same Maglev table (sorted active backends, same size and seed) and the same
/// flow hash as the kernel, so it agrees with `Maps::pick` on every agent given the same state.
pub fn predict(
    spec: &crate::model::ServiceSpec,
    src: impl Into<SocketAddr>,
    table: &TableConfig,
) -> Option<SocketAddr> {
    let h = Key::of(&spec.vip).hash(src.into())?;
    let active: Vec<SocketAddr> = spec
        .backends
        .iter()
        .filter(|(_, b)| b.state == BackendState::Active)
        .map(|(a, _)| *a)
        .collect();
    let names: Vec<String> = active.iter().map(|a| a.to_string()).collect();
    let slots = maglev::table(&names, table.size, table.seed);
    if slots.is_empty() {
        return None;
    }
    Some(active[slots[(h % table.size) as usize] as usize])
}

/// Parses `ADDR:PORT` (`[v6]:PORT` for IPv6) and a protocol name, for `simulate` and `flows`.
pub fn parse_vip(addr: &str, proto: &str) -> std::result::Result<Vip, String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("`{addr}` is not ADDRESS:PORT"))?;
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        p => return Err(format!("protocol `{p}` is not tcp or udp")),
    };
    Ok(Vip { addr, proto })
}
