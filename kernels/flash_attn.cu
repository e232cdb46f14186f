// FlashAttention-2, causal, grouped-query, bf16 in and out, f32 accumulation, on tensor cores
// (mma.sync m16n8k16; sm_80 and newer), head_dim 32, 64 and 128. Layouts match the CPU backend:
//   q, out, dq, dout: [batch, q_len, n_head, D]     k, v, dk, dv: [batch, kv_stride, n_kv_head, D]
//   lse, delta: [batch, n_head, q_len] f32 (lse is the natural-log logsumexp of the scaled scores)
// Query i sits at absolute position q_pos0 + i and sees keys 0 ..= q_pos0 + i.
//
// Forward: a block owns 64 queries of one head (4 warps × 16 rows; 128 queries, 4 warps × 32
// rows, in the head_dim 64 build with two m-tiles per warp) and streams 64-key tiles of
// K/V through shared memory; scores, the online softmax and the output stay in registers (the
// score accumulators are reused directly as the A operand of P·V, FA2's trick).
// Backward: a block owns 64 keys of one KV head (4 warps × 16 keys; 128 keys, 4 warps × 32, in
// the head_dim 64 build with two m-tiles per warp) and walks every query tile of every query head
// of its group, so dK and dV are summed in registers and written once (no repeated K/V, no
// atomics); dQ is accumulated in f32 with atomics and cast at the end.
// Both stream their tiles with cp.async into a second buffer while the current one is computed on
// (the backward at head_dim 128 keeps one buffer, refilled during its dQ phase, since a second
// would halve its blocks per SM), and both order their grids heaviest-first: under the causal mask the
// last query blocks (forward) and the first key blocks (backward) carry the most work, so launching
// them first across every head and batch leaves only light blocks for the tail of the kernel.
// Head_dim 64 (TinyLlama's) has a second build of each pass, with two m-tiles per warp, for one
// stated reason (docs/cuda.md): the plain builds read about 0.5 ldmatrix per mma.sync, more than
// an SM's shared memory delivers in the tensor cores' time on Hopper, and two m-tiles per warp cut
// that to 0.25 (forward) and 0.30 (backward). The engine times both builds on the card.
#include "common.cuh"

