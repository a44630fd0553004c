//! Where a model's weights come from: a GGUF file or a HuggingFace directory (`config.json`,
//! `*.safetensors`, possibly sharded, `tokenizer.json`). Both are memory-mapped and answer the same
//! questions: the config, the tokenizer, and each tensor by its HF name.

use std::any::Any;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use highrise_core::quant::dequantize;
use highrise_core::DType;
use memmap2::Mmap;

use crate::gguf::Gguf;
use crate::{Error, ModelConfig, Result, Tokenizer};

/// A tensor as the file holds it.
pub struct FileTensor<'a> {
    pub dtype: DType,
    pub dims: Vec<usize>,
    /// Borrowed from the mapping, or owned when the layout had to change (GGUF's q/k row order).
    pub data: Cow<'a, [u8]>,
    /// Keeps the mapping alive for tensors that point into it.
    pub owner: Arc<dyn Any + Send + Sync>,
    /// Where the tensor lies in the mapping (`owner`).
    pub span: std::ops::Range<usize>,
}

impl<'a> FileTensor<'a> {
    /// Rows `rows` of a 2-D tensor (whole rows: any dtype, quantized blocks included), or elements of
    /// a float vector, as a tensor of its own: one part of a fused projection (or of its bias).
    pub fn rows(self, rows: std::ops::Range<usize>) -> std::result::Result<FileTensor<'a>, String> {
        let (_, row_bytes) = self.row_layout(&rows)?;
        let (a, b) = (rows.start * row_bytes, rows.end * row_bytes);
        let data = match self.data {
            Cow::Borrowed(d) => Cow::Borrowed(&d[a..b]),
            Cow::Owned(d) => Cow::Owned(d[a..b].to_vec()),
        };
        let span = self.span.start + a..self.span.start + b;
        let dims = [vec![rows.len()], self.dims[1..].to_vec()].concat();
        Ok(FileTensor { dtype: self.dtype, dims, data, owner: self.owner, span })
    }

    /// The rows of each range in turn, as one tensor (a copy): GPT-NeoX's q, k or v, whose rows its
    /// fused projection interleaves head by head.
    pub fn gather_rows(self, ranges: &[std::ops::Range<usize>]) -> std::result::Result<FileTensor<'a>, String> {
        let mut data = Vec::new();
        let mut rows = 0;
        for r in ranges {
            let (_, row_bytes) = self.row_layout(r)?;
            data.extend_from_slice(&self.data[r.start * row_bytes..r.end * row_bytes]);
            rows += r.len();
        }
        let dims = [vec![rows], self.dims[1..].to_vec()].concat();
        Ok(FileTensor { dtype: self.dtype, dims, data: Cow::Owned(data), owner: self.owner, span: 0..0 })
    }

    /// Columns `cols` of a float matrix [rows, cols], transposed to [cols.len(), rows] (a copy):
    /// GPT-2's Conv1D weights keep [in, out], the projections' transpose, q, k and v side by side.
    pub fn columns_transposed(self, cols: std::ops::Range<usize>) -> std::result::Result<FileTensor<'a>, String> {
        let elt = match self.dtype {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            d => return Err(format!("a {d} matrix cannot be transposed (float only)")),
        };
        let (r, c) = match self.dims[..] {
            [r, c] if cols.end <= c && cols.start <= cols.end && r.checked_mul(c).and_then(|n| n.checked_mul(elt)) == Some(self.data.len()) => (r, c),
            _ => return Err(format!("columns {cols:?} of a tensor of shape {:?}", self.dims)),
        };
        let mut data = vec![0u8; cols.len() * r * elt];
        for (j, col) in cols.clone().enumerate() {
            for i in 0..r {
                let src = (i * c + col) * elt;
                data[(j * r + i) * elt..(j * r + i + 1) * elt].copy_from_slice(&self.data[src..src + elt]);
            }
        }
        Ok(FileTensor { dtype: self.dtype, dims: vec![cols.len(), r], data: Cow::Owned(data), owner: self.owner, span: 0..0 })
    }

    /// The first dim's length and the bytes of one row (of a vector, one element) for taking `rows`.
    fn row_layout(&self, rows: &std::ops::Range<usize>) -> std::result::Result<(usize, usize), String> {
        let n = self.dims.first().copied().unwrap_or(0);
        let vector = self.dims.len() == 1 && self.dtype.is_float();
        if !(self.dims.len() == 2 || vector) || rows.end > n || rows.start > rows.end || n == 0 || self.data.len() % n != 0 {
            return Err(format!("rows {rows:?} of a {} tensor of shape {:?}", self.dtype, self.dims));
        }
        Ok((n, self.data.len() / n))
    }

    /// Matrix `e` of a 3-D tensor [E, rows, cols] (whole rows: any dtype), as a tensor of its own: one
    /// expert of a mixture whose experts the file keeps stacked (llama.cpp's `ffn_*_exps`).
    pub fn expert(self, e: usize) -> std::result::Result<FileTensor<'a>, String> {
        let (n, at) = (self.dims.first().copied().unwrap_or(0), self.dims.get(1..).unwrap_or_default().to_vec());
        if self.dims.len() != 3 || e >= n || self.data.len() % n != 0 {
            return Err(format!("expert {e} of a tensor of shape {:?}", self.dims));
        }
        let bytes = self.data.len() / n;
        let (a, b) = (e * bytes, (e + 1) * bytes);
        let data = match self.data {
            Cow::Borrowed(d) => Cow::Borrowed(&d[a..b]),
            Cow::Owned(d) => Cow::Owned(d[a..b].to_vec()),
        };
        let span = self.span.start + a..self.span.start + b;
        Ok(FileTensor { dtype: self.dtype, dims: at, data, owner: self.owner, span })
    }

    /// Lets the memory go that the file mapping holds for this tensor, once it has been read into
    /// a copy (converted, or laid out for the backend) and its bytes in the file are not read
    /// again: without this, every converted tensor would be in memory twice.
    pub fn release(&self) {
        if let Some(mmap) = (*self.owner).downcast_ref::<Mmap>() {
            // SAFETY: the mapping is read-only and never written through, so dropping its pages
            // loses nothing: a later read (a neighbouring tensor on a shared page) fetches them from
            // the file again. It is only advice; an error changes nothing but the memory held.
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.span.start, self.span.len())
            };
        }
    }
}

pub enum Source {
    Gguf { gguf: Gguf, config: ModelConfig },
    Hf(HfDir),
}

