//! `kiln bench attention`: FlashAttention-2 forward + backward TFLOP/s on the GPU, counted the way
//! the FA2 paper and bench/torch_baseline.py count (causal forward 2·b·h·s²·d FLOPs, backward 2.5×),
//! so the two figures in scripts/gpu-check.sh's table compare directly.

use crate::backend::cuda::device::Gpu;
use crate::backend::cuda::flash_attn::{self, Build};
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
    // Every build of each pass (see `flash_attn::builds`), as the engine's autotune
    // (`attn_tune.rs`) times them: the forward alone, then each backward after the fastest forward.
    let d = s.head_dim;
    let (fwd_builds, bwd_builds) = (flash_attn::builds(d), flash_attn::bwd_builds(&gpu, d));
    // A build that fails is reported in its own row and left out, so one bad build does not cost
    // the other figures of the run.
    let (mut fwd, mut failed) = (Vec::new(), Vec::new());
    for &build in fwd_builds {
        match timed(&mut || flash_attn::forward(&gpu, &mut out, &mut lse, &q, &k, &v, s, build)) {
            Ok(secs) => fwd.push((build, secs)),
            Err(e) => failed.push((format!("forward ({})", build.label()), e)),
        }
    }
    let (fwd_used, fwd_secs) = fastest(&fwd, "forward", &failed)?;
    // Each backward timed together with the forward it needs, then the forward's time taken off.
    let mut pairs = Vec::new();
    for &build in &bwd_builds {
        let secs = timed(&mut || {
            flash_attn::forward(&gpu, &mut out, &mut lse, &q, &k, &v, s, fwd_used)?;
            // Attention alone, as SDPA's figure is: no RoPE to undo.
            flash_attn::backward(&gpu, &mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, s, build, None)
        });
        match secs {
            Ok(secs) => pairs.push((build, secs)),
            Err(e) => failed.push((format!("backward ({})", build.label()), e)),
        }
    }
    let (bwd_used, secs) = fastest(&pairs, "backward", &failed)?;
    let bwd_secs = |pair: f64| (pair - fwd_secs).max(f64::MIN_POSITIVE);
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
    ];
    // The builds the headline ran first (the fastest), then the others.
    let several = flash_attn::builds(d).len() > 1;
    let bwd_label = |b: Build| if several { b.label() } else { "delta, dQ cast incl." };
    let fwd_label = |b: Build| if several { b.label() } else { "the one build" };
    rows.push((format!("  forward ({})", fwd_label(fwd_used)), rate(fwd_flops, fwd_secs)));
    rows.push((format!("  backward ({})", bwd_label(bwd_used)), rate(2.5 * fwd_flops, bwd_secs(secs))));
    for &(build, f) in fwd.iter().filter(|(b, _)| *b != fwd_used) {
        rows.push((format!("  forward ({})", fwd_label(build)), rate(fwd_flops, f)));
    }
    for &(build, pair) in pairs.iter().filter(|(b, _)| *b != bwd_used) {
        rows.push((format!("  backward ({})", bwd_label(build)), rate(2.5 * fwd_flops, bwd_secs(pair))));
    }
    let how = if several {
        "the fastest of each pass, as the engine's autotune keeps"
    } else {
        "one build per pass at this head_dim"
    };
    rows.push(("builds in the headline".into(), how.into()));
    for (what, e) in failed {
        rows.push((format!("  {what}"), format!("FAILED: {e:#}")));
    }
    Ok(rows)
}

/// The fastest build timed, or an error naming why each failed.
fn fastest(times: &[(Build, f64)], pass: &str, failed: &[(String, anyhow::Error)]) -> Result<(Build, f64)> {
    times.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)).ok_or_else(|| {
        let why: Vec<String> = failed.iter().map(|(what, e)| format!("{what}: {e:#}")).collect();
        anyhow::anyhow!("no {pass} build of the attention ran ({})", why.join("; "))
    })
}
