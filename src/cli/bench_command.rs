//! `kiln bench`: its arguments and what each benchmark prints. Figures, never assertions.

use super::{bench, positive};
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Without a subcommand: CPU GEMM, a training step and decoding of a small preset.
#[derive(Args)]
pub struct BenchCommand {
    #[command(subcommand)]
    pub what: Option<BenchWhat>,
    #[arg(long, default_value = "small")]
    pub preset: String,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
}

#[derive(Subcommand)]
pub enum BenchWhat {
    /// FlashAttention-2 forward + backward TFLOP/s on GPU 0 (compare: bench/torch_baseline.py)
    Attention {
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        #[arg(long, default_value_t = 128)]
        head_dim: usize,
        /// Query heads (KV heads: an eighth)
        #[arg(long)]
        heads: Option<usize>,
        #[arg(long, default_value_t = 20)]
        iters: usize,
    },
    /// A full training step's tokens/s, MFU and peak memory (default: TinyLlama-1.1B on GPU 0)
    Train {
        /// cpu or cuda
        #[arg(long, default_value = "cuda")]
        device: String,
        #[arg(long, default_value = "tinyllama-1.1b")]
        preset: String,
        /// Micro-batch (sequences per step)
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        /// Timed steps
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Recompute each block's activations in the backward
        #[arg(long)]
        recompute: bool,
        /// Then time every op kind over two more steps (ops synchronised: where the time goes)
        #[arg(long)]
        profile: bool,
        /// Also time the sharded engine (FSDP) over N ranks (GPUs 0..N, or CPU ranks) on the same
        /// micro-batch, split between them; 1 measures what sharding costs on one device
        #[arg(long, value_name = "N")]
        fsdp: Option<usize>,
    },
    /// Training throughput with the dashboard open against headless, and an idle dashboard's CPU
    Dashboard {
        #[arg(long, default_value = "configs/demo.toml")]
        config: PathBuf,
        /// Steps per run
        #[arg(long, default_value_t = 60)]
        steps: u64,
        /// Headless/dashboard pairs, interleaved
        #[arg(long, default_value_t = 3)]
        pairs: usize,
        /// Steps left out of each run's median
        #[arg(long, default_value_t = 10)]
        warmup: u64,
        /// Seconds a paused dashboard is watched (0 skips it)
        #[arg(long, default_value_t = 20)]
        idle_secs: u64,
        /// Terminal size as COLSxROWS
        #[arg(long, default_value = "160x48")]
        size: String,
    },
}

impl BenchCommand {
    pub fn run(self) -> Result<()> {
        match self {
            BenchCommand { what: Some(BenchWhat::Attention { batch, seq, head_dim, heads, iters }), .. } => {
                // d_model 2048 as in TinyLlama unless told otherwise.
                let heads = heads.unwrap_or((2048 / head_dim.max(1)).max(1));
                let args = crate::cli::bench_attention::AttentionBenchArgs { batch, seq, head_dim, heads, iters };
                for (k, v) in crate::cli::bench_attention::run(&args)? {
                    crate::out!("{k:<24} {v}")?;
                }
            }
            BenchCommand {
                what: Some(BenchWhat::Train { device, preset, batch, seq, steps, warmup, recompute, profile, fsdp }),
                ..
            } => {
                let args = crate::cli::bench_train::TrainBenchArgs {
                    device,
                    preset,
                    batch: positive("--batch", batch)?,
                    seq: positive("--seq", seq)?,
                    steps: positive("--steps", steps)?,
                    warmup,
                    recompute,
                    profile,
                    fsdp,
                };
                for (k, v) in crate::cli::bench_train::run(&args)? {
                    crate::out!("{k:<28} {v}")?;
                }
            }
            BenchCommand {
                what: Some(BenchWhat::Dashboard { config, steps, pairs, warmup, idle_secs, size }), ..
            } => {
                let (cols, rows) = size
                    .split_once('x')
                    .and_then(|(c, r)| Some((c.parse().ok()?, r.parse().ok()?)))
                    .ok_or_else(|| anyhow::anyhow!("--size {size}: expected COLSxROWS, e.g. 160x48"))?;
                let args = crate::cli::bench_dashboard::DashboardBenchArgs {
                    config,
                    steps: steps.max(warmup + 1),
                    pairs: positive("--pairs", pairs)?,
                    warmup,
                    idle_secs,
                    cols,
                    rows,
                };
                for (k, v) in crate::cli::bench_dashboard::run(&args)? {
                    crate::out!("{k:<24} {v}")?;
                }
            }
            BenchCommand { what: None, preset, batch, seq, steps, decode_tokens } => {
                let (batch, seq, steps) =
                    (positive("--batch", batch)?, positive("--seq", seq)?, positive("--steps", steps)?);
                let decode_tokens = positive("--decode-tokens", decode_tokens)?;
                let report = bench::run(&bench::BenchArgs { preset, batch, seq, steps, decode_tokens })?;
                for (k, v) in report.lines {
                    crate::out!("{k:<24} {v}")?;
                }
            }
        }
        Ok(())
    }
}
