// Runs the tensor-core attention kernels of kernels/attention.cu on the CPU through
// kernels/emu/simt.hpp and checks them against an f64 reference, as tests/ops.rs does on a GPU: the
// largest error at most twice a naive same-dtype implementation's.
// - prefill, flash_attn_d{64,128}_{bf16,f16} and (wgmma) flash_attn_wg_*, _wgp_*, _ws_*: causal and not, sequences of several lengths in one
//   batch (tiles cut mid-sequence, one-row sequences), grouped-query heads, and keys through a
//   shuffled block table after a cached prefix (chunked prefill); Gemma 2's soft-capped scores and
//   sliding windows (shorter than the prompts, so whole key tiles are skipped);
// - decode, decode_attn_* (merging its slices itself, or with attn_combine_*): a batch of sequences (1 to 1000 keys, 1 to 4 new
//   tokens each) through a shuffled block table, groups of 3, 4 and 8 query heads, the context cut
//   into one slice or many; soft-capped and windowed too.
// Also asserts that ldmatrix met no shared-memory bank conflict.
//
// Built and run by tests/kernel_emu.rs (g++ -std=c++20 -O2; the prefill tile shape through
// -DFA128_WARPS=... as scripts/gpu-sweep.sh varies it). Prints one line per case; exits 1 on a failure.

#include "check.hpp"
#include "../common.cuh"
#include "../attention.cu"

#include <string>

