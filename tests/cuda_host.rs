//! The CUDA backend's host side, on a machine without a GPU: every op, a random-weight Llama's
//! prefill and the engine's batched decoding run through `CudaBackend` over the recording driver
//! (`highrise_cuda::recording`), which checks each kernel launch against the kernel's own PTX
//! (compiled with NVRTC, as on a GPU) and the memory its op was given, and refuses what would fault
//! or compute the wrong thing on a GPU. Two tests put back the mistakes the first GPU run found, in
//! private copies of a launch, and see them refused.
//!
//! Needs libnvrtc (the `nvidia-cuda-nvrtc` wheel .ci/run installs); without it every test prints
//! `skipped: ...`.

mod common;

use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use common::{shuffled_blocks, slots_in, Rng};
use highrise::core::ops::{GluAct, PagedSeq, SampleParams, Scores};
use highrise::core::{Backend, DType, GraphStats, Tensor};
use highrise::engine::{generate, Engine, EngineConfig, GenerateParams, Request, SamplingParams};
use highrise::model::{Llama, Logits, ModelConfig, Tokenizer};
use highrise_cuda::driver::{Driver, Launch, Region};
use highrise_cuda::recording::{Recorded, RecordingDriver};
use highrise_cuda::CudaBackend;

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The recording driver (kernels compiled for Hopper, an H200's 132 SMs) and the CUDA backend over
/// it, shared by the tests of this binary; `None` after printing why where NVRTC is missing.
type Recording = (Arc<RecordingDriver>, Arc<dyn Backend>);

fn recording(test: &str) -> Option<Recording> {
    static ONE: OnceLock<Result<Recording, String>> = OnceLock::new();
    let made = ONE.get_or_init(|| {
        let driver = Arc::new(RecordingDriver::new("sm_90a", 132).map_err(|e| e.to_string())?);
        // mma.sync's prefill kernel, as every GPU but Hopper runs it (Hopper's default, wgmma, has
        // its own test below).
        let mut cuda = CudaBackend::with_driver(driver.clone());
        cuda.set_flash_wgmma(None).map_err(|e| e.to_string())?;
        let backend: Arc<dyn Backend> = Arc::new(cuda);
        Ok((driver, backend))
    });
    match made {
        Ok(pair) => Some(pair.clone()),
        Err(e) => {
            println!("skipped: {test}: no NVRTC to compile the kernels with ({e})");
            None
        }
    }
}

/// `v` as a tensor of `dtype` on `b`.
fn up(b: &Arc<dyn Backend>, dtype: DType, dims: &[usize], v: &[f64]) -> Tensor {
    let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Tensor::from_f32(b, dtype, dims, &f).unwrap()
}

/// An output tensor on `b` (its contents never matter here: no kernel runs).
fn empty(b: &Arc<dyn Backend>, dtype: DType, dims: &[usize]) -> Tensor {
    Tensor::empty(b, dtype, dims).unwrap()
}

/// The tests share one driver and its record: each takes it whole while it runs.
fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every op with the shapes of tests/ops.rs, on every dtype, through each attention kernel.
#[test]
fn every_op_launches_what_its_kernels_expect() {
    let Some((driver, b)) = recording("every op") else { return };
    let _guard = exclusive();
    driver.take_recorded();
    let before = driver.summary();
    let mut rng = Rng::new("cuda host ops");
    for dt in FLOATS {
        for t in [1, 7, 64, 300] {
            // The residual stream.
            let (v, h) = (512, 256);
            let table = up(&b, dt, &[v, h], &rng.values(v * h, 1.0, dt));
            let ids: Vec<u32> = (0..t).map(|_| rng.below(v) as u32).collect();
            let mut x = empty(&b, dt, &[t, h]);
            b.embedding(&mut x, &table, &ids).unwrap();
            let w = up(&b, dt, &[h], &rng.values(h, 1.0, dt));
            let mut out = empty(&b, dt, &[t, h]);
            b.rms_norm(&mut out, &x, &w, 1e-5).unwrap();
            let delta = up(&b, dt, &[t, h], &rng.values(t * h, 1.0, dt));
            b.add_rms_norm(&mut out, &mut x, &delta, &w, 1e-5).unwrap();
            // A mixture's combine: every other row of x, weighted, into out.
            let rows: Vec<u32> = (0..t as u32).rev().step_by(2).collect();
            let src = up(&b, dt, &[rows.len(), h], &rng.values(rows.len() * h, 1.0, dt));
            b.index_add(&mut out, &src, &rows, &vec![0.5; rows.len()]).unwrap();
            // LayerNorm (GPT-2's, Pythia's), alone and after the stream's add, its weights f32.
            let (lw, lb) = (up(&b, DType::F32, &[h], &rng.values(h, 1.0, DType::F32)), up(&b, DType::F32, &[h], &rng.values(h, 1.0, DType::F32)));
            b.layer_norm(&mut out, &x, &lw, &lb, 1e-5).unwrap();
            b.add_layer_norm(&mut out, &mut x, &delta, &lw, &lb, 1e-5).unwrap();
            // Projections: same dtype, mixed, with and without a bias; where the GEMV kernel pays
            // and wherever it fits (HIGHRISE_CUDA_GEMV=own).
            for gemv in ["auto", "own"] {
                std::env::set_var("HIGHRISE_CUDA_GEMV", gemv);
                for wdt in FLOATS {
                    for bias in [false, true] {
                        let (k, n) = (h, 96);
                        let wt = up(&b, wdt, &[n, k], &rng.values(n * k, 0.1, wdt));
                        let bt = up(&b, dt, &[n], &rng.values(n, 0.5, dt));
                        let mut y = empty(&b, dt, &[t, n]);
                        b.linear(&mut y, &x, &wt, bias.then_some(&bt)).unwrap();
                        // Added into what y holds (the stream's add: gemv_add, or add after cuBLAS).
                        b.linear_add(&mut y, &x, &wt, bias.then_some(&bt)).unwrap();
                    }
                }
                // The fused projections reading x's norm (gemv_qkv_norm, gemv_glu_norm; else
                // rms_norm into the workspace, then the projections).
                let ws = [96, 32, 32].map(|n| up(&b, dt, &[n, h], &rng.values(n * h, 0.1, dt)));
                let [mut q, mut k, mut v] = [96, 32, 32].map(|n| empty(&b, dt, &[t, n]));
                let bias = up(&b, dt, &[96], &rng.values(96, 0.5, dt));
                b.qkv_linear_normed([&mut q, &mut k, &mut v], &x, Some((&w, 1e-5)), [&ws[0], &ws[1], &ws[2]], [Some(&bias), None, None]).unwrap();
                let mut act = empty(&b, dt, &[t, 96]);
                b.swiglu_linear_normed(&mut act, &x, Some((&w, 1e-5)), &ws[0], &ws[0]).unwrap();
            }
            std::env::remove_var("HIGHRISE_CUDA_GEMV");
            // The MLP's gate and the logits' choices.
            let (g, u) = (up(&b, dt, &[t, h], &rng.values(t * h, 1.0, dt)), up(&b, dt, &[t, h], &rng.values(t * h, 1.0, dt)));
            let mut m = empty(&b, dt, &[t, h]);
            b.swiglu(&mut m, &g, &u).unwrap();
            // An MLP without a gate (GELU, ReLU), and the exact GELU gated.
            b.activation(&mut m, &g, GluAct::GeluErf).unwrap();
            b.activation(&mut m, &g, GluAct::Relu).unwrap();
            b.activation(&mut m, &g, GluAct::Relu2).unwrap();
            b.glu(&mut m, &g, &u, GluAct::GeluErf).unwrap();
            let logits = up(&b, dt, &[t, v], &rng.values(t * v, 4.0, dt));
            let (mut idx, mut lp) = (Tensor::empty(&b, DType::U32, &[t]).unwrap(), Tensor::empty(&b, DType::F32, &[t]).unwrap());
            b.argmax(&mut idx, &mut lp, &logits).unwrap();
            let params: Vec<SampleParams> = (0..t)
                .map(|i| SampleParams { temperature: 0.8, top_k: 40, top_p: 0.9, min_p: 0.05, uniform: (i as f64 + 0.5) / t as f64 })
                .collect();
            b.sample(&mut idx, &mut lp, &logits, &params).unwrap();
            // A mixture's routed experts, each token's top 4 of 32: on the device at 1 and 7
            // tokens, routed on the host (the scores read) at 64 and 300.
            let (e, i) = (32, 64);
            let experts = [[e, i, h], [e, i, h], [e, h, i]].map(|d| up(&b, dt, &d, &rng.values(d.iter().product(), 0.1, dt)));
            let scores = up(&b, dt, &[t, e], &rng.values(t * e, 2.0, dt));
            let (shared, shared_gate) = (up(&b, dt, &[t, h], &rng.values(t * h, 1.0, dt)), up(&b, dt, &[t, 1], &rng.values(t, 1.0, dt)));
            let with = (t != 64).then(|| [&shared, &shared_gate]);
            b.moe(&mut out, &x, &scores, [&experts[0], &experts[1], &experts[2]], with, 4, t % 2 == 1, GluAct::Silu).unwrap();
        }
    }
    for choice in ["auto", "split", "per-head"] {
        std::env::set_var("HIGHRISE_CUDA_ATTENTION", choice);
        for dt in FLOATS {
            for (hq, hkv) in [(4, 4), (9, 3), (8, 2), (16, 2)] {
                for d in [64, 128] {
                    attention_calls(&b, &mut rng, dt, hq, hkv, d);
                }
            }
        }
    }
    std::env::remove_var("HIGHRISE_CUDA_ATTENTION");
    let after = driver.summary();
    assert!(after.faults.len() == before.faults.len(), "faults: {:#?}", &after.faults[before.faults.len()..]);
    let launched = after.launches - before.launches;
    println!("checked {launched} launches and {} GEMMs of every op", after.gemms - before.gemms);
    let kernels: std::collections::BTreeSet<String> = driver.take_recorded().into_iter().map(|r| r.kernel).collect();
    // Every kernel family, with every attention kernel among them.
    for family in [
        "embedding", "rms_norm", "add_rms_norm", "add_bias", "add_", "to_f32", "from_f32", "rope", "kv_write", "attn_split_d64",
        "attn_split_d128", "attn_group_d64", "attn_group_d128", "attn_combine", "flash_attn_d64", "flash_attn_d128", "decode_attn_d64",
        "decode_attn_d128", "gemv1", "gemv8", "gemv_add1", "gemv_add8", "gemv_qkv_norm1", "gemv_glu_norm1", "swiglu",
        "argmax", "sample", "index_add", "layer_norm", "add_layer_norm", "glu_act", "moe_route", "moe_glu", "moe_down", "moe_combine",
        "moe_gemv_glu", "moe_gemv_down",
    ] {
        assert!(kernels.iter().any(|k| k.starts_with(family)), "no {family} kernel was launched: {kernels:?}");
    }
    assert!(launched > 500, "only {launched} launches");
}

/// RoPE, prefill attention (causal and not, several prompts), and the paged cache: written with
/// kv_write into shuffled blocks, then read by decoding sequences, prompt chunks after a prefix, and
/// chunks only (CUDA's tensor-core kernel through the table).
fn attention_calls(b: &Arc<dyn Backend>, rng: &mut Rng, dt: DType, hq: usize, hkv: usize, d: usize) {
    let lens = [7usize, 1, 100, 3];
    let t: usize = lens.iter().sum();
    let mut q = up(b, dt, &[t, hq, d], &rng.values(t * hq * d, 1.0, dt));
    let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
    b.rope(&mut q, &positions, highrise::core::ops::RopeConfig::new(10000.0)).unwrap();
    let (k, v) = (up(b, dt, &[t, hkv, d], &rng.values(t * hkv * d, 1.0, dt)), up(b, dt, &[t, hkv, d], &rng.values(t * hkv * d, 1.0, dt)));
    let lens32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
    for causal in [true, false] {
        let mut out = empty(b, dt, &[t, hq, d]);
        b.attention_with(&mut out, &q, &k, &v, &lens32, Scores::scaled(0.125), causal).unwrap();
    }
    for batch in [vec![(1usize, 1usize), (37, 1), (300, 7), (64, 64)], vec![(300, 7), (64, 64), (230, 100)], vec![(1000, 1), (17, 1)]] {
        paged(b, rng, dt, hq, hkv, d, &batch);
    }
}

/// A paged-attention call over `batch` (context, queries) as tests/ops.rs makes it: K/V written
/// with kv_write into shuffled blocks, then read through the table.
fn paged(b: &Arc<dyn Backend>, rng: &mut Rng, dt: DType, hq: usize, hkv: usize, d: usize, batch: &[(usize, usize)]) {
    let block_size = 16;
    let needed: usize = batch.iter().map(|(c, _)| c.div_ceil(block_size)).sum();
    let num_blocks = needed + 5;
    let mut free = shuffled_blocks(rng, num_blocks);
    let mut k_cache = empty(b, dt, &[num_blocks, hkv, block_size, d]);
    let mut v_cache = empty(b, dt, &[num_blocks, hkv, block_size, d]);
    let (mut table, mut seqs) = (Vec::new(), Vec::new());
    for &(ctx, q_len) in batch {
        let blocks: Vec<u32> = free.drain(..ctx.div_ceil(block_size)).collect();
        let slots = slots_in(&blocks, ctx, block_size);
        let (k, v) = (up(b, dt, &[ctx, hkv, d], &rng.values(ctx * hkv * d, 1.0, dt)), up(b, dt, &[ctx, hkv, d], &rng.values(ctx * hkv * d, 1.0, dt)));
        b.kv_write(&mut k_cache, &mut v_cache, &k, &v, &slots).unwrap();
        seqs.push(PagedSeq { q_len: q_len as u32, context_len: ctx as u32, blocks_start: table.len() as u32 });
        table.extend(blocks);
    }
    let t: usize = batch.iter().map(|(_, q)| q).sum();
    let q = up(b, dt, &[t, hq, d], &rng.values(t * hq * d, 1.0, dt));
    let mut out = empty(b, dt, &[t, hq, d]);
    b.paged_attention(&mut out, &q, &k_cache, &v_cache, &seqs, &table, 1.0 / (d as f32).sqrt()).unwrap();
}

/// A tiny Llama (head dims 64 and 128) with random weights: whole-prompt prefill (the flash kernel's
/// tiles past 64 rows), then the engine: prompts cut into chunks (the later chunks through the block
/// table), a shared prefix, decoding at batch 6, greedy steps (argmax) and drawn ones (sample).
#[test]
fn random_llama_and_engine_launch_what_the_kernels_expect() {
    let Some((driver, b)) = recording("random llama") else { return };
    let _guard = exclusive();
    driver.take_recorded();
    let before = driver.summary();
    let shapes = [
        ModelConfig::shape("tiny").unwrap(),
        serde_json::from_value::<ModelConfig>(serde_json::json!({
            "vocab_size": 300, "hidden_size": 512, "intermediate_size": 768, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 2048,
        }))
        .unwrap(),
    ];
    for config in shapes {
        for dtype in FLOATS {
            let model = Llama::random(config.clone(), b.clone(), dtype, 7).unwrap();
            let vocab = model.config.vocab_size;
            let prompt: Vec<u32> = (0..150).map(|i| (i * 13 + 5) % vocab as u32).collect();
            model.prefill(&prompt, Logits::All).unwrap();
            let tok = Tokenizer::numbered(vocab).unwrap();
            let config = EngineConfig { num_blocks: 64, block_size: 16, max_batch_tokens: 96, max_running: 8 };
            let mut engine = Engine::new(&model, &tok, config).unwrap();
            // A long prompt alone: its chunks after the first read the cache through the table.
            let long: Vec<u32> = (0..300).map(|i| (i * 11 + 3) % vocab as u32).collect();
            let params = GenerateParams { max_tokens: 4, ignore_eos: true, ..Default::default() };
            engine.submit(Request { prompt: long, params, logprobs: false, top_logprobs: 0 }).unwrap();
            assert_eq!(engine.run_to_completion().unwrap().len(), 1);
            for i in 0..6 {
                // Every request starts with the same 64 tokens: later ones find them in the cache.
                let mut p = prompt[..64].to_vec();
                p.extend((0..10 + 20 * i).map(|j| (j * 7 + i) as u32 % vocab as u32));
                let sampling = SamplingParams { temperature: if i % 2 == 0 { 0.0 } else { 0.9 }, seed: i as u64, ..Default::default() };
                let params = GenerateParams { max_tokens: 12, ignore_eos: true, sampling, ..Default::default() };
                engine.submit(Request { prompt: p, params, logprobs: true, top_logprobs: 0 }).unwrap();
            }
            let done = engine.run_to_completion().unwrap();
            assert_eq!(done.len(), 6);
            assert!(done.iter().all(|(_, g)| g.ids.len() == 12), "every request ran to its 12 tokens");
        }
    }
    let after = driver.summary();
    assert!(after.faults.len() == before.faults.len(), "faults: {:#?}", &after.faults[before.faults.len()..]);
    let recorded = driver.take_recorded();
    let launched = after.launches - before.launches;
    println!("checked {launched} launches and {} GEMMs of random Llamas and the engine", after.gemms - before.gemms);
    let seen = |k: &str| recorded.iter().any(|r| r.kernel.starts_with(k) && r.op == "paged_attention");
    assert!(seen("flash_attn_d64") && seen("flash_attn_d128"), "prompt chunks ran through the table on tensor cores");
    assert!(seen("attn_group_d64") && seen("attn_group_d128"), "f32 decoding ran on the grouped split kernel");
    assert!(seen("decode_attn_d64") && seen("decode_attn_d128"), "f16/bf16 decoding ran on the tensor-core decode kernel");
    assert!(recorded.iter().any(|r| r.kernel.starts_with("sample_")), "drawn tokens were chosen on the device");
    assert!(recorded.iter().any(|r| r.kernel.starts_with("argmax_")), "greedy tokens were chosen on the device");
    let batch = recorded.iter().filter(|r| r.kernel.starts_with("attn_group")).map(|r| r.grid.0).max().unwrap_or(0);
    assert!(batch >= 2, "decode ran at batch {batch}");
    assert!(launched > 1000, "only {launched} launches");
    let s = after;
    println!(
        "cuda host check, all tests so far: {} launches and {} GEMMs, {} byte ranges checked, {} kernels, ops: {:?}",
        s.launches,
        s.gemms,
        s.accesses,
        s.kernels.len(),
        s.ops
    );
}

/// What one batch-1 decode step of a bf16 Llama puts on the device (kernel launches, and GEMMs:
/// none left at batch 1, the projections being GEMV launches): the count issue #20's fusions and
/// CUDA graphs work against (the H200 spent ~7.8 us per operation of Llama-3-8B's ~450 a token).
/// Printed for the record; bounded so that a change adding operations is seen.
#[test]
fn a_decode_step_launches_few_kernels_per_layer() {
    let Some((driver, b)) = recording("launches per decode step") else { return };
    let _guard = exclusive();
    let config = ModelConfig::shape("tiny").unwrap();
    let layers = config.num_hidden_layers;
    let model = Llama::random(config, b.clone(), DType::BF16, 7).unwrap();
    let tok = Tokenizer::numbered(model.config.vocab_size).unwrap();
    let prompt: Vec<u32> = (0..20).collect();
    let count = |steps: usize| {
        let before = driver.summary();
        let params = GenerateParams { max_tokens: steps, ignore_eos: true, ..Default::default() };
        generate(&model, &tok, &prompt, &params, &mut |_| {}).unwrap();
        let after = driver.summary();
        (after.launches - before.launches, after.gemms - before.gemms)
    };
    let (one, nine) = (count(1), count(9));
    let (launches, gemms) = ((nine.0 - one.0) / 8, (nine.1 - one.1) / 8);
    let recorded = driver.take_recorded();
    let step: Vec<&str> = recorded[recorded.len() - launches..].iter().map(|r| r.kernel.as_str()).collect();
    println!("a bf16 decode step, {layers} layers: {launches} launches and {gemms} GEMMs; the last step: {step:?}");
    assert_eq!(gemms, 0, "batch-1 projections run on the GEMV kernel (rows of w this short: ops::gemv_pays)");
    // Contexts grew by a token a step; decode attention's grid did not (what a graph replay needs).
    let grids: std::collections::BTreeSet<_> = recorded.iter().filter(|r| r.kernel.starts_with("decode_attn")).map(|r| r.grid).collect();
    assert_eq!(grids.len(), 1, "decode_attn grids across steps: {grids:?}");
    // Per layer: q/k/v of the stream's norm (one gemv_qkv_norm), RoPE on both and the cache write
    // (one rope_kv_write), attention (one decode_attn, its slices merged by its last block), o added
    // into the stream (gemv_add), gate+up+SwiGLU of its norm (one gemv_glu_norm), down added into
    // it (gemv_add: rows this short run on the GEMV) (6: the norms folded into the projections,
    // Backend::folds_norms); around them: embedding, the final norm, unembedding, the choice (4:
    // no gathering of the last rows, a decode step's rows being each its sequence's last).
    for fused in ["gemv_qkv_norm", "rope_kv_write", "gemv_glu_norm", "gemv_add"] {
        assert!(step.iter().any(|k| k.starts_with(fused)), "{fused}: not in the step");
    }
    assert!(!step.iter().any(|k| k.starts_with("attn_combine")), "decode_attn merges its own slices");
    assert!(!step.iter().any(|k| k.starts_with("add_rms_norm")), "the norms fold into the projections");
    assert!(launches <= 6 * layers + 4, "{launches} launches per step for {layers} layers");
    // Norm weights in f32 (a GGUF file's, where a 16-bit dtype does not hold them exactly: the
    // loader narrows those it does), which the projections' kernels do not read: such layers keep
    // add_rms_norm between them (folded, each would take an rms_norm launch more).
    let mut gguf_like = Llama::random(ModelConfig::shape("tiny").unwrap(), b.clone(), DType::BF16, 7).unwrap();
    for layer in &mut gguf_like.layers {
        for norm in [&mut layer.attn_norm, &mut layer.mlp_norm].into_iter().flatten() {
            let (dims, values) = (norm.dims().to_vec(), norm.to_f32().unwrap());
            *norm = Tensor::from_f32(&b, DType::F32, &dims, &values).unwrap();
        }
    }
    driver.take_recorded();
    let params = GenerateParams { max_tokens: 2, ignore_eos: true, ..Default::default() };
    generate(&gguf_like, &tok, &prompt, &params, &mut |_| {}).unwrap();
    let kernels: Vec<String> = driver.take_recorded().into_iter().map(|r| r.kernel).collect();
    assert!(kernels.iter().any(|k| k.starts_with("add_rms_norm")) && !kernels.iter().any(|k| k.contains("_norm1_")), "{kernels:?}");
}

/// Decode steps as CUDA graphs (#20): the engine's steps, recorded, captured once per batch shape
/// and replayed, put on the device exactly the launches of the same steps run op by op (each
/// checked again, against that step's own memory, as the graph is launched); a read in the middle of
/// a step runs what was recorded first.
#[test]
fn decode_steps_are_captured_once_and_replayed() {
    let Some((driver, b)) = recording("graphs") else { return };
    let _guard = exclusive();
    let model = Llama::random(ModelConfig::shape("tiny").unwrap(), b.clone(), DType::BF16, 7).unwrap();
    let tok = Tokenizer::numbered(model.config.vocab_size).unwrap();
    let launches = |graphs: bool| {
        driver.take_recorded();
        let config = EngineConfig { num_blocks: 16, block_size: 16, max_batch_tokens: 64, max_running: 4 };
        let mut engine = Engine::new(&model, &tok, config).unwrap();
        engine.set_graphs(graphs);
        for i in 0..2u32 {
            let params = GenerateParams { max_tokens: 9, ignore_eos: true, ..Default::default() };
            engine.submit(Request { prompt: (i..20 + i).collect(), params, logprobs: false, top_logprobs: 0 }).unwrap();
        }
        let before = b.graph_stats();
        assert_eq!(engine.run_to_completion().unwrap().len(), 2);
        let after = b.graph_stats();
        let kernels: Vec<_> = driver.take_recorded().into_iter().map(|r| (r.kernel, r.grid, r.block, r.shared_bytes)).collect();
        (kernels, after.captured - before.captured, after.launched - before.launched, after.eager - before.eager)
    };
    let faults = driver.summary().faults.len();
    let (eager, ..) = launches(false);
    let (graphed, captured, launched, op_by_op) = launches(true);
    println!("2 sequences x 9 tokens: {captured} graphs captured, {launched} launched, {op_by_op} steps op by op; {} launches", graphed.len());
    assert_eq!(driver.summary().faults[faults..], [] as [String; 0], "launches refused");
    assert_eq!(graphed, eager, "the graphs' launches are the op-by-op steps' launches, in order");
    // The first token of each comes from the prefill step; 8 decode steps at batch 2 follow.
    assert_eq!((launched, op_by_op), (8, 0));
    assert!(captured <= 2, "{captured} captures for 8 steps of one shape");

    // A read in the middle of a step: what was recorded runs first, the step goes on op by op.
    let x = up(&b, DType::BF16, &[2, 64], &[0.5; 128]);
    let w = up(&b, DType::BF16, &[64], &[1.0; 64]);
    let mut out = empty(&b, DType::BF16, &[2, 64]);
    let (stats, n) = (b.graph_stats(), driver.summary().launches);
    b.graph_begin(12345).unwrap();
    b.rms_norm(&mut out, &x, &w, 1e-5).unwrap();
    assert_eq!(driver.summary().launches, n, "recorded, not launched, inside a step");
    out.to_f32().unwrap();
    assert_eq!(driver.summary().launches, n + 1, "the read ran the recorded launch first");
    b.rms_norm(&mut out, &x, &w, 1e-5).unwrap();
    assert_eq!(driver.summary().launches, n + 2, "after the read the step runs op by op");
    b.graph_end().unwrap();
    let now = b.graph_stats();
    assert_eq!((now.captured, now.launched, now.eager), (stats.captured, stats.launched, stats.eager + 1));

    // A step whose host arrays overflow the metadata buffer: what was recorded runs op by op, the op
    // that did not fit uploads as usual (its launch checked against its own tensors), and the next
    // step finds a buffer grown to fit and runs as a graph.
    let faults = driver.summary().faults.len();
    let table = up(&b, DType::BF16, &[512, 64], &vec![0.25; 512 * 64]);
    let ids: Vec<u32> = (0..40_000).map(|i| i % 512).collect();
    let mut rows = empty(&b, DType::BF16, &[ids.len(), 64]);
    for round in 0..3 {
        let stats = b.graph_stats();
        b.graph_begin(777).unwrap();
        b.rms_norm(&mut out, &x, &w, 1e-5).unwrap();
        b.embedding(&mut rows, &table, &ids).unwrap();
        b.graph_end().unwrap();
        let now = b.graph_stats();
        let ran = (now.captured - stats.captured, now.launched - stats.launched, now.eager - stats.eager);
        assert_eq!(ran, [(0, 0, 1), (1, 1, 0), (0, 1, 0)][round], "round {round}: (captured, launched, op by op)");
    }
    assert_eq!(driver.summary().faults[faults..], [] as [String; 0], "launches refused");
}

/// A server's sequences cross block boundaries at different steps, so the step's block table (each
/// sequence's blocks laid end to end) grows every few steps: the graph of the batch's shape is
/// still replayed, not captured anew each time the table grows (the host arrays staged after it,
/// such as the sampling settings, keep their places in the metadata buffer, so no recorded
/// launch's parameters move).
#[test]
fn a_growing_block_table_does_not_recapture_the_step() {
    // Prompts of 5, 6 and 7 tokens with 4-token blocks: across 12 decode steps some sequence takes
    // a new block at 9 of them.
    let config = EngineConfig { num_blocks: 32, block_size: 4, max_batch_tokens: 64, max_running: 3 };
    let greedy = SamplingParams::greedy();
    let Some((captured, launched, op_by_op)) = engine_graphs("graphs with growing tables", config, &greedy, (0..3).map(|i| ((i..5 + 2 * i).collect(), 13))) else { return };
    println!("3 sequences x 13 tokens, 4-token blocks: {captured} graphs captured, {launched} launched, {op_by_op} op by op");
    assert_eq!((launched, op_by_op), (12, 0));
    assert_eq!(captured, 1, "the block table's growth made the step's launches differ");
    // Sixteen sampled sequences (their draws' settings staged after the first layer's attention):
    // over 39 decode steps the table grows from 32 blocks to 192 (128 bytes to 768), across two
    // 256-byte boundaries (3 captures when the settings lay after it).
    let config = EngineConfig { num_blocks: 256, block_size: 4, max_batch_tokens: 512, max_running: 16 };
    let sampled = SamplingParams { temperature: 0.8, top_p: 0.9, ..SamplingParams::greedy() };
    let Some((captured, launched, op_by_op)) = engine_graphs("sampled graphs, growing tables", config, &sampled, (0..16).map(|i| ((i..5 + i).collect(), 40))) else { return };
    println!("16 sampled sequences x 40 tokens, 4-token blocks: {captured} graphs captured, {launched} launched, {op_by_op} op by op");
    assert_eq!((launched, op_by_op), (39, 0));
    assert_eq!(captured, 1, "the block table's growth moved the sampling settings, and the step was captured anew");
}

/// A batch that shrinks a request at a time (seven finishing one step apart, as a server's do)
/// replays the graph of its bucket (`Backend::graph_batch`: 1, 2, 4, then multiples of 8), padded
/// up to it, where each batch size had been a graph of its own: 7, 6 and 5 sequences share the
/// graph of 8, 4 and 3 that of 4. Every launch is checked as before.
#[test]
fn a_shrinking_batch_replays_its_buckets_graph() {
    let config = EngineConfig { num_blocks: 32, block_size: 16, max_batch_tokens: 256, max_running: 8 };
    let Some((captured, launched, op_by_op)) = engine_graphs("graphs of a shrinking batch", config, &SamplingParams::greedy(), (0..7).map(|i| ((i..9 + i).collect(), 2 + i as usize))) else { return };
    println!("7 sequences finishing a step apart: {captured} graphs captured, {launched} launched, {op_by_op} op by op");
    // After the prefill, 7 decode steps at 7, 6, ... 1 sequences: buckets 8, 8, 8, 4, 4, 2, 1.
    assert_eq!((launched, op_by_op), (7, 0));
    assert_eq!(captured, 4, "a graph per bucket, not per batch size");
}

/// `Engine::warm_up` captures the decode step's graph of every batch size and sampling mode before
/// any request, so that a server's traffic replays graphs and never captures one. Eight requests of
/// 100-token prompts at once (a prefill of 800 tokens, whose projections' workspace outgrows the
/// backend's first), then sixty arriving at random (prompts of 5 to 64 tokens, 10 to 79 tokens
/// each, greedy and sampled, up to 16 at once: a random batch size at every step, prompts chunked
/// in beside decoding sequences) capture graphs for the batch sizes they reach without a warm-up,
/// and none after it: not when a long prompt grows the projections' workspace (graph steps keep one
/// of their own), nor when the block table grows (the warm-up's table, as long as the cache, sized
/// the buffer tables are staged in; here 20 KB, so that buffer grows during the warm-up, dropping
/// its first graph, which the warm-up captures again). Each run on a backend of its own, fresh;
/// every launch checked.
#[test]
fn a_warmed_up_engine_serves_without_capturing_a_graph() {
    let config = EngineConfig { num_blocks: 5000, block_size: 4, max_batch_tokens: 1024, max_running: 16 };
    let serve = |warm: bool| -> Option<(usize, GraphStats, GraphStats)> {
        let (driver, _) = recording(if warm { "serving after a warm-up" } else { "serving cold" })?;
        let _guard = exclusive();
        let mut cuda = CudaBackend::with_driver(driver.clone());
        cuda.set_flash_wgmma(None).unwrap();
        let b: Arc<dyn Backend> = Arc::new(cuda);
        let faults = driver.summary().faults.len();
        let model = Llama::random(ModelConfig::shape("tiny").unwrap(), b.clone(), DType::BF16, 7).unwrap();
        let tok = Tokenizer::numbered(model.config.vocab_size).unwrap();
        let mut engine = Engine::new(&model, &tok, config).unwrap();
        engine.set_graphs(true);
        let start = b.graph_stats();
        let steps = if warm { engine.warm_up(|_, _| ()).unwrap().steps } else { 0 };
        let warmed = b.graph_stats();
        // The same traffic in both runs.
        let mut state = 12345;
        let mut below = |n: u64| (highrise::core::rand::splitmix64(&mut state) % n) as usize;
        for i in 0..8 {
            let params = GenerateParams { max_tokens: 20, ignore_eos: true, ..Default::default() };
            engine.submit(Request { prompt: (i..100 + i).collect(), params, logprobs: false, top_logprobs: 0 }).unwrap();
        }
        let mut submitted = 0;
        while submitted < 60 || !engine.is_idle() {
            if submitted < 60 && below(3) == 0 {
                let prompt = (0..5 + below(60) as u32).collect();
                let sampled = SamplingParams { temperature: 0.8, ..SamplingParams::greedy() };
                let sampling = if below(2) == 0 { sampled } else { SamplingParams::greedy() };
                let params = GenerateParams { max_tokens: 10 + below(70), ignore_eos: true, sampling, ..Default::default() };
                engine.submit(Request { prompt, params, logprobs: false, top_logprobs: 0 }).unwrap();
                submitted += 1;
            }
            engine.step().unwrap();
        }
        let served = b.graph_stats();
        driver.take_recorded();
        assert_eq!(driver.summary().faults[faults..], [] as [String; 0], "launches refused");
        let minus = |a: GraphStats, b: GraphStats| GraphStats { captured: a.captured - b.captured, launched: a.launched - b.launched, eager: a.eager - b.eager };
        Some((steps, minus(warmed, start), minus(served, warmed)))
    };
    let Some((_, _, cold)) = serve(false) else { return };
    let Some((steps, warm_up, warm)) = serve(true) else { return };
    println!("cold: {cold:?}; warm-up: {steps} steps, {warm_up:?}; then {warm:?}");
    // Batch sizes 16, 8, 4, 2, 1, greedy and sampled, the largest sampled step first once more
    // (its first graph dropped as the metadata buffer grew).
    assert_eq!(steps, 11);
    assert_eq!((warm_up.captured, warm_up.launched, warm_up.eager), (11, 11, 0));
    assert!(cold.captured >= 4, "the cold run captured graphs for the batch sizes it reached: {cold:?}");
    assert_eq!((warm.launched, warm.eager), (cold.launched, 0), "the same decode steps, all as graphs");
    assert_eq!(warm.captured, 0, "after the warm-up, the traffic captured graphs: {warm:?}");
}

/// The engine, graphs on, running `requests` (prompt, tokens to generate) of a random tiny bf16
/// Llama to the end on the host checker, every launch accepted, each request `sampling` so: (graphs
/// captured, launched, steps op by op) over the run; `None` where there is no checker (said why).
fn engine_graphs(test: &str, config: EngineConfig, sampling: &SamplingParams, requests: impl Iterator<Item = (Vec<u32>, usize)>) -> Option<(u64, u64, u64)> {
    let (driver, b) = recording(test)?;
    let _guard = exclusive();
    let model = Llama::random(ModelConfig::shape("tiny").unwrap(), b.clone(), DType::BF16, 7).unwrap();
    let tok = Tokenizer::numbered(model.config.vocab_size).unwrap();
    driver.take_recorded();
    let faults = driver.summary().faults.len();
    let mut engine = Engine::new(&model, &tok, config).unwrap();
    engine.set_graphs(true);
    let mut n = 0;
    for (prompt, max_tokens) in requests {
        let params = GenerateParams { max_tokens, ignore_eos: true, sampling: sampling.clone(), ..Default::default() };
        engine.submit(Request { prompt, params, logprobs: false, top_logprobs: 0 }).unwrap();
        n += 1;
    }
    let before = b.graph_stats();
    assert_eq!(engine.run_to_completion().unwrap().len(), n);
    let after = b.graph_stats();
    driver.take_recorded();
    assert_eq!(driver.summary().faults[faults..], [] as [String; 0], "launches refused");
    Some((after.captured - before.captured, after.launched - before.launched, after.eager - before.eager))
}

/// Graphs captured on one thread while another copies, reads and writes on the same backend: the
/// other thread's work waits for the capture instead of landing inside it (the recording driver
/// refuses work from another thread while a graph is being captured).
#[test]
fn another_threads_work_never_lands_inside_a_capture() {
    let Some((driver, b)) = recording("two threads") else { return };
    let _guard = exclusive();
    let faults = driver.summary().faults.len();
    let x = up(&b, DType::BF16, &[4, 64], &[0.5; 256]);
    let w = up(&b, DType::BF16, &[64], &[1.0; 64]);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let (mut a, mut c) = (empty(&b, DType::BF16, &[4, 64]), empty(&b, DType::BF16, &[4, 64]));
            let mut i = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                c.copy_from(&a).unwrap();
                if i % 16 == 0 {
                    a.write_f32(&[0.25; 256]).unwrap();
                    c.to_f32().unwrap();
                }
                i += 1;
            }
        });
        let mut out = empty(&b, DType::BF16, &[4, 64]);
        for i in 0..1000 {
            // A new eps each step: work unlike the graph kept, so every step is captured.
            b.graph_begin(5).unwrap();
            for _ in 0..4 {
                b.rms_norm(&mut out, &x, &w, 1e-5 + i as f32 * 1e-9).unwrap();
            }
            b.graph_end().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(driver.summary().faults[faults..], [] as [String; 0]);
}

