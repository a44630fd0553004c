//! The OpenAI request bodies, their checks, and the error body every failure answers with.
//!
//! One struct holds the fields of both endpoints, so that a wrong-typed field is reported with its
//! path (serde_path_to_error) wherever it is; each endpoint then checks what it requires.

use std::collections::{BTreeSet, HashMap};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use highrise_engine::{GenerateParams, SamplingParams};
use highrise_model::{Llama, Message, Patch, Site, Steer, Tokenizer};
use serde::Deserialize;
use serde_json::json;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), param: param.map(String::from), code: None }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn server(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), param: None, code: None }
    }

    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            404 => "not_found_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code}})
    }
}

impl From<highrise_engine::ServiceError> for ApiError {
    /// Refused input is the client's (400); an engine that has stopped is unavailable (503); work
    /// that failed on the engine is the server's (500).
    fn from(e: highrise_engine::ServiceError) -> ApiError {
        use highrise_engine::ServiceError as E;
        match e {
            E::Rejected(m) => ApiError::invalid(m, None),
            E::Stopped => ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: E::Stopped.to_string(), param: None, code: Some("engine_stopped") },
            E::Failed(m) => ApiError::server(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: a string or a list of them.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

/// A message's `content`: a string, or a list of parts of which the text ones are used.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// highrise's own extension field, `"highrise": {...}`: steer and patch the generation, and capture
/// the residual stream, Q/K/V, attention patterns and the logit lens over prompt and completion (as
/// steered and patched).
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    /// Sites to capture: any of `Site::names`, and attn_probs.
    #[serde(default)]
    pub capture: Vec<String>,
    /// Layers to capture at (all when absent).
    pub layers: Option<Vec<usize>>,
    /// Token positions to return (all when absent); attention patterns keep their rows.
    pub positions: Option<Vec<usize>>,
    /// The logit lens: this many top tokens per layer and position (none when absent).
    pub logit_lens: Option<usize>,
    /// Steering vectors added to the stream entering a layer at every token.
    #[serde(default)]
    pub steer: Vec<SteerSpec>,
    /// Activation patches: a site's values at a layer and position replaced.
    #[serde(default)]
    pub patch: Vec<PatchSpec>,
}

/// One patch: `values` in place of `site` (resid_pre, z, attn_out, mlp_post, mlp_out) at `layer`
/// and `position` (of the sequence: the prompt's tokens first, then the completion's).
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct PatchSpec {
    pub layer: usize,
    pub position: usize,
    pub site: String,
    pub values: Vec<f32>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct SteerSpec {
    pub layer: usize,
    pub vector: Vec<f32>,
    #[serde(default = "one")]
    pub scale: f32,
}

fn one() -> f32 {
    1.0
}

/// The fields of `/v1/completions` and `/v1/chat/completions` (unknown fields are ignored, as
/// OpenAI's own server does for fields it does not use).
#[derive(Deserialize, Debug, Default)]
pub struct Body {
    pub model: Option<String>,
    pub prompt: Option<Prompt>,
    pub messages: Option<Vec<ChatMessage>>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Completions: the number of top tokens to report per step. Chat: whether to report them.
    pub logprobs: Option<serde_json::Value>,
    pub top_logprobs: Option<usize>,
    pub ignore_eos: Option<bool>,
    pub echo: Option<bool>,
    pub best_of: Option<usize>,
    pub suffix: Option<String>,
    pub highrise: Option<Extension>,
}

/// Most choices per request, and most top tokens per step (OpenAI's limits are 128 and 20).
pub const MAX_N: usize = 128;
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most sequences one request may start: prompts times `n` (a 1 KB body of 200 prompts and n 128
/// asked for 25,600).
pub const MAX_CHOICES: usize = 128;
/// Most stop strings per request, and their longest, in bytes (OpenAI takes 4).
pub const MAX_STOP: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
/// Most activation patches per request (each a site's whole row: ablating every head of a 30-layer
/// model at 64 positions is 1,920).
pub const MAX_PATCHES: usize = 4096;
/// Most bytes of float32 values one request's captures may compute or return, over all its
/// choices (a 401-byte request once returned 17.9 MB, and attention patterns grow as T^2).
pub const MAX_CAPTURE_BYTES: u64 = 256 << 20;

impl Body {
    /// Parses a request body: malformed JSON and wrong-typed fields are errors that name the field.
    pub fn parse(bytes: &[u8]) -> Result<Body, ApiError> {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
        if !value.is_object() {
            return Err(ApiError::invalid("the request body must be a JSON object", None));
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            match path.as_str() {
                "." => ApiError::invalid(inner, None),
                p => ApiError::invalid(format!("{p}: {inner}"), Some(p)),
            }
        })
    }

    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }

    pub fn n(&self) -> Result<usize, ApiError> {
        match self.n.unwrap_or(1) {
            n @ 1..=MAX_N => Ok(n),
            n => Err(ApiError::invalid(format!("n = {n} is out of range (1 to {MAX_N})"), Some("n"))),
        }
    }

    /// Completions' `best_of`: sequences generated per prompt, of which the `n` with the highest
    /// cumulative log-probability are returned, likeliest first (OpenAI's meaning, and vLLM's).
    /// At least `n` (`n` when absent); not with `stream` above `n` (OpenAI refuses that too: the
    /// choices are known only at the end); a completions parameter, refused in chat rather than
    /// ignored.
    pub fn best_of(&self, n: usize, chat: bool) -> Result<usize, ApiError> {
        let Some(b) = self.best_of else { return Ok(n) };
        let refuse = |m: String| Err(ApiError::invalid(m, Some("best_of")));
        if chat {
            return refuse("best_of: a parameter of /v1/completions; chat completions have none (use n)".into());
        }
        if !(n..=MAX_N).contains(&b) {
            return refuse(format!("best_of = {b} is out of range (n = {n} to {MAX_N})"));
        }
        if b > n && self.stream() {
            return refuse(format!("best_of = {b} cannot be streamed: which {n} of the {b} are returned is known only once all have finished"));
        }
        Ok(b)
    }

    /// `suffix` (text to complete up to) is refused, not ignored: the models served are not trained
    /// to fill in the middle.
    pub fn check_suffix(&self) -> Result<(), ApiError> {
        match self.suffix.as_deref() {
            Some(s) if !s.is_empty() => Err(ApiError::invalid("suffix: completing up to a suffix is not supported", Some("suffix"))),
            _ => Ok(()),
        }
    }

    /// How many top tokens to report per step: `logprobs: k` (completions) or `logprobs: true`
    /// with `top_logprobs: k` (chat). `None`: no log-probabilities at all.
    pub fn top_logprobs(&self, chat: bool) -> Result<Option<usize>, ApiError> {
        let k = match (&self.logprobs, chat) {
            (None | Some(serde_json::Value::Null), _) => return Ok(None),
            (Some(serde_json::Value::Bool(false)), true) => return Ok(None),
            (Some(serde_json::Value::Bool(true)), true) => self.top_logprobs.unwrap_or(0),
            (Some(v), false) if v.as_u64().is_some() => v.as_u64().unwrap_or(0) as usize,
            (Some(v), true) => return Err(ApiError::invalid(format!("logprobs: expected a boolean, got {v}"), Some("logprobs"))),
            (Some(v), false) => {
                return Err(ApiError::invalid(format!("logprobs: expected an integer 0 to {MAX_TOP_LOGPROBS}, got {v}"), Some("logprobs")))
            }
        };
        if k > MAX_TOP_LOGPROBS {
            let param = if chat { "top_logprobs" } else { "logprobs" };
            return Err(ApiError::invalid(format!("{param} = {k} is out of range (0 to {MAX_TOP_LOGPROBS})"), Some(param)));
        }
        Ok(Some(k))
    }

    /// The model's name must be the one served.
    pub fn check_model(&self, served: &str) -> Result<(), ApiError> {
        match self.model.as_deref() {
            None => Err(ApiError::invalid("missing field `model`", Some("model"))),
            Some(m) if m == served => Ok(()),
            Some(m) => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!("The model `{m}` does not exist; this server serves `{served}`"),
                param: Some("model".into()),
                code: Some("model_not_found"),
            }),
        }
    }

