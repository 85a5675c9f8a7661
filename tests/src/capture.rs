//! Frames as an interface receives them, with the kernel's checksum state: an `AF_PACKET` socket
//! bound to one interface, with `PACKET_AUXDATA`, so that a test sees whether a frame still holds
//! a partial checksum (CHECKSUM_PARTIAL: `TP_STATUS_CSUMNOTREADY`, the L4 field holding only the
//! pseudo-header's sum for the device to finish).
use std::time::{Duration, Instant};

/// `tp_status` bit: the frame's checksum is partial (not computed yet).
pub const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;

/// One received frame and its `tp_status`.
pub struct Captured {
    pub frame: Vec<u8>,
    pub status: u32,
}

/// A packet socket on one interface (of the namespace the calling thread is in).
pub struct Capture {
    fd: i32,
}

#[repr(C)]
struct AuxData {
    tp_status: u32,
    tp_len: u32,
    tp_snaplen: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_vlan_tci: u16,
    tp_vlan_tpid: u16,
}

const PACKET_AUXDATA: i32 = 8;

impl Capture {
    /// Starts capturing every frame `iface` receives.
    pub fn open(iface: &str) -> Capture {
        let name = std::ffi::CString::new(iface).expect("interface name");
        // SAFETY: plain system calls on a socket this function owns; every pointer handed to the
        // kernel points at a live local of the size given.
        unsafe {
            let index = libc::if_nametoindex(name.as_ptr());
            assert!(index != 0, "no interface {iface}");
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = index as i32;
            let rc = libc::bind(
                fd,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert!(rc == 0, "bind: {}", std::io::Error::last_os_error());
            let one: i32 = 1;
            let rc = libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                PACKET_AUXDATA,
                (&raw const one).cast(),
                4,
            );
            assert!(
                rc == 0,
                "PACKET_AUXDATA: {}",
                std::io::Error::last_os_error()
            );
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            let rc = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            assert!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
            Capture { fd }
        }
    }

    /// The first frame received within `timeout` for which `want` is true.
    pub fn next(&self, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Captured> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(c) = self.recv()
                && want(&c.frame)
            {
                return Some(c);
            }
        }
        None
    }

    fn recv(&self) -> Option<Captured> {
        let mut buf = vec![0u8; 65536];
        let mut control = [0u64; 16];
        // SAFETY: recvmsg(2) writes at most the sizes given into `buf` and `control`, both alive
        // for the call; the control messages are read within the length the kernel returned.
        unsafe {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            let n = libc::recvmsg(self.fd, &raw mut msg, libc::MSG_TRUNC);
            if n < 0 {
                return None;
            }
            buf.truncate((n as usize).min(buf.len()));
            let mut status = 0;
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == PACKET_AUXDATA {
                    let aux = libc::CMSG_DATA(c).cast::<AuxData>().read_unaligned();
                    status = aux.tp_status;
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
            Some(Captured { frame: buf, status })
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // SAFETY: closing the socket this value owns.
        unsafe { libc::close(self.fd) };
    }
}
