//! Every CUDA kernel against the CPU backend on fresh random inputs, run where a GPU is present
//! (scripts/gpu-check.sh); elsewhere each test says it was skipped. Outputs are poisoned with NaN
//! before each launch, so a kernel that skips an element fails. Tolerances are relative error
//! norms: f32 paths 1e-5, bf16 paths 1e-2 (inputs are rounded to bf16 before the CPU sees them, so
//! only the kernel's own rounding is measured).

mod common;

use common::gpu::{assert_close, bf, or_skip, randn, BF16_OUT, F32_OUT};
use half::bf16;
use kiln::backend::cpu::{Cpu, CpuBuf};
use kiln::backend::cuda::device::Gpu;
use kiln::backend::cuda::flash_attn::Build;
use kiln::backend::cuda::{adamw, cross_entropy, elementwise, flash_attn, rmsnorm, rope, swiglu};
use kiln::backend::{AdamW, AttnShape, Backend, Gemm, RopeShape};

/// Without a GPU: every other test here, on the CPU stand-in for CUDA (tests/emulated/fake_cuda.cpp).
#[test]
fn on_the_emulated_gpu() {
    common::emulated_gpu::rerun_on_the_emulator("on_the_emulated_gpu");
}

fn gpu() -> Option<Gpu> {
    or_skip(Gpu::open(0))
}

/// The emulated GPU, for a test of the stand-in's own checks (`what`); None, with a note, elsewhere.
fn emulated_gpu(what: &str) -> Option<Gpu> {
    if !common::emulated_gpu::emulated() {
        eprintln!("skipped: checks the emulated GPU's {what}");
        return None;
    }
    Some(gpu().expect("the emulated GPU"))
}

/// The emulated cuBLASLt's alignment rule, checked: cuBLASLt's heuristic picks its algorithm for
/// 256-byte aligned operands unless told otherwise, so an operand 16 bytes into an allocation is
/// refused there, where the same GEMM from the allocation's start runs. (kiln's operands are
/// always whole allocations.) Emulator only: on a GPU the outcome depends on the algorithm.
#[test]
fn the_emulator_refuses_a_gemm_operand_less_aligned_than_cublaslt_assumed() {
    use cudarc::driver::DevicePtr;
    let Some(g) = emulated_gpu("cuBLASLt") else { return };
    let blas = kiln::backend::cuda::gemm::Blas::new(&g).unwrap();
    let n = 64;
    let (a, b) = (up_bf16(&g, &vec![1.0; n * n + 8]), up_bf16(&g, &vec![1.0; n * n]));
    let mut out = g.stream.alloc_zeros::<f32>(n * n).unwrap();
    blas.matmul(&g, &mut out, &a, &b, Gemm::linear(n, n, n)).unwrap();
    let start = a.device_ptr(&g.stream).0;
    // SAFETY: n·n values from 16 bytes into `a`, which outlives the view; leaked, so never freed.
    let shifted = unsafe { g.stream.upgrade_device_ptr::<bf16>(start + 16, n * n) };
    let refused = blas.matmul(&g, &mut out, &shifted, &b, Gemm::linear(n, n, n));
    shifted.leak();
    assert!(refused.is_err(), "a GEMM operand 16 bytes into its allocation was accepted");
}

