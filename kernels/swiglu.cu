// SwiGLU: out = silu(gate) ∘ up, and its backward, in one pass each (f32 math).
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

template <typename T>
__device__ void swiglu_fwd(T* out, const T* gate, const T* up, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]);
        out[i] = from_f32<T>(g * sigmoid(g) * to_f32(up[i]));
    }
}

// dgate = dout·up·σ(g)·(1 + g·(1 − σ(g))), dup = dout·silu(g); both overwritten.
template <typename T>
__device__ void swiglu_bwd(T* dgate, T* dup, const T* dout, const T* gate, const T* up, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]), u = to_f32(up[i]), d = to_f32(dout[i]);
        const float s = sigmoid(g);
        dgate[i] = from_f32<T>(d * u * s * (1.0f + g * (1.0f - s)));
        dup[i] = from_f32<T>(d * g * s);
    }
}

extern "C" __global__ void swiglu_fwd_f32(float* out, const float* gate, const float* up, long n) {
    swiglu_fwd(out, gate, up, n);
}
extern "C" __global__ void swiglu_fwd_bf16(bf16* out, const bf16* gate, const bf16* up, long n) {
    swiglu_fwd(out, gate, up, n);
}
extern "C" __global__ void swiglu_bwd_f32(float* dgate, float* dup, const float* dout, const float* gate,
                                          const float* up, long n) {
    swiglu_bwd(dgate, dup, dout, gate, up, n);
}
extern "C" __global__ void swiglu_bwd_bf16(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                                           long n) {
    swiglu_bwd(dgate, dup, dout, gate, up, n);
}
