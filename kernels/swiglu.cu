// SwiGLU: out = silu(gate) ∘ up, and its backward, in one pass each (f32 math).
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

// Elements from..n, one per thread per step: the f32 kernels, and the bf16 kernels' tails.
template <typename T>
__device__ void swiglu_fwd(T* out, const T* gate, const T* up, long from, long n) {
    for (long i = from + blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]);
        out[i] = from_f32<T>(g * sigmoid(g) * to_f32(up[i]));
    }
}

// dgate = dout·up·σ(g)·(1 + g·(1 − σ(g))), dup = dout·silu(g); both overwritten.
__device__ __forceinline__ void swiglu_grad(float d, float g, float u, float& dg, float& du) {
    const float s = sigmoid(g);
    dg = d * u * s * (1.0f + g * (1.0f - s));
    du = d * g * s;
}

template <typename T>
__device__ void swiglu_bwd(T* dgate, T* dup, const T* dout, const T* gate, const T* up, long from, long n) {
    for (long i = from + blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float dg, du;
        swiglu_grad(to_f32(dout[i]), to_f32(gate[i]), to_f32(up[i]), dg, du);
        dgate[i] = from_f32<T>(dg);
        dup[i] = from_f32<T>(du);
    }
}

extern "C" __global__ void swiglu_fwd_f32(float* out, const float* gate, const float* up, long n) {
    swiglu_fwd(out, gate, up, 0, n);
}

// bf16 (the training path): eight values per 16-byte access where every pointer allows it (the
// launcher sizes the grid for n/8 threads), then the tail, or everything if one is misaligned.
extern "C" __global__ void swiglu_fwd_bf16(bf16* out, const bf16* gate, const bf16* up, long n) {
    long done = 0;
    if (aligned16(out) && aligned16(gate) && aligned16(up)) {
        const long n8 = n / 8;
        for (long v = blockIdx.x * (long)blockDim.x + threadIdx.x; v < n8; v += (long)gridDim.x * blockDim.x) {
            Bf16x8 g, u, o;
            g.raw = reinterpret_cast<const uint4*>(gate)[v];
            u.raw = reinterpret_cast<const uint4*>(up)[v];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float g0 = to_f32(g.pair[j].x), g1 = to_f32(g.pair[j].y);
                o.pair[j] = __floats2bfloat162_rn(g0 * sigmoid(g0) * to_f32(u.pair[j].x),
                                                  g1 * sigmoid(g1) * to_f32(u.pair[j].y));
            }
            reinterpret_cast<uint4*>(out)[v] = o.raw;
        }
        done = n8 * 8;
    }
    swiglu_fwd(out, gate, up, done, n);
}

extern "C" __global__ void swiglu_bwd_f32(float* dgate, float* dup, const float* dout, const float* gate,
                                          const float* up, long n) {
    swiglu_bwd(dgate, dup, dout, gate, up, 0, n);
}

extern "C" __global__ void swiglu_bwd_bf16(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                                           long n) {
    long done = 0;
    if (aligned16(dgate) && aligned16(dup) && aligned16(dout) && aligned16(gate) && aligned16(up)) {
        const long n8 = n / 8;
        for (long v = blockIdx.x * (long)blockDim.x + threadIdx.x; v < n8; v += (long)gridDim.x * blockDim.x) {
            Bf16x8 d, g, u, dg, du;
            d.raw = reinterpret_cast<const uint4*>(dout)[v];
            g.raw = reinterpret_cast<const uint4*>(gate)[v];
            u.raw = reinterpret_cast<const uint4*>(up)[v];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float dg0, du0, dg1, du1;
                swiglu_grad(to_f32(d.pair[j].x), to_f32(g.pair[j].x), to_f32(u.pair[j].x), dg0, du0);
                swiglu_grad(to_f32(d.pair[j].y), to_f32(g.pair[j].y), to_f32(u.pair[j].y), dg1, du1);
                dg.pair[j] = __floats2bfloat162_rn(dg0, dg1);
                du.pair[j] = __floats2bfloat162_rn(du0, du1);
            }
            reinterpret_cast<uint4*>(dgate)[v] = dg.raw;
            reinterpret_cast<uint4*>(dup)[v] = du.raw;
        }
        done = n8 * 8;
    }
    swiglu_bwd(dgate, dup, dout, gate, up, done, n);
}
