// Paged decode attention (one query token per sequence, grouped-query attention) on CUDA cores.
//   q (B, Hq, D); k_cache, v_cache (num_blocks, block_size, Hkv, D); block_table (B, max_blocks) int32;
//   seq_lens (B,) int32; out (B, Hq, D); all row-major. Token t of sequence b lives in page
//   block_table[b, t / block_size] at row t % block_size. Query head h reads KV head h / (Hq / Hkv).
//
// Memory-bound: the kernel must read each K/V byte once, so one thread block serves up to GP query heads of one KV
// head (GP = 1, 2, 4, 8 instances; larger groups take several blocks). Inside the block, TPT = D / VEC threads share
// a token's row, each holding one 16-byte vector of it (VEC = 8 halves or 4 floats), so every K/V access is one
// 128-bit load. The 128 threads form NG = 128 / TPT token groups; each group walks its own tokens with its own online
// softmax (running max m and sum l per head, fp32, base 2), C tokens per step with the next step's loads issued before
// the current step's math. A dot product is a per-thread partial over VEC elements, summed over the TPT lanes with
// xor shuffles (every lane ends with the full score). At the end the NG groups are merged through shared memory.
//
// Split-KV (flash-decoding): blockIdx.z takes tokens [z * tokens_per_split, ...). With one split the block writes
// `out`; with several it writes fp32 partials part_o (B, Hq, num_splits, D) and their base-2 log-sum-exp part_lse
// (B, Hq, num_splits), merged by decode_attn_reduce. Grid: (Hkv * head_chunks, B, num_splits), 128 threads.
#include "common.cuh"

using namespace tokprof;

namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

template <typename T> __device__ __forceinline__ Vec16<T> zero16() {
    Vec16<T> z;
#pragma unroll
    for (int i = 0; i < Vec16<T>::N; ++i) z.v[i] = from_float<T>(0.0f);
    return z;
}

// Issue the K and V loads of this group's C tokens starting at `first`; tokens at or past `end` load zeros.
template <typename T, int C>
__device__ __forceinline__ void load_tokens(const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                            const int* __restrict__ pages, int first, int end, int block_size,
                                            long long page_stride, long long row_stride, long long head_offset,
                                            Vec16<T> (&k)[C], Vec16<T> (&v)[C]) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int t = first + c;
        if (t < end) {
            const long long offset =
                (long long)pages[t / block_size] * page_stride + (long long)(t % block_size) * row_stride + head_offset;
            k[c] = load16(k_cache + offset);
            v[c] = load16(v_cache + offset);
        } else {
            k[c] = zero16<T>();
            v[c] = zero16<T>();
        }
    }
}

template <typename T, int D, int GP>
__device__ __forceinline__ void decode_attn(const T* __restrict__ q, const T* __restrict__ k_cache,
                                            const T* __restrict__ v_cache, const int* __restrict__ block_table,
                                            const int* __restrict__ seq_lens, T* __restrict__ out,
                                            float* __restrict__ part_o, float* __restrict__ part_lse,
                                            int num_kv_heads, int group, int block_size, int max_blocks,
                                            int tokens_per_split, int num_splits, float scale_log2) {
    constexpr int VEC = Vec16<T>::N;
    constexpr int TPT = D / VEC;  // threads per token row
    static_assert(D % VEC == 0 && TPT <= 32 && 32 % TPT == 0, "a token row must map onto lanes of one warp");
    constexpr int NG = kThreads / TPT;  // token groups per block
    // Tokens per group per step: 4 keeps enough loads in flight; 2 at GP=8, where q and the accumulators
    // (2 x GP x VEC floats) already take most of the registers.
    constexpr int C = GP >= 8 ? 2 : 4;
    constexpr int STEP = NG * C;

    __shared__ float s_m[NG][GP];
    __shared__ float s_l[NG][GP];
    __shared__ float s_acc[NG][D];

    const int head_chunks = (group + GP - 1) / GP;
    const int kvh = blockIdx.x / head_chunks;
    const int chunk = blockIdx.x % head_chunks;
    const int b = blockIdx.y;
    const int split = blockIdx.z;
    const int num_q_heads = num_kv_heads * group;
    const int head0 = kvh * group + chunk * GP;          // first query head of this block
    const int heads = min(GP, group - chunk * GP);       // active query heads (the rest of the tile is padding)

    const int seq_len = seq_lens[b];
    const int start = split * tokens_per_split;
    const int end = min(seq_len, start + tokens_per_split);
    if (start >= end) return;  // a split past this sequence's end: uniform over the block, before any barrier

    const int grp = threadIdx.x / TPT;
    const int lig = threadIdx.x % TPT;
    const int d0 = lig * VEC;  // this thread's slice [d0, d0 + VEC) of the head dim

    float qf[GP][VEC];  // q pre-scaled by scale * log2(e): scores come out in base 2
#pragma unroll
    for (int g = 0; g < GP; ++g) {
        if (g < heads) {
            const Vec16<T> qv = load16(q + ((long long)b * num_q_heads + head0 + g) * D + d0);
#pragma unroll
            for (int i = 0; i < VEC; ++i) qf[g][i] = to_float(qv.v[i]) * scale_log2;
        } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) qf[g][i] = 0.0f;
        }
    }
    float m[GP], l[GP], acc[GP][VEC];
