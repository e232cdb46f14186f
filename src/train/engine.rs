//! The two engines a trainer can step: the whole model on one device, or the model sharded over
//! ranks (FSDP). Each owns exactly the state it needs, so no combination of optional parts can be
//! out of step with another.

use super::events::RankMetrics;
use super::fsdp::{stall_timeout, Fsdp};
use super::optim_state::{self, MomentSource, OwnedRankMoments};
use super::optimizer::{device_step, AdamWState, StepParams, Stepped};
use super::trainer::NodeRole;
use crate::backend::{Backend, Role};
use crate::config::RunConfig;
use crate::data::loader::Batch;
use crate::dist::Member;
use crate::model::{Keep, Llama, Weights, Workspace};
use anyhow::{bail, Context, Result};
use std::borrow::Cow;

pub enum Engine<B: Backend> {
    /// The model's own weights are trained; its gradients and AdamW moments sit beside them.
    Single { grads: Weights<B::Buf>, opt: AdamWState<B> },
    /// The ranks hold the f32 masters, moments and gradients as shards. (Boxed: the engine is
    /// built once, and the sharded state is the larger.)
    Sharded(Box<Sharded<B>>),
}

pub struct Sharded<B: Backend> {
    fsdp: Fsdp<B>,
    /// The shards have moved on since the model's copy of the weights was last consolidated.
    /// (Beside the shards, the model only evaluates, samples and chats, in compute precision.)
    stale: bool,
    /// On the leading node, from one consolidation until the next step: the f32 weights a
    /// checkpoint or a chat snapshot takes (the model's copy is only compute precision).
    master: Option<Weights<Vec<f32>>>,
}

/// What an engine starts from besides the model.
pub struct EngineStart<B: Backend> {
    /// Under FSDP, the f32 weights the shards start from.
    pub host_weights: Option<Weights<Vec<f32>>>,
    /// AdamW moments to resume from (any world size's checkpoint).
    pub moments: Option<Box<dyn MomentSource>>,
    /// The FSDP ranks this process drives; empty on one device.
    pub group: Vec<Member<B>>,
    pub node: NodeRole,
}

impl<B: Backend> Engine<B> {
    pub fn new(model: &Llama<B>, cfg: &RunConfig, start: EngineStart<B>) -> Result<Self> {
        let world = cfg.parallel.world_size;
        if world == 1 {
            let opt = match start.moments {
                None => AdamWState::new(model)?,
                Some(src) => {
                    let (m, v) = optim_state::full(src.as_ref(), &model.cfg)?;
                    AdamWState { m: upload(model, &m, Role::Accum)?, v: upload(model, &v, Role::Accum)? }
                }
            };
            return Ok(Engine::Single { grads: model.zeros_like_weights()?, opt });
        }
        if start.group.len() * start.node.count != world {
            bail!(
                "parallel.world_size = {world} but {} ranks were opened on each of {} node(s)",
                start.group.len(),
                start.node.count
            );
        }
        let full = start.host_weights.context("FSDP starts from host weights (run::build_on loads them)")?;
        let keep = if cfg.train.recompute { Keep::BlockInputs } else { Keep::All };
        let rows = cfg.train.micro_batch / world;
        let mut fsdp =
            Fsdp::new(&model.cfg, &full, start.moments.as_deref(), start.group, rows, cfg.data.seq_len, keep)?;
        fsdp.stall_timeout = stall_timeout(cfg.parallel.collective_timeout_s);
        // Until the first step the f32 masters are the weights a checkpoint writes.
        let master = start.node.leads().then_some(full);
        Ok(Engine::Sharded(Box::new(Sharded { fsdp, stale: false, master })))
    }

    /// What the model's workspace must keep: a sharded engine's model only runs forward passes.
    pub fn workspace_keep(&self, training: Keep) -> Keep {
        match self {
            Engine::Single { .. } => training,
            Engine::Sharded(_) => Keep::Nothing,
        }
    }

    /// One optimizer step over the micro-batches `batches` yields (read as the step goes on one
    /// device).
    pub fn step(
        &mut self,
        model: &mut Llama<B>,
        ws: &mut Workspace<B>,
        batches: impl Iterator<Item = Result<Batch>>,
        p: StepParams,
    ) -> Result<Stepped> {
        match self {
            Engine::Single { grads, opt } => device_step(model, ws, grads, opt, batches, p),
            Engine::Sharded(s) => {
                // Every rank takes its slice of each micro-batch, so all of them are read first.
                let batches = batches.collect::<Result<Vec<_>>>()?;
                s.master = None;
                s.stale = true;
                s.fsdp.step_checked(&batches, p.hp.step, p.scale, p.max_norm, p.hp, p.check)
            }
        }
    }

