//! BENCHMARKS.md: every figure comes from the `Report` of one run; the prose around the figures
//! says how they were measured. Comparisons are computed here from the same run's numbers.
use super::{
    Report, Section,
    control::{self},
    e2e::{self, Contender, Measurement},
    stats::Summary,
    xdp::{self, Case},
};
use lb_common::{DEFAULT_RING_SIZE, MAX_FLOWS};
use std::fmt::Write as _;

/// Map flag: entries allocated on demand, not at creation.
const BPF_F_NO_PREALLOC: u32 = 1;

/// `x` with `dec` decimals and thousands separators.
pub fn num(x: f64, dec: usize) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let s = format!("{:.*}", dec, x.abs());
    let (int, frac) = s.split_once('.').map_or((s.as_str(), ""), |(i, f)| (i, f));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    if x < 0.0 { format!("-{out}") } else { out }
}

/// "median (min–max)".
fn med_range(s: &Summary, dec: usize) -> String {
    format!(
        "{} ({}–{})",
        num(s.p50, dec),
        num(s.min, dec),
        num(s.max, dec)
    )
}

/// A Markdown table's header.
fn header(o: &mut String, columns: &[&str]) {
    let _ = writeln!(
        o,
        "| {} |\n|{}",
        columns.join(" | "),
        "---|".repeat(columns.len())
    );
}

/// A Markdown table's row.
fn row(o: &mut String, cells: &[String]) {
    let _ = writeln!(o, "| {} |", cells.join(" | "));
}

/// "1 backend", "5 backends".
fn plural(n: usize, what: &str) -> String {
    format!(
        "{} {what}{}",
        num(n as f64, 0),
        if n == 1 { "" } else { "s" }
    )
}

fn ratio(x: f64) -> String {
    if x >= 10.0 {
        format!("{}×", num(x, 0))
    } else {
        format!("{}×", num(x, 2))
    }
}

fn bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{} MiB", num(b as f64 / (1u64 << 20) as f64, 1))
    } else {
        format!("{} KiB", num(b as f64 / 1024.0, 1))
    }
}

fn duration(secs: f64) -> String {
    if secs >= 60.0 {
        format!("{} min {} s", (secs / 60.0) as u64, (secs % 60.0) as u64)
    } else {
        format!("{} s", num(secs, 1))
    }
}

/// Writes a section's heading; its results, or why it has none.
fn open<'a, T>(o: &mut String, title: &str, s: &'a Section<T>) -> Option<&'a T> {
    let _ = writeln!(o, "## {title}\n");
    if missing(o, s) {
        return None;
    }
    s.result.as_ref()
}

/// Says why a section has no numbers, if it has none.
pub fn missing<T>(out: &mut String, s: &Section<T>) -> bool {
    match (&s.result, &s.error) {
        (_, Some(e)) => {
            let _ = writeln!(
                out,
                "**This section failed in this run, so it has no numbers:** `{e}`\n"
            );
            true
        }
        (None, None) => {
            let _ = writeln!(
                out,
                "Not run in this run (`--only` chose another section).\n"
            );
            true
        }
        (Some(_), None) => false,
    }
}

pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(o, "# Benchmarks\n");
    let _ = writeln!(
        o,
        "Every number in this file was measured by one run of the command below on the machine \
         below, and written here by that run; none is edited by hand. Run the command again to \
         regenerate the file. (`cargo xtask bench --quick`, a short smoke run that CI makes after \
         the tests, writes `target/bench/BENCHMARKS.quick.md` instead.)\n"
    );
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| command | `{}` |", r.command);
    let _ = writeln!(o, "| date | {} |", m.date_utc);
    let _ = writeln!(o, "| run time | {} |", duration(r.seconds));
    let _ = writeln!(o, "| CPUs (nproc) | {} |", m.nproc);
    let _ = writeln!(o, "| CPU model (/proc/cpuinfo) | {} |", m.cpu_model);
    let _ = writeln!(o, "| kernel | {} |", m.kernel);
    let _ = writeln!(o, "| memory | {} |", m.memory);
    let _ = writeln!(o, "| commit | {} |", m.commit);
    let _ = writeln!(o, "| rustc (user space, release build) | {} |", m.rustc);
    let _ = writeln!(o, "| tools | {} |", m.tools.join("; "));
    let _ = writeln!(
        o,
        "\nThe machine is a shared virtual machine: absolute numbers move between runs, and other \
         work ran on it at the same time. So every comparison below is between measurements of \
         this one run, taken in alternation (round by round), and is given as a median with its \
         spread; ratios are computed from those medians.\n"
    );
    headline(&mut o, r);
    xdp_section(&mut o, &r.xdp);
    control_section(&mut o, &r.control);
    e2e_section(&mut o, &r.e2e);
    if let Some(d) = open(&mut o, "5. DNS server of named VIPs", &r.dns) {
        super::dns::markdown(&mut o, d);
    }
    super::local::markdown(&mut o, &r.local);
    super::hooks::markdown(&mut o, &r.hooks);
    super::katran::markdown(&mut o, &r.katran);
    super::live::markdown(&mut o, &r.live);
    not_measured(&mut o, r);
    o
}

fn case_result(sr: &xdp::SizeResult, c: Case) -> Option<&xdp::CaseResult> {
    sr.cases.iter().find(|x| x.case == c)
}

