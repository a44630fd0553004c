//! The AVX2+FMA+F16C kernels (x86-64, chosen at run time by `has_avx2_fma`): each computes
//! what the portable kernel of its format computes, over a range of rows.

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
