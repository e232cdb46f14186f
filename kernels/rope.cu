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
// bf16 with head_dim/2 a multiple of 8 (the training path): eight pairs per thread, so both
// halves move by 16-byte accesses, the angles by 32-byte ones, and the index arithmetic (four
// divisions) is done once per eight pairs instead of once per pair.
__device__ void rope_x8(bf16* x, const float* cos_t, const float* sin_t, long rows, int seq, int pos0, int n_head,
                        int head_dim, int inverse) {
    const int half = head_dim / 2, octets = half / 8;
    const long n = rows * n_head * octets;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < n; t += (long)gridDim.x * blockDim.x) {
        const int i = (int)(t % octets) * 8;
        const long rh = t / octets;  // row * n_head + head
        const int pos = pos0 + (int)((rh / n_head) % seq);
        bf16* p = x + rh * head_dim + i;
        const float4* cp = reinterpret_cast<const float4*>(cos_t + (long)pos * half + i);
        const float4* sp = reinterpret_cast<const float4*>(sin_t + (long)pos * half + i);
        const float4 c0 = cp[0], c1 = cp[1], s0 = sp[0], s1 = sp[1];
        const float sign = inverse ? -1.0f : 1.0f;
        const float c[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
        const float s[8] = {sign * s0.x, sign * s0.y, sign * s0.z, sign * s0.w,
                            sign * s1.x, sign * s1.y, sign * s1.z, sign * s1.w};
        Bf16x8 a, b, ra, rb;
        a.raw = *reinterpret_cast<const uint4*>(p);
        b.raw = *reinterpret_cast<const uint4*>(p + half);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float a0 = to_f32(a.pair[j].x), a1 = to_f32(a.pair[j].y);
            const float b0 = to_f32(b.pair[j].x), b1 = to_f32(b.pair[j].y);
            ra.pair[j] = __floats2bfloat162_rn(a0 * c[2 * j] - b0 * s[2 * j], a1 * c[2 * j + 1] - b1 * s[2 * j + 1]);
            rb.pair[j] = __floats2bfloat162_rn(b0 * c[2 * j] + a0 * s[2 * j], b1 * c[2 * j + 1] + a1 * s[2 * j + 1]);
        }
        *reinterpret_cast<uint4*>(p) = ra.raw;
        *reinterpret_cast<uint4*>(p + half) = rb.raw;
    }
}

extern "C" __global__ void rope_bf16(bf16* x, const float* cos_t, const float* sin_t, long rows, int seq, int pos0,
                                     int n_head, int head_dim, int inverse) {
    if ((head_dim / 2) % 8 == 0 && aligned16(x) && aligned16(cos_t) && aligned16(sin_t))
        rope_x8(x, cos_t, sin_t, rows, seq, pos0, n_head, head_dim, inverse);
    else
        rope(x, cos_t, sin_t, rows, seq, pos0, n_head, head_dim, inverse);
}