impl Source {
    /// Opens a GGUF file or a HF model directory.
    pub fn open(path: &Path) -> Result<Source> {
        if path.is_dir() {
            return Ok(Source::Hf(HfDir::open(path)?));
        }
        let gguf = Gguf::open(path)?;
        let config = ModelConfig::from_gguf(&gguf)?;
        Ok(Source::Gguf { gguf, config })
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Source::Gguf { config, .. } => config,
            Source::Hf(h) => &h.config,
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Source::Gguf { gguf, .. } => &gguf.path,
            Source::Hf(h) => &h.dir,
        }
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            Source::Gguf { gguf, .. } => Tokenizer::from_gguf(gguf),
            Source::Hf(h) => Tokenizer::from_dir(&h.dir),
        }
    }

    /// The file a tensor lives in, for error messages.
    pub fn file_of(&self, name: &str) -> PathBuf {
        match self {
            Source::Gguf { gguf, .. } => gguf.path.clone(),
            Source::Hf(h) => h.index.get(name).map_or_else(|| h.dir.clone(), |&i| h.files[i].0.clone()),
        }
    }

    /// The HF names of every tensor the source holds (GGUF tensors highrise has no use for, such as
    /// precomputed RoPE tables, are left out; experts a GGUF file stacks, one name per expert, as
    /// the family's HF checkpoints name them).
    pub fn tensor_names(&self) -> Vec<String> {
        match self {
            Source::Gguf { gguf, config } => gguf
                .tensors
                .iter()
                .filter_map(|t| Some((t, rename(&t.name, false, config)?)))
                .flat_map(|(t, name)| hf_names(&name, t.dims.first().copied().unwrap_or(0), config))
                .flat_map(|name| family_names(&name, config))
                .collect(),
            Source::Hf(h) => h.index.keys().cloned().collect(),
        }
    }

    /// The tensor with HF name `name`, or `None` if the file has no such tensor. A projection that
    /// the file keeps fused with others (Phi-3's `qkv_proj` and `gate_up_proj`) is its rows of the
    /// fused tensor. A mixture's router and experts go by Qwen 3 MoE's names
    /// (`mlp.gate`, `mlp.experts.{e}.gate_proj`...), found under Mixtral's (`block_sparse_moe.gate`,
    /// `block_sparse_moe.experts.{e}.w1`...) or Granite MoE's (its router, rows of its fused
    /// `input_linear`), or as matrix e of the experts a GGUF file stacks; Granite MoE's fused
    /// tensors are made from a GGUF's stacks.
    pub fn tensor(&self, name: &str) -> Result<Option<FileTensor<'_>>> {
        // A part its family names otherwise, under the family's name first: GLM-4-0414's checkpoint
        // holds a `post_attention_layernorm` too, but as the MLP's norm before (a Llama's is).
        if !matches!(self, Source::Gguf { .. }) && family_renames(name, self.config()) {
            if let Some(t) = self.family_tensor(name)? {
                return Ok(Some(t));
            }
        }
        if let Some(t) = self.stored(name)? {
            return Ok(Some(t));
        }
        // GPT-2's, GPT-NeoX's, StarCoder 2's and Phi's checkpoints name theirs otherwise.
        if let Some(t) = self.family_tensor(name)? {
            return Ok(Some(t));
        }
        // Granite MoE's experts, all in one tensor per layer, from llama.cpp's stacks.
        if let Some(t) = self.granite_stack(name)? {
            return Ok(Some(t));
        }
        // A mixture's tensor under any family's name (Qwen's from here on), then stacked.
        let qwen = qwen_name(name);
        let name = qwen.as_deref().unwrap_or(name);
        for alias in [qwen.clone(), mixtral_name(name), granite_router(name)].into_iter().flatten() {
            if let Some(t) = self.stored(&alias)? {
                return Ok(Some(t));
            }
        }
        for (stacked, e, rows) in stacked_expert(name, self.config()) {
            if let Some(t) = self.stored(&stacked)? {
                let t = t.expert(e).and_then(|t| match rows {
                    Some(r) => t.rows(r),
                    None => Ok(t),
                });
                return t.map(Some).map_err(|err| Error::tensor(self.path(), &stacked, err));
            }
        }
        let Some((fused, rows)) = fused_part(name, self.config()) else { return Ok(None) };
        match self.stored(&fused)? {
            Some(t) => t.rows(rows).map(Some).map_err(|e| Error::tensor(self.path(), &fused, e)),
            None => Ok(None),
        }
    }

    /// Granite MoE's `block_sparse_moe.input_linear` [E, 2I, H] (each expert's gate rows, then its
    /// up rows) and `output_linear` [E, H, I] from a file that stacks each projection apart
    /// (llama.cpp's `ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`).
    fn granite_stack(&self, name: &str) -> Result<Option<FileTensor<'_>>> {
        let Some((layer, part)) = name.split_once(".block_sparse_moe.") else { return Ok(None) };
        let stack = |proj: &str| self.stored(&format!("{layer}.mlp.experts.{proj}.weight"));
        match part {
            "output_linear.weight" => stack("down_proj"),
            "input_linear.weight" => {
                let (Some(gate), Some(up)) = (stack("gate_proj")?, stack("up_proj")?) else { return Ok(None) };
                let e = gate.dims[0];
                if gate.dims.len() != 3 || gate.dims != up.dims || gate.dtype != up.dtype || e == 0 || gate.data.len() % e != 0 {
                    return Err(Error::tensor(self.path(), name, format!("gate {:?} and up {:?} experts do not pair", gate.dims, up.dims)));
                }
                let per = gate.data.len() / e;
                let data: Vec<u8> = (0..e).flat_map(|i| [&gate.data[i * per..(i + 1) * per], &up.data[i * per..(i + 1) * per]].concat()).collect();
                let dims = vec![e, 2 * gate.dims[1], gate.dims[2]];
                Ok(Some(FileTensor { dtype: gate.dtype, dims, data: Cow::Owned(data), owner: gate.owner, span: 0..0 }))
            }
            _ => Ok(None),
        }
    }

    /// A tensor, named as a Llama names it (`model.layers.{l}.self_attn.q_proj.weight`...), in a
    /// checkpoint of a family that names and lays out its own otherwise (`FAMILY_PARTS`): GPT-NeoX's
    /// q, k and v as their rows of `query_key_value` (interleaved head by head: each head's q rows,
    /// its k rows, its v rows); GPT-2's (`transformer.` or no prefix) Conv1D weights transposed, q,
    /// k and v as columns of `c_attn`. And the other way, a GGUF file's tensor (which llama.cpp
    /// names and lays out as a Llama's) under the checkpoint's name, laid out as the checkpoint has
    /// it: what `tensor_names` lists for such a family.
    fn family_tensor(&self, name: &str) -> Result<Option<FileTensor<'_>>> {
        let c = self.config();
        if let (Source::Gguf { .. }, Some((ours, layout))) = (self, llama_name(name, c)) {
            let Some(t) = self.tensor(&ours)? else { return Ok(None) };
            let t = match layout {
                _ if t.dims.len() == 1 && layout != Layout::KvGrouped => Ok(t),
                Layout::Same => Ok(t),
                Layout::Conv1D => {
                    let all = 0..t.dims.get(1).copied().unwrap_or(0);
                    t.columns_transposed(all)
                }
                // [q; k; v] back to key/value group by group.
                Layout::KvGrouped => {
                    let (d, groups, per) = (c.head_dim(), c.kv_heads(), c.num_attention_heads / c.kv_heads());
                    let (q, kv) = (c.num_attention_heads * d, groups * d);
                    t.gather_rows(&(0..groups).flat_map(|g| [g * per * d..(g + 1) * per * d, q + g * d..q + (g + 1) * d, q + kv + g * d..q + kv + (g + 1) * d]).collect::<Vec<_>>())
                }
            };
            return t.map(Some).map_err(|e| Error::tensor(self.path(), &ours, e));
        }
        let Some((stored, pick)) = family_path(name, c) else { return Ok(None) };
        for prefix in saved_prefix(c).into_iter().chain([""]) {
            let full = format!("{prefix}{stored}");
            let Some(t) = self.stored(&full)? else { continue };
            let picked = match pick.clone() {
                Pick::All => Ok(t),
                Pick::Gather(rs) => t.gather_rows(&rs),
                Pick::Transposed(cols) if t.dims.len() == 1 => match cols {
                    Some(cols) => t.rows(cols),
                    None => Ok(t),
                },
                Pick::Transposed(cols) => {
                    let all = 0..t.dims.get(1).copied().unwrap_or(0);
                    t.columns_transposed(cols.unwrap_or(all))
                }
            };
            return picked.map(Some).map_err(|e| Error::tensor(self.path(), &full, e));
        }
        Ok(None)
    }

    fn stored(&self, name: &str) -> Result<Option<FileTensor<'_>>> {
        match self {
            Source::Gguf { gguf, config } => gguf_tensor(gguf, config, name),
            Source::Hf(h) => h.tensor(name),
        }
    }
}