/// The prefill kernel's tile shape is a compile-time constant: launches keep the shape the kernels
/// were compiled with even when HIGHRISE_FLASH_SHAPE says another one afterwards.
#[test]
fn flash_launches_keep_the_compiled_tile_shape() {
    let Some((driver, b)) = recording("flash shape") else { return };
    let _guard = exclusive();
    // Launches an earlier test left recorded are not this test's.
    driver.take_recorded();
    let mut rng = Rng::new("cuda host flash shape");
    // What the recording driver's kernels were compiled with (sm_90a's shapes, the environment unset).
    let compiled = highrise_cuda::flash::shapes("sm_90a").unwrap();
    std::env::set_var("HIGHRISE_FLASH_SHAPE", "d64=8x1x32,d128=2x2x64");
    let before = driver.summary();
    prefill_at_both_head_dims(&b, &mut rng);
    std::env::remove_var("HIGHRISE_FLASH_SHAPE");
    let after = driver.summary();
    assert_eq!(after.faults.len(), before.faults.len(), "{:?}", &after.faults[before.faults.len()..]);
    let rec = driver.take_recorded();
    let flash: Vec<_> = rec.iter().filter(|r| r.kernel.starts_with("flash_attn")).collect();
    assert_eq!(flash.len(), 2);
    for (r, (d, shape)) in flash.iter().zip(&compiled) {
        assert_eq!((r.block.0, r.shared_bytes), (shape.threads(), shape.shared_bytes(*d)), "d{d}: launched with the compiled {shape}");
    }
}

