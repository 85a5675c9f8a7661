//! The agent's DNS server for named VIPs (issue 11), through the real agent in namespaces: a
//! named VIP resolves over UDP and TCP from the client's namespace and its answer reaches the
//! backends; renames and removals are followed within 2 s; another framework's names; names
//! outside the zone REFUSED, or forwarded to an upstream server the test runs; `lbctl resolve`
//! says the same; floods, 10,000 malformed packets and idle TCP connections leave it answering
//! with bounded memory.
use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{RData, RecordType},
};
use lbtest::{
    Lab, TestFile, apps_doc, dns, in_netns, lbctl_bin, privileged_or_skip, tally, write_atomically,
};
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

const PORT: u16 = 31100;
const WAIT: Duration = Duration::from_secs(20);
/// The load balancer's address on the client's link: the agent answers DNS there.
const DNS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 53);
const ZONE: &str = "l4lb.thisdcos.directory";

/// A lab of `n` backends serving on `PORT`, its apps file, and guards removing that file and
/// the agent's named-VIP book unless the test fails.
fn setup(prefix: &str, n: usize) -> (Lab, PathBuf, [TestFile; 2]) {
    let mut lab = Lab::new(prefix, n);
    lab.serve(PORT);
    let book = TestFile::new(lbctl::marathon::book_path(&lab.status_socket()));
    let apps = TestFile::new(std::env::temp_dir().join(format!("{prefix}-apps.json")));
    (lab, apps.to_path_buf(), [book, apps])
}

/// Starts the agent, its log in a temporary file (removed when the test passes).
fn start(lab: &mut Lab, apps: &std::path::Path, extra: &[&str], log: &str) -> TestFile {
    let mut args = vec!["--apps".to_string(), apps.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let log = TestFile::new(std::env::temp_dir().join(log));
    lab.start_agent_with(&args, &[], &log);
    log
}

fn named(app: &str, label: &str, lab: &Lab) -> String {
    apps_doc(app, "tcp", &[("VIP_0", label)], &lab.backends, PORT)
}

/// Asks the agent from the client's namespace, over UDP or TCP.
fn ask(lab: &Lab, name: &str, t: RecordType, tcp: bool) -> Result<Message, String> {
    let name = name.to_string();
    in_netns(&lab.client_ns, move || {
        let q = dns::query(&name, t, 0x5151, false);
        if tcp {
            dns::ask_tcp(DNS, &q)
        } else {
            dns::ask_udp(DNS, &q)
        }
    })
}

fn a(lab: &Lab, name: &str, tcp: bool) -> (ResponseCode, Vec<Ipv4Addr>) {
    let m = ask(lab, name, RecordType::A, tcp).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(m.metadata.id, 0x5151);
    dns::summary(&m)
}

/// `lbctl resolve NAME --json` against the lab's agent.
fn resolve(lab: &Lab, name: &str) -> serde_json::Value {
    let out = Command::new(lbctl_bin())
        .args(["resolve", name, "--json", "--socket"])
        .arg(lab.status_socket())
        .output()
        .expect("lbctl resolve");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("lbctl resolve {name}: {e}: {out:?}"))
}

