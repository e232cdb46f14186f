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
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    parse_hf_config(&text).with_context(|| format!("{}", path.display()))
}

pub fn parse_hf_config(text: &str) -> Result<HfConfig> {
    let v: Value = serde_json::from_str(text).map_err(|e| anyhow::anyhow!("not valid JSON ({e})"))?;
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
        tie_embeddings: o.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
    };
    model.validate().map_err(|e| anyhow::anyhow!("{}", in_hf_names(&e.to_string())))?;
    let bos_token_id = opt_usize(o, "bos_token_id")?.map(|x| x as u32);
    let eos_token_ids =
        token_ids(o.get("eos_token_id")).context("eos_token_id must be an integer or a list of integers")?;
    let vocab = model.vocab_size;
    if let Some(id) = bos_token_id.into_iter().chain(eos_token_ids.iter().copied()).find(|&t| t as usize >= vocab) {
        bail!("bos_token_id/eos_token_id {id} is outside the vocabulary of {vocab}");
    }
    let dtype = o.get("dtype").or_else(|| o.get("torch_dtype")).and_then(Value::as_str).map(str::to_string);
    Ok(HfConfig { model, bos_token_id, eos_token_ids, dtype })
}

/// A model-shape error in config.json's own field names (`hidden_size`, not kiln's `d_model`).
fn in_hf_names(message: &str) -> String {
    const HF: [(&str, &str); 7] = [
        ("n_layer", "num_hidden_layers"),
        ("d_model", "hidden_size"),
        ("n_head", "num_attention_heads"),
        ("n_kv_head", "num_key_value_heads"),
        ("d_ff", "intermediate_size"),
        ("max_seq_len", "max_position_embeddings"),
        ("norm_eps", "rms_norm_eps"),
    ];
    let mut out = String::with_capacity(message.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(HF.iter().find(|(k, _)| *k == word).map_or(word.as_str(), |(_, hf)| hf));
        word.clear();
    };
    for c in message.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// `(rope_theta, rope scaling type if any)` from either the 4.x or the 5.x layout.
fn rope(o: &Map<String, Value>) -> Result<(f64, Option<String>)> {
    let kind_of = |m: &Map<String, Value>| {
        m.get("rope_type").or_else(|| m.get("type")).and_then(Value::as_str).map(str::to_string)
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
        Some(v) => v.as_f64().map(Some).with_context(|| format!("field {key:?} must be a number, found {v}")),
    }
}

/// `generation_config.json` may name other end-of-sequence tokens than `config.json`.
pub fn read_generation_eos(path: &Path) -> Result<Option<Vec<u32>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not valid JSON ({e})", path.display()))?;
    match v.get("eos_token_id") {
        None => Ok(None),
        x => token_ids(x)
            .map(Some)
            .with_context(|| format!("{}: eos_token_id must be an integer or a list", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_errors_use_config_json_names() {
        assert_eq!(
            in_hf_names("d_model (65) must be divisible by n_head (4); n_kv_head, d_ff_x"),
            "hidden_size (65) must be divisible by num_attention_heads (4); num_key_value_heads, d_ff_x"
        );
    }

    const V4: &str = r#"{"model_type":"llama","hidden_size":2048,"intermediate_size":5632,"num_hidden_layers":22,
        "num_attention_heads":32,"num_key_value_heads":4,"vocab_size":32000,"max_position_embeddings":2048,
        "rms_norm_eps":1e-05,"rope_theta":10000.0,"rope_scaling":null,"tie_word_embeddings":false,
        "torch_dtype":"bfloat16","bos_token_id":1,"eos_token_id":2,"hidden_act":"silu"}"#;

    #[test]
    fn reads_transformers_4_layout() {
        let c = parse_hf_config(V4).unwrap();
        assert_eq!(c.model, LlamaConfig::preset("tinyllama-1.1b").unwrap());
        assert_eq!((c.bos_token_id, c.eos_token_ids.clone(), c.dtype.as_deref()), (Some(1), vec![2], Some("bfloat16")));
    }

    #[test]
    fn reads_transformers_5_layout() {
        let v5 = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":24,"vocab_size":700,"dtype":"bfloat16",
            "rope_parameters":{"rope_theta":50000.0,"rope_type":"default"},"eos_token_id":[2,7]}"#;
        let c = parse_hf_config(v5).unwrap();
        assert_eq!((c.model.head_dim(), c.model.q_dim(), c.model.rope_theta), (24, 96, 50000.0));
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        assert_eq!(c.model.norm_eps, 1e-6); // transformers' LlamaConfig default
    }

    #[test]
    fn rejects_what_kiln_cannot_run() {
        let bad = V4.replace("\"rope_scaling\":null", "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0}");
        assert!(parse_hf_config(&bad).unwrap_err().to_string().contains("llama3"));
        let bad = V4.replace("\"num_key_value_heads\":4", "\"num_key_value_heads\":5");
        let e = format!("{:#}", parse_hf_config(&bad).unwrap_err());
        assert!(e.contains("num_key_value_heads") && !e.contains("n_kv_head"), "{e}");
        let bad = V4.replace("\"hidden_size\":2048", "\"hidden_size\":\"big\"");
        assert!(parse_hf_config(&bad).unwrap_err().to_string().contains("hidden_size"));
    }
}
