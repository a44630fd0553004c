//! Attention-block ops: the projections, RoPE, and the key/value stream, written by `KvWrite` into a
//! paged cache and read either straight from the prompt's K/V (`Attention`, prefill) or through each
//! sequence's block table (`PagedAttention`, decode and chunked prefill).
//!
//! The paged KV cache of one layer is two tensors, K and V, each [num_blocks, kv_heads, block_size,
//! head_dim] (FlashInfer's "HND": within a block, each head's rows lie together, so attention, which
//! reads one K/V head at a time, reads whole runs of memory). A sequence owns a list of block ids (its
//! block table); its token at position p lives in block `table[p / block_size]`, slot
//! `p % block_size`: head g's row at `[table[p / block_size], g, p % block_size]`. Blocks may be shared between sequences with a
//! common prefix, since nothing but `KvWrite` writes the cache.

use super::{Check, CheckResult};
use crate::{HostSlice, TensorRef};

/// `out = x @ weight^T + bias`: the Q, K, V, output, MLP and unembedding projections.
/// out [T, N]; x [T, K] (float, same dtype as out); weight [N, K] in any dtype, quantized included (K
/// a whole number of blocks); bias [N] float, or `TensorRef::none()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Linear<'a> {
    pub out: TensorRef<'a>,
    pub x: TensorRef<'a>,
    pub weight: TensorRef<'a>,
    pub bias: TensorRef<'a>,
    /// With a quantized weight, a backend may quantize x per block of 32 to 8 bits and take integer
    /// dot products (llama.cpp's way): faster, within a bound the backend documents. Otherwise x
    /// stays as it is and the result is dequantize-then-multiply up to rounding.
    pub q8_activations: bool,
    /// `out += x @ weight^T + bias` instead: the product (with its bias) rounded to out's dtype, then
    /// added to what out holds and rounded again, exactly what `Linear` into a buffer and
    /// `AddRmsNorm`'s add compute. The residual stream's add, folded into the projection that feeds
    /// it (a decode step's output and down projections), so the stream is written once.
    pub accumulate: bool,
}

impl Linear<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("out", &self.out), ("x", &self.x)])?;
        c.present("weight", &self.weight)?;
        c.rank("x", &self.x, 2)?;
        c.rank("weight", &self.weight, 2)?;
        let (t, k) = (self.x.dims()[0], self.x.dims()[1]);
        let (n, wk) = (self.weight.dims()[0], self.weight.dims()[1]);
        if wk != k {
            return Err(format!("x has {k} features but weight [{n}, {wk}] expects {wk}"));
        }
        let group = self.weight.dtype.interleaved_rows();
        if n % group != 0 {
            return Err(format!("weight [{n}, {wk}] in {} needs a multiple of {group} rows", self.weight.dtype));
        }
        c.dims("out", &self.out, &[t, n])?;
        if let Some(b) = self.bias.opt() {
            c.float("bias", &b)?;
            c.dims("bias", &b, &[n])?;
        }
        Ok(())
    }
}

/// The attention's three projections of one x in one op: `q = x @ wq^T (+ bq)`, likewise k and v,
/// each as `Linear` computes it (weights in x's dtype, biases optional). For backends that fuse them
/// (the others decline it and the model runs three `Linear`s).
///
/// With a `norm` weight [H], x is the residual stream and the projections read its RMSNorm
/// instead: `rms_norm(x) * norm` (with `eps`), rounded to x's dtype as `RmsNorm` stores it, the
/// norm's sum of squares in whatever order the backend takes (within `RmsNorm`'s bound). A decode
/// step's layer then starts without a norm of its own.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct QkvLinear<'a> {
    pub q: TensorRef<'a>,
    pub k: TensorRef<'a>,
    pub v: TensorRef<'a>,
    pub x: TensorRef<'a>,
    pub wq: TensorRef<'a>,
    pub wk: TensorRef<'a>,
    pub wv: TensorRef<'a>,
    pub bq: TensorRef<'a>,
    pub bk: TensorRef<'a>,
    pub bv: TensorRef<'a>,
    /// The RMSNorm weight [H] applied to x first, or `TensorRef::none()`.
    pub norm: TensorRef<'a>,
    pub eps: f32,
}

