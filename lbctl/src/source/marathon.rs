//! A live Marathon: full snapshots (`GET /v2/apps?embed=apps.tasks`) and the event stream
//! (`GET /v2/events`), over HTTP or HTTPS, with basic auth or a DC/OS token. Several URLs may be
//! given: each request tries them in order until one answers. Credentials are never logged;
//! URLs are logged without their user-info part. The client is reqwest (rustls) on the agent's
//! tokio runtime; two tasks there follow Marathon ([`super::watch`]): one the event stream, one
//! fetching snapshots (on start, every resync, after a burst of events).
use super::{
    events::EventStream,
    limits::{Limits, is_timeout, no_answer, read_body},
};
use crate::error::{Error, Result};
use base64::Engine as _;
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::io::AsyncReadExt as _;

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

/// How an answer of 400 or more starts: `HTTP <status>: <the start of its body>`.
const HTTP: &str = "HTTP";

/// True for an absolute Marathon app id: `/`-separated segments of lowercase letters, digits,
/// `-` and `.`, none empty or starting with `.` (so nothing else can reach the URL it goes in).
fn is_app_id(id: &str) -> bool {
    let Some(path) = id.strip_prefix('/') else {
        return false;
    };
    id.len() <= 512
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        })
}

/// How many redirects a request may meet: the one that would be the last is an error. The
/// `Authorization` header is never sent to where a redirect points.
const MAX_REDIRECTS: usize = 5;
/// The most bytes of an error answer's body read, to quote its start.
const ERROR_BODY: u64 = 64 << 10;

/// An HTTP(S) client of one Marathon (several URLs of it), on the agent's tokio runtime.
pub struct Client {
    cfg: ClientConfig,
    /// HTTP/1.1 over rustls (our TLS config), connect deadline `timeout`, no proxy, redirects
    /// followed by [`Client::send`] itself. Name resolution runs on tokio's blocking threads.
    http: reqwest::Client,
}