/// One bf16 prompt of 300 tokens through prefill attention at head dims 64 and 128, in that order.
fn prefill_at_both_head_dims(b: &Arc<dyn Backend>, rng: &mut Rng) {
    for d in [64, 128] {
        let (t, hq, hkv) = (300usize, 4usize, 2usize);
        let q = up(b, DType::BF16, &[t, hq, d], &rng.values(t * hq * d, 1.0, DType::BF16));
        let kv = up(b, DType::BF16, &[t, hkv, d], &rng.values(t * hkv * d, 1.0, DType::BF16));
        let mut out = empty(b, DType::BF16, &[t, hq, d]);
        b.attention(&mut out, &q, &kv, &kv, &[t as u32], 0.125).unwrap();
    }
}

/// `prefill_at_both_head_dims` on `cuda` (over `driver`): its two prefill attention launches, d64's
/// then d128's, none faulted.
fn prefill_launches(driver: &RecordingDriver, cuda: CudaBackend, seed: &str) -> Vec<Recorded> {
    let b: Arc<dyn Backend> = Arc::new(cuda);
    let before = driver.summary();
    driver.take_recorded();
    prefill_at_both_head_dims(&b, &mut Rng::new(seed));
    let after = driver.summary();
    assert_eq!(after.faults.len(), before.faults.len(), "{:?}", &after.faults[before.faults.len()..]);
    let rec = driver.take_recorded();
    let names: Vec<String> = rec.iter().map(|r| r.kernel.clone()).collect();
    let prefill: Vec<Recorded> = rec.into_iter().filter(|r| r.kernel.starts_with("flash_attn")).collect();
    assert_eq!(prefill.len(), 2, "{names:?}");
    prefill
}

