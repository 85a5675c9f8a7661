//! A sandbox for running the real XDP program on single packets with BPF_PROG_TEST_RUN: one
//! network namespace whose routes and neighbours answer the program's FIB lookups, and the
//! program loaded with its maps pinned in a directory of its own. The maps are filled only by the
//! control plane (`marathon::derive`, `dataplane::Writer`). Dropping the `PacketLab` removes the
//! pins and the namespace, also when a test panics.
use crate::{in_netns, packet::Mac, sh, sh_quiet};
use aya::{
    maps::{HashMap, Map, MapData},
    programs::{TestRun, TestRunOptions},
};
use lb_common::{Flow, MAP_REPLIES, ReplyEntry, STAT_COUNT, Stat};
use lbctl::{
    dataplane::{self, Applied, Maps, Writer},
    model::{Proto, Vip},
};
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
};

/// XDP verdicts.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The load balancer's interface towards clients (198.18.0.1/24) and towards backends
/// (198.18.1.1/24), with fixed MAC addresses.
pub const CLIENT_SIDE: Side = Side {
    name: "pk-c",
    mac: [0x02, 0, 0, 0, 0x00, 0x01],
    addr: "198.18.0.1/24",
    net: Ipv4Addr::new(198, 18, 0, 0),
};
pub const BACKEND_SIDE: Side = Side {
    name: "pk-b",
    mac: [0x02, 0, 0, 0, 0x01, 0x01],
    addr: "198.18.1.1/24",
    net: Ipv4Addr::new(198, 18, 1, 0),
};

pub struct Side {
    pub name: &'static str,
    pub mac: Mac,
    pub addr: &'static str,
    /// The /24 it is on.
    pub net: Ipv4Addr,
}

impl Side {
    fn holds(&self, a: Ipv4Addr) -> bool {
        a.octets()[..3] == self.net.octets()[..3]
    }
}

/// Permanent neighbour entries: two clients and three backends. Any other address of the two
/// networks (198.18.0.9, 198.18.1.9, ...) has none, so the FIB answers "no neighbour".
pub const NEIGHBOURS: [(Ipv4Addr, Mac); 5] = [
    (Ipv4Addr::new(198, 18, 0, 2), [0x02, 0, 0, 0, 0x00, 0x02]),
    (Ipv4Addr::new(198, 18, 0, 3), [0x02, 0, 0, 0, 0x00, 0x03]),
    (Ipv4Addr::new(198, 18, 1, 2), [0x02, 0, 0, 0, 0x01, 0x02]),
    (Ipv4Addr::new(198, 18, 1, 3), [0x02, 0, 0, 0, 0x01, 0x03]),
    (Ipv4Addr::new(198, 18, 1, 4), [0x02, 0, 0, 0, 0x01, 0x04]),
];

/// The interfaces' MTU: a longer IP total length makes the FIB answer "fragmentation needed".
pub const MTU: usize = 1500;

/// Where a packet to `dst` leaves when the FIB has a complete answer: the interface, and the MAC
/// addresses (source, destination) it gets.
pub fn next_hop(dst: Ipv4Addr) -> Option<(&'static Side, Mac, Mac)> {
    let (_, mac) = NEIGHBOURS.iter().find(|(a, _)| *a == dst)?;
    let side = [&CLIENT_SIDE, &BACKEND_SIDE]
        .into_iter()
        .find(|s| s.holds(dst))?;
    Some((side, side.mac, *mac))
}

