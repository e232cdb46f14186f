//! Helpers of the GPU tests (tests/gpu.rs, tests/gpu_model.rs): the skip rule and the relative
//! error norm they all measure with.

use half::bf16;
use kiln::backend::cpu::CpuBuf;
use rand::{Rng, SeedableRng};

/// The opened device, or `None` with a "skipped" line; KILN_REQUIRE_GPU=1 turns the skip into a
/// failure (scripts/gpu-check.sh sets it, so a GPU run can never pass by skipping).
pub fn or_skip<T>(opened: anyhow::Result<T>) -> Option<T> {
    match opened {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("KILN_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("KILN_REQUIRE_GPU=1 but {e:#}");
            }
            eprintln!("skipped: {e:#}");
            None
        }
    }
}

/// This run's inputs: fresh each run (from the clock), so the kernels are checked on new values every
/// time, and printed, so `KILN_TEST_SEED=<it>` draws the same ones again.
pub fn run_seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let seed = std::env::var("KILN_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        eprintln!("GPU test inputs from seed {seed} (KILN_TEST_SEED={seed} draws them again)");
        seed
    })
}

/// Uniform values in [-scale, scale): stream `seed` of this run's inputs (see `run_seed`).
pub fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ run_seed().rotate_left(17));
    (0..n).map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// Rounds through bf16, so the CPU reference sees exactly what the GPU sees (as a buffer the CPU
/// backend's ops take, counted against no backend).
pub fn bf(x: &[f32]) -> CpuBuf {
    CpuBuf::from(x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect::<Vec<f32>>())
}

/// ‖got − want‖ / ‖want‖; a non-finite output (a NaN poison that survived) fails outright.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "non-finite output (NaN poison survived?)");
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// The bound for a bf16 output computed in f32 from the same inputs the reference sees: one
/// rounding to bf16's 8 significant bits is at most 2^-9 relative per element, so the error norm
/// is at most 2^-9; twice that leaves room for f32 rounding differences before it and nothing
/// for a wrong element (a wrong sign or index is an error of order 1).
pub const BF16_OUT: f64 = 1.0 / 256.0;

/// The bound for an f32 output of the same inputs on both sides: only the order of f32 sums
/// differs (about 1e-7 per operation, grown by the length of the sums).
pub const F32_OUT: f64 = 1e-5;

/// Prints the error, then asserts it is below `tol`.
pub fn assert_close(got: &[f32], want: &[f32], tol: f64, what: &str) {
    let e = rel_err(got, want);
    eprintln!("{what}: relative error {e:.2e}");
    assert!(e < tol, "{what}: relative error {e:.3e} ≥ {tol:.0e}");
}
