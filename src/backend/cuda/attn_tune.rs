//! Which build of the FlashAttention-2 kernels the engine runs, chosen by timing on the card, as
//! `gemm.rs` chooses cuBLASLt's algorithms.
//!
//! At head_dim 64 each pass has two builds (`flash_attn::Build`): the default, and one with two
//! m-tiles per warp that reads shared memory 40–50% less often per `mma.sync` but runs half as
//! many blocks per SM. Which is faster depends on the card and the shape, and no card has said yet, so the
//! first forward and the first backward of each new shape run both on the real operands and keep
//! the faster, then run it once more so that the outputs are its own. Both compute the same
//! attention (each is checked against the CPU backend in tests/gpu.rs), so only speed changes.
//! `KILN_FA_AUTOTUNE=0` runs the defaults untimed. Once a card has ranked the builds, the loser
//! goes, and this module with it.

use super::device::Gpu;
use super::flash_attn::{self, Build};
use crate::backend::AttnShape;
use anyhow::{anyhow, Result};
use std::collections::HashMap;
use std::sync::Mutex;

/// Passes smaller than this (forward FLOPs) run the default build untimed: every training shape of
/// a real model is far above it (TinyLlama's is 275 GFLOP per layer), while decoding brings a new
/// shape with every token, where timing would cost more than it saves.
pub const TUNE_MIN_FLOPS: f64 = 4e9;
/// Timed runs per build, after one untimed run.
const TIMED_RUNS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    Forward,
    Backward,
}

/// What timing found for one pass of one shape.
#[derive(Clone, Debug)]
pub struct AttnTuned {
    pub pass: Pass,
    pub shape: AttnShape,
    /// Each build timed, with milliseconds per call.
    pub times_ms: Vec<(Build, f32)>,
    pub chosen: Build,
}

/// The same shape, as a map key (AttnShape itself carries no Hash).
type Key = (Pass, [usize; 8]);

fn key(pass: Pass, s: &AttnShape) -> Key {
    (pass, [s.batch, s.q_len, s.kv_len, s.kv_stride, s.q_pos0, s.n_head, s.n_kv_head, s.head_dim])
}

/// Causal forward FLOPs, counted as FA2's paper and `kiln bench attention` count them.
fn forward_flops(s: &AttnShape) -> f64 {
    4.0 * (s.batch * s.n_head * s.q_len * s.kv_len * s.head_dim) as f64 / 2.0
}

pub struct AttnTuner {
    enabled: bool,
    min_flops: f64,
    chosen: Mutex<HashMap<Key, Build>>,
    tuned: Mutex<Vec<AttnTuned>>,
}

impl AttnTuner {
    /// On unless `KILN_FA_AUTOTUNE=0`, for passes of at least [`TUNE_MIN_FLOPS`].
    pub fn from_env() -> AttnTuner {
        let enabled = std::env::var("KILN_FA_AUTOTUNE").map_or(true, |v| v != "0");
        AttnTuner::new(enabled, TUNE_MIN_FLOPS)
    }

    pub fn new(enabled: bool, min_flops: f64) -> AttnTuner {
        AttnTuner { enabled, min_flops, chosen: Mutex::new(HashMap::new()), tuned: Mutex::new(Vec::new()) }
    }

    /// Every pass and shape timed so far, in the order first seen.
    pub fn tuning(&self) -> Vec<AttnTuned> {
        self.tuned.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// The forward through the build timing chose for `s` (see the module comment).
    pub fn forward(&self, gpu: &Gpu, s: AttnShape, run: &mut dyn FnMut(Build) -> Result<()>) -> Result<()> {
        self.run(gpu, Pass::Forward, s, flash_attn::builds(s.head_dim), run)
    }

    /// The backward through the build timing chose for `s`, among those worth running on the device.
    pub fn backward(&self, gpu: &Gpu, s: AttnShape, run: &mut dyn FnMut(Build) -> Result<()>) -> Result<()> {
        self.run(gpu, Pass::Backward, s, &flash_attn::bwd_builds(gpu, s.head_dim), run)
    }

    /// Runs the default build where nothing is timed (tuning off, a small pass, one build), the
    /// build kept for a shape seen before, or else times `builds` and keeps the fastest.
    fn run(
        &self,
        gpu: &Gpu,
        pass: Pass,
        s: AttnShape,
        builds: &[Build],
        run: &mut dyn FnMut(Build) -> Result<()>,
    ) -> Result<()> {
        if !self.enabled || builds.len() < 2 || forward_flops(&s) < self.min_flops {
            return run(Build::Plain);
        }
        let k = key(pass, &s);
        let known = self.chosen.lock().map_err(|_| anyhow!("attention tuning poisoned"))?.get(&k).copied();
        if let Some(b) = known {
            return run(b);
        }
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (gpu.ctx.new_event(timing)?, gpu.ctx.new_event(timing)?);
        let mut times_ms = Vec::with_capacity(builds.len());
        for &b in builds {
            let mut time = || -> Result<f32> {
                run(b)?;
                start.record(&gpu.stream)?;
                for _ in 0..TIMED_RUNS {
                    run(b)?;
                }
                end.record(&gpu.stream)?;
                Ok(start.elapsed_ms(&end)? / TIMED_RUNS as f32)
            };
            // A build that cannot launch here is passed over, as long as one can.
            times_ms.push((b, time().unwrap_or(f32::INFINITY)));
        }
        let (chosen, best) = times_ms.iter().copied().min_by(|x, y| x.1.total_cmp(&y.1)).unwrap_or((Build::Plain, 0.0));
        if !best.is_finite() {
            // No build ran: the default's own error is the one to report.
            return run(Build::Plain);
        }
        self.chosen.lock().map_err(|_| anyhow!("attention tuning poisoned"))?.insert(k, chosen);
        self.tuned.lock().map_err(|_| anyhow!("attention tuning poisoned"))?.push(AttnTuned {
            pass,
            shape: s,
            times_ms,
            chosen,
        });
        // The outputs now hold the last build's results; the chosen build writes its own.
        run(chosen)
    }
}
