//! Deadlines and size limits of what the agent reads from Marathon: every request has a total
//! deadline (name resolution, connect, headers and body), a snapshot body has a largest size,
//! the event stream an idle deadline and a longest line.
use std::{
    io,
    time::{Duration, Instant},
};
use tokio::io::{AsyncRead, AsyncReadExt as _};

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

/// Reads a snapshot body of at most `max` bytes before `deadline`; `length` is the announced
/// Content-Length, if any. The error says which limit was reached, naming its setting. Memory
/// stays within `max` (plus one read's buffer) whatever the peer sends.
pub(crate) async fn read_body(
    body: impl AsyncRead + Unpin,
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
    let mut out = Vec::with_capacity(length.unwrap_or(0).min(max) as usize);
    // One byte past the limit tells a body of exactly `max` bytes from a larger one.
    let mut limited = body.take(max.saturating_add(1));
    let read = tokio::time::timeout_at(deadline.into(), limited.read_to_end(&mut out)).await;
    match read {
        Err(_elapsed) => Err(no_answer(timeout)),
        Ok(Ok(_)) if out.len() as u64 > max => Err(too_large(format!("more than {max}"))),
        Ok(Ok(_)) => String::from_utf8(out).map_err(|e| format!("the snapshot is not UTF-8: {e}")),
        Ok(Err(e)) if is_timeout(&e) => Err(no_answer(timeout)),
        Ok(Err(e)) => Err(format!("reading the body: {e}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    #[tokio::test]
    async fn a_drip_ends_at_the_deadline() {
        // A peer that sends one byte every 20 ms, without end.
        let (mut tx, rx) = tokio::io::duplex(64);
        tokio::spawn(async move {
            while tx.write_all(b" ").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let t = Instant::now();
        let e = read_body(
            rx,
            None,
            t + Duration::from_millis(300),
            Duration::from_secs(1),
            1 << 20,
        )
        .await
        .unwrap_err();
        assert!(e.contains("no answer within 1 s (timeout_secs)"), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn sizes_over_the_limit_are_refused() {
        let far = Instant::now() + Duration::from_secs(60);
        let body = vec![b'x'; 3000];
        let e = read_body(&body[..], None, far, Duration::from_secs(1), 2048)
            .await
            .unwrap_err();
        assert!(e.contains("over the limit max_snapshot_mib = 2 KiB"), "{e}");
        // An announced length over the limit is refused before anything is read.
        let e = read_body(
            tokio::io::empty(),
            Some(1 << 30),
            far,
            Duration::from_secs(1),
            1 << 20,
        )
        .await
        .unwrap_err();
        assert!(e.contains("1073741824 bytes") && e.contains("1 MiB"), "{e}");
        let ok = read_body(&body[..2048], Some(2048), far, Duration::from_secs(1), 2048).await;
        assert_eq!(ok.unwrap().len(), 2048);
        let e = read_body(&[0xff, 0xfe][..], None, far, Duration::from_secs(1), 2048)
            .await
            .unwrap_err();
        assert!(e.contains("not UTF-8"), "{e}");
    }
}
