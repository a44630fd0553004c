// Runs the matrix-vector kernels (gemv{1,2,4,8}_{bf16,f16}, kernels/gemv.cu) on the CPU through
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
    }
    return ok ? 0 : 1;
}
