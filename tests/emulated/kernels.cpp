// Every kernel file but flash_attn.cu on the CPU, against double-precision references, launched
// with the grids and block sizes of their launchers in src/backend/cuda/ (256 threads, grid-stride
// loops; cross-entropy 512 threads per row; RMSNorm backward 32 rows per block; AdamW one block
// per chunk). Sizes are deliberately not multiples of the block size.
#include "adamw.cu"
#include "cast.cu"
#include "cross_entropy.cu"
#include "elementwise.cu"
#include "rmsnorm.cu"
#include "rope.cu"
#include "swiglu.cu"

#include <algorithm>
#include <random>

#include "check.h"

typedef __nv_bfloat16 B16;
static std::mt19937 rng(7);
static std::normal_distribution<float> nd(0, 1);
static std::vector<float> randn(size_t n, float s = 1) {
    std::vector<float> x(n);
    for (auto& v : x) v = nd(rng) * s;
    return x;
}
static std::vector<B16> to_bf16(const std::vector<float>& x) {
    std::vector<B16> r(x.size());
    for (size_t i = 0; i < x.size(); ++i) r[i] = __float2bfloat16_rn(x[i]);
    return r;
}
static std::vector<double> from_bf16(const std::vector<B16>& x) {
    std::vector<double> r(x.size());
    for (size_t i = 0; i < x.size(); ++i) r[i] = __bfloat162float(x[i]);
    return r;
}
static std::vector<float> rounded(const std::vector<float>& x) {
    std::vector<float> r(x.size());
    for (size_t i = 0; i < x.size(); ++i) r[i] = __bfloat162float(__float2bfloat16_rn(x[i]));
    return r;
}
// elementwise_config in device.rs: 256 threads, enough blocks to cover n (a grid-stride loop
// handles the rest); two blocks here so the stride is exercised too.
static EmulatedDim3 grid_for(size_t n) { return {(unsigned)std::min<size_t>((n + 255) / 256, 2), 1, 1}; }

// d = 300 takes the generic kernels; d = 2048 (8 values × 256 threads) the bf16 16-byte path.
static void rmsnorm(const int rows, const int d) {
    std::printf("rmsnorm rows %d, d %d\n", rows, d);
    const float eps = 1e-5f;
    auto x = rounded(randn(rows * d, 2)), w = rounded(randn(d, 0.1f)), dy = rounded(randn(rows * d));
    for (auto& v : w) v = __bfloat162float(__float2bfloat16_rn(1 + v));
    auto dx0 = rounded(randn(rows * d));
    std::vector<double> r_out(rows * d), r_rstd(rows), r_dx(rows * d), r_dw(d, 0.5);
    for (int r = 0; r < rows; r++) {
        double ss = 0, dot = 0;
        for (int i = 0; i < d; i++) ss += (double)x[r * d + i] * x[r * d + i];
        const double rs = 1 / std::sqrt(ss / d + eps);
        r_rstd[r] = rs;
        for (int i = 0; i < d; i++) {
            r_out[r * d + i] = x[r * d + i] * rs * w[i];
            dot += (double)dy[r * d + i] * w[i] * x[r * d + i];
        }
        for (int i = 0; i < d; i++) {
            r_dx[r * d + i] = dx0[r * d + i] + rs * dy[r * d + i] * w[i] - x[r * d + i] * rs * rs * rs * dot / d;
            r_dw[i] += dy[r * d + i] * x[r * d + i] * rs;
        }
    }
    // f32
    std::vector<float> out(rows * d, NAN), rstd(rows, NAN), dx = dx0, dw(d, 0.5f);
    emulated_launch({rows, 1, 1}, {256, 1, 1}, [&] { rmsnorm_fwd_f32(out.data(), rstd.data(), x.data(), w.data(), d, eps); });
    emulated_launch({(rows + 31) / 32, 1, 1}, {256, 1, 1},
                    [&] { rmsnorm_bwd_f32(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rstd.data(), rows, d, 32); });
    expect_below("rmsnorm f32 out", rel_max_err(widen(out), r_out), 1e-5);
    expect_below("rmsnorm f32 rstd", rel_max_err(widen(rstd), r_rstd), 1e-5);
    expect_below("rmsnorm f32 dx (accumulated)", rel_max_err(widen(dx), r_dx), 1e-5);
    expect_below("rmsnorm f32 dw (accumulated)", rel_max_err(widen(dw), r_dw), 1e-5);
    // bf16 storage, f32 statistics and dw
    // (std::vector's storage is 16-byte aligned, as a GPU allocation is.)
    auto xb = to_bf16(x), wb = to_bf16(w), dyb = to_bf16(dy), dxb = to_bf16(dx0);
    std::vector<B16> outb(rows * d, __float2bfloat16_rn(NAN));
    std::vector<float> dwb(d, 0.5f);
    emulated_launch({rows, 1, 1}, {256, 1, 1}, [&] { rmsnorm_fwd_bf16(outb.data(), rstd.data(), xb.data(), wb.data(), d, eps); });
    emulated_launch({(rows + 31) / 32, 1, 1}, {256, 1, 1}, [&] {
        rmsnorm_bwd_bf16(dxb.data(), dwb.data(), dyb.data(), xb.data(), wb.data(), rstd.data(), rows, d, 32);
    });
    expect_below("rmsnorm bf16 out", rel_max_err(from_bf16(outb), r_out), 1e-2);
    expect_below("rmsnorm bf16 dx", rel_max_err(from_bf16(dxb), r_dx), 1e-2);
    expect_below("rmsnorm bf16 dw (f32)", rel_max_err(widen(dwb), r_dw), 1e-5);
}

