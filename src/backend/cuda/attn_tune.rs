//! Which build of the FlashAttention-2 kernels the engine runs, chosen by timing on the card, as
//! `gemm.rs` chooses cuBLASLt's algorithms.
//!
//! At head_dim 64 and 128 a pass comes in builds that trade occupancy, registers and block shape
//! differently (`flash_attn::fwd_builds`, `bwd_builds`), and which is fastest depends on the card
//! and the shape. So the first forward and the first backward of each new shape run every build on the
//! real operands and keep the fastest, then run it once more so that the outputs are its own. Every
//! build computes the same attention (each is checked against the CPU backend in tests/gpu.rs), so
//! only speed changes. `KILN_FA_FWD_D64_BLOCKS`, `KILN_FA_BWD_D64_BLOCKS` and
//! `KILN_FA_BWD_D128_BLOCKS` pin a build instead, and
//! `KILN_FA_AUTOTUNE=0` runs the defaults untimed, for comparison.

use super::device::Gpu;
use super::flash_attn;
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
    /// Each build timed, by its blocks per SM, with milliseconds per call.
    pub times_ms: Vec<(u32, f32)>,
    pub chosen: u32,
    /// The build that runs untimed (`fwd_default` / `bwd_default`).
    pub default: u32,
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
    chosen: Mutex<HashMap<Key, u32>>,
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
    pub fn forward(&self, gpu: &Gpu, s: AttnShape, run: &mut dyn FnMut(u32) -> Result<()>) -> Result<()> {
        let d = s.head_dim;
        self.run(gpu, Pass::Forward, s, &|| flash_attn::fwd_candidates(d), flash_attn::fwd_default(d), run)
    }

    /// The backward through the build timing chose for `s`, among those that fit the device.
    pub fn backward(&self, gpu: &Gpu, s: AttnShape, run: &mut dyn FnMut(u32) -> Result<()>) -> Result<()> {
        let d = s.head_dim;
        self.run(gpu, Pass::Backward, s, &|| flash_attn::bwd_candidates(gpu, d), flash_attn::bwd_default(gpu, d), run)
    }

    /// `candidates` lists the builds to time (only the pinned one, when a variable pins it); it is
    /// called only the first time a shape is seen, so the step's later passes cost one map lookup.
    /// `default` (the pinned build, if any) runs where nothing is timed.
    fn run(
        &self,
        gpu: &Gpu,
        pass: Pass,
        s: AttnShape,
        candidates: &dyn Fn() -> Vec<u32>,
        default: u32,
        run: &mut dyn FnMut(u32) -> Result<()>,
    ) -> Result<()> {
        if !self.enabled || forward_flops(&s) < self.min_flops {
            return run(default);
        }
        let k = key(pass, &s);
        let known = self.chosen.lock().map_err(|_| anyhow!("attention tuning poisoned"))?.get(&k).copied();
        if let Some(b) = known {
            return run(b);
        }
        let builds = candidates();
        if builds.len() < 2 {
            // One build (pinned, or this head_dim has no alternatives): nothing to time, now or later.
            let only = builds.first().copied().unwrap_or(default);
            self.chosen.lock().map_err(|_| anyhow!("attention tuning poisoned"))?.insert(k, only);
            return run(only);
        }
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (gpu.ctx.new_event(timing)?, gpu.ctx.new_event(timing)?);
        let mut times_ms = Vec::with_capacity(builds.len());
        for &b in &builds {
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
        let (chosen, best) = times_ms.iter().copied().min_by(|x, y| x.1.total_cmp(&y.1)).unwrap_or((default, 0.0));
        if !best.is_finite() {
            // No build ran: the default's own error is the one to report.
            return run(default);
        }
        self.chosen.lock().map_err(|_| anyhow!("attention tuning poisoned"))?.insert(k, chosen);
        self.tuned.lock().map_err(|_| anyhow!("attention tuning poisoned"))?.push(AttnTuned {
            pass,
            shape: s,
            times_ms,
            chosen,
            default,
        });
        // The outputs now hold the last build's results; the chosen build writes its own.
        run(chosen)
    }
}
