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

use super::optim_state::{flat_units, unit_ranges, MomentSource, OwnedRankMoments};
use crate::backend::{AdamW, Backend, Role};
use crate::data::loader::Batch;
use crate::dist::shard::ShardLayout;
use crate::dist::{DeviceComm, Member, Ticket};
use crate::model::{Keep, LayerWeights, Llama, LlamaConfig, Weights, Workspace};
use anyhow::{bail, Result};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

struct Rank<B: Backend> {
    comm: Box<dyn DeviceComm<B>>,
    /// Holds the rank's backend and RoPE tables; its own weights are placeholders, because every
    /// stage takes the gathered unit as an argument.
    model: Llama<B>,
    ws: Workspace<B>,
    /// This rank's shard of each unit: master weights (`Role::Param`), moments and gradient.
    master: Vec<B::Buf>,
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
    grad: Vec<B::Buf>,
    /// Full-size unit gradients accumulated over micro-steps before the last one.
    acc: Vec<Option<B::Buf>>,
    /// The reduce-scatter in flight and its input (kept alive until it is done), with its length.
    scatter: Option<(Ticket, B::Buf, usize)>,
    /// f32 values this engine holds, for backends that do not count their own bytes (the CPU).
    live: usize,
    peak: usize,
    /// Bytes of the shards, measured by backends that count (a GPU).
    persistent_bytes: Option<usize>,
    /// Seconds spent in collectives during the current step.
    comm_secs: f64,
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
    pub on_stuck: Arc<dyn Fn(&str) + Send + Sync>,
}

/// The default `on_stuck`: the ranks left are blocked where nothing can release them, so report
/// the failure the way the command line reports errors and end the process.
fn exit_stuck(why: &str) {
    use ratatui::crossterm::{execute, terminal};
    // The dashboard may own the terminal, and exiting skips its restore: give the terminal back.
    if terminal::is_raw_mode_enabled().unwrap_or(false) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(std::io::stdout(), terminal::LeaveAlternateScreen);
    }
    eprintln!("error: {why} (the other ranks are blocked in a collective that cannot be released: exiting)");
    std::process::exit(2);
}

