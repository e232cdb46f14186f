//! AdamW with torch.optim.AdamW semantics: decoupled weight decay applied first, bias-corrected
//! moments, and `eps` added after the square root of the corrected second moment.

use crate::backend::AdamW;
use rayon::prelude::*;

const CHUNK: usize = 1 << 13;

pub fn step(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamW) {
    let t = hp.step as i32;
    let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(t);
    let step_size = (hp.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let decay = 1.0 - hp.lr * hp.weight_decay;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let g = g[i] * hp.grad_scale;
                p[i] *= decay;
                m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * g;
                v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * g * g;
                let denom = v[i].sqrt() / bc2_sqrt + hp.eps;
                p[i] -= step_size * m[i] / denom;
            }
        });
}
