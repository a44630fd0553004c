//! A GEMM for quantized weights against many tokens' 8-bit activations (a prompt with
//! `--q8-activations`, a batch of decoding sequences), on AVX-512 VNNI: `vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes
//! and adds each four products into a 32-bit lane, four times the multiply-adds of an f32 FMA.
//!
//! Rows are taken 32 at a time (a tile): each tile's blocks are unpacked once into unsigned bytes
//! laid out for the kernel, `[block][4-value group j][row][4 bytes]`, with each row's block scale d
//! and offset m as f32, and then serve every token. For each block and token the kernel sums
//! `u · qx` in 32-bit lanes (one lane per row) and adds `d dx · sum + m · sum(x)` to f32
//! accumulators, what the row kernels compute:
//! - Q4_0: u = q (0..15), m = -8 d; Q4_1: u = q, m the block's own (both as `portable_q8`);
//! - Q8_0: u = w + 128, and the 128 · isum(qx) this adds is taken off in integers before the
//!   scale (so no large float cancels), m = 0;
//! - Q4_K: each sub-block of 32 is a block of its own, d = d_K · scale, m = -dmin · min (its 6-bit
//!   scale and minimum), u = q.
//!
//! Q4_0/Q4_1 rows interleaved by 8 (the CPU's layout for a model's projections) and plain Q4_0,
//! Q4_1, Q8_0 and Q4_K rows (`--no-repack`, the tied unembedding, Q4_K_M files) are taken.

use std::arch::x86_64::*;

use highrise_core::quant::r8_offsets;
use highrise_core::DType;

use super::Q8Act;

/// Rows per tile: two 16-lane registers.
const ROWS: usize = 32;
/// Tokens per pass of the kernel: 2 x 6 integer and 2 x 6 float accumulators, two weight
/// registers and the tile's scales fit the 32 vector registers.
const TOKENS: usize = 6;
/// From this many tokens the GEMM beats the AVX2 row kernels, which unpack each block again for
/// every four tokens (one core, a 1536 x 576 Q4_1 projection: 1.2x at 4 tokens, 2x at 16, 2.6x at
/// 512; unpacking its tiles takes 20-30 us of the 45-3000).
pub const MIN_TOKENS: usize = 4;

/// Whether this CPU runs the GEMM: AVX-512 F/BW/VNNI, and `HIGHRISE_CPU_SIMD` is neither
/// `portable` nor `avx2` (which keeps to the AVX2 kernels, e.g. to test them here). Decided once.
pub fn available() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        crate::simd::has_avx2_fma()
            && std::env::var("HIGHRISE_CPU_SIMD").map_or(true, |v| v != "avx2")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// The weight formats the GEMM takes.
pub fn takes(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q8_0 | DType::Q4K | DType::Q4_0R8 | DType::Q4_1R8)
}

/// One tile of up to 32 rows, unpacked; rows past the end are zeros (they give zeros, not kept).
struct Tile {
    /// `[block][j][row]`: four unsigned bytes, values 4j..4j+3 of the row's block.
    u: Vec<u32>,
    /// `[block][row]` scales and offsets.
    d: Vec<f32>,
    m: Vec<f32>,
}

impl Tile {
    fn new(nb: usize) -> Tile {
        Tile { u: vec![0; nb * 8 * ROWS], d: vec![0.0; nb * ROWS], m: vec![0.0; nb * ROWS] }
    }

