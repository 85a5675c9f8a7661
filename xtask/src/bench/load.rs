//! The one load generator every contender is measured with, and the backends' server.
//!
//! The server (one thread per backend, epoll) answers every line it reads with its backend's
//! name. The generator runs on threads inside the client's namespace: `connections` makes a new
//! TCP connection per request (closed with RST, so no TIME_WAIT limits the rate), `requests`
//! sends request after request on kept-alive connections. Both stop at a count or a duration,
//! whichever comes first.
use anyhow::{Context as _, Result};
use serde::Serialize;
use std::{
    collections::{BTreeMap, HashMap},
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// A server in a backend's namespace, stopped and joined on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on every address of `addrs` in namespace `ns`.
    pub fn start(ns: &str, addrs: &[SocketAddrV4], name: &str) -> Result<Server> {
        let list = addrs.to_vec();
        let listeners = lbtest::in_netns(ns, move || {
            list.iter()
                .map(TcpListener::bind)
                .collect::<std::io::Result<Vec<_>>>()
        })
        .with_context(|| format!("binding {addrs:?} in {ns}"))?;
        for l in &listeners {
            l.set_nonblocking(true)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (s, reply) = (stop.clone(), format!("{name}\n").into_bytes());
        let thread = std::thread::spawn(move || {
            if let Err(e) = serve(&listeners, &reply, &s) {
                eprintln!("bench: server: {e}");
            }
        });
        Ok(Server {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn epoll_add(ep: RawFd, fd: RawFd) -> std::io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: epoll_ctl(2) on descriptors we own, with a valid event.
    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn serve(listeners: &[TcpListener], reply: &[u8], stop: &AtomicBool) -> std::io::Result<()> {
    // SAFETY: epoll_create1(2); the descriptor is closed below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let by_fd: HashMap<RawFd, &TcpListener> =
        listeners.iter().map(|l| (l.as_raw_fd(), l)).collect();
    for fd in by_fd.keys() {
        epoll_add(ep, *fd)?;
    }
    let mut conns: HashMap<RawFd, TcpStream> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: the buffer holds `events.len()` events.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 100) };
        for ev in events.iter().take(n.max(0) as usize) {
            let fd = ev.u64 as RawFd;
            if let Some(listener) = by_fd.get(&fd) {
                for _ in 0..1024 {
                    match listener.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(true)?;
                            s.set_nodelay(true)?;
                            epoll_add(ep, s.as_raw_fd())?;
                            conns.insert(s.as_raw_fd(), s);
                        }
                        Err(_) => break,
                    }
                }
                continue;
            }
            let Some(s) = conns.get_mut(&fd) else {
                continue;
            };
            let close = match s.read(&mut buf) {
                Ok(0) => true,
                Ok(k) => {
                    let lines = buf[..k].iter().filter(|b| **b == b'\n').count();
                    (0..lines).any(|_| s.write_all(reply).is_err())
                }
                Err(e) => e.kind() != ErrorKind::WouldBlock,
            };
            if close {
                // Closing the descriptor removes it from the epoll set.
                conns.remove(&fd);
            }
        }
    }
    // SAFETY: closing the epoll descriptor created above.
    unsafe { libc::close(ep) };
    Ok(())
}

/// What to send, from how many threads, for how long at most.
#[derive(Clone, Debug)]
pub struct Load {
    /// Requests go to these in turn.
    pub targets: Vec<SocketAddrV4>,
    pub threads: usize,
    pub duration: Duration,
    /// At most this many requests per thread.
    pub max_per_thread: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub secs: f64,
    /// Completed operations per second.
    pub rate: f64,
    /// Per operation, in µs.
    #[serde(skip)]
    pub latency_us: Vec<u32>,
    /// Replies by the name of the backend that sent them.
    pub answered_by: BTreeMap<String, u64>,
}

impl Outcome {
    fn merge(&mut self, o: Outcome) {
        self.ops += o.ops;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.latency_us.extend(o.latency_us);
        for (k, v) in o.answered_by {
            *self.answered_by.entry(k).or_default() += v;
        }
    }

