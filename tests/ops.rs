//! Every op against a naive f64 reference, on fresh random inputs, with outputs poisoned (NaN)
//! before each call: on the CPU plugin here, and on the CUDA backend in tests/cuda.rs, which
//! includes this file. Shapes: grouped-query ratios 1, 3 and 4, head dims 64 and 128,
//! sequence lengths 1, 7, 64 and 300, decode at non-zero positions.

mod common;

use common::*;
use highrise::core::ops::sampling::sample_row;
use highrise::core::ops::{GluAct, PagedSeq, RopeConfig, RopeScaling, SampleParams, Scores, MAX_ROPE_PAIRS};
use highrise::core::{DType, Tensor};

const SEQ_LENS: [usize; 4] = [1, 7, 64, 300];
const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const EPS: f64 = 1e-5;

/// Gemma's embedding: rows times sqrt(hidden), each element's product rounded once to the output.
#[test]
fn embedding_scales_rows() {
    if backend("embedding_scales_rows").is_none() {
        return;
    }
    let mut rng = Rng::new("embedding scaled");
    let (vocab, hidden) = (97, 64);
    let scale = (hidden as f32).sqrt();
    for table_dt in FLOATS {
        for out_dt in FLOATS {
            let table = rng.values(vocab * hidden, 1.0, table_dt);
            let ids: Vec<u32> = (0..40).map(|_| rng.below(vocab) as u32).collect();
            let mut out = poisoned(out_dt, &[ids.len(), hidden]);
            be().embedding_scaled(&mut out, &upload(table_dt, &[vocab, hidden], &table), &ids, scale).unwrap();
            let want: Vec<f64> = ids
                .iter()
                .flat_map(|&id| table[id as usize * hidden..][..hidden].iter().map(|&x| round(out_dt, (x as f32 * scale) as f64)))
                .collect();
            assert_eq!(download(&out), want, "embedding x {scale} {table_dt}->{out_dt}");
        }
    }
}

#[test]
fn embedding_gathers_rows() {
    if backend("embedding_gathers_rows").is_none() {
        return;
    }
    let mut rng = Rng::new("embedding");
    let (vocab, hidden) = (97, 64);
    for table_dt in FLOATS {
        for out_dt in FLOATS {
            for t in SEQ_LENS {
                let table = rng.values(vocab * hidden, 1.0, table_dt);
                let ids: Vec<u32> = (0..t).map(|_| rng.below(vocab) as u32).collect();
                let mut out = poisoned(out_dt, &[t, hidden]);
                be().embedding(&mut out, &upload(table_dt, &[vocab, hidden], &table), &ids).unwrap();
                let want: Vec<f64> = ids
                    .iter()
                    .flat_map(|&id| table[id as usize * hidden..][..hidden].iter().map(|&x| round(out_dt, x)))
                    .collect();
                let got = download(&out);
                if let Some(i) = (0..want.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                    let src = table[ids[i / hidden] as usize * hidden + i % hidden];
                    panic!("embedding {table_dt}->{out_dt} T={t}: element {i} is {}, expected {} (source {src:e}, bits {:016x})", got[i], want[i], src.to_bits());
                }
            }
        }
    }
}

#[test]
fn rms_norm_matches_reference() {
    if backend("rms_norm_matches_reference").is_none() {
        return;
    }
    let mut rng = Rng::new("rms_norm");
    for dt in FLOATS {
        for t in SEQ_LENS {
            // 9000: past the 8192 a CUDA block keeps in registers (kernels/residual.cu).
            for h in [576, 4096, 9000].into_iter().filter(|&h| h == 576 || t < 300) {
                let x = rng.values(t * h, 2.0, dt);
                let w = rng.values(h, 1.5, dt);
                let mut out = poisoned(dt, &[t, h]);
                be().rms_norm(&mut out, &upload(dt, &[t, h], &x), &upload(dt, &[h], &w), EPS as f32).unwrap();
                let what = format!("rms_norm {dt} [{t}, {h}]");
                let exact = ref_rms_norm(&x, &w, EPS, Rd::Exact);
                assert_close(&what, dt, &download(&out), &exact, &ref_rms_norm(&x, &w, EPS, Rd::Naive(dt)));
            }
        }
    }
}

#[test]
fn add_rms_norm_updates_stream_and_normalizes() {
    if backend("add_rms_norm_updates_stream_and_normalizes").is_none() {
        return;
    }
    let mut rng = Rng::new("add_rms_norm");
    for dt in FLOATS {
        // 9000: past the 8192 a CUDA block keeps in registers (kernels/residual.cu).
        for (t, h) in SEQ_LENS.into_iter().map(|t| (t, 576)).chain([(1, 4096), (7, 9000)]) {
            let (res, delta, w) = (rng.values(t * h, 2.0, dt), rng.values(t * h, 1.0, dt), rng.values(h, 1.5, dt));
            let mut residual = upload(dt, &[t, h], &res);
            let mut out = poisoned(dt, &[t, h]);
            be()
                .add_rms_norm(&mut out, &mut residual, &upload(dt, &[t, h], &delta), &upload(dt, &[h], &w), EPS as f32)
                .unwrap();
            let sum: Vec<f64> = res.iter().zip(&delta).map(|(a, b)| a + b).collect();
            let sum_rounded: Vec<f64> = sum.iter().map(|&s| round(dt, s)).collect();
            let what = format!("add_rms_norm {dt} T={t} H={h}");
            assert_close(&format!("{what} residual"), dt, &download(&residual), &sum, &sum_rounded);
            let exact = ref_rms_norm(&sum, &w, EPS, Rd::Exact);
            let naive = ref_rms_norm(&sum_rounded, &w, EPS, Rd::Naive(dt));
            assert_close(&format!("{what} out"), dt, &download(&out), &exact, &naive);
        }
    }
}

#[test]
fn linear_matches_reference() {
    if backend("linear_matches_reference").is_none() {
        return;
    }
    let mut rng = Rng::new("linear");
    // (K, N): the default model's q and MLP shapes, and a head-sized one.
    for (k, n) in [(576, 1536), (1536, 576), (64, 96)] {
        for t in SEQ_LENS {
            for act in FLOATS {
                for wdt in FLOATS {
                    let bias = (t + n) % 2 == 0;
                    let x = rng.values(t * k, 1.0, act);
                    let w = rng.values(n * k, 0.1, wdt);
                    let b = rng.values(n, 0.5, act);
                    let bias_t = upload(act, &[n], &b);
                    let mut out = poisoned(act, &[t, n]);
                    be()
                        .linear(&mut out, &upload(act, &[t, k], &x), &upload(wdt, &[n, k], &w), bias.then_some(&bias_t))
                        .unwrap();
                    let b = bias.then_some(&b[..]);
                    let what = format!("linear x {act}[{t}, {k}] w {wdt}[{n}, {k}] bias {bias}");
                    let exact = ref_linear(&x, &w, b, k, Rd::Exact);
                    assert_close(&what, act, &download(&out), &exact, &ref_linear(&x, &w, b, k, Rd::Naive(act)));
                }
            }
        }
    }
}

#[test]
fn rope_rotates_half_at_any_position() {
    if backend("rope_rotates_half_at_any_position").is_none() {
        return;
    }
    let mut rng = Rng::new("rope");
    for dt in FLOATS {
        for d in [64, 128] {
            for t in SEQ_LENS {
                for theta in [10_000.0, 500_000.0] {
                    let heads = 3;
                    let x = rng.values(t * heads * d, 1.0, dt);
                    // Positions anywhere in a long context, not just 0..t.
                    let positions: Vec<u32> = (0..t).map(|_| rng.below(32_768) as u32).collect();
                    let mut xt = upload(dt, &[t, heads, d], &x);
                    be().rope(&mut xt, &positions, RopeConfig::new(theta as f32)).unwrap();
                    let inv = ref_inv_freq(theta, d);
                    let what = format!("rope {dt} D={d} T={t} theta={theta}");
                    let exact = ref_rope(&x, &positions, &inv, heads, Rd::Exact);
                    let naive = ref_rope(&x, &positions, &inv, heads, Rd::Naive(dt));
                    assert_close(&what, dt, &download(&xt), &exact, &naive);
                }
            }
        }
    }
}