/// What part of a family's stored tensor a Llama-named tensor is (see `family_path`).
#[derive(Clone)]
enum Pick {
    All,
    Gather(Vec<std::ops::Range<usize>>),
    /// Columns of a Conv1D weight [in, out] (all where None), transposed; of its bias, elements.
    Transposed(Option<std::ops::Range<usize>>),
}

/// How a family lays out a tensor it names otherwise than a Llama.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    Same,
    /// GPT-2's Conv1D: [in, out], the transpose of a projection's weight.
    Conv1D,
    /// Fused q, k, v by key/value group: each group's q heads (query heads / key-value heads of
    /// them), then its k head, then its v head. GPT-NeoX's (a group a head), Falcon's (7B: one
    /// group, multi-query; 40B: one a key/value head).
    KvGrouped,
}

/// The families that name their tensors otherwise than a Llama: (family, its layers' stem).
const FAMILY_STEMS: [(&str, &str); 13] = [
    ("gpt2", "h"),
    ("gpt_neox", "gpt_neox.layers"),
    ("starcoder2", "model.layers"),
    ("phi", "model.layers"),
    ("opt", "decoder.layers"),
    ("gptj", "h"),
    ("falcon", "h"),
    ("bloom", "h"),
    ("mpt", "blocks"),
    ("gpt_bigcode", "h"),
    ("glm4", "model.layers"),
    ("vaultgemma", "model.layers"),
    ("nanochat", "model.layers"),
];

/// The prefix transformers saves a family's base model under in a causal LM's checkpoint, where
/// the checkpoints people hold may lack it (GPT-2's and OPT's were saved from the base model):
/// read with or without it, written with it.
fn saved_prefix(c: &ModelConfig) -> Option<&'static str> {
    match c.model_type.as_str() {
        "gpt2" | "gptj" | "falcon" | "bloom" | "mpt" | "gpt_bigcode" => Some("transformer."),
        "opt" => Some("model."),
        _ => None,
    }
}

/// Their whole-model tensors: (family, a Llama's name, theirs) by prefix of the name.
const FAMILY_GLOBALS: [(&str, &str, &str); 22] = [
    ("gpt2", "model.embed_tokens.", "wte."),
    ("gpt2", "model.embed_positions.", "wpe."),
    ("gpt2", "model.norm.", "ln_f."),
    ("gpt_neox", "model.embed_tokens.", "gpt_neox.embed_in."),
    ("gpt_neox", "model.norm.", "gpt_neox.final_layer_norm."),
    ("gpt_neox", "lm_head.", "embed_out."),
    ("phi", "model.norm.", "model.final_layernorm."),
    ("opt", "model.embed_tokens.", "decoder.embed_tokens."),
    ("opt", "model.embed_positions.", "decoder.embed_positions."),
    ("opt", "model.norm.", "decoder.final_layer_norm."),
    ("gptj", "model.embed_tokens.", "wte."),
    ("gptj", "model.norm.", "ln_f."),
    ("falcon", "model.embed_tokens.", "word_embeddings."),
    ("falcon", "model.norm.", "ln_f."),
    ("bloom", "model.embed_tokens.", "word_embeddings."),
    ("bloom", "model.embed_norm.", "word_embeddings_layernorm."),
    ("bloom", "model.norm.", "ln_f."),
    ("mpt", "model.embed_tokens.", "wte."),
    ("mpt", "model.norm.", "norm_f."),
    ("gpt_bigcode", "model.embed_tokens.", "wte."),
    ("gpt_bigcode", "model.embed_positions.", "wpe."),
    ("gpt_bigcode", "model.norm.", "ln_f."),
];

