//! `[model]`: a preset and/or explicit shape fields, and where a new run's weights come from.

use crate::model::LlamaConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `preset = "..."` and/or explicit fields (fields override the preset); `init` is "random" or a
/// path to a Hugging Face model directory, kiln checkpoint or run directory.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub preset: Option<String>,
    #[serde(default)]
    pub init: ModelInit,
    pub n_layer: Option<usize>,
    pub d_model: Option<usize>,
    pub n_head: Option<usize>,
    pub n_kv_head: Option<usize>,
    pub head_dim: Option<usize>,
    pub d_ff: Option<usize>,
    pub vocab_size: Option<usize>,
    pub max_seq_len: Option<usize>,
    pub rope_theta: Option<f64>,
    pub norm_eps: Option<f64>,
    pub tie_embeddings: Option<bool>,
}

/// Where a new run's weights come from: `"random"` (HF-style initialisation from `train.seed`) or
/// the path of a Hugging Face model directory, kiln checkpoint or run directory.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ModelInit {
    #[default]
    Random,
    Path(PathBuf),
}

impl From<String> for ModelInit {
    fn from(s: String) -> Self {
        if s == "random" {
            ModelInit::Random
        } else {
            ModelInit::Path(s.into())
        }
    }
}

impl From<ModelInit> for String {
    fn from(i: ModelInit) -> String {
        match i {
            ModelInit::Random => "random".into(),
            ModelInit::Path(p) => p.display().to_string(),
        }
    }
}

impl ModelSection {
    /// The shape fields this section sets: every field but `preset` and `init`, read off the
    /// struct's own serialization so that a field added later cannot be forgotten here.
    pub fn shape_fields_set(&self) -> Vec<String> {
        let v = serde_json::to_value(self).unwrap_or_default();
        let fields = v.as_object().into_iter().flatten();
        fields.filter(|(k, v)| !v.is_null() && *k != "preset" && *k != "init").map(|(k, _)| k.clone()).collect()
    }

    /// The model shape from `preset` plus explicit fields; `None` when neither is given (the shape
    /// then comes from `model.init` or a checkpoint).
    pub fn shape(&self) -> Result<Option<LlamaConfig>> {
        let m = self;
        let set = m.shape_fields_set();
        let mut c = match &m.preset {
            Some(p) => LlamaConfig::preset(p).context("model.preset")?,
            None => {
                let Some(first) = set.first() else { return Ok(None) };
                // A field alone (say `--set model.max_seq_len=4096` on a run whose model comes
                // from model.init or a checkpoint) would otherwise change nothing, silently.
                let (Some(n_layer), Some(d_model), Some(n_head), Some(d_ff)) = (m.n_layer, m.d_model, m.n_head, m.d_ff)
                else {
                    bail!(
                        "model.{first}: set without model.preset or the whole shape (model.n_layer, d_model, n_head, \
                         d_ff); a model loaded from model.init or a checkpoint keeps its own shape, so remove it"
                    )
                };
                LlamaConfig {
                    n_layer,
                    d_model,
                    n_head,
                    n_kv_head: m.n_kv_head.unwrap_or(n_head),
                    head_dim: None,
                    d_ff,
                    vocab_size: m.vocab_size.unwrap_or(32000),
                    max_seq_len: m.max_seq_len.unwrap_or(2048),
                    rope_theta: 10000.0,
                    norm_eps: 1e-5,
                    tie_embeddings: false,
                }
            }
        };
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = m.$f { c.$f = v; } )* };
        }
        over!(n_layer, d_model, n_head, n_kv_head, d_ff, vocab_size, max_seq_len, rope_theta, norm_eps, tie_embeddings);
        if m.head_dim.is_some() {
            c.head_dim = m.head_dim;
        }
        c.validate().context("model")?;
        Ok(Some(c))
    }
}