// head_dim 64 takes the bf16 kernel's eight-pair path; 36 (half = 18) its scalar one.
static void rope(const int hd) {
    std::printf("rope head_dim %d\n", hd);
    const int rows = 10, seq = 5, pos0 = 3, nh = 3, half = hd / 2, max_pos = 20;
    auto x0 = randn(rows * nh * hd);
    std::vector<float> c(max_pos * half), s(max_pos * half);
    for (int p = 0; p < max_pos; p++)
        for (int i = 0; i < half; i++) {
            const double th = p * std::pow(10000.0, -2.0 * i / hd);
            c[p * half + i] = (float)std::cos(th);
            s[p * half + i] = (float)std::sin(th);
        }
    std::vector<double> want(x0.size());
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < half; i++) {
                const int p = pos0 + r % seq;
                const float* a = &x0[(r * nh + h) * hd];
                want[(r * nh + h) * hd + i] = (double)a[i] * c[p * half + i] - (double)a[i + half] * s[p * half + i];
                want[(r * nh + h) * hd + i + half] = (double)a[i + half] * c[p * half + i] + (double)a[i] * s[p * half + i];
            }
    auto x = x0;
    const size_t pairs = x.size() / 2;
    emulated_launch(grid_for(pairs), {256, 1, 1}, [&] { rope_f32(x.data(), c.data(), s.data(), rows, seq, pos0, nh, hd, 0); });
    expect_below("rope f32 forward", rel_max_err(widen(x), want), 1e-5);
    emulated_launch(grid_for(pairs), {256, 1, 1}, [&] { rope_f32(x.data(), c.data(), s.data(), rows, seq, pos0, nh, hd, 1); });
    expect_below("rope f32 inverse(forward(x)) = x", rel_max_err(widen(x), widen(x0)), 1e-5);
    auto xb = to_bf16(x0);
    emulated_launch(grid_for(pairs), {256, 1, 1}, [&] { rope_bf16(xb.data(), c.data(), s.data(), rows, seq, pos0, nh, hd, 0); });
    expect_below("rope bf16 forward", rel_max_err(from_bf16(xb), want), 1e-2);
    emulated_launch(grid_for(pairs), {256, 1, 1}, [&] { rope_bf16(xb.data(), c.data(), s.data(), rows, seq, pos0, nh, hd, 1); });
    expect_below("rope bf16 inverse(forward(x)) = x", rel_max_err(from_bf16(xb), widen(x0)), 2e-2);
    // From f32 into bf16 (the attention backward's dQ): the f32 rotation rounded once, so within
    // bf16's unit roundoff (2^-8) of the exact rotation. NaN-poisoned, so a skipped pair fails.
    const B16 nan = __float2bfloat16_rn(NAN);
    std::vector<B16> ob(x0.size(), nan);
    emulated_launch(grid_for(pairs), {256, 1, 1}, [&] { rope_f32_to_bf16(ob.data(), x0.data(), c.data(), s.data(), rows, seq, pos0, nh, hd, 0); });
    expect_below("rope f32 -> bf16 forward (one rounding)", rel_max_err(from_bf16(ob), want), 4e-3);
    std::vector<float> fwd(want.begin(), want.end());
    ob.assign(x0.size(), nan);
    emulated_launch(grid_for(pairs), {256, 1, 1}, [&] { rope_f32_to_bf16(ob.data(), fwd.data(), c.data(), s.data(), rows, seq, pos0, nh, hd, 1); });
    expect_below("rope f32 -> bf16 inverse(forward(x)) = x", rel_max_err(from_bf16(ob), widen(x0)), 4e-3);
}

