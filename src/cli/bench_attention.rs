//! `kiln bench attention`: FlashAttention-2 forward + backward TFLOP/s on the GPU, counted the way
//! the FA2 paper and bench/torch_baseline.py count (causal forward 2·b·h·s²·d FLOPs, backward 2.5×),
//! so the two figures in scripts/gpu-check.sh's table compare directly.

use crate::backend::cuda::device::Gpu;
use crate::backend::cuda::flash_attn;
use crate::backend::AttnShape;
use anyhow::Result;
use half::bf16;
use std::time::Instant;

pub struct AttentionBenchArgs {
    pub batch: usize,
    pub seq: usize,
    pub head_dim: usize,
    /// Query heads; KV heads are an eighth of them (TinyLlama's ratio), at least one.
    pub heads: usize,
    pub iters: usize,
}

pub fn run(a: &AttentionBenchArgs) -> Result<Vec<(String, String)>> {
    let gpu = Gpu::open(0)?;
    let s = AttnShape {
        batch: a.batch,
        q_len: a.seq,
        kv_len: a.seq,
        kv_stride: a.seq,
        q_pos0: 0,
        n_head: a.heads,
        n_kv_head: (a.heads / 8).max(1),
        head_dim: a.head_dim,
    };
    let st = &gpu.stream;
    let fill = |n: usize, salt: usize| -> Vec<bf16> {
        (0..n).map(|i| bf16::from_f32((((i * 2654435761 + salt) % 2001) as f32 - 1000.0) / 1000.0)).collect()
    };
    let (q, k, v) = (
        st.clone_htod(&fill(s.q_elems(), 1))?,
        st.clone_htod(&fill(s.kv_elems(), 2))?,
        st.clone_htod(&fill(s.kv_elems(), 3))?,
    );
    let dout = st.clone_htod(&fill(s.q_elems(), 4))?;
    let mut out = st.alloc_zeros::<bf16>(s.q_elems())?;
    let mut lse = st.alloc_zeros::<f32>(s.lse_elems())?;
    let (mut dq, mut dk, mut dv) = (
        st.alloc_zeros::<bf16>(s.q_elems())?,
        st.alloc_zeros::<bf16>(s.kv_elems())?,
        st.alloc_zeros::<bf16>(s.kv_elems())?,
    );
    let iters = a.iters.max(1);
    // Seconds per call of `f` after three untimed calls, the GPU drained on both ends.
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        gpu.synchronize()?;
        let t = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        gpu.synchronize()?;
        Ok(t.elapsed().as_secs_f64() / iters as f64)
    };
    let (used, used_bwd) = (flash_attn::fwd_d64_blocks(), flash_attn::bwd_d64_blocks(&gpu));
    let fwd_secs = timed(&mut || flash_attn::forward(&gpu, &mut out, &mut lse, &q, &k, &v, s, used))?;
    let mut fwd_bwd_secs = |bwd_blocks: u32| {
        timed(&mut || {
            flash_attn::forward(&gpu, &mut out, &mut lse, &q, &k, &v, s, used)?;
            flash_attn::backward(&gpu, &mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, s, bwd_blocks)
        })
    };
    let secs = fwd_bwd_secs(used_bwd)?;
    let bwd_secs = (secs - fwd_secs).max(f64::MIN_POSITIVE);
    // At head_dim 64, each kernel's other builds: the forward's (see `FWD_D64_BUILDS`) and the
    // backward's (`BWD_D64_BUILDS`) that fit the device.
    let d64 = s.head_dim == 64;
    let mut other_bwd = Vec::new();
    for build in flash_attn::BWD_D64_BUILDS.into_iter().filter(|&b| d64 && b != used_bwd) {
        if flash_attn::bwd_d64_fits(&gpu, build) {
            other_bwd.push((build, (fwd_bwd_secs(build)? - fwd_secs).max(f64::MIN_POSITIVE)));
        }
    }
    let mut other_fwd = Vec::new();
    for build in flash_attn::FWD_D64_BUILDS.into_iter().filter(|&b| d64 && b != used) {
        other_fwd.push((build, timed(&mut || flash_attn::forward(&gpu, &mut out, &mut lse, &q, &k, &v, s, build))?));
    }
    let fwd_flops = 4.0 * (s.batch * s.n_head * s.q_len * s.q_len * s.head_dim) as f64 / 2.0;
    let rate = |flops: f64, secs: f64| format!("{:.2} ms, {:.0} TFLOP/s", secs * 1e3, flops / secs / 1e12);
    let mut rows = vec![
        ("device".into(), format!("{} ({})", gpu.name, gpu.arch)),
        (
            "shape".into(),
            format!(
                "batch {} · seq {} · {} heads / {} KV · head_dim {}",
                s.batch, s.q_len, s.n_head, s.n_kv_head, s.head_dim
            ),
        ),
        ("flash-attn fwd+bwd".into(), rate(3.5 * fwd_flops, secs)),
        (if d64 { format!("  forward ({used} blocks/SM)") } else { "  forward".into() }, rate(fwd_flops, fwd_secs)),
        (
            if d64 {
                format!("  backward ({})", flash_attn::bwd_d64_label(used_bwd))
            } else {
                "  backward (delta, dQ cast incl.)".into()
            },
            rate(2.5 * fwd_flops, bwd_secs),
        ),
    ];
    for (build, f) in other_fwd {
        rows.push((format!("  forward ({build} blocks/SM)"), rate(fwd_flops, f)));
    }
    for (build, b) in other_bwd {
        rows.push((format!("  backward ({})", flash_attn::bwd_d64_label(build)), rate(2.5 * fwd_flops, b)));
    }
    Ok(rows)
}
