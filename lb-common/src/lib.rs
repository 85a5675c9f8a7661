//! Types and limits shared by the XDP program (`lb-ebpf`) and user space (`lbctl`).
//!
//! Every map key and value is `#[repr(C)]`, made of integers only, and padded explicitly so that
//! both sides agree on every byte. Byte order is stated at each address and port field: "BE" means
//! network byte order, exactly as the field appears in the packet.
//!
//! Map names carry a layout version (`_v1`). A change of any layout below must bump the version of
//! that map's name, so that an agent never reads an old layout as a new one.
#![no_std]

pub mod flow_table;

// ---------------------------------------------------------------------------------------------
// Sizes: defaults the loader may change, and their limits
// ---------------------------------------------------------------------------------------------

/// Services (VIP, port, protocol) the data plane holds unless the loader is told otherwise
/// (`lb_cfg_v2` holds the number in use); at most `LIMIT_SERVICES`.
pub const DEFAULT_MAX_SERVICES: u32 = 1024;
/// The most services the loader accepts (`--max-services`).
pub const LIMIT_SERVICES: u32 = 1 << 20;
/// Distinct backends (address, port) across all services, by default; at most `LIMIT_BACKENDS`.
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
/// The most backends the loader accepts (`--max-backends`).
pub const LIMIT_BACKENDS: u32 = 1 << 20;
/// (service, backend) memberships, by default; at most `LIMIT_MEMBERS`.
pub const DEFAULT_MAX_MEMBERS: u32 = 65536;
/// The most memberships the loader accepts (`--max-members`).
pub const LIMIT_MEMBERS: u32 = 1 << 24;
/// Slots of one service's Maglev table by default: a prime. The loader may choose another prime up
/// to `MAX_RING_SIZE` (`lb_cfg_v2` holds the one in use).
pub const DEFAULT_RING_SIZE: u32 = 16381;
/// The largest Maglev table size the loader accepts.
pub const MAX_RING_SIZE: u32 = 131071;
/// Slots per element of a service's table. The kernel rounds an array's values up to 8 bytes,
/// so one backend id (4 bytes) per element would waste half the table; 16 per element (64
/// bytes) waste nothing. Tables are created mmapable: the agent writes one by mapping its pages.
pub const RING_LANES: u32 = 16;
/// Value of a table: 16 consecutive slots, each a backend id.
pub type RingChunk = [u32; RING_LANES as usize];
/// Elements of one table (its last element may be partly unused).
pub const fn ring_stride(ring_size: u32) -> u32 {
    ring_size.div_ceil(RING_LANES)
}
/// Tables are kept in blocks of `lb_tables_v2`'s chunks: block `b` is table `b % 16` of chunk
/// `b / 16`. A chunk (an array map of `TABLES_PER_CHUNK * ring_stride` elements) holds tables of
/// one size class; it is made when the services need its blocks and removed when none uses
/// them, so kernel memory follows the services that have backends, and how many.
pub const TABLES_PER_CHUNK: u32 = 16;
/// `Service::table` of a service with no table (no active backend).
pub const NO_TABLE: u32 = u32::MAX;
/// A service's Maglev table has at least this many slots per active backend, when a table of
/// that size is smaller than the configured one: Maglev gives every backend `size / n` slots,
/// rounded up or down, so a backend's share of new flows is off by at most 1 %.
pub const SLOTS_PER_BACKEND: u32 = 100;
/// Table sizes smaller than the configured one: class `k` (1 to `SIZE_CLASSES`) is the
/// largest prime below 2^(7+k): 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521. Class 0
/// is the configured size (`lb_cfg_v2`). A service's entry carries its table's class.
pub const SIZE_CLASSES: u32 = 9;
/// 2^(7+k) minus class `k`'s size, 5 bits per class (so the program computes a size without a
/// table in memory).
const CLASS_GAPS: u64 =
    5 | 3 << 5 | 3 << 10 | 9 << 15 | 3 << 20 | 1 << 25 | 3 << 30 | 19 << 35 | 15 << 40;
/// Bits of `Service::table` that hold the block; the class is above them.
pub const TABLE_BLOCK_BITS: u32 = 24;

/// Slots of a table of class `class` (1 to `SIZE_CLASSES`; 0 for any other class).
#[inline(always)]
pub const fn class_size(class: u32) -> u32 {
    if class == 0 || class > SIZE_CLASSES {
        return 0;
    }
    (1u32 << (7 + class)) - ((CLASS_GAPS >> (5 * (class - 1))) & 31) as u32
}

/// Slots of a table of class `class` when the configured size is `configured`.
#[inline(always)]
pub const fn table_size(class: u32, configured: u32) -> u32 {
    if class == 0 {
        configured
    } else {
        class_size(class)
    }
}

/// The class of the table of a service with `active` active backends: the smallest class with
/// `SLOTS_PER_BACKEND` slots per backend that is smaller than `configured`, else 0 (the
/// configured size). Every agent given the same backends picks the same size.
pub const fn table_class(active: u32, configured: u32) -> u32 {
    let need = active.saturating_mul(SLOTS_PER_BACKEND);
    let mut k = 1;
    while k <= SIZE_CLASSES {
        let size = class_size(k);
        if size >= configured {
            return 0;
        }
        if size >= need {
            return k;
        }
        k += 1;
    }
    0
}

/// `Service::table` naming block `block` holding a table of class `class`.
#[inline(always)]
pub const fn table_ref(class: u32, block: u32) -> u32 {
    class << TABLE_BLOCK_BITS | block
}

/// The class of the table `Service::table` names (`NO_TABLE`: none).
#[inline(always)]
pub const fn ref_class(table: u32) -> u32 {
    table >> TABLE_BLOCK_BITS
}

/// The block `Service::table` names.
#[inline(always)]
pub const fn ref_block(table: u32) -> u32 {
    table & ((1 << TABLE_BLOCK_BITS) - 1)
}
/// Where slot `slot` of the table in block `block` is, for tables of `stride` elements:
/// (chunk, element in the chunk, lane).
#[inline(always)]
pub const fn table_index(block: u32, slot: u32, stride: u32) -> (u32, u32, u32) {
    let first = (block % TABLES_PER_CHUNK).wrapping_mul(stride);
    (
        block / TABLES_PER_CHUNK,
        first.wrapping_add(slot / RING_LANES),
        slot % RING_LANES,
    )
}
/// Chunks `lb_tables_v2` has room for, for `max_services`: a block for each service, a chunk
/// to spare (a table is written into a free block before the service switches to it), and a
/// chunk for each size class (each class fills chunks of its own).
pub const fn table_chunks(max_services: u32) -> u32 {
    max_services.div_ceil(TABLES_PER_CHUNK) + 1 + SIZE_CLASSES
}
/// Flags of every chunk (the inner maps of `lb_tables_v2`): `BPF_F_MMAPABLE` (the agent writes
/// a table through a memory mapping) and `BPF_F_INNER_MAP` (chunks of any size may stand in the
/// outer map, which the program declares with a template of the largest).
pub const TABLE_FLAGS: u32 = (1 << 10) | (1 << 12);
/// Tracked flows (forward and reverse tables each).
pub const MAX_FLOWS: u32 = 262_144;
/// The range the loader accepts for the flow tables' size.
pub const MIN_FLOW_TABLE: u32 = 1024;
/// The largest flow table the loader accepts.
pub const MAX_FLOW_TABLE: u32 = 16 << 20;

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;

// ---------------------------------------------------------------------------------------------
// Map names (at most 15 bytes: that is what the kernel keeps)
// ---------------------------------------------------------------------------------------------

