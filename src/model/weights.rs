//! The parameter set of a Llama model in Hugging Face `LlamaForCausalLM` names and layout.
//!
//! `Weights<T>` is generic over what is stored per tensor, so the same structure holds parameters,
//! gradients and optimizer moments (device buffers), or host arrays while loading and saving.

use super::config::LlamaConfig;
use anyhow::Result;

#[derive(Clone, Debug)]
pub struct LayerWeights<T> {
    pub attn_norm: T,
    pub q_proj: T,
    pub k_proj: T,
    pub v_proj: T,
    pub o_proj: T,
    pub mlp_norm: T,
    pub gate_proj: T,
    pub up_proj: T,
    pub down_proj: T,
}

impl<T> LayerWeights<T> {
    /// The nine tensors of a block in canonical order (`tensor_specs`).
    pub fn from_parts(parts: Vec<T>) -> Self {
        let [attn_norm, q_proj, k_proj, v_proj, o_proj, mlp_norm, gate_proj, up_proj, down_proj] =
            <[T; 9]>::try_from(parts).unwrap_or_else(|p| panic!("a block has nine tensors, not {}", p.len()));
        LayerWeights { attn_norm, q_proj, k_proj, v_proj, o_proj, mlp_norm, gate_proj, up_proj, down_proj }
    }

    /// The nine tensors in canonical order.
    pub fn parts(&self) -> [&T; 9] {
        let l = self;
        [&l.attn_norm, &l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.mlp_norm, &l.gate_proj, &l.up_proj, &l.down_proj]
    }

    /// Each tensor passed through `f`, moved rather than copied.
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> LayerWeights<U> {
        let l = self;
        LayerWeights {
            attn_norm: f(l.attn_norm),
            q_proj: f(l.q_proj),
            k_proj: f(l.k_proj),
            v_proj: f(l.v_proj),
            o_proj: f(l.o_proj),
            mlp_norm: f(l.mlp_norm),
            gate_proj: f(l.gate_proj),
            up_proj: f(l.up_proj),
            down_proj: f(l.down_proj),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Weights<T> {
    pub embed: T,
    pub layers: Vec<LayerWeights<T>>,
    pub final_norm: T,
    /// `None` when the output head is tied to the embedding.
    pub lm_head: Option<T>,
}

/// Name and shape of one parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

const LAYER_TENSORS: [&str; 9] = [
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Every tensor of the model, in the canonical order `Weights::iter` also uses.
pub fn tensor_specs(cfg: &LlamaConfig) -> Vec<TensorSpec> {
    let (d, q, kv, ff, v) = (cfg.d_model, cfg.q_dim(), cfg.kv_dim(), cfg.d_ff, cfg.vocab_size);
    let spec = |name: String, shape: Vec<usize>| TensorSpec { name, shape };
    let mut specs = vec![spec("model.embed_tokens.weight".into(), vec![v, d])];
    for l in 0..cfg.n_layer {
        let shapes =
            [vec![d], vec![q, d], vec![kv, d], vec![kv, d], vec![d, q], vec![d], vec![ff, d], vec![ff, d], vec![d, ff]];
        for (name, shape) in LAYER_TENSORS.iter().zip(shapes) {
            specs.push(spec(format!("model.layers.{l}.{name}.weight"), shape));
        }
    }
    specs.push(spec("model.norm.weight".into(), vec![d]));
    if !cfg.tie_embeddings {
        specs.push(spec("lm_head.weight".into(), vec![v, d]));
    }
    specs
}

impl<T> Weights<T> {
    /// Builds every tensor in canonical order from its spec.
    pub fn try_build(cfg: &LlamaConfig, mut make: impl FnMut(&TensorSpec) -> Result<T>) -> Result<Self> {
        let specs = tensor_specs(cfg);
        let mut it = specs.iter();
        let mut next = || make(it.next().expect("tensor_specs covers every field"));
        let embed = next()?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            layers.push(LayerWeights {
                attn_norm: next()?,
                q_proj: next()?,
                k_proj: next()?,
                v_proj: next()?,
                o_proj: next()?,
                mlp_norm: next()?,
                gate_proj: next()?,
                up_proj: next()?,
                down_proj: next()?,
            });
        }
        let final_norm = next()?;
        let lm_head = if cfg.tie_embeddings { None } else { Some(next()?) };
        Ok(Weights { embed, layers, final_norm, lm_head })
    }

    /// Each tensor passed through `f` in canonical order, moved rather than copied (host `Vec`s
    /// to CPU buffers and back).
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> Weights<U> {
        let embed = f(self.embed);
        let layers = self.layers.into_iter().map(|l| l.map(&mut f)).collect();
        let final_norm = f(self.final_norm);
        let lm_head = self.lm_head.map(f);
        Weights { embed, layers, final_norm, lm_head }
    }

    /// All tensors in canonical order (matching `tensor_specs`).
    pub fn iter(&self) -> Vec<&T> {
        let mut v = vec![&self.embed];
        for l in &self.layers {
            v.extend([
                &l.attn_norm,
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.mlp_norm,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ]);
        }
        v.push(&self.final_norm);
        v.extend(self.lm_head.as_ref());
        v
    }

    pub fn iter_mut(&mut self) -> Vec<&mut T> {
        let mut v = vec![&mut self.embed];
        for l in &mut self.layers {
            v.extend([
                &mut l.attn_norm,
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.o_proj,
                &mut l.mlp_norm,
                &mut l.gate_proj,
                &mut l.up_proj,
                &mut l.down_proj,
            ]);
        }
        v.push(&mut self.final_norm);
        v.extend(self.lm_head.as_mut());
        v
    }

    /// The output projection: `lm_head`, or the embedding when tied.
    pub fn head(&self) -> &T {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
    pub fn head_mut(&mut self) -> &mut T {
        self.lm_head.as_mut().unwrap_or(&mut self.embed)
    }
}
