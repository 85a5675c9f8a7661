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

/// The Maglev seed an agent uses unless told otherwise (`--maglev-seed`): "lbctl_v1" in ASCII.
/// Part of the known-answer vectors: changing it moves flows (see the README's upgrade notes).
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

/// `table` for each backend list of `sets`, of `size(backends)` slots, built on as many
/// threads as the machine has CPUs (the tables are the same as `table` builds one by one).
pub fn tables(
    sets: &[Vec<String>],
    size: impl Fn(usize) -> u32 + Sync,
    seed: u64,
) -> Vec<Vec<u32>> {
    // Asked once: the answer reads the cgroup's CPU quota from its files.
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let threads = cpus.min(sets.len());
    let build = |b: &Vec<String>| table(b, size(b.len()), seed);
    if threads <= 1 {
        return sets.iter().map(build).collect();
    }
    let per = sets.len().div_ceil(threads);
    std::thread::scope(|s| {
        let workers: Vec<_> = sets
            .chunks(per)
            .map(|part| s.spawn(|| part.iter().map(build).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            // A worker only builds tables, which do not panic; were it to, so does the caller.
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("198.18.1.{i}:8080")).collect()
    }

    #[test]
    fn tables_on_threads_are_the_tables_one_by_one() {
        let sets: Vec<Vec<String>> = (1..12).map(names).collect();
        // Sizes that differ with the number of backends, as the writer's do.
        let size = |n: usize| if n < 6 { 509 } else { 1021 };
        let want: Vec<Vec<u32>> = sets
            .iter()
            .map(|b| table(b, size(b.len()), DEFAULT_SEED))
            .collect();
        assert_eq!(tables(&sets, size, DEFAULT_SEED), want);
        assert_eq!(want[0].len(), 509);
        assert_eq!(want[10].len(), 1021);
        assert!(tables(&[], size, DEFAULT_SEED).is_empty());
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

    // Known answers: literal values, computed once. A changed value moves flows between backends
    // across agent versions, a breaking change (README, "Upgrade notes"); the whole-table vectors
    // are in tests/tests/known_answers.rs, checked against an implementation of their own.

    /// The string hash: (name, seed, value).
    const HASHES: [(&str, u64, u64); 4] = [
        ("198.18.1.2:31000", DEFAULT_SEED, 0xc30d_65c7_f730_3c22),
        (
            "198.18.1.2:31000",
            DEFAULT_SEED ^ 0x9e37_79b9_7f4a_7c15,
            0x2fea_7ee1_ba63_d0a5,
        ),
        ("[2001:2:0:1::2]:8080", DEFAULT_SEED, 0x5dce_a264_7436_5ea1),
        ("", 0, 0xecba_3df2_c338_3c52),
    ];

    #[test]
    fn hash_known_answers() {
        for (name, seed, want) in HASHES {
            assert_eq!(hash(name.as_bytes(), seed), want, "{name:?} seed {seed:#x}");
        }
    }

    /// (name, table size, offset, skip), with the default seed.
    const PERMUTATIONS: [(&str, u64, u64, u64); 8] = [
        ("198.18.1.2:31000", 7, 0, 4),
        ("198.18.1.3:31000", 7, 0, 5),
        ("198.18.1.4:31000", 7, 6, 6),
        ("[2001:2:0:1::2]:8080", 7, 5, 5),
        ("198.18.1.2:31000", 16381, 11015, 12406),
        ("198.18.1.3:31000", 16381, 4751, 13973),
        ("198.18.1.4:31000", 16381, 277, 1506),
        ("[2001:2:0:1::2]:8080", 16381, 14884, 13571),
    ];

    #[test]
    fn permutation_known_answers() {
        for (name, m, offset, skip) in PERMUTATIONS {
            assert_eq!(
                permutation(name, m, DEFAULT_SEED),
                (offset, skip),
                "{name} in {m}"
            );
        }
    }

    /// Whole small tables, slot by slot (the three names above; five for 13 slots).
    #[test]
    fn table_known_answers() {
        let three: Vec<String> = (2..=4).map(|i| format!("198.18.1.{i}:31000")).collect();
        assert_eq!(table(&three, 7, DEFAULT_SEED), [0, 0, 2, 1, 0, 1, 2]);
        let five: Vec<String> = (2..=6).map(|i| format!("198.18.1.{i}:31000")).collect();
        assert_eq!(
            table(&five, 13, DEFAULT_SEED),
            [1, 0, 4, 1, 0, 2, 2, 4, 1, 0, 3, 3, 2]
        );
        assert_eq!(table(&five, 13, 0), [2, 4, 2, 3, 3, 0, 4, 1, 0, 1, 0, 1, 2]);
        assert!(table(&[], 13, 0).is_empty());
    }

    /// The table as the paper defines it (Eisenbud et al., NSDI 2016, Pseudocode 1), written here
    /// from the paper and not from `permutation` or `table`: offset = h1(name) mod M, skip =
    /// h2(name) mod (M - 1) + 1, where h1 and h2 are the string hash (pinned above) from the seed
    /// and from the seed xor the golden-ratio constant; permutation[i][j] = (offset + j * skip)
    /// mod M, one division per probe; backends take turns claiming their next free slot.
    fn paper(backends: &[String], size: u32, seed: u64) -> Vec<u32> {
        let m = size as u64;
        let permutation: Vec<Vec<u64>> = backends
            .iter()
            .map(|b| {
                let offset = hash(b.as_bytes(), seed) % m;
                let skip = hash(b.as_bytes(), seed ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1;
                (0..m).map(|j| (offset + j * skip) % m).collect()
            })
            .collect();
        let mut next = vec![0usize; backends.len()];
        let mut entry: Vec<Option<u32>> = vec![None; size as usize];
        let mut n = 0u64;
        'fill: loop {
            for (i, p) in permutation.iter().enumerate() {
                let mut c = p[next[i]];
                while entry[c as usize].is_some() {
                    next[i] += 1;
                    c = p[next[i]];
                }
                entry[c as usize] = Some(i as u32);
                next[i] += 1;
                n += 1;
                if n == m {
                    break 'fill;
                }
            }
        }
        entry.into_iter().map(|e| e.expect("filled")).collect()
    }

    #[test]
    fn matches_the_paper_definition() {
        for (n, size, seed) in [
            (1, 3, 0),
            (2, 3, 7),
            (3, 251, DEFAULT_SEED),
            (7, 1021, DEFAULT_SEED),
            (100, 16381, DEFAULT_SEED),
            (20, 16381, 0x1234),
            (5, 131071, DEFAULT_SEED),
        ] {
            let b = names(n);
            assert_eq!(
                table(&b, size, seed),
                paper(&b, size, seed),
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