/// The emulator's stream-order check, checked (tests/emulated/fake_cuda.cpp runs all work at once,
/// in order, so it checks each access against CUDA's ordering rules instead): a second stream that
/// reads what the first wrote, or a first stream that overwrites what the second read, with no event
/// between them, is refused (AdamW's writes through its chunk table too), and the same work is
/// accepted once the streams wait for each other. On a GPU such a race is no error, only sometimes
/// wrong numbers, so this runs on the emulator alone.
#[test]
fn the_emulator_refuses_work_on_two_streams_that_nothing_orders() {
    let Some(g) = emulated_gpu("stream-order check") else { return };
    let other = g.ctx.new_stream().unwrap();
    let mut buf = g.stream.alloc_zeros::<f32>(256).unwrap();
    let race = other.clone_dtoh(&buf).expect_err("a read on another stream, after a write it did not wait for");
    assert!(format!("{race:?}").contains("INVALID_VALUE"), "{race:?}");
    other.join(&g.stream).unwrap();
    assert_eq!(other.clone_dtoh(&buf).unwrap(), vec![0.0; 256]);
    g.stream.memset_zeros(&mut buf).expect_err("a write over another stream's read that it did not wait for");
    g.stream.join(&other).unwrap();
    g.stream.memset_zeros(&mut buf).unwrap();

    // AdamW writes through the pointers of its chunk table, which its arguments do not show: what it
    // updated is still unordered for the other stream until that waits.
    let hp = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0, step: 1, grad_scale: 1.0 };
    let (mut p, grad) = (up_f32(&g, &[1.0; 64]), up_f32(&g, &[0.5; 64]));
    let (mut m, mut v) = (up_f32(&g, &[0.0; 64]), up_f32(&g, &[0.0; 64]));
    other.join(&g.stream).unwrap();
    let mut tensor = [adamw::AdamTensor { param: &mut p, grad: &grad, m: &mut m, v: &mut v, param_bf16: None }];
    adamw::step(&g, &mut tensor, hp).unwrap();
    other.clone_dtoh(&p).expect_err("a read of what AdamW wrote through its chunk table, unordered");
    other.join(&g.stream).unwrap();
    assert!(other.clone_dtoh(&p).unwrap().iter().all(|&x| x < 1.0), "AdamW moved the weights down the gradient");
}

fn up_f32(g: &Gpu, x: &[f32]) -> cudarc::driver::CudaSlice<f32> {
    g.stream.clone_htod(x).unwrap()
}
fn up_bf16(g: &Gpu, x: &[f32]) -> cudarc::driver::CudaSlice<bf16> {
    let v: Vec<bf16> = x.iter().map(|&a| bf16::from_f32(a)).collect();
    g.stream.clone_htod(&v).unwrap()
}
fn poison_f32(g: &Gpu, n: usize) -> cudarc::driver::CudaSlice<f32> {
    g.stream.clone_htod(&vec![f32::NAN; n]).unwrap()
}
fn poison_bf16(g: &Gpu, n: usize) -> cudarc::driver::CudaSlice<bf16> {
    g.stream.clone_htod(&vec![bf16::NAN; n]).unwrap()
}
fn down_f32(g: &Gpu, x: &cudarc::driver::CudaSlice<f32>) -> Vec<f32> {
    g.stream.clone_dtoh(x).unwrap()
}
fn down_bf16(g: &Gpu, x: &cudarc::driver::CudaSlice<bf16>) -> Vec<f32> {
    g.stream.clone_dtoh(x).unwrap().iter().map(|v| v.to_f32()).collect()
}

#[test]
fn rmsnorm_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let cpu = Cpu::new();
    let (rows, d) = (300, 2048);
    let (x, w, dy) = (bf(&randn(rows * d, 1, 2.0)), bf(&randn(d, 2, 1.0)), bf(&randn(rows * d, 3, 1.0)));
    let (mut out, mut rstd) = (CpuBuf::from(vec![0.0; rows * d]), CpuBuf::from(vec![0.0; rows]));
    cpu.rmsnorm_forward(&mut out, &mut rstd, &x, &w, rows, d, 1e-5).unwrap();
    let dx0 = CpuBuf::from(randn(rows * d, 4, 0.5));
    let (mut dx, mut dw) = (dx0.clone(), CpuBuf::from(vec![0.0; d]));
    cpu.rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, rows, d).unwrap();

    // f32
    let (mut go, mut gr) = (poison_f32(&g, rows * d), poison_f32(&g, rows));
    rmsnorm::forward(&g, &mut go, &mut gr, &up_f32(&g, &x), &up_f32(&g, &w), rows, d, 1e-5).unwrap();
    assert_close(&down_f32(&g, &go), &out, 1e-5, "rmsnorm fwd f32");
    assert_close(&down_f32(&g, &gr), &rstd, 1e-5, "rmsnorm rstd f32");
    let (mut gdx, mut gdw) = (up_f32(&g, &dx0), g.stream.alloc_zeros::<f32>(d).unwrap());
    rmsnorm::backward(&g, &mut gdx, &mut gdw, &up_f32(&g, &dy), &up_f32(&g, &x), &up_f32(&g, &w), &gr, rows, d)
        .unwrap();
    assert_close(&down_f32(&g, &gdx), &dx, 1e-5, "rmsnorm dx f32");
    assert_close(&down_f32(&g, &gdw), &dw, 1e-5, "rmsnorm dw f32");

    // bf16
    let (mut go, mut gr) = (poison_bf16(&g, rows * d), poison_f32(&g, rows));
    rmsnorm::forward(&g, &mut go, &mut gr, &up_bf16(&g, &x), &up_bf16(&g, &w), rows, d, 1e-5).unwrap();
    assert_close(&down_bf16(&g, &go), &out, BF16_OUT, "rmsnorm fwd bf16");
    let (mut gdx, mut gdw) = (up_bf16(&g, &dx0), g.stream.alloc_zeros::<f32>(d).unwrap());
    let dx0b = bf(&dx0);
    let (mut dxb, mut dwb) = (dx0b.clone(), CpuBuf::from(vec![0.0; d]));
    cpu.rmsnorm_backward(&mut dxb, &mut dwb, &dy, &x, &w, &rstd, rows, d).unwrap();
    rmsnorm::backward(&g, &mut gdx, &mut gdw, &up_bf16(&g, &dy), &up_bf16(&g, &x), &up_bf16(&g, &w), &gr, rows, d)
        .unwrap();
    assert_close(&down_bf16(&g, &gdx), &dxb, BF16_OUT, "rmsnorm dx bf16");
    // dw is f32, from the same bf16 values and an f32 rstd on both sides: only sum order differs.
    assert_close(&down_f32(&g, &gdw), &dwb, F32_OUT, "rmsnorm dw from bf16");
}

