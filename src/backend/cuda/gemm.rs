//! GEMMs through cuBLASLt: bf16 operands, f32 accumulation, a bf16 or f32 result, and `beta = 1`
//! when the backend's `Gemm` asks to accumulate (the residual adds of the `o` and `down`
//! projections, gradient accumulation into f32 weight gradients), so no separate add pass runs.
//!
//! cuBLASLt is column-major and kiln is row-major. A row-major `X[r, c]` is, byte for byte, the
//! column-major `Xᵀ[c, r]`, so `out = op(a) · op(b)` is computed as `outᵀ = op(b)ᵀ · op(a)ᵀ`:
//! cuBLAS's `A` is kiln's `b`, its `B` is kiln's `a`, and the transposes carry over unchanged.
//! Each distinct shape gets a plan (descriptors plus an algorithm) once, then reuses it. The
//! algorithm is chosen by timing: cuBLASLt's heuristic ranks candidates from a model of the card,
//! and its first choice is not always the fastest (PyTorch takes it untimed), so the first GEMM of
//! each shape runs the top [`CANDIDATES`] on the real operands and keeps the fastest.
//! `KILN_GEMM_AUTOTUNE=0` takes the heuristic's first choice instead, for comparison.

use super::device::{Elem, Gpu};
use crate::backend::Gemm;
use anyhow::{anyhow, bail, Result};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// Candidates timed per new shape: enough to cover the heuristic's usual near-misses (tile shape,
/// split-K, swizzle), few enough that tuning every shape of a step costs well under a second.
const CANDIDATES: usize = 8;
/// Timed runs per candidate, after one untimed run.
const TIMED_RUNS: usize = 3;
/// GEMMs below this size keep the heuristic's first choice untimed: a training step's GEMMs are all
/// far above it (TinyLlama's smallest is 17 GFLOP), while decoding and prompt prefill bring a new row
/// count (a new shape) with nearly every call, where timing 8 candidates would cost more than it saves.
const TUNE_MIN_FLOPS: f64 = 4e9;
/// An accumulating GEMM is tuned on a scratch output of its shape, allocated in the first backward,
/// when memory is at its peak; above this size (a large vocabulary's LM-head gradient) the heuristic's
/// first choice is kept untimed rather than risk running out of memory for a few percent.
const TUNE_SCRATCH_MAX_BYTES: usize = 512 << 20;

/// Result types a GEMM may write.
pub trait GemmOut: Elem + cudarc::driver::ValidAsZeroBits {
    const DATA_TYPE: sys::cudaDataType;
}
impl GemmOut for bf16 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
}
impl GemmOut for f32 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlanKey {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    out_type: i32,
}

impl PlanKey {
    fn of<O: GemmOut>(g: Gemm) -> PlanKey {
        PlanKey {
            m: g.m,
            n: g.n,
            k: g.k,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            out_type: if O::DATA_TYPE == sys::cudaDataType::CUDA_R_32F { 0 } else { 1 },
        }
    }
}

/// Descriptors and the chosen algorithm for one shape; destroyed with the plan.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    /// The heuristic's candidates, best-ranked first; the plan runs `candidates[chosen]`.
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
    chosen: usize,
}

/// What timing found for one shape: the heuristic's first choice against the fastest candidate.
#[derive(Clone, Copy, Debug)]
pub struct Tuned {
    pub shape: PlanKey,
    pub candidates: usize,
    pub chosen: usize,
    pub first_ms: f32,
    pub best_ms: f32,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by this plan and is destroyed once; failures at
        // teardown have nowhere useful to go.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

pub struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<PlanKey, Plan>>,
    autotune: bool,
    tuned: Mutex<Vec<Tuned>>,
}

// SAFETY: the handle and the descriptors are only used under `plans`' lock or from the one stream
// the backend enqueues on; cuBLASLt handles may be shared across threads.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.get_mut().map(|p| p.clear()).unwrap_or_default();
        // The handle belongs to this GPU's context, which may not be the one current on this thread.
        let _ = self.workspace.context().bind_to_thread();
        // SAFETY: created in `new`, destroyed once, after every plan that referenced it.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// Stored (pre-transpose) layout of a row-major matrix `rows × cols`, seen column-major.
fn layout(ty: sys::cudaDataType, rows: usize, cols: usize) -> Result<sys::cublasLtMatrixLayout_t> {
    lt::create_matrix_layout(ty, cols as u64, rows as u64, cols as i64).map_err(|e| anyhow!("cuBLASLt layout: {e}"))
}

/// cublasOperation_t as the descriptor attribute stores it: 0 = N, 1 = T.
fn op(t: bool) -> i32 {
    t as i32
}

