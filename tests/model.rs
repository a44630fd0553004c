//! The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against HuggingFace transformers' reference
//! outputs in ../shared/fixtures/smollm2: tokenizer, logits at every prompt position, greedy
//! continuations, KV-cache decoding, and the GGUF -> HF directory round trip.

mod common;

use std::sync::OnceLock;

use common::*;
use highrise::core::ops::PagedSeq;
use highrise::engine::{generate, GenerateParams};
use highrise::model::npy;
use highrise::core::DType;
use highrise::model::{Batch, Llama, LoadOptions, Logits, Source, Tokenizer, WeightFormat};

const CASES: [&str; 2] = ["story", "chat"];
/// How far an f16 KV cache may move the default model's logits from HF's, decoding token by token
/// (measured 2026-11-29: 1.1e-2 on the story prompt, 5.8e-2 on the chat one; 1.3e-4 with an f32 cache).
const BOUND_F16_KV: f32 = 0.1;

struct Loaded {
    model: Llama,
    tokenizer: Tokenizer,
}

/// The model with every weight dequantized to f32 (as the fixtures were made), loaded once.
fn loaded(path: &std::path::Path) -> &'static Loaded {
    static L: OnceLock<Loaded> = OnceLock::new();
    L.get_or_init(|| load_with(path, LoadOptions { weights: WeightFormat::Convert(DType::F32), ..Default::default() }))
}

/// The model kept in its file's Q4_1 (and Q8_0 embedding), used in place from the mapping.
fn loaded_q4(path: &std::path::Path) -> &'static Loaded {
    static L: OnceLock<Loaded> = OnceLock::new();
    L.get_or_init(|| load_with(path, LoadOptions::default()))
}

/// The Q4_1 model with 8-bit activations.
fn loaded_q8(path: &std::path::Path) -> &'static Loaded {
    static L: OnceLock<Loaded> = OnceLock::new();
    L.get_or_init(|| load_with(path, LoadOptions { q8_activations: true, ..Default::default() }))
}

fn load_with(path: &std::path::Path, opts: LoadOptions) -> Loaded {
    let source = Source::open(path).unwrap();
    let tokenizer = source.tokenizer().unwrap();
    let model = Llama::load(&source, cpu(), opts).unwrap();
    Loaded { model, tokenizer }
}

#[test]
fn tokenizer_from_gguf_matches_reference() {
    let Some((_, model, reference)) = fixtures_and_model("tokenizer") else { return };
    let tok = &loaded(&model).tokenizer;
    for case in reference["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(&case["ids"]), "tokenizing {text:?}");
    }
    for name in CASES {
        let c = &reference["cases"][name];
        let prompt = c["prompt"].as_str().unwrap();
        assert_eq!(tok.encode(prompt, true).unwrap(), ids(&c["input_ids"]), "prompt {name}");
        let greedy_text = c["greedy_text"].as_str().unwrap();
        assert_eq!(tok.decode(&ids(&c["greedy"])).unwrap(), greedy_text, "decoding {name}");
    }
}

#[test]
fn logits_match_reference_at_every_position() {
    let Some((fx, model, reference)) = fixtures_and_model("logits") else { return };
    let m = &loaded(&model).model;
    for name in CASES {
        let prompt = ids(&reference["cases"][name]["input_ids"]);
        let got = prefill_logits(m, &prompt);
        let (dims, want) = npy::read_f32(&fx.join(format!("{name}_logits.npy"))).unwrap();
        assert_eq!(dims, vec![prompt.len(), m.config.vocab_size]);
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-3, "{name}: logits differ from HF by up to {worst}");
        println!("{name}: max |logit - HF| = {worst:.2e}");
    }
}

/// Logits at every position of a prompt run in one prefill.
fn prefill_logits(m: &Llama, prompt: &[u32]) -> Vec<f32> {
    m.prompt_logits(prompt).unwrap().to_f32().unwrap()
}

