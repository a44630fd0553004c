//! The model families beyond Llama, each a tiny random-weight model of the family's exact
//! architecture saved by HuggingFace transformers with its own outputs (tests/data/tiny-*, made by
//! scripts/make-tiny-families.py): logits at every prompt position within 1e-4 of transformers' (f32),
//! the same again decoding token by token through the paged KV cache, and the same greedy ids.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use highrise::core::ops::PagedSeq;
use highrise::engine::{generate, GenerateParams};
use highrise::model::{Batch, Hooks, Llama, LoadOptions, Logits, Site, Source, Tokenizer};

fn dir(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(format!("tiny-{family}"))
}

/// Logits at each position, decoding one token at a time through the paged cache (blocks of 4,
/// so the prompt spans several).
fn decoded(m: &Llama, prompt: &[u32]) -> Vec<f32> {
    let mut cache = m.new_kv_cache(prompt.len().div_ceil(4), 4).unwrap();
    // Blocks out of order, as a running engine hands them out.
    let table: Vec<u32> = (0..cache.num_blocks as u32).rev().collect();
    let mut all = Vec::new();
    for p in 0..prompt.len() {
        let seqs = [PagedSeq { q_len: 1, context_len: p as u32 + 1, blocks_start: 0 }];
        let pos = [p as u32];
        let slot = [table[p / 4] * 4 + (p % 4) as u32];
        let batch = Batch { tokens: &prompt[p..p + 1], positions: &pos, slots: &slot, seqs: &seqs, block_table: &table };
        all.extend(m.forward(&batch, &mut cache, Logits::Last).unwrap().to_f32().unwrap());
    }
    all
}

/// A family's reference file (`reference.json`, or another of its folder): the whole JSON, its
/// prompt, and HF's logits at every prompt position, flattened.
fn reference(family: &str, file: &str) -> (serde_json::Value, Vec<u32>, Vec<f32>) {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir(family).join(file)).unwrap()).unwrap();
    let prompt = ids(&json["prompt"]);
    let logits = json["logits"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32)).collect();
    (json, prompt, logits)
}

/// Rows `x` [T, k] through the f32 projection `{prefix}.weight` [h, k] of `source` and its bias
/// where it has one, in f64: what a capture feeding that projection should give.
fn projected(source: &Source, prefix: &str, x: &[f32], k: usize, h: usize) -> Vec<f32> {
    let f64s = |name: &str| -> Option<Vec<f64>> {
        let t = source.tensor(&format!("{prefix}.{name}")).unwrap()?;
        Some(t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64).collect())
    };
    let (w, bias) = (f64s("weight").unwrap(), f64s("bias"));
    let row = |a: &[f32]| (0..h).map(|o| (bias.as_ref().map_or(0.0, |b| b[o]) + (0..k).map(|j| a[j] as f64 * w[o * k + j]).sum::<f64>()) as f32).collect::<Vec<_>>();
    x.chunks_exact(k).flat_map(row).collect()
}

fn worst_of(got: &[f32], want: &[f32]) -> f32 {
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
}

fn check(family: &str) {
    let d = dir(family);
    let (reference, prompt, want) = reference(family, "reference.json");
    let source = Source::open(&d).unwrap();
    let m = Llama::load(&source, cpu(), LoadOptions::default()).unwrap();
    let worst = |got: &[f32]| worst_of(got, &want);
    let prefill = m.prompt_logits(&prompt).unwrap().to_f32().unwrap();
    assert_eq!(prefill.len(), want.len());
    let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
    println!("{family}: prefill logits within {:.1e} of HF's (largest {scale:.2})", worst(&prefill));
    assert!(worst(&prefill) <= 1e-4, "{family}: prefill logits differ from HF by {}", worst(&prefill));
    if let Some(routers) = reference["router_logits"].as_array() {
        // A mixture's router scores at each layer (`Site::Router`), as HF's output_router_logits.
        let mut hooks = Hooks::capture_all(&[Site::Router]);
        m.prefill_hooked(&prompt, Logits::Last, Some(&mut hooks)).unwrap();
        for (l, want) in routers.iter().enumerate() {
            let want: Vec<f32> = want.as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32)).collect();
            let got = hooks.get(Site::Router, l).unwrap_or_else(|| panic!("{family}: no router scores captured at layer {l}"));
            assert_eq!(got.len(), prompt.len() * m.config.experts());
            let off = worst_of(got, &want);
            println!("{family}: layer {l} router scores within {off:.1e} of HF's");
            assert!(off <= 1e-4, "{family}: layer {l}'s router scores differ from HF's by {off}");
        }
    }
    let dec = decoded(&m, &prompt);
    assert!(worst(&dec) <= 1e-4, "{family}: decoded logits differ from HF by {}", worst(&dec));
    let greedy = ids(&reference["greedy"]);
    let tok = Tokenizer::numbered(m.config.vocab_size).unwrap();
    let params = GenerateParams { max_tokens: greedy.len(), ignore_eos: true, ..Default::default() };
    let got = generate(&m, &tok, &prompt, &params, &mut |_| {}).unwrap();
    assert_eq!(got.ids, greedy, "{family}: greedy ids");
    // The same weights as llama.cpp lays them out in a GGUF (its names, Q/K rows permuted for the
    // llama architecture, fused tensors kept fused): the same logits.
    let gguf = d.join("model.gguf");
    if gguf.is_file() {
        let g = Llama::load(&Source::open(&gguf).unwrap(), cpu(), LoadOptions::default()).unwrap();
        let from_gguf = g.prompt_logits(&prompt).unwrap().to_f32().unwrap();
        println!("{family}: from GGUF within {:.1e}", worst(&from_gguf));
        assert!(worst(&from_gguf) <= 1e-4, "{family}: GGUF logits differ from HF by {}", worst(&from_gguf));
    }
}

#[test]
fn llama_3_2_tied_embeddings_and_llama3_rope_scaling() {
    check("llama3.2");
}

