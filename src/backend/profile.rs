//! `Profiled<B>`: any backend, with every op timed by kind. Each op is bracketed by
//! `synchronize`, so on a GPU the time is the op's own (queueing overlap is lost, which is why this
//! is a diagnostic run beside the real benchmark, never the benchmark itself). GEMMs and attention
//! also count their FLOPs, so the table shows where a step's time goes and how close each kind of op
//! runs to the card's peak. `kiln bench train --profile` prints it.

use super::{AdamW, AttnShape, Backend, Gemm, MemoryUse, Role, RopeShape};
use anyhow::Result;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Clone, Copy, Debug, Default)]
pub struct OpStats {
    pub calls: u64,
    pub secs: f64,
    pub flops: f64,
}

pub struct Profiled<B: Backend> {
    inner: B,
    stats: Mutex<BTreeMap<&'static str, OpStats>>,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Self {
        Profiled { inner, stats: Mutex::new(BTreeMap::new()) }
    }

    /// Per-kind totals so far, most time first.
    pub fn report(&self) -> Vec<(&'static str, OpStats)> {
        let mut v: Vec<_> = self.stats.lock().map(|s| s.iter().map(|(k, v)| (*k, *v)).collect()).unwrap_or_default();
        v.sort_by(|a, b| b.1.secs.total_cmp(&a.1.secs));
        v
    }

    pub fn reset(&self) {
        if let Ok(mut s) = self.stats.lock() {
            s.clear();
        }
    }

    fn timed<T>(&self, kind: &'static str, flops: f64, op: impl FnOnce(&B) -> Result<T>) -> Result<T> {
        self.inner.synchronize()?;
        let t = Instant::now();
        let out = op(&self.inner)?;
        self.inner.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        if let Ok(mut s) = self.stats.lock() {
            let e = s.entry(kind).or_default();
            e.calls += 1;
            e.secs += secs;
            e.flops += flops;
        }
        Ok(out)
    }
}

/// Causal attention forward FLOPs as FlashAttention-2's paper counts them (half of the square).
fn attention_flops(s: &AttnShape) -> f64 {
    2.0 * (s.batch * s.n_head * s.q_len * s.kv_len * s.head_dim) as f64
}

impl<B: Backend> Backend for Profiled<B> {
    type Buf = B::Buf;

