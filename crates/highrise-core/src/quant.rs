//! Block-quantized formats (GGUF's): their layout and dequantization to f32. Written once here so
//! that model loaders and backends agree on every bit.

use half::f16;

use crate::{DType, Error, Result};

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes `bytes` (whole blocks of `dtype`) into `out`, which must hold exactly their values.
/// The interleaved layouts need the row length: `dequantize_rows`.
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let (bl, bb) = (dtype.block_len(), dtype.block_bytes());
    if bytes.len() % bb != 0 || bytes.len() / bb * bl != out.len() {
        return Err(Error::Invalid(format!(
            "dequantize {dtype}: {} bytes do not hold {} values in blocks of {bl} ({bb} bytes)",
            bytes.len(),
            out.len()
        )));
    }
    if dtype.interleaved_rows() > 1 {
        return Err(Error::Invalid(format!("dequantize {dtype}: interleaved rows need their length (dequantize_rows)")));
    }
    for (b, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bl)) {
        match dtype {
            DType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            DType::F16 => y[0] = f16_at(b, 0),
            DType::BF16 => y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            DType::U32 => y[0] = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            DType::Q8_0 => q8_0(b, y),
            DType::Q4_0 => q4_0(b, y),
            DType::Q4_1 => q4_1(b, y),
            DType::Q4K => q4_k(b, y),
            DType::Q6K => q6_k(b, y),
            DType::Q4_0R8 | DType::Q4_1R8 => unreachable!("rejected above"),
        }
    }
    Ok(())
}

/// Dequantizes whole rows of `cols` values each (`out` in row-major order), in any layout, the
/// interleaved ones included (then a whole number of groups of rows).
pub fn dequantize_rows(dtype: DType, bytes: &[u8], cols: usize, out: &mut [f32]) -> Result<()> {
    let group = dtype.interleaved_rows();
    if group == 1 {
        return dequantize(dtype, bytes, out);
    }
    let plain = dtype.plain();
    let row_bytes = plain.storage_bytes(cols).filter(|_| cols > 0);
    match row_bytes {
        Some(rb) if bytes.len().is_multiple_of(group * rb) && bytes.len() / rb * cols == out.len() => {
            let mut rows = vec![0u8; group * rb];
            for (g, y) in bytes.chunks_exact(group * rb).zip(out.chunks_exact_mut(group * cols)) {
                unpack_r8(plain, g, cols / 32, &mut rows);
                dequantize(plain, &rows, y)?;
            }
            Ok(())
        }
        _ => Err(Error::Invalid(format!(
            "dequantize {dtype}: {} bytes are not whole groups of {group} rows of {cols} values ({} values asked)",
            bytes.len(),
            out.len()
        ))),
    }
}

/// Where the parts of a Q4_0/Q4_1 block of 8 interleaved rows lie: the 8 scales `d` (f16) at 0,
/// the 8 minimums `m` (Q4_1 only) after them, then the nibbles, 128 bytes: for c in 0..4 and row r
/// in 0..8, bytes `4c..4c+4` of row r's 16 at `32c + 4r`. So one 32-byte load holds four bytes of
/// each row (values 4c..4c+3 in the low nibbles, 16+4c.. in the high ones), and a 4-byte dot
/// product lands each row in its own 32-bit lane.
pub fn r8_offsets(plain: DType) -> (usize, Option<usize>, usize) {
    match plain {
        DType::Q4_1 => (0, Some(16), 32),
        _ => (0, None, 16),
    }
}

/// Q4_0/Q4_1 rows (`rows` of `cols` values, row-major, a multiple of 8 rows) laid out 8 rows at a
/// time, block by block (`DType::Q4_0R8`/`Q4_1R8`): a group's block 0 for all 8 rows, then block
/// 1, ... The same bytes, in another order; `dequantize_rows` reads them back.
pub fn repack_r8(dtype: DType, bytes: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    let row_bytes = dtype.storage_bytes(cols).filter(|_| dtype.r8().is_some() && cols > 0);
    let rb = match row_bytes {
        Some(rb) if rows.is_multiple_of(8) && bytes.len() == rows * rb => rb,
        _ => {
            return Err(Error::Invalid(format!(
                "repack {dtype} [{rows}, {cols}] by 8 rows: needs q4_0/q4_1, rows a multiple of 8 and {} bytes, got {}",
                row_bytes.map_or(0, |rb| rows * rb),
                bytes.len()
            )))
        }
    };
    let (bb, nb) = (dtype.block_bytes(), cols / 32);
    let (d_at, m_at, q_at) = r8_offsets(dtype);
    let mut out = vec![0u8; bytes.len()];
    for (src, dst) in bytes.chunks_exact(8 * rb).zip(out.chunks_exact_mut(8 * rb)) {
        for b in 0..nb {
            let g = &mut dst[b * 8 * bb..(b + 1) * 8 * bb];
            for r in 0..8 {
                let blk = &src[r * rb + b * bb..r * rb + (b + 1) * bb];
                g[d_at + 2 * r..d_at + 2 * r + 2].copy_from_slice(&blk[..2]);
                if let Some(m_at) = m_at {
                    g[m_at + 2 * r..m_at + 2 * r + 2].copy_from_slice(&blk[2..4]);
                }
                let qs = &blk[bb - 16..];
                for c in 0..4 {
                    g[q_at + 32 * c + 4 * r..q_at + 32 * c + 4 * r + 4].copy_from_slice(&qs[4 * c..4 * c + 4]);
                }
            }
        }
    }
    Ok(out)
}

