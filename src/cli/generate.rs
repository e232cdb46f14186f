//! `kiln generate`: KV-cache decoding with greedy or sampled next tokens, streamed as text.

use crate::backend::Backend;
use crate::chat::reply::TextStream;
use crate::io::load_model_dir;
use crate::model::sampling::{Sampler, SamplingParams};
use crate::model::KvCache;
use anyhow::Result;
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

pub struct GenerateArgs<'a> {
    pub prompt: &'a str,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    /// Stream text to stdout as it is generated (off for `--json`).
    pub stream: bool,
}

#[derive(Serialize)]
pub struct Generation {
    /// Generated ids only (the prompt excluded), the final EOS included when one was produced.
    pub ids: Vec<u32>,
    pub text: String,
    #[serde(skip)]
    pub prompt_tokens: usize,
    #[serde(skip)]
    pub prefill_secs: f64,
    #[serde(skip)]
    pub decode_secs: f64,
}

/// Generates on `device` ("cpu" or "cuda").
pub fn run(model_dir: &Path, args: GenerateArgs<'_>, device: &str) -> Result<Generation> {
    crate::on_device!(device, |b| run_on(model_dir, args, b))
}

pub fn run_on<B: Backend>(model_dir: &Path, args: GenerateArgs<'_>, backend: B) -> Result<Generation> {
    let md = load_model_dir(&crate::train::checkpoint::resolve_model_dir(model_dir)?, backend)?;
    let (model, tok) = (&md.model, md.tokenizer()?);
    let prompt = tok.encode(args.prompt, Some(md.bos))?;
    let mut cache = KvCache::new(model, prompt.len().saturating_add(args.max_new_tokens))?;
    if prompt.len() >= cache.capacity() {
        anyhow::bail!("the prompt has {} tokens; the model's context is {}", prompt.len(), model.cfg.max_seq_len);
    }
    let mut sampler = Sampler::new(args.sampling, args.seed);
    let t0 = Instant::now();
    let mut logits = model.decode(&mut cache, &prompt)?;
    let prefill_secs = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut ids = Vec::new();
    let mut text = TextStream::new(tok);
    let mut out = std::io::stdout();
    while ids.len() < args.max_new_tokens {
        let next = sampler.sample(&logits);
        ids.push(next);
        if md.eos.contains(&next) {
            break;
        }
        if let Some(s) = text.push(next)? {
            if args.stream {
                write!(out, "{s}")?;
                out.flush()?;
            }
        }
        if ids.len() == args.max_new_tokens || cache.len() == cache.capacity() {
            break;
        }
        logits = model.decode(&mut cache, &[next])?;
    }
    if args.stream {
        if let Some(s) = text.finish()? {
            write!(out, "{s}")?;
        }
        writeln!(out)?;
    }
    let text = tok.decode(&ids)?;
    Ok(Generation { ids, text, prompt_tokens: prompt.len(), prefill_secs, decode_secs: t1.elapsed().as_secs_f64() })
}
