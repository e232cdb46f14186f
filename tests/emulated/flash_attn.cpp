// kernels/flash_attn.cu on the CPU: forward (out, logsumexp) and backward (dQ, dK, dV) against a
// double-precision reference, launched exactly as src/backend/cuda/flash_attn.rs launches them,
// over the shapes that exercise its edges: head_dim 32, 64 and 128, lengths that are not multiples of
// the 64-row tiles, a KV cache longer than its valid part (NaN beyond it must never leak),
// decoding offsets (q_pos0 > 0), grouped queries (1, 2 and 4 query heads per KV head), and enough
// tiles per block that the cp.async pipelines refill each buffer more than once. Copies land at their
// wait, then (the last shapes) at their issue: a tile read too early, or a buffer refilled while
// still read, shows up as an error.
#include "flash_attn.cu"

#include <algorithm>
#include <random>

#include "check.h"

typedef __nv_bfloat16 B16;

struct Shape {
    int batch, q_len, kv_len, kv_stride, q_pos0, n_head, n_kv_head, d;
};

static double f(B16 x) { return (double)__bfloat162float(x); }

// The dynamic shared memory the launcher reserves (fwd_shared_bytes / bwd_shared_bytes in
// src/backend/cuda/flash_attn.rs, same formulas): the kernels must stay inside it.
static size_t fwd_shared_bytes(int d) { return (size_t)2 * 2 * 64 * (d + 8) * 2; }
static size_t bwd_shared_bytes(int d, size_t keys) {
    const size_t ks = d + 8, stages = d <= 64 ? 2 : 1;
    return 2 * (2 * keys * ks + stages * 2 * 64 * ks + keys * (64 + 8)) + 4 * stages * 2 * 64;
}

// The head_dim 64 builds with two m-tiles per warp: 128 queries (forward) or keys (backward) per block.
static bool fwd_two_m_tiles = false;
static bool bwd_two_m_tiles = false;

