//! Bad input found by probing the release binary as a careful user would: each case once slipped
//! through (a hang, a silent deletion, a truncated history, a replaced dataset, a misleading
//! message). Each must now give one line naming the file or flag and the problem, exit code 2,
//! no panic, and leave what is on disk as it was.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("RAYON_NUM_THREADS", "2").output().unwrap()
}

/// `kiln ARGS`, failed by the test (not hung) when it runs past `limit`.
fn kiln_within(args: &[&str], limit: Duration) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args);
    common::output_within(&mut cmd, limit, &format!("kiln {args:?}"))
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "kiln failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// The error contract: exit code 2, no panic, the last line `error: ...` containing `needle`.
fn fails(o: &Output, needle: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "expected exit code 2 mentioning {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let last = err.trim_end().lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("error: "), "{err}");
    assert!(last.contains(needle), "{last:?} should mention {needle:?}");
    assert!(!last.contains(" { ") && !last.contains("Os {"), "a Debug dump, not a message: {last}");
    last
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Two steps of a four-step run, with a checkpoint at each: the smallest run that has a history
/// and more to do.
fn trained_run(dir: &Path) -> PathBuf {
    let cfg = config_on_corpus(
        dir,
        &format!(
            "{SMALL_MODEL}tie_embeddings = true\n[train]\nmicro_batch = 1\nmax_steps = 4\nlog_every = 1\n\
             [optim]\nwarmup_steps = 1\n[checkpoint]\nevery_steps = 1\nkeep_last = 2\n"
        ),
    );
    let run = dir.join("run");
    ok(&kiln(&["train", s(&cfg), "--run-dir", s(&run), "--headless", "--steps", "2"]));
    run
}

/// A model small enough that a step takes milliseconds, with the Llama-2 vocabulary.
const SMALL_MODEL: &str =
    "[model]\nn_layer = 1\nd_model = 32\nn_head = 2\nd_ff = 64\nvocab_size = 32000\nmax_seq_len = 64\n";

/// `dir/run.toml`: `head` (the model and train sections), then the bundled corpus prepared into
/// `dir/data`, sequences of 32 tokens.
fn config_on_corpus(dir: &Path, head: &str) -> PathBuf {
    let data = common::prepared_corpus(dir);
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, format!("{head}{}", common::corpus_sections(&data, 32))).unwrap();
    cfg
}

fn resume(run: &Path) -> Output {
    kiln(&["train", "--resume", s(run), "--headless"])
}

#[test]
fn plot_of_losses_at_the_limits_of_f64_finishes() {
    let t = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for (step, loss) in [(1, 1e308), (2, -1e308), (3, f64::MAX), (4, 2.5)] {
        lines.push_str(&format!(
            "{{\"kind\":\"step\",\"step\":{step},\"loss\":{loss:e},\"lr\":0.001,\"tokens_per_s\":1.0}}\n"
        ));
    }
    std::fs::write(t.path().join("metrics.jsonl"), lines).unwrap();
    let out = t.path().join("p.png");
    ok(&kiln_within(&["plot", s(t.path()), "--out", s(&out)], Duration::from_secs(120)));
    assert!(std::fs::metadata(&out).unwrap().len() > 1000);
}

#[test]
fn plot_into_a_place_it_cannot_write_is_one_line() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(
        t.path().join("metrics.jsonl"),
        "{\"kind\":\"step\",\"step\":1,\"loss\":3.0,\"lr\":0.001,\"tokens_per_s\":1.0}\n",
    )
    .unwrap();
    // Tests may run as root, for whom a read-only directory is writable; /proc/self is not.
    fails(&kiln(&["plot", s(t.path()), "--out", "/proc/self/plot.png"]), "/proc/self/plot.png: cannot write");
}