impl Client {
    /// A client for `cfg`: checks that there is a URL and reads the CA file. Every snapshot
    /// request ends within the configured timeout; each event stream read may wait
    /// `cfg.limits.stream_idle`.
    pub fn new(cfg: ClientConfig) -> Result<Client> {
        if cfg.urls.is_empty() {
            return Err(Error::Marathon("no Marathon URL given".into()));
        }
        if let Some(bad) = cfg.urls.iter().find(|u| !is_http_url(u)) {
            return Err(Error::Marathon(format!(
                "`{}` is not an http:// or https:// URL with a host",
                redact(bad)
            )));
        }
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(cfg.ca_file.as_ref())?)
            .connect_timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .http1_only()
            .build()
            .map_err(|e| Error::Marathon(format!("building the HTTP client: {}", chain(&e))))?;
        Ok(Client { cfg, http })
    }

    /// `GET base+path`, following redirects (without credentials) up to [`MAX_REDIRECTS`]. An
    /// answer of 400 or more is an error quoting the start of its body.
    async fn send(
        &self,
        base: &str,
        path: &str,
        accept: &str,
    ) -> Result<reqwest::Response, String> {
        let mut url = format!("{}{path}", base.trim_end_matches('/'));
        let mut auth = self.cfg.auth.header();
        for hop in 0.. {
            let mut req = self.http.get(&url).header(reqwest::header::ACCEPT, accept);
            if let Some(h) = &auth {
                let mut value = reqwest::header::HeaderValue::from_str(h)
                    .map_err(|_| "the credentials are not a valid HTTP header value".to_string())?;
                value.set_sensitive(true);
                let mut headers = reqwest::header::HeaderMap::new();
                headers.insert(reqwest::header::AUTHORIZATION, value);
                // Replaces a basic auth taken from the URL's user-info.
                req = req.headers(headers);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| describe(&e, self.cfg.timeout))?;
            let status = resp.status();
            if status.is_redirection()
                && let Some(location) = resp.headers().get(reqwest::header::LOCATION)
            {
                if hop + 1 >= MAX_REDIRECTS {
                    return Err(format!("reached max redirects ({MAX_REDIRECTS})"));
                }
                let next = location
                    .to_str()
                    .ok()
                    .and_then(|l| resp.url().join(l).ok())
                    .ok_or_else(|| {
                        format!(
                            "bad redirect to {}",
                            crate::secrets::text(&String::from_utf8_lossy(location.as_bytes()))
                        )
                    })?;
                url = next.to_string();
                auth = None;
                continue;
            }
            if status.as_u16() >= 400 {
                let mut text = String::new();
                let _ = body_reader(resp)
                    .take(ERROR_BODY)
                    .read_to_string(&mut text)
                    .await;
                let text: String = text.chars().take(200).collect();
                return Err(format!("{} {}: {}", HTTP, status.as_u16(), text.trim()));
            }
            return Ok(resp);
        }
        Err(format!("reached max redirects ({MAX_REDIRECTS})"))
    }

    /// A full snapshot: the body of `GET /v2/apps?embed=apps.tasks`, from the first URL that
    /// answers with 200. Returns the body and the (redacted) URL it came from.
    pub async fn snapshot(&self) -> Result<(String, String)> {
        self.snapshot_noting(&mut Vec::new()).await
    }

    /// [`Client::snapshot`], adding why each URL tried before the one that answered failed to
    /// `failed`. Each URL gets the whole deadline, and a body of at most `max_snapshot`.
    pub async fn snapshot_noting(&self, failed: &mut Vec<String>) -> Result<(String, String)> {
        let got = self
            .get_noting("/v2/apps?embed=apps.tasks", false, failed)
            .await?;
        // Only a request that may miss gives no body.
        got.ok_or_else(|| Error::Marathon("no document".into()))
    }

    /// One app with its tasks: the body of `GET /v2/apps{id}?embed=app.tasks`
    /// (`{"app": {...}}`), from the first URL that answers, and that URL (redacted); None when
    /// Marathon has no such app (HTTP 404), or `id` is not an absolute Marathon app id (it is
    /// not put in a URL then).
    pub async fn app(&self, id: &str) -> Result<Option<(String, String)>> {
        if !is_app_id(id) {
            return Ok(None);
        }
        self.get_noting(
            &format!("/v2/apps{id}?embed=app.tasks"),
            true,
            &mut Vec::new(),
        )
        .await
    }

    /// `GET path` from the first URL that answers with 200, adding why each URL tried before
    /// failed to `failed`. Each URL gets the whole deadline, and a body of at most
    /// `max_snapshot`. With `may_miss`, an HTTP 404 is an answer: None.
    async fn get_noting(
        &self,
        path: &str,
        may_miss: bool,
        failed: &mut Vec<String>,
    ) -> Result<Option<(String, String)>> {
        let start = failed.len();
        let timeout = self.cfg.timeout;
        for base in &self.cfg.urls {
            let deadline = Instant::now() + timeout;
            let fetch = async {
                let resp = self.send(base, path, "application/json").await?;
                let length = resp
                    .headers()
                    .get(reqwest::header::CONTENT_LENGTH)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| l.trim().parse().ok());
                let max = self.cfg.limits.max_snapshot;
                read_body(body_reader(resp), length, deadline, timeout, max).await
            };
            let body = tokio::time::timeout_at(deadline.into(), fetch)
                .await
                .unwrap_or_else(|_elapsed| Err(no_answer(timeout)));
            match body {
                Ok(body) => return Ok(Some((body, redact(base)))),
                Err(e) if may_miss && e.starts_with(&format!("{HTTP} 404:")) => return Ok(None),
                Err(e) => failed.push(format!("{}: {}", redact(base), crate::secrets::text(&e))),
            }
        }
        Err(Error::Marathon(failed[start..].join("; ")))
    }

    /// Opens the event stream on the first URL that accepts it. Each URL gets `timeout` to
    /// connect and `timeout` plus `stream_idle` to answer with its head.
    pub async fn events(&self) -> Result<EventStream> {
        let mut errors = Vec::new();
        let limits = self.cfg.limits;
        let within = self.cfg.timeout + limits.stream_idle;
        for base in &self.cfg.urls {
            let opened =
                tokio::time::timeout(within, self.send(base, "/v2/events", "text/event-stream"))
                    .await
                    .unwrap_or_else(|_elapsed| {
                        Err(format!(
                            "no answer within {} s (timeout_secs + stream_idle_secs)",
                            within.as_secs()
                        ))
                    });
            match opened {
                Ok(resp) => {
                    return Ok(EventStream::new(Box::new(body_reader(resp)), redact(base))
                        .limited(limits.max_event_line, limits.stream_idle));
                }
                Err(e) => errors.push(format!("{}: {}", redact(base), crate::secrets::text(&e))),
            }
        }
        Err(Error::Marathon(errors.join("; ")))
    }
}

/// The body of `resp` as bytes that read (in the pieces they came in: memory stays bounded).
fn body_reader(resp: reqwest::Response) -> impl tokio::io::AsyncRead + Send + Unpin + 'static {
    use futures_util::TryStreamExt as _;
    tokio_util::io::StreamReader::new(resp.bytes_stream().map_err(std::io::Error::other))
}

/// Why a request failed: a timeout as [`no_answer`], anything else as the chain of causes.
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() || is_timeout(e) {
        return no_answer(timeout);
    }
    // The error may quote the URL, and a URL may carry user-info.
    crate::secrets::text(&chain(e))
}

/// An error and its causes, each once, joined with `: `.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "marathon_tests.rs"]
mod http_tests;

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
    fn only_app_ids_go_in_a_url() {
        for ok in ["/a", "/prod/web-1", "/x.y/z0"] {
            assert!(is_app_id(ok), "{ok}");
        }
        for bad in [
            "", "a", "/", "/a/", "//a", "/a/../b", "/.x", "/A", "/a?b", "/a#b", "/a b", "/a%2f",
        ] {
            assert!(!is_app_id(bad), "{bad}");
        }
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
        let e = Client::new(cfg)
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

    #[tokio::test]
    async fn https_with_a_ca_file() {
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
        let client = Client::new(cfg.clone()).unwrap();
        let (body, from) = client.snapshot().await.unwrap();
        assert_eq!(body, "{\"apps\": []}");
        assert_eq!(from, url);
        // Without the CA, the server is not trusted.
        let untrusted = Client::new(ClientConfig {
            ca_file: None,
            ..cfg
        })
        .unwrap();
        let e = untrusted.snapshot().await.unwrap_err().to_string();
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
        let e = Client::new(cfg).err().expect("refused").to_string();
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
        let e = Client::new(cfg).err().expect("refused").to_string();
        assert!(
            e.contains("CA file") && e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
