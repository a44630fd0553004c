//! Text to token ids and back, and the chat template. A HF directory brings its own `tokenizer.json`;
//! a GGUF file carries its vocabulary, merges and pre-tokenizer name in metadata, from which an
//! equivalent `tokenizers::Tokenizer` is built (and written out by `convert`).

use std::path::Path;

use serde_json::{json, Value as Json};

use crate::gguf::{Gguf, Value};
use crate::{Error, Result};

/// A chat message, as the OpenAI API and chat templates know it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether encoding for generation prepends the BOS token (the model's tokenizer config says so).
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

/// GPT-2's byte-level pre-tokenizer, splitting with its own regex.
fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Option<Json> {
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    };
    Some(match pre {
        "default" | "gpt2" => byte_level(true),
        // Every digit on its own, then GPT-2's regex.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "llama-bpe" | "llama3" => split(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        "qwen2" => split(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        _ => return None,
    })
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes (byte-level BPE, `tokenizer.ggml.model` = "gpt2").
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let path = &g.path;
        // The strings of an array, borrowed from the file's metadata (no copy of the vocabulary).
        let strs = |key: &str| -> Result<Vec<&str>> {
            let a = g.get(key).and_then(Value::as_array).ok_or_else(|| Error::config(path, key, "missing"))?;
            let s = a.strings().ok_or_else(|| Error::config(path, key, "is not an array of strings"))?;
            Ok(s.iter().map(String::as_str).collect())
        };
        let model = g.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
        if model != "gpt2" {
            return Err(Error::config(
                path,
                "tokenizer.ggml.model",
                format!("{model:?} is not supported (byte-level BPE, \"gpt2\", is)"),
            ));
        }
        let pre_name = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
        let pre = pre_tokenizer(pre_name).ok_or_else(|| {
            Error::config(
                path,
                "tokenizer.ggml.pre",
                format!("pre-tokenizer {pre_name:?} is not supported (default, gpt2, smollm, llama-bpe, qwen2 are)"),
            )
        })?;
        let tokens = strs("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strs("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(Error::config(path, "tokenizer.ggml.merges", format!("merge {m:?} is not two tokens"))),
            })
            .collect::<Result<_>>()?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(v) => {
                let key = "tokenizer.ggml.token_type";
                let types = v.as_array().and_then(|a| a.u64s()).ok_or_else(|| Error::config(path, key, "is not an array of token types"))?;
                if types.len() != tokens.len() {
                    return Err(Error::config(
                        path,
                        key,
                        format!("has {} entries but tokenizer.ggml.tokens has {}", types.len(), tokens.len()),
                    ));
                }
                types
            }
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
        // Built through the tokenizers API rather than a tokenizer.json text: no transient JSON tree
        // of the whole vocabulary at load.
        let fail = |e: tokenizers::Error| Error::Tokenizer(format!("{}: {e}", path.display()));
        let bpe = tokenizers::models::bpe::BPE::builder().vocab_and_merges(vocab, merges).build().map_err(fail)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre: tokenizers::PreTokenizerWrapper = serde_json::from_value(pre).expect("known pre-tokenizer");
        let decoder: tokenizers::DecoderWrapper =
            serde_json::from_value(json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}))
                .expect("byte-level decoder");
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(decoder));
        // Control (3) and user-defined (4) tokens are matched whole in the input, before BPE.
        let added = |kind: u64| -> Vec<tokenizers::AddedToken> {
            types
                .iter()
                .enumerate()
                .filter(|(_, &t)| t == kind)
                .map(|(id, _)| tokenizers::AddedToken::from(tokens[id], kind == 3).normalized(kind == 4))
                .collect()
        };
        inner.add_special_tokens(&added(3));
        inner.add_tokens(&added(4));
        let token = |key: &str| {
            g.get(key).and_then(Value::as_u64).and_then(|id| tokens.get(id as usize)).map(|t| t.to_string())
        };
        let mut t = Tokenizer { inner, bos_token: None, eos_token: None, add_bos: false, chat_template: None };
        t.bos_token = token("tokenizer.ggml.bos_token_id");
        t.eos_token = token("tokenizer.ggml.eos_token_id");
        t.add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        t.chat_template = g.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string);
        Ok(t)
    }

    /// Reads `tokenizer.json` and, if present, `tokenizer_config.json` from a HF model directory.
    /// A tokenizer for random-weight models (benchmarks, backend cross-checks): token i is the word
    /// `<i>`, words are split on whitespace; no BOS, no EOS, no chat template.
    pub fn numbered(vocab_size: usize) -> Result<Tokenizer> {
        let vocab: serde_json::Map<String, Json> = (0..vocab_size).map(|i| (format!("<{i}>"), json!(i))).collect();
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<0>"},
        });
        let inner: tokenizers::Tokenizer =
            spec.to_string().parse().map_err(|e: tokenizers::Error| Error::Tokenizer(e.to_string()))?;
        Ok(Tokenizer { inner, bos_token: None, eos_token: None, add_bos: false, chat_template: None })
    }

    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Format { path: path.clone(), detail: e.to_string() })?;
        let mut t = Tokenizer { inner, bos_token: None, eos_token: None, add_bos: false, chat_template: None };
        let cfg_path = dir.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg_path) {
            let cfg: Json = serde_json::from_str(&text)
                .map_err(|e| Error::Format { path: cfg_path.clone(), detail: e.to_string() })?;
            // A special token is written either as a string or as {"content": ...}.
            let tok = |k: &str| match cfg.get(k) {
                Some(Json::String(s)) => Some(s.clone()),
                Some(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
                None => None,
            };
            t.bos_token = tok("bos_token");
            t.eos_token = tok("eos_token");
            t.add_bos = cfg.get("add_bos_token").and_then(Json::as_bool).unwrap_or(false);
            t.chat_template = match cfg.get("chat_template") {
                Some(Json::String(s)) => Some(s.clone()),
                // A list of named templates: take the default one.
                Some(Json::Array(a)) => a
                    .iter()
                    .find(|e| e.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|e| e.get("template")?.as_str().map(str::to_string)),
                _ => None,
            };
        }
        Ok(t)
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are recognized.
    /// `add_bos` prepends the BOS token when the model's tokenizer config asks for it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos_token.as_deref().and_then(|b| self.inner.token_to_id(b)));
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Each id's text on its own (a byte-level token may be part of a character: then its text
    /// holds a replacement character), for showing tokens one by one.
    pub fn pieces(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&id| self.decode(&[id]).unwrap_or_default()).collect()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The `tokenizer.json` text.
    pub fn json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// A `tokenizer_config.json` carrying the chat template and special tokens.
    pub fn config_json(&self) -> Json {
        json!({
            "add_bos_token": self.add_bos,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "chat_template": self.chat_template,
            "tokenizer_class": "PreTrainedTokenizerFast",
        })
    }

    /// Renders `messages` with the model's chat template, as HF's `apply_chat_template` does.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Tokenizer("the model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template).map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))
    }
}
