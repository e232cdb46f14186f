//! A run across nodes, with the nodes played by two trainers in one process over the in-process
//! group (what differs on real nodes is only the transport, NCCL, and the rendezvous, tested in
//! tests/multinode.rs). Node 0 makes the run and takes commands; node 1 follows it from the
//! config node 0 resolved. Together they must train exactly like one process with the same world
//! size, obey node 0's commands on both nodes, and leave only node 0's writing behind.

mod common;

use common::{metrics as records, train_args as args};
use kiln::backend::cpu::Cpu;
use kiln::config::RunConfig;
use kiln::dist::local::cpu_group;
use kiln::train::events::Command;
use kiln::train::run::{build_on, locate, Located};
use kiln::train::trainer::{NodeRole, RunEnd};
use std::path::{Path, PathBuf};

fn config(dir: &Path) -> PathBuf {
    // Held-out documents, so the scheduled and commanded evals have something to score.
    let data = common::prepared_corpus_holding_out(dir, 0.1);
    let cfg = format!(
        r#"[model]
n_layer = 2
d_model = 48
n_head = 4
n_kv_head = 2
d_ff = 96
vocab_size = 32000
max_seq_len = 32
{corpus}[train]
micro_batch = 4
grad_accum = 2
max_steps = 6
seed = 5
[parallel]
world_size = 2
[eval]
every_steps = 3
batches = 1
[checkpoint]
every_steps = 4
keep_last = 10
"#,
        corpus = common::corpus_sections(&data, 32)
    );
    let p = dir.join("nodes.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

fn checkpoints(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    names
}

#[test]
fn two_nodes_train_exactly_like_one_process_and_follow_node_zeros_commands() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());

    // One process, world size 2.
    let one = dir.path().join("one");
    let a = args(&cfg, &one);
    let mut t = build_on(&a, locate(&a).unwrap(), Cpu::new(), 1e12, NodeRole::SINGLE, |_| Ok(cpu_group(2))).unwrap();
    assert_eq!(t.run(6, &mut |_| {}).unwrap(), RunEnd::Done);

    // Two nodes of one rank each. Node 0 makes the run; node 1 gets node 0's resolved config and
    // run directory (over the rendezvous, on real nodes) and writes nothing.
    let two = dir.path().join("two");
    let a = args(&cfg, &two);
    let mut group = cpu_group(2);
    let second = group.split_off(1);
    let lead = NodeRole { rank: 0, count: 2 };
    let mut node0 = build_on(&a, locate(&a).unwrap(), Cpu::new(), 1e12, lead, |_| Ok(group)).unwrap();
    let plan = RunConfig::parse(&node0.cfg.to_toml().unwrap(), "node 0's run config", &[]).unwrap();
    let located = Located { cfg: plan, run_dir: two.clone(), resuming: true };
    let follower = NodeRole { rank: 1, count: 2 };
    let mut node1 = build_on(&a, located, Cpu::new(), 1e12, follower, |_| Ok(second)).unwrap();

    // Commands waiting at the first step boundary: both nodes must act on them together.
    let (tx, rx) = std::sync::mpsc::channel();
    tx.send(Command::EvalNow).unwrap();
    tx.send(Command::CheckpointNow).unwrap();
    let (node0, node1) = (&mut node0, &mut node1);
    let (end0, end1) = std::thread::scope(|s| {
        let h0 = s.spawn(move || node0.run_with_commands(6, Some(&rx), &mut |_| {}).unwrap());
        let h1 = s.spawn(move || node1.run_with_commands(6, None, &mut |_| {}).unwrap());
        (h0.join().unwrap(), h1.join().unwrap())
    });
    assert_eq!((end0, end1), (RunEnd::Done, RunEnd::Done));

    let loss = |run: &Path| records(run, "step").iter().map(|v| v["loss"].as_f64().unwrap()).collect::<Vec<_>>();
    assert_eq!(loss(&one).len(), 6);
    assert_eq!(loss(&two), loss(&one), "per-step losses (bit for bit: the same sums in the same order)");
    // Node 0's records show every rank of the world, its own and node 1's.
    for v in records(&two, "step") {
        let ranks: Vec<u64> = v["ranks"].as_array().unwrap().iter().map(|r| r["rank"].as_u64().unwrap()).collect();
        assert_eq!(ranks, vec![0, 1]);
    }
    // The scheduled evals (step 3, 6) on both; the commanded one (step 0) on the two-node run.
    let evals = |run: &Path| records(run, "eval").iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(evals(&one), vec![3, 6]);
    assert_eq!(evals(&two), vec![0, 3, 6]);
    assert_eq!(checkpoints(&one), vec!["step-00000004", "step-00000006"]);
    assert_eq!(checkpoints(&two), vec!["step-00000000", "step-00000004", "step-00000006"]);
    // The final checkpoints hold the same weights and optimizer state.
    for f in
        ["model.safetensors", "optimizer/rank-00000-of-00002.safetensors", "optimizer/rank-00001-of-00002.safetensors"]
    {
        let read = |run: &Path| std::fs::read(run.join("checkpoints/step-00000006").join(f)).unwrap();
        assert!(read(&one) == read(&two), "{f} differs");
    }
}
