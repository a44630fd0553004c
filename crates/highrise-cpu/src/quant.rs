//! Matrix-vector kernels for block-quantized weights: one weight row (its blocks, in the file's
//! format) against one activation vector, never expanding the weights to f32 in memory.
//!
//! Two ways to meet the activation:
//! - f32 (`dot_f32`): dequantize-then-multiply, folded so a block costs one scale multiply:
//!   `sum_i x_i (d q_i + m) = d sum_i x_i q_i + m sum_i x_i`, with the block sums of x computed once.
//!   The result equals dequantize-then-multiply up to f32 rounding.
//! - 8-bit (`dot_q8`): x quantized per block of 32 (`x ~ dx * qx`, qx in -127..127) and integer
//!   dot products, as llama.cpp does. Bound (documented and tested): the error against the f32 path is
//!   at most `sum over blocks b of (dx_b / 2) * sum_{i in b} |w_i|`, plus f32 rounding.
//!
//! Q8_0, Q4_0, Q4_1, Q4_K and Q6_K have AVX2 kernels (chosen at run time); every format has a
//! portable one that computes the same sums.
//!
//! Q4_0/Q4_1 weights loaded for the linear op are laid out 8 rows at a time (`DType::Q4_0R8`,
//! `Q4_1R8`, see `highrise_core::quant::repack_r8`): the decode kernels then read a block of 8 rows
//! with four 32-byte loads and keep one row per SIMD lane, so the scales of 8 rows convert in one
//! instruction and no row needs a horizontal sum: about 2.5x fewer instructions per byte than one
//! row at a time, which moves decode from instruction-bound towards memory-bound.

use half::f16;
use highrise_core::quant::{dequantize, q4_k_block, q6_k_block, unpack_r8};
use highrise_core::DType;

use crate::float::dot;

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
        let done = if crate::float::has_avx2_fma() {
            // SAFETY: AVX2 present (checked just above); `a` holds `blocks` whole blocks.
            unsafe { avx2::quantize(x, &mut a) };
            true
        } else {
            false
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = false;
        if !done {
            quantize_portable(x, &mut a);
        }
        a.ds = a.d.iter().zip(&a.sum).flat_map(|(&d, &s)| [d, s]).chain([0.0; 2]).collect();
        a
    }
}

fn quantize_portable(x: &[f32], a: &mut Q8Act) {
    for (b, block) in x.chunks_exact(32).enumerate() {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let q = &mut a.q[b * 32..(b + 1) * 32];
        q.iter_mut().zip(block).for_each(|(q, v)| *q = (v * id).round() as i8);
        a.isum[b] = q.iter().map(|&q| q as i32).sum();
        a.sum[b] = d * a.isum[b] as f32;
        a.d[b] = d;
    }
}

/// Sums of x over each block of 32.
pub fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(32).map(|b| b.iter().sum()).collect()
}

/// `out[r] = row r · x` for consecutive rows (`rows`, each `row_bytes` long) and one f32
/// activation (`xsum` its block sums): a decode step's matrix-vector product over a range of rows.
/// Interleaved dtypes (`Q4_0R8`, `Q4_1R8`) take whole groups of 8 rows.
pub fn dot_f32_rows(dtype: DType, rows: &[u8], row_bytes: usize, x: &[f32], xsum: &[f32], out: &mut [f32]) {
    let rows = &rows[..out.len() * row_bytes];
    if dtype.interleaved_rows() > 1 {
        return r8_rows(dtype, rows, row_bytes, out, |plain, row, o| *o = portable_f32(plain, row, x, xsum), |_nb, _q4_1, _out| {
            #[cfg(target_arch = "x86_64")]
            if crate::float::has_avx2_fma() {
                // SAFETY: AVX2+FMA+F16C present (checked just above); the kernel asserts its lengths.
                unsafe { avx2::r8_f32::<1>(rows, _nb, &[x], &[xsum], _q4_1, _out) };
                return true;
            }
            false
        });
    }
    #[cfg(target_arch = "x86_64")]
    if crate::float::has_avx2_fma() && matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q8_0 | DType::Q4K | DType::Q6K) {
        let nb = row_bytes / dtype.block_bytes();
        // SAFETY: AVX2+FMA+F16C present (checked above); the kernels assert the lengths they read.
        unsafe {
            match dtype {
                DType::Q8_0 => avx2::q8_f32_rows(rows, nb, x, out),
                DType::Q4K => avx2::q4k_f32_rows(rows, nb, x, xsum, out),
                DType::Q6K => avx2::q6k_f32_rows(rows, nb, x, out),
                _ => avx2::q4_f32_rows(rows, nb, x, xsum, dtype == DType::Q4_1, out),
            }
        }
        return;
    }
    for (row, o) in rows.chunks_exact(row_bytes).zip(out) {
        *o = portable_f32(dtype, row, x, xsum);
    }
}