namespace {

constexpr int BR = 64;  // queries per tile
constexpr int BC = 64;  // keys per tile
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

__device__ __forceinline__ void mma16816(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
#ifdef KILN_CPU_EMULATION
    emulated_mma16816(c, a, b0, b1);  // tests/emulated: the PTX fragment layout, computed on the CPU
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// 2^x on the special-function unit alone (ex2.approx.ftz: relative error ~2^-22, subnormal results
// flushed to zero). exp2f keeps subnormal results exact, which costs a compare and two multiplies
// around every MUFU.EX2 (ptxas, sm_90), and the softmax issues one exponential per score: in the
// head_dim 64 forward that made a third of the main loop's instructions. A probability under
// 2^-126 adds nothing to a row whose largest term is 1.
__device__ __forceinline__ float exp2_ftz(float x) {
#ifdef KILN_CPU_EMULATION
    const float y = exp2f(x);
    return y < 0x1p-126f ? 0.0f : y;
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

__device__ __forceinline__ unsigned pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// Four 8×8 bf16 matrices from shared memory in one instruction: lane 8j + i gives the address of
// row i of matrix j (16-byte aligned); register j receives matrix j's row lane/4, columns
// 2·(lane%4) and +1 — or, transposed, its rows 2·(lane%4) and +1 of column lane/4. Either way
// exactly an mma.sync operand fragment, with no per-element shared-memory loads.
__device__ __forceinline__ void ldsm_x4(unsigned r[4], const bf16* p) {
#ifdef KILN_CPU_EMULATION
    emulated_ldmatrix_x4(r, p, false);
#else
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned r[4], const bf16* p) {
#ifdef KILN_CPU_EMULATION
    emulated_ldmatrix_x4(r, p, true);
#else
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// B fragments of two consecutive k16 steps (kk, kk + 1) for the 8 columns n0..n0+7 of Bᵀ stored
// row-major as [n][k] (K for Q·Kᵀ, Q for K·Qᵀ): b[0], b[1] for step kk, b[2], b[3] for kk + 1.
__device__ __forceinline__ void b_frags_nk(unsigned b[4], const bf16* rows_n0_k0, int stride, int lane) {
    ldsm_x4(b, rows_n0_k0 + (lane & 7) * stride + (lane >> 3) * 8);
}

// B fragments of one k16 step for two 8-column tiles (n0 and n0 + 8) of B stored row-major as
// [k][n] (V for P·V, dO and Q for the backward's Pᵀ·dO and dSᵀ·Q, K for dS·K): b[0], b[1] for
// columns n0.., b[2], b[3] for n0 + 8...
__device__ __forceinline__ void b_frags_kn(unsigned b[4], const bf16* rows_k0_n0, int stride, int lane) {
    ldsm_x4_trans(b, rows_k0_n0 + (lane & 15) * stride + (lane >> 4) * 8);
}

// Two adjacent bf16 as one register (the column index is even, so the load is aligned).
__device__ __forceinline__ unsigned pair(const bf16* p) { return *reinterpret_cast<const unsigned*>(p); }

// `d[0] += x; d[1] += y` in global memory, atomically per element (d is 8-byte aligned). Hopper
// has a two-wide reduction: one instruction and one L2 operation per pair instead of two, which
// halves the atomic traffic of the backward's dQ accumulation.
__device__ __forceinline__ void red_add2(float* d, float x, float y) {
#ifdef KILN_CPU_EMULATION
    emulated_require_aligned(d, 8, "red.global.add.v2.f32");  // what the Hopper path below needs
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(d), "f"(x), "f"(y) : "memory");
#else
    atomicAdd(d, x);
    atomicAdd(d + 1, y);
#endif
}

// Asynchronous global → shared copies (cp.async, sm_80+): issued now, landed by cp_async_wait_all,
// so the next tile's loads overlap this tile's math. `valid == false` zero-fills (src-size 0:
// nothing is read from `src`, which must still be a mapped address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#ifdef KILN_CPU_EMULATION
    emulated_cp_async(dst, src, 16, valid);
#else
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(src), "r"(valid ? 16 : 0) : "memory");
#endif
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
#ifdef KILN_CPU_EMULATION
    emulated_cp_async(dst, src, 4, true);
#else
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(a), "l"(src) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef KILN_CPU_EMULATION
    emulated_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// This thread's committed copies have landed; a __syncthreads after it makes every thread's visible.
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef KILN_CPU_EMULATION
    emulated_cp_async_wait_all();
#else
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

// Starts copying `rows` rows of D bf16 (row stride `stride` in global memory) into shared memory
// with row stride D + 8 (the padding spreads rows over banks); rows past `valid` become zero.
template <int D>
__device__ __forceinline__ void load_tile_async(bf16* dst, const bf16* src, long stride, int rows, int valid) {
    constexpr int KS = D + 8, VEC = D / 8;
    for (int idx = threadIdx.x; idx < rows * VEC; idx += blockDim.x) {
        const int r = idx / VEC, c = (idx % VEC) * 8;
        const bool ok = r < valid;
        cp_async16(dst + r * KS + c, ok ? src + r * stride + c : src, ok);
    }
}

// MT: 16-row m-tiles per warp. With MT = 2 a block owns 128 queries and every K/V fragment read
// from shared memory feeds two mma.sync instead of one, halving the shared-memory traffic per
// FLOP (FA2's own kernels give each warp 32 or more rows) at the cost of twice the accumulators.
template <int D, int MT = 1>
__device__ void fwd(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int q_len, int kv_len,
                    int kv_stride, int q_pos0, int n_head, int n_kv_head, float scale) {
    constexpr int KS = D + 8, TILE = BC * KS, QB = BR * MT;  // QB: queries per block
    DYNAMIC_SHARED(unsigned char, smem);
    bf16* kv_tiles = reinterpret_cast<bf16*>(smem);  // two stages of [K tile | V tile]
    // The grid is (head, batch, query block) with the last query blocks, which see the most keys,
    // launched first.
    const int h = blockIdx.x, b = blockIdx.y, qb = gridDim.z - 1 - blockIdx.z;
    const int hk = h / (n_head / n_kv_head);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const long qs = (long)n_head * D, ks = (long)n_kv_head * D;
    const bf16* qb_ptr = q + (long)b * q_len * qs + (long)h * D;
    const bf16* kb_ptr = k + (long)b * kv_stride * ks + (long)hk * D;
    const bf16* vb_ptr = v + (long)b * kv_stride * ks + (long)hk * D;
    // This warp's rows: m-tile mt covers row0 + 16·mt .. +15 (rows g and g + 8 of it per thread).
    const int row0 = qb * QB + warp * 16 * MT;
    int rlo[MT], rhi[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        rlo[mt] = row0 + 16 * mt + g;
        rhi[mt] = rlo[mt] + 8;
    }

    const int kv_end = min(kv_len, q_pos0 + min(q_len, (qb + 1) * QB));
    const int tiles = (kv_end + BC - 1) / BC;
    auto issue = [&](int t) {
        bf16* dst = kv_tiles + (t & 1) * 2 * TILE;
        const int j0 = t * BC;
        load_tile_async<D>(dst, kb_ptr + j0 * ks, ks, BC, kv_len - j0);
        load_tile_async<D>(dst + TILE, vb_ptr + j0 * ks, ks, BC, kv_len - j0);
        cp_async_commit();
    };
    issue(0);

    // This warp's query rows as A fragments, straight from global memory (while tile 0 lands).
    unsigned qf[MT][D / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int c = kk * 16 + 2 * tq;
            const bool lo = rlo[mt] < q_len, hi = rhi[mt] < q_len;
            qf[mt][kk][0] = lo ? pair(qb_ptr + rlo[mt] * qs + c) : 0u;
            qf[mt][kk][1] = hi ? pair(qb_ptr + rhi[mt] * qs + c) : 0u;
            qf[mt][kk][2] = lo ? pair(qb_ptr + rlo[mt] * qs + c + 8) : 0u;
            qf[mt][kk][3] = hi ? pair(qb_ptr + rhi[mt] * qs + c + 8) : 0u;
        }
    float o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < D / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.0f;
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.0f;
    const float sl2 = scale * LOG2E;  // scores in the log2 domain: exp2 is one instruction

    for (int t = 0; t < tiles; ++t) {
        cp_async_wait_all();
        __syncthreads();  // tile t is in shared memory for every thread, and tile t-1's buffer is free
        if (t + 1 < tiles) issue(t + 1);
        const bf16* Ks = kv_tiles + (t & 1) * 2 * TILE;
        const bf16* Vs = Ks + TILE;
        const int j0 = t * BC;

        float s[MT][BC / 8][4];
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk += 2) {
                unsigned bk[4];
                b_frags_nk(bk, Ks + nt * 8 * KS + kk * 16, KS, lane);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816(s[mt][nt], qf[mt][kk], bk[0], bk[1]);
                    mma16816(s[mt][nt], qf[mt][kk + 1], bk[2], bk[3]);
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            // Only tiles that reach past this m-tile's first row, or past the keys, need the mask.
            const bool edge = j0 + BC - 1 > q_pos0 + row0 + 16 * mt || j0 + BC > kv_len;
            // The row maximum is taken over the raw scores and scaled once per row, so that each
            // score costs one FFMA and one MUFU.EX2 on its way to a probability (FA2's form).
            // The mask is a pass of its own under one branch, so that the tiles without it (all
            // but the diagonal's) do not issue its compares: folded into the maximum below, it is
            // compiled to predicated instructions that every tile issues.
            if (edge) {
#pragma unroll
                for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = e < 2 ? rlo[mt] : rhi[mt];
                        const int key = j0 + nt * 8 + 2 * tq + (e & 1);
                        if (key > q_pos0 + row || key >= kv_len) s[mt][nt][e] = -INFINITY;
                    }
                }
            }
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[mt][nt][e]);
            }
            float alpha[2], mref[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                // The four threads of a quad share a row.
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
                const float mnew = fmaxf(m[mt][i], mx[i] * sl2);  // log2 domain (scale > 0)
                mref[i] = mnew == -INFINITY ? 0.0f : mnew;  // a row with no key yet stays all zero
                alpha[i] = exp2_ftz(m[mt][i] - mref[i]);
                m[mt][i] = mnew;
                l[mt][i] *= alpha[i];
            }
#pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[mt][nt][e] = exp2_ftz(fmaf(s[mt][nt][e], sl2, -mref[e >> 1]));
                    l[mt][e >> 1] += s[mt][nt][e];
                }
            }
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                o[mt][nt][0] *= alpha[0];
                o[mt][nt][1] *= alpha[0];
                o[mt][nt][2] *= alpha[1];
                o[mt][nt][3] *= alpha[1];
            }
        }
        // O += P·V: the accumulators of key tiles 2kk and 2kk+1 are the A fragment of step kk.
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int nt = 0; nt < D / 8; nt += 2) {
                unsigned bv[4];
                b_frags_kn(bv, Vs + kk * 16 * KS + nt * 8, KS, lane);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816(o[mt][nt], a[mt], bv[0], bv[1]);
                    mma16816(o[mt][nt + 1], a[mt], bv[2], bv[3]);
                }
            }
        }
    }
    bf16* ob = out + (long)b * q_len * qs + (long)h * D;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            l[mt][i] += __shfl_xor_sync(0xffffffffu, l[mt][i], 1);
            l[mt][i] += __shfl_xor_sync(0xffffffffu, l[mt][i], 2);
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = half ? rhi[mt] : rlo[mt];
            if (row >= q_len) continue;
            const float inv = l[mt][half] > 0.0f ? 1.0f / l[mt][half] : 0.0f;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                *reinterpret_cast<unsigned*>(ob + row * qs + nt * 8 + 2 * tq) =
                    pack(o[mt][nt][2 * half] * inv, o[mt][nt][2 * half + 1] * inv);
            }
            if (tq == 0) lse[((long)b * n_head + h) * q_len + row] = (m[mt][half] + log2f(l[mt][half])) * LN2;
        }
    }
}

