//! The bench's frames: built by `lbtest::packet` (the packet tests' builder, checksums included)
//! and read back and verified by `lbtest::checksum`, so that the bench and the tests share one
//! packet code.
use lbtest::{
    checksum,
    packet::{Frame, TCP_ACK, TCP_SYN},
};
use std::net::SocketAddr;

pub use lbtest::packet::Mac;

/// What a frame carries above IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A TCP SYN: the first packet of a connection.
    Syn,
    /// A TCP ACK with a small payload: a packet of an established connection.
    Ack,
    /// A UDP datagram with a small payload.
    Udp,
}

const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\n";

/// A frame from `src` to `dst` (both IPv4 or both IPv6), between MAC addresses `smac` and `dmac`.
pub fn frame(kind: Kind, src: SocketAddr, dst: SocketAddr, smac: Mac, dmac: Mac) -> Vec<u8> {
    let f = match kind {
        Kind::Syn => Frame::tcp(src, dst, TCP_SYN),
        Kind::Ack => Frame::tcp(src, dst, TCP_ACK).payload(PAYLOAD),
        Kind::Udp => Frame::udp(src, dst, true).payload(PAYLOAD),
    };
    f.macs(smac, dmac).build()
}

/// The IP and L4 addresses of a frame: (protocol, source, destination).
pub fn addresses(f: &[u8]) -> Option<(u8, SocketAddr, SocketAddr)> {
    checksum::addresses(f).ok()
}

/// True when the IPv4 header checksum (if any) and the L4 checksum of `f` verify.
pub fn checksums_ok(f: &[u8]) -> bool {
    checksum::verify(f).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_verify_and_read_back() {
        for (src, dst) in [
            ("198.18.0.2:40000", "172.16.0.1:8080"),
            ("[2001:2::2]:40000", "[fd00:172:16::1]:8080"),
        ] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            for (kind, proto) in [(Kind::Syn, 6), (Kind::Ack, 6), (Kind::Udp, 17)] {
                let f = frame(kind, src, dst, [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]);
                assert!(checksums_ok(&f), "{kind:?} {src}");
                assert_eq!(addresses(&f), Some((proto, src, dst)));
                assert_eq!(&f[..12], &[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]);
                let mut bad = f.clone();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert!(!checksums_ok(&bad), "{kind:?} {src}");
            }
        }
    }
}