static void run(Shape s, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0, 1);
    const size_t qe = (size_t)s.batch * s.q_len * s.n_head * s.d;
    const size_t ke = (size_t)s.batch * s.kv_stride * s.n_kv_head * s.d;
    const size_t le = (size_t)s.batch * s.n_head * s.q_len;
    std::vector<B16> q(qe), k(ke), v(ke), dout(qe), out(qe), dq(qe), dk(ke), dv(ke);
    std::vector<float> lse(le, NAN);
    for (auto& x : q) x = __float2bfloat16_rn(nd(rng));
    for (auto& x : dout) x = __float2bfloat16_rn(nd(rng));
    for (int b = 0; b < s.batch; b++)
        for (int j = 0; j < s.kv_stride; j++)
            for (int h = 0; h < s.n_kv_head; h++)
                for (int c = 0; c < s.d; c++) {
                    size_t o = (((size_t)b * s.kv_stride + j) * s.n_kv_head + h) * s.d + c;
                    bool valid = j < s.kv_len;
                    k[o] = __float2bfloat16_rn(valid ? nd(rng) * 1.5f : NAN);
                    v[o] = __float2bfloat16_rn(valid ? nd(rng) : NAN);
                }
    for (auto& x : out) x = __float2bfloat16_rn(NAN);
    const float scale = 1.0f / std::sqrt((float)s.d);
    const bool two = s.d == 64 && fwd_two_m_tiles;
    auto fwd = [&] {
        auto entry = two ? flash_attn_fwd_d64_2mt
                         : s.d == 32 ? flash_attn_fwd_d32 : s.d == 64 ? flash_attn_fwd_d64 : flash_attn_fwd_d128;
        entry(out.data(), lse.data(), q.data(), k.data(), v.data(), s.q_len, s.kv_len, s.kv_stride, s.q_pos0,
              s.n_head, s.n_kv_head, scale);
    };
    // Grids as the launcher orders them: (head, batch, query block) and (KV head, batch, key block).
    const unsigned q_block = two ? 128 : 64;
    emulated_ldsm_count = emulated_ldsm_wavefronts = 0;
    emulated_launch({(unsigned)s.n_head, (unsigned)s.batch, (s.q_len + q_block - 1) / q_block}, {128, 1, 1}, fwd,
                    fwd_shared_bytes(s.d));
    const double fwd_wavefronts = (double)emulated_ldsm_wavefronts / emulated_ldsm_count;

    // Reference in double: causal softmax attention, then its gradients.
    const int group = s.n_head / s.n_kv_head;
    auto qi = [&](int b, int i, int h) { return (((size_t)b * s.q_len + i) * s.n_head + h) * s.d; };
    auto ki = [&](int b, int j, int h) { return (((size_t)b * s.kv_stride + j) * s.n_kv_head + h) * s.d; };
    std::vector<double> r_out(qe, 0), r_lse(le), r_dq(qe, 0), r_dk(ke, 0), r_dv(ke, 0);
    for (int b = 0; b < s.batch; b++)
        for (int h = 0; h < s.n_head; h++) {
            const int hk = h / group;
            for (int i = 0; i < s.q_len; i++) {
                const int nv = std::min(s.q_pos0 + i + 1, s.kv_len);
                std::vector<double> p(nv);
                double m = -1e300;
                for (int j = 0; j < nv; j++) {
                    double a = 0;
                    for (int c = 0; c < s.d; c++) a += f(q[qi(b, i, h) + c]) * f(k[ki(b, j, hk) + c]);
                    p[j] = a * scale;
                    m = std::max(m, p[j]);
                }
                double l = 0;
                for (int j = 0; j < nv; j++) l += (p[j] = std::exp(p[j] - m));
                r_lse[((size_t)b * s.n_head + h) * s.q_len + i] = m + std::log(l);
                double delta = 0;
                for (int j = 0; j < nv; j++) p[j] /= l;
                for (int c = 0; c < s.d; c++) {
                    double o = 0;
                    for (int j = 0; j < nv; j++) o += p[j] * f(v[ki(b, j, hk) + c]);
                    r_out[qi(b, i, h) + c] = o;
                    delta += f(dout[qi(b, i, h) + c]) * o;
                }
                for (int j = 0; j < nv; j++) {
                    double dp = 0;
                    for (int c = 0; c < s.d; c++) dp += f(dout[qi(b, i, h) + c]) * f(v[ki(b, j, hk) + c]);
                    const double ds = p[j] * (dp - delta);
                    for (int c = 0; c < s.d; c++) {
                        r_dv[ki(b, j, hk) + c] += p[j] * f(dout[qi(b, i, h) + c]);
                        r_dk[ki(b, j, hk) + c] += scale * ds * f(q[qi(b, i, h) + c]);
                        r_dq[qi(b, i, h) + c] += scale * ds * f(k[ki(b, j, hk) + c]);
                    }
                }
            }
        }

    // Backward, as flash_attn.rs::backward: delta pass, zeroed dK/dV, f32 dQ accumulator.
    std::vector<float> delta(le, 0.f), dq_acc(qe, 0.f);
    const int rows = s.batch * s.q_len * s.n_head;
    emulated_launch({(unsigned)((rows + 3) / 4), 1, 1}, {128, 1, 1},
                    [&] { flash_attn_bwd_delta(delta.data(), dout.data(), out.data(), rows, s.q_len, s.n_head, s.d); });
    for (auto& x : dk) x.bits = 0;
    for (auto& x : dv) x.bits = 0;
    const bool mt2 = s.d == 64 && bwd_two_m_tiles;
    auto bwd = [&] {
        auto entry = mt2 ? flash_attn_bwd_d64_2mt
                         : s.d == 32 ? flash_attn_bwd_d32 : s.d == 64 ? flash_attn_bwd_d64 : flash_attn_bwd_d128;
        entry(dq_acc.data(), dk.data(), dv.data(), dout.data(), lse.data(), delta.data(), q.data(), k.data(),
              v.data(), s.q_len, s.kv_len, s.kv_stride, s.q_pos0, s.n_head, s.n_kv_head, scale);
    };
    const unsigned keys = mt2 ? 128 : 64;
    emulated_ldsm_count = emulated_ldsm_wavefronts = 0;
    emulated_launch({(unsigned)s.n_kv_head, (unsigned)s.batch, (unsigned)((s.kv_len + keys - 1) / keys)},
                    {128, 1, 1}, bwd, bwd_shared_bytes(s.d, keys));
    const double bwd_wavefronts = (double)emulated_ldsm_wavefronts / emulated_ldsm_count;

    auto rows_of = [](const std::vector<B16>& x) {
        std::vector<double> r(x.size());
        for (size_t i = 0; i < x.size(); ++i) r[i] = f(x[i]);
        return r;
    };
    // dK/dV rows past kv_len are not gradients of anything: they must stay zero.
    std::vector<double> dk_valid = rows_of(dk), dv_valid = rows_of(dv);
    char name[160];
    const char* bwd_build = mt2 ? " (backward with 2 m-tiles per warp)" : "";
    std::snprintf(name, sizeof name, "b%d q%d kv%d/%d pos0 %d heads %d/%d d%d%s%s", s.batch, s.q_len, s.kv_len,
                  s.kv_stride, s.q_pos0, s.n_head, s.n_kv_head, s.d, two ? " (forward with 2 m-tiles per warp)" : "",
                  bwd_build);
    std::printf("%s\n", name);
    // Bounds from the arithmetic, relative to the largest reference value. The output is an f32
    // sum of products with P rounded to bf16, then rounded to bf16 itself: two roundings of at most
    // 2^-9 each, so 5e-3 (measured over every case: 3.3e-3). The logsumexp is f32 throughout: 1e-5
    // (measured 9e-7). The backward rounds P and dS to bf16 before its products and dK, dV once
    // more on the way out, and dQ sums rounded dS products over every key block: 1e-2 (measured:
    // dQ 4.8e-3, dK 6.3e-3, dV 4.5e-3). A wrong index or a missed tile is an error of order 1.
    expect_below("  out (bf16)", rel_max_err(rows_of(out), r_out), 5e-3);
    double lse_err = 0;
    for (size_t i = 0; i < le; ++i) lse_err = std::fmax(lse_err, std::isnan(lse[i]) ? INFINITY : std::fabs(lse[i] - r_lse[i]));
    expect_below("  logsumexp (f32, absolute)", lse_err, 1e-5);
    expect_below("  dq (f32 accumulator)", rel_max_err(widen(dq_acc), r_dq), 1e-2);
    expect_below("  dk (bf16)", rel_max_err(dk_valid, r_dk), 1e-2);
    expect_below("  dv (bf16)", rel_max_err(dv_valid, r_dv), 1e-2);
    // Shared-memory bank conflicts: ldmatrix takes 4 wavefronts per x4 when its rows' banks never
    // collide (the padded row strides are what make it so); each one beyond is bandwidth lost.
    expect_below("  ldmatrix bank conflicts, forward (wavefronts/x4 - 4)", fwd_wavefronts - 4, 1e-9);
    expect_below("  ldmatrix bank conflicts, backward (wavefronts/x4 - 4)", bwd_wavefronts - 4, 1e-9);
}

