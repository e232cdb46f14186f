//! The `kiln` binary end to end: JSON outputs against the transformers fixtures, and bad input
//! giving one-line errors that name the file, exit code 2, and never a panic.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("RUST_BACKTRACE", "1").output().unwrap()
}

fn fixture(name: &str) -> PathBuf {
    common::fixtures().join(name)
}

fn expected(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("expected.json")).unwrap()).unwrap()
}

fn stdout_json(o: &Output) -> Value {
    assert!(o.status.success(), "kiln failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn score_ids_prints_the_documented_json() {
    let e = expected("gqa_untied_f32");
    let ids: Vec<String> = e["ids"].as_array().unwrap().iter().map(|x| x.to_string()).collect();
    let out =
        stdout_json(&kiln(&["score", "--model", fixture("gqa_untied_f32").to_str().unwrap(), "--ids", &ids.join(" ")]));
    assert_eq!(out["ids"], e["ids"]);
    let (got, want) = (out["logprobs"].as_array().unwrap(), e["logprobs"].as_array().unwrap());
    assert_eq!(got.len(), ids.len() - 1);
    for (g, w) in got.iter().zip(want) {
        assert!((g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-4);
    }
    let sum: f64 = got.iter().map(|x| x.as_f64().unwrap()).sum();
    assert!((out["sum"].as_f64().unwrap() - sum).abs() < 1e-3);
}

#[test]
fn score_text_encodes_with_bos_using_the_bundled_tokenizer() {
    let e = expected("llama2_vocab_tied_bf16");
    let out = stdout_json(&kiln(&[
        "score",
        "--model",
        fixture("llama2_vocab_tied_bf16").to_str().unwrap(),
        "--text",
        "Hello world",
    ]));
    assert_eq!(out["ids"], serde_json::json!([1, 15043, 3186]));
    assert_eq!(out["logprobs"].as_array().unwrap().len(), 2);
    let out = stdout_json(&kiln(&[
        "score",
        "--model",
        fixture("llama2_vocab_tied_bf16").to_str().unwrap(),
        "--text",
        e["prompt"].as_str().unwrap(),
    ]));
    assert_eq!(out["ids"], e["prompt_ids"]);
}

#[test]
fn greedy_generate_cli_matches_transformers() {
    let e = expected("llama2_vocab_tied_bf16");
    let n = e["greedy_ids"].as_array().unwrap().len().to_string();
    let dir = fixture("llama2_vocab_tied_bf16");
    let args = [
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        e["prompt"].as_str().unwrap(),
        "--temperature",
        "0",
        "--max-new-tokens",
        &n,
    ];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let o = kiln(&json_args);
    let out = stdout_json(&o);
    assert_eq!(out["ids"], e["greedy_ids"]);
    assert_eq!(out["text"], e["greedy_text"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("tokens/s"));
    // Streaming mode prints the same text.
    let o = kiln(&args);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim_end(), e["greedy_text"].as_str().unwrap().trim_end());
}

#[test]
fn sampling_is_reproducible_for_a_seed() {
    let dir = fixture("llama2_vocab_tied_bf16");
    let run = |seed: &str| {
        let o = kiln(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "Once",
            // Hot enough that this random model's favourite token (which holds most of the mass
            // at temperature 1) does not win every draw, so the seed decides what is drawn.
            "--temperature",
            "3.0",
            "--top-k",
            "50",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--max-new-tokens",
            "20",
            "--json",
        ]);
        stdout_json(&o)["ids"].clone()
    };
    let (a, b) = (run("7"), run("8"));
    assert_eq!(run("7"), a, "the same seed draws the same tokens");
    // A different seed draws differently (20 tokens from dozens of candidates each: agreeing
    // everywhere is out of the question), and every drawn id is in the vocabulary.
    assert_ne!(a, b, "seeds 7 and 8 drew the same tokens");
    let vocab = 32000;
    for ids in [&a, &b] {
        let ids = ids.as_array().unwrap();
        assert_eq!(ids.len(), 20);
        assert!(ids.iter().all(|t| t.as_u64().is_some_and(|t| t < vocab)), "{ids:?}");
    }
}

/// Copies a fixture into a temp dir so a test can damage it.
fn scratch_copy(name: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, t.path().join(p.file_name().unwrap())).unwrap();
    }
    t
}

