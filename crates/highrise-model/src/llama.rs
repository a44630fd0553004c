//! The Llama-family transformer on any backend: weights, KV cache and the forward pass.
//!
//! Read `forward` top to bottom and you read the transformer: the residual stream enters as token
//! embeddings; each layer normalizes it, projects Q/K/V, rotates Q and K (RoPE), writes K/V into the
//! cache (the key/value stream), attends, projects back and adds to the stream; then normalizes again
//! and adds the SwiGLU MLP's output (or a mixture of experts': `Moe`, each token through the few its
//! router picks). A final norm and the unembedding give logits. Gemma 2 adds norms after attention
//! and the MLP, GeGLU, soft-capped scores and logits, and scaled embeddings; Granite, multipliers.
//! GPT-2, GPT-NeoX, StarCoder 2 and Phi norm with LayerNorm and run an MLP without a gate (`Fc`),
//! biases on every projection (StableLM: LayerNorm with SwiGLU); GPT-2 adds learned positions to the
//! embeddings in place of RoPE, and GPT-NeoX and Phi (StableLM where its config says) run attention
//! and the MLP side by side on the stream as it enters the layer.

use std::sync::Arc;

use highrise_core::ops::{route, GluAct, PagedSeq, RopeConfig};
use highrise_core::quant::{dequantize, quantize_q8_0, repack_r8};
use highrise_core::{Backend, DType, OpKind, Tensor};

use crate::introspect::{Hooks, Site};
use crate::source::{unpermute_rows, FileTensor, Source};
use crate::{Error, ModelConfig, Result};

/// How weights are kept in backend memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// The file's own format where the backend computes with it (a float file is then used straight
    /// from the mapping); the activations' dtype otherwise.
    Auto,
    /// Converted to this dtype at load: f32, f16, bf16, or q8_0.
    Convert(DType),
}

#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub weights: WeightFormat,
    /// The dtype of activations: the residual stream and the KV cache.
    pub activations: DType,
    /// Let quantized projections quantize their input to 8 bits (faster; see `Linear`).
    pub q8_activations: bool,
    /// The KV cache's dtype, where it differs from the activations' (an f16 cache beside f32
    /// activations, as llama.cpp keeps by default: half the memory and half the bytes attention
    /// reads). `None`: the activations' dtype.
    pub kv_dtype: Option<DType>,
    /// Lay out Q4_0/Q4_1 projections 8 rows interleaved where the backend computes with that
    /// (a reordered copy of the same bytes; the file's pages are let go). `false` keeps every weight
    /// in the file's own layout, used from the mapping (llama.cpp's `--no-repack`).
    pub repack: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { weights: WeightFormat::Auto, activations: DType::F32, q8_activations: false, kv_dtype: None, repack: true }
    }
}

/// Tokens per KV-cache block, wherever highrise makes a cache (the engine's, `prefill`'s own).
pub const BLOCK_SIZE: usize = 16;

/// One layer's weights. Shapes: hidden H, heads Hq / Hkv of D, intermediate I.
pub struct Layer {
    pub attn_norm: Option<Tensor>, // [H] (None: OLMo 2, attention reads the stream as it is)
    /// LayerNorm's bias [H] (GPT-2, GPT-NeoX, StarCoder 2, Phi, StableLM): where a norm has one, it
    /// is a LayerNorm (weight and bias in f32), else an RMSNorm.
    pub attn_norm_bias: Option<Tensor>,
    pub mlp_norm_bias: Option<Tensor>,
    /// The output projection's bias [H] (GPT-2, GPT-NeoX, StarCoder 2, Phi).
    pub bo: Option<Tensor>,
    pub wq: Tensor,               // [Hq * D, H]
    pub wk: Tensor,               // [Hkv * D, H]
    pub wv: Tensor,               // [Hkv * D, H]
    pub bq: Option<Tensor>,       // [Hq * D] (Qwen2)
    pub bk: Option<Tensor>,       // [Hkv * D]
    pub bv: Option<Tensor>,       // [Hkv * D]
    pub wo: Tensor,               // [H, Hq * D]
    pub mlp_norm: Option<Tensor>, // [H] (None: OLMo 2; Phi, whose MLP reads attention's norm)
    pub mlp: Mlp,
    pub q_norm: Option<Tensor>,   // [D] (Qwen3: RMSNorm of each query head before RoPE; OLMo 2: [Hq * D])
    pub k_norm: Option<Tensor>,   // [D] (OLMo 2: [Hkv * D])
    /// Gemma, OLMo 2: RMSNorm of the attention's output before it joins the stream ([H]; HF's
    /// post_attention_layernorm, Gemma's (1 + w) as loaded).
    pub attn_post_norm: Option<Tensor>,
    /// Gemma, OLMo 2: RMSNorm of the MLP's output before it joins the stream ([H]).
    pub mlp_post_norm: Option<Tensor>,
}

/// A gated MLP's weights (SwiGLU, or GeGLU for Gemma): intermediate I.
pub struct Ffn {
    pub w_gate: Tensor, // [I, H]
    pub w_up: Tensor,   // [I, H]
    pub w_down: Tensor, // [H, I]
}

impl Ffn {
    /// Bytes of its three weights.
    pub fn size_bytes(&self) -> usize {
        [&self.w_gate, &self.w_up, &self.w_down].iter().map(|w| w.size_bytes()).sum()
    }
}

/// An MLP without a gate, `down(act(up(x)))`, with biases where the family has them (GPT-2's and
/// StarCoder 2's `c_fc`/`c_proj`, GPT-NeoX's `dense_h_to_4h`/`dense_4h_to_h`, Phi's `fc1`/`fc2`).
pub struct Fc {
    pub w_up: Tensor,           // [I, H]
    pub b_up: Option<Tensor>,   // [I]
    pub w_down: Tensor,         // [H, I]
    pub b_down: Option<Tensor>, // [H]
}

/// What a layer has after attention: one gated MLP, a mixture of experts, or an MLP without a gate.
pub enum Mlp {
    Dense(Ffn),
    Moe(Moe),
    Plain(Fc),
}

impl Mlp {
    /// The dense MLP, where the layer has one.
    pub fn dense(&self) -> Option<&Ffn> {
        match self {
            Mlp::Dense(f) => Some(f),
            Mlp::Moe(_) | Mlp::Plain(_) => None,
        }
    }
}

/// A mixture of experts (Mixtral, Qwen 2 and 3 MoE, OLMoE, Granite MoE): a router scores every
/// expert for each token, the token goes through its `top_k` likeliest (softmax over all experts'
/// scores), and their outputs are summed, each weighted by its probability (renormalized over the
/// chosen where `renormalize`).
pub struct Moe {
    pub router: Tensor, // [E, H]
    pub experts: Experts,
    pub top_k: usize,
    pub renormalize: bool,
    /// Qwen 2 MoE's shared expert, which every token goes through, and its gate [1, H]: its output
    /// is scaled by sigmoid(x . gate) and joins the routed experts'.
    pub shared: Option<(Ffn, Tensor)>,
}

/// A mixture's experts: each apart, the tokens routed on the host (the CPU backend's, whose experts
/// may be quantized), or stacked for a backend that runs the whole mixture as one op, the router's
/// choice included (`Backend::moe`: on CUDA a decode step then stays one graph).
pub enum Experts {
    Each(Vec<Ffn>),
    /// gate, up [E, I, H]; down [E, H, I].
    Stacked(Box<[Tensor; 3]>),
}

impl Experts {
    /// A mixture's `count` experts (`expert(e)` loads or makes expert e): stacked where the backend
    /// runs `Moe` in `dtype` and the weights are of it, each expert copied in as it comes and then
    /// freed (the peak: the stacked weights and one expert); kept apart otherwise.
    fn new(count: usize, mut expert: impl FnMut(usize) -> Result<Ffn>, backend: &Arc<dyn Backend>, dtype: DType) -> Result<Experts> {
        let of_dtype = |f: &Ffn| [&f.w_gate, &f.w_up, &f.w_down].iter().all(|w| w.dtype() == dtype);
        let first = expert(0)?;
        if !(backend.supports(OpKind::Moe, dtype) && of_dtype(&first)) {
            let mut each = vec![first];
            for e in 1..count {
                each.push(expert(e)?);
            }
            return Ok(Experts::Each(each));
        }
        let (i, h) = (first.w_gate.dims()[0], first.w_gate.dims()[1]);
        let [g, u, d] = [[count, i, h], [count, i, h], [count, h, i]].map(|d| Tensor::empty(backend, dtype, &d));
        let mut stacked = [g?, u?, d?];
        let mut next = Some(first);
        for e in 0..count {
            let f = match next.take() {
                Some(f) => f,
                None => expert(e)?,
            };
            if !of_dtype(&f) {
                return Err(Error::Input(format!("expert {e}'s weights are not {dtype}, as expert 0's are")));
            }
            for (s, w) in stacked.iter_mut().zip([&f.w_gate, &f.w_up, &f.w_down]) {
                s.copy_from_at(e * i * h, w)?;
            }
        }
        Ok(Experts::Stacked(Box::new(stacked)))
    }

