//! Run health end to end. The step guard: a non-finite gradient on one device, or on one FSDP rank
//! of two, is skipped without touching the weights or the AdamW moments; spikes are judged from a
//! running window that a resume restores exactly; `[guard]` mistakes are one-line errors. Per-unit
//! gradient norms: recorded on logged steps, adding up to the global norm, alike under FSDP.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kiln(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(args).env("RAYON_NUM_THREADS", "2");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Asserts success; returns what the command printed (stdout, then stderr).
fn ok(o: Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "kiln failed: {err}");
    String::from_utf8_lossy(&o.stdout).to_string() + &err
}

/// A two-block model over the bundled validation text, prepared into `dir/data`.
fn setup(dir: &Path, guard: &str) -> PathBuf {
    let data = dir.join("data");
    let input = root().join("assets/corpus/slimpajama_like/validation");
    ok(kiln(&["prepare", "--out", data.to_str().unwrap(), "--val-fraction", "0.05", input.to_str().unwrap()], &[]));
    let cfg = format!(
        r#"
[model]
n_layer = 2
d_model = 64
n_head = 4
n_kv_head = 2
d_ff = 128
vocab_size = 32000
max_seq_len = 64
[data]
seq_len = 32
[[data.sources]]
name = "text"
path = "{data}"
weight = 1.0
[train]
micro_batch = 2
max_steps = 12
seed = 9
[optim]
lr = 3e-3
warmup_steps = 2
[checkpoint]
every_steps = 1
keep_last = 100
{guard}
"#,
        data = data.display()
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

fn records(run: &Path, kind: &str) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == kind)
        .collect()
}

