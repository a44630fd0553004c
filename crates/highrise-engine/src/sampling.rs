//! Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, and a seeded
//! random draw. Each request owns its sampler and its generator state, so the same seed gives the
//! same tokens whatever else runs beside it.

pub use highrise_core::ops::sampling::top_log_softmax;
use highrise_core::ops::sampling::{argmax_row, sample_row, FieldError, SampleParams};
use highrise_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// Per-request sampling settings, in the vocabulary of HF `generate` and the OpenAI API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 is greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to p (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0: none).
    pub min_p: f32,
    /// HF's multiplicative penalty on every token seen in the prompt or output (1: none).
    pub repetition_penalty: f32,
    /// OpenAI's: subtracted once from each token already generated.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted per occurrence of each token already generated.
    pub frequency_penalty: f32,
    /// Added to the logits of the given tokens.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams::default()
    }

    /// Checks the ranges; the error names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        // The draw's own settings, checked as `Backend::sample` checks them.
        let (temperature, top_p, min_p) = (self.temperature, self.top_p, self.min_p);
        SampleParams { temperature, top_k: 0, top_p, min_p, uniform: 0.0 }.validate()?;
        let bad = |field: &'static str, v: f32, range: &str| Err(FieldError { field, message: format!("{field} = {v} is out of range ({range})") });
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", self.repetition_penalty, "> 0");
        }
        for (f, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(f, v, "-2 to 2");
            }
        }
        Ok(())
    }
}

/// xoshiro256**, seeded through splitmix64: small, fast, and (unlike a library's default generator)
/// fixed forever, so a seed reproduces the same tokens across highrise versions.
#[derive(Clone, Debug)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut s = seed;
        let mut next = || highrise_core::rand::splitmix64(&mut s);
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The token chosen and its log-probability under the distribution it was drawn from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

