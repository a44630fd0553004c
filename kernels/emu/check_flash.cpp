// Runs the tensor-core prefill kernel (flash_attn_d{64,128}_{bf16,f16}, kernels/attention.cu) on the
// CPU through kernels/emu/simt.hpp and checks it against an f64 reference, as tests/ops.rs does on a
// GPU: the largest error at most twice a naive same-dtype implementation's. Cases: causal and not,
// sequences of several lengths in one batch (tiles cut mid-sequence, one-row sequences), grouped-query
// heads, and keys through a shuffled block table after a cached prefix (chunked prefill). Also
// asserts that ldmatrix met no shared-memory bank conflict.
//
// Built and run by tests/kernel_emu.rs (g++ -std=c++20 -O2 -DHIGHRISE_EMU; the tile shape through
// -DFA128_WARPS=... as scripts/gpu-sweep.sh varies it). Prints one line per case; exits 1 on a failure.

#include "simt.hpp"
#include "../common.cuh"
#include "../attention.cu"

#include <string>

namespace {

uint64_t rng = 0x9e3779b97f4a7c15ull;
double uniform() {  // [-1, 1)
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / (double)(1ull << 52) - 1.0;
}

struct Seq {
    u32 q_len, context;  // the last q_len of `context` tokens are the queries
};

double round_to(double x, bool bf16) {
    const u16 h = bf16 ? emu::f32_to_bf16((float)x) : emu::f32_to_f16((float)x);
    return emu::half_to_f32(h, bf16);
}

struct Case {
    std::string name;
    u32 d, hq, hkv;
    bool bf16, causal, paged;
    std::vector<Seq> seqs;
};

// The tiles flash_attn takes, as crates/highrise-cuda/src/flash.rs cuts them.
std::vector<u32> tiles_for(const Case& c, u32 tile_rows, const std::vector<u32>& kbase) {
    std::vector<u32> tiles;
    u32 q_start = 0;
    for (size_t s = 0; s < c.seqs.size(); s++) {
        const u32 q_len = c.seqs[s].q_len, pos0 = c.seqs[s].context - q_len;
        for (u32 r0 = 0; r0 < q_len; r0 += tile_rows) {
            const u32 rows = std::min(tile_rows, q_len - r0);
            const u32 pos = c.causal ? pos0 + r0 : pos0 + q_len, keys = c.causal ? pos0 + r0 + rows : pos0 + q_len;
            tiles.insert(tiles.end(), {q_start + r0, rows, pos, kbase[s], keys});
        }
        q_start += q_len;
    }
    return tiles;
}

bool run(const Case& c) {
    const u32 d = c.d, hq = c.hq, hkv = c.hkv, block_size = 16;
    const u32 warps = d == 64 ? FA64_WARPS : FA128_WARPS, mt = d == 64 ? FA64_MT : FA128_MT;
    const u32 keys_tile = d == 64 ? FA64_KEYS : FA128_KEYS, tile_rows = 16 * mt * warps;
    u32 t = 0;
    for (auto& s : c.seqs) t += s.q_len;
    // Each sequence's keys and values (its whole context), rounded to the dtype, and their rows in
    // k/v: contiguous, or in shuffled blocks of the paged cache [blocks, hkv, block_size, d].
    std::vector<std::vector<double>> keys(c.seqs.size()), vals(c.seqs.size());
    std::vector<u32> kbase, table;
    u32 total_blocks = 0, key_rows = 0;
    for (auto& s : c.seqs) total_blocks += (s.context + block_size - 1) / block_size;
    std::vector<u32> order(total_blocks);
    for (u32 i = 0; i < total_blocks; i++) order[i] = i;
    for (u32 i = total_blocks; i > 1; i--) std::swap(order[i - 1], order[(u32)((uniform() + 1.0) / 2.0 * i) % i]);
    for (size_t s = 0; s < c.seqs.size(); s++) {
        const u32 n = c.seqs[s].context;
        for (u32 i = 0; i < n * hkv * d; i++) {
            keys[s].push_back(round_to(uniform(), c.bf16));
            vals[s].push_back(round_to(uniform(), c.bf16));
        }
        if (c.paged) {
            kbase.push_back((u32)table.size());
            for (u32 b = 0; b < (n + block_size - 1) / block_size; b++) table.push_back(order[table.size()]);
        } else {
            kbase.push_back(key_rows);
            key_rows += n;
        }
    }
    // Contiguous prompts: the keys are the queries' own rows (context == q_len).
    const size_t kv_elems = c.paged ? (size_t)total_blocks * hkv * block_size * d : (size_t)key_rows * hkv * d;
    std::vector<u16> k(kv_elems, 0x7fc0), v(kv_elems, 0x7fc0);  // NaN where no key is
    for (size_t s = 0; s < c.seqs.size(); s++)
        for (u32 j = 0; j < c.seqs[s].context; j++)
            for (u32 g = 0; g < hkv; g++)
                for (u32 x = 0; x < d; x++) {
                    const size_t at = c.paged ? (((size_t)table[kbase[s] + j / block_size] * hkv + g) * block_size + j % block_size) * d + x
                                              : (((size_t)kbase[s] + j) * hkv + g) * d + x;
                    const double kk = keys[s][((size_t)j * hkv + g) * d + x], vv = vals[s][((size_t)j * hkv + g) * d + x];
                    k[at] = c.bf16 ? emu::f32_to_bf16((float)kk) : emu::f32_to_f16((float)kk);
                    v[at] = c.bf16 ? emu::f32_to_bf16((float)vv) : emu::f32_to_f16((float)vv);
                }
    std::vector<double> qd((size_t)t * hq * d);
    std::vector<u16> q(qd.size());
    for (size_t i = 0; i < qd.size(); i++) {
        qd[i] = round_to(2.0 * uniform(), c.bf16);
        q[i] = c.bf16 ? emu::f32_to_bf16((float)qd[i]) : emu::f32_to_f16((float)qd[i]);
    }
    std::vector<u16> out((size_t)t * hq * d, 0x7fc0);
    const std::vector<u32> tiles = tiles_for(c, tile_rows, kbase);
    const float scale = 1.0f / std::sqrt((float)d), scale_log2 = scale * 1.4426950408889634f;
    const size_t smem = (size_t)(tile_rows + 2 * keys_tile) * d * 2;
    const u32* tab = c.paged ? table.data() : nullptr;
    const u32 bs = c.paged ? block_size : 0;
    emu::launch({(u32)tiles.size() / 5, hq, 1}, {32 * warps, 1, 1}, smem, [&] {
        if (d == 64 && c.bf16) flash_attn_d64_bf16(out.data(), q.data(), k.data(), v.data(), tiles.data(), tab, bs, hq, hkv, scale_log2);
        if (d == 64 && !c.bf16) flash_attn_d64_f16(out.data(), q.data(), k.data(), v.data(), tiles.data(), tab, bs, hq, hkv, scale_log2);
        if (d == 128 && c.bf16) flash_attn_d128_bf16(out.data(), q.data(), k.data(), v.data(), tiles.data(), tab, bs, hq, hkv, scale_log2);
        if (d == 128 && !c.bf16) flash_attn_d128_f16(out.data(), q.data(), k.data(), v.data(), tiles.data(), tab, bs, hq, hkv, scale_log2);
    });

    // The f64 reference and a naive same-dtype one (scores, probabilities and the output rounded).
    double err = 0, naive_err = 0, sq = 0;
    u32 row = 0;
    for (size_t s = 0; s < c.seqs.size(); s++) {
        const u32 q_len = c.seqs[s].q_len, ctx = c.seqs[s].context;
        for (u32 i = 0; i < q_len; i++, row++) {
            const u32 last = c.causal ? ctx - q_len + i : ctx - 1;
            for (u32 h = 0; h < hq; h++) {
                const u32 g = h / (hq / hkv);
                const double* qr = &qd[((size_t)row * hq + h) * d];
                std::vector<double> sc(last + 1), sn(last + 1);
                double mx = -INFINITY, mn = -INFINITY;
                for (u32 j = 0; j <= last; j++) {
                    double dot = 0;
                    for (u32 x = 0; x < d; x++) dot += qr[x] * keys[s][((size_t)j * hkv + g) * d + x];
                    sc[j] = dot * scale;
                    sn[j] = round_to(dot * scale, c.bf16);
                    mx = std::max(mx, sc[j]);
                    mn = std::max(mn, sn[j]);
                }
                double sum = 0, nsum = 0;
                for (u32 j = 0; j <= last; j++) {
                    sc[j] = std::exp(sc[j] - mx);
                    sn[j] = std::exp(sn[j] - mn);
                    sum += sc[j];
                    nsum += sn[j];
                }
                for (u32 x = 0; x < d; x++) {
                    double a = 0, na = 0;
                    for (u32 j = 0; j <= last; j++) {
                        const double vv = vals[s][((size_t)j * hkv + g) * d + x];
                        a += sc[j] / sum * vv;
                        na += round_to(sn[j] / nsum, c.bf16) * vv;
                    }
                    const double got = emu::half_to_f32(out[((size_t)row * hq + h) * d + x], c.bf16);
                    if (!std::isfinite(got)) {
                        std::printf("FAIL %s: row %u head %u dim %u is %g (unwritten?)\n", c.name.c_str(), row, h, x, got);
                        return false;
                    }
                    err = std::max(err, std::fabs(got - a));
                    naive_err = std::max(naive_err, std::fabs(round_to(na, c.bf16) - a));
                    sq += a * a;
                }
            }
        }
    }
    const double rms = std::sqrt(sq / ((double)t * hq * d));
    const bool ok = err <= 2.0 * naive_err + 1e-7 * rms;
    std::printf("%s %s: %u tiles of %u rows, max error %.3e, naive %s %.3e\n", ok ? "ok  " : "FAIL", c.name.c_str(),
                (u32)tiles.size() / 5, tile_rows, err, c.bf16 ? "bf16" : "f16", naive_err);
    return ok;
}

}  // namespace

