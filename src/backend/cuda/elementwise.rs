//! Launcher for `kernels/elementwise.cu`: accumulate, squared norm, embedding gather / scatter-add.

use super::device::{elementwise_config, reduction_config, Elem, Gpu};
use super::kernels::Kernel;
use anyhow::Result;
use cudarc::driver::{CudaSlice, PushKernelArg};

pub const KERNEL: Kernel = Kernel {
    name: "elementwise",
    source: include_str!("../../../kernels/elementwise.cu"),
    entries: &[
        "add_assign_f32",
        "add_assign_bf16",
        "sum_squares_f32",
        "embedding_fwd_f32",
        "embedding_fwd_bf16",
        "embedding_bwd_f32",
        "embedding_bwd_bf16",
    ],
};

pub fn add_assign<T: Elem>(gpu: &Gpu, dst: &mut CudaSlice<T>, src: &CudaSlice<T>) -> Result<()> {
    if src.len() != dst.len() {
        anyhow::bail!("add_assign: {} values += {} values", dst.len(), src.len());
    }
    let n = dst.len() as i64;
    let f = gpu.function(&format!("add_assign_{}", T::SUFFIX))?;
    // SAFETY: argument order and types match the kernel.
    unsafe { gpu.stream.launch_builder(f).arg(dst).arg(src).arg(&n).launch(elementwise_config(n as usize)) }?;
    Ok(())
}

/// Σ buf², in f64.
pub fn sum_squares(gpu: &Gpu, buf: &CudaSlice<f32>) -> Result<f64> {
    sum_squares_all(gpu, &[buf])
}

/// Σ over every buffer of Σ buf², into one device accumulator: one host wait in all.
pub fn sum_squares_all(gpu: &Gpu, bufs: &[&CudaSlice<f32>]) -> Result<f64> {
    let mut out = gpu.stream.alloc_zeros::<f64>(1)?;
    let f = gpu.function("sum_squares_f32")?;
    for buf in bufs {
        let n = buf.len() as i64;
        // SAFETY: argument order and types match the kernel, which adds its partial sums into
        // `out`; the block size is a multiple of 32 (its reduction needs it).
        unsafe {
            gpu.stream.launch_builder(f).arg(&mut out).arg(*buf).arg(&n).launch(reduction_config(gpu, n as usize))
        }?;
    }
    Ok(gpu.stream.clone_dtoh(&out)?[0])
}

/// Both embedding kernels take `(dst, src, ids, rows, d)` and touch `rows · d` values.
fn embedding<D: cudarc::driver::DeviceRepr, S: cudarc::driver::DeviceRepr>(
    gpu: &Gpu,
    entry: &str,
    dst: &mut CudaSlice<D>,
    src: &CudaSlice<S>,
    ids: &CudaSlice<u32>,
    d: usize,
) -> Result<()> {
    let (rows, d32) = (ids.len() as i64, d as i32);
    let f = gpu.function(entry)?;
    // SAFETY: argument order and types match both kernels; ids were checked against the
    // vocabulary by the caller.
    unsafe {
        gpu.stream
            .launch_builder(f)
            .arg(dst)
            .arg(src)
            .arg(ids)
            .arg(&rows)
            .arg(&d32)
            .launch(elementwise_config(ids.len() * d))
    }?;
    Ok(())
}

/// `out[r] = table[ids[r]]`.
pub fn embedding_forward<T: Elem>(
    gpu: &Gpu,
    out: &mut CudaSlice<T>,
    table: &CudaSlice<T>,
    ids: &CudaSlice<u32>,
    d: usize,
) -> Result<()> {
    embedding(gpu, &format!("embedding_fwd_{}", T::SUFFIX), out, table, ids, d)
}

/// `dtable[ids[r]] += dout[r]`, into f32.
pub fn embedding_backward<T: Elem>(
    gpu: &Gpu,
    dtable: &mut CudaSlice<f32>,
    dout: &CudaSlice<T>,
    ids: &CudaSlice<u32>,
    d: usize,
) -> Result<()> {
    embedding(gpu, &format!("embedding_bwd_{}", T::SUFFIX), dtable, dout, ids, d)
}
