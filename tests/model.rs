//! The whole network: backward against finite differences, determinism, and KV-cache decoding
//! against the full-sequence forward.

mod common;

use common::{check_grad_directional, randv, rng};
use kiln::backend::cpu::Cpu;
use kiln::backend::Backend;
use kiln::model::{Keep, KvCache, Llama, LlamaConfig, Weights, Workspace};

fn tiny(tie: bool, n_kv_head: usize) -> LlamaConfig {
    LlamaConfig {
        n_layer: 2,
        d_model: 16,
        n_head: 4,
        n_kv_head,
        head_dim: None,
        d_ff: 24,
        vocab_size: 37,
        max_seq_len: 64,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: tie,
    }
}

fn random_model(cfg: &LlamaConfig, seed: u64) -> Llama<Cpu> {
    let mut r = rng(seed);
    let host = Weights::try_build(cfg, |s| {
        Ok(if s.shape.len() == 1 {
            randv(&mut r, s.numel(), 0.3).iter().map(|x| 1.0 + x).collect()
        } else {
            randv(&mut r, s.numel(), 1.7 / (s.shape[1] as f32).sqrt())
        })
    })
    .unwrap();
    Llama::from_host(cfg.clone(), Cpu::new(), &host).unwrap()
}

fn batch(cfg: &LlamaConfig, b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut r = rng(seed);
    let ids: Vec<u32> =
        randv(&mut r, b * t, 1.0).iter().map(|x| ((x.abs() * 1e4) as usize % cfg.vocab_size) as u32).collect();
    let mut targets: Vec<i32> = ids.iter().skip(1).map(|&x| x as i32).collect();
    targets.push(5);
    targets[3] = -1; // an ignored position
    (ids, targets)
}

fn check_model_gradients(cfg: LlamaConfig) {
    let (b, t) = (2, 9);
    let mut model = random_model(&cfg, 11);
    let (ids, targets) = batch(&cfg, b, t, 12);
    // The summed (not mean) loss: larger gradients keep f32 rounding of the loss far below them.
    let scale = 1.0f32;
    let mut ws = Workspace::new(&model, b, t).unwrap();
    let mut grads = model.zeros_like_weights().unwrap();
    model.forward(&mut ws, &ids, &targets, Some(scale)).unwrap();
    model.backward(&mut ws, &mut grads).unwrap();
    let specs = kiln::model::tensor_specs(&cfg);
    let analytic: Vec<Vec<f32>> = grads.iter().into_iter().map(|g| g.to_vec()).collect();
    for (ti, spec) in specs.iter().enumerate() {
        let orig = model.weights.iter()[ti].clone();
        let mut x = orig.clone();
        check_grad_directional(&spec.name, &mut x, &analytic[ti], 4, 1e-2, 1e-3, |x| {
            model.weights.iter_mut()[ti].copy_from_slice(x);
            let l = model.forward(&mut ws, &ids, &targets, None).unwrap();
            l.iter().map(|&v| v as f64).sum::<f64>() * scale as f64
        });
        // The last evaluation left a perturbed tensor in the model: put the original back before
        // checking the next one against gradients taken at the original point.
        model.weights.iter_mut()[ti].copy_from_slice(&orig);
    }
}

#[test]
fn model_gradients_untied_gqa() {
    check_model_gradients(tiny(false, 2));
}

#[test]
fn model_gradients_tied_mqa() {
    check_model_gradients(tiny(true, 1));
}

#[test]
fn model_gradients_mha_with_explicit_head_dim() {
    check_model_gradients(LlamaConfig { head_dim: Some(6), ..tiny(false, 4) });
}

