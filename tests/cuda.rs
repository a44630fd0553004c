//! The CUDA backend against the CPU plugin, where a CUDA device is present (otherwise every test
//! prints `skipped: no CUDA device`): every op and dtype of tests/ops.rs on CUDA against the f64
//! references (f32 within 1e-5 relative; f16/bf16 at most twice a naive same-dtype implementation's
//! error); a small random-weight Llama built identically on both backends (logits, 64 greedy steps
//! through the paged cache); and the default model's greedy continuation.

mod common;

#[path = "ops.rs"]
mod ops;

use common::*;
use highrise::core::DType;
use highrise::engine::{generate, GenerateParams};
use highrise::model::{Llama, LoadOptions, Logits, ModelConfig, Source, WeightFormat};

#[test]
fn random_llama_matches_cpu_logits_and_64_greedy_steps() {
    let Some(gpu) = backend("random llama") else { return };
    random_llama_matches_cpu(&gpu, 64, &[DType::F32]);
}

/// Gemma 2's layout (post-norms, GeGLU, soft-capped scores and logits, a sliding window on layer 0)
/// on the GPU against the CPU: logits, and 64 greedy steps in f32.
#[test]
fn random_gemma2_matches_cpu_logits_and_64_greedy_steps() {
    let Some(gpu) = backend("random gemma 2") else { return };
    random_model_matches_cpu(&gpu, "tiny-gemma2", 64, &[DType::F32]);
}

/// Gemma 3's layout (q/k norms, RoPE per layer type), SmolLM3's (a layer without RoPE) and OLMo
/// 2's (no pre-norms, whole-width q/k norms) on the GPU against the CPU.
#[test]
fn random_gemma3_smollm3_and_olmo2_match_cpu_logits_and_64_greedy_steps() {
    let Some(gpu) = backend("random gemma 3, smollm3 and olmo 2") else { return };
    for shape in ["tiny-gemma3", "tiny-smollm3", "tiny-olmo2"] {
        println!("{shape}");
        random_model_matches_cpu(&gpu, shape, 64, &[DType::F32]);
    }
}

/// The mixtures of experts (Mixtral's, Qwen 3 MoE's with a dense layer, Qwen 2 MoE's with a shared
/// expert) on the GPU against the CPU
/// (`Moe`): at decode the router's choice and the experts on the device (`moe_*`), the prompt's
/// tokens routed on the host, each expert's together through one GEMM.
#[test]
fn random_mixtures_of_experts_match_cpu_logits_and_64_greedy_steps() {
    let Some(gpu) = backend("random mixtral, qwen 3 moe and qwen 2 moe") else { return };
    for shape in ["tiny-mixtral", "tiny-qwen3-moe", "tiny-qwen2-moe"] {
        println!("{shape}");
        random_model_matches_cpu(&gpu, shape, 64, &[DType::F32]);
    }
}

/// The LayerNorm families (GPT-2's learned positions and GELU MLP without a gate, Pythia's attention
/// and MLP side by side with partial RoPE) on the GPU against the CPU.
#[test]
fn random_gpt2_and_pythia_match_cpu_logits_and_64_greedy_steps() {
    let Some(gpu) = backend("random gpt-2 and pythia") else { return };
    for shape in ["tiny-gpt2", "tiny-pythia"] {
        println!("{shape}");
        random_model_matches_cpu(&gpu, shape, 64, &[DType::F32]);
    }
}

/// Falcon 7B's multi-query attention (71 query heads over one key/value head), Nemotron's
/// squared-ReLU MLP and Bloom's ALiBi (f32 on the split kernels, bf16 on the tensor-core prefill
/// and decode kernels) on the GPU against the CPU.
#[test]
fn random_falcon_nemotron_and_bloom_match_cpu_logits_and_64_greedy_steps() {
    let Some(gpu) = backend("random falcon, nemotron and bloom") else { return };
    for shape in ["tiny-falcon", "tiny-nemotron", "tiny-bloom"] {
        println!("{shape}");
        random_model_matches_cpu(&gpu, shape, 64, &[DType::F32]);
    }
}

