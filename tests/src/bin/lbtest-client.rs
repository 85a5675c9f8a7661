//! The client of the local-path tests and bench: a process of its own, so that it can be moved
//! into the test's cgroup (the cgroup programs serve processes, not threads), and join the
//! client's network namespace. Single-threaded; prints one line per request.
//!
//! `lbtest-client CGROUP_DIR|- NETNS|- MODE ARGS...`, MODE one of:
//! - `tcp ADDR N`: N connections, one request each: `ok <backend> <peer> <socket cookie>` or
//!   `err <errno> <what>`.
//! - `udp ADDR N`: N fresh sockets, one datagram each: `ok <backend> <reply source>` or `err ...`.
//! - `udp-long ADDR N INTERVAL_MS connected|unconnected`: one socket, N datagrams one interval
//!   apart: `ok <backend> <local port>` or `lost <local port>`; a connected socket whose send
//!   or receive fails with ECONNREFUSED connects again (`reconnect`).
//! - `hold ADDR N`: N connections, one request each (`ok ...`), then after a line on stdin one
//!   more request on each (`ok ...` or `err ...`).
//! - `rate ADDR SECONDS`: new connections with one request each for SECONDS; prints
//!   `rate <connections> <mean request latency ns> <mean connect ns>`.
//! - `udp-connect ADDR N`: one UDP socket connected N times to ADDR (no handshake: the cost of
//!   the call itself, cgroup programs included): `udp-connect <mean ns per connect()>`.
//! - `watch DIRECT SECONDS VIP|-`: a TCP connection to DIRECT and, unless `-`, a TCP
//!   connection and a connected UDP socket to VIP, one request each: `ready <tcp> <udp>
//!   <direct>` (backend names, `-` for none); then after a line on stdin, one request on each
//!   every 50 ms for SECONDS: a socket that fails prints `gone <tcp|udp|direct> <errno> <ms
//!   since the stdin line>`, and a VIP one is connected again (`new <tcp|udp> <backend>`); a
//!   UDP reply that does not come prints `lost udp`. At the end: `last <tcp> <udp> <direct>`,
//!   the backends that answered the last requests.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: lbtest-client CGROUP_DIR|- NETNS|- MODE ADDR [ARGS...]");
        std::process::exit(2);
    }
    if args[0] != "-" {
        let procs = format!("{}/cgroup.procs", args[0]);
        std::fs::write(&procs, std::process::id().to_string())
            .unwrap_or_else(|e| panic!("joining {procs}: {e}"));
    }
    if args[1] != "-" {
        let path = format!("/run/netns/{}", args[1]);
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        // SAFETY: setns(2) on an open namespace file; this process has one thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
    }
    let addr: SocketAddr = args[3]
        .parse()
        .unwrap_or_else(|e| panic!("address {}: {e}", args[3]));
    let num = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("argument {i} must be a number"))
    };
    let mut out = std::io::stdout().lock();
    match args[2].as_str() {
        "tcp" => {
            for _ in 0..num(4) {
                let line = match tcp_once(addr) {
                    Ok((name, peer, cookie)) => format!("ok {name} {peer} {cookie}"),
                    Err(e) => err_line(&e),
                };
                writeln!(out, "{line}").ok();
            }
        }
        "udp" => {
            for _ in 0..num(4) {
                let line = match udp_once(addr) {
                    Ok((name, from)) => format!("ok {name} {from}"),
                    Err(e) => err_line(&e),
                };
                writeln!(out, "{line}").ok();
            }
        }
        "udp-long" => udp_long(
            addr,
            num(4),
            Duration::from_millis(num(5)),
            args.get(6).map(String::as_str) == Some("connected"),
            &mut out,
        ),
        "hold" => hold(addr, num(4), &mut out),
        "rate" => rate(addr, Duration::from_secs(num(4)), &mut out),
        "udp-connect" => udp_connect(addr, num(4), &mut out),
        "watch" => watch(
            addr,
            Duration::from_secs(num(4)),
            args.get(5)
                .filter(|v| *v != "-")
                .map(|v| v.parse().unwrap_or_else(|e| panic!("address {v}: {e}"))),
            &mut out,
        ),
        m => panic!("unknown mode {m}"),
    }
}

fn err_line(e: &std::io::Error) -> String {
    format!("err {} {e}", e.raw_os_error().unwrap_or(0))
}

fn other(what: String) -> std::io::Error {
    std::io::Error::other(what)
}

