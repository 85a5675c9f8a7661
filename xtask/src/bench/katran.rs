//! Katran's `balancer_ingress` beside this project's `lb_xdp`, in one run, on the same packets:
//! BPF_PROG_TEST_RUN with repeat = 1 once per packet (the kernel copies the packet in anew each
//! call), the mean of the kernel's durations per round, several rounds, the ingress interface set;
//! within a round the programs take turns on slices of a case's packets (`SLICES`).
//!
//! `lb_xdp` is filled by the real control plane (one VIP in TCP and UDP, an IPv6 VIP, 10 backends
//! each) as in the `xdp` section; Katran's maps the way its user space (`KatranLb`) fills them for
//! the same VIPs and 10 reals each: `vip_map`, `reals` (ids from 1), a Maglev ring of 65,537 slots
//! per VIP in `ch_rings`, the default router's MAC in `ctl_array`, and one LRU per CPU in
//! `lru_mapping` (Katran's per-CPU LRUs). Before the timing, every case's verdict and output are
//! checked: Katran returns XDP_TX with the packet IPIP- (or IPv6-in-IPv6-) encapsulated towards
//! one of the VIP's reals, `lb_xdp` XDP_REDIRECT, both XDP_PASS for a packet not for a VIP; during
//! it every verdict is counted and Katran's own counters must show the flow-table hits and misses
//! each case claims. The Katran object comes from `katran_obj`; without one the section says so
//! and measures nothing.
use super::{
    katran_obj::{self, Object},
    packet::{self, Kind},
    stats::Summary,
    sys::{self, Netns, Pins},
    xdp::{self, Bench, Frames, Ran, Size, XDP_PASS, XDP_REDIRECT, XDP_TX},
};
use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ArrayOfMaps, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::Xdp,
};
use serde::Serialize;
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

#[derive(Clone, Copy)]
pub struct Plan {
    pub rounds: usize,
    /// Packets per case per round.
    pub packets: usize,
    /// Distinct flows of the many-flows case.
    pub flows: usize,
    /// Build Katran's object when it is not there yet.
    pub build: bool,
}

/// The cases, each on the same packets for both programs and the floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Case {
    TcpTracked,
    TcpTrackedMany,
    /// As many distinct flows as packets per round: each flow's packet comes a round after its
    /// last one, seconds later, so lb_xdp checks each (`FLOW_CHECK_MAX_AGE_NS`).
    TcpTrackedSparse,
    TcpSyn,
    UdpTracked,
    Tcp6Tracked,
    NotOurs,
    /// A backend's reply in the one-flow case's flow, reverse-translated by lb_xdp. Katran
    /// has no such case (its backends answer clients directly): lb_xdp and the floor only.
    Reply,
    /// The same in the IPv6 one-flow case's flow.
    Reply6,
}

impl Case {
    const ALL: [Case; 9] = [
        Case::TcpTracked,
        Case::TcpTrackedMany,
        Case::TcpTrackedSparse,
        Case::TcpSyn,
        Case::UdpTracked,
        Case::Tcp6Tracked,
        Case::NotOurs,
        Case::Reply,
        Case::Reply6,
    ];

    fn describe(self, flows: usize, packets: usize) -> String {
        match self {
            Case::TcpTracked => "TCP, tracked flow (one flow)".into(),
            Case::TcpTrackedMany => format!(
                "TCP, tracked, {} distinct flows",
                super::report::num(flows as f64, 0)
            ),
            Case::TcpTrackedSparse => format!(
                "TCP, tracked, {} distinct flows, one packet each per round",
                super::report::num(packets as f64, 0)
            ),
            Case::TcpSyn => "TCP SYN, a new flow each (unique source)".into(),
            Case::UdpTracked => "UDP, tracked (one flow)".into(),
            Case::Tcp6Tracked => "IPv6 TCP, tracked (one flow)".into(),
            Case::NotOurs => "not for a VIP (passed)".into(),
            Case::Reply => "reply, reverse-translated (the one flow's)".into(),
            Case::Reply6 => "IPv6 reply, reverse-translated (the one flow's)".into(),
        }
    }

    /// The verdicts (lb_xdp, Katran).
    fn expected(self) -> (u32, u32) {
        match self {
            Case::NotOurs => (XDP_PASS, XDP_PASS),
            _ => (XDP_REDIRECT, XDP_TX),
        }
    }

    /// Whether Katran runs the case (not a reply: Katran's backends answer clients directly).
    fn katran(self) -> bool {
        !matches!(self, Case::Reply | Case::Reply6)
    }

    /// The interface the case's packets come in on (`Bench::run`'s index): a reply from the
    /// backends' side, any other from the clients'.
    fn ingress(self) -> usize {
        if self.katran() { 0 } else { 1 }
    }

    /// The tracked case a reply case is compared with: the one flow it answers.
    fn answers(self) -> Option<Case> {
        match self {
            Case::Reply => Some(Case::TcpTracked),
            Case::Reply6 => Some(Case::Tcp6Tracked),
            _ => None,
        }
    }
}

