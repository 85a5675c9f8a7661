//! Per-packet cost of the XDP program, measured with BPF_PROG_TEST_RUN against the trivial
//! `lb_floor` on the same packets, at several sizes of the service tables, for IPv4 and IPv6;
//! and of the TC program (`lb_tc`, the same stages on a socket buffer) against `lb_tc_floor`.
//! The maps are filled only by the real control plane: `marathon::derive` of a generated
//! document, then `dataplane::Writer::apply`.
use super::{
    doc::{self, App},
    packet::{self, Kind, Mac},
    stats::Summary,
    sys::{self, Netns, Pins},
};
use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    maps::{MapData, MapInfo},
    programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use lb_common::{LIMIT_SERVICES, Stat};
use lbctl::dataplane::TableConfig;
use serde::Serialize;
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    time::Instant,
};

pub const FLOOR: &str = "lb_floor";
/// The TC floor: returns TC_ACT_OK.
pub const TC_FLOOR: &str = "lb_tc_floor";
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Distinct IPv4 backend addresses the generated services draw from.
pub const BACKEND_POOL: usize = 3000;
/// IPv6 backend addresses (the IPv6 VIP's backends). Both families share the backend ids.
pub const BACKEND_POOL6: usize = 1000;
/// Client addresses with neighbour entries (198.18.0.2 ..., 2001:2::2 ...).
const CLIENTS: u32 = 200;
pub const VIP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(172, 16, 0, 1), 8080));
/// In fc00::/7, a default VIP range, as the project's IPv6 tests use.
pub const VIP6: SocketAddr = SocketAddr::V6(SocketAddrV6::new(
    Ipv6Addr::new(0xfd00, 0x172, 0x16, 0, 0, 0, 0, 1),
    8080,
    0,
    0,
));
pub const LB_CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0x00, 0x01];
const LB_BACKEND_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x01];
pub const CLIENT_IF: &str = "bc";
pub const BACKEND_IF: &str = "bb";

/// One size of the tables.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Size {
    /// Services in the maps: the measured IPv4 VIP's port is TCP and UDP (two services), the
    /// measured IPv6 VIP is TCP (one); the rest are IPv4 TCP services of other apps.
    pub services: usize,
    /// Backends of every service.
    pub backends: usize,
}

pub struct Plan {
    pub sizes: Vec<Size>,
    /// Rounds; in each, every case runs its batch once, in turn.
    pub rounds: usize,
    /// Distinct packets per case per round, each run once.
    pub batch: usize,
    /// `repeat` of the runs whose output is of the same class as their input (see `Amortized`).
    pub repeat: u32,
}

/// The kinds of packet measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Case {
    Floor,
    TcpNew,
    TcpEstablished,
    UdpNew,
    UdpEstablished,
    Reply,
    NotOurs,
    Tcp6New,
    Tcp6Established,
    Reply6,
    TcFloor,
    TcTcpNew,
    TcTcpEstablished,
    TcReply,
}

impl Case {
    pub const ALL: [Case; 14] = [
        Case::Floor,
        Case::TcpNew,
        Case::TcpEstablished,
        Case::UdpNew,
        Case::UdpEstablished,
        Case::Reply,
        Case::NotOurs,
        Case::Tcp6New,
        Case::Tcp6Established,
        Case::Reply6,
        Case::TcFloor,
        Case::TcTcpNew,
        Case::TcTcpEstablished,
        Case::TcReply,
    ];

    /// A case of the TC program (measured against `TcFloor`).
    pub fn is_tc(self) -> bool {
        matches!(
            self,
            Case::TcFloor | Case::TcTcpNew | Case::TcTcpEstablished | Case::TcReply
        )
    }

    /// What the case's verdict `v` means for its hook.
    fn verdict_name(self, v: u32) -> String {
        if !self.is_tc() {
            return verdict_name(v);
        }
        match v {
            TC_ACT_OK => "TC_ACT_OK".into(),
            TC_ACT_REDIRECT => "TC_ACT_REDIRECT".into(),
            v => format!("TC verdict {v}"),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Case::Floor => "`lb_floor` (returns XDP_PASS) on the new-TCP-flow packets",
            Case::TcpNew => {
                "TCP SYN to the VIP, a new flow each (Maglev pick, 1 flow-table insert: a lean flow, rewrite, FIB)"
            }
            Case::TcpEstablished => {
                "TCP ACK to the VIP of a tracked flow (flow-table hit, rewrite, FIB)"
            }
            Case::UdpNew => "UDP datagram to the VIP, a new flow each",
            Case::UdpEstablished => "UDP datagram to the VIP of a tracked flow",
            Case::Reply => {
                "TCP ACK from a backend to a client, reverse-translated to come from the VIP"
            }
            Case::NotOurs => {
                "TCP ACK from a client to a backend's address (no VIP, no reply): passed"
            }
            Case::Tcp6New => "IPv6: TCP SYN to the IPv6 VIP, a new flow each",
            Case::Tcp6Established => "IPv6: TCP ACK to the IPv6 VIP of a tracked flow",
            Case::Reply6 => "IPv6: TCP ACK from a backend to a client, reverse-translated",
            Case::TcFloor => {
                "`lb_tc_floor` (returns TC_ACT_OK) on the new-TCP-flow packets, as a socket buffer"
            }
            Case::TcTcpNew => "TC: TCP SYN to the VIP, a new flow each",
            Case::TcTcpEstablished => "TC: TCP ACK to the VIP of a tracked flow",
            Case::TcReply => "TC: TCP ACK from a backend to a client, reverse-translated",
        }
    }

