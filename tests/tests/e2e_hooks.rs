//! Issue 13: the TC data plane beside XDP, through the real agent.
//! - Interfaces as Linux makes them (veth with transmit checksum offload: partial checksums) get
//!   TC, say so in `lbctl status` and `lbctl list`, and TCP and UDP through a VIP complete.
//! - Mixed: the client's side on XDP (far end tuned), the backends' on TC; one flow goes through
//!   both programs, both ways, over the shared maps; XDP forced on a veth warns once.
//! - An interface moves from TC to XDP and back on agent restarts with 20 connections open:
//!   none breaks, each stays on its backend, and only the new hook's program is attached.
use lbtest::{
    Hooks, Lab, apps_doc, exchange, privileged_or_skip, read_log, wait_until, write_atomically,
};
use std::{net::SocketAddrV4, path::Path, time::Duration};

const PORT: u16 = 31300;
const VIP: &str = "172.16.0.13:8080";

fn vip() -> SocketAddrV4 {
    VIP.parse().expect("vip")
}

/// Starts the lab's agent on one TCP+UDP VIP over every backend and waits until it is served.
fn start(lab: &mut Lab, apps: &Path, log: &Path) {
    let all = lab.backends.clone();
    write_atomically(
        apps,
        &apps_doc("/web", "udp,tcp", &[("VIP_0", VIP)], &all, PORT),
    );
    lab.start_agent(apps, log);
    lab.wait_status(
        Duration::from_secs(20),
        |v| v["agent"]["last_sync"].is_u64(),
        "the agent synced",
    );
    lab.wait_for_kernel(Duration::from_secs(20), |s| s.len() == 2)
        .unwrap_or_else(|e| panic!("no services: {e}\n{}", read_log(log)));
}

