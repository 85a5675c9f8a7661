//! Real TCP stacks: a client opens two connections from one address and port, one to each of two
//! VIPs whose tables pick the same backend for it (Linux hands out such ports on its own: the
//! ephemeral port only has to be unique per destination). Both connections work, each answered
//! by its own backend; before the data plane knew about such clashes, the second SYN silently
//! broke the first connection (tests/tests/port_clash.rs has the packet-level cases). With one
//! backend for both, the second waits until the first is over.
use lbtest::{Lab, apps_doc, in_netns, privileged_or_skip, read_log, write_atomically};
use std::{
    io::Read,
    net::{Shutdown, SocketAddrV4, TcpStream},
    os::fd::FromRawFd,
    time::Duration,
};

const PORT: u16 = 31000;
const A: &str = "172.16.0.2:8080";
const B: &str = "172.16.0.3:8080";

/// A TCP connection from exactly `local` (shared with other sockets: SO_REUSEADDR) to `to`,
/// given up after 3 s.
fn connect_from(local: SocketAddrV4, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns until it is handed over.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let timeout = libc::timeval {
            tv_sec: 3,
            tv_usec: 0,
        };
        let ok = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
            // A blocking connect gives up after SO_SNDTIMEO.
            && libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            ) == 0
            && libc::bind(fd, (&sockaddr(local) as *const libc::sockaddr_in).cast(), len) == 0
            && libc::connect(fd, (&sockaddr(to) as *const libc::sockaddr_in).cast(), len) == 0;
        if !ok {
            return Err(std::io::Error::last_os_error());
        }
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(stream)
    }
}

/// A lab of `n` backends serving VIPs A and B (one app), with its agent; the test directory and
/// the agent's log.
fn two_vips(prefix: &str, n: usize) -> (Lab, lbtest::TestDir, std::path::PathBuf) {
    let mut lab = Lab::new(prefix, n);
    lab.serve(PORT);
    let dir = lbtest::TestDir::new(prefix.trim_start_matches("lbt-"));
    let apps = dir.join("apps.json");
    let log = dir.join("agent.log");
    let backends = lab.backends.clone();
    write_atomically(
        &apps,
        &apps_doc(
            "/web",
            "tcp",
            &[("VIP_0", A), ("VIP_1", B)],
            &backends,
            PORT,
        ),
    );
    lab.start_agent(&apps, &log);
    lab.wait_for_kernel(Duration::from_secs(20), |s| s.len() == 2)
        .unwrap_or_else(|e| panic!("{e}\n{}", read_log(&log)));
    (lab, dir, log)
}

#[test]
fn two_connections_from_one_port_to_two_vips_both_work() {
    if !privileged_or_skip("two_connections_from_one_port_to_two_vips_both_work") {
        return;
    }
    let (lab, _dir, log) = two_vips("lbt-clash", 2);

    // A client port whose flows to both VIPs the kernel's tables send to the same backend.
    let sim = |vip: &str, src: &str| lab.lbctl(&["simulate", "--vip", vip, "--src", src]);
    let src = (45000..45200)
        .map(|p| format!("{}:{p}", lab.client_addr))
        .find(|s| sim(A, s).trim() == sim(B, s).trim())
        .expect("two tables of two backends agree for some port");
    let local: SocketAddrV4 = src.parse().expect("src");
    let (a, b): (SocketAddrV4, SocketAddrV4) = (A.parse().expect("a"), B.parse().expect("b"));

    let answers = in_netns(&lab.client_ns, move || {
        let mut first = connect_from(local, a).map_err(|e| format!("to {a}: {e}"))?;
        let one = lbtest::exchange(&mut first)?;
        let mut second = connect_from(local, b).map_err(|e| format!("to {b}: {e}"))?;
        let two = lbtest::exchange(&mut second)?;
        // The first connection survived the second's SYN.
        let again = lbtest::exchange(&mut first).map_err(|e| format!("first again: {e}"))?;
        let peers = (first.peer_addr(), second.peer_addr());
        Ok::<_, String>((one, two, again, peers))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", read_log(&log)));
    let (one, two, again, (p1, p2)) = answers;
    assert_eq!(one, again, "the first connection stays on its backend");
    assert_ne!(one, two, "the second connection went to the other backend");
    assert_eq!(p1.expect("peer").to_string(), A);
    assert_eq!(p2.expect("peer").to_string(), B);
    let stats: serde_json::Value =
        serde_json::from_str(&lab.lbctl(&["stats", "--json"])).expect("stats");
    assert_eq!(stats["port_clash_moved"], 1, "{stats}");
    assert_eq!(stats["flows_lost"], 0, "{stats}");
}

/// One backend for both VIPs: the second connection from the port has nowhere else to go. Its
/// SYNs are dropped (counted) while the first connection lives, which goes on undisturbed; once
/// that one is closed by both sides, a new connection from the same port gets through.
#[test]
fn a_second_connection_from_one_port_waits_for_the_first_with_one_backend() {
    if !privileged_or_skip("a_second_connection_from_one_port_waits_for_the_first_with_one_backend")
    {
        return;
    }
    let (lab, _dir, log) = two_vips("lbt-clash1", 1);
    let local = SocketAddrV4::new(lab.client_addr, 45500);
    let (a, b): (SocketAddrV4, SocketAddrV4) = (A.parse().expect("a"), B.parse().expect("b"));
    let outcome = in_netns(&lab.client_ns, move || {
        let mut first = connect_from(local, a).map_err(|e| format!("to {a}: {e}"))?;
        lbtest::exchange(&mut first)?;
        let refused = connect_from(local, b)
            .map(|_| ())
            .map_err(|e| e.to_string());
        lbtest::exchange(&mut first).map_err(|e| format!("first after the refused SYNs: {e}"))?;
        // Closed by both sides: the client's FIN, then the server's (read to EOF).
        first.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        first
            .read_to_end(&mut rest)
            .map_err(|e| format!("reading to the server's FIN: {e}"))?;
        drop(first);
        let mut later = connect_from(local, b).map_err(|e| format!("to {b} after: {e}"))?;
        lbtest::exchange(&mut later)?;
        Ok::<_, String>(refused)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", read_log(&log)));
    assert!(
        outcome.is_err(),
        "the second connection must wait while the first lives"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&lab.lbctl(&["stats", "--json"])).expect("stats");
    assert!(
        stats["drop_port_clash"].as_u64().is_some_and(|n| n >= 1),
        "{stats}"
    );
}
