//! HTTP bits the agent's tests share: a basic-auth header for the fake Marathon, and a scrape of
//! the agent's Prometheus endpoint in the load balancer's namespace.
use crate::{Lab, in_netns};
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

/// `Basic <base64(user:password)>`, the `Authorization` value of HTTP basic authentication.
pub fn basic_auth(user: &str, password: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{password}");
    let mut out = String::from("Basic ");
    for chunk in input.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The body of `GET /metrics` from the agent listening at `addr` in the lab's load balancer
/// namespace; retried until it answers 200, at most 10 s.
pub fn scrape(lab: &Lab, addr: &str) -> String {
    let addr: SocketAddr = addr.parse().expect("addr");
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let got = in_netns(&lab.lb_ns, move || -> Option<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            let (head, body) = text.split_once("\r\n\r\n")?;
            head.starts_with("HTTP/1.1 200").then(|| body.to_string())
        });
        if let Some(body) = got {
            return body;
        }
        assert!(Instant::now() < end, "no metrics at {addr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn basic_auth_is_rfc_7617s_example() {
        // RFC 7617, section 2: Aladdin / open sesame.
        assert_eq!(
            super::basic_auth("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }
}
