//! Packet fixtures for the real XDP program, run with BPF_PROG_TEST_RUN (in the manner of
//! Katran's test fixtures): each fixture is an input frame, the verdict it must get, the exact
//! frame that must come out, and the counters that must move. Inputs and expected outputs are
//! both built by `lbtest::packet` from field descriptions; the program's own output is never used
//! as an expectation. The maps are filled only by the control plane, from Marathon documents.
use lb_common::Stat::{self, *};
use lbtest::{
    checksum,
    packet::{
        CLIENT_MAC, Frame, IP_MF, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_PSH,
        TCP_SYN, arp_request, ipv6_tcp_syn,
    },
    pktlab::{
        Dataplane, Ingress, MTU, PacketLab, XDP_DROP, XDP_PASS, XDP_REDIRECT, app, apps, departure,
        each_once, killing, next_hop, running, stat_delta,
    },
    privileged_or_skip,
    prop::{Rng, mutate},
};
use std::net::{Ipv4Addr, SocketAddrV4};

const fn sa(a: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(a[0], a[1], a[2], a[3]), port)
}

/// TCP and UDP, three backends.
const WEB: SocketAddrV4 = sa([172, 16, 0, 1], 8080);
const WEB_BACKENDS: [SocketAddrV4; 3] = [
    sa([198, 18, 1, 2], 31000),
    sa([198, 18, 1, 3], 31000),
    sa([198, 18, 1, 4], 31000),
];
/// TCP, one backend (which turns draining in the second phase).
const SOLO: SocketAddrV4 = sa([172, 16, 0, 2], 7000);
const SOLO_BACKEND: SocketAddrV4 = sa([198, 18, 1, 2], 32000);
/// TCP, one backend that has no neighbour entry.
const FAR: SocketAddrV4 = sa([172, 16, 0, 3], 9000);
const FAR_BACKEND: SocketAddrV4 = sa([198, 18, 1, 9], 31009);

/// The client (with a neighbour entry) and one without.
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const LOST_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, port)
}

/// The Marathon document: /web on WEB (tcp and udp) with `web` tasks, /solo on SOLO with its one
/// task running or being killed, /far on FAR.
fn document(web: &[SocketAddrV4], solo_draining: bool) -> String {
    let web: Vec<_> = web.iter().map(|b| running(*b)).collect();
    let solo = if solo_draining {
        killing(SOLO_BACKEND)
    } else {
        running(SOLO_BACKEND)
    };
    apps(vec![
        app("/web", "tcp,udp", &[("VIP_0", &WEB.to_string())], &web),
        app("/solo", "tcp", &[("VIP_0", &SOLO.to_string())], &[solo]),
        app(
            "/far",
            "tcp",
            &[("VIP_0", &FAR.to_string())],
            &[running(FAR_BACKEND)],
        ),
    ])
}

/// One fixture.
struct Fixture {
    what: String,
    input: Vec<u8>,
    ingress: Ingress,
    verdict: u32,
    output: Vec<u8>,
    /// Counters that must each grow by one; every other counter must stay.
    counts: Vec<Stat>,
    /// The input's L4 checksum is wrong on purpose: the output's must be wrong by as much.
    corrupt: bool,
}

fn fixture(what: &str, input: Vec<u8>, ingress: Ingress) -> Fixture {
    Fixture {
        what: what.to_string(),
        output: input.clone(),
        input,
        ingress,
        verdict: XDP_PASS,
        counts: vec![PassNotOurs],
        corrupt: false,
    }
}

/// Passed up untouched: not the load balancer's business.
fn untouched(what: &str, input: Vec<u8>) -> Fixture {
    fixture(what, input, Ingress::Client)
}

/// Dropped, and counted as `why`.
fn dropped(what: &str, input: &Frame, why: Stat) -> Fixture {
    dropped_bytes(what, input.build(), why)
}

fn dropped_bytes(what: &str, input: Vec<u8>, why: Stat) -> Fixture {
    Fixture {
        verdict: XDP_DROP,
        counts: vec![why],
        ..fixture(what, input, Ingress::Client)
    }
}

/// Rewritten to `rewritten` (counted as `how`), then forwarded by the FIB's answer: one hop
/// less, the egress interface's and the neighbour's MAC addresses, out of the interface it came
/// in on (XDP_TX) or another one (XDP_REDIRECT).
fn forwarded(what: &str, input: &Frame, ingress: Ingress, rewritten: Frame, how: Stat) -> Fixture {
    let (verdict, leave, src, dst) =
        departure(ingress, rewritten.dst).expect("a destination with a neighbour");
    Fixture {
        verdict,
        output: rewritten.hop(src, dst).build(),
        counts: vec![how, leave],
        ..fixture(what, input.build(), ingress)
    }
}

/// Rewritten to `rewritten` (counted as `how`) and handed to the kernel's forwarding as it is.
fn to_stack(what: &str, input: &Frame, ingress: Ingress, rewritten: Frame, how: Stat) -> Fixture {
    Fixture {
        output: rewritten.build(),
        counts: vec![how, RewrittenToStack],
        ..fixture(what, input.build(), ingress)
    }
}

/// The first `n` bytes of `f`.
fn cut(f: &Frame, n: usize) -> Vec<u8> {
    let mut b = f.build();
    b.truncate(n);
    b
}

