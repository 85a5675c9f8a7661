//! Marathon's event stream (`GET /v2/events`): server-sent events, and which of them say that
//! apps or tasks may have changed.
use crate::error::{Error, Result};
use std::io::{BufRead, BufReader, Read};

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

/// A server-sent event stream.
pub struct EventStream {
    reader: BufReader<Box<dyn Read + Send + Sync>>,
    /// Where the stream comes from (a redacted URL), for logs and errors.
    pub source: String,
}

impl EventStream {
    /// Reads events from `reader`; `source` names it in errors.
    pub fn new(reader: Box<dyn Read + Send + Sync>, source: String) -> EventStream {
        EventStream {
            reader: BufReader::new(reader),
            source,
        }
    }

    /// The next event's type (`event:` field; `message` when absent). Err when the stream ends,
    /// breaks, or stays silent longer than the idle timeout.
    pub fn next_event(&mut self) -> Result<String> {
        let mut event: Option<String> = None;
        let mut data = false;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| Error::Marathon(format!("event stream from {}: {e}", self.source)))?;
            if n == 0 {
                return Err(Error::Marathon(format!(
                    "event stream from {} closed",
                    self.source
                )));
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                if event.is_some() || data {
                    return Ok(event.unwrap_or_else(|| "message".into()));
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
                    // Some proxies and old Marathon versions put only `data:` lines; the type
                    // is then in the JSON's `eventType`.
                    if event.is_none()
                        && let Ok(v) = serde_json::from_str::<serde_json::Value>(value)
                        && let Some(t) = v.get("eventType").and_then(|t| t.as_str())
                    {
                        event = Some(t.to_string());
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

    #[test]
    fn parses_sse() {
        let text = "event: event_stream_attached\ndata: {\"x\":1}\n\n: keepalive\n\ndata: {\"eventType\":\"status_update_event\"}\n\nevent: deployment_info\r\ndata: {}\r\n\r\n";
        let mut s = stream(text);
        assert_eq!(s.next_event().unwrap(), "event_stream_attached");
        assert_eq!(s.next_event().unwrap(), "status_update_event");
        assert_eq!(s.next_event().unwrap(), "deployment_info");
        assert!(s.next_event().is_err());
    }

    #[test]
    fn parses_marathon_docs_stream() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/marathon/events/00-marathon-docs-v2-events-sse-stream.txt");
        let text = std::fs::read(&dir).expect("the SSE example in tests/fixtures");
        let mut s = stream(text);
        let mut seen = Vec::new();
        while let Ok(e) = s.next_event() {
            seen.push(e);
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
