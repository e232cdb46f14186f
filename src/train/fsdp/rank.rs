//! One FSDP rank: its shards, the gathers it keeps one unit ahead, the reduce-scatters it starts
//! after each unit's backward, and `rank_step`, its whole share of an optimizer step. The step
//! runs the model's own walk (`model::units`) over `Gathered`, the source that gathers each unit
//! just before its stage.

use crate::backend::{AdamW, Backend, Role};
use crate::data::loader::Batch;
use crate::dist::shard::ShardLayout;
use crate::dist::{DeviceComm, Ticket};
use crate::model::units::{self, Grads, Params};
use crate::model::{LayerWeights, Llama, LlamaConfig, Workspace};
use crate::train::guard::{self, UpdateCheck};
use crate::train::optimizer::{poison, Stepped};
use anyhow::{anyhow, bail, Result};
use std::ops::Range;
use std::time::Instant;

pub(super) struct Rank<B: Backend> {
    /// Holds the rank's backend and RoPE tables; its own weights are placeholders, because every
    /// stage takes the gathered unit as an argument.
    pub(super) model: Llama<B>,
    pub(super) ws: Workspace<B>,
    pub(super) shards: Shards<B>,
}

/// A rank's part of the world: its communicator and its shard of every unit.
pub(super) struct Shards<B: Backend> {
    pub(super) comm: Box<dyn DeviceComm<B>>,
    /// This rank's shard of each unit: master weights (`Role::Param`), moments and gradient.
    pub(super) master: Vec<B::Buf>,
    pub(super) m: Vec<B::Buf>,
    pub(super) v: Vec<B::Buf>,
    pub(super) grad: Vec<B::Buf>,
    /// Full-size unit gradients accumulated over micro-steps before the last one.
    pub(super) acc: Vec<Option<B::Buf>>,
    /// The reduce-scatter in flight and its input (kept alive until it is done).
    pub(super) scatter: Option<(Ticket, B::Buf)>,
    /// Bytes of the shards, as the backend measured them when they were made.
    pub(super) persistent_bytes: usize,
    /// Seconds spent in collectives during the current step.
    pub(super) comm_secs: f64,
}

impl<B: Backend> Rank<B> {
    pub(super) fn b(&self) -> &B {
        &self.model.backend
    }
}

impl<B: Backend> Shards<B> {
    /// Starts gathering unit `u`'s full parameters (padded), in the precision the ops read.
    fn start_gather(&mut self, b: &B, u: usize, layout: ShardLayout) -> Result<InFlight<B::Buf>> {
        // The gather writes every value (shards are padded to equal lengths).
        let mut buf = b.scratch_as(layout.padded(), Role::Activation)?;
        let ticket = self.comm.start_all_gather(b, &self.master[u], &mut buf)?;
        Ok(InFlight { unit: u, buf, ticket })
    }

    /// The plan's next unit, gathered. The unit after it starts travelling first, so on a GPU its
    /// gather overlaps the compute about to be queued on this one.
    fn next_unit(&mut self, b: &B, plan: &mut GatherPlan<B::Buf>, layouts: &[ShardLayout]) -> Result<B::Buf> {
        let want = *plan.order.get(plan.next).ok_or_else(|| anyhow!("FSDP: gather plan exhausted"))?;
        let cur = match plan.ahead.take() {
            Some(f) => f,
            None => self.start_gather(b, want, layouts[want])?,
        };
        if cur.unit != want {
            let unit = cur.unit;
            abandon(cur.buf);
            bail!("FSDP: gathered unit {unit} where the plan wants {want}");
        }
        // Waited on first, so an error below drops a buffer nothing writes any more. (The wait
        // only orders the compute stream; the next gather still overlaps this unit's compute.)
        if let Err(e) = self.comm.wait(b, cur.ticket) {
            abandon(cur.buf);
            return Err(e);
        }
        plan.next += 1;
        if let Some(&u) = plan.order.get(plan.next) {
            plan.ahead = Some(self.start_gather(b, u, layouts[u])?);
        }
        Ok(cur.buf)
    }

    /// Splits a gathered block unit into its tensors. The split copies, so for a moment the unit is
    /// held twice (the backend's meter sees it), then the flat buffer is dropped.
    fn unpack_layer(&mut self, b: &B, flat: B::Buf, sizes: &[usize]) -> Result<LayerWeights<B::Buf>> {
        let mut parts = Vec::with_capacity(sizes.len());
        let mut o = 0;
        for &n in sizes {
            let mut t = b.scratch_as(n, Role::Activation)?;
            b.copy(&mut t, 0, &flat, o, n)?;
            parts.push(t);
            o += n;
        }
        drop(flat);
        Ok(LayerWeights::from_parts(parts))
    }

