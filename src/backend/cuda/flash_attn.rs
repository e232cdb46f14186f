//! Launcher for `kernels/flash_attn.cu`: FlashAttention-2 forward and backward (bf16, head_dim 32, 64 or 128).

use super::device::Gpu;
use super::kernels::Kernel;
use anyhow::Result;
use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};

pub const KERNEL: Kernel = Kernel {
    name: "flash_attn",
    source: include_str!("../../../kernels/flash_attn.cu"),
    entries: &[
        "flash_attn_fwd_d32",
        "flash_attn_fwd_d64",
        "flash_attn_fwd_d64_2",
        "flash_attn_fwd_d64_5",
        "flash_attn_fwd_d128",
        "flash_attn_bwd_delta",
        "flash_attn_bwd_d32",
        "flash_attn_bwd_d64",
        "flash_attn_bwd_d64_3",
        "flash_attn_bwd_d64_2mt",
        "flash_attn_bwd_d64_8w2mt",
        "flash_attn_bwd_d64_8w",
        "flash_attn_bwd_d128",
        "flash_attn_bwd_d128_8w",
    ],
};

use super::cast;
use super::rope;
use crate::backend::AttnShape;
use anyhow::{bail, Context};
use half::bf16;

const BR: usize = 64;
const BC: usize = 64;

/// Dynamic shared memory of the forward kernel: two stages of a K and a V tile (rows padded by 8).
fn fwd_shared_bytes(head_dim: usize) -> usize {
    2 * 2 * BC * (head_dim + 8) * 2
}

/// One build of the backward kernel, as the launcher, the autotune and the reports know it. Builds
/// are numbered by the blocks per SM they are compiled for, except the two-m-tile builds (4, 5).
struct BwdBuild {
    id: u32,
    /// Appended to `flash_attn_bwd_d{head_dim}` for the entry point.
    suffix: &'static str,
    warps: u32,
    keys: usize,
    blocks_per_sm: u32,
    label: &'static str,
}

const BWD_BUILDS: [BwdBuild; 5] = [
    BwdBuild { id: 2, suffix: "", warps: 4, keys: BC, blocks_per_sm: 2, label: "2 blocks/SM" },
    BwdBuild { id: 3, suffix: "_3", warps: 4, keys: BC, blocks_per_sm: 3, label: "3 blocks/SM" },
    BwdBuild { id: 1, suffix: "_8w", warps: 8, keys: 2 * BC, blocks_per_sm: 1, label: "1 block/SM of 8 warps" },
    BwdBuild { id: 4, suffix: "_2mt", warps: 4, keys: 2 * BC, blocks_per_sm: 2, label: "2 blocks/SM of 32-key warps" },
    BwdBuild {
        id: 5,
        suffix: "_8w2mt",
        warps: 8,
        keys: 4 * BC,
        blocks_per_sm: 1,
        label: "1 block/SM of 8 32-key warps",
    },
];

/// The build numbered `id`; callers only pass ids from `bwd_builds`.
fn bwd_build(id: u32) -> Result<&'static BwdBuild> {
    BWD_BUILDS.iter().find(|b| b.id == id).with_context(|| format!("attention: no backward build {id}"))
}

/// Query tiles the backward keeps in flight (mirrors `STAGES` in the source): one only in the
/// 4-warp head_dim 128 builds.
fn bwd_stages(head_dim: usize, b: &BwdBuild) -> usize {
    if head_dim <= 64 || b.warps == 8 {
        2
    } else {
        1
    }
}

/// Dynamic shared memory of a backward build (mirrors the layout in the source): K and V tiles of
/// the block's keys, a Q and a dO tile per stage, dSᵀ, and lse and delta rows per stage.
fn bwd_shared_bytes(head_dim: usize, b: &BwdBuild) -> usize {
    let (ks, keys, stages) = (head_dim + 8, b.keys, bwd_stages(head_dim, b));
    2 * (2 * keys * ks + stages * 2 * BR * ks + keys * (BR + 8)) + 4 * stages * 2 * BR
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

/// The builds of the head_dim 64 forward, by the blocks per SM each is compiled for: 4 (the default
/// entry point, 64 queries per block, 99 registers), 5 (`flash_attn_fwd_d64_5`, held to 102) or 2
/// (`flash_attn_fwd_d64_2`, 128 queries per block: two m-tiles per warp, so each K/V fragment read
/// from shared memory feeds twice the tensor-core work). Other head sizes have one build.
pub const FWD_D64_BUILDS: [u32; 3] = [4, 5, 2];

/// The forward builds at `head_dim` (`attn_tune` times them when there are several).
pub fn fwd_builds(head_dim: usize) -> &'static [u32] {
    if head_dim == 64 {
        &FWD_D64_BUILDS
    } else {
        &[FWD_DEFAULT_BUILD]
    }
}