static void swiglu() {
    const size_t n = 1000;
    auto g = randn(n, 3), u = randn(n), dout = randn(n);
    std::vector<double> r_out(n), r_dg(n), r_du(n);
    for (size_t i = 0; i < n; i++) {
        const double s = 1 / (1 + std::exp(-(double)g[i]));
        r_out[i] = g[i] * s * u[i];
        r_dg[i] = dout[i] * u[i] * s * (1 + g[i] * (1 - s));
        r_du[i] = dout[i] * g[i] * s;
    }
    std::vector<float> out(n, NAN), dg(n, NAN), du(n, NAN);
    emulated_launch(grid_for(n), {256, 1, 1}, [&] { swiglu_fwd_f32(out.data(), g.data(), u.data(), n); });
    emulated_launch(grid_for(n), {256, 1, 1}, [&] { swiglu_bwd_f32(dg.data(), du.data(), dout.data(), g.data(), u.data(), n); });
    expect_below("swiglu f32 out", rel_max_err(widen(out), r_out), 1e-5);
    expect_below("swiglu f32 dgate", rel_max_err(widen(dg), r_dg), 1e-5);
    expect_below("swiglu f32 dup", rel_max_err(widen(du), r_du), 1e-5);

    // bf16: the 16-byte path with a tail (n = 1000 - 3), and everything scalar when misaligned.
    for (size_t off : {0, 1}) {
        const size_t m = n - 3 - off;
        auto gb = to_bf16(g), ub = to_bf16(u), db = to_bf16(dout);
        std::vector<double> want_out(m), want_dg(m), want_du(m);
        for (size_t i = 0; i < m; i++) {
            const double gi = __bfloat162float(gb[off + i]), ui = __bfloat162float(ub[off + i]);
            const double di = __bfloat162float(db[off + i]), s = 1 / (1 + std::exp(-gi));
            want_out[i] = gi * s * ui;
            want_dg[i] = di * ui * s * (1 + gi * (1 - s));
            want_du[i] = di * gi * s;
        }
        // aligned16 looks at the addresses, so give the buffers the alignment a GPU allocation has.
        alignas(16) static B16 G[1024], U[1024], D[1024], O[1024], DG[1024], DU[1024];
        std::copy(gb.begin(), gb.end(), G);
        std::copy(ub.begin(), ub.end(), U);
        std::copy(db.begin(), db.end(), D);
        std::fill(O, O + 1024, __float2bfloat16_rn(NAN));
        std::fill(DG, DG + 1024, __float2bfloat16_rn(NAN));
        std::fill(DU, DU + 1024, __float2bfloat16_rn(NAN));
        const EmulatedDim3 grid = grid_for((m + 7) / 8);
        emulated_launch(grid, {256, 1, 1}, [&] { swiglu_fwd_bf16(O + off, G + off, U + off, (long)m); });
        emulated_launch(grid, {256, 1, 1},
                        [&] { swiglu_bwd_bf16(DG + off, DU + off, D + off, G + off, U + off, (long)m); });
        auto got = [&](const B16* x) {
            std::vector<double> r(m);
            for (size_t i = 0; i < m; i++) r[i] = __bfloat162float(x[off + i]);
            return r;
        };
        const char* how = off ? "misaligned, scalar" : "16-byte path + tail";
        char name[96];
        std::snprintf(name, sizeof name, "swiglu bf16 out (%s)", how);
        expect_below(name, rel_max_err(got(O), want_out), 1e-2);
        std::snprintf(name, sizeof name, "swiglu bf16 dgate (%s)", how);
        expect_below(name, rel_max_err(got(DG), want_dg), 1e-2);
        std::snprintf(name, sizeof name, "swiglu bf16 dup (%s)", how);
        expect_below(name, rel_max_err(got(DU), want_du), 1e-2);
    }
}

