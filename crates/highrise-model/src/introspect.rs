//! Seeing both highways at engine speed: captures of the residual stream and of Q/K/V per layer,
//! attention patterns recomputed from the captured Q and K (the attention kernels never write them),
//! the logit lens, and interventions (steering, activation patching) on the stream entering a layer.
//! Captures are copies taken as the forward pass reaches them, so no later in-place kernel can change
//! them; with no hooks the forward pass does nothing extra.

use std::collections::{BTreeMap, BTreeSet};

use highrise_core::ops::sampling::top_log_softmax;
use highrise_core::ops::Scores;
use highrise_core::Tensor;

use crate::{Error, Llama, Result};

/// Where a capture is taken (TransformerLens's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    /// The stream entering a layer [T, H].
    ResidPre,
    /// Q after RoPE [T, Hq * D].
    Q,
    /// K after RoPE [T, Hkv * D].
    K,
    /// V [T, Hkv * D].
    V,
    /// Attention's output per head, before o_proj mixes the heads [T, Hq * D] (TransformerLens's
    /// `attn.hook_z`: head h's contribution to the stream is its slice times o_proj's columns).
    Z,
    /// The attention block's output after o_proj [T, H].
    AttnOut,
    /// The stream between attention and the MLP [T, H]: what entered the layer plus attention's
    /// output (none where the two run side by side: GPT-NeoX, Phi).
    ResidMid,
    /// The MLP's activations, what its down projection reads [T, I] (the neurons: act(gate) * up,
    /// or act(up) without a gate; TransformerLens's `mlp.hook_post`; none at a mixture's layers).
    MlpPost,
    /// The MLP block's output after down_proj [T, H].
    MlpOut,
    /// The stream leaving a layer [T, H].
    ResidPost,
    /// The final norm of the last layer's stream [T, H] (filed under layer = number of layers).
    FinalNorm,
    /// A mixture of experts' router scores [T, E], before the softmax that picks each token's
    /// experts (only at a mixture's layers: a dense layer has no router).
    Router,
}

impl Site {
    pub const STREAM: [Site; 4] = [Site::ResidPre, Site::AttnOut, Site::MlpOut, Site::ResidPost];
    pub const ALL: [Site; 12] = [
        Site::ResidPre,
        Site::Q,
        Site::K,
        Site::V,
        Site::Z,
        Site::AttnOut,
        Site::ResidMid,
        Site::MlpPost,
        Site::MlpOut,
        Site::ResidPost,
        Site::FinalNorm,
        Site::Router,
    ];

    /// Every site's name, "resid_pre, q, ...": for the errors that list them.
    pub fn names() -> String {
        Site::ALL.map(Site::name).join(", ")
    }

    /// The site named `name` (as `name` writes it).
    pub fn parse(name: &str) -> Option<Site> {
        Site::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Site::ResidPre => "resid_pre",
            Site::Q => "q",
            Site::K => "k",
            Site::V => "v",
            Site::Z => "z",
            Site::AttnOut => "attn_out",
            Site::ResidMid => "resid_mid",
            Site::MlpPost => "mlp_post",
            Site::MlpOut => "mlp_out",
            Site::ResidPost => "resid_post",
            Site::FinalNorm => "final_norm",
            Site::Router => "router",
        }
    }

    /// The values per token this site holds at `layer` of a model of config `c` (0: none there, a
    /// router at a dense layer, the MLP's activations at a mixture's).
    pub fn width(self, c: &crate::ModelConfig, layer: usize) -> usize {
        match self {
            Site::Q | Site::Z => c.num_attention_heads * c.head_dim(),
            Site::K | Site::V => c.kv_heads() * c.head_dim(),
            Site::Router if c.moe_layer(layer) => c.experts(),
            Site::Router => 0,
            Site::ResidMid if c.parallel_residual() => 0,
            Site::MlpPost if c.moe_layer(layer) => 0,
            Site::MlpPost => c.intermediate_size,
            _ => c.hidden_size,
        }
    }
}

/// Adds `scale * vector` to the stream entering `layer`, at `positions` (all when `None`).
#[derive(Clone, Debug)]
pub struct Steer {
    pub layer: usize,
    pub vector: Vec<f32>,
    pub scale: f32,
    pub positions: Option<Vec<usize>>,
}

