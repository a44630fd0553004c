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

/// GPT-2's split regex (llama.cpp's form: whatever it leaves unmatched is a piece of its own).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's split regex (also DBRX's, Smaug's; ChatGLM 4's).
const LLAMA3: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Poro's, BLOOM's, GPT-3 Finnish's: words with at most one leading space.
const PORO: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
/// Written with escapes: an editor's Unicode normalization would turn some of these letters into
/// others (U+1FD3 into U+0390, say), reversing ranges.
const DEEPSEEK_LETTERS: &str = "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const CJK: &str = "[一-龥ࠀ-一가-\u{d7ff}]+";

/// A byte-level BPE pre-tokenizer as llama.cpp defines it for a `tokenizer.ggml.pre` name
/// (`llm_tokenizer_bpe` in its llama-vocab.cpp; HF's tokenizer.json files say the same): split
/// regexes applied one after another, each piece of one split again by the next, what a regex leaves
/// unmatched kept as pieces too; then the bytes mapped to GPT-2's alphabet. And whether a word found
/// whole in the vocabulary skips the merges (llama.cpp's `ignore_merges`: Llama 3, Tekken).
struct PreTokenizer {
    /// The `tokenizer.ggml.pre` names that mean it (llama.cpp's groups).
    names: &'static [&'static str],
    splits: &'static [&'static str],
    ignore_merges: bool,
}

