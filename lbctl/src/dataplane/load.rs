//! Loading the BPF object embedded by build.rs, its maps sized from the spec table and pinned
//! (or reused when already pinned), and the sizes a pinned data plane was made with.
use super::{
    hooks::HookKind,
    pins::{check_layouts, ensure_pin_dir},
    sizing::{TableConfig, check_memory},
    spec::{self, open_map},
};
use crate::error::{Error, Result};
use aya::{
    EbpfLoader,
    maps::{Array, MapData},
    programs::{SchedClassifier, Xdp},
};
use lb_common as common;
use std::path::{Path, PathBuf};

/// The BPF object built by build.rs.
static EBPF: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

#[cfg(test)]
/// The embedded BPF object (empty when lbctl was built with AYA_BUILD_SKIP).
pub(super) fn embedded_object() -> &'static [u8] {
    EBPF
}

/// Which of the packet programs a load verifies and loads into the kernel: the verifier takes a
/// few hundred milliseconds of CPU for each, so the agent loads only those its interfaces' hooks
/// run (none for the local path alone, whose cgroup programs are loaded by name, `local`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Programs {
    /// `lb_xdp`.
    pub xdp: bool,
    /// `lb_tc`.
    pub tc: bool,
}

impl Programs {
    /// Both (packet tests, the bench).
    pub const BOTH: Programs = Programs {
        xdp: true,
        tc: true,
    };
    /// Neither: the maps alone.
    pub const NONE: Programs = Programs {
        xdp: false,
        tc: false,
    };
}

/// Loads the XDP and TC programs into the kernel without attaching them, with its maps pinned in `dir`
/// (reused when already there). Packet tests use it, and run the program with BPF_PROG_TEST_RUN
/// after filling the maps through `Writer`.
pub fn load(dir: &Path) -> Result<aya::Ebpf> {
    load_with(dir, &TableConfig::default())
}

/// `load` with a Maglev table size and seed. A data plane already pinned in `dir` keeps its own:
/// asking for others is refused, with what to do.
pub fn load_with(dir: &Path, table: &TableConfig) -> Result<aya::Ebpf> {
    load_programs(dir, table, Programs::BOTH)
}

/// `load_with`, loading only the packet programs `programs` (the others stay in the object,
/// unloaded: `ensure_loaded` loads one later).
pub fn load_programs(dir: &Path, table: &TableConfig, programs: Programs) -> Result<aya::Ebpf> {
    load_object_programs(dir, table, EBPF, programs)
}