/// Replaces `site` of `layer` at `position` (a row of the batch) with `values`, before anything
/// reads it: the stream entering the layer (`ResidPre`), attention's output per head (`Z`: a head
/// zeroed or taken from another run), the attention block's output (`AttnOut`), the MLP's
/// activations (`MlpPost`) or output (`MlpOut`). Captures at that site see the patched values.
#[derive(Clone, Debug)]
pub struct Patch {
    pub layer: usize,
    pub position: usize,
    pub values: Vec<f32>,
    pub site: Site,
}

impl Site {
    /// The sites a `Patch` may replace.
    pub const PATCHABLE: [Site; 5] = [Site::ResidPre, Site::Z, Site::AttnOut, Site::MlpPost, Site::MlpOut];
}

impl Steer {
    /// Refused, naming what is wrong, where this vector cannot steer a model of config `c`: a layer
    /// it lacks, a vector of another width than the stream's.
    pub fn check(&self, c: &crate::ModelConfig) -> Result<()> {
        if self.layer >= c.num_hidden_layers {
            return Err(Error::Input(format!("steer: layer {} but the model has {} layers", self.layer, c.num_hidden_layers)));
        }
        if self.vector.len() != c.hidden_size {
            return Err(Error::Input(format!("steer: {} values, the residual stream has {}", self.vector.len(), c.hidden_size)));
        }
        Ok(())
    }
}

impl Patch {
    /// Refused, naming what is wrong, where this patch cannot apply to a model of config `c`: a
    /// site `Patch` cannot replace, a layer past the last or without the site (a mixture's layer
    /// has no `mlp_post`), values of another width than the site's.
    pub fn check(&self, c: &crate::ModelConfig) -> Result<()> {
        if !Site::PATCHABLE.contains(&self.site) {
            let can = Site::PATCHABLE.map(Site::name).join(", ");
            return Err(Error::Input(format!("patching {} is not supported (these are: {can})", self.site.name())));
        }
        let width = if self.layer < c.num_hidden_layers { self.site.width(c, self.layer) } else { 0 };
        if width == 0 {
            return Err(Error::Input(format!("patch: layer {} of this model has no {}", self.layer, self.site.name())));
        }
        if self.values.len() != width {
            return Err(Error::Input(format!("patch of {} at layer {}: {} values, the site has {width}", self.site.name(), self.layer, self.values.len())));
        }
        Ok(())
    }
}

/// What one forward pass should capture and change, and what it captured.
#[derive(Clone, Debug, Default)]
pub struct Hooks {
    pub sites: BTreeSet<Site>,
    /// Layers to capture at (all when `None`).
    pub layers: Option<BTreeSet<usize>>,
    pub steer: Vec<Steer>,
    pub patch: Vec<Patch>,
    /// (site, layer) -> values [T, width], f32.
    pub captured: BTreeMap<(Site, usize), Vec<f32>>,
    /// Take captures on the device, into one buffer read by `collect` (the caller's, after the
    /// pass: after a graph step has ended, say), instead of reading each as the pass reaches it:
    /// the host never waits for the device in the middle of a pass. Off: each capture is read at
    /// once (no extra copy on a backend whose memory is the host's).
    pub defer: bool,
    /// The deferred captures of the pass in flight (public so that `Hooks { .., ..Default::default() }`
    /// can be written; nothing in it is).
    pub pending: Pending,
}

/// The pass in flight: its deferred captures (see `Hooks::defer`), their buffer and (site, layer,
/// first element, elements) of each in it; and, for a family whose q and k rows the loader changed,
/// the head dim, `source::half_pair_rows` where it rotates adjacent pairs (GPT-J, Cohere; else
/// none) and whether it negated each head's second half (nanochat's RoPE turning the other way),
/// to give captured q and k back as the checkpoint's model computes them. A clone of the hooks
/// starts without them.
#[derive(Default)]
pub struct Pending(Option<(Tensor, Vec<Taken>)>, Option<(usize, Vec<usize>, bool)>);

/// A deferred capture: its site, layer, first element in the pass's buffer, and elements.
type Taken = (Site, usize, usize, usize);

impl Clone for Pending {
    fn clone(&self) -> Self {
        Pending(None, None)
    }
}

