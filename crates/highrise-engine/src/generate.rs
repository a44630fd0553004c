//! Generating text for one sequence: prefill the prompt in one pass, then decode token by token from
//! the KV cache, sampling each token, streaming text as it comes, and stopping at EOS, a stop string or
//! the token limit.

use std::time::Instant;

use highrise_model::{Error, Llama, Result, Tokenizer};
use serde::Serialize;

use crate::engine::{Engine, EngineConfig, Request};
use crate::sampling::SamplingParams;

/// Tokens per KV-cache block.
pub const BLOCK_SIZE: usize = 16;

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before any of these strings; they are not part of the text.
    pub stop: Vec<String>,
    /// Keep going past the end-of-sequence token.
    pub ignore_eos: bool,
    /// Steering vectors added to this request's residual stream at every step (their `positions`
    /// are ignored: every token of the request is steered).
    pub steer: Vec<highrise_model::Steer>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams { max_tokens: 256, sampling: SamplingParams::greedy(), stop: vec![], ignore_eos: false, steer: vec![] }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End of sequence or a stop string.
    Stop,
    /// The token limit.
    Length,
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// The generated ids (including a final EOS, excluding tokens past a stop string).
    pub ids: Vec<u32>,
    /// Log-probability of each generated id under the distribution it was drawn from.
    pub logprobs: Vec<f32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl Generation {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_ids.len() as f64 / self.prefill_secs.max(1e-9)
    }

    /// Tokens decoded from the cache per second (the first token comes out of the prefill).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.ids.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// The end-of-sequence ids: the config's and the tokenizer's.
pub fn eos_ids(model: &Llama, tokenizer: &Tokenizer) -> Vec<u32> {
    let mut ids = model.config.eos_token_ids();
    ids.extend(tokenizer.eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)));
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Turns ids into text as they arrive, holding back bytes that may still change: an incomplete UTF-8
/// character, or a possible beginning of a stop string.
#[derive(Clone, Debug, Default)]
pub struct TextStream {
    stop: Vec<String>,
    ids: Vec<u32>,
    text: String,
    emitted: usize,
}

impl TextStream {
    pub fn new(stop: &[String]) -> Self {
        TextStream { stop: stop.to_vec(), ..Default::default() }
    }

    /// Adds a token; returns the text now safe to show, and whether a stop string was reached.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<(String, bool)> {
        self.ids.push(id);
        self.text = tokenizer.decode(&self.ids)?;
        if let Some(at) = self.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(at);
            return Ok((self.take(self.text.len()), true));
        }
        let mut safe = self.text.len();
        if self.text.ends_with('\u{FFFD}') {
            safe = self.text.trim_end_matches('\u{FFFD}').len();
        }
        // Hold back a tail that a stop string could start with.
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && self.text[..safe].ends_with(&s[..k]) {
                    safe = safe.min(self.text.len() - k);
                    break;
                }
            }
        }
        Ok((self.take(safe), false))
    }

    /// Whatever is still held back, at the end.
    pub fn finish(&mut self) -> String {
        self.take(self.text.len())
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    fn take(&mut self, upto: usize) -> String {
        let upto = upto.max(self.emitted);
        let s = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        s
    }
}

/// Generates a continuation of `prompt_ids`, calling `on_text` with each piece of text as it is ready.
/// One sequence on an engine of its own, with a cache just large enough for it.
/// Most prompt tokens one forward pass of `generate` takes.
pub const PREFILL_CHUNK: usize = 256;

pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    params.sampling.validate().map_err(Error::Input)?;
    let ctx = model.config.context_len();
    if prompt_ids.is_empty() {
        return Err(Error::Input("the prompt is empty".into()));
    }
    if prompt_ids.len() >= ctx {
        return Err(Error::Input(format!(
            "the prompt has {} tokens, but the model's context holds {ctx} (and one more is needed to generate)",
            prompt_ids.len()
        )));
    }
    let params = GenerateParams { max_tokens: params.max_tokens.min(ctx - prompt_ids.len()), ..params.clone() };
    let total = prompt_ids.len() + params.max_tokens;
    let config = EngineConfig {
        num_blocks: total.div_ceil(BLOCK_SIZE),
        block_size: BLOCK_SIZE,
        // Long prompts prefill in chunks: activations stay those of PREFILL_CHUNK tokens, and a GEMM
        // of that many rows already runs at full speed.
        max_batch_tokens: prompt_ids.len().clamp(1, PREFILL_CHUNK),
        max_running: 1,
    };
    let mut engine = Engine::new(model, tokenizer, config)?;
    let id = engine.submit(Request { prompt: prompt_ids.to_vec(), params, logprobs: true, top_logprobs: 0 })?;
    let start = Instant::now();
    let mut prefill_secs = None;
    let mut done = None;
    while done.is_none() {
        for ev in engine.step()? {
            prefill_secs.get_or_insert_with(|| start.elapsed().as_secs_f64());
            on_text(&ev.text);
            if ev.finish.is_some() {
                done = engine.take_finished(id);
            }
        }
    }
    let mut g = done.expect("finished");
    g.prefill_secs = prefill_secs.unwrap_or_default();
    g.decode_secs = start.elapsed().as_secs_f64() - g.prefill_secs;
    Ok(g)
}
