//! UDP and TCP listeners answering from the published zone, as tasks of the agent's runtime.
//! Every resource is bounded: TCP connections (at most [`MAX_TCP`] at once, each closed after
//! [`TCP_IDLE`] without a whole query), forwarded queries in flight ([`MAX_FORWARDS`]; past that
//! SERVFAIL), and buffers (one datagram, one TCP message of at most 64 KiB).
use super::{DnsConfig, Reply, ZoneHandle, answer, encode, formerr, udp_limit};
use crate::error::{Error, Result};
use hickory_proto::op::{Message, ResponseCode};
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    runtime::Handle,
    sync::Semaphore,
    time::timeout,
};
use tokio_util::sync::CancellationToken;

/// TCP connections served at once; more are closed as they arrive.
pub const MAX_TCP: usize = 64;
/// A TCP connection is closed after this long without a whole query (or a written answer).
pub const TCP_IDLE: Duration = Duration::from_secs(5);
/// Queries forwarded upstream at once; more get SERVFAIL.
pub const MAX_FORWARDS: usize = 256;
/// Tasks reading each UDP socket.
const UDP_WORKERS: usize = 2;

/// The DNS listeners, bound (before the agent touches the kernel) and not answering yet.
pub struct Bound {
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
    /// The addresses bound (a port 0 replaced by the one given), UDP and TCP alike.
    pub addrs: Vec<SocketAddr>,
}

/// Binds UDP and TCP on each address of `listen` (a port 0 gets the same free port for both).
/// Refused, naming the address, when one cannot be bound.
pub fn bind(listen: &[SocketAddr]) -> Result<Bound> {
    let mut bound = Bound {
        udp: Vec::new(),
        tcp: Vec::new(),
        addrs: Vec::new(),
    };
    for addr in listen {
        let what = |proto: &str| format!("binding the DNS listener {proto} {addr} (--dns-listen)");
        let udp = std::net::UdpSocket::bind(addr).map_err(|e| Error::io(what("UDP"), e))?;
        let addr = udp.local_addr().map_err(|e| Error::io(what("UDP"), e))?;
        let tcp = std::net::TcpListener::bind(addr).map_err(|e| Error::io(what("TCP"), e))?;
        for r in [udp.set_nonblocking(true), tcp.set_nonblocking(true)] {
            r.map_err(|e| Error::io(what("UDP and TCP"), e))?;
        }
        bound.udp.push(udp);
        bound.tcp.push(tcp);
        bound.addrs.push(addr);
    }
    Ok(bound)
}

/// Answers on `bound` from `zone` as tasks of `runtime` until `stop` is cancelled.
pub fn serve(
    bound: Bound,
    zone: ZoneHandle,
    cfg: &DnsConfig,
    runtime: &Handle,
    stop: CancellationToken,
) -> Result<()> {
    let ctx = Arc::new(Ctx {
        zone,
        upstream: cfg.upstream.clone(),
        upstream_timeout: cfg.upstream_timeout,
        forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
    });
    let _guard = runtime.enter();
    for s in bound.udp {
        let socket = Arc::new(UdpSocket::from_std(s).map_err(|e| Error::io("DNS UDP socket", e))?);
        for _ in 0..UDP_WORKERS {
            runtime.spawn(until(stop.clone(), udp_loop(socket.clone(), ctx.clone())));
        }
    }
    for l in bound.tcp {
        let listener = TcpListener::from_std(l).map_err(|e| Error::io("DNS TCP listener", e))?;
        runtime.spawn(until(stop.clone(), tcp_loop(listener, ctx.clone())));
    }
    Ok(())
}

/// Runs `task` until `stop` is cancelled.
async fn until(stop: CancellationToken, task: impl std::future::Future<Output = ()>) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = task => {}
    }
}

struct Ctx {
    zone: ZoneHandle,
    upstream: Vec<SocketAddr>,
    upstream_timeout: Duration,
    forwards: Arc<Semaphore>,
}

/// What one query gets, encoded within `limit` bytes; `None`: nothing is sent.
async fn respond(ctx: &Ctx, raw: &[u8], udp: bool) -> Option<Vec<u8>> {
    let request = match Message::from_vec(raw) {
        Ok(m) => m,
        Err(_) => return formerr(raw),
    };
    let limit = if udp { udp_limit(&request) } else { 65_535 };
    let zone = ctx.zone.current();
    match answer(&zone, &request, ctx.zone.forwarding()) {
        Reply::Answer(m) => encode(&m, limit),
        Reply::Drop => None,
        Reply::Forward => {
            let reply = match ctx.forwards.clone().try_acquire_owned() {
                Ok(_permit) => forward(ctx, raw, request.metadata.id).await,
                Err(_) => None,
            };
            match reply {
                // The upstream's answer, cut to what the client allows.
                Some(m) => encode(&m, limit),
                None => {
                    let mut m = Message::error_msg(
                        request.metadata.id,
                        request.metadata.op_code,
                        ResponseCode::ServFail,
                    );
                    m.metadata.recursion_desired = request.metadata.recursion_desired;
                    m.add_queries(request.queries.iter().cloned());
                    encode(&m, limit)
                }
            }
        }
    }
}

