//! Service lookup, backend selection with flow tracking, and the address rewrites, for either
//! address family (`af::Family`).
use crate::{
    af::{Family, NO_COPY, SEVERAL, VipList},
    clock::now_ns,
    hook::Hook,
    maps::{Ring, account, count, departures, flow_lost, is_member, maybe_reply},
    parse::{Packet, Packet6},
};
use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{
    BACKEND_VIPS, END_BACKEND_FIN, END_CLIENT_FIN, END_RESET, Flow, Flow6, FlowEntry, Service,
    Stat, connection_over,
};

/// The kernel's "exists" error of a map update with `BPF_NOEXIST`.
const EEXIST: i32 = 17;

/// What the translation stage did, or why it stopped.
pub enum Translated {
    /// Rewritten; the stat says how (new flow, tracked flow, reply).
    Rewritten(Stat),
    /// Not for a VIP and not a reply: leave it alone (always `Stat::PassNotOurs`; a payload
    /// every variant has keeps the verifier from seeing an unset register where they meet).
    Pass(Stat),
    /// For a VIP, but it cannot be served.
    Drop(Stat),
}

#[inline(always)]
pub fn translate<C: Hook, P: Family>(ctx: &C, p: &P) -> Translated {
    let flow = p.flow();
    // A reply first, so that replies do not pay for the VIP filter's hash (keyed by their
    // destination, a client, it would only say no). From a port no backend uses a packet is
    // not a reply: one word of an 8 KiB bitmap says so, all a packet to a VIP pays for it.
    // A packet from a backend's port that no flow explains goes on to the VIP path.
    if maybe_reply(P::source_port(&flow))
        && let Some((vip, port)) = P::reply_call(&flow, p.syn(), p.end())
    {
        // A reply's fragment that the table cannot take still goes: its later fragments then
        // pass as they are.
        let _ = p.remember_fragment(vip, false);
        p.set_src(ctx, vip, port);
        return Translated::Rewritten(Stat::Reply);
    }
    if P::maybe_vip(&flow) {
        // The flow entry first: a flow noted lately goes to its backend without the service.
        let entry = P::tracked_mut(&flow);
        if let Some(e) = entry
            && let Some(done) = noted_flow(ctx, p, e)
        {
            return done;
        }
        if let Some(svc) = P::service(&flow) {
            return to_backend(ctx, p, &flow, svc, entry);
        }
    }
    Translated::Pass(Stat::PassNotOurs)
}

/// A packet of a tracked flow whose entry was checked less than `FLOW_CHECK_MAX_AGE_NS` ago at
/// the present departures count of its service's id (`lb_svcdep_v1`): sent to its backend
/// without the service's lookup. The count changes when a backend leaves the service, before
/// the service leaves, and for the next service to take its id, so the note holds only for the
/// service and backends it was taken with. Anything else (no note, a SYN, FIN or RST, headers
/// to drop, a backend slot not live) takes `to_backend`, which decides as before.
#[inline(always)]
fn noted_flow<C: Hook, P: Family>(ctx: &C, p: &P, e: *mut FlowEntry) -> Option<Translated> {
    if p.syn() || p.end() != 0 || !p.consistent() {
        return None;
    }
    // SAFETY: a pointer from a successful lookup, copied out at once (as in `to_backend`).
    let held = unsafe { *e };
    let now = now_ns();
    if !held.checked_since(departures(held.service())?, now) {
        return None;
    }
    let (addr, port) = P::backend(held.backend())?;
    Some(send_to(
        ctx,
        p,
        (held.service(), held.backend()),
        (addr, port),
        Stat::Forwarded,
    ))
}

