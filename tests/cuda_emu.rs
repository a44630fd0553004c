//! The CUDA backend, host code and kernels, on a device emulated on the CPU: every op test of
//! tests/ops.rs (against the f64 references, f16/bf16 at most twice a naive same-dtype error) runs
//! through `CudaBackend` over `RecordingDriver::executing`, which checks each launch against the
//! kernels' PTX and then runs the kernels built as host code (kernels/emu/simt.hpp: a fiber per
//! thread; mma.sync, ldmatrix, cp.async and shuffles as the PTX ISA defines them) and the GEMMs on the
//! CPU. What a GPU would find wrong in how the host drives the kernels (tiles, slices, block tables,
//! shapes) or in the kernels' arithmetic shows up here first. Needs NVRTC and a C++20 compiler; says
//! `skipped` otherwise.

mod common;

#[path = "ops.rs"]
mod ops;

use common::*;
use highrise::core::DType;

/// A random-weight Llama on the emulated device and on the CPU backend, same weights: the prompt's
/// logits (prefill: flash_attn; the GEMMs done on the CPU) and 24 greedy steps through the engine's
/// paged cache (decode_attn and gemv for bf16, the split kernels for f32) agree, in f32 and bf16.
#[test]
fn random_llama_on_the_emulated_device_matches_the_cpu() {
    let Some(dev) = backend("random llama on the emulated device") else { return };
    random_llama_matches_cpu(&dev, 24, &[DType::F32, DType::BF16]);
}

/// The same for Gemma 2's layout (#21): scaled embeddings, post-norms, GeGLU, soft-capped scores
/// (the split kernels, which take them) and logits, and a 16-token window on layer 0 beside the
/// 37-token prompt and the steps after it.
#[test]
fn random_gemma2_on_the_emulated_device_matches_the_cpu() {
    let Some(dev) = backend("random gemma 2 on the emulated device") else { return };
    random_model_matches_cpu(&dev, "tiny-gemma2", 8, &[DType::F32, DType::BF16]);
}

/// The other families' layouts: Gemma 3's (1 + w) norms of each head's q and k and RoPE per layer
/// (base 10000 on the windowed layer 0, 1e6 scaled by 8 on layer 1: each launch uploads its own
/// frequencies), SmolLM3's layer without RoPE (its K/V written by kv_write alone), OLMo 2's stream
/// read unnormed with norms on what joins it and q/k normed across all heads. OLMo 2's greedy steps
/// in f32: this random model's top two logits lie within bf16's rounding of each other (the CPU's
/// own bf16 and f32 runs part at step 2).
#[test]
fn random_gemma3_smollm3_and_olmo2_on_the_emulated_device_match_the_cpu() {
    // On the device the tests share, another test's graph step may take in this test's ops (by
    // design: `graph`); see `a_mixed_attention_op_inside_a_graph_step_runs_as_at_once`.
    let Some(dev) = backend("random gemma 3, smollm3 and olmo 2 on the emulated device") else { return };
    for (shape, greedy) in [("tiny-gemma3", DType::BF16), ("tiny-smollm3", DType::BF16), ("tiny-olmo2", DType::F32)] {
        println!("{shape}");
        random_model_matches_cpu(&dev, shape, 8, &[greedy]);
    }
}

/// The mixtures of experts: Mixtral's (each token's top 2 of 4 experts), Qwen 3 MoE's (a dense
/// layer, then the top 2 of 8 experts of their own size) and Qwen 2 MoE's (a shared expert beside
/// the routed ones, weighted by its gate's sigmoid), through the `Moe` op: at decode the
/// router's choice and the experts on the device (`moe_route`, `moe_glu`, `moe_down`,
/// `moe_combine`), the prompt's tokens routed on the host (its scores read mid-op), each expert's
/// tokens gathered and through one GEMM together.
/// Greedy steps in f32: a token whose two likeliest experts lie within bf16's rounding of each other
/// may be routed otherwise by the two backends' bf16 sums.
#[test]
fn random_mixtures_of_experts_on_the_emulated_device_match_the_cpu() {
    let Some(dev) = backend("random mixtral, qwen 3 moe and qwen 2 moe on the emulated device") else { return };
    for shape in ["tiny-mixtral", "tiny-qwen3-moe", "tiny-qwen2-moe"] {
        println!("{shape}");
        random_model_matches_cpu(&dev, shape, 8, &[DType::F32]);
    }
}

