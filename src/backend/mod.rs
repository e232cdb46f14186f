//! The compute backend: device buffers plus every op the Llama model needs, each with its backward.
//!
//! The model (`crate::model`) is written once against this trait. The CPU backend (`cpu/`) is the
//! exact f32 reference; a CUDA backend is a sibling implementation of the same trait, so neither the
//! forward nor the backward pass of the model is ever forked per device.
//!
//! Conventions shared by every implementation:
//! - Buffers hold floats in the backend's compute precision; `upload`/`download` speak f32.
//! - Matrices are row-major. Linear weights are `[out, in]` (Hugging Face layout), so a projection is
//!   `y = x · Wᵀ`.
//! - Backward ops that produce parameter gradients *accumulate* into them (gradient accumulation);
//!   ops that produce activation gradients overwrite unless documented otherwise.

pub mod cpu;
pub mod cuda;
pub mod profile;

use anyhow::Result;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `out[m,n] (+)= op(a)[m,k] · op(b)[k,n]`, where `op` optionally transposes the stored matrix.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `a` is stored as `[k, m]` instead of `[m, k]`.
    pub trans_a: bool,
    /// `b` is stored as `[n, k]` instead of `[k, n]` (the usual case for `x · Wᵀ`).
    pub trans_b: bool,
    /// Add to `out` instead of overwriting it.
    pub accumulate: bool,
}

impl Gemm {
    /// `y[rows, out] = x[rows, in] · W[out, in]ᵀ`: a linear layer's forward.
    pub fn linear(rows: usize, d_in: usize, d_out: usize) -> Self {
        Gemm { m: rows, n: d_out, k: d_in, trans_a: false, trans_b: true, accumulate: false }
    }
    /// `dx[rows, in] = dy[rows, out] · W[out, in]`: a linear layer's input gradient.
    pub fn linear_dx(rows: usize, d_in: usize, d_out: usize) -> Self {
        Gemm { m: rows, n: d_in, k: d_out, trans_a: false, trans_b: false, accumulate: false }
    }
    /// `dW[out, in] += dy[rows, out]ᵀ · x[rows, in]`: a linear layer's weight gradient.
    pub fn linear_dw(rows: usize, d_in: usize, d_out: usize) -> Self {
        Gemm { m: d_out, n: d_in, k: rows, trans_a: true, trans_b: false, accumulate: true }
    }
    pub fn accumulating(mut self) -> Self {
        self.accumulate = true;
        self
    }
}

/// Shape of one causal grouped-query attention call.
///
/// `q`/`out`: `[batch, q_len, n_head, head_dim]`; `k`/`v`: `[batch, kv_stride, n_kv_head, head_dim]`
/// of which the first `kv_len` positions are valid; `lse`: `[batch, n_head, q_len]`.
/// Query `i` sits at absolute position `q_pos0 + i` and attends to keys `0..=q_pos0 + i`.
/// Training uses `q_pos0 = 0, q_len = kv_len = kv_stride`; KV-cache decoding uses a short `q_len`
/// against a longer cache.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub kv_stride: usize,
    pub q_pos0: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl AttnShape {
    pub fn q_elems(&self) -> usize {
        self.batch * self.q_len * self.n_head * self.head_dim
    }
    pub fn kv_elems(&self) -> usize {
        self.batch * self.kv_stride * self.n_kv_head * self.head_dim
    }
    pub fn lse_elems(&self) -> usize {
        self.batch * self.n_head * self.q_len
    }
    /// Where q's rows sit for `rope`: row `b · q_len + t` at position `q_pos0 + t`.
    pub fn q_rope(&self) -> RopeShape {
        RopeShape {
            rows: self.batch * self.q_len,
            seq: self.q_len,
            pos0: self.q_pos0,
            n_head: self.n_head,
            head_dim: self.head_dim,
        }
    }
    /// Where k's rows sit for `rope`: row `b · kv_stride + t` at position `t`.
    pub fn kv_rope(&self) -> RopeShape {
        RopeShape {
            rows: self.batch * self.kv_stride,
            seq: self.kv_stride,
            pos0: 0,
            n_head: self.n_kv_head,
            head_dim: self.head_dim,
        }
    }
}

/// Rotary embedding layout: `x` is `[batch * seq, n_head, head_dim]`, row `r` sits at position
/// `pos0 + r % seq`. `cos`/`sin` tables are `[max_pos, head_dim / 2]` (see `model::rope`).
#[derive(Clone, Copy, Debug)]
pub struct RopeShape {
    pub rows: usize,
    pub seq: usize,
    pub pos0: usize,
    pub n_head: usize,
    pub head_dim: usize,
}

impl RopeShape {
    /// Values of `x` the rotation reads and writes.
    pub fn values(&self) -> usize {
        self.rows * self.n_head * self.head_dim
    }
    /// Entries each of `cos` and `sin` must have: `head_dim / 2` for every position reached.
    pub fn angles(&self) -> usize {
        (self.pos0 + self.seq.min(self.rows)) * (self.head_dim / 2)
    }
}