    /// Hands a unit's full (padded) gradient to its owners, or accumulates it until the last
    /// micro-step. The reduce-scatter runs while the next unit's backward computes; its input is
    /// freed once the one after it starts (or at the end of the step).
    fn push_grad(&mut self, b: &B, u: usize, mut full: B::Buf, last: bool) -> Result<()> {
        if let Some(acc) = self.acc[u].take() {
            b.add_assign(&mut full, &acc)?;
        }
        if !last {
            self.acc[u] = Some(full);
            return Ok(());
        }
        self.finish_scatter(b)?;
        let ticket = self.comm.start_reduce_scatter(b, &full, &mut self.grad[u])?;
        self.scatter = Some((ticket, full));
        Ok(())
    }

    /// After a failed step: the gather and reduce-scatter still in flight keep their buffers (see
    /// `abandon`), since their tickets will never be waited on. A reduce-scatter also writes one of
    /// the gradient shards, so those are let go too, and this rank takes no further step.
    pub(super) fn abandon_in_flight(&mut self, mut plan: GatherPlan<B::Buf>) {
        if let Some(f) = plan.ahead.take() {
            abandon(f.buf);
        }
        if let Some((_, input)) = self.scatter.take() {
            abandon(input);
            abandon(std::mem::take(&mut self.grad));
        }
    }

    /// Waits for the reduce-scatter in flight, then lets its input go.
    fn finish_scatter(&mut self, b: &B) -> Result<()> {
        if let Some((ticket, input)) = self.scatter.take() {
            if let Err(e) = self.comm.wait(b, ticket) {
                abandon(input);
                return Err(e);
            }
            drop(input);
        }
        Ok(())
    }
}

/// Copies `parts` back to back into one zero-padded buffer of `padded` values.
fn flatten<B: Backend>(b: &B, parts: &[&B::Buf], padded: usize) -> Result<B::Buf> {
    let mut flat = b.zeros_as(padded, Role::Accum)?;
    let mut o = 0;
    for p in parts {
        let n = b.len(p);
        b.copy(&mut flat, o, p, 0, n)?;
        o += n;
    }
    Ok(flat)
}

/// Lets go of a buffer a collective may still be writing (an error path: its ticket will never be
/// waited on) without freeing it: a GPU's allocator would hand the memory out again while NCCL
/// still writes it. The run is ending; the leak is the safe side.
fn abandon<Buf>(buf: Buf) {
    std::mem::forget(buf);
}

/// A started gather: readable once its ticket is waited on.
struct InFlight<Buf> {
    unit: usize,
    buf: Buf,
    ticket: Ticket,
}

/// The order a step gathers units in, with the next one already travelling.
pub(super) struct GatherPlan<Buf> {
    order: Vec<usize>,
    next: usize,
    ahead: Option<InFlight<Buf>>,
}

impl<Buf> GatherPlan<Buf> {
    /// `micro_steps` times the order the model's walk reads its units in (`units::read_order`).
    pub(super) fn for_step(cfg: &LlamaConfig, micro_steps: usize) -> Self {
        let once = units::read_order(cfg);
        let order = (0..micro_steps).flat_map(|_| once.iter().copied()).collect();
        GatherPlan { order, next: 0, ahead: None }
    }
}

/// Times a collective. An asynchronous backend queues work, so the queue is drained before and
/// after: the figure is the collective's own time, not the compute queued ahead of it.
fn timed<B: Backend, T>(b: &B, secs: &mut f64, f: impl FnOnce() -> Result<T>) -> Result<T> {
    b.synchronize()?;
    let t = Instant::now();
    let out = f()?;
    b.synchronize()?;
    *secs += t.elapsed().as_secs_f64();
    Ok(out)
}

/// The unit layout of the model every rank shares.
pub(super) struct UnitLayout<'a> {
    pub(super) cfg: &'a LlamaConfig,
    /// Tensor sizes in canonical order, and each unit's range of them.
    pub(super) sizes: &'a [usize],
    pub(super) ranges: &'a [Range<usize>],
    pub(super) layouts: &'a [ShardLayout],
}