/// The LayerNorm families: GPT-2's (learned positions added by the embedding op and the weighted
/// add, LayerNorm with the stream's add in one launch, a GELU MLP without a gate, biases) and
/// Pythia's (attention and the MLP side by side, RoPE on a quarter of each head, the exact GELU).
#[test]
fn random_gpt2_and_pythia_on_the_emulated_device_match_the_cpu() {
    let Some(dev) = backend("random gpt-2 and pythia on the emulated device") else { return };
    for shape in ["tiny-gpt2", "tiny-pythia"] {
        println!("{shape}");
        random_model_matches_cpu(&dev, shape, 8, &[DType::F32, DType::BF16]);
    }
}

/// Falcon 7B's multi-query attention (71 query heads over one key/value head: past the grouped
/// kernels' 8 heads a group and the decode kernel's 16 rows, so the per-head kernels serve it) and
/// Nemotron's squared-ReLU MLP and half-rotating heads; Bloom's ALiBi (f32 on the split kernels,
/// bf16's prefill on flash_attn and its decode on decode_attn) and normed embeddings.
#[test]
fn random_falcon_nemotron_and_bloom_on_the_emulated_device_match_the_cpu() {
    let Some(dev) = backend("random falcon, nemotron and bloom on the emulated device") else { return };
    for shape in ["tiny-falcon", "tiny-nemotron", "tiny-bloom"] {
        println!("{shape}");
        random_model_matches_cpu(&dev, shape, 8, &[DType::F32, DType::BF16]);
    }
}

/// Steering changes the stream a layer reads where the norms fold into its projections (a one-token
/// pass, bf16: `Backend::folds_norms`, the layer norming the stream itself, with no norm after the
/// intervention): the steered logits are the CPU's, far from the unsteered ones.
#[test]
fn steering_reaches_layers_that_fold_their_norms() {
    use highrise::model::{Hooks, Llama, Logits, ModelConfig, Steer};
    let Some(dev) = backend("steering with folded norms on the emulated device") else { return };
    let config = ModelConfig::shape("tiny").unwrap();
    let h = config.hidden_size;
    assert!(dev.folds_norms(1, h, DType::BF16), "a one-token bf16 pass folds the norms");
    let (on_cpu, on_dev) = (Llama::random(config.clone(), cpu(), DType::BF16, 7).unwrap(), Llama::random(config, dev.clone(), DType::BF16, 7).unwrap());
    let vector: Vec<f32> = (0..h).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
    let steered = || Hooks { steer: vec![Steer { layer: 1, vector: vector.clone(), scale: 20.0, positions: None }], ..Default::default() };
    let run = |m: &Llama, hooks: Option<&mut Hooks>| m.prefill_hooked(&[42], Logits::All, hooks).unwrap().to_f32().unwrap();
    let (plain, want, got) = (run(&on_dev, None), run(&on_cpu, Some(&mut steered())), run(&on_dev, Some(&mut steered())));
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let tolerance = 5e-2 * want.iter().map(|x| x.abs()).fold(1f32, f32::max);
    let (off, moved) = (max_diff(&got, &want), max_diff(&got, &plain));
    println!("steered logits: {off:e} from the cpu's, {moved:e} from the unsteered (tolerance {tolerance:e})");
    assert!(off <= tolerance, "steered logits differ from the cpu's by {off}");
    assert!(moved > 4.0 * tolerance, "steering moved the logits by {moved} only");
}

/// Decode steps run as CUDA graphs (#20) give exactly the tokens of the same steps op by op
/// (`common::graphs_give_the_same_tokens`). The graphs' launches run on the emulated device with the
/// parameters they were captured with, reading the metadata copied for each step: anything a step
/// changes that is not in device memory would give other tokens here.
#[test]
fn decode_steps_as_graphs_give_the_same_tokens() {
    let Some(dev) = own_backend("graphs on the emulated device") else { return };
    graphs_give_the_same_tokens(&dev, true);
}

/// A mixture's decode steps (Mixtral's layout) as graphs: the router's choice made on the device
/// (`Moe`: `moe_route`, the experts' kernels, `moe_combine`), so no step falls back to op by op at
/// the router's scores, and the same tokens and log-probabilities as op by op; in f32 (a warp a
/// row of an expert) and bf16 (the experts on the matrix-vector kernel, `moe_gemv_*`; and after a
/// warm-up, no capture while the requests run); and Qwen 2 MoE's, whose shared expert's gate is
/// read on the device too.
#[test]
fn mixture_decode_steps_run_as_graphs() {
    let Some(dev) = own_backend("a mixture's graphs on the emulated device") else { return };
    for (shape, dtype) in [("tiny-mixtral", DType::F32), ("tiny-mixtral", DType::BF16), ("tiny-qwen2-moe", DType::F32)] {
        println!("{shape} {dtype}");
        graphs_give_the_same_tokens_of(&dev, shape, true, dtype);
    }
}