#[test]
fn rope_llama3_scaling_follows_the_reference_formula() {
    if backend("rope_llama3_scaling_follows_the_reference_formula").is_none() {
        return;
    }
    let mut rng = Rng::new("rope_llama3");
    let (t, heads, d) = (7, 2, 128);
    let cfg = RopeConfig::scaled(
        500_000.0,
        RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 8192 },
    );
    // Llama 3.1's published formula, written out independently of RopeConfig::inv_freq.
    let inv: Vec<f64> = ref_inv_freq(500_000.0, d)
        .into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let (lo_wl, hi_wl) = (8192.0 / 1.0, 8192.0 / 4.0);
            if wavelen < hi_wl {
                f
            } else if wavelen > lo_wl {
                f / 8.0
            } else {
                let smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
                (1.0 - smooth) * f / 8.0 + smooth * f
            }
        })
        .collect();
    assert!(inv.iter().zip(ref_inv_freq(500_000.0, d)).any(|(a, b)| a != &b), "scaling changed nothing");
    let x = rng.values(t * heads * d, 1.0, DType::F32);
    let positions: Vec<u32> = (0..t).map(|_| rng.below(100_000) as u32).collect();
    let mut xt = upload(DType::F32, &[t, heads, d], &x);
    be().rope(&mut xt, &positions, cfg).unwrap();
    let exact = ref_rope(&x, &positions, &inv, heads, Rd::Exact);
    assert_close("rope llama3", DType::F32, &download(&xt), &exact, &exact);
}

/// LongRoPE as Phi-3.5 uses it, at head dim `d`: a divisor of its own per pair, cos and sin scaled.
fn longrope(d: usize) -> RopeConfig {
    let mut divisors = [1f32; MAX_ROPE_PAIRS];
    divisors.iter_mut().take(d / 2).enumerate().for_each(|(i, f)| *f = 1.0 + 0.3 * i as f32);
    RopeConfig::scaled(10_000.0, RopeScaling::Factors { attention_factor: 1.19, pairs: (d / 2) as u32, divisors })
}

/// Phi-4-mini's RoPE at head dim `d`: the first 3/4 of the dims rotating, with LongRoPE's divisors
/// (one per rotating pair) and attention factor.
fn partial_longrope(d: usize) -> RopeConfig {
    let rot = 3 * d / 4;
    let mut config = longrope(rot);
    config.rotary_dims = rot as u32;
    config
}

/// LongRoPE (Phi-3.5): each pair's frequency over its own divisor, cos and sin times the attention
/// factor, against the formula written out here.
#[test]
fn rope_longrope_factors_follow_the_reference_formula() {
    if backend("rope_longrope_factors_follow_the_reference_formula").is_none() {
        return;
    }
    let mut rng = Rng::new("rope_longrope");
    for dt in FLOATS {
        for d in [64, 128] {
            let (t, heads) = (9, 3);
            let inv: Vec<f64> = ref_inv_freq(10_000.0, d).into_iter().enumerate().map(|(i, f)| f / (1.0 + 0.3 * i as f32) as f64).collect();
            let x = rng.values(t * heads * d, 1.0, dt);
            let positions: Vec<u32> = (0..t).map(|_| rng.below(100_000) as u32).collect();
            let mut xt = upload(dt, &[t, heads, d], &x);
            be().rope(&mut xt, &positions, longrope(d)).unwrap();
            let m = 1.19f32 as f64;
            let reference = |rd: Rd| ref_rope(&x, &positions, &inv, heads, rd).into_iter().map(|v| rd.r(v * m)).collect::<Vec<f64>>();
            assert_close(&format!("rope longrope {dt} D={d}"), dt, &download(&xt), &reference(Rd::Exact), &reference(Rd::Naive(dt)));
        }
    }
    // Factors that do not match the head dim are refused, naming the op.
    let mut xt = upload(DType::F32, &[1, 1, 64], &[0.0; 64]);
    let err = be().rope(&mut xt, &[0], longrope(128)).unwrap_err().to_string();
    assert!(err.contains("rope") && err.contains("64 rope factors for 64 rotary dims (32 pairs)"), "{err}");
}

/// Partial RoPE (Phi-4-mini: 3/4 of each head's dims, with LongRoPE): the first dims rotate as a
/// head of that size would (pairs (i, i + rot/2), frequencies over the rotating dims, cos and sin
/// times the attention factor), the rest pass through untouched, attention factor and all.
#[test]
fn rope_partial_rotates_the_first_dims_and_passes_the_rest() {
    if backend("rope_partial_rotates_the_first_dims_and_passes_the_rest").is_none() {
        return;
    }
    let mut rng = Rng::new("rope_partial");
    for dt in FLOATS {
        for d in [64, 128] {
            let (t, heads, rot) = (9, 3, 3 * d / 4);
            let inv: Vec<f64> = ref_inv_freq(10_000.0, rot).into_iter().enumerate().map(|(i, f)| f / (1.0 + 0.3 * i as f32) as f64).collect();
            let x = rng.values(t * heads * d, 1.0, dt);
            let positions: Vec<u32> = (0..t).map(|_| rng.below(100_000) as u32).collect();
            let mut xt = upload(dt, &[t, heads, d], &x);
            be().rope(&mut xt, &positions, partial_longrope(d)).unwrap();
            let m = 1.19f32 as f64;
            let reference = |rd: Rd| {
                let front: Vec<f64> = x.chunks(d).flat_map(|head| head[..rot].to_vec()).collect();
                let rotated = ref_rope(&front, &positions, &inv, heads, rd);
                let mut out = x.clone();
                for (head, r) in out.chunks_mut(d).zip(rotated.chunks(rot)) {
                    head[..rot].iter_mut().zip(r).for_each(|(o, v)| *o = rd.r(v * m));
                }
                out
            };
            assert_close(&format!("rope partial {dt} D={d} rot={rot}"), dt, &download(&xt), &reference(Rd::Exact), &reference(Rd::Naive(dt)));
        }
    }
    // Rotating dims that are odd or more than the head's are refused, naming the op.
    let mut xt = upload(DType::F32, &[1, 1, 64], &[0.0; 64]);
    let odd = RopeConfig { rotary_dims: 47, ..RopeConfig::new(10_000.0) };
    let err = be().rope(&mut xt, &[0], odd).unwrap_err().to_string();
    assert!(err.contains("rope") && err.contains("47 rotary dims in a head dim of 64"), "{err}");
}

/// (q heads, kv heads) for grouped-query ratios 1, 3 and 4.
const GQA: [(usize, usize); 3] = [(4, 4), (9, 3), (8, 2)];

/// Prefill attention over whole prompts, causal (a decoder's) and not (each token sees its whole
/// prompt), with grouped-query heads.
#[test]
pub fn prefill_attention_is_causal_gqa() {
    if backend("prefill_attention_is_causal_gqa").is_none() {
        return;
    }
    let mut rng = Rng::new("attention");
    for dt in FLOATS {
        for causal in [true, false] {
            for (hq, hkv) in GQA {
                for d in [64, 128] {
                    for t in SEQ_LENS {
                        check_prefill(&mut rng, dt, hq, hkv, d, &[t], causal);
                    }
                }
            }
            // Several prompts of different lengths in one batch (one past a 64-row tile).
            check_prefill(&mut rng, dt, 9, 3, 64, &[7, 1, 100, 3], causal);
        }
    }
}

fn check_prefill(rng: &mut Rng, dt: DType, hq: usize, hkv: usize, d: usize, lens: &[usize], causal: bool) {
    check_prefill_scored(rng, dt, [hq, hkv, d], lens, causal, Scores::scaled(1.0 / (d as f32).sqrt()))
}

/// `check_prefill` with scores as `scores` asks (soft-capping, a sliding window).
fn check_prefill_scored(rng: &mut Rng, dt: DType, [hq, hkv, d]: [usize; 3], lens: &[usize], causal: bool, scores: Scores) {
    let t: usize = lens.iter().sum();
    let (q, k, v) = (rng.values(t * hq * d, 1.0, dt), rng.values(t * hkv * d, 1.0, dt), rng.values(t * hkv * d, 1.0, dt));
    let sc = (scores.scale as f64, scores.softcap as f64, scores.window as usize, scores.alibi as f64);
    let mut out = poisoned(dt, &[t, hq, d]);
    let lens32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
    be()
        .attention_with(
            &mut out,
            &upload(dt, &[t, hq, d], &q),
            &upload(dt, &[t, hkv, d], &k),
            &upload(dt, &[t, hkv, d], &v),
            &lens32,
            scores,
            causal,
        )
        .unwrap();
    let got = download(&out);
    let mut at = 0;
    for &l in lens {
        let (qs, ks) = (&q[at * hq * d..(at + l) * hq * d], at * hkv * d..(at + l) * hkv * d);
        let what = format!("attention {dt} hq={hq} hkv={hkv} D={d} lens={lens:?} causal={causal} {scores:?} (seq at {at})");
        let exact = ref_attention_scored(qs, &k[ks.clone()], &v[ks.clone()], [hq, hkv, d], sc, causal, Rd::Exact);
        let naive = ref_attention_scored(qs, &k[ks.clone()], &v[ks], [hq, hkv, d], sc, causal, Rd::Naive(dt));
        assert_close(&what, dt, &got[at * hq * d..(at + l) * hq * d], &exact, &naive);
        at += l;
    }
}

