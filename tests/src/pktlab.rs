//! A sandbox for running the real XDP or TC program on single packets with BPF_PROG_TEST_RUN: one
//! network namespace whose routes and neighbours answer the program's FIB lookups, and the
//! program loaded with its maps pinned in a directory of its own. The maps are filled only by the
//! control plane (`marathon::derive`, `dataplane::Writer`). Dropping the `PacketLab` removes the
//! pins and the namespace, also when a test panics.
use crate::{
    in_netns,
    packet::{Frame, Mac},
    reference, sh, sh_quiet,
};
use aya::{
    maps::{HashMap, Map, MapData},
    programs::{
        TestRun, TestRunOptions, Xdp,
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use aya_obj::programs::XdpAttachType;
use lb_common::{
    BackendKey, BackendKey6, BackendVips, BackendVips6, Flow, Flow6, FlowEntry, MAP_BACKEND_VIPS,
    MAP_BACKEND_VIPS6, MAP_FLOWS, MAP_FLOWS6, MAP_REPLIES, MAP_REPLIES6, ReplyEntry, ReplyEntry6,
    STAT_COUNT, Stat,
};
use lbctl::{
    dataplane::{self, Applied, FlowTable, Maps, TableConfig, Writer},
    model::{BackendState, Proto, Vip},
};
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
};

/// TC verdicts (`Hook::Tc`): TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// Which of the two programs a `Dataplane` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `lb_xdp`, with an `xdp_md` context.
    Xdp,
    /// `lb_tc`, with a `__sk_buff` context (the kernel makes a socket buffer of the frame; its
    /// checksum state is CHECKSUM_NONE: BPF_PROG_TEST_RUN offers no CHECKSUM_PARTIAL).
    Tc,
}

/// The TC verdict for the same outcome as XDP verdict `xdp`: passed (XDP_PASS), dropped, or sent
/// out of an interface (XDP_TX and XDP_REDIRECT are both a redirect in TC).
pub fn tc_verdict(xdp: u32) -> u32 {
    match xdp {
        XDP_PASS => TC_ACT_OK,
        XDP_DROP => TC_ACT_SHOT,
        XDP_TX | XDP_REDIRECT => TC_ACT_REDIRECT,
        other => panic!("no TC verdict for XDP verdict {other}"),
    }
}

/// XDP verdicts.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The load balancer's interface towards clients (198.18.0.1/24, 2001:2::1/64) and towards
/// backends (198.18.1.1/24, 2001:2:0:1::1/64), with fixed MAC addresses. The IPv6 addresses are
/// from the benchmarking prefix 2001:2::/48 (RFC 5180).
pub const CLIENT_SIDE: Side = Side {
    name: "pk-c",
    mac: [0x02, 0, 0, 0, 0x00, 0x01],
    addr: "198.18.0.1/24",
    net: Ipv4Addr::new(198, 18, 0, 0),
    addr6: "2001:2::1/64",
    net6: Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0),
};
pub const BACKEND_SIDE: Side = Side {
    name: "pk-b",
    mac: [0x02, 0, 0, 0, 0x01, 0x01],
    addr: "198.18.1.1/24",
    net: Ipv4Addr::new(198, 18, 1, 0),
    addr6: "2001:2:0:1::1/64",
    net6: Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0),
};

pub struct Side {
    pub name: &'static str,
    pub mac: Mac,
    pub addr: &'static str,
    /// The /24 it is on.
    pub net: Ipv4Addr,
    pub addr6: &'static str,
    /// The /64 it is on.
    pub net6: Ipv6Addr,
}

impl Side {
    fn holds(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => a.octets()[..3] == self.net.octets()[..3],
            IpAddr::V6(a) => a.octets()[..8] == self.net6.octets()[..8],
        }
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

const fn v6(net: u16, host: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, net, 0, 0, 0, host))
}

/// Permanent neighbour entries: two clients and three backends, each with an IPv4 and an IPv6
/// address. Any other address of the networks (198.18.0.9, 2001:2:0:1::9, ...) has none, so the
/// FIB answers "no neighbour".
pub const NEIGHBOURS: [(IpAddr, Mac); 10] = [
    (v4(198, 18, 0, 2), [0x02, 0, 0, 0, 0x00, 0x02]),
    (v4(198, 18, 0, 3), [0x02, 0, 0, 0, 0x00, 0x03]),
    (v4(198, 18, 1, 2), [0x02, 0, 0, 0, 0x01, 0x02]),
    (v4(198, 18, 1, 3), [0x02, 0, 0, 0, 0x01, 0x03]),
    (v4(198, 18, 1, 4), [0x02, 0, 0, 0, 0x01, 0x04]),
    (v6(0, 2), [0x02, 0, 0, 0, 0x00, 0x02]),
    (v6(0, 3), [0x02, 0, 0, 0, 0x00, 0x03]),
    (v6(1, 2), [0x02, 0, 0, 0, 0x01, 0x02]),
    (v6(1, 3), [0x02, 0, 0, 0, 0x01, 0x03]),
    (v6(1, 4), [0x02, 0, 0, 0, 0x01, 0x04]),
];

