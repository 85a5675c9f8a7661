//! The flow table of buckets (`lb_ct_v2`, `lb_common::flow_table`) as the program uses it: a
//! full bucket gives a new flow an empty slot, else the slot noted longest ago, the flow that lost it keeps its
//! backend through the Maglev table (and is counted lost), and a slot whose check fails (two
//! writers met on it) is never used to forward.
use aya::maps::{Array, MapData};
use lb_common::{
    Flow, MAP_FLOW_SEED, MAP_FLOWS,
    flow_table::{FlowBucket, FlowKey, bucket_of},
};
use lbctl::dataplane::Maps;
use lbtest::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    pktlab::{Ingress, PacketLab, XDP_REDIRECT, app, apps, flow4, pinned_array, running},
    privileged_or_skip,
};
use std::{net::SocketAddrV4, path::Path, time::Duration};

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("address")
}

const VIP: &str = "172.16.0.1:8080";

/// The pinned table's seed and buckets, and the bucket of a client's flow to the VIP.
struct Place {
    seed: u64,
    buckets: u32,
}

impl Place {
    fn of(dir: &Path) -> Place {
        let seed: Array<MapData, u64> = pinned_array(dir, MAP_FLOW_SEED);
        let table: Array<MapData, FlowBucket<Flow>> = pinned_array(dir, MAP_FLOWS);
        Place {
            seed: seed.get(&0, 0).expect("the seed"),
            buckets: table.len(),
        }
    }
    fn bucket(&self, client: SocketAddrV4) -> u32 {
        bucket_of(flow4(client, sa(VIP), 6).mix(self.seed), self.buckets)
    }
}

fn web(dp: &mut lbtest::pktlab::Dataplane) {
    dp.apply(&apps(vec![app(
        "/web",
        "tcp",
        &[("VIP_0", VIP)],
        &[
            running(sa("198.18.1.2:31000")),
            running(sa("198.18.1.3:31000")),
        ],
    )]));
}

