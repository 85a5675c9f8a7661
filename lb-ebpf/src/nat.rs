//! Service lookup, backend selection with flow tracking, and the address rewrites, for either
//! address family (`af::Family`).
use crate::{
    af::Family,
    hook::Hook,
    maps::{Ring, account, count, departures, flow_lost, is_member, maybe_reply},
};
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_ktime_get_coarse_ns};
use lb_common::{
    END_BACKEND_FIN, END_CLIENT_FIN, END_RESET, FlowEntry, Service, Stat, connection_over,
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
    // From a port no backend uses: not a reply, and no miss in the reply table to find out.
    if !maybe_reply(P::source_port(&flow)) {
        return Translated::Pass(Stat::PassNotOurs);
    }
    from_backend(ctx, p, &flow)
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
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
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
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: a pointer from a successful lookup, copied out at once (another CPU may note
    // checks in the entry meanwhile: a torn note only means one check more or less in 1 s).
    let current = entry.map(|e| unsafe { *e });
    let checked = current.is_some_and(|e| e.checked_since(svc.departures, now));
    let tracked = match current {
        // A SYN on a tracked 5-tuple whose connection is over, or whose backend another VIP's
        // flow from the same client port now holds, starts a new connection (the client reused
        // its port): picked afresh, so that `pick` checks that backend for a clash again. A
        // SYN of a live connection (a retransmission, a duplicate) keeps its backend.
        Some(e) if p.syn() && !still_ours::<P>(flow, e.backend()) => None,
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
        None => match pick(p, flow, svc, hash, now) {
            Ok(b) => (b, Stat::NewFlow),
            Err(stat) => return Translated::Drop(stat),
        },
    };
    let Some((addr, port)) = P::backend(backend_id) else {
        return Translated::Drop(Stat::DropBadBackend);
    };
    // A new flow's reverse entry was just taken (`claim`), its backend is in the live table; a
    // tracked one's is looked up unless noted (a FIN or RST always looks it up).
    if stat == Stat::Forwarded
        && !(checked && p.end() == 0)
        && keep_reply(p, flow, &P::reply_key(flow, addr, port)).is_err()
    {
        return Translated::Drop(Stat::DropFlowTable);
    }
    if stat == Stat::Forwarded
        && !checked
        && let (Some(e), Some(held)) = (entry, current)
    {
        // Only a check renews the note: the bound is from the last one.
        let noted = held.noted(svc.departures, now);
        // SAFETY: the entry's pointer from the lookup above; a flow entry is only ever replaced
        // whole or noted, word by word.
        unsafe {
            (*e).service_word = noted.service_word;
            (*e).backend_word = noted.backend_word;
        }
    }
    send_to(ctx, p, (svc.id, backend_id), (addr, port), stat)
}

/// Whether the reverse entry of `flow` through `backend` is the flow's own and its connection
/// is not over (a missing entry counts as its own: `keep_reply` puts it back).
#[inline(always)]
fn still_ours<P: Family>(flow: &P::Flow, backend: u32) -> bool {
    let Some((addr, port)) = P::backend(backend) else {
        return false;
    };
    match P::reply_entry(&P::reply_key(flow, addr, port)) {
        Some((a, vp, ends)) => (a, vp) == P::vip(flow) && !connection_over(ends),
        None => true,
    }
}

/// How many slots of a service's table a new flow tries when its backend is taken (see `claim`).
const CLASH_TRIES: u32 = 8;

/// A new flow's backend id, recorded in both directions. The flow's slot of the service's live
/// table names it, unless that backend already carries a live flow from the same client address
/// and port to another VIP (`claim`): the backend would see one connection where the client has
/// two, and the first would break. Then the next slots are tried; a TCP flow finding none is
/// dropped (its client retries), a UDP flow takes the last one tried.
#[inline(always)]
fn pick<P: Family>(p: &P, flow: &P::Flow, svc: &Service, hash: u32, now: u64) -> Result<u32, Stat> {
    if svc.active == 0 {
        return Err(Stat::DropNoBackend);
    }
    let end = p.end();
    let ring = Ring::of(svc).ok_or(Stat::DropBadBackend)?;
    let mut first = None;
    for step in 0..CLASH_TRIES {
        let id = ring
            .pick(hash.wrapping_add(step))
            .ok_or(Stat::DropBadBackend)?;
        let first = *first.get_or_insert(id);
        let (addr, port) = P::backend(id).ok_or(Stat::DropBadBackend)?;
        let force = p.udp() && step == CLASH_TRIES - 1;
        match claim::<P>(flow, &P::reply_key(flow, addr, port), end, force) {
            Ok(true) => {
                // Its backend is in the live table and its reverse entry was just taken: as
                // good as a check.
                let entry = FlowEntry::new(svc.id, id).noted(svc.departures, now);
                P::track(flow, &entry).map_err(|_| Stat::DropFlowTable)?;
                if id != first {
                    count(Stat::PortClashMoved);
                }
                return Ok(id);
            }
            Ok(false) => {}
            Err(_) => return Err(Stat::DropFlowTable),
        }
    }
    Err(Stat::DropPortClash)
}

/// Takes the reverse entry `reply` for a new flow to a VIP. Refused (`Ok(false)`) when it
/// belongs to a flow to another VIP whose connection is not over (`connection_over`), unless
/// `force`. The common case, no entry yet, costs one insert.
#[inline(always)]
fn claim<P: Family>(flow: &P::Flow, reply: &P::Flow, end: u16, force: bool) -> Result<bool, i32> {
    let (vip, port) = P::vip(flow);
    match P::set_reply(reply, vip, port, end, BPF_NOEXIST as u64) {
        Ok(()) => return Ok(true),
        Err(e) if e != -EEXIST => return Err(e),
        Err(_) => {}
    }
    if !force {
        if let Some((a, vp, ends)) = P::reply_entry(reply) {
            if (a != vip || vp != port) && !connection_over(ends) {
                return Ok(false);
            }
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

/// A reply of a translated flow gets the VIP as its source; a backend's FIN or RST is noted in
/// the reverse entry (`keep_reply` notes the client's).
#[inline(always)]
fn from_backend<C: Hook, P: Family>(ctx: &C, p: &P, flow: &P::Flow) -> Translated {
    match P::reply_entry(flow) {
        // The connection through the VIP is over, and the backend answers a new one on the same
        // addresses and ports that did not come through the VIP (a SYN through it would have
        // renewed the entry): the client reached the backend directly, from a port it had used
        // for the VIP. Not ours; the entry goes, so the rest of that connection passes too.
        // The client flow's note of its last check goes too: its next segment through the VIP
        // looks the entry up again and puts it back.
        Some((vip, port, ends)) if p.syn() && connection_over(ends) => {
            P::forget_reply(flow);
            if let Some(e) = P::tracked_mut(&P::client_flow(flow, vip, port)) {
                // SAFETY: a pointer from a successful lookup; the ids stay, the note goes.
                unsafe { *e = FlowEntry::new((*e).service(), (*e).backend()) };
            }
            Translated::Pass(Stat::PassNotOurs)
        }
        Some((addr, port, ends)) => {
            let end = backend_end(p.end());
            if ends & end != end {
                // Best effort: a full table only delays the note to the next such segment.
                let _ = P::set_reply(flow, addr, port, ends | end, 0);
            }
            // A reply's fragment that the table cannot take still goes: its later fragments
            // then pass as they are.
            let _ = p.remember_fragment(addr, false);
            p.set_src(ctx, addr, port);
            Translated::Rewritten(Stat::Reply)
        }
        None => Translated::Pass(Stat::PassNotOurs),
    }
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