/// Their layers' tensors a Llama names otherwise: (family, a Llama's part, theirs, their layout).
/// q, k and v are rows of the fused `self_attn.qkv_proj` (as llama.cpp's `attn_qkv` holds them).
const FAMILY_PARTS: [(&str, &str, &str, Layout); 55] = [
    ("starcoder2", "mlp.up_proj", "mlp.c_fc", Layout::Same),
    ("starcoder2", "mlp.down_proj", "mlp.c_proj", Layout::Same),
    ("phi", "self_attn.o_proj", "self_attn.dense", Layout::Same),
    ("phi", "mlp.up_proj", "mlp.fc1", Layout::Same),
    ("phi", "mlp.down_proj", "mlp.fc2", Layout::Same),
    ("gpt_neox", "self_attn.qkv_proj", "attention.query_key_value", Layout::KvGrouped),
    ("gpt_neox", "self_attn.o_proj", "attention.dense", Layout::Same),
    ("gpt_neox", "mlp.up_proj", "mlp.dense_h_to_4h", Layout::Same),
    ("gpt_neox", "mlp.down_proj", "mlp.dense_4h_to_h", Layout::Same),
    ("gpt2", "input_layernorm", "ln_1", Layout::Same),
    ("gpt2", "post_attention_layernorm", "ln_2", Layout::Same),
    ("gpt2", "self_attn.qkv_proj", "attn.c_attn", Layout::Conv1D),
    ("gpt2", "self_attn.o_proj", "attn.c_proj", Layout::Conv1D),
    ("gpt2", "mlp.up_proj", "mlp.c_fc", Layout::Conv1D),
    ("gpt2", "mlp.down_proj", "mlp.c_proj", Layout::Conv1D),
    ("opt", "input_layernorm", "self_attn_layer_norm", Layout::Same),
    ("opt", "post_attention_layernorm", "final_layer_norm", Layout::Same),
    ("opt", "self_attn.o_proj", "self_attn.out_proj", Layout::Same),
    ("opt", "mlp.up_proj", "fc1", Layout::Same),
    ("opt", "mlp.down_proj", "fc2", Layout::Same),
    ("gptj", "input_layernorm", "ln_1", Layout::Same),
    ("gptj", "self_attn.q_proj", "attn.q_proj", Layout::Same),
    ("gptj", "self_attn.k_proj", "attn.k_proj", Layout::Same),
    ("gptj", "self_attn.v_proj", "attn.v_proj", Layout::Same),
    ("gptj", "self_attn.o_proj", "attn.out_proj", Layout::Same),
    ("gptj", "mlp.up_proj", "mlp.fc_in", Layout::Same),
    ("gptj", "mlp.down_proj", "mlp.fc_out", Layout::Same),
    ("falcon", "self_attn.qkv_proj", "self_attention.query_key_value", Layout::KvGrouped),
    ("falcon", "self_attn.o_proj", "self_attention.dense", Layout::Same),
    ("falcon", "mlp.up_proj", "mlp.dense_h_to_4h", Layout::Same),
    ("falcon", "mlp.down_proj", "mlp.dense_4h_to_h", Layout::Same),
    // Only where Falcon has a norm for each (see `family_parts`); the 7B's keep a Llama's names.
    ("falcon", "input_layernorm", "ln_attn", Layout::Same),
    ("falcon", "post_attention_layernorm", "ln_mlp", Layout::Same),
    // Bloom's q, k and v head by head (a group a head); its norms keep a Llama's names.
    ("bloom", "self_attn.qkv_proj", "self_attention.query_key_value", Layout::KvGrouped),
    ("bloom", "self_attn.o_proj", "self_attention.dense", Layout::Same),
    ("bloom", "mlp.up_proj", "mlp.dense_h_to_4h", Layout::Same),
    ("bloom", "mlp.down_proj", "mlp.dense_4h_to_h", Layout::Same),
    // MPT's q, k and v one after another, as llama.cpp's attn_qkv.
    ("mpt", "input_layernorm", "norm_1", Layout::Same),
    ("mpt", "post_attention_layernorm", "norm_2", Layout::Same),
    ("mpt", "self_attn.qkv_proj", "attn.Wqkv", Layout::Same),
    ("mpt", "self_attn.o_proj", "attn.out_proj", Layout::Same),
    ("mpt", "mlp.up_proj", "ffn.up_proj", Layout::Same),
    ("mpt", "mlp.down_proj", "ffn.down_proj", Layout::Same),
    // GPT-BigCode: GPT-2's names, weights as Linear's; q, k, v by group (multi-query: every q head,
    // then the one k and v; else head by head).
    ("gpt_bigcode", "input_layernorm", "ln_1", Layout::Same),
    ("gpt_bigcode", "post_attention_layernorm", "ln_2", Layout::Same),
    ("gpt_bigcode", "self_attn.qkv_proj", "attn.c_attn", Layout::KvGrouped),
    ("gpt_bigcode", "self_attn.o_proj", "attn.c_proj", Layout::Same),
    ("gpt_bigcode", "mlp.up_proj", "mlp.c_fc", Layout::Same),
    ("gpt_bigcode", "mlp.down_proj", "mlp.c_proj", Layout::Same),
    // GLM-4-0414's four norms: Gemma 2's, under names of its own; its post_attention_layernorm is the
    // MLP's norm before, as a Llama's is (where Gemma 2's is attention's after).
    ("glm4", "post_attention_layernorm", "post_self_attn_layernorm", Layout::Same),
    ("glm4", "pre_feedforward_layernorm", "post_attention_layernorm", Layout::Same),
    ("glm4", "post_feedforward_layernorm", "post_mlp_layernorm", Layout::Same),
    // VaultGemma's MLP norm keeps Gemma 2's name, without Gemma 2's norms after the blocks.
    ("vaultgemma", "post_attention_layernorm", "pre_feedforward_layernorm", Layout::Same),
    ("nanochat", "mlp.up_proj", "mlp.fc1", Layout::Same),
    ("nanochat", "mlp.down_proj", "mlp.fc2", Layout::Same),
];

/// `FAMILY_PARTS` of `c`'s family as its checkpoints have them: Falcon's norms are `ln_attn` and
/// `ln_mlp` where attention and the MLP each have one side by side (the 40B's layout), and keep a
/// Llama's names otherwise (the 7B's one `input_layernorm`; sequential, two).
fn family_parts(c: &ModelConfig) -> impl Iterator<Item = (&'static str, &'static str, &'static str, Layout)> + '_ {
    let falcon_two = c.falcon_new() && !c.shared_norm();
    FAMILY_PARTS.into_iter().filter(move |(f, _, theirs, _)| *f == c.model_type && (*f != "falcon" || falcon_two || !theirs.starts_with("ln_")))
}

/// Whether `name` (as a Llama names it) is a layer's part `FAMILY_PARTS` gives another name in
/// `c`'s family.
fn family_renames(name: &str, c: &ModelConfig) -> bool {
    let part = name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')).and_then(|(_, rest)| rest.rsplit_once('.')).map(|(p, _)| p);
    part.is_some_and(|part| family_parts(c).any(|(_, ours, _, _)| ours == part))
}

/// Where a tensor named as a Llama names it lies in a GPT-2, GPT-NeoX, StarCoder 2, Phi or OPT
/// checkpoint: the stored name (without its optional `saved_prefix`), and which part.
fn family_path(name: &str, c: &ModelConfig) -> Option<(String, Pick)> {
    let family = c.model_type.as_str();
    let (_, stem) = FAMILY_STEMS.into_iter().find(|(f, _)| *f == family)?;
    for (f, ours, theirs) in FAMILY_GLOBALS {
        match name.strip_prefix(ours) {
            Some(rest) if f == family => return Some((format!("{theirs}{rest}"), Pick::All)),
            _ => {}
        }
    }
    let (layer, rest) = name.strip_prefix("model.layers.")?.split_once('.')?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let (h, d, heads) = (c.hidden_size, c.head_dim(), c.num_attention_heads);
    let qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].iter().position(|p| *p == part);
    let lookup = |p: &str| family_parts(c).find(|(_, ours, _, _)| *ours == p);
    let (theirs, pick) = match (qkv, qkv.and_then(|_| lookup("self_attn.qkv_proj")), lookup(part)) {
        (Some(j), Some((_, _, theirs, Layout::Conv1D)), _) => (theirs, Pick::Transposed(Some(j * h..(j + 1) * h))),
        // q's rows, then k's, then v's (MPT's).
        (Some(j), Some((_, _, theirs, Layout::Same)), _) => (theirs, Pick::Gather(vec![qkv_rows(c)[j].clone()])),
        // By key/value group: its q heads, its k, its v (`Layout::KvGrouped`).
        (Some(j), Some((_, _, theirs, _)), _) => {
            let (groups, per) = (c.kv_heads(), heads / c.kv_heads().max(1));
            let rows = |g: usize| match j {
                0 => (0..per).map(|i| (g * (per + 2) + i) * d..(g * (per + 2) + i + 1) * d).collect::<Vec<_>>(),
                _ => vec![(g * (per + 2) + per + j - 1) * d..(g * (per + 2) + per + j) * d],
            };
            (theirs, Pick::Gather((0..groups).flat_map(rows).collect()))
        }
        (_, _, Some((_, _, theirs, Layout::Conv1D))) => (theirs, Pick::Transposed(None)),
        (_, _, Some((_, _, theirs, _))) => (theirs, Pick::All),
        (_, _, None) if stem != "model.layers" => (part, Pick::All),
        _ => return None,
    };
    Some((format!("{stem}.{layer}.{theirs}.{suffix}"), pick))
}

