//! Path MTU through a VIP, end to end: client (MTU 1500) -> load balancer -> a 1400-byte link ->
//! router -> backend (1500). The backend announces an MSS for 1500-byte packets, so the client's
//! full-sized segments to the VIP cannot cross the 1400-byte link; only the load balancer's own
//! "fragmentation needed" / "packet too big", quoting the VIP, lets the client's kernel shrink
//! them (the kernel's error would quote the translated packet, which the client ignores: a
//! black hole). A bulk transfer of 200,000 bytes through the VIP must complete in bounded time,
//! over IPv4 and IPv6, on both hooks: TC (links as Linux makes them) and XDP forced, whose veth
//! far ends are tuned as XDP on a veth needs (`Hooks::Xdp`: transmit checksum offload off, so
//! their checksums are whole; GRO on, so they take in frames an XDP program sends them).
//!
//! On XDP the error goes back by redirect, not XDP_TX: a veth peer without an XDP program of its
//! own is woken for redirected frames only, and XDP_TX'd errors waited in its queue until the
//! next redirect into it (here: the server's FIN, 20 s later), so the client learnt the MTU only
//! when the transfer had already failed.
use lbtest::{
    Hooks, Lab, TestDir,
    capture::{Capture, Captured, TP_STATUS_CSUMNOTREADY},
    checksum::residue,
    in_netns, privileged_or_skip, read_log, sh, sh_quiet, spawn_in_netns, write_atomically,
};
use serde_json::json;
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

const PORT: u16 = 31000;
const BYTES: usize = 200_000;
const DEADLINE: Duration = Duration::from_secs(20);

/// The server's namespace, behind the router; removed even when the test fails.
struct ServerNs(String);

impl Drop for ServerNs {
    fn drop(&mut self) {
        sh_quiet(&["ip", "netns", "del", &self.0]);
    }
}

/// Puts a router between the balancer and the lab's only backend: the backend's namespace
/// becomes the router (its link to the balancer shrunk to 1400 bytes), and a server namespace
/// behind it (a 1500-byte link, 198.18.101.2 / 2001:2:0:101::2) takes the backend's place.
fn add_router(lab: &mut Lab) -> ServerNs {
    let router = lab.backends[0].ns.clone();
    let server = ServerNs(format!("{}-s", lab.prefix));
    let (lb, s) = (lab.lb_ns.clone(), server.0.clone());
    sh(&["ip", "netns", "add", &s]);
    sh(&["ip", "-n", &s, "link", "set", "lo", "up"]);
    for knob in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        sh(&["ip", "netns", "exec", &router, "sysctl", "-q", "-w", knob]);
    }
    sh(&["ip", "-n", &lb, "link", "set", "lb-b1", "mtu", "1400"]);
    sh(&["ip", "-n", &router, "link", "set", "b0", "mtu", "1400"]);
    sh(&[
        "ip", "-n", &router, "link", "add", "r1", "type", "veth", "peer", "name", "s0", "netns", &s,
    ]);
    sh(&[
        "ip",
        "-n",
        &router,
        "addr",
        "add",
        "198.18.101.1/24",
        "dev",
        "r1",
    ]);
    sh(&[
        "ip",
        "-n",
        &router,
        "-6",
        "addr",
        "add",
        "2001:2:0:101::1/64",
        "dev",
        "r1",
        "nodad",
    ]);
    sh(&[
        "ip",
        "-n",
        &s,
        "addr",
        "add",
        "198.18.101.2/24",
        "dev",
        "s0",
    ]);
    sh(&[
        "ip",
        "-n",
        &s,
        "-6",
        "addr",
        "add",
        "2001:2:0:101::2/64",
        "dev",
        "s0",
        "nodad",
    ]);
    sh(&["ip", "-n", &router, "link", "set", "r1", "up"]);
    sh(&["ip", "-n", &s, "link", "set", "s0", "up"]);
    sh(&[
        "ip",
        "-n",
        &s,
        "route",
        "add",
        "default",
        "via",
        "198.18.101.1",
    ]);
    sh(&[
        "ip",
        "-n",
        &s,
        "-6",
        "route",
        "add",
        "default",
        "via",
        "2001:2:0:101::1",
    ]);
    sh(&[
        "ip",
        "-n",
        &lb,
        "route",
        "add",
        "198.18.101.0/24",
        "via",
        "198.18.1.2",
    ]);
    sh(&[
        "ip",
        "-n",
        &lb,
        "-6",
        "route",
        "add",
        "2001:2:0:101::/64",
        "via",
        "2001:2:0:1::2",
    ]);
    server
}

