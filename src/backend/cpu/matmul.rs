//! GEMM through the `gemm` crate (measured at the core's f32 peak), with transposes expressed as
//! strides so no operand is ever copied.

use crate::backend::Gemm;
use gemm::Parallelism;

pub fn matmul(out: &mut [f32], a: &[f32], b: &[f32], g: Gemm) {
    let Gemm {
        m,
        n,
        k,
        trans_a,
        trans_b,
        accumulate,
    } = g;
    assert!(
        out.len() >= m * n,
        "matmul: out has {} elements, needs {}",
        out.len(),
        m * n
    );
    assert!(
        a.len() >= m * k && b.len() >= k * n,
        "matmul: operand too small for {g:?}"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
        }
        return;
    }
    // Element (i, p) of op(a) and (p, j) of op(b), as (row stride, column stride).
    let (a_rs, a_cs) = if trans_a {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (b_rs, b_cs) = if trans_b {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
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