fn headline(o: &mut String, r: &Report) {
    let _ = writeln!(o, "## Headline\n");
    if let Some(x) = &r.xdp.result
        && let Some(first) = x.sizes.first()
    {
        let _ = writeln!(
            o,
            "Per packet (BPF_PROG_TEST_RUN, {} services, {} backend{}), against `lb_floor`, an XDP \
             program that only returns XDP_PASS, run on the same packets:\n",
            first.size.services,
            first.size.backends,
            if first.size.backends == 1 { "" } else { "s" }
        );
        let floor = case_result(first, Case::Floor)
            .map(|c| c.ns.p50)
            .unwrap_or(f64::NAN);
        let _ = writeln!(o, "- floor: {} ns per run", num(floor, 0));
        for c in [
            Case::TcpEstablished,
            Case::TcpNew,
            Case::Reply,
            Case::NotOurs,
            Case::Tcp6Established,
            Case::TcTcpEstablished,
        ] {
            if let Some(cr) = case_result(first, c) {
                let _ = writeln!(
                    o,
                    "- {}: {} ns, {} {} ({} ns above it)",
                    case_name(c),
                    num(cr.ns.p50, 0),
                    ratio(cr.ratio_to_floor.p50),
                    if c.is_tc() {
                        "TC's floor (`lb_tc_floor`)"
                    } else {
                        "the floor"
                    },
                    num(cr.above_floor_ns.p50, 0)
                );
            }
        }
        let est: Vec<f64> = x
            .sizes
            .iter()
            .filter_map(|s| case_result(s, Case::TcpEstablished).map(|c| c.ns.p50))
            .collect();
        if let Some(s) = Summary::of(&est) {
            let _ = writeln!(
                o,
                "- a tracked TCP flow's packet over all {} sizes (up to {} services, up to {} \
                 backends per service): medians from {} to {} ns",
                est.len(),
                x.sizes.iter().map(|s| s.size.services).max().unwrap_or(0),
                x.sizes.iter().map(|s| s.size.backends).max().unwrap_or(0),
                num(s.min, 0),
                num(s.max, 0)
            );
        }
        let _ = writeln!(o);
    }
    if let Some(e) = &r.e2e.result {
        let rows = e2e_ratio_rows(e);
        if !rows.is_empty() {
            let _ = writeln!(
                o,
                "End to end in network namespaces, the same load generator for all, this project \
                 over each baseline (medians of {} round{}; above 1 means this project does more; \
                 section 4 has the numbers, latencies and the comparison with no load balancer):\n",
                e.rounds,
                if e.rounds == 1 { "" } else { "s" }
            );
            let main: Vec<RatioRow> = rows
                .into_iter()
                .filter(|r| r.baseline != Contender::Direct && !r.metric.contains("latency"))
                .collect();
            ratio_table(o, &main);
        }
    }
}

fn case_name(c: Case) -> &'static str {
    match c {
        Case::Floor => "floor (lb_floor)",
        Case::TcpNew => "new TCP flow",
        Case::TcpEstablished => "tracked TCP flow",
        Case::UdpNew => "new UDP flow",
        Case::UdpEstablished => "tracked UDP flow",
        Case::Reply => "reply, reverse-translated",
        Case::NotOurs => "not for a VIP",
        Case::Tcp6New => "IPv6: new TCP flow",
        Case::Tcp6Established => "IPv6: tracked TCP flow",
        Case::Reply6 => "IPv6: reply",
        Case::TcFloor => "TC floor (lb_tc_floor)",
        Case::TcTcpNew => "TC: new TCP flow",
        Case::TcTcpEstablished => "TC: tracked TCP flow",
        Case::TcReply => "TC: reply",
    }
}

