//! Talking to a live Marathon: full snapshots (`GET /v2/apps?embed=apps.tasks`) and the event
//! stream (`GET /v2/events`, server-sent events), over HTTP or HTTPS, with basic auth or a DC/OS
//! token. Several URLs may be given: each request tries them in order until one answers.
//! Credentials are never logged; URLs are logged without their user-info part.
use crate::error::{Error, Result};
use base64::Engine as _;
use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

/// How to reach Marathon.
#[derive(Clone, Default)]
pub struct ClientConfig {
    pub urls: Vec<String>,
    pub auth: Auth,
    /// A PEM file of CA certificates to trust instead of the built-in web roots.
    pub ca_file: Option<PathBuf>,
    /// Connect and per-read timeout of snapshot requests.
    pub timeout: Duration,
}

/// Credentials. `Debug` never shows them.
#[derive(Clone, Default)]
pub enum Auth {
    #[default]
    None,
    Basic {
        user: String,
        password: String,
    },
    /// A DC/OS authentication token (`Authorization: token=...`).
    Token(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::None => "none",
            Auth::Basic { .. } => "basic (hidden)",
            Auth::Token(_) => "token (hidden)",
        })
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field(
                "urls",
                &self.urls.iter().map(|u| redact(u)).collect::<Vec<_>>(),
            )
            .field("auth", &self.auth)
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Auth {
    /// Credentials from the environment: LBCTL_DCOS_TOKEN, or LBCTL_MARATHON_USER with
    /// LBCTL_MARATHON_PASSWORD.
    pub fn from_env() -> Auth {
        if let Ok(t) = std::env::var("LBCTL_DCOS_TOKEN")
            && !t.is_empty()
        {
            return Auth::Token(t);
        }
        match (
            std::env::var("LBCTL_MARATHON_USER"),
            std::env::var("LBCTL_MARATHON_PASSWORD"),
        ) {
            (Ok(user), Ok(password)) if !user.is_empty() => Auth::Basic { user, password },
            _ => Auth::None,
        }
    }

    fn header(&self) -> Option<String> {
        match self {
            Auth::None => None,
            Auth::Basic { user, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            Auth::Token(t) => Some(format!("token={t}")),
        }
    }
}

/// A URL without `user:password@`, for logs.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_string(),
    }
}

/// The largest snapshot accepted (a Marathon with tens of thousands of apps stays far below).
const MAX_SNAPSHOT: u64 = 512 << 20;

pub struct Client {
    cfg: ClientConfig,
    /// For snapshots: the configured timeout for every read.
    agent: ureq::Agent,
    /// For the event stream: reads may wait as long as `stream_idle`.
    stream_agent: ureq::Agent,
}

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

impl Client {
    pub fn new(cfg: ClientConfig, stream_idle: Duration) -> Result<Client> {
        if cfg.urls.is_empty() {
            return Err(Error::Marathon("no Marathon URL given".into()));
        }
        let tls = Arc::new(tls_config(cfg.ca_file.as_ref())?);
        let build = |read: Duration| {
            ureq::AgentBuilder::new()
                .timeout_connect(cfg.timeout)
                .timeout_read(read)
                .timeout_write(cfg.timeout)
                .tls_config(tls.clone())
                .build()
        };
        Ok(Client {
            agent: build(cfg.timeout),
            stream_agent: build(stream_idle),
            cfg,
        })
    }

    fn request(&self, agent: &ureq::Agent, base: &str, path: &str, accept: &str) -> ureq::Request {
        let url = format!("{}{path}", base.trim_end_matches('/'));
        let mut req = agent.get(&url).set("Accept", accept);
        if let Some(h) = self.cfg.auth.header() {
            req = req.set("Authorization", &h);
        }
        req
    }