/// The head_dim 64 forward build run untimed (64 queries per block, the least work wasted on a
/// short query), and the name the one build of other head sizes goes by.
const FWD_DEFAULT_BUILD: u32 = 4;

/// The builds of the backward, by blocks per SM: 2 (4 warps and 64 keys per block: head_dim 64 at
/// 246 registers, 128 at 255), 3 (head_dim 64 only, held to 168 registers, no spill) and 1 (8 warps
/// and 128 keys per block, FA2's block: each Q/dO tile serves twice the keys, dQ takes half the
/// atomics, and at head_dim 128 the one block has room for two query stages); and at head_dim 64
/// 4 (4 warps of 32 keys, 2 blocks per SM: each Q/dO fragment read from shared memory feeds two
/// mma.sync, about 40% fewer shared-memory reads per mma.sync than the others) and 5 (8 such warps,
/// 256 keys per block, one per SM: the same shared-memory reads, and half the 128-key builds' dQ
/// atomics per mma.sync).
pub fn bwd_builds(head_dim: usize) -> &'static [u32] {
    match head_dim {
        64 => &[2, 3, 1, 4, 5],
        128 => &[2, 1],
        _ => &[2],
    }
}

/// How `kiln bench attention`, `kiln bench train` and the tests name a forward build.
pub fn fwd_label(blocks: u32) -> String {
    format!("{blocks} blocks/SM")
}

/// How `kiln bench attention`, `kiln bench train` and the tests name a backward build.
pub fn bwd_label(build: u32) -> String {
    bwd_build(build).map_or_else(|_| format!("build {build}"), |b| b.label.into())
}

/// Whether a backward build gets its blocks per SM on this device: that many blocks' shared memory
/// fits one SM (three 64 KiB blocks fit an H100's 228 KiB, not an A100's 164; two 91 KiB blocks of
/// the two-m-tile build likewise). The 64-key 2-block builds run everywhere, at whatever occupancy
/// the device allows.
pub fn bwd_fits(gpu: &Gpu, head_dim: usize, build: u32) -> bool {
    let Ok(b) = bwd_build(build) else { return false };
    let bytes = bwd_shared_bytes(head_dim, b) + gpu.shared_reserved_per_block;
    (b.keys == BC && b.blocks_per_sm == 2) || b.blocks_per_sm as usize * bytes <= gpu.shared_per_sm
}

/// The backward builds at `head_dim` that fit this device.
pub fn bwd_builds_fitting(gpu: &Gpu, head_dim: usize) -> Vec<u32> {
    bwd_builds(head_dim).iter().copied().filter(|&b| bwd_fits(gpu, head_dim, b)).collect()
}

/// The forward builds to time at `head_dim`: the pinned one alone, else all of them.
pub fn fwd_candidates(head_dim: usize) -> Vec<u32> {
    fwd_pinned(head_dim).map_or_else(|| fwd_builds(head_dim).to_vec(), |b| vec![b])
}

/// The backward builds to time at `head_dim` on this device: the pinned one alone, else every one
/// that fits.
pub fn bwd_candidates(gpu: &Gpu, head_dim: usize) -> Vec<u32> {
    bwd_pinned(gpu, head_dim).map_or_else(|| bwd_builds_fitting(gpu, head_dim), |b| vec![b])
}

/// A build named by an environment variable, if it is one of `builds`; any other value is ignored
/// with a warning (callers read each variable once).
fn env_build(var: &str, builds: &[u32]) -> Option<u32> {
    let raw = std::env::var(var).ok()?;
    let build = raw.trim().parse().ok().filter(|b| builds.contains(b));
    if build.is_none() {
        let names: Vec<String> = builds.iter().map(u32::to_string).collect();
        eprintln!("warning: {var}={raw:?} names no build (one of {}); ignored", names.join(", "));
    }
    build
}

/// The head_dim 64 forward build `KILN_FA_FWD_D64_BLOCKS` (4, 5 or 2) pins, if it names one: the
/// engine then runs it instead of timing every build (`attn_tune`).
pub fn fwd_pinned(head_dim: usize) -> Option<u32> {
    static D64: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    match head_dim {
        64 => *D64.get_or_init(|| env_build("KILN_FA_FWD_D64_BLOCKS", &FWD_D64_BUILDS)),
        _ => None,
    }
}