    fn done(&mut self, started: Instant, answered_by: String) {
        self.ops += 1;
        let us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
        self.latency_us.push(us);
        *self.answered_by.entry(answered_by).or_default() += 1;
    }

    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

const TIMEOUT: Duration = Duration::from_secs(2);
/// A thread gives up after this many errors.
const MAX_ERRORS: u64 = 200;

/// A new connection per request.
pub fn connections(ns: &str, load: &Load) -> Outcome {
    drive(ns, load, |i, load, start| {
        let mut out = Outcome::default();
        let mut n = 0;
        while more(load, start, n, &out) {
            let target = load.targets[(i + n as usize * load.threads) % load.targets.len()];
            n += 1;
            let t = Instant::now();
            let mut s = match TcpStream::connect_timeout(&SocketAddr::V4(target), TIMEOUT) {
                Ok(s) => s,
                Err(e) => {
                    out.error(format!("connect {target}: {e}"));
                    continue;
                }
            };
            match exchange(&mut s) {
                Ok(name) => out.done(t, name),
                Err(e) => out.error(format!("request to {target}: {e}")),
            }
            // Closing sends RST and leaves no TIME_WAIT: the client's ports are reusable at once.
            lbtest::fake_marathon::reset(&s);
        }
        out
    })
}

/// Requests on one kept-alive connection per thread (reopened after an error).
pub fn requests(ns: &str, load: &Load) -> Outcome {
    drive(ns, load, |i, load, start| {
        let mut out = Outcome::default();
        let target = load.targets[i % load.targets.len()];
        let mut conn: Option<TcpStream> = None;
        let mut n = 0;
        while more(load, start, n, &out) {
            n += 1;
            let s = match conn.as_mut() {
                Some(s) => s,
                None => match TcpStream::connect_timeout(&SocketAddr::V4(target), TIMEOUT) {
                    Ok(s) => conn.insert(s),
                    Err(e) => {
                        out.error(format!("connect {target}: {e}"));
                        continue;
                    }
                },
            };
            let t = Instant::now();
            match exchange(s) {
                Ok(name) => out.done(t, name),
                Err(e) => {
                    out.error(format!("request to {target}: {e}"));
                    conn = None;
                }
            }
        }
        out
    })
}

/// Whether a thread goes on: within the duration, the count, and the error budget.
fn more(load: &Load, start: Instant, n: u64, out: &Outcome) -> bool {
    start.elapsed() < load.duration && n < load.max_per_thread && out.errors < MAX_ERRORS
}

/// Runs `worker(thread index, load, start)` on `load.threads` threads inside namespace `ns` and
/// merges what they did.
fn drive(ns: &str, load: &Load, worker: fn(usize, &Load, Instant) -> Outcome) -> Outcome {
    let load = load.clone();
    lbtest::in_netns(ns, move || {
        let start = Instant::now();
        let mut total = Outcome::default();
        std::thread::scope(|sc| {
            let handles: Vec<_> = (0..load.threads)
                .map(|i| {
                    let load = &load;
                    sc.spawn(move || worker(i, load, start))
                })
                .collect();
            for h in handles {
                if let Ok(o) = h.join() {
                    total.merge(o);
                }
            }
        });
        total.secs = start.elapsed().as_secs_f64();
        total.rate = total.ops as f64 / total.secs;
        total
    })
}

/// Sends one request line and reads the one-line answer: the backend's name.
fn exchange(s: &mut TcpStream) -> std::io::Result<String> {
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(b"x\n")?;
    let mut buf = [0u8; 64];
    let mut len = 0;
    loop {
        let k = s.read(&mut buf[len..])?;
        if k == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "closed without an answer",
            ));
        }
        len += k;
        if let Some(end) = buf[..len].iter().position(|b| *b == b'\n') {
            return Ok(String::from_utf8_lossy(&buf[..end]).into_owned());
        }
        if len == buf.len() {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                "answer too long",
            ));
        }
    }
}
