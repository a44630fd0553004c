//! Choosing tokens from the logits on the backend, so a decoding step reads back a token id and its
//! log-probability per sequence instead of a whole row of the vocabulary.

use super::{Check, CheckResult};
use crate::{DType, HostSlice, TensorRef};

/// Greedy choice: `index[b] = argmax_v x[b, v]` (the lowest index among equal maxima) and
/// `logprob[b] = x[b, index[b]] - logsumexp_v x[b, v]`. x [B, V] float; index [B] u32; logprob [B] f32.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Argmax<'a> {
    pub index: TensorRef<'a>,
    pub logprob: TensorRef<'a>,
    pub x: TensorRef<'a>,
}

impl Argmax<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.present("x", &self.x)?;
        c.float("x", &self.x)?;
        c.rank("x", &self.x, 2)?;
        let rows = self.x.dims()[0];
        if self.x.dims()[1] == 0 {
            return Err("x has no columns to choose from".into());
        }
        c.present("index", &self.index)?;
        if self.index.dtype != DType::U32 {
            return Err(format!("index must be u32, is {}", self.index.dtype));
        }
        c.dims("index", &self.index, &[rows])?;
        c.present("logprob", &self.logprob)?;
        if self.logprob.dtype != DType::F32 {
            return Err(format!("logprob must be f32, is {}", self.logprob.dtype));
        }
        c.dims("logprob", &self.logprob, &[rows])
    }
}

/// One row's settings for [`Sample`]. Penalties and logit biases are the caller's, applied to the
/// logits before.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    /// 0: greedy, exactly [`Argmax`].
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: u32,
    /// Keep the shortest run of most likely tokens whose probability adds up to top_p (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0: none).
    pub min_p: f32,
    /// The row's random draw, uniform in [0, 1).
    pub uniform: f64,
}

impl SampleParams {
    /// Temperatures below this are greedy, as 0 is: dividing logits by them overflows f32 (at
    /// 1e-45 every x / T is infinite, and the draw was NaN), and they leave nothing to draw from
    /// but near-ties anyway.
    pub const GREEDY_BELOW: f32 = 1e-5;

    /// Whether this draw is the argmax (temperature 0, or below `GREEDY_BELOW`).
    pub fn is_greedy(&self) -> bool {
        self.temperature < Self::GREEDY_BELOW
    }

    /// Checks the ranges; the error names the field.
    pub fn validate(&self) -> std::result::Result<(), FieldError> {
        let p = self;
        let bad = |field, message: String| Err(FieldError { field, message });
        if !(p.temperature.is_finite() && p.temperature >= 0.0) {
            return bad("temperature", format!("temperature {} is not >= 0", p.temperature));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return bad("top_p", format!("top_p {} is not in (0, 1]", p.top_p));
        }
        if !(0.0..=1.0).contains(&p.min_p) {
            return bad("min_p", format!("min_p {} is not in [0, 1]", p.min_p));
        }
        if !(0.0..1.0).contains(&p.uniform) {
            return bad("uniform", format!("uniform {} is not in [0, 1)", p.uniform));
        }
        Ok(())
    }
}

/// A setting out of its range: the field it is (as a request names it), and what was wrong.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A draw from each row's distribution: `index[b]` is the token chosen from row b of x [B, V] by
/// `params[b]`, `logprob[b]` its log-probability among the tokens kept. [`sample_row`] is the
/// definition: the tokens ordered by `x / temperature` (ties by lower index), the first top_k kept,
/// then the shortest run of those whose probabilities (renormalized) add up to top_p, then those at
/// least min_p times as likely as the first (at least one); the draw walks the kept run in order.
/// index [B] u32; logprob [B] f32; params: B entries.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Sample<'a> {
    pub index: TensorRef<'a>,
    pub logprob: TensorRef<'a>,
    pub x: TensorRef<'a>,
    pub params: HostSlice<'a, SampleParams>,
}

impl Sample<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        Argmax { index: self.index, logprob: self.logprob, x: self.x }.validate(c)?;
        let rows = self.x.dims()[0];
        if self.params.len() != rows {
            return Err(format!("{} params for {rows} rows", self.params.len()));
        }
        for (b, p) in self.params.as_slice().iter().enumerate() {
            p.validate().map_err(|e| format!("params[{b}]: {e}"))?;
        }
        Ok(())
    }
}