    fn expected(self) -> u32 {
        match self {
            Case::Floor | Case::NotOurs => XDP_PASS,
            Case::TcFloor => TC_ACT_OK,
            Case::TcTcpNew | Case::TcTcpEstablished | Case::TcReply => TC_ACT_REDIRECT,
            _ => XDP_REDIRECT,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub case: Case,
    /// The median ns per packet of each round.
    pub round_medians_ns: Vec<f64>,
    /// Of the rounds' medians.
    pub ns: Summary,
    /// Every packet of every round.
    pub per_packet_ns: Summary,
    /// This case's median over the floor's median, round by round.
    pub ratio_to_floor: Summary,
    /// This case's median minus the floor's, round by round.
    pub above_floor_ns: Summary,
    /// Verdicts returned, by name, with counts.
    pub verdicts: BTreeMap<String, u64>,
    pub packets: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct MapMemory {
    pub name: String,
    pub id: u32,
    pub max_entries: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub flags: u32,
    /// `memlock` of /proc/self/fdinfo of the map's descriptor, in bytes.
    pub memlock: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SizeResult {
    pub size: Size,
    /// Slots of each service's Maglev table in this data plane.
    pub ring_size: u32,
    pub apps: usize,
    pub memberships: usize,
    pub distinct_backends: usize,
    pub derive_ms: f64,
    pub apply_ms: f64,
    pub maps: Vec<MapMemory>,
    pub maps_memlock: u64,
    pub cases: Vec<CaseResult>,
    /// Counter checks: that each "new" packet was a new flow, each "established" one a hit, ...
    pub checks: Vec<String>,
}

/// `repeat` runs in one BPF_PROG_TEST_RUN on one packet whose output is of its input's class
/// (passed untouched), so every repetition does the same work: the kernel's per-run overhead is
/// amortized.
#[derive(Clone, Debug, Serialize)]
pub struct Amortized {
    pub program: String,
    pub case: Case,
    pub repeat: u32,
    /// ns per run of each round.
    pub ns: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgramSize {
    pub name: String,
    pub jited_bytes: u32,
    pub verified_instructions: Option<u32>,
    pub memlock: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub rounds: usize,
    pub batch: usize,
    pub sizes: Vec<SizeResult>,
    pub amortized: Vec<Amortized>,
    pub programs: Vec<ProgramSize>,
    /// The same sizes measured with another build of the object, when `BASELINE_ENV` names one.
    pub baseline: Option<Baseline>,
}

/// Names another build of the BPF object (a file) to measure beside the embedded one, size by
/// size in the same run (after it, with the same packets' kinds): `LB_BENCH_BASELINE_OBJECT=
/// target/base/lb-ebpf cargo xtask bench --only xdp`. Its maps must have the same layouts.
pub const BASELINE_ENV: &str = "LB_BENCH_BASELINE_OBJECT";

/// The BPF object file the environment variable `var` names, as (its path, its bytes), if set.
pub fn object_from_env(var: &str) -> Result<Option<(String, Vec<u8>)>> {
    let Some(p) = std::env::var_os(var) else {
        return Ok(None);
    };
    let bytes = std::fs::read(&p).with_context(|| format!("reading {var}={}", p.display()))?;
    Ok(Some((p.to_string_lossy().into_owned(), bytes)))
}

/// The measurements of the baseline object.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    /// Where the object was read from.
    pub object: String,
    pub sizes: Vec<SizeResult>,
    pub programs: Vec<ProgramSize>,
}

/// The data plane a size is measured with.
pub fn table(s: Size) -> Result<TableConfig> {
    super::lb_table(
        s.services,
        BACKEND_POOL + BACKEND_POOL6,
        s.services * s.backends,
    )
}

/// Checks a size against what the generated document and the data plane can hold.
pub fn fits(s: Size) -> bool {
    s.services >= 3
        && s.services <= LIMIT_SERVICES as usize
        && s.backends <= BACKEND_POOL6
        && table(s).is_ok_and(|t| s.backends as u32 <= t.size)
}

pub fn run(plan: Plan) -> Result<Results> {
    for s in &plan.sizes {
        ensure!(fits(*s), "{s:?} does not fit the data plane's limits");
    }
    let baseline = object_from_env(BASELINE_ENV)?;
    let ns = Netns::new("pkt")?;
    topology(&ns.name)?;
    // Everything runs on one thread inside the namespace: the program's FIB lookups and the
    // ingress interface of each test run are resolved in the caller's namespace.
    let out = lbtest::in_netns(&ns.name, move || -> Result<Results> {
        sys::pin_thread_to(std::thread::available_parallelism().map_or(0, |n| n.get() - 1));
        let ifindex = [if_index(CLIENT_IF)?, if_index(BACKEND_IF)?];
        let mut out = Results {
            rounds: plan.rounds,
            batch: plan.batch,
            sizes: Vec::new(),
            amortized: Vec::new(),
            programs: Vec::new(),
            baseline: baseline.as_ref().map(|(path, _)| Baseline {
                object: path.clone(),
                sizes: Vec::new(),
                programs: Vec::new(),
            }),
        };
        for (i, size) in plan.sizes.iter().enumerate() {
            eprintln!(
                "bench: xdp: {} services x {} backends",
                size.services, size.backends
            );
            let pins = Pins::new(&format!("pkt{i}"));
            let mut bench = Bench::load(&pins.dir, ifindex, &table(*size)?, None)?;
            if i == 0 {
                out.programs = bench.program_sizes()?;
                out.amortized = bench.amortized(plan.rounds, plan.repeat)?;
            }
            out.sizes.push(bench.measure(*size, &plan)?);
            drop(bench);
            drop(pins);
            if let (Some((_, object)), Some(b)) = (&baseline, out.baseline.as_mut()) {
                eprintln!("bench: xdp: the same with the baseline object");
                let pins = Pins::new(&format!("pkt{i}b"));
                let mut bench = Bench::load(&pins.dir, ifindex, &table(*size)?, Some(object))?;
                if i == 0 {
                    b.programs = bench.program_sizes()?;
                }
                b.sizes.push(bench.measure(*size, &plan)?);
            }
        }
        Ok(out)
    });
    drop(ns);
    out
}

/// The load balancer's two interfaces (veth pairs whose far ends stay in the namespace) and
/// permanent neighbours for every client and backend address, so that the program's FIB lookups
/// succeed and each packet is forwarded as on a live interface.
pub fn topology(ns: &str) -> Result<()> {
    for (dev, mac, addr, addr6) in [
        (CLIENT_IF, LB_CLIENT_MAC, "198.18.0.1/24", "2001:2::1/64"),
        (
            BACKEND_IF,
            LB_BACKEND_MAC,
            "198.19.0.1/16",
            "2001:2:0:1::1/64",
        ),
    ] {
        let peer = format!("{dev}p");
        let mac = mac_str(mac);
        sys::run(&[
            "ip", "-n", ns, "link", "add", dev, "address", &mac, "type", "veth", "peer", "name",
            &peer,
        ])?;
        sys::run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev])?;
        sys::run(&["ip", "-n", ns, "addr", "add", addr6, "dev", dev, "nodad"])?;
        sys::run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        sys::run(&["ip", "-n", ns, "link", "set", &peer, "up"])?;
    }
    sys::in_ns(ns, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
    sys::in_ns(
        ns,
        &["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"],
    )?;
    let mut batch = String::new();
    let mut neigh = |dev: &str, a: IpAddr, mac: Mac| {
        batch.push_str(&format!(
            "neigh add {a} lladdr {} dev {dev} nud permanent\n",
            mac_str(mac)
        ));
    };
    for i in 0..CLIENTS {
        for v6 in [false, true] {
            neigh(CLIENT_IF, client_addr(v6, i), host_mac(1, i as usize));
        }
    }
    for (i, b) in backend_pool().iter().chain(&backend_pool6()).enumerate() {
        neigh(BACKEND_IF, b.ip(), host_mac(2, i));
    }
    sys::run_with_input(&["ip", "-n", ns, "-batch", "-"], Some(&batch))?;
    Ok(())
}

/// The `i`-th client address: 198.18.0.2 ..., or 2001:2::2 ... (RFC 5180's benchmarking
/// prefixes, as the project's tests use).
fn client_addr(v6: bool, i: u32) -> IpAddr {
    let k = 2 + i % CLIENTS;
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, k as u16))
    } else {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, k as u8))
    }
}