/// The forward build run untimed: the pinned one, else 4 blocks per SM at head_dim 64.
pub fn fwd_default(head_dim: usize) -> u32 {
    fwd_pinned(head_dim).unwrap_or(FWD_DEFAULT_BUILD)
}

/// The backward build `KILN_FA_BWD_D64_BLOCKS` (2, 3, 1, 4 or 5) or `KILN_FA_BWD_D128_BLOCKS` (2 or 1)
/// pins, if it names one that fits the device.
pub fn bwd_pinned(gpu: &Gpu, head_dim: usize) -> Option<u32> {
    static D64: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    static D128: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let want = match head_dim {
        64 => *D64.get_or_init(|| env_build("KILN_FA_BWD_D64_BLOCKS", bwd_builds(64))),
        128 => *D128.get_or_init(|| env_build("KILN_FA_BWD_D128_BLOCKS", bwd_builds(128))),
        _ => None,
    };
    want.filter(|&b| bwd_fits(gpu, head_dim, b))
}

/// The backward build run untimed: the pinned one, else 2 blocks per SM. Under the causal mask
/// TinyLlama's 1,024 backward blocks leave a longer tail on 3 × 132 slots than on 2 × 132 (1.125×
/// against 1.016× the ideal, `bench/attention_schedule.py`), so the third block must raise an SM's
/// throughput by more than a tenth to pay; the 8-warp build has half as many blocks, each twice as
/// long, on 132 slots (1.031×), as has the two-m-tile build on 264. Only timing on the card can
/// say, which `attn_tune` does.
pub fn bwd_default(gpu: &Gpu, head_dim: usize) -> u32 {
    bwd_pinned(gpu, head_dim).unwrap_or(2)
}

/// Queries per forward block: 128 for the two-m-tile head_dim 64 build, 64 otherwise.
fn fwd_queries_per_block(head_dim: usize, d64_blocks: u32) -> usize {
    if head_dim == 64 && d64_blocks == 2 {
        2 * BR
    } else {
        BR
    }
}

/// `out` and the per-row logsumexp `lse` (natural log) of causal grouped-query attention, the
/// head_dim 64 kernel in its build for `d64_blocks` blocks per SM (4, 5 or 2; see `FWD_D64_BUILDS`;
/// other head sizes have one build and ignore it).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    gpu: &Gpu,
    out: &mut CudaSlice<bf16>,
    lse: &mut CudaSlice<f32>,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    s: AttnShape,
    d64_blocks: u32,
) -> Result<()> {
    let d = check(&s, &[out.len(), q.len()], &[k.len(), v.len()], &[lse.len()])?;
    if s.head_dim == 64 && !FWD_D64_BUILDS.contains(&d64_blocks) {
        bail!("attention: no head_dim 64 forward build for {d64_blocks} blocks per SM");
    }
    if s.batch == 0 || s.q_len == 0 {
        return Ok(());
    }
    let entry = match (d, d64_blocks) {
        ("d64", 5) => "flash_attn_fwd_d64_5".to_string(),
        ("d64", 2) => "flash_attn_fwd_d64_2".to_string(),
        _ => format!("flash_attn_fwd_{d}"),
    };
    let smem = fwd_shared_bytes(s.head_dim);
    let f = gpu.function_with_shared(&entry, smem)?;
    let per_block = fwd_queries_per_block(s.head_dim, d64_blocks);
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

/// Overwrites `dq`, `dk`, `dv` with the gradients of the attention above, through build `blocks`
/// (one of `bwd_builds(head_dim)`). With `unrotate`, q was rotated (RoPE) and dQ comes out rotated
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
    blocks: u32,
    unrotate: Option<rope::Tables<'_>>,
) -> Result<()> {
    let d =
        check(&s, &[dq.len(), dout.len(), out.len(), q.len()], &[dk.len(), dv.len(), k.len(), v.len()], &[lse.len()])?;
    if !bwd_builds(s.head_dim).contains(&blocks) {
        bail!("attention: head_dim {} has no backward build for {blocks} blocks per SM", s.head_dim);
    }
    let build = bwd_build(blocks)?;
    let entry = format!("flash_attn_bwd_{d}{}", build.suffix);
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
    let keys = build.keys;
    let smem = bwd_shared_bytes(s.head_dim, build);
    let f = gpu.function_with_shared(&entry, smem)?;
    let shape_args = ShapeArgs::new(&s);
    // Key blocks in the slowest grid dimension, so the first (heaviest) ones run first.
    let cfg = LaunchConfig {
        grid_dim: (s.n_kv_head as u32, s.batch as u32, s.kv_len.div_ceil(keys) as u32),
        block_dim: (32 * build.warps, 1, 1),
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
