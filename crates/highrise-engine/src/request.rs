//! What a request asks for and what it gets back: the generation settings (`GenerateParams`), the
//! finished generation (`Generation`) and why it ended (`FinishReason`), and the end-of-sequence ids
//! a model and tokenizer stop at. The vocabulary shared by the engine and its clients.

use highrise_model::{Llama, Tokenizer};
use serde::Serialize;

use crate::sampling::SamplingParams;

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
    /// Activation patches of this request, each at a position of its sequence (the prompt's tokens
    /// counted first, then the completion's): applied in whichever step computes that position.
    pub patch: Vec<highrise_model::Patch>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams { max_tokens: 256, sampling: SamplingParams::greedy(), stop: vec![], ignore_eos: false, steer: vec![], patch: vec![] }
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
