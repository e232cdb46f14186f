// Rotary embedding, Hugging Face "rotate_half" pairing (i, i + head_dim/2). The backward is the
// same rotation by the negative angle (`inverse`). x, out: [rows, n_head, head_dim], row r at
// position pos0 + r % seq; cos/sin: [max_pos, head_dim/2] in f32.
//
// Two uses: in place (out == x) on q and k before attention and on dK after it; and from f32 into
// bf16 (rope_f32_to_bf16) on the attention backward's dQ accumulator, which is rotated back as it
// is rounded, so dQ makes one pass (read f32, write bf16) instead of a cast and then a rotation.
#include "common.cuh"

template <typename In, typename Out>
__device__ void rope(Out* out, const In* x, const float* cos_t, const float* sin_t, long rows, int seq, int pos0,
                     int n_head, int head_dim, int inverse) {
    const int half = head_dim / 2;
    const long pairs = rows * n_head * half;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < pairs; t += (long)gridDim.x * blockDim.x) {
        const int i = t % half;
        const long rh = t / half;  // row * n_head + head
        const long row = rh / n_head;
        const int pos = pos0 + row % seq;
        const float c = cos_t[(long)pos * half + i];
        const float s = inverse ? -sin_t[(long)pos * half + i] : sin_t[(long)pos * half + i];
        const In* p = x + rh * head_dim;
        const float a = to_f32(p[i]), b = to_f32(p[i + half]);
        out[rh * head_dim + i] = from_f32<Out>(a * c - b * s);
        out[rh * head_dim + i + half] = from_f32<Out>(b * c + a * s);
    }
}

// Eight consecutive values as f32, from one 16-byte bf16 load or two 16-byte f32 loads.
__device__ __forceinline__ void load8(const bf16* p, float v[8]) {
    Bf16x8 a;
    a.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        v[2 * j] = to_f32(a.pair[j].x);
        v[2 * j + 1] = to_f32(a.pair[j].y);
    }
}
__device__ __forceinline__ void load8(const float* p, float v[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void store8(bf16* p, const float v[8]) {
    Bf16x8 r;
#pragma unroll
    for (int j = 0; j < 4; ++j) r.pair[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
    *reinterpret_cast<uint4*>(p) = r.raw;
}

// bf16 out with head_dim/2 a multiple of 8 (the training path): eight pairs per thread, so both
// halves move by 16-byte accesses, the angles by 32-byte ones, and the index arithmetic (four
// divisions) is done once per eight pairs instead of once per pair.
template <typename In>
__device__ void rope_x8(bf16* out, const In* x, const float* cos_t, const float* sin_t, long rows, int seq, int pos0,
                        int n_head, int head_dim, int inverse) {
    const int half = head_dim / 2, octets = half / 8;
    const long n = rows * n_head * octets;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < n; t += (long)gridDim.x * blockDim.x) {
        const int i = (int)(t % octets) * 8;
        const long rh = t / octets;  // row * n_head + head
        const int pos = pos0 + (int)((rh / n_head) % seq);
        const long at = rh * head_dim + i;
        float c[8], s[8], a[8], b[8], ra[8], rb[8];
        load8(cos_t + (long)pos * half + i, c);
        load8(sin_t + (long)pos * half + i, s);
        load8(x + at, a);
        load8(x + at + half, b);
        const float sign = inverse ? -1.0f : 1.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float sj = sign * s[j];
            ra[j] = a[j] * c[j] - b[j] * sj;
            rb[j] = b[j] * c[j] + a[j] * sj;
        }
        store8(out + at, ra);
        store8(out + at + half, rb);
    }
}

extern "C" __global__ void rope_f32(float* x, const float* cos_t, const float* sin_t, long rows, int seq, int pos0,
                                    int n_head, int head_dim, int inverse) {
    rope(x, x, cos_t, sin_t, rows, seq, pos0, n_head, head_dim, inverse);
}

extern "C" __global__ void rope_bf16(bf16* x, const float* cos_t, const float* sin_t, long rows, int seq, int pos0,
                                     int n_head, int head_dim, int inverse) {
    if ((head_dim / 2) % 8 == 0 && aligned16(x) && aligned16(cos_t) && aligned16(sin_t))
        rope_x8(x, x, cos_t, sin_t, rows, seq, pos0, n_head, head_dim, inverse);
    else
        rope(x, x, cos_t, sin_t, rows, seq, pos0, n_head, head_dim, inverse);
}

// out = rope(x) rounded to bf16 once, x in f32 (out and x must not overlap).
extern "C" __global__ void rope_f32_to_bf16(bf16* out, const float* x, const float* cos_t, const float* sin_t,
                                            long rows, int seq, int pos0, int n_head, int head_dim, int inverse) {
    if ((head_dim / 2) % 8 == 0 && aligned16(out) && aligned16(x) && aligned16(cos_t) && aligned16(sin_t))
        rope_x8(out, x, cos_t, sin_t, rows, seq, pos0, n_head, head_dim, inverse);
    else
        rope(out, x, cos_t, sin_t, rows, seq, pos0, n_head, head_dim, inverse);
}