/// Decode and chunked prefill through the paged cache: each sequence's K/V is written with
/// `kv_write` into blocks in shuffled order, then its last `q_len` tokens attend through the table.
#[test]
pub fn paged_attention_reads_through_block_tables() {
    if backend("paged_attention_reads_through_block_tables").is_none() {
        return;
    }
    let mut rng = Rng::new("paged_attention");
    for dt in FLOATS {
        for (hq, hkv) in GQA {
            for d in [64, 128] {
                // (context, queries): decode at non-zero positions, and a prefill chunk after a prefix.
                let batch: Vec<(usize, usize)> = SEQ_LENS.iter().map(|&c| (c, 1)).chain([(300, 7), (64, 64)]).collect();
                check_paged(&mut rng, dt, hq, hkv, d, &batch);
                // Prompt chunks only (on CUDA: the tensor-core kernel through the table), one
                // longer than a 64-row tile.
                check_paged(&mut rng, dt, hq, hkv, d, &[(300, 7), (64, 64), (230, 100)]);
                // One decoding sequence: its long context is split into parts (CPU, and CUDA's
                // flash-decoding) whose results merge by log-sum-exp.
                check_paged(&mut rng, dt, hq, hkv, d, &[(1000, 1)]);
                // A few new tokens per sequence, as speculative decoding verifies them (on CUDA: the
                // tensor-core decode kernel, their rows x group within one tile).
                check_paged(&mut rng, dt, hq, hkv, d, &[(40, 2), (300, 1), (17, 3)]);
            }
        }
        // Groups of more query heads than the CPU's decode tile of 6 rows (Llama-3-70B's 8 per K/V
        // head), and (CPU: CUDA's kernels take D 64, 128 and 256) a head dim of whole vectors of 8
        // but not whole tiles of 16 columns.
        check_paged(&mut rng, dt, 16, 2, 64, &[(1, 1), (37, 1), (300, 1)]);
        if !on_cuda() {
            check_paged(&mut rng, dt, 4, 2, 40, &[(1, 1), (37, 1), (300, 1)]);
        }
    }
}

/// Gemma 2's and Mistral's scores: soft-capped (s -> cap tanh(s / cap); a cap of 1 bends every
/// score), and a sliding window (a query sees itself and the window - 1 keys before it), alone and
/// together; prefill (one prompt and several, the window shorter than some, longer than others:
/// on CUDA's tensor-core kernel, tiles skipped before the window and masked across its start) and
/// through the paged cache (decode at contexts inside and far past the window, whose parts start at
/// the window; chunks of prompt after a prefix).
#[test]
pub fn attention_soft_caps_scores_and_slides_its_window() {
    if backend("attention_soft_caps_scores_and_slides_its_window").is_none() {
        return;
    }
    let mut rng = Rng::new("attention scores");
    // On CUDA (where the emulated device makes each case slow) one shape per kernel: a group of 4
    // query heads at D 64 (attn_group) and D 256 (Gemma 2's, attn_split); f32 and bf16.
    let (dtypes, shapes): (&[DType], &[[usize; 3]]) = match on_cuda() {
        true => (&[DType::F32, DType::BF16], &[[8, 2, 64], [4, 1, 256]]),
        false => (&FLOATS, &[[4, 4, 64], [8, 2, 64], [8, 2, 128], [4, 1, 256]]),
    };
    for &dt in dtypes {
        for (softcap, window) in [(1.0, 0), (0.0, 5), (0.0, 64), (1.0, 33)] {
            for &[hq, hkv, d] in shapes {
                let scores = Scores { scale: 1.0 / (d as f32).sqrt(), softcap, window, alibi: 0.0 };
                check_prefill_scored(&mut rng, dt, [hq, hkv, d], &[300], true, scores);
                check_prefill_scored(&mut rng, dt, [hq, hkv, d], &[7, 1, 100, 3], true, scores);
                // One sequence alone: its context cut into as many parts as fill the device.
                check_paged_scored(&mut rng, [dt, dt], [hq, hkv, d], &[(1000, 1)], scores);
                let batch = [(1, 1), (37, 1), (300, 1), (1000, 1), (300, 7), (64, 64), (40, 2)];
                check_paged_scored(&mut rng, [dt, dt], [hq, hkv, d], &batch, scores);
                // Prompt chunks only (on CUDA, f16/bf16: the tensor-core prefill kernel through the table).
                check_paged_scored(&mut rng, [dt, dt], [hq, hkv, d], &[(300, 7), (64, 64), (230, 100)], scores);
            }
        }
        // A cap without a window on non-causal attention.
        check_prefill_scored(&mut rng, dt, [4, 2, 64], &[50], false, Scores { scale: 0.125, softcap: 1.0, window: 0, alibi: 0.0 });
    }
}

/// ALiBi (Bloom's, MPT's): each head's scores biased by its slope times the key's distance back
/// from the row's last, checked against the f64 reference that takes the slopes MPT's way. Head
/// counts of a power of two and not (6: four slopes on the power's sequence, two between them),
/// grouped and not; prefill causal and not, with a sliding window beside it, and through the paged
/// cache (decode, prompt chunks after a prefix). On CUDA, f32 on the split kernels, bf16 on the
/// tensor-core ones (flash_attn for prompts and chunks, decode_attn for the decoding rows).
#[test]
pub fn attention_biases_scores_by_distance_with_alibi() {
    if backend("attention_biases_scores_by_distance_with_alibi").is_none() {
        return;
    }
    let mut rng = Rng::new("attention alibi");
    let (dtypes, shapes): (&[DType], &[[usize; 3]]) = match on_cuda() {
        true => (&[DType::F32, DType::BF16], &[[6, 6, 64], [8, 2, 64]]),
        false => (&FLOATS, &[[6, 6, 64], [8, 2, 64], [12, 4, 128], [4, 1, 256]]),
    };
    for &dt in dtypes {
        for &[hq, hkv, d] in shapes {
            for (alibi, window) in [(8.0, 0), (8.0, 40), (16.0, 0)] {
                let scores = Scores { scale: 1.0 / (d as f32).sqrt(), softcap: 0.0, window, alibi };
                check_prefill_scored(&mut rng, dt, [hq, hkv, d], &[300], true, scores);
                check_prefill_scored(&mut rng, dt, [hq, hkv, d], &[7, 1, 100, 3], true, scores);
                check_paged_scored(&mut rng, [dt, dt], [hq, hkv, d], &[(1000, 1)], scores);
                check_paged_scored(&mut rng, [dt, dt], [hq, hkv, d], &[(1, 1), (37, 1), (300, 7), (64, 64), (230, 100)], scores);
            }
            let scores = Scores { scale: 0.125, softcap: 0.0, window: 0, alibi: 8.0 };
            check_prefill_scored(&mut rng, dt, [hq, hkv, d], &[50, 9], false, scores);
        }
    }
}

/// An f16 cache beside f32 activations (llama.cpp's default KV cache): `kv_write` rounds K and V to
/// f16 as it writes them, and attention over them is then as exact as f32's, against the f64
/// reference computed from the rounded values.
#[test]
pub fn paged_attention_reads_a_cache_of_another_dtype() {
    if backend("paged_attention_reads_a_cache_of_another_dtype").is_none() {
        return;
    }
    if on_cuda() {
        return println!("skipped: an f16 KV cache beside f32 activations is the CPU backend's alone");
    }
    let mut rng = Rng::new("paged_attention f16 cache");
    for (hq, hkv) in GQA {
        let batch: Vec<(usize, usize)> = SEQ_LENS.iter().map(|&c| (c, 1)).chain([(300, 7), (1000, 1)]).collect();
        check_paged_in(&mut rng, DType::F32, DType::F16, hq, hkv, 64, &batch);
    }
}