/// A server in `ns` at `addr` that takes one connection, reads it to its end and answers with
/// the number of bytes it read.
fn sink(ns: &str, addr: SocketAddr) -> std::thread::JoinHandle<Result<usize, String>> {
    let listener = in_netns(ns, move || {
        TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))
    })
    .expect("bind");
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_read_timeout(Some(DEADLINE))
            .map_err(|e| e.to_string())?;
        let mut n = 0;
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(format!("read after {n} bytes: {e}")),
            }
        }
        s.write_all(n.to_string().as_bytes())
            .map_err(|e| e.to_string())?;
        Ok(n)
    })
}

/// Sends BYTES to `vip` from the client's namespace; the server's count of what it received.
fn bulk(lab: &Lab, vip: SocketAddr) -> Result<String, String> {
    in_netns(&lab.client_ns, move || {
        let mut c = TcpStream::connect_timeout(&vip, Duration::from_secs(5))
            .map_err(|e| format!("connect {vip}: {e}"))?;
        c.set_write_timeout(Some(DEADLINE))
            .map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(DEADLINE))
            .map_err(|e| e.to_string())?;
        let data: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
        c.write_all(&data).map_err(|e| format!("write: {e}"))?;
        c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        let mut answer = String::new();
        c.read_to_string(&mut answer)
            .map_err(|e| format!("read the count: {e}"))?;
        Ok(answer)
    })
}

/// Captures, on the client's interface, the first "fragmentation needed" / "packet too big" it
/// receives.
fn first_error(lab: &Lab, v6: bool) -> std::thread::JoinHandle<Option<Captured>> {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let handle = spawn_in_netns(&lab.client_ns, move || {
        let c = Capture::open("c0");
        ready_tx.send(()).expect("ready");
        c.next(DEADLINE, |f| match v6 {
            false => f.len() > 35 && f[12..14] == [8, 0] && f[23] == 1 && f[34..36] == [3, 4],
            true => f.len() > 54 && f[12..14] == [0x86, 0xdd] && f[20] == 58 && f[54] == 2,
        })
    });
    ready.recv().expect("capture ready");
    handle
}

/// The error the client got, as its interface received it: its own checksums right, quoting the
/// client's segment to the VIP with the TCP checksum the client's stack wrote. On TC the links
/// are as Linux makes them, so that segment's checksum was partial (CHECKSUM_PARTIAL: the field
/// holds the pseudo-header's sum): the quote holds exactly that sum, and the error's socket
/// buffer still says partial with the checksum start in the quote (a known limit, see
/// ARCHITECTURE.md, "Path MTU errors and checksums"). On XDP the far ends are tuned: nothing is
/// partial.
fn check_error(got: &Captured, hooks: Hooks, vip: SocketAddr) {
    let f = &got.frame;
    let partial = got.status & TP_STATUS_CSUMNOTREADY != 0;
    assert_eq!(
        partial,
        hooks == Hooks::Plain,
        "{hooks:?}: the error's checksum state (status {:#x})",
        got.status
    );
    // (where the quoted TCP header starts, its pseudo-header's sum, the error's checksum right)
    let (tcp, pseudo, ok) = if vip.is_ipv6() {
        let len = u16::from_be_bytes([f[18], f[19]]) as usize;
        let icmp = &f[54..54 + len];
        let ph = residue(&[
            &f[22..54],
            &(len as u32).to_be_bytes(),
            &[0, 0, 0, 58],
            icmp,
        ]);
        let q = 62;
        let qlen = u16::from_be_bytes([f[q + 4], f[q + 5]]) as u32;
        let tcp = q + 40;
        let pseudo = residue(&[&f[q + 8..q + 40], &qlen.to_be_bytes(), &[0, 0, 0, 6]]);
        assert_eq!(
            &f[q + 24..q + 40],
            &ip6(vip),
            "the quote's destination is the VIP"
        );
        (tcp, pseudo, ph == 0xffff)
    } else {
        let len = u16::from_be_bytes([f[16], f[17]]) as usize;
        assert_eq!(residue(&[&f[14..34]]), 0xffff, "the error's IP checksum");
        let icmp = &f[34..14 + len];
        let q = 42;
        let ihl = (f[q] & 0x0f) as usize * 4;
        let qlen = u16::from_be_bytes([f[q + 2], f[q + 3]]) as usize - ihl;
        let tcp = q + ihl;
        let pseudo = residue(&[&f[q + 12..q + 20], &[0, 6], &(qlen as u16).to_be_bytes()]);
        assert_eq!(
            &f[q + 16..q + 20],
            &ip4(vip),
            "the quote's destination is the VIP"
        );
        (tcp, pseudo, residue(&[icmp]) == 0xffff)
    };
    assert!(ok, "{hooks:?}: {vip}: the error's ICMP checksum is wrong");
    assert_eq!(
        &f[tcp + 2..tcp + 4],
        &vip.port().to_be_bytes(),
        "the quote's destination port is the VIP's"
    );
    let field = u16::from_be_bytes([f[tcp + 16], f[tcp + 17]]);
    if partial {
        assert_eq!(
            field, pseudo,
            "{hooks:?}: {vip}: the quoted partial TCP checksum is not the pseudo-header's sum the client wrote"
        );
    } else {
        assert_ne!(
            field, pseudo,
            "{hooks:?}: {vip}: a whole checksum in the quote equals the pseudo-header's sum"
        );
    }
}

