//! Quantized weights on the CPU backend (through the plugin): each format's matmul against
//! dequantize-then-multiply in f64, with f32 activations (within f32 rounding) and with 8-bit ones
//! (within the bound documented in highrise-cpu's quant.rs); the embedding gather from a quantized
//! table; and the default model kept in Q4_1 against the HF fixtures.

mod common;

use common::*;
use highrise::core::{DType, Tensor};

const FORMATS: [DType; 5] = [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K, DType::Q6K];

/// Random weights [n, k] in `dtype` (the 8-row interleaved layouts made from their plain format,
/// as the model loader makes them) and their dequantized values.
fn random_weight(rng: &mut Rng, dtype: DType, n: usize, k: usize) -> (Vec<u8>, Vec<f64>) {
    let (bytes, w) = random_quant(rng, dtype.plain(), n, k);
    match dtype.interleaved_rows() {
        1 => (bytes, w),
        _ => (highrise::core::quant::repack_r8(dtype.plain(), &bytes, n, k).unwrap(), w),
    }
}

#[test]
fn quantized_linear_matches_dequantized_reference() {
    let mut rng = Rng::new("quantized linear");
    for dtype in FORMATS.into_iter().chain([DType::Q4_0R8, DType::Q4_1R8]) {
        for (k, n) in [(512, 48), (1536, 96)] {
            // One token (decode), a few (a batch of decoding sequences), many (prefill).
            for t in [1, 3, 7, 64] {
                let (bytes, w) = random_weight(&mut rng, dtype, n, k);
                let wt = Tensor::from_bytes(&cpu(), dtype, &[n, k], &bytes).unwrap();
                let x = rng.values(t * k, 1.0, DType::F32);
                let xt = upload(DType::F32, &[t, k], &x);
                let exact = ref_linear(&x, &w, None, k, Rd::Exact);
                let mut out = poisoned(DType::F32, &[t, n]);
                cpu().linear(&mut out, &xt, &wt, None).unwrap();
                let what = format!("linear {dtype} [{n}, {k}] T={t} f32 activations");
                assert_close(&what, DType::F32, &download(&out), &exact, &exact);

                // 8-bit activations: each element within sum over blocks of (dx / 2) * sum |w|.
                let mut out = poisoned(DType::F32, &[t, n]);
                cpu().linear_with(&mut out, &xt, &wt, None, true).unwrap();
                let got = download(&out);
                let rms = (exact.iter().map(|v| v * v).sum::<f64>() / exact.len() as f64).sqrt();
                for i in 0..t {
                    let xs = &x[i * k..(i + 1) * k];
                    for j in 0..n {
                        let wr = &w[j * k..(j + 1) * k];
                        let bound: f64 = xs
                            .chunks(32)
                            .zip(wr.chunks(32))
                            .map(|(xb, wb)| {
                                let dx = xb.iter().fold(0f64, |m, v| m.max(v.abs())) / 127.0;
                                dx / 2.0 * wb.iter().map(|v| v.abs()).sum::<f64>()
                            })
                            .sum::<f64>()
                            + 1e-5 * (exact[i * n + j].abs() + rms);
                        let err = (got[i * n + j] - exact[i * n + j]).abs();
                        assert!(err <= bound, "linear {dtype} T={t} q8 activations: [{i}, {j}] off by {err:e} > {bound:e}");
                    }
                }
            }
        }
    }
}

#[test]
fn embedding_reads_quantized_tables() {
    let mut rng = Rng::new("quantized embedding");
    for dtype in FORMATS {
        let (vocab, hidden) = (37, 512);
        let (bytes, table) = random_quant(&mut rng, dtype, vocab, hidden);
        let t = Tensor::from_bytes(&cpu(), dtype, &[vocab, hidden], &bytes).unwrap();
        let ids: Vec<u32> = (0..9).map(|_| rng.below(vocab) as u32).collect();
        let mut out = poisoned(DType::F32, &[ids.len(), hidden]);
        cpu().embedding(&mut out, &t, &ids).unwrap();
        let want: Vec<f64> = ids.iter().flat_map(|&id| table[id as usize * hidden..][..hidden].to_vec()).collect();
        assert_eq!(download(&out), want, "embedding from {dtype}");
    }
}

#[test]
fn rows_interleaved_by_8_are_refused_where_they_do_not_fit() {
    let mut rng = Rng::new("interleaved rows refused");
    // A gather needs contiguous rows: the error names the layout and the one to use.
    let (bytes, _) = random_weight(&mut rng, DType::Q4_1R8, 16, 64);
    let table = Tensor::from_bytes(&cpu(), DType::Q4_1R8, &[16, 64], &bytes).unwrap();
    let mut out = poisoned(DType::F32, &[1, 64]);
    let err = cpu().embedding(&mut out, &table, &[3]).unwrap_err().to_string();
    assert!(err.contains("q4_1_r8") && err.contains("q4_1"), "{err}");
    // 12 rows are not whole groups of 8.
    let (bytes, _) = random_quant(&mut rng, DType::Q4_0, 12, 64);
    let w = Tensor::from_bytes(&cpu(), DType::Q4_0R8, &[12, 64], &bytes).unwrap();
    let x = upload(DType::F32, &[1, 64], &rng.values(64, 1.0, DType::F32));
    let mut out = poisoned(DType::F32, &[1, 12]);
    let err = cpu().linear(&mut out, &x, &w, None).unwrap_err().to_string();
    assert!(err.contains("multiple of 8 rows"), "{err}");
}