namespace {

using check::round_to;
using check::uniform;

struct Seq {
    u32 q_len, context;  // the last q_len of `context` tokens are the queries
};

struct Case {
    std::string name;
    u32 d, hq, hkv;
    bool bf16, causal, paged;
    std::vector<Seq> seqs;
    // The Scores op's modifiers (Gemma 2): scores soft-capped (cap tanh(score / cap)) where > 0, and a
    // row seeing only its last `window` keys where > 0.
    float softcap = 0.0f;
    u32 window = 0;
    // ALiBi's largest bias (Bloom's and MPT's 8) where > 0: head h's slope times each key's distance
    // back from its row's last key, added after the cap.
    float alibi = 0.0f;
    // Tokens per block of the paged cache: 16 as the engine's (each 16-key chunk of the decode
    // kernel within one block: its one-lookup copy), or another (chunks across blocks: its copy
    // of a lookup per row).
    u32 block_size = 16;
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

// ALiBi's slope of head h of hq, from Press et al.'s sequence as MPT writes it (not the kernels'
// form): the largest power of two n at most hq; 2^(-alibi i / n) for i = 1..n, then for hq > n the
// odd steps of the sequence for 2n heads, 2^(-alibi (2 i - 1) / 2n) for i = 1..hq - n.
double alibi_slope(double alibi, u32 h, u32 hq) {
    if (alibi == 0) return 0;
    u32 n = 1;
    while (2 * n <= hq) n *= 2;
    return h < n ? std::pow(2.0, -alibi * (h + 1) / n) : std::pow(2.0, -alibi * (2.0 * (h - n) + 1) / (2.0 * n));
}

// The output against the f64 reference and a naive same-dtype one (scores, probabilities and the
// output rounded); a line of report.
bool compare(const Case& c, const std::vector<std::vector<double>>& keys, const std::vector<std::vector<double>>& vals,
             const std::vector<double>& qd, const std::vector<u16>& out, u32 t, const std::string& what = "") {
    const u32 d = c.d, hq = c.hq, hkv = c.hkv;
    const float scale = 1.0f / std::sqrt((float)d);
    // The f64 reference and a naive same-dtype one (scores, probabilities and the output rounded).
    double err = 0, naive_err = 0, sq = 0;
    u32 row = 0;
    for (size_t s = 0; s < c.seqs.size(); s++) {
        const u32 q_len = c.seqs[s].q_len, ctx = c.seqs[s].context;
        for (u32 i = 0; i < q_len; i++, row++) {
            const u32 last = c.causal ? ctx - q_len + i : ctx - 1;
            const u32 first = c.window != 0 && last + 1 > c.window ? last + 1 - c.window : 0;
            for (u32 h = 0; h < hq; h++) {
                const u32 g = h / (hq / hkv);
                const double slope = alibi_slope(c.alibi, h, hq);
                const double* qr = &qd[((size_t)row * hq + h) * d];
                std::vector<double> sc(last + 1, 0.0), sn(last + 1, 0.0);
                double mx = -INFINITY, mn = -INFINITY;
                for (u32 j = first; j <= last; j++) {
                    double dot = 0;
                    for (u32 x = 0; x < d; x++) dot += qr[x] * keys[s][((size_t)j * hkv + g) * d + x];
                    const double score = (c.softcap > 0 ? c.softcap * std::tanh(dot * scale / c.softcap) : dot * scale) +
                                         slope * ((double)j - (double)last);
                    sc[j] = score;
                    sn[j] = round_to(score, c.bf16);
                    mx = std::max(mx, sc[j]);
                    mn = std::max(mn, sn[j]);
                }
                double sum = 0, nsum = 0;
                for (u32 j = first; j <= last; j++) {
                    sc[j] = std::exp(sc[j] - mx);
                    sn[j] = std::exp(sn[j] - mn);
                    sum += sc[j];
                    nsum += sn[j];
                }
                for (u32 x = 0; x < d; x++) {
                    double a = 0, na = 0;
                    for (u32 j = first; j <= last; j++) {
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
    std::string mods;
    if (c.softcap > 0) mods += ", softcap " + std::to_string(c.softcap).substr(0, 4);
    if (c.window > 0) mods += ", window " + std::to_string(c.window);
    if (c.alibi > 0) mods += ", alibi " + std::to_string(c.alibi).substr(0, 4);
    std::printf("%s %s%s: %s, max error %.3e, naive %s %.3e\n", ok ? "ok  " : "FAIL", c.name.c_str(), mods.c_str(), what.c_str(), err,
                c.bf16 ? "bf16" : "f16", naive_err);
    return ok;
}

// A case's inputs: each sequence's keys and values (its whole context) and the queries, rounded to
// the dtype (as f64 for the reference, as 16-bit words for the kernel), and where K/V rows lie:
// contiguous (the prompts' own rows: context == q_len), or in shuffled blocks of the paged cache
// [blocks, hkv, block_size, d] (NaN where no key is).
struct Inputs {
    u32 t = 0;
    std::vector<std::vector<double>> keys, vals;
    std::vector<double> qd;
    std::vector<u16> q, k, v;
    std::vector<u32> kbase, table;
};

Inputs make_inputs(const Case& c) {
    const u32 d = c.d, hq = c.hq, hkv = c.hkv, block_size = c.block_size;
    Inputs in;
    for (auto& s : c.seqs) in.t += s.q_len;
    in.keys.resize(c.seqs.size());
    in.vals.resize(c.seqs.size());
    u32 total_blocks = 0, key_rows = 0;
    for (auto& s : c.seqs) total_blocks += (s.context + block_size - 1) / block_size;
    std::vector<u32> order(total_blocks);
    for (u32 i = 0; i < total_blocks; i++) order[i] = i;
    for (u32 i = total_blocks; i > 1; i--) std::swap(order[i - 1], order[(u32)((uniform() + 1.0) / 2.0 * i) % i]);
    for (size_t s = 0; s < c.seqs.size(); s++) {
        const u32 n = c.seqs[s].context;
        for (u32 i = 0; i < n * hkv * d; i++) {
            in.keys[s].push_back(round_to(uniform(), c.bf16));
            in.vals[s].push_back(round_to(uniform(), c.bf16));
        }
        if (c.paged) {
            in.kbase.push_back((u32)in.table.size());
            for (u32 b = 0; b < (n + block_size - 1) / block_size; b++) in.table.push_back(order[in.table.size()]);
        } else {
            in.kbase.push_back(key_rows);
            key_rows += n;
        }
    }
    const size_t kv_elems = c.paged ? (size_t)total_blocks * hkv * block_size * d : (size_t)key_rows * hkv * d;
    in.k.assign(kv_elems, 0x7fc0);
    in.v.assign(kv_elems, 0x7fc0);
    for (size_t s = 0; s < c.seqs.size(); s++)
        for (u32 j = 0; j < c.seqs[s].context; j++)
            for (u32 g = 0; g < hkv; g++)
                for (u32 x = 0; x < d; x++) {
                    const size_t at = c.paged ? (((size_t)in.table[in.kbase[s] + j / block_size] * hkv + g) * block_size + j % block_size) * d + x
                                              : (((size_t)in.kbase[s] + j) * hkv + g) * d + x;
                    const double kk = in.keys[s][((size_t)j * hkv + g) * d + x], vv = in.vals[s][((size_t)j * hkv + g) * d + x];
                    in.k[at] = c.bf16 ? emu::f32_to_bf16((float)kk) : emu::f32_to_f16((float)kk);
                    in.v[at] = c.bf16 ? emu::f32_to_bf16((float)vv) : emu::f32_to_f16((float)vv);
                }
    in.qd.resize((size_t)in.t * hq * d);
    in.q.resize(in.qd.size());
    for (size_t i = 0; i < in.qd.size(); i++) {
        in.qd[i] = round_to(2.0 * uniform(), c.bf16);
        in.q[i] = c.bf16 ? emu::f32_to_bf16((float)in.qd[i]) : emu::f32_to_f16((float)in.qd[i]);
    }
    return in;
}

const float LOG2E = 1.4426950408889634f;

bool run_prefill(const Case& c) {
    const u32 d = c.d, hq = c.hq, hkv = c.hkv;
    const u32 warps = d == 64 ? FA64_WARPS : FA128_WARPS, mt = d == 64 ? FA64_MT : FA128_MT;
    const u32 keys_tile = d == 64 ? FA64_KEYS : FA128_KEYS, tile_rows = 16 * mt * warps;
    Inputs in = make_inputs(c);
    std::vector<u16> out((size_t)in.t * hq * d, 0x7fc0);
    const std::vector<u32> tiles = tiles_for(c, tile_rows, in.kbase);
    const float scale_log2 = LOG2E / std::sqrt((float)d);
    const size_t smem = (size_t)(tile_rows + 2 * keys_tile) * d * 2;
    const u32* tab = c.paged ? in.table.data() : nullptr;
    const u32 bs = c.paged ? c.block_size : 0;
    u16 *o = out.data(), *q = in.q.data(), *k = in.k.data(), *v = in.v.data();
    CHECK_LAUNCH({(u32)tiles.size() / 5, hq, 1}, {32 * warps, 1, 1}, smem, [&] {
        if (d == 64 && c.bf16) flash_attn_d64_bf16(o, q, k, v, tiles.data(), tab, bs, hq, hkv, scale_log2, c.window, c.softcap, c.alibi);
        if (d == 64 && !c.bf16) flash_attn_d64_f16(o, q, k, v, tiles.data(), tab, bs, hq, hkv, scale_log2, c.window, c.softcap, c.alibi);
        if (d == 128 && c.bf16) flash_attn_d128_bf16(o, q, k, v, tiles.data(), tab, bs, hq, hkv, scale_log2, c.window, c.softcap, c.alibi);
        if (d == 128 && !c.bf16) flash_attn_d128_f16(o, q, k, v, tiles.data(), tab, bs, hq, hkv, scale_log2, c.window, c.softcap, c.alibi);
    });
    char what[64];
    std::snprintf(what, sizeof what, "%u tiles of %u rows", (u32)tiles.size() / 5, tile_rows);
    return compare(c, in.keys, in.vals, in.qd, out, in.t, what);
}

// The same cases through the Hopper kernels (wgmma, modelled in simt.hpp): flash_attn_wg, with
// `kind` "pipe" flash_attn_wgp (two K/V stages, S of the next tile beside P V of this one), or "ws"
// flash_attn_ws (a producer warpgroup feeding two consumers through mbarriers, named-barrier turns).
bool run_prefill_wg(const Case& c, const std::string& kind) {
    const u32 d = c.d, hq = c.hq, hkv = c.hkv;
    const bool pipe = kind == "pipe", ws = kind == "ws" || kind == "ws-eager";
    emu::eager_copies = kind == "ws-eager";
    const u32 wgs = ws ? (d == 64 ? FS64_CONS : FS128_CONS) : d == 64 ? FH64_WGS : FH128_WGS, tile_rows = 64 * wgs;
    const u32 keys_tile = ws ? (d == 64 ? FS64_KEYS : FS128_KEYS) : d == 64 ? FH64_KEYS : FH128_KEYS;
    const u32 stages = ws ? (d == 64 ? FS64_STAGES : FS128_STAGES) : pipe ? 2 : 1;
    Inputs in = make_inputs(c);
    std::vector<u16> out((size_t)in.t * hq * d, 0x7fc0);
    const std::vector<u32> tiles = tiles_for(c, tile_rows, in.kbase);
    const float scale_log2 = LOG2E / std::sqrt((float)d);
    // As the host sizes it: the tiles, and 1024 bytes to align them.
    const size_t smem = (size_t)(tile_rows + 2 * stages * keys_tile) * d * 2 + 1024;
    const u32* tab = c.paged ? in.table.data() : nullptr;
    const u32 bs = c.paged ? c.block_size : 0;
    u16 *o = out.data(), *q = in.q.data(), *k = in.k.data(), *v = in.v.data();
    // flash_attn_ws reads contiguous K and V by TMA, as the host maps them: [rows, kv heads, d],
    // boxes of 64 dims x 1 head x a tile's keys, the 128-byte swizzle (the model's format).
    auto map_of = [&](const u16* base) {
        emu::TensorMap m{};
        m.base = (uint64_t)base, m.rank = 3, m.elem_bytes = 2, m.swizzle = 128;
        const uint64_t dims[5] = {d, hkv, in.k.size() / ((size_t)hkv * d), 1, 1}, strides[5] = {2, 2ull * d, 2ull * d * hkv, 0, 0};
        const uint32_t box[5] = {64, 1, keys_tile, 1, 1};
        for (int i = 0; i < 5; i++) m.dims[i] = dims[i], m.strides[i] = strides[i], m.box[i] = box[i];
        return m;
    };
    const emu::TensorMap kmap = map_of(k), vmap = map_of(v);
    const void* km = ws && !c.paged ? &kmap : nullptr;
    const void* vm = ws && !c.paged ? &vmap : nullptr;
    CHECK_LAUNCH({(u32)tiles.size() / 5, hq, 1}, {128 * (wgs + ws), 1, 1}, smem, [&] {
        auto k64b = pipe ? flash_attn_wgp_d64_bf16 : flash_attn_wg_d64_bf16, k64h = pipe ? flash_attn_wgp_d64_f16 : flash_attn_wg_d64_f16;
        auto k128b = pipe ? flash_attn_wgp_d128_bf16 : flash_attn_wg_d128_bf16, k128h = pipe ? flash_attn_wgp_d128_f16 : flash_attn_wg_d128_f16;
        if (ws) {
            auto kernel = d == 64 ? (c.bf16 ? flash_attn_ws_d64_bf16 : flash_attn_ws_d64_f16) : (c.bf16 ? flash_attn_ws_d128_bf16 : flash_attn_ws_d128_f16);
            kernel(o, q, k, v, tiles.data(), tab, bs, hq, hkv, scale_log2, c.window, c.softcap, c.alibi, km, vm);
            return;
        }
        auto kernel = d == 64 ? (c.bf16 ? k64b : k64h) : (c.bf16 ? k128b : k128h);
        kernel(o, q, k, v, tiles.data(), tab, bs, hq, hkv, scale_log2, c.window, c.softcap, c.alibi);
    });
    char what[160];
    std::snprintf(what, sizeof what, "wgmma%s, %u tiles of %u rows, %u keys a step, %u stages",
                  ws ? (c.paged ? (emu::eager_copies ? " warp-specialized (cp.async landing at once)" : " warp-specialized (cp.async)")
                                : " warp-specialized (TMA)")
                     : pipe ? " pipelined" : "",
                  (u32)tiles.size() / 5, tile_rows, keys_tile, stages);
    emu::eager_copies = false;
    return compare(c, in.keys, in.vals, in.qd, out, in.t, what);
}

// Decode through the paged cache: decode_attn with each context cut into `splits` slices, the last
// block of each (sequence, KV head) merging them (twice, on the same counters: the first launch
// must leave them at 0 for the next); and with no counters, then attn_combine, which must give the
// same output bit for bit.
bool run_decode(const Case& c, u32 splits) {
    const u32 d = c.d, hq = c.hq, hkv = c.hkv;
    Inputs in = make_inputs(c);
    std::vector<u32> seqs;
    u32 q_start = 0;
    for (size_t s = 0; s < c.seqs.size(); s++) {
        seqs.insert(seqs.end(), {q_start, c.seqs[s].q_len, c.seqs[s].context, in.kbase[s]});
        q_start += c.seqs[s].q_len;
    }
    const u32 nseq = (u32)c.seqs.size();
    const float scale_log2 = LOG2E / std::sqrt((float)d);
    const size_t smem = (size_t)d * (16 + DA_WARPS * DA_STAGES * 2 * DA_KEYS) * 2;
    u16 *q = in.q.data(), *k = in.k.data(), *v = in.v.data();
    const u32 *sq = seqs.data(), *tab = in.table.data();
    std::vector<u32> counters(nseq * hkv, 0);
    // One launch into fresh partial states and output (NaN), merged in the kernel unless `merge` is
    // false; then false where a partial state was not written (attn_combine reads every slice's;
    // the kernel's own merge only those of the slices with keys, and none where one slice has them
    // all).
    auto launch = [&](std::vector<float>& partial, std::vector<u16>& out, bool merge) {
        partial.assign((size_t)in.t * hq * splits * (d + 2), NAN);
        out.assign((size_t)in.t * hq * d, 0x7fc0);
        float* p = partial.data();
        u16* o = out.data();
        u32* cn = merge ? counters.data() : nullptr;
        const u32 bs = c.block_size;
        CHECK_LAUNCH({nseq, hkv, splits}, {32 * DA_WARPS, 1, 1}, smem, [&] {
            if (d == 64 && c.bf16) decode_attn_d64_bf16(p, q, k, v, sq, tab, bs, hq, hkv, scale_log2, c.window, c.softcap, c.alibi, o, cn);
            if (d == 64 && !c.bf16) decode_attn_d64_f16(p, q, k, v, sq, tab, bs, hq, hkv, scale_log2, c.window, c.softcap, c.alibi, o, cn);
            if (d == 128 && c.bf16) decode_attn_d128_bf16(p, q, k, v, sq, tab, bs, hq, hkv, scale_log2, c.window, c.softcap, c.alibi, o, cn);
            if (d == 128 && !c.bf16) decode_attn_d128_f16(p, q, k, v, sq, tab, bs, hq, hkv, scale_log2, c.window, c.softcap, c.alibi, o, cn);
        });
        for (u32 r = 0, s = 0; s < nseq && !merge; s++)
            for (u32 i = 0; i < c.seqs[s].q_len; i++, r++)
                for (u32 h = 0; h < hq; h++)
                    for (u32 sl = 0; sl < splits; sl++)
                        if (std::isnan(partial[(((size_t)r * hq + h) * splits + sl) * (d + 2) + d + 1])) {
                            std::printf("FAIL %s: the partial state of row %u head %u slice %u was not written\n", c.name.c_str(), r, h, sl);
                            return false;
                        }
        return true;
    };
    std::vector<float> partial;
    std::vector<u16> merged, again, combined;
    if (!launch(partial, merged, true) || !launch(partial, again, true)) return false;
    for (size_t i = 0; i < counters.size(); i++)
        if (counters[i] != 0) {
            std::printf("FAIL %s: slice counter %zu is %u after the merge (0 for the next launch)\n", c.name.c_str(), i, counters[i]);
            return false;
        }
    if (again != merged) {
        std::printf("FAIL %s: a second launch on the same counters gave another output\n", c.name.c_str());
        return false;
    }
    if (!launch(partial, combined, false)) return false;
    float* p = partial.data();
    u16* o = combined.data();
    CHECK_LAUNCH({in.t, hq, 1}, {d, 1, 1}, 0, [&] {
        if (c.bf16) attn_combine_bf16(o, p, hq, d, splits);
        else attn_combine_f16(o, p, hq, d, splits);
    });
    if (combined != merged) {
        std::printf("FAIL %s: attn_combine's merge differs from decode_attn's own\n", c.name.c_str());
        return false;
    }
    char what[64];
    std::snprintf(what, sizeof what, "each context in %u slices", splits);
    return compare(c, in.keys, in.vals, in.qd, merged, in.t, what);
}

}  // namespace

int main(int argc, char** argv) {
    // "prefill": only flash_attn's cases (what its tile shape changes); "wgmma": only flash_attn_wg's;
    // "ws": only flash_attn_ws's;
    // "decode": only decode_attn's (what DA_WARPS and DA_STAGES change).
    const std::string only = argc > 1 ? argv[1] : "";
    const bool decode = only.empty() || only == "decode", mma = only.empty() || only == "prefill";
    const bool wgmma = only.empty() || only == "wgmma", ws = only.empty() || only == "ws";
    std::printf("decode: %u warps x %u stages\n", DA_WARPS, DA_STAGES);
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
    // Gemma 2's modifiers: soft-capped scores (a cap the scores reach), sliding windows shorter than
    // the prompts (rows whose first key tiles are skipped, a window crossing a tile), both through
    // the block table after a cached prefix, and a cap on full attention.
    {
        Case w = {"d64 bf16 causal, 3 prompts (1, 150, 37 rows), 4 heads over 2", 64, 4, 2, true, true, false, {{1, 1}, {150, 150}, {37, 37}}};
        w.softcap = 1.0f, w.window = 40;
        cases.push_back(w);
        Case p = {"d128 f16 paged, chunks after cached prefixes (300 of 500, 45 of 100)", 128, 2, 1, false, true, true, {{300, 500}, {45, 100}}};
        p.softcap = 2.0f, p.window = 100;
        cases.push_back(p);
        Case f = {"d128 bf16 full, 2 prompts (70, 129 rows), 2 heads over 1", 128, 2, 1, true, false, false, {{70, 70}, {129, 129}}};
        f.softcap = 0.5f;
        cases.push_back(f);
    }
    // ALiBi (Bloom, MPT): head counts that are no power of two (the slopes' odd steps), causal and
    // full, and through the block table after a cached prefix with a window too.
    {
        Case a = {"d64 f16 causal, 3 prompts (1, 150, 37 rows), 6 heads over 2", 64, 6, 2, false, true, false, {{1, 1}, {150, 150}, {37, 37}}};
        a.alibi = 8.0f;
        cases.push_back(a);
        Case p = {"d128 bf16 paged, chunks after cached prefixes (300 of 500, 45 of 100), 6 heads over 3", 128, 6, 3, true, true, true,
                  {{300, 500}, {45, 100}}};
        p.alibi = 8.0f, p.window = 200;
        cases.push_back(p);
        Case f = {"d128 f16 full, 2 prompts (70, 129 rows), 3 heads over 1", 128, 3, 1, false, false, false, {{70, 70}, {129, 129}}};
        f.alibi = 8.0f;
        cases.push_back(f);
    }
    bool ok = true;
    if (mma)
        for (auto& c : cases) ok &= run_prefill(c);
    if (wgmma || ws) {
        // And prompts long enough for 4 and 9 key tiles of 128 after a cached prefix (the pipelined
        // kernels' stages are reused, their barriers' phases change parity, many times).
        for (bool bf16 : {true, false})
            cases.push_back({std::string("d128 ") + (bf16 ? "bf16" : "f16") + " paged, 300 rows after a prefix of 200", 128, 2, 1, bf16, true,
                             true, {{300, 500}}});
        cases.push_back({"d64 bf16 paged, 200 rows after a prefix of 900", 64, 2, 1, true, true, true, {{200, 1100}}});
    }
    if (wgmma)
        for (const char* kind : {"plain", "pipe"})
            for (auto& c : cases) ok &= run_prefill_wg(c, kind);
    // The warp-specialized kernel twice: copies landing when waited for (a read before its wait
    // shows) and at once (a stage refilled too early shows).
    if (ws)
        for (const char* kind : {"ws", "ws-eager"})
            for (auto& c : cases) ok &= run_prefill_wg(c, kind);
    // Decode: one new token per sequence (and a few for speculative decoding) through the cache.
    if (decode)
    for (u32 d : {64u, 128u})
        for (bool bf16 : {true, false}) {
            const std::string tag = std::string("decode d") + std::to_string(d) + (bf16 ? " bf16" : " f16");
            const Case g4 = {tag + " 8 heads over 2, contexts 1, 1000, 40 (+3 new), 77", d, 8, 2, bf16, true, true,
                             {{1, 1}, {1, 1000}, {3, 40}, {1, 77}}};
            ok &= run_decode(g4, 16);
            ok &= run_decode(g4, 1);
            // Blocks of 24 tokens: every other chunk across two blocks; of 8: every chunk.
            Case b24 = {tag + " 9 heads over 3, contexts 300, 17 (+5 new), blocks of 24", d, 9, 3, bf16, true, true, {{1, 300}, {5, 17}}};
            b24.block_size = 24;
            ok &= run_decode(b24, 3);
            Case b8 = {tag + " 16 heads over 2, contexts 129, 64 (+2 new), blocks of 8", d, 16, 2, bf16, true, true, {{1, 129}, {2, 64}}};
            b8.block_size = 8;
            ok &= run_decode(b8, 64);
            if (bf16 == (d == 64)) {  // d64 bf16 and d128 f16: soft-capped, windowed, one slice and many
                Case w = {tag + " 8 heads over 2, contexts 1000, 40 (+3 new), 150", d, 8, 2, bf16, true, true, {{1, 1000}, {3, 40}, {1, 150}}};
                w.softcap = 1.0f, w.window = 100;
                ok &= run_decode(w, 16);
                ok &= run_decode(w, 1);
            } else {  // d64 f16 and d128 bf16: ALiBi, the rows' heads' slopes (3 and 6 heads a group)
                Case a = {tag + " ALiBi, 6 heads over 2, contexts 1000, 40 (+3 new), 150", d, 6, 2, bf16, true, true, {{1, 1000}, {3, 40}, {1, 150}}};
                a.alibi = 8.0f;
                ok &= run_decode(a, 16);
                ok &= run_decode(a, 1);
                Case b = {tag + " ALiBi, 12 heads over 2, contexts 700, 90 (+2 new)", d, 12, 2, bf16, true, true, {{1, 700}, {2, 90}}};
                b.alibi = 8.0f;
                ok &= run_decode(b, 8);
            }
        }
    const unsigned long long conflicts = emu::bank_conflicts, loads = emu::ldmatrix_count;
    std::printf("ldmatrix: %llu matrices loaded, %llu bank conflicts\n", loads, conflicts);
    if (conflicts) {
        std::printf("FAIL shared-memory bank conflicts\n");
        ok = false;
    }
    return ok ? 0 : 1;
}
