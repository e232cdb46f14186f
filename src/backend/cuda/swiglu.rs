//! Launcher for `kernels/swiglu.cu`: SwiGLU forward and backward (bf16: eight values per thread).

use super::device::{elementwise_config, Elem, Gpu};
use super::kernels::Kernel;
use anyhow::Result;
use cudarc::driver::{CudaSlice, PushKernelArg};

pub const KERNEL: Kernel = Kernel {
    name: "swiglu",
    source: include_str!("../../../kernels/swiglu.cu"),
    entries: &["swiglu_fwd_f32", "swiglu_fwd_bf16", "swiglu_bwd_f32", "swiglu_bwd_bf16"],
};

/// `out = silu(gate) * up` over the first `n` values.
pub fn forward<T: Elem>(
    gpu: &Gpu,
    out: &mut CudaSlice<T>,
    gate: &CudaSlice<T>,
    up: &CudaSlice<T>,
    n: usize,
) -> Result<()> {
    if [out.len(), gate.len(), up.len()].iter().any(|&l| l < n) {
        anyhow::bail!("swiglu: {n} values asked of buffers of {}, {} and {}", out.len(), gate.len(), up.len());
    }
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&format!("swiglu_fwd_{}", T::SUFFIX))?;
    let cfg = elementwise_config(n.div_ceil(T::PER_THREAD));
    let n = n as i64;
    // SAFETY: argument order and types match the kernel; all three hold at least n values.
    unsafe { gpu.stream.launch_builder(f).arg(out).arg(gate).arg(up).arg(&n).launch(cfg) }?;
    Ok(())
}

pub fn backward<T: Elem>(
    gpu: &Gpu,
    dgate: &mut CudaSlice<T>,
    dup: &mut CudaSlice<T>,
    dout: &CudaSlice<T>,
    gate: &CudaSlice<T>,
    up: &CudaSlice<T>,
    n: usize,
) -> Result<()> {
    if [dgate.len(), dup.len(), dout.len(), gate.len(), up.len()].iter().any(|&l| l < n) {
        anyhow::bail!("swiglu backward: {n} values asked of a shorter buffer");
    }
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&format!("swiglu_bwd_{}", T::SUFFIX))?;
    let cfg = elementwise_config(n.div_ceil(T::PER_THREAD));
    let n = n as i64;
    // SAFETY: as above.
    unsafe { gpu.stream.launch_builder(f).arg(dgate).arg(dup).arg(dout).arg(gate).arg(up).arg(&n).launch(cfg) }?;
    Ok(())
}
