//! Matrix-vector kernels for block-quantized weights: one weight row (its blocks, in the file's
//! format) against one activation vector, never expanding the weights to f32 in memory.
//!
//! Two ways to meet the activation (`Activation`), each a type the row dispatchers `dot_rows` and
//! `dot_rows_many` are written once over:
//! - f32 (`F32Act`): dequantize-then-multiply, folded so a block costs one scale multiply:
//!   `sum_i x_i (d q_i + m) = d sum_i x_i q_i + m sum_i x_i`, with the block sums of x computed once.
//!   The result equals dequantize-then-multiply up to f32 rounding.
//! - 8-bit (`Q8Act`): x quantized per block of 32 (`x ~ dx * qx`, qx in -127..127) and integer
//!   dot products, as llama.cpp does. Bound (documented and tested): the error against the f32 path is
//!   at most `sum over blocks b of (dx_b / 2) * sum_{i in b} |w_i|`, plus f32 rounding.
//!
//! Q8_0, Q4_0, Q4_1, Q4_K and Q6_K have AVX2 kernels (chosen at run time); every format has a
//! portable one that computes the same sums. Four or more tokens' 8-bit activations against
//! Q4_0/Q4_1/Q8_0 rows (a prompt, a batch of decoding sequences) take an integer GEMM on AVX-512
//! VNNI (`vnni`) where the CPU has it: same integer sums, f32 terms in another order.
//!
//! Q4_0/Q4_1 weights loaded for the linear op are laid out 8 rows at a time (`DType::Q4_0R8`,
//! `Q4_1R8`, see `highrise_core::quant::repack_r8`): the decode kernels then read a block of 8 rows
//! with four 32-byte loads and keep one row per SIMD lane, so the scales of 8 rows convert in one
//! instruction and no row needs a horizontal sum: about 2.5x fewer instructions per byte than one
//! row at a time, which moves decode from instruction-bound towards memory-bound.
//!
//! Files: this one dispatches (rows of a format to the kernel that runs here); `portable` has the
//! kernels every machine runs, `avx2` the x86-64 ones, `vnni` the AVX-512 GEMM, `tests` checks each
//! against the portable ones.

use half::f16;
use highrise_core::quant::unpack_r8;
use highrise_core::DType;

#[cfg(target_arch = "x86_64")]
mod avx2;
mod portable;
#[cfg(target_arch = "x86_64")]
pub mod vnni;
#[cfg(test)]
mod tests;

pub use portable::{portable_f32, portable_q8};

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// An activation vector quantized per block of 32.
pub struct Q8Act {
    /// Scale of each block.
    pub d: Vec<f32>,
    pub q: Vec<i8>,
    /// Sum of each block's quantized values.
    pub isum: Vec<i32>,
    /// d * isum of each block: the block's sum as the quantized vector sees it.
    pub sum: Vec<f32>,
    /// (d, sum) of each block side by side, then two zeros: one 16-byte load gives a block's pair
    /// (and the next block's, or the zeros, in lanes the row kernels ignore).
    pub ds: Vec<f32>,
}

impl Q8Act {
    /// Each block's scale is its largest magnitude over 127; values round to nearest, ties away from
    /// zero (`f32::round`), on both paths.
    pub fn new(x: &[f32]) -> Q8Act {
        let blocks = x.len() / 32;
        let (d, q, isum, sum) = (vec![0.0; blocks], vec![0; blocks * 32], vec![0; blocks], vec![0.0; blocks]);
        let mut a = Q8Act { d, q, isum, sum, ds: Vec::new() };
        #[cfg(target_arch = "x86_64")]
        let done = if crate::simd::has_avx2_fma() {
            // SAFETY: AVX2 present (checked just above); `a` holds `blocks` whole blocks.
            unsafe { avx2::quantize(x, &mut a) };
            true
        } else {
            false
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = false;
        if !done {
            portable::quantize(x, &mut a);
        }
        a.ds = a.d.iter().zip(&a.sum).flat_map(|(&d, &s)| [d, s]).chain([0.0; 2]).collect();
        a
    }
}

/// One token's f32 activation as quantized rows meet it: its values and their sums per block of 32.
#[derive(Clone, Copy)]
pub struct F32Act<'a> {
    pub x: &'a [f32],
    pub sums: &'a [f32],
}

/// Sums of x over each block of 32.
pub fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(32).map(|b| b.iter().sum()).collect()
}

/// What a quantized row meets: the row dispatchers below are written once over it.
pub trait Activation: Sync {
    /// 8-bit (its formats that take several tokens per pass differ from f32's).
    const Q8: bool;

