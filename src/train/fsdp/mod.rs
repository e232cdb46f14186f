//! Fully sharded data parallelism in one process, a worker thread per rank, on any backend: CPU
//! ranks over the in-process group, or GPUs over NCCL.
//!
//! The model is cut into units: the embedding, each transformer block, and the final norm with the
//! head. Each unit's parameters are flattened, padded to a multiple of the world size and split
//! evenly: rank `r` owns shard `r` of the f32 master weights and of the AdamW moments, and nothing
//! else persists. Before a unit's stage its full parameters are all-gathered (one unit ahead: the
//! next unit's gather is started before this stage's compute is queued, so on a GPU they overlap),
//! and they are dropped right after; the backward gathers them again. A unit's gradients are reduce-scattered to their
//! owners as soon as its backward is done (on the last micro-step only: earlier micro-steps
//! accumulate locally). Each rank runs a disjoint slice of every micro-batch, so the global batch,
//! and hence the loss, is the same whatever the world size.
//!
//! `rank` is one rank's share of a step; `threads` runs every rank at once and handles failures.

use super::optim_state::{flat_units, MomentSource, OwnedRankMoments};
use crate::backend::{measured, AdamW, Backend, Role};
use crate::data::loader::Batch;
use crate::dist::shard::ShardLayout;
use crate::dist::Member;
use crate::model::units::unit_ranges;
use crate::model::{Keep, Llama, LlamaConfig, Weights, Workspace};
use crate::train::guard::UpdateCheck;
use crate::train::optimizer::Stepped;
use anyhow::{bail, Result};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

mod rank;
mod threads;

use rank::{rank_step, GatherPlan, Rank, Shards, UnitLayout};
use threads::{exit_stuck, on_every_rank};

/// Per-rank memory: what persists (shards of the master weights, moments and gradient) and the
/// peak during a step.
#[derive(Clone, Copy, Debug, Default)]
pub struct RankMemory {
    /// The rank in the world.
    pub rank: usize,
    pub persistent_bytes: usize,
    pub peak_bytes: usize,
    /// Seconds the last step spent in collectives.
    pub comm_secs: f64,
}

/// `parallel.collective_timeout_s` as `Fsdp::stall_timeout`: 0 waits forever (a slow step is never
/// taken for a dead peer), anything else is the limit in seconds.
pub fn stall_timeout(collective_timeout_s: u64) -> Option<std::time::Duration> {
    (collective_timeout_s > 0).then(|| std::time::Duration::from_secs(collective_timeout_s))
}

pub struct Fsdp<B: Backend> {
    cfg: LlamaConfig,
    world: usize,
    ranges: Vec<Range<usize>>,
    /// Values per tensor in canonical order.
    sizes: Vec<usize>,
    layouts: Vec<ShardLayout>,
    ranks: Vec<Rank<B>>,
    /// Fault injection for failure-handling tests: `(rank, step)` errors on that rank at that step.
    pub fault: Option<(usize, u64)>,
    /// How long the other ranks get to come back after one fails, and what happens if they do not
    /// (see `on_every_rank`).
    pub release_grace: Duration,
    /// How long the local ranks may stay inside one step with no failure before `on_stuck` is
    /// told (a peer elsewhere died or hung; `parallel.collective_timeout_s`). Only the step: every
    /// node does the same work there, while at the step-boundary agreement and in consolidation
    /// the other nodes may rightly wait on node 0 writing a checkpoint or evaluating, for as long
    /// as that takes.
    pub stall_timeout: Option<Duration>,
    pub on_stuck: Arc<dyn Fn(&str) + Send + Sync>,
}

