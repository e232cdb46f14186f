//! The CUDA backend's buffer: device memory in the precision its [`Role`] asks for, counted so the
//! engine can report live and peak bytes.
//!
//! - activations: bf16;
//! - statistics, gradients, optimizer moments: f32;
//! - parameters: f32 master weights plus the bf16 copy every op reads, both refreshed by AdamW.

use crate::backend::Role;
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, CudaStream, DriverError};
use half::bf16;
use std::sync::Arc;

pub use crate::backend::MemStats;

pub enum Data {
    Bf16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
    Param { master: CudaSlice<f32>, compute: CudaSlice<bf16> },
}

/// The storage `role` gets (see the module comment), its slices made by `half` (bf16) and
/// `single` (f32).
fn by_role<E>(
    role: Role,
    half: impl Fn() -> Result<CudaSlice<bf16>, E>,
    single: impl Fn() -> Result<CudaSlice<f32>, E>,
) -> Result<Data, E> {
    Ok(match role {
        Role::Activation => Data::Bf16(half()?),
        Role::Stats | Role::Accum => Data::F32(single()?),
        Role::Param => Data::Param { master: single()?, compute: half()? },
    })
}

impl Data {
    /// `len` zeros in the storage `role` gets.
    pub fn zeros(s: &Arc<CudaStream>, len: usize, role: Role) -> Result<Data, DriverError> {
        by_role(role, || s.alloc_zeros(len), || s.alloc_zeros(len))
    }

    /// `len` values in the storage `role` gets, left as the allocator hands them over.
    ///
    /// # Safety
    /// Device memory, not Rust values, so nothing is undefined in Rust's sense; but the caller
    /// must write every element before reading one, or it reads garbage.
    pub unsafe fn unset(s: &Arc<CudaStream>, len: usize, role: Role) -> Result<Data, DriverError> {
        // SAFETY: passed on to the caller (above).
        by_role(role, || unsafe { s.alloc(len) }, || unsafe { s.alloc(len) })
    }

    /// `values` in the storage `role` gets (rounded to bf16 where it is bf16).
    pub fn upload(s: &Arc<CudaStream>, values: &[f32], role: Role) -> Result<Data, DriverError> {
        let rounded = || s.clone_htod(&values.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>());
        by_role(role, rounded, || s.clone_htod(values))
    }
}

pub struct CudaBuf {
    pub data: Data,
    bytes: usize,
    mem: Arc<MemStats>,
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        self.mem.sub(self.bytes);
        // cudarc frees a slice (stream-ordered, on its own stream) without making its context
        // current; a buffer dropped on a thread bound to another GPU, or to none (FSDP's
        // coordinator, the engine thread), would have the free fail or land on the wrong device.
        let ctx = match &self.data {
            Data::Bf16(s) => s.context(),
            Data::F32(s) | Data::Param { master: s, .. } => s.context(),
        };
        let _ = ctx.bind_to_thread();
    }
}

/// Which storage a role gets.
pub fn storage_of(role: Role) -> &'static str {
    match role {
        Role::Activation => "bf16",
        Role::Stats | Role::Accum => "f32",
        Role::Param => "f32 master + bf16 copy",
    }
}

impl CudaBuf {
    pub fn new(data: Data, mem: Arc<MemStats>) -> CudaBuf {
        let bytes = match &data {
            Data::Bf16(s) => 2 * s.len(),
            Data::F32(s) => 4 * s.len(),
            Data::Param { master, compute } => 4 * master.len() + 2 * compute.len(),
        };
        mem.add(bytes);
        CudaBuf { data, bytes, mem }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            Data::Bf16(s) => s.len(),
            Data::F32(s) => s.len(),
            Data::Param { master, .. } => master.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn kind(&self) -> &'static str {
        match &self.data {
            Data::Bf16(_) => "a bf16 activation",
            Data::F32(_) => "an f32",
            Data::Param { .. } => "a parameter",
        }
    }

    /// The bf16 values an op reads: an activation, or a parameter's compute copy.
    pub fn bf16(&self, what: &str) -> Result<&CudaSlice<bf16>> {
        match &self.data {
            Data::Bf16(s) => Ok(s),
            Data::Param { compute, .. } => Ok(compute),
            Data::F32(_) => bail!("{what}: expected bf16 values, got {} buffer", self.kind()),
        }
    }

    /// A bf16 activation to write. Parameters are written only by AdamW, which keeps the two
    /// copies in step, so they are refused here.
    pub fn bf16_mut(&mut self, what: &str) -> Result<&mut CudaSlice<bf16>> {
        let kind = self.kind();
        match &mut self.data {
            Data::Bf16(s) => Ok(s),
            _ => bail!("{what}: expected a bf16 activation to write, got {kind} buffer"),
        }
    }

    pub fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.data {
            Data::F32(s) => Ok(s),
            _ => bail!("{what}: expected an f32 buffer, got {}", self.kind()),
        }
    }

    pub fn f32_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f32>> {
        let kind = self.kind();
        match &mut self.data {
            Data::F32(s) => Ok(s),
            _ => bail!("{what}: expected an f32 buffer, got {kind}"),
        }
    }
}
