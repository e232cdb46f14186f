//! kiln against transformers on the committed fixtures (tests/fixtures/make_fixtures.py): random
//! Llama models in MHA / GQA / MQA, tied and untied, f32 / bf16 / f16 / sharded, transformers 4.x
//! and 5.x config layouts, head_dim 12, 16, 20, 24, vocabularies that are not multiples of 64.

mod common;

use kiln::backend::cpu::Cpu;
use kiln::io::load_model_dir;
use kiln::model::sampling::argmax;
use kiln::model::{KvCache, Workspace};
use serde_json::Value;

const FIXTURES: [&str; 5] =
    ["gqa_untied_f32", "mha_tied_bf16", "mqa_hd20_f16_sharded", "llama2_vocab_tied_bf16", "v5_headdim24_bf16"];

fn expected(name: &str) -> Value {
    let p = common::fixtures().join(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn logprobs_match_transformers_within_1e4() {
    for name in FIXTURES {
        let e = expected(name);
        let md = load_model_dir(&common::fixtures().join(name), Cpu::new()).unwrap();
        let ids = u32s(&e["ids"]);
        let n = ids.len();
        assert!(n >= 300);
        let targets: Vec<i32> = (0..n).map(|i| if i + 1 < n { ids[i + 1] as i32 } else { -1 }).collect();
        let mut ws = Workspace::for_inference(&md.model, 1, n).unwrap();
        let losses = md.model.forward(&mut ws, &ids, &targets, None).unwrap();
        let want: Vec<f64> = e["logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let worst = (0..n - 1).map(|i| (-(losses[i] as f64) - want[i]).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-4, "{name}: max |Δ logprob| = {worst:.2e}");
    }
}

#[test]
fn greedy_generation_matches_transformers_token_for_token() {
    for name in FIXTURES {
        let e = expected(name);
        let md = load_model_dir(&common::fixtures().join(name), Cpu::new()).unwrap();
        let (prompt, want) = (u32s(&e["prompt_ids"]), u32s(&e["greedy_ids"]));
        let mut cache = KvCache::new(&md.model, prompt.len() + want.len()).unwrap();
        let mut logits = md.model.decode(&mut cache, &prompt).unwrap();
        let mut got = Vec::new();
        while got.len() < want.len() {
            let next = argmax(&logits);
            got.push(next);
            if md.eos.contains(&next) {
                break;
            }
            logits = md.model.decode(&mut cache, &[next]).unwrap();
        }
        assert_eq!(got, want, "{name}");
    }
}
