//! Fully sharded data parallelism over CPU ranks in one process (a worker thread per rank).
//!
//! The model is cut into units: the embedding, each transformer block, and the final norm with the
//! head. Each unit's parameters are flattened, padded to a multiple of the world size and split
//! evenly: rank `r` owns shard `r` of the f32 master weights and of the AdamW moments, and nothing
//! else persists. Before a unit's stage its full parameters are all-gathered, and they are dropped
//! right after; the backward gathers them again. A unit's gradients are reduce-scattered to their
//! owners as soon as its backward is done (on the last micro-step only: earlier micro-steps
//! accumulate locally). Each rank runs a disjoint slice of every micro-batch, so the global batch,
//! and hence the loss, is the same whatever the world size.

use super::optim_state::{flat_units, unit_ranges, MomentSource, RankMoments};
use crate::backend::cpu::Cpu;
use crate::backend::{AdamW, Backend};
use crate::data::loader::Batch;
use crate::dist::local::{local_group, LocalComm};
use crate::dist::shard::ShardLayout;
use crate::dist::Comm;
use crate::model::{Keep, LayerWeights, Llama, LlamaConfig, Weights, Workspace};
use anyhow::{bail, Result};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// Per-rank memory, in f32 values: what persists (shards) and the peak during a step.
#[derive(Clone, Copy, Debug, Default)]
pub struct RankMemory {
    pub persistent: usize,
    pub peak: usize,
    /// Seconds the last step spent in collectives.
    pub comm_secs: f64,
}

struct Rank {
    comm: LocalComm,
    model: Llama<Cpu>,
    ws: Workspace<Cpu>,
    master: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    grad: Vec<Vec<f32>>,
    /// Full-size unit gradients accumulated over micro-steps before the last one.
    acc: Vec<Option<Vec<f32>>>,
    live: usize,
    peak: usize,
    /// Seconds spent in collectives during the current step.
    comm_secs: f64,
}

pub struct Fsdp {
    cfg: LlamaConfig,
    ranges: Vec<Range<usize>>,
    /// Values per tensor in canonical order.
    sizes: Vec<usize>,
    layouts: Vec<ShardLayout>,
    ranks: Vec<Rank>,
    /// Fault injection for failure-handling tests: `(rank, step)` errors on that rank at that step.
    pub fault: Option<(usize, u64)>,
}

impl Rank {
    fn note_alloc(&mut self, n: usize) {
        self.live += n;
        self.peak = self.peak.max(self.live);
    }
    fn note_free(&mut self, n: usize) {
        self.live -= n;
    }

    fn gather(&mut self, u: usize, layout: ShardLayout) -> Result<Vec<f32>> {
        let mut full = vec![0.0; layout.padded()];
        let t = Instant::now();
        self.comm.all_gather(&self.master[u], &mut full)?;
        self.comm_secs += t.elapsed().as_secs_f64();
        full.truncate(layout.len);
        self.note_alloc(full.len());
        Ok(full)
    }

    /// Splits a gathered block unit into its tensors. The split copies, so for a moment the unit is
    /// held twice; the accounting says so, then the flat copy is dropped.
    fn unpack_layer(&mut self, flat: Vec<f32>, sizes: &[usize]) -> LayerWeights<Vec<f32>> {
        self.note_alloc(flat.len());
        let lw = layer_from(split(&flat, sizes));
        self.note_free(flat.len());
        lw
    }

    /// Hands a unit's full gradient to its owners (or accumulates it until the last micro-step).
    fn push_grad(&mut self, u: usize, mut full: Vec<f32>, layout: ShardLayout, last: bool) -> Result<()> {
        if let Some(acc) = self.acc[u].take() {
            for (f, a) in full.iter_mut().zip(&acc) {
                *f += a;
            }
            self.note_free(acc.len());
        }
        if !last {
            self.acc[u] = Some(full);
            return Ok(());
        }
        full.resize(layout.padded(), 0.0);
        let t = Instant::now();
        self.comm.reduce_scatter(&full, &mut self.grad[u])?;
        self.comm_secs += t.elapsed().as_secs_f64();
        self.note_free(layout.len);
        Ok(())
    }
}

fn split(flat: &[f32], sizes: &[usize]) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(sizes.len());
    let mut o = 0;
    for &n in sizes {
        out.push(flat[o..o + n].to_vec());
        o += n;
    }
    out
}