/// IPv4 services: `VipKey` -> `Service` (hash).
pub const MAP_SERVICES: &str = "lb_svc_v1";
/// IPv4 backends: backend id -> `Backend` (array).
pub const MAP_BACKENDS: &str = "lb_be_v1";
/// The services' Maglev tables: chunk number -> an array of `TABLES_PER_CHUNK` tables of one
/// size class, `ring_stride(size)` `RingChunk`s each (`TABLE_FLAGS`); chunks exist only while
/// services use their blocks (array of maps). A service's entry names its table's class and
/// block (`Service::table`). `lb_tables_v1` held class 0 alone, and its entries named the block
/// only: a block of class 0 is named the same way, so its chunks are carried over as they are.
pub const MAP_TABLES: &str = "lb_tables_v2";
/// Load-time settings: `CFG_RING_SIZE` (which the program reads), and for `lbctl` the Maglev seed
/// and the size every map was created with.
pub const MAP_CONFIG: &str = "lb_cfg_v2";
/// Slot of `lb_cfg_v2`: the Maglev table size (the program reads it).
pub const CFG_RING_SIZE: u32 = 0;
/// Slot of `lb_cfg_v2`: the low 32 bits of the Maglev seed.
pub const CFG_SEED_LOW: u32 = 1;
/// Slot of `lb_cfg_v2`: the high 32 bits of the Maglev seed.
pub const CFG_SEED_HIGH: u32 = 2;
/// The flow tables' size: the flows each of `lb_ct_v3` and `lb_ct6_v5` is made for (in half as
/// many buckets), and the entries of `lb_nat_v1` and `lb_nat6_v1`.
pub const CFG_FLOWS: u32 = 3;
/// Entries of `lb_svc_v1` and `lb_svc6_v1`, and of each CPU's region of `lb_svctr_v2`: service
/// ids are below it.
pub const CFG_SERVICES: u32 = 4;
/// Entries of `lb_be_v1` and `lb_be6_v1`, and of each CPU's region of `lb_betr_v2`: backend ids
/// are below it.
pub const CFG_BACKENDS: u32 = 5;
/// Entries of `lb_member_v1`.
pub const CFG_MEMBERS: u32 = 6;
/// Entries of `lb_cfg_v2`.
pub const CFG_COUNT: u32 = 7;
/// Memberships: `MemberKey` -> `Member` (hash).
pub const MAP_MEMBERS: &str = "lb_member_v1";
/// IPv4 tracked flows, client -> VIP: an array of `FlowBucket<Flow>` (`flow_table`), each
/// `FlowEntry` with its key in one of the two buckets its hash picks. `lb_ct_v1`, of older agents, was an
/// LRU hash of `Flow` -> `FlowEntry` (`MAP_FLOWS_V1`).
pub const MAP_FLOWS: &str = "lb_ct_v3";
/// Flags of the flow tables (`lb_ct_v3`, `lb_ct6_v5`): `BPF_F_MMAPABLE`, not for a mapping
/// (nothing maps them) but for where the kernel puts an mmapable array's values: at the start of
/// a page. Another array's values start where the map's header ends (on this project's 6.18
/// kernels 312 bytes into the allocation, 56 bytes into a cache line), so the first slot of
/// every IPv4 bucket crossed a line and a bucket took three. Page-aligned, a 128-byte IPv4 bucket
/// is two lines and a 256-byte IPv6 bucket four, and no slot crosses one. A table made before
/// without the flag has the same layout, and is used as it is (`lbctl::dataplane::pins`).
pub const FLOW_TABLE_FLAGS: u32 = BPF_F_MMAPABLE;
/// The kernel's flag for an array that may be mapped, which puts its values at the start of a
/// page (`FLOW_TABLE_FLAGS`).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// The older IPv4 flow table (`Flow` -> `FlowEntry`, LRU hash): its flows are carried into
/// `lb_ct_v3`.
pub const MAP_FLOWS_V1: &str = "lb_ct_v1";
/// The older IPv4 flow table of buckets: `lb_ct_v3`'s layout and hash, but a key's first bucket
/// was any of the table's, not one of its first quarter (`flow_table::hot_buckets`). Its flows
/// are carried into `lb_ct_v3`.
pub const MAP_FLOWS_V2: &str = "lb_ct_v2";
/// The flow tables' hash seed: one `u64` (array of one), random, written when the data plane is
/// made and kept for its life (a resize keeps it): where a flow lives in `lb_ct_v3` and
/// `lb_ct6_v5` follows from it, and nobody outside can aim flows at one bucket without it.
pub const MAP_FLOW_SEED: &str = "lb_ctseed_v1";
/// The program's global holding the flow tables' seed, which the loader sets from
/// `lb_ctseed_v1`.
pub const GLOBAL_FLOW_SEED: &str = "LB_FLOW_SEED";
/// The program's global holding the flow tables' buckets (`flow_table::flow_buckets` of the
/// flow table size), which the loader sets.
pub const GLOBAL_FLOW_BUCKETS: &str = "LB_FLOW_BUCKETS";
/// IPv4 reverse entries, backend -> client: `Flow` -> `ReplyEntry` (LRU hash), of the flows
/// whose backend serves several VIPs of their protocol (a lean flow, see `MAP_BACKEND_VIPS`,
/// has none).
pub const MAP_REPLIES: &str = "lb_nat_v1";
/// Per-CPU packet outcomes: `Stat` index -> `u64`.
pub const MAP_STATS: &str = "lb_stats_v3";
/// Traffic by service id and CPU: an array of `Traffic` in regions, one per possible CPU
/// (`counter_slot`). `lb_svctr_v1`, of older agents, was a per-CPU array by service id; its
/// counts are carried over.
pub const MAP_SERVICE_TRAFFIC: &str = "lb_svctr_v2";
/// A per-CPU count of packets of established TCP flows (no SYN) to a VIP that found no flow
/// entry: flows the flow table evicted while they were alive (or older than this data plane). Each one
/// is re-hashed, which keeps its backend unless the service's table changed since it started.
pub const MAP_FLOWS_LOST: &str = "lb_lost_v1";
/// A per-CPU count of what the flow tables (IPv4 and IPv6) did for a new flow whose two
/// buckets held only flows in use: `FLOW_PRESSURE_MOVED` (one of those flows moved to its
/// other bucket, or, rarely, a slot two writers met on was emptied), `FLOW_PRESSURE_EVICTED`
/// (none could: one lost its slot, and its next packet counts in `lb_lost_v1`).
pub const MAP_FLOW_PRESSURE: &str = "lb_ftpres_v1";
/// `lb_ftpres_v1`'s element for flows in use moved to their other bucket.
pub const FLOW_PRESSURE_MOVED: u32 = 0;
/// `lb_ftpres_v1`'s element for flows in use whose slot a new flow took.
pub const FLOW_PRESSURE_EVICTED: u32 = 1;
/// Elements of `lb_ftpres_v1`.
pub const FLOW_PRESSURE_COUNT: u32 = 2;
/// IPv4 fragments: how the first fragment of a datagram was translated, so that the later ones
/// (which carry no ports) follow it.
pub const MAP_FRAGMENTS: &str = "lb_frag_v1";
/// Entries of `lb_frag_v1`.
pub const MAX_FRAGMENTED: u32 = 16384;
/// Traffic by backend id and CPU: `Traffic` in regions, as `lb_svctr_v2`.
pub const MAP_BACKEND_TRAFFIC: &str = "lb_betr_v2";
/// IPv6 counterparts. Service ids, backend ids, tables, memberships and counters are shared with
/// IPv4: a backend id names a slot of `lb_be_v1` or of `lb_be6_v1`, after its service's family.
pub const MAP_SERVICES6: &str = "lb_svc6_v1";
/// IPv6 backends: backend id -> `Backend6` (array).
pub const MAP_BACKENDS6: &str = "lb_be6_v1";
/// IPv6 tracked flows: an array of `FlowBucket<Flow6>`, as `lb_ct_v3`, hashed with
/// `Flow6`'s keyed hash (`flow_table::FlowKey`), each slot 64 bytes (a cache line).
pub const MAP_FLOWS6: &str = "lb_ct6_v5";
/// The older IPv6 flow table of buckets: `lb_ct6_v5`'s hash and 56-byte slots, which crossed
/// cache lines (`flow_table::Flow6V3`). Its flows are carried into `lb_ct6_v5`.
pub const MAP_FLOWS6_V3: &str = "lb_ct6_v3";
/// The older IPv6 flow table (`Flow6` -> `FlowEntry`, LRU hash).
pub const MAP_FLOWS6_V1: &str = "lb_ct6_v1";
/// The older IPv6 flow table of buckets before it: `lb_ct6_v3`'s layout with the hash of
/// `lb_ct_v3` over five words in a row (`flow_table::Flow6V2`). Its flows are carried into
/// `lb_ct6_v5`.
pub const MAP_FLOWS6_V2: &str = "lb_ct6_v2";
/// The older IPv6 flow table of buckets before `lb_ct6_v5`: its layout and hash, but a key's
/// first bucket was any of the table's (as `MAP_FLOWS_V2`). Its flows are carried into
/// `lb_ct6_v5`.
pub const MAP_FLOWS6_V4: &str = "lb_ct6_v4";
/// The program's global holding the keys of `lb_ct6_v5`'s hash (`flow_table::FlowKey::keys`
/// of the seed), which the loader sets.
pub const GLOBAL_FLOW_KEYS6: &str = "LB_FLOW_KEYS6";
/// IPv6 reverse entries: `Flow6` -> `ReplyEntry6` (LRU hash).
pub const MAP_REPLIES6: &str = "lb_nat6_v1";
/// Source ports that backends use or used: a bitmap over the 65536 ports in `u64` words (array,
/// `reply_port_bit`). A packet not for a VIP whose source port has no bit cannot be a reply, so
/// the program passes it without a miss in the reply tables. The agent sets a port's bit before
/// it writes a backend with it and never clears one (replies of a backend that left still come
/// from the VIP); `lbctl down` removes the map.
pub const MAP_REPLY_PORTS: &str = "lb_rport_v1";
/// Words of `lb_rport_v1`.
pub const REPLY_PORT_WORDS: u32 = 1024;

/// The word of `lb_rport_v1` holding `port` (host order), and its bit there.
pub const fn reply_port_bit(port: u16) -> (u32, u64) {
    ((port >> 6) as u32, 1 << (port & 63))
}

/// VIPs (address and port, any protocol) as bits: a filter in front of `lb_svc_v1` and
/// `lb_svc6_v1` (array of `u64` words, `vip_filter_bit`; as many words as `vip_filter_words`
/// gives for the room for services, which the loader tells the programs). A packet whose destination has no bit
/// is not for a VIP, and the program learns it without a miss in the services' hash maps. Bits
/// may be set that no service needs (two VIPs sharing a bit, a VIP being removed), never the
/// other way round: the agent sets a VIP's bit before it writes the service, and clears it only
/// after the last service on that bit is removed; the loader sets the bits of every service
/// pinned before any program runs. `lbctl down` removes the map.
pub const MAP_VIP_FILTER: &str = "lb_vipf_v1";
/// Each service's departures count by service id (array of `u32`): `Service::departures` of the
/// service that holds the id, raised before a service leaves and started above it for the next
/// service to take the id. A tracked flow's packet whose entry was noted at this count less than
/// `FLOW_CHECK_MAX_AGE_NS` ago goes to its backend without the service's lookup; so a departure,
/// a removal and the reuse of an id each end the notes taken before them. The loader copies the
/// count of every pinned service here before any program runs; `lbctl down` removes the map.
pub const MAP_DEPARTURES: &str = "lb_svcdep_v1";

/// Each IPv4 backend's VIPs: `BackendKey` (its address and port) -> `BackendVips` (hash, as
/// many entries as backend slots). A flow to a VIP whose backend serves no other VIP of its
/// protocol keeps no reverse entry: a reply from that backend finds its flow's entry in
/// `lb_ct_v3` through the VIP named here (a "lean" flow). The agent writes a backend's VIPs
/// before the memberships that make it serve them, and takes a VIP out after the membership is
/// removed; the loader makes the map agree with the pinned memberships before any program runs.
pub const MAP_BACKEND_VIPS: &str = "lb_bevip_v1";
/// The IPv6 counterpart: `BackendKey6` -> `BackendVips6`.
pub const MAP_BACKEND_VIPS6: &str = "lb_bevip6_v1";
/// The most VIPs a backend's entry of `lb_bevip_v1` names; a backend of more VIPs says so
/// (`BackendVips::served` above it) and all its flows keep reverse entries.
pub const BACKEND_VIPS: usize = 4;