/// One group of 8 interleaved rows (`nb` blocks each) back in row-by-row order, into `rows`.
pub fn unpack_r8(plain: DType, group: &[u8], nb: usize, rows: &mut [u8]) {
    let (bb, (d_at, m_at, q_at)) = (plain.block_bytes(), r8_offsets(plain));
    let rb = nb * bb;
    for b in 0..nb {
        let g = &group[b * 8 * bb..(b + 1) * 8 * bb];
        for r in 0..8 {
            let blk = &mut rows[r * rb + b * bb..r * rb + (b + 1) * bb];
            blk[..2].copy_from_slice(&g[d_at + 2 * r..d_at + 2 * r + 2]);
            if let Some(m_at) = m_at {
                blk[2..4].copy_from_slice(&g[m_at + 2 * r..m_at + 2 * r + 2]);
            }
            for c in 0..4 {
                blk[bb - 16 + 4 * c..bb - 16 + 4 * c + 4].copy_from_slice(&g[q_at + 32 * c + 4 * r..q_at + 32 * c + 4 * r + 4]);
            }
        }
    }
}

/// { d: f16, q: [i8; 32] }: y = d * q.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = (q as i8) as f32 * d;
    }
}

/// { d: f16, q: [u8; 16] } with low nibbles the first 16 values, high nibbles the last 16:
/// y = (q - 8) * d.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// { d: f16, m: f16, q: [u8; 16] }: y = q * d + m.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0xF) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K block, packed in 12 bytes.
pub fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((s[j] & 63) as f32, (s[j + 4] & 63) as f32)
    } else {
        (((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)) as f32, ((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) as f32)
    }
}

/// A Q4_K block taken apart: { d: f16, dmin: f16, scales: [u8; 12], q: [u8; 128] } holds 8 sub-blocks
/// of 32 values, value = d * scale[j] * q - dmin * min[j].
pub struct Q4KBlock {
    pub d: f32,
    pub dmin: f32,
    /// (scale, min) of each sub-block of 32.
    pub scale_min: [(f32, f32); 8],
    /// The 4-bit values, in order.
    pub q: [u8; 256],
}

pub fn q4_k_block(b: &[u8]) -> Q4KBlock {
    let (scales, qs) = (&b[4..16], &b[16..144]);
    let mut blk = Q4KBlock { d: f16_at(b, 0), dmin: f16_at(b, 2), scale_min: [(0.0, 0.0); 8], q: [0; 256] };
    for (j, sm) in blk.scale_min.iter_mut().enumerate() {
        *sm = scale_min_k4(j, scales);
    }
    // Each 32 bytes hold 64 values: the low nibbles are one sub-block, the high nibbles the next.
    for (chunk, q) in qs.chunks_exact(32).enumerate() {
        for l in 0..32 {
            blk.q[chunk * 64 + l] = q[l] & 0xF;
            blk.q[chunk * 64 + 32 + l] = q[l] >> 4;
        }
    }
    blk
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let blk = q4_k_block(b);
    for (i, (y, &q)) in y.iter_mut().zip(&blk.q).enumerate() {
        let (sc, m) = blk.scale_min[i / 32];
        *y = blk.d * sc * q as f32 - blk.dmin * m;
    }
}

/// A Q6_K block taken apart: { ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16 } holds 16
/// sub-blocks of 16 values, value = d * scale[i / 16] * q, q a 6-bit value minus 32.
pub struct Q6KBlock {
    pub d: f32,
    pub scales: [i8; 16],
    pub q: [i8; 256],
}

