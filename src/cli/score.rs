//! `kiln score`: per-token log-probabilities of a sequence under a model.

use crate::backend::Backend;
use crate::io::load_model_dir;
use crate::model::Workspace;
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::Path;

#[derive(Serialize)]
pub struct Scores {
    pub ids: Vec<u32>,
    /// `logprobs[i] = ln p(ids[i+1] | ids[..=i])`.
    pub logprobs: Vec<f32>,
    pub sum: f64,
}

pub enum ScoreInput<'a> {
    Text(&'a str),
    Ids(Vec<u32>),
}

/// Scores on `device` ("cpu" or "cuda").
pub fn run(model_dir: &Path, input: ScoreInput<'_>, device: &str) -> Result<Scores> {
    crate::on_device!(device, |b| run_on(model_dir, input, b))
}

pub fn run_on<B: Backend>(model_dir: &Path, input: ScoreInput<'_>, backend: B) -> Result<Scores> {
    let md = load_model_dir(&crate::train::checkpoint::resolve_model_dir(model_dir)?, backend)?;
    let ids = match input {
        ScoreInput::Text(t) => md.tokenizer()?.encode(t, Some(md.bos))?,
        ScoreInput::Ids(ids) => ids,
    };
    let model = &md.model;
    // The last token is only a target, never an input: a model of context N scores N + 1 tokens
    // (as lm-evaluation-harness feeds it).
    if ids.len() > model.cfg.max_seq_len + 1 {
        bail!(
            "{} tokens exceed what the model's max_position_embeddings of {} can score ({})",
            ids.len(),
            model.cfg.max_seq_len,
            model.cfg.max_seq_len + 1
        );
    }
    model.check_ids(&ids)?;
    if ids.len() < 2 {
        return Ok(Scores { ids, logprobs: Vec::new(), sum: 0.0 }); // one token predicts nothing
    }
    let n = ids.len() - 1;
    let targets: Vec<i32> = ids[1..].iter().map(|&t| t as i32).collect();
    let mut ws = Workspace::for_inference(model, 1, n)?;
    let losses = model.forward(&mut ws, &ids[..n], &targets, None)?;
    let logprobs: Vec<f32> = losses.iter().map(|&l| -l).collect();
    let sum = logprobs.iter().map(|&x| x as f64).sum();
    Ok(Scores { ids, logprobs, sum })
}
