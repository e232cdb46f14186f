//! The model's units, and the one walk of a forward and a backward over them.
//!
//! A unit is what FSDP gathers and shards as one: the embedding, each block, and the head (the
//! final norm, then the output matrix unless it is tied to the embedding). `forward` and
//! `backward` below are the only places that spell out the order of the model's stages. Where a
//! unit's parameters come from and where its gradient goes is the source's business: resident
//! weights on one device (`Resident`), or units gathered from shards just in time (the FSDP rank,
//! `train/fsdp/rank.rs`). Both engines therefore run the same stages in the same order.

use super::llama::{Llama, Workspace};
use super::{LayerWeights, LlamaConfig, Weights};
use crate::backend::Backend;
use anyhow::Result;
use std::ops::Range;

/// Where a forward reads each unit's parameters from.
pub trait Params<B: Backend> {
    fn embed<T>(&mut self, f: impl FnOnce(&B::Buf) -> Result<T>) -> Result<T>;
    fn block<T>(&mut self, l: usize, f: impl FnOnce(&LayerWeights<B::Buf>) -> Result<T>) -> Result<T>;
    /// The final norm and the output matrix (tied: the embedding). A training forward's head is
    /// followed at once by its backward (`Grads::head_grad`), so a source that gathers units may
    /// keep them until then.
    fn head<T>(&mut self, f: impl FnOnce(&B::Buf, &B::Buf) -> Result<T>) -> Result<T>;
}

/// Where a backward reads parameters from and puts each unit's gradient.
pub trait Grads<B: Backend>: Params<B> {
    /// The head's parameters (final norm, output matrix) and their gradient buffers. Tied, the
    /// output matrix's gradient is the embedding's: `embed_grad` later adds to the same buffer.
    #[allow(clippy::type_complexity)]
    fn head_grad(&mut self, f: impl FnOnce(&B::Buf, &B::Buf, &mut B::Buf, &mut B::Buf) -> Result<()>) -> Result<()>;
    fn block_grad(
        &mut self,
        l: usize,
        f: impl FnOnce(&LayerWeights<B::Buf>, &mut LayerWeights<B::Buf>) -> Result<()>,
    ) -> Result<()>;
    /// The embedding's gradient buffer (its backward reads the ids, not the matrix).
    fn embed_grad(&mut self, f: impl FnOnce(&mut B::Buf) -> Result<()>) -> Result<()>;
}

/// Forward over `[ws.batch, ws.seq]` ids: embedding, blocks, head; then the loss per row. With
/// `grad_scale = Some(s)` the logits become `s · ∂loss/∂logits`, ready for `backward`.
pub fn forward<B: Backend>(
    model: &Llama<B>,
    ws: &mut Workspace<B>,
    p: &mut impl Params<B>,
    ids: &[u32],
    targets: &[i32],
    grad_scale: Option<f32>,
) -> Result<Vec<f32>> {
    model.forward_begin(ws, ids, targets)?;
    p.embed(|e| model.embed_forward(e, ws))?;
    for l in 0..model.cfg.n_layer {
        p.block(l, |w| model.layer_forward(l, w, ws))?;
    }
    p.head(|norm, head| model.head_forward(norm, head, ws, targets, grad_scale))
}

/// Backward of the last training `forward`: head, blocks in reverse, embedding. Each unit's
/// gradient is added into the buffer its source gives.
pub fn backward<B: Backend>(model: &Llama<B>, ws: &mut Workspace<B>, g: &mut impl Grads<B>) -> Result<()> {
    g.head_grad(|norm, head, g_norm, g_head| model.head_backward(norm, head, ws, g_norm, g_head))?;
    for l in (0..model.cfg.n_layer).rev() {
        g.block_grad(l, |w, gw| model.layer_backward(l, w, gw, ws))?;
    }
    g.embed_grad(|g_embed| model.embed_backward(g_embed, ws))
}

/// The units a source is asked for over one `forward` + `backward`, by index (embedding 0, block
/// `l` at `1 + l`, head `n_layer + 1`): the order an FSDP rank gathers them in. A tied head reads
/// the embedding's matrix, so the embedding comes again right after the head; the backward reads
/// the head kept from its forward and never the embedding.
pub fn read_order(cfg: &LlamaConfig) -> Vec<usize> {
    let (n, head) = (cfg.n_layer, cfg.n_layer + 1);
    let mut order = Vec::with_capacity(2 * n + 3);
    order.push(0);
    order.extend(1..=n);
    order.push(head);
    if cfg.tie_embeddings {
        order.push(0);
    }
    order.extend((1..=n).rev());
    order
}

/// Each unit's tensors, as ranges of the canonical tensor order (`Weights::iter`).
pub fn unit_ranges(cfg: &LlamaConfig) -> Vec<Range<usize>> {
    let total = 1 + 9 * cfg.n_layer + 1 + usize::from(!cfg.tie_embeddings);
    let mut r: Vec<Range<usize>> = Vec::with_capacity(cfg.n_layer + 2);
    r.push(0..1);
    r.extend((0..cfg.n_layer).map(|l| 1 + 9 * l..1 + 9 * (l + 1)));
    r.push(1 + 9 * cfg.n_layer..total);
    r
}

/// Weights resident on the device: what a forward-only pass reads.
pub struct Resident<'a, Buf>(pub &'a Weights<Buf>);

/// Resident weights and their gradients: one device's training step.
pub struct ResidentTraining<'a, Buf> {
    pub weights: &'a Weights<Buf>,
    pub grads: &'a mut Weights<Buf>,
}

