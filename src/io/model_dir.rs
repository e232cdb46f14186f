//! Loading a Hugging Face model directory: config.json, (sharded) safetensors weights in f32, bf16
//! or f16, tied or untied embeddings, and its tokenizer (or the bundled Llama-2 one).

use super::hf_config::{read_generation_eos, read_hf_config, HfConfig};
use super::safetensors::TensorFiles;
use crate::backend::{Backend, Role};
use crate::model::{Llama, Weights};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

pub struct ModelDir<B: Backend> {
    pub path: PathBuf,
    pub config: HfConfig,
    pub model: Llama<B>,
    /// `dir/tokenizer.json`, else the bundled Llama-2 tokenizer when the vocabulary fits; `None`
    /// when neither applies (token ids still work; text needs a tokenizer).
    pub tokenizer: Option<Tokenizer>,
    pub bos: u32,
    /// Tokens that end generation.
    pub eos: Vec<u32>,
}

/// The weight files of a model directory: one `model.safetensors` or an index of shards.
pub fn weight_files(dir: &Path) -> Result<TensorFiles> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        TensorFiles::open(&[single])
    } else if index.exists() {
        TensorFiles::open_index(&index)
    } else {
        bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
    }
}

pub fn load_model_dir<B: Backend>(dir: &Path, backend: B) -> Result<ModelDir<B>> {
    if !dir.is_dir() {
        bail!("{}: not a model directory (it does not exist or is not a directory)", dir.display());
    }
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        bail!("{}: missing (a Hugging Face model directory needs config.json)", cfg_path.display());
    }
    let config = read_hf_config(&cfg_path)?;
    let files = weight_files(dir)?;
    let cfg = config.model.clone();
    // A kiln checkpoint's files are hashed on another thread while the weights load (the hash
    // reads what the load reads, from the page cache): the check costs little more than the load.
    // A model from a file that fails it is dropped, never returned.
    let (verified, weights) = std::thread::scope(|s| {
        let verify = s.spawn(|| super::checksums::verify_if_checkpoint(dir));
        let weights = Weights::try_build(&cfg, |spec| backend.upload_as(&files.load_f32(spec)?, Role::Param));
        (verify.join().unwrap_or_else(|_| Err(anyhow::anyhow!("{}: checksum thread panicked", dir.display()))), weights)
    });
    verified?;
    let model = Llama::new(cfg, backend, weights?)?;

    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        let t = Tokenizer::from_file(&tok_path)?;
        t.check_vocab(config.model.vocab_size, &cfg_path.display().to_string())?;
        Some(t)
    } else {
        let t = Tokenizer::llama2();
        (t.vocab_size() <= config.model.vocab_size).then_some(t)
    };
    let piece = |p: &str| tokenizer.as_ref().and_then(|t| t.token_id(p));
    let bos = config.bos_token_id.or_else(|| piece("<s>")).unwrap_or(1);
    let mut eos =
        read_generation_eos(&dir.join("generation_config.json"))?.unwrap_or_else(|| config.eos_token_ids.clone());
    if eos.is_empty() {
        eos.extend(piece("</s>"));
    }
    Ok(ModelDir { path: dir.to_path_buf(), config, model, tokenizer, bos, eos })
}

impl<B: Backend> ModelDir<B> {
    /// The tokenizer, or an error saying why this model directory has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no tokenizer.json, and the bundled Llama-2 tokenizer (32000 tokens) does not fit vocab_size {}",
                self.path.display(),
                self.config.model.vocab_size
            )
        })
    }
}