// Four warps per block. MT: 16-key m-tiles per warp, so a block owns KB = 64·MT keys. With MT = 2
// a warp owns 32 keys, so every Q/dO fragment it reads from shared memory feeds two mma.sync
// instead of one (the backward's five GEMMs read their B operands from shared memory, which bounds
// it before the tensor cores do); the queries then go in sub-tiles of 16 so that Pᵀ and dPᵀ for
// both m-tiles fit beside the accumulators.
template <int D, int MT = 1>
__device__ void bwd(float* dq_acc, bf16* dk, bf16* dv, const bf16* dout, const float* lse, const float* delta,
                    const bf16* q, const bf16* k, const bf16* v, int q_len, int kv_len, int kv_stride, int q_pos0,
                    int n_head, int n_kv_head, float scale) {
    // Query tiles in flight: two at head_dim 32 and 64; one at 128, where a second would cost a
    // block per SM (the one buffer is refilled during the dQ phase, which no longer reads it).
    constexpr int STAGES = D <= 64 ? 2 : 1;
    constexpr int KB = 64 * MT;  // keys per block
    constexpr int KS = D + 8, SS = BR + 8, TILE = BR * KS;
    DYNAMIC_SHARED(unsigned char, smem);
    bf16* Ks = reinterpret_cast<bf16*>(smem);
    bf16* Vs = Ks + KB * KS;
    bf16* QO = Vs + KB * KS;                   // per stage: Q tile, then dO tile
    bf16* dSs = QO + STAGES * 2 * TILE;        // dSᵀ: [keys][queries]
    float* stats = reinterpret_cast<float*>(dSs + KB * SS);  // per stage: lse[BR], then delta[BR]

    // The grid is (KV head, batch, key block): key block 0, seen by every query, launches first.
    const int hk = blockIdx.x, b = blockIdx.y, kb = blockIdx.z;
    const int group = n_head / n_kv_head;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const long qs = (long)n_head * D, ks = (long)n_kv_head * D;
    const int j0 = kb * KB;
    int klo[MT], khi[MT];  // this warp's key rows within the tile, per m-tile
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        klo[mt] = (warp * MT + mt) * 16 + g;
        khi[mt] = klo[mt] + 8;
    }
    load_tile_async<D>(Ks, k + ((long)b * kv_stride + j0) * ks + (long)hk * D, ks, KB, kv_len - j0);
    load_tile_async<D>(Vs, v + ((long)b * kv_stride + j0) * ks + (long)hk * D, ks, KB, kv_len - j0);

    // The (head, query tile) pairs this block visits, in order; queries before this block's first
    // key cannot see it.
    const int first_tile = max(0, j0 - q_pos0) / BR;
    const int per_head = max(0, (q_len + BR - 1) / BR - first_tile);
    const int tiles = group * per_head;
    auto head_of = [&](int t) { return hk * group + t / per_head; };
    auto row_of = [&](int t) { return (first_tile + t % per_head) * BR; };
    auto issue = [&](int t) {
        const int h = head_of(t), i0 = row_of(t), st = t % STAGES;
        bf16* Qs = QO + st * 2 * TILE;
        load_tile_async<D>(Qs, q + ((long)b * q_len + i0) * qs + (long)h * D, qs, BR, q_len - i0);
        load_tile_async<D>(Qs + TILE, dout + ((long)b * q_len + i0) * qs + (long)h * D, qs, BR, q_len - i0);
        float* lse_s = stats + st * 2 * BR;
        for (int r = threadIdx.x; r < BR; r += blockDim.x) {
            const long at = ((long)b * n_head + h) * q_len + i0 + r;
            if (i0 + r < q_len) {
                cp_async4(lse_s + r, lse + at);
                cp_async4(lse_s + BR + r, delta + at);
            } else {
                lse_s[r] = INFINITY;  // padding rows get probability 0
                lse_s[BR + r] = 0.0f;
            }
        }
    };
    if (tiles > 0) issue(0);
    cp_async_commit();

    // This warp's 16 keys of K and V as A fragments, for K·Qᵀ and V·dOᵀ: the same for every query
    // tile, so at head_dim 32 and 64 they stay in registers (16 and 32 of them) instead of being
    // re-read from shared memory per tile; at 128 that would be 64 registers the kernel does not have.
    constexpr bool HOIST = D <= 64;
    // dSᵀ goes to shared memory as the bf16 pairs packed for dK's mma, one 4-byte store per pair
    // (15 fewer instructions per trip at head_dim 64), except at head_dim 128, where ptxas did
    // worse with it (4 to 11 instructions more per trip).
    constexpr bool PACKED_DS = D <= 64;
    constexpr int QH = D == 128 ? 2 : MT == 2 ? 4 : 1, QB = BR / QH;
    auto kv_frags = [&](unsigned ka[4], unsigned va[4], int mt, int kk) {
        const int c = kk * 16 + 2 * tq, lo = klo[mt], hi = khi[mt];
        ka[0] = pair(Ks + lo * KS + c);
        ka[1] = pair(Ks + hi * KS + c);
        ka[2] = pair(Ks + lo * KS + c + 8);
        ka[3] = pair(Ks + hi * KS + c + 8);
        va[0] = pair(Vs + lo * KS + c);
        va[1] = pair(Vs + hi * KS + c);
        va[2] = pair(Vs + lo * KS + c + 8);
        va[3] = pair(Vs + hi * KS + c + 8);
    };
    unsigned kf[MT][HOIST ? D / 16 : 1][4], vf[MT][HOIST ? D / 16 : 1][4];

    float dK[MT][D / 8][4], dV[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < D / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) dK[mt][i][e] = dV[mt][i][e] = 0.0f;
    const float sl2 = scale * LOG2E;

    for (int t = 0; t < tiles; ++t) {
        cp_async_wait_all();
        // Tile t is in shared memory for every thread; every warp is done with tile t-1 (its dSᵀ
        // and, with two stages, the buffer tile t+1 goes into).
        __syncthreads();
        if (STAGES == 2 && t + 1 < tiles) {
            issue(t + 1);
            cp_async_commit();
        }
        if constexpr (HOIST) {
            if (t == 0) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int kk = 0; kk < D / 16; ++kk) kv_frags(kf[mt][kk], vf[mt][kk], mt, kk);
            }
        }
        const int h = head_of(t), i0 = row_of(t), st = t % STAGES;
        const bf16* Qs = QO + st * 2 * TILE;
        const bf16* Os = Qs + TILE;  // dO
        const float* lse_s = stats + st * 2 * BR;
        const float* dlt = lse_s + BR;

        // The tile's queries in QH sub-tiles of QB (one at head_dim 32 and 64; two halves at 128,
        // where Pᵀ and dPᵀ for all 64 queries beside the dK/dV accumulators would pass 255
        // registers and spill). Each sub-tile adds its share to dK and dV and stores its columns of
        // dSᵀ; the dQ phase below reads the whole tile's dSᵀ as before.