/// The checkpoint's name for a tensor named as a Llama names it (what `rename` gives a GGUF file's
/// tensor), in a family that names its own otherwise; with its `saved_prefix` (GPT-2's
/// `transformer.`), as transformers saves it. Phi's and StarCoder 2's fused q/k/v (old GGUF files) are listed as the
/// three they are.
fn family_names(name: &str, c: &ModelConfig) -> Vec<String> {
    let family = c.model_type.as_str();
    if let ("phi" | "starcoder2", Some(stem)) = (family, name.strip_suffix(".self_attn.qkv_proj.weight").or(name.strip_suffix(".self_attn.qkv_proj.bias"))) {
        let suffix = name.rsplit('.').next().unwrap_or("weight");
        return ["q_proj", "k_proj", "v_proj"].map(|p| family_names(&format!("{stem}.self_attn.{p}.{suffix}"), c)).concat();
    }
    let theirs = match (family, name.strip_prefix("model.layers.").and_then(|r| r.split_once('.'))) {
        (_, Some((layer, rest))) => FAMILY_STEMS.into_iter().find(|(f, _)| *f == family).and_then(|(_, stem)| {
            let (part, suffix) = rest.rsplit_once('.')?;
            let theirs = family_parts(c).find(|(_, ours, _, _)| *ours == part).map_or(part, |p| p.2);
            Some(format!("{stem}.{layer}.{theirs}.{suffix}"))
        }),
        _ => FAMILY_GLOBALS
            .into_iter()
            .find(|(f, ours, _)| *f == family && name.starts_with(ours))
            .map(|(_, ours, theirs)| format!("{theirs}{}", &name[ours.len()..])),
    };
    match (theirs, saved_prefix(c)) {
        (Some(theirs), Some(prefix)) => vec![format!("{prefix}{theirs}")],
        (theirs, _) => vec![theirs.unwrap_or_else(|| name.to_string())],
    }
}

/// `family_names`' inverse for one tensor: a Llama's name for a checkpoint's tensor of a family
/// that names its own otherwise, and how the checkpoint lays it out (None: the name is not one of
/// theirs, or is a Llama's too).
fn llama_name(name: &str, c: &ModelConfig) -> Option<(String, Layout)> {
    let family = c.model_type.as_str();
    let (_, stem) = FAMILY_STEMS.into_iter().find(|(f, _)| *f == family)?;
    let name = saved_prefix(c).and_then(|p| name.strip_prefix(p)).unwrap_or(name);
    for (f, ours, theirs) in FAMILY_GLOBALS {
        match name.strip_prefix(theirs) {
            Some(rest) if f == family => return Some((format!("{ours}{rest}"), Layout::Same)),
            _ => {}
        }
    }
    let (layer, rest) = name.strip_prefix(stem)?.strip_prefix('.')?.split_once('.')?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let (ours, layout) = match family_parts(c).find(|(_, _, theirs, _)| *theirs == part) {
        Some((_, ours, _, layout)) => (ours, layout),
        None if stem != "model.layers" => (part, Layout::Same),
        None => return None,
    };
    Some((format!("model.layers.{layer}.{ours}.{suffix}"), layout))
}

/// Each expert's projections as Qwen 3 MoE and Mixtral name them.
const MIXTRAL_PROJ: [(&str, &str); 3] = [("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")];

/// Mixtral's name for a mixture's tensor as Qwen 3 MoE names it: the router `block_sparse_moe.gate`,
/// an expert's gate, down and up projections `w1`, `w2`, `w3`.
fn mixtral_name(name: &str) -> Option<String> {
    let (layer, rest) = name.split_once(".mlp.")?;
    if rest == "gate.weight" {
        return Some(format!("{layer}.block_sparse_moe.gate.weight"));
    }
    let (e, proj) = rest.strip_prefix("experts.")?.split_once('.')?;
    let (_, w) = MIXTRAL_PROJ.into_iter().find(|(p, _)| proj.strip_suffix(".weight") == Some(p))?;
    Some(format!("{layer}.block_sparse_moe.experts.{e}.{w}.weight"))
}

/// Qwen 3 MoE's name for a tensor Mixtral names (`block_sparse_moe.gate`, `...experts.{e}.w1`):
/// `mixtral_name`'s inverse; and for Granite MoE's router (`block_sparse_moe.router.layer`).
fn qwen_name(name: &str) -> Option<String> {
    let (layer, rest) = name.split_once(".block_sparse_moe.")?;
    if rest == "gate.weight" || rest == "router.layer.weight" {
        return Some(format!("{layer}.mlp.gate.weight"));
    }
    let (e, w) = rest.strip_prefix("experts.")?.split_once('.')?;
    let (proj, _) = MIXTRAL_PROJ.into_iter().find(|(_, m)| w.strip_suffix(".weight") == Some(m))?;
    Some(format!("{layer}.mlp.experts.{e}.{proj}.weight"))
}

/// Granite MoE's name for a mixture's router as Qwen 3 MoE names it.
fn granite_router(name: &str) -> Option<String> {
    let layer = name.strip_suffix(".mlp.gate.weight")?;
    Some(format!("{layer}.block_sparse_moe.router.layer.weight"))
}