    /// Rows r0..r0 + nr of `w` (`dtype`, whole rows of `row_bytes`, `nb` blocks each) unpacked.
    /// Plain rows are gathered 16 at a time (a block's header, then its values four bytes per row
    /// at a time); rows interleaved by 8 already hold four bytes of each of 8 rows side by side, so
    /// each 32-byte load is one group's part of the tile.
    ///
    /// # Safety
    /// AVX-512 F/BW present; `w` holds rows r0..r0 + nr; nr <= 32 and, interleaved, a multiple of 8.
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
    unsafe fn fill(&mut self, dtype: DType, w: &[u8], row_bytes: usize, r0: usize, nr: usize, nb: usize) {
        assert!(nr <= ROWS && (r0 + nr) * row_bytes <= w.len() && self.d.len() >= nb * ROWS);
        if nr < ROWS {
            (self.u.fill(0), self.d.fill(0.0), self.m.fill(0.0));
        }
        let plain = dtype.plain();
        let bb = plain.block_bytes();
        let (u, d, m) = (self.u.as_mut_ptr(), self.d.as_mut_ptr(), self.m.as_mut_ptr());
        if dtype != plain {
            // Interleaved by 8: a group's block b holds 8 rows' f16 scales, then (Q4_1) minimums,
            // then four chunks of 32 bytes, chunk c holding bytes 4c..4c+3 of every row.
            let (d_at, m_at, q_at) = r8_offsets(plain);
            let nib = _mm256_set1_epi32(0x0F0F_0F0F);
            for g in 0..nr / 8 {
                let grp = w.as_ptr().add((r0 + 8 * g) * row_bytes);
                for b in 0..nb {
                    let blk = grp.add(b * 8 * bb);
                    let at = b * ROWS + 8 * g;
                    let dv = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(d_at) as *const __m128i));
                    let mv = match m_at {
                        Some(m_at) => _mm256_cvtph_ps(_mm_loadu_si128(blk.add(m_at) as *const __m128i)),
                        None => _mm256_mul_ps(dv, _mm256_set1_ps(-8.0)),
                    };
                    (_mm256_storeu_ps(d.add(at), dv), _mm256_storeu_ps(m.add(at), mv));
                    for c in 0..4 {
                        let v = _mm256_loadu_si256(blk.add(q_at + 32 * c) as *const __m256i);
                        let (lo, hi) = (_mm256_and_si256(v, nib), _mm256_and_si256(_mm256_srli_epi32::<4>(v), nib));
                        _mm256_storeu_si256(u.add((b * 8 + c) * ROWS + 8 * g) as *mut __m256i, lo);
                        _mm256_storeu_si256(u.add((b * 8 + 4 + c) * ROWS + 8 * g) as *mut __m256i, hi);
                    }
                }
            }
            return;
        }
        let row_at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(row_bytes as i32));
        for h in 0..nr.div_ceil(16) {
            let valid: __mmask16 = (((1u32 << (nr - 16 * h).min(16)) - 1) & 0xFFFF) as u16;
            let first = w.as_ptr().add((r0 + 16 * h) * row_bytes);
            let gather = |at: *const u8| _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), valid, row_at, at as *const i32);
            if plain == DType::Q4K {
                // A super-block of 256: f16 d and dmin, 12 bytes of 6-bit scales and minimums of its
                // 8 sub-blocks (`highrise_core::quant::scale_min_k4`), then 128 bytes: each 32 hold
                // sub-block 2j in their low nibbles and 2j + 1 in their high ones.
                let bits = |v: __m512i, shift: u32, mask: i32| _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_set1_epi32(shift as i32)), _mm512_set1_epi32(mask));
                for sb in 0..nb / 8 {
                    let blk = first.add(sb * bb);
                    let head = gather(blk);
                    let dv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
                    let dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(head)));
                    let sc = [gather(blk.add(4)), gather(blk.add(8)), gather(blk.add(12))];
                    for j in 0..8u32 {
                        let (scale, min) = if j < 4 {
                            (bits(sc[0], 8 * j, 63), bits(sc[1], 8 * j, 63))
                        } else {
                            let t = 8 * (j - 4);
                            let scale = _mm512_or_si512(bits(sc[2], t, 0xF), _mm512_slli_epi32::<4>(bits(sc[0], t + 6, 3)));
                            let min = _mm512_or_si512(bits(sc[2], t + 4, 0xF), _mm512_slli_epi32::<4>(bits(sc[1], t + 6, 3)));
                            (scale, min)
                        };
                        let at = (sb * 8 + j as usize) * ROWS + 16 * h;
                        _mm512_storeu_ps(d.add(at), _mm512_mul_ps(dv, _mm512_cvtepi32_ps(scale)));
                        _mm512_storeu_ps(m.add(at), _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(min))));
                    }
                    for j in 0..4 {
                        for i in 0..8 {
                            let v = gather(blk.add(16 + 32 * j + 4 * i));
                            nibbles(v, u.add(((sb * 8 + 2 * j) * 8 + i) * ROWS + 16 * h), u.add(((sb * 8 + 2 * j + 1) * 8 + i) * ROWS + 16 * h));
                        }
                    }
                }
                continue;
            }
            for b in 0..nb {
                let blk = first.add(b * bb);
                let at = b * ROWS + 16 * h;
                // A block's first four bytes: its f16 scale, then (Q4_1) its minimum.
                let head = gather(blk);
                let dv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
                let mv = match plain {
                    DType::Q4_1 => _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(head))),
                    DType::Q4_0 => _mm512_mul_ps(dv, _mm512_set1_ps(-8.0)),
                    _ => _mm512_setzero_ps(),
                };
                (_mm512_storeu_ps(d.add(at), dv), _mm512_storeu_ps(m.add(at), mv));
                if plain == DType::Q8_0 {
                    let flip = _mm512_set1_epi32(0x8080_8080u32 as i32);
                    for j in 0..8 {
                        let v = _mm512_xor_si512(gather(blk.add(2 + 4 * j)), flip);
                        _mm512_storeu_si512(u.add((b * 8 + j) * ROWS + 16 * h) as *mut _, v);
                    }
                } else {
                    for c in 0..4 {
                        let v = gather(blk.add(bb - 16 + 4 * c));
                        nibbles(v, u.add((b * 8 + c) * ROWS + 16 * h), u.add((b * 8 + 4 + c) * ROWS + 16 * h));
                    }
                }
            }
        }
    }
}