#pragma unroll 1
        for (int qh = 0; qh < QH; ++qh) {
            const int q0 = qh * QB;  // the sub-tile's first query within the tile
            // Sᵀ = K·Qᵀ for this warp's 16·MT keys × QB queries, then Pᵀ.
            float p[MT][QB / 8][4], dp[MT][QB / 8][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < QB / 8; ++nt) {
                    p[mt][nt][0] = p[mt][nt][1] = p[mt][nt][2] = p[mt][nt][3] = 0.0f;
                    dp[mt][nt][0] = dp[mt][nt][1] = dp[mt][nt][2] = dp[mt][nt][3] = 0.0f;
                }
#pragma unroll
            for (int kk = 0; kk < D / 16; kk += 2) {
                unsigned ka[MT][2][4], va[MT][2][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h2 = 0; h2 < 2; ++h2) {
                        if constexpr (HOIST) {
#pragma unroll
                            for (int r = 0; r < 4; ++r) {
                                ka[mt][h2][r] = kf[mt][kk + h2][r];
                                va[mt][h2][r] = vf[mt][kk + h2][r];
                            }
                        } else {
                            kv_frags(ka[mt][h2], va[mt][h2], mt, kk + h2);
                        }
                    }
#pragma unroll
                for (int nt = 0; nt < QB / 8; ++nt) {
                    unsigned bq[4], bo[4];
                    b_frags_nk(bq, Qs + (q0 + nt * 8) * KS + kk * 16, KS, lane);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816(p[mt][nt], ka[mt][0], bq[0], bq[1]);
                        mma16816(p[mt][nt], ka[mt][1], bq[2], bq[3]);
                    }
                    b_frags_nk(bo, Os + (q0 + nt * 8) * KS + kk * 16, KS, lane);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816(dp[mt][nt], va[mt][0], bo[0], bo[1]);  // dPᵀ = V·dOᵀ
                        mma16816(dp[mt][nt], va[mt][1], bo[2], bo[3]);
                    }
                }
            }
            // Only sub-tiles where one of this warp's keys lies past the first query, or past the
            // keys, need the mask (padding queries are zeroed by their infinite logsumexp either way).
            const int wk0 = j0 + warp * 16 * MT;  // this warp's first key
            const bool edge = wk0 + 16 * MT - 1 > q_pos0 + i0 + q0 || wk0 + 16 * MT > kv_len;
            // Pᵀ, then dSᵀ = Pᵀ ∘ (dPᵀ − delta), in one pass. The two calls below inline into two
            // copies, so tiles off the diagonal issue none of the mask's compares (if-converted
            // into the one pass they would).
            auto probs = [&](bool masked) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < QB / 8; ++nt) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int qi = q0 + nt * 8 + 2 * tq + (e & 1);
                            float pr = exp2_ftz(fmaf(p[mt][nt][e], sl2, -lse_s[qi] * LOG2E));
                            if (masked) {
                                const int key = j0 + (e < 2 ? klo[mt] : khi[mt]);
                                if (key > q_pos0 + i0 + qi || key >= kv_len) pr = 0.0f;
                            }
                            p[mt][nt][e] = pr;
                            dp[mt][nt][e] = pr * (dp[mt][nt][e] - dlt[qi]);
                        }
                    }
            };
            if (edge) {
                probs(true);
            } else {
                probs(false);
            }
            // dV += Pᵀ·dO and dK += dSᵀ·Q (scaled at the end): Pᵀ and dSᵀ as A fragments.