#[test]
fn rope_forward_and_inverse() {
    let Some(g) = gpu() else { return };
    let cpu = Cpu::new();
    let s = RopeShape { rows: 2 * 100, seq: 100, pos0: 7, n_head: 4, head_dim: 64 };
    let half = s.head_dim / 2;
    let max_pos = 128;
    let cos = CpuBuf::from(
        (0..max_pos * half).map(|i| ((i / half) as f32 * 0.01 * (i % half) as f32).cos()).collect::<Vec<_>>(),
    );
    let sin = CpuBuf::from(
        (0..max_pos * half).map(|i| ((i / half) as f32 * 0.01 * (i % half) as f32).sin()).collect::<Vec<_>>(),
    );
    let x = bf(&randn(s.rows * s.n_head * s.head_dim, 5, 1.0));
    for inverse in [false, true] {
        let mut want = x.clone();
        cpu.rope(&mut want, &cos, &sin, s, inverse).unwrap();
        let mut gx = up_f32(&g, &x);
        rope::apply(&g, &mut gx, &up_f32(&g, &cos), &up_f32(&g, &sin), s, inverse).unwrap();
        assert_close(&down_f32(&g, &gx), &want, 1e-5, &format!("rope f32 inverse={inverse}"));
        let mut gx = up_bf16(&g, &x);
        rope::apply(&g, &mut gx, &up_f32(&g, &cos), &up_f32(&g, &sin), s, inverse).unwrap();
        assert_close(&down_bf16(&g, &gx), &want, BF16_OUT, &format!("rope bf16 inverse={inverse}"));
        // From f32 into bf16 (what the attention backward does to dQ), leaving the input as it was.
        let (gx, mut gout, gcos, gsin) = (up_f32(&g, &x), poison_bf16(&g, x.len()), up_f32(&g, &cos), up_f32(&g, &sin));
        rope::from_f32(&g, &mut gout, &gx, rope::Tables { cos: &gcos, sin: &gsin }, s, inverse).unwrap();
        assert_close(&down_bf16(&g, &gout), &want, BF16_OUT, &format!("rope f32 -> bf16 inverse={inverse}"));
        assert_eq!(down_f32(&g, &gx), *x, "rope f32 -> bf16 changed its input");
    }
}

