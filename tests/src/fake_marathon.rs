//! A fake Marathon for the agent's tests: a real HTTP server in the test process serving
//! `GET /v2/apps?embed=apps.tasks`, `GET /v2/apps/{id}` (an app of that document alone) and the
//! `GET /v2/events` stream, which can be told to fail.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, Receiver, Sender},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// How snapshot requests are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ok,
    /// HTTP 500.
    Error500,
    /// The connection is reset without an answer.
    Reset,
    /// 200 with a body that is not JSON.
    Malformed,
    /// The request is accepted and never answered (until the server stops, at most 60 s).
    Stall,
}

struct State {
    doc: String,
    /// `{"app": ...}` of each app of `doc`, by id (made when the document is set).
    alone: Arc<HashMap<String, String>>,
    /// While set, full snapshots serve this document, and only apps fetched alone the current one.
    frozen: Option<String>,
    mode: Mode,
    /// Event streams stay open but get no events.
    stream_stalled: bool,
    /// Each open stream's sender of (event type, app id).
    streams: Vec<Sender<(String, Option<String>)>>,
    /// The `Authorization` header every request must carry.
    auth: Option<String>,
}

pub struct FakeMarathon {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    snapshots: Arc<AtomicU64>,
    apps: Arc<AtomicU64>,
    unauthorized: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl FakeMarathon {
    /// Serves on `listener` (made by the caller, e.g. inside a network namespace).
    pub fn start(listener: TcpListener, doc: &str, auth: Option<String>) -> FakeMarathon {
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State {
            doc: doc.to_string(),
            alone: Arc::new(index(doc)),
            frozen: None,
            mode: Mode::Ok,
            stream_stalled: false,
            streams: Vec::new(),
            auth,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let snapshots = Arc::new(AtomicU64::new(0));
        let apps = Arc::new(AtomicU64::new(0));
        let unauthorized = Arc::new(AtomicU64::new(0));
        let counts = Counts {
            snapshots: snapshots.clone(),
            apps: apps.clone(),
            unauthorized: unauthorized.clone(),
        };
        let (s, st) = (state.clone(), stop.clone());
        let accept = std::thread::spawn(move || accept_loop(listener, s, st, counts));
        FakeMarathon {
            addr,
            state,
            stop,
            snapshots,
            apps,
            unauthorized,
            threads: vec![accept],
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_doc(&self, doc: &str) {
        let alone = Arc::new(index(doc));
        let mut st = self.state.lock().expect("state");
        st.doc = doc.to_string();
        st.alone = alone;
    }

    /// While `frozen`, full snapshots keep serving the document of now, and only an app
    /// fetched alone (`GET /v2/apps/{id}`) shows what `set_doc` sets after.
    pub fn freeze_snapshots(&self, frozen: bool) {
        let mut st = self.state.lock().expect("state");
        st.frozen = frozen.then(|| st.doc.clone());
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().expect("state").mode = mode;
    }

    pub fn stall_streams(&self, stalled: bool) {
        self.state.lock().expect("state").stream_stalled = stalled;
    }

    /// Sends an event of type `kind` to every open event stream (unless they are stalled).
    pub fn event(&self, kind: &str) {
        self.send(kind, None);
    }

    /// Sends an event of type `kind` about app `id` (its data's `appId`).
    pub fn app_event(&self, kind: &str, id: &str) {
        self.send(kind, Some(id.to_string()));
    }

    fn send(&self, kind: &str, app: Option<String>) {
        let mut st = self.state.lock().expect("state");
        if st.stream_stalled {
            return;
        }
        st.streams
            .retain(|s| s.send((kind.to_string(), app.clone())).is_ok());
    }

    /// Snapshot requests answered so far (in any mode).
    pub fn snapshots(&self) -> u64 {
        self.snapshots.load(Ordering::Relaxed)
    }

    /// Requests for one app (`GET /v2/apps/{id}`) answered so far (in any mode).
    pub fn app_fetches(&self) -> u64 {
        self.apps.load(Ordering::Relaxed)
    }

    pub fn unauthorized(&self) -> u64 {
        self.unauthorized.load(Ordering::Relaxed)
    }

    /// Open event streams.
    pub fn streams(&self) -> usize {
        self.state.lock().expect("state").streams.len()
    }
}

impl Drop for FakeMarathon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.state.lock().map(|mut s| s.streams.clear()).ok();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The requests answered, by kind.
#[derive(Clone)]
struct Counts {
    snapshots: Arc<AtomicU64>,
    apps: Arc<AtomicU64>,
    unauthorized: Arc<AtomicU64>,
}

fn accept_loop(l: TcpListener, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>, counts: Counts) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                let (st, sp, c) = (state.clone(), stop.clone(), counts.clone());
                conns.push(std::thread::spawn(move || {
                    let _ = handle(s, &st, &sp, &c);
                }));
            }
            // Waits for the next connection (or 50 ms, to see `stop`) instead of sleeping: a
            // fetch is not kept waiting by the fake (the agent's event path is timed through it).
            Err(_) => wait_readable(&l, 50),
        }
    }
    drop(l);
    for c in conns {
        let _ = c.join();
    }
}