/// On Hopper prefill runs by default on the pipelined wgmma kernel (`flash_attn_wgp_*`), in the
/// geometry the H200 sweep chose (flash::TUNED_WG: 3 warpgroups at both head dims), launched with
/// the threads and shared memory that geometry compiles to.
#[test]
fn hopper_prefills_on_wgmma_in_the_tuned_geometry() {
    use highrise_cuda::flash::{self, Wg};
    let Some((driver, _)) = recording("hopper prefill") else { return };
    let _guard = exclusive();
    if std::env::var_os("HIGHRISE_FLASH_KERNEL").is_some() || std::env::var_os("HIGHRISE_FLASH_WG_SHAPE").is_some() {
        return println!("skipped: HIGHRISE_FLASH_KERNEL or HIGHRISE_FLASH_WG_SHAPE is set; this test is of the defaults");
    }
    // A backend of its own over the shared driver, with the defaults the engine gets.
    let prefill = prefill_launches(&driver, CudaBackend::with_driver(driver.clone()), "cuda host hopper prefill");
    for (r, d) in prefill.iter().zip([64usize, 128]) {
        let shape = flash::shape_of(flash::Family::Wgmma, "sm_90a", d).unwrap();
        assert!(r.kernel.starts_with(&format!("flash_attn_wgp_d{d}")), "d{d}: {}", r.kernel);
        assert_eq!(shape.warps, 12, "d{d}: three warpgroups, as tuned");
        let (_, threads, shared) = Wg::Pipe.launch(&[(d, shape)], &[], d).unwrap();
        assert_eq!((r.block.0, r.shared_bytes), (threads, shared), "d{d}: {}", flash::wg_label(shape));
        assert_eq!(threads, shape.threads());
    }
}

