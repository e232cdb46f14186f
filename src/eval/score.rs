//! Log-likelihood scoring of multiple-choice items with a KV cache: the shared context is run once,
//! then every continuation is scored from it in one batch (`Llama::decode_branches`).
//!
//! Tokenization follows lm-evaluation-harness for Llama models: no BOS; `whole = encode(context +
//! continuation)`, `context = encode(context)`, continuation tokens = `whole[len(context):]`; the
//! model input is `(context + continuation)[-(max_len + 1):][:-1]`, as lm-evaluation-harness
//! truncates: up to max_len tokens of input, the last continuation token only a target.

use super::tasks::Item;
use crate::backend::Backend;
use crate::model::{KvCache, Llama};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};

#[derive(Clone, Debug)]
pub struct ItemScore {
    /// Summed log-likelihood of each choice's continuation.
    pub loglik: Vec<f64>,
    pub gold: usize,
    /// Highest `loglik`.
    pub pred: usize,
    /// Highest `loglik / choice length in characters` (absent for WinoGrande).
    pub pred_norm: Option<usize>,
}

/// `ln softmax(row)[t]`, accumulated in f64.
fn log_prob(row: &[f32], t: u32) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    row[t as usize] as f64 - m - z.ln()
}

/// First index of the maximum (ties go to the earlier choice, as numpy's argmax does).
fn argmax(v: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in v.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

pub struct Scorer<'a, B: Backend> {
    pub model: &'a Llama<B>,
    pub tok: &'a Tokenizer,
    /// Used when a context encodes to nothing (lm-evaluation-harness's prefix token).
    pub bos: u32,
    cache: KvCache<B>,
}

impl<'a, B: Backend> Scorer<'a, B> {
    pub fn new(model: &'a Llama<B>, tok: &'a Tokenizer, bos: u32) -> Result<Self> {
        let cache = KvCache::new(model, model.cfg.max_seq_len)?;
        Ok(Scorer { model, tok, bos, cache })
    }

    pub fn score(&mut self, item: &Item) -> Result<ItemScore> {
        let vocab = self.model.cfg.vocab_size;
        let max_len = self.cache.capacity();
        // Each request as (context ids, continuation ids), tokenized as lm-evaluation-harness does.
        let mut requests = Vec::with_capacity(item.requests.len());
        for r in &item.requests {
            let mut ctx = self.tok.encode(&r.context, None)?;
            let whole = self.tok.encode(&format!("{}{}", r.context, r.continuation), None)?;
            let cont: Vec<u32> = whole.get(ctx.len()..).unwrap_or(&[]).to_vec();
            if cont.is_empty() {
                bail!("continuation {:?} encodes to no tokens after its context", r.continuation);
            }
            if cont.len() > max_len {
                bail!("a continuation of {} tokens does not fit the model's context of {max_len}", cont.len());
            }
            if ctx.is_empty() {
                ctx.push(self.bos);
            }
            // lm-evaluation-harness's window: `(context + continuation)[-(max_len + 1):][:-1]` is the
            // input, so up to max_len + 1 tokens take part (the last is only a target).
            if ctx.len() + cont.len() > max_len + 1 {
                ctx.drain(..ctx.len() + cont.len() - (max_len + 1));
            }
            requests.push((ctx, cont));
        }
        // Requests that share their context (every choice of most tasks) run it once, then score
        // their continuations together as branches of it; WinoGrande's choices differ in context.
        let mut loglik = vec![0.0; requests.len()];
        let mut start = 0;
        while start < requests.len() {
            let ctx = &requests[start].0;
            let end = start + requests[start..].iter().take_while(|(c, _)| c == ctx).count();
            self.cache.clear();
            let last = self.model.decode(&mut self.cache, ctx)?;
            // The first continuation token is scored from the context's last logits; the rest
            // from the branch's own rows (a branch is the continuation without its last token).
            let branches: Vec<&[u32]> =
                requests[start..end].iter().map(|(_, c)| &c[..c.len() - 1]).filter(|b| !b.is_empty()).collect();
            let mut rows = self.model.decode_branches(&mut self.cache, &branches)?.into_iter();
            for (i, (_, cont)) in requests[start..end].iter().enumerate() {
                let mut ll = log_prob(&last, cont[0]);
                if cont.len() > 1 {
                    let rows = rows.next().expect("one branch per continuation longer than a token");
                    for (j, &t) in cont[1..].iter().enumerate() {
                        ll += log_prob(&rows[j * vocab..(j + 1) * vocab], t);
                    }
                }
                loglik[start + i] = ll;
            }
            start = end;
        }
        let pred = argmax(loglik.iter().copied());
        let pred_norm =
            item.choice_chars.as_ref().map(|c| argmax(loglik.iter().zip(c).map(|(l, &n)| l / n.max(1) as f64)));
        Ok(ItemScore { loglik, gold: item.gold, pred, pred_norm })
    }
}