#pragma unroll
    for (int g = 0; g < GP; ++g) {
        m[g] = neg_inf();
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[g][i] = 0.0f;
    }

    const int* pages = block_table + (long long)b * max_blocks;
    const long long row_stride = (long long)num_kv_heads * D;  // elements from one token to the next in a page
    const long long page_stride = row_stride * block_size;
    const long long head_offset = (long long)kvh * D + d0;

    Vec16<T> k_cur[C], v_cur[C], k_next[C], v_next[C];
    load_tokens<T, C>(k_cache, v_cache, pages, start + grp * C, end, block_size, page_stride, row_stride,
                      head_offset, k_cur, v_cur);
    // Same trip count for every thread: the shuffles below need all 32 lanes of a warp.
    for (int step = start; step < end; step += STEP) {
        const int first = step + grp * C;
        load_tokens<T, C>(k_cache, v_cache, pages, first + STEP, end, block_size, page_stride, row_stride,
                          head_offset, k_next, v_next);

        float s[GP][C];
#pragma unroll
        for (int c = 0; c < C; ++c) {
            float kf[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) kf[i] = to_float(k_cur[c].v[i]);
#pragma unroll
            for (int g = 0; g < GP; ++g) {
                float dot = 0.0f;
#pragma unroll
                for (int i = 0; i < VEC; ++i) dot = fmaf(qf[g][i], kf[i], dot);
                s[g][c] = dot;
            }
        }
#pragma unroll
        for (int offset = TPT / 2; offset > 0; offset >>= 1) {
#pragma unroll
            for (int g = 0; g < GP; ++g) {
#pragma unroll
                for (int c = 0; c < C; ++c) s[g][c] += __shfl_xor_sync(0xffffffffu, s[g][c], offset);
            }
        }

        // Online softmax: s becomes p = exp2(s - m_new); tokens at or past `end` get p = 0.
#pragma unroll
        for (int g = 0; g < GP; ++g) {
            float step_max = neg_inf();
#pragma unroll
            for (int c = 0; c < C; ++c) {
                if (first + c < end) step_max = fmaxf(step_max, s[g][c]);
            }
            const float m_new = fmaxf(m[g], step_max);
            const float m_use = m_new == neg_inf() ? 0.0f : m_new;  // a group with no token yet: avoid -inf - -inf
            const float alpha = exp2f(m[g] - m_use);
            l[g] *= alpha;
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[g][i] *= alpha;
#pragma unroll
            for (int c = 0; c < C; ++c) {
                s[g][c] = first + c < end ? exp2f(s[g][c] - m_use) : 0.0f;
                l[g] += s[g][c];
            }
            m[g] = m_new;
        }
#pragma unroll
        for (int c = 0; c < C; ++c) {
            float vf[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) vf[i] = to_float(v_cur[c].v[i]);
#pragma unroll
            for (int g = 0; g < GP; ++g) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[g][i] = fmaf(s[g][c], vf[i], acc[g][i]);
            }
        }
