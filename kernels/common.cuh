// Shared by every kernel: element types, conversions and warp reductions. Kernels are compiled at
// start-up by NVRTC (src/backend/cuda/kernels.rs) for the device at hand; every entry point is
// `extern "C"` so its launcher (a same-named file in src/backend/cuda/) finds it by name.
#pragma once
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

// NVRTC has no <math.h>; the IEEE bit pattern of +inf.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// Dynamic shared memory, declared through one macro so that tests/emulated (the kernels run on
// the CPU, one host thread per CUDA thread) can map it to a host buffer.
#ifdef KILN_CPU_EMULATION
#define DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(emulated_dynamic_smem())
#else
#define DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Eight bf16 moved by one 16-byte load or store (memory-bound kernels reach far more of the
// bandwidth than with 2-byte accesses).
union Bf16x8 {
    uint4 raw;
    __nv_bfloat162 pair[4];
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<unsigned long long>(p) & 15) == 0; }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float x, float* scratch /* [32] */) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_sum(x);
    __syncthreads();  // scratch may still be read from a previous call
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(x);
}

__device__ __forceinline__ float block_max(float x, float* scratch /* [32] */) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_max(x);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(x);
}
