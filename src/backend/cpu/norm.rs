//! RMSNorm as Hugging Face's LlamaRMSNorm computes it: `w * (x * rsqrt(mean(x²) + eps))`.

use super::simd::{dot, sum};
use rayon::prelude::*;

/// Rows per task in the weight-gradient reduction; fixed so the summation order never depends on
/// the thread count.
const DW_ROWS: usize = 32;

pub fn forward(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], d: usize, eps: f32) {
    out.par_chunks_mut(d).zip(rstd.par_iter_mut()).zip(x.par_chunks(d)).for_each(|((o, r), x)| {
        let ms = dot(x, x) / d as f32;
        let rs = 1.0 / (ms + eps).sqrt();
        *r = rs;
        for i in 0..d {
            o[i] = w[i] * (x[i] * rs);
        }
    });
}

/// With `x̂ = x·rstd` and `g = dout ⊙ w`: `dx = rstd · (g − x̂ · mean(g ⊙ x̂))`, `dw = Σ_rows dout ⊙ x̂`.
pub fn backward(dx: &mut [f32], dw: &mut [f32], dout: &[f32], x: &[f32], w: &[f32], rstd: &[f32], d: usize) {
    dx.par_chunks_mut(d).zip(dout.par_chunks(d)).zip(x.par_chunks(d)).zip(rstd.par_iter()).for_each(
        |(((dx, dy), x), &rs)| {
            let mut gx = vec![0.0f32; d];
            for i in 0..d {
                gx[i] = dy[i] * w[i] * x[i] * rs;
            }
            let mean = sum(&gx) / d as f32;
            for i in 0..d {
                dx[i] += rs * (dy[i] * w[i] - x[i] * rs * mean);
            }
        },
    );
    let partials: Vec<Vec<f32>> = dout
        .par_chunks(d * DW_ROWS)
        .zip(x.par_chunks(d * DW_ROWS))
        .zip(rstd.par_chunks(DW_ROWS))
        .map(|((dy, x), rs)| {
            let mut acc = vec![0.0f32; d];
            for ((dy, x), &r) in dy.chunks(d).zip(x.chunks(d)).zip(rs) {
                for i in 0..d {
                    acc[i] += dy[i] * x[i] * r;
                }
            }
            acc
        })
        .collect();
    for p in &partials {
        for i in 0..d {
            dw[i] += p[i];
        }
    }
}