/// The program's global (in `.rodata`, set by the loader) that holds the service ids each CPU's
/// region of `lb_svctr_v2` and `lb_socksv_v2` has (`CFG_SERVICES`).
pub const GLOBAL_SERVICE_IDS: &str = "LB_SERVICE_IDS";
/// The program's global that holds the backend ids each CPU's region of `lb_betr_v2` and
/// `lb_sockbe_v2` has (`CFG_BACKENDS`).
pub const GLOBAL_BACKEND_IDS: &str = "LB_BACKEND_IDS";

/// The slot of id `id`'s counters on CPU `cpu` in a counter array whose regions hold `ids` ids
/// each (`lb_svctr_v2`, `lb_betr_v2`, `lb_socksv_v2`, `lb_sockbe_v2`): one region per possible
/// CPU, in CPU order. A plain array, not a per-CPU one: the kernel makes it with one allocation,
/// where a per-CPU array takes one per id (a quarter of a second at 10,000 services and 50,000
/// backends, before the programs could be verified). Each CPU writes only its own region, so no
/// two CPUs write one cache line but at a region's edge.
pub const fn counter_slot(cpu: u32, ids: u32, id: u32) -> u32 {
    cpu.wrapping_mul(ids).wrapping_add(id)
}

/// The fewest words of `lb_vipf_v1`: 2^18 bits (32 KiB), so that at 10,000 VIPs about 4% are set.
pub const VIP_FILTER_MIN_WORDS: u32 = 4096;

/// The name of the program's global (in `.rodata`, set by the loader) that holds how many words
/// the `lb_vipf_v1` it reads has: the program and the agent take a VIP's bit with the same size.
pub const GLOBAL_VIP_FILTER_WORDS: &str = "LB_VIP_FILTER_WORDS";

/// The name of the program's global (in `.rodata`, set by the loader) that holds the length of
/// the kernel's tick in ns: the programs' clock is the tick count times it (lb-ebpf `clock`), so
/// the age bounds of the fast path (`FLOW_CHECK_MAX_AGE_NS`, `NEXT_HOP_MAX_AGE_NS`) hold in ns.
pub const GLOBAL_NS_PER_TICK: &str = "LB_NS_PER_TICK";

/// The words of the `lb_vipf_v1` a data plane with room for `services` gets: at least 16 bits a
/// service (so that with every service in use at most 1 bit in 16 is set, and a packet not for
/// a VIP rarely finds its bit set), a power of two, at least `VIP_FILTER_MIN_WORDS`, at most
/// `VIP_FILTER_MAX_WORDS`.
pub const fn vip_filter_words(services: u32) -> u32 {
    let wanted = services.div_ceil(4);
    if wanted <= VIP_FILTER_MIN_WORDS {
        VIP_FILTER_MIN_WORDS
    } else if wanted >= VIP_FILTER_MAX_WORDS {
        VIP_FILTER_MAX_WORDS
    } else {
        wanted.next_power_of_two()
    }
}

/// The most words of `lb_vipf_v1`: 2^32 bits, every value of the hash.
pub const VIP_FILTER_MAX_WORDS: u32 = 1 << 26;

/// The words a `lb_vipf_v1` of `max_entries` words is used with: the largest power of two it
/// holds (its own size, for every map an agent makes), so that no VIP's bit is outside it.
pub const fn vip_filter_words_in(max_entries: u32) -> u32 {
    if max_entries == 0 {
        return 0;
    }
    let w = 1 << (31 - max_entries.leading_zeros());
    if w > VIP_FILTER_MAX_WORDS {
        VIP_FILTER_MAX_WORDS
    } else {
        w
    }
}

/// The word of a `lb_vipf_v1` of `words` words (a power of two) holding the bit of a VIP, and
/// the bit there. `addr` is the IPv4 address as the service key holds it (BE), or an IPv6
/// address's four BE words folded (`fold6`); `port` is BE. The mixing is an integer hash with
/// the multipliers of the "lowbias32" function of Chris Wellons' hash-prospector (public
/// domain), so that VIPs differing in any byte land on unrelated bits.
#[inline(always)]
pub const fn vip_filter_bit(addr: u32, port: u16, words: u32) -> (u32, u64) {
    let mut x = addr ^ ((port as u32) << 16 | port as u32);
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    let bit = x & (words.wrapping_mul(64).wrapping_sub(1));
    (bit >> 6, 1 << (bit & 63))
}

/// An IPv6 address's four words folded into one for `vip_filter_bit`.
pub const fn fold6(addr: [u32; 4]) -> u32 {
    addr[0] ^ addr[1] ^ addr[2] ^ addr[3]
}

// Every map's name, kind, key and value, sizing and how a resize copies it: lbctl's
// `dataplane::spec::MAPS`, checked against the BPF object by a unit test there.

/// The XDP entry point's name in the object file.
pub const PROG_XDP: &str = "lb_xdp";
/// The TC (`clsact` ingress) entry point's name in the object file: the same stages as
/// `lb_xdp`, for interfaces whose traffic may carry partial checksums.
pub const PROG_TC: &str = "lb_tc";
/// The IPv6 half of `lb_xdp`: the XDP program `lb_xdp` tail-calls for an IPv6 frame, through
/// `MAP_V6_XDP`. A program of its own so that the kernel verifies each half on its own (and on
/// its own thread): one program holding both took the verifier about 1 s.
pub const PROG_XDP6: &str = "lb_xdp6";
/// The IPv6 half of `lb_tc`, reached the same way through `MAP_V6_TC`.
pub const PROG_TC6: &str = "lb_tc6";
/// `lb_xdp`'s program array: one slot, `lb_xdp6`. Pinned, so that the kernel keeps its slot
/// filled while no agent runs (it empties the slots of a program array no file and no pin
/// holds). A program array takes programs of one type only, hence one per hook.
pub const MAP_V6_XDP: &str = "lb_v6xdp_v1";
/// `lb_tc`'s program array: one slot, `lb_tc6`.
pub const MAP_V6_TC: &str = "lb_v6tc_v1";
/// The XDP program that answers a flow's packet too big for its next hop with an ICMP error
/// (path MTU), which `lb_xdp` and `lb_xdp6` tail-call through `MAP_PMTU_XDP`: a program of its
/// own so that the kernel verifies that rare path once, not after every way the halves reach it.
pub const PROG_XDP_PMTU: &str = "lb_xdp_pmtu";
/// The same for TC, reached through `MAP_PMTU_TC`.
pub const PROG_TC_PMTU: &str = "lb_tc_pmtu";
/// The program array of `lb_xdp` and `lb_xdp6` that holds `lb_xdp_pmtu`; one slot, pinned as
/// `MAP_V6_XDP` is.
pub const MAP_PMTU_XDP: &str = "lb_pmtuxdp_v1";
/// The program array of `lb_tc` and `lb_tc6` that holds `lb_tc_pmtu`.
pub const MAP_PMTU_TC: &str = "lb_pmtutc_v1";

// ---------------------------------------------------------------------------------------------
// Map types
// ---------------------------------------------------------------------------------------------

/// Key of `lb_svc_v1`: one virtual service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    /// IPv4 address, BE.
    pub addr: u32,
    /// L4 port, BE.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Padding, always 0.
    pub _pad: u8,
}

/// Value of `lb_svc_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Index of this service's memberships and counters; below the configured number of
    /// services.
    pub id: u32,
    /// The size class (`table_class`, in the bits above `TABLE_BLOCK_BITS`) and the block of
    /// `lb_tables_v2` (`table_index`) of the service's live table (`table_ref`); `NO_TABLE`
    /// without active backends. A new table is written into a free block, then this entry is
    /// updated (with the active count): a packet sees the old table or the new one, never a
    /// mix. With `lb_tables_v1`, this was a block of class 0 (the same number). Agents before
    /// `lb_tables_v1` wrote here which of the service's two tables in
    /// `lb_ring_v2` was live (0 or 1).
    pub table: u32,
    /// Number of backends that take new flows. 0: new flows to this VIP are dropped.
    pub active: u32,
    /// How many times backends left the service (wrapping): raised after the memberships of the
    /// backends that left are removed, so that a tracked flow whose check note
    /// (`flow_check_note`) was taken at another count looks its membership up again. Agents
    /// before this field wrote 0 (the former padding).
    pub departures: u32,
}

/// Value of `lb_be_v1` (an array indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// IPv4 address, BE.
    pub addr: u32,
    /// L4 port, BE.
    pub port: u16,
    /// `BACKEND_LIVE` when the slot is in use.
    pub flags: u8,
    /// Padding, always 0.
    pub _pad: u8,
}

/// `Backend::flags`: the slot holds a backend.
pub const BACKEND_LIVE: u8 = 1;

/// Key of `lb_member_v1`: this backend serves this service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    /// Service id.
    pub service: u32,
    /// Backend id.
    pub backend: u32,
}

/// Value of `lb_member_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// `MEMBER_ACTIVE` or `MEMBER_DRAINING`.
    pub state: u32,
    /// Padding, always 0.
    pub _pad: u32,
}

/// Takes new flows and keeps its existing ones.
pub const MEMBER_ACTIVE: u32 = 1;
/// Keeps its existing flows, takes no new ones.
pub const MEMBER_DRAINING: u32 = 2;

/// A flow's 5-tuple as it appears in a packet: key of `lb_ct_v3` (client -> VIP, in its bucket) and of
/// `lb_nat_v1` (backend -> client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flow {
    /// Source IPv4 address, BE.
    pub src: u32,
    /// Destination IPv4 address, BE.
    pub dst: u32,
    /// Source port, BE.
    pub sport: u16,
    /// Destination port, BE.
    pub dport: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Padding, always 0.
    pub _pad: [u8; 3],
}

