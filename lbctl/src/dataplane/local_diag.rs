//! The `unsafe` side of ending sockets (`local_end`): a NETLINK_SOCK_DIAG socket opened in a
//! network namespace of the served cgroup's processes, the sockets it lists (inet_diag, with
//! their cookies) and SOCK_DESTROY. (aya-ebpf 0.2 can express neither a BPF iterator program
//! nor the `bpf_sock_destroy` kfunc, so the kernel's own diag interface ends them; it needs
//! CONFIG_INET_DIAG_DESTROY, and works per network namespace as an iterator would.)
use std::{
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// struct nlmsghdr.
const NLMSG_HDR: usize = 16;
/// struct inet_diag_sockid: sport, dport (BE), src[4], dst[4] (BE words), if, cookie[2].
const SOCKID: usize = 48;
/// struct inet_diag_req_v2: family, protocol, ext, pad, states, id.
const REQ: usize = 8 + SOCKID;
/// struct inet_diag_msg: family, state, timer, retrans, id, expires, rqueue, wqueue, uid, inode.
const MSG: usize = 4 + SOCKID + 20;

/// One socket as inet_diag lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DiagSock {
    /// AF_INET or AF_INET6 (the socket's own family).
    pub family: u8,
    /// IPPROTO_TCP or IPPROTO_UDP (what was asked for).
    pub proto: u8,
    /// The socket's state (TCP_ESTABLISHED = 1 ...).
    pub state: u8,
    /// The peer's address: as in memory (big-endian words); IPv4 in word 0.
    pub dst: [u32; 4],
    /// The peer's port, big-endian as in memory.
    pub dport: u16,
    /// The socket cookie (`bpf_get_socket_cookie`'s value).
    pub cookie: u64,
    /// The inet_diag_sockid as the kernel gave it: SOCK_DESTROY names the socket with it.
    id: [u8; SOCKID],
}

/// A NETLINK_SOCK_DIAG socket of one network namespace.
pub(super) struct Diag {
    fd: OwnedFd,
    seq: u32,
}