fn xdp_section(o: &mut String, s: &Section<xdp::Results>) {
    let Some(x) = open(o, "1. Per-packet cost of the XDP and TC programs", s) else {
        return;
    };
    let _ = writeln!(
        o,
        "Which program a user gets: `lbctl agent --iface NAME` attaches `lb_xdp` (XDP, native \
         mode) to a NIC whose driver runs XDP natively, and `lb_tc` (TC `clsact` ingress, a tcx \
         link) to veth, bridges, bonds, VLANs, tun/tap, dummy and every other virtual device (their \
         traffic may hold partial checksums, which only TC updates right), and to a NIC whose \
         driver refuses native XDP; `NAME:xdp` or `NAME:tc` forces one. The TC cases (`TC: ...`) \
         run `lb_tc` on the same kind of packets, each as a socket buffer arriving on the same \
         interface (`__sk_buff.ifindex`), measured against `lb_tc_floor` (returns TC_ACT_OK): \
         the test run of a TC program also allocates and frees a socket buffer, which its floor \
         includes.\n"
    );
    let _ = writeln!(
        o,
        "How: the object `lbctl` embeds is loaded with `lbctl::dataplane::load` (maps pinned in a \
         fresh directory per size, removed afterwards); `lb_floor` from the same object is loaded \
         next to `lb_xdp`. The maps are filled only by the control plane: a generated Marathon \
         document goes through `lbctl::marathon::derive` and `lbctl::dataplane::Writer::apply`. \
         Packets are Ethernet + IPv4 or IPv6 + TCP (SYN: 54 bytes over IPv4, 74 \
         over IPv6; ACK with 16 bytes of payload: 70, 90) or UDP (IPv4, 16 bytes of payload: 58), \
         built with correct checksums. Each arrives \
         (`xdp_md.ingress_ifindex`) on a veth interface of a namespace whose permanent neighbour \
         entries answer every FIB lookup, so each VIP packet takes the whole path: parse, lookups, \
         rewrite, checksums, FIB, redirect.\n"
    );
    let _ = writeln!(
        o,
        "Each case is a batch of {} distinct packets, each run once (`repeat` = 1) and timed by \
         the kernel (`duration` of that run). {} rounds; in each, every case runs its batch in \
         turn, starting one case further along the list than the round before. A round's figure is its median packet; tables give the median of \
         the {} round medians and the lowest–highest round. \"× floor\" is the case's median over \
         the floor's median of the same round, \"above floor\" their difference, both as medians \
         over rounds. Every duration includes what the test run itself costs around the program \
         (clock reads, softirq disable, context setup): that is what the floor measures.\n",
        num(x.batch as f64, 0),
        x.rounds,
        x.rounds
    );
    let _ = writeln!(
        o,
        "Why `repeat` = 1 for VIP packets: with `repeat` > 1 the kernel runs the program again on \
         the packet it has just rewritten, so from the second run on a VIP packet is a packet to a \
         backend (and a reply one to a client), not the case being measured. New flows need a new \
         5-tuple per packet anyway. Only packets the program passes untouched keep their class \
         over repeats; the table after the next one shows them with `repeat` = {}.\n",
        num(x.amortized.first().map_or(0.0, |a| a.repeat as f64), 0)
    );
    for (i, sr) in x.sizes.iter().enumerate() {
        if i == 0 {
            let _ = writeln!(
                o,
                "### {} services ({} backend{} each)\n",
                sr.size.services,
                sr.size.backends,
                if sr.size.backends == 1 { "" } else { "s" }
            );
            let _ = writeln!(
                o,
                "| case | packet | ns per packet: median (rounds' range) | per packet p10 / p90 / p99 | × floor | above floor, ns | verdict |\n|---|---|---|---|---|---|---|"
            );
            for c in &sr.cases {
                let v: Vec<String> = c
                    .verdicts
                    .iter()
                    .map(|(k, n)| format!("{k} ×{}", num(*n as f64, 0)))
                    .collect();
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} / {} / {} | {} | {} | {} |",
                    case_name(c.case),
                    c.case.describe(),
                    med_range(&c.ns, 0),
                    num(c.per_packet_ns.p10, 0),
                    num(c.per_packet_ns.p90, 0),
                    num(c.per_packet_ns.p99, 0),
                    if matches!(c.case, Case::Floor | Case::TcFloor) {
                        "1".into()
                    } else {
                        ratio(c.ratio_to_floor.p50)
                    },
                    if matches!(c.case, Case::Floor | Case::TcFloor) {
                        "0".into()
                    } else {
                        num(c.above_floor_ns.p50, 0)
                    },
                    v.join(", ")
                );
            }
            let _ = writeln!(o);
        }
    }
    if !x.amortized.is_empty() {
        let _ = writeln!(
            o,
            "Packets passed untouched, with `repeat` (one test run, the kernel's average per run): \
             the per-run overhead of the test run is spread over the repeats.\n"
        );
        header(
            o,
            &[
                "program",
                "packet",
                "repeat",
                "ns per run: median (rounds' range)",
            ],
        );
        for a in &x.amortized {
            let packet = if a.case == Case::Floor {
                "TCP SYN to the VIP"
            } else {
                "TCP ACK to a backend's address (not a VIP)"
            };
            row(
                o,
                &[
                    format!("`{}`", a.program),
                    packet.into(),
                    num(a.repeat as f64, 0),
                    med_range(&a.ns, 1),
                ],
            );
        }
        let _ = writeln!(o);
    }
    if !x.programs.is_empty() {
        header(
            o,
            &["program", "JITed bytes", "instructions verified", "memlock"],
        );
        for p in &x.programs {
            let verified = p
                .verified_instructions
                .map_or("–".into(), |v| num(v as f64, 0));
            let memlock = p.memlock.map_or("–".into(), |v| bytes(v as u64));
            row(
                o,
                &[
                    format!("`{}`", p.name),
                    num(p.jited_bytes as f64, 0),
                    verified,
                    memlock,
                ],
            );
        }
        let _ = writeln!(o);
    }
    super::paired::section(o, x);
    scale_section(o, x);
}