/// The warp-specialized Hopper kernel (`flash_attn_ws_*`, HIGHRISE_FLASH_KERNEL=ws) goes through the
/// host checker as its geometry compiles: 384 threads (a producer and two consumer warpgroups, the
/// default at both head dims), tiles of 128 query rows, Q and every K/V stage in shared memory, contiguous K and V by tensor
/// maps of their own.
#[test]
fn hopper_prefills_on_the_warp_specialized_kernel_as_compiled() {
    use highrise_cuda::flash::{self, Wg};
    let Some((driver, _)) = recording("warp-specialized prefill") else { return };
    let _guard = exclusive();
    let mut cuda = CudaBackend::with_driver(driver.clone());
    cuda.set_flash_wgmma(Some(Wg::Spec)).unwrap();
    let prefill = prefill_launches(&driver, cuda, "cuda host ws prefill");
    let shapes = flash::ws_shapes().unwrap();
    for (r, d) in prefill.iter().zip([64usize, 128]) {
        let (tile, threads, shared) = Wg::Spec.launch(&[], &shapes, d).unwrap();
        assert!(r.kernel.starts_with(&format!("flash_attn_ws_d{d}")), "d{d}: {}", r.kernel);
        // 300 query rows: tiles of at most 64 rows a consumer (three of 128 by default), one block
        // each per query head.
        assert_eq!((r.grid, r.block.0, r.shared_bytes), ((300u32.div_ceil(tile.rows()), 4, 1), threads, shared), "d{d}");
        assert_eq!(threads, 128 + 2 * tile.rows(), "d{d}: a producer warpgroup and a consumer per 64 rows");
        // Contiguous K and V: read by TMA, through tensor maps (parameters 12 and 13) the checker
        // held to them.
        assert!(r.args[13].iter().any(|&b| b != 0) && r.args[14].iter().any(|&b| b != 0), "d{d}: tensor maps passed");
    }
    // With K and V apart (and alive): V's map where K's belongs (and K's for V's) is refused by
    // name; so is one map without the other.
    let mut cuda = CudaBackend::with_driver(driver.clone());
    cuda.set_flash_wgmma(Some(Wg::Spec)).unwrap();
    let b: Arc<dyn Backend> = Arc::new(cuda);
    let mut rng = Rng::new("cuda host ws maps");
    let (t, hq, hkv, d) = (200usize, 4usize, 2usize, 128usize);
    let q = up(&b, DType::BF16, &[t, hq, d], &rng.values(t * hq * d, 1.0, DType::BF16));
    let k = up(&b, DType::BF16, &[t, hkv, d], &rng.values(t * hkv * d, 1.0, DType::BF16));
    let v = up(&b, DType::BF16, &[t, hkv, d], &rng.values(t * hkv * d, 1.0, DType::BF16));
    let mut out = empty(&b, DType::BF16, &[t, hq, d]);
    driver.take_recorded();
    b.attention(&mut out, &q, &k, &v, &[t as u32], 0.125).unwrap();
    let rec = driver.take_recorded().into_iter().find(|r| r.kernel.starts_with("flash_attn_ws")).expect("launched");
    let mut swapped = rec.args.clone();
    swapped.swap(13, 14);
    let err = relaunch(&driver, &rec, &swapped).unwrap_err().to_string();
    assert!(err.contains("is not k's as the kernel reads it"), "{err}");
    let mut one = rec.args.clone();
    one[14] = vec![0; 8];
    let err = relaunch(&driver, &rec, &one).unwrap_err().to_string();
    assert!(err.contains("one tensor map of K and V but not the other"), "{err}");
    relaunch(&driver, &rec, &rec.args).expect("as recorded, it passes again");
}

