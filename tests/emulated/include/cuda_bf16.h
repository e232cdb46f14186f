// Stands in for CUDA's cuda_bf16.h when kernels/*.cu are compiled by g++ with -DKILN_CPU_EMULATION
// (tests/kernels_emulated.rs): the kernels' own source runs on the CPU, every CUDA thread of a block
// a host thread, so their logic (indexing, masking, fragment layouts, reductions, barriers) is tested
// on machines without a GPU. It does not model timing, register pressure or fast-math rounding
// (__expf here is exact).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
// Blocks run one after another, so a function-local static is exactly one block's shared array.
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct EmulatedDim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmulatedDim3 threadIdx, blockIdx;
inline EmulatedDim3 blockDim, gridDim;

struct __nv_bfloat16 {
    uint16_t bits;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if (std::isnan(f)) {
        r.bits = 0x7fc0;
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    r.bits = (uint16_t)(u >> 16);
    return r;
}
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }

struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
struct float4 {
    float x, y, z, w;
};

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }

// ---- one block at a time, one host thread per CUDA thread ----
struct EmulatedBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warp;
    double exchange[32][32];           // shuffles: [warp][lane]
    unsigned mma_a[32][32][4], mma_b[32][32][2];  // mma operands: [warp][lane][register]
    const __nv_bfloat16* ldsm_rows[32][32];      // ldmatrix row addresses: [warp][lane]
};
inline EmulatedBlock* emulated_block;
alignas(16) inline unsigned char emulated_smem[256 * 1024];
inline unsigned char* emulated_dynamic_smem() { return emulated_smem; }

inline void __syncthreads() { emulated_block->block->arrive_and_wait(); }
inline void emulated_warp_sync() { emulated_block->warp[threadIdx.x >> 5]->arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T x, int o) {
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    emulated_block->exchange[w][l] = (double)x;
    emulated_warp_sync();
    T r = (T)emulated_block->exchange[w][l ^ o];
    emulated_warp_sync();
    return r;
}

// mma.sync.m16n8k16.row.col f32.bf16.bf16.f32 from the PTX ISA's fragment layout: with g = lane / 4
// and t = lane % 4, A register r holds row g + 8·(r & 1), columns 2t + 8·(r >> 1) and +1; B register
// r holds rows 2t + 8·r and +1 of column g; C element e is row g + 8·(e >> 1), column 2t + (e & 1).
inline void emulated_mma16816(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
    EmulatedBlock& blk = *emulated_block;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = 0; i < 4; ++i) blk.mma_a[w][lane][i] = a[i];
    blk.mma_b[w][lane][0] = b0;
    blk.mma_b[w][lane][1] = b1;
    emulated_warp_sync();
    auto half = [](unsigned r, int hi) {
        __nv_bfloat16 b;
        b.bits = (uint16_t)(hi ? r >> 16 : r & 0xffff);
        return __bfloat162float(b);
    };
    auto a_at = [&](int r, int k) {
        int ln = (r % 8) * 4 + (k % 8) / 2, reg = (r >= 8) + 2 * (k >= 8);
        return half(blk.mma_a[w][ln][reg], k & 1);
    };
    auto b_at = [&](int k, int n) {
        int ln = n * 4 + (k % 8) / 2, reg = (k >= 8);
        return half(blk.mma_b[w][ln][reg], k & 1);
    };
    const int g = lane >> 2, t = lane & 3;
    float out[4];
    for (int e = 0; e < 4; ++e) {
        int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        double acc = 0;
        for (int k = 0; k < 16; ++k) acc += (double)a_at(row, k) * b_at(k, col);
        out[e] = c[e] + (float)acc;
    }
    emulated_warp_sync();  // every lane has read the operands before any lane writes new ones
    for (int e = 0; e < 4; ++e) c[e] = out[e];
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lane 8j + i gives the address of row i of 8×8
// matrix j; register j of lane l receives matrix j's row l/4, columns 2·(l%4) and +1, or with
// .trans its rows 2·(l%4) and +1 of column l/4 (low half first).
inline void emulated_ldmatrix_x4(unsigned r[4], const __nv_bfloat16* p, bool trans) {
    EmulatedBlock& blk = *emulated_block;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    blk.ldsm_rows[w][lane] = p;
    emulated_warp_sync();
    for (int j = 0; j < 4; ++j) {
        __nv_bfloat16 lo, hi;
        if (!trans) {
            const __nv_bfloat16* row = blk.ldsm_rows[w][8 * j + lane / 4];
            lo = row[2 * (lane % 4)];
            hi = row[2 * (lane % 4) + 1];
        } else {
            lo = blk.ldsm_rows[w][8 * j + 2 * (lane % 4)][lane / 4];
            hi = blk.ldsm_rows[w][8 * j + 2 * (lane % 4) + 1][lane / 4];
        }
        r[j] = (unsigned)lo.bits | ((unsigned)hi.bits << 16);
    }
    emulated_warp_sync();
}