#pragma unroll
            for (int kk = 0; kk < QB / 16; ++kk) {
                unsigned pa[MT][4], sa[MT][4];
                const int r0 = q0 + kk * 16;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const auto& pm = p[mt];
                    const auto& dm = dp[mt];
                    pa[mt][0] = pack(pm[2 * kk][0], pm[2 * kk][1]);
                    pa[mt][1] = pack(pm[2 * kk][2], pm[2 * kk][3]);
                    pa[mt][2] = pack(pm[2 * kk + 1][0], pm[2 * kk + 1][1]);
                    pa[mt][3] = pack(pm[2 * kk + 1][2], pm[2 * kk + 1][3]);
                    sa[mt][0] = pack(dm[2 * kk][0], dm[2 * kk][1]);
                    sa[mt][1] = pack(dm[2 * kk][2], dm[2 * kk][3]);
                    sa[mt][2] = pack(dm[2 * kk + 1][0], dm[2 * kk + 1][1]);
                    sa[mt][3] = pack(dm[2 * kk + 1][2], dm[2 * kk + 1][3]);
                    if constexpr (PACKED_DS) {
                        // dSᵀ to shared memory for the dQ phase below, as the pairs just packed:
                        // each is one key row's two adjacent queries, one 4-byte store
                        // (conflict-free: the eight rows of a warp's stores start 4 banks apart).
                        auto put = [&](int key, int qi, unsigned v) {
                            *reinterpret_cast<unsigned*>(dSs + key * SS + qi) = v;
                        };
                        put(klo[mt], r0 + 2 * tq, sa[mt][0]);
                        put(khi[mt], r0 + 2 * tq, sa[mt][1]);
                        put(klo[mt], r0 + 8 + 2 * tq, sa[mt][2]);
                        put(khi[mt], r0 + 8 + 2 * tq, sa[mt][3]);
                    }
                }
#pragma unroll
                for (int nt = 0; nt < D / 8; nt += 2) {
                    unsigned bo[4], bq[4];
                    b_frags_kn(bo, Os + r0 * KS + nt * 8, KS, lane);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816(dV[mt][nt], pa[mt], bo[0], bo[1]);
                        mma16816(dV[mt][nt + 1], pa[mt], bo[2], bo[3]);
                    }
                    b_frags_kn(bq, Qs + r0 * KS + nt * 8, KS, lane);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816(dK[mt][nt], sa[mt], bq[0], bq[1]);
                        mma16816(dK[mt][nt + 1], sa[mt], bq[2], bq[3]);
                    }
                }
            }
            if constexpr (!PACKED_DS) {
                // dSᵀ one value at a time (see PACKED_DS).
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < QB / 8; ++nt) {
                        const int qi = q0 + nt * 8 + 2 * tq;
                        dSs[klo[mt] * SS + qi] = __float2bfloat16_rn(dp[mt][nt][0]);
                        dSs[klo[mt] * SS + qi + 1] = __float2bfloat16_rn(dp[mt][nt][1]);
                        dSs[khi[mt] * SS + qi] = __float2bfloat16_rn(dp[mt][nt][2]);
                        dSs[khi[mt] * SS + qi + 1] = __float2bfloat16_rn(dp[mt][nt][3]);
                    }
            }
        }
        __syncthreads();  // dSᵀ is complete, and Q, dO and the row statistics are no longer read
        if (STAGES == 1 && t + 1 < tiles) {
            issue(t + 1);
            cp_async_commit();
        }
        // dQ += dS·K over the block's keys, accumulated in f32 in global memory. Unless the tile is
        // split 2 × 2 (head_dim 64, below), this warp takes 16 queries × every column. (The two
        // paths write their additions and dS loads separately: sharing one helper cost the
        // two-m-tile build 36 instructions per trip in ptxas's schedule.)
        const int qlo = warp * 16 + g, qhi = qlo + 8;
        auto dq_add = [&](int nt, const float acc[4]) {
            const int col = nt * 8 + 2 * tq;
            if (i0 + qlo < q_len)
                red_add2(dq_acc + ((long)b * q_len + i0 + qlo) * qs + (long)h * D + col, acc[0] * scale,
                         acc[1] * scale);
            if (i0 + qhi < q_len)
                red_add2(dq_acc + ((long)b * q_len + i0 + qhi) * qs + (long)h * D + col, acc[2] * scale,
                         acc[3] * scale);
        };
        if constexpr (D == 64) {
            // At head_dim 64 the warps split the tile as 2 query halves × 2 column halves: each
            // takes 32 queries (two m-tiles) × 32 columns over the block's keys, keys outermost,
            // so each dS and K fragment it reads feeds two mma.sync (16 ldmatrix per 64 keys, not 20).
            constexpr int CW = D / 2;  // columns per warp
            const int qb0 = (warp & 1) * 32, cb = (warp >> 1) * CW;
            float acc[2][CW / 8][4];
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int j = 0; j < CW / 8; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KB / 16; ++kk) {
                unsigned a[2][4];
                const int mj = lane >> 3, mi = lane & 7;
#pragma unroll
                for (int m = 0; m < 2; ++m)
                    ldsm_x4_trans(a[m], dSs + (kk * 16 + (mj >> 1) * 8 + mi) * SS + qb0 + m * 16 + (mj & 1) * 8);
#pragma unroll
                for (int j = 0; j < CW / 8; j += 2) {
                    unsigned bk[4];
                    b_frags_kn(bk, Ks + kk * 16 * KS + cb + j * 8, KS, lane);
#pragma unroll
                    for (int m = 0; m < 2; ++m) {
                        mma16816(acc[m][j], a[m], bk[0], bk[1]);
                        mma16816(acc[m][j + 1], a[m], bk[2], bk[3]);
                    }
                }
            }
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                const int lo = qb0 + m * 16 + g, hi = lo + 8;
#pragma unroll
                for (int j = 0; j < CW / 8; ++j) {
                    const int col = cb + j * 8 + 2 * tq;
                    if (i0 + lo < q_len)
                        red_add2(dq_acc + ((long)b * q_len + i0 + lo) * qs + (long)h * D + col, acc[m][j][0] * scale,
                                 acc[m][j][1] * scale);
                    if (i0 + hi < q_len)
                        red_add2(dq_acc + ((long)b * q_len + i0 + hi) * qs + (long)h * D + col, acc[m][j][2] * scale,
                                 acc[m][j][3] * scale);
                }
            }
            continue;
        }
        // dS as A fragments, straight from the stored dSᵀ by a transposing load: matrices (keys
        // c..c+7 | c+8..c+15) × (queries qlo-row block | +8), in the A register order.
        unsigned da[KB / 16][4];