/// Runs one fixture; says what differs.
fn check(dp: &mut Dataplane, f: &Fixture) -> Result<(), String> {
    if let Ok(l) = checksum::layout(&f.input) {
        let r = checksum::ip_residue(&f.input, &l);
        if r != 0xffff {
            return Err(format!(
                "the input's IP checksum is wrong: residue {r:#06x}"
            ));
        }
        if checksum::whole(&f.input) && !f.corrupt {
            checksum::verify(&f.input).map_err(|e| format!("the input is wrong: {e}"))?;
        }
    }
    let before = dp.stats();
    let run = dp
        .run(&f.input, f.ingress)
        .map_err(|e| format!("test_run: {e}"))?;
    let after = dp.stats();
    let mut errs = Vec::new();
    if run.verdict != f.verdict {
        errs.push(format!("verdict {} (want {})", run.verdict, f.verdict));
    }
    if run.out != f.output {
        errs.push(format!(
            "output differs from the expected frame:\n{}",
            diff(&run.out, &f.output)
        ));
    }
    let (moved, want) = (stat_delta(&before, &after), each_once(&f.counts));
    if moved != want {
        errs.push(format!("counters moved {moved:?} (want {want:?})"));
    }
    if let Ok(lo) = checksum::layout(&run.out) {
        let r = checksum::ip_residue(&run.out, &lo);
        if r != 0xffff {
            errs.push(format!("output IP checksum wrong: residue {r:#06x}"));
        }
        if !checksum::whole(&run.out) {
            // Truncated or inconsistent: there is no whole datagram to check.
        } else if f.corrupt {
            let li = checksum::layout(&f.input)?;
            let (ri, ro) = (
                checksum::l4_residue(&f.input, &li, f.input.len()),
                checksum::l4_residue(&run.out, &lo, run.out.len()),
            );
            if ri != ro || ri == 0xffff {
                errs.push(format!(
                    "the corrupted L4 checksum changed its error: residue {ri:#06x} -> {ro:#06x}"
                ));
            }
        } else if let Err(e) = checksum::verify(&run.out) {
            errs.push(format!("output checksums: {e}"));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// The bytes where two frames differ, with both frames in hex.
fn diff(got: &[u8], want: &[u8]) -> String {
    let at: Vec<usize> = (0..got.len().max(want.len()))
        .filter(|i| got.get(*i) != want.get(*i))
        .collect();
    format!(
        "  differing offsets {at:?}\n  got  {}\n  want {}",
        hex(got),
        hex(want)
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `fixtures` in order and appends each failure, named, to `failures`.
fn run_phase(dp: &mut Dataplane, phase: &str, fixtures: &[Fixture], failures: &mut Vec<String>) {
    for f in fixtures {
        match check(dp, f) {
            Ok(()) => eprintln!("ok    {phase}: {}", f.what),
            Err(e) => {
                eprintln!("FAIL  {phase}: {}: {e}", f.what);
                failures.push(format!("{phase}: {}: {e}", f.what));
            }
        }
    }
}

/// The backend the control plane predicts for a new flow of `f`'s 5-tuple; it must be one of
/// `among`.
fn predicted(dp: &Dataplane, f: &Frame, among: &[SocketAddrV4]) -> SocketAddrV4 {
    let (src, vip) = (f.source(), f.destination());
    let b = dp
        .pick(vip, f.proto(), src)
        .unwrap_or_else(|| panic!("no backend predicted for {src} -> {vip}"));
    assert!(
        among.contains(&b),
        "{src} -> {vip} predicted {b}, not one of {among:?}"
    );
    b
}

/// The first packet of a new flow to WEB: forwarded to the backend the control plane predicts,
/// which is returned too.
fn new_flow(dp: &Dataplane, what: &str, f: &Frame, ingress: Ingress) -> (Fixture, SocketAddrV4) {
    let be = predicted(dp, f, &WEB_BACKENDS);
    (forwarded(what, f, ingress, f.clone().to(be), NewFlow), be)
}

/// A 5-tuple: source, destination, protocol.
type Tuple = (SocketAddrV4, SocketAddrV4, u8);

/// The kernel's flow key for a 5-tuple.
fn kernel_flow((src, dst, proto): Tuple) -> lb_common::Flow {
    lb_common::Flow {
        src: u32::from(*src.ip()).to_be(),
        dst: u32::from(*dst.ip()).to_be(),
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// What the first phase leaves for the later ones.
struct Tracked {
    /// The flow whose backend is removed in the third phase, and that backend.
    moved: (SocketAddrV4, SocketAddrV4),
    /// A flow whose backend stays, and that backend.
    stays: (SocketAddrV4, SocketAddrV4),
}

/// Phase 1: every service has its backends. New flows, tracked flows, replies, and everything
/// that is not the load balancer's or cannot be served.
fn phase_one(dp: &Dataplane) -> (Vec<Fixture>, Tracked) {
    let (c, b) = (Ingress::Client, Ingress::Backend);
    let mut t = Vec::new();
    let new = |what: &str, f: &Frame, ingress: Ingress, t: &mut Vec<Fixture>| {
        let (fixture, be) = new_flow(dp, what, f, ingress);
        t.push(fixture);
        be
    };

    let syn = Frame::tcp(client(40000), WEB, TCP_SYN);
    let be = new(
        "new TCP SYN to a VIP: to the backend the control plane predicts",
        &syn,
        c,
        &mut t,
    );
    let ack = Frame::tcp(client(40000), WEB, TCP_ACK | TCP_PSH).payload(b"GET / HTTP/1.0\r\n\r\n");
    t.push(forwarded(
        "next packet of the flow: same backend",
        &ack,
        c,
        ack.clone().to(be),
        Forwarded,
    ));
    let reply = Frame::tcp(be, client(40000), TCP_SYN | TCP_ACK);
    t.push(forwarded(
        "reply from the backend: from the VIP, to the client",
        &reply,
        b,
        reply.clone().from(WEB),
        Reply,
    ));
    t.push(fixture(
        "reply of an unknown flow: untouched",
        Frame::tcp(be, client(40001), TCP_SYN | TCP_ACK).build(),
        b,
    ));
    t.push(untouched(
        "to an address that is not a VIP: untouched",
        Frame::tcp(client(40002), sa([172, 16, 0, 9], 8080), TCP_SYN).build(),
    ));
    t.push(untouched(
        "to a VIP's address on another port: untouched",
        Frame::tcp(client(40002), sa([172, 16, 0, 1], 8081), TCP_SYN).build(),
    ));
    t.push(untouched(
        "UDP to a TCP-only VIP: untouched",
        Frame::udp(client(40002), SOLO, true).payload(b"x").build(),
    ));
    t.push(untouched(
        "ARP request for a VIP: untouched",
        arp_request(CLIENT_MAC, CLIENT, *WEB.ip()),
    ));
    t.push(untouched(
        "IPv6 TCP SYN: untouched",
        ipv6_tcp_syn(
            "fd00::2".parse().unwrap(),
            "fd00::1".parse().unwrap(),
            40000,
            8080,
        ),
    ));

    new(
        "UDP without checksum: rewritten, checksum stays 0",
        &Frame::udp(client(5353), WEB, false).payload(b"query"),
        c,
        &mut t,
    );
    let be1 = new(
        "UDP with checksum: rewritten, checksum valid",
        &Frame::udp(client(5354), WEB, true).payload(b"query!!"),
        c,
        &mut t,
    );
    let udp_reply = Frame::udp(be1, client(5354), true).payload(b"answer");
    t.push(forwarded(
        "UDP reply: from the VIP",
        &udp_reply,
        b,
        udp_reply.clone().from(WEB),
        Reply,
    ));
    t.push(udp_checksum_zero(dp));

    let syn3 = Frame::tcp(client(40003), WEB, TCP_SYN);
    t.push(dropped_bytes(
        "TCP header cut after the ports (IP length as sent): drop_malformed",
        cut(&syn3, 14 + 20 + 12),
        DropMalformed,
    ));
    t.push(dropped_bytes(
        "TCP header cut after the ports (IP length says so too): drop_malformed",
        cut(&syn3.clone().tot_len(32), 14 + 32),
        DropMalformed,
    ));
    t.push(untouched(
        "frame ends inside the ports: not readable, untouched",
        cut(&syn3, 14 + 20 + 3),
    ));
    t.push(dropped(
        "IP total length larger than the frame: drop_malformed",
        &syn3.clone().tot_len(60),
        DropMalformed,
    ));
    t.push(dropped(
        "IP total length shorter than IP and TCP headers: drop_malformed",
        &syn3.clone().tot_len(36),
        DropMalformed,
    ));

    let be4 = new(
        "IPv4 options (IHL 6, router alert): rewritten, checksums valid",
        &Frame::tcp(client(40004), WEB, TCP_SYN).options(&[0x94, 0x04, 0, 0]),
        c,
        &mut t,
    );
    let opt_reply = Frame::tcp(be4, client(40004), TCP_SYN | TCP_ACK).options(&[1, 1, 1, 0]);
    t.push(forwarded(
        "reply with IPv4 options: from the VIP, checksums valid",
        &opt_reply,
        b,
        opt_reply.clone().from(WEB),
        Reply,
    ));
    t.push(dropped(
        "first fragment (MF) to a VIP: drop_fragment",
        &Frame::udp(client(5355), WEB, true)
            .payload(&[7; 32])
            .frag(IP_MF),
        DropFragment,
    ));
    t.push(untouched(
        "later fragment to a VIP's address: no ports, untouched",
        Frame::raw(CLIENT, *WEB.ip(), IPPROTO_UDP, &[7; 24])
            .frag(185)
            .build(),
    ));
    let ttl1 = Frame::tcp(client(40005), WEB, TCP_SYN).ttl(1);
    t.push(to_stack(
        "TTL 1 to a VIP: rewritten, left to the kernel (which sends time exceeded)",
        &ttl1,
        c,
        ttl1.clone().to(predicted(dp, &ttl1, &WEB_BACKENDS)),
        NewFlow,
    ));
    let far = Frame::tcp(client(40006), FAR, TCP_SYN);
    t.push(to_stack(
        "backend with no neighbour entry: rewritten, left to the kernel to resolve",
        &far,
        c,
        far.clone().to(predicted(dp, &far, &[FAR_BACKEND])),
        NewFlow,
    ));
    let lost = SocketAddrV4::new(LOST_CLIENT, 40007);
    let be7 = new(
        "SYN from a client the load balancer has no neighbour entry for",
        &Frame::tcp(lost, WEB, TCP_SYN),
        c,
        &mut t,
    );
    let lost_reply = Frame::tcp(be7, lost, TCP_SYN | TCP_ACK);
    t.push(to_stack(
        "reply to that client: rewritten, left to the kernel to resolve",
        &lost_reply,
        b,
        lost_reply.clone().from(WEB),
        Reply,
    ));
    new(
        "one-armed: SYN arriving on the backends' interface leaves by it (XDP_TX)",
        &Frame::tcp(client(40008), WEB, TCP_SYN),
        b,
        &mut t,
    );
    new(
        "no ingress given (test_run's loopback): XDP_REDIRECT",
        &Frame::tcp(client(40009), WEB, TCP_SYN),
        Ingress::Loopback,
        &mut t,
    );
    let bad = Frame::tcp(client(40010), WEB, TCP_ACK)
        .payload(b"data")
        .l4_csum_error(0x1111);
    let (wrong, _) = new_flow(
        dp,
        "wrong TCP checksum: rewritten, and still wrong by as much",
        &bad,
        c,
    );
    t.push(Fixture {
        corrupt: true,
        ..wrong
    });
    let (mut padded, _) = new_flow(
        dp,
        "54-byte SYN padded to Ethernet's 60: rewritten, padding kept as it was",
        &Frame::tcp(client(40011), WEB, TCP_SYN),
        c,
    );
    padded.input.extend([0xa5; 6]);
    padded.output.extend([0xa5; 6]);
    t.push(padded);
    let solo = Frame::tcp(client(41000), SOLO, TCP_SYN);
    t.push(forwarded(
        "SYN to the single-backend VIP",
        &solo,
        c,
        solo.clone().to(predicted(dp, &solo, &[SOLO_BACKEND])),
        NewFlow,
    ));

    // A flow to another backend than the first flow's, for the third phase.
    let (s, other) = (40100..40400)
        .map(|port| Frame::tcp(client(port), WEB, TCP_SYN))
        .find_map(|f| {
            let other = predicted(dp, &f, &WEB_BACKENDS);
            (other != be).then_some((f, other))
        })
        .expect("300 client ports all hash to one backend of three");
    new("SYN of a flow to another backend", &s, c, &mut t);
    let tracked = Tracked {
        moved: (client(40000), be),
        stays: (s.source(), other),
    };
    (t, tracked)
}

/// A UDP datagram whose checksum comes out 0 after the rewrite: it must be sent as 0xffff, since
/// 0 means "no checksum". The payload is searched for (bounded) until that happens.
fn udp_checksum_zero(dp: &Dataplane) -> Fixture {
    let base = Frame::udp(client(5360), WEB, true);
    let be = predicted(dp, &base, &WEB_BACKENDS);
    let (input, rewritten) = (0..=u16::MAX)
        .map(|w| {
            let f = base.clone().payload(&w.to_be_bytes());
            let r = f.clone().to(be);
            (f, r)
        })
        .find(|(_, r)| r.build()[40..42] == [0xff, 0xff])
        .expect("some 16-bit payload makes the checksum 0");
    forwarded(
        "UDP whose checksum becomes 0 after the rewrite: sent as 0xffff",
        &input,
        Ingress::Client,
        rewritten,
        NewFlow,
    )
}

/// Phase 2: SOLO's only backend is draining. New flows are dropped; the tracked one goes on.
fn phase_two() -> Vec<Fixture> {
    let new = Frame::tcp(client(41001), SOLO, TCP_SYN);
    let old = Frame::tcp(client(41000), SOLO, TCP_ACK).payload(b"more");
    vec![
        dropped(
            "new flow to a VIP whose only backend is draining: drop_no_backend",
            &new,
            DropNoBackend,
        ),
        forwarded(
            "flow tracked before its backend turned draining: still goes to it",
            &old,
            Ingress::Client,
            old.clone().to(SOLO_BACKEND),
            Forwarded,
        ),
    ]
}

/// Phase 3: the first flow's backend is gone from the document.
fn phase_three(dp: &Dataplane, t: &Tracked, remaining: &[SocketAddrV4]) -> Vec<Fixture> {
    let (src, gone) = t.moved;
    let next = Frame::tcp(src, WEB, TCP_ACK).payload(b"after");
    let to = predicted(dp, &next, remaining);
    assert_ne!(to, gone);
    let stays = Frame::tcp(t.stays.0, WEB, TCP_ACK).payload(b"still");
    let reply = Frame::tcp(to, src, TCP_ACK).payload(b"hello from the new one");
    vec![
        forwarded(
            "backend removed: its flow moves to a remaining backend on the next packet",
            &next,
            Ingress::Client,
            next.clone().to(to),
            NewFlow,
        ),
        forwarded(
            "the moved flow's following packet: tracked to its new backend",
            &next,
            Ingress::Client,
            next.clone().to(to),
            Forwarded,
        ),
        forwarded(
            "reply from the new backend: from the VIP",
            &reply,
            Ingress::Backend,
            reply.clone().from(WEB),
            Reply,
        ),
        forwarded(
            "a flow whose backend stays keeps it",
            &stays,
            Ingress::Client,
            stays.clone().to(t.stays.1),
            Forwarded,
        ),
    ]
}

/// Phase 4: the reply entry of a tracked flow was evicted from the LRU table (removed by hand
/// here). Its replies are not recognised until the flow's next packet re-creates the entry.
fn phase_four(t: &Tracked) -> Vec<Fixture> {
    let (src, be) = t.stays;
    let reply = Frame::tcp(be, src, TCP_ACK).payload(b"reply");
    let next = Frame::tcp(src, WEB, TCP_ACK).payload(b"next");
    vec![
        fixture(
            "reply whose entry was evicted: not recognised, untouched",
            reply.build(),
            Ingress::Backend,
        ),
        forwarded(
            "the flow's next packet: still tracked, re-creates the reply entry",
            &next,
            Ingress::Client,
            next.clone().to(be),
            Forwarded,
        ),
        forwarded(
            "the reply again: from the VIP",
            &reply,
            Ingress::Backend,
            reply.clone().from(WEB),
            Reply,
        ),
    ]
}

/// Every value of the IP header checksum, and of the TCP and UDP checksums, through the
/// program's incremental updates (the address and port rewrite, then the TTL decrement): for one
/// flow each, the IP id or a 16-bit payload word takes all 65536 values, and every output is
/// compared byte for byte with a frame built afresh.
#[test]
fn checksum_sweep() {
    if !privileged_or_skip("checksum_sweep") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-sweep");
    let failures = lab.run(|dp| {
        dp.apply(&document(&WEB_BACKENDS, false));
        type Vary = fn(Frame, u16) -> Frame;
        let sweeps: [(&str, Frame, Vary); 3] = [
            (
                "IP id",
                Frame::tcp(client(42000), WEB, TCP_ACK).payload(b"ab"),
                |f, v| Frame { id: v, ..f },
            ),
            (
                "TCP payload word",
                Frame::tcp(client(42001), WEB, TCP_ACK),
                |f, v| f.payload(&v.to_be_bytes()),
            ),
            (
                "UDP payload word",
                Frame::udp(client(42002), WEB, true),
                |f, v| f.payload(&v.to_be_bytes()),
            ),
        ];
        let mut failures = Vec::new();
        for (what, base, vary) in sweeps {
            let be = predicted(dp, &base, &WEB_BACKENDS);
            let (_, src_mac, dst_mac) = next_hop(*be.ip()).expect("backends have neighbours");
            let before = dp.stats();
            let mut wrong = 0;
            for v in 0..=u16::MAX {
                let input = vary(base.clone(), v);
                let want = input.clone().to(be).hop(src_mac, dst_mac).build();
                let run = dp.run(&input.build(), Ingress::Client).expect("test_run");
                if run.verdict != XDP_REDIRECT || run.out != want {
                    wrong += 1;
                    if wrong <= 3 {
                        failures.push(format!(
                            "{what} {v:#06x}: verdict {}\n{}",
                            run.verdict,
                            diff(&run.out, &want)
                        ));
                    }
                }
            }
            if wrong > 0 {
                failures.push(format!("{what}: {wrong} of 65536 frames wrong"));
            }
            let mut moved = stat_delta(&before, &dp.stats());
            moved.sort();
            let want = [("forwarded", 65535), ("new_flow", 1), ("redirect", 65536)];
            if moved != want {
                failures.push(format!("{what}: counters moved {moved:?}, want {want:?}"));
            }
        }
        failures
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn packet_fixtures() {
    if !privileged_or_skip("packet_fixtures") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-fix");
    let (failures, count) = lab.run(|dp| {
        let mut failures = Vec::new();
        let applied = dp.apply(&document(&WEB_BACKENDS, false));
        assert_eq!(applied.added.len(), 4, "{applied:?}");
        let (one, tracked) = phase_one(dp);
        run_phase(dp, "all backends", &one, &mut failures);

        let applied = dp.apply(&document(&WEB_BACKENDS, true));
        assert_eq!(applied.changed, ["tcp 172.16.0.2:7000"], "{applied:?}");
        let two = phase_two();
        run_phase(dp, "solo draining", &two, &mut failures);

        let remaining: Vec<SocketAddrV4> = WEB_BACKENDS
            .iter()
            .copied()
            .filter(|b| *b != tracked.moved.1)
            .collect();
        let applied = dp.apply(&document(&remaining, true));
        assert_eq!(applied.changed.len(), 2, "{applied:?}");
        let three = phase_three(dp, &tracked, &remaining);
        run_phase(dp, "backend removed", &three, &mut failures);

        let (src, be) = tracked.stays;
        assert!(
            dp.evict_reply(&kernel_flow((be, src, IPPROTO_TCP))),
            "no reply entry for {be} -> {src}"
        );
        let four = phase_four(&tracked);
        run_phase(dp, "reply entry evicted", &four, &mut failures);
        (failures, one.len() + two.len() + three.len() + four.len())
    });
    assert!(count >= 20, "only {count} fixtures");
    assert!(
        failures.is_empty(),
        "{} of {count} fixtures failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A design gap, asserted as it should be and ignored until the data plane handles it: a reply
/// too large for one frame leaves the backend in fragments. The first carries the ports and is
/// rewritten to come from the VIP; the later ones carry no ports, are "not ours", and reach the
/// client from the backend's address, so the client cannot reassemble the datagram. (The VIP
/// direction drops fragments and counts them; replies have no such rule.)
#[test]
#[ignore = "design gap: later fragments of a reply keep the backend's source address"]
fn reply_fragments_all_come_from_the_vip() {
    if !privileged_or_skip("reply_fragments_all_come_from_the_vip") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-frag");
    let failures = lab.run(|dp| {
        dp.apply(&document(&WEB_BACKENDS, false));
        let src = client(5400);
        let query = Frame::udp(src, WEB, true).payload(b"big?");
        let be = predicted(dp, &query, &WEB_BACKENDS);
        let first = Frame::udp(be, src, true).payload(&[1; 64]).frag(IP_MF);
        let later = Frame::raw(*be.ip(), CLIENT, IPPROTO_UDP, &[2; 40]).frag(9);
        let table = [
            forwarded(
                "query",
                &query,
                Ingress::Client,
                query.clone().to(be),
                NewFlow,
            ),
            forwarded(
                "first fragment of the reply",
                &first,
                Ingress::Backend,
                first.clone().from(WEB),
                Reply,
            ),
            forwarded(
                "later fragment of the reply",
                &later,
                Ingress::Backend,
                later.clone().from(SocketAddrV4::new(*WEB.ip(), 0)),
                Reply,
            ),
        ];
        let mut failures = Vec::new();
        run_phase(dp, "fragmented reply", &table, &mut failures);
        failures
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Property test: random and mutated packets against a fixed set of services
// ---------------------------------------------------------------------------------------------

const PROPERTY_PACKETS: usize = 200_000;
const PROPERTY_SEED: u64 = 0x1b_5eed;

/// The services of `document(&WEB_BACKENDS, true)`: VIP and protocol, the backends that take new
/// flows. SOLO's only backend is draining.
fn property_services() -> Vec<((SocketAddrV4, u8), Vec<SocketAddrV4>)> {
    vec![
        ((WEB, IPPROTO_TCP), WEB_BACKENDS.to_vec()),
        ((WEB, IPPROTO_UDP), WEB_BACKENDS.to_vec()),
        ((SOLO, IPPROTO_TCP), vec![]),
        ((FAR, IPPROTO_TCP), vec![FAR_BACKEND]),
    ]
}

/// What the test knows the program tracks: the flows it translated (client tuple -> backend) and
/// their replies (backend tuple -> VIP).
#[derive(Default)]
struct Model {
    flows: std::collections::HashMap<Tuple, SocketAddrV4>,
    replies: std::collections::HashMap<Tuple, SocketAddrV4>,
    reply_keys: Vec<Tuple>,
}

/// An IPv4 TCP/UDP packet as far as the frame shows it, read independently of the program.
struct Parsed {
    ihl: usize,
    tuple: Tuple,
    ttl: u8,
    tot_len: usize,
    more_fragments: bool,
    /// The whole transport header is in the frame, and the IP total length covers the headers
    /// and fits the frame.
    consistent: bool,
    /// The program keeps the transport checksum up to date (TCP, or UDP that has one).
    l4_csum_at: Option<usize>,
}

/// None for what the load balancer never looks at: not IPv4 (or a broken version/IHL), a later
/// fragment, not TCP or UDP, or a frame that ends before the ports.
fn parse(f: &[u8]) -> Option<Parsed> {
    let l = checksum::layout(f).ok()?;
    let frag = u16::from_be_bytes([f[20], f[21]]);
    if frag & 0x1fff != 0 || !matches!(l.proto, IPPROTO_TCP | IPPROTO_UDP) {
        return None;
    }
    let l4 = 14 + l.ihl;
    if f.len() < l4 + 4 {
        return None;
    }
    let hlen = if l.proto == IPPROTO_TCP { 20 } else { 8 };
    let full_l4 = f.len() >= l4 + hlen;
    let csum = l4 + if l.proto == IPPROTO_TCP { 16 } else { 6 };
    let ip = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    let port = |o: usize| u16::from_be_bytes([f[o], f[o + 1]]);
    Some(Parsed {
        ihl: l.ihl,
        tuple: (
            SocketAddrV4::new(ip(26), port(l4)),
            SocketAddrV4::new(ip(30), port(l4 + 2)),
            l.proto,
        ),
        ttl: f[22],
        tot_len: l.tot_len,
        more_fragments: frag & IP_MF != 0,
        consistent: full_l4 && l.tot_len >= l.ihl + hlen && 14 + l.tot_len <= f.len(),
        l4_csum_at: (full_l4 && (l.proto == IPPROTO_TCP || f[csum..csum + 2] != [0, 0]))
            .then_some(csum),
    })
}

/// What must happen to a packet.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Passed, bytes unchanged, counted `pass_not_ours`.
    Untouched,
    Drop(Stat),
    /// To a VIP, rewritten to this backend.
    ToBackend(Stat, SocketAddrV4),
    /// A reply, rewritten to come from this VIP.
    FromVip(SocketAddrV4),
}

/// The documented behaviour for `p` (None: not ours), given the services, what the test saw the
/// program track, and the kernel's reply table (which must agree with the test's record).
fn expect(dp: &Dataplane, model: &Model, p: Option<&Parsed>) -> Result<Expect, String> {
    let Some(p) = p else {
        return Ok(Expect::Untouched);
    };
    let (src, dst, proto) = p.tuple;
    let services = property_services();
    if let Some((_, live)) = services.iter().find(|(k, _)| *k == (dst, proto)) {
        if p.more_fragments {
            return Ok(Expect::Drop(DropFragment));
        }
        if !p.consistent {
            return Ok(Expect::Drop(DropMalformed));
        }
        if let Some(b) = model.flows.get(&p.tuple) {
            return Ok(Expect::ToBackend(Forwarded, *b));
        }
        if live.is_empty() {
            return Ok(Expect::Drop(DropNoBackend));
        }
        let b = dp
            .pick(dst, proto, src)
            .ok_or("the control plane predicts no backend")?;
        if !live.contains(&b) {
            return Err(format!("predicted {b}, not a live backend of {dst}"));
        }
        return Ok(Expect::ToBackend(NewFlow, b));
    }
    let kernel = dp.reply_entry(&kernel_flow(p.tuple));
    let known = model.replies.get(&p.tuple);
    match (kernel, known) {
        (None, None) => Ok(Expect::Untouched),
        (Some(e), Some(vip))
            if e.vip_addr == u32::from(*vip.ip()).to_be() && e.vip_port == vip.port().to_be() =>
        {
            Ok(Expect::FromVip(*vip))
        }
        (k, m) => Err(format!(
            "the kernel's reply entry {k:?} for {:?} disagrees with the translations seen ({m:?})",
            p.tuple
        )),
    }
}

/// Checks one run against `want`.
fn check_run(
    input: &[u8],
    ingress: Ingress,
    p: Option<&Parsed>,
    want: Expect,
    run: &lbtest::pktlab::Run,
    moved: &[(&'static str, i128)],
) -> Result<(), String> {
    let (to, reply) = match (want, p) {
        (Expect::ToBackend(_, b), Some(p)) => (Some((p, b)), false),
        (Expect::FromVip(v), Some(p)) => (Some((p, v)), true),
        _ => (None, false),
    };
    let Some((p, addr)) = to else {
        let (verdict, stat) = match want {
            Expect::Drop(s) => (XDP_DROP, s),
            _ => (XDP_PASS, PassNotOurs),
        };
        if run.verdict != verdict || moved != each_once(&[stat]) {
            return Err(format!(
                "verdict {} counters {moved:?}, want {verdict} and {}",
                run.verdict,
                stat.name()
            ));
        }
        if run.out != input {
            return Err(format!("changed:\n{}", diff(&run.out, input)));
        }
        return Ok(());
    };
    let how = match want {
        Expect::ToBackend(s, _) => s,
        _ => Reply,
    };
    // Where it goes after the rewrite, and whether the FIB gives a complete answer.
    let dst = if reply { *p.tuple.1.ip() } else { *addr.ip() };
    let hop = departure(ingress, dst).filter(|_| p.ttl > 1 && p.tot_len <= MTU);
    let (verdict, leave) = hop.map_or((XDP_PASS, RewrittenToStack), |(v, s, _, _)| (v, s));
    let want_moved = each_once(&[how, leave]);
    if run.verdict != verdict || moved != want_moved {
        return Err(format!(
            "verdict {} counters {moved:?}, want {verdict} and {want_moved:?}",
            run.verdict
        ));
    }
    // The expected frame, checksum fields aside.
    let mut e = input.to_vec();
    let l4 = 14 + p.ihl;
    let (a, port) = if reply { (26, l4) } else { (30, l4 + 2) };
    e[a..a + 4].copy_from_slice(&addr.ip().octets());
    e[port..port + 2].copy_from_slice(&addr.port().to_be_bytes());
    if let Some((_, _, src, dst)) = hop {
        e[0..6].copy_from_slice(&dst);
        e[6..12].copy_from_slice(&src);
        e[22] -= 1;
    }
    let mut out = run.out.clone();
    for at in [Some(24), p.l4_csum_at].into_iter().flatten() {
        e[at..at + 2].fill(0);
        out[at..at + 2].fill(0);
    }
    if out != e {
        return Err(format!(
            "rewritten wrong (checksum fields zeroed):\n{}",
            diff(&out, &e)
        ));
    }
    // Checksums: updated so that whatever was wrong stays exactly as wrong, and a right one
    // stays right (checked by full recomputation).
    let (li, lo) = (checksum::layout(input)?, checksum::layout(&run.out)?);
    let (ri, ro) = (
        checksum::ip_residue(input, &li),
        checksum::ip_residue(&run.out, &lo),
    );
    if ri != ro {
        return Err(format!("IP checksum residue {ri:#06x} became {ro:#06x}"));
    }
    if p.l4_csum_at.is_some() {
        let ri = checksum::l4_residue(input, &li, input.len());
        let ro = checksum::l4_residue(&run.out, &lo, run.out.len());
        if ri != ro {
            return Err(format!("L4 checksum residue {ri:#06x} became {ro:#06x}"));
        }
    }
    if checksum::verify(input).is_ok() {
        checksum::verify(&run.out).map_err(|e| format!("valid input, output: {e}"))?;
    }
    Ok(())
}

/// Ports the generator and the mutations like to use: the VIPs' and the backends'.
const HOT_PORTS: [u16; 5] = [8080, 7000, 9000, 31000, 31009];

/// A frame to start from: to a VIP, a reply of a tracked flow, something else, or garbage.
fn base_packet(rng: &mut Rng, model: &Model) -> (Vec<u8>, Ingress, &'static str) {
    let clients = [
        Ipv4Addr::new(198, 18, 0, 2),
        Ipv4Addr::new(198, 18, 0, 3),
        LOST_CLIENT,
        Ipv4Addr::new(10, rng.u8(), rng.u8(), rng.u8()),
    ];
    let src = SocketAddrV4::new(
        *rng.pick(&clients),
        if rng.chance(70) {
            40000 + rng.below(64) as u16
        } else {
            rng.u16()
        },
    );
    let l4 = |rng: &mut Rng, src, dst, proto| -> Frame {
        let f = if proto == IPPROTO_TCP {
            let flags = *rng.pick(&[TCP_SYN, TCP_ACK, TCP_ACK | TCP_PSH, 0x11, 0x04]);
            Frame::tcp(src, dst, flags)
        } else {
            Frame::udp(src, dst, rng.chance(70))
        };
        let n = rng.below(48);
        let payload = rng.bytes(n);
        let f = f.payload(&payload).ttl(*rng.pick(&[64, 64, 64, 2, 1]));
        if rng.chance(15) {
            let n = 4 * (1 + rng.below(3));
            let options = rng.bytes(n);
            f.options(&options)
        } else {
            f
        }
    };
    match rng.below(10) {
        0..=3 => {
            let services = property_services();
            let ((vip, proto), _) = rng.pick(&services);
            let ingress = *rng.pick(&[Ingress::Client, Ingress::Client, Ingress::Backend]);
            (l4(rng, src, *vip, *proto).build(), ingress, "to a VIP")
        }
        4 | 5 => {
            let (b, c, proto) = if !model.reply_keys.is_empty() && rng.chance(80) {
                *rng.pick(&model.reply_keys)
            } else {
                let proto = *rng.pick(&[IPPROTO_TCP, IPPROTO_UDP]);
                (*rng.pick(&WEB_BACKENDS), src, proto)
            };
            (l4(rng, b, c, proto).build(), Ingress::Backend, "a reply")
        }
        6 | 7 => {
            let dsts = [
                sa([172, 16, 0, 9], 8080),
                sa([172, 16, 0, 1], 8081),
                WEB_BACKENDS[0],
                SocketAddrV4::new(Ipv4Addr::from(rng.u64() as u32), rng.u16()),
            ];
            let dst = *rng.pick(&dsts);
            let f = match rng.below(3) {
                0 => l4(rng, src, dst, IPPROTO_TCP),
                1 => l4(rng, src, dst, IPPROTO_UDP),
                _ => Frame::raw(*src.ip(), *dst.ip(), IPPROTO_ICMP, &[8, 0, 0xf7, 0xff]),
            };
            (f.build(), Ingress::Client, "not for a VIP")
        }
        8 => {
            let f = if rng.chance(50) {
                arp_request(CLIENT_MAC, *src.ip(), *WEB.ip())
            } else {
                ipv6_tcp_syn(
                    "fd00::2".parse().unwrap(),
                    "fd00::1".parse().unwrap(),
                    src.port(),
                    8080,
                )
            };
            (f, Ingress::Client, "ARP or IPv6")
        }
        _ => {
            let n = 14 + rng.below(100);
            let mut f = rng.bytes(n);
            if rng.chance(60) && f.len() >= 15 {
                f[12..14].copy_from_slice(&[0x08, 0x00]);
                f[14] = 0x45;
            }
            (f, Ingress::Client, "random bytes")
        }
    }
}

#[test]
fn random_and_mutated_packets() {
    if !privileged_or_skip("random_and_mutated_packets") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-prop");
    let report = lab.run(|dp| {
        dp.apply(&document(&WEB_BACKENDS, true));
        let start = std::time::Instant::now();
        let mut rng = Rng::new(PROPERTY_SEED);
        let mut model = Model::default();
        let mut failures: Vec<String> = Vec::new();
        let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
        for i in 0..PROPERTY_PACKETS {
            let (mut f, ingress, kind) = base_packet(&mut rng, &model);
            let mut how = vec![kind];
            if rng.chance(60) {
                for _ in 0..1 + rng.below(3) {
                    how.push(mutate(&mut f, &mut rng, &HOT_PORTS));
                }
            }
            let p = parse(&f);
            let result = expect(dp, &model, p.as_ref()).and_then(|want| {
                let before = dp.stats();
                let run = dp.run(&f, ingress).map_err(|e| format!("test_run: {e}"))?;
                let moved = stat_delta(&before, &dp.stats());
                check_run(&f, ingress, p.as_ref(), want, &run, &moved)?;
                Ok((want, moved))
            });
            match result {
                Ok((want, moved)) => {
                    if let (Expect::ToBackend(NewFlow, b), Some(p)) = (want, p.as_ref()) {
                        let (src, vip, proto) = p.tuple;
                        model.flows.insert(p.tuple, b);
                        let back = (b, src, proto);
                        if model.replies.insert(back, vip).is_none() {
                            model.reply_keys.push(back);
                        }
                    }
                    for (name, _) in moved {
                        *outcomes.entry(name.to_string()).or_default() += 1;
                    }
                }
                Err(e) => {
                    failures.push(format!(
                        "packet {i} ({}) via {ingress:?}: {e}\n  frame {}",
                        how.join(", "),
                        hex(&f)
                    ));
                    if failures.len() >= 20 {
                        break;
                    }
                }
            }
        }
        (failures, outcomes, start.elapsed())
    });
    let (failures, outcomes, took) = report;
    eprintln!("{PROPERTY_PACKETS} packets in {took:.1?}; counters moved: {outcomes:?}");
    assert!(
        failures.is_empty(),
        "{} failures (stopped at 20):\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Every outcome was reached often enough to mean something.
    for s in Stat::ALL {
        if matches!(s, DropFlowTable | DropBadBackend) {
            continue; // unreachable with these maps
        }
        if matches!(s, Stat::IcmpToClient | Stat::IcmpToBackend) {
            continue; // random bytes never quote a tracked flow: tests/tests/icmp.rs covers these
        }
        let n = outcomes.get(s.name()).copied().unwrap_or(0);
        assert!(
            n >= 100,
            "only {n} packets counted {}: {outcomes:?}",
            s.name()
        );
    }
}