fn layer_from(mut t: Vec<Vec<f32>>) -> LayerWeights<Vec<f32>> {
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

fn layer_flat(l: &LayerWeights<Vec<f32>>) -> Vec<f32> {
    [&l.attn_norm, &l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.mlp_norm, &l.gate_proj, &l.up_proj, &l.down_proj]
        .iter()
        .flat_map(|t| t.iter().copied())
        .collect()
}

impl Fsdp {
    /// Shards `full` (and the moments, when resuming) over `world` ranks, each running
    /// `rows_per_rank` sequences of `seq` tokens per micro-batch.
    pub fn new(
        cfg: &LlamaConfig,
        full: &Weights<Vec<f32>>,
        moments: Option<&dyn MomentSource>,
        world: usize,
        rows_per_rank: usize,
        seq: usize,
        keep: Keep,
    ) -> Result<Fsdp> {
        let ranges = unit_ranges(cfg);
        let tensors = full.iter();
        let sizes: Vec<usize> = tensors.iter().map(|t| t.len()).collect();
        // Flattened once; each rank takes its shard of it.
        let full_units = flat_units(cfg, full);
        let layouts: Vec<ShardLayout> =
            ranges.iter().map(|r| ShardLayout::new(sizes[r.clone()].iter().sum(), world)).collect();
        let mut ranks = Vec::with_capacity(world);
        for (r, comm) in local_group(world).into_iter().enumerate() {
            let empty = Weights::try_build(cfg, |_| Ok(Vec::new()))?;
            let model = Llama::new(cfg.clone(), Cpu::new(), empty)?;
            let ws = Workspace::keeping(&model, rows_per_rank, seq, keep)?;
            let master: Vec<Vec<f32>> = layouts.iter().zip(&full_units).map(|(l, f)| l.take(f, r)).collect();
            // Each rank reads only its own part of each unit's moments.
            let (mut m, mut v) = (Vec::with_capacity(layouts.len()), Vec::with_capacity(layouts.len()));
            for (u, l) in layouts.iter().enumerate() {
                let (mut mu, mut vu) = match moments {
                    Some(src) => src.read(u, l.owned(r))?,
                    None => (Vec::new(), Vec::new()),
                };
                mu.resize(l.shard, 0.0);
                vu.resize(l.shard, 0.0);
                m.push(mu);
                v.push(vu);
            }
            let grad = layouts.iter().map(|l| vec![0.0; l.shard]).collect();
            let persistent: usize = 4 * layouts.iter().map(|l| l.shard).sum::<usize>();
            ranks.push(Rank {
                comm,
                model,
                ws,
                master,
                m,
                v,
                grad,
                acc: vec![None; ranges.len()],
                live: persistent,
                peak: persistent,
                comm_secs: 0.0,
            });
        }
        Ok(Fsdp { cfg: cfg.clone(), ranges, sizes, layouts, ranks, fault: None })
    }

    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    /// Memory per rank (f32 values): persistent shards (master, two moments, gradient) and the peak.
    pub fn memory(&self) -> Vec<RankMemory> {
        let persistent = 4 * self.layouts.iter().map(|l| l.shard).sum::<usize>();
        self.ranks.iter().map(|r| RankMemory { persistent, peak: r.peak, comm_secs: r.comm_secs }).collect()
    }

    /// One optimizer step over `batches` (one per micro-step, each the global micro-batch); returns
    /// the summed token loss and the gradient norm before clipping.
    pub fn step(&mut self, batches: &[Batch], step: u64, scale: f32, clip: f64, hp: AdamW) -> Result<(f64, f64)> {
        let world = self.world_size();
        let (cfg, ranges, sizes, layouts, fault) = (&self.cfg, &self.ranges, &self.sizes, &self.layouts, self.fault);
        let results: Vec<Result<(f64, f64)>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .enumerate()
                .map(|(r, rank)| {
                    s.spawn(move || {
                        rank.comm_secs = 0.0;
                        let run = catch_unwind(AssertUnwindSafe(|| {
                            if fault == Some((r, step)) {
                                bail!("injected fault at step {step}");
                            }
                            rank_step(rank, r, world, batches, cfg, ranges, sizes, layouts, scale, clip, hp)
                        }));
                        let out = match run {
                            Ok(x) => x,
                            Err(p) => {
                                let msg = p
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_else(|| "panic".into());
                                Err(anyhow::anyhow!("panicked: {msg}"))
                            }
                        };
                        if let Err(e) = &out {
                            rank.comm.abort(&format!("{e:#}"));
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("rank thread died")))).collect()
        });
        // Report the rank that failed first, not the ranks it released.
        let mut first_err = None;
        for (r, res) in results.iter().enumerate() {
            if let Err(e) = res {
                let msg = format!("{e:#}");
                if !msg.starts_with("rank ") {
                    bail!("rank {r} failed: {msg}");
                }
                first_err.get_or_insert(msg);
            }
        }
        if let Some(e) = first_err {
            bail!("{e}");
        }
        let (loss, norm) = *results[0].as_ref().expect("checked above");
        Ok((loss, norm))
    }

    /// The full parameters (the checkpoint, eval and sampling view).
    pub fn consolidate(&self) -> Result<Weights<Vec<f32>>> {
        self.consolidate_with(|r, u| &r.master[u])
    }

    /// Each rank's shard of the AdamW moments, as the checkpoint stores them.
    pub fn rank_moments(&self) -> Vec<RankMoments<'_>> {
        self.ranks
            .iter()
            .map(|r| RankMoments {
                m: r.m.iter().map(|x| x.as_slice()).collect(),
                v: r.v.iter().map(|x| x.as_slice()).collect(),
            })
            .collect()
    }

    fn consolidate_with(&self, pick: impl Fn(&Rank, usize) -> &Vec<f32>) -> Result<Weights<Vec<f32>>> {
        let mut tensors = Vec::new();
        for (u, range) in self.ranges.iter().enumerate() {
            let flat: Vec<f32> =
                self.ranks.iter().flat_map(|r| pick(r, u).iter().copied()).take(self.layouts[u].len).collect();
            tensors.extend(split(&flat, &self.sizes[range.clone()]));
        }
        let mut it = tensors.into_iter();
        Weights::try_build(&self.cfg, |_| Ok(it.next().expect("one tensor per spec")))
    }
}

