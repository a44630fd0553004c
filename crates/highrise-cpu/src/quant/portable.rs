//! The kernels every machine runs: one row of a format against one activation, block by block, as
//! the module's doc defines the two ways of meeting it. The AVX2 kernels compute the same sums.

use highrise_core::quant::{dequantize, q4_k_block, q6_k_block};
use highrise_core::DType;

use super::{f16_at, Q8Act};
use crate::simd::dot;

/// Quantizes x per block of 32 (see `Q8Act::new`).
pub(super) fn quantize(x: &[f32], a: &mut Q8Act) {
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