    fn name(&self) -> String {
        format!("{} (profiled)", self.inner.name())
    }
    fn zeros(&self, len: usize) -> Result<Self::Buf> {
        self.inner.zeros(len)
    }
    fn upload(&self, data: &[f32]) -> Result<Self::Buf> {
        self.inner.upload(data)
    }
    fn zeros_as(&self, len: usize, role: Role) -> Result<Self::Buf> {
        self.inner.zeros_as(len, role)
    }
    fn scratch_as(&self, len: usize, role: Role) -> Result<Self::Buf> {
        self.inner.scratch_as(len, role)
    }
    fn upload_as(&self, data: &[f32], role: Role) -> Result<Self::Buf> {
        self.inner.upload_as(data, role)
    }
    fn memory(&self) -> Option<MemoryUse> {
        self.inner.memory()
    }
    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>> {
        self.inner.download(buf)
    }
    fn download_prefix(&self, buf: &Self::Buf, n: usize) -> Result<Vec<f32>> {
        self.inner.download_prefix(buf, n)
    }
    fn len(&self, buf: &Self::Buf) -> usize {
        self.inner.len(buf)
    }
    fn fill_zero(&self, buf: &mut Self::Buf) -> Result<()> {
        self.timed("fill_zero", 0.0, |b| b.fill_zero(buf))
    }
    fn copy(&self, dst: &mut Self::Buf, dst_off: usize, src: &Self::Buf, src_off: usize, len: usize) -> Result<()> {
        self.timed("copy", 0.0, |b| b.copy(dst, dst_off, src, src_off, len))
    }
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()> {
        self.timed("add_assign", 0.0, |b| b.add_assign(dst, src))
    }
    fn sum_squares(&self, buf: &Self::Buf) -> Result<f64> {
        self.timed("grad norm", 0.0, |b| b.sum_squares(buf))
    }
    fn sum_squares_all(&self, bufs: &[&Self::Buf]) -> Result<f64> {
        self.timed("grad norm", 0.0, |b| b.sum_squares_all(bufs))
    }
    fn matmul(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf, g: Gemm) -> Result<()> {
        self.timed("matmul", 2.0 * (g.m * g.n * g.k) as f64, |be| be.matmul(out, a, b, g))
    }
    fn embedding_forward(&self, out: &mut Self::Buf, table: &Self::Buf, ids: &[u32], d: usize) -> Result<()> {
        self.timed("embedding", 0.0, |b| b.embedding_forward(out, table, ids, d))
    }
    fn embedding_backward(&self, dtable: &mut Self::Buf, dout: &Self::Buf, ids: &[u32], d: usize) -> Result<()> {
        self.timed("embedding backward", 0.0, |b| b.embedding_backward(dtable, dout, ids, d))
    }
    fn rmsnorm_forward(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        self.timed("rmsnorm", 0.0, |b| b.rmsnorm_forward(out, rstd, x, w, rows, d, eps))
    }
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
    ) -> Result<()> {
        self.timed("rmsnorm backward", 0.0, |b| b.rmsnorm_backward(dx, dw, dout, x, w, rstd, rows, d))
    }
    fn rope(&self, x: &mut Self::Buf, cos: &Self::Buf, sin: &Self::Buf, shape: RopeShape, inverse: bool) -> Result<()> {
        self.timed("rope", 0.0, |b| b.rope(x, cos, sin, shape, inverse))
    }
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
    ) -> Result<()> {
        self.timed("attention", attention_flops(&shape), |b| b.attention_forward(out, lse, q, k, v, shape))
    }
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
    ) -> Result<()> {
        // The backward does 2.5× the forward's matrix work (FlashAttention-2's count).
        self.timed("attention backward", 2.5 * attention_flops(&shape), |b| {
            b.attention_backward(dq, dk, dv, dout, out, lse, q, k, v, shape)
        })
    }
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
        // One timing: the backend may fuse the inverse rotation into the backward's own passes
        // (it is the inner backend's method that runs, not the default's separate calls).
        self.timed("attention backward", 2.5 * attention_flops(&shape), |b| {
            b.rotary_attention_backward(dq, dk, dv, dout, out, lse, q, k, v, shape, cos, sin)
        })
    }
    fn swiglu_forward(&self, out: &mut Self::Buf, gate: &Self::Buf, up: &Self::Buf, n: usize) -> Result<()> {
        self.timed("swiglu", 0.0, |b| b.swiglu_forward(out, gate, up, n))
    }
    fn swiglu_backward(
        &self,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        dout: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        n: usize,
    ) -> Result<()> {
        self.timed("swiglu backward", 0.0, |b| b.swiglu_backward(dgate, dup, dout, gate, up, n))
    }
    fn cross_entropy(
        &self,
        logits: &mut Self::Buf,
        targets: &[i32],
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<Vec<f32>> {
        self.timed("cross_entropy", 0.0, |b| b.cross_entropy(logits, targets, vocab, grad_scale))
    }
    fn adamw_step(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        hp: AdamW,
    ) -> Result<()> {
        self.timed("adamw", 0.0, |b| b.adamw_step(param, grad, m, v, hp))
    }
    fn adamw_step_all(
        &self,
        params: &mut [&mut Self::Buf],
        grads: &[&Self::Buf],
        m: &mut [&mut Self::Buf],
        v: &mut [&mut Self::Buf],
        hp: AdamW,
    ) -> Result<()> {
        self.timed("adamw", 0.0, |b| b.adamw_step_all(params, grads, m, v, hp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    #[test]
    fn counts_calls_time_and_gemm_flops_and_passes_results_through() {
        let p = Profiled::new(Cpu::new());
        let a = p.upload(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        let mut out = p.zeros(4).unwrap();
        let g = Gemm { m: 2, n: 2, k: 2, trans_a: false, trans_b: false, accumulate: false };
        p.matmul(&mut out, &a, &a, g).unwrap();
        p.matmul(&mut out, &a, &a, g).unwrap();
        assert_eq!(p.download(&out).unwrap(), vec![7.0, 10.0, 15.0, 22.0]);
        let r = p.report();
        let (kind, s) = r.iter().find(|(k, _)| *k == "matmul").copied().unwrap();
        assert_eq!((kind, s.calls, s.flops), ("matmul", 2, 32.0));
        p.reset();
        assert!(p.report().is_empty());
    }
}