/// The IPv4 backend addresses services draw from: 198.19.0.2:8080, ... (250 per /24).
pub fn backend_pool() -> Vec<SocketAddr> {
    (0..BACKEND_POOL)
        .map(|i| {
            let a = Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 2) as u8);
            SocketAddr::new(IpAddr::V4(a), 8080)
        })
        .collect()
}

/// The IPv6 VIP's backend addresses: [2001:2:0:1::2]:8080, ...
pub fn backend_pool6() -> Vec<SocketAddr> {
    (0..BACKEND_POOL6)
        .map(|i| {
            let a = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2 + i as u16);
            SocketAddr::new(IpAddr::V6(a), 8080)
        })
        .collect()
}

pub fn host_mac(kind: u8, i: usize) -> Mac {
    [0x02, 0, kind, 0, (i >> 8) as u8, i as u8]
}

fn mac_str(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn if_index(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: if_nametoindex(3) reads a C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface {name} in the bench namespace"),
        i => Ok(i),
    }
}

/// The apps of one size: the measured apps (VIP 172.16.0.1:8080 in TCP and UDP, VIP
/// [fd00:172:16::1]:8080 in TCP) and IPv4 TCP apps for the other services, each with `backends`
/// tasks drawn in turn from the pools.
pub fn apps(size: Size) -> Vec<App> {
    let pool = backend_pool();
    let pick = |app: usize| -> Vec<SocketAddr> {
        (0..size.backends)
            .map(|j| pool[(app * size.backends + j) % pool.len()])
            .collect()
    };
    let mut apps = vec![
        App {
            id: "/bench/measured".into(),
            vip: VIP,
            protocol: "udp,tcp",
            tasks: pick(0),
        },
        App {
            id: "/bench/measured6".into(),
            vip: VIP6,
            protocol: "tcp",
            tasks: backend_pool6()[..size.backends].to_vec(),
        },
    ];
    for i in 1..size.services - 2 {
        apps.push(App {
            id: format!("/bench/app{i}"),
            vip: SocketAddr::new(IpAddr::V4(doc::vip_addr(i)), 8080),
            protocol: "tcp",
            tasks: pick(i),
        });
    }
    apps
}