/// The last steps of a packet to a VIP whose backend is decided (`stat`: a new or a tracked
/// flow): its fragments are remembered, it is accounted to its service and backend (`ids`), and
/// its destination becomes the backend's address and port.
#[inline(always)]
fn send_to<C: Hook, P: Family>(
    ctx: &C,
    p: &P,
    ids: (u32, u32),
    (addr, port): (P::Addr, u16),
    stat: Stat,
) -> Translated {
    if p.remember_fragment(addr, true).is_err() {
        return Translated::Drop(Stat::DropFragment);
    }
    account(ids.0, ids.1, p.ip_len(), stat == Stat::NewFlow);
    p.set_dst(ctx, addr, port);
    Translated::Rewritten(stat)
}

/// The backend for a packet to a VIP: the tracked one while it still serves the service, else a
/// fresh pick from the service's live table. What the flow entry says is checked (membership,
/// reverse entry) at most once per `lb_common::FLOW_CHECK_MAX_AGE_NS` per flow and after every
/// departure from the service, and noted in the entry when it held (`FlowEntry::noted`).
#[inline(always)]
fn to_backend<C: Hook, P: Family>(
    ctx: &C,
    p: &P,
    flow: &P::Flow,
    svc: &Service,
    entry: Option<*mut FlowEntry>,
) -> Translated {
    if !p.consistent() {
        return Translated::Drop(Stat::DropMalformed);
    }
    let hash = P::hash(flow);
    let now = now_ns();
    // SAFETY: a pointer from a successful lookup, copied out at once (another CPU may note
    // checks in the entry meanwhile: a torn note only means one check more or less in 1 s).
    let current = entry.map(|e| unsafe { *e });
    let checked = current.is_some_and(|e| e.checked_since(svc.departures, now));
    let tracked = match current {
        // A SYN on a tracked 5-tuple whose connection is over, or whose backend another VIP's
        // flow from the same client port now holds, starts a new connection (the client reused
        // its port): picked afresh, so that `pick` checks that backend for a clash again. A
        // SYN of a live connection (a retransmission, a duplicate) keeps its backend.
        Some(e) if p.syn() && !still_ours::<P>(flow, &e) => None,
        Some(e) if e.service() == svc.id && (checked || is_member(svc.id, e.backend())) => {
            Some(e.backend())
        }
        Some(_) => None,
        None => {
            if p.established() {
                flow_lost();
            }
            None
        }
    };
    let (backend_id, stat) = match tracked {
        Some(b) => (b, Stat::Forwarded),
        None => match pick::<P>(flow, svc, hash, (p.end(), p.udp()), now) {
            Ok(b) => (b, Stat::NewFlow),
            Err(stat) => return Translated::Drop(stat),
        },
    };
    let Some((addr, port)) = P::backend(backend_id) else {
        return Translated::Drop(Stat::DropBadBackend);
    };
    // A new flow's entries were just written (`pick`), its backend is in the live table. A
    // tracked one is checked unless noted (a FIN or RST always is): a lean flow (its backend
    // serves no other VIP of the protocol) keeps its ends in its own entry; any other keeps its
    // reverse entry, which is put back when it was evicted.
    if stat == Stat::Forwarded
        && !(checked && p.end() == 0)
        && let (Some(e), Some(held)) = (entry, current)
    {
        let write = if lean_now::<P>(flow, (addr, port), backend_id) {
            let ends = held.ends() | p.end();
            if ends != held.ends() {
                Some(held.ending(ends))
            } else if ends == 0 && !checked {
                Some(held.noted(svc.departures, now))
            } else {
                // An ending flow's entry keeps its ends, and its packets take this path.
                None
            }
        } else {
            if keep_reply(p, flow, &P::reply_key(flow, addr, port)).is_err() {
                return Translated::Drop(Stat::DropFlowTable);
            }
            // Only a check renews the note: the bound is from the last one.
            (!checked).then(|| held.noted(svc.departures, now))
        };
        if let Some(w) = write {
            // SAFETY: the entry's pointer from the lookup above; a flow entry is only ever
            // replaced whole or written word by word, and both words keep its ids.
            unsafe {
                (*e).service_word = w.service_word;
                (*e).backend_word = w.backend_word;
            }
        }
    }
    send_to(ctx, p, (svc.id, backend_id), (addr, port), stat)
}

