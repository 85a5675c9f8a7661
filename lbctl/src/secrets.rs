//! Credentials never leave the agent: a Marathon URL may carry `user:password@`, and every
//! place a URL is stored or printed (logs, the status, errors, `--print-config`) goes through
//! [`url`] or, for text that may quote one (an HTTP library's error), [`text`].

/// A URL without its user-info part (`http://user:pass@host:8080/x` becomes
/// `http://host:8080/x`).
pub fn url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_string(),
    }
}

/// `text` with the user-info of every URL in it removed: whatever follows a `://` up to the last
/// `@` before the end of the URL's authority (a `/`, `?`, `#`, white space or quote).
pub fn text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>' | '`') || c.is_whitespace()
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        out.push_str(
            authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host),
        );
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_is_removed_from_urls() {
        assert_eq!(
            url("https://u:secret@m.example:8080/x"),
            "https://m.example:8080/x"
        );
        assert_eq!(url("http://m:8080"), "http://m:8080");
        assert_eq!(url("http://a:p@ss@m:8080"), "http://m:8080");
    }

    #[test]
    fn user_info_is_removed_from_every_url_in_a_text() {
        let e = "http://bob:hunter2@10.0.0.1:8080/v2/apps?embed=apps.tasks: Connection Failed: \
                 Connect error; also `https://x:y@m:1` and http://plain:80/";
        let out = text(e);
        assert!(!out.contains("hunter2") && !out.contains("x:y"), "{out}");
        assert_eq!(
            out,
            "http://10.0.0.1:8080/v2/apps?embed=apps.tasks: Connection Failed: Connect error; \
             also `https://m:1` and http://plain:80/"
        );
        assert_eq!(text("no url here: a@b"), "no url here: a@b");
    }
}
