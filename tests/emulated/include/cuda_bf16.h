// Stands in for CUDA's cuda_bf16.h when kernels/*.cu are compiled by g++ with -DKILN_CPU_EMULATION
// (tests/kernels_emulated.rs, and the CPU stand-in for the CUDA libraries in tests/emulated/fake_cuda.cpp):
// the kernels' own source runs on the CPU, every CUDA thread of a block a fiber (a stack of its own
// on the calling host thread), so their logic (indexing, masking, fragment layouts, reductions,
// barriers) is tested on machines without a GPU. It does not model timing, register pressure or
// fast-math rounding (__expf here is exact).
//
// Fibers rather than host threads: a host thread per CUDA thread cost 14 ms per 256-thread block
// here (creation and joins), minutes for a launch of thousands of blocks; and the fibers' schedule is
// deterministic and adversarial. Each thread runs until it must wait
// (a barrier, a shuffle, an mma), in thread order, so a thread that reads shared memory other threads
// have not yet written sees the NaN poison, and one that runs ahead to refill a buffer overwrites it
// before the others have read it: both missing-__syncthreads hazards fail every run, not by chance.
// Threads that wait on each other forever (a shuffle in divergent code whose other lanes wait at a
// __syncthreads, say) abort with the block's index instead of hanging. A thread that ends drops out
// of the barriers, as on the hardware.
#pragma once
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <ucontext.h>
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
// Plain globals: one block runs at a time, one of its threads at a time (a thread_local would cost a
// __tls_get_addr call per use in the shared library of tests/emulated/fake_cuda.cpp).
inline EmulatedDim3 threadIdx, blockIdx;
inline EmulatedDim3 blockDim, gridDim;

