//! Generating text for one sequence: a client of the engine (as llama2.c's `generate()` is of
//! `forward()`): one sequence on an engine of its own, prefilling the prompt in chunks, then decoding
//! token by token, streaming text as it comes, and stopping at EOS, a stop string or the token limit.

use std::time::Instant;

use highrise_model::{Error, Llama, Result, Tokenizer};

use crate::blocks::BLOCK_SIZE;
use crate::engine::{Engine, EngineConfig, Request};
use crate::request::{GenerateParams, Generation};

/// Most prompt tokens one forward pass of `generate` takes.
pub const PREFILL_CHUNK: usize = 256;

/// Generates a continuation of `prompt_ids`, calling `on_text` with each piece of text as it is ready.
/// One sequence on an engine of its own, with a cache just large enough for it.
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    params.sampling.validate().map_err(|e| Error::Input(e.to_string()))?;
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
