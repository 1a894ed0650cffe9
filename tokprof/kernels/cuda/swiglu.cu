// SwiGLU activation: out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i].
//   gate_up (T, 2*I) row-major, out (T, I) row-major.
// Memory-bound (5 FLOP per 3 elements moved): each thread moves 16 bytes of gate, 16 of up and 16 of out per step
// of a grid-stride loop; the scalar variant covers rows whose length is not a multiple of the vector width.
#include "common.cuh"

using namespace tokprof;

template <typename T>
__device__ __forceinline__ float silu_mul(T g, T u) {
    const float gf = to_float(g);
    return gf / (1.0f + __expf(-gf)) * to_float(u);
}

template <typename T>
__device__ __forceinline__ void swiglu_vec(const T* __restrict__ gate_up, T* __restrict__ out, int num_tokens, int I) {
    constexpr int N = Vec16<T>::N;
    const int vecs_per_row = I / N;
    const long long total = (long long)num_tokens * vecs_per_row;
    for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < total;
         v += (long long)gridDim.x * blockDim.x) {
        const long long row = v / vecs_per_row;
        const int col = (int)(v % vecs_per_row) * N;
        const Vec16<T> g = load16(gate_up + row * 2 * I + col);
        const Vec16<T> u = load16(gate_up + row * 2 * I + I + col);
        Vec16<T> o;
#pragma unroll
        for (int i = 0; i < N; ++i) o.v[i] = from_float<T>(silu_mul(g.v[i], u.v[i]));
        store16(out + row * I + col, o);
    }
}

template <typename T>
__device__ __forceinline__ void swiglu_scalar(const T* __restrict__ gate_up, T* __restrict__ out, int num_tokens,
                                              int I) {
    const long long total = (long long)num_tokens * I;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long row = e / I;
        const int col = (int)(e % I);
        out[e] = from_float<T>(silu_mul(gate_up[row * 2 * I + col], gate_up[row * 2 * I + I + col]));
    }
}

#define TOKPROF_SWIGLU(SUFFIX, T)                                                                             \
    extern "C" __global__ void swiglu_vec_##SUFFIX(const T* gate_up, T* out, int num_tokens, int I) {         \
        swiglu_vec<T>(gate_up, out, num_tokens, I);                                                           \
    }                                                                                                         \
    extern "C" __global__ void swiglu_scalar_##SUFFIX(const T* gate_up, T* out, int num_tokens, int I) {      \
        swiglu_scalar<T>(gate_up, out, num_tokens, I);                                                        \
    }

TOKPROF_SWIGLU(f32, float)
TOKPROF_SWIGLU(f16, __half)
TOKPROF_SWIGLU(bf16, __nv_bfloat16)