fn ip4(a: SocketAddr) -> Vec<u8> {
    match a.ip() {
        std::net::IpAddr::V4(v) => v.octets().to_vec(),
        std::net::IpAddr::V6(_) => panic!("not IPv4: {a}"),
    }
}

fn ip6(a: SocketAddr) -> Vec<u8> {
    match a.ip() {
        std::net::IpAddr::V6(v) => v.octets().to_vec(),
        std::net::IpAddr::V4(_) => panic!("not IPv6: {a}"),
    }
}

fn too_big(lab: &Lab) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&lab.lbctl(&["stats", "--json"])).expect("stats");
    stats["icmp_too_big"].as_u64().unwrap_or(0)
}

fn transfer_through_a_smaller_link(prefix: &str, hooks: Hooks) {
    let mut lab = Lab::new_with(prefix, 1, hooks);
    let server = add_router(&mut lab);
    let dir = TestDir::new(prefix);
    let apps = dir.join("apps.json");
    let log = dir.join("agent.log");
    let task =
        |host: &str| json!([{"id": "t.1", "host": host, "ports": [PORT], "state": "TASK_RUNNING"}]);
    let doc = json!({"apps": [
        {"id": "/bulk4", "portDefinitions": [{"labels": {"VIP_0": "172.16.0.1:8080"}}],
         "tasks": task("198.18.101.2")},
        {"id": "/bulk6", "portDefinitions": [{"labels": {"VIP_0": "fd00:172:16::1:8080"}}],
         "tasks": task("2001:2:0:101::2")},
    ]});
    write_atomically(&apps, &doc.to_string());
    lab.start_agent(&apps, &log);
    lab.wait_for_kernel(Duration::from_secs(20), |s| s.len() == 2)
        .unwrap_or_else(|e| panic!("{e}\n{}", read_log(&log)));
    for (vip, backend) in [
        ("172.16.0.1:8080", "198.18.101.2"),
        ("[fd00:172:16::1]:8080", "[2001:2:0:101::2]"),
    ] {
        let vip: SocketAddr = vip.parse().expect("vip");
        let at: SocketAddr = format!("{backend}:{PORT}").parse().expect("backend");
        let server_done = sink(&server.0, at);
        let error = first_error(&lab, vip.is_ipv6());
        let before = too_big(&lab);
        let start = Instant::now();
        let answer = bulk(&lab, vip);
        let took = start.elapsed();
        if answer != Ok(BYTES.to_string()) {
            let ip = vip.ip().to_string();
            let route = format!(
                "{}\n{}",
                sh(&["ip", "-n", &lab.client_ns, "route", "get", &ip]),
                sh(&["ip", "netns", "exec", &lab.client_ns, "ss", "-tinoa"])
            );
            let icmp = sh(&[
                "ip",
                "netns",
                "exec",
                &lab.client_ns,
                "nstat",
                "-asz",
                "Icmp*",
            ]);
            panic!(
                "{hooks:?}: {BYTES} bytes to {vip} through a 1400-byte link: {answer:?} after \
                 {took:?}\nstats: {}\nclient's route: {route}\nclient's ICMP: {icmp}\n{}",
                lab.lbctl(&["stats", "--json"]),
                read_log(&log)
            );
        }
        assert_eq!(server_done.join().expect("server thread"), Ok(BYTES));
        assert!(took < DEADLINE, "{hooks:?}: {vip}: took {took:?}");
        let got = error.join().expect("capture thread");
        check_error(
            &got.unwrap_or_else(|| panic!("{hooks:?}: {vip}: no error reached the client")),
            hooks,
            vip,
        );
        let after = too_big(&lab);
        assert!(
            after > before,
            "{hooks:?}: {vip}: icmp_too_big did not rise ({before} -> {after})"
        );
    }
    lab.stop_agents(false);
}

#[test]
fn pmtu_through_a_vip_on_tc() {
    if !privileged_or_skip("pmtu_through_a_vip_on_tc") {
        return;
    }
    transfer_through_a_smaller_link("lbt-pmtu-tc", Hooks::Plain);
}

#[test]
fn pmtu_through_a_vip_on_xdp() {
    if !privileged_or_skip("pmtu_through_a_vip_on_xdp") {
        return;
    }
    transfer_through_a_smaller_link("lbt-pmtu-xdp", Hooks::Xdp);
}
