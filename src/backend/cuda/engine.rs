//! `Cuda`: the [`Backend`] on one GPU, bf16 mixed precision.
//!
//! Activations are bf16; everything that accumulates or is a statistic is f32 (see `buf`).
//! Parameters carry an f32 master copy that AdamW updates and a bf16 copy, written in the same
//! AdamW pass, that the forward and backward read. GEMMs go through cuBLASLt (`gemm`), every other
//! op through the kernels in `kernels/` via their same-named launchers. All work is queued on the
//! GPU's one stream, so ops are ordered without host synchronisation; only `download`,
//! `sum_squares` and `cross_entropy` (which return host values) wait.

use super::attn_tune::{AttnTuned, AttnTuner};
use super::buf::{storage_of, CudaBuf, Data, MemStats};
use super::device::Gpu;
use super::gemm::Blas;
use super::libs::{require, CudaLib};
use super::{adamw, cross_entropy, elementwise, flash_attn, rmsnorm, rope, swiglu};
use crate::backend::{AdamW, AttnShape, Backend, Gemm, MemoryUse, Role, RopeShape};
use anyhow::{bail, Result};
use std::sync::Arc;

/// Each buffer holds at least the given number of values.
fn fits(op: &str, need: &[(&CudaBuf, usize)]) -> Result<()> {
    if let Some((b, n)) = need.iter().find(|(b, n)| b.len() < *n) {
        bail!("{op}: a buffer of {} values where {n} are needed", b.len());
    }
    Ok(())
}

#[derive(Clone)]
pub struct Cuda {
    gpu: Arc<Gpu>,
    blas: Arc<Blas>,
    attn: Arc<AttnTuner>,
    mem: Arc<MemStats>,
}

/// Device memory as the engine and the driver see it.
#[derive(Clone, Copy, Debug)]
pub struct CudaMemory {
    /// Bytes in live kiln buffers.
    pub live: usize,
    /// Most bytes in kiln buffers at once since the last `reset_peak`.
    pub peak: usize,
    /// Bytes in use on the device by every allocator (cuBLASLt's workspace, caching pools, other processes).
    pub device_used: usize,
    pub device_total: usize,
}

impl Cuda {
    /// Opens GPU `ordinal`: checks the libraries, compiles (or loads) the kernels, creates cuBLASLt.
    pub fn open(ordinal: usize) -> Result<Cuda> {
        require("the CUDA backend", &[CudaLib::Driver, CudaLib::Nvrtc, CudaLib::CublasLt])?;
        let gpu = Arc::new(Gpu::open(ordinal)?);
        let blas = Arc::new(Blas::new(&gpu)?);
        let attn = Arc::new(AttnTuner::from_env());
        Ok(Cuda { gpu, blas, attn, mem: Arc::new(MemStats::default()) })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// What timing chose for each GEMM shape seen so far (see `gemm.rs`).
    pub fn gemm_tuning(&self) -> Vec<super::gemm::Tuned> {
        self.blas.tuning()
    }

    /// The same engine with another attention tuner (tests time every pass of a small model).
    pub fn with_attention_tuner(mut self, tuner: AttnTuner) -> Cuda {
        self.attn = Arc::new(tuner);
        self
    }

    /// What timing chose for each attention pass and shape seen so far (see `attn_tune.rs`).
    pub fn attention_tuning(&self) -> Vec<AttnTuned> {
        self.attn.tuning()
    }

    /// Kiln's buffers and the whole device, as the driver reports it.
    pub fn device_memory(&self) -> Result<CudaMemory> {
        self.gpu.ctx.bind_to_thread()?;
        let (free, total) = self.gpu.ctx.mem_get_info()?;
        Ok(CudaMemory { live: self.mem.live(), peak: self.mem.peak(), device_used: total - free, device_total: total })
    }

    pub fn reset_peak(&self) {
        self.mem.reset_peak();
    }

    /// Out of memory is the error a user can act on, so it says how much was held and what helps.
    fn alloc_error(&self, e: cudarc::driver::DriverError, len: usize, role: Role) -> anyhow::Error {
        let held = self.mem.live() as f64 / (1u64 << 30) as f64;
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            anyhow::anyhow!(
                "GPU {} is out of memory allocating {len} values ({}) with {held:.1} GiB already held by kiln: lower train.micro_batch, or set train.recompute = true",
                self.gpu.ordinal,
                storage_of(role)
            )
        } else {
            anyhow::anyhow!("GPU {}: allocating {len} values failed ({e:?})", self.gpu.ordinal)
        }
    }

    fn wrap(&self, data: Data) -> CudaBuf {
        CudaBuf::new(data, self.mem.clone())
    }