    pub fn len(&self) -> usize {
        match self {
            Experts::Each(f) => f.len(),
            Experts::Stacked(w) => w[0].dims()[0],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of one expert's weights.
    fn expert_bytes(&self) -> usize {
        match self {
            Experts::Each(f) => f.first().map_or(0, Ffn::size_bytes),
            Experts::Stacked(w) => w.iter().map(Tensor::size_bytes).sum::<usize>() / self.len().max(1),
        }
    }
}

pub struct Llama {
    pub config: ModelConfig,
    pub backend: Arc<dyn Backend>,
    /// Activation dtype.
    pub dtype: DType,
    /// Quantized projections may take 8-bit activations.
    pub q8_activations: bool,
    /// The KV cache's dtype.
    pub kv_dtype: DType,
    /// How each layer rotates q and k (Gemma 3's sliding layers differ from its full ones; None:
    /// SmolLM3's layers without RoPE).
    pub rope: Vec<Option<RopeConfig>>,
    pub embed: Tensor,           // [V, H]
    /// GPT-2's and OPT's learned positions [max positions (+ 2: OPT), H], added to the embeddings.
    pub positions: Option<Tensor>,
    /// Bloom's LayerNorm of the embeddings as they enter the stream: weight and bias [H].
    pub embed_norm: Option<(Tensor, Option<Tensor>)>,
    pub layers: Vec<Layer>,
    pub norm: Tensor,            // [H]
    /// The final norm's bias, where it is a LayerNorm.
    pub norm_bias: Option<Tensor>,
    /// None when the unembedding is tied to `embed`.
    pub lm_head: Option<Tensor>, // [V, H]
    /// The unembedding's bias [V] (Phi).
    pub lm_head_bias: Option<Tensor>,
}

/// The paged KV cache: per layer, K and V of shape [num_blocks, Hkv, block_size, D].
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl KvCache {
    /// The key/value stream of one sequence at one layer as a logical view: its first `len` tokens'
    /// K and V, each [len, kv_heads, head_dim] as f32, gathered through its block table.
    pub fn sequence_view(&self, layer: usize, blocks: &[u32], len: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (k, v) = match (self.k.get(layer), self.v.get(layer)) {
            (Some(k), Some(v)) => (k, v),
            _ => return Err(Error::Input(format!("layer {layer} is beyond the cache's {} layers", self.k.len()))),
        };
        if len > blocks.len() * self.block_size {
            return Err(Error::Input(format!("{len} tokens need more than the {} blocks given", blocks.len())));
        }
        let (hkv, d, bs) = (k.dims()[1], k.dims()[3], self.block_size);
        let (mut ks, mut vs) = (vec![0f32; len * hkv * d], vec![0f32; len * hkv * d]);
        for (i, &b) in blocks.iter().enumerate().take(len.div_ceil(bs)) {
            let n = bs.min(len - i * bs);
            let start = b as usize * hkv * bs * d;
            // A block holds each head's rows together: [Hkv, block_size, D] to tokens' [n, Hkv, D].
            for (cache, out) in [(k, &mut ks), (v, &mut vs)] {
                let block = cache.to_f32_range(start, hkv * bs * d)?;
                for (g, rows) in block.chunks_exact(bs * d).enumerate() {
                    for (j, row) in rows.chunks_exact(d).take(n).enumerate() {
                        let at = ((i * bs + j) * hkv + g) * d;
                        out[at..at + d].copy_from_slice(row);
                    }
                }
            }
        }
        Ok((ks, vs))
    }
}

/// One forward step over a batch of sequences. Token t sits at `positions[t]` and its K/V go to cache
/// slot `slots[t]`; `seqs` group the tokens by sequence (in order) and name their block tables.
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    pub slots: &'a [u32],
    pub seqs: &'a [PagedSeq],
    pub block_table: &'a [u32],
}

/// Which positions get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Every token of the batch: [T, V].
    All,
    /// The last token of each sequence: [num_seqs, V].
    Last,
}

impl Llama {
    pub fn load(source: &Source, backend: Arc<dyn Backend>, opts: LoadOptions) -> Result<Llama> {
        Llama::load_with_progress(source, backend, opts, &mut |_, _| {})
    }

