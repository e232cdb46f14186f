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

pub fn forward<T: Elem>(gpu: &Gpu, out: &mut CudaSlice<T>, gate: &CudaSlice<T>, up: &CudaSlice<T>) -> Result<()> {
    if gate.len() != out.len() || up.len() != out.len() {
        anyhow::bail!("swiglu: buffers of {}, {} and {} values", out.len(), gate.len(), up.len());
    }
    let f = gpu.function(&format!("swiglu_fwd_{}", T::SUFFIX))?;
    let n = out.len() as i64;
    let cfg = elementwise_config((n as usize).div_ceil(T::PER_THREAD));
    // SAFETY: argument order and types match the kernel; all three hold n values.
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
) -> Result<()> {
    let n = dout.len();
    if [dgate.len(), dup.len(), gate.len(), up.len()].iter().any(|&l| l != n) {
        anyhow::bail!("swiglu backward: buffers of unequal length");
    }
    let f = gpu.function(&format!("swiglu_bwd_{}", T::SUFFIX))?;
    let n = n as i64;
    // SAFETY: as above.
    unsafe {
        gpu.stream
            .launch_builder(f)
            .arg(dgate)
            .arg(dup)
            .arg(dout)
            .arg(gate)
            .arg(up)
            .arg(&n)
            .launch(elementwise_config((n as usize).div_ceil(T::PER_THREAD)))
    }?;
    Ok(())
}