fn check_paged(rng: &mut Rng, dt: DType, hq: usize, hkv: usize, d: usize, batch: &[(usize, usize)]) {
    check_paged_in(rng, dt, dt, hq, hkv, d, batch)
}

/// `check_paged` with the cache in `cache_dt` (K and V are made in the activations' dtype `dt`).
fn check_paged_in(rng: &mut Rng, dt: DType, cache_dt: DType, hq: usize, hkv: usize, d: usize, batch: &[(usize, usize)]) {
    check_paged_scored(rng, [dt, cache_dt], [hq, hkv, d], batch, Scores::scaled(1.0 / (d as f32).sqrt()))
}

/// `check_paged_in` with scores as `scores` asks (soft-capping, a sliding window).
fn check_paged_scored(rng: &mut Rng, [dt, cache_dt]: [DType; 2], [hq, hkv, d]: [usize; 3], batch: &[(usize, usize)], scores: Scores) {
    let block_size = 16;
    let needed: usize = batch.iter().map(|(c, _)| c.div_ceil(block_size)).sum();
    let num_blocks = needed + 5;
    let mut free = shuffled_blocks(rng, num_blocks);
    let mut k_cache = poisoned(cache_dt, &[num_blocks, hkv, block_size, d]);
    let mut v_cache = poisoned(cache_dt, &[num_blocks, hkv, block_size, d]);
    let (mut table, mut seqs, mut qs, mut kvs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &(ctx, q_len) in batch {
        let blocks: Vec<u32> = free.drain(..ctx.div_ceil(block_size)).collect();
        let slots = slots_in(&blocks, ctx, block_size);
        let (k, v) = (rng.values(ctx * hkv * d, 1.0, dt), rng.values(ctx * hkv * d, 1.0, dt));
        be()
            .kv_write(&mut k_cache, &mut v_cache, &upload(dt, &[ctx, hkv, d], &k), &upload(dt, &[ctx, hkv, d], &v), &slots)
            .unwrap();
        seqs.push(PagedSeq { q_len: q_len as u32, context_len: ctx as u32, blocks_start: table.len() as u32 });
        table.extend(blocks);
        qs.push(rng.values(q_len * hq * d, 1.0, dt));
        // What the cache holds: the values rounded to its dtype.
        let in_cache = |x: Vec<f64>| x.into_iter().map(|x| round(cache_dt, x)).collect::<Vec<f64>>();
        kvs.push((in_cache(k), in_cache(v)));
    }
    let t: usize = batch.iter().map(|(_, q)| q).sum();
    let q: Vec<f64> = qs.concat();
    let sc = (scores.scale as f64, scores.softcap as f64, scores.window as usize, scores.alibi as f64);
    let mut out = poisoned(dt, &[t, hq, d]);
    be()
        .paged_attention_with(&mut out, &upload(dt, &[t, hq, d], &q), &k_cache, &v_cache, &seqs, &table, scores)
        .unwrap();
    let got = download(&out);
    let mut at = 0;
    for ((&(ctx, q_len), qv), (k, v)) in batch.iter().zip(&qs).zip(&kvs) {
        let what = format!("paged_attention {dt} (cache {cache_dt}) hq={hq} hkv={hkv} D={d} context={ctx} queries={q_len} {scores:?}");
        let exact = ref_attention_scored(qv, k, v, [hq, hkv, d], sc, true, Rd::Exact);
        let naive = ref_attention_scored(qv, k, v, [hq, hkv, d], sc, true, Rd::Naive(dt));
        assert_close(&what, dt, &got[at * hq * d..(at + q_len) * hq * d], &exact, &naive);
        at += q_len;
    }
}

/// Greedy choice on the backend: the first column of each row's maximum, and its log-probability
/// against an f64 log-sum-exp of the same (dtype-rounded) values.
#[test]
fn argmax_matches_reference() {
    if backend("argmax_matches_reference").is_none() {
        return;
    }
    let mut rng = Rng::new("argmax");
    for dt in FLOATS {
        for (rows, v) in [(1, 1), (3, 100), (8, 49152), (2, 128_256)] {
            let mut x = rng.values(rows * v, 8.0, dt);
            // A tie for the maximum in row 0, at a column later than its first.
            if v > 10 {
                let m = x[..v].iter().cloned().fold(f64::MIN, f64::max);
                x[v - 3] = m;
            }
            let xt = upload(dt, &[rows, v], &x);
            let x = download(&xt);
            let mut index = Tensor::from_bytes(&be(), DType::U32, &[rows], &vec![0xAB; rows * 4]).unwrap();
            let mut logprob = poisoned(DType::F32, &[rows]);
            be().argmax(&mut index, &mut logprob, &xt).unwrap();
            let (index, logprob) = (download(&index), download(&logprob));
            for (r, row) in x.chunks(v).enumerate() {
                let m = row.iter().cloned().fold(f64::MIN, f64::max);
                let first = row.iter().position(|&val| val == m).unwrap();
                let lse = m + row.iter().map(|&val| (val - m).exp()).sum::<f64>().ln();
                assert_eq!(index[r], first as f64, "argmax {dt} [{rows}, {v}] row {r}");
                assert!((logprob[r] - (m - lse)).abs() <= 1e-4, "argmax {dt} [{rows}, {v}] row {r}: logprob {} vs {}", logprob[r], m - lse);
            }
        }
    }
}

/// Draws on the backend against the definition (`sample_row`) on the same dtype-rounded logits:
/// greedy, top-k (ties at its edge included), top-p, min-p and their mixes, each row with its own
/// settings and random number. The token must be the same; its log-probability within 1e-5.
#[test]
fn sample_matches_its_definition() {
    if backend("sample_matches_its_definition").is_none() {
        return;
    }
    let mut rng = Rng::new("sample");
    for dt in FLOATS {
        for (rows, v) in [(1, 1), (7, 100), (24, 49152), (3, 128_256)] {
            let mut x = rng.values(rows * v, 6.0, dt);
            // Duplicated values, so cuts fall among ties: every row's first 40 copy its next 40.
            for row in x.chunks_mut(v).filter(|r| r.len() >= 80) {
                let (a, b) = row[..80].split_at_mut(40);
                a.copy_from_slice(b);
            }
            let xt = upload(dt, &[rows, v], &x);
            let x: Vec<f32> = download(&xt).into_iter().map(|x| x as f32).collect();
            let params: Vec<SampleParams> = (0..rows)
                .map(|r| {
                    let u = (rng.uniform() + 1.0) / 2.0;
                    let (temperature, top_k, top_p, min_p) = match r % 6 {
                        0 => (0.0, 0, 1.0, 0.0),
                        1 => (1.0, 0, 1.0, 0.0),
                        2 => (0.7, 1 + rng.below(60) as u32, 1.0, 0.0),
                        3 => (1.3, 0, 0.2 + 0.7 * u as f32, 0.0),
                        4 => (0.9, 0, 1.0, 0.05),
                        _ => (0.8, 50, 0.9, 0.01),
                    };
                    SampleParams { temperature, top_k, top_p, min_p, uniform: (rng.uniform() + 1.0) / 2.0 }
                })
                .collect();
            let mut index = Tensor::from_bytes(&be(), DType::U32, &[rows], &vec![0xAB; rows * 4]).unwrap();
            let mut logprob = poisoned(DType::F32, &[rows]);
            be().sample(&mut index, &mut logprob, &xt, &params).unwrap();
            let (index, logprob) = (download(&index), download(&logprob));
            for (r, row) in x.chunks(v).enumerate() {
                let (token, lp) = sample_row(row, &params[r]);
                let what = format!("sample {dt} [{rows}, {v}] row {r} {:?}", params[r]);
                assert_eq!(index[r], token as f64, "{what}");
                assert!((logprob[r] - lp as f64).abs() <= 1e-5, "{what}: logprob {} vs {lp}", logprob[r]);
            }
        }
    }
}

/// A settings entry out of range is refused, naming the row and the field.
#[test]
fn sample_refuses_bad_settings() {
    if backend("sample_refuses_bad_settings").is_none() {
        return;
    }
    let xt = upload(DType::F32, &[2, 10], &[0.5; 20]);
    let mut index = Tensor::empty(&be(), DType::U32, &[2]).unwrap();
    let mut logprob = poisoned(DType::F32, &[2]);
    let ok = SampleParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, uniform: 0.5 };
    let bad = SampleParams { top_p: 1.5, ..ok };
    let err = be().sample(&mut index, &mut logprob, &xt, &[ok, bad]).unwrap_err().to_string();
    assert!(err.contains("sample") && err.contains("params[1]") && err.contains("top_p"), "{err}");
    let err = be().sample(&mut index, &mut logprob, &xt, &[ok]).unwrap_err().to_string();
    assert!(err.contains("1 params for 2 rows"), "{err}");
}