#pragma unroll
        for (int kk = 0; kk < KB / 16; ++kk) {
            const int mj = lane >> 3, mi = lane & 7;
            ldsm_x4_trans(da[kk], dSs + (kk * 16 + (mj >> 1) * 8 + mi) * SS + warp * 16 + (mj & 1) * 8);
        }
#pragma unroll
        for (int nt = 0; nt < D / 8; nt += 2) {
            float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
            for (int kk = 0; kk < KB / 16; ++kk) {
                unsigned bk[4];
                b_frags_kn(bk, Ks + kk * 16 * KS + nt * 8, KS, lane);
                mma16816(acc[0], da[kk], bk[0], bk[1]);
                mma16816(acc[1], da[kk], bk[2], bk[3]);
            }
            dq_add(nt, acc[0]);
            dq_add(nt + 1, acc[1]);
        }
    }
    cp_async_wait_all();  // a block with no query tile still has its K/V copies in flight
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int key = j0 + (half ? khi[mt] : klo[mt]);
            if (key >= kv_len) continue;
            const long at = ((long)b * kv_stride + key) * ks + (long)hk * D;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                const int col = nt * 8 + 2 * tq;
                const float* kr = dK[mt][nt];
                const float* vr = dV[mt][nt];
                *reinterpret_cast<unsigned*>(dk + at + col) = pack(kr[2 * half] * scale, kr[2 * half + 1] * scale);
                *reinterpret_cast<unsigned*>(dv + at + col) = pack(vr[2 * half], vr[2 * half + 1]);
            }
        }
}

}  // namespace

// Dynamic shared memory (src/backend/cuda/flash_attn.rs computes the same and raises the limit):
// forward, two stages of K and V tiles: D=32 20,480 bytes, D=64 36,864, D=128 69,632;
// backward, K and V, Q and dO per stage, dSᵀ, lse and delta per stage:
// D=32 (2 stages) 10,240 + 20,480 + 9,216 + 1,024 = 40,960 bytes;
// D=64 (2 stages) 18,432 + 36,864 + 9,216 + 1,024 = 65,536 bytes;
// D=128 (1 stage) 34,816 + 34,816 + 9,216 + 512 = 79,360 bytes;
// D=64 with two m-tiles per warp (128 keys, 2 stages) 36,864 + 36,864 + 18,432 + 1,024 = 93,184 bytes.
// At D=32 a padded row is 80 bytes: the 8 rows an ldmatrix reads start 20 words apart, which
// covers all 32 banks once, as the 144- and 272-byte rows of 64 and 128 do.
// Other builds (more blocks per SM, 8-warp blocks), never measured on a card, were removed;
// docs/cuda.md says which commit still has them.

// head_dim 32, for small models such as the bundled demo.
extern "C" __global__ void __launch_bounds__(128) flash_attn_fwd_d32(bf16* out, float* lse, const bf16* q,
    const bf16* k, const bf16* v, int q_len, int kv_len, int kv_stride, int q_pos0, int n_head, int n_kv_head,
    float scale) {
    fwd<32>(out, lse, q, k, v, q_len, kv_len, kv_stride, q_pos0, n_head, n_kv_head, scale);
}