impl<B: Backend> Params<B> for Resident<'_, B::Buf> {
    fn embed<T>(&mut self, f: impl FnOnce(&B::Buf) -> Result<T>) -> Result<T> {
        f(&self.0.embed)
    }
    fn block<T>(&mut self, l: usize, f: impl FnOnce(&LayerWeights<B::Buf>) -> Result<T>) -> Result<T> {
        f(&self.0.layers[l])
    }
    fn head<T>(&mut self, f: impl FnOnce(&B::Buf, &B::Buf) -> Result<T>) -> Result<T> {
        f(&self.0.final_norm, self.0.head())
    }
}

impl<B: Backend> Params<B> for ResidentTraining<'_, B::Buf> {
    fn embed<T>(&mut self, f: impl FnOnce(&B::Buf) -> Result<T>) -> Result<T> {
        Params::<B>::embed(&mut Resident(self.weights), f)
    }
    fn block<T>(&mut self, l: usize, f: impl FnOnce(&LayerWeights<B::Buf>) -> Result<T>) -> Result<T> {
        Params::<B>::block(&mut Resident(self.weights), l, f)
    }
    fn head<T>(&mut self, f: impl FnOnce(&B::Buf, &B::Buf) -> Result<T>) -> Result<T> {
        Params::<B>::head(&mut Resident(self.weights), f)
    }
}

impl<B: Backend> Grads<B> for ResidentTraining<'_, B::Buf> {
    fn head_grad(&mut self, f: impl FnOnce(&B::Buf, &B::Buf, &mut B::Buf, &mut B::Buf) -> Result<()>) -> Result<()> {
        let (w, g) = (self.weights, &mut *self.grads);
        // `head_mut` is the embedding's gradient when tied: both uses add into it.
        f(&w.final_norm, w.head(), &mut g.final_norm, g.lm_head.as_mut().unwrap_or(&mut g.embed))
    }
    fn block_grad(
        &mut self,
        l: usize,
        f: impl FnOnce(&LayerWeights<B::Buf>, &mut LayerWeights<B::Buf>) -> Result<()>,
    ) -> Result<()> {
        f(&self.weights.layers[l], &mut self.grads.layers[l])
    }
    fn embed_grad(&mut self, f: impl FnOnce(&mut B::Buf) -> Result<()>) -> Result<()> {
        f(&mut self.grads.embed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{Cpu, CpuBuf};
    use crate::model::init::random_weights;

    /// A source that records which unit each call reads, over resident weights. Resident weights
    /// are never gathered, so it notes the tied head's second read of the embedding itself, as the
    /// gathering source does; that source's results are checked against one device in
    /// tests/fsdp.rs. What this test pins is the walk's own order against `read_order`.
    struct Recording<'a> {
        inner: ResidentTraining<'a, CpuBuf>,
        n_layer: usize,
        tied: bool,
        reads: Vec<usize>,
    }

    impl Params<Cpu> for Recording<'_> {
        fn embed<T>(&mut self, f: impl FnOnce(&CpuBuf) -> Result<T>) -> Result<T> {
            self.reads.push(0);
            Params::<Cpu>::embed(&mut self.inner, f)
        }
        fn block<T>(&mut self, l: usize, f: impl FnOnce(&LayerWeights<CpuBuf>) -> Result<T>) -> Result<T> {
            self.reads.push(1 + l);
            Params::<Cpu>::block(&mut self.inner, l, f)
        }
        fn head<T>(&mut self, f: impl FnOnce(&CpuBuf, &CpuBuf) -> Result<T>) -> Result<T> {
            self.reads.push(self.n_layer + 1);
            if self.tied {
                self.reads.push(0);
            }
            Params::<Cpu>::head(&mut self.inner, f)
        }
    }

    impl Grads<Cpu> for Recording<'_> {
        fn head_grad(
            &mut self,
            f: impl FnOnce(&CpuBuf, &CpuBuf, &mut CpuBuf, &mut CpuBuf) -> Result<()>,
        ) -> Result<()> {
            Grads::<Cpu>::head_grad(&mut self.inner, f)
        }
        fn block_grad(
            &mut self,
            l: usize,
            f: impl FnOnce(&LayerWeights<CpuBuf>, &mut LayerWeights<CpuBuf>) -> Result<()>,
        ) -> Result<()> {
            self.reads.push(1 + l);
            Grads::<Cpu>::block_grad(&mut self.inner, l, f)
        }
        fn embed_grad(&mut self, f: impl FnOnce(&mut CpuBuf) -> Result<()>) -> Result<()> {
            Grads::<Cpu>::embed_grad(&mut self.inner, f)
        }
    }

    #[test]
    fn the_walk_reads_units_in_the_order_fsdp_gathers_them() {
        for tied in [false, true] {
            let cfg = LlamaConfig {
                vocab_size: 64,
                d_model: 16,
                n_layer: 3,
                n_head: 2,
                n_kv_head: 1,
                d_ff: 24,
                max_seq_len: 8,
                tie_embeddings: tied,
                ..LlamaConfig::preset("tiny").unwrap()
            };
            let model = Llama::from_host(cfg.clone(), Cpu::new(), &random_weights(&cfg, 1).unwrap()).unwrap();
            let mut ws = Workspace::new(&model, 1, 4).unwrap();
            let mut grads = model.zeros_like_weights().unwrap();
            let inner = ResidentTraining { weights: &model.weights, grads: &mut grads };
            let mut src = Recording { inner, n_layer: cfg.n_layer, tied, reads: Vec::new() };
            forward(&model, &mut ws, &mut src, &[1, 2, 3, 4], &[2, 3, 4, -1], Some(0.25)).unwrap();
            backward(&model, &mut ws, &mut src).unwrap();
            assert_eq!(src.reads, read_order(&cfg), "tied: {tied}");
        }
    }
}