/// The interfaces' MTU: a longer IP total length makes the FIB answer "fragmentation needed".
pub const MTU: usize = 1500;

/// Where a packet to `dst` leaves when the FIB has a complete answer: the interface, and the MAC
/// addresses (source, destination) it gets.
pub fn next_hop(dst: impl Into<IpAddr>) -> Option<(&'static Side, Mac, Mac)> {
    let dst = dst.into();
    let (_, mac) = NEIGHBOURS.iter().find(|(a, _)| *a == dst)?;
    let side = [&CLIENT_SIDE, &BACKEND_SIDE]
        .into_iter()
        .find(|s| s.holds(dst))?;
    Some((side, side.mac, *mac))
}

/// How a rewritten packet to `dst` that arrived on `ingress` leaves when the FIB has a complete
/// answer: the verdict, the counter, and its new source and destination MAC addresses.
pub fn departure(ingress: Ingress, dst: impl Into<IpAddr>) -> Option<(u32, Stat, Mac, Mac)> {
    let (side, src_mac, dst_mac) = next_hop(dst)?;
    let same = match ingress {
        Ingress::Client => side.name == CLIENT_SIDE.name,
        Ingress::Backend => side.name == BACKEND_SIDE.name,
        Ingress::Loopback => false,
    };
    Some(if same {
        (XDP_TX, Stat::Tx, src_mac, dst_mac)
    } else {
        (XDP_REDIRECT, Stat::Redirect, src_mac, dst_mac)
    })
}

/// Whether the kernel's FIB helper forwards from `src` to `dst` at all: for IPv6 it answers "not
/// forwarded" when either is multicast, link-local or loopback (`rt6_need_strict` in
/// `bpf_ipv6_fib_lookup`), so such packets go to the stack; IPv4 has no such rule.
pub fn fib_forwards(src: IpAddr, dst: IpAddr) -> bool {
    let strict = |a: IpAddr| match a {
        IpAddr::V4(_) => false,
        IpAddr::V6(a) => a.is_multicast() || a.is_unicast_link_local() || a.is_loopback(),
    };
    !strict(src) && !strict(dst)
}

/// Which interface a test packet arrives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingress {
    /// No context given: test_run makes the namespace's loopback the ingress device.
    Loopback,
    Client,
    Backend,
}

pub struct PacketLab {
    pub ns: String,
    pub dir: PathBuf,
}