#[test]
fn swiglu_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let cpu = Cpu::new();
    // Not a multiple of 8: the bf16 kernels' 16-byte path and their scalar tail both run.
    let n = (1 << 20) + 5;
    let (gate, up, dout) = (bf(&randn(n, 6, 4.0)), bf(&randn(n, 7, 2.0)), bf(&randn(n, 8, 1.0)));
    let mut out = CpuBuf::from(vec![0.0; n]);
    cpu.swiglu_forward(&mut out, &gate, &up, n).unwrap();
    let (mut dg, mut du) = (CpuBuf::from(vec![0.0; n]), CpuBuf::from(vec![0.0; n]));
    cpu.swiglu_backward(&mut dg, &mut du, &dout, &gate, &up, n).unwrap();
    let mut go = poison_f32(&g, n);
    swiglu::forward(&g, &mut go, &up_f32(&g, &gate), &up_f32(&g, &up), n).unwrap();
    assert_close(&down_f32(&g, &go), &out, 1e-5, "swiglu fwd f32");
    let (mut gdg, mut gdu) = (poison_f32(&g, n), poison_f32(&g, n));
    swiglu::backward(&g, &mut gdg, &mut gdu, &up_f32(&g, &dout), &up_f32(&g, &gate), &up_f32(&g, &up), n).unwrap();
    assert_close(&down_f32(&g, &gdg), &dg, 1e-5, "swiglu dgate f32");
    assert_close(&down_f32(&g, &gdu), &du, 1e-5, "swiglu dup f32");
    let mut go = poison_bf16(&g, n);
    swiglu::forward(&g, &mut go, &up_bf16(&g, &gate), &up_bf16(&g, &up), n).unwrap();
    assert_close(&down_bf16(&g, &go), &out, BF16_OUT, "swiglu fwd bf16");
    let (mut gdg, mut gdu) = (poison_bf16(&g, n), poison_bf16(&g, n));
    swiglu::backward(&g, &mut gdg, &mut gdu, &up_bf16(&g, &dout), &up_bf16(&g, &gate), &up_bf16(&g, &up), n).unwrap();
    assert_close(&down_bf16(&g, &gdg), &dg, BF16_OUT, "swiglu dgate bf16");
    assert_close(&down_bf16(&g, &gdu), &du, BF16_OUT, "swiglu dup bf16");
}

#[test]
fn cross_entropy_loss_and_in_place_gradient() {
    let Some(g) = gpu() else { return };
    let cpu = Cpu::new();
    let (rows, vocab) = (64, 32000);
    let logits = bf(&randn(rows * vocab, 9, 8.0));
    let targets: Vec<i32> = (0..rows).map(|r| if r % 17 == 5 { -1 } else { (r * 7919 % vocab) as i32 }).collect();
    let mut want = logits.clone();
    let loss = cpu.cross_entropy(&mut want, &targets, vocab, Some(1.0 / rows as f32)).unwrap();
    let gt = g.stream.clone_htod(&targets).unwrap();
    let mut gl = up_f32(&g, &logits);
    let mut gloss = poison_f32(&g, rows);
    cross_entropy::forward(&g, &mut gl, &mut gloss, &gt, vocab, Some(1.0 / rows as f32)).unwrap();
    assert_close(&down_f32(&g, &gloss), &loss, 1e-5, "cross-entropy loss f32");
    assert_close(&down_f32(&g, &gl), &want, 1e-5, "cross-entropy grad f32");
    let mut gl = up_bf16(&g, &logits);
    let mut gloss = poison_f32(&g, rows);
    cross_entropy::forward(&g, &mut gl, &mut gloss, &gt, vocab, Some(1.0 / rows as f32)).unwrap();
    // The loss is f32 from the same bf16 logits on both sides: only sum order differs.
    assert_close(&down_f32(&g, &gloss), &loss, F32_OUT, "cross-entropy loss from bf16");
    assert_close(&down_bf16(&g, &gl), &want, BF16_OUT, "cross-entropy grad bf16");
}

