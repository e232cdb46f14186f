//! `kiln bench`: throughput figures for the CPU backend (GEMM peak, training forward + backward,
//! KV-cache decoding), printed as a table. Benchmarks print figures; tests never time anything.

use crate::backend::cpu::Cpu;
use crate::backend::{Backend, Gemm};
use crate::model::init::random_weights;
use crate::model::sampling::argmax;
use crate::model::{KvCache, Llama, LlamaConfig, Workspace};
use anyhow::Result;
use std::time::Instant;

pub struct BenchArgs {
    pub preset: String,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub decode_tokens: usize,
}

pub struct BenchReport {
    pub lines: Vec<(String, String)>,
}

fn gemm_gflops(n: usize) -> Result<f64> {
    let b = Cpu::new();
    let x = b.upload(&(0..n * n).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect::<Vec<f32>>())?;
    let mut out = b.zeros(n * n)?;
    let g = Gemm { m: n, n, k: n, trans_a: false, trans_b: true, accumulate: false };
    b.matmul(&mut out, &x, &x, g)?; // warm-up
    let reps = 5;
    let t = Instant::now();
    for _ in 0..reps {
        b.matmul(&mut out, &x, &x, g)?;
    }
    Ok(2.0 * (n * n * n * reps) as f64 / t.elapsed().as_secs_f64() / 1e9)
}

pub fn run(args: &BenchArgs) -> Result<BenchReport> {
    let cfg = LlamaConfig::preset(&args.preset)?;
    let seq = args.seq.min(cfg.max_seq_len);
    let mut lines = vec![
        ("backend".to_string(), Cpu::new().name()),
        ("model".to_string(), format!("{} ({:.1}M params)", args.preset, cfg.n_params() as f64 / 1e6)),
    ];
    lines.push(("sgemm 1024³".into(), format!("{:.1} GFLOP/s", gemm_gflops(1024)?)));

    let model = Llama::from_host(cfg.clone(), Cpu::new(), &random_weights(&cfg, 0)?)?;
    let mut ws = Workspace::new(&model, args.batch, seq)?;
    let mut grads = model.zeros_like_weights()?;
    let rows = args.batch * seq;
    let ids: Vec<u32> = (0..rows).map(|i| ((i * 7919) % cfg.vocab_size) as u32).collect();
    let targets: Vec<i32> = ids.iter().map(|&t| ((t as usize + 1) % cfg.vocab_size) as i32).collect();
    let scale = 1.0 / rows as f32;
    model.forward(&mut ws, &ids, &targets, Some(scale))?; // warm-up
    model.backward(&mut ws, &mut grads)?;
    let t = Instant::now();
    for _ in 0..args.steps {
        model.forward(&mut ws, &ids, &targets, Some(scale))?;
        model.backward(&mut ws, &mut grads)?;
    }
    let secs = t.elapsed().as_secs_f64() / args.steps as f64;
    let tps = rows as f64 / secs;
    let flops = cfg.train_flops_per_token(seq) * tps;
    lines.push((
        format!("fwd+bwd {}x{}", args.batch, seq),
        format!("{tps:.0} tokens/s ({:.1} ms/step, {:.1} GFLOP/s model)", secs * 1e3, flops / 1e9),
    ));

    let mut cache = KvCache::new(&model, args.decode_tokens + 1)?;
    let mut logits = model.decode(&mut cache, &[1])?;
    let t = Instant::now();
    for _ in 0..args.decode_tokens {
        let next = argmax(&logits);
        logits = model.decode(&mut cache, &[next])?;
    }
    let dps = args.decode_tokens as f64 / t.elapsed().as_secs_f64();
    lines.push((format!("decode {} tokens", args.decode_tokens), format!("{dps:.1} tokens/s")));
    Ok(BenchReport { lines })
}
