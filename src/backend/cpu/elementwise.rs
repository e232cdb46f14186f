use super::simd::sum_squares_f64;
use rayon::prelude::*;

/// Elements per rayon task: large enough that task overhead vanishes, fixed so results do not
/// depend on the thread count.
const CHUNK: usize = 1 << 14;

pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
        for (d, s) in d.iter_mut().zip(s) {
            *d += s;
        }
    });
}

/// Σ buf² in f64: fixed chunks, eight lanes each, summed in a fixed order (deterministic whatever
/// the thread count; one serial f64 chain per chunk was latency-bound).
pub fn sum_squares(buf: &[f32]) -> f64 {
    let partials: Vec<f64> = buf.par_chunks(CHUNK).map(sum_squares_f64).collect();
    partials.iter().sum()
}
