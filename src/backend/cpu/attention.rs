//! Causal grouped-query attention with the FlashAttention-2 algorithm on the CPU.
//!
//! Forward: each task owns a block of query rows of one head and streams over key tiles, keeping a
//! running max, running sum and an unnormalised accumulator (online softmax); only the per-row
//! logsumexp is saved. Backward recomputes the probabilities from `lse` in two passes, one that owns
//! a key tile (dK, dV) and one that owns a query block (dQ), so no two tasks ever write the same
//! element and no atomics or score matrices are needed. Memory is linear in sequence length.
//! Grouped-query attention indexes the shared K/V head directly; nothing is repeated.
//!
//! Every product is a small GEMM on a tile (`S = Q·Kᵀ`, `O += P·V`, `dP = dO·Vᵀ`, `dV += Pᵀ·dO`,
//! `dK += dSᵀ·Q`, `dQ += dS·K`) through the `gemm` crate, single-threaded inside each rayon task,
//! with transposes and head strides expressed as strides (no copies); the exponentials run over
//! whole tile rows in vector code. Per-pair dot products ran at a tenth of the GEMM rate.

use super::simd::{dot, exp_nonpositive, exp_shifted, exp_shifted_in_place, max};
use super::SendPtr;
use crate::backend::AttnShape;
use rayon::prelude::*;

/// Query rows per forward / dQ task, and per tile of the dK/dV pass.
const BQ: usize = 32;
/// Key rows per tile, and per dK/dV task.
const BK: usize = 64;

/// `c (+)= beta · a · b` on one tile, single-threaded (each call runs inside a rayon task). `c` is
/// row-major `[m, n]` with row stride `ldc`; element `(r, p)` of `a` is at `a + r·a_rs + p·a_cs`,
/// likewise `b`, so transposes and strided heads need no copies.
///
/// # Safety
/// Every addressed element of `a`, `b` and `c` must be in bounds, and `c` must not overlap them.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_gemm(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs, b_cs): (*const f32, usize, usize),
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

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
    let (hd, qs, ks) = (s.head_dim, s.n_head * s.head_dim, s.n_kv_head * s.head_dim);
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
        let mut sc = vec![0.0f32; BQ * BK];
        let q_blk = &q[lay.q(b, i0, h)..];
        let keys = lay.visible(i1 - 1);
        for j0 in (0..keys).step_by(BK) {
            let bk = (j0 + BK).min(keys) - j0;
            let (k_t, v_t) = (&k[lay.kv(b, j0, kvh)..], &v[lay.kv(b, j0, kvh)..]);
            // SAFETY: rows i0..i1 of head h and keys j0..j0+bk of head kvh are inside q and k
            // (checked shape), and `sc` is a separate buffer of BQ·BK values.
            unsafe {
                tile_gemm(
                    (rows, bk, hd),
                    sc.as_mut_ptr(),
                    BK,
                    false,
                    (q_blk.as_ptr(), qs, 1),
                    (k_t.as_ptr(), 1, ks),
                    1.0,
                )
            };
            for r in 0..rows {
                let srow = &mut sc[r * BK..r * BK + bk];
                // Keys this row sees in the tile (the causal edge only cuts the last tiles).
                let nv = lay.visible(i0 + r).saturating_sub(j0).min(bk);
                if nv == 0 {
                    srow.fill(0.0);
                    continue;
                }
                srow[..nv].iter_mut().for_each(|x| *x *= scale);
                let m_new = m[r].max(max(&srow[..nv]));
                let corr = exp_nonpositive(m[r] - m_new);
                if corr != 1.0 {
                    acc[r * hd..(r + 1) * hd].iter_mut().for_each(|x| *x *= corr);
                }
                let psum = exp_shifted_in_place(&mut srow[..nv], m_new) as f32;
                srow[nv..].fill(0.0);
                l[r] = l[r] * corr + psum;
                m[r] = m_new;
            }
            // SAFETY: as above for v; `acc` is [rows, hd].
            unsafe {
                tile_gemm((rows, hd, bk), acc.as_mut_ptr(), hd, true, (sc.as_ptr(), BK, 1), (v_t.as_ptr(), ks, 1), 1.0)
            };
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

/// What the backward recomputes its tiles from.
struct BackwardInputs<'a> {
    lay: &'a Layout,
    q: &'a [f32],
    dout: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    lse: &'a [f32],
    delta: &'a [f32],
}

