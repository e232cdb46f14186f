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

extern "C" __global__ void adamw_multi(const AdamChunk* chunks, AdamHp hp) {
    const AdamChunk c = chunks[blockIdx.x];
    const float decay = 1.0f - hp.lr * hp.weight_decay;
    for (long i = threadIdx.x; i < c.len; i += blockDim.x) {
        const float g = c.grad[i] * hp.grad_scale;
        const float p = c.param[i] * decay;
        const float m = hp.beta1 * c.m[i] + (1.0f - hp.beta1) * g;
        const float v = hp.beta2 * c.v[i] + (1.0f - hp.beta2) * g * g;
        const float np = p - hp.step_size * m / (sqrtf(v) / hp.bc2_sqrt + hp.eps);
        c.m[i] = m;
        c.v[i] = v;
        c.param[i] = np;
        if (c.param_bf16) c.param_bf16[i] = __float2bfloat16_rn(np);
    }
}
