//! Launcher for `kernels/cross_entropy.cu`: softmax cross-entropy fused with its in-place gradient.

use super::device::{Elem, Gpu};
use super::kernels::Kernel;
use anyhow::Result;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

pub const KERNEL: Kernel = Kernel {
    name: "cross_entropy",
    source: include_str!("../../../kernels/cross_entropy.cu"),
    entries: &["cross_entropy_f32", "cross_entropy_bf16"],
};

/// Per-row losses into `loss`; with `grad_scale`, `logits` becomes `scale · (softmax − onehot)`.
pub fn forward<T: Elem>(
    gpu: &Gpu,
    logits: &mut CudaSlice<T>,
    loss: &mut CudaSlice<f32>,
    targets: &CudaSlice<i32>,
    vocab: usize,
    grad_scale: Option<f32>,
) -> Result<()> {
    let f = gpu.function(&format!("cross_entropy_{}", T::SUFFIX))?;
    let rows = targets.len();
    if rows == 0 {
        return Ok(()); // an empty grid is a launch error
    }
    let (v, scale, want) = (vocab as i32, grad_scale.unwrap_or(0.0), grad_scale.is_some() as i32);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: argument order and types match the kernel; logits is [rows, vocab].
    unsafe {
        gpu.stream.launch_builder(f).arg(logits).arg(loss).arg(targets).arg(&v).arg(&scale).arg(&want).launch(cfg)
    }?;
    Ok(())
}