/// Logits at every position of a prompt decoded one token at a time, each step reading the earlier
/// tokens' keys and values back from the paged cache.
fn decoded_logits(m: &Llama, prompt: &[u32]) -> Vec<f32> {
    let mut cache = m.new_kv_cache(prompt.len().div_ceil(16), 16).unwrap();
    let table: Vec<u32> = (0..cache.num_blocks as u32).collect();
    let mut all = Vec::new();
    for p in 0..prompt.len() {
        let seqs = [PagedSeq { q_len: 1, context_len: p as u32 + 1, blocks_start: 0 }];
        let pos = [p as u32];
        let batch = Batch { tokens: &prompt[p..p + 1], positions: &pos, slots: &pos, seqs: &seqs, block_table: &table };
        all.extend(m.forward(&batch, &mut cache, Logits::Last).unwrap().to_f32().unwrap());
    }
    all
}

#[test]
fn greedy_continuations_match_reference() {
    let Some((_, model, reference)) = fixtures_and_model("greedy") else { return };
    let l = loaded(&model);
    for name in CASES {
        let c = &reference["cases"][name];
        let (prompt, want) = (ids(&c["input_ids"]), ids(&c["greedy"]));
        let margins: Vec<f64> = c["greedy_margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
        let params = GenerateParams { max_tokens: want.len(), ..Default::default() };
        let got = generate(&l.model, &l.tokenizer, &prompt, &params, &mut |_| {}).unwrap();
        // Free-running greedy agrees up to the first step whose margin is too thin to call (story
        // step 12: 0.003); the fixtures README says so.
        let firm = margins.iter().position(|&m| m < 0.01).unwrap_or(want.len());
        assert_eq!(got.ids[..firm.min(got.ids.len())], want[..firm], "{name}: greedy ids");
        if firm == want.len() {
            assert_eq!(got.ids, want, "{name}: whole continuation");
        }
        // Teacher forcing: with the reference ids fed in, every firm step's argmax agrees.
        let full: Vec<u32> = prompt.iter().chain(&want).copied().collect();
        let logits = prefill_logits(&l.model, &full);
        let v = l.model.config.vocab_size;
        for (i, (&tok, &m)) in want.iter().zip(&margins).enumerate() {
            let row = &logits[(prompt.len() - 1 + i) * v..][..v];
            if m >= 0.01 {
                assert_eq!(highrise::engine::sampling::argmax(row), tok, "{name}: step {i} (margin {m})");
            }
        }
    }
}

#[test]
fn decoding_from_the_cache_equals_rerunning_the_sequence() {
    let Some((_, model, reference)) = fixtures_and_model("kv cache") else { return };
    let m = &loaded(&model).model;
    let c = &reference["cases"]["story"];
    let (prompt, cont) = (ids(&c["input_ids"]), ids(&c["greedy"]));
    let full: Vec<u32> = prompt.iter().chain(&cont[..12]).copied().collect();
    let want = prefill_logits(m, &full);
    let v = m.config.vocab_size;
    // Prefill the prompt, then feed the continuation one token at a time through the paged cache.
    let mut cache = m.new_kv_cache(full.len().div_ceil(16), 16).unwrap();
    // Blocks in reverse order: the cache must follow the table, not assume contiguity.
    let table: Vec<u32> = (0..cache.num_blocks as u32).rev().collect();
    let slot = |p: usize| table[p / 16] * 16 + (p % 16) as u32;
    let mut worst = 0f32;
    for end in prompt.len()..=full.len() {
        let start = if end == prompt.len() { 0 } else { end - 1 };
        let positions: Vec<u32> = (start as u32..end as u32).collect();
        let slots: Vec<u32> = (start..end).map(slot).collect();
        let seqs = [PagedSeq { q_len: (end - start) as u32, context_len: end as u32, blocks_start: 0 }];
        let batch = Batch { tokens: &full[start..end], positions: &positions, slots: &slots, seqs: &seqs, block_table: &table };
        let got = m.forward(&batch, &mut cache, Logits::Last).unwrap().to_f32().unwrap();
        let row = &want[(end - 1) * v..end * v];
        worst = got.iter().zip(row).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
    }
    println!("max |cached decode - full rerun| = {worst:.2e}");
    assert!(worst <= 1e-4, "cached decode differs from a full rerun by {worst}");
}

#[test]
fn convert_round_trip_gives_the_same_tokens_and_logits() {
    let Some((_, model, reference)) = fixtures_and_model("convert") else { return };
    let l = loaded(&model);
    let dir = std::env::temp_dir().join(format!("highrise-convert-{}", std::process::id()));
    highrise::model::convert::to_hf_dir(&Source::open(&model).unwrap(), &dir, &mut |_, _| {}).unwrap();
    for f in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(dir.join(f).is_file(), "convert wrote no {f}");
    }
    let source = Source::open(&dir).unwrap();
    let tok = source.tokenizer().unwrap();
    for case in reference["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(&case["ids"]), "{text:?} through tokenizer.json");
    }
    let chat = [highrise::model::Message::new("user", "What is the capital of France?")];
    assert_eq!(tok.apply_chat_template(&chat, true).unwrap(), l.tokenizer.apply_chat_template(&chat, true).unwrap());
    let hf = Llama::load(&source, cpu(), LoadOptions::default()).unwrap();
    for name in CASES {
        let prompt = ids(&reference["cases"][name]["input_ids"]);
        let (a, b) = (prefill_logits(&l.model, &prompt), prefill_logits(&hf, &prompt));
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-6, "{name}: the converted directory's logits differ by {worst}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn chat_template_reproduces_the_reference_prompt() {
    let Some((_, model, reference)) = fixtures_and_model("chat template") else { return };
    let tok = &loaded(&model).tokenizer;
    let messages = [highrise::model::Message::new("user", "What is the capital of France?")];
    let text = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(text, reference["cases"]["chat"]["prompt"].as_str().unwrap());
}

#[test]
fn stop_strings_end_the_text_before_them() {
    let Some((_, model, reference)) = fixtures_and_model("stop strings") else { return };
    let l = loaded(&model);
    let prompt = ids(&reference["cases"]["story"]["input_ids"]);
    let params = GenerateParams { max_tokens: 32, stop: vec![" the sun".into()], ..Default::default() };
    let mut streamed = String::new();
    let g = generate(&l.model, &l.tokenizer, &prompt, &params, &mut |s| streamed.push_str(s)).unwrap();
    assert_eq!(g.text, " girl named Emma who loved to play in");
    assert_eq!(streamed, g.text, "streamed pieces add up to the text, the stop string held back");
    assert_eq!(g.finish_reason, highrise::engine::FinishReason::Stop);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let Some((_, model, reference)) = fixtures_and_model("seeded sampling") else { return };
    let l = loaded(&model);
    let prompt = ids(&reference["cases"]["story"]["input_ids"]);
    let run = |seed: u64| {
        let sampling = highrise::engine::SamplingParams { temperature: 1.0, top_p: 0.95, top_k: 50, seed, ..Default::default() };
        let params = GenerateParams { max_tokens: 24, sampling, ..Default::default() };
        generate(&l.model, &l.tokenizer, &prompt, &params, &mut |_| {}).unwrap().ids
    };
    let (a, b, c) = (run(11), run(11), run(12));
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(a, c, "another seed, other tokens");
}

#[test]
fn q4_1_weights_in_place_match_reference() {
    let Some((fx, model, reference)) = fixtures_and_model("q4_1 in place") else { return };
    let l = loaded_q4(&model);
    // The file's format is kept: its blocks, 8 rows interleaved for the CPU's decode kernels.
    assert_eq!(l.model.layers[0].wq.dtype(), DType::Q4_1R8, "the file's format is kept");
    assert_eq!(l.model.embed.dtype(), DType::Q8_0);
    check_cases(&fx, &reference, l, "Q4_1 in place", prefill_logits, 1e-3, 0.01);
}

/// `repack: false` (`--no-repack`): Q4_1 projections in the file's own layout, read from the
/// mapping by the one-row kernels, prefill and decode alike.
#[test]
fn q4_1_weights_without_repacking_match_reference() {
    let Some((fx, model, reference)) = fixtures_and_model("q4_1 not repacked") else { return };
    let l = load_with(&model, LoadOptions { repack: false, ..Default::default() });
    assert_eq!(l.model.layers[0].wq.dtype(), DType::Q4_1, "the file's own layout is kept");
    check_cases(&fx, &reference, &l, "Q4_1 not repacked", decoded_logits, 1e-3, 0.01);
}

/// An f16 KV cache beside f32 activations (llama.cpp's default): keys and values rounded to f16
/// move the logits a little (bound below, measured 2026-11-29) and keep the greedy continuations
/// wherever the reference's choice is firm.
#[test]
fn an_f16_kv_cache_keeps_the_continuations() {
    let Some((fx, model, reference)) = fixtures_and_model("f16 kv cache") else { return };
    let l = load_with(&model, LoadOptions { kv_dtype: Some(DType::F16), ..Default::default() });
    assert_eq!(l.model.kv_dtype, DType::F16);
    assert_eq!(l.model.new_kv_cache(1, 16).unwrap().k[0].dtype(), DType::F16);
    // Token by token, so that every position past the first reads K/V back from the f16 cache.
    check_cases(&fx, &reference, &l, "f16 KV cache, decoded token by token", decoded_logits, BOUND_F16_KV, 0.05);
}

/// Each fixture case: `logits` within `bound` of HF's at every prompt position, and the greedy
/// continuation HF's up to the first step whose reference margin is under `firm`.
fn check_cases(
    fx: &std::path::Path,
    reference: &serde_json::Value,
    l: &Loaded,
    what: &str,
    logits: fn(&Llama, &[u32]) -> Vec<f32>,
    bound: f32,
    firm: f64,
) {
    for name in CASES {
        let c = &reference["cases"][name];
        let prompt = ids(&c["input_ids"]);
        let got = logits(&l.model, &prompt);
        let (_, want) = npy::read_f32(&fx.join(format!("{name}_logits.npy"))).unwrap();
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("{name}: {what}, max |logit - HF| = {worst:.2e}");
        assert!(worst <= bound, "{name}: {what}: logits differ from HF by up to {worst}");
        let margins: Vec<f64> = c["greedy_margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
        let want_ids = ids(&c["greedy"]);
        let params = GenerateParams { max_tokens: want_ids.len(), ..Default::default() };
        let g = generate(&l.model, &l.tokenizer, &prompt, &params, &mut |_| {}).unwrap();
        let firm = margins.iter().position(|&m| m < firm).unwrap_or(want_ids.len());
        assert_eq!(g.ids[..firm.min(g.ids.len())], want_ids[..firm], "{name}: {what}: greedy ids");
    }
}

/// The top token's margin over the runner-up in a row of logits.
fn top_margin(row: &[f32]) -> f32 {
    let top = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    top - row.iter().filter(|&&x| x < top).fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// Compares the top token of `got` and `want` ([positions, V] each) at every position; prints each
/// flip with the reference's margin and returns (agreeing, total, largest margin that flipped).
fn top1_agreement(what: &str, got: &[f32], want: &[f32], v: usize) -> (usize, usize, f32) {
    let argmax = |x: &[f32]| highrise::engine::sampling::argmax(x) as usize;
    let (mut agree, mut total, mut worst) = (0, 0, 0f32);
    for (pos, (g, w)) in got.chunks(v).zip(want.chunks(v)).enumerate() {
        total += 1;
        if argmax(g) == argmax(w) {
            agree += 1;
        } else {
            let margin = top_margin(w);
            worst = worst.max(margin);
            println!("{what} position {pos}: top-1 {} instead of {} (reference margin {margin:.3})", argmax(g), argmax(w));
        }
    }
    (agree, total, worst)
}

/// 8-bit activations (every quantized projection's input, prompt and decode alike, as llama.cpp
/// does) against the fixtures' logits at every prompt position. Their error in a logit is up to
/// about 1.7 here (mean of the worst per position about 0.9), so a position whose reference top two
/// are closer than that may flip: the top-1 must agree wherever the reference's margin is 0.1 or
/// more, and at 97% or more of all positions (the issue asks 99%; 45 of 46 is what these fixtures
/// give: the one flip has a reference margin of 0.08; `q8_activations_on_a_long_text` shows why no
/// 8-bit scheme gets further).
#[test]
fn q8_activations_agree_on_the_top_token() {
    let Some((fx, model, reference)) = fixtures_and_model("q8 activations") else { return };
    let m = &loaded_q8(&model).model;
    let v = m.config.vocab_size;
    let (mut agree, mut total) = (0, 0);
    for name in CASES {
        let prompt = ids(&reference["cases"][name]["input_ids"]);
        let (_, want) = npy::read_f32(&fx.join(format!("{name}_logits.npy"))).unwrap();
        let (a, t, worst) = top1_agreement(name, &prefill_logits(m, &prompt), &want, v);
        assert!(worst < 0.1, "{name}: the top-1 flipped with a reference margin of {worst}");
        (agree, total) = (agree + a, total + t);
    }
    println!("8-bit activations: top-1 agrees at {agree} of {total} prompt positions");
    assert!(agree as f64 >= 0.97 * total as f64, "top-1 agreement {agree}/{total} is below 97%");
}

/// The bound on a long text (the Apache license, first 1000 tokens): 8-bit activations against
/// the same Q4_1 weights with f32 activations (which keep within 1e-3 of HF). Measured: 969 of
/// 1000 agree (96.9%) with the AVX2 kernels, 960 (96.0%) with the AVX-512 VNNI GEMM, whose f32 sums
/// run in another order (a rounding that moves one activation across an 8-bit step moves the
/// rest; over 4590 positions of longer text the two agree at 96.6% and 96.8%); on other texts of
/// ~1000 tokens 95-96.5%. The flips are positions whose top
/// two are close, and they are inherent in 8 bits per block of 32, not in how we round them:
/// simulating finer activations in f32 on three such texts gave 96-97% at 8 bits, 97.3-98.2% with
/// blocks of 8, 98.8-99.7% with blocks of 2, 98.4-99.4% at 10 bits and 99.8-99.9% at 12. llama.cpp
/// on the same file, the same way (Q4_1 against the weights dequantized to an f32 GGUF,
/// `llama-perplexity --kl-divergence`, 4608 positions): "Same top p" 96.0 +/- 0.3%; highrise on
/// those positions 96.5% (benches/results/2026-11-29-q8-agreement.md).
#[test]
fn q8_activations_on_a_long_text() {
    let Some((_, model, _)) = fixtures_and_model("q8 activations, long text") else { return };
    let (reference, q8) = (loaded_q4(&model), &loaded_q8(&model).model);
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/apache-2.0.txt")).unwrap();
    let mut prompt = reference.tokenizer.encode(&text, true).unwrap();
    prompt.truncate(1000);
    let want = prefill_logits(&reference.model, &prompt);
    let (agree, total, worst) = top1_agreement("long text", &prefill_logits(q8, &prompt), &want, q8.config.vocab_size);
    println!("8-bit activations on a long text: top-1 agrees at {agree} of {total} positions (largest flipped margin {worst:.3})");
    assert!(agree as f64 >= 0.95 * total as f64, "top-1 agreement {agree}/{total} is below 95%");
    assert!(worst < 1.0, "a position with a reference margin of {worst} flipped");
}

#[test]
fn random_weight_models_are_reproducible_and_generate() {
    use highrise::model::{ModelConfig, Tokenizer};
    let config = ModelConfig::shape("tiny").unwrap();
    let make = |seed| Llama::random(config.clone(), cpu(), highrise::core::DType::F32, seed).unwrap();
    let (a, b, c) = (make(3), make(3), make(4));
    let prompt: Vec<u32> = (0..20).map(|i| i * 7 % 512).collect();
    let logits = |m: &Llama| m.prefill(&prompt, highrise::model::Logits::Last).unwrap().to_f32().unwrap();
    assert_eq!(logits(&a), logits(&b), "same seed, same model");
    assert_ne!(logits(&a), logits(&c), "another seed, another model");
    let tok = Tokenizer::numbered(512).unwrap();
    assert_eq!(tok.encode("<5> <7>", false).unwrap(), vec![5, 7]);
    let params = highrise::engine::GenerateParams { max_tokens: 8, ignore_eos: true, ..Default::default() };
    let g = highrise::engine::generate(&a, &tok, &prompt, &params, &mut |_| {}).unwrap();
    assert_eq!(g.ids.len(), 8);
    assert_eq!(tok.encode(&g.text, false).unwrap(), g.ids, "the text names the ids: {}", g.text);
}

/// `prompt_logprobs` scores each token after the first as one prefill's logits say (its chunks of
/// 512 rows run through a cache: 700 tokens cross a chunk's end), with the likeliest tokens at each
/// place; a token outside the vocabulary is refused.
#[test]
fn prompt_logprobs_are_the_prefills_log_softmax() {
    use highrise::core::ops::sampling::{log_softmax_at, top_log_softmax};
    use highrise::model::ModelConfig;
    let model = Llama::random(ModelConfig::shape("tiny").unwrap(), cpu(), DType::F32, 5).unwrap();
    let v = model.config.vocab_size;
    let tokens: Vec<u32> = (0..700u32).map(|i| (i * 7919 + 13) % v as u32).collect();
    let scored = model.prompt_logprobs(&tokens, 3).unwrap();
    assert_eq!(scored.len(), tokens.len() - 1);
    let logits = model.prompt_logits(&tokens).unwrap().to_f32().unwrap();
    let mut worst = 0f32;
    for (r, (lp, top)) in scored.iter().enumerate() {
        let row = &logits[r * v..][..v];
        worst = worst.max((lp - log_softmax_at(row, tokens[r + 1] as usize)).abs());
        let want: Vec<u32> = top_log_softmax(row, 3).into_iter().map(|(id, _)| id).collect();
        assert_eq!(top.iter().map(|&(id, _)| id).collect::<Vec<_>>(), want, "the likeliest at place {}", r + 1);
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1) && top[0].1 >= *lp, "place {}: {top:?} {lp}", r + 1);
    }
    println!("700 tokens scored in chunks: log-probabilities within {worst:e} of one prefill's");
    assert!(worst < 1e-4, "{worst}");
    let err = model.prompt_logprobs(&[1, v as u32], 0).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
}

/// bf16 activations (a GPU's `--dtype bf16`): the file's f32 norm weights, converted from the
/// checkpoint's bf16, are stored in bf16, every value the same, so a backend that folds the norms
/// into the projections (CUDA at batch-1 decode) folds this model's; the logits equal, bit for bit,
/// those of the same model with its norms put back in f32.
#[test]
fn f32_norm_weights_a_16_bit_dtype_holds_are_stored_in_it() {
    let Some(model) = default_model() else {
        return println!("skipped: f32 norms in bf16: the default model could not be fetched");
    };
    let opts = LoadOptions { activations: DType::BF16, ..Default::default() };
    let narrowed = load_with(&model, opts.clone());
    let m = &narrowed.model;
    let bf16 = |n: &Option<highrise::core::Tensor>| n.as_ref().unwrap().dtype() == DType::BF16;
    assert!(m.layers.iter().all(|l| bf16(&l.attn_norm) && bf16(&l.mlp_norm)), "layer norms in bf16");
    assert_eq!(m.norm.dtype(), DType::BF16, "the final norm in bf16");
    let mut wide = load_with(&model, opts);
    let be = wide.model.backend.clone();
    let to_f32 = |t: &mut highrise::core::Tensor| {
        let (dims, values) = (t.dims().to_vec(), t.to_f32().unwrap());
        *t = highrise::core::Tensor::from_f32(&be, DType::F32, &dims, &values).unwrap();
    };
    for layer in &mut wide.model.layers {
        to_f32(layer.attn_norm.as_mut().unwrap());
        to_f32(layer.mlp_norm.as_mut().unwrap());
    }
    to_f32(&mut wide.model.norm);
    let prompt = narrowed.tokenizer.encode("The capital of France is", true).unwrap();
    assert_eq!(prefill_logits(m, &prompt), prefill_logits(&wide.model, &prompt), "the same numbers");
    assert_eq!(decoded_logits(m, &prompt), decoded_logits(&wide.model, &prompt), "the same numbers, decoding");
}
