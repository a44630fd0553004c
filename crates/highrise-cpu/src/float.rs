//! The float element types the CPU backend stores (f32, f16, bf16) and bulk conversion to and from the
//! f32 it computes in.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use highrise_core::Element;

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
}

impl Float for f16 {
    fn load(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn store(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src)
    }
}

impl Float for bf16 {
    fn load(src: &[bf16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn store(src: &[f32], dst: &mut [bf16]) {
        dst.convert_from_f32_slice(src)
    }
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

/// Elementwise ops smaller than this many elements run on the calling thread: waking the pool for
/// them costs more than the work (decode runs hundreds of such ops per token).
pub const PAR_MIN_ELEMS: usize = 1 << 15;

/// The least number of items of `len` elements each a parallel task should take, so that small ops
/// are not split at all.
pub fn min_items(len: usize) -> usize {
    (PAR_MIN_ELEMS / len.max(1)).max(1)
}

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