#[test]
fn swiglu_matches_reference() {
    if backend("swiglu_matches_reference").is_none() {
        return;
    }
    let mut rng = Rng::new("swiglu");
    for dt in FLOATS {
        for t in SEQ_LENS {
            let i = 1536;
            let (g, u) = (rng.values(t * i, 4.0, dt), rng.values(t * i, 2.0, dt));
            let mut out = poisoned(dt, &[t, i]);
            be().swiglu(&mut out, &upload(dt, &[t, i], &g), &upload(dt, &[t, i], &u)).unwrap();
            let what = format!("swiglu {dt} [{t}, {i}]");
            assert_close(&what, dt, &download(&out), &ref_swiglu(&g, &u, Rd::Exact), &ref_swiglu(&g, &u, Rd::Naive(dt)));
        }
    }
}

/// GeGLU (Gemma's gate): tanh-approximated GELU of the gate times up, against f64.
#[test]
fn geglu_matches_reference() {
    if backend("geglu_matches_reference").is_none() {
        return;
    }
    let mut rng = Rng::new("geglu");
    let gelu = |g: f64, rd: Rd| rd.r(0.5 * g * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh()));
    for dt in FLOATS {
        for t in SEQ_LENS {
            let i = 1536;
            let (g, u) = (rng.values(t * i, 4.0, dt), rng.values(t * i, 2.0, dt));
            let mut out = poisoned(dt, &[t, i]);
            be().glu(&mut out, &upload(dt, &[t, i], &g), &upload(dt, &[t, i], &u), GluAct::GeluTanh).unwrap();
            let reference = |rd: Rd| g.iter().zip(&u).map(|(&g, &u)| rd.r(gelu(g, rd) * u)).collect::<Vec<f64>>();
            let what = format!("geglu {dt} [{t}, {i}]");
            assert_close(&what, dt, &download(&out), &reference(Rd::Exact), &reference(Rd::Naive(dt)));
        }
    }
}

/// An MLP without a gate (GPT-2, GPT-NeoX, OPT): `act(x)` alone, exact (erf) and tanh GELU and ReLU,
/// against f64; and the exact GELU gated.
#[test]
fn activation_without_a_gate_matches_reference() {
    if backend("activation_without_a_gate_matches_reference").is_none() {
        return;
    }
    let mut rng = Rng::new("activation");
    let gelu_erf = |g: f64, rd: Rd| rd.r(0.5 * g * (1.0 + libm::erf(g / std::f64::consts::SQRT_2)));
    let gelu_tanh = |g: f64, rd: Rd| rd.r(0.5 * g * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh()));
    for dt in FLOATS {
        for t in SEQ_LENS {
            let i = 1536;
            let (g, u) = (rng.values(t * i, 4.0, dt), rng.values(t * i, 2.0, dt));
            let x = upload(dt, &[t, i], &g);
            let relu = |g: f64, _: Rd| g.max(0.0);
            let relu2 = |g: f64, rd: Rd| rd.r(g.max(0.0) * g.max(0.0));
            let acts = [(GluAct::GeluErf, &gelu_erf as &dyn Fn(f64, Rd) -> f64), (GluAct::GeluTanh, &gelu_tanh), (GluAct::Relu, &relu), (GluAct::Relu2, &relu2)];
            for (act, f) in acts {
                let mut out = poisoned(dt, &[t, i]);
                be().activation(&mut out, &x, act).unwrap();
                let reference = |rd: Rd| g.iter().map(|&g| f(g, rd)).collect::<Vec<f64>>();
                assert_close(&format!("{act:?} {dt} [{t}, {i}]"), dt, &download(&out), &reference(Rd::Exact), &reference(Rd::Naive(dt)));
            }
            let mut out = poisoned(dt, &[t, i]);
            be().glu(&mut out, &x, &upload(dt, &[t, i], &u), GluAct::GeluErf).unwrap();
            let reference = |rd: Rd| g.iter().zip(&u).map(|(&g, &u)| rd.r(gelu_erf(g, rd) * u)).collect::<Vec<f64>>();
            assert_close(&format!("gated GeluErf {dt} [{t}, {i}]"), dt, &download(&out), &reference(Rd::Exact), &reference(Rd::Naive(dt)));
        }
    }
}

/// LayerNorm (GPT-2, GPT-NeoX, StarCoder 2, Phi-2), alone and after the stream's add, against f64:
/// rows far from zero mean (the centering matters), the weight's dtype apart from the stream's; a
/// bias missing or of another width refused with the op named.
#[test]
fn layer_norm_centers_scales_and_shifts() {
    if backend("layer_norm_centers_scales_and_shifts").is_none() {
        return;
    }
    let mut rng = Rng::new("layer_norm");
    for dt in FLOATS {
        for (t, h) in SEQ_LENS.into_iter().map(|t| (t, 768)).chain([(1, 4096), (3, 9000)]) {
            let x0: Vec<f64> = rng.values(t * h, 2.0, dt).iter().map(|v| round(dt, v + 3.0)).collect();
            let delta = rng.values(t * h, 1.0, dt);
            let wdt = if t % 2 == 0 { DType::F32 } else { dt };
            let (w, b) = (rng.values(h, 1.5, wdt), rng.values(h, 0.5, wdt));
            let (wt, bt) = (upload(wdt, &[h], &w), upload(wdt, &[h], &b));
            let what = format!("layer_norm {dt} (weights {wdt}) T={t} H={h}");
            let mut out = poisoned(dt, &[t, h]);
            be().layer_norm(&mut out, &upload(dt, &[t, h], &x0), &wt, &bt, EPS as f32).unwrap();
            let (exact, naive) = (ref_layer_norm(&x0, &w, &b, EPS, Rd::Exact), ref_layer_norm(&x0, &w, &b, EPS, Rd::Naive(dt)));
            assert_close(&what, dt, &download(&out), &exact, &naive);
            // After the stream's add: x holds the rounded sum, out its norm.
            let mut x = upload(dt, &[t, h], &x0);
            let mut out = poisoned(dt, &[t, h]);
            be().add_layer_norm(&mut out, &mut x, &upload(dt, &[t, h], &delta), &wt, &bt, EPS as f32).unwrap();
            let sum: Vec<f64> = x0.iter().zip(&delta).map(|(a, b)| a + b).collect();
            let sum_rounded: Vec<f64> = sum.iter().map(|&s| round(dt, s)).collect();
            assert_close(&format!("add_{what} x"), dt, &download(&x), &sum, &sum_rounded);
            let (exact, naive) = (ref_layer_norm(&sum, &w, &b, EPS, Rd::Exact), ref_layer_norm(&sum_rounded, &w, &b, EPS, Rd::Naive(dt)));
            assert_close(&format!("add_{what} out"), dt, &download(&out), &exact, &naive);
        }
    }
    let (x, w) = (upload(DType::F32, &[2, 64], &[1.0; 128]), upload(DType::F32, &[64], &[1.0; 64]));
    let mut out = poisoned(DType::F32, &[2, 64]);
    let e = be().layer_norm(&mut out, &x, &w, &upload(DType::F32, &[32], &[0.0; 32]), 1e-5).unwrap_err().to_string();
    assert!(e.contains("layer_norm") && e.contains("bias"), "{e}");
}