/// A mixture's tensor (named as Qwen 3 MoE names it) as the family's HF checkpoints name it:
/// Mixtral's and Granite MoE's names for theirs, the name itself otherwise.
fn family_name(name: &str, config: &ModelConfig) -> String {
    match config.model_type.as_str() {
        "mixtral" => mixtral_name(name).unwrap_or_else(|| name.to_string()),
        "granitemoe" => granite_router(name).unwrap_or_else(|| name.to_string()),
        _ => name.to_string(),
    }
}

/// The HF names of the GGUF tensor `rename` calls `name` (its first dim `first`): a stack of
/// experts one name per expert as the family names them, or (Granite MoE, whose checkpoints keep
/// every expert in one tensor, gate and up fused) its fused tensors.
fn hf_names(name: &str, first: usize, config: &ModelConfig) -> Vec<String> {
    match (stacked_name(name), config.model_type == "granitemoe") {
        (Some((layer, "gate_proj.weight")), true) => vec![format!("{layer}.block_sparse_moe.input_linear.weight")],
        (Some((_, "up_proj.weight")), true) => vec![],
        (Some((layer, "down_proj.weight")), true) => vec![format!("{layer}.block_sparse_moe.output_linear.weight")],
        (Some((layer, proj)), _) => (0..first).map(|e| family_name(&format!("{layer}.mlp.experts.{e}.{proj}"), config)).collect(),
        (None, _) => vec![family_name(name, config)],
    }
}

/// (`model.layers.{l}`, `gate_proj.weight`) of the name `rename` gives a stacked expert tensor
/// (`model.layers.{l}.mlp.experts.gate_proj.weight`).
fn stacked_name(name: &str) -> Option<(&str, &str)> {
    let (layer, proj) = name.split_once(".mlp.experts.")?;
    (!proj.starts_with(|c: char| c.is_ascii_digit())).then_some((layer, proj))
}

/// Where expert e's projection may lie stacked [E, rows, cols] with the other experts': (tensor, e,
/// the projection's rows of the expert's matrix where it shares it), under the name `rename` gives
/// llama.cpp's `ffn_*_exps` (`mlp.experts.gate_proj` for `mlp.experts.{e}.gate_proj`), and for
/// Granite MoE under its checkpoints' (gate and up rows of `input_linear`, down `output_linear`).
type Stacked = (String, usize, Option<std::ops::Range<usize>>);
fn stacked_expert(name: &str, config: &ModelConfig) -> Vec<Stacked> {
    let Some((layer, rest)) = name.split_once(".mlp.experts.") else { return vec![] };
    let Some((Ok(e), proj)) = rest.split_once('.').map(|(e, p)| (e.parse::<usize>(), p)) else { return vec![] };
    let i = config.expert_intermediate_size();
    let granite = match (config.model_type.as_str(), proj) {
        ("granitemoe", "gate_proj.weight") => Some(("input_linear", Some(0..i))),
        ("granitemoe", "up_proj.weight") => Some(("input_linear", Some(i..2 * i))),
        ("granitemoe", "down_proj.weight") => Some(("output_linear", None)),
        _ => None,
    };
    let granite = granite.map(|(fused, rows)| (format!("{layer}.block_sparse_moe.{fused}.weight"), e, rows));
    granite.into_iter().chain([(format!("{layer}.mlp.experts.{proj}"), e, None)]).collect()
}

/// The rows of q, k and v in a `qkv_proj` that holds them one after another.
fn qkv_rows(c: &ModelConfig) -> [std::ops::Range<usize>; 3] {
    let (q, kv) = (c.num_attention_heads * c.head_dim(), c.kv_heads() * c.head_dim());
    [0..q, q..q + kv, q + kv..q + 2 * kv]
}

/// Where a projection (or its bias) lives when the file fuses it with others: Phi-3's `qkv_proj` (q,
/// k, v rows in turn; llama.cpp's `attn_qkv` of GPT-2, GPT-NeoX and Phi-2 alike) and `gate_up_proj`
/// (gate rows, then up), as HF names them.
fn fused_part(name: &str, c: &ModelConfig) -> Option<(String, std::ops::Range<usize>)> {
    let i = c.intermediate_size;
    let [q, k, v] = qkv_rows(c);
    let parts = [
        ("self_attn.q_proj", "self_attn.qkv_proj", q),
        ("self_attn.k_proj", "self_attn.qkv_proj", k),
        ("self_attn.v_proj", "self_attn.qkv_proj", v),
        ("mlp.gate_proj", "mlp.gate_up_proj", 0..i),
        ("mlp.up_proj", "mlp.gate_up_proj", i..2 * i),
    ];
    let (stem, suffix) = name.rsplit_once('.').filter(|(_, s)| matches!(*s, "weight" | "bias"))?;
    parts.into_iter().find_map(|(part, fused, rows)| {
        let layer = stem.strip_suffix(part)?.strip_suffix('.')?;
        Some((format!("{layer}.{fused}.{suffix}"), rows))
    })
}

/// HF tensor names and their GGUF names: whole names, then the per-layer parts
/// (`model.layers.{i}.<hf>.weight` is `blk.{i}.<gguf>.weight`; biases alike).
const GLOBAL_NAMES: [(&str, &str); 8] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    // GPT-2's learned positions; the LayerNorm families' biases.
    ("model.embed_positions.weight", "position_embd.weight"),
    ("model.norm.bias", "output_norm.bias"),
    ("lm_head.bias", "output.bias"),
    // Bloom's LayerNorm of the embeddings.
    ("model.embed_norm.weight", "token_embd_norm.weight"),
    ("model.embed_norm.bias", "token_embd_norm.bias"),
];
const LAYER_NAMES: [(&str, &str); 21] = [
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("self_attn.qkv_proj", "attn_qkv"),
    // After up_proj, so that ffn_up reads back as up_proj: only Phi-3 fuses gate and up into it.
    ("mlp.gate_up_proj", "ffn_up"),
    // A mixture of experts: the router, and each projection of every expert stacked [E, rows, cols].
    ("mlp.gate", "ffn_gate_inp"),
    ("mlp.experts.gate_proj", "ffn_gate_exps"),
    ("mlp.experts.up_proj", "ffn_up_exps"),
    ("mlp.experts.down_proj", "ffn_down_exps"),
    // Qwen 2 MoE's shared expert and its gate.
    ("mlp.shared_expert_gate", "ffn_gate_inp_shexp"),
    ("mlp.shared_expert.gate_proj", "ffn_gate_shexp"),
    ("mlp.shared_expert.up_proj", "ffn_up_shexp"),
    ("mlp.shared_expert.down_proj", "ffn_down_shexp"),
];

