//! One FSDP rank: its shards, the gathers it keeps one unit ahead, the reduce-scatters it starts
//! after each unit's backward, and `rank_step`, its whole share of an optimizer step.

use crate::backend::{AdamW, Backend, Role};
use crate::data::loader::Batch;
use crate::dist::shard::ShardLayout;
use crate::dist::{DeviceComm, Ticket};
use crate::model::{LayerWeights, Llama, LlamaConfig, Workspace};
use anyhow::{bail, Result};
use std::ops::Range;
use std::time::Instant;

pub(super) struct Rank<B: Backend> {
    pub(super) comm: Box<dyn DeviceComm<B>>,
    /// Holds the rank's backend and RoPE tables; its own weights are placeholders, because every
    /// stage takes the gathered unit as an argument.
    pub(super) model: Llama<B>,
    pub(super) ws: Workspace<B>,
    /// This rank's shard of each unit: master weights (`Role::Param`), moments and gradient.
    pub(super) master: Vec<B::Buf>,
    pub(super) m: Vec<B::Buf>,
    pub(super) v: Vec<B::Buf>,
    pub(super) grad: Vec<B::Buf>,
    /// Full-size unit gradients accumulated over micro-steps before the last one.
    pub(super) acc: Vec<Option<B::Buf>>,
    /// The reduce-scatter in flight and its input (kept alive until it is done), with its length.
    pub(super) scatter: Option<(Ticket, B::Buf, usize)>,
    /// f32 values this engine holds, for backends that do not count their own bytes (the CPU).
    pub(super) live: usize,
    pub(super) peak: usize,
    /// Bytes of the shards, measured by backends that count (a GPU).
    pub(super) persistent_bytes: Option<usize>,
    /// Seconds spent in collectives during the current step.
    pub(super) comm_secs: f64,
}

impl<B: Backend> Rank<B> {
    fn note_alloc(&mut self, n: usize) {
        self.live += n;
        self.peak = self.peak.max(self.live);
    }
    fn note_free(&mut self, n: usize) {
        self.live -= n;
    }
    pub(super) fn b(&self) -> &B {
        &self.model.backend
    }

    /// Starts gathering unit `u`'s full parameters (padded), in the precision the ops read.
    fn start_gather(&mut self, u: usize, layout: ShardLayout) -> Result<InFlight<B::Buf>> {
        let b = &self.model.backend;
        // The gather writes every value (shards are padded to equal lengths).
        let mut buf = b.scratch_as(layout.padded(), Role::Activation)?;
        let ticket = self.comm.start_all_gather(b, &self.master[u], &mut buf)?;
        self.note_alloc(layout.len);
        Ok(InFlight { unit: u, buf, ticket })
    }

    /// The plan's next unit, gathered. The unit after it starts travelling first, so on a GPU its
    /// gather overlaps the compute about to be queued on this one.
    fn next_unit(&mut self, plan: &mut GatherPlan<B::Buf>, layouts: &[ShardLayout]) -> Result<B::Buf> {
        let want = *plan.order.get(plan.next).ok_or_else(|| anyhow::anyhow!("FSDP: gather plan exhausted"))?;
        let cur = match plan.ahead.take() {
            Some(f) => f,
            None => self.start_gather(want, layouts[want])?,
        };
        if cur.unit != want {
            let unit = cur.unit;
            abandon(cur.buf);
            bail!("FSDP: gathered unit {unit} where the plan wants {want}");
        }
        // Waited on first, so an error below drops a buffer nothing writes any more. (The wait
        // only orders the compute stream; the next gather still overlaps this unit's compute.)
        if let Err(e) = self.comm.wait(&self.model.backend, cur.ticket) {
            abandon(cur.buf);
            return Err(e);
        }
        plan.next += 1;
        if let Some(&u) = plan.order.get(plan.next) {
            plan.ahead = Some(self.start_gather(u, layouts[u])?);
        }
        Ok(cur.buf)
    }

    /// Splits a gathered block unit into its tensors. The split copies, so for a moment the unit is
    /// held twice; the accounting says so, then the flat buffer is dropped.
    fn unpack_layer(&mut self, flat: B::Buf, len: usize, sizes: &[usize]) -> Result<LayerWeights<B::Buf>> {
        self.note_alloc(len);
        let mut parts = Vec::with_capacity(sizes.len());
        let mut o = 0;
        for &n in sizes {
            let mut t = self.b().scratch_as(n, Role::Activation)?;
            self.b().copy(&mut t, 0, &flat, o, n)?;
            parts.push(t);
            o += n;
        }
        drop(flat);
        self.note_free(len);
        Ok(layer_from(parts))
    }

    /// Copies `parts` back to back into one zero-padded buffer of `padded` values.
    fn flatten(&self, parts: &[&B::Buf], padded: usize) -> Result<B::Buf> {
        let mut flat = self.b().zeros_as(padded, Role::Accum)?;
        let mut o = 0;
        for p in parts {
            let n = self.b().len(p);
            self.b().copy(&mut flat, o, p, 0, n)?;
            o += n;
        }
        Ok(flat)
    }

