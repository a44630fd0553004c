//! Block-quantized formats (GGUF's): their layout and dequantization to f32. Written once here so
//! that model loaders and backends agree on every bit.

use half::f16;

use crate::{DType, Error, Result};

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes `bytes` (whole blocks of `dtype`) into `out`, which must hold exactly their values.
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let (bl, bb) = (dtype.block_len(), dtype.block_bytes());
    if bytes.len() % bb != 0 || bytes.len() / bb * bl != out.len() {
        return Err(Error::Invalid(format!(
            "dequantize {dtype}: {} bytes do not hold {} values in blocks of {bl} ({bb} bytes)",
            bytes.len(),
            out.len()
        )));
    }
    for (b, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bl)) {
        match dtype {
            DType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            DType::F16 => y[0] = f16_at(b, 0),
            DType::BF16 => y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            DType::Q8_0 => q8_0(b, y),
            DType::Q4_0 => q4_0(b, y),
            DType::Q4_1 => q4_1(b, y),
            DType::Q4K => q4_k(b, y),
            DType::Q6K => q6_k(b, y),
        }
    }
    Ok(())
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
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((s[j] & 63) as f32, (s[j + 4] & 63) as f32)
    } else {
        (((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)) as f32, ((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) as f32)
    }
}

/// { d: f16, dmin: f16, scales: [u8; 12], q: [u8; 128] }: 8 sub-blocks of 32, each
/// y = d * scale * q - dmin * min.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (chunk, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// { ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16 }: 6-bit values (low 4 bits in ql, high
/// 2 in qh) minus 32, times d and a per-16 scale.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let y = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
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
    fn wrong_length_is_an_error() {
        let mut y = [0f32; 32];
        assert!(dequantize(DType::Q8_0, &[0u8; 33], &mut y).is_err());
    }
}