#[test]
fn prepare_takes_each_file_once_through_aliases_and_symlink_loops() {
    let t = tempfile::tempdir().unwrap();
    let inputs = t.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    std::fs::write(inputs.join("a.txt"), "One document, and only one.\n").unwrap();
    std::os::unix::fs::symlink(inputs.join("a.txt"), inputs.join("alias.txt")).unwrap();
    std::os::unix::fs::symlink(&inputs, inputs.join("loop")).unwrap(); // in/loop/loop/loop/...
    let out = t.path().join("out");
    let a = inputs.join("a.txt");
    ok(&kiln(&["prepare", "--out", s(&out), "--val-fraction", "0", s(&inputs), s(&a), s(&inputs)]));
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["train"]["documents"], 1, "{index}");
    assert_eq!(index["inputs"].as_array().unwrap().len(), 1, "{index}");
}

#[test]
fn prepare_names_a_fifo_or_a_device_as_what_it_is() {
    let t = tempfile::tempdir().unwrap();
    let fifo = t.path().join("pipe.txt");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let out = t.path().join("out");
    fails(&kiln(&["prepare", "--out", s(&out), s(&fifo)]), "pipe.txt: not a regular file or directory (a FIFO)");
    fails(&kiln(&["prepare", "--out", s(&out), "/dev/zero"]), "/dev/zero: not a regular file or directory (a device)");
    fails(&kiln(&["prepare", "--out", s(&out), s(&t.path().join("gone.txt"))]), "gone.txt: input does not exist");
}

#[test]
fn a_killed_prepares_staging_is_cleaned_even_when_the_dataset_is_up_to_date() {
    let t = tempfile::tempdir().unwrap();
    let data = common::prepared_corpus(t.path());
    // A pid above the kernel's maximum (2^22) belongs to no process.
    let stale = data.join(".staging-9999999");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("train-00000.bin"), b"partial").unwrap();
    common::prepared_corpus(t.path());
    assert!(!stale.exists(), "the stale staging directory is still there");
}

#[test]
fn resume_keeps_a_file_or_directory_where_the_socket_goes() {
    let t = tempfile::tempdir().unwrap();
    let run = trained_run(t.path());
    let sock = run.join("kiln.sock");
    std::fs::write(&sock, "my notes").unwrap();
    fails(&resume(&run), "kiln.sock: is a file, not the run's socket");
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "my notes");
    std::fs::remove_file(&sock).unwrap();
    std::fs::create_dir(&sock).unwrap();
    fails(&resume(&run), "kiln.sock: is a directory, not the run's socket");
    assert!(sock.is_dir());
    // `kiln attach` says what is there instead of "Connection refused".
    std::fs::remove_dir(&sock).unwrap();
    std::fs::write(&sock, "").unwrap();
    fails(&kiln(&["attach", s(&run)]), "kiln.sock: not a socket");
}

#[test]
fn resume_with_its_checkpoints_gone_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let run = trained_run(t.path());
    let history = std::fs::read(run.join("metrics.jsonl")).unwrap();
    std::fs::rename(run.join("checkpoints"), t.path().join("moved")).unwrap();
    fails(&resume(&run), "checkpoints: holds no checkpoint, but");
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), history, "metrics.jsonl was changed");
    // A run that never reached a checkpoint but has steps recorded: an explicit resume would
    // start over and drop them, so it is refused too.
    let kept: String = String::from_utf8(history)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("\"kind\":\"checkpoint\""))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(run.join("metrics.jsonl"), &kept).unwrap();
    fails(&resume(&run), "no checkpoint yet, but");
    assert_eq!(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(), kept);
}

#[test]
fn a_checkpoint_with_a_flipped_bit_is_refused_wherever_it_is_loaded() {
    let t = tempfile::tempdir().unwrap();
    let run = trained_run(t.path());
    let ckpt = run.join("checkpoints/step-00000002");
    let weights = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&weights, bytes).unwrap();
    let corrupt = "model.safetensors: corrupt (its sha256 differs";
    fails(&kiln(&["score", "--model", s(&ckpt), "--text", "Once upon a time"]), corrupt);
    fails(&kiln(&["score", "--model", s(&run), "--text", "Once upon a time"]), corrupt);
    fails(&kiln(&["generate", "--model", s(&ckpt), "--max-new-tokens", "2"]), corrupt);
    fails(&kiln(&["eval", "--model", s(&ckpt), "--tasks", "piqa", "--limit", "1"]), corrupt);
    fails(&resume(&run), corrupt);
}