fn scale_section(o: &mut String, x: &xdp::Results) {
    let _ = writeln!(o, "## 2. Scale: cost per packet and memory by table size\n");
    let _ = writeln!(
        o,
        "Every size gets a fresh data plane sized for it (`lb_table` in xtask/src/bench.rs, as an \
         operator would with `--max-services`, `--max-backends`, `--max-members`): room for the \
         services rounded up to a multiple of 1,024 (at least the default 1,024), {} backends \
         and the memberships, with Maglev tables of {} slots up to 10,240 services and {} slots \
         above, which keeps 100,000 services at about 3 GiB of tables (the table size does not \
         change what a packet costs: one lookup either way); flow tables of {} entries. The \
         measured IPv4 VIP (172.16.0.1:8080) is TCP and UDP, two services, the measured IPv6 VIP \
         ([fd00:172:16::1]:8080) TCP, one; the other services are IPv4 TCP VIPs of other apps. \
         Every service has the given number of backends, drawn in turn from {} IPv4 addresses \
         (the IPv6 VIP's from {} IPv6 addresses). Each cell: median ns per packet (× floor of the \
         same rounds).\n",
        num(lb_common::DEFAULT_MAX_BACKENDS as f64, 0),
        num(DEFAULT_RING_SIZE as f64, 0),
        num(super::LARGE_RING_SIZE as f64, 0),
        num(MAX_FLOWS as f64, 0),
        num(xdp::BACKEND_POOL as f64, 0),
        num(xdp::BACKEND_POOL6 as f64, 0)
    );
    let mut cols = vec!["services", "backends per service"];
    cols.extend(Case::ALL.iter().map(|c| case_name(*c)));
    header(o, &cols);
    for sr in &x.sizes {
        let mut cells = vec![
            num(sr.size.services as f64, 0),
            num(sr.size.backends as f64, 0),
        ];
        for c in Case::ALL {
            cells.push(match case_result(sr, c) {
                Some(cr) if matches!(c, Case::Floor | Case::TcFloor) => num(cr.ns.p50, 0),
                Some(cr) => format!("{} ({})", num(cr.ns.p50, 0), ratio(cr.ratio_to_floor.p50)),
                None => "–".into(),
            });
        }
        row(o, &cells);
    }
    let _ = writeln!(
        o,
        "\nThe same sizes: what the control plane wrote, and how long deriving the document and \
         applying it to the empty maps took (once each):\n"
    );
    header(
        o,
        &[
            "services",
            "backends per service",
            "table slots a service (of the configured size)",
            "memberships",
            "distinct backends",
            "derive, ms",
            "apply, ms",
            "maps' memlock",
            "of which tables",
            "memlock ÷ (services × slots × 4 B + flow tables)",
        ],
    );
    for sr in &x.sizes {
        let tables = sr
            .maps
            .iter()
            .find(|m| m.name == super::xdp::TABLES_ROW)
            .map_or(0, |m| m.memlock);
        let flows: u64 = sr
            .maps
            .iter()
            .filter(|m| {
                lbctl::dataplane::MAPS.iter().any(|spec| {
                    spec.name == m.name
                        && matches!(
                            spec.sizing,
                            lbctl::dataplane::Sizing::Flows | lbctl::dataplane::Sizing::FlowBuckets
                        )
                })
            })
            .map(|m| m.memlock)
            .sum();
        // Each service's table has the size its backends give it (at most the configured one).
        let slots = lb_common::table_size(
            lb_common::table_class(sr.size.backends as u32, sr.ring_size),
            sr.ring_size,
        );
        let bound = sr.size.services as u64 * slots as u64 * 4 + flows;
        row(
            o,
            &[
                num(sr.size.services as f64, 0),
                num(sr.size.backends as f64, 0),
                format!(
                    "{} (of {})",
                    num(slots as f64, 0),
                    num(sr.ring_size as f64, 0)
                ),
                num(sr.memberships as f64, 0),
                num(sr.distinct_backends as f64, 0),
                num(sr.derive_ms, 1),
                num(sr.apply_ms, 1),
                bytes(sr.maps_memlock),
                bytes(tables),
                ratio(sr.maps_memlock as f64 / bound.max(1) as f64),
            ],
        );
    }
    let _ = writeln!(
        o,
        "\nThe last column is issue 12's memory goal (at most 2×): the flow tables are \
         `lb_ct_v3`, `lb_nat_v1`, `lb_ct6_v5` and `lb_nat6_v1`; the tables are the chunks of the \
         services' Maglev tables (inner maps of `lb_tables_v2`, 16 tables of one size each, made as \
         services get backends); a service's table has 100 slots per active backend, in the \
         size class just above, at most the configured size."
    );
    let _ = writeln!(o);
    if let (Some(first), Some(last)) = (x.sizes.first(), x.sizes.last()) {
        let same = x.sizes.iter().all(|s| s.maps_memlock == first.maps_memlock);
        let prealloc = first.maps.iter().all(|m| m.flags & BPF_F_NO_PREALLOC == 0);
        let _ = writeln!(
            o,
            "Kernel memory of the maps (`memlock` in /proc/self/fdinfo of each map's descriptor){}{}:\n",
            if same {
                ", the same at every size measured"
            } else {
                ", by map, at the smallest and largest size"
            },
            if prealloc {
                " (no map has BPF_F_NO_PREALLOC: the kernel allocates every map at its limit when \
                 it is created)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            o,
            "| map | key + value bytes | max entries ({} services) | memlock | max entries ({} services) | memlock |\n|---|---|---|---|---|---|",
            num(first.size.services as f64, 0),
            num(last.size.services as f64, 0)
        );
        for (a, b) in first.maps.iter().zip(&last.maps) {
            let _ = writeln!(
                o,
                "| `{}` | {} + {} | {} | {} | {} | {} |",
                a.name,
                a.key_size,
                a.value_size,
                num(a.max_entries as f64, 0),
                bytes(a.memlock),
                num(b.max_entries as f64, 0),
                bytes(b.memlock)
            );
        }
        let _ = writeln!(
            o,
            "| total | | | {} | | {} |\n",
            bytes(first.maps_memlock),
            bytes(last.maps_memlock)
        );
    }
    let _ = writeln!(
        o,
        "Checks, from the data plane's own counters, that each case measured what it says (every \
         \"new\" packet made a new flow, every \"tracked\" one found its flow, every reply was \
         translated, nothing went to the kernel's slow path or was dropped):\n"
    );
    let failing: Vec<String> = x
        .sizes
        .iter()
        .flat_map(|sr| {
            sr.checks
                .iter()
                .filter(|c| c.starts_with("MISMATCH"))
                .map(move |c| {
                    format!(
                        "{} services × {}: {c}",
                        sr.size.services,
                        plural(sr.size.backends, "backend")
                    )
                })
        })
        .collect();
    if failing.is_empty() {
        let _ = writeln!(
            o,
            "At every size, all as expected: {}.",
            x.sizes
                .first()
                .map_or(String::new(), |sr| sr.checks.join(", "))
        );
    } else {
        for f in failing {
            let _ = writeln!(o, "- {f}");
        }
    }
    let _ = writeln!(o);
}

fn control_section(o: &mut String, s: &Section<control::Results>) {
    let Some(c) = open(o, "3. Control plane", s) else {
        return;
    };
    let _ = writeln!(
        o,
        "Release build of `lbctl` as a library, in the bench's process. Documents are generated: \
         each app has one port with one `VIP_0` label (a TCP VIP of its own) and running tasks on \
         host networking. \"apply\" is `Writer::apply` into freshly created, empty maps sized \
         for the document, opened as the agent opens the maps it made (`Writer::open_made`: \
         counters the kernel zeroed are not zeroed again) (`lb_table`; each service's Maglev \
         table of the size given below copied into the pages of the table map mapped into \
         memory, a service's memberships in one `BPF_MAP_UPDATE_BATCH`, every other map element \
         in a `bpf()` call of its own).\n"
    );
    header(
        o,
        &[
            "apps × tasks",
            "services",
            "table slots",
            "derive, ms: median (range)",
            "apply, ms: median (range)",
        ],
    );
    for a in &c.apply {
        let _ = writeln!(
            o,
            "| {} × {} | {} | {} | {} | {} |",
            num(a.apps as f64, 0),
            a.tasks_per_app,
            num(a.services as f64, 0),
            num(a.ring_size as f64, 0),
            med_range(&a.derive_ms, 1),
            med_range(&a.apply_ms, 1)
        );
    }
    let _ = writeln!(
        o,
        "\n{} repetitions each.\n",
        c.apply.first().map_or(0, |a| a.derive_ms.n)
    );
    let _ = writeln!(
        o,
        "Maglev table builds (`lbctl::maglev::table(&names, size, DEFAULT_SEED)`; {} is the \
         data plane's size, a larger prime for comparison):\n\n| backends | table size | µs per build: median (p10–p90) | builds |\n|---|---|---|---|",
        num(DEFAULT_RING_SIZE as f64, 0)
    );
    for m in &c.maglev {
        let _ = writeln!(
            o,
            "| {} | {} | {} ({}–{}) | {} |",
            num(m.backends as f64, 0),
            num(m.table_size as f64, 0),
            num(m.us.p50, 1),
            num(m.us.p10, 1),
            num(m.us.p90, 1),
            num(m.us.n as f64, 0)
        );
    }
    let _ = writeln!(o);
    for ch in &c.change {
        let _ = writeln!(
            o,
            "One task change to the kernel maps: a document of {} apps is read as the agent's source \
             reads it (`Snapshot::parse`, `resolve_hosts_with` the reconciler's app cache) and \
             applied with the agent's own reconciler (`lbctl::agent::Sync::apply`: derive the apps \
             the cache does not hold, merge what changed, diff against the maps' mirror, write what differs); \
             then {} times a document differing from the last by one task (moved to a new \
             address) is read and reconciled, timed until `apply` returns, the maps written. Each change is then read back from the kernel maps: {} of {} were \
             there. This excludes how the agent learns of the change (it checks its file every \
             250 ms by default; with Marathon, this is the path of the events that are not about \
             one app's tasks: the event, a 500 ms debounce and a fetch of every app).\n",
            num(ch.apps as f64, 0),
            ch.changes,
            ch.verified,
            ch.changes
        );
        let _ = writeln!(
            o,
            "| | p50 | p99 | max |\n|---|---|---|---|\n| read and reconcile (to maps updated), ms | {} |\n| of which reading (split, hash, parse the apps not held, resolve), ms | {} |\n| of which deriving and merging what changed (`Snapshot::derive_cached`, `Merger`), ms | {} |\n| of which the writer (diff, table, maps), ms | {} |\n| for comparison: the same document derived from scratch (`marathon::derive`, no cache), ms | {} |\n",
            triple(&ch.reconcile_ms),
            triple(&ch.read_ms),
            triple(&ch.merge_ms),
            triple(&ch.write_ms),
            triple(&ch.scratch_ms),
        );
        let _ = writeln!(
            o,
            "The same kind of change as the agent applies it after a Marathon event naming the \
             app (`status_update_event` and the other task and health events): the app alone, \
             as `GET /v2/apps/{{id}}?embed=app.tasks` answers (`{{\"app\": ...}}`), is read \
             (`Snapshot::parse_owned`, `resolve_hosts`) and applied in its place \
             (`lbctl::agent::Sync::apply_app`: derive it, merge what changed, diff, write), \
             timed to the maps written; {} such changes, each to another app than the \
             document's change of the same step (the two kinds alternate in one reconciler). \
             Read back from the kernel maps: {} of {} were there. This excludes the event and \
             the fetch of the app (no debounce: it is fetched at once). Between steps, untimed, \
             the periodic whole apply runs when due (`Sync::check_whole`), as the agent's loop \
             runs it when it has waited 100 ms for an update.\n\n\
             | | p50 | p99 | max |\n|---|---|---|---|\n\
             | the app alone: read and reconcile (to maps updated), ms | {} |\n\
             | of which reading (parse, resolve), ms | {} |\n\
             | of which the writer, ms | {} |\n",
            ch.changes,
            ch.alone_verified,
            ch.changes,
            triple(&ch.alone_ms),
            triple(&ch.alone_read_ms),
            triple(&ch.alone_write_ms),
        );
    }
    if !c.starts.is_empty() {
        let _ = writeln!(
            o,
            "Start to served, one app (5 tasks): the real agent (release build, default sizes, in \
             a namespace and pin directory of its own each time) started {} times each way, \
             alternating; from starting the process to its service's table slot being found in \
             the kernel maps with its programs attached (their links pinned; checked every 2 ms: \
             on a fresh data plane the agent writes its first document while the kernel \
             verifies the programs). The agent verifies and loads only the packet \
             programs its interfaces' hooks run (none for the local path alone, whose cgroup \
             programs are small); the verifier takes a few hundred ms of CPU for each:\n\n\
             | agent | packet programs loaded | start to served, ms: median (range) |\n|---|---|---|",
            c.starts[0].ms.n
        );
        for r in &c.starts {
            let _ = writeln!(
                o,
                "| {} | {} | {} |",
                r.kind,
                r.programs,
                med_range(&r.ms, 0)
            );
        }
        let _ = writeln!(o);
    }
    if !c.rss.is_empty() {
        let _ = writeln!(
            o,
            "Memory of the real agent (`lbctl agent --apps FILE --iface ...` with the sizing flags \
             of `lb_table`, release build, in a namespace of its own), read from /proc/PID/status \
             once the kernel maps hold every service, and 0.5 s later (user-space memory: the \
             kernel maps are in section 2). \"Start to all served\" runs from starting the process \
             to the moment the service the writer writes last (the highest VIP: it writes them in \
             VIP order, each after its memberships and table) is seen in the maps with the \
             interface's program attached (its link pinned), checked every 10 ms with a few map \
             lookups, when the read of the kernel maps made right after finds \
             every service; \"to the end of that read\" is the time after that read (tens of \
             thousands of map lookups at 10,000 services), an upper bound that assumes no \
             order:\n\n| apps (5 tasks each) | services in the kernel | start to all served, ms | to the end of that read, ms | VmRSS | VmHWM (peak) |\n|---|---|---|---|---|---|"
        );
        for r in &c.rss {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} |",
                num(r.apps as f64, 0),
                num(r.services_in_kernel as f64, 0),
                num(r.last_ms, 0),
                num(r.serve_ms, 0),
                bytes(r.vm_rss_kb * 1024),
                bytes(r.vm_hwm_kb * 1024)
            );
        }
        let _ = writeln!(o);
    }
    if !c.events.is_empty() {
        let _ = writeln!(
            o,
            "A one-task change through the whole Marathon path: the real agent (`lbctl agent \
             --marathon URL`, release build, `--resync-secs 3600`, the sizing flags of `lb_table`, \
             in a namespace of its own) follows a fake Marathon (an HTTP server in the bench's \
             process, in the same namespace, which answers each request at once in one write \
             and each event in one write, as a server that buffers its answers does) serving a \
             document of the given size; once it serves \
             every app and follows the event stream, each change moves one task of one app (a \
             different app each time) and sends `status_update_event` naming the app. Timed from \
             sending the event to the agent's log line saying that app's service changed, which \
             it writes once the kernel maps are (the log is read every 0.2 ms): the event \
             stream, `GET /v2/apps/{{id}}?embed=app.tasks`, reading the app and applying it. \
             Then each change is looked for in the kernel maps.\n\n\
             | apps (5 tasks each) | changes | event to kernel, ms: p50 | p99 | max | apps fetched alone | full snapshots fetched | found in the kernel |\n\
             |---|---|---|---|---|---|---|---|"
        );
        for e in &c.events {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} of {} |",
                num(e.apps as f64, 0),
                e.changes,
                num(e.event_ms.p50, 2),
                num(e.event_ms.p99, 2),
                num(e.event_ms.max, 2),
                e.app_fetches,
                e.snapshots,
                e.verified,
                e.changes
            );
        }
        let _ = writeln!(o);
    }
}