/// Whether the flow whose entry is `e` still holds its backend and its connection is not over:
/// its reverse entry is the flow's own and not over, or it has none (a lean flow, or one that
/// `keep_reply` puts back) and its entry's ends do not say over.
#[inline(always)]
fn still_ours<P: Family>(flow: &P::Flow, e: &FlowEntry) -> bool {
    let Some((addr, port)) = P::backend(e.backend()) else {
        return false;
    };
    match P::reply_entry(&P::reply_key(flow, addr, port)) {
        Some((a, vp, ends)) => (a, vp) == P::vip(flow) && !connection_over(ends),
        None => !connection_over(e.ends()),
    }
}

/// How many slots of a service's table a new flow looks at when its backend is taken (see
/// `claim`): its own and the next ones.
const CLASH_SLOTS: u32 = 8;

/// A new flow's backend id, recorded in both directions. The flow's slot of the service's live
/// table names it, unless that backend already carries a live flow from the same client address
/// and port to another VIP (`claim`): the backend would see one connection where the client has
/// two, and the first would break. Then the next two other backends named in the next slots
/// (`CLASH_SLOTS` in all) are tried; a TCP flow finding none is dropped (its client retries), a
/// UDP flow takes the last one tried.
///
/// The verifier walks each try whole (it is most of what it walks in a new flow): three tries
/// of distinct backends, not one a slot, and the slots are read before the second try, once.
/// `(end, udp)`: the segment's `Family::end`, and whether it is a UDP datagram.
#[inline(always)]
fn pick<P: Family>(
    flow: &P::Flow,
    svc: &Service,
    hash: u32,
    (end, udp): (u16, bool),
    now: u64,
) -> Result<u32, Stat> {
    if svc.active == 0 {
        return Err(Stat::DropNoBackend);
    }
    let ring = Ring::of(svc).ok_or(Stat::DropBadBackend)?;
    let first = ring.pick(hash).ok_or(Stat::DropBadBackend)?;
    // The first try may look for a lean flow holding the backend: see `try_backend`.
    let mut last = first;
    if try_backend::<P>(flow, first, (end, true))? {
        return track::<P>(flow, svc, first, (end, now));
    }
    // The other backends of the next slots, in their order (`first` where there is none).
    let (mut second, mut third) = (first, first);
    for step in 1..CLASH_SLOTS {
        let id = ring
            .pick(hash.wrapping_add(step))
            .ok_or(Stat::DropBadBackend)?;
        if second == first {
            second = id;
        } else if id != first && id != second {
            third = id;
            break;
        }
    }
    for id in [second, third] {
        if id == first {
            break;
        }
        last = id;
        if try_backend::<P>(flow, id, (end, false))? {
            count(Stat::PortClashMoved);
            return track::<P>(flow, svc, id, (end, now));
        }
    }
    if udp {
        // Taken whatever holds it.
        let (addr, port) = P::backend(last).ok_or(Stat::DropBadBackend)?;
        let (vip, vport) = P::vip(flow);
        P::set_reply(&P::reply_key(flow, addr, port), vip, vport, end, 0)
            .map_err(|_| Stat::DropFlowTable)?;
        if last != first {
            count(Stat::PortClashMoved);
        }
        return track::<P>(flow, svc, last, (end, now));
    }
    Err(Stat::DropPortClash)
}

/// Whether new flow `flow` may take backend `id` (its reverse entry, if it needs one, then
/// taken): a lean flow always may (no other VIP of its protocol reaches the backend); another
/// unless `claim` refuses. `first`: the flow's first try, the only one that looks for a lean
/// flow holding the backend (a later one follows a clash already, and the check in every try
/// would double what the verifier walks). A backend that never served a single VIP of a
/// protocol has none (`BACKEND_NO_LEAN`).
#[inline(always)]
fn try_backend<P: Family>(
    flow: &P::Flow,
    id: u32,
    (end, first): (u16, bool),
) -> Result<bool, Stat> {
    let (addr, port) = P::backend(id).ok_or(Stat::DropBadBackend)?;
    let record = P::record(addr, port);
    if sole::<P>(flow, record) {
        return Ok(true);
    }
    let lean = first && record.is_some_and(|v| !v.no_lean());
    claim::<P>(flow, &P::reply_key(flow, addr, port), id, (end, lean))
        .map_err(|_| Stat::DropFlowTable)
}