/// The norms of families with norms after attention and the MLP (Gemma, OLMo 2), where llama.cpp's
/// names differ from the other families' (searched first).
const POST_NORM_NAMES: [(&str, &str); 3] = [
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
];

/// Renames between the two vocabularies for a model of `config`; `to_gguf` picks the direction.
fn rename(name: &str, to_gguf: bool, config: &ModelConfig) -> Option<String> {
    let pick = |(hf, g): (&'static str, &'static str)| if to_gguf { (hf, g) } else { (g, hf) };
    if let Some((_, to)) = GLOBAL_NAMES.into_iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (from_prefix, to_prefix) = if to_gguf { ("model.layers.", "blk.") } else { ("blk.", "model.layers.") };
    let (layer, rest) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let (part, suffix) = rest.rsplit_once('.')?; // weight or bias
    if let Some(to) = old_expert_name(part, to_gguf) {
        return Some(format!("{to_prefix}{layer}.{to}.{suffix}"));
    }
    let family: &[(&str, &str)] = match config.model_type.as_str() {
        _ if config.post_norms() => &POST_NORM_NAMES,
        // llama.cpp's Falcon 40B: the MLP's norm beside attention's.
        "falcon" => &[("post_attention_layernorm", "attn_norm_2")],
        _ => &[],
    };
    let (_, to) = family.iter().copied().chain(LAYER_NAMES).map(pick).find(|(from, _)| *from == part)?;
    Some(format!("{to_prefix}{layer}.{to}.{suffix}"))
}

/// One expert's projection in the GGUF layout llama.cpp wrote Mixtral in before it stacked the
/// experts (`ffn_gate.{e}`, `ffn_down.{e}`, `ffn_up.{e}`: most Mixtral GGUF files of early 2024),
/// and HF's (`mlp.experts.{e}.gate_proj`...); `to_gguf` picks the direction.
fn old_expert_name(part: &str, to_gguf: bool) -> Option<String> {
    const PROJ: [(&str, &str); 3] = [("gate_proj", "ffn_gate"), ("down_proj", "ffn_down"), ("up_proj", "ffn_up")];
    if to_gguf {
        let (e, proj) = part.strip_prefix("mlp.experts.")?.split_once('.')?;
        let (_, g) = PROJ.into_iter().find(|(p, _)| *p == proj)?;
        return e.parse::<usize>().is_ok().then(|| format!("{g}.{e}"));
    }
    let (g, e) = part.split_once('.')?;
    let (p, _) = PROJ.into_iter().find(|(_, x)| *x == g)?;
    e.parse::<usize>().is_ok().then(|| format!("mlp.experts.{e}.{p}"))
}

/// The GGUF name of a HF tensor name, and whether its rows are in llama.cpp's RoPE order with that
/// many heads.
fn gguf_name(hf: &str, config: &ModelConfig) -> Option<(String, Option<usize>)> {
    // llama.cpp gives Phi-3's fused gate and up the name of up alone (ffn_up): up_proj has no
    // tensor of its own there, and is found as rows of gate_up_proj.
    if config.model_type == "phi3" && hf.ends_with(".mlp.up_proj.weight") {
        return None;
    }
    let g = rename(hf, true, config)?;
    // llama.cpp permutes q/k rows only for the llama architecture and those its converter derives
    // from it (SmolLM3, Mixtral, OLMo 1, Arcee), for its interleaved RoPE.
    let permuted = matches!(config.model_type.as_str(), "llama" | "smollm3" | "mixtral" | "olmo" | "arcee");
    let heads = match g.rsplit('.').nth(1) {
        Some("attn_q") if permuted => Some(config.num_attention_heads),
        Some("attn_k") if permuted => Some(config.kv_heads()),
        _ => None,
    };
    Some((g, heads))
}

fn gguf_tensor<'a>(gguf: &'a Gguf, config: &ModelConfig, name: &str) -> Result<Option<FileTensor<'a>>> {
    let Some((gname, heads)) = gguf_name(name, config) else { return Ok(None) };
    let Some(info) = gguf.tensor(&gname) else { return Ok(None) };
    let data = gguf.data(info);
    let owner: Arc<dyn Any + Send + Sync> = gguf.mmap().clone();
    let data = match heads {
        Some(h) => Cow::Owned(unpermute_rows(data, info.dims[0], h, 0).map_err(|e| Error::tensor(&gguf.path, &gname, e))?),
        None => Cow::Borrowed(data),
    };
    let span = info.start..info.start + info.len;
    // llama.cpp keeps Qwen 2 MoE's shared expert gate, HF's [1, H], as a vector [H].
    let dims = match info.dims[..] {
        [n] if gname.ends_with("ffn_gate_inp_shexp.weight") => vec![1, n],
        _ => info.dims.clone(),
    };
    if config.norm_plus_one() && name.ends_with("norm.weight") {
        // llama.cpp stores Gemma's and Nemotron's norms as the factor they multiply by, 1 + w; HF's
        // (and so the loader's, and `convert`'s) tensor is w.
        let mut w = vec![0f32; info.dims.iter().product()];
        dequantize(info.dtype, &data, &mut w).map_err(|e| Error::tensor(&gguf.path, &gname, e))?;
        let bytes = w.iter().flat_map(|v| (v - 1.0).to_le_bytes()).collect();
        return Ok(Some(FileTensor { dtype: DType::F32, dims: info.dims.clone(), data: Cow::Owned(bytes), owner, span }));
    }
    Ok(Some(FileTensor { dtype: info.dtype, dims, data, owner, span }))
}

/// Moves q's or k's rows from RoPE on adjacent pairs to RoPE on halves: within each head of D rows
/// whose first `rotary` rotate (all where 0), row `2i + j` goes to `j * rotary/2 + i` (HF's
/// rotate_half pairs row i with row i + rotary/2; llama.cpp's Llama files, GPT-J and Cohere pair
/// rows 2i and 2i + 1), the rest stay. Rows are moved whole, so this works on quantized rows and
/// on a bias (a row an element) too.
pub fn unpermute_rows(data: &[u8], rows: usize, heads: usize, rotary: usize) -> std::result::Result<Vec<u8>, String> {
    let d = if heads == 0 { 0 } else { rows / heads };
    let r = if rotary == 0 { d } else { rotary };
    if heads == 0 || rows == 0 || rows % heads != 0 || r % 2 != 0 || r > d || data.len() % rows != 0 {
        return Err(format!("cannot split {rows} rows into {heads} heads of {r} rotating rows in pairs"));
    }
    let row_bytes = data.len() / rows;
    let mut out = data.to_vec();
    for (from, to) in (0..heads).flat_map(|h| half_pair_rows(d, r).into_iter().enumerate().map(move |(to, from)| (h * d + from, h * d + to))) {
        out[to * row_bytes..(to + 1) * row_bytes].copy_from_slice(&data[from * row_bytes..(from + 1) * row_bytes]);
    }
    Ok(out)
}