    /// `load`, calling `progress(layers_done, layers)` as it goes.
    pub fn load_with_progress(
        source: &Source,
        backend: Arc<dyn Backend>,
        opts: LoadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Llama> {
        let c = source.config().clone();
        if !opts.activations.is_float() {
            return Err(Error::Input(format!("activations must be f32, f16 or bf16, not {}", opts.activations)));
        }
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q_dim, kv_dim) = (c.num_attention_heads * c.head_dim(), c.kv_heads() * c.head_dim());
        let loader = Loader { source, backend: &backend, opts };
        // Reserved for as many layers as the file could hold, not as its config claims: a damaged
        // block count of billions is a missing tensor at the first layer past the real ones.
        let mut layers = Vec::with_capacity(c.num_hidden_layers.min(source.tensor_names().len()));
        // Gemma 2 keeps the norms' weights as w and multiplies by 1 + w: loaded as that, in f32.
        // LayerNorm's weight and bias: both f32, as the op takes them of one dtype; Cohere's and
        // OLMo 1's, which have no bias, with a bias of zeros (adding 0 changes no value).
        let ln = c.layer_norm();
        // Nemotron's LayerNorms and Gemma's RMSNorms multiply by 1 + w: loaded as that, in f32.
        // OLMo 1's have no weight: ones (multiplying by 1 changes no value).
        let norm = |name: &str| match (ln, c.norm_weight(), c.norm_plus_one()) {
            (_, false, _) => Tensor::from_f32(&backend, DType::F32, &[h], &vec![1.0; h]).map_err(|e| Error::tensor(source.path(), name, e)),
            (true, true, false) => loader.f32_vector(name, h),
            (_, true, plus_one) => loader.norm(name, h, plus_one),
        };
        let ln_bias = |name: &str| match (ln, c.norm_bias()) {
            (false, _) => Ok(None),
            (true, true) => loader.f32_vector(name, h).map(Some),
            (true, false) => Tensor::from_f32(&backend, DType::F32, &[h], &vec![0.0; h]).map(Some).map_err(|e| Error::tensor(source.path(), name, e)),
        };
        for l in 0..c.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let bias = |s: &str, n: usize| -> Result<Option<Tensor>> {
                c.qkv_bias().then(|| loader.vector(&p(s), n)).transpose()
            };
            let pre = |s: &str| c.pre_norms().then(|| norm(&p(s))).transpose();
            let post = |s: &str| c.post_norms().then(|| norm(&p(s))).transpose();
            let (q_norm, k_norm) = c.qk_norm_width();
            layers.push(Layer {
                attn_norm: pre("input_layernorm.weight")?,
                attn_norm_bias: ln_bias(&p("input_layernorm.bias"))?,
                mlp_norm_bias: if c.shared_norm() { None } else { ln_bias(&p("post_attention_layernorm.bias"))? },
                bo: c.o_bias().then(|| loader.vector(&p("self_attn.o_proj.bias"), h)).transpose()?,
                wq: loader.matrix(&p("self_attn.q_proj.weight"), q_dim, h, OpKind::Linear)?,
                wk: loader.matrix(&p("self_attn.k_proj.weight"), kv_dim, h, OpKind::Linear)?,
                wv: loader.matrix(&p("self_attn.v_proj.weight"), kv_dim, h, OpKind::Linear)?,
                bq: bias("self_attn.q_proj.bias", q_dim)?,
                bk: bias("self_attn.k_proj.bias", kv_dim)?,
                bv: bias("self_attn.v_proj.bias", kv_dim)?,
                wo: loader.matrix(&p("self_attn.o_proj.weight"), h, q_dim, OpKind::Linear)?,
                mlp_norm: match (c.shared_norm(), c.post_norms()) {
                    (true, _) => None,
                    (false, true) => pre("pre_feedforward_layernorm.weight")?,
                    (false, false) => pre("post_attention_layernorm.weight")?,
                },
                mlp: match c.moe_layer(l) {
                    false if c.plain_mlp() => Mlp::Plain(loader.fc(&p("mlp"), i, h, c.mlp_bias())?),
                    false => Mlp::Dense(loader.ffn(&p("mlp"), i, h)?),
                    true => Mlp::Moe(Moe {
                        router: loader.matrix(&p("mlp.gate.weight"), c.experts(), h, OpKind::Linear)?,
                        experts: Experts::new(
                            c.experts(),
                            |e| loader.ffn(&p(&format!("mlp.experts.{e}")), c.expert_intermediate_size(), h),
                            &backend,
                            opts.activations,
                        )?,
                        top_k: c.experts_per_token(),
                        renormalize: c.renormalize_experts(),
                        shared: c
                            .shared_expert_size()
                            .map(|s| -> Result<(Ffn, Tensor)> { Ok((loader.ffn(&p("mlp.shared_expert"), s, h)?, loader.matrix(&p("mlp.shared_expert_gate.weight"), 1, h, OpKind::Linear)?)) })
                            .transpose()?,
                    }),
                },
                q_norm: c.qk_norm().then(|| loader.head_norm(&p("self_attn.q_norm.weight"), q_norm, &c)).transpose()?,
                k_norm: c.qk_norm().then(|| loader.head_norm(&p("self_attn.k_norm.weight"), k_norm, &c)).transpose()?,
                attn_post_norm: post("post_attention_layernorm.weight")?,
                mlp_post_norm: post("post_feedforward_layernorm.weight")?,
            });
            progress(l + 1, c.num_hidden_layers);
        }
        let embed = loader.matrix("model.embed_tokens.weight", v, h, OpKind::Embedding)?;
        let positions = c
            .learned_positions()
            .then(|| loader.matrix("model.embed_positions.weight", c.max_position_embeddings + c.position_offset(), h, OpKind::Embedding))
            .transpose()?;
        let lm_head = match c.tie_word_embeddings {
            true => None,
            false => Some(loader.matrix("lm_head.weight", v, h, OpKind::Linear)?),
        };
        let lm_head_bias = c.lm_head_bias().then(|| loader.vector("lm_head.bias", v)).transpose()?;
        let norm_bias = ln_bias("model.norm.bias")?;
        let embed_norm = c.embed_norm().then(|| Ok::<_, Error>((norm("model.embed_norm.weight")?, ln_bias("model.embed_norm.bias")?))).transpose()?;
        let norm = norm("model.norm.weight")?;
        let rope = c.ropes().map_err(|e| Error::config(source.path(), "rope_scaling", e))?;
        Ok(Llama {
            config: c,
            backend,
            dtype: opts.activations,
            q8_activations: opts.q8_activations,
            kv_dtype: opts.kv_dtype.unwrap_or(opts.activations),
            rope,
            embed,
            positions,
            embed_norm,
            layers,
            norm,
            norm_bias,
            lm_head,
            lm_head_bias,
        })
    }

    /// A model of `config`'s shape with random weights in `dtype` (activations too), made the same
    /// way on any backend for the same `seed`: projections uniform in +-sqrt(3 / fan_in) (unit
    /// variance out), norms near 1. Values come from one pool of 2^22 per seed, read at a different
    /// offset per tensor, so an 8B-shaped model is made in seconds.
    pub fn random(config: ModelConfig, backend: Arc<dyn Backend>, dtype: DType, seed: u64) -> Result<Llama> {
        if !dtype.is_float() {
            return Err(Error::Input(format!("random weights are f32, f16 or bf16, not {dtype}")));
        }
        let c = config;
        let rope = c.ropes().map_err(|e| Error::Input(format!("rope_scaling: {e}")))?;
        let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut next = move || highrise_core::rand::splitmix64(&mut state);
        const POOL: usize = 1 << 22;
        // Uniform in [-1, 1).
        let pool: Vec<f32> = (0..POOL).map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect();
        let (mut offset, mut buf) = (0usize, Vec::new());
        let mut make = |dims: &[usize], scale: f32, mean: f32| -> Result<Tensor> {
            let n: usize = dims.iter().product();
            let start = offset % POOL;
            offset = offset.wrapping_add(n).wrapping_add(7919);
            let bytes = match dtype {
                DType::BF16 => pooled::<half::bf16>(&mut buf, &pool, start, n, scale, mean),
                DType::F16 => pooled::<half::f16>(&mut buf, &pool, start, n, scale, mean),
                _ => pooled::<f32>(&mut buf, &pool, start, n, scale, mean),
            };
            Ok(Tensor::from_bytes(&backend, dtype, dims, bytes)?)
        };
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q_dim, kv_dim) = (c.num_attention_heads * c.head_dim(), c.kv_heads() * c.head_dim());
        let proj = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        let (q_norm, k_norm) = c.qk_norm_width();
        // Norms without a weight (OLMo 1) or bias (Cohere, OLMo 1) are ones and zeros.
        let (ln_bias, norm_spread) = (if c.norm_bias() { 0.1 } else { 0.0 }, if c.norm_weight() { 0.1 } else { 0.0 });
        for l in 0..c.num_hidden_layers {
            let bias = c.qkv_bias();
            // Drawn in the order the fields were always drawn (every random shape's weights stay
            // what they were), the MLP's after mlp_norm.
            let attn_norm = if c.pre_norms() { Some(make(&[h], norm_spread, 1.0)?) } else { None };
            let (wq, wk, wv) = (make(&[q_dim, h], proj(h), 0.0)?, make(&[kv_dim, h], proj(h), 0.0)?, make(&[kv_dim, h], proj(h), 0.0)?);
            let bq = if bias { Some(make(&[q_dim], 0.1, 0.0)?) } else { None };
            let bk = if bias { Some(make(&[kv_dim], 0.1, 0.0)?) } else { None };
            let bv = if bias { Some(make(&[kv_dim], 0.1, 0.0)?) } else { None };
            let wo = make(&[h, q_dim], proj(q_dim), 0.0)?;
            let mlp_norm = if c.pre_norms() && !c.shared_norm() { Some(make(&[h], norm_spread, 1.0)?) } else { None };
            let mut ffn = |i: usize| -> Result<Ffn> {
                Ok(Ffn { w_gate: make(&[i, h], proj(h), 0.0)?, w_up: make(&[i, h], proj(h), 0.0)?, w_down: make(&[h, i], proj(i), 0.0)? })
            };
            let mlp = match c.moe_layer(l) {
                false if c.plain_mlp() => {
                    let (w_up, w_down) = (make(&[i, h], proj(h), 0.0)?, make(&[h, i], proj(i), 0.0)?);
                    let b_up = if c.mlp_bias() { Some(make(&[i], 0.1, 0.0)?) } else { None };
                    let b_down = if c.mlp_bias() { Some(make(&[h], 0.1, 0.0)?) } else { None };
                    Mlp::Plain(Fc { w_up, b_up, w_down, b_down })
                }
                false => Mlp::Dense(ffn(i)?),
                true => {
                    let experts = Experts::new(c.experts(), |_| ffn(c.expert_intermediate_size()), &backend, dtype)?;
                    let shared_ffn = c.shared_expert_size().map(&mut ffn).transpose()?;
                    let router = make(&[c.experts(), h], proj(h), 0.0)?;
                    let shared = match shared_ffn {
                        Some(f) => Some((f, make(&[1, h], proj(h), 0.0)?)),
                        None => None,
                    };
                    Mlp::Moe(Moe { router, experts, top_k: c.experts_per_token(), renormalize: c.renormalize_experts(), shared })
                }
            };
            layers.push(Layer {
                attn_norm,
                wq,
                wk,
                wv,
                bq,
                bk,
                bv,
                wo,
                mlp_norm,
                mlp,
                q_norm: if c.qk_norm() { Some(make(&[q_norm], 0.1, 1.0)?) } else { None },
                k_norm: if c.qk_norm() { Some(make(&[k_norm], 0.1, 1.0)?) } else { None },
                attn_post_norm: if c.post_norms() { Some(make(&[h], 0.1, 1.0)?) } else { None },
                mlp_post_norm: if c.post_norms() { Some(make(&[h], 0.1, 1.0)?) } else { None },
                // The LayerNorm families' biases, drawn last (every other family's weights as ever);
                // zeros where the norms have none (Cohere).
                attn_norm_bias: if c.layer_norm() { Some(make(&[h], ln_bias, 0.0)?) } else { None },
                mlp_norm_bias: if c.layer_norm() && !c.shared_norm() { Some(make(&[h], ln_bias, 0.0)?) } else { None },
                bo: if c.o_bias() { Some(make(&[h], 0.1, 0.0)?) } else { None },
            });
        }
        let embed = make(&[v, h], 1.0, 0.0)?;
        let norm = make(&[h], norm_spread, 1.0)?;
        let lm_head = if c.tie_word_embeddings { None } else { Some(make(&[v, h], proj(h), 0.0)?) };
        let positions = if c.learned_positions() { Some(make(&[c.max_position_embeddings + c.position_offset(), h], 1.0, 0.0)?) } else { None };
        let norm_bias = if c.layer_norm() { Some(make(&[h], ln_bias, 0.0)?) } else { None };
        let lm_head_bias = if c.lm_head_bias() { Some(make(&[v], 0.1, 0.0)?) } else { None };
        let embed_norm = if c.embed_norm() { Some((make(&[h], norm_spread, 1.0)?, Some(make(&[h], ln_bias, 0.0)?))) } else { None };
        Ok(Llama { config: c, backend, dtype, q8_activations: false, kv_dtype: dtype, rope, embed, positions, embed_norm, layers, norm, norm_bias, lm_head, lm_head_bias })
    }

    /// The unembedding: `lm_head`, or the embedding table when tied.
    pub fn unembedding(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes of weights one decoded token reads: every layer's (of a mixture, the router and the
    /// token's `top_k` experts), the final norm, and the unembedding (the embedding table itself is
    /// only gathered from).
    pub fn weight_bytes_per_token(&self) -> usize {
        self.weight_bytes_per_step(1).round() as usize
    }

    /// Bytes of weights a decode step of `sequences` tokens reads, each once: as
    /// `weight_bytes_per_token`, but of a mixture the experts any of the step's tokens chose, E (1 -
    /// (1 - k/E)^s) of E expected for s tokens routed independently (k at batch 1, nearly all E
    /// by a few dozen tokens).
    pub fn weight_bytes_per_step(&self, sequences: usize) -> f64 {
        let mlp = |m: &Mlp| match m {
            Mlp::Dense(f) => f.size_bytes() as f64,
            Mlp::Plain(f) => [Some(&f.w_up), Some(&f.w_down), f.b_up.as_ref(), f.b_down.as_ref()].iter().flatten().map(|t| t.size_bytes()).sum::<usize>() as f64,
            Mlp::Moe(m) => {
                let e = m.experts.len() as f64;
                let used = e * (1.0 - (1.0 - m.top_k as f64 / e.max(1.0)).powi(sequences.max(1) as i32));
                let shared = m.shared.as_ref().map_or(0, |(f, g)| f.size_bytes() + g.size_bytes());
                (m.router.size_bytes() + shared) as f64 + m.experts.expert_bytes() as f64 * used
            }
        };
        let layers: f64 = self
            .layers
            .iter()
            .map(|l| {
                let rest = [&l.wq, &l.wk, &l.wv, &l.wo].iter().map(|t| t.size_bytes()).sum::<usize>()
                    + [&l.attn_norm, &l.mlp_norm, &l.bq, &l.bk, &l.bv, &l.q_norm, &l.k_norm, &l.attn_post_norm, &l.mlp_post_norm, &l.attn_norm_bias, &l.mlp_norm_bias, &l.bo]
                        .iter()
                        .filter_map(|b| b.as_ref())
                        .map(|t| t.size_bytes())
                        .sum::<usize>();
                rest as f64 + mlp(&l.mlp)
            })
            .sum();
        let head = [Some(&self.norm), Some(self.unembedding()), self.norm_bias.as_ref(), self.lm_head_bias.as_ref()];
        layers + head.iter().flatten().map(|t| t.size_bytes()).sum::<usize>() as f64
    }

    /// Bytes of KV cache one block of `block_size` tokens takes across all layers.
    pub fn kv_block_bytes(&self, block_size: usize) -> usize {
        let c = &self.config;
        2 * c.num_hidden_layers * block_size * c.kv_heads() * c.head_dim() * self.kv_dtype.block_bytes()
    }

    pub fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<KvCache> {
        let dims = [num_blocks, self.config.kv_heads(), block_size, self.config.head_dim()];
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..self.config.num_hidden_layers {
            k.push(Tensor::empty(&self.backend, self.kv_dtype, &dims)?);
            v.push(Tensor::empty(&self.backend, self.kv_dtype, &dims)?);
        }
        Ok(KvCache { k, v, block_size, num_blocks })
    }

    fn tensor(&self, dims: &[usize]) -> Result<Tensor> {
        Ok(Tensor::empty(&self.backend, self.dtype, dims)?)
    }

    /// A projection, with the model's choice of activation precision for quantized weights.
    fn linear(&self, out: &mut Tensor, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        Ok(self.backend.linear_with(out, x, w, bias, self.q8_activations)?)
    }

    /// Whether projections by `weights` run as one fused op (`QkvLinear`, `SwiGluLinear`): the
    /// backend has it, and the weights are plain floats in the activations' dtype (no 8-bit
    /// activations to choose).
    fn fused(&self, op: OpKind, weights: &[&Tensor]) -> bool {
        weights.iter().all(|w| w.dtype() == self.dtype) && !self.q8_activations && self.backend.supports(op, self.dtype)
    }

    /// Whether `layer` can read its norms inside its projections and add its two outputs straight
    /// into the stream (`Backend::folds_norms`): q/k/v and gate/up fused (SwiGLU), nothing between
    /// a projection and the stream (Gemma 2's post-norms are), and the norms' weights in the
    /// activations' dtype, as the projections' kernels read them (a GGUF file's are f32: those
    /// would be normed apart first, a launch more than `add_rms_norm`).
    fn can_fold_norms(&self, layer: &Layer) -> bool {
        self.config.glu_act() == GluAct::Silu
            && !self.config.layer_norm()
            && self.config.residual_scale() == 1.0
            && [&layer.attn_norm, &layer.mlp_norm].iter().all(|n| n.as_ref().is_some_and(|n| n.dtype() == self.dtype))
            && layer.attn_post_norm.is_none()
            && layer.mlp_post_norm.is_none()
            && self.fused(OpKind::QkvLinear, &[&layer.wq, &layer.wk, &layer.wv])
            && layer.mlp.dense().is_some_and(|f| self.fused(OpKind::SwiGluLinear, &[&f.w_gate, &f.w_up]))
    }

    /// RMSNorm of each of `rows` rows of width `d` of `x` (a projection's heads), with weight `w` [d].
    fn head_norm(&self, x: Tensor, w: &Tensor, rows: usize, d: usize, eps: f32) -> Result<Tensor> {
        let x = x.reshape(&[rows, d])?;
        let mut out = self.tensor(&[rows, d])?;
        self.backend.rms_norm(&mut out, &x, w, eps)?;
        Ok(out)
    }

    /// `out = ` the final norm of stream rows `x` [rows, H] (LayerNorm or RMSNorm, as the family's).
    pub fn final_norm(&self, out: &mut Tensor, x: &Tensor) -> Result<()> {
        self.norm(out, x, (&self.norm, self.norm_bias.as_ref()))
    }

    /// Logits [rows, V] of final-normed rows [rows, H]: the unembedding, then Gemma 2's soft-cap.
    pub fn unembed(&self, rows: &Tensor) -> Result<Tensor> {
        let mut logits = self.tensor(&[rows.dims()[0], self.config.vocab_size])?;
        self.linear(&mut logits, rows, self.unembedding(), self.lm_head_bias.as_ref())?;
        if let Some(cap) = self.config.final_logit_softcapping {
            self.backend.softcap(&mut logits, cap as f32)?;
        }
        match self.config.logits_scale() {
            1.0 => Ok(logits),
            // Granite's divisor: zeros plus the logits times it (the weighted add, every row).
            s => {
                let mut scaled = Tensor::full(&self.backend, self.dtype, logits.dims(), 0.0)?;
                self.scaled_add(&mut scaled, &logits, s)?;
                Ok(scaled)
            }
        }
    }

    /// `out += scale * delta`, row by row (`IndexAdd` over every row).
    fn scaled_add(&self, out: &mut Tensor, delta: &Tensor, scale: f32) -> Result<()> {
        let rows = delta.dims()[0];
        let index: Vec<u32> = (0..rows as u32).collect();
        Ok(self.backend.index_add(out, delta, &index, &vec![scale; rows])?)
    }

    /// `out = norm(x)`: a LayerNorm where the norm has a bias (the LayerNorm families' all do), an
    /// RMSNorm otherwise.
    fn norm(&self, out: &mut Tensor, x: &Tensor, (w, bias): (&Tensor, Option<&Tensor>)) -> Result<()> {
        let eps = self.config.rms_norm_eps as f32;
        match bias {
            Some(bias) => Ok(self.backend.layer_norm(out, x, w, bias, eps)?),
            None => Ok(self.backend.rms_norm(out, x, w, eps)?),
        }
    }

    /// `x += delta`, then `xb = norm(x)`: one op (`add_rms_norm`, `LayerNorm` with its delta), or,
    /// where the family scales what joins the stream (Granite's `residual_multiplier`), its weighted
    /// add and the norm.
    fn join(&self, xb: &mut Tensor, x: &mut Tensor, delta: &Tensor, norm: (&Tensor, Option<&Tensor>)) -> Result<()> {
        let eps = self.config.rms_norm_eps as f32;
        match (self.config.residual_scale(), norm) {
            (1.0, (w, Some(bias))) => Ok(self.backend.add_layer_norm(xb, x, delta, w, bias, eps)?),
            (1.0, (w, None)) => Ok(self.backend.add_rms_norm(xb, x, delta, w, eps)?),
            (m, norm) => {
                self.scaled_add(x, delta, m)?;
                self.norm(xb, x, norm)
            }
        }
    }

    /// Layer `layer`'s attention norm, weight and bias; the final norm past the last layer, and for
    /// a layer without one (OLMo 2, whose xb no one reads).
    fn attn_norm(&self, layer: usize) -> (&Tensor, Option<&Tensor>) {
        match self.layers.get(layer) {
            Some(Layer { attn_norm: Some(w), attn_norm_bias, .. }) => (w, attn_norm_bias.as_ref()),
            _ => (&self.norm, self.norm_bias.as_ref()),
        }
    }

    /// A gated MLP's gate, `act(x @ w_gate^T) * (x @ w_up^T)` [rows, I] for x [rows, H]: one op where
    /// the backend fuses it (SwiGLU, weights in the activations' dtype), else two projections and
    /// the gate.
    fn glu(&self, f: &Ffn, x: &Tensor) -> Result<Tensor> {
        let (b, rows, i, act) = (&*self.backend, x.dims()[0], f.w_gate.dims()[0], self.config.glu_act());
        let mut out = self.tensor(&[rows, i])?;
        if act == GluAct::Silu && self.fused(OpKind::SwiGluLinear, &[&f.w_gate, &f.w_up]) {
            b.swiglu_linear(&mut out, x, &f.w_gate, &f.w_up)?;
        } else {
            let (mut gate, mut up) = (self.tensor(&[rows, i])?, self.tensor(&[rows, i])?);
            self.linear(&mut gate, x, &f.w_gate, None)?;
            self.linear(&mut up, x, &f.w_up, None)?;
            b.glu(&mut out, &gate, &up, act)?;
        }
        Ok(out)
    }

    /// A mixture of experts' output [T, H] for the normed stream `x` [T, H]. Experts stacked: one op
    /// (`Backend::moe`), the router's choice made where the backend computes. Otherwise the router's
    /// scores are read to the host and each token routed (`route`), then each expert with tokens
    /// runs on theirs alone (gathered by the embedding op, the stream as its table) and its output
    /// joins their rows weighted by the router (`IndexAdd`), in the experts' order as HF sums them.
    /// The weights are rounded to the activations' dtype first, as HF casts them. (The scores'
    /// read ends a step recorded as a graph there: the rest of the step runs op by op.) A shared
    /// expert's output (Qwen 2 MoE) joins last, weighted by its gate's sigmoid. The scores are
    /// layer `layer`'s `Site::Router`.
    fn moe(&self, m: &Moe, x: &Tensor, hooks: &mut Option<&mut Hooks>, layer: usize) -> Result<Tensor> {
        let b = &*self.backend;
        let (t, h, e) = (x.dims()[0], x.dims()[1], m.experts.len());
        let mut logits = self.tensor(&[t, e])?;
        self.linear(&mut logits, x, &m.router, None)?;
        hooks.tap(Site::Router, layer, &logits)?;
        // Qwen 2 MoE's shared expert: every token's output, and its gate's score.
        let shared = match &m.shared {
            Some((f, gate)) => {
                let mut g = self.tensor(&[t, 1])?;
                self.linear(&mut g, x, gate, None)?;
                let act = self.glu(f, x)?;
                let mut ys = self.tensor(&[t, h])?;
                self.linear(&mut ys, &act, &f.w_down, None)?;
                Some((ys, g))
            }
            None => None,
        };
        match &m.experts {
            Experts::Stacked(w) => {
                let [gate, up, down] = &**w;
                let mut out = self.tensor(&[t, h])?;
                let shared = shared.as_ref().map(|(ys, g)| [ys, g]);
                b.moe(&mut out, x, &logits, [gate, up, down], shared, m.top_k, m.renormalize, self.config.glu_act())?;
                Ok(out)
            }
            Experts::Each(experts) => {
                let mut out = self.moe_on_the_host(experts, m, x, &logits)?;
                // The shared expert's output scaled by its gate's sigmoid (the same add, with every
                // row and a weight per row).
                if let Some((ys, g)) = &shared {
                    let weights: Vec<f32> = g.to_f32()?.iter().map(|&v| self.dtype.rounded(1.0 / (1.0 + (-v).exp()))).collect();
                    let rows: Vec<u32> = (0..t as u32).collect();
                    b.index_add(&mut out, ys, &rows, &weights)?;
                }
                Ok(out)
            }
        }
    }

    /// `moe`'s routed experts with the tokens routed on the host: each expert with tokens on theirs
    /// alone, its output added to their rows weighted (`IndexAdd`), the experts in order.
    fn moe_on_the_host(&self, experts: &[Ffn], m: &Moe, x: &Tensor, logits: &Tensor) -> Result<Tensor> {
        let b = &*self.backend;
        let (t, h) = (x.dims()[0], x.dims()[1]);
        let routes = route(&logits.to_f32()?, experts.len(), m.top_k, m.renormalize);
        let mut out = Tensor::full(&self.backend, self.dtype, &[t, h], 0.0)?;
        for (f, (rows, weights)) in experts.iter().zip(&routes).filter(|(_, r)| !r.0.is_empty()) {
            let mut xe = self.tensor(&[rows.len(), h])?;
            b.embedding(&mut xe, x, rows)?;
            let act = self.glu(f, &xe)?;
            let mut ye = self.tensor(&[rows.len(), h])?;
            self.linear(&mut ye, &act, &f.w_down, None)?;
            let weights: Vec<f32> = weights.iter().map(|&w| self.dtype.rounded(w)).collect();
            b.index_add(&mut out, &ye, rows, &weights)?;
        }
        Ok(out)
    }

    /// `delta` through a norm of its own before it joins the stream, where the layer has one
    /// (Gemma 2's and 3's post-norms, OLMo 2's); `delta` itself otherwise.
    fn post_norm(&self, delta: Tensor, norm: Option<&Tensor>) -> Result<Tensor> {
        let Some(w) = norm else { return Ok(delta) };
        let mut out = self.tensor(delta.dims())?;
        self.backend.rms_norm(&mut out, &delta, w, self.config.rms_norm_eps as f32)?;
        Ok(out)
    }

    /// Runs the batch through the model, writing its K/V into `cache`; returns logits [rows, V].
    pub fn forward(&self, batch: &Batch, cache: &mut KvCache, which: Logits) -> Result<Tensor> {
        self.forward_hooked(batch, cache, which, None)
    }

    /// `forward`, with introspection: captures (copies) and interventions as `hooks` asks. With no
    /// hooks it is the plain path; each capture costs one copy of the tensor to the host.
    pub fn forward_hooked(
        &self,
        batch: &Batch,
        cache: &mut KvCache,
        which: Logits,
        mut hooks: Option<&mut Hooks>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let b = &*self.backend;
        let t = batch.tokens.len();
        let (h, hq, hkv, d) = (c.hidden_size, c.num_attention_heads, c.kv_heads(), c.head_dim());
        self.check_batch(batch)?;
        if let Some(hk) = hooks.as_deref() {
            hk.check_patches(c)?;
        }
        let eps = c.rms_norm_eps as f32;
        // Whole prompts with nothing cached attend straight to their own K/V (flash-attention's case);
        // anything else (decode, a chunk after a cached prefix) reads through the block tables.
        let whole_prompts = batch.seqs.iter().all(|s| s.q_len == s.context_len);
        let seq_lens: Vec<u32> = batch.seqs.iter().map(|s| s.q_len).collect();

        // The residual stream: one vector per token.
        let mut x = self.tensor(&[t, h])?; // (T, H)
        if let Some(hooks) = hooks.as_deref_mut() {
            // Deferred captures (`Hooks::defer`) all go to one buffer of this size.
            let n = self.capture_elements(hooks, t);
            hooks.begin(&x, n, c)?;
        }
        b.embedding_scaled(&mut x, &self.embed, batch.tokens, c.embed_scale())?;
        // GPT-2, OPT: each position's learned embedding added (gathered as the tokens' are; OPT's
        // from row 2 on).
        if let Some(table) = &self.positions {
            let mut pos = self.tensor(&[t, h])?;
            match c.position_offset() as u32 {
                0 => b.embedding(&mut pos, table, batch.positions)?,
                off => b.embedding(&mut pos, table, &batch.positions.iter().map(|p| p + off).collect::<Vec<_>>())?,
            }
            self.scaled_add(&mut x, &pos, 1.0)?;
        }
        // Bloom: the embeddings LayerNormed as they enter the stream.
        if let Some((w, bias)) = &self.embed_norm {
            let mut normed = self.tensor(&[t, h])?;
            self.norm(&mut normed, &x, (w, bias.as_ref()))?;
            x = normed;
        }
        let mut xb = self.tensor(&[t, h])?; // (T, H) the normed stream a block reads
        // GPT-NeoX, Phi: attention and the MLP both read the stream as it enters the layer.
        let parallel = c.parallel_residual();
        // Where the backend folds the norms into the projections (decode on CUDA), a layer reads the
        // stream x itself, and its output and down projections add into it: no xb, no add_rms_norm.
        let fold = b.folds_norms(t, h, self.dtype);
        // Whether xb holds the norm the next layer's attention reads.
        let mut xb_ready = false;

        for (l, layer) in self.layers.iter().enumerate() {
            let folded = fold && self.can_fold_norms(layer);
            // Steering and patching change the stream entering the layer; its norm follows (where
            // the layer norms it apart from its projections).
            let changed = hooks.intervene(l, &mut x, h)?;
            if let (false, true, Some(_)) = (folded, changed || !xb_ready, &layer.attn_norm) {
                self.norm(&mut xb, &x, self.attn_norm(l))?;
            }
            // What attention reads: the stream's norm, or the stream itself (OLMo 2).
            let input = if layer.attn_norm.is_some() { &xb } else { &x };
            hooks.tap(Site::ResidPre, l, &x)?;
            // Attention: Q, K, V projections.
            let mut q = self.tensor(&[t, hq * d])?; // (T, Hq*D)
            let mut k = self.tensor(&[t, hkv * d])?; // (T, Hkv*D)
            let mut v = self.tensor(&[t, hkv * d])?; // (T, Hkv*D)
            if folded {
                let biases = [layer.bq.as_ref(), layer.bk.as_ref(), layer.bv.as_ref()];
                let norm = layer.attn_norm.as_ref().map(|n| (n, eps));
                b.qkv_linear_normed([&mut q, &mut k, &mut v], &x, norm, [&layer.wq, &layer.wk, &layer.wv], biases)?;
            } else if self.fused(OpKind::QkvLinear, &[&layer.wq, &layer.wk, &layer.wv]) {
                let biases = [layer.bq.as_ref(), layer.bk.as_ref(), layer.bv.as_ref()];
                b.qkv_linear([&mut q, &mut k, &mut v], input, [&layer.wq, &layer.wk, &layer.wv], biases)?;
            } else {
                self.linear(&mut q, input, &layer.wq, layer.bq.as_ref())?;
                self.linear(&mut k, input, &layer.wk, layer.bk.as_ref())?;
                self.linear(&mut v, input, &layer.wv, layer.bv.as_ref())?;
            }
            // Qwen 3, Gemma 3: each head's q and k RMS-normed before RoPE (the residual norm op, one
            // head a row); OLMo 2: all heads of a token at once (one token a row).
            let (q, k) = match (&layer.q_norm, &layer.k_norm) {
                (Some(qn), Some(kn)) => {
                    let (qw, kw) = (qn.dims()[0], kn.dims()[0]);
                    (self.head_norm(q, qn, t * hq * d / qw, qw, eps)?, self.head_norm(k, kn, t * hkv * d / kw, kw, eps)?)
                }
                _ => (q, k),
            };
            let mut q = q.reshape(&[t, hq, d])?;
            let mut k = k.reshape(&[t, hkv, d])?;
            let v = v.reshape(&[t, hkv, d])?;
            // RoPE: rotate Q and K by their positions. Then the key/value stream: store this layer's
            // K/V for later tokens. One op where the backend fuses them.
            let (kc, vc) = (&mut cache.k[l], &mut cache.v[l]);
            match self.rope[l] {
                Some(rope) if b.supports(OpKind::RopeKvWrite, kc.dtype()) => {
                    b.rope_kv_write(&mut q, &mut k, &v, kc, vc, batch.positions, batch.slots, rope)?
                }
                Some(rope) => {
                    b.rope(&mut q, batch.positions, rope)?;
                    b.rope(&mut k, batch.positions, rope)?;
                    b.kv_write(kc, vc, &k, &v, batch.slots)?;
                }
                // A layer without RoPE (SmolLM3's every fourth): q and k as projected.
                None => b.kv_write(kc, vc, &k, &v, batch.slots)?,
            }
            hooks.tap(Site::Q, l, &q)?;
            hooks.tap(Site::K, l, &k)?;
            hooks.tap(Site::V, l, &v)?;
            // Grouped-query causal attention (soft-capped scores, a sliding window: as the layer's
            // config says).
            let scores = c.scores(l);
            let mut att = self.tensor(&[t, hq, d])?; // (T, Hq, D)
            if whole_prompts {
                b.attention_with(&mut att, &q, &k, &v, &seq_lens, scores, true)?;
            } else {
                b.paged_attention_with(&mut att, &q, &cache.k[l], &cache.v[l], batch.seqs, batch.block_table, scores)?;
            }
            let mut att = att.reshape(&[t, hq * d])?;
            hooks.patch(Site::Z, l, &mut att)?;
            hooks.tap(Site::Z, l, &att)?;
            // x += attn_out: the projection adding into the stream where the norms fold (and no
            // tap wants attn_out apart: then it is stored and added, the same numbers); else with
            // the MLP's norm in one pass (add_rms_norm): xb = the MLP's norm of x. Side by side
            // (GPT-NeoX, Phi), attn_out waits to join the MLP's output, and the MLP reads its own
            // norm of the stream as it entered the layer (GPT-NeoX) or attention's (Phi: xb as is).
            let mut pending = None;
            if folded && !hooks.touches(Site::AttnOut, l) {
                b.linear_add(&mut x, &att, &layer.wo, None)?;
            } else {
                let mut attn_out = self.tensor(&[t, h])?; // (T, H)
                self.linear(&mut attn_out, &att, &layer.wo, layer.bo.as_ref())?;
                // What joins the stream (Gemma 2, OLMo 2: normed first) is what the tap sees.
                let mut attn_out = self.post_norm(attn_out, layer.attn_post_norm.as_ref())?;
                hooks.patch(Site::AttnOut, l, &mut attn_out)?;
                hooks.tap(Site::AttnOut, l, &attn_out)?;
                // Without the MLP's own norm (OLMo 2) xb is not read: any norm serves the add.
                let mlp_norm = match &layer.mlp_norm {
                    Some(w) => (w, layer.mlp_norm_bias.as_ref()),
                    None => (&self.norm, self.norm_bias.as_ref()),
                };
                match (parallel, &layer.mlp_norm) {
                    (false, _) => self.join(&mut xb, &mut x, &attn_out, mlp_norm)?,
                    (true, Some(_)) => self.norm(&mut xb, &x, mlp_norm)?,
                    (true, None) => {}
                }
                pending = parallel.then_some(attn_out);
            }
            if !parallel {
                hooks.tap(Site::ResidMid, l, &x)?;
            }
            let input = if layer.mlp_norm.is_some() || parallel { &xb } else { &x };

            // MLP: SwiGLU (GeGLU for Gemma), its two projections and the gate in one op where the
            // backend fuses them (`glu`; reading x's norm itself where the norms fold), then the
            // down projection; a mixture of experts, the same on each expert's tokens (`moe`).
            let mlp_out = match &layer.mlp {
                Mlp::Dense(f) if folded => {
                    let mut act = self.tensor(&[t, f.w_gate.dims()[0]])?; // (T, I)
                    b.swiglu_linear_normed(&mut act, &x, layer.mlp_norm.as_ref().map(|n| (n, eps)), &f.w_gate, &f.w_up)?;
                    hooks.patch(Site::MlpPost, l, &mut act)?;
                    hooks.tap(Site::MlpPost, l, &act)?;
                    if hooks.touches(Site::MlpOut, l) {
                        let mut mlp_out = self.tensor(&[t, h])?; // (T, H)
                        self.linear(&mut mlp_out, &act, &f.w_down, None)?;
                        Some(mlp_out)
                    } else {
                        // x += mlp_out, the next layer (or the final norm) norming x itself.
                        b.linear_add(&mut x, &act, &f.w_down, None)?;
                        None
                    }
                }
                Mlp::Dense(f) => {
                    let mut act = self.glu(f, input)?; // (T, I)
                    hooks.patch(Site::MlpPost, l, &mut act)?;
                    hooks.tap(Site::MlpPost, l, &act)?;
                    let mut mlp_out = self.tensor(&[t, h])?; // (T, H)
                    self.linear(&mut mlp_out, &act, &f.w_down, None)?;
                    Some(mlp_out)
                }
                Mlp::Moe(m) => Some(self.moe(m, input, &mut hooks, l)?),
                // An MLP without a gate: up (its bias added), the activation, down.
                Mlp::Plain(f) => {
                    let mut up = self.tensor(&[t, f.w_up.dims()[0]])?; // (T, I)
                    self.linear(&mut up, input, &f.w_up, f.b_up.as_ref())?;
                    let mut act = self.tensor(up.dims())?;
                    b.activation(&mut act, &up, c.glu_act())?;
                    hooks.patch(Site::MlpPost, l, &mut act)?;
                    hooks.tap(Site::MlpPost, l, &act)?;
                    let mut mlp_out = self.tensor(&[t, h])?; // (T, H)
                    self.linear(&mut mlp_out, &act, &f.w_down, f.b_down.as_ref())?;
                    Some(mlp_out)
                }
            };
            // (A next layer without a norm of its own does not read xb: the final norm serves.)
            let next_norm = self.attn_norm(l + 1);
            if let Some(mlp_out) = mlp_out {
                let mut mlp_out = self.post_norm(mlp_out, layer.mlp_post_norm.as_ref())?;
                hooks.patch(Site::MlpOut, l, &mut mlp_out)?;
                hooks.tap(Site::MlpOut, l, &mlp_out)?;
                // Side by side: attention's output joins the MLP's, then the stream (HF's order:
                // mlp + attn, then the residual).
                let mlp_out = match pending {
                    Some(attn_out) => {
                        let mut sum = mlp_out;
                        self.scaled_add(&mut sum, &attn_out, 1.0)?;
                        sum
                    }
                    None => mlp_out,
                };
                // Residual and the next norm in one pass: x += mlp_out, xb = the next layer's attention
                // norm of x (the final norm after the last layer), so no layer starts with a norm of its own.
                self.join(&mut xb, &mut x, &mlp_out, next_norm)?;
                xb_ready = true;
            } else {
                xb_ready = false;
            }
            hooks.tap(Site::ResidPost, l, &x)?;
        }
        if !xb_ready {
            self.norm(&mut xb, &x, (&self.norm, self.norm_bias.as_ref()))?;
        }
        hooks.tap(Site::FinalNorm, self.layers.len(), &xb)?;

        // Logits from the final-normed stream, at every token or at each sequence's last.
        let rows = match which {
            Logits::All => xb,
            // A decode step (a token per sequence): every row is its sequence's last already.
            Logits::Last if batch.seqs.iter().all(|s| s.q_len == 1) && batch.seqs.len() == xb.dims()[0] => xb,
            Logits::Last => {
                let mut last = Vec::with_capacity(batch.seqs.len());
                let mut end = 0u32;
                for s in batch.seqs {
                    end += s.q_len;
                    last.push(end - 1);
                }
                // Gathering rows by index is exactly the embedding op, with the stream as the table.
                let mut sel = self.tensor(&[last.len(), h])?;
                b.embedding(&mut sel, &xb, &last)?;
                sel
            }
        };
        // The unembedding: a projection onto the vocabulary.
        self.unembed(&rows)
    }

    /// The values a pass over `t` tokens captures for `hooks`: each site asked at each layer asked.
    fn capture_elements(&self, hooks: &Hooks, t: usize) -> usize {
        let (c, layers) = (&self.config, self.config.num_hidden_layers);
        let sites = hooks.sites.iter().map(|&s| match s {
            Site::FinalNorm => s.width(c, layers) * hooks.wants(s, layers) as usize,
            _ => (0..layers).filter(|&l| hooks.wants(s, l)).map(|l| s.width(c, l)).sum(),
        });
        t * sites.sum::<usize>()
    }

    /// Logits [T, V] at every position of one sequence, run as a single prefill in a cache of its own.
    pub fn prompt_logits(&self, tokens: &[u32]) -> Result<Tensor> {
        self.prefill(tokens, Logits::All)
    }

    /// Each token of `tokens` after the first, scored by the model given the tokens before it: its
    /// log-probability, and the `top` likeliest tokens at its place with theirs (most likely first):
    /// `tokens.len() - 1` entries. What OpenAI's completions return for the prompt with `echo` and
    /// `logprobs` (evaluation harnesses score continuations with it), and a perplexity's terms.
    /// Runs in chunks through a cache of its own, so that the logits held at once stay within 64 MiB
    /// of f32 rows whatever the length; log-probabilities of the model's logits (after Gemma's
    /// soft-cap), in f64 sums as the sampler's, the rows shared among the host's cores (a server
    /// scores on its engine thread, between steps: a vocabulary's exponentials a token).
    pub fn prompt_logprobs(&self, tokens: &[u32], top: usize) -> Result<Vec<(f32, Vec<(u32, f32)>)>> {
        use highrise_core::ops::sampling::log_softmax_at_and_top;
        let (t, vocab) = (tokens.len(), self.config.vocab_size);
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Input(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let chunk = ((64usize << 20) / (4 * vocab.max(1))).clamp(16, 512);
        let mut cache = self.new_kv_cache(t.div_ceil(BLOCK_SIZE).max(1), BLOCK_SIZE)?;
        let table: Vec<u32> = (0..cache.num_blocks as u32).collect();
        let mut out = Vec::with_capacity(t.saturating_sub(1));
        // Row r of the logits predicts token r + 1; the last token's row predicts nothing asked.
        for start in (0..t.saturating_sub(1)).step_by(chunk) {
            let end = (start + chunk).min(t - 1);
            let positions: Vec<u32> = (start as u32..end as u32).collect();
            let seqs = [PagedSeq { q_len: (end - start) as u32, context_len: end as u32, blocks_start: 0 }];
            let batch = Batch { tokens: &tokens[start..end], positions: &positions, slots: &positions, seqs: &seqs, block_table: &table };
            let logits = self.forward(&batch, &mut cache, Logits::All)?.to_f32()?;
            let rows: Vec<(&[f32], u32)> = logits.chunks_exact(vocab).zip(tokens[start + 1..=end].iter().copied()).collect();
            let per = rows.len().div_ceil(std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
            std::thread::scope(|s| {
                let score = |part: &[(&[f32], u32)]| -> Vec<_> { part.iter().map(|&(row, next)| log_softmax_at_and_top(row, next as usize, top)).collect() };
                let parts: Vec<_> = rows.chunks(per).map(|part| s.spawn(move || score(part))).collect();
                // Every thread joined before any is reported: one left unjoined that panicked would
                // make the scope panic.
                let joined: Vec<_> = parts.into_iter().map(|p| p.join()).collect();
                for part in joined {
                    out.extend(part.map_err(|_| highrise_core::Error::Backend("prompt_logprobs: a thread scoring rows panicked".into()))?);
                }
                Ok::<(), Error>(())
            })?;
        }
        Ok(out)
    }

    /// One sequence run as a single prefill in a cache of its own; logits as `which` asks.
    pub fn prefill(&self, tokens: &[u32], which: Logits) -> Result<Tensor> {
        self.prefill_hooked(tokens, which, None)
    }

    /// `prefill` with introspection hooks.
    pub fn prefill_hooked(&self, tokens: &[u32], which: Logits, hooks: Option<&mut Hooks>) -> Result<Tensor> {
        self.prefill_batch_hooked(&[tokens], which, hooks)
    }

    /// Several prompts run as one batch, each from position 0 in blocks of a cache of their own: one
    /// forward pass at batch speed. Logits as `which` asks (`All`: every token of every prompt, in
    /// order). Hooks see the rows of the whole batch: captures hold every prompt's rows in order, and
    /// steering and patching positions are rows of the batch.
    pub fn prefill_batch_hooked(&self, prompts: &[&[u32]], which: Logits, hooks: Option<&mut Hooks>) -> Result<Tensor> {
        let (mut tokens, mut positions, mut slots, mut seqs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut blocks = 0usize;
        for p in prompts {
            let n = u32::try_from(p.len()).map_err(|_| Error::Input("prompt too long".into()))?;
            let start = blocks;
            tokens.extend_from_slice(p);
            positions.extend(0..n);
            slots.extend((0..n).map(|i| (start * BLOCK_SIZE) as u32 + i));
            seqs.push(PagedSeq { q_len: n, context_len: n, blocks_start: start as u32 });
            blocks += p.len().div_ceil(BLOCK_SIZE).max(1);
        }
        let mut cache = self.new_kv_cache(blocks.max(1), BLOCK_SIZE)?;
        let table: Vec<u32> = (0..cache.num_blocks as u32).collect();
        let batch = Batch { tokens: &tokens, positions: &positions, slots: &slots, seqs: &seqs, block_table: &table };
        self.forward_hooked(&batch, &mut cache, which, hooks)
    }

    fn check_batch(&self, batch: &Batch) -> Result<()> {
        let t = batch.tokens.len();
        if t == 0 || batch.seqs.is_empty() {
            return Err(Error::Input("empty batch".into()));
        }
        if batch.positions.len() != t || batch.slots.len() != t {
            return Err(Error::Input(format!(
                "batch of {t} tokens has {} positions and {} slots",
                batch.positions.len(),
                batch.slots.len()
            )));
        }
        let ctx = self.config.context_len();
        if let Some(p) = batch.positions.iter().find(|&&p| p as usize >= ctx) {
            return Err(Error::Input(format!(
                "position {p} is beyond the model's context of {ctx} tokens (the prompt and output are too long)"
            )));
        }
        Ok(())
    }
}

/// Loads tensors from a source onto the backend, checking each against the config's shapes.
struct Loader<'a> {
    source: &'a Source,
    backend: &'a Arc<dyn Backend>,
    opts: LoadOptions,
}

impl Loader<'_> {
    fn get(&self, name: &str, dims: &[usize]) -> Result<FileTensor<'_>> {
        let file = || self.source.file_of(name);
        let t = self.source.tensor(name)?.ok_or_else(|| Error::tensor(&file(), name, "missing"))?;
        if t.dims != dims {
            return Err(Error::tensor(
                &file(),
                name,
                format!("has shape {:?} but the config implies {dims:?}", t.dims),
            ));
        }
        self.rope_pairs_split(name, t)
    }

    /// q's and k's rows (weight or bias) of a family that rotates adjacent pairs (GPT-J, Cohere),
    /// moved so that each head's pairs are (i, i + r/2), as every backend's RoPE rotates them
    /// (`ModelConfig::adjacent_rope_pairs`), or whose RoPE turns the other way (nanochat), each
    /// head's second half negated (`ModelConfig::rope_turns_back`); any other tensor as it is.
    fn rope_pairs_split<'t>(&self, name: &str, t: FileTensor<'t>) -> Result<FileTensor<'t>> {
        let c = self.source.config();
        let moved = c.adjacent_rope_pairs() || c.rope_turns_back();
        let heads = match name.rsplit('.').nth(1) {
            Some("q_proj") if moved => c.num_attention_heads,
            Some("k_proj") if moved => c.kv_heads(),
            _ => return Ok(t),
        };
        let data = match c.rope_turns_back() {
            true => crate::source::negate_second_halves(&t.data, t.dtype, t.dims[0], heads),
            false => unpermute_rows(&t.data, t.dims[0], heads, c.rotary_dim().unwrap_or(0)),
        };
        let data = data.map_err(|e| Error::tensor(&self.source.file_of(name), name, e))?;
        Ok(FileTensor { data: std::borrow::Cow::Owned(data), span: 0..0, ..t })
    }

    /// A norm's weight [n]: as `vector`, or, with `plus_one` (Gemma's norms multiply by 1 + w), 1 + w
    /// in f32, as HF computes it. An f32 weight (a GGUF file's, converted from the checkpoint's bf16
    /// or f16) that the activations' 16-bit dtype holds exactly, every value, is stored in that
    /// dtype: the norms compute in f32 either way, so the numbers are the same, and a backend that
    /// folds the norms into the projections (`Backend::folds_norms`), whose kernels read the weight
    /// in x's dtype, folds this model's too.
    fn norm(&self, name: &str, n: usize, plus_one: bool) -> Result<Tensor> {
        let t = self.get(name, &[n])?;
        let act = self.opts.activations;
        if !plus_one && (t.dtype != DType::F32 || !matches!(act, DType::BF16 | DType::F16)) {
            return self.kept(name, t);
        }
        let mut w = vec![0f32; n];
        dequantize(t.dtype, &t.data, &mut w).map_err(|e| Error::tensor(&self.source.file_of(name), name, e))?;
        let dtype = if plus_one {
            w.iter_mut().for_each(|v| *v += 1.0);
            DType::F32
        } else if holds_exactly(act, &w) {
            act
        } else {
            DType::F32
        };
        Tensor::from_f32(self.backend, dtype, &[n], &w).map_err(|e| Error::tensor(&self.source.file_of(name), name, e))
    }

    /// The RMSNorm weight [n] of q or k (a head's, or all heads'): as a bias is kept (Qwen 3,
    /// OLMo 2), or as the 1 + w Gemma multiplies by.
    fn head_norm(&self, name: &str, n: usize, c: &ModelConfig) -> Result<Tensor> {
        match (c.norm_weight(), c.gemma()) {
            // nanochat's: no weight, ones.
            (false, _) => Tensor::from_f32(self.backend, DType::F32, &[n], &vec![1.0; n]).map_err(|e| Error::tensor(&self.source.file_of(name), name, e)),
            (true, true) => self.norm(name, n, true),
            (true, false) => self.vector(name, n),
        }
    }

    /// A bias: kept in the file's float dtype, or converted to f32 if quantized.
    fn vector(&self, name: &str, n: usize) -> Result<Tensor> {
        let t = self.get(name, &[n])?;
        self.kept(name, t)
    }

    /// `t` in the file's float dtype, or converted to f32 if quantized.
    fn kept(&self, name: &str, t: FileTensor) -> Result<Tensor> {
        let target = if t.dtype.is_float() { t.dtype } else { DType::F32 };
        self.upload(name, t, target)
    }

    /// A small tensor [n] in f32 (LayerNorm's weight and bias, which its op takes in one dtype).
    fn f32_vector(&self, name: &str, n: usize) -> Result<Tensor> {
        let t = self.get(name, &[n])?;
        self.upload(name, t, DType::F32)
    }

    /// An MLP without a gate under `prefix`: its up_proj and down_proj, with their biases where
    /// `bias`.
    fn fc(&self, prefix: &str, i: usize, h: usize, bias: bool) -> Result<Fc> {
        let w = |name: &str, rows, cols| self.matrix(&format!("{prefix}.{name}.weight"), rows, cols, OpKind::Linear);
        let b = |name: &str, n| bias.then(|| self.vector(&format!("{prefix}.{name}.bias"), n)).transpose();
        Ok(Fc { w_up: w("up_proj", i, h)?, b_up: b("up_proj", i)?, w_down: w("down_proj", h, i)?, b_down: b("down_proj", h)? })
    }

    /// A gated MLP of intermediate size `i` under `prefix` (`model.layers.0.mlp`, an expert's
    /// `model.layers.0.mlp.experts.3`): its gate_proj, up_proj and down_proj.
    fn ffn(&self, prefix: &str, i: usize, h: usize) -> Result<Ffn> {
        let w = |name: &str, rows, cols| self.matrix(&format!("{prefix}.{name}.weight"), rows, cols, OpKind::Linear);
        Ok(Ffn { w_gate: w("gate_proj", i, h)?, w_up: w("up_proj", i, h)?, w_down: w("down_proj", h, i)? })
    }

    /// A weight matrix [rows, cols] for `op`.
    fn matrix(&self, name: &str, rows: usize, cols: usize, op: OpKind) -> Result<Tensor> {
        let t = self.get(name, &[rows, cols])?;
        let target = match self.opts.weights {
            WeightFormat::Convert(d) => d,
            WeightFormat::Auto if self.backend.supports(op, t.dtype) => t.dtype,
            // A format the backend cannot compute with becomes the activations' dtype (f32 on the
            // CPU by default; bf16 on a GPU running bf16).
            WeightFormat::Auto => self.opts.activations,
        };
        // Q4_0/Q4_1 in the layout a backend decodes fastest, where it has one: 8 rows interleaved.
        let r8 = target.r8().filter(|&r8| {
            self.opts.repack && t.dtype == target && rows.is_multiple_of(8) && self.backend.supports(op, r8)
        });
        if let Some(r8) = r8 {
            let wrap = |e: highrise_core::Error| Error::tensor(&self.source.file_of(name), name, e);
            let bytes = repack_r8(t.dtype, &t.data, rows, cols).map_err(wrap)?;
            let tensor = Tensor::from_bytes(self.backend, r8, &t.dims, &bytes).map_err(wrap)?;
            t.release();
            return Ok(tensor);
        }
        self.upload(name, t, target)
    }

    fn upload(&self, name: &str, t: FileTensor, target: DType) -> Result<Tensor> {
        let wrap = |e: highrise_core::Error| Error::tensor(&self.source.file_of(name), name, e);
        if t.dtype == target {
            return match t.data {
                // Straight from the mapping: no second copy where the backend reads host memory.
                std::borrow::Cow::Borrowed(bytes) => {
                    Tensor::from_host(self.backend, target, &t.dims, bytes, t.owner).map_err(wrap)
                }
                std::borrow::Cow::Owned(bytes) => Tensor::from_bytes(self.backend, target, &t.dims, &bytes).map_err(wrap),
            };
        }
        let mut values = vec![0f32; t.dims.iter().product()];
        dequantize(t.dtype, &t.data, &mut values).map_err(wrap)?;
        let tensor = match target {
            DType::Q8_0 => Tensor::from_bytes(self.backend, target, &t.dims, &quantize_q8_0(&values)).map_err(wrap),
            _ => Tensor::from_f32(self.backend, target, &t.dims, &values).map_err(wrap),
        }?;
        t.release();
        Ok(tensor)
    }
}

