// Write new K and V rows into the paged KV caches: for token t with slot s = slots[t] >= 0,
//   k_cache[s] = k[t], v_cache[s] = v[t]   (rows of `row` = Hkv * D elements; the caches viewed flat as
//   (num_blocks * block_size, Hkv * D), since slot s is block s / block_size, offset s % block_size).
//   k, v (T, Hkv, D) with token strides stride_k, stride_v (heads and D contiguous); slots (T,) int32 or int64.
// A negative slot (-1, padding) skips the token. One block per token; the vector variant copies 16 bytes per item.
#include "common.cuh"

using namespace tokprof;

template <typename T, typename S, bool VEC>
__device__ __forceinline__ void append_kv_impl(const T* __restrict__ k, const T* __restrict__ v,
                                               T* __restrict__ k_cache, T* __restrict__ v_cache,
                                               const S* __restrict__ slots, int row, int stride_k, int stride_v) {
    const long long tok = blockIdx.x;
    const long long slot = (long long)slots[tok];
    if (slot < 0) return;
    constexpr int N = VEC ? Vec16<T>::N : 1;
    const int items = row / N;
    for (int i = threadIdx.x; i < 2 * items; i += blockDim.x) {
        const bool is_v = i >= items;
        const long long e = (long long)(is_v ? i - items : i) * N;
        const T* src = (is_v ? v + tok * stride_v : k + tok * stride_k) + e;
        T* dst = (is_v ? v_cache : k_cache) + slot * row + e;
        if constexpr (VEC) {
            store16(dst, load16(src));
        } else {
            *dst = *src;
        }
    }
}

#define TOKPROF_APPEND_KV(VARIANT, VEC, SNAME, S, SUFFIX, T)                                                   \
    extern "C" __global__ void append_kv_##VARIANT##_##SNAME##_##SUFFIX(                                       \
        const T* k, const T* v, T* k_cache, T* v_cache, const S* slots, int row, int stride_k, int stride_v) { \
        append_kv_impl<T, S, VEC>(k, v, k_cache, v_cache, slots, row, stride_k, stride_v);                     \
    }

#define TOKPROF_APPEND_KV_ALL(SUFFIX, T)                         \
    TOKPROF_APPEND_KV(vec, true, i32, int, SUFFIX, T)            \
    TOKPROF_APPEND_KV(vec, true, i64, long long, SUFFIX, T)      \
    TOKPROF_APPEND_KV(scalar, false, i32, int, SUFFIX, T)        \
    TOKPROF_APPEND_KV(scalar, false, i64, long long, SUFFIX, T)

TOKPROF_APPEND_KV_ALL(f32, float)
TOKPROF_APPEND_KV_ALL(f16, __half)
TOKPROF_APPEND_KV_ALL(bf16, __nv_bfloat16)