/// SmolLM3: no RoPE on layer 3 of four (`no_rope_layers`); from GGUF, llama.cpp's step of four
/// (no key holds it) and its permuted q/k rows, as for Llama.
#[test]
fn smollm3_without_rope_on_every_fourth_layer() {
    check("smollm3");
}

/// Mistral's sliding window (v0.1) on every layer, 8 tokens wide beside a prompt of 20 (from the
/// 9th position on, the earliest keys drop out), and Nemo's head_dim of its own.
#[test]
fn mistral_with_a_sliding_window_and_its_own_head_dim() {
    check("mistral");
}

/// Ministral: Mistral with the 8-token window on the layers `layer_types` names (layer 0 of two),
/// beside the 20-token prompt. No GGUF (llama.cpp keeps one window for every layer).
#[test]
fn ministral_with_windows_on_the_layers_named() {
    check("ministral");
}

#[test]
fn qwen2_5_with_qkv_biases() {
    check("qwen2.5");
}

/// Qwen 2.5 with YaRN (factor 4 over an original context of 64): each pair's frequency kept, divided
/// by the factor, or between along the ramp, cos and sin times 0.1 ln 4 + 1; from llama.cpp's GGUF
/// (`rope.scaling.type` yarn) too.
#[test]
fn qwen2_5_with_yarn() {
    check("qwen2.5-yarn");
}

#[test]
fn qwen3_with_q_and_k_norms() {
    check("qwen3");
}

#[test]
fn phi3_with_fused_projections() {
    check("phi3");
}

/// Phi-4-mini: Phi-3.5's longrope on the first 3/4 of each head's dims (partial RoPE: a factor per
/// rotating pair, cos and sin scaled on those only), the rest passing through; from GGUF,
/// llama.cpp's `rope.dimension_count`.
#[test]
fn phi4_mini_with_partial_longrope() {
    check("phi4-mini");
}

/// OLMo 2: no norm before attention or the MLP, one after each on what it adds to the stream, and
/// q and k RMS-normed across all heads (a weight of heads x head_dim); from GGUF, llama.cpp's names.
#[test]
fn olmo2_with_post_norms_only_and_whole_width_qk_norms() {
    check("olmo2");
}

/// OLMo 3: OLMo 2 with an 8-token window on three layers of four, those rotating with a base of
/// their own (transformers 5's `rope_parameters` per layer type). No GGUF: llama.cpp has no olmo3.
#[test]
fn olmo3_with_windows_on_three_layers_of_four() {
    check("olmo3");
}

/// Gemma (1): GeGLU from the legacy `hidden_act: "gelu"` its releases ship (the tanh approximation,
/// as transformers reads it), embeddings times sqrt(hidden), (1 + w) norms before each block only;
/// from GGUF, llama.cpp's names and its norms stored as 1 + w.
#[test]
fn gemma_with_its_legacy_gelu() {
    check("gemma");
}

/// Gemma 2: GeGLU, embeddings times sqrt(hidden), (1 + w) norms before and after attention and the
/// MLP, soft-capped scores and logits, and an 8-token sliding window on layer 0 beside full
/// attention on layer 1; from GGUF, llama.cpp's names and its norms stored as 1 + w.
#[test]
fn gemma2_with_post_norms_soft_caps_and_alternating_windows() {
    check("gemma2");
}

/// Phi-3.5: Phi-3 with longrope (per-frequency factors, cos and sin scaled by its attention factor),
/// its long factors in use (a context of 256 served beside a pretrained one of 16); from GGUF, the
/// factors as llama.cpp's `rope_factors_long`/`_short` tensors.
#[test]
fn phi3_5_with_longrope() {
    check("phi3.5");
}

/// Gemma 3 (text): Gemma 2's layout with (1 + w) norms of each head's q and k, no soft-capping, an
/// 8-token window on five layers and full attention on the sixth, the sliding layers rotating with
/// base 10000 and the full one with base 1e6 scaled linearly by 8 (per layer type, as transformers
/// 5 writes `rope_parameters`); from GGUF (`gemma3`), llama.cpp's pattern of six and local base.
#[test]
fn gemma3_with_qk_norms_and_rope_per_layer_type() {
    check("gemma3");
}

/// Mixtral: each token's top 2 of 4 SwiGLU experts (`block_sparse_moe.experts.{e}.w1/w2/w3`),
/// their router weights renormalized; from GGUF, llama with experts, each projection of the
/// experts stacked (`ffn_*_exps`) and the router as `ffn_gate_inp`.
#[test]
fn mixtral_routing_each_token_to_two_of_four_experts() {
    check("mixtral");
}

/// Qwen 3 MoE: Qwen 3's attention, each token's top 2 of 8 experts of an intermediate size of their
/// own (`moe_intermediate_size`), renormalized (`norm_topk_prob`); from GGUF, `qwen3moe`.
#[test]
fn qwen3_moe_with_experts_of_their_own_size() {
    check("qwen3-moe");
}

/// OLMoE: q and k normed across all heads, each token's top 3 of 8 experts, weighted by their
/// probabilities as the softmax over all 8 gave them (not renormalized).
#[test]
fn olmoe_with_weights_not_renormalized() {
    check("olmoe");
}