/// What `lb_ct_v3` keeps of a flow (and the value of `lb_sockfw_v1`): the backend a client's flow was given, and in the
/// bits the ids do not use (`FLOW_ID_BITS`), when the program last checked what the entry says
/// (`FlowEntry::checked_since`). Read the ids with `service()` and `backend()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// The service id in the low `FLOW_ID_BITS` bits; above them, the low 12 bits of the
    /// service's `departures` at the last check.
    pub service_word: u32,
    /// The backend id in the low `FLOW_ID_BITS` bits; above them, the time of the last check
    /// in units of 2^24 ns (about 17 ms, wrapping every 69 s; 0: never checked).
    pub backend_word: u32,
}

/// Bits of a service or backend id in a `FlowEntry` word: ids are below `LIMIT_SERVICES` and
/// `LIMIT_BACKENDS` (2^20). Agents before the check note wrote 0 above them (never checked).
pub const FLOW_ID_BITS: u32 = 20;
const _: () = assert!(LIMIT_SERVICES <= 1 << FLOW_ID_BITS && LIMIT_BACKENDS <= 1 << FLOW_ID_BITS);
const FLOW_ID_MASK: u32 = (1 << FLOW_ID_BITS) - 1;
/// The time unit of a check note: 2^24 ns.
const NOTE_UNIT_SHIFT: u32 = 24;
/// The note's 12 bits of time and of departures.
const NOTE_MASK: u32 = (1 << (32 - FLOW_ID_BITS)) - 1;

/// The note's time unit count at `now_ns`, in its 12 bits.
#[inline(always)]
const fn note_of(now_ns: u64) -> u32 {
    (now_ns >> NOTE_UNIT_SHIFT) as u32 & NOTE_MASK
}

impl FlowEntry {
    /// A new flow's entry: never checked.
    #[inline(always)]
    pub const fn new(service: u32, backend: u32) -> FlowEntry {
        FlowEntry {
            service_word: service & FLOW_ID_MASK,
            backend_word: backend & FLOW_ID_MASK,
        }
    }

    /// The service id.
    #[inline(always)]
    pub const fn service(&self) -> u32 {
        self.service_word & FLOW_ID_MASK
    }

    /// The backend id.
    #[inline(always)]
    pub const fn backend(&self) -> u32 {
        self.backend_word & FLOW_ID_MASK
    }

    /// The same entry, noted as checked at `now_ns` when the service's `departures` was
    /// `departures`.
    #[inline(always)]
    pub const fn noted(&self, departures: u32, now_ns: u64) -> FlowEntry {
        let mut stamp = note_of(now_ns);
        if stamp == 0 {
            // 0 means never: a check at that instant counts from one unit earlier (the note
            // only lives shorter).
            stamp = NOTE_MASK;
        }
        FlowEntry {
            service_word: self.service() | (departures & NOTE_MASK) << FLOW_ID_BITS,
            backend_word: self.backend() | stamp << FLOW_ID_BITS,
        }
    }

    /// The entry of a lean flow (one without a reverse entry) once its connection began to
    /// end: the `END_*` bits take the place of the note's departures, and the time says never
    /// checked. Such an entry is never noted again, so its packets take the service's lookup
    /// (only segments after a FIN or RST do).
    #[inline(always)]
    pub const fn ending(&self, ends: u16) -> FlowEntry {
        FlowEntry {
            service_word: self.service() | ((ends & END_MASK) as u32) << FLOW_ID_BITS,
            backend_word: self.backend(),
        }
    }

    /// The `END_*` bits of an entry made by `ending`; 0 for any other entry (a noted one, whose
    /// time is never 0, and every entry of earlier programs, which wrote 0 there unnoted).
    #[inline(always)]
    pub const fn ends(&self) -> u16 {
        if self.backend_word >> FLOW_ID_BITS != 0 {
            return 0;
        }
        (self.service_word >> FLOW_ID_BITS) as u16 & END_MASK
    }

    /// The time of the last check, in the note's units (0: never checked).
    #[inline(always)]
    pub const fn stamp(&self) -> u32 {
        self.backend_word >> FLOW_ID_BITS
    }

    /// Whether the entry was checked less than `FLOW_CHECK_MAX_AGE_NS` before `now_ns`, at the
    /// service's present `departures`.
    #[inline(always)]
    pub const fn checked_since(&self, departures: u32, now_ns: u64) -> bool {
        let stamp = self.stamp();
        let now = note_of(now_ns);
        let age = now.wrapping_sub(stamp) & NOTE_MASK;
        stamp != 0
            && self.service_word >> FLOW_ID_BITS == departures & NOTE_MASK
            && (age as u64) < FLOW_CHECK_MAX_AGE_NS >> NOTE_UNIT_SHIFT
    }
}

/// Value of `lb_nat_v1`: what a reply from the backend must look like to the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyEntry {
    /// The VIP's IPv4 address, BE.
    pub vip_addr: u32,
    /// The VIP's port, BE.
    pub vip_port: u16,
    /// How far a TCP connection has ended (`END_*` bits; 0 while open, and always for UDP).
    /// Programs of earlier versions wrote 0 here.
    pub ends: u16,
}

/// Key of `lb_bevip_v1`: a backend's address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// IPv4 address, BE.
    pub addr: u32,
    /// L4 port, BE.
    pub port: u16,
    /// Padding, always 0.
    pub _pad: u16,
}

/// Value of `lb_bevip_v1`: the backend's id and the VIPs of the services it is a member of.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendVips {
    /// The backend's id (its slot of `lb_be_v1`).
    pub id: u32,
    /// How many VIPs it serves (`served`); above `BACKEND_VIPS`, only the first
    /// `BACKEND_VIPS` are named. Bit 31 is `BACKEND_NO_LEAN`.
    pub count: u32,
    /// The VIPs, the first `count` (at most `BACKEND_VIPS`) in use, the rest zero.
    pub vips: [VipKey; BACKEND_VIPS],
}

/// Key of `lb_bevip6_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey6 {
    /// IPv6 address, BE.
    pub addr: [u32; 4],
    /// L4 port, BE.
    pub port: u16,
    /// Padding, always 0.
    pub _pad: u16,
}

/// Value of `lb_bevip6_v1`, as `BackendVips`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendVips6 {
    /// The backend's id (its slot of `lb_be6_v1`).
    pub id: u32,
    /// How many VIPs it serves, and `BACKEND_NO_LEAN` (as `BackendVips::count`).
    pub count: u32,
    /// The VIPs, as `BackendVips::vips`.
    pub vips: [VipKey6; BACKEND_VIPS],
}

/// A bit of `BackendVips::count`: since the agent made the backend's record, it never served
/// exactly one VIP of a protocol of which it now serves several. So no lean flow to one of
/// those VIPs can hold it, and a new flow through it need not look for one (`lb_ebpf`'s
/// `nat::lean_holder`). Records without it (an older agent's, or a backend that was once some
/// VIP's only one of its protocol) are looked through.
pub const BACKEND_NO_LEAN: u32 = 1 << 31;

/// Whether the first `count` of `named` (none when `count` is above `BACKEND_VIPS`) name `want`
/// and no other VIP that `of_proto` takes. The same question as `single_vip(..) == Some(want)`,
/// asked without carrying a VIP through the loop: the verifier then walks about half as many
/// instructions in `lb_xdp` (it prunes states that differ only in a bool).
#[inline(always)]
fn sole_vip<K: Copy + PartialEq>(
    count: u32,
    named: &[K; BACKEND_VIPS],
    want: K,
    of_proto: impl Fn(&K) -> bool,
) -> bool {
    if count as usize > BACKEND_VIPS {
        return false;
    }
    let mut found = false;
    let mut i = 0;
    while i < BACKEND_VIPS {
        if (i as u32) < count && of_proto(&named[i]) {
            if named[i] != want {
                return false;
            }
            found = true;
        }
        i += 1;
    }
    found
}

/// The one VIP of the first `count` of `named` (none when `count` is above `BACKEND_VIPS`:
/// then the backend serves more than it names) that `of_proto` takes, if it takes exactly one.
#[inline(always)]
fn single_vip<K: Copy>(
    count: u32,
    named: &[K; BACKEND_VIPS],
    of_proto: impl Fn(&K) -> bool,
) -> Option<K> {
    if count as usize > BACKEND_VIPS {
        return None;
    }
    // The VIP found is kept beside a flag, never left undefined: an `Option` built in the loop
    // left its payload undefined on the paths without one, and LLVM spilled that undefined
    // register, which the verifier refuses.
    let mut one = named[0];
    let mut found = false;
    let mut i = 0;
    while i < BACKEND_VIPS {
        if (i as u32) < count && of_proto(&named[i]) {
            if found {
                return None;
            }
            one = named[i];
            found = true;
        }
        i += 1;
    }
    if found { Some(one) } else { None }
}

/// The readers of `BackendVips` and `BackendVips6` (`$vips`, whose VIPs are `$key`s).
macro_rules! backend_vips_readers {
    ($vips:ty, $key:ty) => {
        impl $vips {
            /// How many VIPs the backend serves.
            #[inline(always)]
            pub fn served(&self) -> u32 {
                self.count & !BACKEND_NO_LEAN
            }
            /// Whether no lean flow can hold the backend (`BACKEND_NO_LEAN`).
            #[inline(always)]
            pub fn no_lean(&self) -> bool {
                self.count & BACKEND_NO_LEAN != 0
            }
            /// The backend's one VIP of protocol `proto`, if it serves exactly one: a new flow
            /// through it to that VIP is lean (keeps no reverse entry).
            #[inline(always)]
            pub fn single(&self, proto: u8) -> Option<$key> {
                single_vip(self.served(), &self.vips, |k| k.proto == proto)
            }
            /// Whether the backend serves `vip` and no other VIP of its protocol
            /// (`single(vip.proto) == Some(*vip)`).
            #[inline(always)]
            pub fn sole(&self, vip: &$key) -> bool {
                sole_vip(self.served(), &self.vips, *vip, |k| k.proto == vip.proto)
            }
        }
    };
}
backend_vips_readers!(BackendVips, VipKey);
backend_vips_readers!(BackendVips6, VipKey6);