/// The low nibbles of v's 64 bytes to `lo`, the high ones to `hi` (16 rows' four values each).
///
/// # Safety
/// AVX-512 F present; `lo` and `hi` each point at 16 writable u32.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn nibbles(v: __m512i, lo: *mut u32, hi: *mut u32) {
    let mask = _mm512_set1_epi32(0x0F0F_0F0F);
    _mm512_storeu_si512(lo as *mut _, _mm512_and_si512(v, mask));
    _mm512_storeu_si512(hi as *mut _, _mm512_and_si512(_mm512_srli_epi32::<4>(v), mask));
}

/// `sink(t, r0, values)`: token t's products `row r · xs[t]` for rows r0.. of `w` (whole rows of
/// `row_bytes`, `dtype` one that `takes` accepts), for every token, 32 rows at a time.
///
/// # Panics
/// If `available()` is false, `dtype` is not taken, or the sizes disagree.
pub fn gemm(dtype: DType, w: &[u8], row_bytes: usize, xs: &[&Q8Act], mut sink: impl FnMut(usize, usize, &[f32])) {
    assert!(available() && takes(dtype), "vnni::gemm: {dtype} on this CPU");
    let plain = dtype.plain();
    let (bb, n) = (plain.block_bytes(), w.len() / row_bytes);
    assert!(row_bytes.is_multiple_of(bb) && n * row_bytes == w.len() && (dtype == plain || n.is_multiple_of(8)));
    // Blocks of 32 values (a Q4_K super-block holds 8).
    let nb = row_bytes / bb * plain.block_len() / 32;
    assert!(xs.iter().all(|x| x.q.len() >= nb * 32 && x.d.len() >= nb && x.sum.len() >= nb && x.isum.len() >= nb));
    let mut tile = Tile::new(nb);
    let mut out = [[0f32; ROWS]; TOKENS];
    for r0 in (0..n).step_by(ROWS) {
        let nr = (n - r0).min(ROWS);
        // SAFETY: AVX-512 present (asserted above); rows r0..r0 + nr are in w, a multiple of 8
        // where interleaved (n is).
        unsafe { tile.fill(dtype, w, row_bytes, r0, nr, nb) };
        for t0 in (0..xs.len()).step_by(TOKENS) {
            let group = &xs[t0..(t0 + TOKENS).min(xs.len())];
            macro_rules! run {
                ($c:literal) => {{
                    let g: &[&Q8Act; $c] = group.try_into().unwrap();
                    let o: &mut [[f32; ROWS]; $c] = (&mut out[..$c]).try_into().unwrap();
                    // SAFETY: AVX-512 F/BW/VNNI present (asserted above); the tile holds nb blocks
                    // of ROWS rows and each activation nb blocks (asserted above).
                    unsafe {
                        if dtype == DType::Q8_0 {
                            kernel::<$c, true>(&tile, nb, g, o)
                        } else {
                            kernel::<$c, false>(&tile, nb, g, o)
                        }
                    }
                }};
            }
            match group.len() {
                6 => run!(6),
                5 => run!(5),
                4 => run!(4),
                3 => run!(3),
                2 => run!(2),
                _ => run!(1),
            }
            for (t, o) in (t0..).zip(&out[..group.len()]) {
                sink(t, r0, &o[..nr]);
            }
        }
    }
}

