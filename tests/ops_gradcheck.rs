//! Every CPU op's backward against central finite differences, and the forwards against naive
//! references (attention against an explicit softmax over the full score matrix).

mod common;

use common::{check_grad, project, randv, rng};
use kiln::backend::cpu::{Cpu, CpuBuf};
use kiln::backend::{AdamW, AttnShape, Backend, Gemm, RopeShape};

/// Host values as a buffer the CPU ops take, counted against no backend.
fn buf(v: Vec<f32>) -> CpuBuf {
    CpuBuf::from(v)
}

const H: f32 = 1e-2;
const TOL: f64 = 5e-3;

#[test]
fn matmul_all_transposes_match_naive_and_accumulate() {
    let b = Cpu::new();
    let mut r = rng(1);
    let (m, n, k) = (13, 17, 19);
    for ta in [false, true] {
        for tb in [false, true] {
            let a = buf(randv(&mut r, m * k, 1.0));
            let w = buf(randv(&mut r, k * n, 1.0));
            let init = buf(randv(&mut r, m * n, 1.0));
            for acc in [false, true] {
                let mut out = init.clone();
                b.matmul(&mut out, &a, &w, Gemm { m, n, k, trans_a: ta, trans_b: tb, accumulate: acc }).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let mut s = if acc { init[i * n + j] as f64 } else { 0.0 };
                        for p in 0..k {
                            let av = if ta { a[p * m + i] } else { a[i * k + p] };
                            let bv = if tb { w[j * k + p] } else { w[p * n + j] };
                            s += av as f64 * bv as f64;
                        }
                        assert!((out[i * n + j] as f64 - s).abs() < 1e-4, "ta={ta} tb={tb} acc={acc} ({i},{j})");
                    }
                }
            }
        }
    }
}

#[test]
fn linear_backward_matches_finite_differences() {
    let b = Cpu::new();
    let mut r = rng(2);
    let (rows, din, dout) = (7, 11, 5);
    let mut x = buf(randv(&mut r, rows * din, 1.0));
    let mut w = buf(randv(&mut r, dout * din, 1.0));
    let proj = buf(randv(&mut r, rows * dout, 1.0));
    let fwd = |x: &[f32], w: &[f32]| {
        let mut y = buf(vec![0.0; rows * dout]);
        Cpu::new().matmul(&mut y, &buf(x.to_vec()), &buf(w.to_vec()), Gemm::linear(rows, din, dout)).unwrap();
        project(&y, &proj)
    };
    let mut dx = buf(vec![0.0; rows * din]);
    b.matmul(&mut dx, &proj, &w, Gemm::linear_dx(rows, din, dout)).unwrap();
    let mut dw = buf(vec![0.0; dout * din]);
    b.matmul(&mut dw, &proj, &x, Gemm::linear_dw(rows, din, dout)).unwrap();
    let w0 = w.clone();
    check_grad("linear dx", &mut x.clone(), &dx, 40, H, TOL, |x| fwd(x, &w0));
    let x0 = x.clone();
    check_grad("linear dw", &mut w, &dw, 40, H, TOL, |w| fwd(&x0, w));
    x[0] += 0.0;
}

#[test]
fn embedding_backward_accumulates_repeated_ids() {
    let b = Cpu::new();
    let mut r = rng(3);
    let (v, d) = (9, 6);
    let table = buf(randv(&mut r, v * d, 1.0));
    let ids = [3u32, 1, 3, 8, 0, 3];
    let proj = buf(randv(&mut r, ids.len() * d, 1.0));
    let mut out = buf(vec![0.0; ids.len() * d]);
    b.embedding_forward(&mut out, &table, &ids, d).unwrap();
    assert_eq!(&out[..d], &table[3 * d..4 * d]);
    let mut dt = buf(vec![0.0; v * d]);
    b.embedding_backward(&mut dt, &proj, &ids, d).unwrap();
    check_grad("embedding", &mut table.clone(), &dt, 54, H, TOL, |t| {
        let mut o = buf(vec![0.0; ids.len() * d]);
        Cpu::new().embedding_forward(&mut o, &buf(t.to_vec()), &ids, d).unwrap();
        project(&o, &proj)
    });
}

