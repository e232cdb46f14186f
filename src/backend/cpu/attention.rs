//! Causal grouped-query attention with the FlashAttention-2 algorithm on the CPU.
//!
//! Forward: each task owns a block of query rows of one head and streams over key blocks, keeping a
//! running max, running sum and an unnormalised accumulator (online softmax); only the per-row
//! logsumexp is saved. Backward recomputes the probabilities from `lse` in two passes, one that owns
//! a key block (dK, dV) and one that owns a query block (dQ), so no two tasks ever write the same
//! element and no atomics or score matrices are needed. Memory is linear in sequence length.
//! Grouped-query attention indexes the shared K/V head directly; nothing is repeated.

use super::simd::{axpy, dot};
use super::SendPtr;
use crate::backend::AttnShape;
use rayon::prelude::*;

/// Query rows per forward / dQ task.
const BQ: usize = 32;
/// Key rows per tile (forward) and per dK/dV task.
const BK: usize = 64;

struct Layout {
    s: AttnShape,
}

impl Layout {
    #[inline]
    fn q(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.s.q_len + i) * self.s.n_head + h) * self.s.head_dim
    }
    #[inline]
    fn kv(&self, b: usize, j: usize, kvh: usize) -> usize {
        ((b * self.s.kv_stride + j) * self.s.n_kv_head + kvh) * self.s.head_dim
    }
    #[inline]
    fn lse(&self, b: usize, h: usize, i: usize) -> usize {
        (b * self.s.n_head + h) * self.s.q_len + i
    }
    fn group(&self) -> usize {
        self.s.n_head / self.s.n_kv_head
    }
    fn scale(&self) -> f32 {
        1.0 / (self.s.head_dim as f32).sqrt()
    }
    /// Keys visible to query row `i` (exclusive bound).
    #[inline]
    fn visible(&self, i: usize) -> usize {
        (self.s.q_pos0 + i + 1).min(self.s.kv_len)
    }
    fn check(&self) {
        let s = &self.s;
        assert!(s.n_kv_head > 0 && s.n_head.is_multiple_of(s.n_kv_head), "n_head must be a multiple of n_kv_head");
        assert!(s.kv_len <= s.kv_stride && s.q_pos0 + s.q_len <= s.kv_len, "attention shape {s:?}");
    }
}