/// Every pre-tokenizer understood: one table, which the lookup and the listing both read.
const PRE_TOKENIZERS: &[PreTokenizer] = &[
    // llama.cpp's fallback when a file names no pre-tokenizer.
    PreTokenizer {
        names: &["default"],
        splits: &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["gpt2", "gpt-2", "phi-2", "roberta-bpe", "jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code", "gigachat", "mpt", "olmo", "jais"],
        splits: &[GPT2],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["llama3", "llama-v3", "llama-bpe", "falcon3"],
        splits: &[LLAMA3],
        ignore_merges: true,
    },
    PreTokenizer {
        names: &["dbrx", "smaug-bpe", "chatglm-bpe"],
        splits: &[LLAMA3],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["deepseek-llm"],
        splits: &["[\r\n]", DEEPSEEK_LETTERS, r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", CJK, r"\p{N}+"],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["deepseek-coder"],
        splits: &["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK, r"\p{N}"],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["deepseek-v3"],
        splits: &[
            r"\p{N}{1,3}",
            "[一-龥\u{3040}-ゟ゠-ヿ]+",
            r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""##,
        ],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["falcon"],
        splits: &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
        ignore_merges: false,
    },
    // Every digit on its own, then GPT-2's regex.
    PreTokenizer {
        names: &["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"],
        splits: &[r"\p{N}", GPT2],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["qwen2", "stablelm2", "megrez"],
        splits: &[r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
        ignore_merges: false,
    },
    // Qwen 3.5: Qwen 2's, with combining marks kept in words.
    PreTokenizer {
        names: &["qwen35"],
        splits: &[r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["poro-chat", "bloom", "gpt3-finnish"],
        splits: &[PORO],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["viking"],
        splits: &[PORO, r"\p{N}"],
        ignore_merges: false,
    },
    // Mistral's Tekken, as its tokenizer.json writes it.
    PreTokenizer {
        names: &["tekken"],
        splits: &[r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
        ignore_merges: true,
    },
    // o200k (GPT-4o's, Phi-4-mini's, Llama 4's), as its tokenizer.json writes it: Tekken's with
    // English contractions kept on their word, and numbers up to three digits a piece.
    PreTokenizer {
        names: &["gpt-4o", "llama4"],
        splits: &[GPT4O],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["chameleon"],
        splits: &["<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}", r"[\p{P}!-/:-@\[-`{-~]", GPT2],
        ignore_merges: false,
    },
];

/// The `tokenizer.ggml.pre` names understood, in llama.cpp's groups.
pub fn pre_tokenizer_names() -> Vec<&'static str> {
    PRE_TOKENIZERS.iter().flat_map(|p| p.names.iter().copied()).collect()
}

fn pre_tokenizer(pre: &str) -> Option<&'static PreTokenizer> {
    PRE_TOKENIZERS.iter().find(|p| p.names.contains(&pre))
}

impl PreTokenizer {
    fn json(&self) -> Json {
        let mut seq: Vec<Json> = self
            .splits
            .iter()
            .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
            .collect();
        seq.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
        json!({"type": "Sequence", "pretokenizers": seq})
    }
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// The SentencePiece word-boundary marker.
const SPACE: &str = "\u{2581}";

impl Tokenizer {
    /// The tokenizer of a model file alone, whatever its architecture: a GGUF's vocabulary (weights
    /// and config are not read) or a HF directory's tokenizer.json.
    pub fn open(path: &Path) -> Result<Tokenizer> {
        match path.is_dir() {
            true => Tokenizer::from_dir(path),
            false => Tokenizer::from_gguf(&Gguf::open(path)?),
        }
    }

    /// Builds the tokenizer a GGUF file describes: byte-level BPE (`tokenizer.ggml.model` = "gpt2",
    /// with the pre-tokenizer `tokenizer.ggml.pre` names) or SentencePiece ("llama": scores, byte
    /// fallback, the ▁ space marker).
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let path = &g.path;
        // The strings of an array, borrowed from the file's metadata (no copy of the vocabulary).
        let strs = |key: &str| -> Result<Vec<&str>> {
            let a = g.get(key).and_then(Value::as_array).ok_or_else(|| Error::config(path, key, "missing"))?;
            let s = a.strings().ok_or_else(|| Error::config(path, key, "is not an array of strings"))?;
            Ok(s.iter().map(String::as_str).collect())
        };
        let model = g.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
        let tokens = strs("tokenizer.ggml.tokens")?;
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
        let token = |key: &str| g.get(key).and_then(Value::as_u64).and_then(|id| tokens.get(id as usize)).map(|t| t.to_string());
        // Built through the tokenizers API rather than a tokenizer.json text: no transient JSON tree
        // of the whole vocabulary at load.
        let fail = |e: tokenizers::Error| Error::Tokenizer(format!("{}: {e}", path.display()));
        let spm = match model {
            "gpt2" => false,
            "llama" => true,
            other => {
                return Err(Error::config(
                    path,
                    "tokenizer.ggml.model",
                    format!("{other:?} is not supported (\"gpt2\": byte-level BPE, \"llama\": SentencePiece)"),
                ))
            }
        };
        let mut inner = if spm {
            let key = "tokenizer.ggml.scores";
            let scores = g
                .get(key)
                .and_then(Value::as_array)
                .and_then(|a| a.f32s())
                .ok_or_else(|| Error::config(path, key, "missing, or not an array of floats"))?;
            if scores.len() != tokens.len() {
                return Err(Error::config(path, key, format!("has {} entries but tokenizer.ggml.tokens has {}", scores.len(), tokens.len())));
            }
            let merges = sentencepiece_merges(&tokens, &scores, &vocab);
            let unk = token("tokenizer.ggml.unknown_token_id").or_else(|| tokens.first().map(|t| t.to_string()));
            let mut bpe = tokenizers::models::bpe::BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
            if let Some(unk) = unk {
                bpe = bpe.unk_token(unk);
            }
            let mut inner = tokenizers::Tokenizer::new(bpe.build().map_err(fail)?);
            // llama.cpp's and HF's Llama tokenizers: spaces become ▁, and one is put in front.
            let prefix = g.get("tokenizer.ggml.add_space_prefix").and_then(Value::as_bool).unwrap_or(true);
            let mut normalize = vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})];
            let mut decode = vec![
                json!({"type": "Replace", "pattern": {"String": SPACE}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if prefix {
                normalize.insert(0, json!({"type": "Prepend", "prepend": SPACE}));
                decode.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let normalizer: tokenizers::NormalizerWrapper =
                serde_json::from_value(json!({"type": "Sequence", "normalizers": normalize})).expect("known normalizer");
            let decoder: tokenizers::DecoderWrapper =
                serde_json::from_value(json!({"type": "Sequence", "decoders": decode})).expect("known decoder");
            inner.with_normalizer(Some(normalizer));
            inner.with_decoder(Some(decoder));
            inner
        } else {
            let pre_name = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
            let pre = pre_tokenizer(pre_name).ok_or_else(|| {
                Error::config(
                    path,
                    "tokenizer.ggml.pre",
                    format!("pre-tokenizer {pre_name:?} is not supported (these are: {})", pre_tokenizer_names().join(", ")),
                )
            })?;
            let merges: Vec<(String, String)> = strs("tokenizer.ggml.merges")?
                .into_iter()
                .map(|m| match m.split_once(' ') {
                    Some((a, b)) => Ok((a.to_string(), b.to_string())),
                    None => Err(Error::config(path, "tokenizer.ggml.merges", format!("merge {m:?} is not two tokens"))),
                })
                .collect::<Result<_>>()?;
            let bpe = tokenizers::models::bpe::BPE::builder()
                .vocab_and_merges(vocab, merges)
                .ignore_merges(pre.ignore_merges)
                .build()
                .map_err(fail)?;
            let mut inner = tokenizers::Tokenizer::new(bpe);
            let pre: tokenizers::PreTokenizerWrapper = serde_json::from_value(pre.json()).expect("known pre-tokenizer");
            let decoder: tokenizers::DecoderWrapper =
                serde_json::from_value(json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}))
                    .expect("byte-level decoder");
            inner.with_pre_tokenizer(Some(pre));
            inner.with_decoder(Some(decoder));
            inner
        };
        // Control and user-defined tokens are matched whole in the input, before the model: control
        // tokens as special. A byte-level vocabulary's user-defined tokens are written in its byte
        // alphabet (matched after normalization); SentencePiece's as they read.
        let added = |kind: u64| -> Vec<tokenizers::AddedToken> {
            types
                .iter()
                .enumerate()
                .filter(|(_, &t)| t == kind)
                .map(|(id, _)| tokenizers::AddedToken::from(tokens[id], kind == CONTROL).normalized(kind == USER_DEFINED && !spm))
                .collect()
        };
        inner.add_special_tokens(&added(CONTROL));
        inner.add_tokens(&added(USER_DEFINED));
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

/// The merges of a SentencePiece BPE vocabulary, as HF's `SentencePieceExtractor` derives them: every
/// split of a piece into two pieces of the vocabulary, ranked by the whole piece's score (highest
/// first; within a piece, by the halves' ids). Merging by that rank is SentencePiece's own rule
/// (llama.cpp's `llm_tokenizer_spm`): of the adjacent pairs, join the one whose result scores best.
fn sentencepiece_merges(tokens: &[&str], scores: &[f32], vocab: &tokenizers::models::bpe::Vocab) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(u32, u32)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*vocab.get(&piece[..at])?, *vocab.get(&piece[at..])?)))
            .collect();
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| (score, l, r)));
    }
    // Stable: equal scores keep the vocabulary's order, as HF's sort does.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges.into_iter().map(|(_, l, r)| (tokens[l as usize].to_string(), tokens[r as usize].to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_pre_tokenizer_compiles() {
        let names = pre_tokenizer_names();
        for (i, name) in names.iter().enumerate() {
            assert!(!names[..i].contains(name), "{name} is named twice: the second would never be found");
            let pre = pre_tokenizer(name).unwrap_or_else(|| panic!("{name} is listed but unknown"));
            for r in pre.splits {
                let one = PreTokenizer { names: &[], splits: std::slice::from_ref(r), ignore_merges: false };
                let parsed: std::result::Result<tokenizers::PreTokenizerWrapper, _> = serde_json::from_value(one.json());
                assert!(parsed.is_ok(), "{name}: {r}: {:?}", parsed.err());
            }
        }
    }

    /// o200k's split (gpt-4o) cuts text where Python's `regex` module cuts it with the regex of
    /// GPT-4o's tokenizer.json (the pieces below are `regex.findall`'s): contractions in either case
    /// stay on their word, numbers go three digits at a time, capitals start a new piece.
    #[test]
    fn gpt4o_splits_as_its_tokenizer_json_regex_does() {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer as _};
        let text = "HELLO world, I'M fine; it'S 1234567 CamelCaseWords\n\n  tabs\tand/slashes/\n \u{c9}COLE na\u{ef}ve";
        let want = [
            "HELLO", " world", ",", " I'M", " fine", ";", " it'S", " ", "123", "456", "7", " Camel", "Case", "Words", "\n\n", " ",
            " tabs", "\tand", "/slashes", "/\n", " \u{c9}COLE", " na\u{ef}ve",
        ];
        let split = serde_json::json!({"type": "Split", "pattern": {"Regex": GPT4O}, "behavior": "Isolated", "invert": false});
        let pre: tokenizers::PreTokenizerWrapper = serde_json::from_value(split).unwrap();
        let mut s = PreTokenizedString::from(text);
        pre.pre_tokenize(&mut s).unwrap();
        let got: Vec<String> = s.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(p, _, _)| p.to_string()).collect();
        assert_eq!(got, want);
    }
}
