//! Launcher for `kernels/flash_attn.cu`: FlashAttention-2 forward and backward (bf16, head_dim 32, 64 or 128).

use super::device::Gpu;
use super::kernels::Kernel;
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};

pub const KERNEL: Kernel = Kernel {
    name: "flash_attn",
    source: include_str!("../../../kernels/flash_attn.cu"),
    entries: &[
        "flash_attn_fwd_d32",
        "flash_attn_fwd_d64",
        "flash_attn_fwd_d64_2mt",
        "flash_attn_fwd_d128",
        "flash_attn_bwd_delta",
        "flash_attn_bwd_d32",
        "flash_attn_bwd_d64",
        "flash_attn_bwd_d64_2mt",
        "flash_attn_bwd_d128",
    ],
};

use super::cast;
use super::rope;
use crate::backend::AttnShape;
use half::bf16;

const BR: usize = 64;
const BC: usize = 64;

/// A build of a FlashAttention-2 pass. Every head_dim has the plain build; head_dim 64 also has
/// one with two 16-row m-tiles per warp, for the reason `kernels/flash_attn.cu` states (it reads
/// shared memory 40–50% less often per `mma.sync`), which the engine times against the plain one
/// on the card (`attn_tune`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// One m-tile per warp: 64 queries (forward) or 64 keys (backward) per block. The default.
    Plain,
    /// Two m-tiles per warp: 128 queries or keys per block (entry points `_2mt`).
    TwoMTiles,
}

impl Build {
    /// How `kiln bench attention`, `kiln bench train` and the tests name it.
    pub fn label(self) -> &'static str {
        match self {
            Build::Plain => "1 m-tile per warp",
            Build::TwoMTiles => "2 m-tiles per warp",
        }
    }

    /// Query rows (forward) or keys (backward) per block.
    fn rows(self) -> usize {
        match self {
            Build::Plain => BR,
            Build::TwoMTiles => 2 * BR,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Build::Plain => "",
            Build::TwoMTiles => "_2mt",
        }
    }
}

/// The builds of either pass at `head_dim`, the default first.
pub fn builds(head_dim: usize) -> &'static [Build] {
    if head_dim == 64 {
        &[Build::Plain, Build::TwoMTiles]
    } else {
        &[Build::Plain]
    }
}

/// Dynamic shared memory of the forward kernel: two stages of a K and a V tile (rows padded by 8).
fn fwd_shared_bytes(head_dim: usize) -> usize {
    2 * 2 * BC * (head_dim + 8) * 2
}

/// Dynamic shared memory of a backward build (mirrors the layout in the source): K and V tiles of
/// the block's keys, a Q and a dO tile per stage (two stages, one at head_dim 128), dSᵀ, and lse
/// and delta rows per stage.
fn bwd_shared_bytes(head_dim: usize, build: Build) -> usize {
    let (ks, keys, stages) = (head_dim + 8, build.rows(), if head_dim <= 64 { 2 } else { 1 });
    2 * (2 * keys * ks + stages * 2 * BR * ks + keys * (BR + 8)) + 4 * stages * 2 * BR
}

/// The backward builds at `head_dim` worth running on this device: the two-m-tile build only
/// where two of its blocks' shared memory (91 KB each) fit one SM, as on H100/H200 but not A100;
/// with one block per SM it would leave half the SM's warps idle.
pub fn bwd_builds(gpu: &Gpu, head_dim: usize) -> Vec<Build> {
    let fits = |b: Build| {
        b == Build::Plain || 2 * (bwd_shared_bytes(head_dim, b) + gpu.shared_reserved_per_block) <= gpu.shared_per_sm
    };
    builds(head_dim).iter().copied().filter(|&b| fits(b)).collect()
}

