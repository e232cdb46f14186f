//! The step loop: micro-batches from the prefetching loader, forward + backward with gradient
//! accumulation, global-norm clipping, AdamW with warmup + cosine, metrics, periodic eval, samples
//! and atomic checkpoints.

use super::checkpoint::{self, Snapshot, TrainerState};
use super::events::{Command, Event, RankMetrics, StepMetrics};
use super::fsdp::Fsdp;
use super::optim_state::{self, MomentSource, OwnedRankMoments};
use super::optimizer::{device_step, AdamWState, StepParams};
use super::schedule::lr_at;
use super::signals;
use crate::backend::{AdamW, Backend, Role};
use crate::chat::prompt::ChatFormat;
use crate::chat::service::{ChatRequest, ChatService};
use crate::chat::ChatTemplate;
use crate::config::RunConfig;
use crate::data::loader::{val_sequences, Loader, Source};
use crate::dist::Member;
use crate::eval::report::{self, TaskResult};
use crate::eval::score::Scorer;
use crate::eval::tasks;
use crate::io::run_lock::RunLock;
use crate::model::sampling::{Sampler, SamplingParams};
use crate::model::{Keep, KvCache, Llama, Weights, Workspace};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

pub struct Trainer<B: Backend> {
    pub cfg: RunConfig,
    pub model: Llama<B>,
    pub state: TrainerState,
    /// Gradients and AdamW state of the single-device path (`None` under FSDP, where they exist only
    /// as rank shards).
    grads: Option<Weights<B::Buf>>,
    opt: Option<AdamWState<B>>,
    /// The sharded engine, for `parallel.world_size > 1`.
    fsdp: Option<Fsdp<B>>,
    /// The FSDP shards have moved on since `model.weights` was last consolidated.
    model_stale: bool,
    /// Under FSDP, on node 0: the consolidated f32 weights, from the last consolidation until the
    /// next step (what a checkpoint writes; `model.weights` hold only their compute-precision copy).
    master_host: Option<Weights<Vec<f32>>>,
    ws: Workspace<B>,
    loader: Loader,
    val: Vec<(String, Vec<u32>, Vec<i32>)>,
    run_dir: PathBuf,
    /// `metrics.jsonl`, on the node that writes (node 0).
    metrics: Option<File>,
    /// Where this process sits among the run's nodes.
    node: NodeRole,
    pub tokenizer: Tokenizer,
    tokenizer_files: Vec<(String, Vec<u8>)>,
    bos: u32,
    eos: u32,
    peak_flops: f64,
    last_checkpoint_step: Option<u64>,
    /// Answers viewers' chat requests (see `attach_chat`).
    chat: Option<ChatService>,
    _run_lock: Option<RunLock>,
    /// The weights chat replies use until the next step changes them.
    chat_weights: Option<(u64, Arc<Weights<Vec<f32>>>)>,
}

/// Where a process sits among the nodes of one run. Node 0 leads: it writes metrics and
/// checkpoints, evaluates, samples and serves viewers; the others take part in the same collectives
/// and write nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeRole {
    pub rank: usize,
    pub count: usize,
}

impl NodeRole {
    pub const SINGLE: NodeRole = NodeRole { rank: 0, count: 1 };

    pub fn leads(&self) -> bool {
        self.rank == 0
    }
}

/// Why `run` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// Reached the requested step (or `train.max_steps`).
    Done,
    /// SIGINT / SIGTERM: checkpointed at a step boundary.
    Interrupted,
}

pub struct TrainerParts<B: Backend> {
    pub cfg: RunConfig,
    pub model: Llama<B>,
    /// Under FSDP, the f32 weights the shards start from; `model` then holds only their
    /// compute-precision copy (see `run::place`).
    pub host_weights: Option<Weights<Vec<f32>>>,
    /// AdamW moments to resume from (any world size's checkpoint).
    pub moments: Option<Box<dyn MomentSource>>,
    /// The FSDP ranks this process drives when `parallel.world_size > 1` (`dist::local::cpu_group`,
    /// `dist::nccl::cuda_group`; on several nodes, this node's share of the world); empty on one device.
    pub group: Vec<Member<B>>,
    pub node: NodeRole,
    pub state: TrainerState,
    pub sources: Vec<Source>,
    pub run_dir: PathBuf,
    pub tokenizer: Tokenizer,
    pub tokenizer_files: Vec<(String, Vec<u8>)>,
    pub bos: u32,
    pub eos: u32,
    pub peak_flops: f64,
    /// The run directory's lock (on the node that writes), held as long as the trainer lives.
    pub run_lock: Option<RunLock>,
}

