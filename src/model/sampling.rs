//! Next-token selection: greedy at temperature 0, otherwise temperature, top-k and top-p (nucleus)
//! filtering in the order transformers applies them, drawn from a seeded ChaCha stream.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy, Debug)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: ChaCha8Rng,
}

/// Index of the largest logit; the first one on ties, as `torch.argmax` returns.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, x / p.temperature))
            .collect();
        // Highest first; ties by lower id so the order is fully determined.
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(p.top_k.max(1));
        }
        let m = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|&(_, x)| ((x - m) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, &q) in probs.iter().enumerate() {
                mass += q;
                if mass >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (i, &q) in probs.iter().enumerate() {
            if u < q {
                return cand[i].0;
            }
            u -= q;
        }
        cand[probs.len() - 1].0
    }
}