/// The loaded object, with both programs, and the interfaces' indexes.
pub struct Bench<'a> {
    ebpf: aya::Ebpf,
    dir: &'a Path,
    ifindex: [u32; 2],
    /// Sequence number of the next new flow.
    next_flow: u32,
}

/// What `Bench::apply` did.
pub struct Applied {
    pub apps: usize,
    pub derive_ms: f64,
    pub apply_ms: f64,
    pub memberships: usize,
    pub distinct_backends: usize,
}

/// Frames, each a packet.
pub type Frames = Vec<Vec<u8>>;

/// Per case: each round's median, every packet's duration, the verdicts.
type Samples = BTreeMap<usize, (Vec<f64>, Vec<u32>, BTreeMap<String, u64>)>;

/// The context of an XDP test run: a frame of `len` bytes arriving on interface `ifindex`.
pub fn xdp_ctx(ifindex: u32, len: usize) -> Vec<u8> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex.
    [0, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|w: &u32| w.to_ne_bytes())
        .collect()
}

/// Runs the XDP program `prog` (of any object) `repeat` times on `frame` arriving on interface
/// `ifindex`, the output frame into `out` when given: BPF_PROG_TEST_RUN with the kernel's
/// duration.
pub fn xdp_run(
    prog: &Xdp,
    frame: &[u8],
    ifindex: u32,
    out: Option<&mut Vec<u8>>,
    repeat: u32,
) -> Result<Ran> {
    test_run(prog, frame, &xdp_ctx(ifindex, frame.len()), out, repeat)
}

/// One BPF_PROG_TEST_RUN of `prog` (XDP or TC) on `frame` with context `ctx`.
fn test_run<P>(
    prog: &P,
    frame: &[u8],
    ctx: &[u8],
    out: Option<&mut Vec<u8>>,
    repeat: u32,
) -> Result<Ran>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut buf = out;
    if let Some(b) = buf.as_mut() {
        b.resize(frame.len() + 256, 0);
    }
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: buf.as_mut().map(|b| b.as_mut_slice()),
        ctx_in: Some(ctx),
        repeat,
        ..TestRunOptions::new()
    };
    let r = prog.test_run(opts)?;
    if let Some(b) = buf {
        b.truncate(r.data_size_out as usize);
    }
    Ok(Ran {
        verdict: r.return_value,
        ns: r.duration.as_nanos().min(u32::MAX as u128) as u32,
    })
}

