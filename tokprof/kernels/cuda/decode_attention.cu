// Paged decode attention (one query token per sequence, grouped-query attention) on CUDA cores.
//   q (B, Hq, D); k_cache, v_cache (num_blocks, BS, Hkv, D); block_table (B, max_blocks) int32;
//   seq_lens (B,) int32; out (B, Hq, D); all row-major. Token t of sequence b lives in page
//   block_table[b, t / BS] at row t % BS. Query head h reads KV head h / (Hq / Hkv).
//
// Memory-bound, and at H200 bandwidth also issue-bound: an SM must stream a 512-byte K+V row (D=128, 16-bit) every
// ~28 clocks, ~111 warp-instructions on its 4 schedulers. So the loop is built to spend few instructions per row:
//   * one thread block serves up to GP query heads of one KV head (GP = 1, 2, 4, 8; larger groups take several
//     blocks), so each K/V byte is read once; TPT = D / VEC threads share a token's row, each holding one 16-byte
//     vector of it (VEC = 8 halves or 4 floats): every K/V access is one 128-bit load;
//   * the page size BS is a template constant (16 or 32): page and row of a token are a shift and a mask, and a
//     group's C tokens always sit in one page, so one page id serves C tokens; page ids are loaded two steps ahead
//     into a register, never as a dependent load in front of the K/V loads that need them;
//   * the C x GP partial dot products of a group are summed over its TPT lanes by a reduce-scatter (each lane ends
//     with N / TPT fully summed scores instead of all N), so each score's exp2 is computed in one lane (one MUFU per
//     score, not TPT), and the probabilities are all-gathered back. No selects are needed: lane L's register slot
//     i holds item i ^ mask(L) (an item is a (token, query head) pair; the lane loads its tokens and q heads in that
//     permuted order), which makes every exchange "add my slot j to my partner's slot j + n/2";
//   * the running max is lazy: a step whose scores all stay at or below the running max (nearly every step after
//     the first few) skips the max, the rescale of the accumulators and their exps; a warp vote picks the path;
//   * the next step's K/V loads are issued before the current step's math, in two register buffers used in turn
//     (no copies); full steps run without bounds checks, only the last, partial one masks tokens.
// At the end the NG token groups of the block are merged through shared memory.
// What the SASS budget does not show: bytes in flight. One step per block is loading while the previous one is used
// (STEP rows: 16 KB at D=128 in 16-bit for GP <= 4, 8 KB at GP = 8), 2 blocks per SM (registers), so ~32 KB (16 KB at
// GP = 8) per SM against the ~25-35 KB that HBM latency x an H200 SM's share of bandwidth asks for: measure there.
//
// Split-KV (flash-decoding): blockIdx.z takes tokens [z * tokens_per_split, ...), tokens_per_split a multiple of 64
// (of every instance's step). With one split the block writes `out`; with several it writes fp32 partials part_o
// (B, Hq, num_splits, D) and their base-2 log-sum-exp part_lse (B, Hq, num_splits), merged by decode_attn_reduce.
// Grid: (Hkv * head_chunks, B, num_splits), 128 threads.
#include "common.cuh"

using namespace tokprof;

namespace {

constexpr int kThreads = 128;
constexpr unsigned kFullMask = 0xffffffffu;
// The running max before any token: far below any score of finite 16-bit or sane fp32 inputs (|q.k| << 1e30), but
// finite, so the first exps are exp2(-1e30 - s) = 0 rather than exp2(-inf - -inf) = NaN without a branch, and a token
// group that saw no token merges with weight 0.
constexpr float kNoMax = -1.0e30f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 2^x in one MUFU.EX2 (max relative error ~2^-22; results below 2^-126 flush to 0, which a probability can afford).
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else  // a host build of this file (tests/test_cuda_emulation.py runs the kernel's code on the CPU)
    return exp2f(x);
#endif
}

constexpr int ilog2(int x) { return x <= 1 ? 0 : 1 + ilog2(x / 2); }