/// The linear op on each GEMM path (`HIGHRISE_GEMM`: cuBLASLt's algorithm timed fastest, its
/// heuristic's first, cublasGemmEx's own) at batched-decode rows with long rows of w, where a tuned
/// algorithm may split k: each within bf16's tolerance of the f64 reference.
#[test]
fn linear_on_every_gemm_path_matches_reference() {
    if backend("linear on every GEMM path").is_none() {
        return;
    }
    let mut rng = Rng::new("gemm paths");
    for (t, k, n) in [(64, 14336, 512), (256, 4096, 1024), (3, 4096, 640)] {
        let x = rng.values(t * k, 1.0, DType::BF16);
        let w = rng.values(n * k, 0.05, DType::BF16);
        let xt = upload(DType::BF16, &[t, k], &x);
        let exact = ref_linear(&x, &w, None, k, Rd::Exact);
        let naive = ref_linear(&x, &w, None, k, Rd::Naive(DType::BF16));
        // Each mode on a shape of its own (the first rows of w), so none finds another's choice.
        for (i, mode) in ["tuned", "heuristic", "gemmex"].into_iter().enumerate() {
            let rows = n - 16 * i;
            let first = |r: &[f64]| -> Vec<f64> { r.chunks(n).flat_map(|row| row[..rows].to_vec()).collect() };
            std::env::set_var("HIGHRISE_GEMM", mode);
            let mut out = poisoned(DType::BF16, &[t, rows]);
            be().linear(&mut out, &xt, &upload(DType::BF16, &[rows, k], &w[..rows * k]), None).unwrap();
            let what = format!("linear [{t}, {k}] x [{rows}, {k}]^T bf16, HIGHRISE_GEMM={mode}");
            assert_close(&what, DType::BF16, &download(&out), &first(&exact), &first(&naive));
        }
        std::env::remove_var("HIGHRISE_GEMM");
    }
}

/// A mixture's decode steps (Mixtral's layout) as graphs, the router's choice made on the device: no
/// step falls back to op by op, and the tokens are those of the same steps op by op.
#[test]
fn mixture_decode_steps_run_as_graphs() {
    let Some(gpu) = own_backend("a mixture's graphs") else { return };
    graphs_give_the_same_tokens_of(&gpu, "tiny-mixtral", true, DType::F32);
}

/// Decode steps replayed as CUDA graphs give the tokens of the same steps launched op by op.
#[test]
fn decode_steps_as_graphs_give_the_same_tokens() {
    let Some(gpu) = own_backend("graphs") else { return };
    graphs_give_the_same_tokens(&gpu, true);
}

/// Every site captured on the device inside decode steps run as graphs, read after each step,
/// equals the captures read one by one.
#[test]
fn captures_taken_inside_graphs_equal_captures_read_at_once() {
    let Some(gpu) = own_backend("deferred captures") else { return };
    assert_eq!(deferred_captures_in_graphs_match(&gpu), 18, "every tapped step ran as a graph");
}

/// On Hopper: wgmma alone, staged and issued by the prefill kernels' own functions
/// (`wgmma_probe_*`), equals a plain matrix product: our reading of the ISA (the layouts and
/// descriptors kernels/emu/simt.hpp models) agrees with the hardware. Where it does not, the report
/// names the product, the rows and columns, and where the misplaced values belong.
#[test]
fn wgmma_as_the_kernels_use_it_equals_a_plain_product() {
    if backend("wgmma probe").is_none() {
        return;
    }
    let driver = highrise_cuda::driver::CudaDriver::new(0).unwrap();
    let arch = highrise_cuda::driver::Driver::device(&driver).arch;
    if arch != "sm_90a" {
        return println!("skipped: wgmma probe: this GPU is {arch}, wgmma needs Hopper (sm_90a)");
    }
    wgmma_probe_matches(&driver);
}