/// `ReplyEntry::ends`: the client sent FIN (the same bit as FIN in TCP's flags).
pub const END_CLIENT_FIN: u16 = 0x01;
/// `ReplyEntry::ends`: the backend sent FIN.
pub const END_BACKEND_FIN: u16 = 0x02;
/// `ReplyEntry::ends`: either side sent RST (the same bit as RST in TCP's flags).
pub const END_RESET: u16 = 0x04;

/// Every `END_*` bit.
pub const END_MASK: u16 = END_CLIENT_FIN | END_BACKEND_FIN | END_RESET;

/// A TCP connection whose `ends` say it is over: reset, or FIN from both sides. A new flow from
/// the same client address and port to another VIP may then take its backend.
pub const fn connection_over(ends: u16) -> bool {
    ends & END_RESET != 0
        || ends & (END_CLIENT_FIN | END_BACKEND_FIN) == END_CLIENT_FIN | END_BACKEND_FIN
}

/// Key of `lb_svc6_v1`: an IPv6 virtual service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey6 {
    /// IPv6 address, BE (as in the packet, four 32-bit words).
    pub addr: [u32; 4],
    /// L4 port, BE.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Padding, always 0.
    pub _pad: u8,
}

/// Value of `lb_be6_v1` (an array indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend6 {
    /// IPv6 address, BE.
    pub addr: [u32; 4],
    /// L4 port, BE.
    pub port: u16,
    /// `BACKEND_LIVE` when the slot is in use.
    pub flags: u8,
    /// Padding, always 0.
    pub _pad: u8,
}

/// An IPv6 flow's 5-tuple as in the packet: key of `lb_ct6_v5` (in its bucket) and `lb_nat6_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flow6 {
    /// BE.
    pub src: [u32; 4],
    /// BE.
    pub dst: [u32; 4],
    /// BE.
    pub sport: u16,
    /// BE.
    pub dport: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Padding, always 0.
    pub _pad: [u8; 3],
}

/// Value of `lb_nat6_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyEntry6 {
    /// The VIP's IPv6 address, BE.
    pub vip_addr: [u32; 4],
    /// The VIP's port, BE.
    pub vip_port: u16,
    /// As `ReplyEntry::ends` (the socket path's `lb_sockrev_v1` keeps it 0).
    pub ends: u16,
}

/// Key of `lb_frag_v1`: an IPv4 datagram as its fragments name it (addresses as sent, BE).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address, BE.
    pub src: u32,
    /// Destination address, BE.
    pub dst: u32,
    /// The IP identification, BE.
    pub id: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Padding, always 0.
    pub _pad: u8,
}

/// Value of `lb_frag_v1`: the address the later fragments get.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragEntry {
    /// BE.
    pub addr: u32,
    /// 1: it replaces the destination (towards a backend); 0: the source (a reply from a VIP).
    pub dst: u8,
    /// Padding, always 0.
    pub _pad: [u8; 3],
}

/// The IPv6 flow hash: the addresses folded to 32 bits, then `flow_hash`.
#[inline(always)]
pub const fn flow_hash6(src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let s = src[0] ^ src[1].rotate_left(8) ^ src[2].rotate_left(16) ^ src[3].rotate_left(24);
    let d = dst[0] ^ dst[1].rotate_left(8) ^ dst[2].rotate_left(16) ^ dst[3].rotate_left(24);
    flow_hash(s, d, sport, dport, proto)
}

/// Value of `lb_svctr_v2` (by service id) and `lb_betr_v2` (by backend id): what clients sent
/// to a service or backend, through one CPU. The agent zeroes an id's slots when it gives it out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// IP bytes (the IP header's total length).
    pub bytes: u64,
    /// New flows (first packets given a backend).
    pub new_flows: u64,
}

// ---------------------------------------------------------------------------------------------
// Counters: `lb_stats_v3` is a per-CPU array of u64 indexed by these.
// ---------------------------------------------------------------------------------------------

/// One counter of `lb_stats_v3`. The entry point counts exactly one outcome per packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Not for a VIP and not a reply of a translated flow: passed untouched.
    PassNotOurs = 0,
    /// A new flow to a VIP got a backend and was forwarded.
    NewFlow = 1,
    /// A packet of a tracked flow to a VIP was forwarded.
    Forwarded = 2,
    /// A reply from a backend was rewritten to come from the VIP.
    Reply = 3,
    /// Rewritten, but the kernel's FIB had no neighbour (or other answer): handed to the stack.
    RewrittenToStack = 4,
    /// Dropped: the VIP has no backend that takes new flows.
    DropNoBackend = 5,
    /// Dropped: a packet to a VIP whose headers are truncated or inconsistent.
    DropMalformed = 6,
    /// Dropped: the first fragment of a datagram to a VIP that the fragment table could not take
    /// (its later fragments could not have followed it).
    DropFragment = 7,
    /// Dropped: the flow tables could not take the new flow.
    DropFlowTable = 8,
    /// Dropped: the selection table pointed at a backend slot that is not live.
    DropBadBackend = 9,
    /// A rewritten packet left by the interface it came in on (XDP_TX).
    Tx = 10,
    /// A rewritten packet was redirected to another interface.
    Redirect = 11,
    /// An ICMP error about a packet sent to a backend was translated for the client (its inner
    /// packet now names the VIP), so path-MTU discovery and unreachables work through a VIP.
    IcmpToClient = 12,
    /// An ICMP error about a reply sent from a VIP was translated for the flow's backend.
    IcmpToBackend = 13,
    /// A translated packet too big for its next hop, with DF set (IPv6: always), was turned into
    /// an ICMP "fragmentation needed" / ICMPv6 "packet too big" to its sender, quoting it as the
    /// sender sent it (path MTU through a VIP).
    IcmpTooBig = 14,
    /// A new flow went to the next backend of its service's table instead of the one its hash
    /// picked: that backend already had an unfinished TCP connection (or a UDP flow) from the
    /// same client address and port to another VIP, and could not have told the two apart.
    /// Counted besides `NewFlow`.
    PortClashMoved = 15,
    /// Dropped: a new TCP flow whose every candidate backend already had an unfinished
    /// connection from the same client address and port to another VIP. Taking one would have
    /// broken that connection; the client retries.
    DropPortClash = 16,
}

/// Entries of `lb_stats_v3`: one per `Stat`.
pub const STAT_COUNT: u32 = 17;

impl Stat {
    /// Every outcome, in index order.
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::PassNotOurs,
        Stat::NewFlow,
        Stat::Forwarded,
        Stat::Reply,
        Stat::RewrittenToStack,
        Stat::DropNoBackend,
        Stat::DropMalformed,
        Stat::DropFragment,
        Stat::DropFlowTable,
        Stat::DropBadBackend,
        Stat::Tx,
        Stat::Redirect,
        Stat::IcmpToClient,
        Stat::IcmpToBackend,
        Stat::IcmpTooBig,
        Stat::PortClashMoved,
        Stat::DropPortClash,
    ];

    /// What `lbctl`, the status socket and the metrics know about this counter.
    pub const fn counter(self) -> Counter {
        COUNTERS[self as usize]
    }

    /// Name used by `lbctl stats`, the JSON outputs and the status socket.
    pub const fn name(self) -> &'static str {
        self.counter().name
    }

    /// What it counts, in a line (`lbctl stats`).
    pub const fn description(self) -> &'static str {
        self.counter().description
    }

    /// Where Prometheus finds it.
    pub const fn metric(self) -> Metric {
        self.counter().metric
    }
}

/// A Prometheus counter family: several counters may share one, told apart by a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricFamily {
    /// The family's name, without the `_total` suffix OpenMetrics adds to counters.
    pub name: &'static str,
    /// Its help text.
    pub help: &'static str,
}

/// Where a counter appears in the metrics: its family and, if the family holds several, the
/// label (name, value) that is this counter's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metric {
    /// The family.
    pub family: MetricFamily,
    /// The label telling this counter apart within its family.
    pub label: Option<(&'static str, &'static str)>,
}

/// `lb_packets{outcome}`: packets by what the program did with them.
pub const METRIC_PACKETS: MetricFamily = MetricFamily {
    name: "lb_packets",
    help: "Packets seen by the XDP program, by outcome",
};
/// `lb_dropped_packets{reason}`: packets to a VIP the program dropped.
pub const METRIC_DROPPED: MetricFamily = MetricFamily {
    name: "lb_dropped_packets",
    help: "Packets to a VIP the XDP program dropped, by reason",
};
/// `lb_flows_lost`: established flows that found no flow entry.
pub const METRIC_FLOWS_LOST: MetricFamily = MetricFamily {
    name: "lb_flows_lost",
    help: "Packets of established TCP flows that found no flow entry (evicted while alive)",
};

/// `lb_flows_moved`: flows in use moved to make room for a new flow.
pub const METRIC_FLOWS_MOVED: MetricFamily = MetricFamily {
    name: "lb_flows_moved",
    help: "Flows in use the flow table moved to their other bucket to make room for a new flow",
};
/// `lb_flows_evicted`: flows in use whose slot a new flow took.
pub const METRIC_FLOWS_EVICTED: MetricFamily = MetricFamily {
    name: "lb_flows_evicted",
    help: "Flows in use whose flow table slot a new flow took (both its buckets full of flows in use, none could move)",
};

/// One counter the data plane keeps: its name, what it counts, its metric, and where the kernel
/// keeps it (a per-CPU array of `u64`, summed over CPUs when read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    /// Name in `lbctl stats`, the JSON outputs and the status socket.
    pub name: &'static str,
    /// What it counts, in a line.
    pub description: &'static str,
    /// How Prometheus sees it.
    pub metric: Metric,
    /// The per-CPU array holding it.
    pub map: &'static str,
    /// Its index in that array.
    pub index: u32,
}

const fn outcome(name: &'static str, index: Stat, description: &'static str) -> Counter {
    Counter {
        name,
        description,
        metric: Metric {
            family: METRIC_PACKETS,
            label: Some(("outcome", name)),
        },
        map: MAP_STATS,
        index: index as u32,
    }
}