    fn ids(&self, ids: &[u32]) -> Result<cudarc::driver::CudaSlice<u32>> {
        Ok(self.gpu.stream.clone_htod(ids)?)
    }

    /// The attention backward through the tuner's build; with `unrotate`, dQ comes out rotated
    /// back (see `flash_attn::backward`).
    #[allow(clippy::too_many_arguments)]
    fn flash_backward(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        shape: AttnShape,
        unrotate: Option<rope::Tables<'_>>,
    ) -> Result<()> {
        let (dq, dk, dv) = (dq.bf16_mut("attention dq")?, dk.bf16_mut("attention dk")?, dv.bf16_mut("attention dv")?);
        let (dout, out, lse) = (dout.bf16("attention dout")?, out.bf16("attention out")?, lse.f32("attention lse")?);
        let (q, k, v) = (q.bf16("attention q")?, k.bf16("attention k")?, v.bf16("attention v")?);
        let gpu = &self.gpu;
        // Every build overwrites dQ, dK and dV, so timing the builds in place is harmless.
        self.attn.backward(gpu, shape, &mut |build| {
            flash_attn::backward(gpu, dq, dk, dv, dout, out, lse, q, k, v, shape, build, unrotate)
        })
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;

    fn name(&self) -> String {
        format!("cuda:{} {} ({}, bf16 mixed precision)", self.gpu.ordinal, self.gpu.name, self.gpu.arch)
    }

    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        self.zeros_as(len, Role::Activation)
    }

    fn upload(&self, data: &[f32]) -> Result<CudaBuf> {
        self.upload_as(data, Role::Activation)
    }

    fn zeros_as(&self, len: usize, role: Role) -> Result<CudaBuf> {
        let data = Data::zeros(&self.gpu.stream, len, role).map_err(|e| self.alloc_error(e, len, role))?;
        Ok(self.wrap(data))
    }

    fn scratch_as(&self, len: usize, role: Role) -> Result<CudaBuf> {
        // SAFETY: the caller writes every element before reading (the trait's contract).
        let data = unsafe { Data::unset(&self.gpu.stream, len, role) }.map_err(|e| self.alloc_error(e, len, role))?;
        Ok(self.wrap(data))
    }

    fn upload_as(&self, data: &[f32], role: Role) -> Result<CudaBuf> {
        let d = Data::upload(&self.gpu.stream, data, role).map_err(|e| self.alloc_error(e, data.len(), role))?;
        Ok(self.wrap(d))
    }

    fn memory(&self) -> Option<MemoryUse> {
        Some(MemoryUse { live_bytes: self.mem.live(), peak_bytes: self.mem.peak() })
    }