/// A GGUF file names its tensors as the family's HF checkpoint does, and each name reads back as
/// the checkpoint's tensor, bytes and shape: what `highrise convert` and Python's `Model.weight`
/// give. A mixture's experts each apart (llama.cpp stacks them; Mixtral's
/// `block_sparse_moe.experts.{e}.w1`); GPT-2's Conv1D weights transposed back and q, k, v fused in
/// `transformer.h.{l}.attn.c_attn`; GPT-NeoX's `query_key_value` interleaved head by head again
/// (llama.cpp reorders it to q, k, v), Bloom's too; StarCoder 2's, Phi's and MPT's own names.
/// llama.cpp writes Bloom's tied unembedding again as `output`: there, an `lm_head.weight` that is
/// the embedding's bytes, beside the checkpoint's names.
#[test]
fn a_ggufs_tensors_are_named_and_laid_out_as_the_checkpoints() {
    for family in ["mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "granitemoe", "gpt2", "pythia", "starcoder2", "phi2", "stablelm", "cohere", "falcon", "falcon-40b", "bloom", "mpt", "gpt-bigcode"] {
        let d = dir(family);
        let (hf, gguf) = (Source::open(&d).unwrap(), Source::open(&d.join("model.gguf")).unwrap());
        let mut names = gguf.tensor_names();
        if family == "bloom" {
            let (head, embed) = (gguf.tensor("lm_head.weight").unwrap().unwrap(), hf.tensor("transformer.word_embeddings.weight").unwrap().unwrap());
            assert_eq!((&head.dims, head.data.as_ref()), (&embed.dims, embed.data.as_ref()), "bloom: the GGUF's output is the embedding");
            names.retain(|n| n != "lm_head.weight");
        }
        names.sort();
        let mut want = hf.tensor_names();
        want.sort();
        assert_eq!(names, want, "{family}: the GGUF's names");
        for name in &names {
            let (a, b) = (gguf.tensor(name).unwrap().unwrap(), hf.tensor(name).unwrap().unwrap());
            assert_eq!((&a.dims, a.data.as_ref()), (&b.dims, b.data.as_ref()), "{family}: {name}");
        }
    }
}

/// Mixtral as llama.cpp's Q4_0 leaves it (every matrix Q4_0, the stacked experts' too; the router
/// f32): each expert sliced from its stack keeps the file's blocks (repacked 8 rows interleaved for
/// the CPU's kernels), its logits HF's for the same weights quantized and dequantized again
/// (`reference-q4_0.json`) and those of the file dequantized at load.
#[test]
fn mixtral_quantized_q4_0_keeps_its_experts_blocks() {
    use highrise::core::DType;
    use highrise::model::{Experts, Mlp, WeightFormat};
    let d = dir("mixtral");
    let (_, prompt, hf) = reference("mixtral", "reference-q4_0.json");
    let source = Source::open(&d.join("model-q4_0.gguf")).unwrap();
    let q = Llama::load(&source, cpu(), LoadOptions::default()).unwrap();
    let Mlp::Moe(moe) = &q.layers[1].mlp else { panic!("layer 1 is a mixture") };
    let Experts::Each(experts) = &moe.experts else { panic!("the CPU backend keeps a mixture's experts apart") };
    assert_eq!((experts[3].w_down.dtype(), moe.router.dtype()), (DType::Q4_0R8, DType::F32));
    let f = Llama::load(&source, cpu(), LoadOptions { weights: WeightFormat::Convert(DType::F32), ..Default::default() }).unwrap();
    let (a, b) = (q.prompt_logits(&prompt).unwrap().to_f32().unwrap(), f.prompt_logits(&prompt).unwrap().to_f32().unwrap());
    println!("mixtral q4_0: within {:.1e} of HF's, {:.1e} of the same weights dequantized", worst_of(&a, &hf), worst_of(&a, &b));
    assert!(worst_of(&a, &hf) <= 1e-4, "q4_0 against HF's: {}", worst_of(&a, &hf));
    assert!(worst_of(&a, &b) <= 1e-4, "q4_0 against dequantized: {}", worst_of(&a, &b));
}

/// A mixture under continuous batching: six requests of different prompts and lengths share steps
/// (an expert's tokens then come from several sequences, prompts' chunks beside decoding rows), and
/// each gets exactly the greedy tokens it gets alone.
#[test]
fn a_mixture_batched_gives_each_request_its_tokens_alone() {
    use highrise::engine::{Engine, EngineConfig, Request};
    let m = Llama::load(&Source::open(&dir("qwen3-moe")).unwrap(), cpu(), LoadOptions::default()).unwrap();
    let tok = Tokenizer::numbered(m.config.vocab_size).unwrap();
    let reqs: Vec<Request> = (0..6u32)
        .map(|i| {
            let prompt = (0..5 + 7 * i).map(|j| (j * 31 + i * 17 + 3) % 512).collect();
            let params = GenerateParams { max_tokens: 4 + 2 * i as usize, ignore_eos: true, ..Default::default() };
            Request { prompt, params, logprobs: false, top_logprobs: 0 }
        })
        .collect();
    let config = EngineConfig { num_blocks: 64, block_size: 4, max_batch_tokens: 24, max_running: 6 };
    let mut engine = Engine::new(&m, &tok, config).unwrap();
    for r in &reqs {
        engine.submit(r.clone()).unwrap();
    }
    let mut done = engine.run_to_completion().unwrap();
    done.sort_by_key(|d| d.0);
    for ((_, got), r) in done.iter().zip(&reqs) {
        let alone = generate(&m, &tok, &r.prompt, &r.params, &mut |_| {}).unwrap();
        assert_eq!(got.ids, alone.ids, "prompt of {} tokens", r.prompt.len());
    }
}

/// A mixture's router scores taken into the pass's capture buffer (`Hooks::defer`, sized for the
/// mixture layers alone) equal those read as the pass reaches them; the dense layer has none.
#[test]
fn router_scores_deferred_equal_router_scores_read_at_once() {
    use highrise::model::ModelConfig;
    let m = Llama::random(ModelConfig::shape("tiny-qwen3-moe").unwrap(), cpu(), highrise::core::DType::F32, 3).unwrap();
    let prompt: Vec<u32> = (0..9).map(|i| i * 37 % 512).collect();
    let run = |defer: bool| {
        let mut hooks = Hooks { defer, ..Hooks::capture_all(&[Site::Router, Site::MlpOut]) };
        m.prefill_hooked(&prompt, Logits::Last, Some(&mut hooks)).unwrap();
        hooks.collect().unwrap();
        hooks.captured
    };
    let (at_once, deferred) = (run(false), run(true));
    assert_eq!(at_once.keys().copied().collect::<Vec<_>>(), [(Site::MlpOut, 0), (Site::MlpOut, 1), (Site::Router, 1)]);
    assert_eq!(at_once[&(Site::Router, 1)].len(), 9 * 8);
    assert_eq!(deferred, at_once);
}