pub fn attention_forward(out: &mut [f32], lse: &mut [f32], q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    let lay = Layout { s };
    lay.check();
    assert!(out.len() >= s.q_elems() && q.len() >= s.q_elems() && lse.len() >= s.lse_elems());
    assert!(k.len() >= s.kv_elems() && v.len() >= s.kv_elems());
    let hd = s.head_dim;
    let n_qblk = s.q_len.div_ceil(BQ);
    let (out_p, lse_p) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    let scale = lay.scale();
    (0..s.batch * s.n_head * n_qblk).into_par_iter().for_each(|task| {
        let (b, h, qb) = (task / (s.n_head * n_qblk), (task / n_qblk) % s.n_head, task % n_qblk);
        let kvh = h / lay.group();
        let (i0, i1) = (qb * BQ, ((qb + 1) * BQ).min(s.q_len));
        let rows = i1 - i0;
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0.0f32; rows];
        let mut acc = vec![0.0f32; rows * hd];
        let mut sc = vec![0.0f32; BK];
        let keys = lay.visible(i1 - 1);
        for j0 in (0..keys).step_by(BK) {
            let j1 = (j0 + BK).min(keys);
            for r in 0..rows {
                let i = i0 + r;
                let jmax = lay.visible(i).min(j1);
                if jmax <= j0 {
                    continue;
                }
                let qi = &q[lay.q(b, i, h)..][..hd];
                let mut tile_max = f32::NEG_INFINITY;
                for j in j0..jmax {
                    let x = scale * dot(qi, &k[lay.kv(b, j, kvh)..][..hd]);
                    sc[j - j0] = x;
                    tile_max = tile_max.max(x);
                }
                let m_new = m[r].max(tile_max);
                let corr = (m[r] - m_new).exp();
                let a = &mut acc[r * hd..(r + 1) * hd];
                if corr != 1.0 {
                    a.iter_mut().for_each(|x| *x *= corr);
                }
                let mut psum = 0.0f32;
                for j in j0..jmax {
                    let p = (sc[j - j0] - m_new).exp();
                    psum += p;
                    axpy(a, p, &v[lay.kv(b, j, kvh)..][..hd]);
                }
                l[r] = l[r] * corr + psum;
                m[r] = m_new;
            }
        }
        for r in 0..rows {
            let i = i0 + r;
            let inv = 1.0 / l[r];
            // SAFETY: task (b, h, qb) alone writes rows i0..i1 of head h of batch b.
            unsafe {
                let o = std::slice::from_raw_parts_mut(out_p.get().add(lay.q(b, i, h)), hd);
                for (o, a) in o.iter_mut().zip(&acc[r * hd..(r + 1) * hd]) {
                    *o = a * inv;
                }
                *lse_p.get().add(lay.lse(b, h, i)) = m[r] + l[r].ln();
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
) {
    let lay = Layout { s };
    lay.check();
    assert!(dq.len() >= s.q_elems() && dout.len() >= s.q_elems() && out.len() >= s.q_elems());
    assert!(dk.len() >= s.kv_elems() && dv.len() >= s.kv_elems() && lse.len() >= s.lse_elems());
    let hd = s.head_dim;
    let scale = lay.scale();

    // D_i = dO_i · O_i, the softmax-backward row term.
    let mut delta = vec![0.0f32; s.lse_elems()];
    delta.par_chunks_mut(s.q_len).enumerate().for_each(|(bh, d)| {
        let (b, h) = (bh / s.n_head, bh % s.n_head);
        for (i, d) in d.iter_mut().enumerate() {
            let o = lay.q(b, i, h);
            *d = dot(&dout[o..o + hd], &out[o..o + hd]);
        }
    });

    // Pass 1: dK and dV, one task per (batch, kv head, key block).
    let n_kblk = s.kv_len.div_ceil(BK);
    let (dk_p, dv_p) = (SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    (0..s.batch * s.n_kv_head * n_kblk).into_par_iter().for_each(|task| {
        let (b, kvh, kb) = (task / (s.n_kv_head * n_kblk), (task / n_kblk) % s.n_kv_head, task % n_kblk);
        let (j0, j1) = (kb * BK, ((kb + 1) * BK).min(s.kv_len));
        let mut dk_loc = vec![0.0f32; (j1 - j0) * hd];
        let mut dv_loc = vec![0.0f32; (j1 - j0) * hd];
        let first_q = j0.saturating_sub(s.q_pos0);
        for h in kvh * lay.group()..(kvh + 1) * lay.group() {
            for i in first_q..s.q_len {
                let jmax = lay.visible(i).min(j1);
                let qo = lay.q(b, i, h);
                let (qi, doi) = (&q[qo..qo + hd], &dout[qo..qo + hd]);
                let (li, di) = (lse[lay.lse(b, h, i)], delta[lay.lse(b, h, i)]);
                for j in j0..jmax {
                    let ko = lay.kv(b, j, kvh);
                    let p = (scale * dot(qi, &k[ko..ko + hd]) - li).exp();
                    let dp = dot(doi, &v[ko..ko + hd]);
                    let ds = p * (dp - di);
                    let r = (j - j0) * hd;
                    axpy(&mut dv_loc[r..r + hd], p, doi);
                    axpy(&mut dk_loc[r..r + hd], scale * ds, qi);
                }
            }
        }
        for j in j0..j1 {
            let (o, r) = (lay.kv(b, j, kvh), (j - j0) * hd);
            // SAFETY: task (b, kvh, kb) alone writes key rows j0..j1 of kv head kvh of batch b.
            unsafe {
                std::slice::from_raw_parts_mut(dk_p.get().add(o), hd).copy_from_slice(&dk_loc[r..r + hd]);
                std::slice::from_raw_parts_mut(dv_p.get().add(o), hd).copy_from_slice(&dv_loc[r..r + hd]);
            }
        }
    });
    // Rows of the K/V buffers past kv_len (cache slack) get no gradient.
    for b in 0..s.batch {
        let (from, to) = (lay.kv(b, s.kv_len, 0), lay.kv(b, s.kv_stride, 0));
        dk[from..to].fill(0.0);
        dv[from..to].fill(0.0);
    }

    // Pass 2: dQ, one task per (batch, head, query block).
    let n_qblk = s.q_len.div_ceil(BQ);
    let dq_p = SendPtr(dq.as_mut_ptr());
    (0..s.batch * s.n_head * n_qblk).into_par_iter().for_each(|task| {
        let (b, h, qb) = (task / (s.n_head * n_qblk), (task / n_qblk) % s.n_head, task % n_qblk);
        let kvh = h / lay.group();
        let mut dqi = vec![0.0f32; hd];
        for i in qb * BQ..((qb + 1) * BQ).min(s.q_len) {
            let qo = lay.q(b, i, h);
            let (qi, doi) = (&q[qo..qo + hd], &dout[qo..qo + hd]);
            let (li, di) = (lse[lay.lse(b, h, i)], delta[lay.lse(b, h, i)]);
            dqi.fill(0.0);
            for j in 0..lay.visible(i) {
                let ko = lay.kv(b, j, kvh);
                let kj = &k[ko..ko + hd];
                let p = (scale * dot(qi, kj) - li).exp();
                let ds = p * (dot(doi, &v[ko..ko + hd]) - di);
                axpy(&mut dqi, scale * ds, kj);
            }
            // SAFETY: task (b, h, qb) alone writes query rows of its block for head h.
            unsafe { std::slice::from_raw_parts_mut(dq_p.get().add(qo), hd).copy_from_slice(&dqi) };
        }
    });
}
