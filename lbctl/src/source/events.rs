//! Marathon's event stream (`GET /v2/events`): server-sent events, and which of them say that
//! apps or tasks may have changed.
use super::limits::{Limits, is_timeout, size};
use crate::error::{Error, Result};
use std::{io, time::Duration};
use tokio::io::{AsyncBufRead as _, AsyncBufReadExt as _, AsyncRead, BufReader};

/// The bytes of an event stream (an HTTP body, or anything else that reads).
pub type Body = Box<dyn AsyncRead + Send + Unpin>;

/// Events that say Marathon's apps or tasks may have changed (Marathon's own list, minus the
/// ones about subscriptions and pods).
pub const RELEVANT_EVENTS: [&str; 14] = [
    "status_update_event",
    "instance_changed_event",
    "unknown_instance_terminated_event",
    "instance_health_changed_event",
    "health_status_changed_event",
    "app_terminated_event",
    "api_post_event",
    "deployment_success",
    "deployment_failed",
    "deployment_info",
    "deployment_step_success",
    "deployment_step_failure",
    "group_change_success",
    "event_stream_attached",
];

/// Events about one app's tasks or instances: they change no app but the one they name, which
/// can be fetched alone (`GET /v2/apps/{id}`) instead of every app.
pub const APP_EVENTS: [&str; 5] = [
    "status_update_event",
    "instance_changed_event",
    "instance_health_changed_event",
    "health_status_changed_event",
    "unknown_instance_terminated_event",
];

/// An event of the stream: its type, and the app it is about when it is one of [`APP_EVENTS`]
/// and its data names one (`appId`, or `runSpecId` in instance events).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The event's type (`event:` field, or the data's `eventType`; `message` when neither).
    pub kind: String,
    /// The app it is about, as given (not checked here).
    pub app: Option<String>,
}

impl Event {
    /// True for an event that may change apps or tasks.
    pub fn relevant(&self) -> bool {
        RELEVANT_EVENTS.contains(&self.kind.as_str()) || self.kind == OVERSIZED_EVENT
    }

    /// The app this event alone is about, if one: only that app may have changed.
    pub fn about_app(&self) -> Option<&str> {
        if APP_EVENTS.contains(&self.kind.as_str()) {
            self.app.as_deref()
        } else {
            None
        }
    }
}

/// The type [`EventStream::next_event`] gives an event whose type is unknown because a line of
/// it was over the limit: it may have changed anything, so it counts as relevant.
pub const OVERSIZED_EVENT: &str = "(an event with a line over max_event_line_kib)";

/// A server-sent event stream, read as bytes: lines are cut at `\n` and kept up to a longest
/// length, and every read waits at most the idle deadline.
pub struct EventStream {
    reader: BufReader<Body>,
    /// Where the stream comes from (a redacted URL), for logs and errors.
    pub source: String,
    /// The longest line kept, in bytes: the rest of a longer one is read and dropped.
    max_line: usize,
    /// How long one read may wait for a byte.
    idle: Duration,
    line: Vec<u8>,
}

/// The only fields read from a `data:` line's JSON (the rest is skipped, not built).
#[derive(serde::Deserialize)]
struct Typed {
    #[serde(rename = "eventType")]
    event_type: Option<String>,
    #[serde(rename = "appId")]
    app_id: Option<String>,
    #[serde(rename = "runSpecId")]
    run_spec_id: Option<String>,
}

impl EventStream {
    /// Reads events from `reader`; `source` names it in errors. The default limits apply.
    pub fn new(reader: Body, source: String) -> EventStream {
        let d = Limits::default();
        EventStream {
            reader: BufReader::new(reader),
            source,
            max_line: d.max_event_line,
            idle: d.stream_idle,
            line: Vec::new(),
        }
    }

    /// Keeps lines up to `max_line` bytes; a read that waits longer than `idle` for a byte ends
    /// the stream (an error naming `stream_idle_secs`).
    pub fn limited(self, max_line: usize, idle: Duration) -> EventStream {
        EventStream {
            max_line,
            idle,
            ..self
        }
    }

