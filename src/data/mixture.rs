//! Weighted mixing of sources, one training sequence at a time, as TinyLlama sampled SlimPajama and
//! StarCoderData.
//!
//! Sequence `k` (counting from the start of training) comes from the source picked by a hash of
//! `(seed, k)` against the cumulative weights, so the choice is stateless and deterministic. Each
//! source's stream is cut into non-overlapping windows of `seq_len + 1` tokens, visited in a
//! pseudo-random order that a keyed Feistel permutation gives per epoch (O(1) memory at any scale).
//! The position (sequence count plus each source's epoch and offset) is all a checkpoint needs.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCursor {
    pub epoch: u64,
    /// Windows of this epoch already used.
    pub used: u64,
}

/// Where the mixture stands; saved in checkpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MixState {
    /// Sequences drawn so far.
    pub sequences: u64,
    pub sources: Vec<SourceCursor>,
}

pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A bijection on `[0, n)` keyed by `key`: a 4-round Feistel network on the smallest even-bit
/// power of two ≥ n, with cycle-walking back into range.
pub fn permute(i: u64, n: u64, key: u64) -> u64 {
    debug_assert!(i < n);
    if n <= 1 {
        return 0;
    }
    let bits = (64 - (n - 1).leading_zeros()).max(2);
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    let mut x = i;
    loop {
        let (mut l, mut r) = (x >> half, x & mask);
        for round in 0..4u64 {
            let f = splitmix64(r ^ key.wrapping_add(round.wrapping_mul(0xA24B_AED4_963E_E407))) & mask;
            (l, r) = (r, l ^ f);
        }
        x = (l << half) | r;
        if x < n {
            return x;
        }
    }
}

pub struct Mixture {
    seed: u64,
    /// Cumulative normalised weights.
    cumulative: Vec<f64>,
    /// Windows per source.
    windows: Vec<u64>,
    pub state: MixState,
}

/// One drawn sequence: which source and which window of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Draw {
    pub source: usize,
    pub window: u64,
}

impl Mixture {
    /// `weights` need not sum to 1; `windows[s]` is how many `seq_len + 1` windows source `s` has.
    pub fn new(seed: u64, weights: &[f64], windows: Vec<u64>, state: Option<MixState>) -> Result<Mixture> {
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cumulative = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        let mut state = state.unwrap_or_default();
        if state.sources.is_empty() {
            state.sources = vec![SourceCursor::default(); weights.len()];
        }
        if state.sources.len() != weights.len() {
            bail!(
                "data.sources: the checkpoint's data position is for {} source(s), the config has {}; resuming needs \
                 the same sources (to change them, start a new run with model.init set to the checkpoint)",
                state.sources.len(),
                weights.len()
            );
        }
        Ok(Mixture { seed, cumulative, windows, state })
    }

    pub fn pick_source(&self, k: u64) -> usize {
        let u = (splitmix64(self.seed ^ splitmix64(k)) >> 11) as f64 / (1u64 << 53) as f64;
        self.cumulative.iter().position(|&c| u < c).unwrap_or(self.cumulative.len() - 1)
    }

    pub fn draw(&mut self) -> Draw {
        let source = self.pick_source(self.state.sequences);
        self.state.sequences += 1;
        let n = self.windows[source];
        let cur = &mut self.state.sources[source];
        // `>=`: a source resumed with fewer windows than its checkpoint had already used (its
        // data was replaced) starts its next epoch instead of asking for a window past its end.
        if cur.used >= n {
            cur.epoch += 1;
            cur.used = 0;
        }
        let key = splitmix64(self.seed ^ splitmix64((source as u64) << 32 ^ cur.epoch));
        let window = permute(cur.used, n, key);
        cur.used += 1;
        Draw { source, window }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_position_must_match_the_sources_and_survives_shrunken_data() {
        let mut a = Mixture::new(3, &[1.0], vec![20], None).unwrap();
        for _ in 0..15 {
            a.draw();
        }
        let e = Mixture::new(3, &[0.5, 0.5], vec![20, 4], Some(a.state.clone())).err().unwrap().to_string();
        assert!(
            e.starts_with("data.sources: the checkpoint's data position is for 1 source(s), the config has 2"),
            "{e}"
        );
        // The source now has 5 windows, 15 of which were used: a new epoch, not a window past the end.
        let mut b = Mixture::new(3, &[1.0], vec![5], Some(a.state.clone())).unwrap();
        let d = b.draw();
        assert!(d.window < 5 && b.state.sources[0].epoch == 1, "{d:?}");
    }

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1u64, 2, 3, 7, 64, 1000, 4097] {
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = permute(i, n, 12345) as usize;
                assert!(!seen[j]);
                seen[j] = true;
            }
        }
    }

    #[test]
    fn mixture_proportions_follow_the_weights() {
        let mut m = Mixture::new(7, &[0.693584, 0.306416], vec![50, 3], None).unwrap();
        let n = 100_000;
        let first = (0..n).filter(|_| m.draw().source == 0).count() as f64 / n as f64;
        // Binomial standard deviation at n = 1e5 is 0.0015; allow 4σ.
        assert!((first - 0.693584).abs() < 0.006, "{first}");
    }

    #[test]
    fn every_window_once_per_epoch_and_one_window_sources_repeat_it() {
        let mut m = Mixture::new(1, &[1.0], vec![5], None).unwrap();
        let mut epoch: Vec<u64> = (0..5).map(|_| m.draw().window).collect();
        epoch.sort();
        assert_eq!(epoch, vec![0, 1, 2, 3, 4]);
        let mut one = Mixture::new(1, &[1.0], vec![1], None).unwrap();
        assert!((0..10).all(|_| one.draw().window == 0));
    }

    #[test]
    fn resuming_from_a_state_continues_the_same_stream() {
        let mut a = Mixture::new(3, &[0.5, 0.5], vec![11, 4], None).unwrap();
        let _: Vec<_> = (0..17).map(|_| a.draw()).collect();
        let mut b = Mixture::new(3, &[0.5, 0.5], vec![11, 4], Some(a.state.clone())).unwrap();
        for _ in 0..50 {
            assert_eq!(a.draw(), b.draw());
        }
    }
}
