//! The engine's chat worker. A viewer's chat request reaches the trainer at a step boundary; the
//! trainer hands this worker a snapshot of the current weights, and the reply streams back to every
//! viewer as events while training goes on (or stays paused) on its own threads. Stop requests
//! bypass the trainer, so Esc works in the middle of a long step.

use super::prompt::ChatFormat;
use super::reply::{stream_reply, ReplyParams};
use super::template::Message;
use crate::backend::cpu::Cpu;
use crate::model::{Llama, LlamaConfig, Weights};
use crate::train::events::Event;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

/// What a viewer asks: the whole conversation so far (so the reply always reflects the weights of
/// the moment), and how to sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// Chosen by the viewer, unique among viewers; replies carry it back.
    pub id: u64,
    pub messages: Vec<Message>,
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
}

/// Where chat events go: every viewer, never metrics.jsonl.
pub type Sink = Arc<dyn Fn(&Event) + Send + Sync>;

struct Job {
    req: ChatRequest,
    step: u64,
    cfg: LlamaConfig,
    weights: Arc<Weights<Vec<f32>>>,
}

#[derive(Clone)]
pub struct ChatService {
    jobs: Sender<Job>,
    cancelled: Arc<Mutex<HashSet<u64>>>,
}

impl ChatService {
    /// Starts the worker thread; it ends when every handle is dropped.
    pub fn start(format: ChatFormat, sink: Sink) -> std::io::Result<ChatService> {
        let (jobs, rx) = channel::<Job>();
        let cancelled: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let flags = cancelled.clone();
        std::thread::Builder::new().name("kiln-chat".into()).spawn(move || {
            // The model is rebuilt only when the trainer hands over newer weights.
            let mut model: Option<(u64, Llama<Cpu>)> = None;
            for job in rx {
                let id = job.req.id;
                let is_cancelled = || flags.lock().unwrap_or_else(|p| p.into_inner()).contains(&id);
                let result = answer(&format, &mut model, &job, &is_cancelled, &sink);
                if let Err(e) = result {
                    sink(&Event::ChatDone {
                        id,
                        step: job.step,
                        tokens: 0,
                        tokens_per_s: 0.0,
                        ended: format!("error: {e:#}"),
                        dropped: 0,
                    });
                }
                flags.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            }
        })?;
        Ok(ChatService { jobs, cancelled })
    }

    /// Queues a reply to `req` from `weights` (the trainer's weights after `step`).
    pub fn submit(&self, req: ChatRequest, step: u64, cfg: LlamaConfig, weights: Arc<Weights<Vec<f32>>>) {
        let _ = self.jobs.send(Job { req, step, cfg, weights });
    }

    /// Stops reply `id` before its next token (or before it starts).
    pub fn stop(&self, id: u64) {
        self.stopper().stop(id);
    }

    /// A handle that can only stop replies; it does not keep the worker alive.
    pub fn stopper(&self) -> ChatStopper {
        ChatStopper { cancelled: self.cancelled.clone() }
    }
}

#[derive(Clone)]
pub struct ChatStopper {
    cancelled: Arc<Mutex<HashSet<u64>>>,
}

impl ChatStopper {
    pub fn stop(&self, id: u64) {
        self.cancelled.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
    }
}

fn answer(
    format: &ChatFormat,
    model: &mut Option<(u64, Llama<Cpu>)>,
    job: &Job,
    is_cancelled: &dyn Fn() -> bool,
    sink: &Sink,
) -> anyhow::Result<()> {
    if model.as_ref().is_none_or(|(step, m)| *step != job.step || m.cfg != job.cfg) {
        *model = None; // free the old copy first
        *model = Some((job.step, Llama::from_host(job.cfg.clone(), Cpu::new(), &job.weights)?));
    }
    let m = &model.as_ref().expect("built above").1;
    let r = &job.req;
    let max_tokens = r.max_tokens.clamp(1, m.cfg.max_seq_len - 1);
    let prompt = format.prompt(&r.messages, m.cfg.max_seq_len - max_tokens)?;
    let params = ReplyParams { temperature: r.temperature, top_p: r.top_p, max_tokens, seed: r.id ^ job.step };
    let reply = stream_reply(m, &format.tokenizer, &prompt.ids, &format.stop, params, is_cancelled, &mut |s| {
        sink(&Event::ChatToken { id: r.id, text: s.to_string() })
    })?;
    sink(&Event::ChatDone {
        id: r.id,
        step: job.step,
        tokens: reply.ids.len(),
        tokens_per_s: reply.tokens_per_s(),
        ended: reply.end.describe().to_string(),
        dropped: prompt.dropped,
    });
    Ok(())
}