impl<'a> QkvLinear<'a> {
    /// The three `Linear`s it fuses, reading `x` (the op's own x, or its norm where it has one).
    pub fn parts_reading(&self, x: TensorRef<'a>) -> [Linear<'a>; 3] {
        let lin = |out, weight, bias| Linear { out, x, weight, bias, q8_activations: false, accumulate: false };
        [lin(self.q, self.wq, self.bq), lin(self.k, self.wk, self.bk), lin(self.v, self.wv, self.bv)]
    }

    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        for ((name, weight), part) in [("q", "wq"), ("k", "wk"), ("v", "wv")].into_iter().zip(self.parts_reading(self.x)) {
            c.same_dtype(weight, &part.weight, "x", &self.x)?;
            part.validate(c).map_err(|e| format!("{name}: {e}"))?;
        }
        c.norm_weight(&self.norm, &self.x)
    }
}

/// The most dimension pairs `RopeScaling::Factors` holds a divisor for: head dims up to 256.
pub const MAX_ROPE_PAIRS: usize = 128;

/// How RoPE frequencies are stretched for contexts longer than the model was trained on. (Its
/// LongRoPE variant holds its divisors inline, as the plugin ABI lays the op out: no pointers.)
#[allow(clippy::large_enum_variant)]
#[repr(C, u32)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (linear interpolation).
    Linear { factor: f32 },
    /// Llama 3.1's scaling: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position: u32 },
    /// Each pair's frequency divided by a divisor of its own (`divisors[..pairs]`, one per pair of the
    /// head dim), and cos and sin multiplied by `attention_factor`: LongRoPE (Phi-3.5), with the
    /// model's short or long factors as the config picks them.
    Factors { attention_factor: f32, pairs: u32, divisors: [f32; MAX_ROPE_PAIRS] },
}

/// RoPE parameters, as a model's config gives them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub scaling: RopeScaling,
    /// Partial RoPE (Phi-4-mini, GPT-NeoX): only a head's first `rotary_dims` dims rotate, dim i
    /// paired with i + rotary_dims / 2; the rest pass through. 0: all of them.
    pub rotary_dims: u32,
}

impl RopeConfig {
    pub fn new(theta: f32) -> RopeConfig {
        RopeConfig { theta, scaling: RopeScaling::None, rotary_dims: 0 }
    }

    /// `self` with linear or other scaling.
    pub fn scaled(theta: f32, scaling: RopeScaling) -> RopeConfig {
        RopeConfig { theta, scaling, rotary_dims: 0 }
    }

    /// The dims of a head of `head_dim` that rotate.
    pub fn rotary(&self, head_dim: usize) -> usize {
        match self.rotary_dims {
            0 => head_dim,
            r => (r as usize).min(head_dim),
        }
    }

    /// The rotation frequency of each of the `rotary(head_dim) / 2` dimension pairs, scaling
    /// applied. Every backend takes its angles from here, so they agree on the formula.
    ///
    /// Kept per thread for the last (config, head dim) asked: every layer of every step asks again,
    /// and each answer is `head_dim / 2` powers (a tenth of the CUDA backend's host time a decode
    /// step at batch 1).
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f64> {
        thread_local! {
            static LAST: std::cell::RefCell<Option<(RopeConfig, usize, Vec<f64>)>> = const { std::cell::RefCell::new(None) };
        }
        LAST.with_borrow_mut(|last| match last {
            Some((config, d, freqs)) if config == self && *d == head_dim => freqs.clone(),
            _ => {
                let freqs = self.compute_inv_freq(head_dim);
                *last = Some((*self, head_dim, freqs.clone()));
                freqs
            }
        })
    }

    fn compute_inv_freq(&self, head_dim: usize) -> Vec<f64> {
        let theta = self.theta as f64;
        let rot = self.rotary(head_dim);
        (0..rot / 2)
            .map(|i| {
                let f = 1.0 / theta.powf((2 * i) as f64 / rot as f64);
                match self.scaling {
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor as f64,
                    RopeScaling::Factors { divisors, .. } => f / divisors[i.min(MAX_ROPE_PAIRS - 1)] as f64,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position,
                    } => {
                        let (factor, lo, hi) =
                            (factor as f64, low_freq_factor as f64, high_freq_factor as f64);
                        let old = original_max_position as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < old / hi {
                            f
                        } else if wavelen > old / lo {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - lo) / (hi - lo);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                }
            })
            .collect()
    }

