//! A Marathon that misbehaves on the wire, for the agent's deadline and size-limit tests: it
//! answers snapshot requests (`/v2/apps...`) well, or sends headers and then nothing, or drips
//! its body one byte at a time, or sends a body without end; its event streams (`/v2/events`)
//! stay silent after attaching, or carry one huge line. It counts the requests and streams.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// How snapshot requests are answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Snap {
    /// 200 with this document.
    Ok(String),
    /// 200 and a Content-Length, then nothing (until the fake stops, at most 120 s).
    HangAfterHeaders,
    /// 200 with the document's Content-Length, then its bytes one every `gap`.
    Drip { doc: String, gap: Duration },
    /// 200 without a Content-Length, then `bytes` of JSON whitespace (until the reader goes).
    Huge { bytes: u64 },
}

/// What event streams carry after `event_stream_attached`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Events {
    /// Nothing at all: no events, no keep-alives.
    Silent,
    /// One `deployment_info` event whose `data:` line is `bytes` long, once per stream, then
    /// nothing.
    HugeLine { bytes: u64 },
}

struct State {
    snap: Snap,
    events: Events,
    /// Each open stream sends one `deployment_success` event whenever this grows.
    pokes: u64,
}

/// The misbehaving server; stops (and closes every connection) when dropped.
pub struct Misbehaving {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    snapshots: Arc<AtomicU64>,
    streams: Arc<AtomicU64>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    snapshots: Arc<AtomicU64>,
    streams: Arc<AtomicU64>,
}

impl Misbehaving {
    /// Serves on `listener` (made by the caller, e.g. inside a network namespace).
    pub fn start(listener: TcpListener, snap: Snap, events: Events) -> Misbehaving {
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let shared = Shared {
            state: Arc::new(Mutex::new(State {
                snap,
                events,
                pokes: 0,
            })),
            stop: Arc::new(AtomicBool::new(false)),
            snapshots: Arc::new(AtomicU64::new(0)),
            streams: Arc::new(AtomicU64::new(0)),
        };
        let s = shared.clone();
        let accept = std::thread::spawn(move || accept_loop(listener, s));
        Misbehaving {
            addr,
            state: shared.state,
            stop: shared.stop,
            snapshots: shared.snapshots,
            streams: shared.streams,
            accept: Some(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_snap(&self, snap: Snap) {
        self.state.lock().expect("state").snap = snap;
    }

    pub fn set_events(&self, events: Events) {
        self.state.lock().expect("state").events = events;
    }

    /// Sends a small `deployment_success` event on every open stream.
    pub fn poke(&self) {
        self.state.lock().expect("state").pokes += 1;
    }

    /// Snapshot requests received so far.
    pub fn snapshots(&self) -> u64 {
        self.snapshots.load(Ordering::Relaxed)
    }

    /// Event streams opened so far.
    pub fn streams(&self) -> u64 {
        self.streams.load(Ordering::Relaxed)
    }
}

impl Drop for Misbehaving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(l: TcpListener, shared: Shared) {
    let mut conns = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                let sh = shared.clone();
                conns.push(std::thread::spawn(move || {
                    let _ = handle(s, &sh);
                }));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    drop(l);
    for c in conns {
        let _ = c.join();
    }
}

/// Waits until the fake stops, at most `limit`.
fn idle(stop: &AtomicBool, limit: Duration) {
    let end = Instant::now() + limit;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn handle(s: TcpStream, sh: &Shared) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    let mut first = String::new();
    r.read_line(&mut first)?;
    let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    if path.starts_with("/v2/events") {
        sh.streams.fetch_add(1, Ordering::Relaxed);
        return stream(w, sh);
    }
    sh.snapshots.fetch_add(1, Ordering::Relaxed);
    let snap = sh.state.lock().expect("state").snap.clone();
    match snap {
        Snap::Ok(doc) => {
            write!(w, "{}{doc}", head(Some(doc.len())))?;
            w.flush()
        }
        Snap::HangAfterHeaders => {
            write!(w, "{}", head(Some(100)))?;
            w.flush()?;
            idle(&sh.stop, Duration::from_secs(120));
            Ok(())
        }
        Snap::Drip { doc, gap } => {
            write!(w, "{}", head(Some(doc.len())))?;
            w.flush()?;
            for b in doc.bytes() {
                if sh.stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(gap);
                w.write_all(&[b])?;
                w.flush()?;
            }
            Ok(())
        }
        Snap::Huge { bytes } => {
            write!(w, "{}{{\"apps\": [", head(None))?;
            send_filler(&mut w, bytes, b' ', &sh.stop)
        }
    }
}

fn head(length: Option<usize>) -> String {
    let length = length
        .map(|n| format!("Content-Length: {n}\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{length}Connection: close\r\n\r\n"
    )
}

/// Writes `bytes` of `fill` in 64 KiB pieces; stops early when the reader goes or the fake stops.
fn send_filler(w: &mut TcpStream, bytes: u64, fill: u8, stop: &AtomicBool) -> std::io::Result<()> {
    let piece = vec![fill; 64 << 10];
    let mut left = bytes;
    while left > 0 && !stop.load(Ordering::Relaxed) {
        let n = left.min(piece.len() as u64) as usize;
        w.write_all(&piece[..n])?;
        left -= n as u64;
    }
    w.flush()
}

fn stream(mut w: TcpStream, sh: &Shared) -> std::io::Result<()> {
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n\
         event: event_stream_attached\r\ndata: {{\"eventType\":\"event_stream_attached\"}}\r\n\r\n"
    )?;
    w.flush()?;
    let mut huge_sent = false;
    let mut pokes = sh.state.lock().expect("state").pokes;
    let end = Instant::now() + Duration::from_secs(120);
    while !sh.stop.load(Ordering::Relaxed) && Instant::now() < end {
        let (events, now_pokes) = {
            let st = sh.state.lock().expect("state");
            (st.events, st.pokes)
        };
        if now_pokes > pokes {
            pokes = now_pokes;
            write!(
                w,
                "event: deployment_success\r\ndata: {{\"eventType\":\"deployment_success\"}}\r\n\r\n"
            )?;
            w.flush()?;
        }
        if let Events::HugeLine { bytes } = events
            && !huge_sent
        {
            huge_sent = true;
            write!(w, "event: deployment_info\r\ndata: ")?;
            send_filler(&mut w, bytes, b'x', &sh.stop)?;
            write!(w, "\r\n\r\n")?;
            w.flush()?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
