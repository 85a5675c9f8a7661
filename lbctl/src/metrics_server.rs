//! The HTTP side of the metrics: `GET /metrics` served by hyper as tasks of the agent's runtime,
//! to several clients at once, with a deadline and a size limit on each request head, so that a
//! slow or hostile client holds only its own connection.
use crate::{
    dataplane::Maps,
    error::{Error, Result},
    metrics::Metrics,
    status::Shared,
};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONNECTION, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::{
    convert::Infallible,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{runtime::Handle, sync::Semaphore};
use tokio_util::sync::CancellationToken;

/// Clients served at once; more are answered 503 at once.
pub const MAX_CONNECTIONS: usize = 32;
/// The time a client has to send its whole request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// The largest request head read (hyper's smallest read buffer).
pub const MAX_REQUEST: usize = 8 << 10;
/// The time a connection may take in all, its answer included.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(15);

/// Binds the metrics listener on `addr`: the agent does so before it touches the kernel.
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| Error::io(format!("binding the metrics listener {addr}"), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("metrics listener", e))?;
    Ok(listener)
}

/// What a scrape reads: the families, the agent's status and the pinned maps.
struct Scrape {
    metrics: Arc<Mutex<Metrics>>,
    status: Shared,
    pin_dir: PathBuf,
}

/// Serves `GET /metrics` on `listener` (from [`bind`]) as tasks of `runtime` until `stop` is
/// cancelled: one accepting, one per client (at most [`MAX_CONNECTIONS`]; more get 503).
/// Returns the address it listens on.
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Mutex<Metrics>>,
    status: Shared,
    pin_dir: PathBuf,
    runtime: &Handle,
    stop: CancellationToken,
) -> Result<SocketAddr> {
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io("metrics listener", e))?;
    let listener = {
        let _guard = runtime.enter();
        tokio::net::TcpListener::from_std(listener).map_err(|e| Error::io("metrics listener", e))?
    };
    let scrape = Arc::new(Scrape {
        metrics,
        status,
        pin_dir,
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    runtime.spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = stop.cancelled() => break,
                c = listener.accept() => match c {
                    Ok((conn, _)) => conn,
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics accept");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let permit = slots.clone().try_acquire_owned().ok();
            let scrape = scrape.clone();
            tokio::spawn(async move {
                let busy = permit.is_none();
                let service = service_fn(move |req| answer(req, scrape.clone(), busy));
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(REQUEST_DEADLINE)
                    .max_buf_size(MAX_REQUEST)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(conn), service);
                let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
                drop(permit);
            });
        }
    });
    Ok(bound)
}

/// The answer to one request: exactly `GET /metrics` (any query) is served.
async fn answer(
    req: Request<Incoming>,
    scrape: Arc<Scrape>,
    busy: bool,
) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    if busy {
        return Ok(respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many clients\n".into(),
        ));
    }
    if req.uri().path() != "/metrics" {
        return Ok(respond(
            StatusCode::NOT_FOUND,
            "only /metrics is served here\n".into(),
        ));
    }
    if req.method() != Method::GET {
        return Ok(respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served here\n".into(),
        ));
    }
    // The kernel's maps are read off the async threads.
    let body = tokio::task::spawn_blocking(move || {
        let st = scrape.status.lock().map(|s| s.clone()).unwrap_or_default();
        let maps = Maps::open(&scrape.pin_dir).ok();
        scrape
            .metrics
            .lock()
            .map(|m| m.render(maps.as_ref(), &st))
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default();
    Ok(respond(StatusCode::OK, body))
}

fn respond(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    h.insert(CONNECTION, hyper::header::HeaderValue::from_static("close"));
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::{
        io::{Read, Write},
        net::TcpStream,
        time::Instant,
    };

    /// A server on a runtime of its own, kept for the test process's life.
    fn server() -> SocketAddr {
        static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        let rt = RT.get_or_init(|| tokio::runtime::Runtime::new().unwrap());
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dir = std::env::temp_dir().join("lbctl-metrics-server-test-no-pins");
        serve(
            l,
            Arc::new(Mutex::new(Metrics::new())),
            Shared::default(),
            dir,
            rt.handle(),
            CancellationToken::new(),
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