/// What a buffer holds, so that a mixed-precision backend can pick its storage. The CPU backend
/// keeps everything in f32 and ignores it; the CUDA backend stores activations in bf16 and the
/// rest in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Activations and activation gradients: the compute type.
    Activation,
    /// Per-row statistics and tables that lose too much in bf16 (RMSNorm's `rstd`, attention's
    /// logsumexp, the RoPE tables), and logits read back by a sampler or a scorer: always f32.
    Stats,
    /// Parameters: f32 master weights; a mixed-precision backend keeps a compute-type copy beside
    /// them for the forward and backward to read, refreshed by every `adamw_step`.
    Param,
    /// Parameter gradients and optimizer moments: f32, because they accumulate.
    Accum,
}

/// Hyper-parameters of one AdamW update with torch.optim.AdamW semantics.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
    /// Multiplies every gradient as it is read: global-norm clipping folded into the update's one
    /// pass instead of a pass of its own over every gradient (1 leaves them as they are).
    pub grad_scale: f32,
}

/// Device memory held by a backend's buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUse {
    pub live_bytes: usize,
    pub peak_bytes: usize,
}

/// Bytes held by a backend's live buffers, and the most ever held at once: each buffer adds its
/// bytes when made (or cloned) and takes them back when dropped, so no caller keeps accounts.
#[derive(Debug, Default)]
pub struct MemStats {
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl MemStats {
    pub fn add(&self, bytes: usize) {
        let now = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
    pub fn sub(&self, bytes: usize) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
    /// Starts a new peak window at the current level (benchmarks measure one phase at a time).
    pub fn reset_peak(&self) {
        self.peak.store(self.live(), Ordering::Relaxed);
    }
    pub fn usage(&self) -> MemoryUse {
        MemoryUse { live_bytes: self.live(), peak_bytes: self.peak() }
    }
}

/// The bytes `b`'s buffers hold, for memory figures. Every backend here counts them; one that did
/// not would have its figures refused rather than estimated by hand.
pub fn measured<B: Backend>(b: &B) -> Result<MemoryUse> {
    b.memory().ok_or_else(|| anyhow::anyhow!("the backend {} does not count its buffers' bytes", b.name()))
}

pub trait Backend: Send + Sync + 'static {
    type Buf: Send + Sync;

    /// A short human-readable description ("cpu (2 threads)", "cuda:0 NVIDIA H100").
    fn name(&self) -> String;

    // ---- memory ----
    /// A zeroed activation buffer.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// An activation buffer holding `data`.
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// A zeroed buffer for `role` (see [`Role`]); a single-precision backend needs no override.
    fn zeros_as(&self, len: usize, role: Role) -> Result<Self::Buf> {
        let _ = role;
        self.zeros(len)
    }
    /// A buffer for `role` whose values the caller overwrites entirely before reading any (a
    /// collective's output): a backend may skip zeroing it.
    fn scratch_as(&self, len: usize, role: Role) -> Result<Self::Buf> {
        self.zeros_as(len, role)
    }
    /// A buffer for `role` holding `data`.
    fn upload_as(&self, data: &[f32], role: Role) -> Result<Self::Buf> {
        let _ = role;
        self.upload(data)
    }
    /// Bytes held in this backend's buffers now and at most so far: each buffer counts its own
    /// (no default, so that a new backend decides; both built-in ones count, and a wrapper passes
    /// its inner backend's figures on). `None` only from a backend that cannot count.
    fn memory(&self) -> Option<MemoryUse>;
    /// Waits for queued work (a no-op on a synchronous backend); benchmarks call it before reading a clock.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// The first `n` values only (a workspace buffer sized for more rows than were computed).
    fn download_prefix(&self, buf: &Self::Buf, n: usize) -> Result<Vec<f32>> {
        let mut v = self.download(buf)?;
        if v.len() < n {
            anyhow::bail!("download of {n} values from a buffer of {}", v.len());
        }
        v.truncate(n);
        Ok(v)
    }
    fn len(&self, buf: &Self::Buf) -> usize;
    fn fill_zero(&self, buf: &mut Self::Buf) -> Result<()>;
    /// `dst[dst_off..dst_off+len] = src[src_off..src_off+len]`.
    fn copy(&self, dst: &mut Self::Buf, dst_off: usize, src: &Self::Buf, src_off: usize, len: usize) -> Result<()>;

    // ---- elementwise helpers ----
    /// `dst += src`.
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// Σ buf², accumulated in f64 (global-norm gradient clipping).
    fn sum_squares(&self, buf: &Self::Buf) -> Result<f64>;
    /// Σ over every buffer of Σ buf²; a GPU overrides it to wait for the host once, not per tensor.
    fn sum_squares_all(&self, bufs: &[&Self::Buf]) -> Result<f64> {
        bufs.iter().map(|b| self.sum_squares(b)).sum()
    }
    /// `sum_squares_all` of each group (the per-unit gradient norms: one group per model unit).
    fn sum_squares_grouped(&self, groups: &[Vec<&Self::Buf>]) -> Result<Vec<f64>> {
        groups.iter().map(|g| self.sum_squares_all(g)).collect()
    }

    // ---- ops ----
    fn matmul(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf, g: Gemm) -> Result<()>;

    /// `out = residual + op(a) · op(b)` (a residual block's output; `g.accumulate` is implied).
    /// By default a copy and an accumulating GEMM; a backend whose GEMM reads its addend from
    /// another buffer (cuBLASLt's C ≠ D) saves the copy's pass over `out`.
    fn matmul_residual(
        &self,
        out: &mut Self::Buf,
        residual: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        g: Gemm,
    ) -> Result<()> {
        self.copy(out, 0, residual, 0, g.m * g.n)?;
        self.matmul(out, a, b, g.accumulating())
    }

    /// `out[r] = table[ids[r]]`, rows of width `d`. Ids are checked by the caller.
    fn embedding_forward(&self, out: &mut Self::Buf, table: &Self::Buf, ids: &[u32], d: usize) -> Result<()>;
    /// `dtable[ids[r]] += dout[r]`.
    fn embedding_backward(&self, dtable: &mut Self::Buf, dout: &Self::Buf, ids: &[u32], d: usize) -> Result<()>;

    /// `out = x / rms(x) * w` per row; saves `rstd = 1 / sqrt(mean(x²) + eps)` per row.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<()>;
    /// `dx += ∂L/∂x` (accumulates: the norm's input is a residual stream), `dw += ∂L/∂w`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        rows: usize,
        d: usize,
    ) -> Result<()>;