impl Blas {
    pub fn new(gpu: &Gpu) -> Result<Blas> {
        gpu.ctx.bind_to_thread()?;
        let handle = lt::create_handle().map_err(|e| anyhow!("cuBLASLt: cannot create a handle ({e})"))?;
        // NVIDIA's recommendation: 32 MiB of workspace on Hopper, 4 MiB before it.
        let (major, _) = gpu.ctx.compute_capability()?;
        let bytes = if major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = gpu.stream.alloc_zeros::<u8>(bytes)?;
        let autotune = std::env::var("KILN_GEMM_AUTOTUNE").map_or(true, |v| v != "0");
        Ok(Blas { handle, workspace, plans: Mutex::new(HashMap::new()), autotune, tuned: Mutex::new(Vec::new()) })
    }

    /// Every shape timed so far, in the order first seen.
    pub fn tuning(&self) -> Vec<Tuned> {
        self.tuned.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn plan(&self, key: PlanKey) -> Result<Plan> {
        let PlanKey { m, n, k, trans_a, trans_b, .. } = key;
        let out_type = if key.out_type == 0 { sys::cudaDataType::CUDA_R_32F } else { sys::cudaDataType::CUDA_R_16BF };
        let bf = sys::cudaDataType::CUDA_R_16BF;
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
            .map_err(|e| anyhow!("cuBLASLt matmul descriptor: {e}"))?;
        // cuBLAS's A is kiln's b (stored [n,k], or [k,n] when not transposed) and its B is kiln's a.
        let (ta, tb) = (op(trans_b), op(trans_a));
        let a = if trans_b { layout(bf, n, k)? } else { layout(bf, k, n)? };
        let b = if trans_a { layout(bf, k, m)? } else { layout(bf, m, k)? };
        let c = layout(out_type, m, n)?;
        let mut plan = Plan { desc, a, b, c, candidates: Vec::new(), chosen: 0 };
        let attr = |which, v: &i32| {
            // SAFETY: the descriptor is live; the attribute takes one 32-bit cublasOperation_t.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    which,
                    v as *const _ as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            }
        };
        attr(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &ta)
            .and_then(|_| attr(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &tb))
            .map_err(|e| anyhow!("cuBLASLt transpose attributes: {e}"))?;
        let pref = lt::create_matmul_pref().map_err(|e| anyhow!("cuBLASLt preference: {e}"))?;
        let ws = self.workspace.len() as u64;
        let wanted =
            if self.autotune && 2.0 * (key.m * key.n * key.k) as f64 >= TUNE_MIN_FLOPS { CANDIDATES } else { 1 };
        // SAFETY: a zeroed heuristic result is a valid bit pattern (plain integers and arrays).
        let mut results = vec![unsafe { std::mem::zeroed::<sys::cublasLtMatmulHeuristicResult_t>() }; wanted];
        let mut found = 0i32;
        // SAFETY: live descriptors; the attribute is a u64 byte count; `results` holds `wanted`
        // entries and cuBLASLt writes at most that many; `pref` is destroyed below.
        let status = unsafe {
            let r = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
            .map(|_| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.c,
                    plan.c,
                    pref,
                    wanted as i32,
                    results.as_mut_ptr(),
                    &mut found,
                )
            });
            let _ = lt::destroy_matmul_pref(pref);
            r
        };
        let ok = sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
        let status = status.map_err(|e| anyhow!("cuBLASLt preference: {e}"))?;
        plan.candidates = results
            .iter()
            .take(found.max(0) as usize)
            .filter(|r| r.state == ok && r.workspaceSize <= self.workspace.len())
            .map(|r| r.algo)
            .collect();
        if status != ok || plan.candidates.is_empty() {
            bail!("cuBLASLt has no algorithm for a {m}x{n}x{k} bf16 GEMM ({status:?})");
        }
        Ok(plan)
    }

    /// Runs `plan` with candidate `which`: `out = op(a)·op(b) + beta·C` on the stream, where C is
    /// `addend` when given (`beta = 1`), else `out` itself (`beta = 1` when accumulating, else 0).
    #[allow(clippy::too_many_arguments)]
    fn launch<O: GemmOut>(
        &self,
        gpu: &Gpu,
        plan: &Plan,
        which: usize,
        out: &mut CudaSlice<O>,
        addend: Option<&CudaSlice<O>>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        g: Gemm,
    ) -> Result<()> {
        let accumulate = g.accumulate || addend.is_some();
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0f32 });
        let s = &gpu.stream;
        let (pa, _ra) = a.device_ptr(s);
        let (pb, _rb) = b.device_ptr(s);
        let addend = addend.map(|c| c.device_ptr(s));
        let (po, _ro) = out.device_ptr_mut(s);
        let pc = addend.as_ref().map_or(po, |(p, _)| *p);
        let (pw, _rw) = self.workspace.device_ptr(s);
        // SAFETY: the plan's layouts match these buffers (sizes checked by `matmul_into`); cuBLAS's
        // A is kiln's b and its B is kiln's a (see the module comment); C is `addend` or aliases D,
        // which cuBLASLt allows when their layouts are equal (they share `plan.c`); the workspace
        // is only used on this stream.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                pb as *const c_void,
                plan.a,
                pa as *const c_void,
                plan.b,
                pc as *const c_void,
                plan.c,
                po as *mut c_void,
                plan.c,
                &plan.candidates[which],
                pw as *mut c_void,
                self.workspace.len(),
                s.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| anyhow!("cuBLASLt matmul {}x{}x{}: {e}", g.m, g.n, g.k))
    }

    /// Times every candidate of a new plan on the real operands and picks the fastest. Trials
    /// write `out` when the GEMM overwrites it anyway, else a scratch copy of its shape, so an
    /// accumulating GEMM's target is untouched. A candidate that fails to run is skipped.
    fn tune<O: GemmOut>(
        &self,
        gpu: &Gpu,
        plan: &mut Plan,
        out: &mut CudaSlice<O>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        g: Gemm,
    ) -> Result<()> {
        if plan.candidates.len() < 2 || (g.accumulate && g.m * g.n * std::mem::size_of::<O>() > TUNE_SCRATCH_MAX_BYTES)
        {
            return Ok(());
        }
        let mut scratch = if g.accumulate { Some(gpu.stream.alloc_zeros::<O>(g.m * g.n)?) } else { None };
        let target = scratch.as_mut().unwrap_or(out);
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (gpu.ctx.new_event(timing)?, gpu.ctx.new_event(timing)?);
        let mut times = Vec::with_capacity(plan.candidates.len());
        for which in 0..plan.candidates.len() {
            let mut run = || -> Result<f32> {
                self.launch(gpu, plan, which, target, None, a, b, g)?;
                start.record(&gpu.stream)?;
                for _ in 0..TIMED_RUNS {
                    self.launch(gpu, plan, which, target, None, a, b, g)?;
                }
                end.record(&gpu.stream)?;
                Ok(start.elapsed_ms(&end)? / TIMED_RUNS as f32)
            };
            times.push(run().unwrap_or(f32::INFINITY));
        }
        gpu.synchronize()?;
        let best = (0..times.len()).min_by(|&i, &j| times[i].total_cmp(&times[j])).unwrap_or(0);
        if !times[best].is_finite() {
            bail!("cuBLASLt: no candidate algorithm runs a {}x{}x{} bf16 GEMM", g.m, g.n, g.k);
        }
        plan.chosen = best;
        let tuned = Tuned {
            shape: PlanKey::of::<O>(g),
            candidates: times.len(),
            chosen: best,
            first_ms: times[0],
            best_ms: times[best],
        };
        self.tuned.lock().map_err(|_| anyhow!("GEMM tuning record poisoned"))?.push(tuned);
        Ok(())
    }

    /// `out (+)= op(a) · op(b)` per `g` (see [`Gemm`]), bf16 operands, f32 accumulation.
    pub fn matmul<O: GemmOut>(
        &self,
        gpu: &Gpu,
        out: &mut CudaSlice<O>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        g: Gemm,
    ) -> Result<()> {
        self.matmul_into(gpu, out, None, a, b, g)
    }

    /// `out = residual + op(a) · op(b)` in one pass: cuBLASLt reads C from `residual`.
    pub fn matmul_residual<O: GemmOut>(
        &self,
        gpu: &Gpu,
        out: &mut CudaSlice<O>,
        residual: &CudaSlice<O>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        g: Gemm,
    ) -> Result<()> {
        if residual.len() < g.m * g.n {
            bail!("matmul {}x{}x{}: a residual of {} values is too small", g.m, g.n, g.k, residual.len());
        }
        self.matmul_into(gpu, out, Some(residual), a, b, g.accumulating())
    }

    fn matmul_into<O: GemmOut>(
        &self,
        gpu: &Gpu,
        out: &mut CudaSlice<O>,
        addend: Option<&CudaSlice<O>>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        g: Gemm,
    ) -> Result<()> {
        if a.len() < g.m * g.k || b.len() < g.k * g.n || out.len() < g.m * g.n {
            bail!(
                "matmul {}x{}x{}: buffers of {}, {} and {} values are too small",
                g.m,
                g.n,
                g.k,
                a.len(),
                b.len(),
                out.len()
            );
        }
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        gpu.ctx.bind_to_thread()?;
        if g.k == 0 {
            // An empty sum (cuBLASLt rejects the zero-size operand layouts): out = residual, out
            // unchanged, or out = 0, as the CPU backend does.
            let mut out = out.slice_mut(..g.m * g.n);
            return match addend {
                Some(r) => gpu.stream.memcpy_dtod(&r.slice(..g.m * g.n), &mut out),
                None if g.accumulate => Ok(()),
                None => gpu.stream.memset_zeros(&mut out),
            }
            .map_err(|e| anyhow!("matmul {}x{}x0: {e}", g.m, g.n));
        }
        let key = PlanKey::of::<O>(g);
        let mut plans = self.plans.lock().map_err(|_| anyhow!("cuBLASLt plan cache poisoned"))?;
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut plan = self.plan(key)?;
                self.tune(gpu, &mut plan, out, a, b, g)?;
                e.insert(plan)
            }
        };
        self.launch(gpu, plan, plan.chosen, out, addend, a, b, g)
    }
}
