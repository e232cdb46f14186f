//! `kiln bench train`: one full training step (forward, backward, global-norm clipping, AdamW) of
//! a preset model on random tokens, timed over several steps after a warm-up. Prints tokens/s,
//! model FLOP/s, MFU and peak memory; on CUDA also a bf16 GEMM ceiling measured on the same card, so
//! MFU can be read against the datasheet and against what the card really sustains.
//! The step is the trainer's own (`Llama::forward`/`backward`, `optimizer::{grad_norm, clip}`,
//! `AdamWState`), not a copy of it.

use crate::backend::cpu::{measured_peak_flops, Cpu};
use crate::backend::cuda::device::{datasheet_bf16_flops, Gpu};
use crate::backend::cuda::gemm::Blas;
use crate::backend::cuda::Cuda;
use crate::backend::profile::Profiled;
use crate::backend::{AdamW, Backend, Gemm};
use crate::config::GuardSection;
use crate::data::loader::Batch;
use crate::dist::Member;
use crate::model::init::random_weights;
use crate::model::{Keep, Llama, LlamaConfig, Workspace};
use crate::train::fsdp::Fsdp;
use crate::train::guard::GuardState;
use crate::train::optimizer::{device_step, AdamWState, StepParams};
use anyhow::{bail, Result};
use half::bf16;
use std::time::Instant;

pub struct TrainBenchArgs {
    pub device: String,
    pub preset: String,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub warmup: usize,
    /// Recompute each block's activations in the backward (`train.recompute`).
    pub recompute: bool,
    /// Afterwards, time every op kind in two more steps (each op synchronised: a diagnostic).
    pub profile: bool,
    /// Also time the FSDP engine over this many ranks on the same micro-batch.
    pub fsdp: Option<usize>,
}

/// The ceiling GEMM's size: 8192, or `KILN_GEMM_CEILING_N` (the emulated GPU's tests take 256,
/// since 8192³ on a CPU stand-in would take minutes).
fn ceiling_n() -> Result<usize> {
    match std::env::var("KILN_GEMM_CEILING_N") {
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n >= 64 && n.is_multiple_of(8) => Ok(n),
            _ => bail!("KILN_GEMM_CEILING_N={v:?}: expected a multiple of 8, at least 64"),
        },
        Err(_) => Ok(8192),
    }
}

/// Sustained bf16 GEMM FLOP/s on this card: an n³ product (n = 8192 unless `ceiling_n` says
/// otherwise) through the same cuBLASLt path.
fn gemm_ceiling(gpu: &Gpu, n: usize) -> Result<f64> {
    let blas = Blas::new(gpu)?;
    let x: Vec<bf16> = (0..n * n).map(|i| bf16::from_f32(((i % 251) as f32 - 125.0) / 125.0)).collect();
    let a = gpu.stream.clone_htod(&x)?;
    let mut out = gpu.stream.alloc_zeros::<bf16>(n * n)?;
    let g = Gemm { m: n, n, k: n, trans_a: false, trans_b: true, accumulate: false };
    for _ in 0..3 {
        blas.matmul(gpu, &mut out, &a, &a, g)?;
    }
    gpu.synchronize()?;
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        blas.matmul(gpu, &mut out, &a, &a, g)?;
    }
    gpu.synchronize()?;
    Ok(2.0 * (n * n * n) as f64 * reps as f64 / t.elapsed().as_secs_f64())
}

/// What timing cuBLASLt's candidates bought over its heuristic's first choice, each shape of the
/// step counted once.
fn tuning_line(tuned: &[crate::backend::cuda::gemm::Tuned]) -> String {
    if tuned.is_empty() {
        return "no shape timed (KILN_GEMM_AUTOTUNE=0, every shape under 4 GFLOP, or one candidate each)".into();
    }
    let changed = tuned.iter().filter(|t| t.chosen != 0).count();
    // A first choice that failed to run has no time to compare against.
    let timed = tuned.iter().filter(|t| t.first_ms.is_finite());
    let (first, best) = timed.fold((0.0f32, 0.0f32), |(f, b), t| (f + t.first_ms, b + t.best_ms));
    format!(
        "{} shapes, {changed} faster with another candidate than cuBLASLt's first choice; \
         one GEMM of each shape: {first:.2} ms -> {best:.2} ms ({:+.1}%)",
        tuned.len(),
        100.0 * (best - first) / first
    )
}

