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

extern "C" __global__ void rmsnorm_fwd_f32(float* out, float* rstd, const float* x, const float* w, int d, float eps) {
    rmsnorm_fwd(out, rstd, x, w, d, eps);
}
extern "C" __global__ void rmsnorm_fwd_bf16(bf16* out, float* rstd, const bf16* x, const bf16* w, int d, float eps) {
    rmsnorm_fwd(out, rstd, x, w, d, eps);
}
extern "C" __global__ void rmsnorm_bwd_f32(float* dx, float* dw, const float* dy, const float* x, const float* w,
                                           const float* rstd, int rows, int d, int rows_per_block) {
    rmsnorm_bwd(dx, dw, dy, x, w, rstd, rows, d, rows_per_block);
}
extern "C" __global__ void rmsnorm_bwd_bf16(bf16* dx, float* dw, const bf16* dy, const bf16* x, const bf16* w,
                                            const float* rstd, int rows, int d, int rows_per_block) {
    rmsnorm_bwd(dx, dw, dy, x, w, rstd, rows, d, rows_per_block);
}