impl<B: Backend> Fsdp<B> {
    /// Shards `full` (and the moments, when resuming) over the `group`'s ranks, each running
    /// `rows_per_rank` sequences of `seq` tokens per micro-batch.
    pub fn new(
        cfg: &LlamaConfig,
        full: &Weights<Vec<f32>>,
        moments: Option<&dyn MomentSource>,
        group: Vec<Member<B>>,
        rows_per_rank: usize,
        seq: usize,
        keep: Keep,
    ) -> Result<Fsdp<B>> {
        // This process may hold only some ranks of the world (one node of several).
        let world = group.first().map(|m| m.comm.world_size()).unwrap_or(0);
        if world == 0 || group.len() > world || group.iter().any(|m| m.comm.world_size() != world) {
            bail!("FSDP: {} ranks in this process do not form part of one world of {world}", group.len());
        }
        let ranges = unit_ranges(cfg);
        let tensors = full.iter();
        let sizes: Vec<usize> = tensors.iter().map(|t| t.len()).collect();
        // Flattened once; each rank takes its shard of it.
        let full_units = flat_units(cfg, full);
        let layouts: Vec<ShardLayout> =
            ranges.iter().map(|r| ShardLayout::new(sizes[r.clone()].iter().sum(), world)).collect();
        let mut ranks = Vec::with_capacity(world);
        for Member { backend, comm } in group {
            let r = comm.rank();
            // One-value placeholders: the stages never read the model's own weights.
            let placeholders = Weights::try_build(cfg, |_| backend.zeros_as(1, Role::Param))?;
            let model = Llama::new(cfg.clone(), backend, placeholders)?;
            let ws = Workspace::keeping(&model, rows_per_rank, seq, keep)?;
            let b = &model.backend;
            let before = measured(b)?.live_bytes;
            let mut master = Vec::with_capacity(layouts.len());
            let (mut m, mut v, mut grad) = (Vec::new(), Vec::new(), Vec::new());
            for (u, (l, f)) in layouts.iter().zip(&full_units).enumerate() {
                master.push(b.upload_as(&l.take(f, r), Role::Param)?);
                // Each rank reads only its own part of each unit's moments.
                let (mut mu, mut vu) = match moments {
                    Some(src) => src.read(u, l.owned(r))?,
                    None => (Vec::new(), Vec::new()),
                };
                mu.resize(l.shard, 0.0);
                vu.resize(l.shard, 0.0);
                m.push(b.upload_as(&mu, Role::Accum)?);
                v.push(b.upload_as(&vu, Role::Accum)?);
                grad.push(b.zeros_as(l.shard, Role::Accum)?);
            }
            let persistent_bytes = measured(b)?.live_bytes - before;
            let shards = Shards {
                comm,
                master,
                m,
                v,
                grad,
                acc: (0..ranges.len()).map(|_| None).collect(),
                scatter: None,
                persistent_bytes,
                comm_secs: 0.0,
            };
            ranks.push(Rank { model, ws, shards });
        }
        Ok(Fsdp {
            cfg: cfg.clone(),
            world,
            ranges,
            sizes,
            layouts,
            ranks,
            fault: None,
            release_grace: Duration::from_secs(30),
            stall_timeout: Some(Duration::from_secs(crate::config::DEFAULT_COLLECTIVE_TIMEOUT_S)),
            on_stuck: Arc::new(exit_stuck),
        })
    }

    /// Ranks in the whole world (on every node).
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Ranks this process drives.
    pub fn local_ranks(&self) -> usize {
        self.ranks.len()
    }

    /// Whether every rank of the world is in this process (shards can then be read directly).
    fn all_local(&self) -> bool {
        self.ranks.len() == self.world
    }

    /// Memory per rank of the whole world, in rank order: the persistent shards (master, two
    /// moments, gradient), the peak, and the last step's time in collectives, as the rank's backend
    /// measured them (the peak includes the workspace and the placeholder weights). With ranks on
    /// other nodes this is a collective (every node calls it after every step).
    pub fn memory(&mut self) -> Result<Vec<RankMemory>> {
        let own = |r: &Rank<B>| -> Result<RankMemory> {
            Ok(RankMemory {
                rank: r.shards.comm.rank(),
                persistent_bytes: r.shards.persistent_bytes,
                peak_bytes: measured(r.b())?.peak_bytes,
                comm_secs: r.shards.comm_secs,
            })
        };
        if self.all_local() {
            let mut all: Vec<RankMemory> = self.ranks.iter().map(own).collect::<Result<_>>()?;
            all.sort_by_key(|m| m.rank);
            return Ok(all);
        }
        // Each rank fills its own slot of a world-sized table; the sum is the whole table.
        let world = self.world;
        let table = self.each_rank(|rank, _| {
            let m = own(rank)?;
            let mut t = vec![0.0f32; 3 * world];
            t[3 * m.rank..3 * m.rank + 3].copy_from_slice(&[
                m.persistent_bytes as f32,
                m.peak_bytes as f32,
                m.comm_secs as f32,
            ]);
            rank.shards.comm.all_reduce(&mut t)?;
            Ok(t)
        })?;
        let t = &table[0];
        Ok((0..world)
            .map(|r| RankMemory {
                rank: r,
                persistent_bytes: t[3 * r] as usize,
                peak_bytes: t[3 * r + 1] as usize,
                comm_secs: t[3 * r + 2] as f64,
            })
            .collect())
    }

    /// One optimizer step over `batches` (one per micro-step, each the global micro-batch); returns
    /// the summed token loss and the gradient norm before clipping.
    pub fn step(&mut self, batches: &[Batch], step: u64, scale: f32, clip: f64, hp: AdamW) -> Result<(f64, f64)> {
        let s = self.step_checked(batches, step, scale, clip, hp, UpdateCheck::Off)?;
        Ok((s.loss_sum, s.norm))
    }

