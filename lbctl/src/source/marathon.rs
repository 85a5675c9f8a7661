//! A live Marathon: full snapshots (`GET /v2/apps?embed=apps.tasks`) and the event stream
//! (`GET /v2/events`), over HTTP or HTTPS, with basic auth or a DC/OS token. Several URLs may be
//! given: each request tries them in order until one answers. Credentials are never logged;
//! URLs are logged without their user-info part. Two threads follow it: one the event stream,
//! one fetching snapshots (on start, every resync, after a burst of events).
use super::{
    events::{EventStream, OVERSIZED_EVENT, RELEVANT_EVENTS},
    limits::{DeadlineResolver, Limits, is_timeout, no_answer, read_body},
    update::{Update, sleep_unless},
};
use crate::error::{Error, Result};
use base64::Engine as _;
use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError, Sender},
    },
    time::{Duration, Instant},
};

/// How to reach Marathon.
#[derive(Clone, Default)]
pub struct ClientConfig {
    /// Marathon base URLs, tried in order.
    pub urls: Vec<String>,
    /// The credentials sent with every request.
    pub auth: Auth,
    /// A PEM file of CA certificates to trust instead of the built-in web roots.
    pub ca_file: Option<PathBuf>,
    /// The total deadline of each snapshot request (resolve, connect, headers and body), and
    /// the connect deadline of the event stream.
    pub timeout: Duration,
    /// Body and line sizes, and the event stream's idle deadline.
    pub limits: Limits,
}

/// Credentials. `Debug` never shows them.
#[derive(Clone, Default)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// HTTP basic authentication.
    Basic {
        /// The user name.
        user: String,
        /// The password.
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
            .field("limits", &self.limits)
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
    crate::secrets::url(url)
}

/// True for `http://HOST...` and `https://HOST...` (scheme in any case).
fn is_http_url(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    ["http", "https"].contains(&scheme.to_ascii_lowercase().as_str()) && !host.is_empty()
}

/// An HTTP(S) client of one Marathon (several URLs of it).
pub struct Client {
    cfg: ClientConfig,
    /// For snapshots: every request ends within the configured timeout.
    agent: ureq::Agent,
    /// For the event stream: each read may wait as long as `stream_idle`.
    stream_agent: ureq::Agent,
}

