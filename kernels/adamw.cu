// Multi-tensor AdamW on f32 master weights, torch.optim.AdamW semantics (decoupled decay first,
// bias-corrected moments, eps after the square root). One launch updates every tensor: the host
// passes a table of chunks (pointers and a length of at most CHUNK values each), one block per
// chunk. The bf16 copy the next forward computes from is written in the same pass, when given.
#include "common.cuh"

struct AdamChunk {
    float* param;
    const float* grad;
    float* m;
    float* v;
    bf16* param_bf16;  // may be null
    long len;
};

struct AdamHp {
    float lr, beta1, beta2, eps, weight_decay;
    float step_size;  // lr / (1 − beta1^t)
    float bc2_sqrt;   // sqrt(1 − beta2^t)
    float grad_scale; // global-norm clipping factor, folded in here
};

// One value's update; p, m and v are updated in place.
__device__ __forceinline__ void adamw_value(float& p, float& m, float& v, float g, const AdamHp& hp, float decay) {
    g *= hp.grad_scale;
    p *= decay;
    m = hp.beta1 * m + (1.0f - hp.beta1) * g;
    v = hp.beta2 * v + (1.0f - hp.beta2) * g * g;
    p -= hp.step_size * m / (sqrtf(v) / hp.bc2_sqrt + hp.eps);
}

// Four values per 16-byte access where the chunk's pointers allow it (they do for whole tensors:
// chunks start at multiples of CHUNK), then the chunk's tail one value at a time.
extern "C" __global__ void adamw_multi(const AdamChunk* chunks, AdamHp hp) {
    const AdamChunk c = chunks[blockIdx.x];
    const float decay = 1.0f - hp.lr * hp.weight_decay;
    long done = 0;
    const bool bf16_ok = (reinterpret_cast<unsigned long long>(c.param_bf16) & 7) == 0;
    if (aligned16(c.param) && aligned16(c.grad) && aligned16(c.m) && aligned16(c.v) && bf16_ok) {
        const long n4 = c.len / 4;
        for (long q = threadIdx.x; q < n4; q += blockDim.x) {
            float4 p = reinterpret_cast<float4*>(c.param)[q], m = reinterpret_cast<float4*>(c.m)[q];
            float4 v = reinterpret_cast<float4*>(c.v)[q];
            const float4 g = reinterpret_cast<const float4*>(c.grad)[q];
            adamw_value(p.x, m.x, v.x, g.x, hp, decay);
            adamw_value(p.y, m.y, v.y, g.y, hp, decay);
            adamw_value(p.z, m.z, v.z, g.z, hp, decay);
            adamw_value(p.w, m.w, v.w, g.w, hp, decay);
            reinterpret_cast<float4*>(c.param)[q] = p;
            reinterpret_cast<float4*>(c.m)[q] = m;
            reinterpret_cast<float4*>(c.v)[q] = v;
            if (c.param_bf16) {
                __nv_bfloat162* pb = reinterpret_cast<__nv_bfloat162*>(c.param_bf16) + 2 * q;
                pb[0] = __floats2bfloat162_rn(p.x, p.y);
                pb[1] = __floats2bfloat162_rn(p.z, p.w);
            }
        }
        done = n4 * 4;
    }
    for (long i = done + threadIdx.x; i < c.len; i += blockDim.x) {
        float p = c.param[i], m = c.m[i], v = c.v[i];
        adamw_value(p, m, v, c.grad[i], hp, decay);
        c.m[i] = m;
        c.v[i] = v;
        c.param[i] = p;
        if (c.param_bf16) c.param_bf16[i] = __float2bfloat16_rn(p);
    }
}