struct __nv_bfloat16 {
    uint16_t bits;
};
// The vector types carry CUDA's alignments (cuda_bf16.h's __align__(4), vector_types.h's 16), so a
// kernel that reads one through a misaligned pointer, which a GPU answers with a misaligned-address
// fault that ends the context, fails here too: the emulator's programs are built with
// -fsanitize=alignment, which checks every typed access against its type's alignment.
struct alignas(4) __nv_bfloat162 {
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

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
struct alignas(16) float4 {
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

// ---- one block at a time, every CUDA thread a fiber ----
struct EmulatedCopy {
    void* dst;
    const void* src;
    int bytes;
    bool valid;  // false: zero-fill, nothing read (src-size 0)
};
// Switching between fibers. On x86-64 a few instructions that keep the callee-saved registers, which
// is all a call must preserve here (the kernels never change the floating-point control registers):
// glibc's swapcontext also saves the signal mask with a system call each time, which made it most of
// the emulator's run time. Elsewhere, ucontext.
#if defined(__x86_64__)
struct EmulatedContext {
    void* sp = nullptr;
};
extern "C" void kiln_fiber_switch(void** save_sp, void* next_sp);
__asm__(
    ".text\n"
    ".weak kiln_fiber_switch\n"
    ".hidden kiln_fiber_switch\n"
    ".type kiln_fiber_switch,@function\n"
    "kiln_fiber_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size kiln_fiber_switch, .-kiln_fiber_switch\n");
// A new fiber's stack as kiln_fiber_switch leaves a suspended one: its registers (zero) and `entry`
// as the return address, aligned as after a call.
inline void emulated_context_init(EmulatedContext& c, char* stack, size_t size, void (*entry)()) {
    uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)top;
    *--sp = 0;                  // entry's own return address: it never returns
    *--sp = (uint64_t)entry;    // where the first switch's ret goes
    for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp, rbx, r12-r15
    c.sp = sp;
}
inline void emulated_context_switch(EmulatedContext& from, EmulatedContext& to) { kiln_fiber_switch(&from.sp, to.sp); }
#else
struct EmulatedContext {
    ucontext_t uc;
};
inline void emulated_context_init(EmulatedContext& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
inline void emulated_context_switch(EmulatedContext& from, EmulatedContext& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct EmulatedFiber {
    EmulatedContext ctx;
    bool done = false;
    unsigned warp_calls = 0;
    std::vector<EmulatedCopy> uncommitted, committed;  // this thread's cp.async groups
};
inline EmulatedContext emulated_scheduler;
inline EmulatedFiber* emulated_current;
inline unsigned long emulated_progress;  // bumped whenever a thread arrives, is released or ends

// A thread that must wait hands control back to the block's scheduler.
inline void emulated_yield() { emulated_context_switch(emulated_current->ctx, emulated_scheduler); }

// std::barrier's contract (arrive and wait; a thread that ends drops out) over fibers.
struct EmulatedBarrier {
    int expected = 0, arrived = 0;
    unsigned long generation = 0;
    void release() {
        arrived = 0;
        ++generation;
        ++emulated_progress;
    }
    void arrive_and_wait() {
        const unsigned long g = generation;
        ++emulated_progress;
        if (++arrived == expected) return release();
        while (generation == g) emulated_yield();
    }
    void drop() {
        --expected;
        if (arrived > 0 && arrived == expected) release();
    }
};

struct EmulatedBlock {
    EmulatedBarrier block;
    EmulatedBarrier warp[32];
    // What the lanes of a warp hand each other, double-buffered by the parity of the warp-wide call
    // (every lane makes the same calls in the same order): call i+1's barrier keeps any lane from
    // reaching call i+2, which reuses call i's buffer, before every lane has read it, so one barrier
    // per call suffices.
    double exchange[2][32][32];                      // shuffles: [parity][warp][lane]
    unsigned mma_a[2][32][32][4], mma_b[2][32][32][2];  // mma operands: [parity][warp][lane][register]
    const __nv_bfloat16* ldsm_rows[2][32][32];      // ldmatrix row addresses: [parity][warp][lane]
};
inline EmulatedBlock* emulated_block;
// 128-byte aligned, as a block's shared window is, so an address's bank here is its bank there.
alignas(128) inline unsigned char emulated_smem[256 * 1024];
inline unsigned char* emulated_dynamic_smem() { return emulated_smem; }

// What the PTX instructions behind the kernels' inline assembly require of their addresses
// (ldmatrix's row addresses 16 bytes, cp.async's both ends its copy size, red.v2.f32 8 bytes): a
// GPU faults on anything less, so the emulator aborts, naming the thread, the instruction and the
// address, where plain C++ would have read the bytes anyway.
inline void emulated_require_aligned(const void* p, size_t bytes, const char* what) {
    if ((uintptr_t)p % bytes == 0) return;
    std::fprintf(stderr, "block (%u,%u,%u) thread %u: misaligned address %p for %s (needs %zu bytes)\n", blockIdx.x,
                 blockIdx.y, blockIdx.z, threadIdx.x, p, what, bytes);
    std::abort();
}

inline void __syncthreads() { emulated_block->block.arrive_and_wait(); }
inline void emulated_warp_sync() { emulated_block->warp[threadIdx.x >> 5].arrive_and_wait(); }
// The parity of this thread's next warp-wide call (see EmulatedBlock).
inline int emulated_warp_call() { return emulated_current->warp_calls++ & 1; }

template <typename T>
inline T __shfl_xor_sync(unsigned, T x, int o) {
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31, p = emulated_warp_call();
    emulated_block->exchange[p][w][l] = (double)x;
    emulated_warp_sync();
    return (T)emulated_block->exchange[p][w][l ^ o];
}

// mma.sync.m16n8k16.row.col f32.bf16.bf16.f32 from the PTX ISA's fragment layout: with g = lane / 4
// and t = lane % 4, A register r holds row g + 8·(r & 1), columns 2t + 8·(r >> 1) and +1; B register
// r holds rows 2t + 8·r and +1 of column g; C element e is row g + 8·(e >> 1), column 2t + (e & 1).
inline void emulated_mma16816(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
    EmulatedBlock& blk = *emulated_block;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, p = emulated_warp_call();
    for (int i = 0; i < 4; ++i) blk.mma_a[p][w][lane][i] = a[i];
    blk.mma_b[p][w][lane][0] = b0;
    blk.mma_b[p][w][lane][1] = b1;
    emulated_warp_sync();
    auto half = [](unsigned r, int hi) {
        __nv_bfloat16 b;
        b.bits = (uint16_t)(hi ? r >> 16 : r & 0xffff);
        return __bfloat162float(b);
    };
    auto a_at = [&](int r, int k) {
        int ln = (r % 8) * 4 + (k % 8) / 2, reg = (r >= 8) + 2 * (k >= 8);
        return half(blk.mma_a[p][w][ln][reg], k & 1);
    };
    auto b_at = [&](int k, int n) {
        int ln = n * 4 + (k % 8) / 2, reg = (k >= 8);
        return half(blk.mma_b[p][w][ln][reg], k & 1);
    };
    const int g = lane >> 2, t = lane & 3;
    float out[4];
    for (int e = 0; e < 4; ++e) {
        int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        double acc = 0;
        for (int k = 0; k < 16; ++k) acc += (double)a_at(row, k) * b_at(k, col);
        out[e] = c[e] + (float)acc;
    }
    for (int e = 0; e < 4; ++e) c[e] = out[e];
}

// What ldmatrix costs in shared-memory bandwidth, counted for the tests: an x4 reads its four 8×8
// matrices in four phases of 8 rows of 16 bytes, and a phase takes as many wavefronts as the most
// distinct 4-byte words any one of the 32 banks must deliver: 1 when the rows' banks do not
// collide, up to 8. So 4 wavefronts per instruction is conflict-free.
inline unsigned long emulated_ldsm_count, emulated_ldsm_wavefronts;
inline void emulated_count_ldsm_wavefronts(const __nv_bfloat16* const rows[32]) {
    ++emulated_ldsm_count;
    for (int j = 0; j < 4; ++j) {
        uintptr_t words[32][8];
        int in_bank[32] = {}, most = 0;
        for (int i = 0; i < 8; ++i)
            for (int k = 0; k < 4; ++k) {
                const uintptr_t word = (uintptr_t)rows[8 * j + i] / 4 + k;
                const int bank = (int)(word % 32);
                bool seen = false;
                for (int n = 0; n < in_bank[bank]; ++n) seen |= words[bank][n] == word;
                if (!seen) words[bank][in_bank[bank]++] = word;
                most = in_bank[bank] > most ? in_bank[bank] : most;
            }
        emulated_ldsm_wavefronts += most;
    }
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lane 8j + i gives the address of row i of 8×8
// matrix j; register j of lane l receives matrix j's row l/4, columns 2·(l%4) and +1, or with
// .trans its rows 2·(l%4) and +1 of column l/4 (low half first).
inline void emulated_ldmatrix_x4(unsigned r[4], const __nv_bfloat16* p, bool trans) {
    EmulatedBlock& blk = *emulated_block;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, par = emulated_warp_call();
    emulated_require_aligned(p, 16, "ldmatrix");
    blk.ldsm_rows[par][w][lane] = p;
    emulated_warp_sync();
    if (lane == 0) emulated_count_ldsm_wavefronts(blk.ldsm_rows[par][w]);
    for (int j = 0; j < 4; ++j) {
        __nv_bfloat16 lo, hi;
        if (!trans) {
            const __nv_bfloat16* row = blk.ldsm_rows[par][w][8 * j + lane / 4];
            lo = row[2 * (lane % 4)];
            hi = row[2 * (lane % 4) + 1];
        } else {
            lo = blk.ldsm_rows[par][w][8 * j + 2 * (lane % 4)][lane / 4];
            hi = blk.ldsm_rows[par][w][8 * j + 2 * (lane % 4) + 1][lane / 4];
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
inline void emulated_cp_async(void* dst, const void* src, int bytes, bool valid) {
    emulated_require_aligned(dst, bytes, "cp.async (shared destination)");
    emulated_require_aligned(src, bytes, "cp.async (global source)");
    if (emulated_cp_async_eager) {
        if (valid)
            std::memcpy(dst, src, bytes);
        else
            std::memset(dst, 0, bytes);
        return;
    }
    emulated_current->uncommitted.push_back({dst, src, bytes, valid});
}
inline void emulated_cp_async_commit() {
    EmulatedFiber& f = *emulated_current;
    f.committed.insert(f.committed.end(), f.uncommitted.begin(), f.uncommitted.end());
    f.uncommitted.clear();
}
// cp.async.wait_group 0: every committed group has landed (uncommitted copies have not).
inline void emulated_cp_async_wait_all() {
    for (const EmulatedCopy& c : emulated_current->committed) {
        if (c.valid)
            std::memcpy(c.dst, c.src, c.bytes);
        else
            std::memset(c.dst, 0, c.bytes);
    }
    emulated_current->committed.clear();
}

// The body of the block being run, and the fiber entry point that runs it for one thread.
inline const std::function<void()>* emulated_body;
inline void emulated_fiber_main() {
    (*emulated_body)();
    EmulatedFiber& f = *emulated_current;
    if (!f.committed.empty() || !f.uncommitted.empty()) {
        std::fprintf(stderr, "block (%u,%u,%u) thread %u exited with cp.async copies not waited for\n", blockIdx.x,
                     blockIdx.y, blockIdx.z, threadIdx.x);
        std::abort();
    }
    f.done = true;
    ++emulated_progress;
    emulated_block->block.drop();
    emulated_block->warp[threadIdx.x >> 5].drop();
    emulated_yield();  // never resumed: the scheduler skips ended threads
    std::abort();
}

// Runs `body` for every block of `grid`, each with `block.x` threads. Shared memory starts as NaN
// (0xFF bytes in bf16 and f32 alike), so a read of a slot nothing wrote shows in the results. With
// `dynamic_smem` (the launcher's shared_mem_bytes) the bytes past it must still be untouched when
// the block ends: a kernel indexing beyond what its launcher reserves aborts. Not reentrant: callers
// on several host threads (tests/emulated/fake_cuda.cpp) launch under one lock.
inline void emulated_launch(EmulatedDim3 grid, EmulatedDim3 block, const std::function<void()>& body,
                            size_t dynamic_smem = 0) {
    constexpr size_t GUARD = 4096;
    constexpr size_t STACK = 256 * 1024;
    if (dynamic_smem + GUARD > sizeof emulated_smem) {
        std::fprintf(stderr, "emulated_launch: %zu bytes of dynamic shared memory do not fit\n", dynamic_smem);
        std::abort();
    }
    if (block.x == 0 || block.x > 1024 || block.y != 1 || block.z != 1) {
        std::fprintf(stderr, "emulated_launch: a block of (%u,%u,%u) threads is not emulated\n", block.x, block.y,
                     block.z);
        std::abort();
    }
    gridDim = grid;
    blockDim = block;
    const unsigned nt = block.x;
    // Stacks are kept for the process: launches come by the thousand.
    static std::vector<std::unique_ptr<char[]>> stacks;
    while (stacks.size() < nt) stacks.emplace_back(new char[STACK]);
    emulated_body = &body;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                auto ctx = std::make_unique<EmulatedBlock>();
                ctx->block.expected = nt;
                for (unsigned w = 0; w < (nt + 31) / 32; ++w) ctx->warp[w].expected = std::min(32u, nt - 32 * w);
                emulated_block = ctx.get();
                std::memset(emulated_smem, 0xFF, sizeof emulated_smem);
                blockIdx = {bx, by, bz};
                std::vector<EmulatedFiber> fibers(nt);
                for (unsigned t = 0; t < nt; ++t)
                    emulated_context_init(fibers[t].ctx, stacks[t].get(), STACK, emulated_fiber_main);
                // Round-robin in thread order until every thread has ended; a whole round in which no
                // thread arrives anywhere, is released or ends is a deadlock.
                for (unsigned live = nt; live > 0;) {
                    const unsigned long before = emulated_progress;
                    for (unsigned t = 0; t < nt; ++t) {
                        if (fibers[t].done) continue;
                        emulated_current = &fibers[t];
                        threadIdx = {t, 0, 0};
                        emulated_context_switch(emulated_scheduler, fibers[t].ctx);
                        if (fibers[t].done) --live;
                    }
                    if (live > 0 && emulated_progress == before) {
                        std::fprintf(stderr, "block (%u,%u,%u): deadlock, %u threads wait at a barrier others never reach\n",
                                     bx, by, bz, live);
                        std::abort();
                    }
                }
                if (dynamic_smem)
                    for (size_t i = dynamic_smem; i < dynamic_smem + GUARD; ++i)
                        if (emulated_smem[i] != 0xFF) {
                            std::fprintf(stderr, "block (%u,%u,%u) wrote shared memory byte %zu, past the %zu reserved\n",
                                         bx, by, bz, i, dynamic_smem);
                            std::abort();
                        }
            }
}
