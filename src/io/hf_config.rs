//! `config.json` of a Hugging Face Llama checkpoint, as transformers 4.x writes it (`rope_theta`,
//! `torch_dtype`) and as 5.x writes it (`rope_parameters`, `dtype`, explicit `head_dim`).

use crate::model::LlamaConfig;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// What kiln takes from `config.json`: the architecture plus the special tokens generation needs.
#[derive(Clone, Debug)]
pub struct HfConfig {
    pub model: LlamaConfig,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint declares (`torch_dtype` / `dtype`), informational.
    pub dtype: Option<String>,
}

pub fn read_hf_config(path: &Path) -> Result<HfConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    parse_hf_config(&text).with_context(|| format!("{}", path.display()))
}

pub fn parse_hf_config(text: &str) -> Result<HfConfig> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| anyhow::anyhow!("not valid JSON ({e})"))?;
    let o = v.as_object().context("not a JSON object")?;
    if let Some(t) = o.get("model_type").and_then(Value::as_str) {
        if t != "llama" {
            bail!("model_type {t:?} is not supported (kiln runs Llama-architecture models)");
        }
    }
    if let Some(act) = o.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            bail!("hidden_act {act:?} is not supported (Llama uses \"silu\")");
        }
    }
    for flag in ["attention_bias", "mlp_bias"] {
        if o.get(flag).and_then(Value::as_bool) == Some(true) {
            bail!("{flag} = true is not supported (Llama projections have no bias)");
        }
    }
    let n_head = req_usize(o, "num_attention_heads")?;
    let (rope_theta, scaling) = rope(o)?;
    if let Some(kind) = scaling {
        if kind != "default" {
            bail!("rope scaling type {kind:?} is not supported");
        }
    }
    let model = LlamaConfig {
        n_layer: req_usize(o, "num_hidden_layers")?,
        d_model: req_usize(o, "hidden_size")?,
        n_head,
        n_kv_head: opt_usize(o, "num_key_value_heads")?.unwrap_or(n_head),
        head_dim: opt_usize(o, "head_dim")?,
        d_ff: req_usize(o, "intermediate_size")?,
        vocab_size: req_usize(o, "vocab_size")?,
        max_seq_len: opt_usize(o, "max_position_embeddings")?.unwrap_or(2048),
        rope_theta,
        norm_eps: opt_f64(o, "rms_norm_eps")?.unwrap_or(1e-6),
        tie_embeddings: o
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    model.validate()?;
    let bos_token_id = opt_usize(o, "bos_token_id")?.map(|x| x as u32);
    let eos_token_ids = token_ids(o.get("eos_token_id"))
        .context("eos_token_id must be an integer or a list of integers")?;
    let dtype = o
        .get("dtype")
        .or_else(|| o.get("torch_dtype"))
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(HfConfig {
        model,
        bos_token_id,
        eos_token_ids,
        dtype,
    })
}

/// `(rope_theta, rope scaling type if any)` from either the 4.x or the 5.x layout.
fn rope(o: &Map<String, Value>) -> Result<(f64, Option<String>)> {
    let kind_of = |m: &Map<String, Value>| {
        m.get("rope_type")
            .or_else(|| m.get("type"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    if let Some(p) = o.get("rope_parameters").filter(|p| !p.is_null()) {
        let p = p.as_object().context("rope_parameters must be an object")?;
        let theta = opt_f64(p, "rope_theta")?.unwrap_or(10000.0);
        return Ok((theta, kind_of(p)));
    }
    let theta = opt_f64(o, "rope_theta")?.unwrap_or(10000.0);
    let scaling = match o.get("rope_scaling") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => kind_of(m),
        Some(_) => bail!("rope_scaling must be an object or null"),
    };
    Ok((theta, scaling))
}

fn token_ids(v: Option<&Value>) -> Option<Vec<u32>> {
    match v {
        None | Some(Value::Null) => Some(vec![]),
        Some(Value::Array(a)) => a.iter().map(|x| x.as_u64().map(|x| x as u32)).collect(),
        Some(x) => x.as_u64().map(|x| vec![x as u32]),
    }
}

fn req_usize(o: &Map<String, Value>, key: &str) -> Result<usize> {
    opt_usize(o, key)?.with_context(|| format!("missing field {key:?}"))
}

fn opt_usize(o: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .with_context(|| format!("field {key:?} must be a non-negative integer, found {v}")),
    }
}

fn opt_f64(o: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .with_context(|| format!("field {key:?} must be a number, found {v}")),
    }
}

/// `generation_config.json` may name other end-of-sequence tokens than `config.json`.
pub fn read_generation_eos(path: &Path) -> Result<Option<Vec<u32>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not valid JSON ({e})", path.display()))?;
    match v.get("eos_token_id") {
        None => Ok(None),
        x => token_ids(x).map(Some).with_context(|| {
            format!(
                "{}: eos_token_id must be an integer or a list",
                path.display()
            )
        }),
    }
}