/// The attention builds timing chose, pass by pass: `forward q2048: 2 m-tiles per warp (1 m-tile
/// per warp 1.020 ms, ...)`, each build with its time per call.
fn attention_tuning_line(tuned: &[crate::backend::cuda::attn_tune::AttnTuned]) -> String {
    use crate::backend::cuda::attn_tune::Pass;
    use crate::backend::cuda::flash_attn::Build;
    if tuned.is_empty() {
        return "not timed (KILN_FA_AUTOTUNE=0, one build per pass at this head_dim, or passes under 4 GFLOP)".into();
    }
    let parts: Vec<String> = tuned
        .iter()
        .map(|t| {
            let times: Vec<String> = t.times_ms.iter().map(|&(b, ms)| format!("{} {ms:.3} ms", b.label())).collect();
            let pass = if t.pass == Pass::Forward { "forward" } else { "backward" };
            let default = if t.chosen == Build::Plain { ", the default" } else { "" };
            format!("{pass} q{}: {}{default} ({})", t.shape.q_len, t.chosen.label(), times.join(", "))
        })
        .collect();
    parts.join("; ")
}

struct StepTiming {
    secs_per_step: f64,
    loss: f32,
    /// The step guard's own work per step: its check before the update, its record after.
    guard_secs_per_step: f64,
}

/// Everything one benchmark step needs besides the model: the trainer's own step
/// (`device_step`) on one fixed micro-batch of tokens.
struct Stepper<B: Backend> {
    ws: Workspace<B>,
    grads: crate::model::Weights<B::Buf>,
    opt: AdamWState<B>,
    batch: Batch,
    /// The trainer's guard at its default window, full from the start so every check costs what a
    /// long run's does. Its history is spread wide so the benchmark's own losses never trip it.
    guard: GuardState,
    guard_cfg: GuardSection,
    guard_secs: f64,
}

/// The benchmark's fixed micro-batch: `batch` sequences of `seq` tokens.
fn bench_batch(vocab: usize, batch: usize, seq: usize) -> Batch {
    let ids: Vec<u32> = (0..batch * seq).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let targets = ids.iter().map(|&t| ((t as usize * 31 + 7) % vocab) as i32).collect();
    Batch { ids, targets, state: Default::default() }
}

fn bench_hp(step: u64) -> AdamW {
    AdamW { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 1.0 }
}

impl<B: Backend> Stepper<B> {
    fn new(model: &Llama<B>, batch: usize, seq: usize, keep: Keep) -> Result<Self> {
        Ok(Stepper {
            ws: Workspace::keeping(model, batch, seq, keep)?,
            grads: model.zeros_like_weights()?,
            opt: AdamWState::new(model)?,
            batch: bench_batch(model.cfg.vocab_size, batch, seq),
            guard: GuardState {
                recent: (0..GuardSection::default().window)
                    .map(|i| ((i % 2) as f64 * 100.0, (i % 2) as f64 * 1e6))
                    .collect(),
                ..GuardState::default()
            },
            guard_cfg: GuardSection::default(),
            guard_secs: 0.0,
        })
    }

    /// One optimizer step (1-based `n`); returns the mean loss.
    fn step(&mut self, model: &mut Llama<B>, n: u64) -> Result<f32> {
        let scale = 1.0 / self.batch.ids.len() as f32;
        let hp = bench_hp(n);
        let one = std::iter::once(Ok(&self.batch));
        let t = Instant::now();
        let check = self.guard.check(&self.guard_cfg);
        self.guard_secs += t.elapsed().as_secs_f64();
        let p = StepParams { scale, max_norm: 1.0, hp, check };
        let s = device_step(model, &mut self.ws, &mut self.grads, &mut self.opt, one, p)?;
        let loss = s.loss_sum * scale as f64;
        let t = Instant::now();
        match check.trip(loss, s.norm) {
            None => self.guard.applied(&self.guard_cfg, loss, s.norm),
            Some(_) => self.guard.skipped(),
        }
        self.guard_secs += t.elapsed().as_secs_f64();
        Ok(loss as f32)
    }
}

/// Times `steps` training steps after `warmup` untimed ones.
fn time_steps<B: Backend>(
    model: &mut Llama<B>,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
    keep: Keep,
) -> Result<StepTiming> {
    let mut s = Stepper::new(model, batch, seq, keep)?;
    for n in 0..warmup {
        s.step(model, n as u64 + 1)?;
    }
    model.backend.synchronize()?;
    let t = Instant::now();
    let mut loss = 0.0;
    s.guard_secs = 0.0;
    for n in 0..steps {
        loss = s.step(model, (warmup + n) as u64 + 1)?;
    }
    model.backend.synchronize()?;
    let per_step = |secs: f64| secs / steps.max(1) as f64;
    Ok(StepTiming {
        secs_per_step: per_step(t.elapsed().as_secs_f64()),
        loss,
        guard_secs_per_step: per_step(s.guard_secs),
    })
}