impl Client {
    /// A client for `cfg`: checks that there is a URL and reads the CA file. Event stream reads
    /// may wait `stream_idle`; every snapshot request ends within the configured timeout.
    pub fn new(cfg: ClientConfig, stream_idle: Duration) -> Result<Client> {
        if cfg.urls.is_empty() {
            return Err(Error::Marathon("no Marathon URL given".into()));
        }
        if let Some(bad) = cfg.urls.iter().find(|u| !is_http_url(u)) {
            return Err(Error::Marathon(format!(
                "`{}` is not an http:// or https:// URL with a host",
                redact(bad)
            )));
        }
        let tls = Arc::new(tls_config(cfg.ca_file.as_ref())?);
        let builder = || {
            ureq::AgentBuilder::new()
                .timeout_connect(cfg.timeout)
                .timeout_write(cfg.timeout)
                .resolver(DeadlineResolver(cfg.timeout))
                .tls_config(tls.clone())
        };
        Ok(Client {
            // `timeout` is a deadline for the whole request: ureq gives each socket read only
            // the time left, so that a body dripping a byte at a time still ends in time.
            agent: builder().timeout(cfg.timeout).build(),
            stream_agent: builder().timeout_read(stream_idle).build(),
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
        self.snapshot_noting(&mut Vec::new())
    }

    /// [`Client::snapshot`], adding why each URL tried before the one that answered failed to
    /// `failed`. Each URL gets the whole deadline, and a body of at most `max_snapshot`.
    pub fn snapshot_noting(&self, failed: &mut Vec<String>) -> Result<(String, String)> {
        let start = failed.len();
        for base in &self.cfg.urls {
            let deadline = Instant::now() + self.cfg.timeout;
            let req = self.request(
                &self.agent,
                base,
                "/v2/apps?embed=apps.tasks",
                "application/json",
            );
            let body = req
                .call()
                .map_err(|e| describe(e, self.cfg.timeout))
                .and_then(|resp| {
                    let length = resp
                        .header("Content-Length")
                        .and_then(|l| l.trim().parse().ok());
                    read_body(
                        resp.into_reader(),
                        length,
                        deadline,
                        self.cfg.timeout,
                        self.cfg.limits.max_snapshot,
                    )
                });
            match body {
                Ok(body) => return Ok((body, redact(base))),
                Err(e) => failed.push(format!("{}: {e}", redact(base))),
            }
        }
        Err(Error::Marathon(failed[start..].join("; ")))
    }

    /// Opens the event stream on the first URL that accepts it.
    pub fn events(&self) -> Result<EventStream> {
        let mut errors = Vec::new();
        for base in &self.cfg.urls {
            let req = self.request(&self.stream_agent, base, "/v2/events", "text/event-stream");
            match req.call() {
                Ok(resp) => {
                    return Ok(EventStream::new(resp.into_reader(), redact(base))
                        .limited(self.cfg.limits.max_event_line, self.cfg.limits.stream_idle));
                }
                Err(e) => errors.push(format!(
                    "{}: {}",
                    redact(base),
                    describe(e, self.cfg.timeout)
                )),
            }
        }
        Err(Error::Marathon(errors.join("; ")))
    }
}

fn describe(e: ureq::Error, timeout: Duration) -> String {
    match e {
        ureq::Error::Transport(t) if is_timeout(&t) => no_answer(timeout),
        ureq::Error::Status(code, resp) => {
            let text = resp.into_string().unwrap_or_default();
            let text: String = text.chars().take(200).collect();
            format!("HTTP {code}: {}", text.trim())
        }
        // ureq quotes the whole URL, user-info included.
        ureq::Error::Transport(t) => crate::secrets::text(&t.to_string()),
    }
}

fn tls_config(ca_file: Option<&PathBuf>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                Error::Marathon(format!("CA file {}: cannot read it: {e}", path.display()))
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

/// Follows Marathon's event stream, sending a trigger for every event that may change apps or
/// tasks; reconnects with backoff.
pub(crate) fn follow_events(client: &Client, trigger: Sender<()>, stop: &AtomicBool) {
    let mut backoff = Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) {
        match client.events() {
            Ok(mut stream) => {
                tracing::info!(source = %stream.source, "following Marathon's event stream");
                backoff = Duration::from_secs(1);
                loop {
                    match stream.next_event() {
                        Ok(t) if RELEVANT_EVENTS.contains(&t.as_str()) || t == OVERSIZED_EVENT => {
                            tracing::debug!(event = %t, "Marathon event");
                            if trigger.send(()).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %crate::secrets::text(&e.to_string()), "event stream lost; reconnecting");
                            break;
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::secrets::text(&e.to_string()), retry_in = ?backoff, "cannot open Marathon's event stream");
                sleep_unless(stop, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Fetches a full snapshot on start, every `resync`, and once things are quiet for `debounce`
/// after a trigger. Failures are retried with backoff, and never turn into an empty state.
pub(crate) fn fetch_snapshots(
    client: &Client,
    resync: Duration,
    debounce: Duration,
    triggers: Receiver<()>,
    tx: Sender<Update>,
    stop: &AtomicBool,
) {
    let mut next = Instant::now();
    let mut backoff = Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            match triggers.recv_timeout((next - now).min(Duration::from_millis(100))) {
                Ok(()) => {
                    // Debounce: wait until no trigger came for `debounce`, at most 4 times that.
                    let until = Instant::now() + debounce * 4;
                    while Instant::now() < until && triggers.recv_timeout(debounce).is_ok() {}
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    // No event stream any more: plain periodic snapshots.
                    sleep_unless(stop, next.saturating_duration_since(Instant::now()));
                }
            }
        }
        let mut failed = Vec::new();
        let fetched = client.snapshot_noting(&mut failed);
        if fetched.is_ok() && !failed.is_empty() {
            // Another URL answered: the state is good, but the status shows the one at fault.
            if tx.send(Update::Degraded(failed.join("; "))).is_err() {
                return;
            }
        }
        let update = match fetched {
            Ok((text, from)) => {
                backoff = Duration::from_secs(1);
                next = Instant::now() + resync;
                Update::document(&text, from)
            }
            Err(e) => {
                next = Instant::now() + backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                Update::Failed(e.to_string())
            }
        };
        if tx.send(update).is_err() {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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
    fn only_http_urls_with_a_host() {
        for good in ["http://m:8080", "HTTPS://m/marathon", "http://u:p@10.0.0.1"] {
            assert!(is_http_url(good), "{good}");
        }
        for bad in [
            "m:8080",
            "ftp://m",
            "http://",
            "https:///v2",
            "http://u:p@/x",
        ] {
            assert!(!is_http_url(bad), "{bad}");
        }
        let cfg = ClientConfig {
            urls: vec!["http://m:8080".into(), "ftp://u:secret@m".into()],
            ..Default::default()
        };
        let e = Client::new(cfg, Duration::from_secs(1))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("`ftp://m`") && !e.contains("secret"), "{e}");
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
}

/// HTTPS with a private CA, against a TLS server in this process.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tls_tests {
    use super::*;
    use std::{
        io::{Read as _, Write as _},
        net::TcpListener,
    };

    /// Serves one HTTPS request with `body`, with a certificate for 127.0.0.1 signed by a fresh
    /// CA. Returns the URL and the CA's PEM.
    fn https_server(body: &'static str, requests: usize) -> (String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let server = Arc::new(server);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
        std::thread::spawn(move || {
            for _ in 0..requests {
                let Ok((mut tcp, _)) = l.accept() else { return };
                let mut conn = rustls::ServerConnection::new(server.clone()).unwrap();
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                let mut buf = [0u8; 4096];
                if tls.read(&mut buf).is_err() {
                    continue;
                }
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.flush();
            }
        });
        (url, ca.pem())
    }

    #[test]
    fn https_with_a_ca_file() {
        let (url, ca) = https_server("{\"apps\": []}", 2);
        let dir = std::env::temp_dir().join(format!("lbctl-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca).unwrap();
        let cfg = ClientConfig {
            urls: vec![url.clone()],
            auth: Auth::None,
            ca_file: Some(ca_file),
            timeout: Duration::from_secs(5),
            limits: Limits::default(),
        };
        let client = Client::new(cfg.clone(), Duration::from_secs(5)).unwrap();
        let (body, from) = client.snapshot().unwrap();
        assert_eq!(body, "{\"apps\": []}");
        assert_eq!(from, url);
        // Without the CA, the server is not trusted.
        let untrusted = Client::new(
            ClientConfig {
                ca_file: None,
                ..cfg
            },
            Duration::from_secs(5),
        )
        .unwrap();
        let e = untrusted.snapshot().unwrap_err().to_string();
        assert!(
            e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_ca_file_is_named() {
        let dir = std::env::temp_dir().join(format!("lbctl-tls-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, "not a certificate").unwrap();
        let cfg = ClientConfig {
            urls: vec!["https://127.0.0.1:1".into()],
            auth: Auth::None,
            ca_file: Some(ca_file.clone()),
            timeout: Duration::from_secs(1),
            limits: Limits::default(),
        };
        let e = Client::new(cfg, Duration::from_secs(1))
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("ca.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let missing = dir.join("missing.pem");
        let cfg = ClientConfig {
            urls: vec!["https://127.0.0.1:1".into()],
            ca_file: Some(missing),
            ..Default::default()
        };
        let e = Client::new(cfg, Duration::from_secs(1))
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("CA file") && e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