/// One (contender, services) over all rounds.
struct Group<'a> {
    contender: Contender,
    services: usize,
    ms: Vec<&'a Measurement>,
}

impl Group<'_> {
    fn summary(&self, f: impl Fn(&Measurement) -> Option<f64>) -> Option<Summary> {
        Summary::of(&self.ms.iter().filter_map(|m| f(m)).collect::<Vec<_>>())
    }
    fn cps(&self) -> Option<Summary> {
        self.summary(|m| Some(m.cps.rate))
    }
    fn rps(&self) -> Option<Summary> {
        self.summary(|m| Some(m.rps.rate))
    }
    fn gbps(&self) -> Option<Summary> {
        self.summary(|m| m.iperf_gbps)
    }
    fn cps_p99(&self) -> Option<Summary> {
        self.summary(|m| m.cps_latency_us.map(|l| l.p99))
    }
    fn rps_p99(&self) -> Option<Summary> {
        self.summary(|m| m.rps_latency_us.map(|l| l.p99))
    }
}

fn groups(e: &e2e::Results) -> Vec<Group<'_>> {
    let mut out: Vec<Group> = Vec::new();
    for m in &e.measurements {
        match out
            .iter_mut()
            .find(|g| g.contender == m.contender && g.services == m.services)
        {
            Some(g) => g.ms.push(m),
            None => out.push(Group {
                contender: m.contender,
                services: m.services,
                ms: vec![m],
            }),
        }
    }
    out.sort_by_key(|g| (g.services > 1, g.contender as u8, g.services));
    out
}

