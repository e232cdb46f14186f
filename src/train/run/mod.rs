//! `kiln train`: set up a run directory (new or resumed), prepare data on first use, build the
//! trainer, and drive it with headless output or the dashboard. Split by stage: `locate` (which
//! run, checked before anything is written), `build` (the trainer on a backend) and `drive`
//! (headless or the dashboard); `detach` starts the same run in the background.

mod build;
mod detach;
mod drive;
mod locate;

pub use build::build_on;
pub use detach::detach;
pub use drive::headless_line;
pub(super) use drive::{drive, open_gpu};
pub use locate::{locate, Located};

use crate::backend::cpu::{measured_peak_flops, Cpu};
use crate::config::Device;
use crate::train::signals;
use crate::train::trainer::{NodeRole, RunEnd};
use anyhow::Result;
use std::path::{Path, PathBuf};

pub const DEMO_CONFIG: &str = "configs/demo.toml";

pub struct TrainArgs {
    pub config: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub sets: Vec<String>,
    pub steps: Option<u64>,
    pub resume: Option<PathBuf>,
    /// Print progress lines (otherwise silent apart from errors).
    pub verbose: bool,
    /// Show the terminal dashboard instead of headless lines.
    pub dashboard: bool,
}

pub fn train(args: TrainArgs) -> Result<RunEnd> {
    signals::install();
    let node = crate::dist::launch::Node::from_env()?;
    if node.nnodes > 1 {
        return crate::train::nodes::train_across_nodes(args, node);
    }
    let located = locate(&args)?;
    let world = located.cfg.parallel.world_size;
    match located.cfg.parallel.device {
        // The GPUs are opened (libraries, kernels, NCCL) before a new run's directory is made, so
        // a machine without CUDA, or with too few GPUs, leaves nothing behind. GPU 0 also holds
        // the full model that evaluates, samples and checkpoints.
        Device::Cuda => {
            let (gpu, peak) = open_gpu(&located.cfg)?;
            let group = if world > 1 { crate::dist::nccl::cuda_group(world)? } else { Vec::new() };
            drive(build_on(&args, located, gpu, peak, NodeRole::SINGLE, |_| Ok(group))?, &args)
        }
        Device::Cpu => {
            let group = if world > 1 { crate::dist::local::cpu_group(world) } else { Vec::new() };
            let trainer = build_on(&args, located, Cpu::new(), measured_peak_flops(), NodeRole::SINGLE, |_| Ok(group))?;
            drive(trainer, &args)
        }
    }
}

/// The run directory a new run from `config` (or the demo) would use.
pub fn default_run_dir(config: Option<&Path>) -> PathBuf {
    let path = config.unwrap_or(Path::new(DEMO_CONFIG));
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
    PathBuf::from("runs").join(stem)
}
