// Runs the matrix-vector kernels (gemv{1,2,4,8}_{bf16,f16}, kernels/gemv.cu; gemv_qkv1 and gemv_glu1
// against them) on the CPU through
// kernels/emu/simt.hpp and checks them against an f64 reference, as tests/ops.rs does on a GPU: the
// largest error at most twice a naive same-dtype implementation's (one rounding the running sum to
// the dtype after every 8 products), and more: every output within one unit in the last place of
// the f64 result rounded once (f32 accumulation may only tip a rounding). Shapes: 1-8 rows of x, k from 8 to 14336, n not a multiple of the
// block's 8 rows, with and without an f32 or bf16 bias. Built and run by tests/kernel_emu.rs.

#include "check.hpp"
#include "../common.cuh"
#include "../gemv.cu"

#include <string>

namespace {

using check::from_half;
using check::to_half;
using check::uniform;

bool run(u32 t, u32 k, u32 n, bool bf16, int bias_dt) {
    std::vector<u16> x((size_t)t * k), w((size_t)n * k), out((size_t)t * n, 0x7fc0);
    std::vector<double> xd(x.size()), wd(w.size()), bd(n, 0.0);
    for (size_t i = 0; i < x.size(); i++) xd[i] = from_half(x[i] = to_half(uniform(), bf16), bf16);
    for (size_t i = 0; i < w.size(); i++) wd[i] = from_half(w[i] = to_half(uniform() / std::sqrt((double)k), bf16), bf16);
    std::vector<float> bias32(n);
    std::vector<u16> bias16(n);
    for (u32 i = 0; i < n; i++) {
        bias32[i] = (float)uniform();
        bias16[i] = emu::f32_to_bf16(bias32[i]);
        bd[i] = bias_dt == 0 ? (double)bias32[i] : bias_dt == 2 ? emu::bf16_to_f32(bias16[i]) : 0.0;
    }
    const void* bias = bias_dt < 0 ? nullptr : bias_dt == 0 ? (const void*)bias32.data() : (const void*)bias16.data();
    const u32 bdt = bias_dt < 0 ? 0 : (u32)bias_dt, blocks = (n + GEMV_BLOCK_ROWS - 1) / GEMV_BLOCK_ROWS, tm = t == 1 ? 1 : t == 2 ? 2 : t <= 4 ? 4 : 8;
    u16 *o = out.data(), *xp = x.data(), *wp = w.data();
    CHECK_LAUNCH({blocks, 1, 1}, {32 * GEMV_WARPS, 1, 1}, 0, [&] {
        if (tm == 1) bf16 ? gemv1_bf16(o, xp, wp, bias, bdt, t, k, n) : gemv1_f16(o, xp, wp, bias, bdt, t, k, n);
        if (tm == 2) bf16 ? gemv2_bf16(o, xp, wp, bias, bdt, t, k, n) : gemv2_f16(o, xp, wp, bias, bdt, t, k, n);
        if (tm == 4) bf16 ? gemv4_bf16(o, xp, wp, bias, bdt, t, k, n) : gemv4_f16(o, xp, wp, bias, bdt, t, k, n);
        if (tm == 8) bf16 ? gemv8_bf16(o, xp, wp, bias, bdt, t, k, n) : gemv8_f16(o, xp, wp, bias, bdt, t, k, n);
    });
    double err = 0, naive_err = 0, ulps = 0;
    for (u32 i = 0; i < t; i++)
        for (u32 r = 0; r < n; r++) {
            double exact = 0, naive = 0;
            for (u32 c = 0; c < k; c += 8) {
                double part = 0;
                for (u32 e = c; e < c + 8; e++) part += xd[(size_t)i * k + e] * wd[(size_t)r * k + e];
                exact += part;
                naive = from_half(to_half(naive + part, bf16), bf16);
            }
            exact += bd[r];
            naive = from_half(to_half(naive + bd[r], bf16), bf16);
            const double got = from_half(out[(size_t)i * n + r], bf16);
            if (!std::isfinite(got)) {
                std::printf("FAIL gemv t=%u k=%u n=%u: out[%u, %u] is %g (unwritten?)\n", t, k, n, i, r, got);
                return false;
            }
            err = std::max(err, std::fabs(got - exact));
            int e;
            const double rounded = from_half(to_half(exact, bf16), bf16);
            std::frexp(rounded == 0 ? exact : rounded, &e);
            const double ulp = std::ldexp(1.0, e - (bf16 ? 8 : 11));
            ulps = std::max(ulps, std::fabs(got - rounded) / ulp);
            naive_err = std::max(naive_err, std::fabs(naive - exact));
        }
    const bool ok = err <= 2.0 * naive_err && ulps <= 1.0;
    // The outputs' bits, hashed (FNV-1a): tests/kernel_emu.rs holds every swept shape to the default's.
    unsigned long long bits = 1469598103934665603ull;
    for (u16 v : out) bits = (bits ^ v) * 1099511628211ull;
    std::printf("%s gemv%u_%s t=%u k=%u n=%u bias %s: max error %.3e (%.2f ulp from the rounded result), naive %.3e, bits %016llx\n",
                ok ? "ok  " : "FAIL", tm, bf16 ? "bf16" : "f16", t, k, n, bias_dt < 0 ? "none" : bias_dt == 0 ? "f32" : "bf16", err, ulps,
                naive_err, bits);
    return ok;
}

// The plain kernel's output rows for x [t, k] and w [n, k] (no bias), as run() launches it.
std::vector<u16> plain(const std::vector<u16>& x, const std::vector<u16>& w, u32 t, u32 k, u32 n, bool bf16, bool* ok) {
    std::vector<u16> out((size_t)t * n, 0x7fc0);
    const u32 blocks = (n + GEMV_BLOCK_ROWS - 1) / GEMV_BLOCK_ROWS;
    u16 *o = out.data(), *xp = (u16*)x.data(), *wp = (u16*)w.data();
    *ok = emu::launch({blocks, 1, 1}, {32 * GEMV_WARPS, 1, 1}, 0, [&] {
        bf16 ? gemv1_bf16(o, xp, wp, nullptr, 0, t, k, n) : gemv1_f16(o, xp, wp, nullptr, 0, t, k, n);
    });
    return out;
}

// x's RMSNorm by w as a warp of gemv_*_norm computes it: lane l sums the squares of chunks l, l +
// 32, ... (8 elements each, in order), the warp adds the lanes' sums pairwise (warp_sum's xor
// butterfly), then each element is (x * inv) * w rounded to the dtype.
std::vector<u16> normed(const std::vector<u16>& x, const std::vector<u16>& w, u32 k, float eps, bool bf16) {
    float lanes[32] = {};
    for (u32 l = 0; l < 32; l++)
        for (u32 c = l; c < k / 8; c += 32)
            for (u32 e = 8 * c; e < 8 * c + 8; e++) {
                const float v = (float)from_half(x[e], bf16);
                lanes[l] += v * v;
            }
    for (u32 o = 16; o > 0; o /= 2) {
        float next[32];
        for (u32 l = 0; l < 32; l++) next[l] = lanes[l] + lanes[l ^ o];
        std::copy(next, next + 32, lanes);
    }
    const float inv = rsqrtf(lanes[0] / (float)k + eps);
    std::vector<u16> out(k);
    for (u32 e = 0; e < k; e++) out[e] = to_half((float)from_half(x[e], bf16) * inv * (float)from_half(w[e], bf16), bf16);
    return out;
}

// The fused kernels give their parts' sums: gemv_qkv's q, k and v are gemv's of wq, wk and wv, and
// gemv_glu's output is SwiGLU (swiglu's arithmetic, kernels/mlp.cu) of gemv's gate and up rounded
// to the dtype, bit for bit (one row of x; q and k whole blocks, v not); the _norm kernels the same
// of x's norm (`normed`), and gemv_add's output gemv's added to what out held, rounded again.
bool run_fused(u32 k, bool bf16) {
    // Whole blocks of every shape (at most 16 rows), and the same inputs in every shape.
    const u32 nq = 48, nk = 16, nv = 5, n = 13;
    auto random = [&](size_t len, double scale) {
        std::vector<u16> v(len);
        for (auto& e : v) e = to_half(uniform() * scale, bf16);
        return v;
    };
    const double ws = 1.0 / std::sqrt((double)k);
    std::vector<u16> x = random(k, 1.0), wq = random((size_t)nq * k, ws), wk = random((size_t)nk * k, ws), wv = random((size_t)nv * k, ws);
    std::vector<u16> wg = random((size_t)n * k, ws), wu = random((size_t)n * k, ws);
    std::vector<u16> q(nq, 0x7fc0), kk(nk, 0x7fc0), v(nv, 0x7fc0), act(n, 0x7fc0);
    u16 *xp = x.data(), *qp = q.data(), *kp = kk.data(), *vp = v.data(), *ap = act.data();
    u16 *wqp = wq.data(), *wkp = wk.data(), *wvp = wv.data(), *wgp = wg.data(), *wup = wu.data();
    const u32 blocks = (nq + nk + nv + GEMV_BLOCK_ROWS - 1) / GEMV_BLOCK_ROWS;
    CHECK_LAUNCH({blocks, 1, 1}, {32 * GEMV_WARPS, 1, 1}, 0, [&] {
        bf16 ? gemv_qkv1_bf16(qp, kp, vp, xp, wqp, wkp, wvp, nullptr, nullptr, nullptr, 0, 1, k, nq, nk, nv)
             : gemv_qkv1_f16(qp, kp, vp, xp, wqp, wkp, wvp, nullptr, nullptr, nullptr, 0, 1, k, nq, nk, nv);
    });
    const u32 glu_blocks = (n + GEMV_GROUPS - 1) / GEMV_GROUPS;
    CHECK_LAUNCH({glu_blocks, 1, 1}, {32 * GEMV_WARPS, 1, 1}, 0, [&] {
        bf16 ? gemv_glu1_bf16(ap, xp, wgp, wup, 1, k, n) : gemv_glu1_f16(ap, xp, wgp, wup, 1, k, n);
    });
    // The same of x's norm, and a stream (act's first n rows of q's weights' shape) added into.
    const float eps = 1e-5f;
    std::vector<u16> nw = random(k, 1.5), qn(nq, 0x7fc0), kn(nk, 0x7fc0), vn(nv, 0x7fc0), actn(n, 0x7fc0), stream = random(nq, 2.0);
    std::vector<u16> added = stream;
    u16 *nwp = nw.data(), *qnp = qn.data(), *knp = kn.data(), *vnp = vn.data(), *anp = actn.data(), *sp = added.data();
    CHECK_LAUNCH({blocks, 1, 1}, {32 * GEMV_WARPS, 1, 1}, 0, [&] {
        bf16 ? gemv_qkv_norm1_bf16(qnp, knp, vnp, xp, wqp, wkp, wvp, nullptr, nullptr, nullptr, 0, nwp, eps, 1, k, nq, nk, nv)
             : gemv_qkv_norm1_f16(qnp, knp, vnp, xp, wqp, wkp, wvp, nullptr, nullptr, nullptr, 0, nwp, eps, 1, k, nq, nk, nv);
    });
    CHECK_LAUNCH({glu_blocks, 1, 1}, {32 * GEMV_WARPS, 1, 1}, 0, [&] {
        bf16 ? gemv_glu_norm1_bf16(anp, xp, wgp, wup, nwp, eps, 1, k, n) : gemv_glu_norm1_f16(anp, xp, wgp, wup, nwp, eps, 1, k, n);
    });
    const u32 add_blocks = (nq + GEMV_BLOCK_ROWS - 1) / GEMV_BLOCK_ROWS;
    CHECK_LAUNCH({add_blocks, 1, 1}, {32 * GEMV_WARPS, 1, 1}, 0, [&] {
        bf16 ? gemv_add1_bf16(sp, xp, wqp, nullptr, 0, 1, k, nq) : gemv_add1_f16(sp, xp, wqp, nullptr, 0, 1, k, nq);
    });
    bool ok = true, launched = true;
    auto glu_of = [&](const std::vector<u16>& xs, const std::vector<u16>& out) {
        const std::vector<u16> g = plain(xs, wg, 1, k, n, bf16, &launched), u = plain(xs, wu, 1, k, n, bf16, &launched);
        bool same = true;
        for (u32 i = 0; i < n; i++) {
            const float gr = (float)from_half(g[i], bf16), ur = (float)from_half(u[i], bf16);
            same &= out[i] == to_half(gr / (1.0f + expf(-gr)) * ur, bf16);
        }
        return same;
    };
    const std::vector<u16> xn = normed(x, nw, k, eps, bf16);
    bool fused = true, norm = true, add = true;
    fused &= plain(x, wq, 1, k, nq, bf16, &launched) == q && launched;
    fused &= plain(x, wk, 1, k, nk, bf16, &launched) == kk && launched;
    fused &= plain(x, wv, 1, k, nv, bf16, &launched) == v && launched;
    fused &= glu_of(x, act) && launched;
    norm &= plain(xn, wq, 1, k, nq, bf16, &launched) == qn && launched;
    norm &= plain(xn, wk, 1, k, nk, bf16, &launched) == kn && launched;
    norm &= plain(xn, wv, 1, k, nv, bf16, &launched) == vn && launched;
    norm &= glu_of(xn, actn) && launched;
    for (u32 i = 0; i < nq; i++) add &= added[i] == to_half((float)from_half(q[i], bf16) + (float)from_half(stream[i], bf16), bf16);
    ok = fused && norm && add;
    std::printf("%s gemv_qkv1_%s and gemv_glu1_%s k=%u: %s; their _norm kernels: %s; gemv_add1: %s\n", ok ? "ok  " : "FAIL", bf16 ? "bf16" : "f16",
                bf16 ? "bf16" : "f16", k, fused ? "their parts' gemv sums, bit for bit" : "not their parts' gemv sums",
                norm ? "the same of x's norm" : "not the same of x's norm", add ? "gemv's sums added to the stream" : "not gemv's sums added");
    return ok;
}

}  // namespace

int main() {
    bool ok = true;
    for (bool bf16 : {true, false}) {
        ok &= run(1, 4096, 37, bf16, -1);
        ok &= run(1, 14336, 20, bf16, 0);
        ok &= run(2, 8, 9, bf16, 2);
        ok &= run(3, 1536, 64, bf16, -1);
        ok &= run(5, 576, 17, bf16, 0);
        ok &= run(8, 2056, 24, bf16, -1);
        ok &= run_fused(4096, bf16);
        ok &= run_fused(1544, bf16);
    }
    return ok ? 0 : 1;
}