/// What the step guard adds to a step (its check and record; the per-unit sums of squares it reads
/// are the global norm's own, measured in the step).
fn guard_line(t: &StepTiming) -> (String, String) {
    let us = t.guard_secs_per_step * 1e6;
    let share = 100.0 * t.guard_secs_per_step / t.secs_per_step;
    ("step guard".into(), format!("{us:.1} µs/step ({share:.4}% of the step, window of 128 steps)"))
}

/// The same step through the FSDP engine over `group`: the micro-batch split between the ranks,
/// every unit gathered before its stage and its gradient reduce-scattered after. Lines: tokens/s
/// (and per rank), then each rank's peak memory and time its collectives were busy.
fn fsdp_lines<B: Backend>(
    group: Vec<Member<B>>,
    cfg: &LlamaConfig,
    host: &crate::model::Weights<Vec<f32>>,
    a: &TrainBenchArgs,
    keep: Keep,
) -> Result<Vec<(String, String)>> {
    let world = group.len();
    if !a.batch.is_multiple_of(world) {
        bail!("--fsdp {world}: the micro-batch of {} must split evenly over the ranks", a.batch);
    }
    let mut f = Fsdp::new(cfg, host, None, group, a.batch / world, a.seq, keep)?;
    let batch = [bench_batch(cfg.vocab_size, a.batch, a.seq)];
    let scale = 1.0 / (a.batch * a.seq) as f32;
    for n in 0..a.warmup {
        f.step(&batch, n as u64 + 1, scale, 1.0, bench_hp(n as u64 + 1))?;
    }
    let t = Instant::now();
    let mut loss = 0.0;
    for n in 0..a.steps {
        let step = (a.warmup + n) as u64 + 1;
        loss = f.step(&batch, step, scale, 1.0, bench_hp(step))?.0 * scale as f64;
    }
    let secs = t.elapsed().as_secs_f64() / a.steps.max(1) as f64;
    let tps = (a.batch * a.seq) as f64 / secs;
    let mut lines = vec![(
        format!("fsdp step, {world} rank(s)"),
        format!("{tps:.0} tokens/s ({:.0} per rank, {:.1} ms/step), loss {loss:.3}", tps / world as f64, secs * 1e3),
    )];
    for m in f.memory()? {
        lines.push((
            format!("  rank {}", m.rank),
            format!(
                "shards {:.2} GiB, peak {:.2} GiB, collectives busy {:.1} ms/step",
                gib(m.persistent_bytes),
                gib(m.peak_bytes),
                m.comm_secs * 1e3
            ),
        ));
    }
    Ok(lines)
}

