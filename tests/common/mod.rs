//! Helpers shared by the integration tests.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform values in [-scale, scale).
pub fn randv(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

/// ‖a − b‖ / max(‖a‖, ‖b‖, tiny).
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    diff / na.max(nb).max(1e-12)
}

/// Central finite differences of `loss` with respect to a sample of coordinates of `x`, compared
/// with `analytic`. Panics with a readable message when the relative error exceeds `tol`.
pub fn check_grad(
    what: &str,
    x: &mut [f32],
    analytic: &[f32],
    samples: usize,
    h: f32,
    tol: f64,
    mut loss: impl FnMut(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let n = x.len();
    let stride = (n / samples.max(1)).max(1);
    let (mut num, mut ana) = (Vec::new(), Vec::new());
    for i in (0..n).step_by(stride).take(samples) {
        let orig = x[i];
        x[i] = orig + h;
        let lp = loss(x);
        x[i] = orig - h;
        let lm = loss(x);
        x[i] = orig;
        num.push((lp - lm) / (2.0 * h as f64));
        ana.push(analytic[i] as f64);
    }
    let err = rel_err(&num, &ana);
    assert!(err < tol, "{what}: finite-difference relative error {err:.2e} >= {tol:.0e}\n num {num:?}\n ana {ana:?}");
    assert!(
        ana.iter().any(|&g| g != 0.0),
        "{what}: analytic gradient is identically zero on the sample"
    );
}

/// Σ out ⊙ r in f64: a scalar whose gradient with respect to `out` is `r`.
pub fn project(out: &[f32], r: &[f32]) -> f64 {
    out.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum()
}