#[test]
fn adamw_multi_tensor_matches_the_cpu_step() {
    let Some(g) = gpu() else { return };
    let cpu = Cpu::new();
    // grad_scale < 1: clipping folded into the update, on both backends.
    let hp = AdamW { lr: 3e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 7, grad_scale: 0.25 };
    let sizes = [5, 100_000, 3 * adamw::CHUNK + 11];
    let mut gpu_bufs = Vec::new();
    let mut want = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let (p, gr, m) = (randn(n, 10 + i as u64, 1.0), randn(n, 20 + i as u64, 0.1), randn(n, 30 + i as u64, 0.01));
        let v: Vec<f32> = randn(n, 40 + i as u64, 0.01).iter().map(|x| x * x).collect();
        let (p, gr, m, v) = (CpuBuf::from(p), CpuBuf::from(gr), CpuBuf::from(m), CpuBuf::from(v));
        let (mut cp, mut cm, mut cv) = (p.clone(), m.clone(), v.clone());
        cpu.adamw_step(&mut cp, &gr, &mut cm, &mut cv, hp).unwrap();
        want.push((cp, cm, cv));
        gpu_bufs.push((up_f32(&g, &p), up_f32(&g, &gr), up_f32(&g, &m), up_f32(&g, &v), poison_bf16(&g, n)));
    }
    let mut tensors: Vec<adamw::AdamTensor> = gpu_bufs
        .iter_mut()
        .map(|(p, gr, m, v, b)| adamw::AdamTensor { param: p, grad: gr, m, v, param_bf16: Some(b) })
        .collect();
    adamw::step(&g, &mut tensors, hp).unwrap();
    drop(tensors);
    for ((p, _, m, v, b), (wp, wm, wv)) in gpu_bufs.iter().zip(&want) {
        assert_close(&down_f32(&g, p), wp, 1e-5, "adamw param");
        assert_close(&down_f32(&g, m), wm, 1e-5, "adamw m");
        assert_close(&down_f32(&g, v), wv, 1e-5, "adamw v");
        assert_close(&down_bf16(&g, b), wp, BF16_OUT, "adamw bf16 copy");
    }
    let ss = elementwise::sum_squares(&g, &gpu_bufs[1].0).unwrap();
    let want_ss: f64 = want[1].0.iter().map(|x| (*x as f64).powi(2)).sum();
    assert!((ss - want_ss).abs() / want_ss < 1e-6, "sum_squares {ss} vs {want_ss}");
    // The global gradient norm sums every tensor into one accumulator: several buffers of sizes
    // that leave partial blocks, against the sum of each alone and the f64 reference. A launch
    // that reset the accumulator, or counted one buffer twice, fails here.
    let bufs: Vec<&_> = gpu_bufs.iter().map(|b| &b.0).collect();
    let all = elementwise::sum_squares_all(&g, &bufs).unwrap();
    let each: f64 = bufs.iter().map(|b| elementwise::sum_squares(&g, b).unwrap()).sum();
    let want_all: f64 = want.iter().flat_map(|w| &w.0).map(|x| (*x as f64).powi(2)).sum();
    // f32 squares summed in f64: the order of partial sums moves the last digits only.
    assert!((all - want_all).abs() / want_all < 1e-6, "sum_squares_all {all} vs {want_all}");
    assert!((all - each).abs() / each < 1e-9, "sum_squares_all {all} vs the buffers one by one {each}");
    assert!(all > ss * 1.5, "every buffer counted: {all} vs the largest alone {ss}");
}