/// The first index of the largest value (NaN never is), as [`Argmax`] picks.
pub fn argmax_row(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in row.iter().enumerate() {
        if l > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    best
}

/// A row's maximum and the log of its sum of exp(x - max), summed in f64: log-softmax(x) is
/// x - max - that.
fn max_log_sum(row: &[f32]) -> (f32, f64) {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    (max, row.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln())
}

/// `row[i] - logsumexp(row)`, summed in f64.
pub fn log_softmax_at(row: &[f32], i: usize) -> f32 {
    let (max, log_sum) = max_log_sum(row);
    ((row[i] - max) as f64 - log_sum) as f32
}

/// The `k` largest entries of log-softmax(`logits`), most likely first (ties by id).
pub fn top_log_softmax(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    top_of(logits, k, max_log_sum(logits))
}

/// `log_softmax_at(row, i)` and `top_log_softmax(row, k)` with one pass of exponentials over the
/// row: a prompt's scores, a row per token.
pub fn log_softmax_at_and_top(row: &[f32], i: usize, k: usize) -> (f32, Vec<(u32, f32)>) {
    let (max, log_sum) = max_log_sum(row);
    (((row[i] - max) as f64 - log_sum) as f32, top_of(row, k, (max, log_sum)))
}

fn top_of(logits: &[f32], k: usize, (max, log_sum): (f32, f64)) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, by_logit);
    idx.truncate(k);
    idx.sort_unstable_by(by_logit);
    idx.into_iter().map(|i| (i, ((logits[i as usize] - max) as f64 - log_sum) as f32)).collect()
}

/// [`Sample`] for one row of logits: (token, its log-probability among those kept).
/// Works in a buffer of the calling thread's, kept between rows (a vocabulary's candidates with
/// their weights: ~2 MB at 128k tokens, allocated anew per row it came and went through the
/// allocator on every sampled token, in the CPU backend's threads and in the host sampler alike).
pub fn sample_row(row: &[f32], p: &SampleParams) -> (u32, f32) {
    thread_local! {
        static SCRATCH: std::cell::RefCell<SampleScratch> = Default::default();
    }
    SCRATCH.with(|s| sample_row_in(row, p, &mut s.borrow_mut()))
}

/// The buffer `sample_row_in` works in.
#[derive(Default)]
struct SampleScratch {
    /// (token, logit / temperature, e = exp(that - max)).
    cand: Vec<(u32, f32, f64)>,
}

/// How many of the order's first tokens `sample_row_in` sorts before it knows whether the cuts and
/// the draw need more (then eight times as many): a language model's draw is nearly always among
/// its first few hundred tokens, where sorting the whole vocabulary (128k for Llama 3) cost ~2 ms
/// a row, most of a small model's decoded token on a CPU.
const SORTED_FIRST: usize = 512;