#[test]
fn forward_and_backward_are_bit_identical_across_runs() {
    let cfg = LlamaConfig { d_model: 64, d_ff: 96, vocab_size: 300, ..tiny(false, 2) };
    let model = random_model(&cfg, 21);
    let (b, t) = (2, 40);
    let (ids, targets) = batch(&cfg, b, t, 22);
    let run = || {
        let mut ws = Workspace::new(&model, b, t).unwrap();
        let mut g = model.zeros_like_weights().unwrap();
        let l = model.forward(&mut ws, &ids, &targets, Some(0.01)).unwrap();
        model.backward(&mut ws, &mut g).unwrap();
        (l, g.iter().into_iter().cloned().collect::<Vec<_>>())
    };
    let (l1, g1) = run();
    let (l2, g2) = run();
    assert!(l1.iter().zip(&l2).all(|(a, b)| a.to_bits() == b.to_bits()));
    for (a, b) in g1.iter().zip(&g2) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

#[test]
fn recomputing_block_activations_gives_the_same_loss_and_gradients_bit_for_bit() {
    let cfg = LlamaConfig { d_model: 64, d_ff: 96, vocab_size: 300, n_layer: 3, ..tiny(false, 2) };
    let model = random_model(&cfg, 31);
    let (b, t) = (2, 24);
    let (ids, targets) = batch(&cfg, b, t, 32);
    let run = |keep: Keep| {
        let mut ws = Workspace::keeping(&model, b, t, keep).unwrap();
        let mut g = model.zeros_like_weights().unwrap();
        // Two micro-batches into the same gradients, as gradient accumulation does.
        let mut l = model.forward(&mut ws, &ids, &targets, Some(0.01)).unwrap();
        model.backward(&mut ws, &mut g).unwrap();
        l.extend(model.forward(&mut ws, &ids, &targets, Some(0.01)).unwrap());
        model.backward(&mut ws, &mut g).unwrap();
        (l, g.iter().into_iter().cloned().collect::<Vec<_>>(), ws.blocks.len())
    };
    let (l1, g1, kept1) = run(Keep::All);
    let (l2, g2, kept2) = run(Keep::BlockInputs);
    assert_eq!((kept1, kept2), (3, 1), "recomputation keeps one block of activations");
    assert!(l1.iter().zip(&l2).all(|(a, b)| a.to_bits() == b.to_bits()));
    for (a, b) in g1.iter().zip(&g2) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    // An inference workspace still refuses the backward.
    let mut ws = Workspace::keeping(&model, b, t, Keep::Nothing).unwrap();
    model.forward(&mut ws, &ids, &targets, Some(0.01)).unwrap();
    let mut g = model.zeros_like_weights().unwrap();
    assert!(model.backward(&mut ws, &mut g).is_err());
}

/// Scoring's batched continuations (`decode_branches`): every branch's logits equal a full forward
/// of the context followed by that branch, whatever the mix of lengths (padding, several passes,
/// more branches than one pass holds), and the cache is left holding the context alone.
#[test]
fn branches_of_one_context_decode_like_each_continuation_alone() {
    let cfg = LlamaConfig { max_seq_len: 64, ..tiny(false, 2) };
    let model = random_model(&cfg, 37);
    let v = cfg.vocab_size;
    let (ids, _) = batch(&cfg, 1, 64, 41);
    let ctx = &ids[..20];
    let full = |seq: &[u32]| {
        let mut ws = Workspace::new(&model, 1, seq.len()).unwrap();
        model.forward(&mut ws, seq, &vec![-1; seq.len()], None).unwrap();
        Cpu::new().download(&ws.logits).unwrap()
    };
    let close = |a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    };
    let mut cache = KvCache::new(&model, 64).unwrap();
    // Four branches, 64 rows a pass: 16 positions each, so the longest takes three passes and the
    // others are padded.
    let branches: Vec<Vec<u32>> =
        [30, 3, 41, 1].iter().map(|&n| ids[20..20 + n].iter().rev().copied().collect()).collect();
    // 70 one- or two-token branches: more than one pass's 64 rows, so two groups.
    let many: Vec<Vec<u32>> = (0..70).map(|i| ids[i % 60..i % 60 + 1 + i % 2].to_vec()).collect();
    for set in [&branches, &many] {
        cache.clear();
        model.decode(&mut cache, ctx).unwrap();
        let refs: Vec<&[u32]> = set.iter().map(|b| b.as_slice()).collect();
        let got = model.decode_branches(&mut cache, &refs).unwrap();
        assert_eq!(got.len(), set.len());
        for (i, (b, g)) in set.iter().zip(&got).enumerate() {
            let want = full(&[ctx, b].concat());
            let err = close(g, &want[20 * v..]);
            assert!(err < 1e-4, "branch {i} ({} tokens): {err}", b.len());
        }
        assert_eq!(cache.len(), 20, "the cache still holds the context alone");
    }
    // The context's cache is untouched: decoding goes on from it.
    let next = model.decode(&mut cache, &ids[20..21]).unwrap();
    assert!(close(&next, &full(&ids[..21])[20 * v..]) < 1e-4);
    // A branch past the cache's capacity, or an empty one, is an error.
    cache.clear();
    model.decode(&mut cache, ctx).unwrap();
    assert!(model.decode_branches(&mut cache, &[&ids[..45]]).is_err());
    assert!(model.decode_branches(&mut cache, &[&ids[..2], &[]]).is_err());
    assert!(model.decode_branches(&mut cache, &[]).unwrap().is_empty());
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let cfg = LlamaConfig { max_seq_len: 400, ..tiny(false, 2) };
    let model = random_model(&cfg, 31);
    let n = 300; // longer than one prefill chunk (256)
    let (ids, _) = batch(&cfg, 1, n, 32);
    let mut ws = Workspace::new(&model, 1, n).unwrap();
    model.forward(&mut ws, &ids, &vec![-1; n], None).unwrap();
    let full = Cpu::new().download(&ws.logits).unwrap();
    let v = cfg.vocab_size;
    let mut cache = KvCache::new(&model, n).unwrap();
    // Prefill 280 tokens (two chunks), then one token at a time.
    let last = model.decode(&mut cache, &ids[..280]).unwrap();
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(close(&last, &full[279 * v..280 * v]) < 1e-4);
    for i in 280..n {
        let l = model.decode(&mut cache, &ids[i..i + 1]).unwrap();
        let err = close(&l, &full[i * v..(i + 1) * v]);
        assert!(err < 1e-4, "position {i}: {err}");
    }
    assert_eq!(cache.len(), n);
    assert!(model.decode(&mut cache, &[1]).is_err(), "a full cache refuses more tokens");
}
