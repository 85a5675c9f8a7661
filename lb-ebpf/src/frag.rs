//! Later fragments of an IPv4 datagram carry no ports: they get the address their first fragment
//! got (destination towards a backend, source for a reply from a VIP), as `lb_frag_v1` recorded
//! it. A later fragment that arrives before its first one, or whose datagram is not ours, passes
//! untouched. The L4 checksum lives in the first fragment, which was fixed for the whole datagram.
use crate::{
    csum,
    hook::Hook,
    maps::FRAGMENTS,
    nat::Translated,
    parse::{IP_CHECK_OFF, Ipv4Hdr},
};
use lb_common::{FragKey, Stat};

#[inline(always)]
pub fn translate<C: Hook>(ctx: &C, ip: *mut Ipv4Hdr) -> Translated {
    // SAFETY: the header was bounds checked by parse(); hash values are only read.
    unsafe {
        let key = FragKey {
            src: (*ip).saddr,
            dst: (*ip).daddr,
            id: (*ip).id,
            proto: (*ip).proto,
            _pad: 0,
        };
        let Some(e) = FRAGMENTS.get(&key) else {
            return Translated::Pass(Stat::PassNotOurs);
        };
        let (addr, to_backend) = (e.addr, e.dst != 0);
        let field = if to_backend {
            &mut (*ip).daddr
        } else {
            &mut (*ip).saddr
        };
        let old = *field;
        *field = addr;
        ctx.csum_l3(&raw mut (*ip).check, IP_CHECK_OFF, csum::diff4(old, addr));
        Translated::Rewritten(if to_backend {
            Stat::Forwarded
        } else {
            Stat::Reply
        })
    }
}