/// Records new flow `flow` through backend `id` of `svc` (its backend is in the live table and
/// its reverse entry, if it needs one, was just taken: as good as a check), and gives `id`. A
/// lean flow's first segment may carry a FIN or RST already (a client whose flow was lost): its
/// entry starts with it.
#[inline(always)]
fn track<P: Family>(
    flow: &P::Flow,
    svc: &Service,
    id: u32,
    (end, now): (u16, u64),
) -> Result<u32, Stat> {
    let entry = match end {
        0 => FlowEntry::new(svc.id, id).noted(svc.departures, now),
        _ => FlowEntry::new(svc.id, id).ending(end),
    };
    P::track(flow, &entry).map_err(|_| Stat::DropFlowTable)?;
    Ok(id)
}

/// Takes the reverse entry `reply` for a new flow to a VIP through backend `id`, noting the
/// segment's `end`. Refused (`Ok(false)`) when it belongs to a flow to another VIP whose
/// connection is not over (`connection_over`), or (`lean`) when there is none but a lean flow to
/// another VIP the backend serves holds it (`lean_holder`). The common case, no entry yet, costs
/// one insert.
#[inline(always)]
fn claim<P: Family>(
    flow: &P::Flow,
    reply: &P::Flow,
    id: u32,
    (end, lean): (u16, bool),
) -> Result<bool, i32> {
    let (vip, port) = P::vip(flow);
    match P::set_reply(reply, vip, port, end, BPF_NOEXIST as u64) {
        Ok(()) if lean && lean_holder::<P>(reply, id, (vip, port)) => {
            P::forget_reply(reply);
            return Ok(false);
        }
        Ok(()) => return Ok(true),
        Err(e) if e != -EEXIST => return Err(e),
        Err(_) => {}
    }
    if let Some((a, vp, ends)) = P::reply_entry(reply) {
        if (a != vip || vp != port) && !connection_over(ends) {
            return Ok(false);
        }
    }
    P::set_reply(reply, vip, port, end, 0).map(|()| true)
}

/// A tracked flow's reverse entry: put back when it was evicted (replies of a long-silent
/// backend still come from the VIP), and told when the client ends the connection (FIN, RST).
/// An entry another VIP's flow took (a UDP clash) is left to it.
#[inline(always)]
fn keep_reply<P: Family>(p: &P, flow: &P::Flow, reply: &P::Flow) -> Result<(), i32> {
    let (vip, port) = P::vip(flow);
    let end = p.end();
    match P::reply_entry(reply) {
        None => P::set_reply(reply, vip, port, end, 0),
        // Most segments: neither FIN nor RST, nothing to note.
        Some(_) if end == 0 => Ok(()),
        Some((a, vp, ends)) if a == vip && vp == port && ends & end != end => {
            P::set_reply(reply, vip, port, ends | end, 0)
        }
        Some(_) => Ok(()),
    }
}