const fn dropped(
    name: &'static str,
    reason: &'static str,
    index: Stat,
    description: &'static str,
) -> Counter {
    Counter {
        name,
        description,
        metric: Metric {
            family: METRIC_DROPPED,
            label: Some(("reason", reason)),
        },
        map: MAP_STATS,
        index: index as u32,
    }
}

/// Every counter of the data plane, in the order `lbctl stats` shows them: first the packet
/// outcomes of `lb_stats_v3` (element `i` describes `Stat::ALL[i]`), then the lost flows of
/// `lb_lost_v1`, then the flow tables' of `lb_ftpres_v1`, then the local path's of
/// `lb_sockst_v2`. `lbctl stats`, `lbctl status`, the status socket and the metrics all read
/// this table and nothing else.
pub const COUNTERS: [Counter;
    STAT_COUNT as usize + 1 + FLOW_PRESSURE_COUNT as usize + SOCK_STAT_COUNT as usize] = [
    outcome(
        "pass_not_ours",
        Stat::PassNotOurs,
        "packets neither for a VIP nor a reply: passed untouched",
    ),
    outcome("new_flow", Stat::NewFlow, "new flows given a backend"),
    outcome(
        "forwarded",
        Stat::Forwarded,
        "packets of tracked flows sent to their backend",
    ),
    outcome(
        "reply",
        Stat::Reply,
        "replies rewritten to come from the VIP",
    ),
    outcome(
        "rewritten_to_stack",
        Stat::RewrittenToStack,
        "rewritten, then handed to the kernel to forward (no neighbour entry yet)",
    ),
    dropped(
        "drop_no_backend",
        "no_backend",
        Stat::DropNoBackend,
        "dropped: the VIP has no backend taking new flows",
    ),
    dropped(
        "drop_malformed",
        "malformed",
        Stat::DropMalformed,
        "dropped: a packet to a VIP with truncated or inconsistent headers",
    ),
    dropped(
        "drop_fragment",
        "fragment",
        Stat::DropFragment,
        "dropped: a first fragment to a VIP the fragment table could not take",
    ),
    dropped(
        "drop_flow_table",
        "flow_table",
        Stat::DropFlowTable,
        "dropped: the flow table could not take a new flow",
    ),
    dropped(
        "drop_bad_backend",
        "bad_backend",
        Stat::DropBadBackend,
        "dropped: the table pointed at a backend slot that is not live",
    ),
    outcome(
        "tx",
        Stat::Tx,
        "sent back out of the interface it came in on",
    ),
    outcome("redirect", Stat::Redirect, "sent out of another interface"),
    outcome(
        "icmp_to_client",
        Stat::IcmpToClient,
        "ICMP errors about a flow translated for its client (path MTU, unreachable)",
    ),
    outcome(
        "icmp_to_backend",
        Stat::IcmpToBackend,
        "ICMP errors about a reply translated for the flow's backend",
    ),
    outcome(
        "icmp_too_big",
        Stat::IcmpTooBig,
        "packets too big for the next hop (DF) answered with ICMP frag-needed / packet-too-big",
    ),
    outcome(
        "port_clash_moved",
        Stat::PortClashMoved,
        "new flows sent to the next backend: theirs had a live flow from the same client port to another VIP",
    ),
    dropped(
        "drop_port_clash",
        "port_clash",
        Stat::DropPortClash,
        "dropped: a new TCP flow whose every candidate backend had a live one from the same client port to another VIP",
    ),
    FLOWS_LOST,
    FLOW_PRESSURE[0],
    FLOW_PRESSURE[1],
    LOCAL_COUNTERS[0],
    LOCAL_COUNTERS[1],
    LOCAL_COUNTERS[2],
    LOCAL_COUNTERS[3],
    LOCAL_COUNTERS[4],
    LOCAL_COUNTERS[5],
    LOCAL_COUNTERS[6],
    LOCAL_COUNTERS[7],
    LOCAL_COUNTERS[8],
    LOCAL_COUNTERS[9],
];

// Element `i` of `COUNTERS` must describe `Stat` `i`: checked when this crate compiles.
const _: () = {
    let mut i = 0;
    while i < STAT_COUNT as usize {
        assert!(COUNTERS[i].index as usize == i);
        i += 1;
    }
};

/// The lost flows of `lb_lost_v1`: counted besides the packet's outcome, so not a `Stat`.
pub const FLOWS_LOST: Counter = Counter {
    name: "flows_lost",
    description: "established TCP segments that found no flow entry (evicted while alive)",
    metric: Metric {
        family: METRIC_FLOWS_LOST,
        label: None,
    },
    map: MAP_FLOWS_LOST,
    index: 0,
};

/// The counters of `lb_ftpres_v1`, in its order: counted where a new flow's insert found both
/// of its buckets full of flows in use (off the path of a tracked packet).
pub const FLOW_PRESSURE: [Counter; FLOW_PRESSURE_COUNT as usize] = [
    Counter {
        name: "flows_moved",
        description: "flows in use moved to their other bucket to make room for a new flow",
        metric: Metric {
            family: METRIC_FLOWS_MOVED,
            label: None,
        },
        map: MAP_FLOW_PRESSURE,
        index: FLOW_PRESSURE_MOVED,
    },
    Counter {
        name: "flows_evicted",
        description: "flows in use whose slot a new flow took (none of its buckets' flows could move)",
        metric: Metric {
            family: METRIC_FLOWS_EVICTED,
            label: None,
        },
        map: MAP_FLOW_PRESSURE,
        index: FLOW_PRESSURE_EVICTED,
    },
];

// ---------------------------------------------------------------------------------------------
// The local (socket-level) path: cgroup sock_addr programs, see lb-ebpf/src/sock.rs.
// ---------------------------------------------------------------------------------------------

/// Per socket and VIP: the backend a socket was given (`SockKey` -> `FlowEntry`), LRU.
pub const MAP_SOCK_FWD: &str = "lb_sockfw_v1";
/// Per socket and backend: the VIP its replies and its peer name show (`SockKey` ->
/// `ReplyEntry6`), LRU.
pub const MAP_SOCK_REV: &str = "lb_sockrv_v1";
/// The local path's counters (per-CPU array of u64 indexed by `SockStat`).
pub const MAP_SOCK_STATS: &str = "lb_sockst_v2";
/// Connections (TCP connects, UDP sockets given a backend) the local path made, per service id
/// and CPU: u64 in regions, as `lb_svctr_v2`.
pub const MAP_SOCK_SERVICE: &str = "lb_socksv_v2";
/// Connections the local path made, per backend id and CPU: u64 in regions, as `lb_svctr_v2`.
pub const MAP_SOCK_BACKEND: &str = "lb_sockbe_v2";
/// Entries of each of the socket maps.
pub const MAX_SOCKETS: u32 = 65536;
/// `SockKey::family`: an IPv4 address (a v4-mapped one of an IPv6 socket too) in `addr[0]`.
pub const SOCK_FAMILY_V4: u8 = 4;
/// `SockKey::family`: an IPv6 address.
pub const SOCK_FAMILY_V6: u8 = 6;

/// Entry names of the cgroup programs, in the order they are attached.
pub const PROG_SOCK: [&str; 8] = [
    "lb_connect4",
    "lb_connect6",
    "lb_peer4",
    "lb_peer6",
    "lb_send4",
    "lb_send6",
    "lb_recv4",
    "lb_recv6",
];
/// Entry name of the cgroup program that forgets a connected socket's state when it closes.
pub const PROG_SOCK_RELEASE: &str = "lb_release";

/// Key of `lb_sockfw_v1` (the VIP a socket sent to) and `lb_sockrv_v1` (the backend a socket
/// was given): one socket and one address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// The kernel's socket cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// The address, BE: IPv4 in `addr[0]` (the rest 0), or IPv6.
    pub addr: [u32; 4],
    /// The port, BE.
    pub port: u16,
    /// `SOCK_FAMILY_V4` or `SOCK_FAMILY_V6`.
    pub family: u8,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Padding, always 0.
    pub _pad: u32,
}

/// One counter of `lb_sockst_v2`: what the local path did at a socket call.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockStat {
    /// A TCP connect() to a VIP was sent to a backend.
    Connect = 0,
    /// A UDP socket was given a backend for a VIP (its first send or its connect()).
    UdpPick = 1,
    /// A UDP socket whose backend left the service was given another on its next send.
    Repick = 2,
    /// connect() or send to a VIP with no backend taking new connections: ECONNREFUSED.
    Refused = 3,
    /// The table pointed at a backend slot that is not live: ECONNREFUSED.
    BadBackend = 4,
    /// The socket tables could not take an entry: the socket's peer name and replies show the
    /// backend's address.
    StateFull = 5,
    /// A reply or peer name was shown as coming from the VIP.
    Reverse = 6,
    /// A socket still sending to a VIP had lost its reverse entry (evicted by the LRU): put back.
    StateEvicted = 7,
    /// A connected socket of the local path closed: its entries were removed.
    Released = 8,
    /// A connected socket (TCP, connected UDP) of the local path whose backend left its service
    /// was ended by the agent (`--local-backend-gone end`: sock_diag SOCK_DESTROY, the
    /// application sees ECONNABORTED). Counted by the agent, not by the programs.
    Ended = 9,
}

/// Entries of `lb_sockst_v2`: one per `SockStat`.
pub const SOCK_STAT_COUNT: u32 = 10;

/// `lb_local_connections{outcome}`: what the local path did at connect() and send.
pub const METRIC_LOCAL: MetricFamily = MetricFamily {
    name: "lb_local_connections",
    help: "Socket calls to a VIP the local (cgroup) path served, by outcome",
};
/// `lb_local_failures{reason}`: socket calls to a VIP the local path refused or could not track.
pub const METRIC_LOCAL_FAILED: MetricFamily = MetricFamily {
    name: "lb_local_failures",
    help: "Socket calls to a VIP the local (cgroup) path refused or could not track, by reason",
};

const fn local(
    name: &'static str,
    family: MetricFamily,
    label: (&'static str, &'static str),
    index: SockStat,
    description: &'static str,
) -> Counter {
    Counter {
        name,
        description,
        metric: Metric {
            family,
            label: Some(label),
        },
        map: MAP_SOCK_STATS,
        index: index as u32,
    }
}

