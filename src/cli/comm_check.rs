//! `kiln comm-check`: is this node (or this cluster) wired up for training? Runs the multi-node
//! rendezvous exactly as a training launch does (same variables: MASTER_ADDR, MASTER_PORT, NNODES,
//! NODE_RANK or SLURM's), then, where CUDA and NCCL are present, joins every local GPU to the NCCL
//! world, checks all-reduce, all-gather and reduce-scatter against their exact results and measures
//! all-reduce bus bandwidth, the figure nccl-tests reports.

use crate::backend::cuda::libs::{require, CudaLib};
use crate::dist::launch::Node;
use crate::dist::nccl::{unique_id, NcclComm};
use crate::dist::rendezvous::exchange;
use crate::dist::Comm;
use anyhow::{bail, Result};
use std::time::{Duration, Instant};

pub struct CommCheckArgs {
    /// GPUs on this node to use (default: all).
    pub gpus: Option<usize>,
    /// All-reduce message size for the bandwidth figure.
    pub megabytes: usize,
    pub iters: usize,
    pub timeout: Duration,
}

/// A fingerprint of what every node must agree on. SHA-256, not std's hasher, so that it does not
/// depend on which Rust built each node's binary.
fn fingerprint(node: &Node, local: usize, args: &CommCheckArgs) -> u64 {
    use sha2::{Digest, Sha256};
    let what = format!("kiln comm-check {} {local} {} {}", node.nnodes, args.megabytes, args.iters);
    let digest = Sha256::digest(what.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

pub fn run(args: &CommCheckArgs) -> Result<Vec<String>> {
    let node = Node::from_env()?;
    let nccl = require("NCCL", &[CudaLib::Driver, CudaLib::Nccl]);
    let local = match &nccl {
        Ok(()) => {
            let count = cudarc::driver::CudaContext::device_count()? as usize;
            match args.gpus {
                Some(g) if g > count => bail!("--gpus {g}: this node has {count} GPUs"),
                Some(g) => g,
                None => count,
            }
        }
        Err(_) => 0,
    };
    let t = Instant::now();
    let id = exchange(
        &node,
        fingerprint(&node, local, args),
        || if nccl.is_ok() && local > 0 { unique_id() } else { Ok(vec![0; 128]) },
        args.timeout,
    )?;
    let mut lines = vec![format!(
        "rendezvous: node {} of {} via {}:{} in {:.2} s",
        node.node_rank,
        node.nnodes,
        node.master_addr,
        node.master_port,
        t.elapsed().as_secs_f64()
    )];
    if let Err(e) = nccl {
        lines.push(format!("nccl: skipped ({e:#})"));
        return Ok(lines);
    }
    if local == 0 {
        lines.push("nccl: skipped (no GPU on this node)".into());
        return Ok(lines);
    }
    let world = node.nnodes * local;
    let first = node.node_rank * local;
    let n = args.megabytes.max(1) * (1 << 20) / 4;
    let results: Vec<Result<String>> = std::thread::scope(|s| {
        let jobs: Vec<_> = (0..local)
            .map(|d| {
                let id = &id;
                s.spawn(move || rank_check(d, first + d, world, id, n, args.iters))
            })
            .collect();
        jobs.into_iter().map(|j| j.join().unwrap_or_else(|_| bail!("a rank thread panicked"))).collect()
    });
    for (d, r) in results.into_iter().enumerate() {
        lines.push(format!("rank {} (GPU {d}): {}", first + d, r?));
    }
    Ok(lines)
}

/// One rank: exactness of each collective, then all-reduce bandwidth. A wrong result is noted and
/// the rank goes on: every rank must make the same collectives in the same order, and one that
/// returned early would leave the others waiting in their next one for ever.
fn rank_check(device: usize, rank: usize, world: usize, id: &[u8], n: usize, iters: usize) -> Result<String> {
    let comm = NcclComm::new(device, rank, world, id)?;
    let mut wrong = Vec::new();
    // Small integers are exact in f32, so every result can be compared for equality.
    let mut buf = vec![(rank + 1) as f32; 1024];
    comm.all_reduce(&mut buf)?;
    let want = (world * (world + 1) / 2) as f32;
    if buf.iter().any(|&x| x != want) {
        wrong.push(format!("all_reduce gave {} instead of {want}", buf[0]));
    }
    let shard: Vec<f32> = (0..256).map(|i| (rank * 256 + i) as f32).collect();
    let mut all = vec![0.0; 256 * world];
    comm.all_gather(&shard, &mut all)?;
    if all.iter().enumerate().any(|(i, &x)| x != i as f32) {
        wrong.push("all_gather put values out of rank order".into());
    }
    let input: Vec<f32> = (0..256 * world).map(|i| (i % 256) as f32).collect();
    let mut out = vec![0.0; 256];
    comm.reduce_scatter(&input, &mut out)?;
    if out.iter().enumerate().any(|(i, &x)| x != (i * world) as f32) {
        wrong.push("reduce_scatter gave wrong sums".into());
    }
    // Bandwidth on device buffers, as training moves them.
    let mut dev = comm.stream()?.alloc_zeros::<f32>(n)?;
    comm.all_reduce_device(&mut dev)?; // warm-up
    comm.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters.max(1) {
        comm.all_reduce_device(&mut dev)?;
    }
    comm.synchronize()?;
    let secs = t.elapsed().as_secs_f64() / iters.max(1) as f64;
    let bytes = (n * 4) as f64;
    let algbw = bytes / secs / 1e9;
    if !wrong.is_empty() {
        bail!("{}", wrong.join("; "));
    }
    if world == 1 {
        // Nothing crosses a link: the all-reduce is a device copy, and nccl-tests' bus figure is 0.
        return Ok(format!(
            "collectives exact; all_reduce {} MiB: {:.2} ms, {algbw:.1} GB/s algorithm (one rank: a local copy)",
            (n * 4) >> 20,
            secs * 1e3
        ));
    }
    // nccl-tests' bus bandwidth: what each link carries in a ring all-reduce.
    let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
    Ok(format!(
        "collectives exact; all_reduce {} MiB: {:.2} ms, {algbw:.1} GB/s algorithm, {busbw:.1} GB/s bus",
        (n * 4) >> 20,
        secs * 1e3
    ))
}