/// `out[r] = row r · x` for consecutive rows (`rows`, each `row_bytes` long) and one 8-bit
/// activation: a decode step's matrix-vector product over a range of output rows.
/// Interleaved dtypes (`Q4_0R8`, `Q4_1R8`) take whole groups of 8 rows.
pub fn dot_q8_rows(dtype: DType, rows: &[u8], row_bytes: usize, x: &Q8Act, out: &mut [f32]) {
    let rows = &rows[..out.len() * row_bytes];
    if dtype.interleaved_rows() > 1 {
        return r8_rows(dtype, rows, row_bytes, out, |plain, row, o| *o = portable_q8(plain, row, x), |_nb, _q4_1, _out| {
            #[cfg(target_arch = "x86_64")]
            if crate::float::has_avx2_fma() {
                // SAFETY: AVX2+FMA+F16C present (checked just above); the kernel asserts its lengths.
                unsafe { avx2::r8_q8::<1>(rows, _nb, &[x], _q4_1, _out) };
                return true;
            }
            false
        });
    }
    #[cfg(target_arch = "x86_64")]
    if crate::float::has_avx2_fma() && matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q8_0 | DType::Q4K | DType::Q6K) {
        let nb = row_bytes / dtype.block_bytes();
        // SAFETY: AVX2+FMA+F16C present (checked above); the kernels assert the lengths they read.
        unsafe {
            match dtype {
                DType::Q8_0 => avx2::q8_q8_rows::<1>(rows, nb, &[x], out),
                DType::Q4K => avx2::q4k_q8_rows(rows, nb, x, out),
                DType::Q6K => avx2::q6k_q8_rows(rows, nb, x, out),
                _ => avx2::q4_q8_rows(rows, nb, x, dtype == DType::Q4_1, out),
            }
        }
        return;
    }
    for (row, o) in rows.chunks_exact(row_bytes).zip(out) {
        *o = portable_q8(dtype, row, x);
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
/// `row_bytes`), several f32 activations (`sums` their block sums), over tiles of rows: rows
/// interleaved by 8 take four tokens per pass (nibbles widened once for the four), other formats one.
pub fn dot_f32_rows_many(dtype: DType, rows: &[u8], row_bytes: usize, xs: &[&[f32]], sums: &[&[f32]], sink: impl FnMut(usize, usize, &[f32])) {
    let nb = row_bytes / dtype.block_bytes();
    let f = |w: &[u8], tokens: std::ops::Range<usize>, o: &mut [f32]| {
        let (xs, sums) = (&xs[tokens.clone()], &sums[tokens]);
        #[cfg(target_arch = "x86_64")]
        if takes_tokens_together(dtype, false) {
            let q4_1 = dtype == DType::Q4_1R8;
            macro_rules! run {
                ($n:literal) => {
                    avx2::r8_f32::<$n>(w, nb, xs.try_into().unwrap(), sums.try_into().unwrap(), q4_1, o)
                };
            }
            // SAFETY: AVX2+FMA+F16C present (checked above); the kernel asserts the lengths it reads.
            unsafe {
                match xs.len() {
                    4 => run!(4),
                    3 => run!(3),
                    2 => run!(2),
                    _ => run!(1),
                }
            }
            return;
        }
        for ((x, s), o) in xs.iter().zip(sums).zip(o.chunks_mut(w.len() / row_bytes)) {
            dot_f32_rows(dtype, w, row_bytes, x, s, o);
        }
    };
    over_tiles(dtype, rows, row_bytes, xs.len(), f, sink);
}

/// Whether `dot_q8_rows_many` (`q8`) or `dot_f32_rows_many` has a kernel here that takes several
/// tokens per pass over a tile of `dtype` rows; without, they go token by token, and beyond a few
/// tokens a GEMM over dequantized rows is faster.
pub fn takes_tokens_together(dtype: DType, q8: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::float::has_avx2_fma() {
        return dtype.interleaved_rows() == 8 || (q8 && dtype == DType::Q8_0);
    }
    let _ = (dtype, q8);
    false
}

/// `sink(t, r0, values)`: token t's products `row r · xs[t]` for rows r0.. of `rows`, several 8-bit
/// activations (a batch of decoding sequences, or a prompt), over tiles of rows: Q8_0 and rows
/// interleaved by 8 take four tokens per pass (each block loaded and unpacked once for the four),
/// other formats one.
pub fn dot_q8_rows_many(dtype: DType, rows: &[u8], row_bytes: usize, xs: &[&Q8Act], sink: impl FnMut(usize, usize, &[f32])) {
    let nb = row_bytes / dtype.block_bytes();
    let f = |w: &[u8], tokens: std::ops::Range<usize>, o: &mut [f32]| {
        let xs = &xs[tokens];
        #[cfg(target_arch = "x86_64")]
        if takes_tokens_together(dtype, true) {
            let q4_1 = dtype == DType::Q4_1R8;
            macro_rules! run {
                ($n:literal) => {
                    match dtype {
                        DType::Q8_0 => avx2::q8_q8_rows::<$n>(w, nb, xs.try_into().unwrap(), o),
                        _ => avx2::r8_q8::<$n>(w, nb, xs.try_into().unwrap(), q4_1, o),
                    }
                };
            }
            // SAFETY: AVX2+FMA+F16C present (checked above); the kernels assert the lengths they read.
            unsafe {
                match xs.len() {
                    4 => run!(4),
                    3 => run!(3),
                    2 => run!(2),
                    _ => run!(1),
                }
            }
            return;
        }
        for (x, o) in xs.iter().zip(o.chunks_mut(w.len() / row_bytes)) {
            dot_q8_rows(dtype, w, row_bytes, x, o);
        }
    };
    over_tiles(dtype, rows, row_bytes, xs.len(), f, sink);
}

/// Groups of 8 interleaved rows through `simd(nb, q4_1, out)` where it runs (it says whether it
/// did); otherwise each group unpacked to plain rows and each row through `row_dot`.
fn r8_rows(
    dtype: DType,
    rows: &[u8],
    row_bytes: usize,
    out: &mut [f32],
    row_dot: impl Fn(DType, &[u8], &mut f32),
    simd: impl FnOnce(usize, bool, &mut [f32]) -> bool,
) {
    let plain = dtype.plain();
    assert!(out.len().is_multiple_of(8), "{dtype}: {} rows are not whole groups of 8", out.len());
    let nb = row_bytes / plain.block_bytes();
    if simd(nb, plain == DType::Q4_1, out) {
        return;
    }
    let mut plain_rows = vec![0u8; 8 * row_bytes];
    for (group, o) in rows.chunks_exact(8 * row_bytes).zip(out.chunks_exact_mut(8)) {
        unpack_r8(plain, group, nb, &mut plain_rows);
        plain_rows.chunks_exact(row_bytes).zip(o).for_each(|(row, o)| row_dot(plain, row, o));
    }
}

/// (scale d, offset m, nibbles) of a Q4_0 / Q4_1 block: value j is `d * q_j + m`.
fn q4_parts(blk: &[u8], q4_1: bool) -> (f32, f32, &[u8]) {
    let d = f16_at(blk, 0);
    if q4_1 {
        (d, f16_at(blk, 2), &blk[4..20])
    } else {
        (d, -8.0 * d, &blk[2..18])
    }
}

pub fn portable_f32(dtype: DType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let bb = dtype.block_bytes();
    match dtype {
        DType::Q4_0 | DType::Q4_1 => row
            .chunks_exact(bb)
            .enumerate()
            .map(|(b, blk)| {
                let (d, m, qs) = q4_parts(blk, dtype == DType::Q4_1);
                let xb = &x[b * 32..b * 32 + 32];
                let s: f32 = qs.iter().enumerate().map(|(j, q)| (q & 0xF) as f32 * xb[j] + (q >> 4) as f32 * xb[j + 16]).sum();
                d * s + m * xsum[b]
            })
            .sum(),
        DType::Q8_0 => row
            .chunks_exact(bb)
            .enumerate()
            .map(|(b, blk)| {
                let s: f32 = blk[2..34].iter().zip(&x[b * 32..b * 32 + 32]).map(|(&q, x)| (q as i8) as f32 * x).sum();
                f16_at(blk, 0) * s
            })
            .sum(),
        // K-quants: each block of 256 dequantized on the stack, then an f32 dot product.
        _ => {
            let mut y = [0f32; 256];
            let bl = dtype.block_len();
            row.chunks_exact(bb)
                .enumerate()
                .map(|(b, blk)| {
                    dequantize(dtype, blk, &mut y[..bl]).expect("whole blocks");
                    dot(&y[..bl], &x[b * bl..(b + 1) * bl])
                })
                .sum()
        }
    }
}

/// Integer dot product of two runs of values.
fn idot<A: Copy + Into<i32>>(a: &[A], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&a, &b)| a.into() * b as i32).sum()
}