/// Waits (at most `within`) until `name` answers `want` over UDP; returns how long it took.
fn wait_answer(
    lab: &Lab,
    name: &str,
    within: Duration,
    want: impl Fn(&(ResponseCode, Vec<Ipv4Addr>)) -> bool,
) -> Duration {
    let t = Instant::now();
    let mut last = None;
    while t.elapsed() < within {
        if let Ok(m) = ask(lab, name, RecordType::A, false) {
            let s = dns::summary(&m);
            if want(&s) {
                return t.elapsed();
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{name}: not as wanted within {within:?}; last answer {last:?}");
}

#[test]
fn named_vips_resolve_over_udp_and_tcp_forward_and_follow_marathon() {
    if !privileged_or_skip(
        "e2e_dns::named_vips_resolve_over_udp_and_tcp_forward_and_follow_marathon",
    ) {
        return;
    }
    let (mut lab, apps, _files) = setup("lbt-dns", 2);
    write_atomically(&apps, &named("/payments", "/payments:8080", &lab));
    let upstream = dns::Upstream::serve(in_netns(&lab.lb_ns, || {
        UdpSocket::bind("127.0.0.1:5353").expect("upstream socket")
    }));
    let log = start(
        &mut lab,
        &apps,
        &[
            "--dns-listen",
            "198.18.0.1:53",
            "--dns-upstream",
            "127.0.0.1:5353",
        ],
        "lbt-dns-agent.log",
    );
    lab.wait_for_kernel(WAIT, |s| s.len() == 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", lbtest::read_log(&log)));
    let pay = format!("payments.marathon.{ZONE}");
    wait_answer(&lab, &pay, Duration::from_secs(5), |(c, a)| {
        *c == ResponseCode::NoError && a.len() == 1
    });

    // UDP and TCP give the same address, in the named pool, with the default TTL; `lbctl
    // resolve` says the same.
    let (code, udp) = a(&lab, &pay, false);
    assert_eq!((code, udp.len()), (ResponseCode::NoError, 1));
    let ip = udp[0];
    assert_eq!(ip.octets()[0], 11, "{ip} is not in 11.0.0.0/8");
    assert_eq!(a(&lab, &pay, true), (ResponseCode::NoError, vec![ip]));
    let m = ask(&lab, &pay, RecordType::A, false).unwrap();
    assert!(m.metadata.authoritative);
    assert_eq!(m.answers[0].ttl, 5);
    let r = resolve(&lab, &pay);
    assert_eq!(r["rcode"], "NoError", "{r}");
    assert_eq!(r["addresses"], serde_json::json!([ip.to_string()]), "{r}");
    // The VIP's service is at that address: connecting to the answer reaches both backends.
    let vip = SocketAddrV4::new(ip, 8080);
    let served = tally(&lab.tcp_requests(vip, 40));
    assert_eq!(served.len(), 2, "both backends serve {vip}: {served:?}");

    // NODATA, NXDOMAIN, the apex's SOA and NS.
    let m = ask(&lab, &pay, RecordType::AAAA, false).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    let nope = format!("nope.marathon.{ZONE}");
    assert_eq!(a(&lab, &nope, false).0, ResponseCode::NXDomain);
    assert_eq!(a(&lab, &nope, true).0, ResponseCode::NXDomain);
    let m = ask(&lab, ZONE, RecordType::SOA, true).unwrap();
    assert!(matches!(m.answers[0].data, RData::SOA(_)), "{m:?}");
    let m = ask(&lab, ZONE, RecordType::NS, false).unwrap();
    assert!(matches!(m.answers[0].data, RData::NS(_)), "{m:?}");

    // Outside the zone: forwarded to the upstream server, over UDP and TCP.
    let outside = "www.upstream.test";
    assert_eq!(
        a(&lab, outside, false),
        (ResponseCode::NoError, vec![dns::UPSTREAM_ANSWER])
    );
    assert_eq!(
        a(&lab, outside, true),
        (ResponseCode::NoError, vec![dns::UPSTREAM_ANSWER])
    );
    assert_eq!(a(&lab, "nothing.example", false).0, ResponseCode::NXDomain);
    assert!(upstream.answered.load(std::sync::atomic::Ordering::Relaxed) >= 3);

    // A rename: the old name is NXDOMAIN and the new one resolves within 2 s.
    write_atomically(&apps, &named("/payments", "/billing:8080", &lab));
    let bill = format!("billing.marathon.{ZONE}");
    let t = Instant::now();
    wait_answer(&lab, &pay, Duration::from_secs(2), |(c, _)| {
        *c == ResponseCode::NXDomain
    });
    wait_answer(&lab, &bill, Duration::from_secs(2), |(c, a)| {
        *c == ResponseCode::NoError && a.len() == 1
    });
    eprintln!("rename followed by DNS in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let (_, got) = a(&lab, &bill, true);
    assert_eq!(
        tally(&lab.tcp_requests(SocketAddrV4::new(got[0], 8080), 10)).len(),
        2
    );

    // A removal: the name is NXDOMAIN within 2 s.
    let plain = apps_doc(
        "/payments",
        "tcp",
        &[("VIP_0", "172.16.0.1:8080")],
        &lab.backends,
        PORT,
    );
    write_atomically(&apps, &plain);
    let took = wait_answer(&lab, &bill, Duration::from_secs(2), |(c, _)| {
        *c == ResponseCode::NXDomain
    });
    eprintln!("removal followed by DNS in {took:?}");
    assert_eq!(resolve(&lab, &bill)["rcode"], "NXDomain");
}

/// The agent's resident memory, in KiB, from /proc.
fn rss_kib(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent's /proc");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[test]
fn other_frameworks_refusals_floods_and_malformed_packets() {
    if !privileged_or_skip("e2e_dns::other_frameworks_refusals_floods_and_malformed_packets") {
        return;
    }
    let (mut lab, apps, _files) = setup("lbt-dnsf", 1);
    write_atomically(&apps, &named("/kafka/broker", "/broker:9092", &lab));
    let log = start(
        &mut lab,
        &apps,
        &[
            "--dns-listen",
            "198.18.0.1:53",
            "--framework",
            "Kafka_Prod",
            "--dns-ttl",
            "30",
        ],
        "lbt-dnsf-agent.log",
    );
    lab.wait_for_kernel(WAIT, |s| s.len() == 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", lbtest::read_log(&log)));
    // The framework label as DC/OS forms it: lower case, `_` as `-`.
    let broker = format!("broker.kafka-prod.{ZONE}");
    wait_answer(&lab, &broker, Duration::from_secs(5), |(c, a)| {
        *c == ResponseCode::NoError && a.len() == 1
    });
    let m = ask(&lab, &broker, RecordType::A, true).unwrap();
    assert_eq!(m.answers[0].ttl, 30);
    assert_eq!(
        a(&lab, &format!("broker.marathon.{ZONE}"), false).0,
        ResponseCode::NXDomain
    );
    assert_eq!(
        a(&lab, &format!("kafka-prod.{ZONE}"), false),
        (ResponseCode::NoError, vec![])
    );
    // Without an upstream server, names outside the zone are refused.
    assert_eq!(a(&lab, "example.com", false).0, ResponseCode::Refused);
    assert_eq!(a(&lab, "example.com", true).0, ResponseCode::Refused);
    assert_eq!(resolve(&lab, "example.com")["rcode"], "Refused");
    // Names of every length: 63-byte labels up to the 255-byte limit.
    for len in [1usize, 20, 63] {
        let l = "x".repeat(len);
        let name = format!("{l}.{l}.{l}.kafka-prod.{ZONE}");
        if name.len() < 254 {
            assert_eq!(a(&lab, &name, false).0, ResponseCode::NXDomain, "{name}");
        }
    }

    let pid =
        lab.wait_status(WAIT, |s| s["agent"]["pid"].as_u64().is_some(), "status")["agent"]["pid"]
            .as_u64()
            .unwrap();
    let rss_before = rss_kib(pid);
    let t = Instant::now();
    // 10,000 malformed packets: random bytes, and good queries with a byte changed and cut short.
    let good = dns::query(&broker, RecordType::A, 9, false)
        .to_vec()
        .unwrap();
    let (sent_bad, sent_good, answered) = in_netns(&lab.client_ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut bad = 0;
        for i in 0..10_000 {
            let raw: Vec<u8> = if i % 2 == 0 {
                (0..next() % 700).map(|_| next() as u8).collect()
            } else {
                let mut m = good.clone();
                let at = next() as usize % m.len();
                m[at] ^= (next() as u8) | 1;
                m.truncate(next() as usize % m.len());
                m
            };
            if s.send_to(&raw, DNS).is_ok() {
                bad += 1;
            }
        }
        // A flood of 20,000 good queries sent without waiting, then the answers drained.
        let q = UdpSocket::bind("0.0.0.0:0").unwrap();
        q.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut sent = 0;
        let mut got = 0;
        let mut buf = [0u8; 1500];
        for _ in 0..20_000 {
            if q.send_to(&good, DNS).is_ok() {
                sent += 1;
            }
            // Drain what is there, so the socket's buffer is not the limit.
            q.set_nonblocking(true).unwrap();
            while q.recv_from(&mut buf).is_ok() {
                got += 1;
            }
            q.set_nonblocking(false).unwrap();
        }
        while q.recv_from(&mut buf).is_ok() {
            got += 1;
        }
        (bad, sent, got)
    });
    eprintln!(
        "sent {sent_bad} malformed and {sent_good} good queries in {:?}; {answered} answered",
        t.elapsed()
    );
    assert_eq!(sent_bad, 10_000);
    assert!(answered > 0, "no answer during the flood");
    // 100 TCP connections that stay idle (past the 64 served at once) and 50 that send junk.
    let idle: Vec<TcpStream> = in_netns(&lab.client_ns, || {
        (0..100)
            .filter_map(|_| TcpStream::connect_timeout(&DNS, Duration::from_secs(1)).ok())
            .collect()
    });
    in_netns(&lab.client_ns, || {
        use std::io::Write;
        for i in 0..50u16 {
            if let Ok(mut s) = TcpStream::connect_timeout(&DNS, Duration::from_secs(1)) {
                let _ = s.write_all(&[(i >> 8) as u8, i as u8, 0xde, 0xad, 0xbe, 0xef]);
            }
        }
    });
    // Still answering over UDP, right away.
    assert_eq!(a(&lab, &broker, false).0, ResponseCode::NoError);
    drop(idle);
    // And over TCP once the idle connections are gone.
    let t = Instant::now();
    let mut tcp_ok = None;
    while t.elapsed() < Duration::from_secs(8) && tcp_ok.is_none() {
        tcp_ok = ask(&lab, &broker, RecordType::A, true).ok();
    }
    let m = tcp_ok.expect("TCP answers again after the idle connections closed");
    assert_eq!(dns::addresses(&m).len(), 1);
    let rss_after = rss_kib(pid);
    eprintln!("agent RSS {rss_before} KiB before the floods, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "the agent grew from {rss_before} to {rss_after} KiB"
    );
    assert!(
        !lbtest::read_log(&log).contains("panicked"),
        "{}",
        lbtest::read_log(&log)
    );
}