    /// The prompts of a completion request, as token ids (one per choice group).
    pub fn completion_prompts(&self, tokenizer: &Tokenizer, vocab: usize) -> Result<Vec<Vec<u32>>, ApiError> {
        let encode = |t: &str| tokenizer.encode(t, true).map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")));
        let prompts = match &self.prompt {
            None => return Err(ApiError::invalid("missing field `prompt`", Some("prompt"))),
            Some(Prompt::Text(t)) => vec![encode(t)?],
            Some(Prompt::Texts(ts)) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
            Some(Prompt::Ids(ids)) => vec![ids.clone()],
            Some(Prompt::IdLists(l)) => l.clone(),
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid("prompt: the list of prompts is empty", Some("prompt")));
        }
        for p in &prompts {
            if p.is_empty() {
                return Err(ApiError::invalid("prompt: the prompt is empty (no tokens)", Some("prompt")));
            }
            if let Some(t) = p.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::invalid(format!("prompt: token id {t} is outside the vocabulary of {vocab}"), Some("prompt")));
            }
        }
        Ok(prompts)
    }

    /// The chat prompt: the messages through the model's chat template, as token ids.
    pub fn chat_prompt(&self, tokenizer: &Tokenizer) -> Result<Vec<u32>, ApiError> {
        let messages = self.messages.as_ref().ok_or_else(|| ApiError::invalid("missing field `messages`", Some("messages")))?;
        if messages.is_empty() {
            return Err(ApiError::invalid("messages: at least one message is required", Some("messages")));
        }
        let mut out = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
                let param = format!("messages[{i}].role");
                return Err(ApiError::invalid(
                    format!("{param}: unknown role {:?} (system, developer, user, assistant or tool)", m.role),
                    Some(&param),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                let param = format!("messages[{i}].content[{j}]");
                                return Err(ApiError::invalid(
                                    format!("{param}: only text parts are supported, not {kind:?}"),
                                    Some(&param),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            let role = if m.role == "developer" { "system" } else { &m.role };
            out.push(Message::new(role, &content));
        }
        let text = tokenizer
            .apply_chat_template(&out, true)
            .map_err(|e| ApiError::invalid(format!("messages: the chat template failed: {e}"), Some("messages")))?;
        tokenizer.encode(&text, false).map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))
    }

    /// The engine's settings for one choice: sampling (OpenAI's defaults: temperature 1, top_p 1),
    /// the token limit against the context, stop strings and steering. `default_max`: the limit when
    /// none is given (None: up to the context, or what the KV cache holds: `cache_tokens`).
    pub fn params(&self, model: &Llama, prompt_len: usize, default_max: Option<usize>, cache_tokens: usize) -> Result<GenerateParams, ApiError> {
        let prompt_param = if self.messages.is_some() { "messages" } else { "prompt" };
        let ctx = model.config.context_len();
        if prompt_len >= ctx {
            return Err(ApiError::invalid(
                format!(
                    "This model's maximum context length is {ctx} tokens. However, your prompt has {prompt_len} \
                     tokens, which leaves no room to generate."
                ),
                Some(prompt_param),
            )
            .with_code("context_length_exceeded"));
        }
        let room = ctx - prompt_len;
        let (max_tokens, param) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => (Some(m), "max_completion_tokens"),
            (None, m) => (m, "max_tokens"),
        };
        let max_tokens = match max_tokens {
            Some(0) => return Err(ApiError::invalid(format!("{param} must be at least 1"), Some(param))),
            Some(m) if m > room => {
                return Err(ApiError::invalid(
                    format!(
                        "This model's maximum context length is {ctx} tokens. However, you requested {} tokens \
                         ({prompt_len} in the prompt, {m} for the completion).",
                        prompt_len + m
                    ),
                    Some(param),
                )
                .with_code("context_length_exceeded"))
            }
            Some(m) => m,
            None if prompt_len >= cache_tokens => {
                return Err(ApiError::invalid(
                    format!("the prompt has {prompt_len} tokens, but this server's KV cache holds {cache_tokens}"),
                    Some(prompt_param),
                )
                .with_code("context_length_exceeded"))
            }
            None => default_max.unwrap_or(room).min(room).min(cache_tokens - prompt_len),
        };
        let top_k = match self.top_k.unwrap_or(0) {
            k if k >= 0 => k as usize,
            -1 => 0,
            k => return Err(ApiError::invalid(format!("top_k = {k} is out of range (-1 or 0 for all, or a count)"), Some("top_k"))),
        };
        let mut logit_bias = Vec::new();
        for (k, &bias) in self.logit_bias.iter().flatten() {
            let id = k.parse::<u32>().ok().filter(|&id| (id as usize) < model.config.vocab_size).ok_or_else(|| {
                ApiError::invalid(format!("logit_bias: {k:?} is not a token id of this model"), Some("logit_bias"))
            })?;
            if !(-100.0..=100.0).contains(&bias) {
                return Err(ApiError::invalid(format!("logit_bias: {bias} for {k} is out of range (-100 to 100)"), Some("logit_bias")));
            }
            logit_bias.push((id, bias));
        }
        logit_bias.sort_by_key(|b| b.0);
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            logit_bias,
            seed: self.seed.unwrap_or(0),
        };
        sampling.validate().map_err(|e| ApiError::invalid(e.to_string(), Some(e.field)))?;
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::invalid("stop: stop strings must not be empty", Some("stop")));
        }
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid(format!("stop: {} stop strings, at most {MAX_STOP} are taken", stop.len()), Some("stop")));
        }
        if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid(
                format!("stop: a stop string of {} bytes, at most {MAX_STOP_BYTES} are taken", long.len()),
                Some("stop"),
            ));
        }
        let steer_specs = self.highrise.as_ref().map_or(&[][..], |e| &e.steer[..]);
        let (layers, hidden) = (model.config.num_hidden_layers, model.config.hidden_size);
        let mut steer = Vec::new();
        for (i, s) in steer_specs.iter().enumerate() {
            let param = format!("highrise.steer[{i}]");
            if s.layer >= layers {
                return Err(ApiError::invalid(format!("{param}.layer: {} but the model has {layers} layers", s.layer), Some(&param)));
            }
            if s.vector.len() != hidden {
                return Err(ApiError::invalid(
                    format!("{param}.vector: {} values, the residual stream has {hidden}", s.vector.len()),
                    Some(&param),
                ));
            }
            steer.push(Steer { layer: s.layer, vector: s.vector.clone(), scale: s.scale, positions: None });
        }
        let patch_specs = self.highrise.as_ref().map_or(&[][..], |e| &e.patch[..]);
        if patch_specs.len() > MAX_PATCHES {
            return Err(ApiError::invalid(format!("highrise.patch: {} patches, at most {MAX_PATCHES} are taken", patch_specs.len()), Some("highrise.patch")));
        }
        let mut patch = Vec::new();
        for (i, p) in patch_specs.iter().enumerate() {
            let param = format!("highrise.patch[{i}]");
            let site = Site::parse(&p.site)
                .ok_or_else(|| ApiError::invalid(format!("{param}.site: unknown site {:?} ({})", p.site, Site::names()), Some(&param)))?;
            let one = Patch { layer: p.layer, position: p.position, values: p.values.clone(), site };
            one.check(&model.config).map_err(|e| ApiError::invalid(format!("{param}: {e}"), Some(&param)))?;
            if p.position >= prompt_len + max_tokens {
                return Err(ApiError::invalid(
                    format!("{param}.position: {} but the prompt and completion are {} tokens at most", p.position, prompt_len + max_tokens),
                    Some(&param),
                ));
            }
            patch.push(one);
        }
        Ok(GenerateParams { max_tokens, sampling, stop, ignore_eos: self.ignore_eos.unwrap_or(false), steer, patch })
    }
}