/// `out[t][r] = tile row r · xs[t]` for the tile's 32 rows and N tokens. `SIGNED`: the bytes are
/// signed values plus 128 (Q8_0), taken off as 128 · isum(qx) per block before scaling.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel<const N: usize, const SIGNED: bool>(tile: &Tile, nb: usize, xs: &[&Q8Act; N], out: &mut [[f32; ROWS]; N]) {
    let (u, d, m) = (tile.u.as_ptr(), tile.d.as_ptr(), tile.m.as_ptr());
    let xq: [*const i32; N] = std::array::from_fn(|t| xs[t].q.as_ptr() as *const i32);
    let mut acc = [[_mm512_setzero_ps(); 2]; N];
    for b in 0..nb {
        let mut s = [[_mm512_setzero_si512(); 2]; N];
        for j in 0..8 {
            let at = u.add((b * 8 + j) * ROWS);
            let (w0, w1) = (_mm512_loadu_si512(at as *const _), _mm512_loadu_si512(at.add(16) as *const _));
            for t in 0..N {
                let x = _mm512_set1_epi32(xq[t].add(b * 8 + j).read_unaligned());
                s[t][0] = _mm512_dpbusd_epi32(s[t][0], w0, x);
                s[t][1] = _mm512_dpbusd_epi32(s[t][1], w1, x);
            }
        }
        let (d0, d1) = (_mm512_loadu_ps(d.add(b * ROWS)), _mm512_loadu_ps(d.add(b * ROWS + 16)));
        let (m0, m1) = (_mm512_loadu_ps(m.add(b * ROWS)), _mm512_loadu_ps(m.add(b * ROWS + 16)));
        for t in 0..N {
            let x = xs[t];
            let dx = _mm512_set1_ps(*x.d.get_unchecked(b));
            if SIGNED {
                let off = _mm512_set1_epi32(128 * *x.isum.get_unchecked(b));
                s[t] = s[t].map(|s| _mm512_sub_epi32(s, off));
            }
            acc[t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t][0]), _mm512_mul_ps(d0, dx), acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t][1]), _mm512_mul_ps(d1, dx), acc[t][1]);
            if !SIGNED {
                let sx = _mm512_set1_ps(*x.sum.get_unchecked(b));
                acc[t][0] = _mm512_fmadd_ps(m0, sx, acc[t][0]);
                acc[t][1] = _mm512_fmadd_ps(m1, sx, acc[t][1]);
            }
        }
    }
    for t in 0..N {
        _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t][0]);
        _mm512_storeu_ps(out[t].as_mut_ptr().add(16), acc[t][1]);
    }
}
