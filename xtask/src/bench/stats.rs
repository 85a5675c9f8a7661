//! Medians and spreads of samples. Every figure the bench reports is one of these, computed from
//! the samples of one run.
use serde::Serialize;

/// Order statistics of a set of samples (nearest rank).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// `None` for no samples.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Summary {
            n: v.len(),
            min: v[0],
            p10: rank(&v, 0.10),
            p50: rank(&v, 0.50),
            p90: rank(&v, 0.90),
            p99: rank(&v, 0.99),
            max: v[v.len() - 1],
        })
    }

    pub fn of_u32(samples: &[u32]) -> Option<Summary> {
        Summary::of(&samples.iter().map(|x| *x as f64).collect::<Vec<_>>())
    }
}

/// The nearest-rank percentile `q` (0..=1) of sorted, non-empty `v`.
fn rank(v: &[f64], q: f64) -> f64 {
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[i - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&v).unwrap();
        assert_eq!(
            (s.min, s.p10, s.p50, s.p90, s.p99, s.max),
            (1.0, 10.0, 50.0, 90.0, 99.0, 100.0)
        );
        let one = Summary::of(&[7.0]).unwrap();
        assert_eq!((one.p10, one.p50, one.p99), (7.0, 7.0, 7.0));
        assert!(Summary::of(&[]).is_none());
    }
}