/// A mixture of experts' combine: `out[index[j]] += weight[j] * src[j]`, against f64, the rows no
/// index names untouched bit for bit; indices out of order, an empty src; a repeated index, one past
/// the rows, a weight missing or not finite refused with the op named.
#[test]
fn index_add_adds_weighted_rows_where_told() {
    if backend("index_add_adds_weighted_rows_where_told").is_none() {
        return;
    }
    let mut rng = Rng::new("index_add");
    for dt in FLOATS {
        for (t, h, index) in [(7, 576, vec![5u32, 0, 3, 6]), (3, 2048, vec![1]), (2, 64, vec![])] {
            let n = index.len();
            let (out0, src) = (rng.values(t * h, 1.0, dt), rng.values(n * h, 1.0, dt));
            let weight: Vec<f32> = (0..n).map(|_| (rng.uniform() as f32 + 1.0) / 2.0).collect();
            let mut out = upload(dt, &[t, h], &out0);
            be().index_add(&mut out, &upload(dt, &[n, h], &src), &index, &weight).unwrap();
            let got = download(&out);
            let reference = |rd: Rd| {
                let mut r = out0.clone();
                for (j, &i) in index.iter().enumerate() {
                    for c in 0..h {
                        let at = i as usize * h + c;
                        r[at] = rd.r(r[at] + rd.r(weight[j] as f64 * src[j * h + c]));
                    }
                }
                r
            };
            let what = format!("index_add {dt} [{t}, {h}] index {index:?}");
            assert_close(&what, dt, &got, &reference(Rd::Exact), &reference(Rd::Naive(dt)));
            for row in (0..t as u32).filter(|r| !index.contains(r)) {
                let r = row as usize * h..(row as usize + 1) * h;
                assert!(got[r.clone()].iter().zip(&out0[r]).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: row {row} changed");
            }
        }
    }
    let dt = DType::F32;
    let (mut out, src) = (upload(dt, &[4, 8], &[1.0; 32]), upload(dt, &[2, 8], &[1.0; 16]));
    for (index, weight, want) in [
        ([1u32, 1], [0.5f32, 0.5], "index 1 appears twice"),
        ([0, 4], [0.5, 0.5], "index 4 (row 1 of src) is outside out's 4 rows"),
        ([0, 1], [0.5, f32::NAN], "weight NaN (row 1 of src) is not finite"),
    ] {
        let e = be().index_add(&mut out, &src, &index, &weight).unwrap_err().to_string();
        assert!(e.contains("index_add") && e.contains(want), "{e}");
    }
    let e = be().index_add(&mut out, &src, &[0, 1], &[1.0]).unwrap_err().to_string();
    assert!(e.contains("1 weights for 2 indices"), "{e}");
}

/// A mixture of experts' routed MLPs in one op (`Moe`: Mixtral, Qwen 3 MoE, OLMoE...), the
/// router's choice included, against f64: each token's top k by `route`'s rule, each chosen
/// expert's gated MLP, their outputs weighted and summed in ascending expert order. At decode's few
/// tokens on the device, and past them (more pairs than experts and 16) routed on the host;
/// renormalized or not; SwiGLU and the GELUs; a width that is no multiple of a warp; a shared
/// expert's output added last, weighted by its gate's sigmoid (Qwen 2 MoE). A backend that declines
/// it (the CPU: the model routes on the host there) says so naming the op; a top k past the
/// experts, experts of another width, or a shared gate of another shape are refused naming the op.
#[test]
fn moe_routes_each_token_through_its_experts() {
    use highrise::core::ops::route;
    if backend("moe_routes_each_token_through_its_experts").is_none() {
        return;
    }
    let mut rng = Rng::new("moe");
    let small = |dt, dims: &[usize]| upload(dt, dims, &vec![0.5; dims.iter().product()]);
    let (x, logits) = (small(DType::F32, &[2, 8]), small(DType::F32, &[2, 4]));
    let (gate, down) = (small(DType::F32, &[4, 6, 8]), small(DType::F32, &[4, 8, 6]));
    let mut out = poisoned(DType::F32, &[2, 8]);
    if !be().supports(highrise::core::OpKind::Moe, DType::F32) {
        let e = be().moe(&mut out, &x, &logits, [&gate, &gate, &down], None, 2, true, GluAct::Silu).unwrap_err().to_string();
        assert!(e.contains("moe"), "{e}");
        println!("skipped: the {} backend declines moe (the model routes a mixture on the host there): {e}", be().name());
        return;
    }
    for (e, want) in [
        (be().moe(&mut out, &x, &logits, [&gate, &gate, &down], None, 5, true, GluAct::Silu).unwrap_err(), "top_k 5"),
        (be().moe(&mut out, &x, &logits, [&gate, &gate, &gate], None, 2, true, GluAct::Silu).unwrap_err(), "down"),
        (be().moe(&mut out, &x, &logits, [&gate, &gate, &down], Some([&x, &logits]), 2, true, GluAct::Silu).unwrap_err(), "shared_gate"),
    ] {
        let e = e.to_string();
        assert!(e.contains("moe") && e.contains(want), "{e}");
    }
    let act64 = |act: GluAct, g: f64| match act {
        GluAct::Silu => g / (1.0 + (-g).exp()),
        GluAct::GeluTanh => 0.5 * g * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh()),
        GluAct::GeluErf => 0.5 * g * (1.0 + libm::erf(g / std::f64::consts::SQRT_2)),
        GluAct::Relu => g.max(0.0),
        GluAct::Relu2 => g.max(0.0) * g.max(0.0),
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    // (tokens, experts, top k, hidden, expert width, renormalize, activation, a shared expert)
    let cases = [
        (1, 8, 2, 64, 96, true, GluAct::Silu, false),
        (3, 40, 4, 128, 64, false, GluAct::Silu, false),
        (2, 4, 2, 72, 40, true, GluAct::GeluTanh, false),
        (2, 8, 2, 64, 96, false, GluAct::Silu, true),
        (20, 8, 2, 64, 96, true, GluAct::Silu, false),
        (9, 4, 3, 64, 48, false, GluAct::GeluErf, false),
        (12, 4, 2, 64, 32, false, GluAct::Silu, true),
    ];
    for dt in FLOATS {
        for (t, e, k, h, i, renormalize, act, with_shared) in cases {
            let x = rng.values(t * h, 1.0, dt);
            let (gate, up, down) = (rng.values(e * i * h, 0.2, dt), rng.values(e * i * h, 0.2, dt), rng.values(e * h * i, 0.2, dt));
            // Each token's scores a shuffle of well-separated values: no near-ties for the two sides'
            // exponentials to order differently.
            let mut scores = Vec::with_capacity(t * e);
            for _ in 0..t {
                let mut row: Vec<f64> = (0..e).map(|j| round(dt, j as f64 * 0.3 - 2.0)).collect();
                for j in (1..e).rev() {
                    row.swap(j, ((rng.uniform() + 1.0) / 2.0 * (j + 1) as f64) as usize % (j + 1));
                }
                scores.extend(row);
            }
            let (shared, shared_gate) = (rng.values(t * h, 1.0, dt), rng.values(t, 3.0, dt));
            let shared_tensors = [upload(dt, &[t, h], &shared), upload(dt, &[t, 1], &shared_gate)];
            let mut out = poisoned(dt, &[t, h]);
            let tensors = [upload(dt, &[e, i, h], &gate), upload(dt, &[e, i, h], &up), upload(dt, &[e, h, i], &down)];
            let with = with_shared.then(|| [&shared_tensors[0], &shared_tensors[1]]);
            be().moe(&mut out, &upload(dt, &[t, h], &x), &upload(dt, &[t, e], &scores), [&tensors[0], &tensors[1], &tensors[2]], with, k, renormalize, act).unwrap();
            let mut chosen: Vec<Vec<(usize, f64)>> = vec![Vec::new(); t];
            let f: Vec<f32> = scores.iter().map(|&v| v as f32).collect();
            for (ex, (rows, ws)) in route(&f, e, k, renormalize).into_iter().enumerate() {
                for (r, w) in rows.into_iter().zip(ws) {
                    chosen[r as usize].push((ex, round(dt, w as f64)));
                }
            }
            let reference = |rd: Rd| {
                let mut out = vec![0.0; t * h];
                for (tok, experts) in chosen.iter().enumerate() {
                    let xt = &x[tok * h..(tok + 1) * h];
                    for &(ex, w) in experts {
                        let row = |m: &[f64], r: usize, n: usize| m[(ex * (m.len() / e / n) + r) * n..][..n].to_vec();
                        let a: Vec<f64> = (0..i)
                            .map(|r| rd.r(act64(act, rd.r(dot(xt, &row(&gate, r, h)))) * rd.r(dot(xt, &row(&up, r, h)))))
                            .collect();
                        for c in 0..h {
                            let y = rd.r(dot(&a, &row(&down, c, i)));
                            out[tok * h + c] = rd.r(out[tok * h + c] + rd.r(w * y));
                        }
                    }
                    if with_shared {
                        let w = round(dt, 1.0 / (1.0 + (-shared_gate[tok]).exp()));
                        for c in 0..h {
                            out[tok * h + c] = rd.r(out[tok * h + c] + rd.r(w * shared[tok * h + c]));
                        }
                    }
                }
                out
            };
            let what = format!("moe {dt} {t} tokens, top {k} of {e} experts [{h}, {i}] renormalize {renormalize} {act:?} shared {with_shared}");
            assert_close(&what, dt, &download(&out), &reference(Rd::Exact), &reference(Rd::Naive(dt)));
        }
    }
}

/// The logits' soft-cap (Gemma 2's final one), in place: cap tanh(x / cap), against f64, for logits
/// well inside the cap and far past it.
#[test]
fn softcap_bends_logits_toward_the_cap() {
    if backend("softcap_bends_logits_toward_the_cap").is_none() {
        return;
    }
    let mut rng = Rng::new("softcap");
    for dt in FLOATS {
        for (rows, v) in [(1, 49152), (3, 1000)] {
            let x = rng.values(rows * v, 100.0, dt);
            let mut t = upload(dt, &[rows, v], &x);
            be().softcap(&mut t, 30.0).unwrap();
            let reference = |rd: Rd| x.iter().map(|&x| rd.r(30.0 * (x / 30.0).tanh())).collect::<Vec<f64>>();
            let got = download(&t);
            assert!(got.iter().all(|g| g.abs() <= 30.0), "softcap {dt}: a value past the cap");
            assert_close(&format!("softcap {dt} [{rows}, {v}]"), dt, &got, &reference(Rd::Exact), &reference(Rd::Naive(dt)));
        }
    }
}

/// The attention's three projections in one op equal three `linear`s, bit for bit, with and without
/// biases, at decode's row counts (CUDA: one fused matrix-vector launch) and prefill's, and at row
/// counts the fused kernel does not take (q's not whole blocks of 8: three launches).
#[test]
fn qkv_linear_equals_three_linears() {
    if backend("qkv_linear_equals_three_linears").is_none() {
        return;
    }
    let mut rng = Rng::new("qkv_linear");
    for (h, n) in [(576, [576, 192, 192]), (64, [100, 36, 36])] {
        for t in [1, 3, 8, 9] {
            for dt in FLOATS {
                for bias in [false, true] {
                    let x = upload(dt, &[t, h], &rng.values(t * h, 1.0, dt));
                    let w = n.map(|r| upload(dt, &[r, h], &rng.values(r * h, 0.1, dt)));
                    let b = n.map(|r| upload(DType::F32, &[r], &rng.values(r, 0.5, DType::F32)));
                    let bs = [0, 1, 2].map(|i| bias.then_some(&b[i]));
                    let [mut q, mut k, mut v] = n.map(|r| poisoned(dt, &[t, r]));
                    be().qkv_linear([&mut q, &mut k, &mut v], &x, [&w[0], &w[1], &w[2]], bs).unwrap();
                    for (i, (name, fused)) in ["q", "k", "v"].iter().zip([&q, &k, &v]).enumerate() {
                        let mut one = poisoned(dt, &[t, n[i]]);
                        be().linear(&mut one, &x, &w[i], bs[i]).unwrap();
                        let (a, b) = (download(fused), download(&one));
                        assert!(
                            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "qkv_linear {dt} t {t} h {h} bias {bias}: {name} differs from its linear"
                        );
                    }
                }
            }
        }
    }
    // Weights of another dtype than x are refused (they would be the three linears' to convert).
    let x = upload(DType::BF16, &[1, 64], &[0.0; 64]);
    let (w, w32) = (upload(DType::BF16, &[64, 64], &[0.0; 4096]), upload(DType::F32, &[64, 64], &[0.0; 4096]));
    let [mut q, mut k, mut v] = [0; 3].map(|_| poisoned(DType::BF16, &[1, 64]));
    let err = be().qkv_linear([&mut q, &mut k, &mut v], &x, [&w, &w32, &w], [None; 3]).unwrap_err().to_string();
    assert!(err.contains("qkv_linear") && err.contains("wk"), "{err}");
}

/// A projection added into the stream (`Linear::accumulate`, the output and down projections where a
/// backend folds the norms) equals the projection stored and then added as `add_rms_norm` adds it,
/// bit for bit: at decode's row counts (CUDA's matrix-vector kernel adds it itself) and others
/// (cuBLAS into the workspace, then `add_*`), with and without a bias, a weight of another dtype.
#[test]
fn linear_add_equals_linear_then_the_streams_add() {
    if backend("linear_add_equals_linear_then_the_streams_add").is_none() {
        return;
    }
    let mut rng = Rng::new("linear_add");
    for (k, n) in [(576, 576), (64, 96)] {
        for t in [1, 3, 8, 9] {
            for dt in FLOATS {
                for (wdt, bias) in [(dt, false), (dt, true), (DType::F32, false)] {
                    let x = upload(dt, &[t, k], &rng.values(t * k, 1.0, dt));
                    let w = upload(wdt, &[n, k], &rng.values(n * k, 0.1, wdt));
                    let b = upload(dt, &[n], &rng.values(n, 0.5, dt));
                    let stream = rng.values(t * n, 2.0, dt);
                    let mut added = upload(dt, &[t, n], &stream);
                    be().linear_add(&mut added, &x, &w, bias.then_some(&b)).unwrap();
                    let mut product = poisoned(dt, &[t, n]);
                    be().linear(&mut product, &x, &w, bias.then_some(&b)).unwrap();
                    let (mut two_step, mut normed) = (upload(dt, &[t, n], &stream), poisoned(dt, &[t, n]));
                    be().add_rms_norm(&mut normed, &mut two_step, &product, &upload(dt, &[n], &vec![1.0; n]), EPS as f32).unwrap();
                    let (a, b) = (download(&added), download(&two_step));
                    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
                        panic!("linear_add {dt} w {wdt} t {t} [{n}, {k}] bias {bias}: element {i} is {}, the stored product added gives {}", a[i], b[i]);
                    }
                }
            }
        }
    }
}

