//! Checksum arithmetic (RFC 1624), on words in packet memory order. A change is summed as a
//! difference (`diff4`, `diff2`, `add`) and applied once (`apply`, or the skb helpers in TC,
//! which take the same difference).

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// One's complement sum of two partial sums (end-around carry).
#[inline(always)]
pub fn add(a: u32, b: u32) -> u32 {
    let s = a.wrapping_add(b);
    s.wrapping_add((s < b) as u32)
}

/// The difference a 32-bit word changing from `old` to `new` makes to a checksum's sum.
#[inline(always)]
pub fn diff4(old: u32, new: u32) -> u32 {
    add(!old, new)
}

/// The difference a 16-bit word changing from `old` to `new` makes.
#[inline(always)]
pub fn diff2(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// The sum of the differences of 32-bit words: summed in 64 bits, where no carry is lost, and
/// folded once (2^32 is 1 modulo 2^32 - 1, the one's complement modulus).
#[inline(always)]
pub fn diff_words<const N: usize>(old: &[u32; N], new: &[u32; N]) -> u32 {
    let mut s = 0u64;
    for i in 0..N {
        s += (!old[i]) as u64 + new[i] as u64;
    }
    // At most 2N (2^32 - 1), below 2^37: the first fold leaves at most 2^32 + 2^5, the second
    // a 32-bit value.
    let s = (s & 0xffff_ffff) + (s >> 32);
    ((s & 0xffff_ffff) + (s >> 32)) as u32
}

/// The checksum `check` after the data it covers changed by `diff`.
#[inline(always)]
pub fn apply(check: u16, diff: u32) -> u16 {
    !fold(add((!check) as u32, diff))
}

/// The checksum `check` after a 32-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    apply(check, diff4(old, new))
}

/// The checksum `check` after a 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    apply(check, diff2(old, new))
}