#[test]
fn resume_refuses_a_checkpoint_without_its_checksums() {
    let t = tempfile::tempdir().unwrap();
    let run = trained_run(t.path());
    let state = run.join("checkpoints/step-00000002/trainer.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("sha256").unwrap();
    std::fs::write(&state, v.to_string()).unwrap();
    fails(&resume(&run), "trainer.json: has no sha256 list");
}

/// A WordLevel tokenizer of `n` tokens (`<unk>`, `<s>`, `</s>`, then `w3`...), in tokenizers' JSON.
fn small_tokenizer(path: &Path, n: usize) {
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(w.to_string(), i.into());
    }
    for i in 3..n {
        vocab.insert(format!("w{i}"), i.into());
    }
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(path, tok.to_string()).unwrap();
}

#[test]
fn a_tokenizer_that_does_not_fit_the_model_touches_no_data() {
    let t = tempfile::tempdir().unwrap();
    // A prepared dataset another run uses, made with the Llama-2 tokenizer.
    let input = root().join("assets/corpus/slimpajama_like/validation");
    let data = t.path().join("data");
    let cfg = t.path().join("run.toml");
    let tok = t.path().join("small.json");
    small_tokenizer(&tok, 512);
    std::fs::write(
        &cfg,
        format!(
            "[model]\npreset = \"tiny\"\n[train]\nmicro_batch = 1\nmax_steps = 2\n[tokenizer]\npath = \"{}\"\n[data]\nseq_len = 32\n[[data.sources]]\n\
             name = \"text\"\npath = \"{}\"\nweight = 1.0\nprepare = {{ inputs = [\"{}\"] }}\n",
            tok.display(),
            data.display(),
            input.display()
        ),
    )
    .unwrap();
    ok(&kiln(&["prepare", "--out", s(&data), s(&input)]));
    let index = std::fs::read(data.join("index.json")).unwrap();
    let run = t.path().join("run");
    fails(&kiln(&["train", s(&cfg), "--run-dir", s(&run), "--headless"]), "vocab mismatch");
    assert_eq!(std::fs::read(data.join("index.json")).unwrap(), index, "the dataset was re-prepared");
    assert!(!run.exists(), "a run that never started left its directory behind");
    // Preparing into it with another tokenizer is refused too, whatever the model.
    fails(
        &kiln(&["prepare", "--out", s(&data), "--tokenizer", s(&tok), s(&input)]),
        "data: prepared with another tokenizer",
    );
    assert_eq!(std::fs::read(data.join("index.json")).unwrap(), index);
}

#[test]
fn a_run_that_fails_at_start_up_leaves_nothing_behind() {
    let t = tempfile::tempdir().unwrap();
    let cfg = config_on_corpus(t.path(), "[model]\npreset = \"tiny\"\n[train]\nmicro_batch = 1\nmax_steps = 2\n");
    let run = t.path().join("run");
    let bad = [
        ("tokenizer.path=\"/nonexistent/tokenizer.json\"", "/nonexistent/tokenizer.json: cannot read tokenizer"),
        ("data.seq_len=4096", "exceeds the model's max_seq_len"),
        ("model.preset=\"no-such-preset\"", "unknown model preset"),
    ];
    for (set, why) in bad {
        fails(&kiln(&["train", s(&cfg), "--run-dir", s(&run), "--headless", "--set", set]), why);
        assert!(!run.exists(), "--set {set} left {} behind", run.display());
    }
    // The run directory may exist beforehand (made by the user): only kiln's own files go.
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    fails(&kiln(&["train", s(&cfg), "--run-dir", s(&run), "--headless", "--set", bad[0].0]), bad[0].1);
    let left: Vec<_> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")]);
    // The corrected command is not refused as "already holds a run".
    ok(&kiln(&["train", s(&cfg), "--run-dir", s(&run), "--headless", "--set", "train.max_steps=1"]));
}

