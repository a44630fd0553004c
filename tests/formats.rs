//! Bad model files and bad input: each is an error that names the file and the tensor or field,
//! never a panic or an out-of-bounds read. Most cases damage a copy of the default model's GGUF.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use highrise::engine::{generate, GenerateParams};
use highrise::model::{Error, Llama, LoadOptions, Source};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("highrise-formats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A copy of the default model with `edit` applied to its bytes.
fn damaged(name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> Option<PathBuf> {
    let Some(model) = default_model() else {
        println!("skipped: {name}: the default model could not be fetched");
        return None;
    };
    let mut bytes = std::fs::read(model).unwrap();
    edit(&mut bytes);
    let path = scratch(name);
    std::fs::write(&path, bytes).unwrap();
    Some(path)
}

/// The offset just past the first occurrence of `pattern` in the header.
fn after(bytes: &[u8], pattern: &str) -> usize {
    let p = pattern.as_bytes();
    bytes[..8 << 20].windows(p.len()).position(|w| w == p).expect("pattern in header") + p.len()
}

/// Loads the model at `path` onto the CPU backend, returning the error's text.
fn load_error(path: &Path) -> String {
    let r = Source::open(path).and_then(|s| {
        s.tokenizer()?;
        Llama::load(&s, cpu(), LoadOptions::default())
    });
    match r {
        Ok(_) => panic!("{} loaded although it is damaged", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn not_a_gguf_file() {
    let path = scratch("not.gguf");
    std::fs::write(&path, b"PK\x03\x04 definitely a zip").unwrap();
    let e = load_error(&path);
    assert!(e.contains(path.to_str().unwrap()) && e.contains("not a GGUF file"), "{e}");
}

#[test]
fn truncated_gguf_in_metadata_and_in_tensor_data() {
    let Some(path) = damaged("trunc-meta.gguf", |b| b.truncate(1 << 20)) else { return };
    let e = load_error(&path);
    assert!(e.contains(path.to_str().unwrap()) && e.contains("truncated"), "{e}");
    let Some(path) = damaged("trunc-data.gguf", |b| b.truncate(b.len() / 2)) else { return };
    let e = load_error(&path);
    assert!(e.contains("tensor ") && e.contains("past the end of the file"), "{e}");
}

#[test]
fn unsupported_quantization_type_names_the_tensor() {
    // blk.0.attn_q.weight: name, then n_dims (u32), two dims (u64), then the ggml type (u32): Q5_0 is 6.
    let Some(path) = damaged("q5.gguf", |b| {
        let at = after(b, "blk.0.attn_q.weight") + 4 + 16;
        b[at..at + 4].copy_from_slice(&6u32.to_le_bytes());
    }) else {
        return;
    };
    let e = load_error(&path);
    assert!(e.contains("tensor blk.0.attn_q.weight") && e.contains("Q5_0 is not supported"), "{e}");
}

#[test]
fn missing_tensor_is_named_with_its_file() {
    let Some(path) = damaged("missing.gguf", |b| {
        let at = after(b, "blk.3.ffn_up.weight") - "up.weight".len();
        b[at..at + 2].copy_from_slice(b"XX");
    }) else {
        return;
    };
    let e = load_error(&path);
    assert!(e.contains(path.to_str().unwrap()) && e.contains("model.layers.3.mlp.up_proj.weight: missing"), "{e}");
}

#[test]
fn config_disagreeing_with_the_tensors_names_tensor_and_shapes() {
    // llama.feed_forward_length: key, then value type (u32), then the value.
    let Some(path) = damaged("ffn.gguf", |b| {
        let at = after(b, "llama.feed_forward_length") + 4;
        b[at..at + 4].copy_from_slice(&1537u32.to_le_bytes());
    }) else {
        return;
    };
    let e = load_error(&path);
    assert!(e.contains("mlp.gate_proj.weight") && e.contains("[1536, 576]") && e.contains("[1537, 576]"), "{e}");
}

#[test]
fn bad_safetensors_dtype_and_truncation_are_named() {
    let dir = scratch("hf-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let config = r#"{"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16}"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
    let data = vec![0u8; 8 * 4 * 8];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![8, 4], &data).unwrap();
    let st = dir.join("model.safetensors");
    safetensors::serialize_to_file([("model.embed_tokens.weight", view)], None, &st).unwrap();
    let e = Source::open(&dir).err().expect("I64 weights are refused").to_string();
    assert!(e.contains("model.embed_tokens.weight") && e.contains("I64"), "{e}");

    let f32s = vec![0u8; 8 * 4 * 4];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![8, 4], &f32s).unwrap();
    safetensors::serialize_to_file([("model.embed_tokens.weight", view)], None, &st).unwrap();
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&st).unwrap().set_len(len - 10).unwrap();
    let e = Source::open(&dir).err().expect("truncated file is refused").to_string();
    assert!(e.contains(st.to_str().unwrap()) && e.contains("truncated"), "{e}");

    std::fs::write(dir.join("config.json"), config.replace("\"hidden_size\": 4", "\"hidden_size\": \"four\"")).unwrap();
    let e = Source::open(&dir).err().expect("bad config").to_string();
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let Some(path) = damaged("ctx8.gguf", |b| {
        let at = after(b, "llama.context_length") + 4;
        b[at..at + 4].copy_from_slice(&8u32.to_le_bytes());
    }) else {
        return;
    };
    let source = Source::open(&path).unwrap();
    let tok = source.tokenizer().unwrap();
    let model = Llama::load(&source, cpu(), LoadOptions::default()).unwrap();
    let ids = tok.encode("Once upon a time, there was a little", false).unwrap();
    assert_eq!(ids.len(), 9);
    let err = generate(&model, &tok, &ids, &GenerateParams::default(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::Input(_)), "{err}");
    assert!(err.to_string().contains("9 tokens") && err.to_string().contains("context holds 8"), "{err}");
    // The model still serves a prompt that fits.
    let g = generate(&model, &tok, &ids[..4], &GenerateParams { max_tokens: 2, ..Default::default() }, &mut |_| {}).unwrap();
    assert_eq!(g.ids.len(), 2);
}
