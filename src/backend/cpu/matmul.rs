//! GEMM through the `gemm` crate (measured at the core's f32 peak), with transposes expressed as
//! strides so no operand is ever copied.

use super::simd::dot;
use crate::backend::Gemm;
use gemm::Parallelism;
use rayon::prelude::*;

/// Output elements per rayon task in the matrix-vector path.
const GEMV_CHUNK: usize = 64;

fn gemv_rows(out: &mut [f32], x: &[f32], w: &[f32], k: usize, accumulate: bool) {
    out.par_chunks_mut(GEMV_CHUNK).enumerate().for_each(|(c, o)| {
        for (j, y) in o.iter_mut().enumerate() {
            let row = (c * GEMV_CHUNK + j) * k;
            let v = dot(x, &w[row..row + k]);
            *y = if accumulate { *y + v } else { v };
        }
    });
}

pub fn matmul(out: &mut [f32], a: &[f32], b: &[f32], g: Gemm) {
    let Gemm { m, n, k, trans_a, trans_b, accumulate } = g;
    assert!(out.len() >= m * n, "matmul: out has {} elements, needs {}", out.len(), m * n);
    assert!(a.len() >= m * k && b.len() >= k * n, "matmul: operand too small for {g:?}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
        }
        return;
    }
    if m == 1 && trans_b {
        // Decoding: one row times a weight matrix `[n, k]`. Memory-bound, so spread the weight
        // rows over threads; each output is one fixed-order dot product (deterministic).
        gemv_rows(&mut out[..n], &a[..k], &b[..n * k], k, accumulate);
        return;
    }
    // Element (i, p) of op(a) and (p, j) of op(b), as (row stride, column stride).
    let (a_rs, a_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    let threads = rayon::current_num_threads();
    let par = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the bounds above guarantee every strided access stays inside the slices; `out` does
    // not alias `a` or `b` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}