/// The VIP address and port a reply of a translated flow gets as its source (`translate`
/// rewrites it); a backend's FIN or RST is noted in the reverse entry, or a lean flow's own
/// entry (`to_backend` notes the client's). None: not a reply. `syn` and `end` are the
/// segment's (`Family::syn`, `Family::end`). `Family::reply_call` runs it (IPv4: through
/// `lb_reply4`).
#[inline(always)]
pub fn from_backend<P: Family>(flow: &P::Flow, syn: bool, end: u16) -> Option<(P::Addr, u16)> {
    let (vip, port, ends, lean) = match reply_of::<P>(flow, true) {
        Some(ReplyOf::Reverse(vip, port, ends)) => (vip, port, ends, None),
        Some(ReplyOf::Lean(vip, port, e)) => {
            // SAFETY: a pointer from a successful lookup, copied out at once.
            let held = unsafe { *e };
            (vip, port, held.ends(), Some((e, held)))
        }
        None => return None,
    };
    if syn {
        // The connection through the VIP is over, and the backend answers a new one on the same
        // addresses and ports that did not come through the VIP (a SYN through it would have
        // renewed the flow): the client reached the backend directly, from a port it had used
        // for the VIP. Not ours; the flow's entries go, so the rest of that connection passes
        // too (a lean flow's ends may be in a reverse entry an older program kept for its VIP;
        // one of another VIP is a finished connection that went through that one).
        let reverse = match lean {
            Some(_) => match P::reply_entry(flow) {
                Some((a, vp, e)) if (a, vp) == (vip, port) => e,
                _ => 0,
            },
            None => 0,
        };
        if connection_over(ends | reverse) {
            P::forget_reply(flow);
            P::untrack(&P::client_flow(flow, vip, port));
            return None;
        }
    }
    let end = backend_end(end);
    if ends & end != end {
        match lean {
            // SAFETY: as above; the entry is replaced by one with the same ids.
            Some((e, held)) => unsafe { *e = held.ending(ends | end) },
            // Best effort: a full table only delays the note to the next such segment.
            None => {
                let _ = P::set_reply(flow, vip, port, ends | end, 0);
            }
        }
    }
    Some((vip, port))
}

/// The flow a reply key (backend -> client) belongs to.
pub enum ReplyOf<A> {
    /// Its reverse entry: the VIP's address and port, and how far the connection has ended.
    Reverse(A, u16, u16),
    /// A lean flow's entry (client -> VIP), with that VIP's address and port.
    Lean(A, u16, *mut FlowEntry),
}

/// The flow a reply key belongs to. A backend serving one VIP of the reply's protocol (the
/// usual case): that VIP's flow from the client, if its entry names this backend, else the
/// reverse entry (a flow of an older program). A backend of several VIPs: the reverse entry,
/// else a flow that was lean before its backend served more (its next check takes a reverse
/// entry) to any of them.
///
/// The one VIP and the id come first from this CPU's copy of the record (`Family::near_single`,
/// taken at most `RECORD_COPY_MAX_AGE_NS` ago, its id still this backend's), which spares the
/// record's lookup; without a lean flow there, the record decides as above. So for at most that
/// bound after a backend of one VIP of a protocol starts serving a second one, a reply finds a
/// lean flow to the first before a reverse entry: both at once exist only when a UDP flow was
/// forced onto a backend a lean flow from the same client port holds (`pick`), whose replies
/// are ambiguous either way. A copy that says the backend serves several VIPs (`SEVERAL`)
/// sends the reply to its reverse entry first, also without the record; a reverse entry whose
/// connection is over, or none, leaves it to the record. So for at most the bound after a
/// backend of several VIPs comes to serve one (its record keeps a VIP it left for the writer's
/// grace, 10 minutes), a UDP reply finds a reverse entry to the VIP it left before a lean flow
/// to the other from the same client port.
///
/// `copy`: whether to use and keep the copy (false for the ICMP errors that quote a flow: rare,
/// and each use inlined here is verified again).
#[inline(always)]
pub fn reply_of<P: Family>(reply: &P::Flow, copy: bool) -> Option<ReplyOf<P::Addr>> {
    let now = now_ns();
    let near = if copy {
        P::near_single(reply, now)
    } else {
        // Any defined address and port: the id says there is no copy.
        let (addr, port) = P::vip(reply);
        (addr, port, NO_COPY)
    };
    let (addr, port, id) = near;
    // A backend of several VIPs: its reverse entry, without the record, unless its connection
    // is over (the record then decides, as below).
    if id == SEVERAL
        && let Some((addr, port, ends)) = P::reply_entry(reply)
        && !connection_over(ends)
    {
        return Some(ReplyOf::Reverse(addr, port, ends));
    }
    if id != NO_COPY
        && id != SEVERAL
        && let Some(e) = lean_entry::<P>(reply, id, addr, port, true)
    {
        return Some(ReplyOf::Lean(addr, port, e));
    }
    let vips = P::backend_vips(reply);
    let proto = P::proto(reply);
    let single = vips.and_then(|v| v.single(proto));
    if let (Some(v), Some((addr, port))) = (vips, single)
        && near != (addr, port, v.id())
    {
        if copy {
            P::keep_single(reply, (addr, port), v.id(), false, now);
        }
        if let Some(e) = lean_entry::<P>(reply, v.id(), addr, port, false) {
            return Some(ReplyOf::Lean(addr, port, e));
        }
    }
    if let (Some(v), None) = (vips, single)
        && copy
        && id != SEVERAL
    {
        P::keep_single(reply, (addr, port), v.id(), true, now);
    }
    if let Some((addr, port, ends)) = P::reply_entry(reply) {
        return Some(ReplyOf::Reverse(addr, port, ends));
    }
    let v = vips?;
    if single.is_some() {
        return None;
    }
    for i in 0..BACKEND_VIPS {
        if let Some((addr, port, pr)) = v.vip(i)
            && pr == proto
            && let Some(e) = lean_entry::<P>(reply, v.id(), addr, port, false)
        {
            return Some(ReplyOf::Lean(addr, port, e));
        }
    }
    None
}