// A 16-byte vector to floats, one instruction per element: bf16 is the top half of an fp32, so a 32-bit word of two
// bf16 gives its low element by a shift and its high one by a mask (element-wise access spends two per element).
__device__ __forceinline__ void to_floats(const Vec16<float>& x, float (&f)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = x.v[i];
}
__device__ __forceinline__ void to_floats(const Vec16<__half>& x, float (&f)[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(x.v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 t = __half22float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}
__device__ __forceinline__ void to_floats(const Vec16<__nv_bfloat16>& x, float (&f)[8]) {
    const unsigned* w = reinterpret_cast<const unsigned*>(x.v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// The compile-time shape of one instance: see the file comment.
template <typename T, int D, int GP, int BS> struct Tile {
    static constexpr int VEC = Vec16<T>::N;            // elements per 16-byte vector
    static constexpr int TPT = D / VEC;                // threads per token row
    static constexpr int NG = kThreads / TPT;          // token groups per block
    // Tokens per group per step: 4 keeps enough loads in flight; 2 at GP=8, where q and the accumulators
    // (2 x GP x VEC floats) already take most of the registers.
    static constexpr int C = GP >= 8 ? 2 : 4;
    static constexpr int STEP = NG * C;                // tokens per block per step
    static constexpr int N = C * GP;                   // items (token, query head) per group per step
    static constexpr int LOG_GP = ilog2(GP);
    static constexpr int LOG_BS = ilog2(BS);
    static constexpr int SCATTER = ilog2(N) < ilog2(TPT) ? ilog2(N) : ilog2(TPT);  // reduce-scatter stages
    static constexpr int NK = N >> SCATTER;            // summed scores a lane holds after the scatter
    static_assert(D % VEC == 0 && TPT <= 32 && 32 % TPT == 0, "a token row must map onto lanes of one warp");
    static_assert((1 << LOG_GP) == GP && (1 << LOG_BS) == BS, "GP and BS must be powers of two");
    static_assert(BS % C == 0, "a group's C tokens must sit in one page");
    static_assert(64 % STEP == 0, "splits start on a step: tokens_per_split is a multiple of 64");
};

// K and V of one group's C tokens: `first` (a multiple of C) in page `page`; slot c holds token first + (c ^ tmask).
// MASKED: tokens at or past `end` load zeros (a zero V row keeps p * v finite whatever the unused rows hold).
template <typename T, int C, int LOG_BS, bool MASKED>
__device__ __forceinline__ void load_step(const T* __restrict__ k_head, const T* __restrict__ v_head, int page,
                                          int first, int end, int tmask, long long page_stride, int row_stride,
                                          const int (&row_off)[C], Vec16<T> (&k)[C], Vec16<T> (&v)[C]) {
    const long long base = (long long)page * page_stride + (long long)((first & ((1 << LOG_BS) - 1)) * row_stride);
#pragma unroll
    for (int c = 0; c < C; ++c) {
        if (!MASKED || first + (c ^ tmask) < end) {
            k[c] = load16(k_head + base + row_off[c]);
            v[c] = load16(v_head + base + row_off[c]);
        } else {
#pragma unroll
            for (int i = 0; i < Vec16<T>::N; ++i) {
                k[c].v[i] = from_float<T>(0.0f);
                v[c].v[i] = from_float<T>(0.0f);
            }
        }
    }
}

// One step of one group: scores of its C tokens x GP heads, online softmax, accumulation of p * V.
// Slot (c, g) = index c * GP + g holds item (c, g) ^ mask: token c ^ tmask, head g ^ hmask (q, acc, m and l use the
// same head order, so everything a lane keeps is consistent; only the final merge undoes the permutation).
template <typename T, int D, int GP, int BS, bool MASKED>
__device__ __forceinline__ void attend_step(const Vec16<T> (&k)[Tile<T, D, GP, BS>::C],
                                            const Vec16<T> (&v)[Tile<T, D, GP, BS>::C],
                                            const float (&qf)[GP][Tile<T, D, GP, BS>::VEC], int first, int end,
                                            int tmask, float (&m)[GP], float (&l)[GP],
                                            float (&acc)[GP][Tile<T, D, GP, BS>::VEC]) {
    using S = Tile<T, D, GP, BS>;
    constexpr int VEC = S::VEC, C = S::C, N = S::N, TPT = S::TPT, SCATTER = S::SCATTER, NK = S::NK;

    float sc[N];  // this lane's partial dot products over its VEC elements
#pragma unroll
    for (int c = 0; c < C; ++c) {
        float kf[VEC];
        to_floats(k[c], kf);
#pragma unroll
        for (int g = 0; g < GP; ++g) {
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < VEC; ++i) dot = fmaf(qf[g][i], kf[i], dot);
            sc[c * GP + g] = dot;
        }
    }
    // Reduce-scatter over the TPT lanes: at each stage the partner (lane ^ o) holds in slot j + n/2 the item this
    // lane holds in slot j, so slot j adds it; n halves. Lane pairs compute a + b and b + a: bitwise equal sums.
#pragma unroll
    for (int stage = 0; stage < SCATTER; ++stage) {
        const int n = N >> stage, o = TPT >> (stage + 1);
#pragma unroll
        for (int j = 0; j < N / 2; ++j) {  // constant trip count, so both loops unroll (sc stays in registers)
            if (j < n / 2) sc[j] += __shfl_xor_sync(kFullMask, sc[j + n / 2], o);
        }
    }
    // Fewer items than lanes (N < TPT): the lanes that hold the same item sum their parts (butterfly).
#pragma unroll
    for (int o = TPT >> (SCATTER + 1); o > 0; o >>= 1) {
#pragma unroll
        for (int j = 0; j < NK; ++j) sc[j] += __shfl_xor_sync(kFullMask, sc[j], o);
    }
    // Slot j < NK now holds the full score of item j ^ mask: token (j >> LOG_GP) ^ tmask, and the head of slot
    // j % GP (the head bits of mask cancel), so its running max is m[j % GP].
    bool rises = false;
#pragma unroll
    for (int j = 0; j < NK; ++j) {
        if (MASKED && first + ((j >> S::LOG_GP) ^ tmask) >= end) sc[j] = neg_inf();  // exp2(-inf - m) = 0
        rises |= sc[j] > m[j % GP];
    }
    float p[N];
    if (!__any_sync(kFullMask, rises)) {
        // Common path: no score above its running max, so nothing is rescaled; one exp per score, then all-gather
        // (the scatter run backwards: slot j + n/2 is the partner's slot j).
#pragma unroll
        for (int j = 0; j < NK; ++j) p[j] = fast_exp2(sc[j] - m[j % GP]);
#pragma unroll
        for (int stage = SCATTER - 1; stage >= 0; --stage) {
            const int n = N >> stage, o = TPT >> (stage + 1);
#pragma unroll
            for (int j = 0; j < N / 2; ++j) {
                if (j < n / 2) p[j + n / 2] = __shfl_xor_sync(kFullMask, p[j], o);
            }
        }
    } else {
        // A new max somewhere in the warp (always at the first step): gather the scores, then every lane of a
        // group computes the same new max per head, rescales and exps all items (the same values in every lane).
#pragma unroll
        for (int stage = SCATTER - 1; stage >= 0; --stage) {
            const int n = N >> stage, o = TPT >> (stage + 1);
#pragma unroll
            for (int j = 0; j < N / 2; ++j) {
                if (j < n / 2) sc[j + n / 2] = __shfl_xor_sync(kFullMask, sc[j], o);
            }
        }
#pragma unroll
        for (int g = 0; g < GP; ++g) {
            float m_new = m[g];
#pragma unroll
            for (int c = 0; c < C; ++c) m_new = fmaxf(m_new, sc[c * GP + g]);
            const float alpha = fast_exp2(m[g] - m_new);  // 1 where the max held, 0 from kNoMax
            l[g] *= alpha;
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[g][i] *= alpha;
            m[g] = m_new;
#pragma unroll
            for (int c = 0; c < C; ++c) p[c * GP + g] = fast_exp2(sc[c * GP + g] - m_new);
        }
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
        float vf[VEC];
        to_floats(v[c], vf);
#pragma unroll
        for (int g = 0; g < GP; ++g) {
            l[g] += p[c * GP + g];
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[g][i] = fmaf(p[c * GP + g], vf[i], acc[g][i]);
        }
    }
}

template <typename T, int D, int GP, int BS>
__device__ __forceinline__ void decode_attn(const T* __restrict__ q, const T* __restrict__ k_cache,
                                            const T* __restrict__ v_cache, const int* __restrict__ block_table,
                                            const int* __restrict__ seq_lens, T* __restrict__ out,
                                            float* __restrict__ part_o, float* __restrict__ part_lse,
                                            int num_kv_heads, int group, int block_size, int max_blocks,
                                            int tokens_per_split, int num_splits, float scale_log2) {
    using S = Tile<T, D, GP, BS>;
    constexpr int VEC = S::VEC, TPT = S::TPT, NG = S::NG, C = S::C, STEP = S::STEP, N = S::N;

    __shared__ float s_m[NG][GP];
    __shared__ float s_l[NG][GP];
    __shared__ float s_acc[NG][D];

    if (block_size != BS) __trap();  // the wrapper picks the instance by block_size: a mismatch is a bug there

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
    // Slot-to-item permutation of this lane (see attend_step): stage s of the scatter pairs lanes that differ in
    // bit TPT >> (s + 1) and slots that differ in bit N >> (s + 1).
    int mask = 0;
#pragma unroll
    for (int stage = 0; stage < S::SCATTER; ++stage) {
        if (lig & (TPT >> (stage + 1))) mask |= N >> (stage + 1);
    }
    const int tmask = mask >> S::LOG_GP;  // token bits: slot c holds token c ^ tmask of the step
    const int hmask = mask & (GP - 1);    // head bits: slot g holds query head g ^ hmask of the tile

    float qf[GP][VEC];  // q pre-scaled by scale * log2(e): scores come out in base 2
#pragma unroll
    for (int g = 0; g < GP; ++g) {
        const int h = g ^ hmask;
        if (h < heads) {
            const Vec16<T> qv = load16(q + ((long long)b * num_q_heads + head0 + h) * D + d0);
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
        m[g] = kNoMax;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[g][i] = 0.0f;
    }

    const int* pages = block_table + (long long)b * max_blocks;
    const int row_stride = num_kv_heads * D;  // elements from one token to the next in a page
    const long long page_stride = (long long)row_stride * BS;
    const T* k_head = k_cache + (long long)kvh * D + d0;
    const T* v_head = v_cache + (long long)kvh * D + d0;
    int row_off[C];
#pragma unroll
    for (int c = 0; c < C; ++c) row_off[c] = (c ^ tmask) * row_stride;
    // The page of a group's first token; past the end, the page of the last token (a valid id, never used for a
    // load: masked loads skip those tokens).
    auto page_of = [&](int first) { return pages[min(first, end - 1) >> S::LOG_BS]; };

    Vec16<T> ka[C], va[C], kb[C], vb[C];  // two buffers: one step in use, the next one loading
    const int first0 = start + grp * C;
    if (start + STEP <= end) {
        load_step<T, C, S::LOG_BS, false>(k_head, v_head, page_of(first0), first0, end, tmask, page_stride,
                                          row_stride, row_off, ka, va);
    } else {
        load_step<T, C, S::LOG_BS, true>(k_head, v_head, page_of(first0), first0, end, tmask, page_stride,
                                         row_stride, row_off, ka, va);
    }
    int page_next = page_of(first0 + STEP);  // page ids are loaded one step before the K/V loads that use them

    // Step `s` from (kc, vc) while the loads of step s + STEP go to (kn, vn); `s + STEP <= end` (a full step).
    auto full_step = [&](const Vec16<T> (&kc)[C], const Vec16<T> (&vc)[C], Vec16<T> (&kn)[C], Vec16<T> (&vn)[C],
                         int s) {
        const int first = s + grp * C;
        const int first_next = first + STEP;
        if (s + 2 * STEP <= end) {
            load_step<T, C, S::LOG_BS, false>(k_head, v_head, page_next, first_next, end, tmask, page_stride,
                                              row_stride, row_off, kn, vn);
        } else {
            load_step<T, C, S::LOG_BS, true>(k_head, v_head, page_next, first_next, end, tmask, page_stride,
                                             row_stride, row_off, kn, vn);
        }
        page_next = page_of(first_next + STEP);
        attend_step<T, D, GP, BS, false>(kc, vc, qf, first, end, tmask, m, l, acc);
    };
    // Same trip count and branches for every thread of the block: the shuffles and votes need all 32 lanes.
    int s = start;
    for (;;) {
        if (s + STEP > end) {
            if (s < end) attend_step<T, D, GP, BS, true>(ka, va, qf, s + grp * C, end, tmask, m, l, acc);
            break;
        }
        full_step(ka, va, kb, vb, s);
        s += STEP;
        if (s + STEP > end) {
            if (s < end) attend_step<T, D, GP, BS, true>(kb, vb, qf, s + grp * C, end, tmask, m, l, acc);
            break;
        }
        full_step(kb, vb, ka, va, s);
        s += STEP;
    }

    // Merge the NG token groups: M = max_j m_j, L = sum_j 2^(m_j - M) l_j, O = sum_j 2^(m_j - M) acc_j / L.
    // Group 0 holds token `start`, so M is a real score; a group that saw no token has m = kNoMax and weight 0.
    // Lane 0 of a group has hmask = 0: its slot g is head g.
    if (lig == 0) {
#pragma unroll
        for (int g = 0; g < GP; ++g) {
            s_m[grp][g] = m[g];
            s_l[grp][g] = l[g];
        }
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < GP; ++h) {
        if (h < heads) {  // uniform over the block: the barriers inside are safe
            float m_all = neg_inf();
#pragma unroll
            for (int j = 0; j < NG; ++j) m_all = fmaxf(m_all, s_m[j][h]);
            const float w = exp2f(s_m[grp][h] - m_all);
            const int slot = h ^ hmask;  // this lane's slot of head h, picked without a dynamic register index
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                float a = acc[0][i];
#pragma unroll
                for (int g = 1; g < GP; ++g) a = slot == g ? acc[g][i] : a;
                s_acc[grp][d0 + i] = a * w;
            }
            __syncthreads();
            float l_all = 0.0f;
#pragma unroll
            for (int j = 0; j < NG; ++j) l_all += exp2f(s_m[j][h] - m_all) * s_l[j][h];
            const long long row = (long long)b * num_q_heads + head0 + h;
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

#define TOKPROF_DECODE_ATTN(SUFFIX, T, D, GP, BS)                                                                    \
    extern "C" __global__ void __launch_bounds__(kThreads, 2) decode_attn_d##D##_g##GP##_b##BS##_##SUFFIX(          \
        const T* q, const T* k_cache, const T* v_cache, const int* block_table, const int* seq_lens, T* out,         \
        float* part_o, float* part_lse, int num_kv_heads, int group, int block_size, int max_blocks,                 \
        int tokens_per_split, int num_splits, float scale_log2) {                                                    \
        decode_attn<T, D, GP, BS>(q, k_cache, v_cache, block_table, seq_lens, out, part_o, part_lse, num_kv_heads,  \
                                  group, block_size, max_blocks, tokens_per_split, num_splits, scale_log2);          \
    }

// Page sizes compiled: 16 (vLLM's and tokprof's default) and 32. CUDA_BLOCK_SIZES in decode_attention.py lists them.
#define TOKPROF_DECODE_ATTN_D_G(SUFFIX, T, D, GP)                                                                    \
    TOKPROF_DECODE_ATTN(SUFFIX, T, D, GP, 16)                                                                        \
    TOKPROF_DECODE_ATTN(SUFFIX, T, D, GP, 32)

#define TOKPROF_DECODE_ATTN_DTYPE(SUFFIX, T)                                                                         \
    TOKPROF_DECODE_ATTN_D_G(SUFFIX, T, 64, 1)                                                                        \
    TOKPROF_DECODE_ATTN_D_G(SUFFIX, T, 64, 2)                                                                        \
    TOKPROF_DECODE_ATTN_D_G(SUFFIX, T, 64, 4)                                                                        \
    TOKPROF_DECODE_ATTN_D_G(SUFFIX, T, 64, 8)                                                                        \
    TOKPROF_DECODE_ATTN_D_G(SUFFIX, T, 128, 1)                                                                       \
    TOKPROF_DECODE_ATTN_D_G(SUFFIX, T, 128, 2)                                                                       \
    TOKPROF_DECODE_ATTN_D_G(SUFFIX, T, 128, 4)                                                                       \
    TOKPROF_DECODE_ATTN_D_G(SUFFIX, T, 128, 8)                                                                       \
    extern "C" __global__ void decode_attn_reduce_##SUFFIX(const float* part_o, const float* part_lse,              \
                                                           const int* seq_lens, T* out, int num_q_heads,             \
                                                           int head_dim, int tokens_per_split, int num_splits) {     \
        decode_attn_reduce<T>(part_o, part_lse, seq_lens, out, num_q_heads, head_dim, tokens_per_split, num_splits); \
    }

TOKPROF_DECODE_ATTN_DTYPE(f32, float)
TOKPROF_DECODE_ATTN_DTYPE(f16, __half)
TOKPROF_DECODE_ATTN_DTYPE(bf16, __nv_bfloat16)