/// Every file of a checkpoint but trainer.json (whose step and guard counts move on), by name.
fn checkpoint_files(run: &Path, step: u64) -> Vec<(String, Vec<u8>)> {
    let dir = run.join(format!("checkpoints/step-{step:08}"));
    let mut out = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() != "trainer.json" {
                out.push((p.strip_prefix(&dir).unwrap().display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_non_finite_gradient_is_skipped_and_leaves_weights_and_moments_as_they_were() {
    // One device, then two FSDP ranks where only rank 1 sees the NaN: both ranks must skip.
    for (world, poison) in [("1", "3"), ("2", "3:1")] {
        let t = tempfile::tempdir().unwrap();
        let cfg = setup(t.path(), "");
        let run = t.path().join("run");
        let world_set = format!("parallel.world_size={world}");
        let args = ["train", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--headless"];
        let sets = ["--set", "train.max_steps=5", "--set", &world_set];
        let printed = ok(kiln(&[&args[..], &sets[..]].concat(), &[("KILN_TEST_NAN_GRAD", poison)]));
        assert!(
            printed.contains("guard") && printed.contains("non-finite"),
            "world {world}: the headless line: {printed}"
        );
        let guard = records(&run, "guard");
        assert_eq!(guard.len(), 1, "world {world}: {guard:?}");
        assert_eq!((guard[0]["step"].as_u64(), guard[0]["action"].as_str()), (Some(3), Some("skip")));
        assert_eq!(guard[0]["reason"], "non-finite loss or gradient norm");
        let steps: Vec<u64> = records(&run, "step").iter().map(|r| r["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [1, 2, 4, 5], "world {world}: the skipped step has no step record");
        assert!(records(&run, "step").iter().all(|r| r["loss"].as_f64().unwrap().is_finite()));
        // Weights and every rank's moments after the skipped step are those before it, bit for bit.
        let (before, after) = (checkpoint_files(&run, 2), checkpoint_files(&run, 3));
        assert!(
            before.iter().any(|(n, _)| n.contains("rank-")),
            "{:?}",
            before.iter().map(|f| &f.0).collect::<Vec<_>>()
        );
        assert_eq!(before.len(), after.len());
        for ((n, a), (m, b)) in before.iter().zip(&after) {
            assert_eq!(n, m);
            assert!(a == b, "world {world}: {n} changed in the skipped step");
        }
        assert!(checkpoint_files(&run, 4) != after, "world {world}: training goes on after the skip");
        let state: Value =
            serde_json::from_slice(&std::fs::read(run.join("checkpoints/step-00000003/trainer.json")).unwrap())
                .unwrap();
        assert_eq!(state["guard"]["skipped"].as_u64(), Some(1), "world {world}: the skip is in the trainer state");
    }
}

#[test]
fn spikes_are_judged_from_a_window_that_a_resume_restores_exactly() {
    // A z of 0.5 trips on ordinary step-to-step noise: some steps are skipped as spikes.
    let guard = "[guard]\nz = 0.5\nwindow = 4\nmin_steps = 3\nmax_consecutive = 0";
    let t = tempfile::tempdir().unwrap();
    let cfg = setup(t.path(), guard);
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let train = |run: &Path, extra: &[&str]| {
        let args = ["train", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--headless"];
        ok(kiln(&[&args[..], extra].concat(), &[]));
    };
    train(&a, &[]);
    train(&b, &["--steps", "6"]);
    ok(kiln(&["train", "--resume", b.to_str().unwrap(), "--headless"], &[]));
    let spikes = records(&a, "guard");
    assert!(spikes.iter().any(|g| g["step"].as_u64().unwrap() > 6), "a spike after the resume point: {spikes:?}");
    assert!(spikes.iter().all(|g| g["reason"].as_str().unwrap().contains("spike") && g["z"].as_f64().unwrap() > 0.5));
    for kind in ["step", "guard"] {
        let (ra, rb) = (records(&a, kind), records(&b, kind));
        assert_eq!(ra.len(), rb.len(), "{kind} records");
        for (x, y) in ra.iter().zip(&rb) {
            assert_eq!(x["step"], y["step"]);
            assert_eq!(
                x["loss"].as_f64().map(f64::to_bits),
                y["loss"].as_f64().map(f64::to_bits),
                "{kind} {}",
                x["step"]
            );
            assert_eq!(x["grad_norm"].as_f64().map(f64::to_bits), y["grad_norm"].as_f64().map(f64::to_bits));
        }
    }
}

#[test]
fn guard_mistakes_are_one_line_errors_naming_the_key() {
    let t = tempfile::tempdir().unwrap();
    for (guard, needle) in [
        ("[guard]\nwindow = 1", "guard.window"),
        ("[guard]\nz = -1.0", "guard.z"),
        ("[guard]\nmin_steps = 500", "guard.min_steps"),
        ("[guard]\naction = \"explode\"", "explode"),
        ("[guard]\nzz = 1", "zz"),
    ] {
        let cfg = setup(t.path(), guard);
        let run = t.path().join("never");
        let o = kiln(&["train", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--headless"], &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && !err.contains("panicked"), "{guard}: {err}");
        let last = err.trim_end().lines().last().unwrap_or("");
        assert!(last.starts_with("error: ") && last.contains(needle), "{guard}: {last}");
        assert!(!run.exists(), "{guard}: a refused config leaves no run behind");
    }
}

#[test]
fn logged_steps_carry_each_units_gradient_norm_and_fsdp_agrees() {
    let t = tempfile::tempdir().unwrap();
    let cfg = setup(t.path(), "");
    let mut per_world = Vec::new();
    for world in ["1", "2"] {
        let run = t.path().join(format!("w{world}"));
        let world_set = format!("parallel.world_size={world}");
        let args = ["train", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--headless"];
        let sets = ["--set", "train.max_steps=4", "--set", "train.log_every=2", "--set", &world_set];
        ok(kiln(&[&args[..], &sets[..]].concat(), &[]));
        let steps = records(&run, "step");
        let logged: Vec<&Value> = steps.iter().filter(|r| r.get("unit_grad_norms").is_some()).collect();
        assert_eq!(logged.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 4], "world {world}");
        for r in &logged {
            let units: Vec<f64> =
                r["unit_grad_norms"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            // The embedding, two blocks, the final norm with the head.
            assert_eq!(units.len(), 4);
            assert!(units.iter().all(|&n| n.is_finite() && n > 0.0), "{units:?}");
            let total = units.iter().map(|n| n * n).sum::<f64>().sqrt();
            let global = r["grad_norm"].as_f64().unwrap();
            assert!((total - global).abs() <= 1e-9 * global, "world {world}: units {total} against global {global}");
        }
        per_world.push(logged.iter().map(|r| r["unit_grad_norms"].clone()).collect::<Vec<_>>());
    }
    // FSDP sums each unit's shards over the ranks: the same norms up to f32 rounding.
    for (a, b) in per_world[0].iter().zip(&per_world[1]) {
        for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4 * x.max(y), "one device {x}, two ranks {y}");
        }
    }
}