/// Whether tracked flow `flow`'s backend (`id`, at `addr`:`port`) serves the flow's VIP and no
/// other VIP of its protocol, as `sole` says, asked of this CPU's copy of the backend's record
/// first (`Family::near_single`, the copy a reply asks), else of the record, which is then
/// copied (`Family::copy_call`). So a flow's check makes no lookup in `lb_bevip_v1` while the
/// copy is younger than `RECORD_COPY_MAX_AGE_NS`: for at most that long after its backend came
/// to serve a second VIP of the protocol, a lean flow's check may still find it lean, and take
/// no reverse entry (its replies find it all the same, through the record; a new flow's
/// `try_backend` asks the record itself, and its first try finds such a lean flow holding the
/// backend: `lean_holder`).
#[inline(always)]
fn lean_now<P: Family>(flow: &P::Flow, (addr, port): (P::Addr, u16), id: u32) -> bool {
    let (vip, vip_port, copied) = P::near_single(&P::reply_key(flow, addr, port), now_ns());
    if copied == id {
        return (vip, vip_port) == P::vip(flow);
    }
    if copied == SEVERAL {
        return false;
    }
    let lean = sole::<P>(flow, P::record(addr, port));
    P::copy_call(flow, id);
    lean
}

/// The usual reply, decided in line before `lb_reply4` is called: a segment without SYN, FIN or
/// RST from a backend of one VIP (this CPU's copy of its record says which) to a lean flow of
/// that VIP, which names the backend. What `from_backend` decides of it, without a call: on a
/// CPU whose returns are mitigated (the bench's EPYC: `spec_rstack_overflow`, Safe RET) a call
/// made every reply about 25–30 ns dearer. None: anything else, which the caller leaves to
/// `from_backend` (which looks the copy, and a lean flow, up again: only for a reply that is not
/// the usual one, or a backend's packet that is no reply).
#[inline(always)]
pub fn lean_reply<P: Family>(reply: &P::Flow, syn: bool, end: u16) -> Option<(P::Addr, u16)> {
    if syn || end != 0 {
        return None;
    }
    let (addr, port, id) = P::near_single(reply, now_ns());
    if id == NO_COPY || id == SEVERAL {
        return None;
    }
    lean_entry::<P>(reply, id, addr, port, true).map(|_| (addr, port))
}

/// A segment's SYN bit and `Family::end`, as the reply functions take them.
#[inline(always)]
pub fn segment_bits(syn: bool, end: u16) -> u32 {
    (syn as u32) << 16 | end as u32
}

