//! The CPU backend: f32 throughout, GEMMs through the `gemm` crate, everything else on rayon.
//!
//! Determinism: every output element is produced by exactly one task with a fixed summation order,
//! and cross-row reductions (weight gradients of RMSNorm) sum fixed-size chunks in a fixed order, so
//! the same inputs and thread count give bit-identical results.

mod adamw;
mod attention;
mod buf;
mod elementwise;
mod embedding;
mod matmul;
mod norm;
mod rope;
pub mod simd;
mod swiglu;
mod xent;

pub use attention::{attention_backward, attention_forward};
pub use buf::CpuBuf;

use super::{AdamW, AttnShape, Backend, Gemm, MemStats, MemoryUse, RopeShape};
use anyhow::{bail, ensure, Result};
use std::sync::Arc;

/// Raw pointer that tasks may share when each writes a disjoint region (checked by construction
/// in the callers, documented at each use).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Accessed through a method so closures capture the whole (Send) wrapper, not the raw field.
    #[inline]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// The CPU backend. Each `Cpu::new()` has a meter of its own, shared by its clones, so that two
/// FSDP ranks in one process (each made with its own) report their own bytes.
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    mem: Arc<MemStats>,
}

impl Cpu {
    pub fn new() -> Self {
        Cpu::default()
    }

    /// Starts a new peak window at the current level (benchmarks measure one phase at a time).
    pub fn reset_peak(&self) {
        self.mem.reset_peak();
    }
}

impl Backend for Cpu {
    type Buf = CpuBuf;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn zeros(&self, len: usize) -> Result<CpuBuf> {
        Ok(CpuBuf::metered(host_zeros(len)?, &self.mem))
    }
    fn upload(&self, data: &[f32]) -> Result<CpuBuf> {
        Ok(CpuBuf::metered(data.to_vec(), &self.mem))
    }
    fn memory(&self) -> Option<MemoryUse> {
        Some(self.mem.usage())
    }
    fn download(&self, buf: &CpuBuf) -> Result<Vec<f32>> {
        Ok(buf.to_vec())
    }
    fn download_prefix(&self, buf: &CpuBuf, n: usize) -> Result<Vec<f32>> {
        ensure!(n <= buf.len(), "download of {n} values from a buffer of {}", buf.len());
        Ok(buf[..n].to_vec())
    }
    fn len(&self, buf: &CpuBuf) -> usize {
        buf.len()
    }
    fn fill_zero(&self, buf: &mut CpuBuf) -> Result<()> {
        buf.fill(0.0);
        Ok(())
    }
    fn copy(&self, dst: &mut CpuBuf, dst_off: usize, src: &CpuBuf, src_off: usize, len: usize) -> Result<()> {
        ensure!(dst_off + len <= dst.len() && src_off + len <= src.len(), "copy out of bounds");
        dst[dst_off..dst_off + len].copy_from_slice(&src[src_off..src_off + len]);
        Ok(())
    }

    fn add_assign(&self, dst: &mut CpuBuf, src: &CpuBuf) -> Result<()> {
        elementwise::add_assign(dst, src);
        Ok(())
    }
    fn sum_squares(&self, buf: &CpuBuf) -> Result<f64> {
        Ok(elementwise::sum_squares(buf))
    }

    fn matmul(&self, out: &mut CpuBuf, a: &CpuBuf, b: &CpuBuf, g: Gemm) -> Result<()> {
        matmul::matmul(out, a, b, g);
        Ok(())
    }

    fn embedding_forward(&self, out: &mut CpuBuf, table: &CpuBuf, ids: &[u32], d: usize) -> Result<()> {
        embedding::forward(out, table, ids, d);
        Ok(())
    }
    fn embedding_backward(&self, dtable: &mut CpuBuf, dout: &CpuBuf, ids: &[u32], d: usize) -> Result<()> {
        embedding::backward(dtable, dout, ids, d);
        Ok(())
    }

    fn rmsnorm_forward(
        &self,
        out: &mut CpuBuf,
        rstd: &mut CpuBuf,
        x: &CpuBuf,
        w: &CpuBuf,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        norm::forward(&mut out[..rows * d], &mut rstd[..rows], &x[..rows * d], w, d, eps);
        Ok(())
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut CpuBuf,
        dw: &mut CpuBuf,
        dout: &CpuBuf,
        x: &CpuBuf,
        w: &CpuBuf,
        rstd: &CpuBuf,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        norm::backward(&mut dx[..rows * d], dw, &dout[..rows * d], &x[..rows * d], w, &rstd[..rows], d);
        Ok(())
    }