/// The cases in the groups they are measured in, slice by slice: each reply case with the
/// tracked case it answers (its cost is given over that one's), every other case alone.
fn groups() -> Vec<Vec<Case>> {
    Case::ALL
        .iter()
        .filter(|c| c.answers().is_none())
        .map(|t| {
            std::iter::once(*t)
                .chain(
                    Case::ALL
                        .iter()
                        .copied()
                        .filter(|r| r.answers() == Some(*t)),
                )
                .collect()
        })
        .collect()
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub case: Case,
    /// Of the rounds' means, ns per packet.
    pub floor: Summary,
    pub lb: Summary,
    /// None for a case Katran does not run (`Case::katran`).
    pub katran: Option<Summary>,
    /// lb_xdp's mean over Katran's, round by round.
    pub ratio: Option<Summary>,
    /// A reply case's lb_xdp mean over that of the tracked case it answers, round by round.
    pub over_tracked: Option<Summary>,
    pub lb_verdicts: BTreeMap<String, u64>,
    pub katran_verdicts: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    /// Where Katran's object came from.
    pub object: Option<String>,
    /// The object `lb_xdp` came from when not the embedded one (`LB_OBJECT_ENV`).
    pub lb_object: Option<String>,
    /// Why nothing was measured.
    pub skipped: Option<String>,
    pub rounds: usize,
    pub packets: usize,
    pub flows: usize,
    pub rows: Vec<Row>,
    /// Counter checks of Katran's and lb_xdp's.
    pub checks: Vec<String>,
    /// (name, JITed bytes, verified instructions) of both programs.
    pub programs: Vec<(String, u32, Option<u32>)>,
}

const SIZE: Size = Size {
    services: 3,
    backends: 10,
};
/// Katran's constants (balancer_consts.h) and flags (the values KatranLb writes).
const RING_SIZE: u32 = 65_537;
const MAX_VIPS: u32 = 512;
const LRU_CNTRS: u32 = 0;
const NEW_CONN_RATE_CNTR: u32 = 2;
const FALLBACK_LRU_CNTR: u32 = 3;
const F_IPV6: u8 = 1;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
/// Flows each side's table is made for: Katran's LRU of the measuring CPU (Katran's default is
/// 8,000,000 over the forwarding CPUs) and lb_xdp's flow table (`flow_table_size`, its default).
/// More than the flows in use (`flows_in_use`), fewer than all the section makes with the SYN
/// case's new flows: as in a SYN flood, each table must take the new flows and keep the ones in
/// use (the checks count what each lost). Before lb_xdp moved a flow in use to its other bucket
/// to make room (`flow_table::make_room`), 5 runs of 16 lost a sparse flow here.
const FLOWS_HELD: u32 = 1 << 18;
/// How many slices each case's packets of a round are cut into: the three programs (`lb_xdp`,
/// Katran, the floor) take turns slice by slice. In whole rounds (each program 50,000 packets
/// in a row), a burst of other work on the shared machine fell on one program's batch and not
/// the other's: on an AMD EPYC machine the rounds' ratios of the one-flow case spread from 0.62
/// to 0.90 in one run.
const SLICES: usize = 10;
/// How much longer than the check bound the sparse case's flows wait between their packets.
const SPARSE_MARGIN: std::time::Duration = std::time::Duration::from_millis(50);
/// The default router's MAC written in `ctl_array`.
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0x09, 0, 0, 1];
const PROG: &str = "balancer_ingress";

