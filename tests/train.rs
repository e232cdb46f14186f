//! The trainer end to end through the `kiln` binary: parity with a PyTorch AdamW loop, exact
//! resume, the loss falling, crash-safe checkpoints, and every bad input giving a one-line error.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("RAYON_NUM_THREADS", "2").output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "kiln failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Asserts the error contract and returns the message.
fn fails(o: &Output, needle: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "expected failure mentioning {needle:?}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let last = err.trim_end().lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("error: "), "{err}");
    assert!(last.contains(needle), "{last:?} should mention {needle:?}");
    last
}

fn step_records(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .collect()
}

fn tokenizer_json() -> Vec<u8> {
    kiln::tokenizer::LLAMA2_TOKENIZER_JSON.to_vec()
}

/// A config over the prepared directory `data` for a small model.
fn small_config(dir: &Path, data: &Path, extra: &str) -> PathBuf {
    let cfg = format!(
        r#"
[model]
n_layer = 2
d_model = 64
n_head = 4
n_kv_head = 2
d_ff = 128
vocab_size = 32000
max_seq_len = 128
tie_embeddings = true
[tokenizer]
path = "{tok}"
[data]
seq_len = 64
[[data.sources]]
name = "text"
path = "{data}"
weight = 1.0
[train]
micro_batch = 2
grad_accum = 2
max_steps = 20
seed = 5
log_every = 5
[optim]
lr = 3e-3
min_lr = 3e-4
warmup_steps = 3
[checkpoint]
every_steps = 5
keep_last = 2
[eval]
every_steps = 5
batches = 1
tasks = ["piqa", "winogrande"]
task_limit = 4
[sample]
every_steps = 10
prompts = ["Once upon a time"]
max_new_tokens = 8
{extra}
"#,
        tok = root().join("assets/tokenizer/llama2/tokenizer.json").display(),
        data = data.display()
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

/// The bundled validation text, prepared once per test into `dir/data`.
fn prepared_text(dir: &Path) -> PathBuf {
    let out = dir.join("data");
    let input = root().join("assets/corpus/slimpajama_like/validation");
    ok(&kiln(&["prepare", "--out", out.to_str().unwrap(), "--val-fraction", "0.05", input.to_str().unwrap()]));
    out
}

#[test]
fn adamw_loop_matches_pytorch_on_a_one_window_dataset() {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/train/adamw_reference.json")).unwrap(),
    )
    .unwrap();
    let window: Vec<u32> = r["window"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("one");
    // The stream is exactly seq_len + 1 tokens: the same window every step.
    kiln::data::prepare::write_token_dataset(&data, &window, &[], &tokenizer_json()).unwrap();
    let hp = &r["hp"];
    let cfg = format!(
        r#"[model]
init = "{model}"
[data]
seq_len = {seq}
[[data.sources]]
name = "one"
path = "{data}"
weight = 1.0
[train]
micro_batch = 1
max_steps = {steps}
[optim]
lr = {lr}
min_lr = {min_lr}
warmup_steps = {warmup}
weight_decay = {wd}
beta1 = {b1}
beta2 = {b2}
eps = {eps}
grad_clip = {clip}
"#,
        model = root().join("tests/fixtures/models/llama2_vocab_tied_bf16").display(),
        seq = r["seq_len"],
        data = data.display(),
        steps = hp["max_steps"],
        lr = hp["lr"],
        min_lr = hp["min_lr"],
        warmup = hp["warmup_steps"],
        wd = hp["weight_decay"],
        b1 = hp["beta1"],
        b2 = hp["beta2"],
        eps = hp["eps"],
        clip = hp["grad_clip"],
    );
    let cfg_path = t.path().join("adamw.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let run = t.path().join("run");
    ok(&kiln(&["train", cfg_path.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--headless"]));
    let got = step_records(&run);
    let want = r["steps"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        let step = w["step"].as_u64().unwrap();
        let tol = if step == 1 { 1e-4 } else { 2e-3 };
        for key in ["loss", "grad_norm", "lr"] {
            let (a, b) = (g[key].as_f64().unwrap(), w[key].as_f64().unwrap());
            assert!(((a - b) / b).abs() < tol, "step {step} {key}: kiln {a} vs torch {b}");
        }
    }
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run_and_the_loss_falls() {
    let t = tempfile::tempdir().unwrap();
    let data = prepared_text(t.path());
    let cfg = small_config(t.path(), &data, "");
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    ok(&kiln(&["train", cfg.to_str().unwrap(), "--run-dir", a.to_str().unwrap(), "--headless"]));
    ok(&kiln(&["train", cfg.to_str().unwrap(), "--run-dir", b.to_str().unwrap(), "--headless", "--steps", "10"]));
    assert_eq!(step_records(&b).len(), 10);
    ok(&kiln(&["train", "--resume", b.to_str().unwrap(), "--headless"]));
    let (ra, rb) = (step_records(&a), step_records(&b));
    assert_eq!(ra.len(), 20);
    assert_eq!(rb.len(), 20);
    for (x, y) in ra.iter().zip(&rb) {
        assert_eq!(x["loss"].as_f64().unwrap().to_bits(), y["loss"].as_f64().unwrap().to_bits(), "step {}", x["step"]);
        assert_eq!(x["grad_norm"].as_f64().unwrap().to_bits(), y["grad_norm"].as_f64().unwrap().to_bits());
    }
    let final_a = std::fs::read(a.join("checkpoints/step-00000020/model.safetensors")).unwrap();
    let final_b = std::fs::read(b.join("checkpoints/step-00000020/model.safetensors")).unwrap();
    assert!(final_a == final_b, "final weights differ");
    // The loss falls, evals and samples are recorded, retention kept the newest two.
    let first = ra[0]["loss"].as_f64().unwrap();
    let last = ra[19]["loss"].as_f64().unwrap();
    assert!(last < first - 1.0, "loss {first} -> {last}");
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"kind\":\"eval\"") && metrics.contains("\"kind\":\"sample\""));
    let tasks: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "eval_tasks")
        .collect();
    assert_eq!(tasks.len(), 4);
    assert_eq!(tasks[0]["results"][0]["task"], "piqa");
    assert_eq!(tasks[0]["results"][1]["n"], 4);
    let mut ckpts: Vec<String> = std::fs::read_dir(a.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    ckpts.sort();
    assert_eq!(ckpts, vec!["latest", "step-00000015", "step-00000020"]);
    // A run directory or a checkpoint works as --model.
    let s: Value =
        serde_json::from_str(&ok(&kiln(&["score", "--model", a.to_str().unwrap(), "--text", "Once upon a time"])))
            .unwrap();
    assert_eq!(s["logprobs"].as_array().unwrap().len(), 4);
    // `kiln plot` renders the run as PNG or SVG; a bad output name is a one-line error.
    ok(&kiln(&["plot", a.to_str().unwrap()]));
    assert!(std::fs::metadata(a.join("plot.png")).unwrap().len() > 10_000);
    let svg = t.path().join("curves.svg");
    ok(&kiln(&["plot", a.to_str().unwrap(), "--out", svg.to_str().unwrap()]));
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    fails(&kiln(&["plot", a.to_str().unwrap(), "--out", "x.jpg"]), "must end in .png or .svg");
    fails(&kiln(&["plot", t.path().to_str().unwrap()]), "metrics.jsonl");
    // Every step record carries the documented fields as finite, non-negative numbers (serde_json
    // writes a NaN as null, which `.get(key).is_some()` would have accepted), and those that
    // measure training are positive.
    for r in &ra {
        for key in ["step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "step_ms", "data_wait_ms", "mfu"] {
            let x = r[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number in {r}"));
            assert!(x.is_finite() && x >= 0.0, "{key} = {x} in {r}");
        }
        for key in ["step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{key} is zero in {r}");
        }
    }
}

#[test]
fn kill_9_never_leaves_latest_on_a_broken_checkpoint() {
    let t = tempfile::tempdir().unwrap();
    let data = prepared_text(t.path());
    let cfg = small_config(t.path(), &data, "");
    let run = t.path().join("run");
    let sets = ["--set", "checkpoint.every_steps=1", "--set", "train.max_steps=1000", "--set", "eval.every_steps=0"];
    let mut first = vec!["train", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--headless"];
    first.extend(sets);
    first.extend(["--steps", "1"]);
    ok(&kiln(&first));
    let resume = ["train", "--resume", run.to_str().unwrap(), "--headless"];
    let held = run.join(".kiln-test-held");
    let ckpts = run.join("checkpoints");
    // Each round kills the process inside a checkpoint write, at a stage the write itself reports
    // (the hook in checkpoint::save): the staging directory made, the weights written, the
    // optimizer state written, trainer.json with its checksums written, renamed into place, and
    // `latest` moved.
    let stages = ["staging", "weights", "optimizer", "state", "renamed", "latest"];
    for (round, stage) in stages.iter().enumerate() {
        let before = kiln::train::checkpoint::latest(&run).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(resume)
            .env("KILN_TEST_HOLD_CHECKPOINT", stage)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::fs::read_to_string(&held).ok().as_deref() != Some(stage) {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("round {round}: kiln exited ({status}) before reaching the {stage} stage of a checkpoint");
            }
            assert!(std::time::Instant::now() < deadline, "round {round}: never reached the {stage} stage");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.kill().unwrap(); // SIGKILL, mid-write
        child.wait().unwrap();
        std::fs::remove_file(&held).unwrap();
        // This round's staging directory (earlier rounds' stay until a write completes).
        let mine = format!("-{}", child.id());
        let staging: Vec<String> = std::fs::read_dir(&ckpts)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with(".tmp-") && n.ends_with(&mine))
            .collect();
        let latest = kiln::train::checkpoint::latest(&run).unwrap();
        if round < 4 {
            // Killed before the rename: the write is left half done in its staging directory, and
            // `latest` still names the checkpoint before it.
            assert_eq!(staging.len(), 1, "round {round} ({stage}): no interrupted write in {staging:?}");
            assert_eq!(latest, before, "round {round} ({stage}): latest moved");
        } else if *stage == "renamed" {
            // Renamed but `latest` not yet moved: the new checkpoint is whole, and `latest` still
            // names the one before it (the next save at that step replaces the leftover).
            assert!(staging.is_empty(), "round {round} ({stage}): {staging:?}");
            assert_eq!(latest, before, "round {round} ({stage}): latest moved");
            let newest = ckpts.join(kiln::train::checkpoint::whole_checkpoints(&run).unwrap().pop().unwrap());
            assert_ne!(Some(&newest), before.as_ref(), "round {round} ({stage}): no renamed checkpoint");
            kiln::train::checkpoint::verify_files(&newest).unwrap();
        } else {
            assert!(staging.is_empty(), "round {round} ({stage}): {staging:?}");
            assert_ne!(latest, before, "round {round} ({stage}): latest did not move");
        }
        if let Some(latest) = latest {
            // Whatever `latest` names is whole: it verifies, loads as a model and as training state.
            kiln::train::checkpoint::verify_files(&latest).unwrap();
            kiln::io::load_model_dir(&latest, kiln::backend::cpu::Cpu::new()).unwrap();
            kiln::train::checkpoint::read_state(&latest).unwrap();
        }
    }
    // And the run resumes, clearing what the killed writes left.
    ok(&kiln(&["train", "--resume", run.to_str().unwrap(), "--headless", "--steps", "1"]));
    let left = std::fs::read_dir(&ckpts)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp-"))
        .count();
    assert_eq!(left, 0, "staging directories of killed writes are left");
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let t = tempfile::tempdir().unwrap();
    let data = prepared_text(t.path());
    let run = |cfg: &Path, extra: &[&str]| {
        let dir = t.path().join(format!("run-{}", rand_suffix()));
        let mut a = vec!["train", cfg.to_str().unwrap(), "--run-dir", dir.to_str().unwrap(), "--headless"];
        a.extend(extra);
        kiln(&a)
    };
    let cfg = small_config(t.path(), &data, "");
    fails(&run(&cfg, &["--set", "train.micro_bach=2"]), "micro_bach");
    fails(&run(&cfg, &["--set", "train.micro_batch=\"two\""]), "train.micro_batch");
    fails(&run(&cfg, &["--set", "data.sources=[{name=\"x\", path=\"/nope/data\", weight=1.0}]"]), "/nope/data");
    fails(&run(&cfg, &["--set", "data.seq_len=100000"]), "seq_len");
    fails(&run(&cfg, &["--set", "model.vocab_size=1000"]), "vocab");
    // NaN and sizes no machine holds are refused before anything is allocated.
    fails(&run(&cfg, &["--set", "optim.grad_clip=nan"]), "optim.grad_clip must be a non-negative number");
    fails(&run(&cfg, &["--set", "sample.top_p=2.0"]), "sample.top_p");
    fails(&run(&cfg, &["--set", "model.vocab_size=4000000000"]), "vocab_size 4000000000 is beyond");
    fails(&run(&cfg, &["--set", "train.micro_batch=1000000"]), "GiB of memory");
    fails(&run(&cfg, &["--set", "train.grad_accum=4000000000"]), "train.grad_accum 4000000000 is beyond");
    // Negative counts: clap's several-line report becomes one line.
    fails(&run(&cfg, &["--steps", "-1"]), "unexpected argument '-1'");
    // A dataset shorter than seq_len + 1.
    let short = t.path().join("short");
    kiln::data::prepare::write_token_dataset(&short, &[1, 2, 3, 4, 5], &[], &tokenizer_json()).unwrap();
    let p = short.display().to_string();
    fails(
        &run(&cfg, &["--set", &format!("data.sources=[{{name=\"s\", path=\"{p}\", weight=1.0}}]")]),
        "shorter than seq_len + 1",
    );
    // An empty dataset.
    let empty = t.path().join("empty");
    kiln::data::prepare::write_token_dataset(&empty, &[], &[], &tokenizer_json()).unwrap();
    let p = empty.display().to_string();
    fails(&run(&cfg, &["--set", &format!("data.sources=[{{name=\"e\", path=\"{p}\", weight=1.0}}]")]), "empty dataset");
    // A corrupt shard.
    let shard = data.join("train-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&shard, &bytes).unwrap();
    fails(&run(&cfg, &[]), "corrupt shard");
    bytes[100] ^= 0xff;
    std::fs::write(&shard, &bytes).unwrap();
    // An unwritable run directory (its parent is a file).
    let file = t.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let o = kiln(&["train", cfg.to_str().unwrap(), "--run-dir", file.join("run").to_str().unwrap()]);
    fails(&o, "plain-file");
    // A malformed config file.
    let bad = t.path().join("bad.toml");
    std::fs::write(&bad, "[model\npreset = 1").unwrap();
    fails(&run(&bad, &[]), "bad.toml");
    // A device this machine cannot provide, checked before the run directory is made.
    let dir = t.path().join("cuda-run");
    let o = kiln(&[
        "train",
        cfg.to_str().unwrap(),
        "--run-dir",
        dir.to_str().unwrap(),
        "--set",
        "parallel.device=\"cuda\"",
    ]);
    fails(&o, "parallel.device = \"cuda\"");
    assert!(!dir.exists(), "a refused run leaves no directory");
    fails(
        &run(&cfg, &["--set", "parallel.device=\"tpu\""]),
        "parallel.device: unknown variant `tpu`, expected `cpu` or `cuda`",
    );
    // Multi-node launches need NCCL; a torchrun-style launch of CPU ranks is refused clearly.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", cfg.to_str().unwrap(), "--run-dir", t.path().join("mn").to_str().unwrap()])
        .envs([("NNODES", "2"), ("NODE_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")])
        .output()
        .unwrap();
    fails(&o, "NNODES=2");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", cfg.to_str().unwrap(), "--run-dir", t.path().join("mn").to_str().unwrap()])
        .envs([("NNODES", "2"), ("NODE_RANK", "5"), ("MASTER_ADDR", "127.0.0.1")])
        .output()
        .unwrap();
    fails(&o, "NODE_RANK=5");
    // Resuming something that is not a run.
    fails(&kiln(&["train", "--resume", t.path().to_str().unwrap()]), "not a kiln run directory");
    // prepare: a malformed jsonl line names file and line.
    let jl = t.path().join("bad.jsonl");
    std::fs::write(&jl, "{\"text\": \"fine\"}\n{oops\n").unwrap();
    let o = kiln(&["prepare", "--out", t.path().join("p").to_str().unwrap(), jl.to_str().unwrap()]);
    fails(&o, "bad.jsonl:2");
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// Builds tests/shims/full_disk.c (a write shim that makes a directory a small full disk) into
/// `dir`; None where there is no compiler (a failure where KILN_REQUIRE_GXX=1).
fn full_disk_shim(dir: &Path) -> Option<PathBuf> {
    if !common::emulated_gpu::gxx_present() {
        return None;
    }
    let lib = dir.join("libfulldisk.so");
    let src = root().join("tests/shims/full_disk.c");
    let o = Command::new("g++")
        .args(["-x", "c", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .output()
        .unwrap();
    assert!(o.status.success(), "building the full-disk shim: {}", String::from_utf8_lossy(&o.stderr));
    Some(lib)
}

/// The run fails at the step-10 checkpoint with one line, and `latest` still names step 5's.
fn assert_full_disk_failure(o: &Output, run: &Path) {
    let msg = fails(o, "checkpoint not written (the previous one is intact)");
    assert!(msg.contains("step-00000010"), "{msg}");
    let latest = kiln::train::checkpoint::latest(run).unwrap().unwrap();
    assert!(latest.ends_with("step-00000005"), "{}", latest.display());
    kiln::train::checkpoint::verify_files(&latest).unwrap();
}

#[test]
fn disk_full_while_checkpointing_keeps_the_previous_checkpoint() {
    let t = tempfile::tempdir().unwrap();
    let data = prepared_text(t.path());
    let cfg = small_config(t.path(), &data, "");
    let train = |run: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(["train", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--headless"])
            .args(["--set", "eval.every_steps=0"])
            .env("RAYON_NUM_THREADS", "2");
        c
    };
    // 40 MiB holds one checkpoint of this model (about 27 MB: weights, two moments, tokenizer) but
    // not two. First through the write shim, which needs no privileges, so this runs everywhere.
    let shim_dir = t.path().join("shim");
    std::fs::create_dir(&shim_dir).unwrap();
    match full_disk_shim(&shim_dir) {
        Some(lib) => {
            // The shim matches the paths the kernel reports for open files: canonical ones.
            std::fs::create_dir(shim_dir.join("disk")).unwrap();
            let disk = shim_dir.join("disk").canonicalize().unwrap();
            let run = disk.join("run");
            let o = train(&run)
                .env("LD_PRELOAD", &lib)
                .env("KILN_FULL_DISK_DIR", &disk)
                .env("KILN_FULL_DISK_BYTES", (40u64 << 20).to_string())
                .output()
                .unwrap();
            assert_full_disk_failure(&o, &run);
        }
        None => common::skipped("disk full (write shim)", "no C compiler (KILN_REQUIRE_GXX=1 fails instead)"),
    }
    // Then on a real small filesystem, where this machine lets the test mount one.
    let mnt = t.path().join("small-disk");
    std::fs::create_dir(&mnt).unwrap();
    let mounted =
        Command::new("mount").args(["-t", "tmpfs", "-o", "size=40M", "tmpfs", mnt.to_str().unwrap()]).status();
    if !matches!(mounted, Ok(s) if s.success()) {
        eprintln!("no tmpfs can be mounted here (needs root): the write shim above stood in for it");
        return;
    }
    let run = mnt.join("run");
    let o = train(&run).output().unwrap();
    let result = std::panic::catch_unwind(|| assert_full_disk_failure(&o, &run));
    let _ = Command::new("umount").arg(&mnt).status();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn wait_for_steps(run: &Path, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(run.join("metrics.jsonl")) {
            if text.lines().filter(|l| l.contains("\"kind\":\"step\"")).count() >= n {
                return;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("training did not reach {n} steps");
}

/// `kiln train CFG --run-dir RUN --headless` that runs until signalled (no step limit, no periodic
/// checkpoint), plus `--set` for each of `sets`; the caller chooses stdio and spawns it.
fn endless_run(cfg: &Path, run: &Path, sets: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(["train", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--headless"]).args([
        "--set",
        "train.max_steps=100000",
        "--set",
        "checkpoint.every_steps=100000",
    ]);
    for s in sets {
        c.args(["--set", s]);
    }
    c
}

fn signal(child: &std::process::Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
}

#[test]
fn sigint_checkpoints_at_a_step_boundary_and_a_second_one_exits_130() {
    let t = tempfile::tempdir().unwrap();
    let data = prepared_text(t.path());
    let cfg = small_config(t.path(), &data, "");
    let spawn = |run: &Path| {
        endless_run(&cfg, run, &[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let run = t.path().join("int");
    let mut child = spawn(&run);
    wait_for_steps(&run, 2);
    signal(&child, "-INT");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let latest = kiln::train::checkpoint::latest(&run).unwrap().expect("checkpoint written on SIGINT");
    let steps = step_records(&run).len() as u64;
    assert_eq!(kiln::train::checkpoint::read_state(&latest).unwrap().step, steps);

    let run = t.path().join("term");
    let mut child = spawn(&run);
    wait_for_steps(&run, 1);
    signal(&child, "-TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(kiln::train::checkpoint::latest(&run).unwrap().is_some());

    // The second SIGINT goes only once the first has been taken (two signals pending together
    // merge into one), and right away, while the run is still finishing its step: steps are made
    // long (64 micro-steps) so that the run cannot reach its checkpoint in between. The test stops
    // reading stderr before the second signal: a closed stderr must not swallow it.
    let run = t.path().join("twice");
    let mut child = endless_run(&cfg, &run, &["train.grad_accum=64"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_steps(&run, 1);
    signal(&child, "-INT");
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    for line in std::io::BufRead::lines(stderr) {
        if line.unwrap().contains("interrupt: checkpointing") {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            break;
        }
    }
    assert_eq!(child.wait().unwrap().code(), Some(130));
}

#[test]
fn a_live_run_refuses_a_second_process_and_a_closed_stdout_does_not_stop_it() {
    let t = tempfile::tempdir().unwrap();
    let data = prepared_text(t.path());
    let cfg = small_config(t.path(), &data, "");
    let run = t.path().join("live");
    // Stdout is a pipe whose reader goes away at once: every progress line then fails to write.
    let mut child = endless_run(&cfg, &run, &["train.log_every=1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    wait_for_steps(&run, 3);
    let metrics_before = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let e = fails(&kiln(&["train", "--resume", run.to_str().unwrap(), "--headless", "--steps", "1"]), "kiln.lock");
    assert!(e.contains(&format!("the run is in use by process {}", child.id())), "{e}");
    assert!(kiln::train::checkpoint::latest(&run).unwrap().is_none(), "the refused process wrote no checkpoint");
    assert!(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().starts_with(&metrics_before));
    // Still training, then it checkpoints and exits cleanly on SIGINT.
    let n = step_records(&run).len();
    wait_for_steps(&run, n + 2);
    signal(&child, "-INT");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(kiln::train::checkpoint::latest(&run).unwrap().is_some());
}

#[test]
fn a_full_stdout_and_stderr_do_not_stop_training() {
    let t = tempfile::tempdir().unwrap();
    let data = prepared_text(t.path());
    let cfg = small_config(t.path(), &data, "");
    let run = t.path().join("run");
    let full = || std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--headless"])
        .args(["--set", "train.max_steps=6", "--set", "eval.every_steps=0", "--set", "sample.every_steps=3"])
        .env("RAYON_NUM_THREADS", "2")
        .stdout(full())
        .stderr(full())
        .status()
        .unwrap();
    // Every write to the terminal failed with ENOSPC; training, metrics and checkpoints did not.
    assert!(status.success(), "{status}");
    assert_eq!(step_records(&run).len(), 6);
    let latest = kiln::train::checkpoint::latest(&run).unwrap().unwrap();
    assert!(latest.ends_with("step-00000006"), "{}", latest.display());
}