/// Two more steps on a fresh model with every op timed by kind: where a step's time goes.
fn profile_lines<B: Backend>(
    backend: B,
    cfg: &LlamaConfig,
    host: &crate::model::Weights<Vec<f32>>,
    a: &TrainBenchArgs,
    keep: Keep,
) -> Result<Vec<(String, String)>> {
    let mut model = Llama::from_host(cfg.clone(), Profiled::new(backend), host)?;
    let mut s = Stepper::new(&model, a.batch, a.seq, keep)?;
    s.step(&mut model, 1)?;
    model.backend.reset();
    let steps = 2;
    for n in 0..steps {
        s.step(&mut model, n + 2)?;
    }
    let report = model.backend.report();
    let total: f64 = report.iter().map(|(_, st)| st.secs).sum();
    let mut lines = vec![(
        "profile (ops synchronised)".to_string(),
        format!("{:.1} ms per step in ops", total * 1e3 / steps as f64),
    )];
    for (kind, st) in report {
        let per_sec = st.flops / st.secs.max(1e-12);
        let rate = match st.flops {
            f if f <= 0.0 => String::new(),
            _ if per_sec >= 1e12 => format!(", {:.0} TFLOP/s", per_sec / 1e12),
            _ => format!(", {:.1} GFLOP/s", per_sec / 1e9),
        };
        lines.push((
            format!("  {kind}"),
            format!(
                "{:>8.2} ms/step {:>5.1}%  ({} calls{rate})",
                st.secs * 1e3 / steps as f64,
                100.0 * st.secs / total.max(1e-12),
                st.calls / steps
            ),
        ));
    }
    Ok(lines)
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

pub fn run(a: &TrainBenchArgs) -> Result<Vec<(String, String)>> {
    let cfg = LlamaConfig::preset(&a.preset)?;
    if a.seq > cfg.max_seq_len {
        bail!("--seq {} exceeds {}'s max_seq_len {}", a.seq, a.preset, cfg.max_seq_len);
    }
    let host = random_weights(&cfg, 0)?;
    let tokens = (a.batch * a.seq) as f64;
    let flops_per_token = cfg.train_flops_per_token(a.seq);
    let mut lines = vec![(
        "model".to_string(),
        format!("{} ({:.1}M params, {:.3} GFLOP/token)", a.preset, cfg.n_params() as f64 / 1e6, flops_per_token / 1e9),
    )];
    if a.fsdp == Some(0) {
        bail!("--fsdp 0: the sharded engine needs at least one rank");
    }
    let keep = if a.recompute { Keep::BlockInputs } else { Keep::All };
    let shape = format!("{}x{}{}", a.batch, a.seq, if a.recompute { ", recompute" } else { "" });
    match a.device.as_str() {
        "cuda" => {
            let b = Cuda::open(0)?;
            crate::backend::cuda::flash_attn::check_head_dim(&cfg)?;
            lines.push(("device".into(), b.name()));
            let n = ceiling_n()?;
            let ceiling = gemm_ceiling(b.gpu(), n)?;
            let sheet = datasheet_bf16_flops(&b.gpu().name);
            let mut model = Llama::from_host(cfg.clone(), b.clone(), &host)?;
            b.reset_peak();
            let t = time_steps(&mut model, a.batch, a.seq, a.steps, a.warmup, keep)?;
            let mem = b.device_memory()?;
            let tps = tokens / t.secs_per_step;
            let flops = flops_per_token * tps;
            lines.push((format!("bf16 GEMM {n}³"), format!("{:.0} TFLOP/s", ceiling / 1e12)));
            lines.push((
                format!("train step {shape}"),
                format!("{tps:.0} tokens/s ({:.1} ms/step, {:.0} TFLOP/s model)", t.secs_per_step * 1e3, flops / 1e12),
            ));
            // A card without a datasheet entry gets the measured ceiling alone.
            let of_ceiling = format!("{:.1}% of the measured GEMM ceiling", 100.0 * flops / ceiling);
            let mfu = match sheet {
                Some(p) => format!("{:.1}% of datasheet; {of_ceiling}", 100.0 * flops / p),
                None => of_ceiling,
            };
            lines.push(("MFU".into(), mfu));
            lines.push((
                "memory".into(),
                format!(
                    "peak {:.1} GiB in kiln buffers, {:.1} GiB in use on the device of {:.0} GiB",
                    gib(mem.peak),
                    gib(mem.device_used),
                    gib(mem.device_total)
                ),
            ));
            lines.push(("loss after the timed steps".into(), format!("{:.3}", t.loss)));
            lines.push(guard_line(&t));
            lines.push(("GEMM autotune".into(), tuning_line(&b.gemm_tuning())));
            lines.push(("attention autotune".into(), attention_tuning_line(&b.attention_tuning())));
            // One model on the card at a time.
            drop(model);
            if a.profile {
                lines.extend(profile_lines(b.clone(), &cfg, &host, a, keep)?);
            }
            if let Some(n) = a.fsdp {
                lines.extend(fsdp_lines(crate::dist::nccl::cuda_group(n)?, &cfg, &host, a, keep)?);
            }
        }
        "cpu" => {
            let b = Cpu::new();
            lines.push(("device".into(), b.name()));
            let mut model = Llama::from_host(cfg.clone(), b, &host)?;
            let t = time_steps(&mut model, a.batch, a.seq, a.steps, a.warmup, keep)?;
            let tps = tokens / t.secs_per_step;
            let flops = flops_per_token * tps;
            lines.push((
                format!("train step {shape}"),
                format!("{tps:.0} tokens/s ({:.1} ms/step, {:.1} GFLOP/s model)", t.secs_per_step * 1e3, flops / 1e9),
            ));
            lines.push((
                "MFU".into(),
                format!("{:.1}% of the measured SGEMM peak", 100.0 * flops / measured_peak_flops()),
            ));
            lines.push(("loss after the timed steps".into(), format!("{:.3}", t.loss)));
            lines.push(guard_line(&t));
            drop(model);
            if a.profile {
                lines.extend(profile_lines(Cpu::new(), &cfg, &host, a, keep)?);
            }
            if let Some(n) = a.fsdp {
                lines.extend(fsdp_lines(crate::dist::local::cpu_group(n), &cfg, &host, a, keep)?);
            }
        }
        other => bail!("--device {other:?}: expected cpu or cuda"),
    }
    Ok(lines)
}