/// Runs `run` once on each frame, in order: the kernel's duration of each, and the verdicts
/// counted by `name`. The one timing loop of the per-packet sections.
pub fn time_batch(
    frames: &[Vec<u8>],
    mut run: impl FnMut(&[u8]) -> Result<Ran>,
    verdicts: &mut BTreeMap<String, u64>,
    name: impl Fn(u32) -> String,
) -> Result<Vec<u32>> {
    let mut round = Vec::with_capacity(frames.len());
    for f in frames {
        let r = run(f)?;
        *verdicts.entry(name(r.verdict)).or_default() += 1;
        round.push(r.ns);
    }
    Ok(round)
}

/// One test run's result.
pub struct Ran {
    pub verdict: u32,
    pub ns: u32,
}

impl<'a> Bench<'a> {
    /// Loads the embedded object, or `object`.
    pub fn load(
        dir: &'a Path,
        ifindex: [u32; 2],
        table: &TableConfig,
        object: Option<&[u8]>,
    ) -> Result<Bench<'a>> {
        let mut ebpf = match object {
            Some(o) => lbctl::dataplane::load_object(dir, table, o),
            None => lbctl::dataplane::load_with(dir, table),
        }
        .context("loading the data plane")?;
        let floor: &mut Xdp = ebpf
            .program_mut(FLOOR)
            .context("the object has no lb_floor")?
            .try_into()?;
        floor.load().context("loading lb_floor")?;
        let tc_floor: &mut SchedClassifier = ebpf
            .program_mut(TC_FLOOR)
            .context("the object has no lb_tc_floor")?
            .try_into()?;
        tc_floor.load().context("loading lb_tc_floor")?;
        Ok(Bench {
            ebpf,
            dir,
            ifindex,
            next_flow: 0,
        })
    }

    pub fn program(&self, name: &str) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?)
    }

    fn program_sizes(&self) -> Result<Vec<ProgramSize>> {
        [
            lb_common::PROG_XDP,
            lb_common::PROG_XDP6,
            lb_common::PROG_XDP_PMTU,
            FLOOR,
            lb_common::PROG_TC,
            lb_common::PROG_TC6,
            lb_common::PROG_TC_PMTU,
            TC_FLOOR,
        ]
        .iter()
        // An older build of the object has no IPv6 halves nor path-MTU programs.
        .filter(|name| self.ebpf.program(name).is_some())
        .map(|name| {
            let info = match self.tc_program(name) {
                Some(p) => p?.info()?,
                None => self.program(name)?.info()?,
            };
            Ok(ProgramSize {
                name: name.to_string(),
                jited_bytes: info.size_jitted(),
                verified_instructions: info.verified_instruction_count(),
                memlock: info.memory_locked().ok(),
            })
        })
        .collect()
    }

    /// A new client endpoint each call: 200 addresses, then the next port.
    pub fn new_client(&mut self, v6: bool) -> SocketAddr {
        let i = self.next_flow;
        self.next_flow += 1;
        SocketAddr::new(client_addr(v6, i), 1024 + ((i / CLIENTS) % 64_000) as u16)
    }

    /// The TC program `name`, if it names one.
    fn tc_program(&self, name: &str) -> Option<Result<&SchedClassifier>> {
        [
            lb_common::PROG_TC,
            lb_common::PROG_TC6,
            lb_common::PROG_TC_PMTU,
            TC_FLOOR,
        ]
        .contains(&name)
        .then(|| {
            Ok(self
                .ebpf
                .program(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?)
        })
    }

    /// Runs `prog` on `frame` arriving on interface `ingress` (0 client side, 1 backend side).
    pub fn run(
        &self,
        prog: &str,
        frame: &[u8],
        ingress: usize,
        out: Option<&mut Vec<u8>>,
        repeat: u32,
    ) -> Result<Ran> {
        let ifindex = self.ifindex[ingress];
        match self.tc_program(prog).transpose()? {
            // A socket buffer arriving on the interface.
            Some(tc) => test_run(
                tc,
                frame,
                &lbtest::pktlab::skb_context(ifindex),
                out,
                repeat,
            ),
            None => xdp_run(self.program(prog)?, frame, ifindex, out, repeat),
        }
    }

    /// `n` frames from new clients to the IPv4 or IPv6 VIP.
    pub fn frames(&mut self, kind: Kind, v6: bool, n: usize) -> Frames {
        let vip = if v6 { VIP6 } else { VIP };
        (0..n)
            .map(|_| {
                let c = self.new_client(v6);
                packet::frame(kind, c, vip, host_mac(1, 0), LB_CLIENT_MAC)
            })
            .collect()
    }

    /// Sends each frame once through the load balancer (creating its flow) and returns, for each,
    /// the packet of the same flow that follows it: the client's next one (`Kind::Ack` or
    /// `Kind::Udp`), and the backend's reply to the client.
    fn establish(&mut self, kind: Kind, v6: bool, n: usize) -> Result<(Frames, Frames)> {
        let first = self.frames(if kind == Kind::Ack { Kind::Syn } else { kind }, v6, n);
        self.establish_from(kind, v6, &first)
    }

    /// `establish` with the first packets given (new flows to the IPv4 or IPv6 VIP).
    pub fn establish_from(
        &mut self,
        kind: Kind,
        v6: bool,
        first: &Frames,
    ) -> Result<(Frames, Frames)> {
        let vip = if v6 { VIP6 } else { VIP };
        let n = first.len();
        let (mut next, mut replies) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut out = Vec::new();
        for f in first {
            let r = self.run(lb_common::PROG_XDP, f, 0, Some(&mut out), 1)?;
            ensure!(
                r.verdict == XDP_REDIRECT,
                "a new flow got verdict {}",
                verdict_name(r.verdict)
            );
            ensure!(
                packet::checksums_ok(&out),
                "a rewritten packet has a bad checksum"
            );
            let (_, client, _) = packet::addresses(f).context("own frame")?;
            let (_, _, backend) = packet::addresses(&out).context("rewritten frame")?;
            next.push(packet::frame(
                kind,
                client,
                vip,
                host_mac(1, 0),
                LB_CLIENT_MAC,
            ));
            replies.push(packet::frame(
                kind,
                backend,
                client,
                host_mac(2, 0),
                LB_BACKEND_MAC,
            ));
        }
        Ok((next, replies))
    }

    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        let maps = lbctl::dataplane::Maps::open(self.dir)?;
        Ok(maps
            .stats()?
            .into_iter()
            .map(|(s, v)| (s.name(), v))
            .collect())
    }

    /// Fills the maps through the real control plane with the apps of `size`.
    pub fn apply(&mut self, size: Size) -> Result<Applied> {
        let apps = apps(size);
        let text = doc::document(&apps);
        let opts = lbctl::marathon::Options::default();
        let t = Instant::now();
        let (_, derived) = lbctl::marathon::derive(&text, "bench", &opts)?;
        let derive_ms = t.elapsed().as_secs_f64() * 1e3;
        ensure!(derived.problems.is_empty(), "{:?}", derived.problems);
        ensure!(
            derived.services.len() == size.services,
            "derived {} services, wanted {}",
            derived.services.len(),
            size.services
        );
        let mut writer = lbctl::dataplane::Writer::open(self.dir)?;
        let t = Instant::now();
        let applied = writer.apply(&derived.services);
        let apply_ms = t.elapsed().as_secs_f64() * 1e3;
        ensure!(
            applied.failed.is_empty(),
            "apply failed: {:?}",
            applied.failed
        );
        Ok(Applied {
            apps: apps.len(),
            derive_ms,
            apply_ms,
            memberships: derived.services.values().map(|s| s.backends.len()).sum(),
            distinct_backends: writer.state().backend_ids.len(),
        })
    }

    fn measure(&mut self, size: Size, plan: &Plan) -> Result<SizeResult> {
        let Applied {
            apps,
            derive_ms,
            apply_ms,
            memberships,
            distinct_backends,
        } = self.apply(size)?;
        let ring_size = lbctl::dataplane::Maps::open(self.dir)?.table()?.size;
        let maps = map_memory(self.dir)?;

        let n = plan.batch;
        let before = self.counters()?;
        let (tcp_est, replies) = self.establish(Kind::Ack, false, n)?;
        let (udp_est, _) = self.establish(Kind::Udp, false, n)?;
        let (tcp6_est, replies6) = self.establish(Kind::Ack, true, n)?;
        let not_ours: Frames = (0..n)
            .map(|i| {
                let c = self.new_client(false);
                let b = backend_pool()[i % size.backends];
                packet::frame(Kind::Ack, c, b, host_mac(1, 0), LB_CLIENT_MAC)
            })
            .collect();
        let mut samples = Samples::new();
        for round in 0..plan.rounds {
            let syn = self.frames(Kind::Syn, false, n);
            let udp = self.frames(Kind::Udp, false, n);
            let syn6 = self.frames(Kind::Syn, true, n);
            let syn_tc = self.frames(Kind::Syn, false, n);
            // Each round starts one case further along the list than the round before, so that
            // no case always runs after the same one (with the caches that one left).
            let cases = Case::ALL.len();
            for ci in (0..cases).map(|i| (i + round) % cases) {
                let case = &Case::ALL[ci];
                let (prog, frames, ingress) = match case {
                    Case::Floor => (FLOOR, &syn, 0),
                    Case::TcpNew => (lb_common::PROG_XDP, &syn, 0),
                    Case::TcpEstablished => (lb_common::PROG_XDP, &tcp_est, 0),
                    Case::UdpNew => (lb_common::PROG_XDP, &udp, 0),
                    Case::UdpEstablished => (lb_common::PROG_XDP, &udp_est, 0),
                    Case::Reply => (lb_common::PROG_XDP, &replies, 1),
                    Case::NotOurs => (lb_common::PROG_XDP, &not_ours, 0),
                    Case::Tcp6New => (lb_common::PROG_XDP, &syn6, 0),
                    Case::Tcp6Established => (lb_common::PROG_XDP, &tcp6_est, 0),
                    Case::Reply6 => (lb_common::PROG_XDP, &replies6, 1),
                    Case::TcFloor => (TC_FLOOR, &syn_tc, 0),
                    Case::TcTcpNew => (lb_common::PROG_TC, &syn_tc, 0),
                    Case::TcTcpEstablished => (lb_common::PROG_TC, &tcp_est, 0),
                    Case::TcReply => (lb_common::PROG_TC, &replies, 1),
                };
                let entry = samples.entry(ci).or_default();
                let round = time_batch(
                    frames,
                    |f| self.run(prog, f, ingress, None, 1),
                    &mut entry.2,
                    |v| case.verdict_name(v),
                )?;
                entry
                    .0
                    .push(Summary::of_u32(&round).context("empty batch")?.p50);
                entry.1.extend(round);
            }
        }
        let after = self.counters()?;
        let checks = check_counters(&before, &after, n as u64, plan.rounds as u64);
        let index = |c: Case| Case::ALL.iter().position(|x| *x == c).unwrap_or(0);
        let xdp_floor = samples[&index(Case::Floor)].0.clone();
        let tc_floor = samples[&index(Case::TcFloor)].0.clone();
        let mut cases = Vec::new();
        for (ci, case) in Case::ALL.iter().enumerate() {
            let floor = if case.is_tc() { &tc_floor } else { &xdp_floor };
            let (medians, all, verdicts) = &samples[&ci];
            let ratio: Vec<f64> = medians.iter().zip(floor).map(|(c, f)| c / f).collect();
            let above: Vec<f64> = medians.iter().zip(floor).map(|(c, f)| c - f).collect();
            let unexpected: u64 = verdicts
                .iter()
                .filter(|(v, _)| **v != case.verdict_name(case.expected()))
                .map(|(_, c)| c)
                .sum();
            ensure!(
                unexpected == 0,
                "{case:?}: unexpected verdicts {verdicts:?} (expected {})",
                case.verdict_name(case.expected())
            );
            cases.push(CaseResult {
                case: *case,
                round_medians_ns: medians.clone(),
                ns: Summary::of(medians).context("no rounds")?,
                per_packet_ns: Summary::of_u32(all).context("no packets")?,
                ratio_to_floor: Summary::of(&ratio).context("no rounds")?,
                above_floor_ns: Summary::of(&above).context("no rounds")?,
                verdicts: verdicts.clone(),
                packets: all.len(),
            });
        }
        Ok(SizeResult {
            size,
            ring_size,
            apps,
            memberships,
            distinct_backends,
            derive_ms,
            apply_ms,
            maps_memlock: maps.iter().map(|m| m.memlock).sum(),
            maps,
            cases,
            checks,
        })
    }

    /// The floor and the not-ours packet with `repeat` runs per test run: both pass the packet
    /// untouched, so each repetition sees the same input. (A VIP packet would be rewritten by
    /// the first run and be a different case in the next ones, so VIP cases use repeat 1.)
    fn amortized(&mut self, rounds: usize, repeat: u32) -> Result<Vec<Amortized>> {
        let c = self.new_client(false);
        let pool = backend_pool();
        let frames = [
            (
                FLOOR,
                Case::Floor,
                packet::frame(Kind::Syn, c, VIP, host_mac(1, 0), LB_CLIENT_MAC),
            ),
            (
                FLOOR,
                Case::NotOurs,
                packet::frame(Kind::Ack, c, pool[0], host_mac(1, 0), LB_CLIENT_MAC),
            ),
            (
                lb_common::PROG_XDP,
                Case::NotOurs,
                packet::frame(Kind::Ack, c, pool[0], host_mac(1, 0), LB_CLIENT_MAC),
            ),
        ];
        let mut out = Vec::new();
        for (prog, case, f) in frames {
            let mut ns = Vec::new();
            for _ in 0..rounds {
                let r = self.run(prog, &f, 0, None, repeat)?;
                ensure!(
                    r.verdict == XDP_PASS,
                    "{prog} on {case:?}: {}",
                    verdict_name(r.verdict)
                );
                ns.push(r.ns as f64);
            }
            out.push(Amortized {
                program: prog.to_string(),
                case,
                repeat,
                ns: Summary::of(&ns).context("no rounds")?,
            });
        }
        Ok(out)
    }
}