/// Qwen 2 MoE: Qwen 2's attention (q/k/v biases), each token's top 2 of 8 experts (not
/// renormalized) beside a shared expert every token goes through, scaled by its sigmoid gate; from
/// GGUF (`qwen2moe`), the gate a vector as llama.cpp keeps it.
#[test]
fn qwen2_moe_with_a_gated_shared_expert() {
    check("qwen2-moe");
}

/// Granite 3: Llama with multipliers of the embeddings (12), of what attention and the MLP add to
/// the stream (0.22), of the scores (in place of 1/sqrt(head_dim)) and a divisor of the logits (4);
/// from GGUF, llama.cpp's `granite` keys.
#[test]
fn granite_with_its_four_multipliers() {
    check("granite");
}

/// Granite 3 MoE: Granite's multipliers and each token's top 2 of 4 experts, every expert in one
/// tensor per layer with gate and up fused (`block_sparse_moe.input_linear` [E, 2I, H]); from GGUF,
/// llama.cpp's stacks of each projection apart.
#[test]
fn granitemoe_with_experts_fused_in_one_tensor() {
    check("granitemoe");
}

/// GPT-2: LayerNorm (weight and bias), learned absolute positions added to the embeddings, a GELU
/// MLP without a gate, biases on every projection, Conv1D weights ([in, out]) read transposed and
/// q, k, v as columns of `c_attn`; from GGUF, llama.cpp's `gpt2` (transposed, `attn_qkv` fused,
/// `position_embd`).
#[test]
fn gpt2_with_learned_positions_and_conv1d_weights() {
    check("gpt2");
}

/// Pythia (GPT-NeoX): attention and the MLP side by side on the stream as it enters the layer, each
/// through its own LayerNorm; RoPE on a quarter of each head; the exact (erf) GELU; q, k and v
/// interleaved head by head in `query_key_value`, which llama.cpp's `gptneox` reorders to q, k, v.
#[test]
fn pythia_with_parallel_attention_and_mlp() {
    check("pythia");
}

/// StarCoder 2: LayerNorm with biases, grouped-query attention with biases, `c_fc`/`c_proj` MLP
/// with the tanh GELU.
#[test]
fn starcoder2_with_layernorm_and_biases() {
    check("starcoder2");
}

/// Phi-2: one LayerNorm read by attention and the MLP side by side, RoPE on half of each head, the
/// unembedding's bias.
#[test]
fn phi2_with_one_norm_for_attention_and_the_mlp() {
    check("phi2");
}

/// StableLM 2: LayerNorm (weight and bias) with a gated SwiGLU MLP, RoPE on a quarter of each head,
/// q/k/v biases; and side by side (`use_parallel_residual`: one norm feeding attention and the
/// MLP, as its 12B has it).
#[test]
fn stablelm_with_layernorm_and_swiglu_sequential_and_side_by_side() {
    check("stablelm");
    check("stablelm-parallel");
}

/// OPT: LayerNorm before each block, learned positions read from row 2 of their table on, a ReLU
/// MLP without a gate (`fc1`, `fc2`), biases on every projection, tied embeddings; the tensors
/// under `model.decoder.` as transformers saves them (and without `model.`, as the released
/// checkpoints have them: read below). llama.cpp has no OPT: no GGUF.
#[test]
fn opt_with_offset_positions_and_a_relu_mlp() {
    check("opt");
}

/// GPT-J: one LayerNorm feeding attention and the MLP side by side, RoPE on adjacent pairs of the
/// first `rotary_dim` (8) of each head's 16 dims, no attention biases, a tanh-GELU MLP with
/// biases, an untied unembedding with a bias; under `transformer.`. No GGUF (llama.cpp's
/// converter has none).
#[test]
fn gptj_with_rope_on_adjacent_pairs_of_part_of_each_head() {
    check("gptj");
}

/// Cohere (Command R): LayerNorm without a bias feeding attention and a SwiGLU MLP side by side,
/// RoPE on adjacent pairs of every dim, logits times `logit_scale`; attention biases on here (o_proj's
/// too), so the q and k biases' elements move with their rows. From llama.cpp's `command-r` GGUF too.
#[test]
fn cohere_with_rope_on_adjacent_pairs_and_scaled_logits() {
    check("cohere");
}

/// Command R7B and A (`cohere2`): Cohere's layout with an 8-token window on three layers of each four
/// beside the 20-token prompt, RoPE on those alone (the fourth sees every key, unrotated); from
/// llama.cpp's `cohere2` GGUF too (its window on the same layers, no key holding the pattern).
#[test]
fn cohere2_with_windows_and_rope_on_three_layers_of_four() {
    check("cohere2");
}

/// ERNIE 4.5: a Llama rotating adjacent pairs of dims (the loader's row move, as for GPT-J), tied;
/// from llama.cpp's `ernie4_5` GGUF too (q and k as HF has them).
#[test]
fn ernie4_5_with_rope_on_adjacent_pairs() {
    check("ernie4_5");
}

/// Helium 1: a Llama rotating adjacent pairs, q/k/v biases (o_proj without, whatever
/// attention_bias says). No GGUF (llama.cpp has no Helium).
#[test]
fn helium_with_rope_on_adjacent_pairs_and_qkv_biases() {
    check("helium");
}

/// GLM-4 9B: a Llama rotating adjacent pairs of the first half of each head (partial RoPE and the
/// row move together, as GPT-J's), gate and up fused as Phi-3's, q/k/v biases (o_proj without).
#[test]
fn glm_with_half_heads_rotating_adjacent_pairs_and_fused_gate_up() {
    check("glm");
}