/// A figure of a group, over its rounds.
type Metric = fn(&Group) -> Option<Summary>;

struct RatioRow {
    baseline: Contender,
    metric: &'static str,
    small: Option<(f64, usize, usize)>,
    large: Option<(f64, usize, usize)>,
}

fn e2e_ratio_rows(e: &e2e::Results) -> Vec<RatioRow> {
    let gs = groups(e);
    let lb: Vec<&Group> = gs.iter().filter(|g| g.contender == Contender::Lb).collect();
    let (Some(lb_small), Some(lb_large)) = (
        lb.iter().min_by_key(|g| g.services),
        lb.iter().max_by_key(|g| g.services),
    ) else {
        return Vec::new();
    };
    let metrics: [(&str, Metric); 5] = [
        ("new TCP connections per second", |g: &Group| g.cps()),
        (
            "requests per second, kept-alive connections",
            |g: &Group| g.rps(),
        ),
        ("iperf3 throughput", |g: &Group| g.gbps()),
        ("p99 latency of a new connection", |g: &Group| g.cps_p99()),
        ("p99 latency of a kept-alive request", |g: &Group| {
            g.rps_p99()
        }),
    ];
    let mut rows = Vec::new();
    for baseline in [
        Contender::IptablesNft,
        Contender::IptablesLegacy,
        Contender::Nftables,
        Contender::Direct,
    ] {
        let theirs: Vec<&Group> = gs.iter().filter(|g| g.contender == baseline).collect();
        let small = theirs.iter().min_by_key(|g| g.services);
        let large = theirs
            .iter()
            .max_by_key(|g| g.services)
            .filter(|g| g.services > 1);
        for (metric, f) in metrics {
            let r = |a: &Group, b: Option<&&Group>| -> Option<(f64, usize, usize)> {
                let b = b?;
                Some((f(a)?.p50 / f(b)?.p50, a.services, b.services))
            };
            rows.push(RatioRow {
                baseline,
                metric,
                small: r(lb_small, small),
                large: if lb_large.services > 1 {
                    r(lb_large, large)
                } else {
                    None
                },
            });
        }
    }
    rows
}

