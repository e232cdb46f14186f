//! Launcher for `kernels/adamw.cu`: one launch updates every tensor (a chunk table, one block per chunk).

use super::device::Gpu;
use super::kernels::Kernel;
use anyhow::Result;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

pub const KERNEL: Kernel =
    Kernel { name: "adamw", source: include_str!("../../../kernels/adamw.cu"), entries: &["adamw_multi"] };

use crate::backend::AdamW;
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};

/// Values per chunk: one block each.
pub const CHUNK: usize = 1 << 16;

/// Mirrors `struct AdamChunk` in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct AdamChunk {
    param: u64,
    grad: u64,
    m: u64,
    v: u64,
    param_bf16: u64,
    len: i64,
}
// SAFETY: plain-old-data with the kernel's layout.
unsafe impl DeviceRepr for AdamChunk {}

/// Mirrors `struct AdamHp` in the kernel.
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamHp {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    grad_scale: f32,
}
// SAFETY: as above.
unsafe impl DeviceRepr for AdamHp {}

/// One tensor's buffers: f32 master weights, gradient and moments, and optionally the bf16 copy
/// to refresh.
pub struct AdamTensor<'a> {
    pub param: &'a mut CudaSlice<f32>,
    pub grad: &'a CudaSlice<f32>,
    pub m: &'a mut CudaSlice<f32>,
    pub v: &'a mut CudaSlice<f32>,
    pub param_bf16: Option<&'a mut CudaSlice<half::bf16>>,
}

/// AdamW on every tensor in one launch; `hp.grad_scale` folds in global-norm clipping.
pub fn step(gpu: &Gpu, tensors: &mut [AdamTensor<'_>], hp: AdamW) -> Result<()> {
    let t = hp.step as i32;
    let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(t);
    let h = AdamHp {
        lr: hp.lr,
        beta1: hp.beta1,
        beta2: hp.beta2,
        eps: hp.eps,
        weight_decay: hp.weight_decay,
        step_size: (hp.lr as f64 / bc1) as f32,
        bc2_sqrt: bc2.sqrt() as f32,
        grad_scale: hp.grad_scale,
    };
    let s = &gpu.stream;
    let mut chunks = Vec::new();
    for tensor in tensors.iter_mut() {
        let n = tensor.param.len();
        let (p, _rp) = tensor.param.device_ptr_mut(s);
        let (g, _rg) = tensor.grad.device_ptr(s);
        let (m, _rm) = tensor.m.device_ptr_mut(s);
        let (v, _rv) = tensor.v.device_ptr_mut(s);
        let pb = match tensor.param_bf16.as_mut() {
            Some(b) => b.device_ptr_mut(s).0,
            None => 0,
        };
        for start in (0..n).step_by(CHUNK) {
            let off = |base: u64, elem: usize| if base == 0 { 0 } else { base + (start * elem) as u64 };
            chunks.push(AdamChunk {
                param: off(p, 4),
                grad: off(g, 4),
                m: off(m, 4),
                v: off(v, 4),
                param_bf16: off(pb, 2),
                len: (n - start).min(CHUNK) as i64,
            });
        }
    }
    if chunks.is_empty() {
        return Ok(());
    }
    let table = s.clone_htod(&chunks)?;
    let f = gpu.function("adamw_multi")?;
    let cfg = LaunchConfig { grid_dim: (chunks.len() as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the table's pointers stay valid: every buffer is borrowed for this call and the
    // stream orders the launch before any later use.
    unsafe { s.launch_builder(f).arg(&table).arg(&h).launch(cfg) }?;
    Ok(())
}