/// nanochat: weightless RMSNorms (on the embeddings too; q's and k's after RoPE, the same as before
/// it), RoPE turning the other way (q's and k's second halves negated at load, back in captures), a
/// squared-ReLU MLP without a gate, soft-capped logits. No GGUF.
#[test]
fn nanochat_with_weightless_norms_and_rope_turning_back() {
    check("nanochat");
}

/// VaultGemma: Gemma 2 without the norms after attention and the MLP (its MLP's norm before under
/// Gemma 2's name), soft-capped scores and logits, a window on every other layer. No GGUF.
#[test]
fn vaultgemma_as_gemma2_without_its_norms_after_the_blocks() {
    check("vaultgemma");
}

/// Jais 2: LayerNorms, a squared-ReLU MLP without a gate and biases on every projection, RoPE over
/// whole heads. No GGUF.
#[test]
fn jais2_with_layernorms_and_an_ungated_squared_relu_mlp() {
    check("jais2");
}

/// Seed-OSS: a Llama with q/k/v biases and o_proj's under a flag of its own (attention_out_bias).
/// No GGUF.
#[test]
fn seed_oss_with_qkv_and_output_biases() {
    check("seed-oss");
}

/// GLM-4-0414: GLM-4 9B with Gemma 2's RMSNorms after attention and the MLP too, under names of its
/// own (its post_attention_layernorm is the MLP's norm before, as a Llama's). No GGUF.
#[test]
fn glm4_with_norms_before_and_after_each_block() {
    check("glm4");
}

/// EXAONE 4: OLMo 2's RMSNorms after attention and the MLP (none before), each head's q and k
/// RMS-normed (Qwen 3's), an 8-token window on three layers of four beside the 20-token prompt and
/// RoPE on those alone. No GGUF.
#[test]
fn exaone4_with_norms_after_blocks_and_rope_on_windowed_layers() {
    check("exaone4");
}

/// Falcon 7B: attention and a GELU MLP side by side through one LayerNorm, multi-query (q, k and v
/// fused: every q head, then the one k and v), tied embeddings; llama.cpp's `falcon` GGUF too.
#[test]
fn falcon_multi_query_with_one_norm() {
    check("falcon");
}

/// Falcon 40B: q, k and v fused by key/value group (each group's q heads, its k, its v), a norm each
/// for attention and the MLP (`ln_attn`, `ln_mlp`), biases (on here), untied; from llama.cpp's GGUF
/// too, which regroups the fused rows as q, k, v and names the second norm `attn_norm_2`.
#[test]
fn falcon_40b_grouped_qkv_and_two_norms() {
    check("falcon-40b");
}

/// Bloom: ALiBi in place of positions (6 heads: the four slopes of a power of two, then two
/// between them), a LayerNorm on the embeddings, q, k and v fused head by head, biases everywhere,
/// Megatron's tanh GELU, tied embeddings; from llama.cpp's `bloom` GGUF too ([q; k; v], the
/// embeddings' norm `token_embd_norm`, the tied unembedding written again as `output`).
#[test]
fn bloom_with_alibi_and_normed_embeddings() {
    check("bloom");
}

/// GPT-BigCode (StarCoder, SantaCoder): GPT-2's layout (learned positions, LayerNorm, biases, a
/// tanh-GELU MLP) with Linear weights and multi-query attention (`c_attn`: every q head, then the one
/// k and v); from llama.cpp's `starcoder` GGUF too.
#[test]
fn gpt_bigcode_multi_query_with_learned_positions() {
    check("gpt-bigcode");
}

/// MPT: ALiBi as MPT biases it (from the last key, its own way to the slopes; 6 heads), LayerNorm
/// without a bias, q, k and v fused one after another, no biases, the exact GELU, tied; the config's
/// `attn_config` read; from llama.cpp's `mpt` GGUF too (`attention.max_alibi_bias`).
#[test]
fn mpt_with_alibi_and_bias_free_layernorm() {
    check("mpt");
}

/// Nemotron (Minitron): LayerNorm1P (the weight as saved is w, the norm multiplies by 1 + w), a
/// squared-ReLU MLP without a gate, RoPE on half of each head, attention and MLP biases (on here);
/// from llama.cpp's `nemotron` GGUF too, which stores the norms as 1 + w.
#[test]
fn nemotron_with_layernorm_1p_and_a_squared_relu() {
    check("nemotron");
}

/// OLMo 1: LayerNorms with neither weight nor bias (ones and zeros), a SwiGLU MLP, no biases; from
/// llama.cpp's `olmo` GGUF too (q/k rows permuted as a Llama's, no norm tensors at all).
#[test]
fn olmo_with_layernorms_without_weights() {
    check("olmo");
}

/// Arcee (AFM-4.5B): a Llama with a squared-ReLU MLP without a gate (biases on here) and YaRN
/// (factor 2 over an original context of 64); from llama.cpp's `arcee` GGUF too.
#[test]
fn arcee_with_a_squared_relu_and_yarn() {
    check("arcee");
}