/// The local path's counters, in `COUNTERS` after the packet path's.
pub const LOCAL_COUNTERS: [Counter; SOCK_STAT_COUNT as usize] = [
    local(
        "local_connect",
        METRIC_LOCAL,
        ("outcome", "connect"),
        SockStat::Connect,
        "local path: TCP connects to a VIP sent to a backend",
    ),
    local(
        "local_udp_pick",
        METRIC_LOCAL,
        ("outcome", "udp_pick"),
        SockStat::UdpPick,
        "local path: UDP sockets given a backend for a VIP",
    ),
    local(
        "local_repick",
        METRIC_LOCAL,
        ("outcome", "repick"),
        SockStat::Repick,
        "local path: UDP sockets moved to another backend because theirs left",
    ),
    local(
        "local_refused",
        METRIC_LOCAL_FAILED,
        ("reason", "no_backend"),
        SockStat::Refused,
        "local path: connects/sends to a VIP with no backend: ECONNREFUSED",
    ),
    local(
        "local_bad_backend",
        METRIC_LOCAL_FAILED,
        ("reason", "bad_backend"),
        SockStat::BadBackend,
        "local path: the table pointed at a backend slot that is not live: ECONNREFUSED",
    ),
    local(
        "local_state_full",
        METRIC_LOCAL_FAILED,
        ("reason", "state_full"),
        SockStat::StateFull,
        "local path: socket tables full: peer name and replies show the backend",
    ),
    local(
        "local_reverse",
        METRIC_LOCAL,
        ("outcome", "reverse"),
        SockStat::Reverse,
        "local path: replies and peer names shown as coming from the VIP",
    ),
    local(
        "local_state_evicted",
        METRIC_LOCAL_FAILED,
        ("reason", "state_evicted"),
        SockStat::StateEvicted,
        "local path: reverse entries of live sockets found evicted (LRU), put back",
    ),
    local(
        "local_released",
        METRIC_LOCAL,
        ("outcome", "released"),
        SockStat::Released,
        "local path: connected sockets closed, their entries removed",
    ),
    local(
        "local_ended",
        METRIC_LOCAL,
        ("outcome", "ended"),
        SockStat::Ended,
        "local path: connected sockets ended (ECONNABORTED) because their backend left",
    ),
];

// Element `i` of `LOCAL_COUNTERS` must describe `SockStat` `i`.
const _: () = {
    let mut i = 0;
    while i < SOCK_STAT_COUNT as usize {
        assert!(LOCAL_COUNTERS[i].index as usize == i);
        i += 1;
    }
};

/// The table slot hash of the local path: a socket's cookie and the VIP it asked for (address
/// BE, IPv4 in `addr[0]`, port BE), through `flow_hash`. Shared so that `lbctl simulate --local`
/// answers with the programs' own arithmetic.
#[inline(always)]
pub const fn sock_hash(cookie: u64, addr: &[u32; 4], port: u16, proto: u8) -> u32 {
    let vip = addr[0] ^ addr[1].rotate_left(8) ^ addr[2].rotate_left(16) ^ addr[3].rotate_left(24);
    flow_hash(cookie as u32, (cookie >> 32) as u32 ^ vip, 0, port, proto)
}