/// One request line on a connection; the backend's name.
fn request(s: &mut TcpStream) -> std::io::Result<String> {
    s.write_all(b"hello\n")?;
    let mut line = String::new();
    let mut byte = [0u8; 1];
    while !line.ends_with('\n') {
        if s.read(&mut byte)? == 0 {
            return Err(other("connection closed".into()));
        }
        line.push(byte[0] as char);
    }
    Ok(line.trim().to_string())
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

fn tcp_once(addr: SocketAddr) -> std::io::Result<(String, SocketAddr, u64)> {
    let mut s = connect(addr)?;
    let peer = s.peer_addr()?;
    Ok((request(&mut s)?, peer, cookie(&s)))
}

/// The kernel's cookie of a socket (SO_COOKIE), 0 if unknown.
fn cookie(s: &impl AsRawFd) -> u64 {
    let mut v: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(2) into a u64 of the length given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    if rc == 0 { v } else { 0 }
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|_| other("any".into()))?
    } else {
        "[::]:0".parse().map_err(|_| other("any".into()))?
    };
    UdpSocket::bind(any)
}

fn udp_once(addr: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let s = udp_socket(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.send_to(b"hello", addr)?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

fn refused(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ECONNREFUSED)
}

/// The socket was ended (sock_diag SOCK_DESTROY: ECONNABORTED; a UDP socket is disconnected
/// by it, so a send without an address fails with EDESTADDRREQ).
fn ended(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EDESTADDRREQ)
    )
}