/// GPT-J and Cohere rotate adjacent dims (2i, 2i + 1); the loader moves q's and k's rows so that
/// every backend's RoPE on halves serves, and the captures of q and k move them back: layer 0's q
/// and k after RoPE are HF's, dim for dim, prompt and decode alike. Without the move back they
/// would not be (checked: the dims differ), and a score q . k is the same either way. nanochat's
/// RoPE turns the other way: the loader negates each head's second half of q and k, the captures
/// negate it back (checked: without, the halves differ), after its weightless RMSNorms of q and k.
#[test]
fn q_and_k_captured_in_the_checkpoints_order_of_dims() {
    for family in ["gptj", "cohere", "nanochat"] {
        let (json, prompt, _) = reference(family, "reference.json");
        let m = Llama::load(&Source::open(&dir(family)).unwrap(), cpu(), LoadOptions::default()).unwrap();
        let flat = |key: &str| -> Vec<f32> { json[key].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32)).collect() };
        let mut hooks = Hooks { layers: Some([0].into()), ..Hooks::capture_all(&[Site::Q, Site::K]) };
        m.prefill_hooked(&prompt, Logits::Last, Some(&mut hooks)).unwrap();
        for (site, key) in [(Site::Q, "q0"), (Site::K, "k0")] {
            let (got, want) = (hooks.get(site, 0).unwrap(), flat(key));
            assert_eq!(got.len(), want.len(), "{family} {key}");
            let off = worst_of(got, &want);
            println!("{family}: layer 0's {key} within {off:.1e} of HF's");
            assert!(off <= 1e-4, "{family}: captured {key} differs from HF's by {off}");
            // Orders are told apart: each head's dims 1 and 2 swapped no longer match.
            let d = m.config.head_dim();
            let swapped: Vec<f32> = got.chunks_exact(d).flat_map(|h| { let mut h = h.to_vec(); h.swap(1, 2); h }).collect();
            assert!(worst_of(&swapped, &want) > 1e-3, "{family}: dims 1 and 2 swapped still match: the test cannot tell orders apart");
            let negated: Vec<f32> = got.chunks_exact(d).flat_map(|h| h.iter().enumerate().map(|(i, &x)| if i >= d / 2 { -x } else { x }).collect::<Vec<_>>()).collect();
            assert!(worst_of(&negated, &want) > 1e-3, "{family}: second halves negated still match: the test cannot tell signs apart");
        }
        // Deferred captures (as a graph step takes them) are moved back the same.
        let mut deferred = Hooks { layers: Some([0].into()), defer: true, ..Hooks::capture_all(&[Site::Q, Site::K]) };
        m.prefill_hooked(&prompt, Logits::Last, Some(&mut deferred)).unwrap();
        deferred.collect().unwrap();
        for site in [Site::Q, Site::K] {
            assert_eq!(deferred.get(site, 0), hooks.get(site, 0), "{family}: deferred {site:?}");
        }
    }
}