/// Re-launches `rec` through the driver with its arguments as given (each a byte vector), under
/// the regions of the op that last ran.
fn relaunch(driver: &RecordingDriver, rec: &Recorded, args: &[Vec<u8>]) -> highrise::core::Result<()> {
    let params: Vec<*mut c_void> = args.iter().map(|a| a.as_ptr() as *mut c_void).collect();
    // SAFETY: each parameter points at a byte vector of the PTX parameter's size, alive here.
    unsafe { driver.launch(&Launch { kernel: &rec.kernel, grid: rec.grid, block: rec.block, shared_bytes: rec.shared_bytes, params: &params }) }
}

/// The first GPU run's first bug: `launch` handed each kernel the address of a reference to its
/// argument instead of the argument's. The same argument list, built that way, is refused; built
/// as the backend builds it, accepted.
#[test]
fn host_addresses_passed_as_arguments_are_refused() {
    let Some((driver, _)) = recording("host addresses") else { return };
    let _guard = exclusive();
    let n = 4096u64;
    // SAFETY: recording-driver memory, freed below.
    let bufs: Vec<u64> = (0..3).map(|_| unsafe { driver.malloc(n as usize * 4) }.unwrap()).collect();
    let regions = ["out", "gate", "up"]
        .iter()
        .zip(&bufs)
        .map(|(name, &ptr)| Region { name: name.to_string(), ptr, bytes: n as usize * 4, tensor: Some((DType::F32, vec![n as usize])) })
        .collect();
    driver.begin_op("swiglu", regions);
    let (out, gate, up) = (bufs[0], bufs[1], bufs[2]);
    let launch = |params: &[*mut c_void]| {
        // SAFETY: the parameters point at live values (or, in the mistake's copy, at live references).
        unsafe { driver.launch(&Launch { kernel: "swiglu_f32", grid: (16, 1, 1), block: (256, 1, 1), shared_bytes: 0, params }) }
    };

    // The mistake, privately: a blanket impl over Copy types also covers `&dyn Arg`, and method
    // resolution picks it for `a.param()` on an `&&dyn Arg`.
    trait Arg {
        fn param(&self) -> *mut c_void;
    }
    impl<T: Copy> Arg for T {
        fn param(&self) -> *mut c_void {
            self as *const T as *mut c_void
        }
    }
    let args: [&dyn Arg; 4] = [&out, &gate, &up, &n];
    #[allow(clippy::needless_borrow)]
    let wrong: Vec<*mut c_void> = args.iter().map(|a| a.param()).collect();
    let err = launch(&wrong).expect_err("host addresses must be refused").to_string();
    println!("refused as it should be: {err}");
    assert!(err.contains("parameter 0") && err.contains("no live device allocation"), "{err}");

    let right: Vec<*mut c_void> = args.iter().map(|a| (**a).param()).collect();
    launch(&right).expect("the values themselves are accepted");

    // And a count one past the tensors: the bytes the kernel would touch leave them.
    let past = n + 1;
    let args: [&dyn Arg; 4] = [&out, &gate, &up, &past];
    let err = launch(&args.iter().map(|a| (**a).param()).collect::<Vec<_>>()).expect_err("must be refused").to_string();
    println!("refused as it should be: {err}");
    assert!(err.contains("may touch bytes 0..16388 of out (16384 bytes)"), "{err}");
    // SAFETY: allocated above, not used again.
    unsafe { bufs.iter().for_each(|&p| driver.free(p)) };
}