int main() {
    run({1, 250, 260, 264, 10, 2, 1, 64}, 6);   // ragged tiles, cache longer than its valid part
    run({1, 200, 200, 200, 0, 2, 2, 128}, 7);   // head_dim 128, one query head per KV head
    run({2, 100, 100, 100, 0, 4, 2, 64}, 1);    // batch 2, groups of 2
    run({1, 70, 150, 160, 80, 4, 1, 128}, 2);   // chunked prefill at an offset, groups of 4
    run({1, 1, 64, 128, 63, 2, 2, 64}, 3);      // one decoded token
    run({1, 5, 200, 256, 195, 4, 2, 64}, 5);    // a few tokens at the end of a long cache
    run({1, 192, 192, 192, 0, 4, 1, 64}, 8);    // whole tiles, unmasked tiles in both directions
    run({1, 130, 130, 130, 0, 4, 2, 128}, 9);   // head_dim 128's one-stage backward over several heads
    run({2, 150, 150, 150, 0, 4, 2, 32}, 12);   // head_dim 32 (the demo's), ragged, groups of 2
    run({1, 3, 90, 96, 87, 4, 4, 32}, 13);      // head_dim 32 decoding at the end of a cache
    // The head_dim 64 builds with two m-tiles per warp (128 queries or keys per block), both passes
    // in each run, over head_dim 64 shapes from above (ragged tiles and a longer cache, batch 2,
    // decoding, the end of a long cache) and one with whole and partial 128-row blocks over several
    // tiles. The backward takes its queries in sub-tiles of 16.
    const std::pair<Shape, unsigned> d64[] = {{{1, 250, 260, 264, 10, 2, 1, 64}, 6},
                                              {{2, 100, 100, 100, 0, 4, 2, 64}, 1},
                                              {{1, 1, 64, 128, 63, 2, 2, 64}, 3},
                                              {{1, 5, 200, 256, 195, 4, 2, 64}, 5},
                                              {{1, 300, 300, 300, 0, 4, 1, 64}, 15}};
    fwd_two_m_tiles = bwd_two_m_tiles = true;
    std::printf("forward and backward with 2 m-tiles per warp:\n");
    for (const auto& [shape, seed] : d64) run(shape, seed);
    fwd_two_m_tiles = bwd_two_m_tiles = false;
    // Again with copies landing as soon as they are issued (a buffer refilled too early shows here).
    emulated_cp_async_eager = true;
    std::printf("cp.async landing at issue:\n");
    run({1, 192, 192, 192, 0, 4, 1, 64}, 10);
    run({1, 130, 130, 130, 0, 4, 2, 128}, 11);
    run({1, 192, 192, 192, 0, 4, 1, 32}, 14);
    fwd_two_m_tiles = bwd_two_m_tiles = true;
    run({1, 300, 300, 300, 0, 4, 1, 64}, 16);
    return emulated_failures ? 1 : 0;
}
