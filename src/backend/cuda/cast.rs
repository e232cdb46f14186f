//! Launcher for `kernels/cast.cu`: f32 ↔ bf16.

use super::device::{elementwise_config, Gpu};
use super::kernels::Kernel;
use anyhow::Result;
use cudarc::driver::{CudaSlice, PushKernelArg};

pub const KERNEL: Kernel = Kernel {
    name: "cast",
    source: include_str!("../../../kernels/cast.cu"),
    entries: &["cast_f32_to_bf16", "cast_bf16_to_f32"],
};

use half::bf16;

pub fn to_bf16(gpu: &Gpu, out: &mut CudaSlice<bf16>, input: &CudaSlice<f32>) -> Result<()> {
    if out.len() < input.len() {
        anyhow::bail!("cast: {} values into {}", input.len(), out.len());
    }
    let n = input.len() as i64;
    let f = gpu.function("cast_f32_to_bf16")?;
    // SAFETY: argument order and types match the kernel.
    unsafe { gpu.stream.launch_builder(f).arg(out).arg(input).arg(&n).launch(elementwise_config(n as usize)) }?;
    Ok(())
}

pub fn to_f32(gpu: &Gpu, out: &mut CudaSlice<f32>, input: &CudaSlice<bf16>) -> Result<()> {
    if out.len() < input.len() {
        anyhow::bail!("cast: {} values into {}", input.len(), out.len());
    }
    let n = input.len() as i64;
    let f = gpu.function("cast_bf16_to_f32")?;
    // SAFETY: as above.
    unsafe { gpu.stream.launch_builder(f).arg(out).arg(input).arg(&n).launch(elementwise_config(n as usize)) }?;
    Ok(())
}