// cp.async (global → shared, sm_80), in one of two modes that between them bracket the hardware:
// deferred (the default), where a thread's copies land only at its wait, so a kernel that reads a
// tile before waiting for it sees the buffer's old contents (the previous tile, or the NaN
// poison); and eager, where they land at once, so a kernel that refills a buffer other warps are
// still reading corrupts their tile. Either mistake then fails a test instead of passing by luck.
inline bool emulated_cp_async_eager = false;
struct EmulatedCopy {
    void* dst;
    const void* src;
    int bytes;
    bool valid;  // false: zero-fill, nothing read (src-size 0)
};
inline thread_local std::vector<EmulatedCopy> emulated_uncommitted;
inline thread_local std::vector<EmulatedCopy> emulated_committed;
inline void emulated_cp_async(void* dst, const void* src, int bytes, bool valid) {
    if (emulated_cp_async_eager) {
        if (valid)
            std::memcpy(dst, src, bytes);
        else
            std::memset(dst, 0, bytes);
        return;
    }
    emulated_uncommitted.push_back({dst, src, bytes, valid});
}
inline void emulated_cp_async_commit() {
    emulated_committed.insert(emulated_committed.end(), emulated_uncommitted.begin(), emulated_uncommitted.end());
    emulated_uncommitted.clear();
}
// cp.async.wait_group 0: every committed group has landed (uncommitted copies have not).
inline void emulated_cp_async_wait_all() {
    for (const EmulatedCopy& c : emulated_committed) {
        if (c.valid)
            std::memcpy(c.dst, c.src, c.bytes);
        else
            std::memset(c.dst, 0, c.bytes);
    }
    emulated_committed.clear();
}

// Runs `body` for every block of `grid`, each with `block.x` threads. Shared memory starts as NaN
// (0xFF bytes in bf16 and f32 alike), so a read of a slot nothing wrote shows in the results. With
// `dynamic_smem` (the launcher's shared_mem_bytes) the bytes past it must still be untouched when
// the block ends: a kernel indexing beyond what its launcher reserves aborts.
inline void emulated_launch(EmulatedDim3 grid, EmulatedDim3 block, const std::function<void()>& body,
                            size_t dynamic_smem = 0) {
    constexpr size_t GUARD = 4096;
    if (dynamic_smem + GUARD > sizeof emulated_smem) {
        std::fprintf(stderr, "emulated_launch: %zu bytes of dynamic shared memory do not fit\n", dynamic_smem);
        std::abort();
    }
    gridDim = grid;
    blockDim = block;
    const int nt = block.x;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                EmulatedBlock ctx;
                ctx.block = std::make_unique<std::barrier<>>(nt);
                for (int w = 0; w < (nt + 31) / 32; ++w)
                    ctx.warp.push_back(std::make_unique<std::barrier<>>(std::min(32, nt - 32 * w)));
                emulated_block = &ctx;
                std::memset(emulated_smem, 0xFF, sizeof emulated_smem);
                std::vector<std::thread> threads;
                for (int t = 0; t < nt; ++t)
                    threads.emplace_back([&, t] {
                        threadIdx.x = t;
                        blockIdx.x = bx;
                        blockIdx.y = by;
                        blockIdx.z = bz;
                        body();
                        if (!emulated_committed.empty() || !emulated_uncommitted.empty()) {
                            std::fprintf(stderr, "block (%u,%u,%u) thread %d exited with cp.async copies not waited for\n",
                                         bx, by, bz, t);
                            std::abort();
                        }
                        ctx.block->arrive_and_drop();
                        ctx.warp[t >> 5]->arrive_and_drop();
                    });
                for (auto& th : threads) th.join();
                if (dynamic_smem)
                    for (size_t i = dynamic_smem; i < dynamic_smem + GUARD; ++i)
                        if (emulated_smem[i] != 0xFF) {
                            std::fprintf(stderr, "block (%u,%u,%u) wrote shared memory byte %zu, past the %zu reserved\n",
                                         bx, by, bz, i, dynamic_smem);
                            std::abort();
                        }
            }
}