/// Whether `dir` holds no data plane yet (missing, or an empty directory): no program of ours
/// runs on maps there, so they may be filled before any program is attached.
pub fn is_fresh(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        // Unreadable for another reason: treated as pinned, the cautious way.
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Makes the maps of a data plane in `dir` (or checks those already pinned there), and loads no
/// program: the agent fills the maps of a fresh data plane while the kernel verifies the
/// programs (`links::attach_made` loads them into this object).
pub fn make_maps(dir: &Path, table: &TableConfig) -> Result<aya::Ebpf> {
    load_programs(dir, table, Programs::NONE)
}

/// `load_with` for another build of the BPF object (the bench measures an older build beside the
/// embedded one); its maps must have the embedded object's layouts.
pub fn load_object(dir: &Path, table: &TableConfig, object: &[u8]) -> Result<aya::Ebpf> {
    load_object_programs(dir, table, object, Programs::BOTH)
}

/// Fills map `name`, if it is pinned in `dir`, from what the other pinned maps hold (`fill`
/// returns how many entries or bits it wrote), before a program that reads it runs.
fn fill_from_pins(dir: &Path, name: &str, fill: fn(&Path) -> Result<usize>) -> Result<()> {
    if dir.join(name).exists() {
        let n = fill(dir)?;
        if n > 0 {
            tracing::info!(map = name, written = n, "filled from what is pinned");
        }
    }
    Ok(())
}

/// The words of the VIP filter the programs loaded for `dir` read, which they take a VIP's bit
/// with (the loader sets their global to it). A new filter gets the size for the room for
/// services. A pinned one smaller than that (an older agent made it with the smallest size) is
/// unpinned, so that the load makes one of the right size, which the loader then fills from the
/// pinned services like any new filter: the programs running now keep the map they hold until
/// the links run the new ones, and an agent writes to a pinned data plane only after that.
fn filter_size(dir: &Path, table: &TableConfig) -> Result<u32> {
    let wanted = common::vip_filter_words(table.services);
    let pinned = match spec::open_data(dir, common::MAP_VIP_FILTER) {
        Ok(map) => common::vip_filter_words_in(spec::max_entries(&map, common::MAP_VIP_FILTER)?),
        Err(Error::NotRunning(_)) => return Ok(wanted),
        Err(e) => return Err(e),
    };
    if pinned >= wanted {
        return Ok(pinned);
    }
    let path = dir.join(common::MAP_VIP_FILTER);
    std::fs::remove_file(&path)
        .map_err(|e| Error::io(format!("replacing the smaller {}", path.display()), e))?;
    tracing::info!(
        from_bits = u64::from(pinned) * 64,
        to_bits = u64::from(wanted) * 64,
        "the VIP filter grows to the room for services"
    );
    Ok(wanted)
}

/// The length of the kernel's tick in ns, the unit of the programs' clock
/// (`common::GLOBAL_NS_PER_TICK`): the resolution of `CLOCK_MONOTONIC_COARSE`, which the kernel
/// gives as its tick (1 ms at HZ = 1000, 4 ms at HZ = 250).
fn tick_ns() -> Result<u64> {
    const WHAT: &str = "reading the kernel's tick (the resolution of CLOCK_MONOTONIC_COARSE)";
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the call writes the timespec given.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } != 0 {
        return Err(Error::io(WHAT, std::io::Error::last_os_error()));
    }
    match res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64 {
        0 => Err(Error::io(
            WHAT,
            std::io::Error::other("the kernel gave 0 ns"),
        )),
        ns => Ok(ns),
    }
}