    /// What cos and sin are multiplied by (1 but for LongRoPE's attention factor).
    pub fn attention_factor(&self) -> f32 {
        match self.scaling {
            RopeScaling::Factors { attention_factor, .. } => attention_factor,
            _ => 1.0,
        }
    }

    /// Checks the parameters against a head dim of `d`.
    fn validate(&self, d: usize) -> CheckResult {
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(format!("rope theta must be finite and above 1, is {}", self.theta));
        }
        let rot = self.rotary(d);
        if rot % 2 != 0 || (self.rotary_dims as usize) > d {
            return Err(format!("{} rotary dims in a head dim of {d}: an even number up to it", self.rotary_dims));
        }
        if let RopeScaling::Factors { attention_factor, pairs, divisors } = self.scaling {
            if pairs as usize != rot / 2 {
                return Err(format!("{pairs} rope factors for {rot} rotary dims ({} pairs)", rot / 2));
            }
            if let Some(f) = divisors[..(pairs as usize).min(MAX_ROPE_PAIRS)].iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                return Err(format!("rope factor {f} must be finite and above 0"));
            }
            if !(attention_factor.is_finite() && attention_factor > 0.0) {
                return Err(format!("rope attention factor {attention_factor} must be finite and above 0"));
            }
        }
        Ok(())
    }
}

/// Rotary position embedding, in place, in the rotate_half convention: dimension i is paired with
/// i + R/2 (R the config's `rotary(D)`: D, or partial RoPE's first R dims, the rest untouched), and
/// the pair is rotated by `positions[t] * inv_freq[i]`, cos and sin times the config's
/// `attention_factor()`.
/// x [T, heads, D] (D even), positions [T].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Rope<'a> {
    /// Read and written.
    pub x: TensorRef<'a>,
    pub positions: HostSlice<'a, u32>,
    pub config: RopeConfig,
}

impl Rope<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("x", &self.x)])?;
        c.rank("x", &self.x, 3)?;
        let d = self.x.dims();
        if d[2] % 2 != 0 {
            return Err(format!("head dim {} must be even", d[2]));
        }
        if self.positions.len() != d[0] {
            return Err(format!("{} positions for {} tokens", self.positions.len(), d[0]));
        }
        self.config.validate(d[2])
    }
}

/// How attention turns a query-key dot product into a score, and which keys a query sees besides
/// the causal mask: `score = scale * q.k`, then, with `softcap` > 0, `softcap * tanh(score /
/// softcap)` (Gemma 2's attention logit soft-capping); with `window` > 0, a query at position p sees
/// only keys at positions above p - window (Mistral's and Gemma 2's sliding window: itself and the
/// window - 1 before it); with `alibi` > 0, ALiBi's linear position bias added after both: `slope_h
/// * (key - last)` for query head h, `last` the last key position the row sees (the query's own
/// where causal), `slope_h` from `alibi` as the largest bias (`Scores::alibi_slope`): Bloom's,
/// MPT's, Falcon-RW's. The bias differs from theirs (`slope_h * key`) by a constant per row, which
/// the softmax takes away; relative to the row's last key it stays small however long the
/// context (at 32k positions the absolute one is rounded to 1/500 in f32).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    /// Usually 1/sqrt(D).
    pub scale: f32,
    /// 0: none.
    pub softcap: f32,
    /// 0: no window.
    pub window: u32,
    /// ALiBi's largest bias (8 in Bloom and MPT); 0: no ALiBi.
    pub alibi: f32,
}

impl Scores {
    /// Plain scaled dot products: no soft-capping, no window.
    pub fn scaled(scale: f32) -> Scores {
        Scores { scale, softcap: 0.0, window: 0, alibi: 0.0 }
    }

