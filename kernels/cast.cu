// Casts between the f32 master copies and bf16 compute copies.
#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(bf16* out, const float* in, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(in[i]);
}

extern "C" __global__ void cast_bf16_to_f32(float* out, const bf16* in, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = __bfloat162float(in[i]);
}