impl Pending {
    /// `v` [T, heads x D] of `site`, each head's rotating dims back in the checkpoint's order where
    /// the pass moved them (q and k of GPT-J and Cohere), its second half negated back where the
    /// loader negated it (nanochat's).
    fn checkpoint_order(&self, site: Site, mut v: Vec<f32>) -> Vec<f32> {
        let Some((d, order, negated)) = self.1.as_ref().filter(|_| matches!(site, Site::Q | Site::K)) else { return v };
        for head in v.chunks_exact_mut(*d) {
            let moved: Vec<f32> = head[..order.len()].to_vec();
            for (k, &dim) in order.iter().enumerate() {
                head[dim] = moved[k];
            }
            if *negated {
                head[d / 2..].iter_mut().for_each(|x| *x = -*x);
            }
        }
        v
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} deferred captures", self.0.as_ref().map_or(0, |p| p.1.len()))
    }
}

impl Hooks {
    /// Captures `sites` at every layer.
    pub fn capture_all(sites: &[Site]) -> Hooks {
        Hooks { sites: sites.iter().copied().collect(), ..Default::default() }
    }

    pub fn get(&self, site: Site, layer: usize) -> Option<&[f32]> {
        self.captured.get(&(site, layer)).map(|v| &v[..])
    }

    /// Whether the pass captures `site` at `layer`.
    pub(crate) fn wants(&self, site: Site, layer: usize) -> bool {
        self.sites.contains(&site) && (site == Site::FinalNorm || self.layers.as_ref().is_none_or(|ls| ls.contains(&layer)))
    }

    /// Starts a pass whose deferred captures need `elements` in all (of the activations' dtype,
    /// like `like`): their buffer. Where `c`'s loader moved q's and k's rows
    /// (`ModelConfig::adjacent_rope_pairs`) or negated half of them (`rope_turns_back`), captures
    /// of q and k undo it.
    pub(crate) fn begin(&mut self, like: &Tensor, elements: usize, c: &crate::ModelConfig) -> Result<()> {
        let d = c.head_dim();
        let order = if c.adjacent_rope_pairs() { crate::source::half_pair_rows(d, c.rotary_dim().unwrap_or(d)) } else { Vec::new() };
        let qk = (c.adjacent_rope_pairs() || c.rope_turns_back()).then(|| (d, order, c.rope_turns_back()));
        self.pending = Pending(None, qk);
        if self.defer && elements > 0 {
            self.pending.0 = Some((Tensor::empty(like.backend(), like.dtype(), &[elements])?, Vec::new()));
        }
        Ok(())
    }

    /// Whether a patch replaces `site` of `layer`.
    pub(crate) fn patches(&self, site: Site, layer: usize) -> bool {
        self.patch.iter().any(|p| p.site == site && p.layer == layer)
    }

    /// Refuses patches of a site `Patch` cannot replace, or where the model has none (a mixture's
    /// layer has no `mlp_post`), or past the last layer, before the pass starts.
    pub(crate) fn check_patches(&self, c: &crate::ModelConfig) -> Result<()> {
        self.patch.iter().try_for_each(|p| p.check(c))
    }

    /// Applies the patches of `site` at `layer` to `t` [T, width]; true if there were any.
    pub(crate) fn patch_site(&self, site: Site, layer: usize, t: &mut Tensor) -> Result<bool> {
        let patch: Vec<&Patch> = self.patch.iter().filter(|p| p.site == site && p.layer == layer).collect();
        if patch.is_empty() {
            return Ok(false);
        }
        let width = t.numel() / t.dims()[0].max(1);
        let mut v = t.to_f32()?;
        write_patches(&patch, &mut v, width, layer)?;
        t.write_f32(&v)?;
        Ok(true)
    }

    pub(crate) fn capture(&mut self, site: Site, layer: usize, t: &Tensor) -> Result<()> {
        if !self.wants(site, layer) {
            return Ok(());
        }
        let Some((buffer, taken)) = self.pending.0.as_mut() else {
            let v = self.pending.checkpoint_order(site, t.to_f32()?);
            self.captured.insert((site, layer), v);
            return Ok(());
        };
        let at = taken.last().map_or(0, |&(_, _, at, n)| at + n);
        buffer.copy_from_at(at, t)?;
        taken.push((site, layer, at, t.numel()));
        Ok(())
    }

    /// Reads the deferred captures of the last pass into `captured` (one read of their buffer).
    pub fn collect(&mut self) -> Result<()> {
        let Some((buffer, taken)) = self.pending.0.take() else { return Ok(()) };
        let mut all = buffer.to_f32()?;
        // From the end, so that each split moves only its own values.
        for (site, layer, at, _) in taken.into_iter().rev() {
            let v = self.pending.checkpoint_order(site, all.split_off(at));
            self.captured.insert((site, layer), v);
        }
        Ok(())
    }