/// Asks each upstream server in turn (UDP, then TCP when its answer was truncated); the first
/// well-formed response with the query's id is the answer.
async fn forward(ctx: &Ctx, raw: &[u8], id: u16) -> Option<Message> {
    for up in &ctx.upstream {
        match timeout(ctx.upstream_timeout, ask_upstream(*up, raw, id)).await {
            Ok(Some(m)) => return Some(m),
            Ok(None) => {
                tracing::debug!(upstream = %up, "no usable answer from the upstream DNS server")
            }
            Err(_) => {
                tracing::debug!(upstream = %up, "the upstream DNS server did not answer in time")
            }
        }
    }
    None
}

async fn ask_upstream(up: SocketAddr, raw: &[u8], id: u16) -> Option<Message> {
    let local: SocketAddr = if up.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(local).await.ok()?;
    socket.connect(up).await.ok()?;
    socket.send(raw).await.ok()?;
    let mut buf = vec![0u8; 4096];
    // A stray datagram (another id, not DNS) is skipped; the caller's deadline bounds the wait.
    for _ in 0..8 {
        let n = socket.recv(&mut buf).await.ok()?;
        let Ok(m) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if m.metadata.id != id {
            continue;
        }
        if !m.metadata.truncation {
            return Some(m);
        }
        let mut tcp = TcpStream::connect(up).await.ok()?;
        let len = u16::try_from(raw.len()).ok()?;
        tcp.write_all(&len.to_be_bytes()).await.ok()?;
        tcp.write_all(raw).await.ok()?;
        let n = tcp.read_u16().await.ok()? as usize;
        let mut body = vec![0u8; n];
        tcp.read_exact(&mut body).await.ok()?;
        return Message::from_vec(&body)
            .ok()
            .filter(|m| m.metadata.id == id);
    }
    None
}

async fn udp_loop(socket: Arc<UdpSocket>, ctx: Arc<Ctx>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "DNS UDP receive");
                continue;
            }
        };
        let raw = &buf[..n];
        let reply = if is_local_answer(&ctx, raw) {
            respond(&ctx, raw, true).await
        } else {
            // Forwarding waits on the network: its own task, bounded by `forwards`.
            let ctx = ctx.clone();
            let socket = socket.clone();
            let raw = raw.to_vec();
            tokio::spawn(async move {
                if let Some(reply) = respond(&ctx, &raw, true).await {
                    let _ = socket.send_to(&reply, from).await;
                }
            });
            None
        };
        if let Some(reply) = reply {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

/// True unless the query would be forwarded (which waits on an upstream server).
fn is_local_answer(ctx: &Ctx, raw: &[u8]) -> bool {
    if !ctx.zone.forwarding() {
        return true;
    }
    match Message::from_vec(raw) {
        Ok(m) => !matches!(answer(&ctx.zone.current(), &m, true), Reply::Forward),
        Err(_) => true,
    }
}

async fn tcp_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    let slots = Arc::new(Semaphore::new(MAX_TCP));
    loop {
        let (conn, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "DNS TCP accept");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(client = %from, "DNS TCP connection refused: {MAX_TCP} already open");
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_tcp(conn, &ctx).await;
        });
    }
}

/// Answers the queries of one TCP connection (each a 2-byte length and a message) until the
/// client closes it, sends something not DNS, or is idle for [`TCP_IDLE`].
async fn serve_tcp(mut conn: TcpStream, ctx: &Ctx) {
    let mut buf = Vec::new();
    loop {
        let Ok(Ok(len)) = timeout(TCP_IDLE, conn.read_u16()).await else {
            return;
        };
        buf.resize(len as usize, 0);
        let Ok(Ok(_)) = timeout(TCP_IDLE, conn.read_exact(&mut buf)).await else {
            return;
        };
        let Some(reply) = respond(ctx, &buf, false).await else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&reply);
        if !matches!(timeout(TCP_IDLE, conn.write_all(&out)).await, Ok(Ok(()))) {
            return;
        }
    }
}