#pragma unroll
        for (int c = 0; c < C; ++c) {
            k_cur[c] = k_next[c];
            v_cur[c] = v_next[c];
        }
    }

    // Merge the NG token groups: M = max_j m_j, L = sum_j 2^(m_j - M) l_j, O = sum_j 2^(m_j - M) acc_j / L.
    // Group 0 holds token `start`, so M is finite; a group that saw no token has m = -inf and weight 0.
    if (lig == 0) {
#pragma unroll
        for (int g = 0; g < GP; ++g) {
            s_m[grp][g] = m[g];
            s_l[grp][g] = l[g];
        }
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < GP; ++g) {
        if (g < heads) {  // uniform over the block: the barriers inside are safe
            float m_all = neg_inf();
#pragma unroll
            for (int j = 0; j < NG; ++j) m_all = fmaxf(m_all, s_m[j][g]);
            const float w = m[g] == neg_inf() ? 0.0f : exp2f(m[g] - m_all);
#pragma unroll
            for (int i = 0; i < VEC; ++i) s_acc[grp][d0 + i] = acc[g][i] * w;
            __syncthreads();
            float l_all = 0.0f;
#pragma unroll
            for (int j = 0; j < NG; ++j) {
                const float mj = s_m[j][g];
                if (mj != neg_inf()) l_all += exp2f(mj - m_all) * s_l[j][g];
            }
            const long long row = (long long)b * num_q_heads + head0 + g;
            for (int d = threadIdx.x; d < D; d += kThreads) {
                float o = 0.0f;
#pragma unroll
                for (int j = 0; j < NG; ++j) o += s_acc[j][d];
                o /= l_all;
                if (num_splits == 1) {
                    out[row * D + d] = from_float<T>(o);
                } else {
                    part_o[(row * num_splits + split) * D + d] = o;
                }
            }
            if (num_splits > 1 && threadIdx.x == 0) part_lse[row * num_splits + split] = m_all + log2f(l_all);
            __syncthreads();  // s_acc is rewritten for the next head
        }
    }
}

// Merge of the splits: out[b, h] = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M) over the splits that hold tokens of
// sequence b (the first ceil(seq_len / tokens_per_split)). Grid (Hq, B), any block size.
template <typename T>
__device__ __forceinline__ void decode_attn_reduce(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                                                   const int* __restrict__ seq_lens, T* __restrict__ out,
                                                   int num_q_heads, int head_dim, int tokens_per_split,
                                                   int num_splits) {
    const int h = blockIdx.x;
    const int b = blockIdx.y;
    const int n_valid = min(num_splits, (seq_lens[b] + tokens_per_split - 1) / tokens_per_split);
    const long long row = (long long)b * num_q_heads + h;
    const float* lse = part_lse + row * num_splits;
    float m_all = neg_inf();
    for (int s = 0; s < n_valid; ++s) m_all = fmaxf(m_all, lse[s]);
    float l_all = 0.0f;
    for (int s = 0; s < n_valid; ++s) l_all += exp2f(lse[s] - m_all);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < n_valid; ++s) o += exp2f(lse[s] - m_all) * part_o[(row * num_splits + s) * head_dim + d];
        out[row * head_dim + d] = from_float<T>(o / l_all);
    }
}

}  // namespace

#define TOKPROF_DECODE_ATTN(SUFFIX, T, D, GP)                                                                        \
    extern "C" __global__ void __launch_bounds__(kThreads, 2) decode_attn_d##D##_g##GP##_##SUFFIX(                      \
        const T* q, const T* k_cache, const T* v_cache, const int* block_table, const int* seq_lens, T* out,         \
        float* part_o, float* part_lse, int num_kv_heads, int group, int block_size, int max_blocks,                 \
        int tokens_per_split, int num_splits, float scale_log2) {                                                    \
        decode_attn<T, D, GP>(q, k_cache, v_cache, block_table, seq_lens, out, part_o, part_lse, num_kv_heads,      \
                              group, block_size, max_blocks, tokens_per_split, num_splits, scale_log2);              \
    }

#define TOKPROF_DECODE_ATTN_DTYPE(SUFFIX, T)                                                                         \
    TOKPROF_DECODE_ATTN(SUFFIX, T, 64, 1)                                                                            \
    TOKPROF_DECODE_ATTN(SUFFIX, T, 64, 2)                                                                            \
    TOKPROF_DECODE_ATTN(SUFFIX, T, 64, 4)                                                                            \
    TOKPROF_DECODE_ATTN(SUFFIX, T, 64, 8)                                                                            \
    TOKPROF_DECODE_ATTN(SUFFIX, T, 128, 1)                                                                           \
    TOKPROF_DECODE_ATTN(SUFFIX, T, 128, 2)                                                                           \
    TOKPROF_DECODE_ATTN(SUFFIX, T, 128, 4)                                                                           \
    TOKPROF_DECODE_ATTN(SUFFIX, T, 128, 8)                                                                           \
    extern "C" __global__ void decode_attn_reduce_##SUFFIX(const float* part_o, const float* part_lse,              \
                                                           const int* seq_lens, T* out, int num_q_heads,             \
                                                           int head_dim, int tokens_per_split, int num_splits) {     \
        decode_attn_reduce<T>(part_o, part_lse, seq_lens, out, num_q_heads, head_dim, tokens_per_split, num_splits); \
    }

TOKPROF_DECODE_ATTN_DTYPE(f32, float)
TOKPROF_DECODE_ATTN_DTYPE(f16, __half)
TOKPROF_DECODE_ATTN_DTYPE(bf16, __nv_bfloat16)