#[test]
fn rmsnorm_forward_and_backward() {
    let b = Cpu::new();
    let mut r = rng(4);
    let (rows, d, eps) = (70, 24, 1e-5); // > 32 rows exercises the chunked weight-gradient sum
    let x = buf(randv(&mut r, rows * d, 2.0));
    let w = buf(randv(&mut r, d, 1.5));
    let proj = buf(randv(&mut r, rows * d, 1.0));
    let run = |x: &[f32], w: &[f32]| {
        let (mut o, mut rs) = (buf(vec![0.0; rows * d]), buf(vec![0.0; rows]));
        Cpu::new().rmsnorm_forward(&mut o, &mut rs, &buf(x.to_vec()), &buf(w.to_vec()), rows, d, eps).unwrap();
        (o, rs)
    };
    let (o, rstd) = run(&x, &w);
    for i in 0..rows {
        let ms: f64 = x[i * d..(i + 1) * d].iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
        let rs = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..d {
            assert!((o[i * d + j] as f64 - w[j] as f64 * x[i * d + j] as f64 * rs).abs() < 1e-5);
        }
    }
    let base = buf(randv(&mut r, rows * d, 1.0)); // dx accumulates onto what is there
    let mut dx = base.clone();
    let mut dw = buf(vec![0.0; d]);
    b.rmsnorm_backward(&mut dx, &mut dw, &proj, &x, &w, &rstd, rows, d).unwrap();
    let dx: Vec<f32> = dx.iter().zip(&base).map(|(a, b)| a - b).collect();
    let w0 = w.clone();
    check_grad("rmsnorm dx", &mut x.clone(), &dx, 60, H, TOL, |x| project(&run(x, &w0).0, &proj));
    let x0 = x.clone();
    check_grad("rmsnorm dw", &mut w.clone(), &dw, 24, H, TOL, |w| project(&run(&x0, w).0, &proj));
}

#[test]
fn rope_inverse_is_the_backward_and_matches_rotate_half() {
    let b = Cpu::new();
    let mut r = rng(5);
    let (batch, seq, nh, hd, pos0) = (2, 5, 3, 8, 4);
    let (cos, sin) = kiln::model::rope::tables(hd, 32, 10000.0);
    let (cos, sin) = (buf(cos), buf(sin));
    let shape = RopeShape { rows: batch * seq, seq, pos0, n_head: nh, head_dim: hd };
    let x = buf(randv(&mut r, batch * seq * nh * hd, 1.0));
    let mut y = x.clone();
    b.rope(&mut y, &cos, &sin, shape, false).unwrap();
    // rotate_half reference: y = x*cos + rotate_half(x)*sin with rotate_half(x) = [-x2, x1].
    for row in 0..batch * seq {
        let pos = pos0 + row % seq;
        for h in 0..nh {
            let o = (row * nh + h) * hd;
            for i in 0..hd {
                let f = 1.0 / 10000f64.powf((2 * (i % (hd / 2))) as f64 / hd as f64);
                let a = pos as f64 * f;
                let rot = if i < hd / 2 { -x[o + i + hd / 2] } else { x[o + i - hd / 2] } as f64;
                let want = x[o + i] as f64 * a.cos() + rot * a.sin();
                assert!((y[o + i] as f64 - want).abs() < 1e-5);
            }
        }
    }
    let proj = buf(randv(&mut r, x.len(), 1.0));
    let mut g = proj.clone();
    b.rope(&mut g, &cos, &sin, shape, true).unwrap();
    check_grad("rope", &mut x.clone(), &g, 60, H, TOL, |x| {
        let mut y = buf(x.to_vec());
        Cpu::new().rope(&mut y, &cos, &sin, shape, false).unwrap();
        project(&y, &proj)
    });
}