    /// ALiBi's slope for query head `head` of `heads` (0 without ALiBi): with n the largest power of
    /// two at most `heads`, `2^(-alibi (h + 1) / n)` for the first n heads, and the odd steps
    /// between them, `2^(-alibi (2 (h - n) + 1) / 2n)`, for the rest (Press et al.'s geometric
    /// sequence, as Bloom, MPT and llama.cpp compute it).
    pub fn alibi_slope(&self, head: usize, heads: usize) -> f32 {
        if self.alibi == 0.0 || heads == 0 {
            return 0.0;
        }
        let n = 1usize << heads.ilog2();
        let step = self.alibi as f64 / n as f64;
        let power = if head < n { step * (head + 1) as f64 } else { step / 2.0 * (2 * (head - n) + 1) as f64 };
        (-power).exp2() as f32
    }

    /// The first key position a query at `pos` sees.
    pub fn first_key(&self, pos: usize) -> usize {
        match self.window {
            0 => 0,
            w => (pos + 1).saturating_sub(w as usize),
        }
    }

    /// `score` soft-capped, if asked.
    #[inline(always)]
    pub fn cap(&self, score: f32) -> f32 {
        if self.softcap > 0.0 {
            self.softcap * (score / self.softcap).tanh()
        } else {
            score
        }
    }

    fn validate(&self) -> CheckResult {
        if !self.scale.is_finite() {
            return Err(format!("scale must be finite, is {}", self.scale));
        }
        if !(self.softcap.is_finite() && self.softcap >= 0.0) {
            return Err(format!("softcap must be finite and non-negative (0: none), is {}", self.softcap));
        }
        if !(self.alibi.is_finite() && self.alibi >= 0.0) {
            return Err(format!("alibi must be finite and non-negative (0: none), is {}", self.alibi));
        }
        Ok(())
    }
}

/// Self-attention over a batch of whole prompts laid end to end (prefill), with grouped-query
/// heads: query head h reads K/V head `h / (q_heads / kv_heads)`, without copying K/V per head.
/// Causal (a decoder's prompt: token i sees tokens 0..=i of its prompt) or not (each token sees its
/// whole prompt, as in an encoder).
/// out, q [T, q_heads, D]; k, v [T, kv_heads, D]; seq_lens: the prompts' lengths, summing to T.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Attention<'a> {
    pub out: TensorRef<'a>,
    pub q: TensorRef<'a>,
    pub k: TensorRef<'a>,
    pub v: TensorRef<'a>,
    pub seq_lens: HostSlice<'a, u32>,
    pub scores: Scores,
    pub causal: bool,
}

impl Attention<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("out", &self.out), ("q", &self.q), ("k", &self.k), ("v", &self.v)])?;
        c.rank("q", &self.q, 3)?;
        c.rank("k", &self.k, 3)?;
        let [t, hq, d] = [self.q.dims()[0], self.q.dims()[1], self.q.dims()[2]];
        let hkv = self.k.dims()[1];
        c.dims("k", &self.k, &[t, hkv, d])?;
        c.dims("v", &self.v, &[t, hkv, d])?;
        c.dims("out", &self.out, &[t, hq, d])?;
        group_heads(hq, hkv)?;
        let total: u64 = self.seq_lens.as_slice().iter().map(|&l| l as u64).sum();
        if total != t as u64 {
            return Err(format!("seq_lens sum to {total}, but there are {t} tokens"));
        }
        if self.scores.window > 0 && !self.causal {
            return Err("a sliding window needs causal attention".into());
        }
        self.scores.validate()
    }
}

/// Writes new tokens' keys and values into the paged cache: token t goes to slot `slots[t]`, which is
/// `block * block_size + offset`.
/// k_cache, v_cache [num_blocks, kv_heads, block_size, D]; k, v [T, kv_heads, D]; slots [T]. The
/// cache may keep another float dtype than the activations (an f16 cache beside f32 activations:
/// half the bytes to keep and to read back); the values are rounded to it as they are written.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KvWrite<'a> {
    pub k_cache: TensorRef<'a>,
    pub v_cache: TensorRef<'a>,
    pub k: TensorRef<'a>,
    pub v: TensorRef<'a>,
    pub slots: HostSlice<'a, u32>,
}