/// The counters must show exactly what the cases claim to measure: every "new" packet a new
/// flow, every "established" packet a tracked one, every reply translated.
fn check_counters(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
    n: u64,
    rounds: u64,
) -> Vec<String> {
    let delta = |s: Stat| {
        after.get(s.name()).copied().unwrap_or(0) - before.get(s.name()).copied().unwrap_or(0)
    };
    // Set up: 3n new flows (TCP, UDP, TCP over IPv6). Each round: new TCP, UDP and IPv6 TCP
    // flows, tracked TCP, UDP and IPv6 TCP packets, IPv4 and IPv6 replies (n each, all
    // redirected), and n packets not for a VIP; then through TC new TCP flows, tracked TCP
    // packets and replies (n each, redirected).
    let want = [
        (Stat::NewFlow, 3 * n + rounds * 4 * n),
        (Stat::Forwarded, rounds * 4 * n),
        (Stat::Reply, rounds * 3 * n),
        (Stat::PassNotOurs, rounds * n),
        (Stat::Redirect, 3 * n + rounds * 11 * n),
        (Stat::RewrittenToStack, 0),
        (Stat::DropFlowTable, 0),
    ];
    want.iter()
        .map(|(s, w)| {
            let got = delta(*s);
            if got == *w {
                format!("{} {got}", s.name())
            } else {
                format!("MISMATCH: {} {got}, expected {w}", s.name())
            }
        })
        .collect()
}

