//! What a run measures on its current weights besides the training loss: the held-out loss over
//! fixed validation windows, the configured commonsense tasks, and sample generations.

use super::events::Event;
use crate::backend::Backend;
use crate::config::{EvalSection, SampleSection};
use crate::data::loader::{val_sequences, Source};
use crate::eval::report::{self, TaskResult};
use crate::eval::score::Scorer;
use crate::eval::tasks;
use crate::model::sampling::{Sampler, SamplingParams};
use crate::model::{KvCache, Llama, Workspace};
use crate::tokenizer::Tokenizer;
use anyhow::Result;

/// The validation windows of every source, fixed for the whole run so evals compare.
pub struct HeldOut {
    /// `(source name, input ids, targets)`, one `seq_len` window each.
    windows: Vec<(String, Vec<u32>, Vec<i32>)>,
    seq: usize,
}

/// The loss over the held-out windows: the mean per token, overall and per source.
pub struct HeldOutLoss {
    pub loss: f64,
    pub per_source: Vec<(String, f64)>,
}

impl HeldOut {
    /// Up to `batches` micro-batches of `micro_batch` windows per source.
    pub fn new(sources: &[Source], seq: usize, micro_batch: usize, batches: usize) -> Self {
        HeldOut { windows: val_sequences(sources, seq, batches * micro_batch), seq }
    }

    /// The mean token loss over every window, through `ws` (whose batch sets the chunk size).
    pub fn loss<B: Backend>(&self, model: &Llama<B>, ws: &mut Workspace<B>) -> Result<Option<HeldOutLoss>> {
        if self.windows.is_empty() {
            return Ok(None);
        }
        let (mb, seq) = (ws.batch, self.seq);
        let mut per: Vec<(String, f64, usize)> = Vec::new();
        for chunk in self.windows.chunks(mb) {
            // A short last chunk is padded with ignored targets.
            let mut ids = vec![0u32; mb * seq];
            let mut targets = vec![-1i32; mb * seq];
            for (i, (_, x, y)) in chunk.iter().enumerate() {
                ids[i * seq..(i + 1) * seq].copy_from_slice(x);
                targets[i * seq..(i + 1) * seq].copy_from_slice(y);
            }
            let losses = model.forward(ws, &ids, &targets, None)?;
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
        Ok(Some(HeldOutLoss {
            loss: sum / n as f64,
            per_source: per.into_iter().map(|(name, l, n)| (name, l / n as f64)).collect(),
        }))
    }
}

/// The configured tasks (each cut to `task_limit` items) and their average, or `None` if none.
pub fn task_results<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    bos: u32,
    e: &EvalSection,
) -> Result<Option<(Vec<TaskResult>, f64)>> {
    if e.tasks.is_empty() {
        return Ok(None);
    }
    let mut scorer = Scorer::new(model, tokenizer, bos)?;
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
    Ok(Some((results, average)))
}

/// One generation per configured prompt, seeded by `seed` (the run's seed and step), so a rerun of
/// a step samples the same text. A prompt longer than the model's context is skipped.
pub fn samples<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    (bos, eos): (u32, u32),
    s: &SampleSection,
    seed: u64,
    step: u64,
) -> Result<Vec<Event>> {
    let params = SamplingParams { temperature: s.temperature, top_k: s.top_k, top_p: s.top_p };
    let mut out = Vec::new();
    for prompt in &s.prompts {
        let ids = tokenizer.encode(prompt, Some(bos))?;
        let mut cache = KvCache::new(model, ids.len() + s.max_new_tokens)?;
        if ids.len() >= cache.capacity() {
            continue;
        }
        let mut sampler = Sampler::new(params, seed);
        let mut logits = model.decode(&mut cache, &ids)?;
        let mut gen = Vec::new();
        while gen.len() < s.max_new_tokens && cache.len() < cache.capacity() {
            let next = sampler.sample(&logits);
            if next == eos {
                break;
            }
            gen.push(next);
            logits = model.decode(&mut cache, &[next])?;
        }
        out.push(Event::Sample { step, prompt: prompt.clone(), text: tokenizer.decode(&gen)? });
    }
    Ok(out)
}
