use super::*;

/// The row dispatcher with an f32 activation, as the tests call it.
fn dot_f32_rows(dtype: DType, rows: &[u8], row_bytes: usize, x: &[f32], sums: &[f32], out: &mut [f32]) {
    dot_rows(dtype, rows, row_bytes, &F32Act { x, sums }, out)
}

/// The row dispatcher with an 8-bit activation.
fn dot_q8_rows(dtype: DType, rows: &[u8], row_bytes: usize, x: &Q8Act, out: &mut [f32]) {
    dot_rows(dtype, rows, row_bytes, x, out)
}

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
    if !crate::simd::has_avx2_fma() {
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
        let (mut many, mut one) = (vec![f32::NAN; 7 * n], vec![f32::NAN; n]);
        fn into(many: &mut [f32], n: usize) -> impl FnMut(usize, usize, &[f32]) + '_ {
            move |t, r0, v| many[t * n + r0..t * n + r0 + v.len()].copy_from_slice(v)
        }
        // Three tokens take the AVX2 kernels that read a tile for several tokens; seven, on a CPU
        // with AVX-512 VNNI, the integer GEMM.
        for tokens in [3, 7] {
            let acts: Vec<Q8Act> = (0..tokens).map(|t| Q8Act::new(&random_x(k, 100 + t))).collect();
            let refs: Vec<&Q8Act> = acts.iter().collect();
            dot_rows_many(dtype, &w, row_bytes, &refs, into(&mut many, n));
            for (t, x) in acts.iter().enumerate() {
                dot_q8_rows(dtype, &w, row_bytes, x, &mut one);
                for r in 0..n {
                    let (got, want) = (many[t * n + r], one[r]);
                    assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{dtype} q8 {tokens} tokens: token {t} row {r}: {got} vs {want}");
                }
            }
        }
        let xs: Vec<Vec<f32>> = (0..7).map(|t| random_x(k, 100 + t)).collect();
        let sums: Vec<Vec<f32>> = xs.iter().map(|x| block_sums(x)).collect();
        let f32s: Vec<F32Act> = xs.iter().zip(&sums).map(|(x, sums)| F32Act { x, sums }).collect();
        let f32s: Vec<&F32Act> = f32s.iter().collect();
        dot_rows_many(dtype, &w, row_bytes, &f32s, into(&mut many, n));
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
            r8_rows(r8, &packed, row_bytes, &mut slow, |plain, row, o| *o = portable_q8(plain, row, &xq));
            for (r, &got) in slow.iter().enumerate() {
                assert_eq!(got, portable_q8(dtype, row(r), &xq), "{r8} portable q8 {nb} blocks row {r}");
            }
        }
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn avx2_quantization_gives_the_portable_bytes() {
    if !crate::simd::has_avx2_fma() {
        return println!("skipped: this CPU has no AVX2+FMA+F16C");
    }
    // Random blocks, an all-zero block, and a block of exact ties (scale 1: 127 and k + 0.5).
    let mut x = random_x(96, 5);
    x.extend([0.0; 32]);
    x.extend((0..32).map(|i| if i == 0 { 127.0 } else { (i as f32 - 16.0) + 0.5 }));
    let fast = Q8Act::new(&x);
    let mut slow = Q8Act { d: vec![0.0; 5], q: vec![0; 160], isum: vec![0; 5], sum: vec![0.0; 5], ds: Vec::new() };
    portable::quantize(&x, &mut slow);
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

#[test]
#[cfg(target_arch = "x86_64")]
fn vnni_gemm_equals_the_portable_rows() {
    if !vnni::available() {
        return println!("skipped: this CPU has no AVX-512 VNNI (or HIGHRISE_CPU_SIMD keeps to AVX2)");
    }
    for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Q4K, DType::Q4_0R8, DType::Q4_1R8] {
        let plain = dtype.plain();
        // Block counts 1, 3, 18 (576 columns), 48 (1536), Q4_K's super-blocks of 8 rounded up;
        // rows ending inside a tile of 32 and on one; token counts around the kernel's six per pass.
        for (nb, n, tokens) in [(1usize, 8, 1), (3, 40, 7), (18, 72, 13), (48, 64, 6), (18, 16, 8)] {
            let k = if plain == DType::Q4K { 256 * nb.div_ceil(8) } else { 32 * nb };
            let w: Vec<u8> = (0..n).flat_map(|r| random_row(plain, k, 200 + r as u64)).collect();
            let packed = match dtype.interleaved_rows() {
                1 => w.clone(),
                _ => highrise_core::quant::repack_r8(plain, &w, n, k).unwrap(),
            };
            let row_bytes = plain.storage_bytes(k).unwrap();
            // Activations with the largest magnitudes in some blocks, so 127 meets every value.
            let acts: Vec<Q8Act> = (0..tokens)
                .map(|t| Q8Act::new(&random_x(k, 300 + t as u64).iter().map(|v| v * (1 + t % 3) as f32).collect::<Vec<_>>()))
                .collect();
            let refs: Vec<&Q8Act> = acts.iter().collect();
            let mut got = vec![f32::NAN; tokens * n];
            let mut calls = 0;
            vnni::gemm(dtype, &packed, row_bytes, &refs, |t, r0, v| {
                calls += 1;
                got[t * n + r0..t * n + r0 + v.len()].copy_from_slice(v)
            });
            assert_eq!(calls, tokens * n.div_ceil(32), "{dtype}: one call per token and tile");
            for (t, x) in acts.iter().enumerate() {
                for r in 0..n {
                    let want = portable_q8(plain, &w[r * row_bytes..(r + 1) * row_bytes], x);
                    let g = got[t * n + r];
                    // Same integer sums, the f32 terms added in another order.
                    let tol = 1e-5 * (k as f32 * 0.05).max(want.abs());
                    assert!((g - want).abs() <= tol, "{dtype} {nb} blocks token {t} row {r}: {g} vs {want}");
                }
            }
            // The dispatcher takes the GEMM from MIN_TOKENS on and gives the same numbers.
            if tokens >= vnni::MIN_TOKENS {
                let mut many = vec![f32::NAN; tokens * n];
                dot_rows_many(dtype, &packed, row_bytes, &refs, |t, r0, v| many[t * n + r0..t * n + r0 + v.len()].copy_from_slice(v));
                assert_eq!(many, got, "{dtype}: dot_rows_many took another path");
            }
        }
    }
}


