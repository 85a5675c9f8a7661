//! Deadlines and size limits of what the agent reads from Marathon: every request has a total
//! deadline (name resolution, connect, headers and body), a snapshot body has a largest size,
//! the event stream an idle deadline and a longest line.
use std::{
    io::{self, Read},
    net::{SocketAddr, ToSocketAddrs},
    sync::mpsc,
    time::{Duration, Instant},
};

/// Deadlines and sizes (settings `stream_idle_secs`, `max_snapshot_mib`, `max_event_line_kib`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How long the event stream may stay without a byte before it is reopened.
    pub stream_idle: Duration,
    /// The largest snapshot body read, in bytes.
    pub max_snapshot: u64,
    /// The longest event stream line kept, in bytes.
    pub max_event_line: usize,
}

impl Default for Limits {
    /// 60 s: Marathon sends a keep-alive on a quiet stream well within that. 256 MiB: a
    /// `/v2/apps?embed=apps.tasks` body of 10,000 apps with 5 tasks each is about 100 MB
    /// (some 3 KB per app and 1.2 KB per task). 1 MiB: the agent needs only an event's type,
    /// so a longer line (a `deployment_info` carrying a large plan) is skipped, not kept.
    fn default() -> Limits {
        Limits {
            stream_idle: Duration::from_secs(60),
            max_snapshot: 256 << 20,
            max_event_line: 1 << 20,
        }
    }
}

/// Bytes as "N MiB" or "N KiB", as the settings give them.
pub(crate) fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// True when `e` (or an error it wraps) is a timeout of a socket read, write or connect.
pub(crate) fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(
                io.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            )
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The words of a request that ran out of time.
pub(crate) fn no_answer(timeout: Duration) -> String {
    format!(
        "no answer within {} s (timeout_secs); trying the next URL",
        timeout.as_secs()
    )
}

/// A body reader that fails once `deadline` has passed or more than `max` bytes came. (The HTTP
/// client also bounds each socket read by the time left, so that no read outlasts the deadline
/// by more than the read itself.)
struct Bounded<R> {
    inner: R,
    deadline: Instant,
    max: u64,
    read: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if Instant::now() >= self.deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.max {
            return Err(io::Error::new(io::ErrorKind::FileTooLarge, "too large"));
        }
        Ok(n)
    }
}

/// Reads a snapshot body of at most `max` bytes before `deadline`; `length` is the announced
/// Content-Length, if any. The error says which limit was reached, naming its setting.
pub(crate) fn read_body(
    body: impl Read,
    length: Option<u64>,
    deadline: Instant,
    timeout: Duration,
    max: u64,
) -> Result<String, String> {
    let too_large = |n: String| {
        format!(
            "the snapshot is {n} bytes, over the limit max_snapshot_mib = {}: refused, the last \
             good state is kept",
            size(max)
        )
    };
    if let Some(n) = length
        && n > max
    {
        return Err(too_large(n.to_string()));
    }
    let mut reader = Bounded {
        inner: body,
        deadline,
        max,
        read: 0,
    };
    let mut out = Vec::with_capacity(length.unwrap_or(0).min(max) as usize);
    match reader.read_to_end(&mut out) {
        Ok(_) => String::from_utf8(out).map_err(|e| format!("the snapshot is not UTF-8: {e}")),
        Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
            Err(too_large(format!("more than {}", max)))
        }
        Err(e) if is_timeout(&e) => Err(no_answer(timeout)),
        Err(e) => Err(format!("reading the body: {e}")),
    }
}

/// Name resolution with a deadline: the system resolver runs on a thread of its own, and a
/// lookup that does not finish in time fails (its thread ends when the lookup does).
pub(crate) struct DeadlineResolver(pub Duration);

impl ureq::Resolver for DeadlineResolver {
    fn resolve(&self, netloc: &str) -> io::Result<Vec<SocketAddr>> {
        let (tx, rx) = mpsc::channel();
        let name = netloc.to_string();
        std::thread::spawn(move || {
            let _ = tx.send(name.to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
        });
        match rx.recv_timeout(self.0) {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("resolving {netloc} took longer than {} s", self.0.as_secs()),
            )),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A reader that gives one byte per read, waiting `gap` before each.
    struct Drip(Duration);

    impl Read for Drip {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            std::thread::sleep(self.0);
            buf[0] = b' ';
            Ok(1)
        }
    }

    #[test]
    fn a_drip_ends_at_the_deadline() {
        let t = Instant::now();
        let e = read_body(
            Drip(Duration::from_millis(20)),
            None,
            t + Duration::from_millis(300),
            Duration::from_secs(1),
            1 << 20,
        )
        .unwrap_err();
        assert!(e.contains("no answer within 1 s (timeout_secs)"), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn sizes_over_the_limit_are_refused() {
        let far = Instant::now() + Duration::from_secs(60);
        let body = vec![b'x'; 3000];
        let e = read_body(&body[..], None, far, Duration::from_secs(1), 2048).unwrap_err();
        assert!(e.contains("over the limit max_snapshot_mib = 2 KiB"), "{e}");
        // An announced length over the limit is refused before anything is read.
        let e = read_body(
            io::empty(),
            Some(1 << 30),
            far,
            Duration::from_secs(1),
            1 << 20,
        )
        .unwrap_err();
        assert!(e.contains("1073741824 bytes") && e.contains("1 MiB"), "{e}");
        let ok = read_body(&body[..2048], Some(2048), far, Duration::from_secs(1), 2048);
        assert_eq!(ok.unwrap().len(), 2048);
    }
}
