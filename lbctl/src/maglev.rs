//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): each backend walks the table in its own
//! permutation and claims slots in turn, so every backend gets an almost equal share and a change
//! of the backend set moves few slots. The table depends only on the sorted backend list, the
//! size and the seed, so every agent given the same state builds the same table.

/// FNV-1a over `bytes`, started from `seed`.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // A final mix, as FNV's low bits are weak.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

pub const DEFAULT_SEED: u64 = 0x6c62_6374_6c5f_7631;

/// A backend's permutation of a table of `m` slots: where it starts and its step (1 to m - 1,
/// so that with `m` prime it visits every slot).
fn permutation(backend: &str, m: u64, seed: u64) -> (u64, u64) {
    let offset = hash(backend.as_bytes(), seed) % m;
    let skip = hash(backend.as_bytes(), seed ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1;
    (offset, skip)
}

/// Fills a table of `size` slots (a prime) with indexes into `backends` (names, e.g.
/// "addr:port"). An empty backend list gives an empty table.
pub fn table(backends: &[String], size: u32, seed: u64) -> Vec<u32> {
    let n = backends.len();
    if n == 0 {
        return Vec::new();
    }
    let m = size as u64;
    let perms: Vec<(u64, u64)> = backends.iter().map(|b| permutation(b, m, seed)).collect();
    // Each backend's position in its permutation, `(offset + k * skip) % size` for its k-th
    // probe, advanced by one addition (skip < size) instead of a division per probe.
    let mut pos: Vec<u64> = perms.iter().map(|(offset, _)| *offset).collect();
    let mut entry = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'outer: loop {
        for i in 0..n {
            let skip = perms[i].1;
            let mut c = pos[i];
            while entry[c as usize] != u32::MAX {
                c += skip;
                if c >= m {
                    c -= m;
                }
            }
            entry[c as usize] = i as u32;
            c += skip;
            if c >= m {
                c -= m;
            }
            pos[i] = c;
            filled += 1;
            if filled == m {
                break 'outer;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("198.18.1.{i}:8080")).collect()
    }

    #[test]
    fn shares_are_even() {
        let t = table(&names(7), 1021, DEFAULT_SEED);
        let mut counts = [0usize; 7];
        for i in &t {
            counts[*i as usize] += 1;
        }
        for c in counts {
            assert!((140..=152).contains(&c), "{counts:?}");
        }
    }

    /// The table as the paper defines it, with a division per probe: the fast one must match it
    /// slot for slot (agents of different versions must agree).
    fn reference(backends: &[String], size: u32, seed: u64) -> Vec<u32> {
        let m = size as u64;
        let perms: Vec<(u64, u64)> = backends.iter().map(|b| permutation(b, m, seed)).collect();
        let mut next = vec![0u64; backends.len()];
        let mut entry = vec![u32::MAX; size as usize];
        let mut filled = 0u64;
        while filled < m {
            for (i, (offset, skip)) in perms.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m;
                while entry[c as usize] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                entry[c as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break;
                }
            }
        }
        entry
    }

    #[test]
    fn matches_the_reference_definition() {
        for (n, size, seed) in [
            (1, 3, 0),
            (2, 3, 7),
            (3, 251, DEFAULT_SEED),
            (7, 1021, DEFAULT_SEED),
            (100, 16381, DEFAULT_SEED),
            (1000, 16381, 0x1234),
            (5, 131071, DEFAULT_SEED),
        ] {
            let b = names(n);
            assert_eq!(
                table(&b, size, seed),
                reference(&b, size, seed),
                "{n} backends, {size} slots"
            );
        }
    }

    #[test]
    fn deterministic_and_minimal_disruption() {
        let a = table(&names(10), 1021, DEFAULT_SEED);
        assert_eq!(a, table(&names(10), 1021, DEFAULT_SEED));
        // Remove backend 9: slots of the others mostly stay.
        let b = table(&names(9), 1021, DEFAULT_SEED);
        let moved = a.iter().zip(&b).filter(|(x, y)| **x != 9 && x != y).count();
        assert!(moved < 1021 / 10, "{moved} slots moved");
    }
}