fn load_object_programs(
    dir: &Path,
    table: &TableConfig,
    object: &[u8],
    programs: Programs,
) -> Result<aya::Ebpf> {
    if object.is_empty() {
        return Err(Error::NoDataPlane);
    }
    ensure_pin_dir(dir)?;
    check_layouts(dir)?;
    if let Ok(pinned) = pinned_table(dir)
        && pinned != *table
    {
        return Err(Error::Table {
            dir: dir.to_path_buf(),
            pinned: pinned.to_string(),
            asked: table.to_string(),
        });
    }
    if !dir.join(common::MAP_TABLES).exists() {
        check_memory(table)?;
    }
    // Filled from what is pinned only when the rest of the data plane was there before it.
    let seed_reply_ports =
        !dir.join(common::MAP_REPLY_PORTS).exists() && dir.join(common::MAP_BACKENDS).exists();
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(dir);
    // A BTF-defined map (the tables' array of maps) names no pinning of its own.
    loader.map_pin_path(common::MAP_TABLES, dir.join(common::MAP_TABLES));
    for map in &spec::MAPS {
        if let Some(entries) = map.sizing.entries(table) {
            loader.map_max_entries(map.name, entries);
        }
    }
    // The programs' own caches get slots for every CPU the kernel may run the programs on.
    let cpus = aya::util::nr_cpus()
        .map_err(|(what, e)| Error::io(format!("counting the possible CPUs ({what})"), e))?;
    for (name, bits) in common::PER_CPU_SLOTS {
        loader.map_max_entries(name, (cpus as u32) << bits);
    }
    let filter_words = filter_size(dir, table)?;
    // An older build of the object (the bench's baseline) may not have it.
    let ours = std::ptr::eq(object, EBPF);
    loader.override_global(common::GLOBAL_VIP_FILTER_WORDS, &filter_words, ours);
    // The counter arrays' regions (`counters`), one for each of the `cpus`.
    loader.override_global(common::GLOBAL_SERVICE_IDS, &table.services, ours);
    loader.override_global(common::GLOBAL_BACKEND_IDS, &table.backends, ours);
    let tick = tick_ns()?;
    loader.override_global(common::GLOBAL_NS_PER_TICK, &tick, ours);
    // The flow tables' seed lives as long as they do: a new one only with new tables.
    let pinned_seed = super::flow_tables::pinned_seed(dir)?;
    let flow_seed = match pinned_seed {
        Some(s) => s,
        None => super::flow_tables::new_seed()?,
    };
    loader.override_global(common::GLOBAL_FLOW_SEED, &flow_seed, ours);
    let keys6 = <common::Flow6 as common::flow_table::FlowKey>::keys(flow_seed);
    loader.override_global(common::GLOBAL_FLOW_KEYS6, &keys6, ours);
    let buckets = common::flow_table::flow_buckets(table.flows);
    loader.override_global(common::GLOBAL_FLOW_BUCKETS, &buckets, ours);
    let mut ebpf = loader.load(object).map_err(|e| Error::Load {
        table: table.to_string(),
        source: Box::new(e),
    })?;
    // (An older object given to `load_object` may not have the map.)
    if pinned_seed.is_none() && dir.join(common::MAP_FLOW_SEED).exists() {
        super::flow_tables::write_seed(dir, flow_seed)?;
    }
    // Before any new program runs: the tables of an older agent's layout.
    if dir.join(common::MAP_TABLES).exists() {
        super::upgrade::carry_chunks(dir, table.size)?;
        super::upgrade::carry_tables(dir, table.size)?;
    }
    // (An older object given to `load_object` may not have the map.)
    if seed_reply_ports {
        fill_from_pins(dir, common::MAP_REPLY_PORTS, super::maps::seed_reply_ports)?;
    }
    // Every time: an agent of an earlier version may have written services since these maps
    // were made (it does not know them), and the programs must find each service, and its
    // departures count under its id.
    fill_from_pins(dir, common::MAP_DEPARTURES, super::maps::seed_departures)?;
    fill_from_pins(dir, common::MAP_VIP_FILTER, super::maps::mark_vips)?;
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
    // Every time too (with the sizes written, which reading the maps needs): a backend's lean
    // flows rely on its record naming every VIP it serves.
    fill_from_pins(
        dir,
        common::MAP_BACKEND_VIPS,
        super::backend_vips::sync_pinned,
    )?;
    load_packet_programs(&mut ebpf, programs)?;
    Ok(ebpf)
}

/// A hook's packet program and the programs it tail-calls, each in a program array of its own.
struct HookPrograms {
    what: &'static str,
    main: &'static str,
    /// Its IPv6 half.
    v6: Tail,
    /// Its path-MTU program (which the IPv6 half tail-calls as well).
    pmtu: Tail,
}

/// A program that a hook's programs tail-call, and the program array (one slot) that holds it.
struct Tail {
    /// What it is, for errors and logs ("IPv6 half").
    what: &'static str,
    name: &'static str,
    array: &'static str,
}

const XDP: HookPrograms = HookPrograms {
    what: "XDP",
    main: common::PROG_XDP,
    v6: Tail {
        what: "IPv6 half",
        name: common::PROG_XDP6,
        array: common::MAP_V6_XDP,
    },
    pmtu: Tail {
        what: "path-MTU program",
        name: common::PROG_XDP_PMTU,
        array: common::MAP_PMTU_XDP,
    },
};

const TC: HookPrograms = HookPrograms {
    what: "TC",
    main: common::PROG_TC,
    v6: Tail {
        what: "IPv6 half",
        name: common::PROG_TC6,
        array: common::MAP_V6_TC,
    },
    pmtu: Tail {
        what: "path-MTU program",
        name: common::PROG_TC_PMTU,
        array: common::MAP_PMTU_TC,
    },
};

impl HookPrograms {
    /// The programs the hook's programs tail-call, in the order their arrays are filled: the
    /// path-MTU program first, so that the IPv6 half that calls it finds it there.
    fn tails(&self) -> [&Tail; 2] {
        [&self.pmtu, &self.v6]
    }
}

