//! The client against small HTTP servers in this process: redirects (followed without
//! credentials, at most a few), error answers quoted, and no credentials in any error.
use super::*;
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    sync::{Arc, Mutex},
};

/// Answers each request with what `answer(n, head)` gives (`n` counts from 0), recording every
/// request's head. Returns the URL and the heads.
fn server(
    answer: impl Fn(usize, &str) -> String + Send + 'static,
) -> (String, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for n in 0..20 {
            let Ok((s, _)) = l.accept() else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                head.push_str(&line);
            }
            let out = answer(n, &head);
            seen.lock().unwrap().push(head);
            let mut w = s;
            let _ = w.write_all(out.as_bytes());
        }
    });
    (url, heads)
}

fn answer(status: &str, headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn client(urls: Vec<String>, auth: Auth) -> Client {
    Client::new(ClientConfig {
        urls,
        auth,
        timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .unwrap()
}

fn basic() -> Auth {
    Auth::Basic {
        user: "u".into(),
        password: "secret".into(),
    }
}

#[tokio::test]
async fn a_redirect_is_followed_without_the_credentials() {
    let (target, target_heads) = server(|_, _| answer("200 OK", "", "{\"apps\": []}"));
    let location = format!("{target}/v2/apps?embed=apps.tasks");
    let (first, first_heads) = server(move |_, _| {
        answer(
            "307 Temporary Redirect",
            &format!("Location: {location}\r\n"),
            "",
        )
    });
    let (body, from) = client(vec![first.clone()], basic())
        .snapshot()
        .await
        .unwrap();
    assert_eq!((body.as_str(), from), ("{\"apps\": []}", first));
    let first_head = first_heads.lock().unwrap()[0].to_lowercase();
    assert!(
        first_head.contains("authorization: basic dtpzzwnyzxq="),
        "{first_head}"
    );
    let target_head = target_heads.lock().unwrap()[0].to_lowercase();
    assert!(
        target_head.starts_with("get /v2/apps?embed=apps.tasks ")
            && !target_head.contains("authorization"),
        "{target_head}"
    );
}

#[tokio::test]
async fn redirects_are_bounded() {
    let (url, heads) = server(|_, _| answer("302 Found", "Location: /v2/apps\r\n", ""));
    let e = client(vec![url], Auth::None)
        .snapshot()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("reached max redirects (5)"), "{e}");
    assert_eq!(heads.lock().unwrap().len(), MAX_REDIRECTS);
}

#[tokio::test]
async fn errors_name_the_fault_without_credentials() {
    let (url, _) = server(|_, _| answer("500 Internal Server Error", "", "  boom  "));
    let with_secret = url.replace("http://", "http://u:secret@");
    let e = client(vec![with_secret], Auth::None)
        .snapshot()
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(e, format!("Marathon: {url}: HTTP 500: boom"));

    // Nothing listens: the error names the URL (without its user-info) and the refusal.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let c = client(vec![format!("http://u:secret@127.0.0.1:{port}")], basic());
    for e in [
        c.snapshot().await.unwrap_err().to_string(),
        c.events().await.err().unwrap().to_string(),
    ] {
        assert!(
            e.contains(&format!("http://127.0.0.1:{port}")) && !e.contains("secret"),
            "{e}"
        );
        assert!(e.to_lowercase().contains("refused"), "{e}");
    }
}

#[tokio::test]
async fn a_snapshot_without_an_answer_ends_at_the_deadline() {
    // Accepts and never answers.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
    let c = Client::new(ClientConfig {
        urls: vec![url.clone()],
        timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .unwrap();
    let t = std::time::Instant::now();
    let e = c.snapshot().await.unwrap_err().to_string();
    assert_eq!(
        e,
        format!("Marathon: {url}: no answer within 1 s (timeout_secs); trying the next URL")
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    drop(l);
}

/// An app alone: its path under /v2/apps with its tasks; Marathon's 404 is "no such app", any
/// other failure an error; an id that is not an app id is not sent.
#[tokio::test]
async fn an_app_is_fetched_alone() {
    let (url, heads) = server(|n, _| match n {
        0 => answer("200 OK", "", "{\"app\": {\"id\": \"/t/web\"}}"),
        1 => answer(
            "404 Not Found",
            "",
            "{\"message\":\"App '/t/gone' does not exist\"}",
        ),
        _ => answer("503 Service Unavailable", "", "busy"),
    });
    let c = client(vec![url.clone()], Auth::None);
    let (body, from) = c.app("/t/web").await.unwrap().expect("the app");
    assert_eq!(
        (body.as_str(), from.as_str()),
        ("{\"app\": {\"id\": \"/t/web\"}}", url.as_str())
    );
    assert!(c.app("/t/gone").await.unwrap().is_none());
    let e = c.app("/t/busy").await.unwrap_err().to_string();
    assert!(e.contains("HTTP 503: busy"), "{e}");
    assert!(c.app("/t/../../v2/leader").await.unwrap().is_none());
    let heads = heads.lock().unwrap();
    let lines: Vec<&str> = heads.iter().map(|h| h.lines().next().unwrap()).collect();
    assert_eq!(
        lines,
        [
            "GET /v2/apps/t/web?embed=app.tasks HTTP/1.1",
            "GET /v2/apps/t/gone?embed=app.tasks HTTP/1.1",
            "GET /v2/apps/t/busy?embed=app.tasks HTTP/1.1",
        ]
    );
}
