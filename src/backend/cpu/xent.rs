//! Softmax cross-entropy fused with its gradient, written over the logits in place.

use super::simd::{exp_shifted_in_place, exp_shifted_sum, max};
use rayon::prelude::*;

pub fn cross_entropy(logits: &mut [f32], targets: &[i32], vocab: usize, grad_scale: Option<f32>) -> Vec<f32> {
    let mut losses = vec![0.0f32; targets.len()];
    logits.par_chunks_mut(vocab).zip(targets.par_iter()).zip(losses.par_iter_mut()).for_each(|((row, &t), loss)| {
        if t < 0 {
            if grad_scale.is_some() {
                row.fill(0.0);
            }
            return;
        }
        let m = max(row);
        let target_logit = row[t as usize];
        // The partition sum is accumulated in f64: at a 32k vocabulary, f32 accumulation drifts
        // by enough ulps to show in log-probabilities.
        let z: f64 = match grad_scale {
            // Training: keep exp(x − m) in place so the gradient pass needs no second exp.
            Some(_) => exp_shifted_in_place(row, m),
            None => exp_shifted_sum(row, m),
        };
        *loss = m + z.ln() as f32 - target_logit;
        if let Some(scale) = grad_scale {
            let k = (scale as f64 / z) as f32;
            row.iter_mut().for_each(|x| *x *= k);
            row[t as usize] -= scale;
        }
    });
    losses
}