pub fn verdict_name(v: u32) -> String {
    match v {
        XDP_DROP => "DROP".into(),
        XDP_PASS => "PASS".into(),
        XDP_TX => "TX".into(),
        XDP_REDIRECT => "REDIRECT".into(),
        v => format!("verdict {v}"),
    }
}

/// What `lb_tables_v2`'s chunks of tables (its inner maps, pinned only through it) are listed
/// as.
pub const TABLES_ROW: &str = "lb_tables_v2's chunks";

/// Kernel memory of every map pinned in `dir` (an older object may lack some), then of the
/// chunks of Maglev tables the outer map `lb_tables_v2` holds, as one row (`TABLES_ROW`: max
/// entries is then the number of chunks).
pub fn map_memory(dir: &Path) -> Result<Vec<MapMemory>> {
    let mut out = lbctl::dataplane::MAPS
        .iter()
        .map(|m| m.name)
        .filter(|name| dir.join(name).exists())
        .map(|name| {
            let info = MapInfo::from_pin(dir.join(name))
                .with_context(|| format!("opening the pinned map {name}"))?;
            let fd = info.fd()?;
            Ok(MapMemory {
                name: name.to_string(),
                id: info.id(),
                max_entries: info.max_entries(),
                key_size: info.key_size(),
                value_size: info.value_size(),
                flags: info.map_flags(),
                memlock: memlock(fd.as_fd().as_raw_fd())?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let path = dir.join(lb_common::MAP_TABLES);
    if path.exists() {
        let outer: aya::maps::ArrayOfMaps<_, MapData> =
            aya::maps::Map::from_map_data(MapData::from_pin(&path)?)?.try_into()?;
        let mut row = MapMemory {
            name: TABLES_ROW.to_string(),
            id: 0,
            max_entries: 0,
            key_size: 4,
            value_size: 0,
            flags: lb_common::TABLE_FLAGS,
            memlock: 0,
        };
        for i in 0..outer.len() {
            let table = match outer.get(&i, 0) {
                Ok(t) => t,
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e).context("reading lb_tables_v2"),
            };
            row.max_entries += 1;
            row.value_size = table.info()?.value_size();
            row.memlock += memlock(table.fd().as_fd().as_raw_fd())?;
        }
        out.push(row);
    }
    Ok(out)
}

/// `memlock` of /proc/self/fdinfo of map descriptor `fd`: the map's kernel memory.
fn memlock(fd: i32) -> Result<u64> {
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    sys::field(&fdinfo, "memlock")
        .and_then(|v| v.parse().ok())
        .context("no memlock in fdinfo")
}
