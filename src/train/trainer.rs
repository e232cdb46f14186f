//! The trainer: one engine (a single device or FSDP shards), the data it reads, and what a step
//! boundary can do with the current weights (evaluate, sample, chat, checkpoint). The loop that
//! drives it is `step_loop.rs`.

use super::checkpoint::{self, Snapshot, TrainerState};
use super::engine::{Engine, EngineStart};
use super::evaluation::{self, HeldOut};
use super::events::{Event, StepMetrics};
use super::guard::{Trip, UpdateCheck};
use super::optim_state::MomentSource;
use super::optimizer::StepParams;
use super::schedule::lr_at;
use crate::backend::{AdamW, Backend};
use crate::chat::prompt::ChatFormat;
use crate::chat::service::{ChatRequest, ChatService};
use crate::chat::ChatTemplate;
use crate::config::RunConfig;
use crate::data::loader::{Loader, Source};
use crate::dist::Member;
use crate::io::run_lock::RunLock;
use crate::model::{Keep, Llama, Weights, Workspace};
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub struct Trainer<B: Backend> {
    pub cfg: RunConfig,
    /// On one device, the weights being trained; under FSDP, their compute-precision copy for
    /// evaluation, samples and chat (refreshed by `Engine::sync`).
    pub model: Llama<B>,
    pub state: TrainerState,
    pub(super) engine: Engine<B>,
    ws: Workspace<B>,
    loader: Loader,
    held_out: HeldOut,
    run_dir: PathBuf,
    /// `metrics.jsonl`, on the node that writes (node 0).
    metrics: Option<File>,
    /// Where this process sits among the run's nodes.
    pub(super) node: NodeRole,
    pub tokenizer: Tokenizer,
    tokenizer_files: Vec<(String, Vec<u8>)>,
    bos: u32,
    eos: u32,
    peak_flops: f64,
    pub(super) last_checkpoint_step: Option<u64>,
    /// Answers viewers' chat requests (see `attach_chat`).
    pub(super) chat: Option<ChatService>,
    /// The weights chat replies use until the next step changes them.
    chat_weights: Option<(u64, Arc<Weights<Vec<f32>>>)>,
    _run_lock: Option<RunLock>,
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
    /// SIGINT / SIGTERM or a viewer's stop: checkpointed at a step boundary.
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
    pub fn new(p: TrainerParts<B>) -> Result<Self> {
        let c = &p.cfg;
        let start = EngineStart { host_weights: p.host_weights, moments: p.moments, group: p.group, node: p.node };
        let engine = Engine::new(&p.model, c, start)?;
        let loader =
            Loader::start(&p.sources, c.train.seed, c.data.seq_len, c.train.micro_batch, Some(p.state.mix.clone()))?;
        let held_out = HeldOut::new(&p.sources, c.data.seq_len, c.train.micro_batch, c.eval.batches);
        let keep = engine.workspace_keep(if c.train.recompute { Keep::BlockInputs } else { Keep::All });
        let ws = Workspace::keeping(&p.model, c.train.micro_batch, c.data.seq_len, keep)?;
        let metrics = match p.node.leads() {
            true => {
                let path = p.run_dir.join("metrics.jsonl");
                let f = OpenOptions::new().create(true).append(true).open(&path);
                Some(f.with_context(|| format!("{}: cannot open", path.display()))?)
            }
            false => None,
        };
        Ok(Trainer {
            cfg: p.cfg,
            model: p.model,
            state: p.state,
            engine,
            ws,
            loader,
            held_out,
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

    /// Appends `e` to metrics.jsonl (on the node that writes), then hands it on.
    pub(super) fn emit(&mut self, e: Event, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        if let Some(metrics) = &mut self.metrics {
            writeln!(metrics, "{}", serde_json::to_string(&e)?)
                .with_context(|| format!("{}: cannot append", self.run_dir.join("metrics.jsonl").display()))?;
        }
        on_event(&e);
        Ok(())
    }

    /// One optimizer step over `grad_accum` micro-batches, and whether the step guard refused its
    /// update (the weights and moments are then as they were; the data counts as consumed).
    pub fn step(&mut self) -> Result<(StepMetrics, Option<Trip>)> {
        let t0 = Instant::now();
        self.chat_weights = None; // stale after this step; chat snapshots again when asked
        let c = &self.cfg;
        let global_tokens = c.train.micro_batch * c.data.seq_len * c.train.grad_accum;
        // The loss is the mean token cross-entropy over the whole global batch.
        let scale = 1.0 / global_tokens as f32;
        let step = self.state.step + 1;
        // AdamW's bias correction counts the updates applied, not the steps the guard skipped.
        let update = step - self.state.guard.skipped;
        let check = self.state.guard.check(&c.guard);
        let o = &c.optim;
        let lr = lr_at(step, o.lr, o.min_lr, o.warmup_steps, c.train.max_steps);
        let hp = AdamW {
            lr: lr as f32,
            beta1: o.beta1 as f32,
            beta2: o.beta2 as f32,
            eps: o.eps as f32,
            weight_decay: o.weight_decay as f32,
            step: update,
            // Set per step from the gradient norm (`optimizer::clip_coefficient`).
            grad_scale: 1.0,
        };
        let p = StepParams { scale, max_norm: o.grad_clip, hp, check };
        let (loader, mix) = (&mut self.loader, &mut self.state.mix);
        let mut wait = 0.0f64;
        let batches = (0..c.train.grad_accum).map(|_| {
            let (batch, waited) = loader.next_batch()?;
            wait += waited.as_secs_f64();
            *mix = batch.state.clone();
            Ok(batch)
        });
        let stepped = self.engine.step(&mut self.model, &mut self.ws, batches, p)?;
        let (loss, norm) = (stepped.loss_sum * scale as f64, stepped.norm);
        // The same test the engine made, on the same values (`UpdateCheck::accepts`).
        let trip = check.trip(loss, norm);
        match trip {
            None if check != UpdateCheck::Off => self.state.guard.applied(&self.cfg.guard, loss, norm),
            None => {}
            Some(_) => self.state.guard.skipped(),
        }
        self.state.step = step;
        self.state.tokens += global_tokens as u64;
        let secs = t0.elapsed().as_secs_f64();
        let tps = global_tokens as f64 / secs;
        let ranks = self.engine.rank_metrics(&self.model, tps)?;
        let metrics = StepMetrics {
            step,
            tokens: self.state.tokens,
            loss,
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
            // Each unit's norm on logged steps (a line per step stays short on a deep model).
            unit_grad_norms: step
                .is_multiple_of(c.train.log_every)
                .then(|| stepped.unit_sq.iter().map(|x| x.sqrt()).collect()),
        };
        Ok((metrics, trip))
    }

    /// Brings the model's weights up to date; under FSDP every node must call it together.
    /// Returns whether this node goes on to use them (it leads).
    pub(super) fn sync_model(&mut self) -> Result<bool> {
        self.engine.sync(&mut self.model, self.node)?;
        Ok(self.node.leads())
    }

    /// Held-out loss and the configured tasks on the current weights, as events.
    pub(super) fn evaluate(&mut self) -> Result<Vec<Event>> {
        if !self.sync_model()? {
            return Ok(Vec::new());
        }
        let (step, tokens) = (self.state.step, self.state.tokens);
        let mut out = Vec::new();
        if let Some(h) = self.held_out.loss(&self.model, &mut self.ws)? {
            out.push(Event::Eval { step, tokens, loss: h.loss, per_source: h.per_source });
        }
        if let Some((results, average)) =
            evaluation::task_results(&self.model, &self.tokenizer, self.bos, &self.cfg.eval)?
        {
            out.push(Event::EvalTasks { step, tokens, results, average });
        }
        Ok(out)
    }

    /// One generation per configured prompt from the current weights.
    pub(super) fn samples(&mut self) -> Result<Vec<Event>> {
        if !self.sync_model()? {
            return Ok(Vec::new());
        }
        let step = self.state.step;
        let seed = self.cfg.train.seed ^ step;
        evaluation::samples(&self.model, &self.tokenizer, (self.bos, self.eos), &self.cfg.sample, seed, step)
    }

    /// An atomic checkpoint of this step, written by the leading node (the others take part in
    /// the same collectives: consolidation, then the optimizer shards).
    pub fn checkpoint(&mut self) -> Result<PathBuf> {
        let leads = self.sync_model()?;
        let optimizer = self.engine.moments(&self.model)?;
        if !leads {
            self.last_checkpoint_step = Some(self.state.step);
            return Ok(self.run_dir.clone());
        }
        let weights = self.engine.master_weights(&self.model)?;
        let optimizer: Vec<_> = optimizer.iter().map(|r| r.view()).collect();
        let files: Vec<(&str, &[u8])> = self.tokenizer_files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        let snap = Snapshot {
            cfg: &self.model.cfg,
            weights: &weights,
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
    pub(super) fn submit_chat(&mut self, req: ChatRequest, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
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
                let w = Arc::new(self.engine.master_weights(&self.model)?.into_owned());
                self.chat_weights = Some((step, w.clone()));
                w
            }
        };
        chat.submit(req, step, self.model.cfg.clone(), weights);
        Ok(())
    }
}
