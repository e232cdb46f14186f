// Small helpers the engine needs between the big ops: accumulate, squared norm (for
// global-norm clipping, accumulated in f64), and the embedding gather / scatter-add.
#include "common.cuh"

template <typename T>
__device__ void add_assign(T* dst, const T* src, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        dst[i] = from_f32<T>(to_f32(dst[i]) + to_f32(src[i]));
}
extern "C" __global__ void add_assign_f32(float* dst, const float* src, long n) { add_assign(dst, src, n); }
extern "C" __global__ void add_assign_bf16(bf16* dst, const bf16* src, long n) { add_assign(dst, src, n); }

// Σ buf²: per-block partial sums in f64, then one atomic per block.
extern "C" __global__ void sum_squares_f32(double* out, const float* buf, long n) {
    __shared__ double partial[32];
    double acc = 0.0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        acc += (double)buf[i] * buf[i];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += partial[w];
        atomicAdd(out, s);
    }
}

// out[r] = table[ids[r]] (rows of width d).
template <typename T>
__device__ void embedding_fwd(T* out, const T* table, const unsigned* ids, long rows, int d) {
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < rows * d; t += (long)gridDim.x * blockDim.x)
        out[t] = table[(long)ids[t / d] * d + t % d];
}
extern "C" __global__ void embedding_fwd_f32(float* out, const float* table, const unsigned* ids, long rows, int d) {
    embedding_fwd(out, table, ids, rows, d);
}
extern "C" __global__ void embedding_fwd_bf16(bf16* out, const bf16* table, const unsigned* ids, long rows, int d) {
    embedding_fwd(out, table, ids, rows, d);
}

// dtable[ids[r]] += dout[r], into f32 gradients (repeated ids collide, hence atomics).
template <typename T>
__device__ void embedding_bwd(float* dtable, const T* dout, const unsigned* ids, long rows, int d) {
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < rows * d; t += (long)gridDim.x * blockDim.x)
        atomicAdd(&dtable[(long)ids[t / d] * d + t % d], to_f32(dout[t]));
}
extern "C" __global__ void embedding_bwd_f32(float* dtable, const float* dout, const unsigned* ids, long rows, int d) {
    embedding_bwd(dtable, dout, ids, rows, d);
}
extern "C" __global__ void embedding_bwd_bf16(float* dtable, const bf16* dout, const unsigned* ids, long rows, int d) {
    embedding_bwd(dtable, dout, ids, rows, d);
}
