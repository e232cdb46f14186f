//! Launcher for `kernels/rope.cu`: rotary embedding in place (backward: `inverse`), and from an
//! f32 buffer into bf16 (the attention backward's dQ, rotated back as it is rounded).

use super::device::{elementwise_config, Elem, Gpu};
use super::kernels::Kernel;
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};
use half::bf16;

pub const KERNEL: Kernel = Kernel {
    name: "rope",
    source: include_str!("../../../kernels/rope.cu"),
    entries: &["rope_f32", "rope_bf16", "rope_f32_to_bf16"],
};

use crate::backend::RopeShape;

/// The rotary angles of every position, `[max_pos, head_dim / 2]` each.
#[derive(Clone, Copy)]
pub struct Tables<'a> {
    pub cos: &'a CudaSlice<f32>,
    pub sin: &'a CudaSlice<f32>,
}

/// Rotates `x` in place.
pub fn apply<T: Elem>(
    gpu: &Gpu,
    x: &mut CudaSlice<T>,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    s: RopeShape,
    inverse: bool,
) -> Result<()> {
    // Buffer lengths are checked by the engine (`fits`); the kernel also needs pairs and positions.
    let a = RopeArgs::new(&s, inverse, T::PER_THREAD)?;
    let f = gpu.function(&format!("rope_{}", T::SUFFIX))?;
    // SAFETY: argument order and types match the kernel.
    unsafe { gpu.stream.launch_builder(f).arg(x).arg(cos).arg(sin).push_rope(&a).launch(a.cfg) }?;
    Ok(())
}

/// `out = rope(x)` rounded to bf16 once: a cast and a rotation in one pass. Checks every length
/// itself (its caller, the attention backward, holds `x` as a private accumulator).
pub fn from_f32(
    gpu: &Gpu,
    out: &mut CudaSlice<bf16>,
    x: &CudaSlice<f32>,
    t: Tables<'_>,
    s: RopeShape,
    inverse: bool,
) -> Result<()> {
    let a = RopeArgs::new(&s, inverse, bf16::PER_THREAD)?;
    let (n, angles) = (s.values(), s.angles());
    if x.len() < n || out.len() < n || t.cos.len() < angles || t.sin.len() < angles {
        bail!(
            "rope: {s:?} needs {n} values and {angles} angles; got {} in, {} out, {} cos, {} sin",
            x.len(),
            out.len(),
            t.cos.len(),
            t.sin.len()
        );
    }
    let f = gpu.function("rope_f32_to_bf16")?;
    // SAFETY: argument order and types match the kernel; every length was checked above.
    unsafe { gpu.stream.launch_builder(f).arg(out).arg(x).arg(t.cos).arg(t.sin).push_rope(&a).launch(a.cfg) }?;
    Ok(())
}

/// The scalar tail every rope kernel takes after its buffers and tables (rows as `long`, then
/// seq, pos0, n_head, head_dim, inverse as `int`), and the launch shape.
struct RopeArgs {
    rows: i64,
    ints: [i32; 5],
    cfg: LaunchConfig,
}

impl RopeArgs {
    /// `per_thread`: pairs a thread takes on the kernel's vector path, used when head_dim/2 is a
    /// multiple of 8.
    fn new(s: &RopeShape, inverse: bool, per_thread: usize) -> Result<Self> {
        if !s.head_dim.is_multiple_of(2) || (s.seq == 0 && s.rows > 0) {
            bail!("rope: head_dim {} must be even and seq {} positive", s.head_dim, s.seq);
        }
        let per_thread = if (s.head_dim / 2).is_multiple_of(8) { per_thread } else { 1 };
        let ints = [s.seq as i32, s.pos0 as i32, s.n_head as i32, s.head_dim as i32, inverse as i32];
        let cfg = elementwise_config((s.rows * s.n_head * s.head_dim / 2).div_ceil(per_thread));
        Ok(RopeArgs { rows: s.rows as i64, ints, cfg })
    }
}

trait PushRope<'a> {
    fn push_rope(&mut self, a: &'a RopeArgs) -> &mut Self;
}

impl<'a> PushRope<'a> for LaunchArgs<'a> {
    fn push_rope(&mut self, a: &'a RopeArgs) -> &mut Self {
        self.arg(&a.rows);
        for x in &a.ints {
            self.arg(x);
        }
        self
    }
}