fn attention_case(g: &Gpu, s: AttnShape, seed: u64) {
    let cpu = Cpu::new();
    let q = bf(&randn(s.q_elems(), seed, 1.0));
    let k = bf(&randn(s.kv_elems(), seed + 1, 1.0));
    let v = bf(&randn(s.kv_elems(), seed + 2, 1.0));
    let dout = bf(&randn(s.q_elems(), seed + 3, 1.0));
    let (mut out, mut lse) = (CpuBuf::from(vec![0.0; s.q_elems()]), CpuBuf::from(vec![0.0; s.lse_elems()]));
    cpu.attention_forward(&mut out, &mut lse, &q, &k, &v, s).unwrap();
    let (mut dq, mut dk, mut dv) = (
        CpuBuf::from(vec![0.0; s.q_elems()]),
        CpuBuf::from(vec![0.0; s.kv_elems()]),
        CpuBuf::from(vec![0.0; s.kv_elems()]),
    );
    cpu.attention_backward(&mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, s).unwrap();

    let (gq, gk, gv) = (up_bf16(g, &q), up_bf16(g, &k), up_bf16(g, &v));
    let (mut go, mut gl) = (poison_bf16(g, s.q_elems()), poison_f32(g, s.lse_elems()));
    flash_attn::forward(g, &mut go, &mut gl, &gq, &gk, &gv, s, Build::Plain).unwrap();
    let tag = format!("flash-attn hd{} q{} kv{} heads {}/{}", s.head_dim, s.q_len, s.kv_len, s.n_head, s.n_kv_head);
    assert_close(&down_bf16(g, &go), &out, 1e-2, &format!("{tag} out"));
    assert_close(&down_f32(g, &gl), &lse, 1e-3, &format!("{tag} lse"));
    // The forward's other build, where the head_dim has one, which `kiln bench attention` also times.
    for &other in flash_attn::builds(s.head_dim).iter().filter(|&&b| b != Build::Plain) {
        let (mut o2, mut l2) = (poison_bf16(g, s.q_elems()), poison_f32(g, s.lse_elems()));
        flash_attn::forward(g, &mut o2, &mut l2, &gq, &gk, &gv, s, other).unwrap();
        assert_close(&down_bf16(g, &o2), &out, 1e-2, &format!("{tag} out ({})", other.label()));
        assert_close(&down_f32(g, &l2), &lse, 1e-3, &format!("{tag} lse ({})", other.label()));
    }
    // The backward starts from the CPU's output so only the backward's own error is measured.
    let (gout, gdo) = (up_bf16(g, &out), up_bf16(g, &dout));
    // Every build of the backward at this head_dim that the device runs (`bwd_builds`).
    for build in flash_attn::bwd_builds(g, s.head_dim) {
        let (mut gdq, mut gdk, mut gdv) =
            (poison_bf16(g, s.q_elems()), poison_bf16(g, s.kv_elems()), poison_bf16(g, s.kv_elems()));
        flash_attn::backward(g, &mut gdq, &mut gdk, &mut gdv, &gdo, &gout, &gl, &gq, &gk, &gv, s, build, None).unwrap();
        let tag = format!("{tag} (backward, {})", build.label());
        assert_close(&down_bf16(g, &gdq), &dq, 1e-2, &format!("{tag} dq"));
        assert_close(&down_bf16(g, &gdk), &dk, 1e-2, &format!("{tag} dk"));
        assert_close(&down_bf16(g, &gdv), &dv, 1e-2, &format!("{tag} dv"));
    }
    // With RoPE to undo, dQ comes out rotated back by the conversion its accumulator goes through:
    // against the CPU's dQ rotated by the inverse angles (positions from q_pos0), dK and dV as above.
    let (cos, sin) = kiln::model::rope::tables(s.head_dim, s.q_pos0 + s.q_len, 10000.0);
    let (cos, sin) = (CpuBuf::from(cos), CpuBuf::from(sin));
    let mut dq_unrotated = dq.clone();
    cpu.rope(&mut dq_unrotated, &cos, &sin, s.q_rope(), true).unwrap();
    let (gcos, gsin) = (up_f32(g, &cos), up_f32(g, &sin));
    let tables = rope::Tables { cos: &gcos, sin: &gsin };
    let (mut gdq, mut gdk, mut gdv) =
        (poison_bf16(g, s.q_elems()), poison_bf16(g, s.kv_elems()), poison_bf16(g, s.kv_elems()));
    flash_attn::backward(
        g,
        &mut gdq,
        &mut gdk,
        &mut gdv,
        &gdo,
        &gout,
        &gl,
        &gq,
        &gk,
        &gv,
        s,
        Build::Plain,
        Some(tables),
    )
    .unwrap();
    assert_close(&down_bf16(g, &gdq), &dq_unrotated, 1e-2, &format!("{tag} dq rotated back"));
    assert_close(&down_bf16(g, &gdk), &dk, 1e-2, &format!("{tag} dk (dQ rotated back)"));
    assert_close(&down_bf16(g, &gdv), &dv, 1e-2, &format!("{tag} dv (dQ rotated back)"));
}

#[test]
fn flash_attention_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut cases = vec![(64, 256, 8, 2), (128, 200, 4, 4), (64, 77, 4, 1), (32, 150, 4, 2), (128, 512, 32, 4)];
    if common::emulated_gpu::emulated() {
        // The emulator runs every CUDA thread on one core; the last case adds only size.
        cases.pop();
    }
    for (hd, len, nh, nkv) in cases {
        let s = AttnShape {
            batch: 2,
            q_len: len,
            kv_len: len,
            kv_stride: len,
            q_pos0: 0,
            n_head: nh,
            n_kv_head: nkv,
            head_dim: hd,
        };
        attention_case(&g, s, hd as u64 + len as u64);
    }
}

/// The engine's attention autotune (`attn_tune.rs`): the first pass of a shape times both head_dim
/// 64 builds, keeps one, and leaves the outputs the kept build computes; the next pass of that shape
/// runs the kept build untimed; head_dim 128, with one build per pass, times nothing. (A tuner with
/// no size threshold, so a small shape is timed.)
#[test]
fn attention_autotune_times_every_build_and_keeps_the_results_right() {
    let Some(g) = gpu() else { return };
    for head_dim in [64, 128] {
        autotune_case(&g, head_dim);
    }
}