fn ratio_table(o: &mut String, rows: &[RatioRow]) {
    header(
        o,
        &[
            "this project over",
            "metric",
            "1 service each",
            "many services",
        ],
    );
    for r in rows {
        let cell = |c: &Option<(f64, usize, usize)>| match c {
            Some((x, a, b)) if a == b => ratio(*x),
            Some((x, a, b)) => format!(
                "{} ({} vs {} services)",
                ratio(*x),
                num(*a as f64, 0),
                num(*b as f64, 0)
            ),
            None => "–".into(),
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            r.baseline.name(),
            r.metric,
            cell(&r.small),
            cell(&r.large)
        );
    }
    let _ = writeln!(o);
}

fn e2e_section(o: &mut String, s: &Section<e2e::Results>) {
    let Some(e) = open(o, "4. End to end in network namespaces", s) else {
        return;
    };
    let _ = writeln!(
        o,
        "How: `lbtest::Lab` builds a client namespace (198.18.0.2), a load-balancer namespace and \
         {} backend namespaces (198.18.N.2), joined by veth pairs; nothing leaves them. Each \
         backend runs the bench's epoll server, which answers each request line with its name, on \
         the ports of the services that take load, and `iperf3 -s` runs on the first backend. Every measurement gets a fresh Lab, \
         so nothing one contender leaves behind (conntrack entries, a registered netfilter table) \
         reaches another; in it, one contender is set up in the load balancer's namespace, \
         measured, removed (`lbctl down` and a check that no XDP program is left; rules flushed \
         and checked gone), and the Lab deleted. {} round{}; each round runs every configuration \
         once, starting one further along the list than the round before.\n",
        e.backends,
        e.rounds,
        if e.rounds == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        o,
        "Contenders, each configured with N request services (VIP port 8080) of {} backends each, \
         service i's endpoints listening on port 20000 + i so that no two services share an \
         endpoint, as distinct services have distinct endpoints, plus one iperf3 service with one \
         backend (port 5201); the load is spread over up to 64 of the N VIPs evenly through the \
         table:\n\n\
         - **lb**: the real `lbctl agent --apps FILE` with XDP on all the load balancer's \
         interfaces and the sizing flags of `lb_table` (room for N + 1 services, {} table slots \
         each); services come from a generated Marathon document.\n\
         - **iptables**: `iptables-restore` of kube-proxy-style rules: PREROUTING → KUBE-SERVICES, \
         one `-d VIP -p tcp --dport` rule per service jumping to its KUBE-SVC chain, which picks an \
         endpoint chain with `-m statistic --mode random --probability 1/n, 1/(n-1), …`; each \
         KUBE-SEP chain DNATs. Measured with the nf_tables back end (`iptables`, Debian's default, \
         what kube-proxy uses on such hosts) and the legacy one (`iptables-legacy`).\n\
         - **nftables**: one table, `ip daddr . tcp dport vmap @services` to a chain per service \
         doing `dnat ip to numgen random mod N map {{ 0 : backend . port, … }}`.\n\
         - **no load balancer**: the client connects to the backends' own addresses; the load \
         balancer's namespace only routes. A reference, not a contender.\n\n\
         Load generator (one, for all; release build; threads inside the client's namespace; \
         each phase stops at {} s or 5,000,000 requests per thread): new connections: {} \
         threads, each connecting, sending one request line, reading the answer, closing with RST \
         (SO_LINGER 0, so no TIME_WAIT exhausts ports); latency is connect to answer. Requests: \
         {} threads, one kept-alive connection each, one request in flight each; latency is \
         request to answer. Throughput: one `iperf3 -c VIP -t {}` TCP stream client → backend. \
         A 0.2 s warm-up precedes each measurement. The new connections of every measurement \
         must be answered by all {} backends, or the run fails.\n",
        e.backends,
        num(DEFAULT_RING_SIZE as f64, 0),
        num(e.duration_s, 1),
        e.cps_threads,
        e.rps_threads,
        e.iperf_secs,
        e.backends
    );
    let gs = groups(e);
    header(
        o,
        &[
            "contender",
            "services",
            "setup, ms",
            "new conn/s: median (range)",
            "conn latency p50 / p99, µs",
            "requests/s: median (range)",
            "request latency p50 / p99, µs",
            "iperf3 Gbit/s: median (range)",
            "errors",
        ],
    );
    for g in &gs {
        let lat = |f: fn(&Measurement) -> Option<Summary>| {
            let p50 = g.summary(|m| f(m).map(|l| l.p50));
            let p99 = g.summary(|m| f(m).map(|l| l.p99));
            match (p50, p99) {
                (Some(a), Some(b)) => format!("{} / {}", num(a.p50, 0), num(b.p50, 0)),
                _ => "–".into(),
            }
        };
        let errors: u64 = g.ms.iter().map(|m| m.cps.errors + m.rps.errors).sum();
        let iperf_failed = g.ms.iter().filter(|m| m.iperf_gbps.is_none()).count();
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {}{} |",
            g.contender.name(),
            if g.contender == Contender::Direct {
                "–".into()
            } else {
                num(g.services as f64, 0)
            },
            g.summary(|m| Some(m.setup_ms))
                .map_or("–".into(), |s| num(s.p50, 0)),
            g.cps().map_or("–".into(), |s| med_range(&s, 0)),
            lat(|m| m.cps_latency_us),
            g.rps().map_or("–".into(), |s| med_range(&s, 0)),
            lat(|m| m.rps_latency_us),
            g.gbps().map_or("–".into(), |s| med_range(&s, 2)),
            num(errors as f64, 0),
            if iperf_failed > 0 {
                format!(", iperf3 failed {iperf_failed}×")
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(
        o,
        "\nLatencies are the median over rounds of each round's p50 and p99. \"setup\" is the time \
         to load the rules, or from starting the agent to `lbctl list` showing every service.\n"
    );
    let rows = e2e_ratio_rows(e);
    if !rows.is_empty() {
        let _ = writeln!(
            o,
            "Ratios (this project's median over the other's, same run):\n"
        );
        ratio_table(o, &rows);
    }
    let mut notes: Vec<String> = Vec::new();
    for g in &gs {
        for m in &g.ms {
            for (what, err) in [
                ("connections", &m.cps.first_error),
                ("requests", &m.rps.first_error),
                ("iperf3", &m.iperf_error),
            ] {
                if let Some(err) = err {
                    notes.push(format!(
                        "{} ({} services), round {}, {what}: {err}",
                        g.contender.name(),
                        g.services,
                        m.round + 1
                    ));
                }
            }
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(o, "Errors seen (first of each phase):\n");
        for n in notes {
            let _ = writeln!(o, "- {n}");
        }
        let _ = writeln!(o);
    }
    let mut offloads: Vec<(String, Vec<&str>)> = Vec::new();
    for g in &gs {
        let v =
            g.ms.first()
                .map_or("", |m| m.client_offloads.as_str())
                .to_string();
        match offloads.iter_mut().find(|(k, _)| *k == v) {
            Some((_, who)) => {
                if !who.contains(&g.contender.name()) {
                    who.push(g.contender.name())
                }
            }
            None => offloads.push((v, vec![g.contender.name()])),
        }
    }
    let _ = writeln!(
        o,
        "The client's interface while each contender ran (`ethtool -k c0`):\n"
    );
    for (v, who) in offloads {
        let _ = writeln!(o, "- {}: {v}", who.join(", "));
    }
    let _ = writeln!(o);
}

fn not_measured(o: &mut String, r: &Report) {
    let _ = writeln!(o, "## Not measured, and why\n");
    let _ = writeln!(
        o,
        "- IPv6 end to end, and IPv6 UDP: section 4 and the UDP cases are IPv4 only; IPv6 is \
         measured per packet (TCP new, tracked, reply) in sections 1 and 2.\n\
         - End to end with 100,000 services: section 4 has 1 and 10,000 services per \
         contender; this project's packet path at 100,000 services is in section 2.\n\
         - Real NICs, multiple queues, line rate: everything runs on veth pairs on a {}-CPU \
         virtual machine, where the load generator, the servers and the forwarding share the same \
         CPUs. End-to-end numbers compare the contenders on this setup; they are not the \
         capacity of any of them on hardware.\n\
         - How fast the agent notices a change (file polling, Marathon's event stream): section 3 \
         times from the new document to the maps written.",
        r.machine.nproc
    );
}

/// "p50 | p99 | max" of a summary in milliseconds, for a table row.
fn triple(s: &Summary) -> String {
    format!("{} | {} | {}", num(s.p50, 2), num(s.p99, 2), num(s.max, 2))
}