/// The kernels index without bounds checks, so every shape and buffer length is checked here.
fn check(s: &AttnShape, q_bufs: &[usize], kv_bufs: &[usize], lse_bufs: &[usize]) -> Result<&'static str> {
    if s.n_kv_head == 0 || !s.n_head.is_multiple_of(s.n_kv_head) {
        bail!("attention: {} heads do not group over {} KV heads", s.n_head, s.n_kv_head);
    }
    if s.kv_len > s.kv_stride || s.q_pos0 + s.q_len > s.kv_len {
        bail!("attention: inconsistent shape {s:?} (need kv_len <= kv_stride and q_pos0 + q_len <= kv_len)");
    }
    let short = |lens: &[usize], need: usize| lens.iter().any(|&n| n < need);
    if short(q_bufs, s.q_elems()) || short(kv_bufs, s.kv_elems()) || short(lse_bufs, s.lse_elems()) {
        bail!("attention: a buffer is smaller than shape {s:?} needs");
    }
    match s.head_dim {
        32 => Ok("d32"),
        64 => Ok("d64"),
        128 => Ok("d128"),
        d => bail!("attention: head_dim {d} has no CUDA kernel (32, 64 or 128)"),
    }
}

/// The entry point of `pass` ("fwd" or "bwd") in `build` for head size `d` ("d64"), which must have it.
fn entry_point(pass: &str, d: &str, head_dim: usize, build: Build) -> Result<String> {
    if !builds(head_dim).contains(&build) {
        bail!("attention: head_dim {head_dim} has no {} build", build.label());
    }
    Ok(format!("flash_attn_{pass}_{d}{}", build.suffix()))
}

/// The head sizes the kernels are built for, checked when a CUDA run starts rather than at its
/// first step (after the run directory is made).
pub fn check_head_dim(cfg: &crate::model::LlamaConfig) -> Result<()> {
    let d = cfg.head_dim();
    if ![32, 64, 128].contains(&d) {
        bail!(
            "model: head_dim {d} (d_model {} / n_head {}) has no CUDA attention kernel; the CUDA backend takes head_dim 32, 64 or 128 (n_head = {} would give 64)",
            cfg.d_model,
            cfg.n_head,
            cfg.d_model / 64
        );
    }
    Ok(())
}

/// The scalar tail of both kernels' parameters: q_len, kv_len, kv_stride, q_pos0, n_head,
/// n_kv_head, then the softmax scale.
struct ShapeArgs {
    ints: [i32; 6],
    scale: f32,
}

impl ShapeArgs {
    fn new(s: &AttnShape) -> Self {
        let ints = [s.q_len, s.kv_len, s.kv_stride, s.q_pos0, s.n_head, s.n_kv_head].map(|x| x as i32);
        ShapeArgs { ints, scale: 1.0 / (s.head_dim as f32).sqrt() }
    }
}

trait PushShape<'a> {
    fn push_shape(&mut self, a: &'a ShapeArgs) -> &mut Self;
}

impl<'a> PushShape<'a> for LaunchArgs<'a> {
    fn push_shape(&mut self, a: &'a ShapeArgs) -> &mut Self {
        for x in &a.ints {
            self.arg(x);
        }
        self.arg(&a.scale)
    }
}

