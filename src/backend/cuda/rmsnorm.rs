//! Launcher for `kernels/rmsnorm.cu`: fused RMSNorm forward and backward.

use super::device::{Elem, Gpu};
use super::kernels::Kernel;
use anyhow::Result;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

pub const KERNEL: Kernel = Kernel {
    name: "rmsnorm",
    source: include_str!("../../../kernels/rmsnorm.cu"),
    entries: &["rmsnorm_fwd_f32", "rmsnorm_fwd_bf16", "rmsnorm_bwd_f32", "rmsnorm_bwd_bf16"],
};

/// Rows one backward block handles: fewer atomics on `dw`, enough blocks to fill the GPU.
const ROWS_PER_BLOCK: usize = 32;

/// Threads per row: d/8 when d is a multiple of 256 (at most 4096), which puts the bf16 kernels
/// on their 16-byte path (one chunk of 8 values per thread, the row read once); else 256. Blocks
/// stay at 512 threads or fewer, so the kernels never need more registers than a block of 1024
/// could have (they carry no `__launch_bounds__`).
fn threads_for(d: usize) -> u32 {
    if d.is_multiple_of(256) && d / 8 <= 512 {
        (d / 8) as u32
    } else {
        256
    }
}

#[allow(clippy::too_many_arguments)]
pub fn forward<T: Elem>(
    gpu: &Gpu,
    out: &mut CudaSlice<T>,
    rstd: &mut CudaSlice<f32>,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    if rows == 0 {
        return Ok(()); // an empty grid is a launch error
    }
    let f = gpu.function(&format!("rmsnorm_fwd_{}", T::SUFFIX))?;
    let d32 = d as i32;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads_for(d), 1, 1), shared_mem_bytes: 0 };
    // SAFETY: argument order and types match the kernel; sizes are the caller's [rows, d].
    unsafe { gpu.stream.launch_builder(f).arg(out).arg(rstd).arg(x).arg(w).arg(&d32).arg(&eps).launch(cfg) }?;
    Ok(())
}

/// `dx += ∂L/∂x`, `dw += ∂L/∂w` (f32).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Elem>(
    gpu: &Gpu,
    dx: &mut CudaSlice<T>,
    dw: &mut CudaSlice<f32>,
    dy: &CudaSlice<T>,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    rstd: &CudaSlice<f32>,
    rows: usize,
    d: usize,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    // One f32 per column of dynamic shared memory: past 48 KiB (d > 12288) the limit must be raised.
    let f = gpu.function_with_shared(&format!("rmsnorm_bwd_{}", T::SUFFIX), d * 4)?;
    let (rows32, d32, per) = (rows as i32, d as i32, ROWS_PER_BLOCK as i32);
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
        block_dim: (threads_for(d), 1, 1),
        shared_mem_bytes: (d * 4) as u32,
    };
    // SAFETY: as above; the dynamic shared memory holds one f32 per column.
    unsafe {
        gpu.stream
            .launch_builder(f)
            .arg(dx)
            .arg(dw)
            .arg(dy)
            .arg(x)
            .arg(w)
            .arg(rstd)
            .arg(&rows32)
            .arg(&d32)
            .arg(&per)
            .launch(cfg)
    }?;
    Ok(())
}
