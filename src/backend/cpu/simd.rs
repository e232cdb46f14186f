//! Small vector kernels written so LLVM vectorises them: reductions keep eight independent partial
//! sums (a fixed order, hence deterministic) because a single running f32 sum cannot be reordered.

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for i in chunks * 8..n {
        tail += a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[inline]
pub fn sum(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let x = &a[c * 8..c * 8 + 8];
        for l in 0..8 {
            acc[l] += x[l];
        }
    }
    let mut tail = 0.0f32;
    for &x in &a[chunks * 8..] {
        tail += x;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// The largest value, ignoring NaN (−∞ for an empty slice). Eight running maxima written as
/// comparisons, which vectorise (`f32::max`'s NaN rule does not).
#[inline]
pub fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = a.chunks_exact(8);
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for x in chunks {
        for l in 0..8 {
            acc[l] = if x[l] > acc[l] { x[l] } else { acc[l] };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// `e^x` for `x ≤ 0` to within ~1e-7 relative error (Cephes' range reduction and polynomial),
/// written with no libm call and no branch so that loops over it vectorise; a libm `expf` per
/// value was most of the cross-entropy's time at a 32k vocabulary. Inputs below -87.3 give
/// e^-87.3 ≈ 1.3e-38 (near the smallest normal f32) rather than a denormal or zero, which no sum
/// or probability here can notice; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·ln2 is subtracted exactly for the |n| ≤ 126 used here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to the nearest integer (SSE2 has no round instruction).
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.3 { -87.3 } else { x };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p =
        ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from the exponent bits; n is the integer in t's low mantissa bits.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    e * f32::from_bits((n_int.wrapping_add(127) as u32) << 23)
}

/// Replaces each `x` by `e^(x − shift)` and returns their sum in f64 (eight f64 partial sums in a
/// fixed order: deterministic). `shift` must be at least every `x` (a softmax's row maximum).
/// Two passes, the exponentials and then the sum, because each vectorises on its own (a row of a
/// 32k vocabulary stays in L2 between them); with AVX2 at run time, eight lanes instead of four.
/// Rust never fuses a multiply and an add, so both paths give the same bits.
pub fn exp_shifted_in_place(a: &mut [f32], shift: f32) -> f64 {
    exp_shifted(a, shift);
    sum_f64(a)
}

/// Replaces each `x` by `e^(x − shift)` (`shift` at least every `x`), eight lanes with AVX2.
pub fn exp_shifted(a: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { exp_shifted_avx2(a, shift) };
    }
    exp_shifted_portable(a, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_shifted_avx2(a: &mut [f32], shift: f32) {
    exp_shifted_portable(a, shift)
}

#[inline(always)]
fn exp_shifted_portable(a: &mut [f32], shift: f32) {
    for x in a.iter_mut() {
        *x = exp_nonpositive(*x - shift);
    }
}

/// Σ f(x) in f64: eight partial sums combined in a fixed order (deterministic). Inlined, so each
/// caller's `f` vectorises with the sum.
#[inline(always)]
fn sum8_f64(a: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = a.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for x in chunks {
        for l in 0..8 {
            acc[l] += f(x[l]);
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Σ a² in f64.
pub fn sum_squares_f64(a: &[f32]) -> f64 {
    sum8_f64(a, |x| x as f64 * x as f64)
}

/// Σ a in f64.
#[inline(always)]
fn sum_f64(a: &[f32]) -> f64 {
    sum8_f64(a, |x| x as f64)
}

/// `Σ e^(x − shift)` in f64, leaving `a` as it is (see [`exp_shifted_in_place`]).
pub fn exp_shifted_sum(a: &[f32], shift: f32) -> f64 {
    sum8_f64(a, |x| exp_nonpositive(x - shift) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_f64_across_the_range_softmax_uses() {
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x > -87.0 {
            let got = exp_nonpositive(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max((got - want).abs() / want);
            x -= 0.001_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1.3e-38);
    }

    #[test]
    fn shifted_exp_sums_agree_in_place_and_not() {
        let row: Vec<f32> = (0..1003).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3).collect();
        let m = max(&row);
        let mut inplace = row.clone();
        let s1 = exp_shifted_in_place(&mut inplace, m);
        // The portable path (what a CPU without AVX2 runs) gives the same bits.
        let mut portable = row.clone();
        exp_shifted_portable(&mut portable, m);
        assert_eq!(portable, inplace);
        assert_eq!(sum_f64(&portable), s1);
        let s2 = exp_shifted_sum(&row, m);
        let want: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
        assert_eq!(s1, s2);
        assert!((s1 - want).abs() / want < 1e-6);
        for (got, &x) in inplace.iter().zip(&row) {
            assert!(((*got as f64) - ((x - m) as f64).exp()).abs() <= 3e-7 * ((x - m) as f64).exp().max(1e-30));
        }
    }
}
