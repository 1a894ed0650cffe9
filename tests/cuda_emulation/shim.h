// Host emulation of the CUDA built-ins decode_attention.cu uses: each CUDA thread is a std::thread; shuffles and
// votes exchange through a per-warp buffer between two barriers; __syncthreads is a block barrier.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static
struct Dim3 { int x = 0, y = 0, z = 0; };
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim{128, 1, 1};
struct Sync {
    std::barrier<>* block;
    std::barrier<>* warp[4];
    float fbuf[4][32];
    int ibuf[4][32];
};
inline Sync* g_sync = nullptr;
inline void __syncthreads() { g_sync->block->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    g_sync->fbuf[w][l] = v;
    g_sync->warp[w]->arrive_and_wait();
    const float r = g_sync->fbuf[w][l ^ o];
    g_sync->warp[w]->arrive_and_wait();
    return r;
}
inline bool __any_sync(unsigned, bool p) {
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    g_sync->ibuf[w][l] = p;
    g_sync->warp[w]->arrive_and_wait();
    bool any = false;
    for (int i = 0; i < 32; ++i) any |= g_sync->ibuf[w][i] != 0;
    g_sync->warp[w]->arrive_and_wait();
    return any;
}
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline void __trap() { std::abort(); }
using std::min;
using std::max;
