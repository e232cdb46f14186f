// Rotary embedding in place, Hugging Face "rotate_half" pairing (i, i + head_dim/2). The backward
// is the same rotation by the negative angle (`inverse`). x: [rows, n_head, head_dim], row r at
// position pos0 + r % seq; cos/sin: [max_pos, head_dim/2] in f32.
#include "common.cuh"

template <typename T>
__device__ void rope(T* x, const float* cos_t, const float* sin_t, long rows, int seq, int pos0, int n_head,
                     int head_dim, int inverse) {
    const int half = head_dim / 2;
    const long pairs = rows * n_head * half;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < pairs; t += (long)gridDim.x * blockDim.x) {
        const int i = t % half;
        const long rh = t / half;  // row * n_head + head
        const long row = rh / n_head;
        const int pos = pos0 + row % seq;
        const float c = cos_t[(long)pos * half + i];
        const float s = inverse ? -sin_t[(long)pos * half + i] : sin_t[(long)pos * half + i];
        T* p = x + rh * head_dim;
        const float a = to_f32(p[i]), b = to_f32(p[i + half]);
        p[i] = from_f32<T>(a * c - b * s);
        p[i + half] = from_f32<T>(b * c + a * s);
    }
}

extern "C" __global__ void rope_f32(float* x, const float* cos_t, const float* sin_t, long rows, int seq, int pos0,
                                    int n_head, int head_dim, int inverse) {
    rope(x, cos_t, sin_t, rows, seq, pos0, n_head, head_dim, inverse);
}
extern "C" __global__ void rope_bf16(bf16* x, const float* cos_t, const float* sin_t, long rows, int seq, int pos0,
                                     int n_head, int head_dim, int inverse) {
    rope(x, cos_t, sin_t, rows, seq, pos0, n_head, head_dim, inverse);
}
