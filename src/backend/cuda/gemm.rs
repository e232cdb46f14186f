//! GEMMs through cuBLASLt: bf16 operands, f32 accumulation, a bf16 or f32 result, and `beta = 1`
//! when the backend's `Gemm` asks to accumulate (the residual adds of the `o` and `down`
//! projections, gradient accumulation into f32 weight gradients), so no separate add pass runs.
//!
//! cuBLASLt is column-major and kiln is row-major. A row-major `X[r, c]` is, byte for byte, the
//! column-major `Xᵀ[c, r]`, so `out = op(a) · op(b)` is computed as `outᵀ = op(b)ᵀ · op(a)ᵀ`:
//! cuBLAS's `A` is kiln's `b`, its `B` is kiln's `a`, and the transposes carry over unchanged.
//! Each distinct shape gets a plan (descriptors plus the heuristic's algorithm) once, then reuses it.

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

/// Result types a GEMM may write.
pub trait GemmOut: Elem {
    const DATA_TYPE: sys::cudaDataType;
}
impl GemmOut for bf16 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
}
impl GemmOut for f32 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    out_type: i32,
}

/// Descriptors and the chosen algorithm for one shape; destroyed with the plan.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
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
}

// SAFETY: the handle and the descriptors are only used under `plans`' lock or from the one stream
// the backend enqueues on; cuBLASLt handles may be shared across threads.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.get_mut().map(|p| p.clear()).unwrap_or_default();
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
        Ok(Blas { handle, workspace, plans: Mutex::new(HashMap::new()) })
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
        let mut plan = Plan { desc, a, b, c, algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] } };
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
        // SAFETY: live descriptors; the attribute is a u64 byte count; `pref` is destroyed below.
        let heuristic = unsafe {
            let r = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
            .and_then(|_| lt::get_matmul_algo_heuristic(self.handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref));
            let _ = lt::destroy_matmul_pref(pref);
            r
        };
        let h = heuristic.map_err(|e| anyhow!("cuBLASLt has no algorithm for a {m}x{n}x{k} bf16 GEMM ({e})"))?;
        plan.algo = h.algo;
        Ok(plan)
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
        let key = PlanKey {
            m: g.m,
            n: g.n,
            k: g.k,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            out_type: if O::DATA_TYPE == sys::cudaDataType::CUDA_R_32F { 0 } else { 1 },
        };
        let mut plans = self.plans.lock().map_err(|_| anyhow!("cuBLASLt plan cache poisoned"))?;
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(key)?),
        };
        let plan = &*plan;
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0f32 });
        let s = &gpu.stream;
        let (pa, _ra) = a.device_ptr(s);
        let (pb, _rb) = b.device_ptr(s);
        let (po, _ro) = out.device_ptr_mut(s);
        let (pw, _rw) = self.workspace.device_ptr(s);
        // SAFETY: the plan's layouts match these buffers (sizes checked above); cuBLAS's A is
        // kiln's b and its B is kiln's a (see the module comment); C and D alias, which cuBLASLt
        // allows when their layouts are equal; the workspace is only used on this stream.
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
                po as *const c_void,
                plan.c,
                po as *mut c_void,
                plan.c,
                &plan.algo,
                pw as *mut c_void,
                self.workspace.len(),
                s.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| anyhow!("cuBLASLt matmul {}x{}x{}: {e}", g.m, g.n, g.k))
    }
}
