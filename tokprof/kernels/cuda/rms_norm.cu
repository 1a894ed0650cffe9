// RMSNorm with an optional fused residual add, in Hugging Face LlamaRMSNorm's rounding order:
//   s = dtype(x + residual)                         (written to new_residual when has_res)
//   out = dtype(float(w) * float(dtype(float(s) * rsqrt(mean(float(s)^2) + eps))))
//   x, residual, out, new_residual (T, H) row-major; w (H,).
// Three variants:
//   rms_norm_warp:   one warp per row, 4 rows per 128-thread block, for short rows (H <= 32 * VPT vectors, e.g. the
//                    per-head q/k norm of Qwen3 with H = 128); warp_sum only, no shared memory.
//   rms_norm_block:  one block per row, up to VPT 16-byte vectors per thread kept in registers between the sum of
//                    squares and the normalisation, so each element is read from memory once; warp_sum + block_sum.
//   rms_norm_scalar: one block per row, element loads, two passes over the row (the second from L1/L2); any H and
//                    any alignment.
#include "common.cuh"

using namespace tokprof;

// 16-byte vectors per thread held in registers; must match _CUDA_VPT in rms_norm.py.
constexpr int VPT = 4;

template <typename T>
__device__ __forceinline__ Vec16<T> add_residual(Vec16<T> a, const T* __restrict__ res, T* new_res, bool has_res) {
    if (has_res) {
        const Vec16<T> r = load16(res);
#pragma unroll
        for (int e = 0; e < Vec16<T>::N; ++e) a.v[e] = from_float<T>(to_float(a.v[e]) + to_float(r.v[e]));
        store16(new_res, a);
    }
    return a;
}

template <typename T>
__device__ __forceinline__ Vec16<T> normalise(const Vec16<T>& a, const Vec16<T>& w, float rstd) {
    Vec16<T> o;
#pragma unroll
    for (int e = 0; e < Vec16<T>::N; ++e) {
        const float h = to_float(from_float<T>(to_float(a.v[e]) * rstd));  // HF: hidden.to(input_dtype)
        o.v[e] = from_float<T>(to_float(w.v[e]) * h);                     // HF: weight * hidden, in the dtype
    }
    return o;
}

// Threads `lane` of `width` cooperating on one row: load (+ residual), sum of squares, into registers.
template <typename T>
__device__ __forceinline__ float load_row(const T* __restrict__ x, const T* __restrict__ res, T* new_res, bool has_res,
                                          int nvec, int lane, int width, Vec16<T> (&cache)[VPT]) {
    constexpr int N = Vec16<T>::N;
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        const int i = lane + j * width;
        if (i < nvec) {
            cache[j] = add_residual(load16(x + i * N), res + i * N, new_res + i * N, has_res);
#pragma unroll
            for (int e = 0; e < N; ++e) {
                const float f = to_float(cache[j].v[e]);
                ss += f * f;
            }
        }
    }
    return ss;
}

template <typename T>
__device__ __forceinline__ void store_row(const Vec16<T> (&cache)[VPT], const T* __restrict__ w, T* __restrict__ out,
                                          float rstd, int nvec, int lane, int width) {
    constexpr int N = Vec16<T>::N;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        const int i = lane + j * width;
        if (i < nvec) store16(out + i * N, normalise(cache[j], load16(w + i * N), rstd));
    }
}

template <typename T>
__device__ __forceinline__ void rms_norm_warp(const T* __restrict__ x, const T* __restrict__ res,
                                              const T* __restrict__ w, T* __restrict__ out, T* new_res,
                                              int num_tokens, int H, float eps, bool has_res) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= num_tokens) return;  // whole warps leave; no block-wide barrier follows
    const int lane = threadIdx.x & 31;
    const int nvec = H / Vec16<T>::N;
    const long long base = row * H;
    Vec16<T> cache[VPT];
    float ss = load_row(x + base, res + base, new_res + base, has_res, nvec, lane, 32, cache);
    ss = warp_sum(ss);
    store_row(cache, w, out + base, rsqrtf(ss / (float)H + eps), nvec, lane, 32);
}

template <typename T>
__device__ __forceinline__ void rms_norm_block(const T* __restrict__ x, const T* __restrict__ res,
                                               const T* __restrict__ w, T* __restrict__ out, T* new_res,
                                               int num_tokens, int H, float eps, bool has_res) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * H;
    const int nvec = H / Vec16<T>::N;
    Vec16<T> cache[VPT];
    float ss = load_row(x + base, res + base, new_res + base, has_res, nvec, (int)threadIdx.x, (int)blockDim.x, cache);
    ss = block_sum(ss, scratch);
    store_row(cache, w, out + base, rsqrtf(ss / (float)H + eps), nvec, (int)threadIdx.x, (int)blockDim.x);
}

template <typename T>
__device__ __forceinline__ void rms_norm_scalar(const T* __restrict__ x, const T* __restrict__ res,
                                                const T* __restrict__ w, T* __restrict__ out, T* new_res,
                                                int num_tokens, int H, float eps, bool has_res) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * H;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        T a = x[base + i];
        if (has_res) {
            a = from_float<T>(to_float(a) + to_float(res[base + i]));
            new_res[base + i] = a;
        }
        const float f = to_float(a);
        ss += f * f;
    }
    ss = block_sum(ss, scratch);
    const float rstd = rsqrtf(ss / (float)H + eps);
    // Second pass: each thread re-reads exactly the elements it wrote or read above (same indices), so new_res
    // needs no barrier.
    const T* src = has_res ? new_res : x;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float h = to_float(from_float<T>(to_float(src[base + i]) * rstd));
        out[base + i] = from_float<T>(to_float(w[i]) * h);
    }
}

// __launch_bounds__(the most threads rms_norm.py launches the variant with, 1 block per SM at least): warp 128, block
// and scalar up to 1024. Without a bound ptxas may use more than 64 registers per thread, and a 1024-thread launch
// then fails with "too many resources requested for launch" (rms_norm_block_bf16 took 62 on sm_90 unbounded). The
// explicit 1 matters: with the thread count alone ptxas for sm_80 aimed at 2 blocks per SM (32 registers) and spilled.
#define TOKPROF_RMS_NORM(VARIANT, MAX_THREADS, SUFFIX, T)                                                     \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS, 1)                                              \
        rms_norm_##VARIANT##_##SUFFIX(const T* x, const T* res, const T* w, T* out, T* new_res,               \
                                      int num_tokens, int H, float eps, int has_res) {                        \
        rms_norm_##VARIANT<T>(x, res, w, out, new_res, num_tokens, H, eps, has_res != 0);                     \
    }

#define TOKPROF_RMS_NORM_ALL(SUFFIX, T)         \
    TOKPROF_RMS_NORM(warp, 128, SUFFIX, T)      \
    TOKPROF_RMS_NORM(block, 1024, SUFFIX, T)    \
    TOKPROF_RMS_NORM(scalar, 1024, SUFFIX, T)

TOKPROF_RMS_NORM_ALL(f32, float)
TOKPROF_RMS_NORM_ALL(f16, __half)
TOKPROF_RMS_NORM_ALL(bf16, __nv_bfloat16)
