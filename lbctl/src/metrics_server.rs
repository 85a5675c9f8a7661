//! The HTTP side of the metrics: `GET /metrics` served to several clients at once, each on a
//! thread of its own, with a deadline and a size limit on its request, so that a slow or
//! hostile client holds only its own connection.
use crate::{
    dataplane::Maps,
    error::{Error, Result},
    metrics::Metrics,
    status::Shared,
};
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// Clients served at once; more are answered 503 at once.
pub const MAX_CONNECTIONS: usize = 32;
/// The time a client has to send its whole request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// The largest request head read.
pub const MAX_REQUEST: usize = 8 << 10;
/// The time a client has to take the answer.
const WRITE_DEADLINE: Duration = Duration::from_secs(5);

/// Binds the metrics listener on `addr`: the agent does so before it touches the kernel.
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| Error::io(format!("binding the metrics listener {addr}"), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("metrics listener", e))?;
    Ok(listener)
}

/// Serves `GET /metrics` on `listener` (from [`bind`]) until `stop`, on threads of its own: one
/// accepting, one per client (at most [`MAX_CONNECTIONS`]). Returns the address it listens on.
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Mutex<Metrics>>,
    status: Shared,
    pin_dir: PathBuf,
    stop: Arc<AtomicBool>,
) -> Result<SocketAddr> {
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io("metrics listener", e))?;
    let active = Arc::new(AtomicUsize::new(0));
    let pin_dir = Arc::new(pin_dir);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_write_timeout(Some(WRITE_DEADLINE));
            if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                let _ = respond(&conn, "503 Service Unavailable", "too many clients\n");
                continue;
            }
            active.fetch_add(1, Ordering::Relaxed);
            let slot = Slot(active.clone());
            let (metrics, status, pin_dir) = (metrics.clone(), status.clone(), pin_dir.clone());
            std::thread::spawn(move || {
                let _slot = slot;
                serve_one(&conn, &metrics, &status, &pin_dir);
            });
        }
    });
    Ok(bound)
}

/// A connection counted in `active` until dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads one request head and answers it.
fn serve_one(conn: &TcpStream, metrics: &Mutex<Metrics>, status: &Shared, pin_dir: &Path) {
    let head = match read_head(conn, Instant::now() + REQUEST_DEADLINE) {
        Ok(head) => head,
        Err(Refused::TooLarge) => {
            let _ = respond(
                conn,
                "431 Request Header Fields Too Large",
                "request head over 8 KiB\n",
            );
            return;
        }
        Err(Refused::Late) => {
            let _ = respond(conn, "408 Request Timeout", "no request within 5 s\n");
            return;
        }
        Err(Refused::Closed) => return,
    };
    let line = head.lines().next().unwrap_or("");
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path != "/metrics" {
        let _ = respond(conn, "404 Not Found", "only /metrics is served here\n");
        return;
    }
    if method != "GET" {
        let _ = respond(conn, "405 Method Not Allowed", "only GET is served here\n");
        return;
    }
    let st = status.lock().map(|s| s.clone()).unwrap_or_default();
    let maps = Maps::open(pin_dir).ok();
    let body = metrics
        .lock()
        .map(|m| m.render(maps.as_ref(), &st))
        .unwrap_or_default();
    let _ = respond(conn, "200 OK", &body);
}

/// Why a request head was not read.
enum Refused {
    TooLarge,
    Late,
    Closed,
}

/// Reads a request head (up to the blank line) of at most [`MAX_REQUEST`] bytes before
/// `deadline`.
fn read_head(mut conn: &TcpStream, deadline: Instant) -> std::result::Result<String, Refused> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return Err(Refused::Late);
        }
        let n = match conn.read(&mut buf) {
            Ok(0) => return Err(Refused::Closed),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Refused::Late);
            }
            Err(_) => return Err(Refused::Closed),
        };
        head.extend_from_slice(&buf[..n]);
        let end = head
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .or_else(|| head.windows(2).position(|w| w == b"\n\n"));
        if let Some(end) = end {
            head.truncate(end);
            return Ok(String::from_utf8_lossy(&head).into_owned());
        }
        if head.len() > MAX_REQUEST {
            return Err(Refused::TooLarge);
        }
    }
}

fn respond(mut conn: &TcpStream, code: &str, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {code}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn server() -> SocketAddr {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dir = std::env::temp_dir().join("lbctl-metrics-server-test-no-pins");
        serve(
            l,
            Arc::new(Mutex::new(Metrics::new())),
            Shared::default(),
            dir,
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap()
    }

    fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(request).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    }

    #[test]
    fn a_slow_client_does_not_hold_the_others() {
        let addr = server();
        // Two clients that send half a request and wait.
        let mut slow: Vec<TcpStream> = (0..2)
            .map(|_| {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(b"GET /metr").unwrap();
                c
            })
            .collect();
        let t = Instant::now();
        let answer = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.contains("lb_marathon_sync_errors"), "{answer}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        slow.clear();
    }

    #[test]
    fn only_the_exact_path_and_bounded_heads() {
        let addr = server();
        for path in ["/metricsX", "/", "/metrics/x"] {
            let a = get(addr, format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes());
            assert!(a.starts_with("HTTP/1.1 404"), "{path}: {a}");
        }
        let a = get(addr, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n");
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
        // Exactly what the server reads before it refuses (1 KiB reads up to over 8 KiB), so
        // that it closes with nothing unread and the answer is not lost to a reset.
        let mut huge = b"GET /".to_vec();
        huge.resize(MAX_REQUEST + 1024, b'a');
        let a = get(addr, &huge);
        assert!(a.starts_with("HTTP/1.1 431"), "{a}");
    }
}
