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
use highrise::engine::{generate, GenerateParams};
use highrise::model::{Llama, Logits, ModelConfig};

/// A random-weight Llama (2 layers, head dim 64, 4 query heads over 2) on the emulated CUDA device
/// and on the CPU backend, same weights: the prompt's logits (prefill: flash_attn, cuBLAS's GEMMs
/// done on the CPU) and 24 greedy steps through the engine's paged cache (decode_attn, gemv for bf16;
/// the split kernels for f32) agree.
#[test]
fn random_llama_on_the_emulated_device_matches_the_cpu() {
    let Some(dev) = backend("random llama on the emulated device") else { return };
    for dtype in [DType::F32, DType::BF16] {
        let config = ModelConfig::shape("tiny").unwrap();
        let on_cpu = Llama::random(config.clone(), cpu(), dtype, 7).unwrap();
        let on_dev = Llama::random(config, dev.clone(), dtype, 7).unwrap();
        let prompt: Vec<u32> = (0..37).map(|i| (i * 13 + 5) % 512).collect();
        let a = on_cpu.prefill(&prompt, Logits::All).unwrap().to_f32().unwrap();
        let b = on_dev.prefill(&prompt, Logits::All).unwrap().to_f32().unwrap();
        let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let tol = if dtype == DType::F32 { 1e-4 } else { 5e-2 } * scale.max(1.0);
        println!("{dtype}: prefill logits max |cuda - cpu| = {diff:e} (largest logit {scale})");
        assert!(diff <= tol, "{dtype}: logits differ by {diff} (tolerance {tol})");

        let tok = highrise::model::Tokenizer::numbered(512).unwrap();
        let params = GenerateParams { max_tokens: 24, ignore_eos: true, ..Default::default() };
        let x = generate(&on_cpu, &tok, &prompt, &params, &mut |_| {}).unwrap();
        let y = generate(&on_dev, &tok, &prompt, &params, &mut |_| {}).unwrap();
        assert_eq!(y.ids, x.ids, "{dtype}: 24 greedy steps");
        let lp = x.logprobs.iter().zip(&y.logprobs).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        println!("{dtype}: 24 greedy steps identical, log-probabilities within {lp:e}");
        assert!(lp <= if dtype == DType::F32 { 1e-4 } else { 5e-2 }, "{dtype}: log-probabilities differ by {lp}");
    }
}