/// Loads the packet programs `programs` and the programs they tail-call (IPv6 halves, path-MTU
/// programs) into the kernel, each verified on a thread of its own, then puts each tail-called
/// one in its program array: before the caller attaches a program that tail-calls it. (An older
/// build of the object, the bench's baseline, may have neither: its programs hold all of it.)
pub(super) fn load_packet_programs(ebpf: &mut aya::Ebpf, programs: Programs) -> Result<()> {
    let hooks: Vec<&HookPrograms> = [(programs.xdp, &XDP), (programs.tc, &TC)]
        .into_iter()
        .filter_map(|(wanted, h)| wanted.then_some(h))
        .collect();
    for h in &hooks {
        if ebpf.program(h.main).is_none() {
            return Err(Error::program(
                format!("finding the {} program", h.what),
                aya::programs::ProgramError::NotLoaded,
            ));
        }
    }
    let mut jobs: Vec<(String, &mut aya::programs::Program)> = Vec::new();
    for (name, prog) in ebpf.programs_mut() {
        let what = hooks.iter().find_map(|h| {
            if name == h.main {
                return Some(format!("the {} program", h.what));
            }
            let t = h.tails().into_iter().find(|t| t.name == name)?;
            Some(format!("the {} program's {}", h.what, t.what))
        });
        if let Some(what) = what {
            jobs.push((what, prog));
        }
    }
    let results: Vec<(String, std::result::Result<(), aya::programs::ProgramError>)> =
        std::thread::scope(|s| {
            let mut jobs = jobs.into_iter();
            let first = jobs.next();
            let verifying: Vec<_> = jobs
                .map(|(what, prog)| s.spawn(move || load_one(what, prog)))
                .collect();
            let mut out: Vec<_> = first
                .map(|(what, prog)| load_one(what, prog))
                .into_iter()
                .collect();
            // Loading does not panic; were it to, so does this.
            out.extend(
                verifying
                    .into_iter()
                    .map(|v| v.join().unwrap_or_else(|e| std::panic::resume_unwind(e))),
            );
            out
        });
    for (what, loaded) in results {
        loaded.map_err(|e| Error::program(format!("loading {what} into the kernel"), e))?;
    }
    for h in hooks {
        for t in h.tails() {
            fill_array(ebpf, h, t)?;
        }
    }
    Ok(())
}

/// Verifies and loads one packet program (`what` names it), logging how long it took.
fn load_one(
    what: String,
    prog: &mut aya::programs::Program,
) -> (String, std::result::Result<(), aya::programs::ProgramError>) {
    let loaded = timed(&what, || match prog {
        aya::programs::Program::Xdp(p) => p.load(),
        aya::programs::Program::SchedClassifier(p) => p.load(),
        // Not a packet program: the callers name only XDP and TC ones.
        _ => Err(aya::programs::ProgramError::NotLoaded),
    });
    (what, loaded)
}

/// Puts program `t` of hook `h`, loaded, in its program array (when the object has it).
fn fill_array(ebpf: &mut aya::Ebpf, h: &HookPrograms, t: &Tail) -> Result<()> {
    let fd = match ebpf.program(t.name) {
        None => return Ok(()),
        Some(prog) => prog
            .fd()
            .and_then(|fd| fd.try_clone().map_err(aya::programs::ProgramError::IOError))
            .map_err(|e| Error::program(format!("the {} program's {}", h.what, t.what), e))?,
    };
    let map = ebpf.map_mut(t.array).ok_or_else(|| {
        Error::program(
            format!("finding {}", t.array),
            aya::programs::ProgramError::NotLoaded,
        )
    })?;
    let mut array: aya::maps::ProgramArray<&mut MapData> = map
        .try_into()
        .map_err(|e| Error::map(format!("opening {}", t.array), e))?;
    array.set(0, &fd, 0).map_err(|e| {
        Error::map(
            format!("putting the {} program's {} in {}", h.what, t.what, t.array),
            e,
        )
    })
}

/// Runs `load`, logging how long the kernel took to verify and load the program `what`.
fn timed<E>(
    what: &str,
    load: impl FnOnce() -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let t = std::time::Instant::now();
    let r = load();
    tracing::debug!(
        program = what,
        ms = t.elapsed().as_millis() as u64,
        "program verified and loaded"
    );
    r
}

