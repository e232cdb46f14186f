//! FSDP over in-process CPU ranks: world sizes 1–4 (uneven shards included) train to the same
//! losses and checkpoints, resumes reshard between world sizes, memory per rank falls as
//! 1/world_size, and a failing rank ends the step with a clear error instead of a hang.

mod common;

use kiln::backend::cpu::{Cpu, CpuBuf};
use kiln::backend::AdamW;
use kiln::data::loader::Batch;
use kiln::dist::local::{cpu_group, local_group, LocalComm};
use kiln::dist::{Comm, DeviceComm, Member, Ticket};
use kiln::model::init::random_weights;
use kiln::model::{Keep, LlamaConfig};
use kiln::train::fsdp::Fsdp;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap()
}

fn ok(o: Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn config(dir: &Path) -> PathBuf {
    let data = common::prepared_corpus(dir);
    // d_model 56 and d_ff 100 give block units of 26,320 values: uneven shards at world size 3.
    let cfg = format!(
        r#"[model]
n_layer = 2
d_model = 56
n_head = 4
n_kv_head = 2
d_ff = 100
vocab_size = 32000
max_seq_len = 64
tie_embeddings = false
{corpus}[train]
micro_batch = 12
grad_accum = 2
max_steps = 20
seed = 3
[optim]
lr = 3e-3
min_lr = 3e-4
warmup_steps = 4
[checkpoint]
every_steps = 10
keep_last = 5
"#,
        corpus = common::corpus_sections(&data, 32)
    );
    let p = dir.join("fsdp.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

/// Each step's loss and gradient norm (before clipping), in that order: the norm is what shows a
/// gradient scaled wrongly (AdamW is blind to a constant scale, and clipping renormalises it).
fn losses_and_norms(run: &Path) -> Vec<f64> {
    common::metrics(run, "step")
        .iter()
        .flat_map(|v| [v["loss"].as_f64().unwrap(), v["grad_norm"].as_f64().unwrap()])
        .collect()
}

fn weights(ckpt: &Path) -> Vec<Vec<f32>> {
    let md = kiln::io::load_model_dir(ckpt, kiln::backend::cpu::Cpu::new()).unwrap();
    md.model.weights.iter().into_iter().map(|w| w.to_vec()).collect()
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let (step, which) = (i / 2 + 1, ["loss", "grad norm"][i % 2]);
        assert!(((x - y) / y).abs() < 1e-5, "{what}: step {step} {which}: {x} vs {y}");
    }
}

fn assert_weights_close(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    for (x, y) in a.iter().zip(b) {
        let diff: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum::<f64>().sqrt();
        assert!(diff / norm.max(1e-12) < 1e-5, "{what}: relative difference {}", diff / norm);
    }
}

#[test]
fn world_sizes_1_to_4_train_to_the_same_losses_and_reshard_on_resume() {
    let t = tempfile::tempdir().unwrap();
    let cfg = config(t.path());
    let run = |name: &str, world: usize| {
        let dir = t.path().join(name);
        let set = format!("parallel.world_size={world}");
        ok(kiln(&["train", cfg.to_str().unwrap(), "--run-dir", dir.to_str().unwrap(), "--set", &set]));
        dir
    };
    let base = run("w1", 1);
    let base_losses = losses_and_norms(&base);
    let base_weights = weights(&base.join("checkpoints/step-00000020"));
    for world in [2, 3, 4] {
        let dir = run(&format!("w{world}"), world);
        assert_close(&losses_and_norms(&dir), &base_losses, &format!("world {world}"));
        // Per-rank metrics flow into metrics.jsonl.
        let first: Value =
            serde_json::from_str(std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().lines().next().unwrap())
                .unwrap();
        let ranks = first["ranks"].as_array().unwrap();
        assert_eq!(ranks.len(), world);
        assert!(ranks.iter().all(|r| r["comm_ms"].as_f64().unwrap() > 0.0 && r["state_mb"].as_f64().unwrap() > 0.0));
        assert_weights_close(
            &weights(&dir.join("checkpoints/step-00000020")),
            &base_weights,
            &format!("world {world}"),
        );
    }
    // Resharding resumes: 2 → 4 and 4 → 1 at step 10.
    for (from, to) in [(2, 4), (4, 1)] {
        let dir = t.path().join(format!("r{from}{to}"));
        let set = format!("parallel.world_size={from}");
        ok(kiln(&["train", cfg.to_str().unwrap(), "--run-dir", dir.to_str().unwrap(), "--set", &set, "--steps", "10"]));
        assert_rank_files(&dir.join("checkpoints/step-00000010"), from);
        let set = format!("parallel.world_size={to}");
        ok(kiln(&["train", "--resume", dir.to_str().unwrap(), "--set", &set]));
        assert_rank_files(&dir.join("checkpoints/step-00000020"), to);
        assert_close(&losses_and_norms(&dir), &base_losses, &format!("resume {from} -> {to}"));
        assert_weights_close(
            &weights(&dir.join("checkpoints/step-00000020")),
            &base_weights,
            &format!("resume {from} -> {to}"),
        );
    }
}

/// The optimizer state is one file per rank, each holding about 1/world of the moments.
fn assert_rank_files(ckpt: &Path, world: usize) {
    use kiln::train::optim_state::{rank_file, OPTIMIZER_DIR};
    let dir = ckpt.join(OPTIMIZER_DIR);
    assert!(!ckpt.join("optimizer.safetensors").exists(), "no consolidated optimizer file");
    let sizes: Vec<u64> = (0..world).map(|r| std::fs::metadata(dir.join(rank_file(r, world))).unwrap().len()).collect();
    let n = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(n, world + 1, "{world} rank files and the layout in {}", dir.display());
    let (lo, hi) = (*sizes.iter().min().unwrap(), *sizes.iter().max().unwrap());
    // Even shards; only the header and the padding of the last rank differ.
    assert!(hi - lo < 4096, "{sizes:?}");
}

fn tiny() -> LlamaConfig {
    LlamaConfig::preset("tiny").unwrap()
}

fn batch(cfg: &LlamaConfig, rows: usize, seq: usize) -> Batch {
    let ids: Vec<u32> = (0..rows * seq).map(|i| (i * 37 % cfg.vocab_size) as u32).collect();
    let targets = ids.iter().map(|&x| ((x + 1) % cfg.vocab_size as u32) as i32).collect();
    Batch { ids, targets, state: Default::default() }
}

fn hp() -> AdamW {
    AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 1, grad_scale: 1.0 }
}

#[test]
fn parameter_and_optimizer_memory_per_rank_falls_as_one_over_world_size() {
    let cfg = tiny();
    let full = random_weights(&cfg, 0).unwrap();
    let mut report = Vec::new();
    for world in [1usize, 2, 4] {
        let mut f = Fsdp::new(&cfg, &full, None, cpu_group(world), 4 / world, 32, Keep::All).unwrap();
        f.step(&[batch(&cfg, 4, 32)], 1, 1.0 / 128.0, 1.0, hp()).unwrap();
        let m = f.memory().unwrap()[0];
        report.push((world, m.persistent_bytes, m.peak_bytes));
    }
    for &(world, persistent, peak) in &report {
        eprintln!(
            "world {world}: persistent {:.1} MB per rank, peak {:.1} MB",
            persistent as f64 * 1e-6,
            peak as f64 * 1e-6
        );
        let ideal = report[0].1 as f64 / world as f64;
        assert!((persistent as f64 - ideal).abs() / ideal < 0.01, "world {world}: {persistent} vs {ideal}");
    }
    assert!(report[2].2 < report[0].2, "peak falls too");
}

#[test]
fn a_failing_rank_stops_the_step_with_a_clear_error() {
    let cfg = tiny();
    let full = random_weights(&cfg, 0).unwrap();
    let mut f = Fsdp::new(&cfg, &full, None, cpu_group(4), 1, 16, Keep::All).unwrap();
    f.fault = Some((2, 1));
    // Released by the failing rank, not by the collective timeout (600 s) a hang would end at.
    let b = batch(&cfg, 4, 16);
    let e = common::within(std::time::Duration::from_secs(120), "the step with a failing rank", move || {
        f.step(&[b], 1, 1.0 / 64.0, 1.0, hp()).unwrap_err().to_string()
    });
    assert_eq!(e, "rank 2 failed: injected fault at step 1");
}

#[test]
fn recomputation_under_fsdp_gives_the_same_losses_and_weights_bit_for_bit() {
    let cfg = tiny();
    let full = random_weights(&cfg, 0).unwrap();
    let run = |keep: Keep| {
        let mut f = Fsdp::new(&cfg, &full, None, cpu_group(2), 2, 32, keep).unwrap();
        let mut losses = Vec::new();
        for step in 1..=2u64 {
            let hp = AdamW { step, ..hp() };
            losses.push(f.step(&[batch(&cfg, 4, 32)], step, 1.0 / 128.0, 1.0, hp).unwrap());
        }
        (losses, f.consolidate().unwrap().iter().into_iter().cloned().collect::<Vec<_>>())
    };
    let (l1, w1) = run(Keep::All);
    let (l2, w2) = run(Keep::BlockInputs);
    assert_eq!(l1, l2);
    assert!(w1 == w2, "weights differ after recomputation");
}

/// One node's part of a run: its engine and what it saw.
type NodeRun = (Vec<(f64, f64)>, Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>, Vec<f32>);

/// Two "nodes" in one process, each driving half the ranks of one world: the multi-node path of
/// the engine (a process holding only its own ranks; consolidation and the optimizer state as
/// collectives; the nodes agreeing on a control vector) gives exactly the single-process run.
#[test]
fn two_nodes_each_holding_half_the_ranks_train_exactly_like_one_process() {
    let cfg = tiny();
    let full = random_weights(&cfg, 0).unwrap();
    let steps = |f: &mut Fsdp<Cpu>, node: f32| -> NodeRun {
        let mut losses = Vec::new();
        for step in 1..=3u64 {
            let hp = AdamW { step, ..hp() };
            let batches = [batch(&cfg, 4, 32), batch(&cfg, 4, 32)];
            losses.push(f.step(&batches, step, 1.0 / 256.0, 1.0, hp).unwrap());
        }
        let weights = f.consolidate().unwrap().iter().into_iter().cloned().collect();
        let moments = f.rank_moments().unwrap().into_iter().map(|r| [r.m, r.v].concat()).collect();
        // Every node sees every rank's memory, in rank order.
        let ranks: Vec<usize> = f.memory().unwrap().iter().map(|m| m.rank).collect();
        assert_eq!(ranks, vec![0, 1, 2, 3]);
        // Node k asks for "k + 1" in slot k: the sum reaches every node.
        let mut ask = vec![0.0; 2];
        ask[node as usize] = node + 1.0;
        (losses, weights, moments, f.agree(&ask).unwrap())
    };
    let mut one = Fsdp::new(&cfg, &full, None, cpu_group(4), 1, 32, Keep::All).unwrap();
    let (l1, w1, m1, _) = steps(&mut one, 0.0);

    let mut group = cpu_group(4);
    let second = group.split_off(2);
    let mut node0 = Fsdp::new(&cfg, &full, None, group, 1, 32, Keep::All).unwrap();
    let mut node1 = Fsdp::new(&cfg, &full, None, second, 1, 32, Keep::All).unwrap();
    assert_eq!((node0.world_size(), node0.local_ranks()), (4, 2));
    let (a, b) = std::thread::scope(|s| {
        let h0 = s.spawn(|| steps(&mut node0, 0.0));
        let h1 = s.spawn(|| steps(&mut node1, 1.0));
        (h0.join().unwrap(), h1.join().unwrap())
    });
    for (node, (l, w, m, agreed)) in [a, b].into_iter().enumerate() {
        assert_eq!(l, l1, "node {node}: losses");
        assert!(w == w1, "node {node}: consolidated weights differ");
        assert!(m == m1, "node {node}: optimizer shards differ");
        assert_eq!(agreed, vec![1.0, 2.0], "node {node}: agreed control vector");
    }
}

/// A group whose abort does not reach the other ranks, like NCCL without `ncclCommAbort`: a rank
/// blocked in a collective stays there until something else releases it.
struct Stubborn(Arc<LocalComm>);

impl Comm for Stubborn {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> anyhow::Result<()> {
        self.0.all_gather(shard, out)
    }
    fn reduce_scatter(&self, input: &[f32], out: &mut [f32]) -> anyhow::Result<()> {
        self.0.reduce_scatter(input, out)
    }
    fn all_reduce(&self, buf: &mut [f32]) -> anyhow::Result<()> {
        self.0.all_reduce(buf)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> anyhow::Result<()> {
        self.0.broadcast(buf, root)
    }
    fn barrier(&self) -> anyhow::Result<()> {
        self.0.barrier()
    }
    fn abort(&self, _: &str) {}
}

impl DeviceComm<Cpu> for Stubborn {
    fn start_all_gather(&self, b: &Cpu, shard: &CpuBuf, out: &mut CpuBuf) -> anyhow::Result<Ticket> {
        self.0.start_all_gather(b, shard, out)
    }
    fn start_reduce_scatter(&self, b: &Cpu, input: &CpuBuf, out: &mut CpuBuf) -> anyhow::Result<Ticket> {
        self.0.start_reduce_scatter(b, input, out)
    }
    fn wait(&self, b: &Cpu, t: Ticket) -> anyhow::Result<()> {
        self.0.wait(b, t)
    }
    fn take_busy_secs(&self) -> anyhow::Result<f64> {
        DeviceComm::<Cpu>::take_busy_secs(&*self.0)
    }
}

#[test]
fn ranks_the_group_cannot_release_are_reported_after_the_grace_instead_of_hanging() {
    let cfg = tiny();
    let full = random_weights(&cfg, 0).unwrap();
    let comms: Vec<Arc<LocalComm>> = local_group(2).into_iter().map(Arc::new).collect();
    let group = comms
        .iter()
        .map(|c| Member { backend: Cpu::new(), comm: Box::new(Stubborn(c.clone())) as Box<dyn DeviceComm<Cpu>> })
        .collect();
    let mut f = Fsdp::new(&cfg, &full, None, group, 1, 16, Keep::All).unwrap();
    f.fault = Some((1, 1));
    f.release_grace = std::time::Duration::from_millis(300);
    // Instead of exiting the process, the test records the report and releases rank 0 itself.
    let seen = Arc::new(Mutex::new(None::<String>));
    let (record, release) = (seen.clone(), comms[0].clone());
    f.on_stuck = Arc::new(move |why: &str| {
        *record.lock().unwrap() = Some(why.to_string());
        release.abort("released by the test");
    });
    let t = std::time::Instant::now();
    let e = f.step(&[batch(&cfg, 2, 16)], 1, 1.0 / 32.0, 1.0, hp()).unwrap_err().to_string();
    assert_eq!(e, "rank 1 failed: injected fault at step 1");
    assert_eq!(seen.lock().unwrap().as_deref(), Some("rank 1 failed: injected fault at step 1"));
    assert!(t.elapsed() >= std::time::Duration::from_millis(300), "reported before the grace ran out");
}

/// A rank that stops responding without failing (as a node that died does, seen from the others):
/// its first all-gather waits until the test lets it go.
struct Hangs {
    comm: Arc<LocalComm>,
    hang: bool,
    released: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl DeviceComm<Cpu> for Hangs {
    fn start_all_gather(&self, b: &Cpu, shard: &CpuBuf, out: &mut CpuBuf) -> anyhow::Result<Ticket> {
        if self.hang {
            let (lock, cv) = &*self.released;
            let _held = cv.wait_while(lock.lock().unwrap(), |released| !*released).unwrap();
        }
        self.comm.start_all_gather(b, shard, out)
    }
    fn start_reduce_scatter(&self, b: &Cpu, input: &CpuBuf, out: &mut CpuBuf) -> anyhow::Result<Ticket> {
        self.comm.start_reduce_scatter(b, input, out)
    }
    fn wait(&self, b: &Cpu, t: Ticket) -> anyhow::Result<()> {
        self.comm.wait(b, t)
    }
    fn take_busy_secs(&self) -> anyhow::Result<f64> {
        DeviceComm::<Cpu>::take_busy_secs(&*self.comm)
    }
}

impl Comm for Hangs {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> anyhow::Result<()> {
        self.comm.all_gather(shard, out)
    }
    fn reduce_scatter(&self, input: &[f32], out: &mut [f32]) -> anyhow::Result<()> {
        self.comm.reduce_scatter(input, out)
    }
    fn all_reduce(&self, buf: &mut [f32]) -> anyhow::Result<()> {
        self.comm.all_reduce(buf)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> anyhow::Result<()> {
        self.comm.broadcast(buf, root)
    }
    fn barrier(&self) -> anyhow::Result<()> {
        self.comm.barrier()
    }
    fn abort(&self, why: &str) {
        self.comm.abort(why)
    }
}

#[test]
fn a_rank_that_stops_responding_is_reported_after_the_collective_timeout_instead_of_hanging() {
    let cfg = tiny();
    let released = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let (mut f, comms) = hanging_pair(&released);
    f.stall_timeout = Some(std::time::Duration::from_millis(300));
    // Instead of exiting the process, the test records the report and releases both ranks.
    let seen = Arc::new(Mutex::new(None::<String>));
    let (record, comm0, release) = (seen.clone(), comms[0].clone(), released.clone());
    f.on_stuck = Arc::new(move |why: &str| {
        *record.lock().unwrap() = Some(why.to_string());
        comm0.abort("released by the test");
        *release.0.lock().unwrap() = true;
        release.1.notify_all();
    });
    // Should the limit never fire, this releases the ranks after 10 s, so the test fails instead
    // of hanging.
    let (comm0, backstop) = (comms[0].clone(), released.clone());
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(10));
        comm0.abort("released by the test's backstop");
        *backstop.0.lock().unwrap() = true;
        backstop.1.notify_all();
    });
    let t = std::time::Instant::now();
    assert!(f.step(&[batch(&cfg, 2, 16)], 1, 1.0 / 32.0, 1.0, hp()).is_err(), "the step cannot succeed");
    assert!(t.elapsed() >= std::time::Duration::from_millis(300), "reported before the limit");
    let why = seen.lock().unwrap().clone().expect("on_stuck was told");
    assert!(
        why.starts_with("2 of 2 rank(s) on this node still inside the training step after 0.3 s")
            && why.contains("parallel.collective_timeout_s"),
        "{why}"
    );
}

/// Two ranks, rank 1's first all-gather held until `released` is set; and their communicators.
fn hanging_pair(released: &Arc<(Mutex<bool>, std::sync::Condvar)>) -> (Fsdp<Cpu>, Vec<Arc<LocalComm>>) {
    let cfg = tiny();
    let full = random_weights(&cfg, 0).unwrap();
    let comms: Vec<Arc<LocalComm>> = local_group(2).into_iter().map(Arc::new).collect();
    let group = comms
        .iter()
        .enumerate()
        .map(|(r, c)| {
            let comm = Hangs { comm: c.clone(), hang: r == 1, released: released.clone() };
            Member { backend: Cpu::new(), comm: Box::new(comm) as Box<dyn DeviceComm<Cpu>> }
        })
        .collect();
    (Fsdp::new(&cfg, &full, None, group, 1, 16, Keep::All).unwrap(), comms)
}

#[test]
fn collective_timeout_zero_waits_for_a_slow_rank() {
    let cfg = tiny();
    let released = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let (mut f, _) = hanging_pair(&released);
    f.stall_timeout = kiln::train::fsdp::stall_timeout(0);
    assert_eq!(f.stall_timeout, None, "0 is no limit");
    assert_eq!(kiln::train::fsdp::stall_timeout(600), Some(std::time::Duration::from_secs(600)));
    let told = Arc::new(Mutex::new(None::<String>));
    let record = told.clone();
    f.on_stuck = Arc::new(move |why: &str| *record.lock().unwrap() = Some(why.to_string()));
    // The slow rank comes back after 1.5 s: without a limit the step just takes that long.
    let release = released.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        *release.0.lock().unwrap() = true;
        release.1.notify_all();
    });
    let b = batch(&cfg, 2, 16);
    let step = common::within(std::time::Duration::from_secs(120), "the step with a slow rank", move || {
        f.step(&[b], 1, 1.0 / 32.0, 1.0, hp()).map(|(loss, _)| loss).map_err(|e| e.to_string())
    });
    assert!(step.unwrap().is_finite());
    assert_eq!(*told.lock().unwrap(), None, "reported a slow rank as stuck with no limit set");
}

/// With the default `on_stuck`, a process whose ranks stay stuck past the limit prints why and
/// exits with status 2 (the ranks cannot be released, so the process ends). Run in a child
/// process of this test binary, which plays the stuck run.
#[test]
fn a_stuck_step_exits_the_process_with_status_2() {
    const CHILD: &str = "KILN_TEST_STUCK_CHILD";
    if std::env::var(CHILD).is_ok_and(|v| v == "1") {
        let cfg = tiny();
        let released = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let (mut f, _) = hanging_pair(&released);
        f.stall_timeout = Some(std::time::Duration::from_millis(300));
        let _ = f.step(&[batch(&cfg, 2, 16)], 1, 1.0 / 32.0, 1.0, hp());
        unreachable!("the step returned: the process should have exited");
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child.args(["--exact", "a_stuck_step_exits_the_process_with_status_2", "--nocapture"]).env(CHILD, "1");
    let o = common::output_within(&mut child, std::time::Duration::from_secs(120), "the stuck child");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("error: 2 of 2 rank(s) on this node still inside the training step after 0.3 s"), "{err}");
    assert!(err.contains("parallel.collective_timeout_s") && !err.contains("panicked"), "{err}");
}