static void cross_entropy() {
    const int rows = 6, vocab = 1000;
    std::vector<int> t = {5, -1, 999, 0, 300, 17};
    auto z0 = randn(rows * vocab, 3);
    z0[3 * vocab + 7] = 80;  // one dominant logit: the online max must rescale
    std::vector<double> r_loss(rows), r_grad(rows * vocab);
    for (int r = 0; r < rows; r++) {
        double m = -1e300, s = 0;
        for (int i = 0; i < vocab; i++) m = std::max(m, (double)z0[r * vocab + i]);
        for (int i = 0; i < vocab; i++) s += std::exp(z0[r * vocab + i] - m);
        const double lse = m + std::log(s);
        r_loss[r] = t[r] < 0 ? 0 : lse - z0[r * vocab + t[r]];
        for (int i = 0; i < vocab; i++)
            r_grad[r * vocab + i] = t[r] < 0 ? 0 : 0.25 * (std::exp(z0[r * vocab + i] - lse) - (i == t[r]));
    }
    auto z = z0;
    std::vector<float> loss(rows, NAN);
    emulated_launch({rows, 1, 1}, {512, 1, 1}, [&] { cross_entropy_f32(z.data(), loss.data(), t.data(), vocab, 0.25f, 1); });
    expect_below("cross_entropy f32 loss (ignored row = 0)", rel_max_err(widen(loss), r_loss), 1e-5);
    expect_below("cross_entropy f32 in-place gradient", rel_max_err(widen(z), r_grad), 1e-5);
    // Loss only: the logits stay untouched; a vocabulary smaller than the block.
    const int v2 = 100;
    auto z2 = randn(2 * v2);
    auto z2_0 = z2;
    std::vector<int> t2 = {3, 99};
    std::vector<float> l2(2, NAN);
    emulated_launch({2, 1, 1}, {512, 1, 1}, [&] { cross_entropy_f32(z2.data(), l2.data(), t2.data(), v2, 1.f, 0); });
    std::vector<double> r2(2);
    for (int r = 0; r < 2; r++) {
        double s = 0;
        for (int i = 0; i < v2; i++) s += std::exp((double)z2_0[r * v2 + i]);
        r2[r] = std::log(s) - z2_0[r * v2 + t2[r]];
    }
    expect_below("cross_entropy small vocab, loss only", rel_max_err(widen(l2), r2), 1e-5);
    expect_below("cross_entropy loss only leaves logits alone", z2 == z2_0 ? 0.0 : 1.0, 0.5);
}

static void adamw() {
    // Two tensors in one launch, the second spanning several chunks and a partial one.
    const size_t chunk = 1 << 16, n0 = 1000, n1 = 2 * chunk + 123;
    auto p0 = randn(n0), g0 = randn(n0), p1 = randn(n1), g1 = randn(n1);
    std::vector<float> m0(n0, 0.1f), v0(n0, 0.2f), m1(n1, 0.1f), v1(n1, 0.2f);
    std::vector<B16> p1b(n1, __float2bfloat16_rn(NAN));
    const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, gs = 0.5f;
    const int step = 3;
    const double bc1 = 1 - std::pow((double)b1, step), bc2 = 1 - std::pow((double)b2, step);
    auto reference = [&](std::vector<float> p, const std::vector<float>& g, std::vector<float> m, std::vector<float> v) {
        std::vector<double> out(p.size());
        for (size_t i = 0; i < p.size(); i++) {
            const double gi = (double)g[i] * gs;
            const double mi = b1 * m[i] + (1 - b1) * gi, vi = b2 * v[i] + (1 - b2) * gi * gi;
            out[i] = p[i] * (1 - (double)lr * wd) - lr / bc1 * mi / (std::sqrt(vi) / std::sqrt(bc2) + eps);
        }
        return out;
    };
    auto want0 = reference(p0, g0, m0, v0), want1 = reference(p1, g1, m1, v1);
    std::vector<AdamChunk> chunks;
    auto add = [&](float* p, const float* g, float* m, float* v, B16* pb, size_t n) {
        for (size_t s = 0; s < n; s += chunk)
            chunks.push_back({p + s, g + s, m + s, v + s, pb ? pb + s : nullptr, (long)std::min(chunk, n - s)});
    };
    add(p0.data(), g0.data(), m0.data(), v0.data(), nullptr, n0);
    add(p1.data(), g1.data(), m1.data(), v1.data(), p1b.data(), n1);
    // A third tensor that starts one value into its buffers: not 16-byte aligned, all scalar.
    const size_t n2 = 999;
    auto p2 = randn(n2 + 1), g2 = randn(n2 + 1);
    std::vector<float> m2(n2 + 1, 0.1f), v2(n2 + 1, 0.2f);
    std::vector<B16> p2b(n2 + 1, __float2bfloat16_rn(NAN));
    auto want2 = reference({p2.begin() + 1, p2.end()}, {g2.begin() + 1, g2.end()}, {m2.begin() + 1, m2.end()},
                           {v2.begin() + 1, v2.end()});
    add(p2.data() + 1, g2.data() + 1, m2.data() + 1, v2.data() + 1, p2b.data() + 1, n2);
    AdamHp hp{lr, b1, b2, eps, wd, (float)(lr / bc1), (float)std::sqrt(bc2), gs};
    emulated_launch({(unsigned)chunks.size(), 1, 1}, {256, 1, 1}, [&] { adamw_multi(chunks.data(), hp); });
    expect_below("adamw tensor 0 (one partial chunk)", rel_max_err(widen(p0), want0), 1e-5);
    expect_below("adamw tensor 1 (three chunks)", rel_max_err(widen(p1), want1), 1e-5);
    expect_below("adamw tensor 1 bf16 copy", rel_max_err(from_bf16(p1b), want1), 1e-2);
    expect_below("adamw tensor 2 (misaligned, scalar)", rel_max_err(widen({p2.begin() + 1, p2.end()}), want2), 1e-5);
    expect_below("adamw tensor 2 bf16 copy", rel_max_err(from_bf16({p2b.begin() + 1, p2b.end()}), want2), 1e-2);
}