/// A request's sampler: its settings and its own random state.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = Rng::new(params.seed);
        Sampler { params, rng }
    }

    /// Picks the next token. `prompt` and `output` are the ids so far (for the penalties).
    pub fn sample(&mut self, logits: &[f32], prompt: &[u32], output: &[u32]) -> Sampled {
        // The penalized row is this thread's buffer, kept between tokens (`sample_row` keeps its
        // own likewise).
        thread_local! {
            static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let draw = self.draw();
        ROW.with(|r| {
            let row = &mut *r.borrow_mut();
            row.clear();
            row.extend_from_slice(logits);
            self.penalize(row, prompt, output);
            let (token, logprob) = sample_row(row, &draw);
            Sampled { token, logprob }
        })
    }

    /// The settings of the next draw for `Backend::sample` (whose definition `sample` shares),
    /// taking this request's next random number: for a request without penalties or biases
    /// (`penalizes` false), whose logits the backend can draw from as they are.
    pub fn draw(&mut self) -> SampleParams {
        let p = &self.params;
        let (temperature, top_k, top_p, min_p) = (p.temperature, p.top_k.min(u32::MAX as usize) as u32, p.top_p, p.min_p);
        let mut draw = SampleParams { temperature, top_k, top_p, min_p, uniform: 0.0 };
        if !draw.is_greedy() {
            draw.uniform = self.rng.uniform();
        }
        draw
    }

    /// Whether penalties or biases change the logits before the draw (then the host draws).
    pub fn penalizes(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 || !p.logit_bias.is_empty()
    }

    /// Whether `sample` is the argmax of the logits as they come (temperature 0, no penalty, no
    /// bias): then the backend can choose the token itself (`Backend::argmax`).
    pub fn is_plain_greedy(&self) -> bool {
        self.params.temperature < SampleParams::GREEDY_BELOW && !self.penalizes()
    }

    fn penalize(&self, logits: &mut [f32], prompt: &[u32], output: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(output) {
                if let Some(s) = seen.get_mut(t as usize) {
                    if !*s {
                        *s = true;
                        let l = &mut logits[t as usize];
                        *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in output {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        for &(t, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
    }
}

/// Each row's token chosen by the backend, with its log-probability: the largest logit (the first,
/// on ties; `Backend::argmax`) where `draws` is None, else a draw by each row's settings
/// (`Backend::sample`). An id and a number per row come back, not the logits [rows, vocab].
pub fn choose_on_backend(logits: &Tensor, draws: Option<&[SampleParams]>) -> highrise_model::Result<Vec<(u32, f32)>> {
    let (index, logprob) = launch_choice(logits, draws)?;
    read_choice(&index, &logprob)
}

/// Queues the backend's choice of each row's token: (index, log-probability) tensors, to read.
fn launch_choice(logits: &Tensor, draws: Option<&[SampleParams]>) -> highrise_model::Result<(Tensor, Tensor)> {
    let be = logits.backend();
    let rows = logits.dims()[0];
    let mut index = Tensor::empty(be, DType::U32, &[rows])?;
    let mut logprob = Tensor::empty(be, DType::F32, &[rows])?;
    match draws {
        None => be.argmax(&mut index, &mut logprob, logits)?,
        Some(params) => be.sample(&mut index, &mut logprob, logits, params)?,
    }
    Ok((index, logprob))
}

fn read_choice(index: &Tensor, logprob: &Tensor) -> highrise_model::Result<Vec<(u32, f32)>> {
    Ok(index.to_f32()?.into_iter().map(|i| i as u32).zip(logprob.to_f32()?).collect())
}

/// `forward` (a pass that returns logits) and the backend's choice of each row's token, as
/// `choose_on_backend`; with `graph` (a key naming the step's shape) the pass and the choice are one
/// step the backend may run as a graph (`Backend::graph_begin`), read only once it has ended.
pub fn forward_and_choose(
    backend: &dyn highrise_core::Backend,
    graph: Option<u64>,
    draws: Option<&[SampleParams]>,
    forward: impl FnOnce() -> highrise_model::Result<Tensor>,
) -> highrise_model::Result<Vec<(u32, f32)>> {
    let Some(key) = graph else {
        return choose_on_backend(&forward()?, draws);
    };
    backend.graph_begin(key)?;
    let launched = forward().and_then(|logits| launch_choice(&logits, draws));
    // Ended even after an error: what was recorded then runs, as it would have op by op.
    let ended = backend.graph_end();
    let (index, logprob) = launched?;
    ended?;
    read_choice(&index, &logprob)
}

/// The key of a decode step's graph: its sequences and whether it draws (`sample`) or takes the
/// argmax. Only a hint (the backend compares the work itself), so collisions cost time only.
pub fn graph_key(sequences: usize, draws: bool) -> u64 {
    ((sequences as u64) << 1) | draws as u64
}

/// Whether decode steps may run as graphs: on unless `HIGHRISE_GRAPHS=0`.
pub fn graphs_enabled() -> bool {
    !std::env::var("HIGHRISE_GRAPHS").is_ok_and(|v| v == "0") && !highrise_core::profile::enabled()
}

/// The index of the largest logit (the first, on ties; NaN never is).
pub fn argmax(logits: &[f32]) -> u32 {
    argmax_row(logits) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_picks_argmax_with_its_logprob() {
        let s = Sampler::new(SamplingParams::greedy()).sample(&logits(), &[], &[]);
        assert_eq!(s.token, 1);
        let z: f32 = logits().iter().map(|l| (l - 3.0).exp()).sum();
        assert!((s.logprob - (-z.ln())).abs() < 1e-6);
    }

    #[test]
    fn top_log_softmax_is_sorted_and_normalized() {
        let top = top_log_softmax(&logits(), 5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 4, 2, 0, 3]);
        let total: f32 = top.iter().map(|t| t.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert_eq!(top_log_softmax(&logits(), 2).len(), 2);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let p = SamplingParams { temperature: 1.5, seed: 7, ..Default::default() };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..64).map(|_| s.sample(&logits(), &[], &[]).token).collect::<Vec<_>>()
        };
        assert_eq!(draw(&p), draw(&p));
        assert_ne!(draw(&p), draw(&SamplingParams { seed: 8, ..p.clone() }));
    }

    #[test]
    fn top_k_top_p_min_p_restrict_the_candidates() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 2, seed: 1, ..Default::default() });
        assert!((0..200).all(|_| [1, 4].contains(&s.sample(&logits(), &[], &[]).token)));
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.01, seed: 1, ..Default::default() });
        assert!((0..50).all(|_| s.sample(&logits(), &[], &[]).token == 1));
        // min_p 0.95: only tokens within 5% of the top one's probability (1 and 4: e^-0.1 = 0.905 < 0.95).
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, min_p: 0.95, seed: 1, ..Default::default() });
        assert!((0..50).all(|_| s.sample(&logits(), &[], &[]).token == 1));
    }

    #[test]
    fn penalties_and_bias_move_the_choice() {
        let rep = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
        // Token 1 (3.0) seen: 1.5 < 2.9, so token 4 wins.
        assert_eq!(Sampler::new(rep).sample(&logits(), &[1], &[]).token, 4);
        let freq = SamplingParams { frequency_penalty: 0.1, ..Default::default() };
        assert_eq!(Sampler::new(freq).sample(&logits(), &[], &[1, 1]).token, 4);
        let bias = SamplingParams { logit_bias: vec![(3, 10.0)], ..Default::default() };
        assert_eq!(Sampler::new(bias).sample(&logits(), &[], &[]).token, 3);
    }

    #[test]
    fn invalid_values_name_the_field() {
        let e = SamplingParams { top_p: 0.0, ..Default::default() }.validate().unwrap_err();
        assert_eq!(e.field, "top_p", "{e}");
        let e = SamplingParams { temperature: -1.0, ..Default::default() }.validate().unwrap_err();
        assert_eq!(e.field, "temperature", "{e}");
        let e = SamplingParams { frequency_penalty: 3.0, ..Default::default() }.validate().unwrap_err();
        assert_eq!((e.field, e.to_string()), ("frequency_penalty", "frequency_penalty = 3 is out of range (-2 to 2)".into()));
    }
}
