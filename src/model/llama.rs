//! Forward and backward of the whole network, with every activation in a preallocated buffer.
//!
//! One training step on a `[batch, seq]` block of token ids:
//! embedding → per block { RMSNorm → Q,K,V projections → RoPE(Q,K) → causal GQA attention →
//! O projection + residual → RMSNorm → gate/up projections → SwiGLU → down projection + residual }
//! → final RMSNorm → head → cross-entropy (its gradient written over the logits) and back again in
//! reverse order, accumulating parameter gradients.

use super::config::LlamaConfig;
use super::rope;
use super::units::{self, Resident, ResidentTraining};
use super::weights::{LayerWeights, Weights};
use crate::backend::{AttnShape, Backend, Gemm, Role, RopeShape};
use anyhow::{bail, Result};

pub struct Llama<B: Backend> {
    pub cfg: LlamaConfig,
    pub backend: B,
    pub weights: Weights<B::Buf>,
    pub(crate) rope_cos: B::Buf,
    pub(crate) rope_sin: B::Buf,
}

/// Activations of one transformer block, kept from the forward for the backward.
pub struct BlockActs<Buf> {
    pub ln1: Buf,
    pub rstd1: Buf,
    pub q: Buf,
    pub k: Buf,
    pub v: Buf,
    pub att: Buf,
    pub lse: Buf,
    /// Residual stream after the attention sub-layer (the MLP norm's input).
    pub x_mid: Buf,
    pub ln2: Buf,
    pub rstd2: Buf,
    pub gate: Buf,
    pub up: Buf,
    pub act: Buf,
}

/// Scratch gradients of one block, reused by every layer during the backward.
pub struct BlockGrads<Buf> {
    pub d_ln: Buf,
    pub d_att: Buf,
    pub dq: Buf,
    pub dk: Buf,
    pub dv: Buf,
    pub d_act: Buf,
    pub d_gate: Buf,
    pub d_up: Buf,
}

/// Which activations a workspace keeps between the forward and the backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Every block's activations (the fastest backward).
    All,
    /// Only each block's input; the backward recomputes one block's activations at a time, a
    /// third more compute for a fraction of the memory (activation checkpointing per block).
    BlockInputs,
    /// Nothing: a forward-only pass; `backward` refuses it.
    Nothing,
}

/// Every buffer one forward + backward over `[batch, seq]` tokens needs, allocated once.
pub struct Workspace<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    pub keep: Keep,
    /// `resid[l]` is the residual stream entering block `l`; `resid[n_layer]` leaves the last one.
    pub resid: Vec<B::Buf>,
    pub blocks: Vec<BlockActs<B::Buf>>,
    pub lnf: B::Buf,
    pub rstdf: B::Buf,
    /// `[rows, vocab]` logits; after a training forward, their gradient.
    pub logits: B::Buf,
    pub d_resid: B::Buf,
    pub grads: BlockGrads<B::Buf>,
    ids: Vec<u32>,
}

impl<Buf> BlockActs<Buf> {
    fn new<B: Backend<Buf = Buf>>(b: &B, cfg: &LlamaConfig, rows: usize, batch: usize, seq: usize) -> Result<Self> {
        let (d, q, kv, ff) = (cfg.d_model, cfg.q_dim(), cfg.kv_dim(), cfg.d_ff);
        Ok(BlockActs {
            ln1: b.zeros(rows * d)?,
            rstd1: b.zeros_as(rows, Role::Stats)?,
            q: b.zeros(rows * q)?,
            k: b.zeros(rows * kv)?,
            v: b.zeros(rows * kv)?,
            att: b.zeros(rows * q)?,
            lse: b.zeros_as(batch * cfg.n_head * seq, Role::Stats)?,
            x_mid: b.zeros(rows * d)?,
            ln2: b.zeros(rows * d)?,
            rstd2: b.zeros_as(rows, Role::Stats)?,
            gate: b.zeros(rows * ff)?,
            up: b.zeros(rows * ff)?,
            act: b.zeros(rows * ff)?,
        })
    }
}

impl<B: Backend> Workspace<B> {
    /// Buffers for a training (or full-sequence scoring) pass over `[batch, seq]` tokens.
    pub fn new(model: &Llama<B>, batch: usize, seq: usize) -> Result<Self> {
        Self::keeping(model, batch, seq, Keep::All)
    }

    /// Buffers for training with per-block activation recomputation (see [`Keep::BlockInputs`]).
    pub fn recomputing(model: &Llama<B>, batch: usize, seq: usize) -> Result<Self> {
        Self::keeping(model, batch, seq, Keep::BlockInputs)
    }