/// `out` and the per-row logsumexp `lse` (natural log) of causal grouped-query attention, through
/// `build` (one of `builds(head_dim)`).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    gpu: &Gpu,
    out: &mut CudaSlice<bf16>,
    lse: &mut CudaSlice<f32>,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    s: AttnShape,
    build: Build,
) -> Result<()> {
    let d = check(&s, &[out.len(), q.len()], &[k.len(), v.len()], &[lse.len()])?;
    let entry = entry_point("fwd", d, s.head_dim, build)?;
    if s.batch == 0 || s.q_len == 0 {
        return Ok(());
    }
    let smem = fwd_shared_bytes(s.head_dim);
    let f = gpu.function_with_shared(&entry, smem)?;
    let per_block = build.rows();
    let shape_args = ShapeArgs::new(&s);
    // Query blocks in the slowest grid dimension: the kernel runs the last (heaviest) ones first.
    let cfg = LaunchConfig {
        grid_dim: (s.n_head as u32, s.batch as u32, s.q_len.div_ceil(per_block) as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: argument order and types match the kernel; buffers hold AttnShape's sizes.
    unsafe { gpu.stream.launch_builder(f).arg(out).arg(lse).arg(q).arg(k).arg(v).push_shape(&shape_args).launch(cfg) }?;
    Ok(())
}

/// Overwrites `dq`, `dk`, `dv` with the gradients of the attention above, through `build` (one of
/// `builds(head_dim)`). With `unrotate`, q was rotated (RoPE) and dQ comes out rotated
/// back, the gradient of the unrotated q: the rotation rides on the f32 → bf16 conversion dQ's
/// accumulator needs anyway, so it costs no pass of its own (and rounds once, not twice).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &Gpu,
    dq: &mut CudaSlice<bf16>,
    dk: &mut CudaSlice<bf16>,
    dv: &mut CudaSlice<bf16>,
    dout: &CudaSlice<bf16>,
    out: &CudaSlice<bf16>,
    lse: &CudaSlice<f32>,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    s: AttnShape,
    build: Build,
    unrotate: Option<rope::Tables<'_>>,
) -> Result<()> {
    let d =
        check(&s, &[dq.len(), dout.len(), out.len(), q.len()], &[dk.len(), dv.len(), k.len(), v.len()], &[lse.len()])?;
    let entry = entry_point("bwd", d, s.head_dim, build)?;
    let st = &gpu.stream;
    if s.batch == 0 || s.q_len == 0 {
        st.memset_zeros(dq)?;
        st.memset_zeros(dk)?;
        st.memset_zeros(dv)?;
        return Ok(());
    }
    // delta = rowsum(dO ∘ O)
    let rows = s.batch * s.q_len * s.n_head;
    let mut delta = st.alloc_zeros::<f32>(s.lse_elems())?;
    let (rows32, ql, nh, hd) = (rows as i32, s.q_len as i32, s.n_head as i32, s.head_dim as i32);
    let cfg = LaunchConfig { grid_dim: (rows.div_ceil(4) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: one warp per row; argument order and types match the kernel.
    unsafe {
        st.launch_builder(gpu.function("flash_attn_bwd_delta")?)
            .arg(&mut delta)
            .arg(dout)
            .arg(out)
            .arg(&rows32)
            .arg(&ql)
            .arg(&nh)
            .arg(&hd)
            .launch(cfg)
    }?;
    let mut dq_acc = st.alloc_zeros::<f32>(s.q_elems())?;
    let keys = build.rows();
    let smem = bwd_shared_bytes(s.head_dim, build);
    let f = gpu.function_with_shared(&entry, smem)?;
    let shape_args = ShapeArgs::new(&s);
    // Key blocks in the slowest grid dimension, so the first (heaviest) ones run first.
    let cfg = LaunchConfig {
        grid_dim: (s.n_kv_head as u32, s.batch as u32, s.kv_len.div_ceil(keys) as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // The kernel writes every dK/dV row below kv_len; a cache's rows past it, and anything past
    // the shape, must still read as zero gradients.
    if s.kv_len < s.kv_stride || dk.len() > s.kv_elems() || dv.len() > s.kv_elems() {
        st.memset_zeros(dk)?;
        st.memset_zeros(dv)?;
    }
    // SAFETY: argument order and types match the kernel; every buffer holds at least the sizes of
    // `s` (checked above), and dQ's f32 accumulator was zeroed at allocation.
    unsafe {
        st.launch_builder(f)
            .arg(&mut dq_acc)
            .arg(&mut *dk)
            .arg(&mut *dv)
            .arg(dout)
            .arg(lse)
            .arg(&delta)
            .arg(q)
            .arg(k)
            .arg(v)
            .push_shape(&shape_args)
            .launch(cfg)
    }?;
    match unrotate {
        None => cast::to_bf16(gpu, dq, &dq_acc),
        Some(t) => rope::from_f32(gpu, dq, &dq_acc, t, s.q_rope(), true),
    }
}
