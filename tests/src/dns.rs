//! A DNS client and a small upstream DNS server for the tests of the agent's DNS server
//! (hickory-proto builds and parses every message: nothing here encodes DNS by hand).
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::A},
};
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// A query for `name` of type `t` with id `id`, optionally offering EDNS.
pub fn query(name: &str, t: RecordType, id: u16, edns: bool) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let mut n = Name::from_ascii(name).expect("a DNS name");
    n.set_fqdn(true);
    m.add_query(Query::query(n, t));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

/// Sends `q` over UDP (from this thread's namespace) and returns the raw answer.
pub fn ask_udp_raw(server: SocketAddr, raw: &[u8]) -> Result<Vec<u8>, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.send_to(raw, server).map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 65_535];
    let (n, _) = s
        .recv_from(&mut buf)
        .map_err(|e| format!("no answer: {e}"))?;
    buf.truncate(n);
    Ok(buf)
}

/// Asks `server` over UDP.
pub fn ask_udp(server: SocketAddr, q: &Message) -> Result<Message, String> {
    let raw = ask_udp_raw(server, &q.to_vec().map_err(|e| e.to_string())?)?;
    Message::from_vec(&raw).map_err(|e| format!("not DNS: {e}"))
}

/// Asks `server` over TCP (a 2-byte length, then the message).
pub fn ask_tcp(server: SocketAddr, q: &Message) -> Result<Message, String> {
    let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let raw = q.to_vec().map_err(|e| e.to_string())?;
    let mut out = (raw.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&raw);
    s.write_all(&out).map_err(|e| e.to_string())?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)
        .map_err(|e| format!("no answer: {e}"))?;
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    Message::from_vec(&body).map_err(|e| format!("not DNS: {e}"))
}

/// The IPv4 addresses of an answer's A records.
pub fn addresses(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// A response code and the A addresses, for messages in assertions.
pub fn summary(m: &Message) -> (ResponseCode, Vec<Ipv4Addr>) {
    (m.metadata.response_code, addresses(m))
}

/// A small authoritative server for `upstream.test.`: every name under it answers
/// [`UPSTREAM_ANSWER`], anything else NXDOMAIN. Stops when dropped.
pub struct Upstream {
    /// Queries answered.
    pub answered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The address the upstream server gives every name under `upstream.test.`.
pub const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);

impl Upstream {
    /// Serves on `socket` (bound by the caller, in the namespace it wants).
    pub fn serve(socket: UdpSocket) -> Upstream {
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), answered.clone());
        let thread = std::thread::spawn(move || {
            let zone = Name::from_ascii("upstream.test.").expect("name");
            let mut buf = vec![0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut r = Message::response(q.metadata.id, q.metadata.op_code);
                r.metadata.recursion_desired = q.metadata.recursion_desired;
                r.metadata.recursion_available = true;
                r.add_queries(q.queries.iter().cloned());
                match q.queries.first() {
                    Some(qq) if zone.zone_of(qq.name()) && qq.query_type() == RecordType::A => {
                        r.add_answer(Record::from_rdata(
                            qq.name().clone(),
                            60,
                            RData::A(A(UPSTREAM_ANSWER)),
                        ));
                    }
                    _ => r.metadata.response_code = ResponseCode::NXDomain,
                }
                if let Ok(bytes) = r.to_vec() {
                    // Counted first: a test that got this answer finds it counted.
                    a.fetch_add(1, Ordering::Relaxed);
                    let _ = socket.send_to(&bytes, from);
                }
            }
        });
        Upstream {
            answered,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