    fn rope(&self, x: &mut CpuBuf, cos: &CpuBuf, sin: &CpuBuf, shape: RopeShape, inverse: bool) -> Result<()> {
        rope::apply(x, cos, sin, shape, inverse);
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut CpuBuf,
        lse: &mut CpuBuf,
        q: &CpuBuf,
        k: &CpuBuf,
        v: &CpuBuf,
        shape: AttnShape,
    ) -> Result<()> {
        attention_forward(out, lse, q, k, v, shape);
        Ok(())
    }
    fn attention_backward(
        &self,
        dq: &mut CpuBuf,
        dk: &mut CpuBuf,
        dv: &mut CpuBuf,
        dout: &CpuBuf,
        out: &CpuBuf,
        lse: &CpuBuf,
        q: &CpuBuf,
        k: &CpuBuf,
        v: &CpuBuf,
        shape: AttnShape,
    ) -> Result<()> {
        attention_backward(dq, dk, dv, dout, out, lse, q, k, v, shape);
        Ok(())
    }

    fn swiglu_forward(&self, out: &mut CpuBuf, gate: &CpuBuf, up: &CpuBuf, n: usize) -> Result<()> {
        if [out.len(), gate.len(), up.len()].iter().any(|&l| l < n) {
            bail!("swiglu: {n} values asked of buffers of {}, {} and {}", out.len(), gate.len(), up.len());
        }
        swiglu::forward(&mut out[..n], &gate[..n], &up[..n]);
        Ok(())
    }
    fn swiglu_backward(
        &self,
        dgate: &mut CpuBuf,
        dup: &mut CpuBuf,
        dout: &CpuBuf,
        gate: &CpuBuf,
        up: &CpuBuf,
        n: usize,
    ) -> Result<()> {
        if [dgate.len(), dup.len(), dout.len(), gate.len(), up.len()].iter().any(|&l| l < n) {
            bail!("swiglu backward: {n} values asked of a shorter buffer");
        }
        swiglu::backward(&mut dgate[..n], &mut dup[..n], &dout[..n], &gate[..n], &up[..n]);
        Ok(())
    }

    fn cross_entropy(
        &self,
        logits: &mut CpuBuf,
        targets: &[i32],
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<Vec<f32>> {
        ensure!(logits.len() >= targets.len() * vocab, "cross_entropy: logits too small");
        Ok(xent::cross_entropy(&mut logits[..targets.len() * vocab], targets, vocab, grad_scale))
    }

    fn adamw_step(&self, param: &mut CpuBuf, grad: &CpuBuf, m: &mut CpuBuf, v: &mut CpuBuf, hp: AdamW) -> Result<()> {
        adamw::step(param, grad, m, v, hp);
        Ok(())
    }
}

/// `vec![0.0; len]`, except that memory the allocator refuses is an error rather than an abort
/// (an absurd config asks for terabytes). Zeroed pages come from the OS untouched, as with `vec!`.
pub fn host_zeros(len: usize) -> Result<Vec<f32>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let too_big = || anyhow::anyhow!("cannot allocate {:.1} GiB of host memory", len as f64 * 4.0 / GIB);
    let layout = std::alloc::Layout::array::<f32>(len).map_err(|_| too_big())?;
    // SAFETY: the layout has a non-zero size. The memory is zeroed and 0.0f32 is all zero bits, so
    // all `len` values are initialised; the Vec owns it with the layout it was allocated with.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut f32;
        if p.is_null() {
            return Err(too_big());
        }
        Ok(Vec::from_raw_parts(p, len, len))
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Physical memory of this machine (`MemTotal`), where the OS says.
pub fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 =
        info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// This machine's f32 GEMM throughput (FLOP/s), measured once: the denominator of MFU on CPU.
pub fn measured_peak_flops() -> f64 {
    static PEAK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *PEAK.get_or_init(|| {
        let n = 512;
        let x: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 * 0.1).collect();
        let mut out = vec![0.0f32; n * n];
        let g = Gemm { m: n, n, k: n, trans_a: false, trans_b: true, accumulate: false };
        matmul::matmul(&mut out, &x, &x, g);
        let reps = 4;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            matmul::matmul(&mut out, &x, &x, g);
        }
        2.0 * (n * n * n * reps) as f64 / t.elapsed().as_secs_f64()
    })
}
