//! HuggingFace directories beyond the default model: sharded safetensors with an index, bf16 and f16
//! weights, a separate (untied) unembedding, and Qwen2's q/k/v biases, on a small random model.

mod common;

use std::path::Path;

use common::*;
use half::{bf16, f16};
use highrise::core::DType;
use highrise::model::{Llama, LoadOptions, Source};

const CONFIG: &str = r#"{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 96,
  "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
  "max_position_embeddings": 128, "tie_word_embeddings": false}"#;

/// Every tensor of the small model: name, shape, random values.
fn tensors(rng: &mut Rng) -> Vec<(String, Vec<usize>, Vec<f64>)> {
    let (v, h, i, q, kv) = (96, 64, 160, 64, 32);
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
        ("lm_head.weight".into(), vec![v, h]),
    ];
    for l in 0..2 {
        for (n, s) in [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.q_proj.bias", vec![q]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
        ] {
            t.push((format!("model.layers.{l}.{n}"), s));
        }
    }
    // Values representable in bf16 (and so in f16 and f32), so every copy holds the same numbers.
    t.into_iter().map(|(n, s)| {
        let vals = rng.values(s.iter().product(), 0.3, DType::BF16);
        (n, s, vals)
    }).collect()
}

fn encode(dtype: DType, v: &[f64]) -> (safetensors::Dtype, Vec<u8>) {
    match dtype {
        DType::F32 => (safetensors::Dtype::F32, v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect()),
        DType::F16 => (safetensors::Dtype::F16, v.iter().flat_map(|x| f16::from_f32(*x as f32).to_le_bytes()).collect()),
        _ => (safetensors::Dtype::BF16, v.iter().flat_map(|x| bf16::from_f32(*x as f32).to_le_bytes()).collect()),
    }
}

/// Writes the model into `dir` in `dtype`, split into `shards` files (with an index when > 1).
fn write_dir(dir: &Path, ts: &[(String, Vec<usize>, Vec<f64>)], dtype: DType, shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    let mut map = serde_json::Map::new();
    for s in 0..shards {
        let file = if shards == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{shards:05}.safetensors", s + 1) };
        let mine: Vec<_> = ts.iter().enumerate().filter(|(i, _)| i % shards == s).map(|(_, t)| t).collect();
        let data: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = mine
            .iter()
            .map(|(n, shape, v)| {
                let (d, b) = encode(dtype, v);
                (n.clone(), shape.clone(), d, b)
            })
            .collect();
        let views: Vec<_> = data
            .iter()
            .map(|(n, shape, d, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, shape.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for (n, ..) in mine {
            map.insert(n.clone(), serde_json::json!(file));
        }
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

fn logits(dir: &Path, tokens: &[u32]) -> Vec<f32> {
    let m = Llama::load(&Source::open(dir).unwrap(), cpu(), LoadOptions::default()).unwrap();
    assert!(m.lm_head.is_some() && m.layers[0].bq.is_some(), "untied head and q/k/v biases loaded");
    m.prompt_logits(tokens).unwrap().to_f32().unwrap()
}

#[test]
fn sharded_half_precision_directories_match_a_single_f32_file() {
    let mut rng = Rng::new("hf_dir");
    let ts = tensors(&mut rng);
    let root = std::env::temp_dir().join(format!("highrise-hfdir-{}", std::process::id()));
    let tokens: Vec<u32> = (0..11).map(|_| rng.below(96) as u32).collect();
    write_dir(&root.join("f32"), &ts, DType::F32, 1);
    let want = logits(&root.join("f32"), &tokens);
    assert!(want.iter().all(|x| x.is_finite()) && want.iter().any(|&x| x != 0.0));
    for (dtype, shards) in [(DType::BF16, 3), (DType::F16, 2)] {
        let dir = root.join(format!("{dtype}-{shards}"));
        write_dir(&dir, &ts, dtype, shards);
        let got = logits(&dir, &tokens);
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // The same values in a narrower container, widened exactly: the same logits.
        assert!(worst <= 1e-6, "{dtype} in {shards} shards differs from f32 by {worst}");
    }
    std::fs::remove_dir_all(&root).ok();
}