/// `sample_row` in `scratch`. The order's first tokens are sorted only as far as the cuts
/// and the draw reach (a selection, then a sort of that prefix); the weights' total is summed in
/// the candidates' own order.
fn sample_row_in(row: &[f32], p: &SampleParams, scratch: &mut SampleScratch) -> (u32, f32) {
    if p.is_greedy() {
        let token = argmax_row(row);
        return (token as u32, log_softmax_at(row, token));
    }
    let by_value = |a: &(u32, f32, f64), b: &(u32, f32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let cand = &mut scratch.cand;
    cand.clear();
    cand.extend(row.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature, 0.0)));
    let k = if p.top_k == 0 { cand.len() } else { (p.top_k as usize).min(cand.len()) };
    if k < cand.len() {
        cand.select_nth_unstable_by(k - 1, by_value);
        cand.truncate(k);
    }
    // The first in the order: the largest value.
    let max = cand.iter().min_by(|a, b| by_value(a, b)).map_or(0.0, |c| c.1);
    let mut total = 0.0;
    for c in cand.iter_mut() {
        c.2 = ((c.1 - max) as f64).exp();
        total += c.2;
    }
    let n = cand.len();
    let mut m = n.min(SORTED_FIRST);
    loop {
        if m < n {
            cand.select_nth_unstable_by(m - 1, by_value);
            cand[..m].sort_unstable_by(by_value);
        } else {
            cand.sort_unstable_by(by_value);
        }
        // Probabilities of the sorted prefix; the cuts and the draw below each need at most
        // `m` of them, or the prefix grows.
        let q = |i: usize| cand[i].2 / total;
        let mut keep = n;
        let mut more = false;
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            match (0..m).position(|i| {
                acc += q(i);
                acc >= p.top_p as f64
            }) {
                Some(i) => keep = i + 1,
                None => more = m < n,
            }
        }
        if p.min_p > 0.0 && !more {
            // Those at least min_p times the first: a prefix of the order.
            let floor = q(0) * p.min_p as f64;
            let count = (0..m).take_while(|&i| q(i) >= floor).count();
            more = count == m && m < n;
            keep = keep.min(count.max(1));
        }
        if !more {
            // The kept tokens' mass (every token's: summed in their own order where not all are sorted).
            let kept: f64 = if keep <= m { (0..keep).map(q).sum() } else { cand.iter().map(|c| c.2 / total).sum() };
            let mut r = p.uniform * kept;
            let mut pick = None;
            for i in 0..keep.min(m) {
                if r < q(i) {
                    pick = Some(i);
                    break;
                }
                r -= q(i);
            }
            // Rounding left the draw past the run: its last token.
            let pick = pick.or((keep <= m).then(|| keep - 1));
            if let Some(i) = pick {
                return (cand[i].0, (q(i) / kept).ln() as f32);
            }
        }
        m = (m * 8).min(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: u32, top_p: f32, min_p: f32, uniform: f64) -> SampleParams {
        SampleParams { temperature, top_k, top_p, min_p, uniform }
    }

    /// The definition with the whole order sorted, as `sample_row_in` was written before it sorted
    /// only the prefix the cuts and the draw reach.
    fn sample_row_sorted(row: &[f32], p: &SampleParams) -> (u32, f32) {
        let by_value = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let mut cand: Vec<(u32, f32)> = row.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)).collect();
        let k = if p.top_k == 0 { cand.len() } else { (p.top_k as usize).min(cand.len()) };
        cand.sort_unstable_by(by_value);
        cand.truncate(k);
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            keep = probs.iter().position(|&q| {
                acc += q;
                acc >= p.top_p as f64
            }).map_or(keep, |i| i + 1);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let kept: f64 = probs[..keep].iter().sum();
        let mut r = p.uniform * kept;
        let mut pick = keep - 1;
        for (i, q) in probs[..keep].iter().enumerate() {
            if r < *q {
                pick = i;
                break;
            }
            r -= q;
        }
        (cand[pick].0, (probs[pick] / kept).ln() as f32)
    }

    #[test]
    fn sorting_only_the_reached_prefix_draws_what_sorting_everything_does() {
        // Rows peaked as a language model's (a few hundred tokens hold the mass) and flat (the draw
        // reaches thousands deep, so the sorted prefix grows), with runs of ties; every cut.
        let mut state = 7u64;
        let mut uniform = || (crate::rand::splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
        let mut scratch = SampleScratch::default();
        let mut deep = 0;
        for (v, spread) in [(49152usize, 30.0f32), (49152, 6.0), (5000, 2.0), (3, 1.0), (600, 0.0)] {
            for round in 0..6 {
                let mut row: Vec<f32> = (0..v).map(|_| (uniform() as f32 - 0.5) * spread).collect();
                for j in (0..v.saturating_sub(40)).step_by(97) {
                    row[j + 1] = row[j];
                }
                for (temperature, top_k, top_p, min_p) in [(0.8, 0, 1.0, 0.0), (1.0, 0, 0.95, 0.0), (1.3, 40, 0.9, 0.0), (0.7, 0, 1.0, 0.05), (1.0, 0, 0.999, 0.001)] {
                    let p = SampleParams { temperature, top_k, top_p, min_p, uniform: if round == 0 { 0.999_999 } else { uniform() } };
                    let (want, got) = (sample_row_sorted(&row, &p), sample_row_in(&row, &p, &mut scratch));
                    assert_eq!(got.0, want.0, "v {v} spread {spread} {p:?}");
                    assert!((got.1 - want.1).abs() <= 1e-5 * want.1.abs().max(1.0), "v {v} {p:?}: logprob {} vs {}", got.1, want.1);
                    let rank = row.iter().filter(|&&x| x > row[got.0 as usize]).count();
                    deep += (rank >= SORTED_FIRST) as usize;
                }
            }
        }
        assert!(deep > 0, "some draws fell past the first sorted prefix (it grew)");
    }

    #[test]
    fn the_draw_walks_the_kept_tokens_in_order() {
        // Probabilities at temperature 1: ln of 0.5, 0.25, 0.125, 0.125 (tokens 2, 0, 1, 3).
        let row = [0.25f32.ln(), 0.125f32.ln(), 0.5f32.ln(), 0.125f32.ln()];
        let draw = |p: SampleParams| sample_row(&row, &p);
        assert_eq!(draw(params(1.0, 0, 1.0, 0.0, 0.0)).0, 2);
        assert_eq!(draw(params(1.0, 0, 1.0, 0.0, 0.6)).0, 0);
        // The 0.125 tie: token 1 before token 3.
        assert_eq!(draw(params(1.0, 0, 1.0, 0.0, 0.8)).0, 1);
        assert_eq!(draw(params(1.0, 0, 1.0, 0.0, 0.99)).0, 3);
        // top_k 2 keeps tokens 2 and 0 (0.75 of the mass): 0.6 of it falls on token 0.
        let (t, lp) = draw(params(1.0, 2, 1.0, 0.0, 0.7));
        assert_eq!(t, 0);
        assert!((lp - (1.0f32 / 3.0).ln()).abs() < 1e-6, "{lp}");
        // top_p 0.5 keeps token 2 alone; min_p 0.3 keeps tokens 2 and 0 (0.25 >= 0.15).
        assert_eq!(draw(params(1.0, 0, 0.5, 0.0, 0.99)), (2, 0.0));
        assert_eq!(draw(params(1.0, 0, 1.0, 0.3, 0.99)).0, 0);
        // Greedy: the argmax and its log-softmax.
        let (t, lp) = draw(params(0.0, 0, 1.0, 0.0, 0.5));
        assert_eq!(t, 2);
        assert!((lp - 0.5f32.ln()).abs() < 1e-6);
        // A temperature too small to divide by is greedy too: at 1e-45 every x / T overflowed and
        // the draw was NaN.
        for tiny in [1e-45f32, 1e-30, 1e-6] {
            assert_eq!(draw(params(tiny, 0, 1.0, 0.0, 0.5)), (t, lp), "temperature {tiny}");
        }
    }

    #[test]
    fn out_of_range_settings_name_the_field() {
        assert_eq!(params(-1.0, 0, 1.0, 0.0, 0.0).validate().unwrap_err().field, "temperature");
        assert_eq!(params(1.0, 0, 0.0, 0.0, 0.0).validate().unwrap_err().field, "top_p");
        assert_eq!(params(1.0, 0, 1.0, 2.0, 0.0).validate().unwrap_err().field, "min_p");
        let e = params(1.0, 0, 1.0, 0.0, 1.0).validate().unwrap_err();
        assert_eq!((e.field, e.to_string()), ("uniform", "uniform 1 is not in [0, 1)".to_string()));
    }
}

/// Final logit soft-capping, in place: `x = cap * tanh(x / cap)` (Gemma 2 caps its logits at 30
/// before they are sampled or read). x [rows, V] float; cap finite and above 0.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Softcap<'a> {
    /// Read and written.
    pub x: TensorRef<'a>,
    pub cap: f32,
}

impl Softcap<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("x", &self.x)])?;
        if !(self.cap.is_finite() && self.cap > 0.0) {
            return Err(format!("cap must be finite and above 0, is {}", self.cap));
        }
        Ok(())
    }
}