    /// Buffers for a forward-only pass (scoring): one block of scratch activations reused by
    /// every layer, so memory does not grow with depth. `backward` refuses this workspace.
    pub fn for_inference(model: &Llama<B>, batch: usize, seq: usize) -> Result<Self> {
        Self::keeping(model, batch, seq, Keep::Nothing)
    }

    /// Training keeps every block's input (`resid`) and, with [`Keep::All`], every block's
    /// activations; inference keeps two residual buffers and one block's scratch, since each
    /// block's activations are dead once the next block has run.
    pub fn keeping(model: &Llama<B>, batch: usize, seq: usize, keep: Keep) -> Result<Self> {
        let (b, cfg) = (&model.backend, &model.cfg);
        let rows = batch * seq;
        let (d, q, kv, ff) = (cfg.d_model, cfg.q_dim(), cfg.kv_dim(), cfg.d_ff);
        let (n_resid, n_blocks) = match keep {
            Keep::All => (cfg.n_layer + 1, cfg.n_layer),
            Keep::BlockInputs => (cfg.n_layer + 1, 1),
            Keep::Nothing => (2.min(cfg.n_layer + 1), 1),
        };
        let resid = (0..n_resid).map(|_| b.zeros(rows * d)).collect::<Result<Vec<_>>>()?;
        let blocks = (0..n_blocks).map(|_| BlockActs::new(b, cfg, rows, batch, seq)).collect::<Result<_>>()?;
        let grads = BlockGrads {
            d_ln: b.zeros(rows * d)?,
            d_att: b.zeros(rows * q)?,
            dq: b.zeros(rows * q)?,
            dk: b.zeros(rows * kv)?,
            dv: b.zeros(rows * kv)?,
            d_act: b.zeros(rows * ff)?,
            d_gate: b.zeros(rows * ff)?,
            d_up: b.zeros(rows * ff)?,
        };
        Ok(Workspace {
            batch,
            seq,
            keep,
            resid,
            blocks,
            lnf: b.zeros(rows * d)?,
            rstdf: b.zeros_as(rows, Role::Stats)?,
            logits: b.zeros(rows * cfg.vocab_size)?,
            d_resid: b.zeros(rows * d)?,
            grads,
            ids: Vec::new(),
        })
    }

    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

/// Where a block's keys and values live during attention.
pub(crate) enum KvPlace<'a, Buf> {
    /// In the block's own activations (training, full-sequence scoring).
    Local,
    /// Appended to a per-layer cache at `pos0`: sequence `s` of the batch at rows
    /// `s · capacity + pos0 ..` (KV-cache decoding; several continuations of one context).
    Cache { k: &'a mut Buf, v: &'a mut Buf, pos0: usize, capacity: usize },
}

impl<B: Backend> Llama<B> {
    /// Builds a model from parameter buffers; precomputes the RoPE tables.
    pub fn new(cfg: LlamaConfig, backend: B, weights: Weights<B::Buf>) -> Result<Self> {
        cfg.validate()?;
        let (cos, sin) = rope::tables(cfg.head_dim(), cfg.max_seq_len, cfg.rope_theta);
        let rope_cos = backend.upload_as(&cos, Role::Stats)?;
        let rope_sin = backend.upload_as(&sin, Role::Stats)?;
        Ok(Llama { cfg, backend, weights, rope_cos, rope_sin })
    }

    /// Builds a model from host (f32) tensors in canonical order, uploading them to the backend.
    pub fn from_host(cfg: LlamaConfig, backend: B, host: &Weights<Vec<f32>>) -> Result<Self> {
        let mut tensors = host.iter().into_iter();
        let weights = Weights::try_build(&cfg, |spec| {
            let t = tensors.next().expect("same config, same tensor count");
            if t.len() != spec.numel() {
                bail!("tensor {} has {} values, expected {}", spec.name, t.len(), spec.numel());
            }
            backend.upload_as(t, Role::Param)
        })?;
        Self::new(cfg, backend, weights)
    }