impl BackwardInputs<'_> {
    /// Recomputes the tile of query rows `i0..i0+rows` of head `h` against keys `j0..j0+bk` of its
    /// KV head (both passes need it): `p = exp(scale·Q·Kᵀ − lse)` and `dp = p ∘ (dO·Vᵀ − delta)`,
    /// as `[rows, BK]` row-major, both zero where the causal mask hides a key.
    fn tile(
        &self,
        b: usize,
        h: usize,
        (i0, rows): (usize, usize),
        (j0, bk): (usize, usize),
        p: &mut [f32],
        dp: &mut [f32],
    ) {
        let (lay, s) = (self.lay, &self.lay.s);
        let (hd, qs, ks) = (s.head_dim, s.n_head * s.head_dim, s.n_kv_head * s.head_dim);
        let kvh = h / lay.group();
        let (q_blk, do_blk) = (&self.q[lay.q(b, i0, h)..], &self.dout[lay.q(b, i0, h)..]);
        let (k_t, v_t) = (&self.k[lay.kv(b, j0, kvh)..], &self.v[lay.kv(b, j0, kvh)..]);
        assert!(rows <= BQ && bk <= BK && p.len() >= BQ * BK && dp.len() >= BQ * BK);
        // SAFETY: rows i0..i0+rows of head h and keys j0..j0+bk of head kvh lie inside the checked
        // shape; p and dp hold [BQ, BK] and are separate buffers.
        unsafe {
            tile_gemm((rows, bk, hd), p.as_mut_ptr(), BK, false, (q_blk.as_ptr(), qs, 1), (k_t.as_ptr(), 1, ks), 1.0);
            tile_gemm((rows, bk, hd), dp.as_mut_ptr(), BK, false, (do_blk.as_ptr(), qs, 1), (v_t.as_ptr(), 1, ks), 1.0);
        }
        let scale = lay.scale();
        for r in 0..rows {
            let (prow, dprow) = (&mut p[r * BK..r * BK + bk], &mut dp[r * BK..r * BK + bk]);
            // Keys of the tile this row sees (the causal edge only cuts the last tiles).
            let nv = lay.visible(i0 + r).saturating_sub(j0).min(bk);
            let at = lay.lse(b, h, i0 + r);
            prow[..nv].iter_mut().for_each(|x| *x *= scale);
            exp_shifted(&mut prow[..nv], self.lse[at]);
            prow[nv..].fill(0.0);
            for (d, &pv) in dprow.iter_mut().zip(prow.iter()) {
                *d = pv * (*d - self.delta[at]);
            }
        }
    }
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
    let (hd, qs, ks) = (s.head_dim, s.n_head * s.head_dim, s.n_kv_head * s.head_dim);
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
    let inputs = BackwardInputs { lay: &lay, q, dout, k, v, lse, delta: &delta };

    // Pass 1: dK and dV, one task per (batch, kv head, key tile), over every query block of every
    // head of its group that can see the tile.
    let n_kblk = s.kv_len.div_ceil(BK);
    let (dk_p, dv_p) = (SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    (0..s.batch * s.n_kv_head * n_kblk).into_par_iter().for_each(|task| {
        let (b, kvh, kb) = (task / (s.n_kv_head * n_kblk), (task / n_kblk) % s.n_kv_head, task % n_kblk);
        let (j0, j1) = (kb * BK, ((kb + 1) * BK).min(s.kv_len));
        let bk = j1 - j0;
        let mut dk_loc = vec![0.0f32; bk * hd];
        let mut dv_loc = vec![0.0f32; bk * hd];
        let (mut p, mut dp) = (vec![0.0f32; BQ * BK], vec![0.0f32; BQ * BK]);
        let first_q = j0.saturating_sub(s.q_pos0);
        for h in kvh * lay.group()..(kvh + 1) * lay.group() {
            for i0 in (first_q..s.q_len).step_by(BQ) {
                let rows = (i0 + BQ).min(s.q_len) - i0;
                let (q_blk, do_blk) = (&q[lay.q(b, i0, h)..], &dout[lay.q(b, i0, h)..]);
                inputs.tile(b, h, (i0, rows), (j0, bk), &mut p, &mut dp);
                // SAFETY: as in `tile`; dk_loc and dv_loc are [bk, hd].
                unsafe {
                    tile_gemm(
                        (bk, hd, rows),
                        dv_loc.as_mut_ptr(),
                        hd,
                        true,
                        (p.as_ptr(), 1, BK),
                        (do_blk.as_ptr(), qs, 1),
                        1.0,
                    );
                    tile_gemm(
                        (bk, hd, rows),
                        dk_loc.as_mut_ptr(),
                        hd,
                        true,
                        (dp.as_ptr(), 1, BK),
                        (q_blk.as_ptr(), qs, 1),
                        scale,
                    );
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

    // Pass 2: dQ, one task per (batch, head, query block), over the key tiles it sees.
    let n_qblk = s.q_len.div_ceil(BQ);
    let dq_p = SendPtr(dq.as_mut_ptr());
    (0..s.batch * s.n_head * n_qblk).into_par_iter().for_each(|task| {
        let (b, h, qb) = (task / (s.n_head * n_qblk), (task / n_qblk) % s.n_head, task % n_qblk);
        let kvh = h / lay.group();
        let (i0, i1) = (qb * BQ, ((qb + 1) * BQ).min(s.q_len));
        let rows = i1 - i0;
        let mut dq_blk = vec![0.0f32; rows * hd];
        let (mut p, mut dp) = (vec![0.0f32; BQ * BK], vec![0.0f32; BQ * BK]);
        let keys = lay.visible(i1 - 1);
        for j0 in (0..keys).step_by(BK) {
            let bk = (j0 + BK).min(keys) - j0;
            inputs.tile(b, h, (i0, rows), (j0, bk), &mut p, &mut dp);
            let k_t = &k[lay.kv(b, j0, kvh)..];
            // SAFETY: as in `tile`; dq_blk is [rows, hd].
            unsafe {
                tile_gemm(
                    (rows, hd, bk),
                    dq_blk.as_mut_ptr(),
                    hd,
                    true,
                    (dp.as_ptr(), BK, 1),
                    (k_t.as_ptr(), ks, 1),
                    scale,
                )
            };
        }
        for r in 0..rows {
            let qo = lay.q(b, i0 + r, h);
            // SAFETY: task (b, h, qb) alone writes query rows of its block for head h.
            unsafe {
                std::slice::from_raw_parts_mut(dq_p.get().add(qo), hd).copy_from_slice(&dq_blk[r * hd..(r + 1) * hd])
            };
        }
    });
}