    /// Rotates `x` in place by the rotary angles (HF "rotate_half" pairing `i` with `i + head_dim/2`);
    /// `inverse` rotates by the negative angles, which is exactly the backward of the forward rotation.
    fn rope(&self, x: &mut Self::Buf, cos: &Self::Buf, sin: &Self::Buf, shape: RopeShape, inverse: bool) -> Result<()>;

    /// Causal grouped-query attention, FlashAttention-2 style: `out` and the per-row logsumexp `lse`
    /// (kept for the backward) are produced without materialising the score matrix.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
    ) -> Result<()>;
    /// Overwrites `dq`, `dk`, `dv` with the gradients of the attention above.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
    ) -> Result<()>;

    /// The backward of attention over rotated q and k (`rope`, then `attention_forward`), taken back
    /// through the rotation: `dq` and `dk` come out as the gradients of the unrotated q and k, `dv`
    /// as `attention_backward`'s. The default is `attention_backward` and then the inverse `rope` on
    /// each; CUDA folds dQ's rotation into the f32 → bf16 conversion its backward ends with.
    #[allow(clippy::too_many_arguments)]
    fn rotary_attention_backward(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
        cos: &Self::Buf,
        sin: &Self::Buf,
    ) -> Result<()> {
        self.attention_backward(dq, dk, dv, dout, out, lse, q, k, v, shape)?;
        self.rope(dq, cos, sin, shape.q_rope(), true)?;
        self.rope(dk, cos, sin, shape.kv_rope(), true)
    }

    /// `out = silu(gate) * up` over the first `n` values (a workspace sized for a whole prefill chunk
    /// decodes one row at a time: only that row is computed).
    fn swiglu_forward(&self, out: &mut Self::Buf, gate: &Self::Buf, up: &Self::Buf, n: usize) -> Result<()>;
    /// Overwrites the first `n` values of `dgate`, `dup`.
    fn swiglu_backward(
        &self,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        dout: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        n: usize,
    ) -> Result<()>;

    /// Softmax cross-entropy over rows of `logits` (`[rows, vocab]`). Returns the per-row loss
    /// `logsumexp(row) - row[target]` (0 where `target < 0`, which marks an ignored row).
    /// With `grad_scale = Some(s)` the logits are overwritten in place by `s · (softmax - onehot)`,
    /// so no second `[rows, vocab]` buffer ever exists.
    fn cross_entropy(
        &self,
        logits: &mut Self::Buf,
        targets: &[i32],
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<Vec<f32>>;

    /// One AdamW step on a parameter tensor and its moment buffers.
    fn adamw_step(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        hp: AdamW,
    ) -> Result<()>;

    /// One AdamW step on every tensor of a model (`params[i]` with `grads[i]`, `m[i]`, `v[i]`);
    /// a GPU overrides it with a single multi-tensor launch.
    fn adamw_step_all(
        &self,
        params: &mut [&mut Self::Buf],
        grads: &[&Self::Buf],
        m: &mut [&mut Self::Buf],
        v: &mut [&mut Self::Buf],
        hp: AdamW,
    ) -> Result<()> {
        if grads.len() != params.len() || m.len() != params.len() || v.len() != params.len() {
            anyhow::bail!(
                "adamw: {} parameters, {} gradients, {}/{} moments",
                params.len(),
                grads.len(),
                m.len(),
                v.len()
            );
        }
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
            self.adamw_step(p, g, m, v, hp)?;
        }
        Ok(())
    }
}