    /// Hands a unit's full (padded) gradient to its owners, or accumulates it until the last
    /// micro-step. The reduce-scatter runs while the next unit's backward computes; its input is
    /// freed once the one after it starts (or at the end of the step).
    fn push_grad(&mut self, u: usize, mut full: B::Buf, layout: ShardLayout, last: bool) -> Result<()> {
        if let Some(acc) = self.acc[u].take() {
            self.b().add_assign(&mut full, &acc)?;
            self.note_free(layout.len);
        }
        if !last {
            self.acc[u] = Some(full);
            return Ok(());
        }
        self.finish_scatter()?;
        let ticket = self.comm.start_reduce_scatter(&self.model.backend, &full, &mut self.grad[u])?;
        self.scatter = Some((ticket, full, layout.len));
        Ok(())
    }

    /// After a failed step: the gather and reduce-scatter still in flight keep their buffers (see
    /// `abandon`), since their tickets will never be waited on. A reduce-scatter also writes one of
    /// the gradient shards, so those are let go too, and this rank takes no further step.
    pub(super) fn abandon_in_flight(&mut self, mut plan: GatherPlan<B::Buf>) {
        if let Some(f) = plan.ahead.take() {
            abandon(f.buf);
        }
        if let Some((_, input, _)) = self.scatter.take() {
            abandon(input);
            abandon(std::mem::take(&mut self.grad));
        }
    }