fn udp_long(addr: SocketAddr, n: u64, every: Duration, connected: bool, out: &mut impl Write) {
    let s = udp_socket(addr).expect("udp socket");
    if connected {
        s.connect(addr).expect("connect");
    }
    s.set_read_timeout(Some(every)).expect("timeout");
    let mut buf = [0u8; 256];
    for _ in 0..n {
        let start = Instant::now();
        let sent = if connected {
            s.send(b"hello")
        } else {
            s.send_to(b"hello", addr)
        };
        let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
        let got = sent.and_then(|_| {
            if connected {
                s.recv(&mut buf).map(|n| (n, addr))
            } else {
                s.recv_from(&mut buf)
            }
        });
        let line = match got {
            Ok((len, from)) if from == addr => {
                format!("ok {} {port}", String::from_utf8_lossy(&buf[..len]))
            }
            Ok((_, from)) => format!("wrong-source {from} {port}"),
            Err(e) if connected && (refused(&e) || ended(&e)) => {
                // The backend's port is closed (ICMP port unreachable), or the agent ended the
                // socket because its backend left: connect again, which asks the load balancer
                // for a backend that serves.
                s.connect(addr).expect("reconnect");
                format!("reconnect {port}")
            }
            Err(_) => format!("lost {port}"),
        };
        writeln!(out, "{line}").ok();
        if let Some(rest) = every.checked_sub(start.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

fn hold(addr: SocketAddr, n: u64, out: &mut impl Write) {
    let mut conns = Vec::new();
    for _ in 0..n {
        let line = match connect(addr).and_then(|mut s| {
            let name = request(&mut s)?;
            conns.push(s);
            Ok(name)
        }) {
            Ok(name) => format!("ok {name}"),
            Err(e) => err_line(&e),
        };
        writeln!(out, "{line}").ok();
    }
    writeln!(out, "held").ok();
    out.flush().ok();
    let mut go = String::new();
    BufReader::new(std::io::stdin()).read_line(&mut go).ok();
    for s in &mut conns {
        let line = match request(s) {
            Ok(name) => format!("ok {name}"),
            Err(e) => err_line(&e),
        };
        writeln!(out, "{line}").ok();
    }
}

fn rate(addr: SocketAddr, run: Duration, out: &mut impl Write) {
    let start = Instant::now();
    let (mut n, mut total, mut connect_total) = (0u64, 0u128, 0u128);
    while start.elapsed() < run {
        let t = Instant::now();
        let mut s = connect(addr).expect("connect");
        connect_total += t.elapsed().as_nanos();
        request(&mut s).expect("request");
        total += t.elapsed().as_nanos();
        n += 1;
    }
    writeln!(
        out,
        "rate {n} {} {}",
        total / n.max(1) as u128,
        connect_total / n.max(1) as u128
    )
    .ok();
}

fn udp_connect(addr: SocketAddr, n: u64, out: &mut impl Write) {
    let s = udp_socket(addr).expect("udp socket");
    // The first connect records the socket's state; the rest are the steady cost.
    s.connect(addr).expect("connect");
    let t = Instant::now();
    for _ in 0..n {
        s.connect(addr).expect("connect");
    }
    writeln!(
        out,
        "udp-connect {}",
        t.elapsed().as_nanos() / n.max(1) as u128
    )
    .ok();
}

/// A connected UDP socket to `addr` with a short read timeout.
fn udp_connected(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = udp_socket(addr)?;
    s.connect(addr)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    Ok(s)
}

/// One datagram on a connected socket; the backend's name.
fn exchange(s: &UdpSocket) -> std::io::Result<String> {
    s.send(b"hello")?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// The `watch` mode: see the module's documentation.
fn watch(direct: SocketAddr, run: Duration, vip: Option<SocketAddr>, out: &mut impl Write) {
    let opened =
        |s: std::io::Result<TcpStream>| s.and_then(|mut s| request(&mut s).map(|name| (s, name)));
    let (mut d, mut last_d) = opened(connect(direct)).expect("direct connection");
    let mut tcp = vip.map(|v| opened(connect(v)).expect("TCP connection to the VIP"));
    let mut udp = vip.map(|v| {
        let s = udp_connected(v).expect("UDP socket to the VIP");
        let name = exchange(&s).expect("UDP exchange with the VIP");
        (s, name)
    });
    // `<word> <tcp> <udp> <direct>`: the backends that answered last.
    let names = |word: &str,
                 tcp: &Option<(TcpStream, String)>,
                 udp: &Option<(UdpSocket, String)>,
                 d: &str| {
        let name = |x: Option<&String>| x.cloned().unwrap_or_else(|| "-".into());
        let (t, u) = (
            name(tcp.as_ref().map(|t| &t.1)),
            name(udp.as_ref().map(|u| &u.1)),
        );
        format!("{word} {t} {u} {d}")
    };
    writeln!(out, "{}", names("ready", &tcp, &udp, &last_d)).ok();
    out.flush().ok();
    let mut go = String::new();
    BufReader::new(std::io::stdin()).read_line(&mut go).ok();
    let start = Instant::now();
    let ms = || start.elapsed().as_millis();
    let mut direct_gone = false;
    while start.elapsed() < run {
        // The pause between rounds is a wait on the UDP socket: an error ends it at once.
        if let (Some((s, _)), Some(v)) = (udp.as_mut(), vip) {
            let mut buf = [0u8; 256];
            s.set_read_timeout(Some(Duration::from_millis(50))).ok();
            let waited = s.recv(&mut buf);
            s.set_read_timeout(Some(Duration::from_millis(500))).ok();
            let got = match waited {
                Err(e) if timed_out(&e) => exchange(s),
                Err(e) => Err(e),
                Ok(_) => exchange(s),
            };
            match got {
                Ok(n) => {
                    if let Some(u) = udp.as_mut() {
                        u.1 = n;
                    }
                }
                Err(e) if timed_out(&e) => {
                    writeln!(out, "lost udp").ok();
                }
                Err(e) => {
                    writeln!(out, "gone udp {} {}", e.raw_os_error().unwrap_or(0), ms()).ok();
                    let s = udp_connected(v).expect("UDP socket to the VIP");
                    let n = exchange(&s).unwrap_or_else(|e| err_line(&e));
                    writeln!(out, "new udp {n}").ok();
                    udp = Some((s, n));
                }
            }
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let (Some((s, _)), Some(v)) = (tcp.as_mut(), vip) {
            match request(s) {
                Ok(n) => {
                    if let Some(t) = tcp.as_mut() {
                        t.1 = n;
                    }
                }
                Err(e) => {
                    writeln!(out, "gone tcp {} {}", e.raw_os_error().unwrap_or(0), ms()).ok();
                    let (s, n) = opened(connect(v)).expect("TCP connection to the VIP");
                    writeln!(out, "new tcp {n}").ok();
                    tcp = Some((s, n));
                }
            }
        }
        if !direct_gone {
            match request(&mut d) {
                Ok(n) => last_d = n,
                Err(e) => {
                    writeln!(
                        out,
                        "gone direct {} {}",
                        e.raw_os_error().unwrap_or(0),
                        ms()
                    )
                    .ok();
                    direct_gone = true;
                    last_d = "-".into();
                }
            }
        }
        out.flush().ok();
    }
    writeln!(out, "{}", names("last", &tcp, &udp, &last_d)).ok();
}
