//! A training run across nodes: one process per node, each driving its GPUs' ranks of one NCCL
//! world (docs/multi-node.md). Node 0 makes or resumes the run exactly as on one node; once its
//! model and data are ready it lets the other nodes in over the rendezvous, handing them its
//! resolved config, the run directory and the NCCL id. They build the same model (from the same
//! checkpoint, or the same seed), write nothing, and follow node 0 at every step boundary
//! (`step_loop.rs`). The run directory and the data must be on a filesystem every
//! node sees, as they are for a torchrun job.

use super::run::{build_on, drive, locate, open_gpu, Located, TrainArgs};
use super::trainer::{NodeRole, RunEnd, Trainer};
use crate::config::RunConfig;
use crate::dist::launch::Node;
use crate::dist::nccl::{cuda_group_on_node, unique_id};
use crate::dist::rendezvous::exchange;
use crate::train::events::Event;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// What node 0 hands every other node.
#[derive(Serialize, Deserialize)]
struct Plan {
    run_dir: PathBuf,
    /// Node 0's resolved run config (TOML, `--set`s applied, paths absolute).
    config: String,
    nccl_id: Vec<u8>,
}

/// What the nodes' launches must agree on before anything else: the node count, the `--set`s and
/// `--steps`, and the kiln version. SHA-256, so every node's binary computes the same value.
fn fingerprint(args: &TrainArgs, node: &Node) -> u64 {
    use sha2::{Digest, Sha256};
    let what = format!("kiln train {} {:?} {:?} {}", node.nnodes, args.steps, args.sets, env!("CARGO_PKG_VERSION"));
    let digest = Sha256::digest(what.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

/// How long a node waits for the others: node 0 may be preparing data or loading a checkpoint.
fn rendezvous_timeout() -> Result<Duration> {
    match std::env::var("KILN_RENDEZVOUS_TIMEOUT") {
        Ok(v) => v
            .parse::<u64>()
            .map(Duration::from_secs)
            .with_context(|| format!("KILN_RENDEZVOUS_TIMEOUT={v:?}: expected whole seconds")),
        Err(_) => Ok(Duration::from_secs(1800)),
    }
}

pub fn train_across_nodes(args: TrainArgs, node: Node) -> Result<RunEnd> {
    let role = NodeRole { rank: node.node_rank, count: node.nnodes };
    let fp = fingerprint(&args, &node);
    let timeout = rendezvous_timeout()?;
    if role.leads() {
        let located = locate(&args)?;
        let run_dir = std::path::absolute(&located.run_dir)?;
        let (gpu, peak) = open_gpu(&located.cfg)?;
        let trainer = build_on(&args, located, gpu, peak, role, |cfg| {
            let nccl_id = unique_id()?;
            let plan = Plan { run_dir, config: cfg.to_toml()?, nccl_id: nccl_id.clone() };
            exchange(&node, fp, || Ok(serde_json::to_vec(&plan)?), timeout)?;
            cuda_group_on_node(&node, cfg.parallel.world_size, &nccl_id)
        })?;
        return drive(trainer, &args);
    }
    if args.dashboard && args.verbose {
        crate::note!(
            "node {}: the dashboard runs on node 0 (`kiln attach` there); this node trains headless",
            node.node_rank
        );
    }
    // The same checks node 0 makes (config, device, libraries), so a launch that cannot work
    // fails here at once instead of after the rendezvous timeout.
    locate(&args)?;
    let body = exchange(&node, fp, || bail!("only node 0 makes the plan"), timeout)?;
    let plan: Plan =
        serde_json::from_slice(&body).context("rendezvous: node 0 sent no run plan; is it the same kiln?")?;
    let cfg = RunConfig::parse(&plan.config, "node 0's run config", &[])?;
    if cfg.parallel.device != crate::config::Device::Cuda {
        bail!("node 0's run trains on {}: only CUDA runs span nodes", cfg.parallel.device);
    }
    let (gpu, peak) = open_gpu(&cfg)?;
    let located = Located { cfg, run_dir: plan.run_dir, resuming: true };
    let trainer = build_on(&args, located, gpu, peak, role, |cfg| {
        cuda_group_on_node(&node, cfg.parallel.world_size, &plan.nccl_id)
    })?;
    follow(trainer, &args, role)
}

/// A node other than 0: no dashboard, no socket, no files; it trains its ranks and takes part in
/// every collective node 0 starts, until node 0 stops.
pub fn follow<B: crate::backend::Backend>(mut trainer: Trainer<B>, args: &TrainArgs, role: NodeRole) -> Result<RunEnd> {
    let until = match args.steps {
        Some(n) => trainer.state.step + n,
        None => trainer.cfg.train.max_steps,
    };
    if args.verbose {
        crate::note!(
            "kiln train: node {} of {} follows node 0 from step {} (run dir {})",
            role.rank,
            role.count,
            trainer.state.step,
            trainer.run_dir().display()
        );
    }
    let rank = role.rank;
    trainer.run_with_commands(until, None, &mut |e| {
        if let Event::Log { message, .. } = e {
            crate::note!("node {rank}: {message}");
        }
    })
}