    /// Waits for the reduce-scatter in flight, then lets its input go.
    fn finish_scatter(&mut self) -> Result<()> {
        if let Some((ticket, input, len)) = self.scatter.take() {
            if let Err(e) = self.comm.wait(&self.model.backend, ticket) {
                abandon(input);
                return Err(e);
            }
            drop(input);
            self.note_free(len);
        }
        Ok(())
    }
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
    /// Per micro-step: the embedding, the blocks, the head (and the embedding again when the head
    /// is tied to it), then the blocks in reverse for the backward.
    pub(super) fn for_step(cfg: &LlamaConfig, micro_steps: usize) -> Self {
        let (n, head) = (cfg.n_layer, cfg.n_layer + 1);
        let mut order = Vec::with_capacity(micro_steps * (2 * n + 3));
        for _ in 0..micro_steps {
            order.push(0);
            order.extend(1..=n);
            order.push(head);
            if cfg.tie_embeddings {
                order.push(0);
            }
            order.extend((1..=n).rev());
        }
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

fn layer_from<T>(mut t: Vec<T>) -> LayerWeights<T> {
    let mut it = t.drain(..);
    let mut next = || it.next().expect("nine tensors per layer");
    LayerWeights {
        attn_norm: next(),
        q_proj: next(),
        k_proj: next(),
        v_proj: next(),
        o_proj: next(),
        mlp_norm: next(),
        gate_proj: next(),
        up_proj: next(),
        down_proj: next(),
    }
}

fn layer_parts<T>(l: &LayerWeights<T>) -> [&T; 9] {
    [&l.attn_norm, &l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.mlp_norm, &l.gate_proj, &l.up_proj, &l.down_proj]
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rank_step<B: Backend>(
    rank: &mut Rank<B>,
    plan: &mut GatherPlan<B::Buf>,
    world: usize,
    batches: &[Batch],
    cfg: &LlamaConfig,
    ranges: &[Range<usize>],
    sizes: &[usize],
    layouts: &[ShardLayout],
    scale: f32,
    clip: f64,
    hp: AdamW,
) -> Result<(f64, f64)> {
    let (n_layer, d, vocab) = (cfg.n_layer, cfg.d_model, cfg.vocab_size);
    if rank.grad.len() != layouts.len() {
        bail!("FSDP: an earlier step failed with a reduce-scatter in flight, so this engine cannot step again");
    }
    let r = rank.comm.rank();
    let head_unit = n_layer + 1;
    let (embed_len, head_len) = (layouts[0].len, layouts[head_unit].len);
    let mut loss_sum = 0.0f64;
    for (k, batch) in batches.iter().enumerate() {
        let last = k + 1 == batches.len();
        let rows = batch.ids.len() / world;
        let (ids, targets) = (&batch.ids[r * rows..(r + 1) * rows], &batch.targets[r * rows..(r + 1) * rows]);
        rank.model.forward_begin(&mut rank.ws, ids, targets)?;
        // The embedding unit is one tensor: its padded gathered buffer is used as is.
        let e = rank.next_unit(plan, layouts)?;
        rank.model.embed_forward(&e, &mut rank.ws)?;
        drop(e);
        rank.note_free(embed_len);
        for l in 0..n_layer {
            let flat = rank.next_unit(plan, layouts)?;
            let lw = rank.unpack_layer(flat, layouts[1 + l].len, &sizes[ranges[1 + l].clone()])?;
            rank.model.layer_forward(l, &lw, &mut rank.ws)?;
            drop(lw);
            rank.note_free(layouts[1 + l].len);
        }
        // The head unit is the final norm, then (untied) the output matrix. A tied head is the
        // embedding: that unit is gathered again.
        let head_flat = rank.next_unit(plan, layouts)?;
        let (final_norm, untied_head) = {
            let b = &rank.model.backend;
            let mut n = b.scratch_as(d, Role::Activation)?;
            b.copy(&mut n, 0, &head_flat, 0, d)?;
            let h = if cfg.tie_embeddings {
                None
            } else {
                let mut h = b.scratch_as(vocab * d, Role::Activation)?;
                b.copy(&mut h, 0, &head_flat, d, vocab * d)?;
                Some(h)
            };
            (n, h)
        };
        // Copied out, the gathered unit goes; for a moment the head was held twice.
        rank.note_alloc(if cfg.tie_embeddings { d } else { head_len });
        drop(head_flat);
        rank.note_free(head_len);
        let head = match untied_head {
            Some(h) => h,
            None => rank.next_unit(plan, layouts)?,
        };
        let losses = rank.model.head_forward(&final_norm, &head, &mut rank.ws, targets, Some(scale))?;
        loss_sum += losses.iter().map(|&x| x as f64).sum::<f64>();

        let b = &rank.model.backend;
        let mut g_norm = b.zeros_as(d, Role::Accum)?;
        // Tied, the head's gradient is the start of the embedding's: sized as that padded unit.
        let g_head_len = if cfg.tie_embeddings { layouts[0].padded() } else { vocab * d };
        let mut g_head = b.zeros_as(g_head_len, Role::Accum)?;
        rank.note_alloc(d + vocab * d);
        rank.model.head_backward(&final_norm, &head, &mut rank.ws, &mut g_norm, &mut g_head)?;
        drop((head, final_norm));
        rank.note_free(if cfg.tie_embeddings { d + embed_len } else { head_len });
        let g_embed = if cfg.tie_embeddings {
            // The padded copy takes over g_norm's accounting.
            let g = rank.flatten(&[&g_norm], layouts[head_unit].padded())?;
            drop(g_norm);
            rank.push_grad(head_unit, g, layouts[head_unit], last)?;
            g_head
        } else {
            // The unit's gradient is assembled in one buffer: for a moment the head's is held twice.
            rank.note_alloc(head_len);
            let g = rank.flatten(&[&g_norm, &g_head], layouts[head_unit].padded())?;
            drop((g_norm, g_head));
            rank.note_free(head_len);
            rank.push_grad(head_unit, g, layouts[head_unit], last)?;
            rank.note_alloc(embed_len);
            rank.model.backend.zeros_as(layouts[0].padded(), Role::Accum)?
        };
        for l in (0..n_layer).rev() {
            let w = layouts[1 + l].len;
            let flat = rank.next_unit(plan, layouts)?;
            let lw = rank.unpack_layer(flat, w, &sizes[ranges[1 + l].clone()])?;
            let b = &rank.model.backend;
            let parts =
                sizes[ranges[1 + l].clone()].iter().map(|&n| b.zeros_as(n, Role::Accum)).collect::<Result<_>>()?;
            let mut gw = layer_from(parts);
            rank.note_alloc(w);
            rank.model.layer_backward(l, &lw, &mut gw, &mut rank.ws)?;
            drop(lw);
            rank.note_free(w);
            // Flattening the gradient copies it; the per-tensor copy goes right after.
            rank.note_alloc(w);
            let g = rank.flatten(&layer_parts(&gw), layouts[1 + l].padded())?;
            drop(gw);
            rank.note_free(w);
            rank.push_grad(1 + l, g, layouts[1 + l], last)?;
        }
        let mut g_embed = g_embed;
        rank.model.embed_backward(&mut g_embed, &mut rank.ws)?;
        rank.push_grad(0, g_embed, layouts[0], last)?;
    }

    rank.finish_scatter()?;
    rank.comm_secs += rank.comm.take_busy_secs()?;

    // Global loss and gradient norm, then clipping and AdamW on this rank's shards.
    let b = &rank.model.backend;
    let local_sq = b.sum_squares_all(&rank.grad.iter().collect::<Vec<_>>())?;
    let mut stats = [loss_sum as f32, local_sq as f32];
    let comm = &rank.comm;
    timed(b, &mut rank.comm_secs, || comm.all_reduce(&mut stats))?;
    let norm = (stats[1] as f64).sqrt();
    let hp = AdamW { grad_scale: crate::train::optimizer::clip_coefficient(norm, clip), ..hp };
    let mut params: Vec<&mut B::Buf> = rank.master.iter_mut().collect();
    let mut m: Vec<&mut B::Buf> = rank.m.iter_mut().collect();
    let mut v: Vec<&mut B::Buf> = rank.v.iter_mut().collect();
    let grads: Vec<&B::Buf> = rank.grad.iter().collect();
    b.adamw_step_all(&mut params, &grads, &mut m, &mut v, hp)?;
    Ok((stats[0] as f64, norm))
}