pub fn q6_k_block(b: &[u8]) -> Q6KBlock {
    let mut blk = Q6KBlock { d: f16_at(b, 208), scales: [0; 16], q: [0; 256] };
    for (s, &v) in blk.scales.iter_mut().zip(&b[192..208]) {
        *s = v as i8;
    }
    // Each half of 128 values: low 4 bits in 64 bytes of ql, high 2 bits in 32 bytes of qh.
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let q = &mut blk.q[half * 128..half * 128 + 128];
        for l in 0..32 {
            q[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            q[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            q[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            q[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    blk
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let blk = q6_k_block(b);
    for (i, (y, &q)) in y.iter_mut().zip(&blk.q).enumerate() {
        *y = blk.d * blk.scales[i / 16] as f32 * q as f32;
    }
}

/// Quantizes `x` (a whole number of blocks of 32) to Q8_0: per block d = max|x| / 127, q = round(x / d).
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for block in x.chunks(32) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q8_0_and_q4_blocks_decode_by_hand() {
        let mut b = h(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut y = [0f32; 32];
        dequantize(DType::Q8_0, &b, &mut y).unwrap();
        assert_eq!(y[0], -8.0);
        assert_eq!(y[31], 7.5);

        let mut b = h(2.0).to_vec();
        b.extend(h(-1.0));
        b.extend((0..16).map(|i| (i as u8) | (((15 - i) as u8) << 4)));
        dequantize(DType::Q4_1, &b, &mut y).unwrap();
        assert_eq!((y[3], y[16 + 3]), (3.0 * 2.0 - 1.0, 12.0 * 2.0 - 1.0));

        let mut b = h(1.0).to_vec();
        b.extend((0..16).map(|i| i as u8 | 0xF0));
        dequantize(DType::Q4_0, &b, &mut y).unwrap();
        assert_eq!((y[0], y[15], y[16]), (-8.0, 7.0, 7.0));
    }

    #[test]
    fn rows_interleaved_by_8_read_back_as_they_were() {
        for dtype in [DType::Q4_0, DType::Q4_1] {
            let (rows, cols) = (16, 96);
            let bytes: Vec<u8> = (0..dtype.storage_bytes(rows * cols).unwrap()).map(|i| (i * 7 % 251) as u8).collect();
            // Finite scales: overwrite each block's f16 fields with small values.
            let mut bytes = bytes;
            for (i, blk) in bytes.chunks_mut(dtype.block_bytes()).enumerate() {
                blk[..2].copy_from_slice(&h(0.01 * (1 + i % 5) as f32));
                if dtype == DType::Q4_1 {
                    blk[2..4].copy_from_slice(&h(-0.02 * (i % 3) as f32));
                }
            }
            let packed = repack_r8(dtype, &bytes, rows, cols).unwrap();
            assert_eq!(packed.len(), bytes.len());
            assert_ne!(packed, bytes);
            let (mut want, mut got) = (vec![0f32; rows * cols], vec![0f32; rows * cols]);
            dequantize(dtype, &bytes, &mut want).unwrap();
            let r8 = dtype.r8().unwrap();
            dequantize_rows(r8, &packed, cols, &mut got).unwrap();
            assert_eq!(got, want, "{r8}");
            // Row 9's third block's value 5 (a low nibble: c = 1, r = 1 of group 1).
            let (bb, rb) = (dtype.block_bytes(), dtype.storage_bytes(cols).unwrap());
            let q = bytes[9 * rb + 2 * bb + bb - 16 + 5] & 0xF;
            let g = &packed[8 * rb + 2 * 8 * bb..];
            assert_eq!(g[r8_offsets(dtype).2 + 32 + 4 + 1] & 0xF, q);
            assert!(dequantize(r8, &packed, &mut got).is_err(), "needs the row length");
            assert!(repack_r8(dtype, &bytes[..rows / 2 * rb - rb], rows / 2 - 1, cols).is_err(), "7 rows");
        }
    }

    #[test]
    fn k_quants_decode_by_hand() {
        // Q4_K: scales 1 and mins 0 in the first sub-blocks (j < 4 path), d = 1: y = q.
        let mut b = h(1.0).to_vec();
        b.extend(h(1.0));
        let mut scales = [0u8; 12];
        scales[0] = 1;
        scales[1] = 2;
        scales[4] = 3; // min of sub-block 0
        b.extend(scales);
        b.extend([0x21u8; 128]);
        let mut y = vec![0f32; 256];
        dequantize(DType::Q4K, &b, &mut y).unwrap();
        assert_eq!(y[0], 1.0 * 1.0 - 3.0);
        assert_eq!(y[32], 2.0 * 2.0);

        // Q6_K: all 6-bit values 33 (=> 1 after the -32 offset), scales 2, d = 0.5: y = 1.
        let mut b = vec![0x11u8; 128]; // low nibbles 1
        b.extend([0xAAu8; 64]); // high bits 2 => +32
        b.extend([2u8; 16]);
        b.extend(h(0.5));
        dequantize(DType::Q6K, &b, &mut y).unwrap();
        assert!(y.iter().all(|&v| v == 1.0), "{:?}", &y[..8]);
    }

    #[test]
    fn q8_0_quantization_round_trips_within_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let q = quantize_q8_0(&x);
        let mut y = vec![0f32; 64];
        dequantize(DType::Q8_0, &q, &mut y).unwrap();
        for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let step = xs.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            for (a, b2) in xs.iter().zip(ys) {
                assert!((a - b2).abs() <= step * 0.5 + 1e-3 * step, "block {b}: {a} -> {b2}");
            }
        }
    }

    #[test]
    fn wrong_length_is_an_error() {
        let mut y = [0f32; 32];
        assert!(dequantize(DType::Q8_0, &[0u8; 33], &mut y).is_err());
    }
}
