//! Multi-node launch through the real binary: two `kiln comm-check` processes on this machine,
//! launched torchrun-style and SLURM-style, meet at node 0's port. Without CUDA the NCCL part is
//! skipped with a reason; with it, every collective is checked for exact results.

mod common;

use std::process::{Command, Output};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn comm_check(vars: &[(&str, String)]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["comm-check", "--timeout", "60", "--megabytes", "8"])
        .env_remove("NNODES")
        .env_remove("NODE_RANK")
        .env_remove("MASTER_ADDR")
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn succeeded(o: Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.contains("panicked"));
    out
}

#[test]
fn two_nodes_meet_torchrun_style() {
    let port = free_port().to_string();
    let node = |rank: &str| {
        comm_check(&[
            ("NNODES", "2".into()),
            ("NODE_RANK", rank.into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.clone()),
        ])
    };
    // The second node starts first: it must wait for node 0 rather than fail. Node 0 starts only
    // once node 1 says it found nobody at the port and is waiting (no timer to guess with).
    let mut one = node("1");
    let (waiting_tx, waiting) = std::sync::mpsc::channel();
    let stderr = one.stderr.take().unwrap();
    let one_err = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("node 0 at 127.0.0.1") && line.contains("is not up yet; waiting") {
                let _ = waiting_tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    if waiting.recv_timeout(std::time::Duration::from_secs(60)).is_err() {
        let _ = one.kill();
        panic!("node 1 never said it was waiting for node 0: {}", one_err.join().unwrap());
    }
    let zero = node("0");
    let expect_nccl = nccl_expectation();
    for (child, rank) in [(zero, 0), (one, 1)] {
        let out = succeeded(child.wait_with_output().unwrap());
        assert!(out.contains(&format!("rendezvous: node {rank} of 2")), "{out}");
        assert!(out.contains(expect_nccl), "node {rank}: expected {expect_nccl:?} in {out}");
    }
}

/// What comm-check's NCCL line must say on this machine: the collectives checked where a GPU is
/// present, and skipped for the lack of one (the reason given) where none is. Two nodes over NCCL
/// need a GPU each, which the emulated GPU, being one process's, cannot stand in for.
fn nccl_expectation() -> &'static str {
    if common::real_gpu_present() {
        "collectives exact"
    } else {
        "nccl: skipped ("
    }
}

#[test]
fn two_nodes_meet_slurm_style() {
    let port = free_port().to_string();
    let node = |id: &str| {
        comm_check(&[
            ("SLURM_NNODES", "2".into()),
            ("SLURM_NODEID", id.into()),
            ("SLURM_JOB_NODELIST", "localhost,otherhost".into()),
            ("MASTER_PORT", port.clone()),
        ])
    };
    let (zero, one) = (node("0"), node("1"));
    for (child, rank) in [(zero, 0), (one, 1)] {
        let out = succeeded(child.wait_with_output().unwrap());
        assert!(out.contains(&format!("rendezvous: node {rank} of 2 via localhost")), "{out}");
    }
}

#[test]
fn a_node_that_never_comes_is_named() {
    let port = free_port().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["comm-check", "--timeout", "1"])
        .envs([("NNODES", "3"), ("NODE_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("nodes 1, 2 did not join within 1 s"), "{err}");
}
