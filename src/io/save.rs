//! Writing Hugging Face model directories: config.json in the layout transformers 4.x writes (which
//! 5.x also reads), model.safetensors in f32, generation_config.json, and the tokenizer files.

use crate::model::{tensor_specs, LlamaConfig, Weights};
use anyhow::{Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

pub fn hf_config_json(cfg: &LlamaConfig, bos: u32, eos: u32) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim(),
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": null,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "use_cache": true,
    })
}

fn le_bytes(t: &[f32]) -> Vec<u8> {
    t.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes named f32 tensors to `path` (fsynced). `metadata` carries `format = pt`, which
/// transformers requires.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, t)| le_bytes(t)).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| Ok((name.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let data = safetensors::serialize(views, Some(meta))?;
    let mut f = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    f.write_all(&data).and_then(|_| f.sync_all()).with_context(|| format!("{}: cannot write", path.display()))
}

pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    f.write_all(serde_json::to_string_pretty(v)?.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes a complete model directory into `dir` (which must exist). `tokenizer_files` are copied
/// in (tokenizer.json and, when present, tokenizer_config.json).
pub fn write_model_dir(
    dir: &Path,
    cfg: &LlamaConfig,
    weights: &Weights<Vec<f32>>,
    bos: u32,
    eos: u32,
    tokenizer_files: &[(&str, &[u8])],
) -> Result<()> {
    write_json(&dir.join("config.json"), &hf_config_json(cfg, bos, eos))?;
    write_json(&dir.join("generation_config.json"), &json!({"bos_token_id": bos, "eos_token_id": eos}))?;
    let specs = tensor_specs(cfg);
    let tensors: Vec<(String, Vec<usize>, &[f32])> =
        specs.iter().zip(weights.iter()).map(|(s, t)| (s.name.clone(), s.shape.clone(), t.as_slice())).collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    for (name, bytes) in tokenizer_files {
        let p = dir.join(name);
        let mut f = File::create(&p).with_context(|| format!("{}: cannot create", p.display()))?;
        f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("{}: cannot write", p.display()))?;
    }
    Ok(())
}