/// What a request asked to capture, checked against the model.
#[derive(Clone, Debug, Default)]
pub struct CaptureSpec {
    /// Sites to return (the pass may capture more: Q and K for attention patterns, resid_post for
    /// the lens).
    pub sites: BTreeSet<Site>,
    pub attn_probs: bool,
    pub layers: Vec<usize>,
    pub positions: Option<Vec<usize>>,
    pub logit_lens: Option<usize>,
    /// The request's steering and patches, which the capture pass runs with too (so it sees the
    /// stream the generation ran on).
    pub steer: Vec<Steer>,
    pub patch: Vec<Patch>,
}

impl CaptureSpec {
    /// `None` when the request captures nothing.
    pub fn from_body(body: &Body, model: &Llama) -> Result<Option<CaptureSpec>, ApiError> {
        let Some(ext) = &body.highrise else { return Ok(None) };
        if ext.capture.is_empty() && ext.logit_lens.is_none() {
            return Ok(None);
        }
        let n = model.config.num_hidden_layers;
        let mut spec = CaptureSpec { logit_lens: ext.logit_lens, positions: ext.positions.clone(), ..Default::default() };
        // Each site, layer and position once: duplicates multiplied the work for nothing.
        fn no_repeats<T: Ord + std::fmt::Debug>(items: &[T], param: &str) -> Result<(), ApiError> {
            let mut seen = BTreeSet::new();
            match items.iter().find(|x| !seen.insert(*x)) {
                Some(x) => Err(ApiError::invalid(format!("{param}: {x:?} is given twice"), Some(param))),
                None => Ok(()),
            }
        }
        no_repeats(&ext.capture, "highrise.capture")?;
        no_repeats(ext.layers.as_deref().unwrap_or_default(), "highrise.layers")?;
        no_repeats(ext.positions.as_deref().unwrap_or_default(), "highrise.positions")?;
        for (i, name) in ext.capture.iter().enumerate() {
            match (Site::parse(name), name.as_str()) {
                (Some(s), _) => drop(spec.sites.insert(s)),
                (None, "attn_probs") => spec.attn_probs = true,
                (None, other) => {
                    let param = format!("highrise.capture[{i}]");
                    return Err(ApiError::invalid(
                        format!("{param}: unknown site {other:?} ({}, attn_probs)", Site::names()),
                        Some(&param),
                    ));
                }
            }
        }
        if let Some(k) = spec.logit_lens.filter(|&k| k == 0 || k > MAX_TOP_LOGPROBS) {
            return Err(ApiError::invalid(format!("highrise.logit_lens = {k} is out of range (1 to {MAX_TOP_LOGPROBS})"), Some("highrise.logit_lens")));
        }
        spec.layers = ext.layers.clone().unwrap_or_else(|| (0..n).collect());
        if let Some(l) = spec.layers.iter().find(|&&l| l >= n) {
            return Err(ApiError::invalid(format!("highrise.layers: layer {l} does not exist (the model has {n})"), Some("highrise.layers")));
        }
        Ok(Some(spec))
    }

    /// Bytes of float32 values a capture pass over `tokens` tokens computes or returns at most:
    /// each site's rows at each layer, attention patterns (all heads, T x T, before positions pick
    /// their rows) and the logit lens.
    pub fn bytes(&self, model: &Llama, tokens: usize) -> u64 {
        let c = &model.config;
        let (t, layers) = (tokens as u64, self.layers.len() as u64);
        let rows = self.positions.as_ref().map_or(t, |p| (p.len() as u64).min(t));
        let (hq, hkv, d) = (c.num_attention_heads as u64, c.kv_heads() as u64, c.head_dim() as u64);
        let mut values = 0u64;
        for &site in &self.sites {
            // Captured for every token, returned for the positions asked.
            let widths: u64 = match site {
                Site::FinalNorm => site.width(c, c.num_hidden_layers) as u64,
                _ => self.layers.iter().map(|&l| site.width(c, l) as u64).sum(),
            };
            values += widths * t;
        }
        if self.attn_probs {
            values += layers * (hq + 2 * hkv) * d * t + layers * hq * t * t;
        }
        if let Some(k) = self.logit_lens {
            values += layers * t * c.hidden_size as u64 + layers * rows * 3 * k as u64;
        }
        4 * values
    }
}