/// Continuous batching: a 100-token prompt joins a sequence that decodes, so the prompt's chunks
/// share steps with its decoding (a mixed step: decode_attn on the decoding sequence and flash_attn
/// through the block table on the chunk, side by side over their own rows). The same greedy
/// tokens as the CPU backend's engine, bf16, the same weights.
#[test]
fn steps_mixing_prompt_chunks_with_decoding_match_the_cpu() {
    use highrise::engine::{Engine, EngineConfig, GenerateParams, Request};
    use highrise::model::{Llama, ModelConfig, Tokenizer};
    let Some(dev) = backend("mixed steps on the emulated device") else { return };
    let run = |be: &std::sync::Arc<dyn highrise::core::Backend>| {
        let model = Llama::random(ModelConfig::shape("tiny").unwrap(), be.clone(), DType::BF16, 5).unwrap();
        let tok = Tokenizer::numbered(512).unwrap();
        // 48 tokens a step: the short prompt and the long one's first chunk, then its decoding
        // beside the long one's next chunks.
        let config = EngineConfig { num_blocks: 32, block_size: 16, max_batch_tokens: 48, max_running: 4 };
        let mut engine = Engine::new(&model, &tok, config).unwrap();
        for (len, n) in [(9u32, 10usize), (100, 4)] {
            let prompt: Vec<u32> = (0..len).map(|j| (j * 29 + len) % 512).collect();
            let params = GenerateParams { max_tokens: n, ignore_eos: true, ..Default::default() };
            engine.submit(Request { prompt, params, logprobs: false, top_logprobs: 0 }).unwrap();
        }
        let mut done = engine.run_to_completion().unwrap();
        done.sort_by_key(|d| d.0);
        done.into_iter().map(|(_, g)| g.ids).collect::<Vec<_>>()
    };
    let (want, got) = (run(&cpu()), run(&dev));
    println!("mixed steps: {got:?}");
    assert_eq!(got, want, "greedy tokens on the emulated device vs the CPU");
}

/// The same in f32, whose decode steps attend with the split kernels: they cut each row's keys into
/// the slices themselves, so a step's launches stay the same as the contexts grow and its graph is
/// replayed, not captured anew each step.
#[test]
fn f32_decode_steps_as_graphs_are_replayed() {
    let Some(dev) = own_backend("f32 graphs on the emulated device") else { return };
    graphs_give_the_same_tokens_in(&dev, true, DType::F32);
}

/// Captures of every site taken on the device inside decode steps run as graphs, read once each
/// step has ended, equal the captures read one by one as the pass reaches them (#20's taps that
/// cost little), and the tokens too.
#[test]
fn captures_taken_inside_graphs_equal_captures_read_at_once() {
    let Some(dev) = own_backend("deferred captures on the emulated device") else { return };
    let launched = deferred_captures_in_graphs_match(&dev);
    println!("18 decode steps with every site captured: {launched} graph launches");
    assert_eq!(launched, 18, "every tapped step ran as a graph");
}

/// One backend, two threads (a server's engine beside a capture request, say): decode steps captured
/// and replayed as graphs on one; on the other, steps whose captures are copied and read as the pass
/// reaches them, and steps of their own as graphs. Each gets exactly what it gets alone: no copy,
/// read or launch of one thread lands inside the other's graph while it is captured.
#[test]
fn two_threads_share_a_backend_with_graphs() {
    let Some(dev) = own_backend("two threads, one emulated device") else { return };
    std::thread::scope(|s| {
        let engine = s.spawn(|| graphs_give_the_same_tokens(&dev, false));
        let captures = s.spawn(|| deferred_captures_in_graphs_match(&dev));
        engine.join().expect("the engine's thread");
        captures.join().expect("the captures' thread");
    });
}