impl KvWrite<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("k", &self.k), ("v", &self.v)])?;
        c.activations(&[("k_cache", &self.k_cache), ("v_cache", &self.v_cache)])?;
        c.rank("k_cache", &self.k_cache, 4)?;
        c.dims("v_cache", &self.v_cache, self.k_cache.dims())?;
        let [blocks, block_size, hkv, d] = cache_dims(&self.k_cache);
        c.dims("k", &self.k, &[self.slots.len(), hkv, d])?;
        c.dims("v", &self.v, &[self.slots.len(), hkv, d])?;
        let capacity = blocks * block_size;
        if let Some((t, s)) = self.slots.as_slice().iter().enumerate().find(|(_, &s)| s as usize >= capacity) {
            return Err(format!("slot {s} of token {t} is outside the cache's {capacity} slots"));
        }
        Ok(())
    }
}

/// RoPE on `q` [T, Hq, D] and `k` [T, Hkv, D] in place, then `k` (rotated) and `v` [T, Hkv, D]
/// written into the paged cache at `slots`: `Rope` twice and `KvWrite` in one op, with their numbers,
/// for backends that fuse them (the others decline it and the model runs the three).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RopeKvWrite<'a> {
    /// Read and written.
    pub q: TensorRef<'a>,
    /// Read and written.
    pub k: TensorRef<'a>,
    pub k_cache: TensorRef<'a>,
    pub v_cache: TensorRef<'a>,
    pub v: TensorRef<'a>,
    pub positions: HostSlice<'a, u32>,
    pub slots: HostSlice<'a, u32>,
    pub config: RopeConfig,
}

impl RopeKvWrite<'_> {
    /// The ops it fuses, as they would be called.
    pub fn parts(&self) -> (Rope<'_>, Rope<'_>, KvWrite<'_>) {
        let rope = |x| Rope { x, positions: self.positions, config: self.config };
        let write = KvWrite { k_cache: self.k_cache, v_cache: self.v_cache, k: self.k, v: self.v, slots: self.slots };
        (rope(self.q), rope(self.k), write)
    }

    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        let (q, k, write) = self.parts();
        q.validate(c).map_err(|e| format!("q: {e}"))?;
        k.validate(c).map_err(|e| format!("k: {e}"))?;
        c.same_dtype("k", &self.k, "q", &self.q)?;
        if self.q.dims()[2] != self.k.dims()[2] {
            return Err(format!("q's head dim {} differs from k's {}", self.q.dims()[2], self.k.dims()[2]));
        }
        write.validate(c)
    }
}

/// One sequence of a `PagedAttention` batch. Its `q_len` query tokens are the last ones of its
/// `context_len` tokens (already written to the cache): query j sits at position
/// `context_len - q_len + j` and attends to positions 0..=that. Decode has `q_len` 1; a prefill chunk
/// after a cached prefix has more. Its block ids are `block_table[blocks_start..]`, one per
/// `block_size` tokens of context.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedSeq {
    pub q_len: u32,
    pub context_len: u32,
    pub blocks_start: u32,
}

/// Attention for a batch of sequences, each reading its own keys and values from the paged cache
/// through its block table. The sequences' queries are laid end to end in `q`.
/// out, q [T, q_heads, D] with T the sum of q_len; caches as in `KvWrite` (their dtype may differ
/// from out's and q's).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PagedAttention<'a> {
    pub out: TensorRef<'a>,
    pub q: TensorRef<'a>,
    pub k_cache: TensorRef<'a>,
    pub v_cache: TensorRef<'a>,
    pub seqs: HostSlice<'a, PagedSeq>,
    pub block_table: HostSlice<'a, u32>,
    pub scores: Scores,
}

