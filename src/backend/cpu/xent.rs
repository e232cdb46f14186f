//! Softmax cross-entropy fused with its gradient, written over the logits in place.

use super::simd::max;
use rayon::prelude::*;

pub fn cross_entropy(
    logits: &mut [f32],
    targets: &[i32],
    vocab: usize,
    grad_scale: Option<f32>,
) -> Vec<f32> {
    let mut losses = vec![0.0f32; targets.len()];
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .zip(losses.par_iter_mut())
        .for_each(|((row, &t), loss)| {
            if t < 0 {
                if grad_scale.is_some() {
                    row.fill(0.0);
                }
                return;
            }
            let m = max(row);
            // f64 for the partition sum: at vocab 32k a few ulps of f32 drift would show in log-probs.
            let s: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
            let lse = m + s.ln() as f32;
            *loss = lse - row[t as usize];
            if let Some(scale) = grad_scale {
                for x in row.iter_mut() {
                    *x = (*x - lse).exp() * scale;
                }
                row[t as usize] -= scale;
            }
        });
    losses
}
