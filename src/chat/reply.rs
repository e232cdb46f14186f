//! One streamed reply: prefill the prompt through the KV cache, then sample token by token,
//! handing out text as soon as it is whole, until an end-of-turn token, the token limit, the
//! context's end, or a stop request.

use crate::backend::Backend;
use crate::model::sampling::{Sampler, SamplingParams};
use crate::model::{KvCache, Llama};
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use std::time::Instant;

/// Turns a growing list of generated ids into text increments. The whole reply is decoded each
/// time and only what is new is handed out, so characters split across tokens (multi-byte UTF-8,
/// SentencePiece's leading spaces) come out once, whole.
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    pub ids: Vec<u32>,
    sent: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        TextStream { tok, ids: Vec::new(), sent: 0 }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.sent || !text.is_char_boundary(self.sent) {
            return Ok(None);
        }
        let new = text[self.sent..].to_string();
        self.sent = text.len();
        Ok(Some(new))
    }

    /// Whatever is left (an incomplete character at the very end, decoded as it stands).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.tok.decode(&self.ids)?;
        if text.len() > self.sent && text.is_char_boundary(self.sent) {
            let rest = text[self.sent..].to_string();
            self.sent = text.len();
            return Ok(Some(rest));
        }
        Ok(None)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ReplyParams {
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyEnd {
    /// The model ended its turn.
    EndOfTurn,
    MaxTokens,
    /// The model's context is full.
    Context,
    /// Stopped on request.
    Stopped,
}

impl ReplyEnd {
    pub fn describe(self) -> &'static str {
        match self {
            ReplyEnd::EndOfTurn => "end of turn",
            ReplyEnd::MaxTokens => "token limit",
            ReplyEnd::Context => "context full",
            ReplyEnd::Stopped => "stopped",
        }
    }
}

pub struct Reply {
    pub ids: Vec<u32>,
    pub text: String,
    pub end: ReplyEnd,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl Reply {
    /// Generated tokens per second of decoding (the prompt's prefill excluded).
    pub fn tokens_per_s(&self) -> f64 {
        self.ids.len() as f64 / self.decode_secs.max(1e-9)
    }
}

/// Generates a reply to `prompt`; `on_text` receives each increment of text, `stop_requested` is
/// asked before every token. End-of-turn tokens end the reply and are not part of it.
pub fn stream_reply<B: Backend>(
    model: &Llama<B>,
    tok: &Tokenizer,
    prompt: &[u32],
    stop_ids: &[u32],
    p: ReplyParams,
    stop_requested: &dyn Fn() -> bool,
    on_text: &mut dyn FnMut(&str),
) -> Result<Reply> {
    let mut cache = KvCache::new(model, prompt.len().saturating_add(p.max_tokens))?;
    if prompt.len() >= cache.capacity() {
        anyhow::bail!("the prompt has {} tokens; the model's context is {}", prompt.len(), model.cfg.max_seq_len);
    }
    let mut sampler = Sampler::new(SamplingParams { temperature: p.temperature, top_k: 0, top_p: p.top_p }, p.seed);
    let t0 = Instant::now();
    let mut logits = model.decode(&mut cache, prompt)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut stream = TextStream::new(tok);
    let mut text = String::new();
    let end = loop {
        if stop_requested() {
            break ReplyEnd::Stopped;
        }
        let next = sampler.sample(&logits);
        if stop_ids.contains(&next) {
            break ReplyEnd::EndOfTurn;
        }
        if let Some(s) = stream.push(next)? {
            on_text(&s);
            text.push_str(&s);
        }
        if stream.ids.len() >= p.max_tokens {
            break ReplyEnd::MaxTokens;
        }
        if cache.len() >= cache.capacity() {
            break ReplyEnd::Context;
        }
        logits = model.decode(&mut cache, &[next])?;
    };
    if let Some(s) = stream.finish()? {
        on_text(&s);
        text.push_str(&s);
    }
    Ok(Reply { ids: stream.ids, text, end, prefill_secs, decode_secs: t1.elapsed().as_secs_f64() })
}