fn handle(
    s: TcpStream,
    state: &Mutex<State>,
    stop: &AtomicBool,
    counts: &Counts,
) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    let mut first = String::new();
    r.read_line(&mut first)?;
    let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut auth = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("authorization")
        {
            auth = Some(v.trim().to_string());
        }
    }
    let alone_path = path
        .strip_prefix("/v2/apps/")
        .map(|rest| format!("/{}", rest.split('?').next().unwrap_or("")));
    let (mode, doc, frozen, want_auth) = {
        let st = state.lock().expect("state");
        // An app alone does not copy the whole document.
        let doc = match &alone_path {
            Some(id) => st.alone.get(id).cloned().unwrap_or_default(),
            None => st.doc.clone(),
        };
        (st.mode, doc, st.frozen.clone(), st.auth.clone())
    };
    if want_auth.is_some() && auth != want_auth {
        counts.unauthorized.fetch_add(1, Ordering::Relaxed);
        return respond(
            &mut w,
            "401 Unauthorized",
            "application/json",
            "{\"message\":\"unauthorized\"}",
        );
    }
    if path.starts_with("/v2/events") {
        return stream(w, state, stop);
    }
    if !path.starts_with("/v2/apps") {
        return respond(&mut w, "404 Not Found", "text/plain", "no such path");
    }
    let doc = match &alone_path {
        Some(id) => {
            counts.apps.fetch_add(1, Ordering::Relaxed);
            match Some(doc).filter(|d| !d.is_empty()) {
                Some(app) => app,
                None if mode == Mode::Ok => {
                    let msg = format!("{{\"message\":\"App '{id}' does not exist\"}}");
                    return respond(&mut w, "404 Not Found", "application/json", &msg);
                }
                None => String::new(),
            }
        }
        None => {
            counts.snapshots.fetch_add(1, Ordering::Relaxed);
            frozen.unwrap_or(doc)
        }
    };
    match mode {
        Mode::Ok => respond(&mut w, "200 OK", "application/json", &doc),
        Mode::Error500 => respond(&mut w, "500 Internal Server Error", "text/plain", "boom"),
        Mode::Malformed => respond(
            &mut w,
            "200 OK",
            "application/json",
            "{\"apps\": [{\"id\": ",
        ),
        Mode::Reset => {
            reset(&w);
            Ok(())
        }
        Mode::Stall => {
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        }
    }
}

/// `{"app": ...}` of each app of the document `doc` (`{"apps": [...]}`), by id: what
/// `GET /v2/apps/{id}` answers.
fn index(doc: &str) -> HashMap<String, String> {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(doc) else {
        return HashMap::new();
    };
    let apps = doc["apps"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    apps.iter()
        .filter_map(|a| {
            let id = a["id"].as_str()?.to_string();
            Some((id, serde_json::json!({ "app": a }).to_string()))
        })
        .collect()
}

fn respond(w: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // One write of the whole answer, as a server that buffers it makes: `write!` on a socket
    // writes each piece alone, and Nagle's algorithm then holds the later ones for an ACK.
    w.write_all(&[head.as_bytes(), body.as_bytes()].concat())?;
    w.flush()
}

/// Waits until `l` has a connection to accept, at most `ms` milliseconds.
fn wait_readable(l: &TcpListener, ms: i32) {
    let mut fd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd that lives across the call, for a listener that is open.
    unsafe {
        libc::poll(&mut fd, 1, ms);
    }
}

/// Makes closing `s` send RST instead of FIN (SO_LINGER 0): no TIME_WAIT is left behind.
pub fn reset(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) with a correctly sized linger struct on an open socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

fn stream(mut w: TcpStream, state: &Mutex<State>, stop: &AtomicBool) -> std::io::Result<()> {
    type Event = (String, Option<String>);
    let (tx, rx): (Sender<Event>, Receiver<Event>) = mpsc::channel();
    let stalled = {
        let mut st = state.lock().expect("state");
        st.streams.push(tx);
        st.stream_stalled
    };
    w.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n",
    )?;
    if !stalled {
        send_event(&mut w, "event_stream_attached", None)?;
    }
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((kind, app)) => send_event(&mut w, &kind, app.as_deref())?,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    Ok(())
}

fn send_event(w: &mut TcpStream, kind: &str, app: Option<&str>) -> std::io::Result<()> {
    let mut data = serde_json::json!({
        "eventType": kind,
        "timestamp": "2026-11-25T00:00:00.000Z",
    });
    if let Some(id) = app {
        data["appId"] = id.into();
    }
    // One write per event (see `respond`).
    w.write_all(format!("event: {kind}\r\ndata: {data}\r\n\r\n").as_bytes())?;
    w.flush()
}
