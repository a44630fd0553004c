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
/// character, or a possible beginning of a stop string. What it has released is never taken back:
/// the pieces it returns add up to `text()` at the end, and that text holds no stop string.
#[derive(Clone, Debug, Default)]
pub struct TextStream {
    stop: Vec<String>,
    ids: Vec<u32>,
    text: String,
    /// Bytes of `text` released so far (a char boundary).
    emitted: usize,
}

impl TextStream {
    /// Empty stop strings are ignored (each would match at once).
    pub fn new(stop: &[String]) -> Self {
        TextStream { stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(), ..Default::default() }
    }

    /// Adds a token; returns the text now safe to show, and whether a stop string was reached.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<(String, bool)> {
        self.ids.push(id);
        let decoded = tokenizer.decode(&self.ids)?;
        Ok(self.advance(decoded))
    }

    /// The step after decoding: `decoded` is the whole text so far. Returns the text now safe to
    /// show, and whether a stop string was reached (the text then ends where it began).
    pub fn advance(&mut self, decoded: String) -> (String, bool) {
        // Released text stays as released, even where a tokenizer decodes a longer sequence
        // differently in front (only a trailing incomplete character is expected to change).
        let mut text = decoded;
        if text.get(..self.emitted) != Some(&self.text[..self.emitted]) {
            let mut k = self.emitted.min(text.len());
            while !text.is_char_boundary(k) {
                k += 1;
            }
            text = format!("{}{}", &self.text[..self.emitted], &text[k..]);
        }
        self.text = text;
        if let Some(at) = self.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            // Hold-back keeps every stop string's start unreleased; should a rewritten front have
            // released part of one anyway, the text ends where the release did.
            self.text.truncate(at.max(self.emitted));
            return (self.take(self.text.len()), true);
        }
        let base = self.text.trim_end_matches('\u{FFFD}').len();
        // Hold back the longest tail of the settled text that some stop string begins with: each
        // stop string is measured against the same settled end, and the most cautious one wins.
        let mut safe = base;
        for s in &self.stop {
            if let Some(k) = (1..s.len()).rev().find(|&k| s.is_char_boundary(k) && self.text[..base].ends_with(&s[..k])) {
                safe = safe.min(base - k);
            }
        }
        (self.take(safe), false)
    }

    /// Whatever is still held back, at the end.
    pub fn finish(&mut self) -> String {
        self.take(self.text.len())
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Releases text up to byte `upto` (never backwards, never past the end).
    fn take(&mut self, upto: usize) -> String {
        let upto = upto.clamp(self.emitted, self.text.len());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `full` to a stream as a tokenizer would decode it after each of `cuts` (byte lengths,
    /// rising): a character cut in two decodes to U+FFFD until its last byte arrives.
    fn run(full: &str, stop: &[String], cuts: &[usize]) -> (Vec<String>, String, bool) {
        let mut ts = TextStream::new(stop);
        let mut pieces = Vec::new();
        for &n in cuts {
            let (piece, stopped) = ts.advance(String::from_utf8_lossy(&full.as_bytes()[..n]).into_owned());
            pieces.push(piece);
            if stopped {
                return (pieces, ts.text().to_string(), true);
            }
        }
        pieces.push(ts.finish());
        (pieces, ts.text().to_string(), false)
    }

    #[test]
    fn overlapping_stop_strings_never_release_what_a_later_one_claims() {
        // The audit's case: "e!" held back only "e" of "...the", releasing the "h" that "he city"
        // later began with; taking the rest then sliced out of bounds.
        let full = "Once upon a time, in the city of";
        let stop = ["e!".to_string(), "he city".to_string()];
        let cuts: Vec<usize> = (1..=full.len()).collect();
        let (pieces, text, stopped) = run(full, &stop, &cuts);
        assert!(stopped);
        assert_eq!(text, "Once upon a time, in t");
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn a_stop_string_ending_inside_a_split_character_is_found_whole() {
        let full = "caf\u{e9} au lait";
        let stop = ["f\u{e9}".to_string()];
        let cuts: Vec<usize> = (1..=full.len()).collect();
        let (pieces, text, stopped) = run(full, &stop, &cuts);
        assert!(stopped && text == "ca" && pieces.concat() == "ca", "{pieces:?}");
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
    }

    /// Random UTF-8 text split at random byte positions (characters cut in two included), random
    /// overlapping and multi-byte stop sets: never a panic, the pieces add up to the final text,
    /// which is a prefix of the whole, holds no stop string, ends right before one when stopped,
    /// and shows no U+FFFD of a half-arrived character. A fixed seed, 20,000 cases.
    #[test]
    fn streamed_pieces_add_up_and_the_stop_holds_for_random_splits() {
        let mut state = 0x5eed_u64;
        let mut next = move |n: usize| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % n as u64) as usize
        };
        let alphabet = ["a", "b", "e", "h", " ", "!", "\u{e9}", "\u{4e16}", "\u{1f600}"];
        for case in 0..20_000 {
            let full: String = (0..next(24)).map(|_| alphabet[next(alphabet.len())]).collect();
            let stop: Vec<String> = (0..next(4))
                .map(|_| {
                    let cs: Vec<char> = full.chars().collect();
                    if !cs.is_empty() && next(3) > 0 {
                        let a = next(cs.len());
                        cs[a..(a + 1 + next(4)).min(cs.len())].iter().collect()
                    } else {
                        (0..1 + next(3)).map(|_| alphabet[next(alphabet.len())]).collect()
                    }
                })
                .collect();
            let mut cuts: Vec<usize> = (0..next(8)).map(|_| next(full.len() + 1)).collect();
            cuts.push(full.len());
            cuts.sort_unstable();
            let (pieces, text, stopped) = run(&full, &stop, &cuts);
            let what = format!("case {case}: {full:?}, stop {stop:?}, cuts {cuts:?}");
            assert_eq!(pieces.concat(), text, "{what}");
            assert!(full.starts_with(&text), "{what}: {text:?}");
            assert!(stop.iter().all(|s| s.is_empty() || !text.contains(s.as_str())), "{what}: {text:?}");
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{what}: {pieces:?}");
            if stopped {
                assert!(stop.iter().any(|s| !s.is_empty() && full[text.len()..].starts_with(s.as_str())), "{what}: {text:?}");
            } else {
                assert_eq!(text, full, "{what}");
            }
        }
    }
}