/// The forward pass's taps, one line each: a no-op without hooks.
trait Taps {
    /// Captures `t` at `site` of `layer`, if asked.
    fn tap(&mut self, site: Site, layer: usize, t: &Tensor) -> Result<()>;
    /// Applies steering and patching to the stream `x` entering `layer`; true if it changed.
    fn intervene(&mut self, layer: usize, x: &mut Tensor, hidden: usize) -> Result<bool>;
    /// Whether `site` of `layer` is captured or patched (then the pass stores it, where it might
    /// fold it away).
    fn touches(&self, site: Site, layer: usize) -> bool;
    /// Applies the patches of `site` at `layer` to `t`; true if there were any.
    fn patch(&mut self, site: Site, layer: usize, t: &mut Tensor) -> Result<bool>;
}

impl Taps for Option<&mut Hooks> {
    fn tap(&mut self, site: Site, layer: usize, t: &Tensor) -> Result<()> {
        match self.as_deref_mut() {
            Some(h) => h.capture(site, layer, t),
            None => Ok(()),
        }
    }

    fn intervene(&mut self, layer: usize, x: &mut Tensor, hidden: usize) -> Result<bool> {
        match self.as_deref_mut() {
            Some(h) => h.intervene(layer, x, hidden),
            None => Ok(false),
        }
    }

