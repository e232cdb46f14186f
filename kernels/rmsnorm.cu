// Fused RMSNorm, forward and backward, one block per row. Statistics in f32 whatever the storage
// type; the forward saves rstd = 1/sqrt(mean(x²) + eps) per row for the backward.
#include "common.cuh"

template <typename T>
__device__ void rmsnorm_fwd(T* out, float* rstd, const T* x, const T* w, int d, float eps) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const T* xr = x + row * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = to_f32(xr[i]);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss, scratch) / d + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[row * d + i] = from_f32<T>(to_f32(xr[i]) * r * to_f32(w[i]));
}

// dx += rstd·(w∘dy) − x·rstd³·mean(w∘dy∘x)  (accumulated: the input is a residual stream);
// dw += Σ_rows dy∘x·rstd, accumulated in f32 with one atomic per column per block.
template <typename T>
__device__ void rmsnorm_bwd(T* dx, float* dw, const T* dy, const T* x, const T* w, const float* rstd, int rows, int d,
                            int rows_per_block) {
    __shared__ float scratch[32];
    DYNAMIC_SHARED(float, dw_acc);  // [d]
    for (int i = threadIdx.x; i < d; i += blockDim.x) dw_acc[i] = 0.0f;
    const int r0 = blockIdx.x * rows_per_block;
    const int r1 = min(rows, r0 + rows_per_block);
    for (int row = r0; row < r1; ++row) {
        const long o = (long)row * d;
        const float r = rstd[row];
        float dot = 0.0f;
        for (int i = threadIdx.x; i < d; i += blockDim.x) dot += to_f32(dy[o + i]) * to_f32(w[i]) * to_f32(x[o + i]);
        const float c = block_sum(dot, scratch) / d * r * r * r;
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            const float xv = to_f32(x[o + i]), g = to_f32(dy[o + i]);
            dx[o + i] = from_f32<T>(to_f32(dx[o + i]) + r * g * to_f32(w[i]) - xv * c);
            dw_acc[i] += g * xv * r;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) atomicAdd(&dw[i], dw_acc[i]);
}

// The bf16 fast path, for rows of exactly 8·blockDim values (the launcher picks d/8 threads when
// d is a multiple of 256: TinyLlama's 2048 gets 256): each thread holds one 16-byte chunk of its
// row in registers from the statistics to the output, so a row is read from memory once, with
// 16-byte accesses; the backward also keeps its weights and dw partial sums in registers across
// all of its rows.
__device__ void rmsnorm_fwd_x8(bf16* out, float* rstd, const bf16* x, const bf16* w, int d, float eps) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    Bf16x8 xv, wv, o;
    xv.raw = reinterpret_cast<const uint4*>(x + row * d)[threadIdx.x];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float a = to_f32(xv.pair[j].x), b = to_f32(xv.pair[j].y);
        ss += a * a + b * b;
    }
    const float r = rsqrtf(block_sum(ss, scratch) / d + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    wv.raw = reinterpret_cast<const uint4*>(w)[threadIdx.x];
#pragma unroll
    for (int j = 0; j < 4; ++j)
        o.pair[j] = __floats2bfloat162_rn(to_f32(xv.pair[j].x) * r * to_f32(wv.pair[j].x),
                                          to_f32(xv.pair[j].y) * r * to_f32(wv.pair[j].y));
    reinterpret_cast<uint4*>(out + row * d)[threadIdx.x] = o.raw;
}

__device__ void rmsnorm_bwd_x8(bf16* dx, float* dw, const bf16* dy, const bf16* x, const bf16* w, const float* rstd,
                               int rows, int d, int rows_per_block) {
    __shared__ float scratch[32];
    Bf16x8 wv;
    wv.raw = reinterpret_cast<const uint4*>(w)[threadIdx.x];
    float dwa[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    const int r0 = blockIdx.x * rows_per_block;
    const int r1 = min(rows, r0 + rows_per_block);
    for (int row = r0; row < r1; ++row) {
        const long o = (long)row * d;
        const float r = rstd[row];
        Bf16x8 gv, xv, dv;
        gv.raw = reinterpret_cast<const uint4*>(dy + o)[threadIdx.x];
        xv.raw = reinterpret_cast<const uint4*>(x + o)[threadIdx.x];
        uint4* dxp = reinterpret_cast<uint4*>(dx + o) + threadIdx.x;
        dv.raw = *dxp;  // issued before the reduction, so its latency overlaps the barrier
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            dot += to_f32(gv.pair[j].x) * to_f32(wv.pair[j].x) * to_f32(xv.pair[j].x) +
                   to_f32(gv.pair[j].y) * to_f32(wv.pair[j].y) * to_f32(xv.pair[j].y);
        const float k = block_sum(dot, scratch) / d * r * r * r;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float g0 = to_f32(gv.pair[j].x), g1 = to_f32(gv.pair[j].y);
            const float x0 = to_f32(xv.pair[j].x), x1 = to_f32(xv.pair[j].y);
            dv.pair[j] = __floats2bfloat162_rn(to_f32(dv.pair[j].x) + r * g0 * to_f32(wv.pair[j].x) - x0 * k,
                                               to_f32(dv.pair[j].y) + r * g1 * to_f32(wv.pair[j].y) - x1 * k);
            dwa[2 * j] += g0 * x0 * r;
            dwa[2 * j + 1] += g1 * x1 * r;
        }
        *dxp = dv.raw;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) atomicAdd(&dw[threadIdx.x * 8 + j], dwa[j]);
}

// Whether a bf16 row takes the fast path: one 16-byte chunk per thread, every pointer aligned.
__device__ __forceinline__ bool x8_path(int d, const void* a, const void* b, const void* c, const void* e) {
    return d == 8 * (int)blockDim.x && aligned16(a) && aligned16(b) && aligned16(c) && aligned16(e);
}

extern "C" __global__ void rmsnorm_fwd_f32(float* out, float* rstd, const float* x, const float* w, int d, float eps) {
    rmsnorm_fwd(out, rstd, x, w, d, eps);
}
extern "C" __global__ void rmsnorm_fwd_bf16(bf16* out, float* rstd, const bf16* x, const bf16* w, int d, float eps) {
    if (x8_path(d, out, x, w, x))
        rmsnorm_fwd_x8(out, rstd, x, w, d, eps);
    else
        rmsnorm_fwd(out, rstd, x, w, d, eps);
}
extern "C" __global__ void rmsnorm_bwd_f32(float* dx, float* dw, const float* dy, const float* x, const float* w,
                                           const float* rstd, int rows, int d, int rows_per_block) {
    rmsnorm_bwd(dx, dw, dy, x, w, rstd, rows, d, rows_per_block);
}
extern "C" __global__ void rmsnorm_bwd_bf16(bf16* dx, float* dw, const bf16* dy, const bf16* x, const bf16* w,
                                            const float* rstd, int rows, int d, int rows_per_block) {
    if (x8_path(d, dx, dy, x, w))
        rmsnorm_bwd_x8(dx, dw, dy, x, w, rstd, rows, d, rows_per_block);
    else
        rmsnorm_bwd(dx, dw, dy, x, w, rstd, rows, d, rows_per_block);
}