/// Runs `score` on `dir` and checks the error contract; returns the message.
fn expect_error(dir: &Path, needle: &str) -> String {
    let o = kiln(&["score", "--model", dir.to_str().unwrap(), "--ids", "1 5 9"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "exit code for {needle}: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    err
}

#[test]
fn missing_model_dir_and_config() {
    expect_error(Path::new("/definitely/not/here"), "/definitely/not/here");
    let t = scratch_copy("gqa_untied_f32");
    std::fs::remove_file(t.path().join("config.json")).unwrap();
    expect_error(t.path(), "config.json");
}

#[test]
fn malformed_config() {
    let t = scratch_copy("gqa_untied_f32");
    std::fs::write(t.path().join("config.json"), "{ not json").unwrap();
    expect_error(t.path(), "config.json: not valid JSON");
    std::fs::write(t.path().join("config.json"), r#"{"model_type": "llama", "hidden_size": 64}"#).unwrap();
    expect_error(t.path(), "\"num_attention_heads\"");
    std::fs::write(t.path().join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    expect_error(t.path(), "gpt2");
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let t = scratch_copy("gqa_untied_f32");
    let st = t.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(t.path(), "model.safetensors: not a valid safetensors file");
    std::fs::write(&st, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    expect_error(t.path(), "model.safetensors: not a valid safetensors file");
    std::fs::write(&st, b"").unwrap();
    expect_error(t.path(), "model.safetensors");
    std::fs::remove_file(&st).unwrap();
    expect_error(t.path(), "no model.safetensors");
}

/// Rewrites the fixture's weights with one tensor replaced.
fn with_tensor(dir: &Path, name: &str, dtype: safetensors::Dtype, shape: Vec<usize>, data: Vec<u8>) {
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    for (n, v) in parsed.tensors() {
        if n == name {
            views.push((n, safetensors::tensor::TensorView::new(dtype, shape.clone(), &data).unwrap()));
        } else {
            views.push((n, v));
        }
    }
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(&st, out).unwrap();
}

#[test]
fn shape_and_dtype_mismatches_name_the_tensor() {
    let t = scratch_copy("gqa_untied_f32");
    with_tensor(t.path(), "model.norm.weight", safetensors::Dtype::F32, vec![63], vec![0; 63 * 4]);
    let e = expect_error(t.path(), "model.norm.weight");
    assert!(e.contains("shape [63]"), "{e}");
    let t = scratch_copy("gqa_untied_f32");
    with_tensor(t.path(), "model.norm.weight", safetensors::Dtype::I64, vec![64], vec![0; 64 * 8]);
    expect_error(t.path(), "dtype I64");
}

#[test]
fn missing_shard_and_missing_tensor() {
    let t = scratch_copy("mqa_hd20_f16_sharded");
    std::fs::remove_file(t.path().join("model-00003-of-00009.safetensors")).unwrap();
    expect_error(t.path(), "model-00003-of-00009.safetensors");
    let t = scratch_copy("gqa_untied_f32");
    let cfg = std::fs::read_to_string(t.path().join("config.json")).unwrap();
    std::fs::write(t.path().join("config.json"), cfg.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"))
        .unwrap();
    expect_error(t.path(), "model.layers.2");
}

#[test]
fn bad_tokenizer_and_vocab_mismatch() {
    let t = scratch_copy("gqa_untied_f32");
    std::fs::write(t.path().join("tokenizer.json"), "{\"oops\": 1}").unwrap();
    expect_error(t.path(), "tokenizer.json: not a valid tokenizer.json");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tokenizer/llama2/tokenizer.json"),
        t.path().join("tokenizer.json"),
    )
    .unwrap();
    expect_error(t.path(), "vocab mismatch");
}

#[test]
fn bad_ids_and_overlong_input() {
    let dir = fixture("gqa_untied_f32");
    let o = kiln(&["score", "--model", dir.to_str().unwrap(), "--ids", "1 2 99999"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("99999"));
    let o = kiln(&["score", "--model", dir.to_str().unwrap(), "--ids", "1 x"]);
    assert_eq!(o.status.code(), Some(2));
    let long: Vec<String> = (0..600).map(|i| (i % 900 + 3).to_string()).collect();
    let o = kiln(&["score", "--model", dir.to_str().unwrap(), "--ids", &long.join(" ")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("max_position_embeddings"));
    // Text needs a tokenizer; this model's vocabulary (1000) cannot use the bundled one.
    let o = kiln(&["score", "--model", dir.to_str().unwrap(), "--text", "hi"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no tokenizer.json"));
}

#[test]
fn device_flag_is_checked_and_a_missing_gpu_is_one_line() {
    let model = fixture("gqa_untied_f32");
    let m = model.to_str().unwrap();
    for args in [
        vec!["score", "--model", m, "--ids", "1 2 3", "--device", "tpu"],
        vec!["generate", "--model", m, "--max-new-tokens", "2", "--device", "tpu"],
        vec!["eval", "--model", m, "--tasks", "piqa", "--limit", "1", "--device", "tpu"],
        vec!["chat", "--model", m, "--device", "tpu"],
    ] {
        let o = kiln(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("--device \"tpu\": expected cpu or cuda"), "{err}");
    }
    // Without a GPU (CI) the CUDA request fails in one line; with one, this small fixture's
    // head_dim has no FlashAttention kernel, which is also one line. Never a panic.
    let o = kiln(&["score", "--model", m, "--ids", "1 2 3", "--device", "cuda"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