/// The first GPU run's second bug: paged attention took the cache's kv_heads from its
/// second-to-last axis, which in [blocks, kv_heads, block_size, D] is block_size. The launches the
/// backend makes carry kv_heads and block_size from the right axes; a copy of each with kv_heads
/// taken from the wrong one is refused, for the split kernels (decode) and the tensor-core kernel
/// (prompt chunks through the table) alike.
#[test]
fn paged_kv_heads_from_the_wrong_axis_are_refused() {
    let Some((driver, b)) = recording("paged kv heads") else { return };
    let _guard = exclusive();
    let mut rng = Rng::new("cuda host paged kv heads");
    // Llama-3-8B's 32 query heads over 8 KV heads: 16 (the block size) divides 32 too, so only
    // the shapes can tell the wrong kv_heads apart.
    let (hq, hkv, d, block_size) = (32u32, 8u32, 64u32, 16u32);
    // (kernel family, dtype, batch): decoding sequences take decode_attn on tensor cores (f16/bf16)
    // or attn_group (f32); prompt chunks alone, flash_attn.
    let decoding = vec![(40usize, 1usize), (300, 1)];
    for (family, dt, batch) in [
        ("attn_group", DType::F32, decoding.clone()),
        ("decode_attn", DType::BF16, decoding),
        ("flash_attn", DType::BF16, vec![(300, 7), (64, 64)]),
    ] {
        driver.take_recorded();
        paged(&b, &mut rng, dt, hq as usize, hkv as usize, d as usize, &batch);
        let recorded = driver.take_recorded();
        let rec = recorded.iter().find(|r| r.kernel.starts_with(family)).unwrap_or_else(|| panic!("no {family} launch: {recorded:?}"));
        // (block_size, hq, hkv) are arguments 7, 8, 9 of attn_group and 6, 7, 8 of the others.
        let at = if family == "attn_group" { 7 } else { 6 };
        assert_eq!((rec.u32(at), rec.u32(at + 1), rec.u32(at + 2)), (block_size, hq, hkv), "{family}: block_size, hq, kv_heads");
        let per_kv_head = family != "flash_attn";
        assert_eq!(rec.grid.1, if per_kv_head { hkv } else { hq }, "{family}: a block per {}", if per_kv_head { "kv head" } else { "query head" });
        relaunch(&driver, rec, &rec.args).expect("the launch as the backend made it passes again");

        // The mistake: kv_heads read from dims[len - 2] of the cache, i.e. its block_size.
        let mut wrong = rec.args.clone();
        wrong[at + 2] = block_size.to_le_bytes().to_vec();
        let mut bad = rec.clone();
        if per_kv_head {
            bad.grid.1 = block_size; // their grid is one block per kv head
        }
        let err = relaunch(&driver, &bad, &wrong).expect_err("kv_heads = block_size must be refused").to_string();
        println!("{family}: refused as it should be: {err}");
        assert!(err.contains("kv"), "{err}");
    }
}