/// `from_backend` for an IPv4 flow, as a global function: the kernel verifies the reply
/// decision once, and its many ways out (not a reply) meet the VIP path as one state, not each
/// with its own registers and stack. In line, the VIP path was walked again for each: 78 times
/// in `lb_tc`, which the kernel verified in 172,259 instructions, 121,507 with this function
/// (`lean_reply` in line before it).
/// `bits`: `segment_bits`. The VIP's address in the low 32 bits, its port in the next 16, bit
/// 48 set; 0: not a reply.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_reply4(flow: *const Flow, bits: u32) -> u64 {
    // SAFETY: checked for null; the kernel checked that the caller passed a whole `Flow`.
    let Some(f) = (unsafe { flow.as_ref() }) else {
        return 0;
    };
    match from_backend::<Packet>(f, bits >> 16 & 1 != 0, bits as u16) {
        Some((vip, port)) => 1 << 48 | (port as u64) << 32 | vip as u64,
        None => 0,
    }
}

/// `Family::copy_recorded` for an IPv4 flow, as a global function (always 0): the kernel
/// verifies it once, not in each program's check path, and its stack is not the check path's.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_copy4(flow: *const Flow, id: u32) -> u32 {
    // SAFETY: checked for null; the kernel checked that the caller passed a whole `Flow`.
    if let Some(f) = unsafe { flow.as_ref() } {
        Packet::copy_recorded(f, id);
    }
    0
}

/// `Family::copy_recorded` for an IPv6 flow, as `lb_copy4`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_copy6(flow: *const Flow6, id: u32) -> u32 {
    // SAFETY: as in `lb_copy4`.
    if let Some(f) = unsafe { flow.as_ref() } {
        Packet6::copy_recorded(f, id);
    }
    0
}

/// Whether the backend of record `record` serves the flow's VIP and no other VIP of its
/// protocol (`lb_bevip_v1`): the flow is lean, its replies find its entry without a reverse
/// entry.
#[inline(always)]
fn sole<P: Family>(flow: &P::Flow, record: Option<&P::Vips>) -> bool {
    let (addr, port) = P::vip(flow);
    record.is_some_and(|v| v.sole(addr, port, P::proto(flow)))
}

/// The entry of the client's flow to VIP `addr`:`port` whose replies carry the key `reply`, if
/// it names backend `id`.
#[inline(always)]
fn lean_entry<P: Family>(
    reply: &P::Flow,
    id: u32,
    addr: P::Addr,
    port: u16,
    hot: bool,
) -> Option<*mut FlowEntry> {
    let client = P::client_flow(reply, addr, port);
    let e = if hot {
        P::tracked_mut(&client)
    } else {
        P::tracked_cold(&client)
    }?;
    // SAFETY: a pointer from a successful lookup.
    (unsafe { (*e).backend() } == id).then_some(e)
}

/// Whether a lean flow from the client of reply key `reply` to a VIP other than `vip` that
/// backend `id` serves holds that backend with a connection not over.
#[inline(always)]
fn lean_holder<P: Family>(reply: &P::Flow, id: u32, vip: (P::Addr, u16)) -> bool {
    let Some(v) = P::backend_vips(reply) else {
        return false;
    };
    let proto = P::proto(reply);
    for i in 0..BACKEND_VIPS {
        if let Some((addr, port, pr)) = v.vip(i)
            && pr == proto
            && (addr, port) != vip
            && let Some(e) = lean_entry::<P>(reply, id, addr, port, false)
            // SAFETY: a pointer from a successful lookup.
            && !connection_over(unsafe { (*e).ends() })
        {
            return true;
        }
    }
    false
}

/// A segment's FIN and RST bits (as `Family::end` gives them) as the backend's.
#[inline(always)]
fn backend_end(end: u16) -> u16 {
    let fin = if end & END_CLIENT_FIN != 0 {
        END_BACKEND_FIN
    } else {
        0
    };
    fin | (end & END_RESET)
}