int main() {
    std::printf("tile shapes: d64 %u warps x %u x 16 rows, %u keys; d128 %u warps x %u x 16 rows, %u keys\n", FA64_WARPS,
                FA64_MT, FA64_KEYS, FA128_WARPS, FA128_MT, FA128_KEYS);
    std::vector<Case> cases;
    for (u32 d : {64u, 128u})
        for (bool bf16 : {true, false}) {
            const std::string tag = std::string("d") + std::to_string(d) + (bf16 ? " bf16" : " f16");
            cases.push_back({tag + " causal, 3 prompts (1, 150, 37 rows), 4 heads over 2", d, 4, 2, bf16, true, false, {{1, 1}, {150, 150}, {37, 37}}});
            cases.push_back({tag + " full, 2 prompts (70, 129 rows), 2 heads over 1", d, 2, 1, bf16, false, false, {{70, 70}, {129, 129}}});
            cases.push_back({tag + " paged, chunks after cached prefixes (45 of 100, 2 of 19, 64 of 64)", d, 4, 2, bf16, true, true,
                             {{45, 100}, {2, 19}, {64, 64}}});
        }
    bool ok = true;
    for (auto& c : cases) ok &= run(c);
    const unsigned long long conflicts = emu::bank_conflicts, loads = emu::ldmatrix_count;
    std::printf("ldmatrix: %llu matrices loaded, %llu bank conflicts\n", loads, conflicts);
    if (conflicts) {
        std::printf("FAIL shared-memory bank conflicts\n");
        ok = false;
    }
    return ok ? 0 : 1;
}