/// `struct vip_definition`: address (network order, IPv4 in the first 4 bytes), port (network
/// order), protocol.
#[repr(C)]
#[derive(Clone, Copy)]
struct VipDefinition {
    addr: [u8; 16],
    port: [u8; 2],
    proto: u8,
    pad: u8,
}
/// `struct vip_meta`.
#[repr(C)]
#[derive(Clone, Copy)]
struct VipMeta {
    flags: u32,
    vip_num: u32,
}
/// `struct real_definition`: address (network order), flags (`F_IPV6`).
#[repr(C)]
#[derive(Clone, Copy)]
struct RealDefinition {
    addr: [u8; 16],
    flags: u8,
    pad: [u8; 3],
}
/// `struct flow_key`: source, destination (network order), ports (network order), protocol.
#[repr(C)]
#[derive(Clone, Copy)]
struct FlowKey {
    src: [u8; 16],
    dst: [u8; 16],
    ports: [u8; 4],
    proto: u8,
    pad: [u8; 3],
}
/// `struct real_pos_lru`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RealPosLru {
    pos: u32,
    pad: u32,
    atime: u64,
}
/// `struct lb_stats`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LbStats {
    v1: u64,
    v2: u64,
}
// SAFETY: plain integers and byte arrays, #[repr(C)], no implicit padding.
unsafe impl aya::Pod for VipDefinition {}
// SAFETY: as above.
unsafe impl aya::Pod for VipMeta {}
// SAFETY: as above.
unsafe impl aya::Pod for RealDefinition {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for RealPosLru {}
// SAFETY: as above.
unsafe impl aya::Pod for LbStats {}

fn addr16(ip: IpAddr) -> [u8; 16] {
    let mut a = [0; 16];
    match ip {
        IpAddr::V4(v4) => a[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => a = v6.octets(),
    }
    a
}

/// Katran's object loaded and filled, with its per-CPU LRUs.
struct Katran {
    ebpf: Ebpf,
    lrus: Vec<aya::maps::Map>,
    /// Real ids of the IPv4 and IPv6 reals, by address.
    reals: BTreeMap<IpAddr, u32>,
}

impl Katran {
    fn load(object: &Path) -> Result<Katran> {
        let bytes =
            std::fs::read(object).with_context(|| format!("reading {}", object.display()))?;
        let mut ebpf = EbpfLoader::new()
            .load(&bytes)
            .context("loading Katran's object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROG)
            .context("Katran's object has no balancer_ingress")?
            .try_into()?;
        prog.load().context("loading balancer_ingress (verifier)")?;
        let mut k = Katran {
            ebpf,
            lrus: Vec::new(),
            reals: BTreeMap::new(),
        };
        k.fill()?;
        Ok(k)
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("Katran's object has no map {name}"))
    }

    /// What KatranLb does for three VIPs of 10 reals each: the measured VIPs of `xdp::apps`.
    fn fill(&mut self) -> Result<()> {
        let v4: Vec<SocketAddr> = xdp::backend_pool()[..SIZE.backends].to_vec();
        let v6: Vec<SocketAddr> = xdp::backend_pool6()[..SIZE.backends].to_vec();
        let vips = [
            (xdp::VIP, 6u8, &v4),
            (xdp::VIP, 17u8, &v4),
            (xdp::VIP6, 6u8, &v6),
        ];
        for (i, b) in v4.iter().chain(&v6).enumerate() {
            self.reals.insert(b.ip(), i as u32 + 1);
        }
        {
            let mut reals: Array<_, RealDefinition> = Array::try_from(self.map("reals")?)?;
            for (i, b) in v4.iter().chain(&v6).enumerate() {
                let id = i as u32 + 1;
                let flags = if b.is_ipv6() { F_IPV6 } else { 0 };
                let real = RealDefinition {
                    addr: addr16(b.ip()),
                    flags,
                    pad: [0; 3],
                };
                reals.set(id, real, 0)?;
            }
        }
        for (num, (vip, proto, backends)) in vips.iter().enumerate() {
            let names: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
            let ring = lbctl::maglev::table(&names, RING_SIZE, lbctl::maglev::DEFAULT_SEED);
            ensure!(
                ring.len() == RING_SIZE as usize,
                "Maglev ring of {} slots",
                ring.len()
            );
            let ids: Vec<u32> = backends.iter().map(|b| self.reals[&b.ip()]).collect();

            let mut rings: Array<_, u32> = Array::try_from(self.map("ch_rings")?)?;
            for (slot, backend) in ring.iter().enumerate() {
                rings.set(
                    num as u32 * RING_SIZE + slot as u32,
                    ids[*backend as usize],
                    0,
                )?;
            }
            let mut vip_map: HashMap<_, VipDefinition, VipMeta> =
                HashMap::try_from(self.map("vip_map")?)?;
            let key = VipDefinition {
                addr: addr16(vip.ip()),
                port: vip.port().to_be_bytes(),
                proto: *proto,
                pad: 0,
            };
            let meta = VipMeta {
                flags: 0,
                vip_num: num as u32,
            };
            vip_map.insert(key, meta, 0)?;
        }
        let mut ctl: Array<_, [u8; 8]> = Array::try_from(self.map("ctl_array")?)?;
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&ROUTER_MAC);
        ctl.set(0, mac, 0)?;
        // One LRU per CPU, as KatranLb creates for its forwarding cores.
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut lrus = Vec::new();
        for cpu in 0..cpus {
            let def = aya_obj::Map::new_from_params(
                BPF_MAP_TYPE_LRU_HASH,
                size_of::<FlowKey>() as u32,
                size_of::<RealPosLru>() as u32,
                FLOWS_HELD,
                0,
            );
            let lru = MapData::create(def, &format!("katran_lru{cpu}"), None)?;
            let mut mapping: ArrayOfMaps<_, MapData> =
                ArrayOfMaps::try_from(self.map("lru_mapping")?)?;
            mapping
                .set(cpu as u32, &lru, 0)
                .with_context(|| format!("lru_mapping[{cpu}]"))?;
            lrus.push(aya::maps::Map::LruHashMap(lru));
        }
        self.lrus = lrus;
        Ok(())
    }

    fn program(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(PROG)
            .context("no balancer_ingress")?
            .try_into()?)
    }

    /// Katran's global counter `MAX_VIPS + key`, summed over the CPUs.
    fn counter(&self, key: u32) -> Result<LbStats> {
        let stats: PerCpuArray<_, LbStats> =
            PerCpuArray::try_from(self.ebpf.map("stats").context("no stats map")?)?;
        let v = stats.get(&(MAX_VIPS + key), 0)?;
        Ok(v.iter().fold(LbStats::default(), |a, s| LbStats {
            v1: a.v1 + s.v1,
            v2: a.v2 + s.v2,
        }))
    }