impl Diag {
    /// Opens a diag socket in the network namespace `ns` (an open /proc/PID/ns/net): a thread
    /// of its own enters the namespace and creates it (a socket stays in the namespace it was
    /// made in), so this thread's namespace never changes.
    pub(super) fn open_in(ns: &File) -> io::Result<Diag> {
        let ns_fd = ns.as_raw_fd();
        let fd = std::thread::scope(|s| {
            s.spawn(move || -> io::Result<OwnedFd> {
                // SAFETY: setns(2) on an open namespace file, for this (short-lived) thread.
                if unsafe { libc::setns(ns_fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                open_socket()
            })
            .join()
            .map_err(|_| io::Error::other("the thread entering the namespace panicked"))?
        })?;
        Ok(Diag { fd, seq: 0 })
    }

    /// The sockets of `family` and `proto` in one of the states of the bit mask `states`.
    pub(super) fn list(&mut self, family: u8, proto: u8, states: u32) -> io::Result<Vec<DiagSock>> {
        let req = request(family, proto, states, &[0; SOCKID]);
        let seq = self.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        // A dump ends with NLMSG_DONE; bounded by the sockets the namespace holds.
        loop {
            let n = self.recv(&mut buf)?;
            for (kind, body) in messages(&buf[..n], seq) {
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => return Err(ack_error(body).unwrap_or_else(bad_reply)),
                    SOCK_DIAG_BY_FAMILY if body.len() >= MSG => out.push(parse(body, proto)),
                    _ => {}
                }
            }
        }
    }

    /// Ends socket `s` (SOCK_DESTROY: TCP and UDP abort it with ECONNABORTED). The kernel finds
    /// it by its addresses and checks the cookie, so a socket that closed meanwhile is never
    /// mistaken for another (ENOENT).
    pub(super) fn destroy(&mut self, s: &DiagSock) -> io::Result<()> {
        let req = request(s.family, s.proto, u32::MAX, &s.id);
        let seq = self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
        let mut buf = vec![0u8; 4096];
        // The answer is one NLMSG_ERROR (error 0: done); a few tries for stray messages.
        for _ in 0..4 {
            let n = self.recv(&mut buf)?;
            for (kind, body) in messages(&buf[..n], seq) {
                if kind == NLMSG_ERROR {
                    return ack_error(body).map_or(Ok(()), Err);
                }
            }
        }
        Err(io::Error::other("no answer to SOCK_DESTROY"))
    }

    fn send(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HDR + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: a zeroed sockaddr_nl naming the kernel (pid 0); `msg` is a live buffer.
        let rc = unsafe {
            let mut to: libc::sockaddr_nl = std::mem::zeroed();
            to.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reading into a live buffer of its own length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Every read is bounded: a kernel that does not answer fails the call after 2 s.
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: setsockopt(2) with a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// An inet_diag_req_v2.
fn request(family: u8, proto: u8, states: u32, id: &[u8; SOCKID]) -> [u8; REQ] {
    let mut r = [0u8; REQ];
    r[0] = family;
    r[1] = proto;
    r[4..8].copy_from_slice(&states.to_ne_bytes());
    r[8..].copy_from_slice(id);
    r
}

/// The messages of one netlink datagram answering `seq`: (type, body).
fn messages(mut buf: &[u8], seq: u32) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDR {
        let word = |at: usize| u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let len = word(0) as usize;
        if len < NLMSG_HDR || len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if word(8) == seq {
            out.push((kind, &buf[NLMSG_HDR..len]));
        }
        // Messages are 4-byte aligned.
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    out
}

/// The error an NLMSG_ERROR carries (None: 0, an acknowledgement).
fn ack_error(body: &[u8]) -> Option<io::Error> {
    let code = i32::from_ne_bytes(body.get(..4)?.try_into().ok()?);
    (code != 0).then(|| io::Error::from_raw_os_error(-code))
}

fn bad_reply() -> io::Error {
    io::Error::other("a short NLMSG_ERROR from sock_diag")
}

fn parse(body: &[u8], proto: u8) -> DiagSock {
    let mut id = [0u8; SOCKID];
    id.copy_from_slice(&body[4..4 + SOCKID]);
    let word = |at: usize| u32::from_ne_bytes([id[at], id[at + 1], id[at + 2], id[at + 3]]);
    DiagSock {
        family: body[0],
        proto,
        state: body[1],
        dst: [word(20), word(24), word(28), word(32)],
        dport: u16::from_ne_bytes([id[2], id[3]]),
        cookie: u64::from(word(40)) | (u64::from(word(44)) << 32),
        id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_socket_is_read_as_the_kernel_lays_it_out() {
        // inet_diag_msg of an AF_INET6 TCP socket (ESTABLISHED) to [::ffff:198.18.0.11]:8080
        // with cookie 0x0000_0002_0000_0001.
        let mut body = vec![0u8; MSG];
        body[0] = 10;
        body[1] = 1;
        body[4..6].copy_from_slice(&40000u16.to_be_bytes());
        body[6..8].copy_from_slice(&8080u16.to_be_bytes());
        body[4 + 28..4 + 32].copy_from_slice(&[0, 0, 0xff, 0xff]);
        body[4 + 32..4 + 36].copy_from_slice(&[198, 18, 0, 11]);
        body[4 + 40..4 + 44].copy_from_slice(&1u32.to_ne_bytes());
        body[4 + 44..4 + 48].copy_from_slice(&2u32.to_ne_bytes());
        let s = parse(&body, 6);
        assert_eq!((s.family, s.proto, s.state), (10, 6, 1));
        assert_eq!(s.dport, 8080u16.to_be());
        assert_eq!(s.dst[2], u32::from_ne_bytes([0, 0, 0xff, 0xff]));
        assert_eq!(s.dst[3], u32::from_ne_bytes([198, 18, 0, 11]));
        assert_eq!(s.cookie, 0x0000_0002_0000_0001);
        // SOCK_DESTROY names it with the same id.
        let r = request(s.family, s.proto, u32::MAX, &s.id);
        assert_eq!(&r[8..], &body[4..4 + SOCKID]);
        assert_eq!(r[0..2], [10, 6]);
    }

    #[test]
    fn netlink_messages_are_split_and_errors_read() {
        let mut buf = Vec::new();
        for (kind, seq, body) in [
            (20u16, 7u32, vec![1u8; 5]),
            (2, 8, vec![0; 4]),
            (2, 7, (-2i32).to_ne_bytes().to_vec()),
        ] {
            let len = NLMSG_HDR + body.len();
            buf.extend_from_slice(&(len as u32).to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(&[0, 0]);
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&[0; 4]);
            buf.extend_from_slice(&body);
            buf.resize((buf.len() + 3) & !3, 0);
        }
        let got = messages(&buf, 7);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (20, &[1u8; 5][..]));
        assert_eq!(got[1].0, NLMSG_ERROR);
        assert_eq!(ack_error(got[1].1).and_then(|e| e.raw_os_error()), Some(2));
        assert!(ack_error(&[0; 4]).is_none());
    }
}