    fn synchronize(&self) -> Result<()> {
        self.gpu.synchronize()
    }

    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        self.download_prefix(buf, buf.len())
    }

    fn download_prefix(&self, buf: &CudaBuf, n: usize) -> Result<Vec<f32>> {
        if n > buf.len() {
            bail!("download of {n} values from a buffer of {}", buf.len());
        }
        let s = &self.gpu.stream;
        Ok(match &buf.data {
            Data::Bf16(x) => s.clone_dtoh(&x.slice(..n))?.into_iter().map(f32::from).collect(),
            Data::F32(x) | Data::Param { master: x, .. } => s.clone_dtoh(&x.slice(..n))?,
        })
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }

    fn fill_zero(&self, buf: &mut CudaBuf) -> Result<()> {
        let s = &self.gpu.stream;
        match &mut buf.data {
            Data::Bf16(x) => s.memset_zeros(x)?,
            Data::F32(x) => s.memset_zeros(x)?,
            Data::Param { master, compute } => {
                s.memset_zeros(master)?;
                s.memset_zeros(compute)?;
            }
        }
        Ok(())
    }

    fn copy(&self, dst: &mut CudaBuf, dst_off: usize, src: &CudaBuf, src_off: usize, len: usize) -> Result<()> {
        if dst_off + len > dst.len() || src_off + len > src.len() {
            bail!("copy of {len} values: out of range ({dst_off}/{} ← {src_off}/{})", dst.len(), src.len());
        }
        let s = &self.gpu.stream;
        match &mut dst.data {
            Data::F32(d) => {
                let x = src.f32("copy")?;
                s.memcpy_dtod(&x.slice(src_off..src_off + len), &mut d.slice_mut(dst_off..dst_off + len))?
            }
            _ => {
                let x = src.bf16("copy")?;
                let d = dst.bf16_mut("copy")?;
                s.memcpy_dtod(&x.slice(src_off..src_off + len), &mut d.slice_mut(dst_off..dst_off + len))?
            }
        }
        Ok(())
    }

    fn add_assign(&self, dst: &mut CudaBuf, src: &CudaBuf) -> Result<()> {
        match &mut dst.data {
            Data::F32(d) => elementwise::add_assign(&self.gpu, d, src.f32("add_assign")?),
            _ => elementwise::add_assign(&self.gpu, dst.bf16_mut("add_assign")?, src.bf16("add_assign")?),
        }
    }

    fn sum_squares(&self, buf: &CudaBuf) -> Result<f64> {
        elementwise::sum_squares(&self.gpu, buf.f32("sum_squares")?)
    }

    fn sum_squares_all(&self, bufs: &[&CudaBuf]) -> Result<f64> {
        let slices = bufs.iter().map(|b| b.f32("sum_squares")).collect::<Result<Vec<_>>>()?;
        elementwise::sum_squares_all(&self.gpu, &slices)
    }

    fn matmul(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, g: Gemm) -> Result<()> {
        let (a, b) = (a.bf16("matmul operand")?, b.bf16("matmul operand")?);
        match &mut out.data {
            Data::F32(o) => self.blas.matmul(&self.gpu, o, a, b, g),
            _ => self.blas.matmul(&self.gpu, out.bf16_mut("matmul result")?, a, b, g),
        }
    }

    fn matmul_residual(&self, out: &mut CudaBuf, residual: &CudaBuf, a: &CudaBuf, b: &CudaBuf, g: Gemm) -> Result<()> {
        let (a, b) = (a.bf16("matmul operand")?, b.bf16("matmul operand")?);
        match (&mut out.data, &residual.data) {
            (Data::F32(o), Data::F32(r)) => self.blas.matmul_residual(&self.gpu, o, r, a, b, g),
            _ => {
                let r = residual.bf16("matmul residual")?;
                self.blas.matmul_residual(&self.gpu, out.bf16_mut("matmul result")?, r, a, b, g)
            }
        }
    }

    fn embedding_forward(&self, out: &mut CudaBuf, table: &CudaBuf, ids: &[u32], d: usize) -> Result<()> {
        if ids.len() * d > out.len() {
            bail!("embedding: {} ids of width {d} do not fit {} values", ids.len(), out.len());
        }
        if let Some(&bad) = ids.iter().find(|&&i| (i as usize + 1) * d > table.len()) {
            bail!("embedding: id {bad} is outside the table");
        }
        let ids = self.ids(ids)?;
        elementwise::embedding_forward(&self.gpu, out.bf16_mut("embedding")?, table.bf16("embedding table")?, &ids, d)
    }

    fn embedding_backward(&self, dtable: &mut CudaBuf, dout: &CudaBuf, ids: &[u32], d: usize) -> Result<()> {
        if ids.len() * d > dout.len() {
            bail!("embedding backward: {} ids of width {d} but {} gradient values", ids.len(), dout.len());
        }
        if let Some(&bad) = ids.iter().find(|&&i| (i as usize + 1) * d > dtable.len()) {
            bail!("embedding backward: id {bad} is outside the table");
        }
        let ids = self.ids(ids)?;
        elementwise::embedding_backward(&self.gpu, dtable.f32_mut("embedding grad")?, dout.bf16("embedding")?, &ids, d)
    }

    fn rmsnorm_forward(
        &self,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        fits("rmsnorm", &[(out, rows * d), (x, rows * d), (w, d), (rstd, rows)])?;
        let (x, w) = (x.bf16("rmsnorm input")?, w.bf16("rmsnorm weight")?);
        rmsnorm::forward(&self.gpu, out.bf16_mut("rmsnorm")?, rstd.f32_mut("rmsnorm rstd")?, x, w, rows, d, eps)
    }

    fn rmsnorm_backward(
        &self,
        dx: &mut CudaBuf,
        dw: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rstd: &CudaBuf,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        fits("rmsnorm backward", &[(dx, rows * d), (dw, d), (dout, rows * d), (x, rows * d), (w, d), (rstd, rows)])?;
        rmsnorm::backward(
            &self.gpu,
            dx.bf16_mut("rmsnorm dx")?,
            dw.f32_mut("rmsnorm dw")?,
            dout.bf16("rmsnorm dout")?,
            x.bf16("rmsnorm input")?,
            w.bf16("rmsnorm weight")?,
            rstd.f32("rmsnorm rstd")?,
            rows,
            d,
        )
    }

    fn rope(&self, x: &mut CudaBuf, cos: &CudaBuf, sin: &CudaBuf, shape: RopeShape, inverse: bool) -> Result<()> {
        fits("rope", &[(x, shape.values()), (cos, shape.angles()), (sin, shape.angles())])?;
        let (c, s) = (cos.f32("rope cos table")?, sin.f32("rope sin table")?);
        rope::apply(&self.gpu, x.bf16_mut("rope")?, c, s, shape, inverse)
    }

    fn attention_forward(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        shape: AttnShape,
    ) -> Result<()> {
        let (q, k, v) = (q.bf16("attention q")?, k.bf16("attention k")?, v.bf16("attention v")?);
        let (out, lse) = (out.bf16_mut("attention")?, lse.f32_mut("attention lse")?);
        let gpu = &self.gpu;
        self.attn.forward(gpu, shape, &mut |build| flash_attn::forward(gpu, out, lse, q, k, v, shape, build))
    }

    fn attention_backward(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        shape: AttnShape,
    ) -> Result<()> {
        self.flash_backward(dq, dk, dv, dout, out, lse, q, k, v, shape, None)
    }

    fn rotary_attention_backward(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        shape: AttnShape,
        cos: &CudaBuf,
        sin: &CudaBuf,
    ) -> Result<()> {
        // dQ is rotated back as its f32 accumulator is rounded (no pass of its own); dK, an eighth
        // of dQ's size under TinyLlama's grouping, by the in-place kernel.
        let tables = rope::Tables { cos: cos.f32("rope cos table")?, sin: sin.f32("rope sin table")? };
        self.flash_backward(dq, dk, dv, dout, out, lse, q, k, v, shape, Some(tables))?;
        self.rope(dk, cos, sin, shape.kv_rope(), true)
    }

    fn swiglu_forward(&self, out: &mut CudaBuf, gate: &CudaBuf, up: &CudaBuf, n: usize) -> Result<()> {
        swiglu::forward(&self.gpu, out.bf16_mut("swiglu")?, gate.bf16("swiglu gate")?, up.bf16("swiglu up")?, n)
    }

    fn swiglu_backward(
        &self,
        dgate: &mut CudaBuf,
        dup: &mut CudaBuf,
        dout: &CudaBuf,
        gate: &CudaBuf,
        up: &CudaBuf,
        n: usize,
    ) -> Result<()> {
        swiglu::backward(
            &self.gpu,
            dgate.bf16_mut("swiglu dgate")?,
            dup.bf16_mut("swiglu dup")?,
            dout.bf16("swiglu dout")?,
            gate.bf16("swiglu gate")?,
            up.bf16("swiglu up")?,
            n,
        )
    }

    fn cross_entropy(
        &self,
        logits: &mut CudaBuf,
        targets: &[i32],
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<Vec<f32>> {
        // As on the CPU, a larger buffer is fine: only its first rows · vocab values are touched.
        if logits.len() < targets.len() * vocab {
            bail!("cross_entropy: {} rows of {vocab} logits expected, got {} values", targets.len(), logits.len());
        }
        // The kernel reads logits[target] unchecked.
        if let Some(&bad) = targets.iter().find(|&&t| t >= vocab as i32) {
            bail!("cross_entropy: target {bad} is outside the vocabulary of {vocab}");
        }
        let s = &self.gpu.stream;
        let t = s.clone_htod(targets)?;
        let mut loss = s.alloc_zeros::<f32>(targets.len())?;
        cross_entropy::forward(&self.gpu, logits.bf16_mut("cross_entropy logits")?, &mut loss, &t, vocab, grad_scale)?;
        Ok(s.clone_dtoh(&loss)?)
    }

    fn adamw_step(
        &self,
        param: &mut CudaBuf,
        grad: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        hp: AdamW,
    ) -> Result<()> {
        self.adamw_step_all(&mut [param], &[grad], &mut [m], &mut [v], hp)
    }

    fn adamw_step_all(
        &self,
        params: &mut [&mut CudaBuf],
        grads: &[&CudaBuf],
        m: &mut [&mut CudaBuf],
        v: &mut [&mut CudaBuf],
        hp: AdamW,
    ) -> Result<()> {
        if grads.len() != params.len() || m.len() != params.len() || v.len() != params.len() {
            bail!("adamw: {} parameters, {} gradients, {}/{} moments", params.len(), grads.len(), m.len(), v.len());
        }
        let mut tensors = Vec::with_capacity(params.len());
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
            let n = p.len();
            if g.len() != n || m.len() != n || v.len() != n {
                bail!("adamw: parameter of {n} values with gradient/moments of {}/{}/{}", g.len(), m.len(), v.len());
            }
            let (param, param_bf16) = match &mut p.data {
                Data::Param { master, compute } => (master, Some(compute)),
                Data::F32(x) => (x, None),
                Data::Bf16(_) => bail!("adamw: a parameter has no f32 master copy (allocate it as Role::Param)"),
            };
            tensors.push(adamw::AdamTensor {
                param,
                grad: g.f32("adamw gradient")?,
                m: m.f32_mut("adamw m")?,
                v: v.f32_mut("adamw v")?,
                param_bf16,
            });
        }
        adamw::step(&self.gpu, &mut tensors, hp)
    }
}