/// `got` within two units of the dtype's last place of `want` (relative to each value plus the
/// tensor's rms): two computations of the same numbers whose sums may differ in order.
fn assert_near(what: &str, dt: DType, got: &[f64], want: &[f64]) {
    let ulp = match dt {
        DType::F32 => 1e-5,
        DType::F16 => 2.0 * 2f64.powi(-10),
        _ => 2.0 * 2f64.powi(-7),
    };
    let rms = (want.iter().map(|x| x * x).sum::<f64>() / want.len().max(1) as f64).sqrt();
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= ulp * (w.abs() + rms), "{what}: element {i} is {g}, expected {w}");
    }
}

/// The fused projections with a norm (`QkvLinear::norm`, `SwiGluLinear::norm`: a layer that reads
/// the stream itself) equal `rms_norm` and then the op without one: bit for bit on the CPU, and on
/// CUDA's matrix-vector kernels (each warp sums the squares in its own order) within two units of
/// the last place; at decode's row counts and others, with q/k/v biases, the widths of two models.
#[test]
fn fused_projections_read_the_streams_norm() {
    if backend("fused_projections_read_the_streams_norm").is_none() {
        return;
    }
    let mut rng = Rng::new("normed projections");
    for (h, n, i) in [(576, [576, 192, 192], 1536), (256, [256, 64, 64], 64)] {
        for t in [1, 3, 8, 9] {
            for dt in FLOATS {
                let x = upload(dt, &[t, h], &rng.values(t * h, 2.0, dt));
                let nw = upload(dt, &[h], &rng.values(h, 1.5, dt));
                let mut xn = poisoned(dt, &[t, h]);
                be().rms_norm(&mut xn, &x, &nw, EPS as f32).unwrap();
                let exact = !on_cuda() || dt == DType::F32;
                let check = |what: String, got: &Tensor, want: &Tensor| {
                    let (a, b) = (download(got), download(want));
                    if exact {
                        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: differs from rms_norm, then the op");
                    } else {
                        assert_near(&what, dt, &a, &b);
                    }
                };
                let w = n.map(|r| upload(dt, &[r, h], &rng.values(r * h, 0.1, dt)));
                let b = n.map(|r| upload(dt, &[r], &rng.values(r, 0.5, dt)));
                let bs = [0, 1, 2].map(|i| Some(&b[i]));
                let [mut q, mut k, mut v] = n.map(|r| poisoned(dt, &[t, r]));
                be().qkv_linear_normed([&mut q, &mut k, &mut v], &x, Some((&nw, EPS as f32)), [&w[0], &w[1], &w[2]], bs).unwrap();
                let [mut q2, mut k2, mut v2] = n.map(|r| poisoned(dt, &[t, r]));
                be().qkv_linear([&mut q2, &mut k2, &mut v2], &xn, [&w[0], &w[1], &w[2]], bs).unwrap();
                for (name, got, want) in [("q", &q, &q2), ("k", &k, &k2), ("v", &v, &v2)] {
                    check(format!("qkv_linear with a norm {dt} t {t} h {h}: {name}"), got, want);
                }
                let (wg, wu) = (upload(dt, &[i, h], &rng.values(i * h, 0.1, dt)), upload(dt, &[i, h], &rng.values(i * h, 0.1, dt)));
                let (mut act, mut act2) = (poisoned(dt, &[t, i]), poisoned(dt, &[t, i]));
                be().swiglu_linear_normed(&mut act, &x, Some((&nw, EPS as f32)), &wg, &wu).unwrap();
                be().swiglu_linear(&mut act2, &xn, &wg, &wu).unwrap();
                check(format!("swiglu_linear with a norm {dt} t {t} [{i}, {h}]"), &act, &act2);
            }
        }
    }
    // A norm of the wrong width is refused, naming the op and the tensor.
    let x = upload(DType::F32, &[1, 64], &[0.0; 64]);
    let (w, short) = (upload(DType::F32, &[96, 64], &[0.0; 96 * 64]), upload(DType::F32, &[63], &[0.0; 63]));
    let mut out = poisoned(DType::F32, &[1, 96]);
    let err = be().swiglu_linear_normed(&mut out, &x, Some((&short, 1e-5)), &w, &w).unwrap_err().to_string();
    assert!(err.contains("swiglu_linear") && err.contains("norm"), "{err}");
}