impl<B: Backend> Rank<B> {
    fn note_alloc(&mut self, n: usize) {
        self.live += n;
        self.peak = self.peak.max(self.live);
    }
    fn note_free(&mut self, n: usize) {
        self.live -= n;
    }
    fn b(&self) -> &B {
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
    /// `abandon`), since their tickets will never be waited on.
    fn abandon_in_flight(&mut self, mut plan: GatherPlan<B::Buf>) {
        if let Some(f) = plan.ahead.take() {
            abandon(f.buf);
        }
        if let Some((_, input, _)) = self.scatter.take() {
            abandon(input);
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
struct GatherPlan<Buf> {
    order: Vec<usize>,
    next: usize,
    ahead: Option<InFlight<Buf>>,
}

impl<Buf> GatherPlan<Buf> {
    /// Per micro-step: the embedding, the blocks, the head (and the embedding again when the head
    /// is tied to it), then the blocks in reverse for the backward.
    fn for_step(cfg: &LlamaConfig, micro_steps: usize) -> Self {
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
            let before = b.memory().map(|m| m.live_bytes);
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
            let persistent_bytes = before.and_then(|x| b.memory().map(|m| m.live_bytes - x));
            let persistent = 4 * layouts.iter().map(|l| l.shard).sum::<usize>();
            ranks.push(Rank {
                comm,
                model,
                ws,
                master,
                m,
                v,
                grad,
                acc: (0..ranges.len()).map(|_| None).collect(),
                scatter: None,
                live: persistent,
                peak: persistent,
                persistent_bytes,
                comm_secs: 0.0,
            });
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
    /// moments, gradient), the peak, and the last step's time in collectives. A backend that counts
    /// its bytes (a GPU) reports them, including the workspace; otherwise the figures are this
    /// engine's own f32 buffers. With ranks on other nodes this is a collective (every node calls
    /// it after every step).
    pub fn memory(&mut self) -> Result<Vec<RankMemory>> {
        let shards = 4 * 4 * self.layouts.iter().map(|l| l.shard).sum::<usize>();
        let own = |r: &Rank<B>| match (r.b().memory(), r.persistent_bytes) {
            (Some(m), Some(p)) => RankMemory {
                rank: r.comm.rank(),
                persistent_bytes: p,
                peak_bytes: m.peak_bytes,
                comm_secs: r.comm_secs,
            },
            _ => RankMemory {
                rank: r.comm.rank(),
                persistent_bytes: shards,
                peak_bytes: 4 * r.peak,
                comm_secs: r.comm_secs,
            },
        };
        if self.all_local() {
            let mut all: Vec<RankMemory> = self.ranks.iter().map(own).collect();
            all.sort_by_key(|m| m.rank);
            return Ok(all);
        }
        // Each rank fills its own slot of a world-sized table; the sum is the whole table.
        let world = self.world;
        let table = self.each_rank(|rank, _| {
            let m = own(rank);
            let mut t = vec![0.0f32; 3 * world];
            t[3 * m.rank..3 * m.rank + 3].copy_from_slice(&[
                m.persistent_bytes as f32,
                m.peak_bytes as f32,
                m.comm_secs as f32,
            ]);
            rank.comm.all_reduce(&mut t)?;
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
        let Fsdp {
            ref cfg,
            world,
            ref ranges,
            ref sizes,
            ref layouts,
            ref mut ranks,
            fault,
            release_grace,
            ref on_stuck,
        } = *self;
        let results = on_every_rank(ranks, release_grace, &**on_stuck, |rank, i| {
            rank.comm_secs = 0.0;
            if fault == Some((i, step)) {
                bail!("injected fault at step {step}");
            }
            let mut plan = GatherPlan::for_step(cfg, batches.len());
            let res = rank_step(rank, &mut plan, world, batches, cfg, ranges, sizes, layouts, scale, clip, hp);
            if res.is_err() {
                rank.abandon_in_flight(plan);
            }
            res
        })?;
        Ok(results[0])
    }

    /// `on_every_rank` over this process's ranks.
    fn each_rank<T: Send>(&mut self, f: impl Fn(&mut Rank<B>, usize) -> Result<T> + Sync) -> Result<Vec<T>> {
        on_every_rank(&mut self.ranks, self.release_grace, &*self.on_stuck, f)
    }

    /// `Σ over nodes` of `local` (each node's first rank contributes it, the others zeros): how the
    /// nodes of a run agree at a step boundary on what to do next.
    pub fn agree(&mut self, local: &[f32]) -> Result<Vec<f32>> {
        let out = self.each_rank(|rank, i| {
            let mut buf = if i == 0 { local.to_vec() } else { vec![0.0; local.len()] };
            rank.comm.all_reduce(&mut buf)?;
            Ok(buf)
        })?;
        Ok(out.into_iter().next().expect("at least one rank"))
    }

    /// The full parameters (the checkpoint, eval and sampling view). With ranks on other nodes this
    /// is a collective: every node must call it at the same point.
    pub fn consolidate(&mut self) -> Result<Weights<Vec<f32>>> {
        let units = self.gather_units(|r| &r.master)?;
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
        let (m, v) = (self.gather_units(|r| &r.m)?, self.gather_units(|r| &r.v)?);
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
            ranks.sort_by_key(|r| r.comm.rank());
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
        let out = on_every_rank(ranks, release_grace, &**on_stuck, |rank, i| {
            let mut units = Vec::new();
            for (u, l) in layouts.iter().enumerate() {
                let b = rank.b();
                let mut full = b.scratch_as(l.padded(), Role::Accum)?;
                let t = rank.comm.start_all_gather(b, &pick(rank)[u], &mut full)?;
                rank.comm.wait(b, t)?;
                if i == 0 {
                    units.push(b.download(&full)?);
                }
            }
            Ok(units)
        })?;
        Ok(out.into_iter().next().expect("at least one rank"))
    }
}

/// Runs `f` on every local rank at once, a thread each (collectives need every rank inside
/// them together). A rank that errors or panics aborts the group, so the others get an error
/// instead of hanging; the error reported is the failing rank's, not those it released.
///
/// CPU ranks are released by the abort at once. GPU ranks blocked inside an NCCL collective
/// cannot be (kiln does not call `ncclCommAbort`), so if the others have not come back
/// `release_grace` after the first failure, `on_stuck` gets the failure: by default it prints
/// it and exits the process, which ends a run that would otherwise hang forever.
fn on_every_rank<B: Backend, T: Send>(
    ranks: &mut [Rank<B>],
    grace: Duration,
    on_stuck: &(dyn Fn(&str) + Send + Sync),
    f: impl Fn(&mut Rank<B>, usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let f = &f;
    let n = ranks.len();
    let global: Vec<usize> = ranks.iter().map(|r| r.comm.rank()).collect();
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<T>)>();
    let mut results: Vec<Option<Result<T>>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        for (i, rank) in ranks.iter_mut().enumerate() {
            let tx = tx.clone();
            s.spawn(move || {
                let out = match catch_unwind(AssertUnwindSafe(|| f(rank, i))) {
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
                let _ = tx.send((i, out));
            });
        }
        drop(tx);
        let mut first_failure: Option<(Instant, String)> = None;
        let mut stuck_reported = false;
        for _ in 0..n {
            let next = match &first_failure {
                Some((t, why)) if !stuck_reported => match rx.recv_timeout(grace.saturating_sub(t.elapsed())) {
                    Ok(x) => Ok(x),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        stuck_reported = true;
                        on_stuck(why);
                        rx.recv()
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                },
                _ => match rx.recv() {
                    Ok(x) => Ok(x),
                    Err(_) => break,
                },
            };
            let Ok((i, out)) = next else { break };
            if let (Err(e), None) = (&out, &first_failure) {
                first_failure = Some((Instant::now(), format!("rank {} failed: {e:#}", global[i])));
            }
            results[i] = Some(out);
        }
    });
    let results: Vec<Result<T>> =
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("rank thread died")))).collect();
    let mut first_err = None;
    for (res, r) in results.iter().zip(&global) {
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
    Ok(results.into_iter().map(|r| r.expect("checked above")).collect())
}

#[allow(clippy::too_many_arguments)]
fn rank_step<B: Backend>(
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
