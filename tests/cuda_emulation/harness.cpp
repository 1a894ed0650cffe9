// The CUDA decode-attention kernel's own code (tokprof/kernels/cuda/decode_attention.cu), compiled for the host with
// shim.h and run on the CPU: 128 threads per block, shuffles and votes through per-warp barriers. Each case draws
// q, K, V, scatters the pages over the cache (a spare block_table column holds -1), runs every block of the grid
// and the split reduction, and compares with a float64 softmax(q K^T / sqrt(D)) V. Prints one line per case; exit
// status 1 when a case is over its tolerance. Built and run by tests/test_cuda_emulation.py.
#include "shim.h"
#include "decode_attention.cu"
#include <random>
template <typename T, int D, int GP, int BS>
double run_case(int B, int Hq, int Hkv, std::vector<int> lens, int tokens_per_split, unsigned seed) {
    const int group = Hq / Hkv;
    int max_pages = 0;
    for (int n : lens) max_pages = std::max(max_pages, (n + BS - 1) / BS);
    const int max_blocks = max_pages + 1;
    const int num_blocks = B * max_pages + 3;
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    std::vector<T> q(B * Hq * D), k((size_t)num_blocks * BS * Hkv * D), v(k.size());
    std::vector<float> qf(q.size()), kf(k.size()), vf(k.size());
    for (size_t i = 0; i < q.size(); ++i) { q[i] = from_float<T>(nd(rng)); qf[i] = to_float(q[i]); }
    for (size_t i = 0; i < k.size(); ++i) { k[i] = from_float<T>(nd(rng)); kf[i] = to_float(k[i]);
                                            v[i] = from_float<T>(nd(rng)); vf[i] = to_float(v[i]); }
    std::vector<int> perm(num_blocks);
    for (int i = 0; i < num_blocks; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int> table(B * max_blocks, -1);
    int used = 0;
    for (int b = 0; b < B; ++b) for (int j = 0; j < (lens[b] + BS - 1) / BS; ++j) table[b * max_blocks + j] = perm[used++];
    const int capacity = max_blocks * BS;
    const int num_splits = (capacity + tokens_per_split - 1) / tokens_per_split;
    std::vector<T> out(B * Hq * D);
    std::vector<float> part_o((size_t)B * Hq * num_splits * D), part_lse((size_t)B * Hq * num_splits);
    const int head_chunks = (group + GP - 1) / GP;
    const float scale = 1.0f / std::sqrt((float)D);
    for (int z = 0; z < num_splits; ++z) for (int y = 0; y < B; ++y) for (int x = 0; x < Hkv * head_chunks; ++x) {
        std::barrier<> block(128), w0(32), w1(32), w2(32), w3(32);
        Sync sync{&block, {&w0, &w1, &w2, &w3}, {}, {}};
        g_sync = &sync;
        std::vector<std::thread> threads;
        for (int t = 0; t < 128; ++t) threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            blockIdx = {x, y, z};
            decode_attn<T, D, GP, BS>(q.data(), k.data(), v.data(), table.data(), lens.data(), out.data(),
                                      part_o.data(), part_lse.data(), Hkv, group, BS, max_blocks, tokens_per_split,
                                      num_splits, scale * 1.4426950408889634f);
        });
        for (auto& th : threads) th.join();
    }
    if (num_splits > 1) {
        for (int y = 0; y < B; ++y) for (int x = 0; x < Hq; ++x) {
            threadIdx = {0, 0, 0}; blockIdx = {x, y, 0}; blockDim = {1, 1, 1};
            decode_attn_reduce<T>(part_o.data(), part_lse.data(), lens.data(), out.data(), Hq, D, tokens_per_split,
                                  num_splits);
            blockDim = {128, 1, 1};
        }
    }
    double worst = 0;
    for (int b = 0; b < B; ++b) for (int h = 0; h < Hq; ++h) {
        const int kvh = h / group;
        std::vector<double> s(lens[b]);
        double mx = -1e300;
        for (int t = 0; t < lens[b]; ++t) {
            const size_t row = ((size_t)table[b * max_blocks + t / BS] * BS + t % BS) * Hkv * D + (size_t)kvh * D;
            double dot = 0;
            for (int d = 0; d < D; ++d) dot += (double)qf[(b * Hq + h) * D + d] * kf[row + d];
            s[t] = dot * scale; mx = std::max(mx, s[t]);
        }
        double l = 0;
        for (int t = 0; t < lens[b]; ++t) { s[t] = std::exp(s[t] - mx); l += s[t]; }
        for (int d = 0; d < D; ++d) {
            double o = 0;
            for (int t = 0; t < lens[b]; ++t) {
                const size_t row = ((size_t)table[b * max_blocks + t / BS] * BS + t % BS) * Hkv * D + (size_t)kvh * D;
                o += s[t] * vf[row + d];
            }
            worst = std::max(worst, std::abs(o / l - (double)to_float(out[(b * Hq + h) * D + d])));
        }
    }
    return worst;
}
int main() {
    struct R { const char* name; double err; double tol; };
    std::vector<R> rs;
    rs.push_back({"f32 d128 g4 b16 one split", run_case<float, 128, 4, 16>(3, 8, 2, {50, 16, 3}, 1 << 20, 1), 1e-5});
    rs.push_back({"f32 d128 g4 b16 splits of 64", run_case<float, 128, 4, 16>(3, 8, 2, {150, 64, 129}, 64, 2), 1e-5});
    rs.push_back({"f32 d64 g8 b32 G=16", run_case<float, 64, 8, 32>(2, 16, 1, {300, 9}, 128, 3), 1e-5});
    rs.push_back({"f32 d128 g1 b32", run_case<float, 128, 1, 32>(2, 2, 2, {1, 97}, 1 << 20, 4), 1e-5});
    rs.push_back({"bf16 d128 g4 b16 G=3", run_case<__nv_bfloat16, 128, 4, 16>(2, 6, 2, {200, 33}, 64, 5), 8e-3});
    rs.push_back({"f16 d64 g2 b16", run_case<__half, 64, 2, 16>(3, 4, 2, {64, 96, 129}, 1 << 20, 6), 1e-3});
    rs.push_back({"bf16 d128 g8 b32 long", run_case<__nv_bfloat16, 128, 8, 32>(1, 8, 1, {1000}, 1 << 20, 7), 8e-3});
    int bad = 0;
    for (auto& r : rs) { std::printf("%-32s max abs err %.3g (tol %.0e)\n", r.name, r.err, r.tol); bad += !(r.err <= r.tol); }
    return bad ? 1 : 0;
}