    /// The 8-bit activation itself, for the kernels only it meets.
    fn as_q8(&self) -> Option<&Q8Act> {
        None
    }

    /// `row · self` with the portable kernel, for a row of a plain (not interleaved) format.
    fn portable(&self, dtype: DType, row: &[u8]) -> f32;

    /// `out[t][r] = row r · xs[t]` for the rows in `rows` (`nb` blocks each) with an AVX2 kernel,
    /// N tokens in one pass; false where there is none for `dtype` and N.
    ///
    /// # Safety
    /// AVX2+FMA+F16C are present (`crate::simd::has_avx2_fma`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2<const N: usize>(dtype: DType, rows: &[u8], nb: usize, xs: &[&Self; N], out: &mut [f32]) -> bool;
}

impl Activation for F32Act<'_> {
    const Q8: bool = false;

    fn portable(&self, dtype: DType, row: &[u8]) -> f32 {
        portable_f32(dtype, row, self.x, self.sums)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2<const N: usize>(dtype: DType, rows: &[u8], nb: usize, xs: &[&Self; N], out: &mut [f32]) -> bool {
        if dtype.interleaved_rows() == 8 {
            let (x, sums) = (std::array::from_fn(|i| xs[i].x), std::array::from_fn(|i| xs[i].sums));
            avx2::r8_f32::<N>(rows, nb, &x, &sums, dtype == DType::Q4_1R8, out);
            return true;
        }
        let [a] = &xs[..] else { return false };
        match dtype {
            DType::Q8_0 => avx2::q8_f32_rows(rows, nb, a.x, out),
            DType::Q4K => avx2::q4k_f32_rows(rows, nb, a.x, a.sums, out),
            DType::Q6K => avx2::q6k_f32_rows(rows, nb, a.x, out),
            DType::Q4_0 | DType::Q4_1 => avx2::q4_f32_rows(rows, nb, a.x, a.sums, dtype == DType::Q4_1, out),
            _ => return false,
        }
        true
    }
}

impl Activation for Q8Act {
    const Q8: bool = true;

    fn as_q8(&self) -> Option<&Q8Act> {
        Some(self)
    }

