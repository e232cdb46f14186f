//! Finding the run: `--resume DIR`, the demo's own run directory, or a new run from CONFIG; and
//! whether its device and launch can work here. Nothing is written or opened yet.

use super::{default_run_dir, TrainArgs, DEMO_CONFIG};
use crate::config::{Device, ModelInit, RunConfig};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

pub(super) fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Makes config paths absolute so a run directory resumes from anywhere.
pub(super) fn absolutize(cfg: &mut RunConfig) {
    cfg.tokenizer.path = absolute(&cfg.tokenizer.path);
    for s in &mut cfg.data.sources {
        s.path = absolute(&s.path);
        if let Some(p) = &mut s.prepare {
            p.inputs = p.inputs.iter().map(|i| absolute(i)).collect();
        }
    }
    if let ModelInit::Path(p) = &mut cfg.model.init {
        *p = absolute(p);
    }
}

/// A run's configuration and directory, found before anything is written or any device opened.
pub struct Located {
    pub cfg: RunConfig,
    pub run_dir: PathBuf,
    pub resuming: bool,
}

/// Finds the run: `--resume DIR`, the demo's own run directory, or a new run from CONFIG.
pub fn locate(args: &TrainArgs) -> Result<Located> {
    // The demo (no CONFIG) picks up where it left off, so its one command can be run again.
    let demo_dir = PathBuf::from("runs/demo");
    let resume = match (&args.resume, &args.config, &args.run_dir) {
        (None, None, None) if demo_dir.join("config.toml").exists() => {
            if args.verbose {
                crate::note!("resuming the demo run in {} (delete it to start over)", demo_dir.display());
            }
            Some(demo_dir)
        }
        (r, _, _) => r.clone(),
    };
    let resuming = resume.is_some();
    let (cfg, run_dir) = match &resume {
        Some(run) => {
            let p = run.join("config.toml");
            if !p.exists() {
                bail!("{}: not a kiln run directory (no config.toml)", run.display());
            }
            (RunConfig::load(&p, &args.sets)?, run.clone())
        }
        None => {
            let path = args.config.clone().unwrap_or_else(|| PathBuf::from(DEMO_CONFIG));
            if args.config.is_none() && !path.exists() {
                bail!("{DEMO_CONFIG}: not found (run from the kiln checkout, or give a CONFIG)");
            }
            let cfg = RunConfig::load(&path, &args.sets)?;
            let run = args.run_dir.clone().unwrap_or_else(|| default_run_dir(args.config.as_deref()));
            (cfg, run)
        }
    };
    check_placement(&cfg)?;
    for w in cfg.warnings() {
        crate::note!("warning: {w}");
    }
    Ok(Located { cfg, run_dir, resuming })
}

/// Where the ranks run: checked before anything is written, so a wrong device or launch leaves no
/// half-made run directory behind.
pub(super) fn check_placement(cfg: &RunConfig) -> Result<()> {
    use crate::backend::cuda::libs::{require, CudaLib};
    let node = crate::dist::launch::Node::from_env()?;
    match cfg.parallel.device {
        Device::Cuda => {
            node.local_ranks(cfg.parallel.world_size)?;
            require("parallel.device = \"cuda\"", &[CudaLib::Driver, CudaLib::Nvrtc, CudaLib::CublasLt])?;
            if cfg.parallel.world_size > 1 || node.nnodes > 1 {
                require("FSDP on GPUs", &[CudaLib::Nccl])?;
            }
            Ok(())
        }
        Device::Cpu if node.nnodes > 1 => bail!(
            "NNODES={}: multi-node runs go over NCCL and need parallel.device = \"cuda\" (CPU ranks share one process)",
            node.nnodes
        ),
        _ => Ok(()),
    }
}