    /// Applies the steering and patching aimed at `layer` to the stream `x` [T, H]. Returns whether
    /// anything changed.
    pub(crate) fn intervene(&self, layer: usize, x: &mut Tensor, hidden: usize) -> Result<bool> {
        let steer: Vec<&Steer> = self.steer.iter().filter(|s| s.layer == layer).collect();
        let patch: Vec<&Patch> = self.patch.iter().filter(|p| p.layer == layer && p.site == Site::ResidPre).collect();
        if steer.is_empty() && patch.is_empty() {
            return Ok(false);
        }
        let mut v = x.to_f32()?;
        let rows = v.len() / hidden;
        for s in steer {
            if s.vector.len() != hidden {
                return Err(Error::Input(format!("steering vector has {} values, the stream {hidden}", s.vector.len())));
            }
            let positions: Vec<usize> = s.positions.clone().unwrap_or_else(|| (0..rows).collect());
            for p in positions.into_iter().filter(|&p| p < rows) {
                v[p * hidden..(p + 1) * hidden].iter_mut().zip(&s.vector).for_each(|(x, d)| *x += s.scale * d);
            }
        }
        write_patches(&patch, &mut v, hidden, layer)?;
        x.write_f32(&v)?;
        Ok(true)
    }
}

/// Each patch's values in place of its position's row of `v` (rows of `width`), all of one site at
/// `layer`; a row of another width or a position past the rows is an error naming them.
fn write_patches(patch: &[&Patch], v: &mut [f32], width: usize, layer: usize) -> Result<()> {
    let rows = v.len() / width.max(1);
    for p in patch {
        if p.values.len() != width || p.position >= rows {
            return Err(Error::Input(format!(
                "patch of {} at layer {layer}, position {}: {} values for {rows} x {width}",
                p.site.name(),
                p.position,
                p.values.len()
            )));
        }
        v[p.position * width..(p.position + 1) * width].copy_from_slice(&p.values);
    }
    Ok(())
}

/// Causal attention probabilities [Hq, T, T] of one sequence, recomputed from its captured Q
/// [T, Hq * D] and K [T, Hkv * D] (after RoPE), grouped-query heads mapped as the kernels map them,
/// scored as the layer scores (`ModelConfig::scores`: its scale, soft-cap, sliding window and ALiBi;
/// keys outside the window have probability 0).
pub fn attention_probs(q: &[f32], k: &[f32], [hq, hkv, d]: [usize; 3], scores: Scores) -> Vec<f32> {
    let t = q.len() / (hq * d);
    let (scale, cap) = (scores.scale as f64, scores.softcap as f64);
    let mut out = vec![0f32; hq * t * t];
    for h in 0..hq {
        let g = h / (hq / hkv);
        let slope = scores.alibi_slope(h, hq) as f64;
        for i in 0..t {
            let qi = &q[(i * hq + h) * d..][..d];
            let first = scores.first_key(i);
            let s: Vec<f64> = (first..=i)
                .map(|j| qi.iter().zip(&k[(j * hkv + g) * d..][..d]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale)
                .map(|s| if cap > 0.0 { cap * (s / cap).tanh() } else { s })
                .zip(first..=i)
                .map(|(s, j)| s + slope * (j as f64 - i as f64))
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s.iter().map(|s| (s - max).exp()).sum();
            for (j, s) in s.iter().enumerate() {
                out[(h * t + i) * t + first + j] = ((s - max).exp() / sum) as f32;
            }
        }
    }
    out
}

/// One layer's logit lens at one position: the most likely tokens and their probabilities.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LensTop {
    pub tokens: Vec<u32>,
    pub probs: Vec<f32>,
}

impl LensTop {
    /// `{"ids", "tokens", "probs"}`, as `inspect`'s logit_lens.json and the server write it.
    pub fn json(&self, tokenizer: &crate::Tokenizer) -> serde_json::Value {
        serde_json::json!({"ids": self.tokens, "tokens": tokenizer.pieces(&self.tokens), "probs": self.probs})
    }
}