    /// Reads the next line into `self.line` (without its end), keeping at most `max_line`
    /// bytes. Ok(None) at the end of the stream; Ok(Some(true)) when the line was longer (and
    /// `self.line` is then empty).
    async fn read_line(&mut self) -> io::Result<Option<bool>> {
        self.line.clear();
        let (mut over, mut any) = (false, false);
        loop {
            let buf = match tokio::time::timeout(self.idle, self.reader.fill_buf()).await {
                Ok(read) => read?,
                Err(_elapsed) => return Err(io::Error::from(io::ErrorKind::TimedOut)),
            };
            if buf.is_empty() {
                return Ok(any.then_some(over));
            }
            any = true;
            let (chunk, end) = match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (&buf[..i], i + 1),
                None => (buf, buf.len()),
            };
            if !over && self.line.len() + chunk.len() <= self.max_line {
                self.line.extend_from_slice(chunk);
            } else if !over {
                over = true;
                self.line = Vec::new();
            }
            let done = end > chunk.len();
            std::pin::Pin::new(&mut self.reader).consume(end);
            if done {
                if self.line.last() == Some(&b'\r') {
                    self.line.pop();
                }
                return Ok(Some(over));
            }
        }
    }

    /// The next event (its type from the `event:` field, else the data's `eventType`;
    /// `message` when neither). Err when the stream ends, breaks, or stays silent longer than
    /// the idle timeout.
    pub async fn next_event(&mut self) -> Result<Event> {
        let mut event: Option<String> = None;
        let mut app: Option<String> = None;
        let (mut data, mut oversized) = (false, false);
        loop {
            let over = match self.read_line().await {
                Ok(Some(over)) => over,
                Ok(None) => {
                    return Err(Error::Marathon(format!(
                        "event stream from {} closed",
                        self.source
                    )));
                }
                Err(e) if is_timeout(&e) => {
                    return Err(Error::Marathon(format!(
                        "event stream from {}: no byte within {} s (stream_idle_secs)",
                        self.source,
                        self.idle.as_secs()
                    )));
                }
                Err(e) => {
                    return Err(Error::Marathon(format!(
                        "event stream from {}: {e}",
                        self.source
                    )));
                }
            };
            if over {
                // Refused input is an error in the log, though nothing is lost here: the
                // line's event still triggers a snapshot.
                tracing::error!(
                    source = %self.source,
                    "event stream line over the limit max_event_line_kib = {}: skipped (its \
                     event still triggers a snapshot)",
                    size(self.max_line as u64)
                );
                oversized = true;
                continue;
            }
            let line = String::from_utf8_lossy(&self.line);
            let l = line.as_ref();
            if l.is_empty() {
                if event.is_some() || data || oversized {
                    let kind = event.unwrap_or_else(|| {
                        if oversized {
                            OVERSIZED_EVENT
                        } else {
                            "message"
                        }
                        .into()
                    });
                    // A line of it was lost: it may be about more than the app it names.
                    let app = app.filter(|_| !oversized);
                    return Ok(Event { kind, app });
                }
                continue;
            }
            if l.starts_with(':') {
                continue; // a comment (keep-alive)
            }
            let (field, value) = l.split_once(':').unwrap_or((l, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = Some(value.to_string()),
                "data" => {
                    data = true;
                    if let Ok(typed) = serde_json::from_str::<Typed>(value) {
                        // Some proxies and old Marathon versions put only `data:` lines; the
                        // type is then in the JSON's `eventType`.
                        if event.is_none() {
                            event = typed.event_type;
                        }
                        app = typed.app_id.or(typed.run_spec_id);
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn stream(text: impl Into<Vec<u8>>) -> EventStream {
        EventStream::new(Box::new(std::io::Cursor::new(text.into())), "test".into())
    }

    /// A stream whose peer goes silent ends after the idle deadline, naming it.
    #[tokio::test]
    async fn a_silent_stream_ends_at_its_idle_deadline() {
        let (mut tx, rx) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut tx, b"event: deployment_info\n\n")
            .await
            .unwrap();
        let mut s =
            EventStream::new(Box::new(rx), "test".into()).limited(1024, Duration::from_secs(1));
        assert_eq!(s.next_event().await.unwrap().kind, "deployment_info");
        let t = std::time::Instant::now();
        let e = s.next_event().await.unwrap_err().to_string();
        assert!(e.contains("no byte within 1 s (stream_idle_secs)"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        drop(tx);
    }

    #[tokio::test]
    async fn parses_sse() {
        let text = "event: event_stream_attached\ndata: {\"x\":1}\n\n: keepalive\n\ndata: {\"eventType\":\"status_update_event\"}\n\nevent: deployment_info\r\ndata: {}\r\n\r\n";
        let mut s = stream(text);
        assert_eq!(s.next_event().await.unwrap().kind, "event_stream_attached");
        assert_eq!(s.next_event().await.unwrap().kind, "status_update_event");
        assert_eq!(s.next_event().await.unwrap().kind, "deployment_info");
        assert!(s.next_event().await.is_err());
    }

    /// A line over the limit is skipped without being kept, and its event still counts.
    #[tokio::test]
    async fn a_long_line_is_skipped() {
        let big = "x".repeat(5000);
        let text = format!(
            "event: deployment_info\ndata: {big}\n\ndata: {{\"eventType\":\"{big}\"}}\n\nevent: app_terminated_event\ndata: {{}}\n\n: {big}"
        );
        let mut s = stream(text).limited(1024, Duration::from_secs(1));
        assert_eq!(s.next_event().await.unwrap().kind, "deployment_info");
        assert_eq!(s.next_event().await.unwrap().kind, OVERSIZED_EVENT);
        assert_eq!(s.next_event().await.unwrap().kind, "app_terminated_event");
        assert!(s.line.capacity() <= 2048, "{}", s.line.capacity());
        assert!(s.next_event().await.is_err());
    }

    /// The events about one app's tasks name it, whether the type comes from `event:` or from
    /// the data; any other event, or one a line of which was lost, names none.
    #[tokio::test]
    async fn app_events_name_their_app() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/marathon/events");
        let mut text = String::new();
        for f in [
            "05-status_update_event.json",
            "07-instance_changed_event.json",
            "18-health_status_changed_event.json",
            "19-unhealthy_task_kill_event.json",
        ] {
            let json = std::fs::read_to_string(fixtures.join(f)).expect("an event fixture");
            let one_line: serde_json::Value = serde_json::from_str(&json).expect("JSON");
            text.push_str(&format!("data: {one_line}\n\n"));
        }
        let big = "x".repeat(5000);
        text.push_str(&format!(
            "event: status_update_event\ndata: {{\"appId\":\"/a\",\"m\":\"{big}\"}}\n\n"
        ));
        text.push_str("event: status_update_event\ndata: {\"appId\":\"/b\"}\n\n");
        let mut s = stream(text).limited(1024, Duration::from_secs(1));
        let mut seen = Vec::new();
        while let Ok(e) = s.next_event().await {
            seen.push((e.kind.clone(), e.about_app().map(str::to_string)));
        }
        let app = |k: &str, a: Option<&str>| (k.to_string(), a.map(str::to_string));
        assert_eq!(
            seen,
            vec![
                app("status_update_event", Some("/my-app")),
                app("instance_changed_event", Some("/app-id")),
                app("health_status_changed_event", Some("/my-app")),
                // About an app, but it kills the task: the status update that follows says so.
                app("unhealthy_task_kill_event", None),
                app("status_update_event", None),
                app("status_update_event", Some("/b")),
            ]
        );
    }

    #[tokio::test]
    async fn parses_marathon_docs_stream() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/marathon/events/00-marathon-docs-v2-events-sse-stream.txt");
        let text = std::fs::read(&dir).expect("the SSE example in tests/fixtures");
        let mut s = stream(text);
        let mut seen = Vec::new();
        while let Ok(e) = s.next_event().await {
            seen.push(e.kind);
        }
        assert!(
            seen.contains(&"status_update_event".to_string()),
            "{seen:?}"
        );
        assert!(
            seen.iter().all(|e| RELEVANT_EVENTS.contains(&e.as_str())),
            "{seen:?}"
        );
    }
}