    /// Brings the model's weights up to date with the shards. Under FSDP this is a collective:
    /// every node calls it at the same point, and only the leading node keeps the result.
    pub fn sync(&mut self, model: &mut Llama<B>, node: NodeRole) -> Result<()> {
        let Engine::Sharded(s) = self else { return Ok(()) };
        if !s.stale {
            return Ok(());
        }
        let full = s.fsdp.consolidate()?;
        s.stale = false;
        if node.leads() {
            for (dst, src) in model.weights.iter_mut().into_iter().zip(full.iter()) {
                *dst = model.backend.upload_as(src, Role::Activation)?;
            }
            s.master = Some(full);
        }
        Ok(())
    }

    /// The f32 weights after `sync`, on the leading node: what a checkpoint writes and chat reads.
    pub fn master_weights<'a>(&'a self, model: &Llama<B>) -> Result<Cow<'a, Weights<Vec<f32>>>> {
        match self {
            Engine::Single { .. } => Ok(Cow::Owned(download(model, &model.weights)?)),
            Engine::Sharded(s) => match &s.master {
                Some(w) => Ok(Cow::Borrowed(w)),
                None => bail!("FSDP: the weights were not consolidated since the last step"),
            },
        }
    }

    /// AdamW moments, one entry per rank this process holds (one device is a world of one).
    /// Under FSDP this is a collective, like `sync`.
    pub fn moments(&mut self, model: &Llama<B>) -> Result<Vec<OwnedRankMoments>> {
        match self {
            Engine::Single { opt, .. } => {
                let units = |w: &Weights<B::Buf>| -> Result<Vec<Vec<f32>>> {
                    Ok(optim_state::flat_units(&model.cfg, &download(model, w)?))
                };
                Ok(vec![OwnedRankMoments { m: units(&opt.m)?, v: units(&opt.v)? }])
            }
            Engine::Sharded(s) => s.fsdp.rank_moments(),
        }
    }

    /// Per-rank throughput and memory after a step of `tokens_per_s` (a collective under FSDP).
    pub fn rank_metrics(&mut self, model: &Llama<B>, tokens_per_s: f64) -> Result<Vec<RankMetrics>> {
        let Engine::Sharded(s) = self else {
            // The backend counts its buffers: weights, gradients, moments and activations.
            let m = crate::backend::measured(&model.backend)?;
            let (state_mb, peak_mb) = (m.live_bytes as f64 * 1e-6, m.peak_bytes as f64 * 1e-6);
            return Ok(vec![RankMetrics { rank: 0, tokens_per_s, state_mb, peak_mb, comm_ms: 0.0 }]);
        };
        let n = s.fsdp.world_size() as f64;
        Ok(s.fsdp
            .memory()?
            .iter()
            .map(|m| RankMetrics {
                rank: m.rank,
                tokens_per_s: tokens_per_s / n,
                state_mb: m.persistent_bytes as f64 * 1e-6,
                peak_mb: m.peak_bytes as f64 * 1e-6,
                comm_ms: m.comm_secs * 1e3,
            })
            .collect())
    }

    /// The step-boundary agreement of a run over several nodes: each flag summed over the world.
    pub fn agree_across_nodes(&mut self, flags: &[f32]) -> Result<Vec<f32>> {
        match self {
            Engine::Sharded(s) => s.fsdp.agree(flags),
            Engine::Single { .. } => bail!("a run over several nodes needs parallel.world_size > 1"),
        }
    }
}

/// Host tensors in canonical order uploaded as one parameter-shaped set.
fn upload<B: Backend>(model: &Llama<B>, w: &Weights<Vec<f32>>, role: Role) -> Result<Weights<B::Buf>> {
    let mut it = w.iter().into_iter();
    Weights::try_build(&model.cfg, |_| model.backend.upload_as(it.next().expect("same shape"), role))
}

/// A parameter-shaped set of device buffers copied to the host.
fn download<B: Backend>(model: &Llama<B>, w: &Weights<B::Buf>) -> Result<Weights<Vec<f32>>> {
    let mut it = w.iter().into_iter();
    Weights::try_build(&model.cfg, |_| model.backend.download(it.next().expect("same shape")))
}