/// On Hopper: a TMA copy (`tma_probe_*`, the tensor map encoded by CUDA) lays its box out as the
/// wgmma kernels read tiles, rows past the tensor's end zeros: what kernels/emu/simt.hpp models, and
/// what a prefill kernel fed by TMA (FlashAttention-3's design) relies on.
#[test]
fn wgmma_tma_lays_tiles_out_as_the_kernels_read_them() {
    if backend("TMA probe").is_none() {
        return;
    }
    let driver = highrise_cuda::driver::CudaDriver::new(0).unwrap();
    let arch = highrise_cuda::driver::Driver::device(&driver).arch;
    if arch != "sm_90a" {
        return println!("skipped: TMA probe: this GPU is {arch}, TMA needs Hopper (sm_90a)");
    }
    tma_probe_matches(&driver);
}

#[test]
fn default_model_greedy_continuation_matches_cpu() {
    let Some(gpu) = backend("default model on cuda") else { return };
    let Some(path) = default_model() else {
        return println!("skipped: default model on cuda: the default model could not be fetched");
    };
    let source = Source::open(&path).unwrap();
    let tok = source.tokenizer().unwrap();
    let opts = LoadOptions { weights: WeightFormat::Convert(DType::F32), ..Default::default() };
    let on_cpu = Llama::load(&source, cpu(), opts).unwrap();
    let on_gpu = Llama::load(&source, gpu, opts).unwrap();
    let ids = tok.encode("Once upon a time, in a quiet village,", true).unwrap();
    let params = GenerateParams { max_tokens: 48, ..Default::default() };
    let a = generate(&on_cpu, &tok, &ids, &params, &mut |_| {}).unwrap();
    let b = generate(&on_gpu, &tok, &ids, &params, &mut |_| {}).unwrap();
    assert_eq!(b.ids, a.ids, "cuda: {:?}\ncpu: {:?}", b.text, a.text);
}

#[test]
fn captures_on_cuda_match_the_cpu() {
    use highrise::model::{Hooks, Site};
    let Some(gpu) = backend("captures on cuda") else { return };
    let config = ModelConfig::shape("tiny").unwrap();
    let prompt: Vec<u32> = (0..29).map(|i| (i * 11 + 3) % 512).collect();
    let sites = [Site::ResidPre, Site::AttnOut, Site::MlpOut, Site::ResidPost, Site::Q, Site::K, Site::V, Site::FinalNorm];
    let run = |b| {
        let m = Llama::random(config.clone(), b, DType::F32, 5).unwrap();
        let mut hooks = Hooks::capture_all(&sites);
        m.prefill_hooked(&prompt, Logits::Last, Some(&mut hooks)).unwrap();
        hooks
    };
    let (a, b) = (run(cpu()), run(gpu));
    assert_eq!(a.captured.len(), b.captured.len());
    for ((site, layer), want) in &a.captured {
        let got = b.get(*site, *layer).unwrap();
        let scale = want.iter().map(|x| x.abs()).fold(1f32, f32::max);
        let diff = want.iter().zip(got).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-4 * scale, "{} layer {layer}: cuda differs from cpu by {diff} (scale {scale})", site.name());
    }
}

#[test]
fn attention_with_every_kernel() {
    // By default f16/bf16 prefill runs on tensor cores and the rest on the grouped split kernel;
    // this runs the same checks with the choice forced to each other kernel (scripts/gpu-check.sh
    // runs the tests one at a time, so the switch is not seen by another test).
    if backend("attention kernels").is_none() {
        return;
    }
    for choice in ["split", "per-head"] {
        std::env::set_var("HIGHRISE_CUDA_ATTENTION", choice);
        let result = std::panic::catch_unwind(|| {
            ops::prefill_attention_is_causal_gqa();
            ops::paged_attention_reads_through_block_tables();
        });
        std::env::remove_var("HIGHRISE_CUDA_ATTENTION");
        if let Err(e) = result {
            eprintln!("HIGHRISE_CUDA_ATTENTION={choice} failed");
            std::panic::resume_unwind(e);
        }
    }
}