#[allow(clippy::too_many_arguments)]
fn rank_step(
    rank: &mut Rank,
    r: usize,
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
    let head_unit = n_layer + 1;
    let mut loss_sum = 0.0f64;
    for (k, batch) in batches.iter().enumerate() {
        let last = k + 1 == batches.len();
        let rows = batch.ids.len() / world;
        let (ids, targets) = (&batch.ids[r * rows..(r + 1) * rows], &batch.targets[r * rows..(r + 1) * rows]);
        rank.model.forward_begin(&mut rank.ws, ids, targets)?;
        let e = rank.gather(0, layouts[0])?;
        rank.model.embed_forward(&e, &mut rank.ws)?;
        rank.note_free(e.len());
        drop(e);
        for l in 0..n_layer {
            let flat = rank.gather(1 + l, layouts[1 + l])?;
            let lw = rank.unpack_layer(flat, &sizes[ranges[1 + l].clone()]);
            rank.model.layer_forward(l, &lw, &mut rank.ws)?;
            rank.note_free(layouts[1 + l].len);
        }
        let mut head_flat = rank.gather(head_unit, layouts[head_unit])?;
        // A tied head is the embedding: gather that unit again. Untied, the head is the unit's tail;
        // splitting it off copies it (the gathered buffer keeps its allocation until dropped).
        let head = if cfg.tie_embeddings {
            rank.gather(0, layouts[0])?
        } else {
            let h = head_flat.split_off(d);
            rank.note_alloc(h.len());
            h
        };
        let final_norm = head_flat;
        let losses = rank.model.head_forward(&final_norm, &head, &mut rank.ws, targets, Some(scale))?;
        loss_sum += losses.iter().map(|&x| x as f64).sum::<f64>();

        let mut g_norm = vec![0.0f32; d];
        let mut g_head = vec![0.0f32; vocab * d];
        rank.note_alloc(g_norm.len() + g_head.len());
        rank.model.head_backward(&final_norm, &head, &mut rank.ws, &mut g_norm, &mut g_head)?;
        rank.note_free(layouts[head_unit].len + head.len());
        drop((head, final_norm));
        let g_embed = if cfg.tie_embeddings {
            rank.push_grad(head_unit, g_norm, layouts[head_unit], last)?;
            g_head // the embedding's gradient starts with the head's contribution
        } else {
            // g_norm grows to hold the unit's whole gradient: a moment with the head gradient twice.
            rank.note_alloc(g_head.len());
            g_norm.extend_from_slice(&g_head);
            rank.note_free(g_head.len());
            drop(g_head);
            rank.push_grad(head_unit, g_norm, layouts[head_unit], last)?;
            rank.note_alloc(vocab * d);
            vec![0.0f32; vocab * d]
        };
        for l in (0..n_layer).rev() {
            let w = layouts[1 + l].len;
            let flat = rank.gather(1 + l, layouts[1 + l])?;
            let lw = rank.unpack_layer(flat, &sizes[ranges[1 + l].clone()]);
            let mut gw = layer_from(sizes[ranges[1 + l].clone()].iter().map(|&n| vec![0.0f32; n]).collect());
            rank.note_alloc(w);
            rank.model.layer_backward(l, &lw, &mut gw, &mut rank.ws)?;
            rank.note_free(w);
            drop(lw);
            // Flattening the gradient copies it; the per-tensor copy goes right after.
            rank.note_alloc(w);
            let g = layer_flat(&gw);
            drop(gw);
            rank.note_free(w);
            rank.push_grad(1 + l, g, layouts[1 + l], last)?;
        }
        let mut g_embed = g_embed;
        rank.model.embed_backward(&mut g_embed, &mut rank.ws)?;
        rank.push_grad(0, g_embed, layouts[0], last)?;
    }

    // Global loss and gradient norm, then clipping and AdamW on this rank's shards.
    let local_sq: f64 = rank.grad.iter().flat_map(|g| g.iter()).map(|&x| (x as f64) * (x as f64)).sum();
    let mut stats = [loss_sum as f32, local_sq as f32];
    let t = Instant::now();
    rank.comm.all_reduce(&mut stats)?;
    rank.comm_secs += t.elapsed().as_secs_f64();
    let norm = (stats[1] as f64).sqrt();
    let b = Cpu::new();
    if clip > 0.0 {
        let coef = clip / (norm + 1e-6);
        if coef < 1.0 {
            for g in rank.grad.iter_mut() {
                b.scale(g, coef as f32)?;
            }
        }
    }
    for u in 0..rank.master.len() {
        b.adamw_step(&mut rank.master[u], &rank.grad[u], &mut rank.m[u], &mut rank.v[u], hp)?;
    }
    Ok((stats[0] as f64, norm))
}