/// Loads the packet program of hook `kind` when `load_programs` left it out, and gives its
/// kernel id.
pub fn ensure_loaded(ebpf: &mut aya::Ebpf, kind: HookKind) -> Result<u32> {
    let wanted = match kind {
        HookKind::Xdp => Programs {
            xdp: true,
            tc: false,
        },
        HookKind::Tc => Programs {
            xdp: false,
            tc: true,
        },
    };
    if program_id(ebpf, kind)?.is_none() {
        load_packet_programs(ebpf, wanted)?;
    }
    program_id(ebpf, kind)?.ok_or_else(|| {
        Error::program(
            format!("loading the {kind} program"),
            aya::programs::ProgramError::NotLoaded,
        )
    })
}

/// The kernel id of the packet program of hook `kind`, None when it is not loaded.
pub fn program_id(ebpf: &mut aya::Ebpf, kind: HookKind) -> Result<Option<u32>> {
    let info = match kind {
        HookKind::Xdp => {
            let prog = xdp_program(ebpf)?;
            if prog.fd().is_err() {
                return Ok(None);
            }
            prog.info()
        }
        HookKind::Tc => {
            let prog = tc_program(ebpf)?;
            if prog.fd().is_err() {
                return Ok(None);
            }
            prog.info()
        }
    };
    info.map(|i| Some(i.id()))
        .map_err(|e| Error::program(format!("reading the {kind} program's id"), e))
}

/// The kernel id of the IPv6 half that hook `kind`'s program array pinned in `dir` holds: None
/// when the slot is empty (no agent loaded that hook's programs into this data plane yet).
pub fn ipv6_half_id(dir: &Path, kind: HookKind) -> Result<Option<u32>> {
    tail_id(dir, &hook_programs(kind).v6)
}

/// The kernel id of hook `kind`'s path-MTU program in its array pinned in `dir`, as
/// `ipv6_half_id`.
pub fn pmtu_program_id(dir: &Path, kind: HookKind) -> Result<Option<u32>> {
    tail_id(dir, &hook_programs(kind).pmtu)
}

fn hook_programs(kind: HookKind) -> &'static HookPrograms {
    match kind {
        HookKind::Xdp => &XDP,
        HookKind::Tc => &TC,
    }
}

fn tail_id(dir: &Path, t: &Tail) -> Result<Option<u32>> {
    let map = spec::open_data(dir, t.array)?;
    super::sys::map_lookup_u32(&map, 0)
        .map_err(|e| Error::io(format!("reading {}", dir.join(t.array).display()), e))
}

/// The Maglev table a data plane pinned in `dir` uses.
pub(crate) fn pinned_table(dir: &Path) -> Result<TableConfig> {
    let config: Array<MapData, u32> = open_map(dir, common::MAP_CONFIG)?;
    table_of(&config)
}

pub(super) fn table_of(config: &Array<MapData, u32>) -> Result<TableConfig> {
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

/// The TC (`clsact` ingress) program of a loaded object.
pub fn tc_program(ebpf: &mut aya::Ebpf) -> Result<&mut SchedClassifier> {
    ebpf.program_mut(common::PROG_TC)
        .ok_or_else(|| {
            Error::program(
                "finding the TC program",
                aya::programs::ProgramError::NotLoaded,
            )
        })?
        .try_into()
        .map_err(|e| Error::program("the TC program", e))
}

#[cfg(test)]
mod tests {
    use super::is_fresh;

    #[test]
    fn a_missing_or_empty_pin_dir_is_fresh_and_one_with_a_pin_is_not() {
        let dir = std::env::temp_dir().join(format!("lbctl-fresh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(is_fresh(&dir), "missing");
        std::fs::create_dir(&dir).expect("creating the directory");
        assert!(is_fresh(&dir), "empty");
        std::fs::write(dir.join("lb_cfg_v2"), b"").expect("writing a file");
        assert!(!is_fresh(&dir), "a pin");
        std::fs::remove_dir_all(&dir).expect("removing the directory");
    }
}