fn autotune_case(g: &Gpu, head_dim: usize) {
    use kiln::backend::cuda::attn_tune::{AttnTuner, Pass};
    let s =
        AttnShape { batch: 1, q_len: 150, kv_len: 150, kv_stride: 150, q_pos0: 0, n_head: 4, n_kv_head: 1, head_dim };
    let cpu = Cpu::new();
    let q = bf(&randn(s.q_elems(), 31, 1.0));
    let k = bf(&randn(s.kv_elems(), 32, 1.0));
    let v = bf(&randn(s.kv_elems(), 33, 1.0));
    let dout = bf(&randn(s.q_elems(), 34, 1.0));
    let (mut out, mut lse) = (CpuBuf::from(vec![0.0; s.q_elems()]), CpuBuf::from(vec![0.0; s.lse_elems()]));
    cpu.attention_forward(&mut out, &mut lse, &q, &k, &v, s).unwrap();
    let (mut dq, mut dk, mut dv) = (
        CpuBuf::from(vec![0.0; s.q_elems()]),
        CpuBuf::from(vec![0.0; s.kv_elems()]),
        CpuBuf::from(vec![0.0; s.kv_elems()]),
    );
    cpu.attention_backward(&mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, s).unwrap();

    let tuner = AttnTuner::new(true, 0.0);
    let (gq, gk, gv, gdo) = (up_bf16(g, &q), up_bf16(g, &k), up_bf16(g, &v), up_bf16(g, &dout));
    for round in 0..2 {
        let tag = format!("hd{head_dim}, round {round}");
        let (mut go, mut gl) = (poison_bf16(g, s.q_elems()), poison_f32(g, s.lse_elems()));
        let mut fwd = |b: Build| flash_attn::forward(g, &mut go, &mut gl, &gq, &gk, &gv, s, b);
        tuner.forward(g, s, &mut fwd).unwrap();
        assert_close(&down_bf16(g, &go), &out, 1e-2, &format!("tuned forward out, {tag}"));
        assert_close(&down_f32(g, &gl), &lse, 1e-3, &format!("tuned forward lse, {tag}"));
        let (mut gdq, mut gdk, mut gdv) =
            (poison_bf16(g, s.q_elems()), poison_bf16(g, s.kv_elems()), poison_bf16(g, s.kv_elems()));
        let mut bwd =
            |b: Build| flash_attn::backward(g, &mut gdq, &mut gdk, &mut gdv, &gdo, &go, &gl, &gq, &gk, &gv, s, b, None);
        tuner.backward(g, s, &mut bwd).unwrap();
        assert_close(&down_bf16(g, &gdq), &dq, 1e-2, &format!("tuned backward dq, {tag}"));
        assert_close(&down_bf16(g, &gdk), &dk, 1e-2, &format!("tuned backward dk, {tag}"));
        assert_close(&down_bf16(g, &gdv), &dv, 1e-2, &format!("tuned backward dv, {tag}"));
    }
    // A record per pass with several builds (the second round ran the kept builds untimed), each
    // listing every build that fits the device.
    let tuned = tuner.tuning();
    let fwd_builds = flash_attn::builds(head_dim);
    let bwd_builds = flash_attn::bwd_builds(g, head_dim);
    let mut want = Vec::new();
    if fwd_builds.len() > 1 {
        want.push((Pass::Forward, fwd_builds.to_vec()));
    }
    if bwd_builds.len() > 1 {
        want.push((Pass::Backward, bwd_builds));
    }
    let got: Vec<_> = tuned.iter().map(|t| (t.pass, t.times_ms.iter().map(|x| x.0).collect::<Vec<_>>())).collect();
    assert_eq!(got, want, "hd{head_dim}: {tuned:#?}");
    for t in &tuned {
        assert!(t.times_ms.iter().all(|(_, ms)| ms.is_finite() && *ms >= 0.0), "{t:#?}");
        let best = t.times_ms.iter().map(|x| x.1).fold(f32::INFINITY, f32::min);
        assert!(t.times_ms.iter().any(|&(b, ms)| b == t.chosen && ms == best), "the fastest build is kept: {t:#?}");
    }
}