/// The flow hash that picks a slot of a service's table: Bob Jenkins' lookup3 final mix over the
/// 5-tuple, exactly as the packets carry it (all fields BE). Shared so that user space can answer
/// "which backend would this flow reach?" with the kernel's own arithmetic.
#[inline(always)]
pub const fn flow_hash(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    const INIT: u32 = 0xdead_beef;
    let mut a = src.wrapping_add(INIT);
    let mut b = dst.wrapping_add(INIT);
    let mut c = ((sport as u32) << 16 | dport as u32) ^ ((proto as u32) << 8);
    c = c.wrapping_add(INIT);
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), made of integers, with explicit padding.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for Member {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for ReplyEntry {}
    unsafe impl aya::Pod for Traffic {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragEntry {}
    unsafe impl aya::Pod for VipKey6 {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for Flow6 {}
    unsafe impl aya::Pod for ReplyEntry6 {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for BackendVips {}
    unsafe impl aya::Pod for BackendKey6 {}
    unsafe impl aya::Pod for BackendVips6 {}
    unsafe impl aya::Pod for crate::flow_table::FlowBucket<Flow> {}
    unsafe impl aya::Pod for crate::flow_table::FlowBucket<Flow6> {}
    unsafe impl aya::Pod for crate::flow_table::FlowBucket<crate::flow_table::Flow6V2> {}
    unsafe impl aya::Pod for crate::flow_table::FlowBucket<crate::flow_table::Flow6V3> {}
}

// ---------------------------------------------------------------------------------------------
// Next-hop cache of the forwarding stage (lb-ebpf `fwd`)
// ---------------------------------------------------------------------------------------------

/// The longest time a next hop (outgoing interface, source and destination MAC) the program got
/// from the kernel's FIB is reused for a destination: a route or neighbour change reaches the
/// packets within this bound (1 s). The FIB is asked again after it, and for any packet longer
/// than the FIB approved for the entry.
pub const NEXT_HOP_MAX_AGE_NS: u64 = 1_000_000_000;

/// Destinations (per ingress interface) the next-hop cache holds; the least recently used one
/// makes room for a new one.
pub const NEXT_HOP_ENTRIES: u32 = 65_536;

/// The programs' first-level next-hop cache (not pinned): an array of 64-byte slots, `1 <<
/// NEAR_HOP_BITS` for each CPU, which the loader sizes for every possible CPU. Each CPU uses only
/// its own slots (the slot of a destination plus the CPU's number times the slots a CPU has).
pub const MAP_NEAR_HOPS: &str = "fwd_near_v2";
/// log2 of the slots each CPU has in `MAP_NEAR_HOPS`.
pub const NEAR_HOP_BITS: u32 = 10;

/// The programs' copies of what a backend's record (`MAP_BACKEND_VIPS`) tells its replies (not
/// pinned): an array of 32-byte slots, `1 << NEAR_SINGLE_BITS` for each CPU, sized and used as
/// `MAP_NEAR_HOPS` is.
pub const MAP_NEAR_SINGLES: &str = "nat_near_v2";
/// The IPv6 counterpart of `MAP_NEAR_SINGLES`, of 64-byte slots.
pub const MAP_NEAR_SINGLES6: &str = "nat_near6_v2";
/// log2 of the slots each CPU has in `MAP_NEAR_SINGLES` and `MAP_NEAR_SINGLES6`.
pub const NEAR_SINGLE_BITS: u32 = 12;

/// Every array the programs keep slots in for each CPU (not pinned): its name and log2 of the
/// slots a CPU has. The loader sizes each for every possible CPU; a CPU's slots start at its
/// number times its share.
pub const PER_CPU_SLOTS: [(&str, u32); 3] = [
    (MAP_NEAR_HOPS, NEAR_HOP_BITS),
    (MAP_NEAR_SINGLES, NEAR_SINGLE_BITS),
    (MAP_NEAR_SINGLES6, NEAR_SINGLE_BITS),
];

/// The longest time a CPU reuses its copy of a backend's one VIP of a protocol, or of the fact
/// that it serves several (from `lb_bevip_v1`, with the backend's id), for the backend's replies
/// (lb-ebpf `nat::reply_of`): 1 s. A copy is used only while its id is live with the backend's
/// address and port, and only to find a lean flow's entry that names that id, or (several) a
/// reverse entry whose connection is not over; see `nat::reply_of` for what a change of the
/// backend's VIPs means within the bound.
pub const RECORD_COPY_MAX_AGE_NS: u64 = 1_000_000_000;

// ---------------------------------------------------------------------------------------------
// Checks of tracked flows: membership and reverse entry (lb-ebpf `nat`)
// ---------------------------------------------------------------------------------------------

/// How often, at most, a tracked flow's packet checks what its flow entry says: that its backend
/// is still a member of the service, and that the flow's reverse entry is there (put back when
/// the LRU evicted it). Once in this time per flow, besides every SYN, FIN and RST, which
/// always look the reverse entry up, and besides every change of the service's `departures`,
/// which makes the flow check its membership again. So a reverse entry lost while its flow
/// lives is back within this bound (1 s) of the client's next packet, a backend's departure is
/// followed at once, and the common segment costs neither lookup.
pub const FLOW_CHECK_MAX_AGE_NS: u64 = 1_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn vip_filter_bits_are_in_the_map_and_spread() {
        const W: u32 = VIP_FILTER_MIN_WORDS;
        let bits = |addrs: &mut dyn Iterator<Item = u32>, port: u16| {
            let mut seen = [0u64; W as usize];
            let mut distinct = 0;
            for a in addrs {
                let (word, bit) = vip_filter_bit(a, port.to_be(), W);
                assert!(word < W && bit.count_ones() == 1);
                distinct += (seen[word as usize] & bit == 0) as u32;
                seen[word as usize] |= bit;
            }
            distinct
        };
        // 172.16.0.1 ..= 172.16.0.255 on one port (the last byte is the key's highest): nearly
        // one bit each (a collision only costs a lookup).
        let last_byte = bits(&mut (1..=255u32).map(|i| (0xac10_0000 | i).to_be()), 8080);
        assert!(last_byte >= 245, "{last_byte} bits for 255 VIPs");
        // One address, 255 ports.
        let mut one_address = [0u64; W as usize];
        for p in 8000..8255u16 {
            let (word, bit) = vip_filter_bit(0xac10_0001u32.to_be(), p.to_be(), W);
            one_address[word as usize] |= bit;
        }
        let ports: u32 = one_address.iter().map(|w| w.count_ones()).sum();
        assert!(ports >= 245, "{ports} bits for 255 ports");
        // IPv6: the words folded; an IPv4 address and its folded IPv6 twin may share a bit,
        // which only costs a lookup.
        assert_eq!(fold6([1, 2, 4, 8]), 15);
    }

    #[test]
    fn the_vip_filter_grows_with_the_room_for_services() {
        // Up to 16,384 services: the smallest filter (16 bits a service or more).
        assert_eq!(vip_filter_words(1), VIP_FILTER_MIN_WORDS);
        assert_eq!(vip_filter_words(16_384), VIP_FILTER_MIN_WORDS);
        // Above: a power of two, at least 16 bits a service.
        assert_eq!(vip_filter_words(16_385), 8192);
        assert_eq!(vip_filter_words(100_352), 32_768);
        assert_eq!(vip_filter_words(u32::MAX), VIP_FILTER_MAX_WORDS);
        // A map is used with its own size, or the power of two below it.
        assert_eq!(
            vip_filter_words_in(VIP_FILTER_MIN_WORDS),
            VIP_FILTER_MIN_WORDS
        );
        assert_eq!(vip_filter_words_in(32_768), 32_768);
        assert_eq!(vip_filter_words_in(5000), 4096);
        assert_eq!(vip_filter_words_in(u32::MAX), VIP_FILTER_MAX_WORDS);
        for services in [20_000u32, 65_536, 100_000, 1 << 20, 1 << 28] {
            let words = vip_filter_words(services);
            assert!(words.is_power_of_two() && words as u64 * 64 >= 16 * services as u64);
        }
        // A larger filter takes the same bits below the smaller one's size, and one more bit of
        // the hash above it: every bit stays in the map.
        for a in 1..=1000u32 {
            let (small, big) = (
                vip_filter_bit(a.to_be(), 80u16.to_be(), VIP_FILTER_MIN_WORDS),
                vip_filter_bit(a.to_be(), 80u16.to_be(), 32_768),
            );
            assert!(big.0 < 32_768 && big.1 == small.1 && big.0 % VIP_FILTER_MIN_WORDS == small.0);
        }
    }

    #[test]
    fn flow_check_notes_hold_for_their_departures_and_their_time() {
        let t = 5_000_000_000_000u64;
        let e = FlowEntry::new(0xf_ffff, 0x8_0001);
        assert_eq!((e.service(), e.backend()), (0xf_ffff, 0x8_0001));
        assert!(!e.checked_since(0, t), "a new entry was never checked");
        let n = e.noted(3, t);
        assert_eq!(
            (n.service(), n.backend()),
            (0xf_ffff, 0x8_0001),
            "the ids stay"
        );
        assert!(n.checked_since(3, t));
        assert!(n.checked_since(3, t + 900_000_000));
        assert!(!n.checked_since(3, t + FLOW_CHECK_MAX_AGE_NS), "too old");
        assert!(!n.checked_since(4, t), "a backend left since");
        // The time units wrap (every 2^36 ns, about 69 s): ages are taken modulo.
        let wrap = (1u64 << 36) - 10_000_000;
        let n = e.noted(0, wrap);
        assert!(n.checked_since(0, wrap + 500_000_000));
        assert!(!n.checked_since(0, wrap + 2 * FLOW_CHECK_MAX_AGE_NS));
        // A check at a time whose units are 0 still counts as a check.
        let n = e.noted(0, 1u64 << 36);
        assert!(n.checked_since(0, (1u64 << 36) + 1));
        // The departures count wraps too.
        let n = e.noted(u32::MAX, t);
        assert!(n.checked_since(u32::MAX, t));
        assert!(!n.checked_since(0, t));
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<VipKey>(), 8);
        assert_eq!(size_of::<Service>(), 16);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<MemberKey>(), 8);
        assert_eq!(size_of::<Member>(), 8);
        assert_eq!(size_of::<Flow>(), 16);
        assert_eq!(size_of::<FlowEntry>(), 8);
        assert_eq!(size_of::<ReplyEntry>(), 8);
        assert_eq!(size_of::<Traffic>(), 24);
        assert_eq!(size_of::<FragKey>(), 12);
        assert_eq!(size_of::<FragEntry>(), 8);
        assert_eq!(size_of::<VipKey6>(), 20);
        assert_eq!(size_of::<Backend6>(), 20);
        assert_eq!(size_of::<Flow6>(), 40);
        assert_eq!(size_of::<ReplyEntry6>(), 20);
        assert_eq!(size_of::<SockKey>(), 32);
    }

    #[test]
    fn stats_are_indexed_in_order() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{}", s.name());
            // Each outcome's descriptor names its own slot of lb_stats_v3.
            assert_eq!((s.counter().map, s.counter().index), (MAP_STATS, i as u32));
        }
    }

    #[test]
    fn counters_are_distinct_and_live_in_counter_maps() {
        let n = Stat::ALL.len();
        assert_eq!(
            COUNTERS.len(),
            n + 1 + FLOW_PRESSURE.len() + LOCAL_COUNTERS.len()
        );
        assert_eq!(COUNTERS[n], FLOWS_LOST);
        assert_eq!(COUNTERS[n + 1..n + 1 + FLOW_PRESSURE.len()], FLOW_PRESSURE);
        assert_eq!(COUNTERS[n + 1 + FLOW_PRESSURE.len()..], LOCAL_COUNTERS);
        for (i, a) in COUNTERS.iter().enumerate() {
            assert!(
                (a.map == MAP_STATS && a.index < STAT_COUNT)
                    || (a.map == MAP_FLOWS_LOST && a.index == 0)
                    || (a.map == MAP_FLOW_PRESSURE && a.index < FLOW_PRESSURE_COUNT)
                    || (a.map == MAP_SOCK_STATS && a.index < SOCK_STAT_COUNT),
                "{} is not in a counter map",
                a.name
            );
            assert!(!a.description.is_empty());
            for b in &COUNTERS[i + 1..] {
                assert_ne!(a.name, b.name);
                assert_ne!(
                    (a.map, a.index),
                    (b.map, b.index),
                    "{} and {}",
                    a.name,
                    b.name
                );
                assert_ne!(a.metric, b.metric, "{} and {}", a.name, b.name);
            }
        }
    }

    #[test]
    fn blocks_of_a_chunk_do_not_overlap() {
        const R: u32 = DEFAULT_RING_SIZE;
        let stride = ring_stride(R);
        assert_eq!(stride, 1024, "16381 slots take 1024 elements of 16");
        assert_eq!(
            table_index(0, R - 1, stride),
            (0, 1023, (R - 1) % RING_LANES)
        );
        assert_eq!(table_index(1, 0, stride), (0, 1024, 0));
        assert_eq!(table_index(15, R - 1, stride), (0, 16 * 1024 - 1, 12));
        assert_eq!(table_index(16, 17, stride), (1, 1, 1));
        assert_eq!(table_index(37, 0, 64), (2, 5 * 64, 0));
        assert_eq!(ring_stride(MAX_RING_SIZE), 8192);
        assert_eq!(table_chunks(DEFAULT_MAX_SERVICES), 65 + SIZE_CLASSES);
        assert_eq!(table_chunks(1), 2 + SIZE_CLASSES);
    }

    fn prime(n: u32) -> bool {
        n >= 2
            && (2..)
                .take_while(|d| d * d <= n)
                .all(|d| !n.is_multiple_of(d))
    }

    #[test]
    fn size_classes_are_the_largest_primes_below_powers_of_two() {
        for k in 1..=SIZE_CLASSES {
            let size = class_size(k);
            let power = 1u32 << (7 + k);
            assert!(prime(size), "class {k}: {size}");
            assert!(
                (size + 1..power).all(|n| !prime(n)),
                "class {k}: {size} is not the largest prime below {power}"
            );
            assert!(size <= MAX_RING_SIZE);
        }
        assert_eq!(class_size(1), 251);
        assert_eq!(class_size(7), DEFAULT_RING_SIZE);
        assert_eq!(class_size(0), 0);
        assert_eq!(class_size(SIZE_CLASSES + 1), 0);
        assert_eq!(class_size(ref_class(NO_TABLE)), 0);
    }

    #[test]
    fn a_table_has_a_hundred_slots_per_backend_below_the_configured_size() {
        let c = DEFAULT_RING_SIZE;
        assert_eq!(table_class(0, c), 1);
        assert_eq!(table_class(1, c), 1);
        assert_eq!(table_class(2, c), 1);
        assert_eq!(table_class(3, c), 2);
        assert_eq!(table_class(5, c), 2);
        assert_eq!(table_class(6, c), 3);
        assert_eq!(table_class(10, c), 3);
        assert_eq!(table_class(11, c), 4);
        assert_eq!(table_class(81, c), 6);
        // 16381 is the configured size itself: class 0 from there on.
        assert_eq!(table_class(82, c), 0);
        assert_eq!(table_class(100_000, c), 0);
        for n in 0..2000 {
            let size = table_size(table_class(n, c), c);
            assert!(
                size >= (n * SLOTS_PER_BACKEND).min(c),
                "{n} backends: {size}"
            );
            assert!(size <= c);
        }
        // Another configured size: a class is taken only when it is smaller.
        assert_eq!(table_class(5, 1031), 2);
        assert_eq!(table_class(10, 1031), 3);
        assert_eq!(table_class(11, 1031), 0);
        assert_eq!(table_class(1, 251), 0);
        assert_eq!(table_class(1, 3), 0);
        assert_eq!(table_class(1, MAX_RING_SIZE), 1);
        assert_eq!(table_class(655, MAX_RING_SIZE), 9);
        assert_eq!(table_class(656, MAX_RING_SIZE), 0);
    }

    #[test]
    fn a_table_ref_holds_its_class_and_block() {
        let max_block = table_chunks(LIMIT_SERVICES) * TABLES_PER_CHUNK;
        assert!(max_block < 1 << TABLE_BLOCK_BITS);
        for (class, block) in [(0, 0), (0, 17), (3, 5), (SIZE_CLASSES, max_block - 1)] {
            let t = table_ref(class, block);
            assert_eq!((ref_class(t), ref_block(t)), (class, block));
        }
        assert_eq!(
            table_ref(0, 42),
            42,
            "class 0 is named as lb_tables_v1 named a block"
        );
        assert_ne!(ref_class(NO_TABLE), 0);
    }
}
