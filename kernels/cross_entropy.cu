// Softmax cross-entropy fused with its gradient, one block per row of logits [rows, vocab]. The
// row is read once for an online max/sum (chunked over the vocabulary by the block's threads),
// then, when a gradient is asked for, overwritten in place with scale·(softmax − onehot): no
// second [rows, vocab] buffer ever exists. target < 0 marks an ignored row (loss 0, gradient 0).
#include "common.cuh"

template <typename T>
__device__ void cross_entropy(T* logits, float* loss, const int* targets, int vocab, float grad_scale, int want_grad) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    T* z = logits + row * vocab;
    const int target = targets[row];
    // Online logsumexp: each thread keeps a running max and a sum rescaled to it.
    float m = -INFINITY, s = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = to_f32(z[i]);
        if (v > m) {
            s = s * __expf(m - v) + 1.0f;
            m = v;
        } else {
            s += __expf(v - m);
        }
    }
    const float row_max = block_max(m, scratch);
    const float sum = block_sum(m == -INFINITY ? 0.0f : s * __expf(m - row_max), scratch);
    const float lse = row_max + __logf(sum);
    if (threadIdx.x == 0) loss[row] = target < 0 ? 0.0f : lse - to_f32(z[target]);
    if (!want_grad) return;
    __syncthreads();  // z[target] has been read before it is overwritten
    const float scale = target < 0 ? 0.0f : grad_scale;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float p = __expf(to_f32(z[i]) - lse);
        z[i] = from_f32<T>(scale * (p - (i == target ? 1.0f : 0.0f)));
    }
}

extern "C" __global__ void cross_entropy_f32(float* logits, float* loss, const int* targets, int vocab,
                                             float grad_scale, int want_grad) {
    cross_entropy(logits, loss, targets, vocab, grad_scale, want_grad);
}
extern "C" __global__ void cross_entropy_bf16(bf16* logits, float* loss, const int* targets, int vocab,
                                              float grad_scale, int want_grad) {
    cross_entropy(logits, loss, targets, vocab, grad_scale, want_grad);
}