/// The logit lens at the last layer is the model's own prediction, in every family's final norm
/// (LayerNorm with its bias, Cohere's without, Gemma's 1 + w RMSNorm) and head (biases, Gemma 2's
/// soft-cap, Cohere's and Granite's scales): its top tokens and probabilities are HF's.
#[test]
fn the_logit_lens_at_the_last_layer_is_hfs_prediction() {
    for family in ["llama3.2", "gpt2", "pythia", "phi2", "opt", "gptj", "cohere", "falcon-40b", "nemotron", "olmo", "gemma2", "granite", "bloom", "mpt", "gpt-bigcode"] {
        let (_, prompt, want) = reference(family, "reference.json");
        let m = Llama::load(&Source::open(&dir(family)).unwrap(), cpu(), LoadOptions::default()).unwrap();
        let mut hooks = Hooks::capture_all(&[Site::ResidPost]);
        m.prefill_hooked(&prompt, Logits::Last, Some(&mut hooks)).unwrap();
        let last = m.config.num_hidden_layers - 1;
        let lens = highrise::model::introspect::logit_lens(&m, hooks.get(Site::ResidPost, last).unwrap(), 3).unwrap();
        let v = m.config.vocab_size;
        for (p, top) in lens.iter().enumerate() {
            let row = &want[p * v..(p + 1) * v];
            let max = row.iter().fold(f32::MIN, |a, &b| a.max(b));
            let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
            for (&id, &prob) in top.tokens.iter().zip(&top.probs) {
                let hf = (((row[id as usize] - max) as f64).exp() / sum) as f32;
                assert!((prob - hf).abs() <= 1e-4, "{family} position {p}: the lens gives {id} {prob}, HF {hf}");
            }
            let best = (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            assert_eq!(top.tokens[0] as usize, best, "{family} position {p}: the lens's top token");
        }
    }
}

/// Attention patterns recomputed from the captured q and k (`introspect::attention_probs`, scored as
/// each layer scores: Bloom's and MPT's ALiBi, Mistral's window, Gemma 2's cap and window and
/// scale, Qwen 3's normed q and k, GPT-J's adjacent pairs moved back) are the ones the model ran:
/// over the captured v they give each head's output, the captured `z`.
#[test]
fn attention_patterns_from_the_captures_give_each_heads_output() {
    for family in ["llama3.2", "mistral", "gemma2", "qwen3", "gptj", "cohere2", "ernie4_5", "helium", "glm", "glm4", "exaone4", "falcon", "bloom", "mpt", "vaultgemma", "nanochat"] {
        let (_, prompt, _) = reference(family, "reference.json");
        let m = Llama::load(&Source::open(&dir(family)).unwrap(), cpu(), LoadOptions::default()).unwrap();
        let mut hooks = Hooks::capture_all(&[Site::Q, Site::K, Site::V, Site::Z]);
        m.prefill_hooked(&prompt, Logits::Last, Some(&mut hooks)).unwrap();
        let (t, hq, hkv, d) = (prompt.len(), m.config.num_attention_heads, m.config.kv_heads(), m.config.head_dim());
        for l in 0..m.config.num_hidden_layers {
            let get = |site: Site| hooks.get(site, l).unwrap_or_else(|| panic!("{family}: no {site:?} at layer {l}"));
            let probs = highrise::model::introspect::attention_probs(get(Site::Q), get(Site::K), [hq, hkv, d], m.config.scores(l));
            let v = get(Site::V);
            let mut z = vec![0f32; t * hq * d];
            for h in 0..hq {
                let g = h / (hq / hkv);
                for i in 0..t {
                    for j in 0..t {
                        let p = probs[(h * t + i) * t + j];
                        for c in 0..d {
                            z[(i * hq + h) * d + c] += p * v[(j * hkv + g) * d + c];
                        }
                    }
                }
            }
            let off = worst_of(get(Site::Z), &z);
            assert!(off <= 1e-4, "{family} layer {l}: the recomputed pattern over v is {off} from z");
        }
    }
}

/// OPT's released checkpoints were saved from the base model: their tensors are named without
/// `model.` (`decoder.layers.0.fc1.weight`); read so, the same logits.
#[test]
fn opt_saved_without_its_prefix() {
    let d = dir("opt");
    let tmp = std::env::temp_dir().join(format!("highrise-opt-unprefixed-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(d.join("config.json"), tmp.join("config.json")).unwrap();
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().map(|(n, v)| (n.strip_prefix("model.").expect("saved under model.").to_string(), v)).collect();
    safetensors::serialize_to_file(views, None, &tmp.join("model.safetensors")).unwrap();
    let (_, prompt, want) = reference("opt", "reference.json");
    let m = Llama::load(&Source::open(&tmp).unwrap(), cpu(), LoadOptions::default()).unwrap();
    let got = m.prompt_logits(&prompt).unwrap().to_f32().unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(worst_of(&got, &want) <= 1e-4, "OPT without its prefix: logits differ from HF by {}", worst_of(&got, &want));
}

/// The MLP's activations (`Site::MlpPost`, TransformerLens's `mlp.hook_post`) are what its down
/// projection reads: times the file's down_proj (and its bias), they are the captured `mlp_out`
/// (itself held to HF's logits above); attention's output per head (`Site::Z`, `attn.hook_z`)
/// times o_proj (and its bias) is `attn_out`. The stream between attention and the MLP
/// (`ResidMid`) is what entered plus attention's output; side by side (GPT-NeoX, Phi) there is none.
#[test]
fn mlp_activations_heads_and_the_stream_between_the_blocks() {
    for family in ["llama3.2", "qwen2.5", "gpt2", "pythia", "starcoder2", "phi2", "stablelm", "stablelm-parallel", "opt", "gptj", "cohere", "falcon", "falcon-40b", "nemotron", "olmo", "arcee", "bloom", "mpt", "gpt-bigcode", "cohere2", "glm", "jais2", "seed-oss", "nanochat"] {
        let d = dir(family);
        let source = Source::open(&d).unwrap();
        let m = Llama::load(&source, cpu(), LoadOptions::default()).unwrap();
        let (_, prompt, _) = reference(family, "reference.json");
        let sites = [Site::ResidPre, Site::Z, Site::AttnOut, Site::ResidMid, Site::MlpPost, Site::MlpOut];
        let mut hooks = Hooks::capture_all(&sites);
        m.prefill_hooked(&prompt, Logits::Last, Some(&mut hooks)).unwrap();
        let (h, i, q) = (m.config.hidden_size, m.config.intermediate_size, m.config.num_attention_heads * m.config.head_dim());
        for l in 0..m.config.num_hidden_layers {
            let project = |x: &[f32], proj: &str, k: usize| {
                assert_eq!(x.len(), prompt.len() * k, "{family}: {proj}'s input's shape");
                projected(&source, &format!("model.layers.{l}.{proj}"), x, k, h)
            };
            let want = project(hooks.get(Site::MlpPost, l).unwrap(), "mlp.down_proj", i);
            let off = worst_of(hooks.get(Site::MlpOut, l).unwrap(), &want);
            assert!(off <= 1e-4, "{family} layer {l}: down_proj(mlp_post) is {off} from mlp_out");
            let want = project(hooks.get(Site::Z, l).unwrap(), "self_attn.o_proj", q);
            let off = worst_of(hooks.get(Site::AttnOut, l).unwrap(), &want);
            assert!(off <= 1e-4, "{family} layer {l}: o_proj(z) is {off} from attn_out");
            let mid = hooks.get(Site::ResidMid, l);
            if m.config.parallel_residual() {
                assert!(mid.is_none(), "{family}: no stream between attention and the MLP side by side");
            } else {
                let (pre, attn) = (hooks.get(Site::ResidPre, l).unwrap(), hooks.get(Site::AttnOut, l).unwrap());
                let sum: Vec<f32> = pre.iter().zip(attn).map(|(a, b)| a + b).collect();
                assert_eq!(mid.unwrap(), &sum[..], "{family} layer {l}: resid_mid");
            }
        }
    }
}

/// Activation patching at any patchable site: each site patched with its own values changes no
/// logit; a head zeroed in `z` at every position is zero in the captured z, the attention output is
/// o_proj of the patched z, and the logits move; the MLP's output zeroed at a position leaves the
/// stream there as it was between the blocks; a site no patch may replace (q) or one the layer lacks
/// (a mixture's mlp_post) is refused, naming it.
#[test]
fn patching_any_site() {
    use highrise::model::{ModelConfig, Patch};
    for family in ["llama3.2", "gpt2"] {
        let source = Source::open(&dir(family)).unwrap();
        let m = Llama::load(&source, cpu(), LoadOptions::default()).unwrap();
        let (_, prompt, _) = reference(family, "reference.json");
        let t = prompt.len();
        let all = [Site::Z, Site::AttnOut, Site::ResidMid, Site::MlpPost, Site::MlpOut, Site::ResidPost];
        let run = |patch: Vec<Patch>| {
            let mut hooks = Hooks { patch, ..Hooks::capture_all(&all) };
            let logits = m.prefill_hooked(&prompt, Logits::All, Some(&mut hooks)).unwrap().to_f32().unwrap();
            (logits, hooks)
        };
        let (clean, cache) = run(vec![]);
        let row = |site: Site, l: usize, p: usize| {
            let v = cache.get(site, l).unwrap();
            let w = v.len() / t;
            v[p * w..(p + 1) * w].to_vec()
        };
        for site in [Site::Z, Site::AttnOut, Site::MlpPost, Site::MlpOut] {
            let same: Vec<Patch> = (0..t).map(|p| Patch { layer: 1, position: p, values: row(site, 1, p), site }).collect();
            assert_eq!(run(same).0, clean, "{family}: {} patched with itself", site.name());
        }
        // Head 1 of layer 0 ablated (zero) at every position.
        let (hq, d) = (m.config.num_attention_heads, m.config.head_dim());
        let ablate: Vec<Patch> = (0..t)
            .map(|p| {
                let mut z = row(Site::Z, 0, p);
                z[d..2 * d].iter_mut().for_each(|v| *v = 0.0);
                Patch { layer: 0, position: p, values: z, site: Site::Z }
            })
            .collect();
        let (ablated, hooks) = run(ablate);
        let z = hooks.get(Site::Z, 0).unwrap();
        assert!((0..t).all(|p| z[(p * hq + 1) * d..(p * hq + 2) * d].iter().all(|&v| v == 0.0)), "{family}: head 1 reads zero");
        let (h, q) = (m.config.hidden_size, hq * d);
        let want = projected(&source, "model.layers.0.self_attn.o_proj", z, q, h);
        assert!(worst_of(hooks.get(Site::AttnOut, 0).unwrap(), &want) <= 1e-4, "{family}: attn_out is o_proj of the ablated z");
        assert!(worst_of(&ablated, &clean) > 1e-3, "{family}: ablating a head moves the logits");
        // The MLP's output zeroed at position 3 of layer 1: the stream leaves as it was between.
        let (_, hooks) = run(vec![Patch { layer: 1, position: 3, values: vec![0.0; h], site: Site::MlpOut }]);
        let (mid, post) = (hooks.get(Site::ResidMid, 1).unwrap(), hooks.get(Site::ResidPost, 1).unwrap());
        assert_eq!(&post[3 * h..4 * h], &mid[3 * h..4 * h], "{family}: zero mlp_out adds nothing");
        assert_ne!(&post[4 * h..5 * h], &mid[4 * h..5 * h], "{family}: other positions keep theirs");
        let e = m
            .prefill_hooked(&prompt, Logits::Last, Some(&mut Hooks { patch: vec![Patch { layer: 0, position: 0, values: vec![0.0; q], site: Site::Q }], ..Default::default() }))
            .unwrap_err()
            .to_string();
        assert!(e.contains("patching q") && e.contains("mlp_post"), "{e}");
    }
    let moe = Llama::random(ModelConfig::shape("tiny-qwen3-moe").unwrap(), cpu(), highrise::core::DType::F32, 1).unwrap();
    let patch = vec![Patch { layer: 1, position: 0, values: vec![0.0; 4], site: Site::MlpPost }];
    let e = moe.prefill_hooked(&[1, 2], Logits::Last, Some(&mut Hooks { patch, ..Default::default() })).unwrap_err().to_string();
    assert!(e.contains("layer 1") && e.contains("mlp_post"), "{e}");
}

/// Mixtral as llama.cpp wrote it before it stacked the experts (`blk.{l}.ffn_gate.{e}.weight`...:
/// most Mixtral GGUF files of early 2024): HF's logits, and the checkpoint's names.
#[test]
fn mixtral_from_a_gguf_of_one_tensor_per_expert() {
    let d = dir("mixtral");
    let (_, prompt, want) = reference("mixtral", "reference.json");
    let source = Source::open(&d.join("model-per-expert.gguf")).unwrap();
    let got = Llama::load(&source, cpu(), LoadOptions::default()).unwrap().prompt_logits(&prompt).unwrap().to_f32().unwrap();
    println!("mixtral, one tensor per expert: within {:.1e} of HF's", worst_of(&got, &want));
    assert!(worst_of(&got, &want) <= 1e-4);
    let (mut names, mut hf) = (source.tensor_names(), Source::open(&d).unwrap().tensor_names());
    names.sort();
    hf.sort();
    assert_eq!(names, hf);
}

/// Seeded random damage to the header of each mixture's and LayerNorm family's GGUF (its metadata
/// and tensor table: expert counts, shapes, types, offsets), then every tensor listed read under its
/// checkpoint name (slices of stacks, GPT-2's transposes, GPT-NeoX's re-interleaving), a load and a
/// forward pass: an error or a run, never a panic.
#[test]
fn damaged_ggufs_are_refused_or_run_never_panic() {
    // HIGHRISE_FUZZ_CASES and HIGHRISE_FUZZ_SEED run a longer or another search by hand.
    let fuzz = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let mut state = fuzz("HIGHRISE_FUZZ_SEED").unwrap_or(0x2545_f491) | 1;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n.max(1) as u64) as usize
    };
    let path = std::env::temp_dir().join(format!("highrise-gguf-damage-{}.gguf", std::process::id()));
    let (mut ran, mut refused) = (0, 0);
    for family in ["mixtral", "qwen2-moe", "granitemoe", "gpt2", "pythia", "phi2", "cohere", "falcon-40b", "bloom", "mpt"] {
        let whole = std::fs::read(dir(family).join("model.gguf")).unwrap();
        // The header: everything before the first tensor's data (4 KiB covers these tiny files').
        let header = 4096.min(whole.len());
        for _ in 0..fuzz("HIGHRISE_FUZZ_CASES").unwrap_or(100) {
            let mut b = whole.clone();
            for _ in 0..1 + next(3) {
                let at = next(header);
                b[at] = match next(3) {
                    0 => 0xff,
                    1 => 0,
                    _ => next(256) as u8,
                };
            }
            std::fs::write(&path, &b).unwrap();
            let result = Source::open(&path)
                .and_then(|s| {
                    s.tensor_names().iter().try_for_each(|n| s.tensor(n).map(drop))?;
                    Llama::load(&s, cpu(), LoadOptions::default())
                })
                .and_then(|m| m.prompt_logits(&[1, 2, 3]).map_err(Into::into).and_then(|l| Ok(l.to_f32()?)));
            match result {
                Ok(_) => ran += 1,
                Err(_) => refused += 1,
            }
        }
    }
    std::fs::remove_file(&path).ok();
    println!("damaged GGUFs: {refused} refused, {ran} ran; no panic");
    assert!(refused > 0 && ran > 0, "the damage reached both outcomes");
}