/// One micro-step of a rank as the model's walk sees it: each unit gathered just before its stage
/// and freed after, each unit's gradient handed to its owners (or accumulated) right after its
/// backward.
struct Gathered<'a, B: Backend> {
    b: &'a B,
    shards: &'a mut Shards<B>,
    plan: &'a mut GatherPlan<B::Buf>,
    u: &'a UnitLayout<'a>,
    /// The last micro-step: gradients go to their owners instead of accumulating.
    last: bool,
    /// The head's final norm and output matrix, from its forward until its backward.
    head: Option<(B::Buf, B::Buf)>,
    /// Tied: the output matrix's gradient, which is the start of the embedding's.
    embed_grad: Option<B::Buf>,
}

impl<B: Backend> Gathered<'_, B> {
    fn next_unit(&mut self) -> Result<B::Buf> {
        self.shards.next_unit(self.b, self.plan, self.u.layouts)
    }

    /// Block `l`'s parameters, gathered and split into its tensors.
    fn gather_block(&mut self, l: usize) -> Result<LayerWeights<B::Buf>> {
        let flat = self.next_unit()?;
        let sizes = &self.u.sizes[self.u.ranges[1 + l].clone()];
        self.shards.unpack_layer(self.b, flat, sizes)
    }

    fn push_grad(&mut self, unit: usize, g: B::Buf) -> Result<()> {
        self.shards.push_grad(self.b, unit, g, self.last)
    }
}

impl<B: Backend> Params<B> for Gathered<'_, B> {
    fn embed<T>(&mut self, f: impl FnOnce(&B::Buf) -> Result<T>) -> Result<T> {
        // One tensor: the padded gathered buffer is used as is.
        let e = self.next_unit()?;
        let out = f(&e);
        drop(e);
        out
    }

    fn block<T>(&mut self, l: usize, f: impl FnOnce(&LayerWeights<B::Buf>) -> Result<T>) -> Result<T> {
        let lw = self.gather_block(l)?;
        let out = f(&lw);
        drop(lw);
        out
    }

    fn head<T>(&mut self, f: impl FnOnce(&B::Buf, &B::Buf) -> Result<T>) -> Result<T> {
        let (cfg, b) = (self.u.cfg, self.b);
        let (d, vocab, tied) = (cfg.d_model, cfg.vocab_size, cfg.tie_embeddings);
        // The unit is the final norm, then (untied) the output matrix: both are copied out.
        let flat = self.next_unit()?;
        let mut norm = b.scratch_as(d, Role::Activation)?;
        b.copy(&mut norm, 0, &flat, 0, d)?;
        let untied = match tied {
            true => None,
            false => {
                let mut h = b.scratch_as(vocab * d, Role::Activation)?;
                b.copy(&mut h, 0, &flat, d, vocab * d)?;
                Some(h)
            }
        };
        // For a moment the head was held twice; the copies outlive the flat buffer.
        drop(flat);
        // A tied head's output matrix is the embedding, gathered again.
        let head = match untied {
            Some(h) => h,
            None => self.next_unit()?,
        };
        let out = f(&norm, &head);
        self.head = Some((norm, head));
        out
    }
}

impl<B: Backend> Grads<B> for Gathered<'_, B> {
    fn head_grad(&mut self, f: impl FnOnce(&B::Buf, &B::Buf, &mut B::Buf, &mut B::Buf) -> Result<()>) -> Result<()> {
        let (cfg, b) = (self.u.cfg, self.b);
        let (d, vocab, tied) = (cfg.d_model, cfg.vocab_size, cfg.tie_embeddings);
        let hu = cfg.n_layer + 1;
        let (norm, head) = self.head.take().ok_or_else(|| anyhow!("FSDP: the head's backward before its forward"))?;
        let mut g_norm = b.zeros_as(d, Role::Accum)?;
        // Tied, the output matrix's gradient is the start of the embedding's: sized as that padded unit.
        let mut g_head = b.zeros_as(if tied { self.u.layouts[0].padded() } else { vocab * d }, Role::Accum)?;
        f(&norm, &head, &mut g_norm, &mut g_head)?;
        drop((norm, head));
        let padded = self.u.layouts[hu].padded();
        if tied {
            // The padded copy takes g_norm's place.
            let g = flatten(b, &[&g_norm], padded)?;
            drop(g_norm);
            self.embed_grad = Some(g_head);
            return self.push_grad(hu, g);
        }
        // The unit's gradient is assembled in one buffer: for a moment the head's is held twice.
        let g = flatten(b, &[&g_norm, &g_head], padded)?;
        drop((g_norm, g_head));
        self.push_grad(hu, g)
    }

    fn block_grad(
        &mut self,
        l: usize,
        f: impl FnOnce(&LayerWeights<B::Buf>, &mut LayerWeights<B::Buf>) -> Result<()>,
    ) -> Result<()> {
        let b = self.b;
        let lw = self.gather_block(l)?;
        let sizes = &self.u.sizes[self.u.ranges[1 + l].clone()];
        let mut gw =
            LayerWeights::from_parts(sizes.iter().map(|&n| b.zeros_as(n, Role::Accum)).collect::<Result<_>>()?);
        f(&lw, &mut gw)?;
        drop(lw);
        // Flattening the gradient copies it; the per-tensor copy goes right after.
        let g = flatten(b, &gw.parts(), self.u.layouts[1 + l].padded())?;
        drop(gw);
        self.push_grad(1 + l, g)
    }

    fn embed_grad(&mut self, f: impl FnOnce(&mut B::Buf) -> Result<()>) -> Result<()> {
        let mut g = match self.embed_grad.take() {
            Some(g) => g,
            None => self.b.zeros_as(self.u.layouts[0].padded(), Role::Accum)?,
        };
        f(&mut g)?;
        self.push_grad(0, g)
    }
}

