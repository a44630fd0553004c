//! The float element types the CPU backend stores (f32, f16, bf16), bulk conversion to and from the
//! f32 it computes in, and the dot product that widens 16-bit weights as it reads them. The vector
//! math on f32 itself is `simd`.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use highrise_core::Element;

#[cfg(target_arch = "x86_64")]
use crate::simd::has_avx2_fma;
use crate::simd::dot;

pub trait Float: Element + bytemuck::Pod {
    /// `dst[i] = src[i] as f32`.
    fn load(src: &[Self], dst: &mut [f32]);
    /// `dst[i] = src[i]` rounded to nearest.
    fn store(src: &[f32], dst: &mut [Self]);
    /// The values as f32 without a copy, when they are f32.
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
    /// `x · w`, widening `w` as it is read (no buffer): the matrix-vector path for float weights.
    fn dot_with(x: &[f32], w: &[Self]) -> f32 {
        dot_widening(x, w)
    }
    /// Eight values at `p` widened to f32 lanes in registers, for AVX2 kernels that read rows in
    /// their own dtype (an f16 KV cache). Inlined into the caller, whose target features it uses.
    /// SAFETY: eight values are readable at `p`, and the caller runs with AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Float for f32 {
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    fn dot_with(x: &[f32], w: &[f32]) -> f32 {
        dot(x, w)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Float for f16 {
    fn load(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn store(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src)
    }
    fn dot_with(x: &[f32], w: &[f16]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: AVX2, FMA and F16C present (checked just above).
            return unsafe { half_dot_avx2(x, w) };
        }
        dot_widening(x, w)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

impl Float for bf16 {
    fn load(src: &[bf16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn store(src: &[f32], dst: &mut [bf16]) {
        dst.convert_from_f32_slice(src)
    }
    fn dot_with(x: &[f32], w: &[bf16]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA present (checked just above).
            return unsafe { half_dot_avx2(x, w) };
        }
        dot_widening(x, w)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))))
    }
}

/// Portable `x · w`: `w` widened to f32 a stack-sized chunk at a time.
fn dot_widening<W: Float>(x: &[f32], w: &[W]) -> f32 {
    let mut buf = [0f32; 64];
    let mut s = 0f32;
    for (xc, wc) in x.chunks(64).zip(w.chunks(64)) {
        W::load(wc, &mut buf[..wc.len()]);
        s += dot(xc, &buf[..wc.len()]);
    }
    s
}

/// `x · w` for 16-bit weights `w` (f16 or bf16), widened in registers by `W::load8`: f16 with F16C,
/// bf16 by a shift into the high half of an f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_dot_avx2<W: Float>(x: &[f32], w: &[W]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len().min(w.len());
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        a0 = _mm256_fmadd_ps(W::load8(w.as_ptr().add(i)), _mm256_loadu_ps(x.as_ptr().add(i)), a0);
        a1 = _mm256_fmadd_ps(W::load8(w.as_ptr().add(i + 8)), _mm256_loadu_ps(x.as_ptr().add(i + 8)), a1);
        i += 16;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a0, a1));
    let mut s: f32 = lanes.iter().sum();
    let mut tail = [0f32; 16];
    W::load(&w[i..n], &mut tail[..n - i]);
    for (xi, v) in x[i..n].iter().zip(&tail) {
        s += xi * v;
    }
    s
}

/// Runs `$body` with `$E` bound to the Rust type of float dtype `$dtype`; other dtypes are an
/// `Unsupported` error naming `$op`.
macro_rules! with_float {
    ($dtype:expr, $op:expr, $E:ident => $body:expr) => {
        match $dtype {
            highrise_core::DType::F32 => {
                type $E = f32;
                $body
            }
            highrise_core::DType::F16 => {
                type $E = half::f16;
                $body
            }
            highrise_core::DType::BF16 => {
                type $E = half::bf16;
                $body
            }
            d => Err(highrise_core::Error::Unsupported(format!(
                "{}: the cpu backend does not support {d} here",
                $op
            ))),
        }
    };
}
pub(crate) use with_float;

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn half_dot_in_registers_agrees_with_widening_first() {
        if !has_avx2_fma() {
            println!("skipped: this CPU has no AVX2+FMA+F16C");
            return;
        }
        for n in [1usize, 15, 16, 64, 100, 4096] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let wf: Vec<f32> = (0..n).map(|i| ((i * 53 % 89) as f32 - 44.0) / 30.0).collect();
            let (w16, wb16): (Vec<f16>, Vec<bf16>) = (wf.iter().map(|&v| f16::from_f32(v)).collect(), wf.iter().map(|&v| bf16::from_f32(v)).collect());
            let widen_dot = |w: Vec<f32>| x.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
            let want16 = widen_dot(w16.iter().map(|v| v.to_f32()).collect());
            let wantb = widen_dot(wb16.iter().map(|v| v.to_f32()).collect());
            let scale: f64 = x.iter().map(|v| v.abs() as f64 * 2.0).sum::<f64>() + 1.0;
            assert!((f16::dot_with(&x, &w16) as f64 - want16).abs() <= 1e-6 * scale, "f16 n={n}");
            assert!((bf16::dot_with(&x, &wb16) as f64 - wantb).abs() <= 1e-6 * scale, "bf16 n={n}");
        }
    }
}