/// How a rewritten packet to `dst` that arrived on `ingress` leaves when the FIB has a complete
/// answer: the verdict, the counter, and its new source and destination MAC addresses.
pub fn departure(ingress: Ingress, dst: Ipv4Addr) -> Option<(u32, Stat, Mac, Mac)> {
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
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ]);
        for side in [&CLIENT_SIDE, &BACKEND_SIDE] {
            let peer = format!("{}p", side.name);
            let mac = mac_str(side.mac);
            sh(&[
                "ip", "-n", ns, "link", "add", side.name, "address", &mac, "type", "veth", "peer",
                "name", &peer,
            ]);
            sh(&["ip", "-n", ns, "addr", "add", side.addr, "dev", side.name]);
            sh(&["ip", "-n", ns, "link", "set", side.name, "up"]);
            sh(&["ip", "-n", ns, "link", "set", &peer, "up"]);
        }
        for (addr, mac) in NEIGHBOURS {
            let dev = next_hop(addr).expect("neighbours are on a side").0.name;
            sh(&[
                "ip",
                "-n",
                ns,
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
        let dir = self.dir.clone();
        let ifindex = [self.ifindex(&CLIENT_SIDE), self.ifindex(&BACKEND_SIDE)];
        in_netns(&self.ns, move || {
            let mut dp = Dataplane::load(&dir, ifindex);
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

fn mac_str(m: Mac) -> String {
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

/// The loaded program and the control plane's handles on its maps.
pub struct Dataplane {
    ebpf: aya::Ebpf,
    writer: Writer,
    maps: Maps,
    replies: HashMap<MapData, Flow, ReplyEntry>,
    /// Interface indexes of the client and backend sides.
    ifindex: [u32; 2],
}

impl Dataplane {
    fn load(dir: &Path, ifindex: [u32; 2]) -> Dataplane {
        let ebpf = dataplane::load(dir).expect("loading the XDP program");
        let data = MapData::from_pin(dir.join(MAP_REPLIES)).expect("opening lb_nat_v1");
        let replies = Map::from_map_data(data)
            .expect("lb_nat_v1")
            .try_into()
            .expect("lb_nat_v1 is a hash map of Flow to ReplyEntry");
        Dataplane {
            ebpf,
            writer: Writer::open(dir).expect("opening the maps for writing"),
            maps: Maps::open(dir).expect("opening the maps"),
            replies,
            ifindex,
        }
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

    /// Runs the program once on `pkt` arriving on `ingress`.
    pub fn run(
        &mut self,
        pkt: &[u8],
        ingress: Ingress,
    ) -> Result<Run, aya::programs::ProgramError> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. test_run wants data 0 and data_end the packet's length.
        let md: [u32; 6] = [0, pkt.len() as u32, 0, self.ifindex(ingress), 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; pkt.len() + 256];
        let prog = dataplane::xdp_program(&mut self.ebpf).expect("the XDP program");
        let r = prog.test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: (ingress != Ingress::Loopback).then_some(&ctx[..]),
            ..TestRunOptions::new()
        })?;
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

    /// The backend the control plane predicts for a new flow from `src` to `vip`.
    pub fn pick(&self, vip: SocketAddrV4, proto: u8, src: SocketAddrV4) -> Option<SocketAddrV4> {
        let vip = Vip {
            addr: SocketAddr::V4(vip),
            proto: Proto::from_number(proto).expect("tcp or udp"),
        };
        match self.maps.pick(&vip, src).expect("reading the maps") {
            Some(SocketAddr::V4(a)) => Some(a),
            Some(SocketAddr::V6(a)) => panic!("an IPv6 backend {a} in an IPv4 table"),
            None => None,
        }
    }

    /// The reply translation the kernel holds for a backend -> client 5-tuple.
    pub fn reply_entry(&self, flow: &Flow) -> Option<ReplyEntry> {
        self.replies.get(flow, 0).ok()
    }

    /// Removes a reply translation, as pressure on the LRU table would; true if there was one.
    pub fn evict_reply(&mut self, flow: &Flow) -> bool {
        self.replies.remove(flow).is_ok()
    }
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
    pub host: Ipv4Addr,
    pub port: u16,
    pub state: &'static str,
}

pub fn running(b: SocketAddrV4) -> Task {
    Task {
        name: format!("{}-{}", b.ip(), b.port()),
        host: *b.ip(),
        port: b.port(),
        state: "TASK_RUNNING",
    }
}

pub fn killing(b: SocketAddrV4) -> Task {
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
