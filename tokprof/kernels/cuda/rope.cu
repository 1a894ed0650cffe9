// Rotary position embedding, rotate-half convention, on q and k in one launch, in Hugging Face's rounding order:
//   c, s = dtype(cos(a)), dtype(sin(a)) of a = float(position) * inv_freq[i]         (fp32 angle, as HF)
//   out[i]        = dtype(dtype(x[i] * c) - dtype(x[i + D/2] * s))
//   out[i + D/2]  = dtype(dtype(x[i + D/2] * c) + dtype(x[i] * s))                  for i < D/2
//   q (T, Hq, D) and k (T, Hkv, D) with token strides stride_q, stride_k (heads and D contiguous);
//   q_out (T, Hq, D), k_out (T, Hkv, D) contiguous; positions (T,) int32 or int64; inv_freq (D/2,) float32.
// One block per token: the token's D/2 cos/sin pairs are computed once into shared memory (2 * D/2 floats,
// dynamic), then threads stride over (head, chunk of D/2) items of q and k; the vector variant moves 16 bytes of
// x1, x2 and of each output per item. __fmul_rn keeps the products rounded separately (no FMA contraction), as
// PyTorch's separate multiply and add kernels do.
#include "common.cuh"

using namespace tokprof;

template <typename T>
__device__ __forceinline__ void rotate_pair(T x1, T x2, float c, float s, T& o1, T& o2) {
    const float a = to_float(x1);
    const float b = to_float(x2);
    o1 = from_float<T>(to_float(from_float<T>(__fmul_rn(a, c))) - to_float(from_float<T>(__fmul_rn(b, s))));
    o2 = from_float<T>(to_float(from_float<T>(__fmul_rn(b, c))) + to_float(from_float<T>(__fmul_rn(a, s))));
}

template <typename T, typename P, bool VEC>
__device__ __forceinline__ void rope_impl(const T* __restrict__ q, const T* __restrict__ k,
                                          const P* __restrict__ positions, const float* __restrict__ inv_freq,
                                          T* __restrict__ q_out, T* __restrict__ k_out, int Hq, int Hkv, int half,
                                          int stride_q, int stride_k) {
    extern __shared__ float cos_sin[];  // cos (half,), then sin (half,)
    float* cos_s = cos_sin;
    float* sin_s = cos_sin + half;
    const long long tok = blockIdx.x;
    const float pos = (float)positions[tok];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        cos_s[i] = to_float(from_float<T>(c));  // HF: cos.to(x.dtype)
        sin_s[i] = to_float(from_float<T>(s));
    }
    __syncthreads();

    constexpr int N = VEC ? Vec16<T>::N : 1;
    const int chunks = half / N;
    const int items = (Hq + Hkv) * chunks;
    const int d = 2 * half;
    for (int w = threadIdx.x; w < items; w += blockDim.x) {
        const int head = w / chunks;
        const int col = (w % chunks) * N;
        const T* src;
        T* dst;
        if (head < Hq) {
            src = q + tok * stride_q + (long long)head * d + col;
            dst = q_out + (tok * Hq + head) * d + col;
        } else {
            src = k + tok * stride_k + (long long)(head - Hq) * d + col;
            dst = k_out + (tok * Hkv + (head - Hq)) * d + col;
        }
        if constexpr (VEC) {
            const Vec16<T> x1 = load16(src);
            const Vec16<T> x2 = load16(src + half);
            Vec16<T> o1, o2;
#pragma unroll
            for (int e = 0; e < N; ++e) rotate_pair(x1.v[e], x2.v[e], cos_s[col + e], sin_s[col + e], o1.v[e], o2.v[e]);
            store16(dst, o1);
            store16(dst + half, o2);
        } else {
            T o1, o2;
            rotate_pair(src[0], src[half], cos_s[col], sin_s[col], o1, o2);
            dst[0] = o1;
            dst[half] = o2;
        }
    }
}

#define TOKPROF_ROPE(VARIANT, VEC, PNAME, P, SUFFIX, T)                                                         \
    extern "C" __global__ void rope_##VARIANT##_##PNAME##_##SUFFIX(                                             \
        const T* q, const T* k, const P* positions, const float* inv_freq, T* q_out, T* k_out, int Hq, int Hkv, \
        int half, int stride_q, int stride_k) {                                                                 \
        rope_impl<T, P, VEC>(q, k, positions, inv_freq, q_out, k_out, Hq, Hkv, half, stride_q, stride_k);       \
    }

#define TOKPROF_ROPE_ALL(SUFFIX, T)                          \
    TOKPROF_ROPE(vec, true, i32, int, SUFFIX, T)             \
    TOKPROF_ROPE(vec, true, i64, long long, SUFFIX, T)       \
    TOKPROF_ROPE(scalar, false, i32, int, SUFFIX, T)         \
    TOKPROF_ROPE(scalar, false, i64, long long, SUFFIX, T)

TOKPROF_ROPE_ALL(f32, float)
TOKPROF_ROPE_ALL(f16, __half)
TOKPROF_ROPE_ALL(bf16, __nv_bfloat16)