/// A mixed step's attention (decode_attn on a decoding sequence, then flash_attn through the block
/// table on a prompt chunk: one op, whose second launch is given more workspace at the address of
/// the first's) recorded inside a graph step, as it is when another thread steps a graph on the
/// same backend: each launch is checked against the regions told before it, and the output is the
/// op's run at once, bit for bit, captured and replayed. (Checked against the op's regions as they
/// stood at its end, decode_attn was refused, and the other thread's graph step with it: the failed
/// CI run of 2026-12-02.)
#[test]
fn a_mixed_attention_op_inside_a_graph_step_runs_as_at_once() {
    use highrise::core::ops::PagedSeq;
    use highrise::core::Tensor;
    let Some(dev) = own_backend("a mixed attention op inside a graph step") else { return };
    let (hq, hkv, d, bs, dt) = (8, 2, 64, 16, DType::BF16);
    let mut rng = Rng::new("a mixed attention op inside a graph step");
    // (context, queries): a decoding sequence, a prompt chunk after a 293-token prefix.
    let batch = [(40usize, 1usize), (300, 7)];
    let num_blocks: usize = batch.iter().map(|(c, _)| c.div_ceil(bs)).sum();
    let t: usize = batch.iter().map(|(_, q)| q).sum();
    let table = shuffled_blocks(&mut rng, num_blocks);
    let seqs: Vec<PagedSeq> = batch
        .iter()
        .scan(0u32, |start, &(c, q)| {
            let s = PagedSeq { q_len: q as u32, context_len: c as u32, blocks_start: *start };
            *start += c.div_ceil(bs) as u32;
            Some(s)
        })
        .collect();
    let mut random = |dims: &[usize]| {
        let v: Vec<f32> = rng.values(dims.iter().product(), 1.0, dt).into_iter().map(|x| x as f32).collect();
        Tensor::from_f32(&dev, dt, dims, &v).unwrap()
    };
    let (k_cache, v_cache, q) = (random(&[num_blocks, hkv, bs, d]), random(&[num_blocks, hkv, bs, d]), random(&[t, hq, d]));
    let run = |graph: bool| {
        let mut out = Tensor::empty(&dev, dt, &[t, hq, d]).unwrap();
        if graph {
            dev.graph_begin(7).unwrap();
        }
        dev.paged_attention(&mut out, &q, &k_cache, &v_cache, &seqs, &table, 0.125).unwrap();
        if graph {
            dev.graph_end().unwrap();
        }
        out.to_f32().unwrap()
    };
    let at_once = run(false);
    assert!(at_once.iter().all(|x| x.is_finite()));
    for i in 0..3 {
        let got = run(true);
        assert!(got.iter().zip(&at_once).all(|(a, b)| a.to_bits() == b.to_bits()), "graph step {i}: other values than the op at once");
    }
    let stats = dev.graph_stats();
    println!("graph steps: {stats:?}");
    assert!(stats.launched == 3 && stats.captured < 3, "three graph steps, one replayed at least: {stats:?}");
}

/// wgmma alone, staged and issued by the Hopper kernels' own functions (`wgmma_probe_*`), equals a
/// plain matrix product on the emulated device: the kernels' layouts agree with our model of the ISA.
/// (tests/cuda.rs runs the same on a Hopper GPU, where it checks the model against the hardware.)
#[test]
fn wgmma_as_the_kernels_use_it_equals_a_plain_product() {
    if backend("wgmma probe on the emulated device").is_none() {
        return;
    }
    let driver = highrise_cuda::recording::RecordingDriver::executing("sm_90a", 8).expect("built once already");
    wgmma_probe_matches(&driver);
    assert_eq!(driver.take_recorded().len(), 4, "four probes launched and checked");
}

/// A TMA copy (`tma_probe_*`: a tensor map, an mbarrier, the 128-byte swizzle, rows past the
/// tensor's end) lays its box out as the wgmma kernels read tiles, on the emulated device: our
/// model of TMA (kernels/emu/simt.hpp) agrees with our layout. (tests/cuda.rs runs the same on a
/// Hopper GPU, where it checks the model against the hardware.)
#[test]
fn tma_lays_tiles_out_as_the_wgmma_kernels_read_them() {
    if backend("TMA probe on the emulated device").is_none() {
        return;
    }
    let driver = highrise_cuda::recording::RecordingDriver::executing("sm_90a", 8).expect("built once already");
    tma_probe_matches(&driver);
    assert_eq!(driver.take_recorded().len(), 2, "two probes launched and checked");
}

