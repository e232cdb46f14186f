//! Launcher for `kernels/rope.cu`: rotary embedding in place (backward: `inverse`).

use super::device::{elementwise_config, Elem, Gpu};
use super::kernels::Kernel;
use anyhow::Result;
use cudarc::driver::{CudaSlice, PushKernelArg};

pub const KERNEL: Kernel =
    Kernel { name: "rope", source: include_str!("../../../kernels/rope.cu"), entries: &["rope_f32", "rope_bf16"] };

use crate::backend::RopeShape;

pub fn apply<T: Elem>(
    gpu: &Gpu,
    x: &mut CudaSlice<T>,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    s: RopeShape,
    inverse: bool,
) -> Result<()> {
    // Buffer lengths are checked by the engine (`fits`); the kernel also needs pairs and positions.
    if !s.head_dim.is_multiple_of(2) || (s.seq == 0 && s.rows > 0) {
        anyhow::bail!("rope: head_dim {} must be even and seq {} positive", s.head_dim, s.seq);
    }
    let f = gpu.function(&format!("rope_{}", T::SUFFIX))?;
    let (rows, seq, pos0, nh, hd, inv) =
        (s.rows as i64, s.seq as i32, s.pos0 as i32, s.n_head as i32, s.head_dim as i32, inverse as i32);
    // The bf16 kernel takes eight pairs per thread when head_dim/2 is a multiple of 8.
    let per_thread = if (s.head_dim / 2).is_multiple_of(8) { T::PER_THREAD } else { 1 };
    let cfg = elementwise_config((s.rows * s.n_head * s.head_dim / 2).div_ceil(per_thread));
    // SAFETY: argument order and types match the kernel.
    unsafe {
        gpu.stream
            .launch_builder(f)
            .arg(x)
            .arg(cos)
            .arg(sin)
            .arg(&rows)
            .arg(&seq)
            .arg(&pos0)
            .arg(&nh)
            .arg(&hd)
            .arg(&inv)
            .launch(cfg)
    }?;
    Ok(())
}