pub fn portable_q8(dtype: DType, row: &[u8], x: &Q8Act) -> f32 {
    let bb = dtype.block_bytes();
    let mut total = 0f32;
    for (b, blk) in row.chunks_exact(bb).enumerate() {
        match dtype {
            DType::Q4_0 | DType::Q4_1 => {
                let (d, m, qs) = q4_parts(blk, dtype == DType::Q4_1);
                let qx = &x.q[b * 32..b * 32 + 32];
                let lo: i32 = qs.iter().zip(&qx[..16]).map(|(q, &v)| (q & 0xF) as i32 * v as i32).sum();
                let hi: i32 = qs.iter().zip(&qx[16..]).map(|(q, &v)| (q >> 4) as i32 * v as i32).sum();
                total += d * x.d[b] * (lo + hi) as f32 + m * x.sum[b];
            }
            DType::Q8_0 => {
                let w: Vec<i8> = blk[2..34].iter().map(|&q| q as i8).collect();
                total += f16_at(blk, 0) * x.d[b] * idot(&w, &x.q[b * 32..b * 32 + 32]) as f32;
            }
            DType::Q4K => {
                // Sub-block j of 32 meets activation block 8b + j: d*sc*dx*sum(q qx) - dmin*mn*sum(x).
                let k = q4_k_block(blk);
                for (j, &(sc, mn)) in k.scale_min.iter().enumerate() {
                    let xb = b * 8 + j;
                    let s = idot(&k.q[j * 32..j * 32 + 32], &x.q[xb * 32..xb * 32 + 32]);
                    total += k.d * sc * x.d[xb] * s as f32 - k.dmin * mn * x.sum[xb];
                }
            }
            DType::Q6K => {
                // Sub-blocks of 16 with their own scales; two of them per activation block of 32.
                let k = q6_k_block(blk);
                for j in 0..16 {
                    let xb = b * 8 + j / 2;
                    let s = idot(&k.q[j * 16..j * 16 + 16], &x.q[b * 256 + j * 16..b * 256 + j * 16 + 16]);
                    total += k.d * k.scales[j] as f32 * x.d[xb] * s as f32;
                }
            }
            _ => unreachable!("float weights take the f32 paths"),
        }
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use highrise_core::DType;

    use super::Q8Act;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `Q8Act::new` eight lanes at a time.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize(x: &[f32], a: &mut Q8Act) {
        let abs = _mm256_set1_ps(-0.0);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (b, block) in x.chunks_exact(32).enumerate().take(a.d.len()) {
            let p = block.as_ptr();
            let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_andnot_ps(abs, v[0]), _mm256_andnot_ps(abs, v[1])),
                _mm256_max_ps(_mm256_andnot_ps(abs, v[2]), _mm256_andnot_ps(abs, v[3])),
            );
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            // Round half away from zero, as f32::round: truncate, then step away from zero where the
            // dropped fraction (exact) is at least one half.
            let i = v.map(|v| {
                let s = _mm256_mul_ps(v, id);
                let t = _mm256_round_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                let half = _mm256_cmp_ps(_mm256_andnot_ps(abs, _mm256_sub_ps(s, t)), _mm256_set1_ps(0.5), _CMP_GE_OQ);
                let step = _mm256_and_ps(half, _mm256_or_ps(_mm256_and_ps(abs, s), _mm256_set1_ps(1.0)));
                _mm256_cvtps_epi32(_mm256_add_ps(t, step))
            });
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            _mm256_storeu_si256(a.q.as_mut_ptr().add(b * 32) as *mut __m256i, _mm256_permutevar8x32_epi32(bytes, order));
            let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let isum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)));
            (a.d[b], a.isum[b], a.sum[b]) = (d, isum, d * isum as f32);
        }
    }

    /// `$block!(b, i)` for blocks b = 0..nb, four at a time into accumulators i = 0..3 (so no block
    /// waits on the previous one's FMA), the rest into 0.
    macro_rules! over_blocks {
        ($nb:expr, $block:ident) => {{
            let mut b = 0;
            while b + 4 <= $nb {
                $block!(b, 0);
                $block!(b + 1, 1);
                $block!(b + 2, 2);
                $block!(b + 3, 3);
                b += 4;
            }
            while b < $nb {
                $block!(b, 0);
                b += 1;
            }
        }};
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum4(acc: &[__m256; 4]) -> f32 {
        hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
    }

    /// How far ahead of the block being read the row kernels prefetch: the weights of a decode step
    /// stream from memory, and each op's start cold.
    const PF: usize = 1024;

    /// `out[r] = row r · x` for `out.len()` consecutive Q4_0/Q4_1 rows of `nb` blocks starting at
    /// `w`, one 8-bit activation: the decode matrix-vector product, a row range per call so nothing
    /// but the blocks is paid per row. A block costs one 16-byte load broadcast to both lanes, one
    /// variable shift and one mask to put its 32 nibbles in x's order (low nibbles in the low lane,
    /// high in the high), an integer dot product, and its scale pair (d, m) converted from f16 and
    /// multiplied by x's (d, sum) in one 4-lane step. Four accumulators, one per block mod 4, so no
    /// block waits on the previous one's FMA.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_q8_rows(w: &[u8], nb: usize, x: &Q8Act, q4_1: bool, out: &mut [f32]) {
        let (bb, qoff) = if q4_1 { (20, 4) } else { (18, 2) };
        assert!(w.len() >= out.len() * nb * bb && x.q.len() >= nb * 32 && x.ds.len() >= 2 * nb + 2);
        let shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        // Q4_0 has no m: it is -8d.
        let q4_0_m = _mm_setr_ps(1.0, -8.0, 0.0, 0.0);
        let (xq, xds) = (x.q.as_ptr(), x.ds.as_ptr());
        for (r, o) in out.iter_mut().enumerate() {
            let row = w.as_ptr().add(r * nb * bb);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut accm = [_mm_setzero_ps(); 4];
            macro_rules! block {
                ($b:expr, $i:expr) => {{
                    let b = $b;
                    let blk = row.add(b * bb);
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PF) as *const i8);
                    let dm = if q4_1 {
                        _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()))
                    } else {
                        _mm_mul_ps(_mm_cvtph_ps(_mm_set1_epi16((blk as *const i16).read_unaligned())), q4_0_m)
                    };
                    // (d dx, m sum_x): the block's integer dot product's scale, and its offset term.
                    let s = _mm_mul_ps(dm, _mm_loadu_ps(xds.add(2 * b)));
                    accm[$i] = _mm_add_ps(accm[$i], s);
                    let q = _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.add(qoff) as *const __m128i));
                    let wv = _mm256_and_si256(_mm256_srlv_epi32(q, shift), mask);
                    let xv = _mm256_loadu_si256(xq.add(b * 32) as *const __m256i);
                    let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones));
                    acc[$i] = _mm256_fmadd_ps(_mm256_broadcastss_ps(s), p, acc[$i]);
                }};
            }
            over_blocks!(nb, block);
            let m = _mm_add_ps(_mm_add_ps(accm[0], accm[1]), _mm_add_ps(accm[2], accm[3]));
            *o = hsum4(&acc) + _mm_cvtss_f32(_mm_shuffle_ps(m, m, 1));
        }
    }

    /// `out[r] = row r · x` for `out.len()` consecutive Q4_0/Q4_1 rows of `nb` blocks starting at
    /// `w`, one f32 activation with block sums `xsum`: the decode path that keeps x exact. A block's
    /// 16 bytes are widened eight at a time to 32-bit lanes, split into low nibbles (values 0..7 or
    /// 8..15 of the block) and high ones (16..23, 24..31), converted to f32 and multiplied into x;
    /// then `d * sum(q x) + m * sum(x)`, folded as the module's doc says. Four accumulators, as in
    /// `q4_q8_rows`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_f32_rows(w: &[u8], nb: usize, x: &[f32], xsum: &[f32], q4_1: bool, out: &mut [f32]) {
        let (bb, qoff) = if q4_1 { (20, 4) } else { (18, 2) };
        assert!(w.len() >= out.len() * nb * bb && x.len() >= nb * 32 && xsum.len() >= nb);
        let mask = _mm256_set1_epi32(0x0F);
        let (xp, sp) = (x.as_ptr(), xsum.as_ptr());
        for (r, o) in out.iter_mut().enumerate() {
            let row = w.as_ptr().add(r * nb * bb);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut offset = [0f32; 4];
            macro_rules! block {
                ($b:expr, $i:expr) => {{
                    let b = $b;
                    let blk = row.add(b * bb);
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PF) as *const i8);
                    let (d, m) = if q4_1 {
                        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
                        (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
                    } else {
                        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const u16).read_unaligned() as i32)));
                        (d, -8.0 * d)
                    };
                    let q = blk.add(qoff);
                    let xb = xp.add(b * 32);
                    let (b0, b1) = (
                        _mm256_cvtepu8_epi32(_mm_loadl_epi64(q as *const __m128i)),
                        _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.add(8) as *const __m128i)),
                    );
                    let f = |v: __m256i| _mm256_cvtepi32_ps(v);
                    let mut s = _mm256_mul_ps(f(_mm256_and_si256(b0, mask)), _mm256_loadu_ps(xb));
                    s = _mm256_fmadd_ps(f(_mm256_and_si256(b1, mask)), _mm256_loadu_ps(xb.add(8)), s);
                    s = _mm256_fmadd_ps(f(_mm256_srli_epi32(b0, 4)), _mm256_loadu_ps(xb.add(16)), s);
                    s = _mm256_fmadd_ps(f(_mm256_srli_epi32(b1, 4)), _mm256_loadu_ps(xb.add(24)), s);
                    acc[$i] = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc[$i]);
                    offset[$i] += m * *sp.add(b);
                }};
            }
            over_blocks!(nb, block);
            *o = hsum4(&acc) + ((offset[0] + offset[1]) + (offset[2] + offset[3]));
        }
    }

    /// `out[r] = row r · x` for `out.len()` consecutive Q8_0 rows of `nb` blocks starting at `w`,
    /// one f32 activation: as `q4_f32_rows`, the bytes widened as they are.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_f32_rows(w: &[u8], nb: usize, x: &[f32], out: &mut [f32]) {
        assert!(w.len() >= out.len() * nb * 34 && x.len() >= nb * 32);
        let xp = x.as_ptr();
        for (r, o) in out.iter_mut().enumerate() {
            let row = w.as_ptr().add(r * nb * 34);
            let mut acc = [_mm256_setzero_ps(); 4];
            macro_rules! block {
                ($b:expr, $i:expr) => {{
                    let b = $b;
                    let blk = row.add(b * 34);
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PF) as *const i8);
                    let d = _mm256_cvtph_ps(_mm_set1_epi16((blk as *const i16).read_unaligned()));
                    let (q, xb) = (blk.add(2), xp.add(b * 32));
                    let wf = |k: usize| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(8 * k) as *const __m128i)));
                    let mut s = _mm256_mul_ps(wf(0), _mm256_loadu_ps(xb));
                    s = _mm256_fmadd_ps(wf(1), _mm256_loadu_ps(xb.add(8)), s);
                    s = _mm256_fmadd_ps(wf(2), _mm256_loadu_ps(xb.add(16)), s);
                    s = _mm256_fmadd_ps(wf(3), _mm256_loadu_ps(xb.add(24)), s);
                    acc[$i] = _mm256_fmadd_ps(d, s, acc[$i]);
                }};
            }
            over_blocks!(nb, block);
            *o = hsum4(&acc);
        }
    }

    /// (bytes of one block of 8 interleaved rows, where its nibbles start): after 8 f16 scales, and
    /// for Q4_1 8 f16 minimums.
    #[inline]
    fn r8_layout(q4_1: bool) -> (usize, usize) {
        let plain = if q4_1 { DType::Q4_1 } else { DType::Q4_0 };
        (8 * plain.block_bytes(), highrise_core::quant::r8_offsets(plain).2)
    }

    /// `out[t * rows + 8g + r] = row r of group g · xs[t]` for groups of 8 interleaved Q4_0/Q4_1
    /// rows (`nb` blocks each, `highrise_core::quant::repack_r8`'s layout) and N 8-bit activations
    /// (one token, or a few decoding together: each block's nibbles are split once for all N). Per
    /// block of 8 rows: four 32-byte loads, each holding 4 bytes of every row, split into low and
    /// high nibbles and multiplied with x's matching 4 bytes broadcast to all lanes, so each row's
    /// sum lands in its own 32-bit lane (16-bit partial sums: 8 products of at most 15 * 127 per
    /// pair stay below 2^15); the 8 rows' scales converted in one instruction each; no horizontal
    /// sums. Two accumulators per token, alternating by block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn r8_q8<const N: usize>(w: &[u8], nb: usize, xs: &[&Q8Act; N], q4_1: bool, out: &mut [f32]) {
        let (gb, q_at) = r8_layout(q4_1);
        let rows = out.len() / N;
        assert!(rows.is_multiple_of(8) && out.len() == rows * N && w.len() >= rows / 8 * nb * gb);
        assert!(xs.iter().all(|x| x.q.len() >= nb * 32 && x.d.len() >= nb && x.sum.len() >= nb));
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let neg8 = _mm256_set1_ps(-8.0);
        let xq: [*const i32; N] = std::array::from_fn(|t| xs[t].q.as_ptr() as *const i32);
        let xd: [*const f32; N] = std::array::from_fn(|t| xs[t].d.as_ptr());
        let xsum: [*const f32; N] = std::array::from_fn(|t| xs[t].sum.as_ptr());
        for g in 0..rows / 8 {
            let grp = w.as_ptr().add(g * nb * gb);
            let mut acc = [[_mm256_setzero_ps(); 2]; N];
            macro_rules! block {
                ($b:expr, $i:expr) => {{
                    let b = $b;
                    let blk = grp.add(b * gb);
                    for l in 0..3 {
                        _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PF + 64 * l) as *const i8);
                    }
                    let mut s16 = [_mm256_setzero_si256(); N];
                    for c in 0..4 {
                        let v = _mm256_loadu_si256(blk.add(q_at + 32 * c) as *const __m256i);
                        let lo = _mm256_and_si256(v, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
                        for t in 0..N {
                            // x's values 4c..4c+3 and 16+4c..16+4c+3 of block b, in every lane.
                            let xl = _mm256_set1_epi32(xq[t].add(8 * b + c).read_unaligned());
                            let xh = _mm256_set1_epi32(xq[t].add(8 * b + 4 + c).read_unaligned());
                            let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                            s16[t] = _mm256_add_epi16(s16[t], p);
                        }
                    }
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                    let m = if q4_1 { _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i)) } else { _mm256_mul_ps(d, neg8) };
                    for t in 0..N {
                        let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[t], ones));
                        let a = &mut acc[t][$i];
                        *a = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(*xd[t].add(b))), p, *a);
                        *a = _mm256_fmadd_ps(m, _mm256_set1_ps(*xsum[t].add(b)), *a);
                    }
                }};
            }
            let mut b = 0;
            while b + 2 <= nb {
                block!(b, 0);
                block!(b + 1, 1);
                b += 2;
            }
            if b < nb {
                block!(b, 0);
            }
            for (t, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(t * rows + 8 * g), _mm256_add_ps(a[0], a[1]));
            }
        }
    }

    /// `out[t * rows + 8g + r] = row r of group g · xs[t]` for groups of 8 interleaved Q4_0/Q4_1
    /// rows and N f32 activations (`sums` their block sums): `d * sum(q x) + m * sum(x)` per block,
    /// as `q4_f32_rows`. Each 32-byte load holds 4 bytes of every row; byte e's low and high nibbles
    /// (values 4c+e and 16+4c+e of each row) are shifted down within the 32-bit lanes, masked and
    /// converted once for all N tokens, and meet each token's value broadcast to all lanes. Partial
    /// sums per block: eight for one token, two each for several, so no FMA waits on the last.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn r8_f32<const N: usize>(w: &[u8], nb: usize, xs: &[&[f32]; N], sums: &[&[f32]; N], q4_1: bool, out: &mut [f32]) {
        let (gb, q_at) = r8_layout(q4_1);
        let rows = out.len() / N;
        assert!(rows.is_multiple_of(8) && out.len() == rows * N && w.len() >= rows / 8 * nb * gb);
        assert!(xs.iter().all(|x| x.len() >= nb * 32) && sums.iter().all(|s| s.len() >= nb));
        let chains = if N == 1 { 8 } else { 2 };
        let nib = _mm256_set1_epi32(0x0F);
        let neg8 = _mm256_set1_ps(-8.0);
        for g in 0..rows / 8 {
            let grp = w.as_ptr().add(g * nb * gb);
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..nb {
                let blk = grp.add(b * gb);
                for l in 0..3 {
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PF + 64 * l) as *const i8);
                }
                let xb: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr().add(b * 32));
                let mut s = [[_mm256_setzero_ps(); 8]; N];
                macro_rules! nibble {
                    ($v:expr, $shift:literal, $s:expr, $at:expr) => {{
                        let q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32::<$shift>($v), nib));
                        for t in 0..N {
                            let p = &mut s[t][$s % chains];
                            *p = _mm256_fmadd_ps(q, _mm256_broadcast_ss(&*xb[t].add($at)), *p);
                        }
                    }};
                }
                for c in 0..4 {
                    let v = _mm256_loadu_si256(blk.add(q_at + 32 * c) as *const __m256i);
                    nibble!(v, 0, 0, 4 * c);
                    nibble!(v, 4, 4, 16 + 4 * c);
                    nibble!(v, 8, 1, 4 * c + 1);
                    nibble!(v, 12, 5, 16 + 4 * c + 1);
                    nibble!(v, 16, 2, 4 * c + 2);
                    nibble!(v, 20, 6, 16 + 4 * c + 2);
                    nibble!(v, 24, 3, 4 * c + 3);
                    nibble!(v, 28, 7, 16 + 4 * c + 3);
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                let m = if q4_1 { _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i)) } else { _mm256_mul_ps(d, neg8) };
                for t in 0..N {
                    let sum = if N == 1 {
                        let s = &s[t];
                        _mm256_add_ps(
                            _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3])),
                            _mm256_add_ps(_mm256_add_ps(s[4], s[5]), _mm256_add_ps(s[6], s[7])),
                        )
                    } else {
                        _mm256_add_ps(s[t][0], s[t][1])
                    };
                    acc[t] = _mm256_fmadd_ps(d, sum, acc[t]);
                    acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(*sums[t].get_unchecked(b)), acc[t]);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(t * rows + 8 * g), *a);
            }
        }
    }

    /// The d, dmin and 8 (scale, min) pairs of a Q4_K block: value = d * scale_j * q - dmin * min_j.
    #[inline(always)]
    unsafe fn q4k_scales(blk: *const u8) -> (f32, f32, [(f32, f32); 8]) {
        let b = std::slice::from_raw_parts(blk, 16);
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let dmin = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
        (d, dmin, std::array::from_fn(|j| highrise_core::quant::scale_min_k4(j, &b[4..16])))
    }

    /// The frame of the Q4_K row kernels: for each row and super-block, its scales, the minimums
    /// against x's block sums `sums` (per 32), and `chunk(blk, b, c, d, scales)`, the products of
    /// nibble chunk c (sub-blocks 2c and 2c+1), summed over the row.
    #[inline(always)]
    unsafe fn q4k_rows(
        w: &[u8],
        nb: usize,
        sums: &[f32],
        out: &mut [f32],
        chunk: impl Fn(*const u8, usize, usize, f32, &[(f32, f32); 8]) -> __m256,
    ) {
        assert!(w.len() >= out.len() * nb * 144 && sums.len() >= nb * 8);
        for (r, o) in out.iter_mut().enumerate() {
            let row = w.as_ptr().add(r * nb * 144);
            let mut acc = [_mm256_setzero_ps(); 2];
            let mut mins = 0f32;
            for b in 0..nb {
                let blk = row.add(b * 144);
                for l in 0..3 {
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PF + 64 * l) as *const i8);
                }
                let (d, dmin, sm) = q4k_scales(blk);
                for (j, &(_, mn)) in sm.iter().enumerate() {
                    mins -= dmin * mn * *sums.get_unchecked(8 * b + j);
                }
                for c in 0..4 {
                    acc[c & 1] = _mm256_add_ps(acc[c & 1], chunk(blk, b, c, d, &sm));
                }
            }
            *o = hsum(_mm256_add_ps(acc[0], acc[1])) + mins;
        }
    }

    /// `out[r] = row r · x` for consecutive Q4_K rows of `nb` super-blocks (256 values: 8 sub-blocks
    /// of 32 with 6-bit scales and minimums), one 8-bit activation. Each 32 bytes of nibbles hold two
    /// sub-blocks (low nibbles, then high), each meeting its own 32 activation bytes in an integer
    /// dot product scaled by d * scale_j * dx; the minimums meet x's block sums once per super-block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4k_q8_rows(w: &[u8], nb: usize, x: &Q8Act, out: &mut [f32]) {
        assert!(x.q.len() >= nb * 256 && x.d.len() >= nb * 8);
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let (xq, xd) = (x.q.as_ptr(), x.d.as_ptr());
        q4k_rows(w, nb, &x.sum, out, |blk, b, c, d, sm| {
            let q = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
            let dot = |nib: __m256i, sub: usize| {
                let j = 8 * b + sub;
                let xv = _mm256_loadu_si256(xq.add(j * 32) as *const __m256i);
                let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(nib, xv), ones));
                _mm256_mul_ps(p, _mm256_set1_ps(d * sm[sub].0 * *xd.add(j)))
            };
            let lo = dot(_mm256_and_si256(q, mask), 2 * c);
            _mm256_add_ps(lo, dot(_mm256_and_si256(_mm256_srli_epi16::<4>(q), mask), 2 * c + 1))
        })
    }

    /// `out[r] = row r · x` for consecutive Q4_K rows of `nb` super-blocks, one f32 activation with
    /// block sums `xsum` (per 32): per sub-block `d * scale_j * sum(q x) - dmin * min_j * sum(x)`,
    /// the nibbles widened eight at a time in 32-bit lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4k_f32_rows(w: &[u8], nb: usize, x: &[f32], xsum: &[f32], out: &mut [f32]) {
        assert!(x.len() >= nb * 256);
        let mask = _mm256_set1_epi32(0x0F);
        let xp = x.as_ptr();
        q4k_rows(w, nb, xsum, out, |blk, b, c, d, sm| {
            let q = blk.add(16 + 32 * c);
            let (x0, x1) = (xp.add((8 * b + 2 * c) * 32), xp.add((8 * b + 2 * c + 1) * 32));
            let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for g in 0..4 {
                let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.add(8 * g) as *const __m128i));
                let lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
                let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(v));
                s0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x0.add(8 * g)), s0);
                s1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x1.add(8 * g)), s1);
            }
            _mm256_fmadd_ps(s0, _mm256_set1_ps(d * sm[2 * c].0), _mm256_mul_ps(s1, _mm256_set1_ps(d * sm[2 * c + 1].0)))
        })
    }

    /// The 6-bit values (0..63, before the offset of 32) of one half (128 values) of a Q6_K block:
    /// 4 vectors of 32, values 32g..32g+31 of the half in vector g.
    #[inline(always)]
    unsafe fn q6k_half(blk: *const u8, h: usize) -> [__m256i; 4] {
        let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        let ql0 = _mm256_loadu_si256(blk.add(64 * h) as *const __m256i);
        let ql1 = _mm256_loadu_si256(blk.add(64 * h + 32) as *const __m256i);
        let qh = _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i);
        [
            _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m2)),
            _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4), _mm256_and_si256(qh, m2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4), _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2)),
        ]
    }

    /// The frame of the Q6_K row kernels: for each row and super-block, `half(blk, b, h, d,
    /// scales)`, the products of half h (128 values) of block b, summed over the row.
    #[inline(always)]
    unsafe fn q6k_rows(w: &[u8], nb: usize, out: &mut [f32], half: impl Fn(*const u8, usize, usize, f32, *const i8) -> __m256) {
        assert!(w.len() >= out.len() * nb * 210);
        for (r, o) in out.iter_mut().enumerate() {
            let row = w.as_ptr().add(r * nb * 210);
            let mut acc = [_mm256_setzero_ps(); 2];
            for b in 0..nb {
                let blk = row.add(b * 210);
                for l in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PF + 64 * l) as *const i8);
                }
                let d = half::f16::from_le_bytes([*blk.add(208), *blk.add(209)]).to_f32();
                for h in 0..2 {
                    acc[h] = _mm256_add_ps(acc[h], half(blk, b, h, d, blk.add(192) as *const i8));
                }
            }
            *o = hsum(_mm256_add_ps(acc[0], acc[1]));
        }
    }

    /// `out[r] = row r · x` for consecutive Q6_K rows of `nb` super-blocks (256 values in 16
    /// sub-blocks of 16 with signed 8-bit scales, values 6-bit minus 32), one 8-bit activation. Each
    /// 32 values meet their activation block: `maddubs(q, x) - maddubs(32, x)` is the integer dot of
    /// the signed values in 16-bit pairs, `madd` with the two sub-blocks' scales sums it per 32-bit
    /// lane, then d * dx scales the block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q6k_q8_rows(w: &[u8], nb: usize, x: &Q8Act, out: &mut [f32]) {
        assert!(x.q.len() >= nb * 256 && x.d.len() >= nb * 8);
        let c32 = _mm256_set1_epi8(32);
        let (xq, xd) = (x.q.as_ptr(), x.d.as_ptr());
        q6k_rows(w, nb, out, |blk, b, h, d, sc| {
            let mut acc = _mm256_setzero_ps();
            for (g, v) in q6k_half(blk, h).into_iter().enumerate() {
                let xb = 8 * b + 4 * h + g;
                let xv = _mm256_loadu_si256(xq.add(xb * 32) as *const __m256i);
                let p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(v, xv), _mm256_maddubs_epi16(c32, xv));
                let s = 8 * h + 2 * g;
                let scales = _mm256_set_m128i(_mm_set1_epi16(*sc.add(s + 1) as i16), _mm_set1_epi16(*sc.add(s) as i16));
                let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, scales));
                acc = _mm256_fmadd_ps(p, _mm256_set1_ps(d * *xd.add(xb)), acc);
            }
            acc
        })
    }

    /// `out[r] = row r · x` for consecutive Q6_K rows of `nb` super-blocks, one f32 activation: each
    /// run of 8 values widened to f32 less 32, multiplied into x, summed per sub-block of 16 and
    /// scaled by d * scale.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q6k_f32_rows(w: &[u8], nb: usize, x: &[f32], out: &mut [f32]) {
        assert!(x.len() >= nb * 256);
        let c32 = _mm256_set1_ps(32.0);
        q6k_rows(w, nb, out, |blk, b, h, d, sc| {
            let mut vals = [0u8; 128];
            for (g, v) in q6k_half(blk, h).into_iter().enumerate() {
                _mm256_storeu_si256(vals.as_mut_ptr().add(32 * g) as *mut __m256i, v);
            }
            let mut acc = _mm256_setzero_ps();
            for sub in 0..8 {
                let xs = x.as_ptr().add(256 * b + 128 * h + 16 * sub);
                let q = |i: usize| {
                    let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(vals.as_ptr().add(16 * sub + 8 * i) as *const __m128i));
                    _mm256_sub_ps(_mm256_cvtepi32_ps(v), c32)
                };
                let s = _mm256_fmadd_ps(q(1), _mm256_loadu_ps(xs.add(8)), _mm256_mul_ps(q(0), _mm256_loadu_ps(xs)));
                acc = _mm256_fmadd_ps(s, _mm256_set1_ps(d * *sc.add(8 * h + sub) as f32), acc);
            }
            acc
        })
    }

    /// `out[t * rows + r] = row r · xs[t]` for consecutive Q8_0 rows of `nb` blocks starting at `w`
    /// and N 8-bit activations (the tied unembedding at decode; N > 1 for a batch of sequences, each
    /// block loaded and its sign taken once for all N). As `q4_q8_rows`, without the unpacking.
    /// One token keeps four accumulators; several keep one each (their chains are independent).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_q8_rows<const N: usize>(w: &[u8], nb: usize, xs: &[&Q8Act; N], out: &mut [f32]) {
        let rows = out.len() / N;
        assert!(out.len() == rows * N && w.len() >= rows * nb * 34);
        assert!(xs.iter().all(|x| x.q.len() >= nb * 32 && x.d.len() >= nb));
        let ones = _mm256_set1_epi16(1);
        let xq: [*const i8; N] = std::array::from_fn(|t| xs[t].q.as_ptr());
        let xd: [*const f32; N] = std::array::from_fn(|t| xs[t].d.as_ptr());
        for r in 0..rows {
            let row = w.as_ptr().add(r * nb * 34);
            let mut acc = [[_mm256_setzero_ps(); 4]; N];
            macro_rules! block {
                ($b:expr, $i:expr) => {{
                    let b = $b;
                    let i = if N == 1 { $i } else { 0 };
                    let blk = row.add(b * 34);
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PF) as *const i8);
                    let d = _mm256_cvtph_ps(_mm_set1_epi16((blk as *const i16).read_unaligned()));
                    let wv = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    // maddubs multiplies unsigned by signed: move w's sign onto x.
                    let wabs = _mm256_sign_epi8(wv, wv);
                    for t in 0..N {
                        let xv = _mm256_loadu_si256(xq[t].add(b * 32) as *const __m256i);
                        let p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
                        let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                        acc[t][i] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_broadcast_ss(&*xd[t].add(b))), p, acc[t][i]);
                    }
                }};
            }
            over_blocks!(nb, block);
            for (t, a) in acc.iter().enumerate() {
                out[t * rows + r] = hsum4(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `row · x` for one quantized row, x kept f32 (`xsum` its block sums).
    fn dot_f32(dtype: DType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let mut out = [0f32];
        dot_f32_rows(dtype, row, row.len(), x, xsum, &mut out);
        out[0]
    }

    /// `row · x` for one quantized row, x quantized to 8 bits.
    fn dot_q8(dtype: DType, row: &[u8], x: &Q8Act) -> f32 {
        let mut out = [0f32];
        dot_q8_rows(dtype, row, row.len(), x, &mut out);
        out[0]
    }

    /// Random blocks of `dtype` with small finite f16 scales, as a model's weights look.
    fn random_row(dtype: DType, k: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut bytes: Vec<u8> = (0..dtype.storage_bytes(k).unwrap())
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect();
        let scale = |v: f32| f16::from_f32(v).to_le_bytes();
        for (i, blk) in bytes.chunks_mut(dtype.block_bytes()).enumerate() {
            let v = 0.01 + (i % 7) as f32 * 0.003;
            match dtype {
                DType::Q4_1 | DType::Q4K => {
                    blk[..2].copy_from_slice(&scale(v));
                    blk[2..4].copy_from_slice(&scale(-v * 0.5));
                }
                DType::Q6K => blk[208..210].copy_from_slice(&scale(v)),
                _ => blk[..2].copy_from_slice(&scale(v)),
            }
        }
        bytes
    }

    fn random_x(k: usize, seed: u64) -> Vec<f32> {
        (0..k).map(|i| ((i as u64 * 2654435761 + seed) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernels_agree_with_the_portable_ones() {
        if !crate::float::has_avx2_fma() {
            println!("skipped: this CPU has no AVX2+FMA+F16C");
            return;
        }
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Q4K, DType::Q6K] {
            for seed in 0..20 {
                let k = dtype.block_len() * (1 + seed as usize % if dtype.block_len() == 256 { 6 } else { 48 });
                let (row, x) = (random_row(dtype, k, seed), random_x(k, seed));
                let sums = block_sums(&x);
                let xq = Q8Act::new(&x);
                let (want_f, want_q) = (portable_f32(dtype, &row, &x, &sums), portable_q8(dtype, &row, &xq));
                // With AVX2, dot_f32/dot_q8 run the row kernels.
                let (got_f, got_q) = (dot_f32(dtype, &row, &x, &sums), dot_q8(dtype, &row, &xq));
                // Same sums in another order: equal up to f32 rounding of the terms.
                let scale: f32 = x.iter().map(|v| v.abs()).sum::<f32>() * 0.2;
                assert!((got_f - want_f).abs() <= 1e-5 * scale, "{dtype} f32 k={k}: {got_f} vs {want_f}");
                assert!((got_q - want_q).abs() <= 1e-5 * scale, "{dtype} q8 k={k}: {got_q} vs {want_q}");
            }
        }
    }

    #[test]
    fn many_tokens_at_once_equal_one_at_a_time() {
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Q4K, DType::Q4_0R8, DType::Q4_1R8] {
            // 19 blocks (an odd count) per row, Q4_K whole super-blocks; 72 rows: two or three tiles.
            let (k, n) = (if dtype == DType::Q4K { 512 } else { 32 * 19 }, 72);
            let plain = dtype.plain();
            let w: Vec<u8> = (0..n).flat_map(|r| random_row(plain, k, 9 + r as u64)).collect();
            let w = match dtype.interleaved_rows() {
                1 => w,
                _ => highrise_core::quant::repack_r8(plain, &w, n, k).unwrap(),
            };
            let row_bytes = plain.storage_bytes(k).unwrap();
            let acts: Vec<Q8Act> = (0..7).map(|t| Q8Act::new(&random_x(k, 100 + t))).collect();
            let refs: Vec<&Q8Act> = acts.iter().collect();
            let (mut many, mut one) = (vec![f32::NAN; 7 * n], vec![f32::NAN; n]);
            fn into(many: &mut [f32], n: usize) -> impl FnMut(usize, usize, &[f32]) + '_ {
                move |t, r0, v| many[t * n + r0..t * n + r0 + v.len()].copy_from_slice(v)
            }
            dot_q8_rows_many(dtype, &w, row_bytes, &refs, into(&mut many, n));
            for (t, x) in acts.iter().enumerate() {
                dot_q8_rows(dtype, &w, row_bytes, x, &mut one);
                for r in 0..n {
                    let (got, want) = (many[t * n + r], one[r]);
                    assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{dtype} q8 token {t} row {r}: {got} vs {want}");
                }
            }
            let xs: Vec<Vec<f32>> = (0..7).map(|t| random_x(k, 100 + t)).collect();
            let sums: Vec<Vec<f32>> = xs.iter().map(|x| block_sums(x)).collect();
            let (xr, sr): (Vec<&[f32]>, Vec<&[f32]>) = (xs.iter().map(|v| &v[..]).collect(), sums.iter().map(|v| &v[..]).collect());
            dot_f32_rows_many(dtype, &w, row_bytes, &xr, &sr, into(&mut many, n));
            for t in 0..7 {
                dot_f32_rows(dtype, &w, row_bytes, &xs[t], &sums[t], &mut one);
                for r in 0..n {
                    // Several tokens keep fewer partial sums per block than one: another order.
                    let (got, want) = (many[t * n + r], one[r]);
                    assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{dtype} f32 token {t} row {r}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn a_range_of_rows_equals_row_by_row() {
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Q4K, DType::Q6K] {
            // Block counts around the unrolling by four: 1, 3, 4, 18 (576 columns), 48 (1536).
            for nb in [1, 3, 4, 18, 48] {
                let (k, rows) = (dtype.block_len() * nb, 13);
                let w: Vec<u8> = (0..rows).flat_map(|r| random_row(dtype, k, 40 + r as u64)).collect();
                let x = Q8Act::new(&random_x(k, 7));
                let row_bytes = dtype.storage_bytes(k).unwrap();
                let mut out = vec![f32::NAN; rows];
                dot_q8_rows(dtype, &w, row_bytes, &x, &mut out);
                let scale = 1e-5 * k as f32 * 0.05;
                for (r, &got) in out.iter().enumerate() {
                    let want = portable_q8(dtype, &w[r * row_bytes..(r + 1) * row_bytes], &x);
                    assert!((got - want).abs() <= scale.max(1e-5 * want.abs()), "{dtype} q8 {nb} blocks row {r}: {got} vs {want}");
                }
                let (xf, mut out) = (random_x(k, 7), vec![f32::NAN; rows]);
                let sums = block_sums(&xf);
                dot_f32_rows(dtype, &w, row_bytes, &xf, &sums, &mut out);
                for (r, &got) in out.iter().enumerate() {
                    let want = portable_f32(dtype, &w[r * row_bytes..(r + 1) * row_bytes], &xf, &sums);
                    assert!((got - want).abs() <= scale.max(1e-5 * want.abs()), "{dtype} f32 {nb} blocks row {r}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn rows_interleaved_by_8_equal_row_by_row() {
        for dtype in [DType::Q4_0, DType::Q4_1] {
            let r8 = dtype.r8().unwrap();
            // Block counts around the unrolling by two: 1, 3, 4, 18 (576 columns), 48 (1536).
            for nb in [1, 3, 4, 18, 48] {
                let (k, rows) = (32 * nb, 24);
                let w: Vec<u8> = (0..rows).flat_map(|r| random_row(dtype, k, 60 + r as u64)).collect();
                let packed = highrise_core::quant::repack_r8(dtype, &w, rows, k).unwrap();
                let row_bytes = dtype.storage_bytes(k).unwrap();
                let row = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];
                let tol = |want: f32| (1e-5 * (32 * nb) as f32 * 0.05).max(1e-5 * want.abs());
                let xq = Q8Act::new(&random_x(k, 11));
                let (xf, mut out) = (random_x(k, 11), vec![f32::NAN; rows]);
                let sums = block_sums(&xf);
                dot_q8_rows(r8, &packed, row_bytes, &xq, &mut out);
                for (r, &got) in out.iter().enumerate() {
                    let want = portable_q8(dtype, row(r), &xq);
                    assert!((got - want).abs() <= tol(want), "{r8} q8 {nb} blocks row {r}: {got} vs {want}");
                }
                dot_f32_rows(r8, &packed, row_bytes, &xf, &sums, &mut out);
                for (r, &got) in out.iter().enumerate() {
                    let want = portable_f32(dtype, row(r), &xf, &sums);
                    assert!((got - want).abs() <= tol(want), "{r8} f32 {nb} blocks row {r}: {got} vs {want}");
                }
                // The fallback (no SIMD) path: each group unpacked, rows through the portable kernels.
                let mut slow = vec![f32::NAN; rows];
                r8_rows(r8, &packed, row_bytes, &mut slow, |plain, row, o| *o = portable_q8(plain, row, &xq), |_, _, _| false);
                for (r, &got) in slow.iter().enumerate() {
                    assert_eq!(got, portable_q8(dtype, row(r), &xq), "{r8} portable q8 {nb} blocks row {r}");
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_quantization_gives_the_portable_bytes() {
        if !crate::float::has_avx2_fma() {
            return println!("skipped: this CPU has no AVX2+FMA+F16C");
        }
        // Random blocks, an all-zero block, and a block of exact ties (scale 1: 127 and k + 0.5).
        let mut x = random_x(96, 5);
        x.extend([0.0; 32]);
        x.extend((0..32).map(|i| if i == 0 { 127.0 } else { (i as f32 - 16.0) + 0.5 }));
        let fast = Q8Act::new(&x);
        let mut slow = Q8Act { d: vec![0.0; 5], q: vec![0; 160], isum: vec![0; 5], sum: vec![0.0; 5], ds: Vec::new() };
        quantize_portable(&x, &mut slow);
        assert_eq!((&fast.q, &fast.isum), (&slow.q, &slow.isum));
        assert_eq!((&fast.d, &fast.sum), (&slow.d, &slow.sum));
        assert_eq!((fast.q[4 * 32 + 1], fast.q[4 * 32 + 2]), (-15, -14), "-14.5 and -13.5 round away from zero");
    }

    #[test]
    fn q8_activations_quantize_each_block_within_half_a_step() {
        let x = random_x(96, 3);
        let q = Q8Act::new(&x);
        for (b, xs) in x.chunks(32).enumerate() {
            for (i, v) in xs.iter().enumerate() {
                let back = q.d[b] * q.q[b * 32 + i] as f32;
                assert!((back - v).abs() <= q.d[b] * 0.5 + 1e-7, "block {b} value {i}: {v} -> {back}");
            }
        }
    }
}