/// The agent's hooks by interface, from `lbctl status --json`: (iface, hook, reason).
fn status_hooks(lab: &Lab) -> Vec<(String, String, String)> {
    let st = lab.wait_status(
        Duration::from_secs(10),
        |v| v["agent"]["hooks"].is_array(),
        "hooks in the status",
    );
    let mut out: Vec<(String, String, String)> = st["agent"]["hooks"]
        .as_array()
        .expect("hooks")
        .iter()
        .map(|h| {
            (
                h["iface"].as_str().expect("iface").to_string(),
                h["hook"].as_str().expect("hook").to_string(),
                h["reason"].as_str().expect("reason").to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn counter(lab: &Lab, name: &str) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&lab.lbctl(&["stats", "--json"])).expect("stats json");
    stats[name].as_u64().unwrap_or(0)
}

#[test]
fn interfaces_as_linux_makes_them_get_tc() {
    if !privileged_or_skip("interfaces_as_linux_makes_them_get_tc") {
        return;
    }
    let mut lab = Lab::new_with("lbt-tc", 2, Hooks::Plain);
    let _hits = lab.serve(PORT);
    let dir = lbtest::TestDir::new("tc-plain");
    let (apps, log) = (dir.join("apps.json"), dir.join("agent.log"));
    start(&mut lab, &apps, &log);

    let hooks = status_hooks(&lab);
    assert_eq!(hooks.len(), 3, "{hooks:?}");
    for (iface, hook, reason) in &hooks {
        assert_eq!(hook, "tc", "{iface}: {reason}");
        assert!(reason.contains("virtual device (driver veth)"), "{reason}");
        assert_eq!(lab.program_on(iface).map(|p| p.0), Some("tc"), "{iface}");
    }
    let socket = lab.status_socket().display().to_string();
    let list: serde_json::Value =
        serde_json::from_str(&lab.lbctl(&["list", "--json", "--socket", &socket]))
            .expect("list json");
    let listed = list["interfaces"].as_array().expect("interfaces in list");
    assert_eq!(listed.len(), 3, "{list}");
    for h in listed {
        assert_eq!(h["hook"], "tc", "{list}");
        assert!(
            h["reason"].as_str().unwrap_or("").contains("virtual"),
            "{list}"
        );
    }
    let text = lab.lbctl(&["list", "--socket", &socket]);
    assert!(
        text.contains("Interface lb-c") && text.contains(" tc "),
        "{text}"
    );

    // Partial checksums from the client and the backends, rewritten on the socket buffer.
    let tcp = lab.tcp_requests(vip(), 100);
    let udp = lab.udp_requests(vip(), 100);
    assert_eq!((tcp.len(), udp.len()), (100, 100));
    assert!(
        counter(&lab, "redirect") >= 400,
        "{}",
        lab.lbctl(&["stats"])
    );
    assert_eq!(counter(&lab, "drop_malformed"), 0);
    assert!(
        !read_log(&log).contains("XDP forced on a veth"),
        "no warning without :xdp"
    );
}

#[test]
fn one_flow_through_xdp_and_tc() {
    if !privileged_or_skip("one_flow_through_xdp_and_tc") {
        return;
    }
    let mut lab = Lab::new_with("lbt-mix", 2, Hooks::Mixed);
    let _hits = lab.serve(PORT);
    let dir = lbtest::TestDir::new("tc-mixed");
    let (apps, log) = (dir.join("apps.json"), dir.join("agent.log"));
    start(&mut lab, &apps, &log);

    let hooks = status_hooks(&lab);
    let by = |i: &str| hooks.iter().find(|h| h.0 == i).cloned().expect(i);
    assert_eq!(by("lb-c").1, "xdp", "{hooks:?}");
    assert!(by("lb-c").2.contains("forced"), "{hooks:?}");
    for b in ["lb-b1", "lb-b2"] {
        assert_eq!(by(b).1, "tc", "{hooks:?}");
        assert_eq!(lab.program_on(b).map(|p| p.0), Some("tc"));
    }
    assert_eq!(lab.program_on("lb-c").map(|p| p.0), Some("xdp"));
    let warnings = read_log(&log).matches("XDP forced on a veth").count();
    assert_eq!(warnings, 1, "one warning for the one veth forced to XDP");

    // Requests enter through XDP (lb-c), replies through TC (lb-b*): both rewrite one flow,
    // through the maps they share.
    let tcp = lab.tcp_requests(vip(), 100);
    let udp = lab.udp_requests(vip(), 100);
    assert_eq!((tcp.len(), udp.len()), (100, 100));
    assert!(counter(&lab, "reply") >= 200, "{}", lab.lbctl(&["stats"]));
    assert_eq!(counter(&lab, "drop_malformed"), 0);
}

#[test]
fn an_interface_moves_between_hooks_without_breaking_connections() {
    if !privileged_or_skip("an_interface_moves_between_hooks_without_breaking_connections") {
        return;
    }
    // Far ends tuned, so that both hooks are right on these links; the agent is first started
    // without :xdp (auto: TC).
    let mut lab = Lab::new_with("lbt-move", 2, Hooks::Xdp);
    let forced = std::mem::take(&mut lab.xdp_ifaces);
    let _hits = lab.serve(PORT);
    let dir = lbtest::TestDir::new("tc-move");
    let (apps, log) = (dir.join("apps.json"), dir.join("agent.log"));
    start(&mut lab, &apps, &log);
    assert!(status_hooks(&lab).iter().all(|h| h.1 == "tc"));

    let mut conns = lab.open_connections(vip(), 20);
    let first: Vec<String> = conns
        .iter_mut()
        .map(|c| exchange(c).expect("first exchange"))
        .collect();
    for (round, (xdp, want)) in [(forced.clone(), "xdp"), (Vec::new(), "tc")]
        .into_iter()
        .enumerate()
    {
        lab.stop_agents(false);
        lab.xdp_ifaces = xdp;
        let log = dir.join(format!("agent-{round}.log"));
        lab.start_agent(&apps, &log);
        wait_until(
            Duration::from_secs(20),
            || {
                lab.status_at(&lab.status_socket()).is_some_and(|v| {
                    v["agent"]["hooks"]
                        .as_array()
                        .is_some_and(|h| h.len() == 3 && h.iter().all(|h| h["hook"] == want))
                })
            },
            "the agent moved every interface",
        );
        for i in &lab.lb_ifaces {
            assert_eq!(
                lab.program_on(i).map(|p| p.0),
                Some(want),
                "{i} after the move to {want}\n{}",
                read_log(&log)
            );
        }
        let links = lbctl::dataplane::pinned_hook_links(&lab.pin_dir).expect("links");
        assert_eq!(links.len(), 3, "one link per interface: {links:?}");
        let now: Vec<String> = conns
            .iter_mut()
            .enumerate()
            .map(|(i, c)| {
                exchange(c).unwrap_or_else(|e| panic!("connection {i} broke on {want}: {e}"))
            })
            .collect();
        assert_eq!(now, first, "every connection stays on its backend ({want})");
    }
    assert_eq!(counter(&lab, "drop_malformed"), 0);
}

/// The pseudo-header's sum, folded and not complemented: what the L4 checksum field of a frame
/// with a partial checksum holds (the device adds the data and complements). From the frame's
/// own IPv4 header: addresses, protocol and L4 length.
fn pseudo_header_sum(f: &[u8]) -> u16 {
    let ihl = ((f[14] & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes([f[16], f[17]]) as u32;
    let word = |i: usize| u16::from_be_bytes([f[i], f[i + 1]]) as u32;
    let mut s = word(26) + word(28) + word(30) + word(32) + f[23] as u32 + (tot_len - ihl as u32);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The L4 checksum field of an IPv4 TCP or UDP frame.
fn l4_field(f: &[u8]) -> u16 {
    let l4 = 14 + ((f[14] & 0x0f) as usize) * 4;
    let at = l4 + if f[23] == 6 { 16 } else { 6 };
    u16::from_be_bytes([f[at], f[at + 1]])
}

#[test]
fn partial_checksums_leave_partial_and_right() {
    if !privileged_or_skip("partial_checksums_leave_partial_and_right") {
        return;
    }
    let mut lab = Lab::new_with("lbt-part", 1, Hooks::Plain);
    let _hits = lab.serve(PORT);
    let dir = lbtest::TestDir::new("tc-partial");
    let (apps, log) = (dir.join("apps.json"), dir.join("agent.log"));
    start(&mut lab, &apps, &log);
    let backend = lab.backends[0].addr.octets();
    for proto in [17u8, 6] {
        // The backend's side of its veth sees the frame as the load balancer sent it.
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let capture = lbtest::spawn_in_netns(&lab.backends[0].ns, move || {
            let c = lbtest::capture::Capture::open("b0");
            ready_tx.send(()).expect("ready");
            c.next(Duration::from_secs(5), |f| {
                f.len() > 38
                    && f[12..14] == [0x08, 0x00]
                    && f[23] == proto
                    && f[30..34] == backend
                    && f[36..38] == PORT.to_be_bytes()
            })
        });
        ready.recv().expect("capture ready");
        match proto {
            17 => drop(lab.udp_requests(vip(), 1)),
            _ => drop(lab.tcp_requests(vip(), 1)),
        }
        let got = capture
            .join()
            .expect("capture thread")
            .unwrap_or_else(|| panic!("no frame of protocol {proto} reached the backend"));
        let f = &got.frame;
        assert!(
            got.status & lbtest::capture::TP_STATUS_CSUMNOTREADY != 0,
            "protocol {proto}: the frame reached the backend with a finished checksum (status {:#x}); the client's veth offloads transmit checksums, so it should still be partial",
            got.status
        );
        // Rewritten to the backend, its partial checksum is the new pseudo-header's sum: the
        // address change applied (BPF_F_PSEUDO_HDR), the port change not (the device adds it).
        assert_eq!(
            l4_field(f),
            pseudo_header_sum(f),
            "protocol {proto}: partial checksum of the rewritten frame {f:02x?}"
        );
    }
}