// ptxas gives this build 99 registers (sm_90), so 4 blocks share an SM. (Held to 128 by
// __launch_bounds__(128, 4) it spills 24 bytes instead: ptxas schedules differently under a bound.)
extern "C" __global__ void __launch_bounds__(128) flash_attn_fwd_d64(bf16* out, float* lse, const bf16* q,
    const bf16* k, const bf16* v, int q_len, int kv_len, int kv_stride, int q_pos0, int n_head, int n_kv_head,
    float scale) {
    fwd<64>(out, lse, q, k, v, q_len, kv_len, kv_stride, q_pos0, n_head, n_kv_head, scale);
}
// The head_dim 64 forward with two m-tiles per warp (128 queries per block, 254 registers, 2 blocks
// per SM): each K/V fragment read from shared memory feeds two mma.sync, so a trip reads 0.25
// ldmatrix per mma.sync where the build above reads 0.5, and issues 4.70 instructions per mma.sync
// against 5.33 (scripts/kernel-sass.sh). FA2's own kernels give each warp 32 or more rows.
extern "C" __global__ void __launch_bounds__(128, 2) flash_attn_fwd_d64_2mt(bf16* out, float* lse, const bf16* q,
    const bf16* k, const bf16* v, int q_len, int kv_len, int kv_stride, int q_pos0, int n_head, int n_kv_head,
    float scale) {
    fwd<64, 2>(out, lse, q, k, v, q_len, kv_len, kv_stride, q_pos0, n_head, n_kv_head, scale);
}
extern "C" __global__ void __launch_bounds__(128) flash_attn_fwd_d128(bf16* out, float* lse, const bf16* q,
    const bf16* k, const bf16* v, int q_len, int kv_len, int kv_stride, int q_pos0, int n_head, int n_kv_head,
    float scale) {
    fwd<128>(out, lse, q, k, v, q_len, kv_len, kv_stride, q_pos0, n_head, n_kv_head, scale);
}

// delta[b, h, i] = Σ_d dO·O, one warp per query row and head.
extern "C" __global__ void flash_attn_bwd_delta(float* delta, const bf16* dout, const bf16* out, int rows_total,
                                                int q_len, int n_head, int head_dim) {
    const long w = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= rows_total) return;  // rows_total = batch · q_len · n_head, ordered like q
    const long base = w * head_dim;
    float acc = 0.0f;
    // Pairs (head_dim is even): one 4-byte load per lane and tensor covers 64 values.
    for (int d = 2 * lane; d < head_dim; d += 64) {
        const __nv_bfloat162 g = *reinterpret_cast<const __nv_bfloat162*>(dout + base + d);
        const __nv_bfloat162 o = *reinterpret_cast<const __nv_bfloat162*>(out + base + d);
        acc += to_f32(g.x) * to_f32(o.x) + to_f32(g.y) * to_f32(o.y);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        const long h = w % n_head, bi = w / n_head, i = bi % q_len, b = bi / q_len;
        delta[(b * n_head + h) * q_len + i] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(128) flash_attn_bwd_d32(float* dq_acc, bf16* dk, bf16* dv,
    const bf16* dout, const float* lse, const float* delta, const bf16* q, const bf16* k, const bf16* v, int q_len,
    int kv_len, int kv_stride, int q_pos0, int n_head, int n_kv_head, float scale) {
    bwd<32>(dq_acc, dk, dv, dout, lse, delta, q, k, v, q_len, kv_len, kv_stride, q_pos0, n_head, n_kv_head, scale);
}
extern "C" __global__ void __launch_bounds__(128) flash_attn_bwd_d64(float* dq_acc, bf16* dk, bf16* dv,
    const bf16* dout, const float* lse, const float* delta, const bf16* q, const bf16* k, const bf16* v, int q_len,
    int kv_len, int kv_stride, int q_pos0, int n_head, int n_kv_head, float scale) {
    bwd<64>(dq_acc, dk, dv, dout, lse, delta, q, k, v, q_len, kv_len, kv_stride, q_pos0, n_head, n_kv_head, scale);
}
// The head_dim 64 backward with two 16-key m-tiles per warp: 128 keys per block, 2 blocks per SM
// where their shared memory fits (H100/H200, not A100). Each Q/dO fragment a warp reads from shared
// memory feeds two mma.sync, as does each dS and K fragment of its dQ phase (2 query halves × 2
// column halves), so a tile costs 96 ldmatrix per 320 mma.sync where the build above needs 80 per
// 160 (scripts/kernel-sass.sh): 0.30 per mma.sync against 0.50; ptxas: 255 registers, no spill.
extern "C" __global__ void __launch_bounds__(128, 2) flash_attn_bwd_d64_2mt(float* dq_acc, bf16* dk, bf16* dv,
    const bf16* dout, const float* lse, const float* delta, const bf16* q, const bf16* k, const bf16* v, int q_len,
    int kv_len, int kv_stride, int q_pos0, int n_head, int n_kv_head, float scale) {
    bwd<64, 2>(dq_acc, dk, dv, dout, lse, delta, q, k, v, q_len, kv_len, kv_stride, q_pos0, n_head, n_kv_head,
               scale);
}
extern "C" __global__ void __launch_bounds__(128) flash_attn_bwd_d128(float* dq_acc, bf16* dk, bf16* dv,
    const bf16* dout, const float* lse, const float* delta, const bf16* q, const bf16* k, const bf16* v, int q_len,
    int kv_len, int kv_stride, int q_pos0, int n_head, int n_kv_head, float scale) {
    bwd<128>(dq_acc, dk, dv, dout, lse, delta, q, k, v, q_len, kv_len, kv_stride, q_pos0, n_head, n_kv_head, scale);
}