#[test]
fn a_full_bucket_gives_an_empty_slot_then_its_oldest_and_the_lost_flow_keeps_its_backend() {
    if !privileged_or_skip(
        "a_full_bucket_gives_an_empty_slot_then_its_oldest_and_the_lost_flow_keeps_its_backend",
    ) {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-ftfull");
    let dir = lab.dir.clone();
    lab.run(move |dp| {
        web(dp);
        let place = Place::of(&dir);
        let vip = sa(VIP);
        // Five clients whose flows share one bucket (of four slots): a search over source
        // addresses and ports, bounded (about 65,536 candidates a match).
        let first = sa("198.18.0.2:1024");
        let want = place.bucket(first);
        let clients: Vec<SocketAddrV4> = (2..=254u8)
            .flat_map(|h| (1024..=u16::MAX).map(move |p| sa(&format!("198.18.0.{h}:{p}"))))
            .filter(|c| place.bucket(*c) == want)
            .take(5)
            .collect();
        assert_eq!(
            clients.len(),
            5,
            "five ports of one bucket in {} buckets",
            place.buckets
        );
        let maps = Maps::open(&dir).expect("maps");
        let entry = |dp: &lbtest::pktlab::Dataplane, c: SocketAddrV4| {
            dp.flow_entry((c.into(), vip.into(), 6))
        };
        // Four flows fill the bucket, each noted a few note units (17 ms) after the one before.
        for c in &clients[..4] {
            let r = dp
                .run(&Frame::tcp(*c, vip, TCP_SYN).build(), Ingress::Client)
                .expect("run");
            assert_eq!(r.verdict, XDP_REDIRECT);
            assert!(entry(dp, *c).is_some(), "{c} tracked");
            std::thread::sleep(Duration::from_millis(60));
        }
        // An empty slot goes first: the fifth flow takes the first one's, emptied.
        assert!(dp.evict_flow((clients[0].into(), vip.into(), 6)));
        dp.run(
            &Frame::tcp(clients[4], vip, TCP_SYN).build(),
            Ingress::Client,
        )
        .expect("run");
        let tracked = |dp: &lbtest::pktlab::Dataplane| -> Vec<bool> {
            clients.iter().map(|c| entry(dp, *c).is_some()).collect()
        };
        assert_eq!(tracked(dp), [false, true, true, true, true], "{clients:?}");
        // Then the slot noted longest ago: the second flow's (not the first slot, which now
        // holds the newest flow).
        std::thread::sleep(Duration::from_millis(60));
        dp.run(
            &Frame::tcp(clients[0], vip, TCP_SYN).build(),
            Ingress::Client,
        )
        .expect("run");
        assert_eq!(tracked(dp), [true, false, true, true, true], "{clients:?}");
        // The second flow's next segment goes where the Maglev table sends it, which is where
        // its SYN went (the table did not change), and is counted as a flow lost.
        let lost = maps.flows_lost().expect("lost");
        let backend = dp.pick(vip, 6, clients[1]).expect("a backend");
        let r = dp
            .run(
                &Frame::tcp(clients[1], vip, TCP_ACK).build(),
                Ingress::Client,
            )
            .expect("run");
        assert_eq!(r.verdict, XDP_REDIRECT);
        assert_eq!(&r.out[30..34], &backend.ip().octets());
        assert_eq!(maps.flows_lost().expect("lost"), lost + 1);
    });
}

#[test]
fn a_slot_whose_check_fails_is_not_used() {
    if !privileged_or_skip("a_slot_whose_check_fails_is_not_used") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-fttorn");
    let dir = lab.dir.clone();
    lab.run(move |dp| {
        web(dp);
        let place = Place::of(&dir);
        let vip = sa(VIP);
        let client = sa("198.18.0.2:40000");
        let backend = dp.pick(vip, 6, client).expect("a backend");
        let r = dp
            .run(&Frame::tcp(client, vip, TCP_SYN).build(), Ingress::Client)
            .expect("run");
        assert_eq!(&r.out[30..34], &backend.ip().octets());
        let e = dp
            .flow_entry((client.into(), vip.into(), 6))
            .expect("tracked");
        // The id of the other backend: from the entry of a flow the table sends there.
        let elsewhere = (40001..41000)
            .map(|p| SocketAddrV4::new(*client.ip(), p))
            .find(|c| dp.pick(vip, 6, *c) != Some(backend))
            .expect("a client of the other backend");
        dp.run(
            &Frame::tcp(elsewhere, vip, TCP_SYN).build(),
            Ingress::Client,
        )
        .expect("run");
        let other = dp
            .flow_entry((elsewhere.into(), vip.into(), 6))
            .expect("tracked")
            .backend();
        assert_ne!(other, e.backend());
        // That id in the flow's entry, the check left as it was: what a second writer leaves
        // when it wrote its entry and not yet its check.

        let b = place.bucket(client);
        let mut table: Array<MapData, FlowBucket<Flow>> = pinned_array(&dir, MAP_FLOWS);
        let mut bucket = table.get(&b, 0).expect("the bucket");
        let key = flow4(client, vip, 6);
        let slot = bucket
            .slots
            .iter_mut()
            .find(|s| s.key == key && s.check != 0)
            .expect("the flow's slot");
        slot.entry.backend_word = (slot.entry.backend_word & !0xf_ffff) | other;
        table.set(b, bucket, 0).expect("writing the bucket");
        assert_eq!(dp.flow_entry((client.into(), vip.into(), 6)), None);

        let maps = Maps::open(&dir).expect("maps");
        let lost = maps.flows_lost().expect("lost");
        let r = dp
            .run(&Frame::tcp(client, vip, TCP_ACK).build(), Ingress::Client)
            .expect("run");
        assert_eq!(r.verdict, XDP_REDIRECT);
        assert_eq!(
            &r.out[30..34],
            &backend.ip().octets(),
            "the flow's own backend, not the one the broken slot names"
        );
        assert_eq!(maps.flows_lost().expect("lost"), lost + 1);
        // And the flow is tracked again, with its own backend.
        let again = dp
            .flow_entry((client.into(), vip.into(), 6))
            .expect("tracked again");
        assert_eq!(again.backend(), e.backend());
    });
}
