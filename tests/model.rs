//! The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against HuggingFace transformers' reference
//! outputs in ../shared/fixtures/smollm2: tokenizer, logits at every prompt position, greedy
//! continuations, KV-cache decoding, and the GGUF -> HF directory round trip.

mod common;

use std::sync::OnceLock;

use common::*;
use highrise::model::npy;
use highrise::model::{Llama, LoadOptions, Logits, Source, Tokenizer};

const CASES: [&str; 2] = ["story", "chat"];

struct Loaded {
    model: Llama,
    tokenizer: Tokenizer,
}

/// The model with every weight dequantized to f32, loaded once for all tests of this file.
fn loaded(path: &std::path::Path) -> &'static Loaded {
    static L: OnceLock<Loaded> = OnceLock::new();
    L.get_or_init(|| {
        let source = Source::open(path).unwrap();
        let tokenizer = source.tokenizer().unwrap();
        let model = Llama::load(&source, cpu(), LoadOptions::default()).unwrap();
        Loaded { model, tokenizer }
    })
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
    let mut cache = m.new_kv_cache(prompt.len().div_ceil(16), 16).unwrap();
    let n = prompt.len() as u32;
    let positions: Vec<u32> = (0..n).collect();
    let blocks: Vec<u32> = (0..cache.num_blocks as u32).collect();
    let seqs = [highrise::core::ops::PagedSeq { q_len: n, context_len: n, blocks_start: 0 }];
    let batch = highrise::model::Batch {
        tokens: prompt,
        positions: &positions,
        slots: &positions,
        seqs: &seqs,
        block_table: &blocks,
    };
    m.forward(&batch, &mut cache, Logits::All).unwrap().to_f32().unwrap()
}