/// `data` ([rows, ...] of a float `dtype`) with the second half of each head's rows negated (their
/// sign bits flipped): q's or k's rows for a RoPE turning the other way
/// (`ModelConfig::rope_turns_back`).
pub fn negate_second_halves(data: &[u8], dtype: DType, rows: usize, heads: usize) -> std::result::Result<Vec<u8>, String> {
    let d = if heads == 0 { 0 } else { rows / heads };
    let size = match dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
        _ => return Err(format!("cannot negate rows of {dtype}: a float tensor was expected")),
    };
    if heads == 0 || rows % heads != 0 || d % 2 != 0 || data.len() % rows != 0 || (data.len() / rows) % size != 0 {
        return Err(format!("cannot split {rows} rows into {heads} heads of two halves"));
    }
    let row_bytes = data.len() / rows;
    let mut out = data.to_vec();
    for h in 0..heads {
        let rows = &mut out[(h * d + d / 2) * row_bytes..(h + 1) * d * row_bytes];
        // The sign bit: the last byte of each little-endian element, its top bit.
        rows.chunks_exact_mut(size).for_each(|e| e[size - 1] ^= 0x80);
    }
    Ok(out)
}

/// For each of a head's first `rotary` dims in RoPE-on-halves order, the dim it is in the
/// adjacent-pairs order: dim `j * rotary/2 + i` is `2i + j`.
pub fn half_pair_rows(head_dim: usize, rotary: usize) -> Vec<usize> {
    let r = rotary.min(head_dim);
    (0..r).map(|k| 2 * (k % (r / 2)) + k / (r / 2)).collect()
}

/// A HuggingFace model directory.
pub struct HfDir {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// (path, mapping, tensors: name -> (dtype, dims, byte range in the mapping))
    files: Vec<(PathBuf, Arc<Mmap>, BTreeMap<String, (DType, Vec<usize>, usize, usize)>)>,
    index: BTreeMap<String, usize>,
}

impl HfDir {
    pub fn open(dir: &Path) -> Result<HfDir> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let index_path = dir.join("model.safetensors.index.json");
        let mut names: Vec<String> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let j: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Format { path: index_path.clone(), detail: e.to_string() })?;
            let map = j
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index_path, "weight_map", "missing"))?;
            // Shards are files of this directory: a name with a folder in it (`../x`, an absolute
            // path) would open something else.
            map.iter()
                .map(|(tensor, v)| {
                    let name = v.as_str().ok_or_else(|| Error::config(&index_path, &format!("weight_map.{tensor}"), "is not a file name"))?;
                    let plain = Path::new(name).components().count() == 1
                        && matches!(Path::new(name).components().next(), Some(std::path::Component::Normal(_)));
                    if !plain {
                        return Err(Error::config(
                            &index_path,
                            &format!("weight_map.{tensor}"),
                            format!("{name:?} is not a file name in the model's directory"),
                        ));
                    }
                    Ok(name.to_string())
                })
                .collect::<Result<_>>()?
        } else {
            vec!["model.safetensors".to_string()]
        };
        names.sort();
        names.dedup();
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for name in names {
            let path = dir.join(&name);
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: mapped read-only; highrise never writes a file it reads.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let tensors = read_safetensors_header(&path, &mmap)?;
            for t in tensors.keys() {
                index.insert(t.clone(), files.len());
            }
            files.push((path, Arc::new(mmap), tensors));
        }
        Ok(HfDir { dir: dir.to_path_buf(), config, files, index })
    }

    fn tensor(&self, name: &str) -> Result<Option<FileTensor<'_>>> {
        let Some(&i) = self.index.get(name) else { return Ok(None) };
        let (_, mmap, tensors) = &self.files[i];
        let (dtype, dims, start, end) = &tensors[name];
        let owner: Arc<dyn Any + Send + Sync> = mmap.clone();
        let (data, span) = (Cow::Borrowed(&mmap[*start..*end]), *start..*end);
        Ok(Some(FileTensor { dtype: *dtype, dims: dims.clone(), data, owner, span }))
    }
}

/// The tensor table of a safetensors file, every range checked against the file.
fn read_safetensors_header(
    path: &Path,
    buf: &[u8],
) -> Result<BTreeMap<String, (DType, Vec<usize>, usize, usize)>> {
    let fail = |detail: String| Error::Format { path: path.to_path_buf(), detail };
    let (n, meta) = safetensors::SafeTensors::read_metadata(buf)
        .map_err(|e| fail(format!("not a valid safetensors file (truncated or corrupt): {e}")))?;
    let data_start = 8 + n;
    let mut out = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            d => return Err(Error::tensor(path, &name, format!("dtype {d:?} is not supported (F32, F16, BF16 are)"))),
        };
        let (s, e) = info.data_offsets;
        let numel = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let expect = numel.and_then(|n| dtype.storage_bytes(n));
        if e < s || Some(e - s) != expect {
            return Err(Error::tensor(path, &name, format!("{} bytes for {dtype}{:?}", e.wrapping_sub(s), info.shape)));
        }
        match data_start.checked_add(e) {
            Some(end) if end <= buf.len() => {}
            _ => {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("data ends at byte {} but the file has {}: truncated", data_start.saturating_add(e), buf.len()),
                ))
            }
        }
        out.insert(name, (dtype, info.shape.clone(), data_start + s, data_start + e));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nanochat's q/k rows: each head's second half negated, element by element in every float
    /// dtype (the sign bit of each, nothing else), the first half as it was; a quantized tensor or
    /// rows that split into no halves are refused with what was wrong.
    #[test]
    fn second_halves_negate_in_each_float_dtype() {
        let values = [1.5f32, -2.0, 0.25, 3.0, -0.5, 4.0, 0.0, -7.0]; // 2 heads x 4 rows x 1 column
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let bytes: Vec<u8> = match dtype {
                DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
                _ => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
            };
            let out = negate_second_halves(&bytes, dtype, 8, 2).unwrap();
            let mut got = vec![0f32; 8];
            dequantize(dtype, &out, &mut got).unwrap();
            let want: Vec<f32> = values.iter().enumerate().map(|(i, &v)| if i % 4 >= 2 { -v } else { v }).collect();
            // Bit for bit (the values are exact in each dtype; 0 becomes -0).
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{dtype}: {got:?}");
        }
        assert!(negate_second_halves(&[0u8; 18], DType::Q8_0, 1, 1).unwrap_err().contains("float"));
        assert!(negate_second_halves(&[0u8; 12], DType::F32, 3, 1).unwrap_err().contains("halves"));
    }
}