impl PacketLab {
    /// Builds namespace `name` and pin directory /sys/fs/bpf/`name`, first removing what a
    /// killed earlier run may have left under those names.
    pub fn new(name: &str) -> PacketLab {
        assert!(
            name.starts_with("lbt-pkt"),
            "packet labs are named lbt-pkt*"
        );
        let lab = PacketLab {
            ns: name.to_string(),
            dir: PathBuf::from(format!("/sys/fs/bpf/{name}")),
        };
        lab.remove();
        let ns = lab.ns.as_str();
        sh(&["ip", "netns", "add", ns]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        // IPv6: also the default for interfaces made later; the IPv6 FIB lookup asks the
        // ingress device.
        for setting in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            sh(&["ip", "netns", "exec", ns, "sysctl", "-q", "-w", setting]);
        }
        for side in [&CLIENT_SIDE, &BACKEND_SIDE] {
            let peer = format!("{}p", side.name);
            let mac = mac_str(side.mac);
            sh(&[
                "ip", "-n", ns, "link", "add", side.name, "address", &mac, "type", "veth", "peer",
                "name", &peer,
            ]);
            sh(&["ip", "-n", ns, "addr", "add", side.addr, "dev", side.name]);
            sh(&[
                "ip", "-n", ns, "-6", "addr", "add", side.addr6, "dev", side.name, "nodad",
            ]);
            sh(&["ip", "-n", ns, "link", "set", side.name, "up"]);
            sh(&["ip", "-n", ns, "link", "set", &peer, "up"]);
        }
        for (addr, mac) in NEIGHBOURS {
            let dev = next_hop(addr).expect("neighbours are on a side").0.name;
            let family = if addr.is_ipv6() { "-6" } else { "-4" };
            sh(&[
                "ip",
                "-n",
                ns,
                family,
                "neigh",
                "add",
                &addr.to_string(),
                "lladdr",
                &mac_str(mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        lab
    }

    /// The interface index of `side` in the namespace.
    pub fn ifindex(&self, side: &Side) -> u32 {
        let out = sh(&["ip", "-n", &self.ns, "-j", "link", "show", "dev", side.name]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j link");
        v[0]["ifindex"].as_u64().expect("ifindex") as u32
    }

    /// Runs `f` on a thread inside the namespace (so that the program's FIB lookups see its
    /// routes), with the program loaded and its maps pinned in this lab's directory.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Dataplane) -> T + Send + 'static,
    ) -> T {
        self.run_with(TableConfig::default(), f)
    }

    /// `run` with a data plane of other sizes.
    pub fn run_with<T: Send + 'static>(
        &self,
        table: TableConfig,
        f: impl FnOnce(&mut Dataplane) -> T + Send + 'static,
    ) -> T {
        let dir = self.dir.clone();
        let ifindex = [self.ifindex(&CLIENT_SIDE), self.ifindex(&BACKEND_SIDE)];
        in_netns(&self.ns, move || {
            let mut dp = Dataplane::load(&dir, ifindex, &table);
            f(&mut dp)
        })
    }

    fn remove(&self) {
        if self.dir.exists() {
            let _ = dataplane::down(&self.dir);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if Path::new("/run/netns").join(&self.ns).exists() {
            sh_quiet(&["ip", "netns", "del", &self.ns]);
        }
    }
}

impl Drop for PacketLab {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The array map `name` pinned in `dir`, opened from its pin.
pub fn pinned_array<T: aya::Pod>(dir: &Path, name: &str) -> aya::maps::Array<MapData, T> {
    let data = MapData::from_pin(dir.join(name)).unwrap_or_else(|e| panic!("{name} pinned: {e}"));
    aya::maps::Array::try_from(Map::Array(data)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Sets the flow tables' counters under pressure (`lb_ftpres_v1` pinned in `dir`) to
/// `values`, each on every CPU, as the programs would have counted them: for the tests of what
/// reads them (a resize's copy, `lbctl status`, the agent's warning). The programs' counting is
/// tested where a pair of buckets is made full of flows in use (`tests/flow_table.rs`).
pub fn set_flow_pressure(dir: &Path, values: [u64; lb_common::FLOW_PRESSURE_COUNT as usize]) {
    use aya::maps::{PerCpuArray, PerCpuValues};
    let name = lb_common::MAP_FLOW_PRESSURE;
    let data = MapData::from_pin(dir.join(name)).unwrap_or_else(|e| panic!("{name} pinned: {e}"));
    let mut m: PerCpuArray<_, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let cpus = aya::util::nr_cpus().expect("CPUs");
    for (i, v) in values.into_iter().enumerate() {
        m.set(
            i as u32,
            PerCpuValues::try_from(vec![v; cpus]).expect("values"),
            0,
        )
        .unwrap_or_else(|e| panic!("writing {name}: {e}"));
    }
}

/// The word of a `lb_vipf_v1` of `words` words and the bit there of IPv4 VIP `vip`.
pub fn vip_bit(vip: SocketAddrV4, words: u32) -> (u32, u64) {
    lb_common::vip_filter_bit(u32::from(*vip.ip()).to_be(), vip.port().to_be(), words)
}

/// The words of the VIP filter pinned in `dir` (the programs use it with its size).
pub fn vip_filter_words(dir: &Path) -> u32 {
    lb_common::vip_filter_words_in(pinned_array::<u64>(dir, lb_common::MAP_VIP_FILTER).len())
}

/// Whether IPv4 VIP `vip`'s bit is set in the VIP filter pinned in `dir`.
pub fn vip_marked(dir: &Path, vip: SocketAddrV4) -> bool {
    let (word, bit) = vip_bit(vip, vip_filter_words(dir));
    pinned_array::<u64>(dir, lb_common::MAP_VIP_FILTER)
        .get(&word, 0)
        .expect("a word of lb_vipf_v1")
        & bit
        != 0
}

/// Sets (`on`) or clears IPv4 VIP `vip`'s bit in the VIP filter pinned in `dir`, as a writer
/// other than the agent would (an older agent, a failed clear); returns whether it was set.
pub fn set_vip_bit(dir: &Path, vip: SocketAddrV4, on: bool) -> bool {
    let (word, bit) = vip_bit(vip, vip_filter_words(dir));
    let mut map = pinned_array::<u64>(dir, lb_common::MAP_VIP_FILTER);
    let had = map.get(&word, 0).expect("a word of lb_vipf_v1");
    let want = if on { had | bit } else { had & !bit };
    map.set(word, want, 0).expect("writing lb_vipf_v1");
    had & bit != 0
}

/// "02:00:00:00:00:01".
pub fn mac_str(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One test run's result.
#[derive(Debug)]
pub struct Run {
    pub verdict: u32,
    pub out: Vec<u8>,
}

/// A backend's record of its VIPs (`lb_bevip_v1`).
#[derive(Debug)]
pub struct Record {
    /// Its slot.
    pub id: u32,
    /// How many VIPs it serves.
    pub served: u32,
    /// Those named: address, protocol.
    pub vips: Vec<(SocketAddr, u8)>,
    /// No lean flow to a VIP of a protocol it serves several of can hold it
    /// (`lb_common::BACKEND_NO_LEAN`).
    pub no_lean: bool,
}

/// The loaded program and the control plane's handles on its maps.
pub struct Dataplane {
    ebpf: aya::Ebpf,
    writer: Writer,
    maps: Maps,
    replies: HashMap<MapData, Flow, ReplyEntry>,
    replies6: HashMap<MapData, Flow6, ReplyEntry6>,
    flows: FlowTable<Flow>,
    flows6: FlowTable<Flow6>,
    backend_vips: HashMap<MapData, BackendKey, BackendVips>,
    backend_vips6: HashMap<MapData, BackendKey6, BackendVips6>,
    /// Interface indexes of the client and backend sides.
    ifindex: [u32; 2],
    /// The program `run` runs.
    hook: Hook,
}

impl Dataplane {
    fn load(dir: &Path, ifindex: [u32; 2], table: &TableConfig) -> Dataplane {
        let ebpf = dataplane::load_with(dir, table).expect("loading the XDP program");
        Dataplane {
            ebpf,
            writer: Writer::open(dir).expect("opening the maps for writing"),
            maps: Maps::open(dir).expect("opening the maps"),
            replies: open_hash(dir, MAP_REPLIES),
            replies6: open_hash(dir, MAP_REPLIES6),
            flows: FlowTable::open(dir, MAP_FLOWS).expect("opening lb_ct_v3"),
            flows6: FlowTable::open(dir, MAP_FLOWS6).expect("opening lb_ct6_v5"),
            backend_vips: open_hash(dir, MAP_BACKEND_VIPS),
            backend_vips6: open_hash(dir, MAP_BACKEND_VIPS6),
            ifindex,
            hook: Hook::Xdp,
        }
    }

    /// The agent's own writer, for a test that builds the wanted state itself.
    pub fn writer(&mut self) -> &mut Writer {
        &mut self.writer
    }

    /// The control plane's reading side.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The loaded object, for the maps that are not pinned (the programs' own caches).
    pub fn ebpf(&self) -> &aya::Ebpf {
        &self.ebpf
    }

    /// Derives Marathon document `doc` and writes it with the agent's own writer; any problem in
    /// the document or failure to write is a test failure.
    pub fn apply(&mut self, doc: &str) -> Applied {
        let opts = lbctl::marathon::Options::default();
        let (_, derived) = lbctl::marathon::derive(doc, "fixture", &opts).expect("document");
        assert!(derived.problems.is_empty(), "{:?}\n{doc}", derived.problems);
        let applied = self.writer.apply(&derived.services);
        assert!(applied.failed.is_empty(), "{applied:?}");
        applied
    }

    pub fn ifindex(&self, ingress: Ingress) -> u32 {
        match ingress {
            Ingress::Loopback => 1,
            Ingress::Client => self.ifindex[0],
            Ingress::Backend => self.ifindex[1],
        }
    }

    /// Makes `run` run the program of `hook` (both share the maps).
    pub fn set_hook(&mut self, hook: Hook) {
        self.hook = hook;
    }

    /// The program `run` runs.
    pub fn hook(&self) -> Hook {
        self.hook
    }

    /// Runs the program of this data plane's hook once on `pkt` arriving on `ingress`.
    pub fn run(
        &mut self,
        pkt: &[u8],
        ingress: Ingress,
    ) -> Result<Run, aya::programs::ProgramError> {
        let ctx: Vec<u8> = match self.hook {
            Hook::Tc => skb_context(self.ifindex(ingress)),
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
            // egress_ifindex. test_run wants data 0 and data_end the packet's length.
            Hook::Xdp => [0, pkt.len() as u32, 0, self.ifindex(ingress), 0, 0]
                .iter()
                .flat_map(|w: &u32| w.to_ne_bytes())
                .collect(),
        };
        let mut out = vec![0u8; pkt.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            // XDP from the loopback device: no context at all.
            ctx_in: (self.hook == Hook::Tc || ingress != Ingress::Loopback).then_some(&ctx[..]),
            ..TestRunOptions::new()
        };
        let r = match self.hook {
            Hook::Xdp => dataplane::xdp_program(&mut self.ebpf)
                .expect("the XDP program")
                .test_run(opts)?,
            Hook::Tc => dataplane::tc_program(&mut self.ebpf)
                .expect("the TC program")
                .test_run(opts)?,
        };
        out.truncate(r.data_size_out as usize);
        Ok(Run {
            verdict: r.return_value,
            out,
        })
    }

    /// The counters, summed over CPUs, indexed by `Stat`.
    pub fn stats(&self) -> [u64; STAT_COUNT as usize] {
        let mut out = [0; STAT_COUNT as usize];
        for (s, v) in self.maps.stats().expect("reading the counters") {
            out[s as usize] = v;
        }
        out
    }

    /// The backend a new flow from `src` to `vip` must get, of the VIP's address type: computed
    /// by the independent `reference` from the service's active backends as the writer wrote them
    /// and the data plane's table size and seed, never by the code under test. The control
    /// plane's own answer (`Maps::pick`, reading the kernel's table) must agree. None when the
    /// VIP is not a service, has no active backend, or `src` is of the other family.
    pub fn pick<A: Endpoint>(&self, vip: A, proto: u8, src: impl Into<SocketAddr>) -> Option<A> {
        let (src, to) = (src.into(), vip.into());
        let key = Vip {
            addr: to,
            proto: Proto::from_number(proto).expect("tcp or udp"),
        };
        let active: Vec<SocketAddr> = self
            .writer
            .state()
            .services
            .get(&key)
            .map(|s| {
                s.backends
                    .iter()
                    .filter(|(_, (_, state))| *state == BackendState::Active)
                    .map(|(a, _)| *a)
                    .collect()
            })
            .unwrap_or_default();
        let table = self.writer.table();
        let want = (src.is_ipv4() == to.is_ipv4())
            .then(|| reference::backend_for(src, to, proto, &active, table.size, table.seed))
            .flatten();
        let control = self.maps.pick(&key, src).expect("reading the maps");
        assert_eq!(
            control, want,
            "{src} -> {key}: the control plane's Maps::pick disagrees with the reference"
        );
        let b = want?;
        Some(A::of(b).unwrap_or_else(|| panic!("backend {b} of another family than {key}")))
    }

    /// The VIP the kernel's reply translation for a backend -> client 5-tuple names: its
    /// reverse entry, or the entry of a lean flow found through the backend's record of its
    /// VIPs, in the order the program looks (`nat::reply_of`).
    pub fn reply_vip(&self, tuple: Tuple) -> Option<SocketAddr> {
        let (backend, client, proto) = tuple;
        let record = self.backend_vips(backend);
        let lean = |vips: &[SocketAddr], id: u32| {
            vips.iter().copied().find(|v| {
                self.flow_entry((client, *v, proto))
                    .is_some_and(|e| e.backend() == id)
            })
        };
        let mine: Vec<SocketAddr> = record
            .as_ref()
            .map(|r| {
                let of_proto: Vec<SocketAddr> = r
                    .vips
                    .iter()
                    .filter(|(_, p)| *p == proto)
                    .map(|(v, _)| *v)
                    .collect();
                if r.served as usize > lb_common::BACKEND_VIPS {
                    Vec::new()
                } else {
                    of_proto
                }
            })
            .unwrap_or_default();
        if let (Some(r), [one]) = (record.as_ref(), mine.as_slice())
            && let Some(v) = lean(&[*one], r.id)
        {
            return Some(v);
        }
        let reverse = self.reverse_vip(tuple);
        if reverse.is_some() || mine.len() == 1 {
            return reverse;
        }
        let r = record?;
        let all: Vec<SocketAddr> = r
            .vips
            .iter()
            .filter(|(_, p)| *p == proto)
            .map(|(v, _)| *v)
            .collect();
        lean(&all, r.id)
    }

    /// The VIP the reverse entry of a backend -> client 5-tuple names (`lb_nat_v1`).
    pub fn reverse_vip(&self, tuple: Tuple) -> Option<SocketAddr> {
        match kernel_flow(tuple) {
            KernelFlow::V4(f) => self.replies.get(&f, 0).ok().map(|r| {
                let addr = Ipv4Addr::from(u32::from_be(r.vip_addr));
                SocketAddr::V4(SocketAddrV4::new(addr, u16::from_be(r.vip_port)))
            }),
            KernelFlow::V6(f) => self.replies6.get(&f, 0).ok().map(|r| {
                let addr = Ipv6Addr::from(words_octets(r.vip_addr));
                SocketAddr::V6(SocketAddrV6::new(addr, u16::from_be(r.vip_port), 0, 0))
            }),
        }
    }

    /// A backend's record of its VIPs (`lb_bevip_v1`).
    pub fn backend_vips(&self, backend: SocketAddr) -> Option<Record> {
        match backend {
            SocketAddr::V4(b) => {
                let key = BackendKey {
                    addr: u32::from(*b.ip()).to_be(),
                    port: b.port().to_be(),
                    _pad: 0,
                };
                let r = self.backend_vips.get(&key, 0).ok()?;
                let named = r.vips.iter().take(r.served() as usize).map(|k| {
                    let ip = Ipv4Addr::from(u32::from_be(k.addr));
                    (
                        SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(k.port))),
                        k.proto,
                    )
                });
                Some(Record {
                    id: r.id,
                    served: r.served(),
                    vips: named.collect(),
                    no_lean: r.no_lean(),
                })
            }
            SocketAddr::V6(b) => {
                let key = BackendKey6 {
                    addr: octets_words(b.ip().octets()),
                    port: b.port().to_be(),
                    _pad: 0,
                };
                let r = self.backend_vips6.get(&key, 0).ok()?;
                let named = r.vips.iter().take(r.served() as usize).map(|k| {
                    let ip = Ipv6Addr::from(words_octets(k.addr));
                    let v = SocketAddrV6::new(ip, u16::from_be(k.port), 0, 0);
                    (SocketAddr::V6(v), k.proto)
                });
                Some(Record {
                    id: r.id,
                    served: r.served(),
                    vips: named.collect(),
                    no_lean: r.no_lean(),
                })
            }
        }
    }

    /// Where an IPv4 TCP segment from a client went (its rewritten destination); it must be
    /// redirected.
    pub fn sent_to(&mut self, from: SocketAddrV4, to: SocketAddrV4, flags: u8) -> SocketAddrV4 {
        let r = self
            .run(&Frame::tcp(from, to, flags).build(), Ingress::Client)
            .expect("run");
        assert_eq!(r.verdict, XDP_REDIRECT, "{from} -> {to}");
        SocketAddrV4::new(
            Ipv4Addr::new(r.out[30], r.out[31], r.out[32], r.out[33]),
            u16::from_be_bytes([r.out[36], r.out[37]]),
        )
    }

    /// What a client sees as the source of an IPv4 TCP segment from a backend; it must be
    /// redirected.
    pub fn seen_from(
        &mut self,
        backend: SocketAddrV4,
        to: SocketAddrV4,
        flags: u8,
    ) -> SocketAddrV4 {
        let r = self
            .run(&Frame::tcp(backend, to, flags).build(), Ingress::Backend)
            .expect("run");
        assert_eq!(r.verdict, XDP_REDIRECT, "{backend} -> {to}");
        SocketAddrV4::new(
            Ipv4Addr::new(r.out[26], r.out[27], r.out[28], r.out[29]),
            u16::from_be_bytes([r.out[34], r.out[35]]),
        )
    }

    /// The flow entry of a client -> VIP 5-tuple.
    pub fn flow_entry(&self, tuple: Tuple) -> Option<FlowEntry> {
        match kernel_flow(tuple) {
            KernelFlow::V4(f) => self.flows.get(&f).expect("reading lb_ct_v3"),
            KernelFlow::V6(f) => self.flows6.get(&f).expect("reading lb_ct6_v5"),
        }
    }

    /// Removes a flow's entry (client -> VIP), as another flow taking its slot would; true if
    /// there was one.
    pub fn evict_flow(&mut self, tuple: Tuple) -> bool {
        match kernel_flow(tuple) {
            KernelFlow::V4(f) => self.flows.remove(&f).expect("writing lb_ct_v3"),
            KernelFlow::V6(f) => self.flows6.remove(&f).expect("writing lb_ct6_v5"),
        }
    }

    /// Removes a reply translation, as pressure on the LRU table would; true if there was one.
    pub fn evict_reply(&mut self, tuple: Tuple) -> bool {
        match kernel_flow(tuple) {
            KernelFlow::V4(f) => self.replies.remove(&f).is_ok(),
            KernelFlow::V6(f) => self.replies6.remove(&f).is_ok(),
        }
    }
}

/// Runs the XDP or TC program that a running agent attached, found through the link it pinned in
/// `pin_dir` for interface `iface` (the program and the agent's own maps, not a copy), on each of
/// `frames` as if it arrived on `iface`, inside namespace `ns` where that interface lives (so that
/// the program's FIB lookups see the agent's routes). Returns one result per frame.
pub fn run_attached(ns: &str, pin_dir: &Path, iface: &str, frames: Vec<Vec<u8>>) -> Vec<Run> {
    let out = sh(&["ip", "-n", ns, "-j", "link", "show", "dev", iface]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j link");
    let ifindex = v[0]["ifindex"].as_u64().expect("ifindex") as u32;
    let links = dataplane::pinned_links(pin_dir).expect("listing the pinned links");
    let (_, path) = links.iter().find(|(i, _)| i == iface).unwrap_or_else(|| {
        panic!(
            "no link pinned for {iface} in {}: {links:?}",
            pin_dir.display()
        )
    });
    let link: FdLink = PinnedLink::from_pin(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
        .into();
    let id = link.info().expect("the link's info").program_id();
    let info = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .unwrap_or_else(|| panic!("program {id} of {} is not loaded", path.display()));
    let tc = info.program_type() == aya_obj::generated::bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS;
    in_netns(ns, move || {
        // The agent's XDP or TC program, each with its context for a frame arriving on `iface`.
        let (xdp, sched) = if tc {
            let p = aya::programs::SchedClassifier::from_program_info(info, "lb_tc".into())
                .expect("the attached program is the TC program");
            (None, Some(p))
        } else {
            let p = Xdp::from_program_info(info, "lb_xdp".into(), XdpAttachType::Interface)
                .expect("the attached program is an XDP program");
            (Some(p), None)
        };
        frames
            .iter()
            .map(|pkt| {
                let ctx: Vec<u8> = if tc {
                    skb_context(ifindex)
                } else {
                    [0, pkt.len() as u32, 0, ifindex, 0, 0]
                        .iter()
                        .flat_map(|w: &u32| w.to_ne_bytes())
                        .collect()
                };
                let mut out = vec![0u8; pkt.len() + 256];
                let opts = TestRunOptions {
                    data_in: Some(pkt),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..TestRunOptions::new()
                };
                let r = match (&xdp, &sched) {
                    (Some(p), _) => p.test_run(opts),
                    (_, Some(p)) => p.test_run(opts),
                    _ => unreachable!("one of the two programs"),
                }
                .expect("BPF_PROG_TEST_RUN of the agent's program");
                out.truncate(r.data_size_out as usize);
                Run {
                    verdict: r.return_value,
                    out,
                }
            })
            .collect()
    })
}

/// The start of a `struct __sk_buff` for BPF_PROG_TEST_RUN, up to `ifindex` (the kernel zeroes
/// the rest): the frame arrives on interface `ifindex` (`ingress_ifindex` at byte 36, `ifindex`,
/// the device the kernel gives the socket buffer, at byte 40).
pub fn skb_context(ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 44];
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

fn open_hash<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(dir.join(name)).unwrap_or_else(|e| panic!("opening {name}: {e}"));
    Map::from_map_data(data)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .try_into()
        .unwrap_or_else(|e| panic!("{name} is not the expected hash map: {e}"))
}

/// A socket address type: `SocketAddrV4`, `SocketAddrV6`, or either.
pub trait Endpoint: Copy + Into<SocketAddr> {
    /// `a` as this type, if it is of this type's family.
    fn of(a: SocketAddr) -> Option<Self>;
}

impl Endpoint for SocketAddr {
    fn of(a: SocketAddr) -> Option<Self> {
        Some(a)
    }
}

impl Endpoint for SocketAddrV4 {
    fn of(a: SocketAddr) -> Option<Self> {
        match a {
            SocketAddr::V4(a) => Some(a),
            SocketAddr::V6(_) => None,
        }
    }
}

impl Endpoint for SocketAddrV6 {
    fn of(a: SocketAddr) -> Option<Self> {
        match a {
            SocketAddr::V6(a) => Some(a),
            SocketAddr::V4(_) => None,
        }
    }
}

/// A 5-tuple as a packet carries it: source, destination, protocol.
pub type Tuple = (SocketAddr, SocketAddr, u8);

/// The kernel's IPv6 flow key (`lb_common::Flow6`, every field as in the packet) of a 5-tuple.
pub fn flow6(src: SocketAddrV6, dst: SocketAddrV6, proto: u8) -> Flow6 {
    match kernel_flow((src.into(), dst.into(), proto)) {
        KernelFlow::V6(f) => f,
        KernelFlow::V4(_) => unreachable!("two IPv6 addresses"),
    }
}

/// The kernel's IPv4 flow key (`lb_common::Flow`, every field as in the packet) of a 5-tuple.
pub fn flow4(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> Flow {
    match kernel_flow((src.into(), dst.into(), proto)) {
        KernelFlow::V4(f) => f,
        KernelFlow::V6(_) => unreachable!("two IPv4 addresses"),
    }
}

enum KernelFlow {
    V4(Flow),
    V6(Flow6),
}

/// The kernel's flow key (`lb_common::Flow` or `Flow6`, every field as in the packet) for a
/// 5-tuple.
fn kernel_flow((src, dst, proto): Tuple) -> KernelFlow {
    let (sport, dport) = (src.port().to_be(), dst.port().to_be());
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => KernelFlow::V4(Flow {
            src: u32::from(s).to_be(),
            dst: u32::from(d).to_be(),
            sport,
            dport,
            proto,
            _pad: [0; 3],
        }),
        (IpAddr::V6(s), IpAddr::V6(d)) => KernelFlow::V6(Flow6 {
            src: octets_words(s.octets()),
            dst: octets_words(d.octets()),
            sport,
            dport,
            proto,
            _pad: [0; 3],
        }),
        _ => panic!("{src} -> {dst}: one family"),
    }
}

/// An IPv6 address's bytes as the four words of a map key (packet byte order kept in memory).
pub fn octets_words(o: [u8; 16]) -> [u32; 4] {
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

fn words_octets(w: [u32; 4]) -> [u8; 16] {
    std::array::from_fn(|i| w[i / 4].to_ne_bytes()[i % 4])
}

/// The names of the counters that differ between two readings, with the difference, in the
/// order of `Stat::ALL`.
pub fn stat_delta(before: &[u64], after: &[u64]) -> Vec<(&'static str, i128)> {
    Stat::ALL
        .iter()
        .filter(|s| before[**s as usize] != after[**s as usize])
        .map(|s| {
            let i = *s as usize;
            (s.name(), after[i] as i128 - before[i] as i128)
        })
        .collect()
}

/// What `stat_delta` shows when each of `stats` grew by one.
pub fn each_once(stats: &[Stat]) -> Vec<(&'static str, i128)> {
    Stat::ALL
        .iter()
        .filter(|s| stats.contains(s))
        .map(|s| (s.name(), 1))
        .collect()
}

/// One Marathon task of `app`.
pub struct Task {
    /// Its id is `<app>.<name>`.
    pub name: String,
    /// An IPv4 or IPv6 literal.
    pub host: IpAddr,
    pub port: u16,
    pub state: &'static str,
}

pub fn running(b: impl Into<SocketAddr>) -> Task {
    let b = b.into();
    Task {
        name: format!("{}-{}", b.ip(), b.port()).replace(':', "-"),
        host: b.ip(),
        port: b.port(),
        state: "TASK_RUNNING",
    }
}

pub fn killing(b: impl Into<SocketAddr>) -> Task {
    Task {
        state: "TASK_KILLING",
        ..running(b)
    }
}

/// One host-networking app whose single port carries `labels`, with `tasks`.
pub fn app(id: &str, protocol: &str, labels: &[(&str, &str)], tasks: &[Task]) -> serde_json::Value {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect();
    let tasks: Vec<serde_json::Value> = tasks
        .iter()
        .map(|t| {
            serde_json::json!({
                "id": format!("{}.{}", id.trim_start_matches('/'), t.name),
                "appId": id,
                "host": t.host.to_string(),
                "ports": [t.port],
                "state": t.state,
                "startedAt": "2026-11-25T00:00:00.000Z"
            })
        })
        .collect();
    serde_json::json!({
        "id": id,
        "instances": tasks.len(),
        "portDefinitions": [{"port": 0, "protocol": protocol, "name": "default", "labels": labels}],
        "tasks": tasks
    })
}

/// A `/v2/apps?embed=apps.tasks` body of `apps`.
pub fn apps(apps: Vec<serde_json::Value>) -> String {
    serde_json::json!({ "apps": apps }).to_string()
}