    /// Allocates a zeroed buffer for every parameter (gradients, optimizer moments).
    pub fn zeros_like_weights(&self) -> Result<Weights<B::Buf>> {
        Weights::try_build(&self.cfg, |s| self.backend.zeros_as(s.numel(), Role::Accum))
    }

    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            bail!("token id {bad} is outside the model's vocabulary of {}", self.cfg.vocab_size);
        }
        Ok(())
    }

    /// One transformer block: `x_out = x_in + Attn(norm(x_in))`, then `+ MLP(norm(·))`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_forward(
        &self,
        w: &LayerWeights<B::Buf>,
        a: &mut BlockActs<B::Buf>,
        x_in: &B::Buf,
        x_out: &mut B::Buf,
        batch: usize,
        seq: usize,
        kv: KvPlace<'_, B::Buf>,
    ) -> Result<()> {
        let (b, cfg) = (&self.backend, &self.cfg);
        let rows = batch * seq;
        let (d, qd, kvd, ff, hd) = (cfg.d_model, cfg.q_dim(), cfg.kv_dim(), cfg.d_ff, cfg.head_dim());
        let eps = cfg.norm_eps as f32;

        b.rmsnorm_forward(&mut a.ln1, &mut a.rstd1, x_in, &w.attn_norm, rows, d, eps)?;
        b.matmul(&mut a.q, &a.ln1, &w.q_proj, Gemm::linear(rows, d, qd))?;
        b.matmul(&mut a.k, &a.ln1, &w.k_proj, Gemm::linear(rows, d, kvd))?;
        b.matmul(&mut a.v, &a.ln1, &w.v_proj, Gemm::linear(rows, d, kvd))?;
        let pos0 = match &kv {
            KvPlace::Local => 0,
            KvPlace::Cache { pos0, .. } => *pos0,
        };
        let rope_q = RopeShape { rows, seq, pos0, n_head: cfg.n_head, head_dim: hd };
        b.rope(&mut a.q, &self.rope_cos, &self.rope_sin, rope_q, false)?;
        b.rope(&mut a.k, &self.rope_cos, &self.rope_sin, RopeShape { n_head: cfg.n_kv_head, ..rope_q }, false)?;
        let shape = AttnShape {
            batch,
            q_len: seq,
            kv_len: seq,
            kv_stride: seq,
            q_pos0: 0,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: hd,
        };
        match kv {
            KvPlace::Local => b.attention_forward(&mut a.att, &mut a.lse, &a.q, &a.k, &a.v, shape)?,
            KvPlace::Cache { k, v, pos0, capacity } => {
                for s in 0..batch {
                    b.copy(k, (s * capacity + pos0) * kvd, &a.k, s * seq * kvd, seq * kvd)?;
                    b.copy(v, (s * capacity + pos0) * kvd, &a.v, s * seq * kvd, seq * kvd)?;
                }
                let shape = AttnShape { kv_len: pos0 + seq, kv_stride: capacity, q_pos0: pos0, ..shape };
                b.attention_forward(&mut a.att, &mut a.lse, &a.q, k, v, shape)?;
            }
        }
        b.matmul_residual(&mut a.x_mid, x_in, &a.att, &w.o_proj, Gemm::linear(rows, qd, d))?;

        b.rmsnorm_forward(&mut a.ln2, &mut a.rstd2, &a.x_mid, &w.mlp_norm, rows, d, eps)?;
        b.matmul(&mut a.gate, &a.ln2, &w.gate_proj, Gemm::linear(rows, d, ff))?;
        b.matmul(&mut a.up, &a.ln2, &w.up_proj, Gemm::linear(rows, d, ff))?;
        b.swiglu_forward(&mut a.act, &a.gate, &a.up, rows * ff)?;
        b.matmul_residual(x_out, &a.x_mid, &a.act, &w.down_proj, Gemm::linear(rows, ff, d))?;
        Ok(())
    }

    /// Forward over `[ws.batch, ws.seq]` ids, keeping every activation, then the loss.
    ///
    /// `targets[r]` is the next token of row `r` (`-1` ignores the row). With `grad_scale = Some(s)`
    /// the logits are replaced by `s · ∂loss/∂logits`, ready for `backward`; `s` is typically
    /// `1 / (tokens in the global batch)` so the loss is a mean over the whole batch.
    /// Returns the per-row losses (`-ln p(target)`).
    pub fn forward(
        &self,
        ws: &mut Workspace<B>,
        ids: &[u32],
        targets: &[i32],
        grad_scale: Option<f32>,
    ) -> Result<Vec<f32>> {
        units::forward(self, ws, &mut Resident(&self.weights), ids, targets, grad_scale)
    }

    /// Backward of the last `forward` (which must have been called with `grad_scale`): adds the
    /// parameter gradients into `grads`.
    pub fn backward(&self, ws: &mut Workspace<B>, grads: &mut Weights<B::Buf>) -> Result<()> {
        units::backward(self, ws, &mut ResidentTraining { weights: &self.weights, grads })
    }

    // ---- Stages, one per unit and direction. `units::forward` / `units::backward` walk them, over
    // resident weights here and over units gathered just in time on an FSDP rank.

    /// Validates a batch and remembers its ids for the embedding backward.
    pub fn forward_begin(&self, ws: &mut Workspace<B>, ids: &[u32], targets: &[i32]) -> Result<()> {
        let cfg = &self.cfg;
        let rows = ws.rows();
        if ids.len() != rows || targets.len() != rows {
            bail!("forward: expected {rows} ids and targets, got {} and {}", ids.len(), targets.len());
        }
        if ws.seq > cfg.max_seq_len {
            bail!("sequence of {} tokens exceeds the model's max_seq_len {}", ws.seq, cfg.max_seq_len);
        }
        self.check_ids(ids)?;
        if let Some(&bad) = targets.iter().find(|&&t| t >= cfg.vocab_size as i32) {
            bail!("target id {bad} is outside the model's vocabulary of {}", cfg.vocab_size);
        }
        ws.ids.clear();
        ws.ids.extend_from_slice(ids);
        Ok(())
    }

    pub fn embed_forward(&self, embed: &B::Buf, ws: &mut Workspace<B>) -> Result<()> {
        self.backend.embedding_forward(&mut ws.resid[0], embed, &ws.ids, self.cfg.d_model)
    }

    pub fn layer_forward(&self, l: usize, w: &LayerWeights<B::Buf>, ws: &mut Workspace<B>) -> Result<()> {
        if ws.keep != Keep::Nothing {
            let b = if ws.keep == Keep::All { l } else { 0 };
            let (head, tail) = ws.resid.split_at_mut(l + 1);
            self.block_forward(w, &mut ws.blocks[b], &head[l], &mut tail[0], ws.batch, ws.seq, KvPlace::Local)
        } else {
            // Inference workspace: one scratch block, residual ping-pong (see `decode`).
            let (r0, r1) = ws.resid.split_at_mut(1);
            let (x_in, x_out) = if l.is_multiple_of(2) { (&r0[0], &mut r1[0]) } else { (&r1[0], &mut r0[0]) };
            self.block_forward(w, &mut ws.blocks[0], x_in, x_out, ws.batch, ws.seq, KvPlace::Local)
        }
    }

    /// Index of the residual buffer that leaves the last block.
    fn last_resid(&self, ws: &Workspace<B>) -> usize {
        if ws.keep != Keep::Nothing {
            self.cfg.n_layer
        } else {
            self.cfg.n_layer % 2
        }
    }

    pub fn head_forward(
        &self,
        final_norm: &B::Buf,
        head: &B::Buf,
        ws: &mut Workspace<B>,
        targets: &[i32],
        grad_scale: Option<f32>,
    ) -> Result<Vec<f32>> {
        let (b, cfg) = (&self.backend, &self.cfg);
        let (rows, d) = (ws.rows(), cfg.d_model);
        let last = &ws.resid[self.last_resid(ws)];
        b.rmsnorm_forward(&mut ws.lnf, &mut ws.rstdf, last, final_norm, rows, d, cfg.norm_eps as f32)?;
        b.matmul(&mut ws.logits, &ws.lnf, head, Gemm::linear(rows, d, cfg.vocab_size))?;
        b.cross_entropy(&mut ws.logits, targets, cfg.vocab_size, grad_scale)
    }

    /// Head and final norm; `ws.logits` holds ∂loss/∂logits. Starts the residual gradient.
    pub fn head_backward(
        &self,
        final_norm: &B::Buf,
        head: &B::Buf,
        ws: &mut Workspace<B>,
        g_final_norm: &mut B::Buf,
        g_head: &mut B::Buf,
    ) -> Result<()> {
        let (b, cfg) = (&self.backend, &self.cfg);
        let (rows, d, v) = (ws.rows(), cfg.d_model, cfg.vocab_size);
        if ws.keep == Keep::Nothing {
            bail!("backward needs a training workspace (Workspace::new), not an inference one");
        }
        let g = &mut ws.grads;
        b.matmul(g_head, &ws.logits, &ws.lnf, Gemm::linear_dw(rows, d, v))?;
        b.matmul(&mut g.d_ln, &ws.logits, head, Gemm::linear_dx(rows, d, v))?;
        b.fill_zero(&mut ws.d_resid)?;
        let last = &ws.resid[cfg.n_layer];
        b.rmsnorm_backward(&mut ws.d_resid, g_final_norm, &g.d_ln, last, final_norm, &ws.rstdf, rows, d)
    }

    /// Block `l`'s backward: parameter gradients into `gw`, the residual gradient carried on.
    pub fn layer_backward(
        &self,
        l: usize,
        w: &LayerWeights<B::Buf>,
        gw: &mut LayerWeights<B::Buf>,
        ws: &mut Workspace<B>,
    ) -> Result<()> {
        let (b, cfg) = (&self.backend, &self.cfg);
        let rows = ws.rows();
        let (d, qd, kvd, ff) = (cfg.d_model, cfg.q_dim(), cfg.kv_dim(), cfg.d_ff);
        let slot = match ws.keep {
            Keep::All => l,
            Keep::BlockInputs => {
                // Recompute this block's activations from its kept input. The output lands on
                // resid[l + 1] again, bit for bit what the forward wrote; no later layer needs it.
                let (head, tail) = ws.resid.split_at_mut(l + 1);
                self.block_forward(w, &mut ws.blocks[0], &head[l], &mut tail[0], ws.batch, ws.seq, KvPlace::Local)?;
                0
            }
            Keep::Nothing => bail!("backward needs a training workspace (Workspace::new), not an inference one"),
        };
        let (a, g, dx) = (&ws.blocks[slot], &mut ws.grads, &mut ws.d_resid);
        // MLP sub-layer: x_out = x_mid + down(silu(gate(n)) * up(n)), n = norm(x_mid).
        b.matmul(&mut g.d_act, dx, &w.down_proj, Gemm::linear_dx(rows, ff, d))?;
        b.matmul(&mut gw.down_proj, dx, &a.act, Gemm::linear_dw(rows, ff, d))?;
        b.swiglu_backward(&mut g.d_gate, &mut g.d_up, &g.d_act, &a.gate, &a.up, rows * ff)?;
        b.matmul(&mut g.d_ln, &g.d_gate, &w.gate_proj, Gemm::linear_dx(rows, d, ff))?;
        b.matmul(&mut g.d_ln, &g.d_up, &w.up_proj, Gemm::linear_dx(rows, d, ff).accumulating())?;
        b.matmul(&mut gw.gate_proj, &g.d_gate, &a.ln2, Gemm::linear_dw(rows, d, ff))?;
        b.matmul(&mut gw.up_proj, &g.d_up, &a.ln2, Gemm::linear_dw(rows, d, ff))?;
        b.rmsnorm_backward(dx, &mut gw.mlp_norm, &g.d_ln, &a.x_mid, &w.mlp_norm, &a.rstd2, rows, d)?;

        // Attention sub-layer: x_mid = x_in + o(attn(rope(q(n)), rope(k(n)), v(n))), n = norm(x_in).
        b.matmul(&mut g.d_att, dx, &w.o_proj, Gemm::linear_dx(rows, qd, d))?;
        b.matmul(&mut gw.o_proj, dx, &a.att, Gemm::linear_dw(rows, qd, d))?;
        let shape = AttnShape {
            batch: ws.batch,
            q_len: ws.seq,
            kv_len: ws.seq,
            kv_stride: ws.seq,
            q_pos0: 0,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim(),
        };
        // dQ and dK come back through the inverse rotation, as gradients of the unrotated q and k.
        let (cos, sin) = (&self.rope_cos, &self.rope_sin);
        b.rotary_attention_backward(
            &mut g.dq, &mut g.dk, &mut g.dv, &g.d_att, &a.att, &a.lse, &a.q, &a.k, &a.v, shape, cos, sin,
        )?;
        b.matmul(&mut g.d_ln, &g.dq, &w.q_proj, Gemm::linear_dx(rows, d, qd))?;
        b.matmul(&mut g.d_ln, &g.dk, &w.k_proj, Gemm::linear_dx(rows, d, kvd).accumulating())?;
        b.matmul(&mut g.d_ln, &g.dv, &w.v_proj, Gemm::linear_dx(rows, d, kvd).accumulating())?;
        b.matmul(&mut gw.q_proj, &g.dq, &a.ln1, Gemm::linear_dw(rows, d, qd))?;
        b.matmul(&mut gw.k_proj, &g.dk, &a.ln1, Gemm::linear_dw(rows, d, kvd))?;
        b.matmul(&mut gw.v_proj, &g.dv, &a.ln1, Gemm::linear_dw(rows, d, kvd))?;
        b.rmsnorm_backward(dx, &mut gw.attn_norm, &g.d_ln, &ws.resid[l], &w.attn_norm, &a.rstd1, rows, d)
    }

    pub fn embed_backward(&self, g_embed: &mut B::Buf, ws: &mut Workspace<B>) -> Result<()> {
        self.backend.embedding_backward(g_embed, &ws.d_resid, &ws.ids, self.cfg.d_model)
    }
}
