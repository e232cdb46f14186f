//! The Llama architecture's hyper-parameters, kiln's presets, and their validation.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Shape of a Llama-family decoder (RoPE, RMSNorm pre-norm, SwiGLU, grouped-query attention).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub d_model: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    /// Width of one attention head; `d_model / n_head` unless a checkpoint says otherwise.
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub d_ff: usize,
    pub vocab_size: usize,
    pub max_seq_len: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub tie_embeddings: bool,
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_head.max(1))
    }
    /// The same model: every field equal, with head_dim compared as the width it resolves to (a
    /// checkpoint's config.json states it; a config's fields usually leave it implied).
    pub fn same_model(&self, other: &LlamaConfig) -> bool {
        let resolved = |c: &LlamaConfig| LlamaConfig { head_dim: Some(c.head_dim()), ..c.clone() };
        resolved(self) == resolved(other)
    }
    /// Width of the concatenated query heads (`n_head · head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim()
    }
    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim()
    }

    /// Checks the invariants the model code relies on; the message names the offending field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("n_layer", self.n_layer),
            ("d_model", self.d_model),
            ("n_head", self.n_head),
            ("n_kv_head", self.n_kv_head),
            ("d_ff", self.d_ff),
            ("vocab_size", self.vocab_size),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("{name} must be positive");
            }
        }
        // Far beyond any Llama-family model; past these, sizes overflow or ask for terabytes.
        let limits = [
            ("n_layer", self.n_layer, 4096),
            ("d_model", self.d_model, 1 << 17),
            ("n_head", self.n_head, 1 << 12),
            ("d_ff", self.d_ff, 1 << 19),
            ("vocab_size", self.vocab_size, 1 << 24),
            ("max_seq_len", self.max_seq_len, 1 << 24),
            ("head_dim", self.head_dim(), 1 << 12),
        ];
        for (name, v, max) in limits {
            if v > max {
                bail!("{name} {v} is beyond what kiln supports ({max})");
            }
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            bail!("n_head ({}) must be a multiple of n_kv_head ({})", self.n_head, self.n_kv_head);
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            bail!("head_dim ({hd}) must be even and positive (RoPE rotates pairs)");
        }
        if self.head_dim.is_none() && !self.d_model.is_multiple_of(self.n_head) {
            bail!("d_model ({}) must be divisible by n_head ({}) unless head_dim is given", self.d_model, self.n_head);
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!("rope_theta must be a positive number");
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            bail!("norm_eps must be a positive number");
        }
        Ok(())
    }

    /// Number of parameters, embeddings included (the head counted once when tied).
    pub fn n_params(&self) -> usize {
        let (d, q, kv, ff) = (self.d_model, self.q_dim(), self.kv_dim(), self.d_ff);
        let layer = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * ff;
        let head = if self.tie_embeddings { 0 } else { self.vocab_size * d };
        self.vocab_size * d + self.n_layer * layer + d + head
    }

    /// Training FLOPs per token as the TinyLlama paper counts them:
    /// `6 · (N − embedding) + 12 · L · H · Q · T` for sequence length `seq`.
    pub fn train_flops_per_token(&self, seq: usize) -> f64 {
        let non_embedding = (self.n_params() - self.vocab_size * self.d_model) as f64;
        6.0 * non_embedding + 12.0 * (self.n_layer * self.n_head * self.head_dim() * seq) as f64
    }

    /// A built-in preset by name (the TOML files in `configs/`, compiled into the binary).
    pub fn preset(name: &str) -> Result<LlamaConfig> {
        let text = PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .with_context(|| format!("unknown model preset {name:?} (known: {})", preset_names().join(", ")))?;
        let cfg: LlamaConfig =
            toml::from_str(text).with_context(|| format!("configs/{name}.toml: malformed preset"))?;
        cfg.validate().with_context(|| format!("configs/{name}.toml"))?;
        Ok(cfg)
    }
}

const PRESETS: &[(&str, &str)] = &[
    ("tinyllama-1.1b", include_str!("../../configs/tinyllama-1.1b.toml")),
    ("tiny", include_str!("../../configs/tiny.toml")),
    ("small", include_str!("../../configs/small.toml")),
];

pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|(n, _)| *n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tinyllama_preset_has_the_published_shape() {
        let c = LlamaConfig::preset("tinyllama-1.1b").unwrap();
        assert_eq!((c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.vocab_size), (22, 2048, 32, 4, 5632, 32000));
        assert_eq!(c.head_dim(), 64);
        assert_eq!(c.n_params(), 1_100_048_384); // TinyLlama-1.1B's parameter count
                                                 // The paper's 7.31 GFLOP/token at sequence length 2048.
        assert!((c.train_flops_per_token(2048) / 1e9 - 7.31).abs() < 0.05);
    }

    #[test]
    fn every_preset_validates_and_unknown_names_are_listed() {
        for name in preset_names() {
            LlamaConfig::preset(name).unwrap();
        }
        let e = LlamaConfig::preset("nope").unwrap_err().to_string();
        assert!(e.contains("tinyllama-1.1b"), "{e}");
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = LlamaConfig::preset("tiny").unwrap();
        c.n_kv_head = 3;
        assert!(c.validate().unwrap_err().to_string().contains("n_kv_head"));
    }
}