    /// Starts a new second of Katran's new-connection rate limit (125,000 per second and CPU;
    /// above it Katran stops inserting new flows). The bench sends new flows faster than that in
    /// a burst; a balancer in service sees them spread over time.
    fn reset_flood_window(&mut self) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut stats: PerCpuArray<_, LbStats> = PerCpuArray::try_from(self.map("stats")?)?;
        let zero = PerCpuValues::try_from(vec![LbStats::default(); cpus])?;
        stats.set(MAX_VIPS + NEW_CONN_RATE_CNTR, zero, 0)?;
        Ok(())
    }

    /// The real id the flow of `frame` has in the LRU of `cpu`.
    fn lru_real(&self, cpu: usize, frame: &[u8]) -> Result<Option<u32>> {
        let (proto, src, dst) = packet::addresses(frame).context("own frame")?;
        let mut ports = [0u8; 4];
        ports[..2].copy_from_slice(&src.port().to_be_bytes());
        ports[2..].copy_from_slice(&dst.port().to_be_bytes());
        let key = FlowKey {
            src: addr16(src.ip()),
            dst: addr16(dst.ip()),
            ports,
            proto,
            pad: [0; 3],
        };
        let lru: HashMap<_, FlowKey, RealPosLru> =
            HashMap::try_from(self.lrus.get(cpu).context("no LRU for this CPU")?)?;
        match lru.get(&key, 0) {
            Ok(v) => Ok(Some(v.pos)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Checks Katran's output for a VIP packet: Ethernet to the router's MAC, an outer IPv4
/// (protocol 4) or IPv6 (next header 41) header to one of `reals`, the original packet after it.
fn check_encapsulated(frame: &[u8], out: &[u8], reals: &BTreeMap<IpAddr, u32>) -> Result<u32> {
    ensure!(
        out.len() > 14 && out[..6] == ROUTER_MAC,
        "not sent to the router's MAC"
    );
    let (outer, dst, inner_at) = match [out[12], out[13]] {
        [0x08, 0x00] => {
            let d: [u8; 4] = out[30..34].try_into()?;
            (out[23], IpAddr::from(d), 34)
        }
        [0x86, 0xdd] => {
            let d: [u8; 16] = out[38..54].try_into()?;
            (out[20], IpAddr::from(d), 54)
        }
        t => bail!("outer EtherType {t:02x?}"),
    };
    ensure!(
        outer == 4 || outer == 41,
        "outer protocol {outer}, not IP-in-IP"
    );
    ensure!(
        out[inner_at..] == frame[14..],
        "the inner packet is not the original one"
    );
    reals
        .get(&dst)
        .copied()
        .with_context(|| format!("encapsulated to {dst}, not a real of the VIP"))
}

/// The section: skipped, loudly, without a Katran object.
pub fn run(ws: &Path, plan: Plan) -> Result<Results> {
    let mut results = Results {
        object: None,
        lb_object: None,
        skipped: None,
        rounds: plan.rounds,
        packets: plan.packets,
        flows: plan.flows,
        rows: Vec::new(),
        checks: Vec::new(),
        programs: Vec::new(),
    };
    let object = match katran_obj::find(ws, plan.build) {
        Ok(o) => o,
        Err(why) => {
            eprintln!("bench: katran: SKIPPED, no Katran object: {why}");
            results.skipped = Some(why);
            return Ok(results);
        }
    };
    results.object = Some(object.origin.clone());
    let ns = Netns::new("kat")?;
    xdp::topology(&ns.name)?;
    let pins = Pins::new("kat");
    let dir = pins.dir.clone();
    let out = lbtest::in_netns(&ns.name, move || measure(&dir, &object, &plan, results));
    drop(pins);
    drop(ns);
    out
}

/// Names another build of this project's BPF object whose `lb_xdp` the Katran section measures
/// instead of the embedded one (its maps must have the same layouts): `LB_BENCH_KATRAN_LB_OBJECT=
/// FILE cargo xtask bench --only katran`. The report names the object.
pub const LB_OBJECT_ENV: &str = "LB_BENCH_KATRAN_LB_OBJECT";

/// The flows in use through the section: one tracked flow each over TCP, UDP and IPv6, the
/// many-flows case's and the sparse case's (a packet each per round). Besides them, each round
/// makes a new flow per SYN, which no packet follows.
fn flows_in_use(plan: &Plan) -> usize {
    3 + plan.flows + plan.packets
}

fn measure(dir: &Path, object: &Object, plan: &Plan, mut results: Results) -> Result<Results> {
    let cpu = std::thread::available_parallelism().map_or(0, |n| n.get() - 1);
    sys::pin_thread_to(cpu);
    let ifindex = [
        xdp::if_index(xdp::CLIENT_IF)?,
        xdp::if_index(xdp::BACKEND_IF)?,
    ];
    // Another build of this project's object in place of the embedded one, to compare variants
    // of it through Katran, the reference they are all measured against in their own runs.
    let other = xdp::object_from_env(LB_OBJECT_ENV)?;
    results.lb_object = other.as_ref().map(|(path, _)| path.clone());
    let bytes = other.as_ref().map(|(_, b)| b.as_slice());
    let in_use = flows_in_use(plan);
    ensure!(
        in_use <= FLOWS_HELD as usize,
        "the section keeps {in_use} flows in use, more than the {FLOWS_HELD} its tables are made for"
    );
    let table = xdp::table(SIZE)?
        .with_flows(FLOWS_HELD)
        .map_err(anyhow::Error::msg)?;
    let mut lb = Bench::load(dir, ifindex, &table, bytes)?;
    lb.apply(SIZE)?;
    let mut kat = Katran::load(&object.path)?;
    let mut programs = vec![(
        lb_common::PROG_XDP,
        lb.program(lb_common::PROG_XDP)?.info()?,
    )];
    // IPv6 frames go on to it (an older build of the object has none).
    if let Ok(half) = lb.program(lb_common::PROG_XDP6) {
        programs.push((lb_common::PROG_XDP6, half.info()?));
    }
    programs.push((PROG, kat.program()?.info()?));
    for (name, info) in programs {
        results.programs.push((
            name.to_string(),
            info.size_jitted(),
            info.verified_instruction_count(),
        ));
    }
    let run_kat = |k: &Katran, f: &[u8], out: Option<&mut Vec<u8>>| -> Result<Ran> {
        xdp::xdp_run(k.program()?, f, ifindex[0], out, 1)
    };
    // Tracked flows: the first packet through both (lb_xdp checks its own), then the next one.
    let establish = |lb: &mut Bench, kind: Kind, v6: bool, n: usize| -> Result<(Frames, Frames)> {
        let first = lb.frames(if kind == Kind::Udp { kind } else { Kind::Syn }, v6, n);
        let (next, replies) = lb.establish_from(kind, v6, &first)?;
        let mut out = Vec::new();
        for f in &first {
            let r = run_kat(&kat, f, Some(&mut out))?;
            ensure!(
                r.verdict == XDP_TX,
                "Katran: a new flow got {}",
                xdp::verdict_name(r.verdict)
            );
            check_encapsulated(f, &out, &kat.reals)?;
        }
        Ok((next, replies))
    };
    let (one, reply) = establish(&mut lb, Kind::Ack, false, 1)?;
    let (many, _) = establish(&mut lb, Kind::Ack, false, plan.flows)?;
    let (sparse, _) = establish(&mut lb, Kind::Ack, false, plan.packets)?;
    let (udp, _) = establish(&mut lb, Kind::Udp, false, 1)?;
    let (tcp6, reply6) = establish(&mut lb, Kind::Ack, true, 1)?;
    let cycle = |f: &Frames| -> Frames { f.iter().cycle().take(plan.packets).cloned().collect() };
    let backend = xdp::backend_pool()[0];
    let not_ours: Frames = (0..plan.packets)
        .map(|_| {
            let c = lb.new_client(false);
            packet::frame(
                Kind::Ack,
                c,
                backend,
                xdp::host_mac(1, 0),
                xdp::LB_CLIENT_MAC,
            )
        })
        .collect();
    let fixed = [
        (Case::TcpTracked, cycle(&one)),
        (Case::TcpTrackedMany, cycle(&many)),
        (Case::TcpTrackedSparse, sparse),
        (Case::UdpTracked, cycle(&udp)),
        (Case::Tcp6Tracked, cycle(&tcp6)),
        (Case::NotOurs, not_ours),
        (Case::Reply, cycle(&reply)),
        (Case::Reply6, cycle(&reply6)),
    ];
    // Each case once with its output checked, Katran's and lb_xdp's.
    let mut out = Vec::new();
    for (case, frames) in &fixed {
        let f = &frames[0];
        let (want_lb, want_kat) = case.expected();
        if case.katran() {
            let r = run_kat(&kat, f, Some(&mut out))?;
            ensure!(
                r.verdict == want_kat,
                "Katran, {case:?}: {}",
                xdp::verdict_name(r.verdict)
            );
            if want_kat == XDP_TX {
                check_encapsulated(f, &out, &kat.reals).with_context(|| format!("{case:?}"))?;
            } else {
                ensure!(out == *f, "Katran changed a passed packet");
            }
        }
        let r = lb.run(lb_common::PROG_XDP, f, case.ingress(), Some(&mut out), 1)?;
        ensure!(
            r.verdict == want_lb,
            "lb_xdp, {case:?}: {}",
            xdp::verdict_name(r.verdict)
        );
        if case.answers().is_some() {
            // From the VIP to the client the flow came from, checksums right.
            let (_, src, dst) = packet::addresses(&out).context("rewritten reply")?;
            let (_, _, client) = packet::addresses(f).context("own reply")?;
            let vip = if *case == Case::Reply6 {
                xdp::VIP6
            } else {
                xdp::VIP
            };
            ensure!(
                (src, dst) == (vip, client) && packet::checksums_ok(&out),
                "lb_xdp, {case:?}: {src} -> {dst}, not from {vip} to {client} with good checksums"
            );
        }
    }
    // Tracked flows stay with the real they were given.
    for f in [&one[0], &udp[0], &tcp6[0]] {
        let before = kat.lru_real(cpu, f)?;
        run_kat(&kat, f, Some(&mut out))?;
        let real = check_encapsulated(f, &out, &kat.reals)?;
        ensure!(
            before == Some(real),
            "Katran: a tracked flow moved ({before:?} -> {real})"
        );
    }

    #[derive(Default)]
    struct Acc {
        floor: Vec<f64>,
        lb: Vec<f64>,
        kat: Vec<f64>,
        lb_verdicts: BTreeMap<String, u64>,
        kat_verdicts: BTreeMap<String, u64>,
        floor_verdicts: BTreeMap<String, u64>,
    }
    let mean = |v: &[u32]| v.iter().map(|x| *x as f64).sum::<f64>() / v.len().max(1) as f64;
    let mut acc: BTreeMap<usize, Acc> = BTreeMap::new();
    let (mut misses, mut syn_misses, mut syn_in_lru) = (0u64, 0u64, 0usize);
    let fallback0 = kat.counter(FALLBACK_LRU_CNTR)?.v1;
    // When each slice of each round's sparse case started: a flow's packets are a round apart.
    let mut sparse_starts: Vec<Vec<std::time::Instant>> = Vec::new();
    let bound = std::time::Duration::from_nanos(lb_common::FLOW_CHECK_MAX_AGE_NS);
    let mut sparse_lb = BTreeMap::new();
    // A case's timings in one round, slice by slice.
    #[derive(Default)]
    struct Turns {
        lb: Vec<u32>,
        kat: Vec<u32>,
        floor: Vec<u32>,
        starts: Vec<std::time::Instant>,
    }
    for round in 0..plan.rounds {
        eprintln!("bench: katran: round {}/{}", round + 1, plan.rounds);
        let syn = lb.frames(Kind::Syn, false, plan.packets);
        for group in groups() {
            let mut slices = Vec::with_capacity(group.len());
            for case in &group {
                let frames: &[Vec<u8>] = match case {
                    Case::TcpSyn => &syn,
                    c => {
                        &fixed
                            .iter()
                            .find(|(x, _)| x == c)
                            .context("a case's frames")?
                            .1
                    }
                };
                slices.push(
                    frames
                        .chunks(frames.len().div_ceil(SLICES))
                        .collect::<Vec<_>>(),
                );
            }
            // Each case's index in `Case::ALL` (and `acc`).
            let cis = group
                .iter()
                .map(|case| Case::ALL.iter().position(|c| c == case).context("a case"))
                .collect::<Result<Vec<_>>>()?;
            let sparse = group.contains(&Case::TcpTrackedSparse);
            let counted = sparse.then(|| lb.counters()).transpose()?;
            let mut turns: Vec<Turns> = group.iter().map(|_| Turns::default()).collect();
            // The programs (and the cases of a group: a reply and the tracked packets it
            // answers) take turns on each slice of the round's packets, so that what else the
            // machine does at a moment weighs on all of them alike.
            for si in 0..SLICES {
                for (gi, case) in group.iter().enumerate() {
                    let Some(slice) = slices[gi].get(si).copied() else {
                        continue;
                    };
                    let a = acc.entry(cis[gi]).or_default();
                    let t = &mut turns[gi];
                    let name = xdp::verdict_name;
                    let ingress = case.ingress();
                    if *case == Case::TcpTrackedSparse {
                        // Each flow's packets further apart than the check bound (a wait of at
                        // most that bound), so that every packet of this case is a checked
                        // one: a slice holds the same flows in every round.
                        if let Some(last) = sparse_starts.last().and_then(|r| r.get(si)) {
                            let due = *last + bound + SPARSE_MARGIN;
                            std::thread::sleep(
                                due.saturating_duration_since(std::time::Instant::now()),
                            );
                        }
                        t.starts.push(std::time::Instant::now());
                    }
                    // One of the object's programs (`lb_xdp` or the floor) on the slice.
                    let ours = |prog: &str, verdicts: &mut BTreeMap<String, u64>| {
                        xdp::time_batch(
                            slice,
                            |f| lb.run(prog, f, ingress, None, 1),
                            verdicts,
                            name,
                        )
                    };
                    t.lb.extend(ours(lb_common::PROG_XDP, &mut a.lb_verdicts)?);
                    // Katran has no counterpart of a reply (`Case::katran`).
                    if case.katran() {
                        kat.reset_flood_window()?;
                        let before = kat.counter(LRU_CNTRS)?.v2;
                        t.kat.extend(xdp::time_batch(
                            slice,
                            |f| run_kat(&kat, f, None),
                            &mut a.kat_verdicts,
                            name,
                        )?);
                        let missed = kat.counter(LRU_CNTRS)?.v2 - before;
                        if *case == Case::TcpSyn {
                            syn_misses += missed;
                        } else {
                            misses += missed;
                        }
                    }
                    t.floor.extend(ours(xdp::FLOOR, &mut a.floor_verdicts)?);
                }
            }
            for (gi, case) in group.iter().enumerate() {
                let a = acc.entry(cis[gi]).or_default();
                let t = std::mem::take(&mut turns[gi]);
                a.lb.push(mean(&t.lb));
                a.floor.push(mean(&t.floor));
                if case.katran() {
                    a.kat.push(mean(&t.kat));
                }
                if *case == Case::TcpSyn {
                    // Katran inserted each new flow in this CPU's LRU (it was not over its
                    // limit).
                    for f in syn.iter().step_by((syn.len() / 100).max(1)) {
                        ensure!(
                            kat.lru_real(cpu, f)?.is_some(),
                            "Katran did not insert a new flow in its LRU"
                        );
                        syn_in_lru += 1;
                    }
                }
                if *case == Case::TcpTrackedSparse {
                    sparse_starts.push(t.starts);
                }
            }
            if let Some(before) = counted {
                for (k, v) in lb.counters()? {
                    *sparse_lb.entry(k).or_insert(0) += v - before.get(k).copied().unwrap_or(0);
                }
            }
        }
    }
    let fallback = kat.counter(FALLBACK_LRU_CNTR)?.v1 - fallback0;
    let syn_want = (plan.rounds * plan.packets) as u64;
    results.checks = vec![
        check(
            "Katran flow-table misses on tracked and passed packets",
            misses,
            0,
        ),
        check(
            "Katran flow-table misses on SYNs (new flows)",
            syn_misses,
            syn_want,
        ),
        check("Katran packets on its fallback LRU", fallback, 0),
        format!("Katran new flows found in its LRU after their SYN: {syn_in_lru} sampled, all"),
        check(
            "lb_xdp tracked packets (`forwarded`) in the sparse case",
            sparse_lb.get("forwarded").copied().unwrap_or(0),
            (plan.rounds * plan.packets) as u64,
        ),
        // A sparse flow gone from the table (taken for a new flow's slot) comes back as new.
        check(
            "lb_xdp sparse-case packets that found no flow (`new_flow`)",
            sparse_lb.get("new_flow").copied().unwrap_or(0),
            0,
        ),
    ];
    // The sparse case measures checked packets only if its flows' packets are further apart
    // than the check bound.
    let gap = sparse_starts
        .windows(2)
        .flat_map(|w| w[0].iter().zip(&w[1]).map(|(a, b)| *b - *a))
        .min()
        .unwrap_or_default();
    results.checks.push(if plan.rounds < 2 || gap > bound {
        format!(
            "sparse case: shortest time between a flow's packets {:.1} s (lb_xdp checks a flow \
             whose last check is older than {:.0} s)",
            gap.as_secs_f64(),
            bound.as_secs_f64()
        )
    } else {
        format!(
            "MISMATCH: sparse case: a flow's packets only {:.2} s apart, within the check bound",
            gap.as_secs_f64()
        )
    });
    for (ci, case) in Case::ALL.iter().enumerate() {
        let a = &acc[&ci];
        let (want_lb, want_kat) = case.expected();
        let katran = case
            .katran()
            .then_some(("Katran", &a.kat_verdicts, want_kat));
        for (who, v, want) in [
            Some(("lb_xdp", &a.lb_verdicts, want_lb)),
            katran,
            Some(("lb_floor", &a.floor_verdicts, XDP_PASS)),
        ]
        .into_iter()
        .flatten()
        {
            ensure!(
                !v.is_empty() && v.keys().all(|k| *k == xdp::verdict_name(want)),
                "{who}, {case:?}: verdicts {v:?}, expected {}",
                xdp::verdict_name(want)
            );
        }
        let per_round =
            |over: &[f64]| -> Vec<f64> { a.lb.iter().zip(over).map(|(l, k)| l / k).collect() };
        let (katran, ratio) = if case.katran() {
            (
                Some(Summary::of(&a.kat).context("no rounds")?),
                Some(Summary::of(&per_round(&a.kat)).context("no rounds")?),
            )
        } else {
            (None, None)
        };
        let over_tracked = match case.answers() {
            Some(t) => {
                let ti = Case::ALL.iter().position(|c| *c == t).context("a case")?;
                Some(Summary::of(&per_round(&acc[&ti].lb)).context("no rounds")?)
            }
            None => None,
        };
        results.rows.push(Row {
            case: *case,
            floor: Summary::of(&a.floor).context("no rounds")?,
            lb: Summary::of(&a.lb).context("no rounds")?,
            katran,
            ratio,
            over_tracked,
            lb_verdicts: a.lb_verdicts.clone(),
            katran_verdicts: a.kat_verdicts.clone(),
        });
    }
    Ok(results)
}

fn check(what: &str, got: u64, want: u64) -> String {
    if got == want {
        format!("{what}: {got}")
    } else {
        format!("MISMATCH: {what}: {got}, expected {want}")
    }
}

/// The section of BENCHMARKS.md.
pub fn markdown(o: &mut String, s: &super::Section<Results>) {
    use super::report::num;
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "\n## Beside Katran (per packet, BPF_PROG_TEST_RUN)\n\n\
         Katran's `balancer_ingress` (facebookincubator/katran at {}, built by the bench with \
         Katran's own recipe, `katran/lib/Makefile-bpf`, and clang-19, outside the sources) and \
         this project's `lb_xdp`, in one process, on the same packets: `repeat` = 1 once per \
         packet on a fresh copy, ingress interface set; a round's packets of a case in {} \
         slices, `lb_xdp`, Katran and the floor taking turns slice by slice; per round the mean \
         of the kernel's durations, then the median of the rounds (spread in brackets). \
         `lb_xdp`: 3 services (a VIP in TCP and UDP, an IPv6 VIP), 10 backends each, filled by \
         the real control plane; it \
         rewrites and looks the next hop up (XDP_REDIRECT). Katran: the same VIPs with 10 reals \
         each, a 65,537-slot Maglev ring per VIP, one LRU per CPU; it encapsulates (IPIP) and \
         returns XDP_TX to a fixed MAC. Both flow tables are made for {} flows (`lb_xdp`'s \
         `flow_table_size`, Katran's LRU of the measuring CPU): more than the flows in use (the \
         tracked cases'), fewer than those and the SYN case's new flows (one per SYN per round), \
         so each table must take new flows and keep the ones in use, as in a SYN flood (the \
         checks below count what each lost). \
         Both outputs and verdicts are checked before the timing, every verdict during it. The \
         floor is `lb_floor` (returns XDP_PASS) on the same packets. The two reply cases, a \
         backend's answer in the one-flow cases' flows (it comes in on the backends' side), have \
         no Katran counterpart (Katran's backends answer clients directly): lb_xdp and the floor \
         only, and below the table each reply's cost over that of the tracked packet it answers, \
         round by round (the goal: at most 1).\n",
        katran_obj::COMMIT,
        SLICES,
        super::report::num(FLOWS_HELD as f64, 0)
    );
    if super::report::missing(o, s) {
        return;
    }
    let Some(r) = &s.result else {
        return;
    };
    if let Some(why) = &r.skipped {
        let _ = writeln!(
            o,
            "**Katran was not measured in this run: {why}.** Without a Katran object this \
             section is skipped; set `{}` to a Katran source tree or git directory, or `{}` to a \
             built `balancer.bpf.o`.\n",
            katran_obj::SRC_ENV,
            katran_obj::OBJECT_ENV
        );
        return;
    }
    let _ = writeln!(
        o,
        "Object: {}. {} rounds of {} packets per case.\n\n\
         | case | floor ns | lb_xdp ns | Katran ns | lb_xdp / Katran |\n|---|---|---|---|---|",
        match &r.lb_object {
            Some(lb) => format!(
                "{}; lb_xdp from {lb} ({LB_OBJECT_ENV}), not the embedded object",
                r.object.as_deref().unwrap_or("?")
            ),
            None => r.object.as_deref().unwrap_or("?").to_string(),
        },
        r.rounds,
        num(r.packets as f64, 0)
    );
    let cell = |s: &Summary| format!("{} ({}–{})", num(s.p50, 0), num(s.min, 0), num(s.max, 0));
    let ratio = |s: &Summary| format!("{} ({}–{})", num(s.p50, 2), num(s.min, 2), num(s.max, 2));
    let or_dash =
        |s: &Option<Summary>, f: &dyn Fn(&Summary) -> String| s.as_ref().map_or("–".into(), f);
    for row in &r.rows {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} |",
            row.case.describe(r.flows, r.packets),
            num(row.floor.p50, 0),
            cell(&row.lb),
            or_dash(&row.katran, &cell),
            or_dash(&row.ratio, &ratio)
        );
    }
    let _ = writeln!(o);
    for row in &r.rows {
        if let (Some(over), Some(t)) = (&row.over_tracked, row.case.answers()) {
            let _ = writeln!(
                o,
                "- lb_xdp, {} over {}, round by round: {}",
                row.case.describe(r.flows, r.packets),
                t.describe(r.flows, r.packets),
                ratio(over)
            );
        }
    }
    for (name, jited, verified) in &r.programs {
        let _ = writeln!(
            o,
            "- `{name}`: JITed {} bytes, {} instructions verified.",
            num(*jited as f64, 0),
            verified.map_or("–".into(), |v| num(v as f64, 0))
        );
    }
    for c in &r.checks {
        let _ = writeln!(o, "- {c}");
    }
    let _ = writeln!(o);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_case_is_measured_once_and_replies_beside_what_they_answer() {
        let groups = groups();
        for case in Case::ALL {
            let holding: Vec<_> = groups.iter().filter(|g| g.contains(&case)).collect();
            assert_eq!(holding.len(), 1, "{case:?} in {} groups", holding.len());
            assert_eq!(holding[0].iter().filter(|c| **c == case).count(), 1);
            if let Some(tracked) = case.answers() {
                assert!(
                    holding[0].contains(&tracked),
                    "{case:?} without {tracked:?}"
                );
            }
        }
        // The sparse case waits between its slices: alone, it makes no other case wait.
        assert!(groups.contains(&vec![Case::TcpTrackedSparse]));
    }
}