#[test]
fn set_errors_name_the_set_and_one_set_sets_one_key() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("run.toml");
    let body = common::corpus_sections(&t.path().join("data"), 32);
    std::fs::write(
        &cfg,
        format!("[model]\npreset = \"tiny\"\n[train]\nmicro_batch = 1\nmax_steps = 9\n{body}[optim]\nlr = 1e-3\n"),
    )
    .unwrap();
    let run = t.path().join("run");
    let train = |set: &str| kiln(&["train", s(&cfg), "--run-dir", s(&run), "--headless", "--set", set]);
    let e = fails(&train("optim.lr=fast"), "--set \"optim.lr=fast\": optim.lr: invalid type");
    assert!(!e.contains("run.toml"), "blames the file: {e}");
    fails(&train("optim.lr=1e-3\nx=1"), "the value must be one TOML value");
    fails(&train("optim={lr=1}"), "optim is a section; set one key at a time");
    fails(&train("train.max_steps=0"), "--set \"train.max_steps=0\": train.max_steps must be positive");
    fails(&train("optim.lrr=1"), "--set \"optim.lrr=1\"");
    assert!(!run.exists());
}

#[test]
fn token_counts_near_usize_max_do_not_wrap() {
    let model = common::fixtures().join("llama2_vocab_tied_bf16");
    let out = ok(&kiln(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "18446744073709551615",
        "--temperature",
        "0",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let max_seq: usize = serde_json::from_slice::<serde_json::Value>(&std::fs::read(model.join("config.json")).unwrap())
        .unwrap()["max_position_embeddings"]
        .as_u64()
        .unwrap() as usize;
    let n = v["ids"].as_array().unwrap().len();
    assert!(n >= 1 && n < max_seq, "generated {n} tokens in a context of {max_seq}");
    let mut chat = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["chat", "--model", s(&model), "--max-tokens", "18446744073709551615", "--seed", "18446744073709551615"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(chat.stdin.take());
    fails(&chat.wait_with_output().unwrap(), "--max-tokens 18446744073709551615 leaves no room for the conversation");
}

#[test]
fn model_directory_mistakes_are_said_in_the_users_terms() {
    let t = tempfile::tempdir().unwrap();
    let src = common::fixtures().join("gqa_untied_f32");
    let dir = t.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    std::fs::create_dir(dir.join("model.safetensors")).unwrap();
    fails(&kiln(&["score", "--model", s(&dir), "--ids", "1 2 3"]), "model.safetensors: is a directory");
    // config.json's own names, not kiln's (`d_model`, `n_head`).
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    c["hidden_size"] = (c["hidden_size"].as_u64().unwrap() + 1).into();
    c.as_object_mut().unwrap().remove("head_dim");
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    let e = fails(&kiln(&["score", "--model", s(&dir), "--ids", "1 2 3"]), "hidden_size");
    assert!(e.contains("num_attention_heads") && !e.contains("d_model"), "{e}");
    // A negative number is a value to check, not an unknown flag.
    fails(&kiln(&["generate", "--model", s(&src), "--top-p", "-0.5"]), "--top-p must be in (0, 1]");
    fails(&kiln(&["chat", "--model", s(&src), "--temperature", "-1"]), "--temperature must be a non-negative number");
}

#[test]
fn warmup_longer_than_the_run_is_warned_about() {
    let t = tempfile::tempdir().unwrap();
    let cfg = config_on_corpus(
        t.path(),
        &format!("{SMALL_MODEL}[train]\nmicro_batch = 1\nmax_steps = 2\n[optim]\nwarmup_steps = 50\n"),
    );
    let o = kiln(&["train", s(&cfg), "--run-dir", s(&t.path().join("run")), "--headless"]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("warning: optim.warmup_steps 50 exceeds train.max_steps 2"), "{err}");
}