/// The logit lens: the model's final norm and unembedding applied to a stream [T, H] (a layer's
/// resid_post); the `top_k` tokens per position, with probabilities.
pub fn logit_lens(model: &Llama, stream: &[f32], top_k: usize) -> Result<Vec<LensTop>> {
    let h = model.config.hidden_size;
    let t = stream.len() / h;
    let b = &model.backend;
    let x = Tensor::from_f32(b, model.dtype, &[t, h], stream)?;
    let mut normed = Tensor::empty(b, model.dtype, &[t, h])?;
    model.final_norm(&mut normed, &x)?;
    let logits = model.unembed(&normed)?.to_f32()?;
    Ok(logits
        .chunks(model.config.vocab_size)
        .map(|row| {
            let (tokens, probs) = top_log_softmax(row, top_k.max(1)).into_iter().map(|(t, lp)| (t, lp.exp())).unzip();
            LensTop { tokens, probs }
        })
        .collect())
}

/// What one capture pass over a sequence holds: the sites asked at the layers asked, and, where
/// asked, each layer's attention patterns and logit lens.
pub struct Inspection {
    pub hooks: Hooks,
    /// The layers captured, in the order asked.
    pub layers: Vec<usize>,
    /// Per layer of `layers`: attention probabilities [Hq, T, T] (empty unless asked).
    pub attn_probs: Vec<Vec<f32>>,
    /// Per layer of `layers`: the logit lens at every position (empty unless asked).
    pub lens: Vec<Vec<LensTop>>,
}

/// One prefill of `ids` capturing `sites` at `layers` (Q and K too for attention patterns,
/// resid_post for the lens), then attention patterns with `attn` and the top `lens_k` tokens of the
/// logit lens with `lens_k`: the pipeline behind `highrise inspect` and the server's captures.
pub fn inspect(model: &Llama, ids: &[u32], sites: &[Site], layers: &[usize], attn: bool, lens_k: Option<usize>, steer: Vec<Steer>, patch: Vec<Patch>) -> Result<Inspection> {
    let mut all: Vec<Site> = sites.to_vec();
    if attn {
        all.extend([Site::Q, Site::K]);
    }
    if lens_k.is_some() {
        all.push(Site::ResidPost);
    }
    let mut hooks = Hooks { steer, patch, ..Hooks::capture_all(&all) };
    hooks.layers = Some(layers.iter().copied().collect());
    model.prefill_hooked(ids, crate::Logits::Last, Some(&mut hooks))?;
    let lens = match lens_k {
        Some(k) => layers.iter().map(|&l| logit_lens(model, hooks.get(Site::ResidPost, l).unwrap_or_default(), k)).collect::<Result<_>>()?,
        None => Vec::new(),
    };
    let mut pass = Inspection { hooks, layers: layers.to_vec(), attn_probs: Vec::new(), lens };
    if attn {
        pass.attn_probs = layers.iter().map(|&l| pass.attention_probs(&model.config, l)).collect();
    }
    Ok(pass)
}

impl Inspection {
    /// Layer `l`'s attention probabilities [Hq, T, T], from the Q and K captured there (empty
    /// where they were not): one layer at a time, for a caller that cannot hold every layer's
    /// T x T at once.
    pub fn attention_probs(&self, c: &crate::ModelConfig, l: usize) -> Vec<f32> {
        let (hq, hkv, d) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        attention_probs(self.hooks.get(Site::Q, l).unwrap_or_default(), self.hooks.get(Site::K, l).unwrap_or_default(), [hq, hkv, d], c.scores(l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_probabilities_are_causal_rows_summing_to_one() {
        // 3 tokens, 4 query heads over 2 KV heads of dim 2.
        let (t, hq, hkv, d) = (3, 4, 2, 2);
        let q: Vec<f32> = (0..t * hq * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..t * hkv * d).map(|i| (i as f32 * 0.91).cos()).collect();
        let p = attention_probs(&q, &k, [hq, hkv, d], Scores::scaled(1.0 / (d as f32).sqrt()));
        assert_eq!(p.len(), hq * t * t);
        for h in 0..hq {
            for i in 0..t {
                let row = &p[(h * t + i) * t..][..t];
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "head {h} row {i}: {row:?}");
                assert!(row[i + 1..].iter().all(|&x| x == 0.0), "no weight on later tokens");
            }
        }
        // The first token sees only itself.
        assert!((0..hq).all(|h| p[h * t * t] == 1.0));
    }
}