impl<B: Backend> Trainer<B> {
    pub fn new(mut p: TrainerParts<B>) -> Result<Self> {
        let c = &p.cfg;
        let world = c.parallel.world_size;
        let keep = if c.train.recompute { Keep::BlockInputs } else { Keep::All };
        let mut master_host = None;
        let (grads, opt, fsdp) = if world > 1 {
            if p.group.len() * p.node.count != world {
                bail!(
                    "parallel.world_size = {world} but {} ranks were opened on each of {} node(s)",
                    p.group.len(),
                    p.node.count
                );
            }
            // `model` beside the shards only evaluates, samples and chats (compute precision,
            // none on a node that does not lead; see `run::place`). The f32 masters stay on the
            // host for the checkpoint until the next step changes them.
            let full = p.host_weights.take().context("FSDP starts from host weights (run::build_on loads them)")?;
            let rows = c.train.micro_batch / world;
            let mut f = Fsdp::new(&p.model.cfg, &full, p.moments.as_deref(), p.group, rows, c.data.seq_len, keep)?;
            f.stall_timeout = super::fsdp::stall_timeout(c.parallel.collective_timeout_s);
            master_host = p.node.leads().then_some(full);
            (None, None, Some(f))
        } else {
            let opt = match p.moments {
                None => AdamWState::new(&p.model)?,
                Some(src) => {
                    let (m, v) = optim_state::full(src.as_ref(), &p.model.cfg)?;
                    let up = |w: &Weights<Vec<f32>>| {
                        let mut it = w.iter().into_iter();
                        Weights::try_build(&p.model.cfg, |_| {
                            p.model.backend.upload_as(it.next().expect("same shape"), Role::Accum)
                        })
                    };
                    AdamWState { m: up(&m)?, v: up(&v)? }
                }
            };
            (Some(p.model.zeros_like_weights()?), Some(opt), None)
        };
        let loader =
            Loader::start(&p.sources, c.train.seed, c.data.seq_len, c.train.micro_batch, Some(p.state.mix.clone()))?;
        let val = val_sequences(&p.sources, c.data.seq_len, c.eval.batches * c.train.micro_batch);
        // Under FSDP the full model here only evaluates: a forward-only workspace.
        let keep = if fsdp.is_some() { Keep::Nothing } else { keep };
        let ws = Workspace::keeping(&p.model, c.train.micro_batch, c.data.seq_len, keep)?;
        let metrics_path = p.run_dir.join("metrics.jsonl");
        let metrics = if p.node.leads() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .with_context(|| format!("{}: cannot open", metrics_path.display()))?;
            Some(f)
        } else {
            None
        };
        Ok(Trainer {
            cfg: p.cfg,
            model: p.model,
            state: p.state,
            grads,
            opt,
            fsdp,
            model_stale: false,
            master_host,
            ws,
            loader,
            val,
            run_dir: p.run_dir,
            metrics,
            node: p.node,
            tokenizer: p.tokenizer,
            tokenizer_files: p.tokenizer_files,
            bos: p.bos,
            eos: p.eos,
            peak_flops: p.peak_flops,
            last_checkpoint_step: None,
            chat: None,
            chat_weights: None,
            _run_lock: p.run_lock,
        })
    }

    fn record(&mut self, e: &Event) -> Result<()> {
        let Some(metrics) = &mut self.metrics else { return Ok(()) };
        let line = serde_json::to_string(e)?;
        writeln!(metrics, "{line}")
            .with_context(|| format!("{}: cannot append", self.run_dir.join("metrics.jsonl").display()))
    }

    /// One optimizer step over `grad_accum` micro-batches.
    pub fn step(&mut self) -> Result<StepMetrics> {
        let t0 = Instant::now();
        self.chat_weights = None; // stale after this step; chat snapshots again when asked
        self.master_host = None;
        let c = &self.cfg;
        let global_tokens = c.train.micro_batch * c.data.seq_len * c.train.grad_accum;
        // The loss is the mean token cross-entropy over the whole global batch.
        let scale = 1.0 / global_tokens as f32;
        let step = self.state.step + 1;
        let o = &c.optim;
        let lr = lr_at(step, o.lr, o.min_lr, o.warmup_steps, c.train.max_steps);
        let hp = AdamW {
            lr: lr as f32,
            beta1: o.beta1 as f32,
            beta2: o.beta2 as f32,
            eps: o.eps as f32,
            weight_decay: o.weight_decay as f32,
            step,
            // Set per step from the gradient norm (`optimizer::clip_coefficient`).
            grad_scale: 1.0,
        };
        let (loss_sum, norm, wait) =
            if self.fsdp.is_some() { self.step_fsdp(scale, hp)? } else { self.step_single(scale, hp)? };
        self.state.step = step;
        self.state.tokens += global_tokens as u64;
        let secs = t0.elapsed().as_secs_f64();
        let tps = global_tokens as f64 / secs;
        let ranks = match &mut self.fsdp {
            Some(f) => {
                let n = f.world_size() as f64;
                f.memory()?
                    .iter()
                    .map(|m| RankMetrics {
                        rank: m.rank,
                        tokens_per_s: tps / n,
                        state_mb: m.persistent_bytes as f64 * 1e-6,
                        peak_mb: m.peak_bytes as f64 * 1e-6,
                        comm_ms: m.comm_secs * 1e3,
                    })
                    .collect()
            }
            None => {
                let (state_mb, peak_mb) = match self.model.backend.memory() {
                    // A GPU counts its buffers: weights, gradients, moments and activations.
                    Some(m) => (m.live_bytes as f64 * 1e-6, m.peak_bytes as f64 * 1e-6),
                    None => {
                        // Parameters, gradients and two moments, all resident in f32.
                        let mb = 4.0 * self.model.cfg.n_params() as f64 * 4e-6;
                        (mb, mb)
                    }
                };
                vec![RankMetrics { rank: 0, tokens_per_s: tps, state_mb, peak_mb, comm_ms: 0.0 }]
            }
        };
        Ok(StepMetrics {
            step,
            tokens: self.state.tokens,
            loss: loss_sum * scale as f64,
            lr,
            grad_norm: norm,
            tokens_per_s: tps,
            step_ms: secs * 1e3,
            data_wait_ms: wait * 1e3,
            mfu: self.model.cfg.train_flops_per_token(self.cfg.data.seq_len) * tps / self.peak_flops,
            time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            ranks,
        })
    }

    /// Single device: `(summed token loss, gradient norm before clipping, seconds waited for data)`.
    fn step_single(&mut self, scale: f32, hp: AdamW) -> Result<(f64, f64, f64)> {
        let (grads, opt) =
            (self.grads.as_mut().expect("single-device state"), self.opt.as_mut().expect("single-device state"));
        let (loader, mix) = (&mut self.loader, &mut self.state.mix);
        let mut wait = 0.0f64;
        let batches = (0..self.cfg.train.grad_accum).map(|_| {
            let (batch, waited) = loader.next_batch()?;
            wait += waited.as_secs_f64();
            *mix = batch.state.clone();
            Ok(batch)
        });
        let p = StepParams { scale, max_norm: self.cfg.optim.grad_clip, hp };
        let (loss_sum, norm) = device_step(&mut self.model, &mut self.ws, grads, opt, batches, p)?;
        Ok((loss_sum, norm, wait))
    }

    /// FSDP: every rank takes its slice of each micro-batch; the full weights on the coordinator are
    /// refreshed only when eval, sampling or a checkpoint needs them.
    fn step_fsdp(&mut self, scale: f32, hp: AdamW) -> Result<(f64, f64, f64)> {
        let mut batches = Vec::with_capacity(self.cfg.train.grad_accum);
        let mut wait = 0.0;
        for _ in 0..self.cfg.train.grad_accum {
            let (batch, waited) = self.loader.next_batch()?;
            wait += waited.as_secs_f64();
            batches.push(batch);
        }
        let f = self.fsdp.as_mut().expect("FSDP state");
        let (loss_sum, norm) = f.step(&batches, hp.step, scale, self.cfg.optim.grad_clip, hp)?;
        self.state.mix = batches.last().expect("grad_accum >= 1").state.clone();
        self.model_stale = true;
        Ok((loss_sum, norm, wait))
    }

    /// Brings `model.weights` up to date with the FSDP shards.
    fn sync_model(&mut self) -> Result<()> {
        if let (Some(f), true) = (&mut self.fsdp, self.model_stale) {
            let full = f.consolidate()?;
            if !self.node.leads() {
                // Consolidation is a collective every node takes part in; only node 0 uses the result.
                self.model_stale = false;
                return Ok(());
            }
            let b = &self.model.backend;
            for (dst, src) in self.model.weights.iter_mut().into_iter().zip(full.iter()) {
                *dst = b.upload_as(src, Role::Activation)?;
            }
            self.master_host = Some(full);
            self.model_stale = false;
        }
        Ok(())
    }

    /// Mean held-out loss over the fixed validation windows (overall and per source).
    pub fn evaluate(&mut self) -> Result<Option<Event>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        self.sync_model()?;
        if !self.node.leads() {
            return Ok(None);
        }
        let (mb, seq) = (self.cfg.train.micro_batch, self.cfg.data.seq_len);
        let mut per: Vec<(String, f64, usize)> = Vec::new();
        for chunk in self.val.chunks(mb) {
            let mut ids = vec![0u32; mb * seq];
            let mut targets = vec![-1i32; mb * seq];
            for (i, (_, x, y)) in chunk.iter().enumerate() {
                ids[i * seq..(i + 1) * seq].copy_from_slice(x);
                targets[i * seq..(i + 1) * seq].copy_from_slice(y);
            }
            let losses = self.model.forward(&mut self.ws, &ids, &targets, None)?;
            for (i, (name, _, _)) in chunk.iter().enumerate() {
                let l: f64 = losses[i * seq..(i + 1) * seq].iter().map(|&v| v as f64).sum();
                match per.iter_mut().find(|(n, _, _)| n == name) {
                    Some(e) => {
                        e.1 += l;
                        e.2 += seq;
                    }
                    None => per.push((name.clone(), l, seq)),
                }
            }
        }
        let (sum, n) = per.iter().fold((0.0, 0), |(s, n), e| (s + e.1, n + e.2));
        Ok(Some(Event::Eval {
            step: self.state.step,
            tokens: self.state.tokens,
            loss: sum / n as f64,
            per_source: per.into_iter().map(|(name, l, n)| (name, l / n as f64)).collect(),
        }))
    }

    /// The configured commonsense tasks on the current weights (rank 0's job under FSDP).
    pub fn evaluate_tasks(&mut self) -> Result<Option<Event>> {
        if self.cfg.eval.tasks.is_empty() {
            return Ok(None);
        }
        self.sync_model()?;
        if !self.node.leads() {
            return Ok(None);
        }
        let e = &self.cfg.eval;
        let mut scorer = Scorer::new(&self.model, &self.tokenizer, self.bos)?;
        let mut results = Vec::new();
        for task in &e.tasks {
            let mut items = tasks::load(task, None)?;
            if e.task_limit > 0 {
                items.truncate(e.task_limit);
            }
            let scores = items.iter().map(|i| scorer.score(i)).collect::<Result<Vec<_>>>()?;
            results.push(TaskResult::from_scores(task, &scores));
        }
        let average = report::average(&results);
        Ok(Some(Event::EvalTasks { step: self.state.step, tokens: self.state.tokens, results, average }))
    }

    /// One generation per configured prompt from the current weights.
    pub fn samples(&mut self) -> Result<Vec<Event>> {
        self.sync_model()?;
        if !self.node.leads() {
            return Ok(Vec::new());
        }
        let s = self.cfg.sample.clone();
        let params = SamplingParams { temperature: s.temperature, top_k: s.top_k, top_p: s.top_p };
        let mut out = Vec::new();
        for prompt in &s.prompts {
            let ids = self.tokenizer.encode(prompt, Some(self.bos))?;
            let mut cache = KvCache::new(&self.model, ids.len() + s.max_new_tokens)?;
            if ids.len() >= cache.capacity() {
                continue;
            }
            let mut sampler = Sampler::new(params, self.cfg.train.seed ^ self.state.step);
            let mut logits = self.model.decode(&mut cache, &ids)?;
            let mut gen = Vec::new();
            while gen.len() < s.max_new_tokens && cache.len() < cache.capacity() {
                let next = sampler.sample(&logits);
                if next == self.eos {
                    break;
                }
                gen.push(next);
                logits = self.model.decode(&mut cache, &[next])?;
            }
            out.push(Event::Sample {
                step: self.state.step,
                prompt: prompt.clone(),
                text: self.tokenizer.decode(&gen)?,
            });
        }
        Ok(out)
    }

    pub fn checkpoint(&mut self) -> Result<PathBuf> {
        self.sync_model()?;
        if !self.node.leads() {
            // The same collectives as node 0 (weights, then optimizer shards); node 0 writes.
            self.fsdp.as_mut().expect("several nodes means FSDP").rank_moments()?;
            self.last_checkpoint_step = Some(self.state.step);
            return Ok(self.run_dir.clone());
        }
        let downloaded;
        let weights = match (&self.fsdp, &self.master_host) {
            (Some(_), Some(w)) => w,
            (Some(_), None) => anyhow::bail!("FSDP: no consolidated weights to checkpoint (a bug)"),
            (None, _) => {
                downloaded = host_weights(&self.model, &self.model.weights)?;
                &downloaded
            }
        };
        // One file per rank; the single-rank engine is a world of one.
        let single: Option<OwnedRankMoments> = match (&self.fsdp, &self.opt) {
            (None, Some(opt)) => {
                let units = |w: &Weights<B::Buf>| {
                    Ok::<_, anyhow::Error>(optim_state::flat_units(&self.model.cfg, &host_weights(&self.model, w)?))
                };
                Some(OwnedRankMoments { m: units(&opt.m)?, v: units(&opt.v)? })
            }
            _ => None,
        };
        let sharded = match &mut self.fsdp {
            Some(f) => f.rank_moments()?,
            None => Vec::new(),
        };
        let optimizer: Vec<_> = single.iter().chain(&sharded).map(|r| r.view()).collect();
        let files: Vec<(&str, &[u8])> = self.tokenizer_files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        let snap = Snapshot {
            cfg: &self.model.cfg,
            weights,
            optimizer: &optimizer,
            state: &self.state,
            bos: self.bos,
            eos: self.eos,
            tokenizer_files: &files,
        };
        let path = checkpoint::save(&self.run_dir, &snap, self.cfg.checkpoint.keep_last)?;
        self.last_checkpoint_step = Some(self.state.step);
        Ok(path)
    }

    fn emit(&mut self, e: Event, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        self.record(&e)?;
        on_event(&e);
        Ok(())
    }

    /// Trains until step `until` (capped at `train.max_steps`), then checkpoints.
    pub fn run(&mut self, until: u64, on_event: &mut dyn FnMut(&Event)) -> Result<RunEnd> {
        self.run_with_commands(until, None, on_event)
    }

    /// `run`, also obeying viewer commands at step boundaries.
    pub fn run_with_commands(
        &mut self,
        until: u64,
        commands: Option<&Receiver<Command>>,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<RunEnd> {
        let until = until.min(self.cfg.train.max_steps);
        if self.state.step >= until {
            let message =
                format!("nothing to do: the run is at step {} of {}", self.state.step, self.cfg.train.max_steps);
            on_event(&Event::Log { step: self.state.step, message });
            return Ok(RunEnd::Done);
        }
        if self.node.count > 1 {
            return self.run_across_nodes(until, commands, on_event);
        }
        let mut paused = false;
        while self.state.step < until {
            // Viewer commands; while paused, wait for them (a viewer that goes away resumes
            // training), still obeying SIGINT / SIGTERM.
            while let Some(rx) = commands {
                let cmd = if paused {
                    match rx.recv_timeout(std::time::Duration::from_millis(200)) {
                        Ok(c) => c,
                        Err(RecvTimeoutError::Disconnected) => Command::SetPaused(false),
                        Err(RecvTimeoutError::Timeout) if signals::stop_requested() => {
                            self.checkpoint_unless_current(on_event)?;
                            return Ok(RunEnd::Interrupted);
                        }
                        Err(RecvTimeoutError::Timeout) => continue,
                    }
                } else {
                    match rx.try_recv() {
                        Ok(c) => c,
                        Err(_) => break,
                    }
                };
                match cmd {
                    Command::TogglePause => {
                        paused = !paused;
                        self.emit(Event::Paused { step: self.state.step, paused }, on_event)?;
                    }
                    Command::SetPaused(p) => {
                        if p != paused {
                            paused = p;
                            self.emit(Event::Paused { step: self.state.step, paused }, on_event)?;
                        }
                    }
                    Command::Chat(req) => self.submit_chat(req, on_event)?,
                    Command::ChatStop(id) => {
                        if let Some(c) = &self.chat {
                            c.stop(id);
                        }
                    }
                    Command::CheckpointNow => self.checkpoint_and_report(on_event)?,
                    Command::SampleNow => {
                        for e in self.samples()? {
                            self.emit(e, on_event)?;
                        }
                    }
                    Command::EvalNow => {
                        if let Some(e) = self.evaluate()? {
                            self.emit(e, on_event)?;
                        }
                        if let Some(e) = self.evaluate_tasks()? {
                            self.emit(e, on_event)?;
                        }
                    }
                    Command::Stop => {
                        self.checkpoint_unless_current(on_event)?;
                        return Ok(RunEnd::Interrupted);
                    }
                }
            }
            self.step_and_schedule(until, true, on_event)?;
            if signals::stop_requested() {
                self.checkpoint_unless_current(on_event)?;
                return Ok(RunEnd::Interrupted);
            }
        }
        self.checkpoint_unless_current(on_event)?;
        Ok(RunEnd::Done)
    }

    /// One step, then what the schedule asks for at it: eval, samples, a checkpoint (skipped when
    /// a stop is about to checkpoint anyway). Every node runs the same schedule.
    fn step_and_schedule(&mut self, until: u64, watch_signals: bool, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        let (ev, sa, ck) = (self.cfg.eval.every_steps, self.cfg.sample.every_steps, self.cfg.checkpoint.every_steps);
        let m = self.step()?;
        if !m.loss.is_finite() {
            let e = Event::Log { step: m.step, message: format!("loss is {} at step {}: stopping", m.loss, m.step) };
            self.emit(e, on_event)?;
            anyhow::bail!("training diverged: loss {} at step {} (last good checkpoint kept)", m.loss, m.step);
        }
        let step = m.step;
        self.emit(Event::Step(m), on_event)?;
        if ev > 0 && step % ev == 0 {
            self.eval_and_report(on_event)?;
        }
        if sa > 0 && step % sa == 0 {
            for e in self.samples()? {
                self.emit(e, on_event)?;
            }
        }
        if ck > 0 && step % ck == 0 && step < until && !(watch_signals && signals::stop_requested()) {
            self.checkpoint_and_report(on_event)?;
        }
        Ok(())
    }

    fn eval_and_report(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        if let Some(e) = self.evaluate()? {
            self.emit(e, on_event)?;
        }
        if let Some(e) = self.evaluate_tasks()? {
            self.emit(e, on_event)?;
        }
        Ok(())
    }

    /// The step loop of a run that spans nodes. Every collective (the step; consolidation for
    /// eval, samples, chat and checkpoints) must be entered by all nodes together, so at each step
    /// boundary they agree, in one all-reduce of a few flags, on what happens next. Commands come
    /// from node 0's viewers only; SIGINT / SIGTERM on any node stops every node after a checkpoint.
    fn run_across_nodes(
        &mut self,
        until: u64,
        commands: Option<&Receiver<Command>>,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<RunEnd> {
        const PAUSED: usize = 0;
        const STOP: usize = 1;
        const CHECKPOINT: usize = 2;
        const SAMPLE: usize = 3;
        const EVAL: usize = 4;
        const SNAPSHOT: usize = 5;
        let mut paused = false;
        let mut chats = Vec::new();
        loop {
            let mut want = [0.0f32; 6];
            if let Some(rx) = commands {
                loop {
                    // While paused, wait a little for a command, then agree again: the other nodes
                    // are waiting for this node in the agreement.
                    let cmd = if paused {
                        match rx.recv_timeout(std::time::Duration::from_millis(200)) {
                            Ok(c) => c,
                            Err(RecvTimeoutError::Disconnected) => Command::SetPaused(false),
                            Err(RecvTimeoutError::Timeout) => break,
                        }
                    } else {
                        match rx.try_recv() {
                            Ok(c) => c,
                            Err(_) => break,
                        }
                    };
                    match cmd {
                        Command::TogglePause | Command::SetPaused(_) => {
                            let p = if let Command::SetPaused(p) = cmd { p } else { !paused };
                            if p != paused {
                                paused = p;
                                self.emit(Event::Paused { step: self.state.step, paused }, on_event)?;
                            }
                        }
                        Command::Chat(req) => chats.push(req),
                        Command::ChatStop(id) => {
                            if let Some(c) = &self.chat {
                                c.stop(id);
                            }
                        }
                        Command::CheckpointNow => want[CHECKPOINT] = 1.0,
                        Command::SampleNow => want[SAMPLE] = 1.0,
                        Command::EvalNow => want[EVAL] = 1.0,
                        Command::Stop => want[STOP] = 1.0,
                    }
                }
            }
            want[PAUSED] = f32::from(u8::from(paused));
            want[SNAPSHOT] = f32::from(u8::from(!chats.is_empty()));
            if signals::stop_requested() {
                want[STOP] = 1.0;
            }
            let agreed = self.fsdp.as_mut().expect("several nodes means FSDP").agree(&want)?;
            let on = |i: usize| agreed[i] > 0.0;
            if on(SNAPSHOT) {
                self.sync_model()?;
                for req in chats.drain(..) {
                    self.submit_chat(req, on_event)?;
                }
            }
            if on(EVAL) {
                self.eval_and_report(on_event)?;
            }
            if on(SAMPLE) {
                for e in self.samples()? {
                    self.emit(e, on_event)?;
                }
            }
            if on(CHECKPOINT) {
                self.checkpoint_and_report(on_event)?;
            }
            if on(STOP) {
                self.checkpoint_unless_current(on_event)?;
                return Ok(RunEnd::Interrupted);
            }
            if self.state.step >= until {
                break;
            }
            if !on(PAUSED) {
                self.step_and_schedule(until, false, on_event)?;
            }
        }
        self.checkpoint_unless_current(on_event)?;
        Ok(RunEnd::Done)
    }

    /// Checkpoints unless the latest checkpoint already holds this step.
    fn checkpoint_unless_current(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        if self.last_checkpoint_step != Some(self.state.step) {
            self.checkpoint_and_report(on_event)?;
        }
        Ok(())
    }

    fn checkpoint_and_report(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        let p = self.checkpoint()?;
        let e = Event::Checkpoint { step: self.state.step, path: p.display().to_string() };
        self.emit(e, on_event)
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// How this run's model wants conversations written: its tokenizer, the chat template of the
    /// tokenizer_config.json beside tokenizer.json (if any), BOS and EOS.
    pub fn chat_format(&self) -> Result<ChatFormat> {
        let config = self.tokenizer_files.iter().find(|(n, _)| n == "tokenizer_config.json");
        let template = match config {
            Some((name, bytes)) => {
                let source = self.cfg.tokenizer.path.with_file_name(name).display().to_string();
                ChatTemplate::from_tokenizer_config(bytes, &source)?
            }
            None => None,
        };
        Ok(ChatFormat::new(self.tokenizer.clone(), template, self.bos, &[self.eos]))
    }

    /// Lets viewers chat with the weights being trained.
    pub fn attach_chat(&mut self, chat: ChatService) {
        self.chat = Some(chat);
    }

    /// Hands a chat request and a snapshot of the current weights to the chat worker.
    fn submit_chat(&mut self, req: ChatRequest, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        let Some(chat) = self.chat.clone() else {
            let message = "chat is not available in this run".to_string();
            on_event(&Event::Log { step: self.state.step, message });
            return Ok(());
        };
        let step = self.state.step;
        let weights = match &self.chat_weights {
            Some((s, w)) if *s == step => w.clone(),
            _ => {
                self.sync_model()?;
                // Under FSDP the f32 masters are on the host already.
                let w = match &self.master_host {
                    Some(w) => Arc::new(w.clone()),
                    None => Arc::new(host_weights(&self.model, &self.model.weights)?),
                };
                self.chat_weights = Some((step, w.clone()));
                w
            }
        };
        chat.submit(req, step, self.model.cfg.clone(), weights);
        Ok(())
    }
}

/// A parameter-shaped set of device buffers copied to the host.
fn host_weights<B: Backend>(model: &Llama<B>, w: &Weights<B::Buf>) -> Result<Weights<Vec<f32>>> {
    let mut it = w.iter().into_iter();
    Weights::try_build(&model.cfg, |_| model.backend.download(it.next().expect("same shape")))
}
