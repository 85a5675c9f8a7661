//! Incremental checksum updates (RFC 1624), on 16-bit words in packet memory order.

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The checksum `check` after a 32-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let nold = !old;
    let s = (!check) as u32 + (nold & 0xffff) + (nold >> 16) + (new & 0xffff) + (new >> 16);
    !fold(s)
}

/// The checksum `check` after a 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let s = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(s)
}