/// Attention with the full score matrix and an explicit softmax, in f64.
fn naive_attention(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> Vec<f32> {
    let hd = s.head_dim;
    let mut out = vec![0.0; s.q_elems()];
    let scale = 1.0 / (hd as f64).sqrt();
    for b in 0..s.batch {
        for h in 0..s.n_head {
            let kvh = h / (s.n_head / s.n_kv_head);
            for i in 0..s.q_len {
                let qo = ((b * s.q_len + i) * s.n_head + h) * hd;
                let keys = s.q_pos0 + i + 1;
                let scores: Vec<f64> = (0..keys)
                    .map(|j| {
                        let ko = ((b * s.kv_stride + j) * s.n_kv_head + kvh) * hd;
                        (0..hd).map(|t| q[qo + t] as f64 * k[ko + t] as f64).sum::<f64>() * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                for (j, sc) in scores.iter().enumerate() {
                    let p = (sc - m).exp() / z;
                    let ko = ((b * s.kv_stride + j) * s.n_kv_head + kvh) * hd;
                    for t in 0..hd {
                        out[qo + t] += (p * v[ko + t] as f64) as f32;
                    }
                }
            }
        }
    }
    out
}

fn attn_shapes() -> Vec<AttnShape> {
    let base =
        AttnShape { batch: 2, q_len: 9, kv_len: 9, kv_stride: 9, q_pos0: 0, n_head: 4, n_kv_head: 2, head_dim: 6 };
    vec![
        base,
        AttnShape { n_kv_head: 4, ..base },                                      // MHA
        AttnShape { n_kv_head: 1, head_dim: 10, ..base },                        // MQA, odd-sized head
        AttnShape { batch: 1, q_len: 150, kv_len: 150, kv_stride: 150, ..base }, // crosses query and key tiles
        AttnShape { batch: 1, q_len: 3, kv_len: 80, kv_stride: 96, q_pos0: 77, ..base }, // KV-cache decode
    ]
}

#[test]
fn attention_forward_matches_naive_softmax() {
    let mut r = rng(6);
    for s in attn_shapes() {
        let q = buf(randv(&mut r, s.q_elems(), 1.5));
        let k = buf(randv(&mut r, s.kv_elems(), 1.5));
        let v = buf(randv(&mut r, s.kv_elems(), 1.0));
        let (mut out, mut lse) = (buf(vec![0.0; s.q_elems()]), buf(vec![0.0; s.lse_elems()]));
        Cpu::new().attention_forward(&mut out, &mut lse, &q, &k, &v, s).unwrap();
        let want = naive_attention(&q, &k, &v, s);
        let err = out.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err < 1e-5, "{s:?}: max error {err}");
        assert!(lse.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut r = rng(7);
    for s in attn_shapes() {
        let q = buf(randv(&mut r, s.q_elems(), 1.5));
        let k = buf(randv(&mut r, s.kv_elems(), 1.5));
        let v = buf(randv(&mut r, s.kv_elems(), 1.0));
        let proj = buf(randv(&mut r, s.q_elems(), 1.0));
        let (mut out, mut lse) = (buf(vec![0.0; s.q_elems()]), buf(vec![0.0; s.lse_elems()]));
        Cpu::new().attention_forward(&mut out, &mut lse, &q, &k, &v, s).unwrap();
        let (mut dq, mut dk, mut dv) =
            (buf(vec![f32::NAN; s.q_elems()]), buf(vec![f32::NAN; s.kv_elems()]), buf(vec![f32::NAN; s.kv_elems()]));
        Cpu::new().attention_backward(&mut dq, &mut dk, &mut dv, &proj, &out, &lse, &q, &k, &v, s).unwrap();
        assert!(dq.iter().chain(&dk).chain(&dv).all(|x| x.is_finite()), "{s:?}: every gradient element written");
        let loss = |q: &[f32], k: &[f32], v: &[f32]| {
            let (mut o, mut l) = (buf(vec![0.0; s.q_elems()]), buf(vec![0.0; s.lse_elems()]));
            Cpu::new()
                .attention_forward(&mut o, &mut l, &buf(q.to_vec()), &buf(k.to_vec()), &buf(v.to_vec()), s)
                .unwrap();
            project(&o, &proj)
        };
        check_grad(&format!("attention dq {s:?}"), &mut q.clone(), &dq, 50, H, TOL, |x| loss(x, &k, &v));
        // Only the first kv_len key rows influence the output; sample those.
        let live = s.batch * s.kv_stride * s.n_kv_head * s.head_dim;
        let valid = if s.kv_stride == s.kv_len { live } else { s.kv_len * s.n_kv_head * s.head_dim };
        check_grad(&format!("attention dk {s:?}"), &mut k[..valid].to_vec(), &dk[..valid], 50, H, TOL, |x| {
            let mut kk = k.clone();
            kk[..valid].copy_from_slice(x);
            loss(&q, &kk, &v)
        });
        check_grad(&format!("attention dv {s:?}"), &mut v[..valid].to_vec(), &dv[..valid], 50, H, TOL, |x| {
            let mut vv = v.clone();
            vv[..valid].copy_from_slice(x);
            loss(&q, &k, &vv)
        });
    }
}

/// `rotary_attention_backward` (what the model's backward calls): the gradients of the unrotated
/// q and k of `attention(rope(q), rope(k), v)`, positions as `AttnShape::q_rope`/`kv_rope` place
/// them (a KV-cache shape's queries start at q_pos0).
#[test]
fn rotary_attention_backward_matches_finite_differences() {
    let mut r = rng(17);
    for s in attn_shapes() {
        let (cos, sin) = kiln::model::rope::tables(s.head_dim, (s.q_pos0 + s.q_len).max(s.kv_stride), 10000.0);
        let (cos, sin) = (buf(cos), buf(sin));
        let q = buf(randv(&mut r, s.q_elems(), 1.5));
        let k = buf(randv(&mut r, s.kv_elems(), 1.5));
        let v = buf(randv(&mut r, s.kv_elems(), 1.0));
        let proj = buf(randv(&mut r, s.q_elems(), 1.0));
        let rotated = |q: &[f32], k: &[f32]| {
            let (mut qr, mut kr) = (buf(q.to_vec()), buf(k.to_vec()));
            Cpu::new().rope(&mut qr, &cos, &sin, s.q_rope(), false).unwrap();
            Cpu::new().rope(&mut kr, &cos, &sin, s.kv_rope(), false).unwrap();
            (qr, kr)
        };
        let loss = |q: &[f32], k: &[f32], v: &[f32]| {
            let (qr, kr) = rotated(q, k);
            let (mut o, mut l) = (buf(vec![0.0; s.q_elems()]), buf(vec![0.0; s.lse_elems()]));
            Cpu::new().attention_forward(&mut o, &mut l, &qr, &kr, &buf(v.to_vec()), s).unwrap();
            project(&o, &proj)
        };
        let (qr, kr) = rotated(&q, &k);
        let (mut out, mut lse) = (buf(vec![0.0; s.q_elems()]), buf(vec![0.0; s.lse_elems()]));
        Cpu::new().attention_forward(&mut out, &mut lse, &qr, &kr, &v, s).unwrap();
        let (mut dq, mut dk, mut dv) =
            (buf(vec![f32::NAN; s.q_elems()]), buf(vec![f32::NAN; s.kv_elems()]), buf(vec![f32::NAN; s.kv_elems()]));
        Cpu::new()
            .rotary_attention_backward(&mut dq, &mut dk, &mut dv, &proj, &out, &lse, &qr, &kr, &v, s, &cos, &sin)
            .unwrap();
        check_grad(&format!("rotary attention dq {s:?}"), &mut q.clone(), &dq, 50, H, TOL, |x| loss(x, &k, &v));
        let valid = if s.kv_stride == s.kv_len { s.kv_elems() } else { s.kv_len * s.n_kv_head * s.head_dim };
        check_grad(&format!("rotary attention dk {s:?}"), &mut k[..valid].to_vec(), &dk[..valid], 50, H, TOL, |x| {
            let mut kk = k.clone();
            kk[..valid].copy_from_slice(x);
            loss(&q, &kk, &v)
        });
    }
}

#[test]
fn swiglu_forward_and_backward() {
    let mut r = rng(8);
    let n = 300;
    let gate = buf(randv(&mut r, n, 4.0));
    let up = buf(randv(&mut r, n, 2.0));
    let proj = buf(randv(&mut r, n, 1.0));
    let mut out = buf(vec![0.0; n]);
    Cpu::new().swiglu_forward(&mut out, &gate, &up, n).unwrap();
    for i in 0..n {
        let g = gate[i] as f64;
        assert!((out[i] as f64 - g / (1.0 + (-g).exp()) * up[i] as f64).abs() < 1e-5);
    }
    // Only the first n values are computed (decoding one row in a workspace sized for a chunk).
    let mut part = buf(vec![f32::NAN; n]);
    Cpu::new().swiglu_forward(&mut part, &gate, &up, n - 100).unwrap();
    assert_eq!(&part[..n - 100], &out[..n - 100]);
    assert!(part[n - 100..].iter().all(|x| x.is_nan()), "values past n were written");
    let (mut dg, mut du) = (buf(vec![0.0; n]), buf(vec![0.0; n]));
    Cpu::new().swiglu_backward(&mut dg, &mut du, &proj, &gate, &up, n).unwrap();
    let run = |g: &[f32], u: &[f32]| {
        let mut o = buf(vec![0.0; n]);
        Cpu::new().swiglu_forward(&mut o, &buf(g.to_vec()), &buf(u.to_vec()), n).unwrap();
        project(&o, &proj)
    };
    check_grad("swiglu dgate", &mut gate.clone(), &dg, 60, H, TOL, |g| run(g, &up));
    check_grad("swiglu dup", &mut up.clone(), &du, 60, H, TOL, |u| run(&gate, u));
}

#[test]
fn cross_entropy_loss_and_gradient() {
    let mut r = rng(9);
    let (rows, vocab) = (6, 37);
    let logits = buf(randv(&mut r, rows * vocab, 4.0));
    let targets = [3i32, 0, 36, -1, 17, 5];
    let losses = Cpu::new().cross_entropy(&mut logits.clone(), &targets, vocab, None).unwrap();
    for (i, &t) in targets.iter().enumerate() {
        let row = &logits[i * vocab..(i + 1) * vocab];
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        let want = if t < 0 { 0.0 } else { lse - row[t as usize] as f64 };
        assert!((losses[i] as f64 - want).abs() < 1e-5);
    }
    let scale = 0.37;
    let mut grad = logits.clone();
    Cpu::new().cross_entropy(&mut grad, &targets, vocab, Some(scale)).unwrap();
    assert!(grad[3 * vocab..4 * vocab].iter().all(|&g| g == 0.0), "ignored row has no gradient");
    check_grad("cross-entropy", &mut logits.clone(), &grad, 80, H, TOL, |x| {
        let l = Cpu::new().cross_entropy(&mut buf(x.to_vec()), &targets, vocab, None).unwrap();
        l.iter().map(|&v| v as f64).sum::<f64>() * scale as f64
    });
}

#[test]
fn adamw_matches_torch_semantics() {
    let mut r = rng(10);
    let n = 1000;
    let mut p = buf(randv(&mut r, n, 1.0));
    let (mut m, mut v) = (buf(vec![0.0f32; n]), buf(vec![0.0f32; n]));
    let (mut pr, mut mr, mut vr): (Vec<f64>, Vec<f64>, Vec<f64>) =
        (p.iter().map(|&x| x as f64).collect(), vec![0.0; n], vec![0.0; n]);
    let (lr, b1, b2, eps, wd) = (4e-3f64, 0.9f64, 0.95f64, 1e-8f64, 0.1f64);
    for step in 1..=5u64 {
        let g = buf(randv(&mut r, n, 1.0));
        let hp = AdamW {
            lr: lr as f32,
            beta1: b1 as f32,
            beta2: b2 as f32,
            eps: eps as f32,
            weight_decay: wd as f32,
            step,
            // Even steps clip: the gradient is scaled as AdamW reads it.
            grad_scale: if step % 2 == 0 { 0.5 } else { 1.0 },
        };
        Cpu::new().adamw_step(&mut p, &g, &mut m, &mut v, hp).unwrap();
        // torch.optim.AdamW (decoupled decay, bias correction, eps after the square root).
        for i in 0..n {
            let gi = g[i] as f64 * hp.grad_scale as f64;
            pr[i] *= 1.0 - lr * wd;
            mr[i] = b1 * mr[i] + (1.0 - b1) * gi;
            vr[i] = b2 * vr[i] + (1.0 - b2) * gi * gi;
            let denom = (vr[i] / (1.0 - b2.powi(step as i32))).sqrt() + eps;
            pr[i] -= lr * (mr[i] / (1.0 - b1.powi(step as i32))) / denom;
        }
    }
    let err = p.iter().zip(&pr).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
    assert!(err < 1e-6, "max deviation {err}");
}
