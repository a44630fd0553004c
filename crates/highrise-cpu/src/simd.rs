//! Vector math on f32, with AVX2+FMA kernels where the CPU has them (decided once,
//! `has_avx2_fma`) and portable ones elsewhere: the dot product, SwiGLU's gate, and softmax's
//! exponentials.

/// `a · b` in f32, eight independent lanes so it vectorizes; AVX2+FMA when the CPU has them.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// Whether the AVX2+FMA (+F16C) kernels run: the CPU has them and `HIGHRISE_CPU_SIMD` is not `portable`
/// (which forces the portable kernels, e.g. to test them on an AVX2 machine). Decided once.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var("HIGHRISE_CPU_SIMD").map_or(true, |v| v != "portable")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// `g[i] = silu(g[i]) * u[i]` (silu(x) = x / (1 + e^-x)): the MLP's gate.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { avx2::silu_mul(g, u) };
    }
    g.iter_mut().zip(u).for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
}

/// `x[i] = e^(x[i] - sub)` in place (a softmax's numerators); returns their sum. Each term is computed
/// in f64 and rounded once to f32, so it is the correctly rounded e^x but for rare near-ties: as
/// close as libm's `expf`, which attention's probabilities need (the residual stream is held to
/// HF's within 1e-3; the 2-ulp f32 `exp` below moved it 1.2e-3).
pub fn exp_sub(x: &mut [f32], sub: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { avx2::exp_sub(x, sub) };
    }
    x.iter_mut().fold(0.0, |s, v| {
        *v = (*v - sub).exp();
        s + *v
    })
}

/// `sum_i e^(x_i - sub)`, in f64 (for a log-sum-exp; with `sub` the maximum every term is <= 1).
pub fn sum_exp(x: &[f32], sub: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { avx2::sum_exp(x, sub) };
    }
    x.iter().map(|&v| ((v - sub) as f64).exp()).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `sum_exp` eight lanes at a time; each run of 1024 values is summed in f32 lanes, then in f64.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum_exp(x: &[f32], sub: f32) -> f64 {
        let s = _mm256_set1_ps(sub);
        let mut total = 0f64;
        for run in x.chunks(1024) {
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i + 8 <= run.len() {
                acc = _mm256_add_ps(acc, exp(_mm256_sub_ps(_mm256_loadu_ps(run.as_ptr().add(i)), s)));
                i += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            total += lanes.iter().map(|&l| l as f64).sum::<f64>();
            total += run[i..].iter().map(|&v| ((v - sub) as f64).exp()).sum::<f64>();
        }
        total
    }

    /// e^x of four f64 lanes, x clamped to [-110, 89] (beyond, e^x as f32 is 0 or infinite anyway):
    /// x = n ln2 + r (ln2 split in two, so r is exact), |r| <= ln2 / 2, e^r by its Taylor series to
    /// r^8 (remainder under 3e-10 relative: far below f32's half ulp), 2^n put in the exponent.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_pd(x: __m256d) -> __m256d {
        let x = _mm256_min_pd(_mm256_max_pd(x, _mm256_set1_pd(-110.0)), _mm256_set1_pd(89.0));
        let n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(std::f64::consts::LOG2_E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.931_471_803_691_238e-1), x);
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.908_214_929_270_587_7e-10), r);
        let mut p = _mm256_set1_pd(1.0 / 40320.0);
        for c in [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c));
        }
        let n64 = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n));
        let two_n = _mm256_slli_epi64(_mm256_add_epi64(n64, _mm256_set1_epi64x(1023)), 52);
        _mm256_mul_pd(p, _mm256_castsi256_pd(two_n))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sub(x: &mut [f32], sub: f32) -> f32 {
        let s = _mm256_set1_ps(sub);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= x.len() {
            let d = _mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), s);
            let lo = _mm256_cvtpd_ps(exp_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(d))));
            let hi = _mm256_cvtpd_ps(exp_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(d, 1))));
            let e = _mm256_set_m128(hi, lo);
            _mm256_storeu_ps(x.as_mut_ptr().add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        x[i..].iter_mut().fold(lanes.iter().sum(), |t, v| {
            *v = (*v - sub).exp();
            t + *v
        })
    }

    /// e^x for x in [-87, 88] (clamped there), within 2 ulp: x = n ln2 + r with |r| <= ln2 / 2 (ln2
    /// split in two so r is exact), e^r by Cephes' degree-7 polynomial, 2^n put in the exponent.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
        let n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        let two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(p, _mm256_castsi256_ps(two_n))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
        let n = g.len().min(u.len());
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_loadu_ps(g.as_ptr().add(i));
            let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), x));
            let s = _mm256_div_ps(_mm256_mul_ps(x, _mm256_loadu_ps(u.as_ptr().add(i))), _mm256_add_ps(_mm256_set1_ps(1.0), e));
            _mm256_storeu_ps(g.as_mut_ptr().add(i), s);
            i += 8;
        }
        for j in i..n {
            g[j] = g[j] / (1.0 + (-g[j]).exp()) * u[j];
        }
    }
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    // Four vectors of eight lanes: enough independent FMAs to hide their latency.
    let mut acc = [0f32; 32];
    let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..32 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s = 0f32;
    for l in 0..8 {
        s += (acc[l] + acc[l + 8]) + (acc[l + 16] + acc[l + 24]);
    }
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_exp_is_within_two_ulp() {
        if !has_avx2_fma() {
            return println!("skipped: this CPU has no AVX2+FMA+F16C");
        }
        let xs: Vec<f32> = (0..=17500).map(|i| -87.0 + i as f32 * 0.01).collect();
        for x8 in xs.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: AVX2+FMA present (checked above).
            unsafe {
                use std::arch::x86_64::*;
                _mm256_storeu_ps(got.as_mut_ptr(), avx2::exp(_mm256_loadu_ps(x8.as_ptr())));
            }
            for (&x, &g) in x8.iter().zip(&got) {
                let want = (x as f64).exp();
                assert!(((g as f64) - want).abs() <= 2.0 * f32::EPSILON as f64 * want, "exp({x}) = {g}, want {want}");
            }
        }
    }

    #[test]
    fn exp_sub_rounds_each_term_as_libm_does() {
        // Every f32 step over [-104, 0] in strides, plus a run of consecutive floats near 0.
        let mut x: Vec<f32> = (0..=104_000).map(|i| -(i as f32) * 1e-3).collect();
        x.extend((0..4096).map(|i| -f32::from_bits(0x3C00_0000 + i)));
        let want: Vec<f64> = x.iter().map(|&v| (v as f64).exp()).collect();
        let libm: Vec<f32> = x.iter().map(|&v| v.exp()).collect();
        let sum = exp_sub(&mut x, 0.0);
        let mut differ = 0;
        for ((g, w), l) in x.iter().zip(&want).zip(&libm) {
            // Within half an ulp of e^x (plus the f64 work's 1e-9), as a correctly rounded result is.
            let ulp = (f32::from_bits(g.to_bits() + 1) - g) as f64;
            assert!((*g as f64 - w).abs() <= 0.5 * ulp + 1e-9 * w, "e^x: {g}, want {w}");
            differ += (g != l) as usize;
        }
        assert!(differ * 1000 < x.len(), "{differ} of {} differ from libm", x.len());
        let total: f64 = want.iter().sum();
        assert!((sum as f64 - total).abs() <= 1e-5 * total, "sum {sum} vs {total}");
    }
}