/// RoPE on q and k and the cache write in one op equal `rope`, `rope` and `kv_write`, bit for bit:
/// the rotated q and k, and every byte of both caches (poisoned before, so a slot written that
/// should not be, or one missed, shows), at grouped-query ratios, both head dims, tokens at
/// scattered positions and slots.
#[test]
fn rope_kv_write_equals_its_three_ops() {
    if backend("rope_kv_write_equals_its_three_ops").is_none() {
        return;
    }
    let mut rng = Rng::new("rope_kv_write");
    let config = RopeConfig::new(10000.0);
    for dt in FLOATS {
        for (hq, hkv) in GQA {
            for (d, config) in [64, 128].into_iter().flat_map(|d| [(d, config), (d, longrope(d)), (d, partial_longrope(d))]) {
                for t in [1, 5, 40] {
                    let (block_size, blocks) = (16, 8);
                    let positions: Vec<u32> = (0..t as u32).map(|i| 3 + i * 7).collect();
                    let slots: Vec<u32> = slots_in(&shuffled_blocks(&mut rng, blocks), blocks * block_size, block_size)
                        .into_iter()
                        .step_by(3)
                        .take(t)
                        .collect();
                    let q = rng.values(t * hq * d, 1.0, dt);
                    let (k, v) = (rng.values(t * hkv * d, 1.0, dt), rng.values(t * hkv * d, 1.0, dt));
                    let run = |fused: bool| {
                        let (mut qt, mut kt, vt) = (upload(dt, &[t, hq, d], &q), upload(dt, &[t, hkv, d], &k), upload(dt, &[t, hkv, d], &v));
                        let mut kc = poisoned(dt, &[blocks, hkv, block_size, d]);
                        let mut vc = poisoned(dt, &[blocks, hkv, block_size, d]);
                        if fused {
                            be().rope_kv_write(&mut qt, &mut kt, &vt, &mut kc, &mut vc, &positions, &slots, config).unwrap();
                        } else {
                            be().rope(&mut qt, &positions, config).unwrap();
                            be().rope(&mut kt, &positions, config).unwrap();
                            be().kv_write(&mut kc, &mut vc, &kt, &vt, &slots).unwrap();
                        }
                        [qt, kt, kc, vc].map(|x| download(&x).into_iter().map(f64::to_bits).collect::<Vec<_>>())
                    };
                    let (fused, three) = (run(true), run(false));
                    for (name, (a, b)) in ["q", "k", "k_cache", "v_cache"].iter().zip(fused.iter().zip(&three)) {
                        assert!(a == b, "rope_kv_write {dt} hq {hq} hkv {hkv} d {d} t {t}: {name} differs from rope, rope, kv_write");
                    }
                }
            }
        }
    }
    // A slot outside the cache is refused, naming the op.
    let (mut q, mut k, v) = (poisoned(DType::F32, &[1, 2, 64]), poisoned(DType::F32, &[1, 1, 64]), poisoned(DType::F32, &[1, 1, 64]));
    let (mut kc, mut vc) = (poisoned(DType::F32, &[2, 1, 16, 64]), poisoned(DType::F32, &[2, 1, 16, 64]));
    let err = be().rope_kv_write(&mut q, &mut k, &v, &mut kc, &mut vc, &[0], &[32], config).unwrap_err().to_string();
    assert!(err.contains("rope_kv_write") && err.contains("slot 32"), "{err}");
}

/// The MLP's projections and gate in one op equal the two `linear`s and `swiglu` it replaces, bit
/// for bit (each projection rounded to the dtype before the gate, as those store it), and the gate
/// the f64 reference within the usual bound; at decode's row counts (CUDA's fused matrix-vector
/// kernel) and prefill's (its GEMMs).
#[test]
fn swiglu_linear_equals_its_three_ops() {
    if backend("swiglu_linear_equals_its_three_ops").is_none() {
        return;
    }
    if !be().supports(highrise::core::OpKind::SwiGluLinear, DType::F32) {
        return println!("skipped: swiglu_linear: the {} backend runs the three ops instead", be().name());
    }
    let mut rng = Rng::new("swiglu_linear");
    for (h, i) in [(576, 1536), (64, 96)] {
        for t in [1, 3, 8, 9, 64] {
            for dt in FLOATS {
                let x = rng.values(t * h, 1.0, dt);
                let (wg, wu) = (rng.values(i * h, 0.1, dt), rng.values(i * h, 0.1, dt));
                let (xt, gt, ut) = (upload(dt, &[t, h], &x), upload(dt, &[i, h], &wg), upload(dt, &[i, h], &wu));
                let mut fused = poisoned(dt, &[t, i]);
                be().swiglu_linear(&mut fused, &xt, &gt, &ut).unwrap();
                let (mut g, mut u, mut three) = (poisoned(dt, &[t, i]), poisoned(dt, &[t, i]), poisoned(dt, &[t, i]));
                be().linear(&mut g, &xt, &gt, None).unwrap();
                be().linear(&mut u, &xt, &ut, None).unwrap();
                be().swiglu(&mut three, &g, &u).unwrap();
                let what = format!("swiglu_linear {dt} x [{t}, {h}] w [{i}, {h}]");
                let got = download(&fused);
                assert!(got.iter().zip(download(&three)).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: differs from linear, linear, swiglu");
                // The gate, against f64 on the projections as rounded (each projection is held to its
                // bound by linear_matches_reference; one f64 chain through both roundings would
                // flip a rounding now and then and call that the gate's error).
                let (gd, ud) = (download(&g), download(&u));
                assert_close(&what, dt, &got, &ref_swiglu(&gd, &ud, Rd::Exact), &ref_swiglu(&gd, &ud, Rd::Naive(dt)));
            }
        }
    }
    // A weight of the wrong shape is refused, naming the op and the shapes.
    let x = upload(DType::F32, &[1, 64], &[0.0; 64]);
    let w = upload(DType::F32, &[96, 64], &[0.0; 96 * 64]);
    let short = upload(DType::F32, &[95, 64], &[0.0; 95 * 64]);
    let mut out = poisoned(DType::F32, &[1, 96]);
    let err = be().swiglu_linear(&mut out, &x, &w, &short).unwrap_err().to_string();
    assert!(err.contains("swiglu_linear") && err.contains("w_up"), "{err}");
}

/// `Backend::copy` (through `Tensor::copy_from`) moves bytes inside the backend's memory; a copy
/// between tensors of different sizes is refused.
#[test]
fn copy_moves_bytes_within_the_backend() {
    if backend("copy_moves_bytes_within_the_backend").is_none() {
        return;
    }
    let mut rng = Rng::new("copy");
    for dt in FLOATS {
        let v = rng.values(1000, 1.0, dt);
        let src = upload(dt, &[10, 100], &v);
        let mut dst = poisoned(dt, &[10, 100]);
        dst.copy_from(&src).unwrap();
        assert_eq!(download(&dst), v, "{dt}");
        let mut short = poisoned(dt, &[999]);
        assert!(short.copy_from(&src).is_err());
    }
}