impl PagedAttention<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("out", &self.out), ("q", &self.q)])?;
        c.activations(&[("k_cache", &self.k_cache), ("v_cache", &self.v_cache)])?;
        c.rank("q", &self.q, 3)?;
        c.rank("k_cache", &self.k_cache, 4)?;
        c.dims("v_cache", &self.v_cache, self.k_cache.dims())?;
        let [blocks, block_size, hkv, d] = cache_dims(&self.k_cache);
        let [t, hq] = [self.q.dims()[0], self.q.dims()[1]];
        c.dims("q", &self.q, &[t, hq, d])?;
        c.dims("out", &self.out, &[t, hq, d])?;
        group_heads(hq, hkv)?;
        if block_size == 0 {
            return Err("block_size is 0".into());
        }
        let table = self.block_table.as_slice();
        let mut total = 0u64;
        for (i, s) in self.seqs.as_slice().iter().enumerate() {
            if s.q_len > s.context_len {
                return Err(format!(
                    "sequence {i} has {} queries but a context of only {}",
                    s.q_len, s.context_len
                ));
            }
            let need = (s.context_len as usize).div_ceil(block_size);
            let start = s.blocks_start as usize;
            let Some(ids) = table.get(start..start + need) else {
                return Err(format!(
                    "sequence {i} needs blocks {start}..{} of a block table of {}",
                    start + need,
                    table.len()
                ));
            };
            // The largest id first (a vectorized pass: every layer checks the whole table again),
            // then which one is out of range.
            if ids.iter().copied().max().is_some_and(|b| b as usize >= blocks) {
                let b = ids.iter().find(|&&b| b as usize >= blocks).copied().unwrap_or_default();
                return Err(format!("sequence {i} names block {b}, but the cache has {blocks}"));
            }
            total += s.q_len as u64;
        }
        if total != t as u64 {
            return Err(format!("the sequences have {total} queries, but q has {t} tokens"));
        }
        self.scores.validate()
    }
}

/// A cache's [num_blocks, block_size, kv_heads, D] (its dims are [num_blocks, kv_heads, block_size, D]).
pub fn cache_dims(cache: &TensorRef) -> [usize; 4] {
    let d = cache.dims();
    [d[0], d[2], d[1], d[3]]
}

fn group_heads(hq: usize, hkv: usize) -> CheckResult {
    if hkv == 0 || hq % hkv != 0 {
        return Err(format!("{hq} query heads cannot share {hkv} key/value heads evenly"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kept frequencies are the asked config's and head dim's, whichever was asked before.
    #[test]
    fn inv_freq_answers_each_config_and_head_dim_its_own() {
        let linear = RopeConfig::scaled(10_000.0, RopeScaling::Linear { factor: 4.0 });
        let asks = [(RopeConfig::new(10_000.0), 64), (RopeConfig::new(10_000.0), 128), (RopeConfig::new(500_000.0), 128), (linear, 128)];
        for round in 0..2 {
            for &(config, d) in asks.iter().chain(asks.iter().rev()) {
                let freqs = config.inv_freq(d);
                assert_eq!(freqs, config.compute_inv_freq(d), "round {round}: {config:?} at {d}");
                assert_eq!(freqs.len(), d / 2);
            }
        }
        assert_ne!(RopeConfig::new(10_000.0).inv_freq(128), linear.inv_freq(128));
    }

    /// ALiBi's slopes as the paper lists them: 8 heads 1/2 .. 1/256; 16 heads 1/sqrt(2) .. 1/256;
    /// Bloom 560M's 16 and a non-power-of-two 12 (8 on the power's sequence, then 4 between them:
    /// 2^-0.5, 2^-1.5, ...); none without ALiBi.
    #[test]
    fn alibi_slopes_follow_the_papers_sequence() {
        let s = Scores { alibi: 8.0, ..Scores::scaled(1.0) };
        let got = |n: usize| (0..n).map(|h| s.alibi_slope(h, n)).collect::<Vec<_>>();
        assert_eq!(got(8), (1..=8).map(|i| 0.5f32.powi(i)).collect::<Vec<_>>());
        for (h, v) in got(16).into_iter().enumerate() {
            assert!((v as f64 - (-(h as f64 + 1.0) / 2.0).exp2()).abs() < 1e-7, "16 heads: {h}");
        }
        let twelve = got(12);
        assert_eq!(twelve[..8], got(8)[..]);
        for (i, v) in twelve[8..].iter().enumerate() {
            assert!((*v as f64 - (-(0.5 + i as f64)).exp2()).abs() < 1e-7, "12 heads: {}", 8 + i);
        }
        assert_eq!(Scores::scaled(1.0).alibi_slope(3, 8), 0.0);
    }
}
