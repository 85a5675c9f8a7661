//! A fake Marathon for the agent's tests: a real HTTP server in the test process serving
//! `GET /v2/apps?embed=apps.tasks` and the `GET /v2/events` stream, which can be told to fail.
use std::{
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
    mode: Mode,
    /// Event streams stay open but get no events.
    stream_stalled: bool,
    streams: Vec<Sender<String>>,
    /// The `Authorization` header every request must carry.
    auth: Option<String>,
}

pub struct FakeMarathon {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    snapshots: Arc<AtomicU64>,
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
            mode: Mode::Ok,
            stream_stalled: false,
            streams: Vec::new(),
            auth,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let snapshots = Arc::new(AtomicU64::new(0));
        let unauthorized = Arc::new(AtomicU64::new(0));
        let (s, st, n, u) = (
            state.clone(),
            stop.clone(),
            snapshots.clone(),
            unauthorized.clone(),
        );
        let accept = std::thread::spawn(move || accept_loop(listener, s, st, n, u));
        FakeMarathon {
            addr,
            state,
            stop,
            snapshots,
            unauthorized,
            threads: vec![accept],
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_doc(&self, doc: &str) {
        self.state.lock().expect("state").doc = doc.to_string();
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().expect("state").mode = mode;
    }

    pub fn stall_streams(&self, stalled: bool) {
        self.state.lock().expect("state").stream_stalled = stalled;
    }

    /// Sends an event of type `kind` to every open event stream (unless they are stalled).
    pub fn event(&self, kind: &str) {
        let mut st = self.state.lock().expect("state");
        if st.stream_stalled {
            return;
        }
        st.streams.retain(|s| s.send(kind.to_string()).is_ok());
    }

    /// Snapshot requests answered so far (in any mode).
    pub fn snapshots(&self) -> u64 {
        self.snapshots.load(Ordering::Relaxed)
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

fn accept_loop(
    l: TcpListener,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    snapshots: Arc<AtomicU64>,
    unauthorized: Arc<AtomicU64>,
) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                let (st, sp, n, u) = (
                    state.clone(),
                    stop.clone(),
                    snapshots.clone(),
                    unauthorized.clone(),
                );
                conns.push(std::thread::spawn(move || {
                    let _ = handle(s, &st, &sp, &n, &u);
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

fn handle(
    s: TcpStream,
    state: &Mutex<State>,
    stop: &AtomicBool,
    snapshots: &AtomicU64,
    unauthorized: &AtomicU64,
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
    let (mode, doc, want_auth) = {
        let st = state.lock().expect("state");
        (st.mode, st.doc.clone(), st.auth.clone())
    };
    if want_auth.is_some() && auth != want_auth {
        unauthorized.fetch_add(1, Ordering::Relaxed);
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
    snapshots.fetch_add(1, Ordering::Relaxed);
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

fn respond(w: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
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
    let (tx, rx): (Sender<String>, Receiver<String>) = mpsc::channel();
    let stalled = {
        let mut st = state.lock().expect("state");
        st.streams.push(tx);
        st.stream_stalled
    };
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    )?;
    if !stalled {
        send_event(&mut w, "event_stream_attached")?;
    }
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(kind) => send_event(&mut w, &kind)?,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    Ok(())
}

fn send_event(w: &mut TcpStream, kind: &str) -> std::io::Result<()> {
    write!(
        w,
        "event: {kind}\r\ndata: {{\"eventType\":\"{kind}\",\"timestamp\":\"2026-11-25T00:00:00.000Z\"}}\r\n\r\n"
    )?;
    w.flush()
}