/// This rank's share of one optimizer step: the model's forward and backward over its slice of
/// each micro-batch, the gradients reduce-scattered to their owners, then clipping and AdamW on
/// its own shards. Returns the world's summed token loss and gradient norm.
#[allow(clippy::too_many_arguments)]
pub(super) fn rank_step<B: Backend>(
    rank: &mut Rank<B>,
    plan: &mut GatherPlan<B::Buf>,
    world: usize,
    batches: &[Batch],
    u: &UnitLayout<'_>,
    scale: f32,
    clip: f64,
    hp: AdamW,
    check: UpdateCheck,
) -> Result<Stepped> {
    let Rank { model, ws, shards } = rank;
    if shards.grad.len() != u.layouts.len() {
        bail!("FSDP: an earlier step failed with a reduce-scatter in flight, so this engine cannot step again");
    }
    let r = shards.comm.rank();
    let mut loss_sum = 0.0f64;
    for (k, batch) in batches.iter().enumerate() {
        let rows = batch.ids.len() / world;
        let (ids, targets) = (&batch.ids[r * rows..(r + 1) * rows], &batch.targets[r * rows..(r + 1) * rows]);
        let last = k + 1 == batches.len();
        let b = &model.backend;
        let mut src = Gathered { b, shards: &mut *shards, plan: &mut *plan, u, last, head: None, embed_grad: None };
        let losses = units::forward(model, ws, &mut src, ids, targets, Some(scale))?;
        loss_sum += losses.iter().map(|&x| x as f64).sum::<f64>();
        units::backward(model, ws, &mut src)?;
    }
    let b = &model.backend;
    shards.finish_scatter(b)?;
    shards.comm_secs += shards.comm.take_busy_secs()?;

    if guard::poisoned(hp.step, r) {
        poison(b, &mut shards.grad[0])?;
    }
    // Global loss and each unit's Σ grad² (its norm; their sum, the global norm's square), then
    // clipping and AdamW on this rank's shards.
    let groups: Vec<Vec<&B::Buf>> = shards.grad.iter().map(|g| vec![g]).collect();
    let mut stats: Vec<f32> =
        std::iter::once(loss_sum as f32).chain(b.sum_squares_grouped(&groups)?.into_iter().map(|x| x as f32)).collect();
    let comm = &shards.comm;
    timed(b, &mut shards.comm_secs, || comm.all_reduce(&mut stats))?;
    let unit_sq: Vec<f64> = stats[1..].iter().map(|&x| x as f64).collect();
    let norm = unit_sq.iter().sum::<f64>().sqrt();
    let out = Stepped { loss_sum: stats[0] as f64, norm, unit_sq };
    if !check.accepts(out.loss_sum, scale, norm) {
        return Ok(out);
    }
    let hp = AdamW { grad_scale: crate::train::optimizer::clip_coefficient(norm, clip), ..hp };
    let mut params: Vec<&mut B::Buf> = shards.master.iter_mut().collect();
    let mut m: Vec<&mut B::Buf> = shards.m.iter_mut().collect();
    let mut v: Vec<&mut B::Buf> = shards.v.iter_mut().collect();
    let grads: Vec<&B::Buf> = shards.grad.iter().collect();
    b.adamw_step_all(&mut params, &grads, &mut m, &mut v, hp)?;
    Ok(out)
}