/// Continuous batching mixes a request's prompt chunk with the running decodes in one step: on
/// tensor cores (f16/bf16) its decoding sequences take the decode kernel and its chunks the prefill
/// kernel through the table, one launch each over their own rows (the split kernels, one query row
/// a block, once took the whole step: a prompt's attention at a few TFLOP/s); f32 keeps them.
#[test]
fn a_mixed_step_runs_decodes_and_prompt_chunks_on_tensor_cores() {
    let Some((driver, b)) = recording("mixed paged step") else { return };
    let _guard = exclusive();
    let mut rng = Rng::new("cuda host mixed step");
    let before = driver.summary();
    let batch = [(1usize, 1usize), (300, 7), (37, 1), (64, 64), (1000, 2)];
    for dt in [DType::BF16, DType::F16, DType::F32] {
        driver.take_recorded();
        paged(&b, &mut rng, dt, 32, 8, 128, &batch);
        let kernels: Vec<(String, (u32, u32, u32))> =
            driver.take_recorded().into_iter().filter(|r| r.op == "paged_attention").map(|r| (r.kernel, r.grid)).collect();
        let named = |k: &str| kernels.iter().filter(|(n, _)| n.starts_with(k)).collect::<Vec<_>>();
        if dt == DType::F32 {
            assert!(named("decode_attn").is_empty() && named("flash_attn").is_empty(), "{dt}: {kernels:?}");
            continue;
        }
        // Groups of 4 query heads: up to 4 new tokens fit the decode kernel's 16 rows.
        let (decode, flash) = (named("decode_attn"), named("flash_attn"));
        assert_eq!(decode.len(), 1, "{dt}: {kernels:?}");
        assert_eq!(decode[0].1 .0, 3, "{dt}: a block row per decoding sequence (3 of them): {kernels:?}");
        assert_eq!(flash.len(), 1, "{dt}: {kernels:?}");
        assert_eq!(kernels.len(), 2, "{dt}: nothing else (no split kernels, no merge of their own): {kernels:?}");
    }
    let after = driver.summary();
    assert!(after.faults.len() == before.faults.len(), "faults: {:#?}", &after.faults[before.faults.len()..]);
}

/// The default model (SmolLM2's GGUF: Q4_1 projections, its norm weights f32 converted from a bf16
/// checkpoint) loaded in bf16 for CUDA: the loader stores those norms in bf16 (every value held
/// exactly), so its batch-1 decode folds them into the projections: `_norm1_` kernels, no
/// `add_rms_norm`, in its 30 layers.
#[test]
fn the_default_models_decode_folds_its_norms() {
    let Some((driver, b)) = recording("default model folds its norms") else { return };
    let Some(path) = common::default_model() else {
        return println!("skipped: the default model's folded norms: it could not be fetched");
    };
    let _guard = exclusive();
    let source = highrise::model::Source::open(&path).unwrap();
    let opts = highrise::model::LoadOptions { activations: DType::BF16, ..Default::default() };
    let model = Llama::load(&source, b.clone(), opts).unwrap();
    assert_eq!(model.layers[0].attn_norm.as_ref().unwrap().dtype(), DType::BF16);
    let tok = source.tokenizer().unwrap();
    let prompt: Vec<u32> = (1..20).collect();
    let before = driver.summary();
    driver.take_recorded();
    let params = GenerateParams { max_tokens: 3, ignore_eos: true, ..Default::default() };
    generate(&model, &tok, &prompt, &params, &mut |_| {}).unwrap();
    let after = driver.summary();
    assert!(after.faults.len() == before.faults.len(), "faults: {:#?}", &after.faults[before.faults.len()..]);
    let kernels: Vec<String> = driver.take_recorded().into_iter().map(|r| r.kernel).collect();
    let decode = &kernels[kernels.iter().rposition(|k| k.starts_with("embedding")).unwrap()..];
    assert!(decode.iter().any(|k| k.starts_with("gemv_qkv_norm1")) && decode.iter().any(|k| k.starts_with("gemv_glu_norm1")), "{decode:?}");
    assert!(!decode.iter().any(|k| k.starts_with("add_rms_norm")), "{decode:?}");
}

/// What a backend answers besides running ops crosses the plugin ABI too: the CUDA plugin (the
/// library `highrise --backend cuda` loads, here on its emulated device) folds a decode step's
/// norms into its projections where `CudaBackend` itself does, and not an f32 pass's. Before ABI 11
/// `folds_norms` did not cross: through the plugin every layer ran unfolded. Runs in a process of
/// its own, where the variable that asks the plugin for an emulated device is set.
#[test]
fn a_plugins_answers_are_its_backends() {
    const NAME: &str = "a_plugins_answers_are_its_backends";
    if std::env::var_os("HIGHRISE_CUDA_EMULATE").is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
            .env("HIGHRISE_CUDA_EMULATE", "sm_90a")
            .output()
            .unwrap();
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && log.contains("1 passed"), "{log}");
        if let Some(line) = log.lines().find(|l| l.contains("skipped")) {
            println!("{line}");
        }
        return;
    }
    let path = highrise::core::plugin::find_backend("cuda").expect("cargo builds libhighrise_cuda before the tests");
    let plugin = match highrise::core::plugin::Plugin::open(&path).and_then(|p| p.create()) {
        Ok(b) => b,
        // Without NVRTC or a C++ compiler there is no device to emulate; anything else is a failure.
        Err(e) if e.to_string().contains("no C++ compiler") || e.to_string().contains("nvrtc") => {
            return println!("skipped: no emulated CUDA device for the plugin ({e})")
        }
        Err(e) => panic!("the CUDA plugin: {e}"),
    };
    let direct = CudaBackend::with_driver(Arc::new(highrise_cuda::driver::NullDriver::default()));
    let mut folded = 0;
    for (rows, hidden, dtype) in [(1, 4096, DType::BF16), (1, 576, DType::F16), (2, 4096, DType::BF16), (1, 4096, DType::F32), (64, 4096, DType::BF16)] {
        let own = direct.folds_norms(rows, hidden, dtype);
        assert_eq!(plugin.folds_norms(rows, hidden, dtype), own, "{rows} rows of {hidden} {dtype:?}");
        folded += own as usize;
    }
    assert!(folded > 0 && folded < 5, "the cases hold both answers ({folded} folded)");
}