static void small_ops() {
    const size_t n = 1000;
    auto a = randn(n), b = randn(n);
    std::vector<B16> ab(n, __float2bfloat16_rn(NAN));
    std::vector<float> back(n, NAN);
    emulated_launch(grid_for(n), {256, 1, 1}, [&] { cast_f32_to_bf16(ab.data(), a.data(), n); });
    emulated_launch(grid_for(n), {256, 1, 1}, [&] { cast_bf16_to_f32(back.data(), ab.data(), n); });
    expect_below("cast f32 -> bf16 -> f32 is bf16 rounding", rel_max_err(widen(back), widen(rounded(a))), 1e-9);
    std::vector<double> sum(n);
    for (size_t i = 0; i < n; i++) sum[i] = (double)a[i] + b[i];
    auto acc = a;
    emulated_launch(grid_for(n), {256, 1, 1}, [&] { add_assign_f32(acc.data(), b.data(), n); });
    expect_below("add_assign f32", rel_max_err(widen(acc), sum), 1e-6);
    double ss = 0, want = 0;
    for (float x : a) want += (double)x * x;
    emulated_launch(grid_for(n), {256, 1, 1}, [&] { sum_squares_f32(&ss, a.data(), n); });
    expect_below("sum_squares f32 (f64 accumulation)", std::fabs(ss - want) / want, 1e-12);
    // Embedding gather and scatter-add with a repeated id.
    const int d = 40, vocab = 5;
    auto table = randn(vocab * d), dout = randn(3 * d);
    std::vector<unsigned> ids = {4, 0, 4};
    std::vector<float> out(3 * d, NAN), dt(vocab * d, 1.0f);
    std::vector<double> r_out(3 * d), r_dt(vocab * d, 1.0);
    for (int r = 0; r < 3; r++)
        for (int i = 0; i < d; i++) {
            r_out[r * d + i] = table[ids[r] * d + i];
            r_dt[ids[r] * d + i] += dout[r * d + i];
        }
    emulated_launch(grid_for(3 * d), {256, 1, 1}, [&] { embedding_fwd_f32(out.data(), table.data(), ids.data(), 3, d); });
    emulated_launch(grid_for(3 * d), {256, 1, 1}, [&] { embedding_bwd_f32(dt.data(), dout.data(), ids.data(), 3, d); });
    expect_below("embedding gather", rel_max_err(widen(out), r_out), 1e-9);
    expect_below("embedding scatter-add (repeated id, accumulating)", rel_max_err(widen(dt), r_dt), 1e-6);
}

int main() {
    rmsnorm(70, 300);
    rmsnorm(40, 2048);
    rope(64);
    rope(36);
    swiglu();
    cross_entropy();
    adamw();
    small_ops();
    return emulated_failures ? 1 : 0;
}