    /// A full snapshot: the body of `GET /v2/apps?embed=apps.tasks`, from the first URL that
    /// answers with 200. Returns the body and the (redacted) URL it came from.
    pub fn snapshot(&self) -> Result<(String, String)> {
        let mut errors = Vec::new();
        for base in &self.cfg.urls {
            let req = self.request(
                &self.agent,
                base,
                "/v2/apps?embed=apps.tasks",
                "application/json",
            );
            match req.call() {
                Ok(resp) => {
                    let mut body = String::new();
                    match resp
                        .into_reader()
                        .take(MAX_SNAPSHOT)
                        .read_to_string(&mut body)
                    {
                        Ok(_) => return Ok((body, redact(base))),
                        Err(e) => errors.push(format!("{}: reading the body: {e}", redact(base))),
                    }
                }
                Err(e) => errors.push(format!("{}: {}", redact(base), describe(e))),
            }
        }
        Err(Error::Marathon(errors.join("; ")))
    }

    /// Opens the event stream on the first URL that accepts it.
    pub fn events(&self) -> Result<EventStream> {
        let mut errors = Vec::new();
        for base in &self.cfg.urls {
            let req = self.request(&self.stream_agent, base, "/v2/events", "text/event-stream");
            match req.call() {
                Ok(resp) => {
                    return Ok(EventStream {
                        reader: BufReader::new(Box::new(resp.into_reader())),
                        source: redact(base),
                    });
                }
                Err(e) => errors.push(format!("{}: {}", redact(base), describe(e))),
            }
        }
        Err(Error::Marathon(errors.join("; ")))
    }
}

fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, resp) => {
            let text = resp.into_string().unwrap_or_default();
            let text: String = text.chars().take(200).collect();
            format!("HTTP {code}: {}", text.trim())
        }
        ureq::Error::Transport(t) => t.to_string(),
    }
}

fn tls_config(ca_file: Option<&PathBuf>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| Error::Read {
                path: path.clone(),
                source: e,
            })?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert =
                    cert.map_err(|e| Error::Marathon(format!("CA file {}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Marathon(format!("CA file {}: {e}", path.display())))?;
                n += 1;
            }
            if n == 0 {
                return Err(Error::Marathon(format!(
                    "CA file {} holds no PEM certificate",
                    path.display()
                )));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Marathon(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A server-sent event stream.
pub struct EventStream {
    reader: BufReader<Box<dyn Read + Send + Sync>>,
    pub source: String,
}

impl EventStream {
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
mod tests {
    use super::*;

    #[test]
    fn redacts_user_info() {
        assert_eq!(
            redact("https://u:secret@m.example:8080/x"),
            "https://m.example:8080/x"
        );
        assert_eq!(redact("http://m:8080"), "http://m:8080");
    }

    #[test]
    fn auth_is_not_shown() {
        let a = Auth::Basic {
            user: "u".into(),
            password: "secret".into(),
        };
        assert!(!format!("{a:?}").contains("secret"));
        assert_eq!(a.header().as_deref(), Some("Basic dTpzZWNyZXQ="));
        assert_eq!(Auth::Token("t".into()).header().as_deref(), Some("token=t"));
    }

    #[test]
    fn parses_sse() {
        let text = "event: event_stream_attached\ndata: {\"x\":1}\n\n: keepalive\n\ndata: {\"eventType\":\"status_update_event\"}\n\nevent: deployment_info\r\ndata: {}\r\n\r\n";
        let mut s = EventStream {
            reader: BufReader::new(Box::new(std::io::Cursor::new(text.as_bytes().to_vec()))),
            source: "test".into(),
        };
        assert_eq!(s.next_event().unwrap(), "event_stream_attached");
        assert_eq!(s.next_event().unwrap(), "status_update_event");
        assert_eq!(s.next_event().unwrap(), "deployment_info");
        assert!(s.next_event().is_err());
    }

    #[test]
    fn parses_marathon_docs_stream() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(
            "../../shared/fixtures/marathon/events/00-marathon-docs-v2-events-sse-stream.txt",
        );
        let text = std::fs::read(&dir).expect("the shared SSE example");
        let mut s = EventStream {
            reader: BufReader::new(Box::new(std::io::Cursor::new(text))),
            source: "docs".into(),
        };
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
