//! Rotary position embedding in Hugging Face's `rotate_half` convention: element `i` of the first
//! half of a head pairs with element `i + head_dim/2`.

use crate::backend::RopeShape;
use rayon::prelude::*;

pub fn apply(x: &mut [f32], cos: &[f32], sin: &[f32], s: RopeShape, inverse: bool) {
    let half = s.head_dim / 2;
    let row_len = s.n_head * s.head_dim;
    x[..s.rows * row_len].par_chunks_mut(row_len).enumerate().for_each(|(r, row)| {
        let pos = s.pos0 + r % s.seq;
        let (c, sn) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
        for head in row.chunks_mut(s.head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                let sn = if inverse { -sn[i] } else { sn[i] };
                a[i] = x1 * c[i] - x2 * sn;
                b[i] = x2 * c[i] + x1 * sn;
            }
        }
    });
}
