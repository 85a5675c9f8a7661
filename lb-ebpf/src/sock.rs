//! The local path: cgroup `sock_addr` programs that load balance at the socket call, so that no
//! packet is ever rewritten. `connect()` and `sendmsg()` to a VIP get a backend from the
//! service's Maglev table (the packet path's maps); `getpeername()` and `recvmsg()` show the VIP
//! again. One small function per hook over shared steps; every call whose address is not a VIP
//! (or, for the reverse hooks, not a backend this socket was given) returns at once.
//!
//! A VIP without a backend taking new connections fails the call with ECONNREFUSED: the program
//! sets the return value (`bpf_set_retval(-ECONNREFUSED)`) and rejects the call; the kernel
//! keeps a set error instead of its default EPERM.
use crate::{
    maps::{backend4, backend6, is_member, ring_pick, service4, service6},
    sock_maps::{SOCK_FWD, SOCK_REV, sock_account, sock_count},
};
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::generated::{bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use core::ptr::{read_volatile, write_volatile};
use lb_common::{
    FlowEntry, PROTO_TCP, PROTO_UDP, ReplyEntry6, SOCK_FAMILY_V4, SOCK_FAMILY_V6, Service, SockKey,
    SockStat, sock_hash,
};

/// Let the call go on.
const ALLOW: i32 = 1;
/// Fail the call (with EPERM, or the error set by `bpf_set_retval`).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
/// The third word of an IPv4-mapped IPv6 address (::ffff:a.b.c.d), as it is in memory.
const V4_MAPPED: u32 = u32::to_be(0x0000_ffff);

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    forward(ctx.sock_addr, false)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    forward(ctx.sock_addr, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_send4(ctx: SockAddrContext) -> i32 {
    forward(ctx.sock_addr, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_send6(ctx: SockAddrContext) -> i32 {
    forward(ctx.sock_addr, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_peer4(ctx: SockAddrContext) -> i32 {
    reverse(ctx.sock_addr, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_peer6(ctx: SockAddrContext) -> i32 {
    reverse(ctx.sock_addr, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recv4(ctx: SockAddrContext) -> i32 {
    reverse(ctx.sock_addr, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recv6(ctx: SockAddrContext) -> i32 {
    reverse(ctx.sock_addr, true)
}

/// The address of a socket call: destination of connect/sendmsg, peer of getpeername, source
/// of recvmsg. An IPv4-mapped address of an IPv6 socket is an IPv4 one (`SOCK_FAMILY_V4`).
#[derive(Clone, Copy)]
struct Addr {
    addr: [u32; 4],
    port: u16,
    family: u8,
    proto: u8,
    /// Read from (and written back to) the IPv6 fields.
    v6_ctx: bool,
}

impl Addr {
    #[inline(always)]
    fn key(&self, cookie: u64, addr: [u32; 4], port: u16) -> SockKey {
        SockKey {
            cookie,
            addr,
            port,
            family: self.family,
            proto: self.proto,
            _pad: 0,
        }
    }
}

// SAFETY (every access to `*sa` below): the kernel hands the program a valid context; fields are
// read and written 4 bytes at a time, as the verifier requires of this context.

/// The call's address, if it is TCP or UDP.
#[inline(always)]
fn read(sa: *mut bpf_sock_addr, v6_ctx: bool) -> Option<Addr> {
    let (proto, port) = unsafe {
        (
            read_volatile(&(*sa).protocol),
            read_volatile(&(*sa).user_port),
        )
    };
    let proto = proto as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let (addr, family) = if v6_ctx {
        let a = unsafe {
            [
                read_volatile(&(*sa).user_ip6[0]),
                read_volatile(&(*sa).user_ip6[1]),
                read_volatile(&(*sa).user_ip6[2]),
                read_volatile(&(*sa).user_ip6[3]),
            ]
        };
        if a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED {
            ([a[3], 0, 0, 0], SOCK_FAMILY_V4)
        } else {
            (a, SOCK_FAMILY_V6)
        }
    } else {
        let a = unsafe { read_volatile(&(*sa).user_ip4) };
        ([a, 0, 0, 0], SOCK_FAMILY_V4)
    };
    Some(Addr {
        addr,
        port: port as u16,
        family,
        proto,
        v6_ctx,
    })
}

/// Writes `addr:port` (of `a`'s family) as the call's address.
#[inline(always)]
fn write(sa: *mut bpf_sock_addr, a: &Addr, addr: [u32; 4], port: u16) {
    unsafe {
        if !a.v6_ctx {
            write_volatile(&mut (*sa).user_ip4, addr[0]);
        } else if a.family == SOCK_FAMILY_V4 {
            // ::ffff: stays; the IPv4 address is the last word.
            write_volatile(&mut (*sa).user_ip6[3], addr[0]);
        } else {
            write_volatile(&mut (*sa).user_ip6[0], addr[0]);
            write_volatile(&mut (*sa).user_ip6[1], addr[1]);
            write_volatile(&mut (*sa).user_ip6[2], addr[2]);
            write_volatile(&mut (*sa).user_ip6[3], addr[3]);
        }
        write_volatile(&mut (*sa).user_port, port as u32);
    }
}

#[inline(always)]
fn service(a: &Addr) -> Option<&'static Service> {
    if a.family == SOCK_FAMILY_V4 {
        service4(a.addr[0], a.port, a.proto)
    } else {
        service6(a.addr, a.port, a.proto)
    }
}

#[inline(always)]
fn backend(a: &Addr, id: u32) -> Option<([u32; 4], u16)> {
    if a.family == SOCK_FAMILY_V4 {
        backend4(id).map(|(addr, port)| ([addr, 0, 0, 0], port))
    } else {
        backend6(id)
    }
}

#[inline(always)]
fn refuse(stat: SockStat) -> i32 {
    sock_count(stat);
    // SAFETY: a plain helper call; connect and sendmsg hooks may set the return value.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// connect() and sendmsg(): a VIP's address becomes a backend's. A UDP socket keeps the backend
/// it was given for this VIP while that backend still serves the service, and gets a new one
/// (same socket, same local port) when it left; a TCP socket connects once.
#[inline(always)]
fn forward(sa: *mut bpf_sock_addr, v6_ctx: bool) -> i32 {
    let Some(a) = read(sa, v6_ctx) else {
        return ALLOW;
    };
    let Some(svc) = service(&a) else {
        return ALLOW;
    };
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut _) };
    let udp = a.proto == PROTO_UDP;
    let vip_key = a.key(cookie, a.addr, a.port);
    let mut had = false;
    let mut kept = None;
    if udp && let Some(e) = unsafe { SOCK_FWD.get(&vip_key) } {
        had = true;
        if e.service() == svc.id && is_member(svc.id, e.backend()) {
            kept = Some(e.backend());
        }
    }
    let (id, new) = match kept {
        Some(b) => (b, false),
        None => {
            if svc.active == 0 {
                return refuse(SockStat::Refused);
            }
            match ring_pick(svc, sock_hash(cookie, &a.addr, a.port, a.proto)) {
                Some(b) => (b, true),
                None => return refuse(SockStat::BadBackend),
            }
        }
    };
    let Some((addr, port)) = backend(&a, id) else {
        return refuse(SockStat::BadBackend);
    };
    let back_key = a.key(cookie, addr, port);
    let vip = ReplyEntry6 {
        vip_addr: a.addr,
        vip_port: a.port,
        ends: 0,
    };
    if new {
        let entry = FlowEntry::new(svc.id, id);
        let recorded = SOCK_REV.insert(&back_key, &vip, 0).is_ok()
            && (!udp || SOCK_FWD.insert(&vip_key, &entry, 0).is_ok());
        if !recorded {
            sock_count(SockStat::StateFull);
        }
        sock_count(match (udp, had) {
            (false, _) => SockStat::Connect,
            (true, false) => SockStat::UdpPick,
            (true, true) => SockStat::Repick,
        });
        sock_account(svc.id, id);
    } else if unsafe { SOCK_REV.get(&back_key) }.is_none() {
        // The socket still sends to this VIP: its replies must keep showing it.
        if SOCK_REV.insert(&back_key, &vip, 0).is_ok() {
            sock_count(SockStat::StateEvicted);
        } else {
            sock_count(SockStat::StateFull);
        }
    }
    write(sa, &a, addr, port);
    ALLOW
}

/// getpeername() and recvmsg(): a backend this socket was given shows as the VIP it asked for.
#[inline(always)]
fn reverse(sa: *mut bpf_sock_addr, v6_ctx: bool) -> i32 {
    let Some(a) = read(sa, v6_ctx) else {
        return ALLOW;
    };
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut _) };
    if let Some(vip) = unsafe { SOCK_REV.get(&a.key(cookie, a.addr, a.port)) } {
        let (addr, port) = (vip.vip_addr, vip.vip_port);
        write(sa, &a, addr, port);
        sock_count(SockStat::Reverse);
    }
    ALLOW
}

const AF_INET6: u32 = 10;

/// A socket of the cgroup closes: a connected one (TCP, connected UDP) that the local path gave
/// a backend forgets its entries now rather than when the LRU needs their room. (An unconnected
/// UDP socket names no peer here: its entries age out of the LRU.)
#[cgroup_sock(sock_release)]
pub fn lb_release(ctx: SockContext) -> i32 {
    release(ctx.sock);
    ALLOW
}

#[inline(always)]
fn release(sk: *mut bpf_sock) {
    // SAFETY: the kernel hands the program a valid socket context; fields read at their size.
    let (family, proto, port) = unsafe {
        (
            read_volatile(&(*sk).family),
            read_volatile(&(*sk).protocol) as u8,
            read_volatile(&(*sk).dst_port),
        )
    };
    if (proto != PROTO_TCP && proto != PROTO_UDP) || port == 0 {
        return;
    }
    let (addr, fam) = if family == AF_INET6 {
        let a = unsafe {
            [
                read_volatile(&(*sk).dst_ip6[0]),
                read_volatile(&(*sk).dst_ip6[1]),
                read_volatile(&(*sk).dst_ip6[2]),
                read_volatile(&(*sk).dst_ip6[3]),
            ]
        };
        if a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED {
            ([a[3], 0, 0, 0], SOCK_FAMILY_V4)
        } else {
            (a, SOCK_FAMILY_V6)
        }
    } else {
        (
            [unsafe { read_volatile(&(*sk).dst_ip4) }, 0, 0, 0],
            SOCK_FAMILY_V4,
        )
    };
    let cookie = unsafe { bpf_get_socket_cookie(sk as *mut _) };
    let back = SockKey {
        cookie,
        addr,
        port,
        family: fam,
        proto,
        _pad: 0,
    };
    let Some(vip) = (unsafe { SOCK_REV.get(&back) }).copied() else {
        return;
    };
    let _ = SOCK_REV.remove(&back);
    let _ = SOCK_FWD.remove(&SockKey {
        addr: vip.vip_addr,
        port: vip.vip_port,
        ..back
    });
    sock_count(SockStat::Released);
}