    fn touches(&self, site: Site, layer: usize) -> bool {
        self.as_deref().is_some_and(|h| h.wants(site, layer) || h.patches(site, layer))
    }

    fn patch(&mut self, site: Site, layer: usize, t: &mut Tensor) -> Result<bool> {
        match self.as_deref() {
            Some(h) => h.patch_site(site, layer, t),
            None => Ok(false),
        }
    }
}

/// Whether `dtype` holds every value of `w` exactly (bit for bit: a 16-bit dtype where rounding to it
/// changes none of them).
fn holds_exactly(dtype: DType, w: &[f32]) -> bool {
    dtype.is_float() && w.iter().all(|&v| dtype.rounded(v).to_bits() == v.to_bits())
}

/// `n` elements of `E`, element i being `mean + scale * pool[(start + i) % pool.len()]` rounded to
/// `E`, as little-endian bytes at the start of `buf` (grown to fit, kept from tensor to tensor):
/// `Llama::random`'s weights, made on every core (on one, an 8B model's 16 GB took longer than the
/// GPU bench that loads it), the same values whatever the split.
fn pooled<'b, E: highrise_core::Element>(buf: &'b mut Vec<u8>, pool: &[f32], start: usize, n: usize, scale: f32, mean: f32) -> &'b [u8] {
    let size = std::mem::size_of::<E>();
    if buf.len() < n * size {
        buf.resize(n * size, 0);
    }
    let out = &mut buf[..n * size];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    // Whole elements per thread, at least 64 Ki of them (small tensors stay on one thread).
    let per = n.div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (part, chunk) in out.chunks_mut(per * size).enumerate() {
            s.spawn(move || {
                let mut j = (start + part * per) % pool.len();
                for dst in chunk.chunks_exact_mut(size) {
                    let e = E::from_f32(mean + scale * pool[j]);
                    // SAFETY: E is f32, f16 or bf16: plain data of `size` bytes.
                    dst.copy_from_slice(unsafe { std::slice::from_raw_parts(&e as *const E as *const u8, size) });
                    j = if j + 1 == pool.len() { 0 } else { j + 1 };
                }
            });
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A norm weight narrows to a 16-bit dtype only where every value survives the round trip.
    #[test]
    fn only_exactly_held_values_narrow() {
        let bf16_values = [1.0f32, -0.5, 0.0078125, 3.140625, 0.0];
        assert!(holds_exactly(DType::BF16, &bf16_values) && holds_exactly(DType::F16, &bf16_values));
        assert!(!holds_exactly(DType::BF16, &[1.0, 1.0 + 1.0 / 1024.0]), "f16's precision, not bf16's");
        assert!(holds_exactly(DType::F16, &[1.0, 1.0 + 1.0 / 1024.0]));
        assert!(!holds_exactly(DType::F16, &[1.0e-9]) && !holds_exactly(DType::F16, &[70000.0]), "outside f16's range");
        assert!(!holds_exactly(DType::BF16, &[0.1]) && !holds_exactly(DType::BF16, &[f32::from_bits(0x7fc0_0001)]), "a NaN's payload too");
        assert!(holds_exactly(DType::F32, &[0.1]));
    }

    /// Split across threads or not, from a start near the pool's end or not, every element is the
    /// formula's (`Llama::random`'s weights do not depend on the machine's cores).
    #[test]
    fn pooled_weights_follow_the_pool_across_threads_and_wraps() {
        let pool: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut buf = Vec::new();
        for (start, n) in [(990usize, 200_000usize), (0, 10), (500, 1 << 17)] {
            let want: Vec<half::bf16> = (0..n).map(|i| half::bf16::from_f32(1.0 + 0.5 * pool[(start + i) % pool.len()])).collect();
            let got = pooled::<half::bf16>(&mut buf, &pool, start, n, 0.5, 1.0);
            assert_eq!(got.len(), 2 * n);
            let got: Vec<half::bf16> = got.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]])).collect();
            assert_eq!(got, want, "start {start}, {n} elements");
        }
        // A shorter tensor after a longer one reads only its own bytes.
        assert_eq!(pooled::<f32>(&mut buf, &pool, 3, 2, 1.0, 0.0), [pool[3].to_le_bytes(), pool[4].to_le_bytes()].concat());
    }
}