/// The Hopper prefill kernels (`flash_attn_wg_*`, the pipelined `flash_attn_wgp_*` and the
/// warp-specialized `flash_attn_ws_*`: wgmma, mbarriers, named barriers,
/// modelled in kernels/emu/simt.hpp; the pipelined one Hopper's default, the op tests here keep
/// mma.sync's for speed: tests/common's `emulated`) in the whole model: a backend of its own prefills with each, and the logits and
/// greedy tokens equal the CPU's as with `flash_attn_*`.
#[test]
fn random_llama_with_the_wgmma_prefill_matches_the_cpu() {
    use highrise_cuda::flash::Wg;
    use std::sync::Arc;
    if backend("wgmma prefill on the emulated device").is_none() {
        return;
    }
    for wg in [Wg::Plain, Wg::Pipe, Wg::Spec] {
        let driver = Arc::new(highrise_cuda::recording::RecordingDriver::executing("sm_90a", 8).expect("built once already"));
        let mut cuda = highrise_cuda::CudaBackend::with_driver(driver.clone());
        cuda.set_flash_wgmma(Some(wg)).unwrap();
        let dev: Arc<dyn highrise::core::Backend> = Arc::new(cuda);
        random_llama_matches_cpu(&dev, 4, &[DType::BF16]);
        let kernels: Vec<String> = driver.take_recorded().into_iter().map(|r| r.kernel).collect();
        let prefix = format!("{}_d", wg.kernel());
        assert!(kernels.iter().any(|k| k.starts_with(&prefix)), "the prompt ran through {}: {kernels:?}", wg.kernel());
        assert!(!kernels.iter().any(|k| k.starts_with("flash_attn_d")), "and never through flash_attn");
    }
    // Elsewhere than on Hopper the kernels do not exist: asking for one is an error, not a fault.
    let ampere = highrise_cuda::recording::RecordingDriver::new("sm_80", 108).unwrap();
    let err = highrise_cuda::CudaBackend::with_driver(Arc::new(ampere)).set_flash_wgmma(Some(Wg::Plain)).unwrap_err();
    assert!(err.to_string().contains("sm_90a"), "{err}");
}

/// The emulated device holds every kernel it runs as a programmatic dependent (#20: the decode
/// path's kernels inside a graph, `highrise_cuda::kernels::PROGRAMMATIC`) to `griddepcontrol.wait`
/// in each thread: a kernel without it (`to_f32`) is a fault there, one with it (`add_rms_norm`)
/// runs, and either runs as an ordinary launch. Every other test of this file runs the listed
/// kernels that way, so a listed kernel that lost its wait fails them.
#[test]
fn a_programmatic_launch_without_the_wait_is_a_fault() {
    use std::ffi::c_void;
    if highrise_cuda::emu::compiler().is_none() {
        println!("skipped: no C++ compiler for the emulated device");
        return;
    }
    let entries = vec!["to_f32".to_string(), "add_rms_norm_f32".to_string()];
    let lib = highrise_cuda::emu::Library::build(&[("residual.cu", entries, vec![])]).expect("residual.cu builds");
    let x: Vec<f32> = (0..64).map(|i| i as f32 / 8.0).collect();
    let (mut out, mut residual, w) = (vec![0f32; 64], vec![1f32; 64], vec![1f32; 64]);
    let to_f32 = |programmatic: bool, out: &mut [f32]| {
        let (mut o, mut xp, mut dt, mut n) = (out.as_mut_ptr() as u64, x.as_ptr() as u64, 0u32, 64u64);
        let mut params = [&mut o as *mut u64 as *mut c_void, &mut xp as *mut u64 as *mut c_void, &mut dt as *mut u32 as *mut c_void, &mut n as *mut u64 as *mut c_void];
        // SAFETY: the parameters are to_f32's (out, x, x_dt, n), the pointers host memory of 64 floats.
        unsafe { lib.launch("to_f32", (1, 1, 1), (64, 1, 1), 0, &mut params, programmatic) }
    };
    let err = to_f32(true, &mut out).expect_err("to_f32 has no PDL_ENTRY").to_string();
    assert!(err.contains("griddepcontrol.wait"), "{err}");
    to_f32(false, &mut out).expect("an ordinary launch of it runs");
    assert_eq!(out, x);

    let (mut o, mut r, mut d, mut wp) = (out.as_mut_ptr() as u64, residual.as_mut_ptr() as u64, x.as_ptr() as u64, w.as_ptr() as u64);
    let (mut w_dt, mut h, mut eps) = (0u32, 64u32, 1e-6f32);
    let mut params = [
        &mut o as *mut u64 as *mut c_void,
        &mut r as *mut u64 as *mut c_void,
        &mut d as *mut u64 as *mut c_void,
        &mut wp as *mut u64 as *mut c_void,
        &mut w_dt as *mut u32 as *mut c_void,
        &mut h as *mut u32 as *mut c_void,
        &mut eps as *mut f32 as *mut c_void,
    ];
    // SAFETY: add_rms_norm's parameters (out, residual, delta, w, w_dt, h, eps), one row of 64.
    unsafe { lib.launch("add_rms_norm_f32", (1, 1, 1), (64, 1, 1), 0, &mut params, true) }.expect("add_rms_norm waits");
    assert_eq!(residual[8], 2.0, "the residual got its delta");
}