    /// `step`, whose update is applied only if `check` accepts the world's loss and gradient norm
    /// (every rank compares the same all-reduced values, so all of them apply or skip together).
    pub fn step_checked(
        &mut self,
        batches: &[Batch],
        step: u64,
        scale: f32,
        clip: f64,
        hp: AdamW,
        check: UpdateCheck,
    ) -> Result<Stepped> {
        let Fsdp {
            ref cfg,
            world,
            ref ranges,
            ref sizes,
            ref layouts,
            ref mut ranks,
            fault,
            release_grace,
            stall_timeout,
            ref on_stuck,
        } = *self;
        let results = on_every_rank(ranks, release_grace, stall_timeout, &**on_stuck, |rank, i| {
            rank.shards.comm_secs = 0.0;
            if fault == Some((i, step)) {
                bail!("injected fault at step {step}");
            }
            let mut plan = GatherPlan::for_step(cfg, batches.len());
            let units = UnitLayout { cfg, sizes, ranges, layouts };
            let res = rank_step(rank, &mut plan, world, batches, &units, scale, clip, hp, check);
            if res.is_err() {
                rank.shards.abandon_in_flight(plan);
            }
            res
        })?;
        // Every rank returns the same all-reduced figures.
        results.into_iter().next().ok_or_else(|| anyhow::anyhow!("FSDP: no ranks in this process"))
    }

    /// `on_every_rank` over this process's ranks.
    fn each_rank<T: Send>(&mut self, f: impl Fn(&mut Rank<B>, usize) -> Result<T> + Sync) -> Result<Vec<T>> {
        on_every_rank(&mut self.ranks, self.release_grace, None, &*self.on_stuck, f)
    }

    /// `Σ over nodes` of `local` (each node's first rank contributes it, the others zeros): how the
    /// nodes of a run agree at a step boundary on what to do next.
    pub fn agree(&mut self, local: &[f32]) -> Result<Vec<f32>> {
        let out = self.each_rank(|rank, i| {
            let mut buf = if i == 0 { local.to_vec() } else { vec![0.0; local.len()] };
            rank.shards.comm.all_reduce(&mut buf)?;
            Ok(buf)
        })?;
        Ok(out.into_iter().next().expect("at least one rank"))
    }

    /// The full parameters (the checkpoint, eval and sampling view). With ranks on other nodes this
    /// is a collective: every node must call it at the same point.
    pub fn consolidate(&mut self) -> Result<Weights<Vec<f32>>> {
        let units = self.gather_units(|r| &r.shards.master)?;
        let mut tensors = Vec::new();
        for (flat, range) in units.iter().zip(&self.ranges) {
            let mut o = 0;
            for &n in &self.sizes[range.clone()] {
                tensors.push(flat[o..o + n].to_vec());
                o += n;
            }
        }
        let mut it = tensors.into_iter();
        Weights::try_build(&self.cfg, |_| Ok(it.next().expect("one tensor per spec")))
    }

    /// Every rank's shard of the AdamW moments (of the whole world), as the checkpoint stores them.
    /// A collective, like `consolidate`.
    pub fn rank_moments(&mut self) -> Result<Vec<OwnedRankMoments>> {
        let (m, v) = (self.gather_units(|r| &r.shards.m)?, self.gather_units(|r| &r.shards.v)?);
        let shard = |units: &[Vec<f32>], r: usize| -> Vec<Vec<f32>> {
            units.iter().zip(&self.layouts).map(|(u, l)| u[r * l.shard..(r + 1) * l.shard].to_vec()).collect()
        };
        Ok((0..self.world).map(|r| OwnedRankMoments { m: shard(&m, r), v: shard(&v, r) }).collect())
    }

    /// Each unit of the per-rank f32 shards `pick` names, whole and padded, on the host.
    fn gather_units(&mut self, pick: impl Fn(&Rank<B>) -> &Vec<B::Buf> + Sync) -> Result<Vec<Vec<f32>>> {
        if self.all_local() {
            // Every shard is here: read them in rank order.
            let mut ranks: Vec<&Rank<B>> = self.ranks.iter().collect();
            ranks.sort_by_key(|r| r.shards.comm.rank());
            return (0..self.layouts.len())
                .map(|u| {
                    let mut flat = Vec::with_capacity(self.layouts[u].padded());
                    for r in &ranks {
                        flat.extend(r.b().download(&pick(r)[u])?);
                    }
                    Ok(flat)
                })
                .collect();
        }
        // Shards live on other nodes too: every rank all-gathers each unit in f32 (one unit at a
        // time, so the transient memory is one unit), and the first local rank keeps the result.
        let Fsdp { ref layouts, ref mut ranks, release_grace, ref on_stuck, .. } = *self;
        let out = on_every_rank(ranks, release_grace, None, &**on_stuck, |rank, i| {
            let mut units = Vec::new();
            for (u, l) in layouts.iter().enumerate() {
                let b = rank.b();
                let mut full = b.scratch_as(l.padded(), Role::Accum)?;
                let t = rank.shards.comm.start_all_gather(b, &pick(rank)[u], &mut full)?;
                rank.shards.comm.wait(b, t)?;
                if i == 0 {
                    units.push(b.download(&full)?);
                }
            }
            Ok(units)
        })?;
        Ok(out.into_iter().next().expect("at least one rank"))
    }
}