    fn portable(&self, dtype: DType, row: &[u8]) -> f32 {
        portable_q8(dtype, row, self)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2<const N: usize>(dtype: DType, rows: &[u8], nb: usize, xs: &[&Self; N], out: &mut [f32]) -> bool {
        match dtype {
            _ if dtype.interleaved_rows() == 8 => avx2::r8_q8::<N>(rows, nb, xs, dtype == DType::Q4_1R8, out),
            DType::Q8_0 => avx2::q8_q8_rows::<N>(rows, nb, xs, out),
            _ => {
                let [a] = &xs[..] else { return false };
                match dtype {
                    DType::Q4K => avx2::q4k_q8_rows(rows, nb, a, out),
                    DType::Q6K => avx2::q6k_q8_rows(rows, nb, a, out),
                    DType::Q4_0 | DType::Q4_1 => avx2::q4_q8_rows(rows, nb, a, dtype == DType::Q4_1, out),
                    _ => return false,
                }
            }
        }
        true
    }
}

/// `out[r] = row r · x` for consecutive rows (`rows`, each `row_bytes` long) and one token's
/// activation: a decode step's matrix-vector product over a range of rows. Interleaved dtypes
/// (`Q4_0R8`, `Q4_1R8`) take whole groups of 8 rows.
pub fn dot_rows<A: Activation>(dtype: DType, rows: &[u8], row_bytes: usize, x: &A, out: &mut [f32]) {
    let rows = &rows[..out.len() * row_bytes];
    let interleaved = dtype.interleaved_rows() > 1;
    assert!(!interleaved || out.len().is_multiple_of(8), "{dtype}: {} rows are not whole groups of 8", out.len());
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2_fma() {
        let nb = row_bytes / dtype.block_bytes();
        // SAFETY: AVX2+FMA+F16C present (checked just above); the kernels assert the lengths they read.
        if unsafe { A::avx2::<1>(dtype, rows, nb, &[x], out) } {
            return;
        }
    }
    if interleaved {
        return r8_rows(dtype, rows, row_bytes, out, |plain, row, o| *o = x.portable(plain, row));
    }
    for (row, o) in rows.chunks_exact(row_bytes).zip(out) {
        *o = x.portable(dtype, row);
    }
}

/// `f(tile, tokens, out)` over tiles of the `n` rows in `rows` (each `row_bytes` long) of at most
/// 16 KiB, and tokens four at a time: each tile, read from memory once, then serves every token
/// from L1. `f` writes [tokens][tile rows] into `out`; `sink(t, r0, values)` then takes token t's
/// values for rows r0.. .
fn over_tiles(
    dtype: DType,
    rows: &[u8],
    row_bytes: usize,
    tokens: usize,
    mut f: impl FnMut(&[u8], std::ops::Range<usize>, &mut [f32]),
    mut sink: impl FnMut(usize, usize, &[f32]),
) {
    let n = rows.len() / row_bytes.max(1);
    let group = dtype.interleaved_rows().max(2);
    let tile = (16384 / row_bytes.max(1)).clamp(group, 64) / group * group;
    let mut buf = vec![0f32; tile * 4];
    for r0 in (0..n).step_by(tile) {
        let r1 = (r0 + tile).min(n);
        for t0 in (0..tokens).step_by(4) {
            let t1 = (t0 + 4).min(tokens);
            let o = &mut buf[..(t1 - t0) * (r1 - r0)];
            f(&rows[r0 * row_bytes..r1 * row_bytes], t0..t1, o);
            for (t, o) in (t0..t1).zip(o.chunks(r1 - r0)) {
                sink(t, r0, o);
            }
        }
    }
}

/// `sink(t, r0, values)`: token t's products `row r · xs[t]` for rows r0.. of `rows` (whole rows of
/// `row_bytes`), several tokens' activations (a batch of decoding sequences, or a prompt), over tiles
/// of rows: where a kernel takes several tokens per pass (`takes_tokens_together`: rows interleaved
/// by 8, and Q8_0 with 8-bit activations) four at a time, each block loaded and unpacked once for
/// the four; other formats token by token. Many 8-bit activations against Q4_0/Q4_1/Q8_0 rows take
/// the AVX-512 VNNI GEMM (`vnni`) where the CPU has it.
pub fn dot_rows_many<A: Activation>(dtype: DType, rows: &[u8], row_bytes: usize, xs: &[&A], sink: impl FnMut(usize, usize, &[f32])) {
    #[cfg(target_arch = "x86_64")]
    if A::Q8 && xs.len() >= vnni::MIN_TOKENS && vnni::takes(dtype) && vnni::available() {
        let q8s: Vec<&Q8Act> = xs.iter().filter_map(|x| x.as_q8()).collect();
        return vnni::gemm(dtype, rows, row_bytes, &q8s, sink);
    }
    let f = |w: &[u8], tokens: std::ops::Range<usize>, o: &mut [f32]| {
        let xs = &xs[tokens];
        #[cfg(target_arch = "x86_64")]
        if takes_tokens_together(dtype, A::Q8) {
            let nb = row_bytes / dtype.block_bytes();
            macro_rules! run {
                ($n:literal) => {
                    A::avx2::<$n>(dtype, w, nb, xs.try_into().unwrap(), o)
                };
            }
            // SAFETY: AVX2+FMA+F16C present (takes_tokens_together checked); the kernels assert the
            // lengths they read.
            let done = unsafe {
                match xs.len() {
                    4 => run!(4),
                    3 => run!(3),
                    2 => run!(2),
                    _ => run!(1),
                }
            };
            if done {
                return;
            }
        }
        for (x, o) in xs.iter().zip(o.chunks_mut(w.len() / row_bytes)) {
            dot_rows(dtype, w, row_bytes, *x, o);
        }
    };
    over_tiles(dtype, rows, row_bytes, xs.len(), f, sink);
}

/// Whether `dot_rows_many` has a kernel here that takes several tokens per pass over a tile of
/// `dtype` rows, for 8-bit activations (`q8`) or f32 ones; without, it goes token by token, and
/// beyond a few tokens a GEMM over dequantized rows is faster.
pub fn takes_tokens_together(dtype: DType, q8: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2_fma() {
        return dtype.interleaved_rows() == 8 || (q8 && (dtype == DType::Q8_0 || (vnni::available() && vnni::takes(dtype))));
    }
    let _ = (dtype, q8);
    false
}

/// Groups of 8 interleaved rows, each group unpacked to plain rows and each row through `row_dot`:
/// where no SIMD kernel takes them.
fn r8_rows(
    dtype: DType,
    rows: &[u8],
    row_bytes: usize,
    out: &mut [f32],
    row_dot: impl Fn(DType, &[u8], &mut f32),
) {
    let plain = dtype.plain();
    let nb = row_bytes / plain.block_bytes();
    let mut plain_rows = vec![0u8; 8 * row_bytes];
    for (group, o) in rows.chunks_exact(8 * row_bytes).zip(out.chunks_exact_mut(8)) {
        unpack_r8(plain, group, nb, &mut plain_rows);
        plain_rows.chunks_exact(row_bytes).zip(o).for_each(|(row, o)| row_dot(plain, row, o));
    }
}
