//! A model's hyperparameters, in HuggingFace's `config.json` vocabulary (so it reads and writes that
//! file as is), filled from GGUF metadata for GGUF files.

use std::path::Path;

use highrise_core::ops::{GluAct, RopeConfig, RopeScaling, Scores, MAX_ROPE_PAIRS};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::gguf::{Gguf, Value};
use crate::{Error, Result};

/// The Llama-shaped families highrise runs (`model_type`, GGUF `general.architecture`): they differ
/// in names and options (biases, a norm of q and k, fused projections; Gemma 2's norms after each
/// block, GeGLU and soft-capping), all on the same ops.
pub const FAMILIES: [(&str, &str); 43] = [
    ("llama", "Llama 2, 3, 3.1, 3.2 (llama3 RoPE scaling, tied embeddings), SmolLM, TinyLlama"),
    ("smollm3", "SmolLM3 (Llama with no RoPE on every fourth layer)"),
    ("mistral", "Mistral 7B v0.1 (sliding-window attention), Nemo (a head_dim of its own)"),
    ("ministral", "Ministral 8B (Mistral with the sliding window on the layers `layer_types` names)"),
    ("qwen2", "Qwen 2, 2.5 (q/k/v biases)"),
    ("qwen3", "Qwen 3 dense (each head's q and k RMS-normed before RoPE)"),
    ("mixtral", "Mixtral 8x7B, 8x22B (a mixture of experts: each token's top 2 of 8 SwiGLU MLPs, weighted by the router; GGUF: llama with experts)"),
    ("qwen2_moe", "Qwen 1.5 MoE, Qwen 2 MoE (Qwen 2's attention, each token's top 4 of 60 or 8 of 64 experts beside a shared expert gated by a sigmoid)"),
    ("qwen3_moe", "Qwen 3 MoE (30B-A3B, 235B-A22B: Qwen 3's attention, each token's top 8 of 128 experts)"),
    ("olmoe", "OLMoE (q and k normed across all heads, each token's top 8 of 64 experts, their weights not renormalized)"),
    ("phi3", "Phi-3 mini, Phi-3.5 mini, Phi-4-mini (fused qkv_proj and gate_up_proj; longrope; partial RoPE)"),
    ("granite", "Granite 3 dense (Llama with multipliers: embeddings, each block's output before it joins the stream, attention scores, logits)"),
    ("granitemoe", "Granite 3 MoE (Granite's multipliers, each token's top k experts, gate and up fused per expert)"),
    ("olmo2", "OLMo 2 (RMSNorm after attention and after the MLP, none before; q and k normed across all heads)"),
    ("olmo3", "OLMo 3 (OLMo 2 with a sliding window on three layers of each four)"),
    ("gemma", "Gemma, CodeGemma (GeGLU, sqrt(hidden) embeddings, (1 + w) norms)"),
    ("gemma2", "Gemma 2 (GeGLU, sqrt(hidden) embeddings, (1 + w) norms before and after each block, soft-capped attention and logits, sliding window every other layer)"),
    ("gemma3_text", "Gemma 3 text (270M, 1B; any size from a GGUF, `gemma3`): Gemma 2's layout with (1 + w) q/k norms, no soft-capping, five sliding-window layers to each full one, RoPE base 10k on the sliding ones"),
    ("gpt2", "GPT-2, DistilGPT-2 (LayerNorm, learned absolute positions, a GELU MLP without a gate, biases everywhere, Conv1D weights read transposed)"),
    ("gpt_neox", "GPT-NeoX, Pythia (LayerNorm, attention and the MLP side by side on the same stream, RoPE on a quarter of each head, exact GELU; GGUF `gptneox`)"),
    ("starcoder2", "StarCoder 2 (LayerNorm, biases, a GELU MLP without a gate, grouped-query attention)"),
    ("phi", "Phi-1.5, Phi-2 (one LayerNorm feeding attention and the MLP side by side, partial RoPE, biases, the unembedding's too; GGUF `phi2`)"),
    ("stablelm", "StableLM 2, StableLM 3B (LayerNorm with a SwiGLU MLP, RoPE on a quarter of each head, q/k/v biases where use_qkv_bias says)"),
    ("opt", "OPT 125M to 66B but 350M (LayerNorm before each block, learned positions offset by 2, a ReLU MLP without a gate, biases everywhere)"),
    ("gptj", "GPT-J 6B (one LayerNorm feeding attention and the MLP side by side, RoPE on adjacent pairs of the first rotary_dim dims of each head, a GELU MLP with biases, the unembedding's bias)"),
    ("falcon", "Falcon 7B, 40B, 180B, Falcon 2 11B (attention and a GELU MLP side by side, through one LayerNorm or two; q, k and v fused by key/value group; multi-query or grouped-query)"),
    ("arcee", "Arcee AFM-4.5B (a Llama with a squared-ReLU MLP without a gate; YaRN past its trained context)"),
    ("olmo", "OLMo 1B, 7B (LayerNorm without a weight or bias, a SwiGLU MLP; clip_qkv refused)"),
    ("nemotron", "Nemotron-4 Minitron 4B and 8B, Nemotron-Mini (LayerNorm of 1 + w, a squared-ReLU MLP without a gate, RoPE on half of each head)"),
    ("cohere", "Command R, Aya 23 (LayerNorm without a bias feeding attention and a SwiGLU MLP side by side, RoPE on adjacent pairs, scaled logits; GGUF `command-r`)"),
    ("cohere2", "Command R7B, Command A (Cohere's layout with a sliding window on three layers of each four, RoPE on those alone; GGUF `cohere2`)"),
    ("ernie4_5", "ERNIE 4.5 0.3B (a Llama with RoPE on adjacent pairs; use_bias refused)"),
    ("helium", "Helium 1 (a Llama with RoPE on adjacent pairs, q/k/v biases where attention_bias says)"),
    ("glm", "GLM-4 9B (a Llama with RoPE on adjacent pairs of half of each head, gate and up fused, q/k/v biases)"),
    ("nanochat", "nanochat (RMSNorms without weights, the embeddings normed too, q and k normed, RoPE turning the other way, a squared-ReLU MLP without a gate, soft-capped logits)"),
    ("vaultgemma", "VaultGemma 1B (Gemma 2 without the norms after attention and the MLP)"),
    ("jais2", "Jais 2 (LayerNorms, a squared-ReLU MLP without a gate, biases where attention_bias and mlp_bias say)"),
    ("seed_oss", "Seed-OSS 36B (a Llama with q/k/v biases, o_proj's where attention_out_bias says)"),
    ("glm4", "GLM-4-0414 9B, 32B, GLM-Z1 (GLM-4 9B with Gemma 2's RMSNorms after attention and the MLP too)"),
    ("exaone4", "EXAONE 4.0 1.2B, 32B (OLMo 2's norms after attention and the MLP, each head's q and k RMS-normed, a window on three layers of four with RoPE on those alone)"),
    ("bloom", "BLOOM, BLOOMZ 560M to 176B (ALiBi in place of positions, a LayerNorm on the embeddings, q/k/v fused head by head, biases everywhere, a GELU MLP)"),
    ("gpt_bigcode", "StarCoder, SantaCoder, WizardCoder, OctoCoder (GPT-2's layout with multi-query attention, q/k/v fused; GGUF `starcoder`)"),
    ("mpt", "MPT 7B, 30B (ALiBi in place of positions, LayerNorm without a bias, q/k/v fused, no biases, an exact-GELU MLP)"),
];

/// Whether `name` (a `model_type` or GGUF `general.architecture`) is a family highrise runs.
pub fn is_family(name: &str) -> bool {
    FAMILIES.iter().any(|(f, _)| *f == name)
}

/// The `model_type` of a GGUF `general.architecture`: llama.cpp calls Gemma 3 `gemma3` whatever its
/// size, HF's text-only config `gemma3_text` (`gemma3` there is the multimodal wrapper), and Qwen 2
/// and 3 MoE `qwen2moe` and `qwen3moe`, GPT-BigCode `starcoder`. (Mixtral is `llama` with experts: see `from_gguf`.)
fn model_type_of_arch(arch: &str) -> &str {
    match arch {
        "gemma3" => "gemma3_text",
        "gptneox" => "gpt_neox",
        "phi2" => "phi",
        "command-r" => "cohere",
        "starcoder" => "gpt_bigcode",
        "qwen3moe" => "qwen3_moe",
        "qwen2moe" => "qwen2_moe",
        other => other,
    }
}

/// "llama, mistral, ...": for the errors that list them.
pub fn families() -> String {
    FAMILIES.map(|(f, _)| f).join(", ")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<Json>,
    /// transformers >= 5 writes `rope_theta` and the scaling together here (`rope_type`, `factor`,
    /// ...); read into `rope_theta` and `rope_scaling` when the file is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Json>,
    /// Phi-4-mini's partial RoPE: only this fraction of each head's dims rotate (the first ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Phi-3.5: the context it was pretrained on, before longrope stretched it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// An id or a list of ids.
    #[serde(default)]
    pub eos_token_id: Option<Json>,
    /// A query sees itself and the `sliding_window - 1` tokens before it: on every layer (Mistral
    /// v0.1), or on the layers `layer_types` calls "sliding_attention" (Gemma 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen 2 writes a window it does not use unless this is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Per layer, "full_attention" or "sliding_attention" (transformers >= 4.54 writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// The MLP's gate: silu (SwiGLU) unless this says gelu_pytorch_tanh (GeGLU, Gemma).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Gemma 2: attention scores are scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2: scores become cap tanh(score / cap) before the softmax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: logits become cap tanh(logit / cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 3: the RoPE base of the sliding-window layers (the full ones take `rope_theta` and
    /// `rope_scaling`). transformers >= 5 writes it as `rope_parameters.sliding_attention`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// SmolLM3: per layer, 1 where q and k rotate, 0 where they do not (NoPE); absent, every
    /// `no_rope_layer_interval`-th layer (4) does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_rope_layers: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_rope_layer_interval: Option<usize>,
    /// EmbeddingGemma: every token sees every other (an encoder, not a language model): refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bidirectional_attention: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// A mixture of experts in place of the MLP (Mixtral, Qwen 2 and 3 MoE, OLMoE, Granite MoE): how
    /// many experts a layer has (Mixtral's and transformers 5's name, and the older `num_experts`),
    /// how many each token uses, whether their router weights are renormalized to sum to 1 (Mixtral
    /// and Granite MoE always), each expert's intermediate size where it differs from
    /// `intermediate_size` (Qwen 2 and 3 MoE), and which layers keep a dense MLP (Qwen MoE: those in
    /// `mlp_only_layers`, and all but every `decoder_sparse_step`-th).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_local_experts: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_intermediate_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_sparse_step: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_only_layers: Option<Vec<usize>>,
    /// Qwen 2 MoE: an expert every token goes through beside its routed ones, of this intermediate
    /// size, its output scaled by a sigmoid gate of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_expert_intermediate_size: Option<usize>,
    /// Granite's multipliers: of the embeddings, of what attention and the MLP add to the stream,
    /// of the attention scores (in place of 1 / sqrt(head_dim)), and the logits' divisor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_multiplier: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_multiplier: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_multiplier: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits_scaling: Option<f64>,
    /// GPT-NeoX: attention and the MLP read the same stream and both add to it (x + attn(ln1(x)) +
    /// mlp(ln2(x))): HF's default true; false is the sequential layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_parallel_residual: Option<bool>,
    /// StarCoder 2: biases on every projection (HF's default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bias: Option<bool>,
    /// StableLM: biases on q, k and v (HF's default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_qkv_bias: Option<bool>,
    /// Phi: LayerNorms of q and k (no released Phi-1.5 or Phi-2 has them): refused where true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qk_layernorm: Option<bool>,
    /// GPT-2: scores further divided by the layer's index + 1 where true (refused), not scaled at all
    /// where `scale_attn_weights` is false (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_attn_by_inverse_layer_idx: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_attn_weights: Option<bool>,
    /// OPT: biases on every projection (HF's default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_bias: Option<bool>,
    /// OPT-350m's layers norm after each block (false; refused), its embeddings narrower than the
    /// stream and projected in and out (`word_embed_proj_dim` unlike `hidden_size`; refused);
    /// OPT without a final norm or with LayerNorms that have no weight and bias (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_layer_norm_before: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default, rename = "_remove_final_layer_norm", skip_serializing_if = "Option::is_none")]
    pub remove_final_layer_norm: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_norm_elementwise_affine: Option<bool>,
    /// Cohere: what the logits are multiplied by (Command R's 0.0625); LayerNorms of each head's q
    /// and k where `use_qk_norm` (Command R+ of April 2024: refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_qk_norm: Option<bool>,
    /// Falcon: the 40B's layout (`new_decoder_architecture`: q, k and v fused by key/value group,
    /// `num_kv_heads` of them, and `num_ln_in_parallel_attn` LayerNorms, 2 unless it says 1), else
    /// the 7B's (`multi_query`: one key/value head; `parallel_attn`: side by side, else
    /// sequential); biases everywhere where `bias`; ALiBi in place of RoPE where `alibi` (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_decoder_architecture: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_query: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_attn: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_ln_in_parallel_attn: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alibi: Option<bool>,
    /// Seed-OSS: whether o_proj has a bias (`attention_bias` gives q, k and v theirs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_out_bias: Option<bool>,
    /// MPT: ALiBi's largest bias (`attn_config.alibi_bias_max`, 8 where absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alibi_bias_max: Option<f64>,
    /// MPT: whether its projections and LayerNorms go without biases (true: HF builds none; false,
    /// biases, is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_bias: Option<bool>,
    /// Bloom: the stream carrying each block's normed input in place of its input (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_residual_connection_post_layernorm: Option<bool>,
    /// Nemotron: biases on the MLP's projections (HF's default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// OLMo 1: q, k and v clamped to +-clip_qkv (OLMo 1.7; refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_qkv: Option<f64>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}

impl ModelConfig {
    /// Named shapes for random-weight models (benchmarks, backend cross-checks): `llama-3-8b`,
    /// `olmoe-1b-7b`, `smollm2-135m`, `tiny` (2 layers, head dim 64, grouped-query 4:2, vocab 512), and
    /// `tiny-gemma2`, `tiny-gemma3`, `tiny-smollm3`, `tiny-olmo2`, `tiny-mixtral`,
    /// `tiny-qwen3-moe`, `tiny-qwen2-moe`, `tiny-gpt2`, `tiny-pythia`, `tiny-falcon` (71 query heads
    /// over one key/value head), `tiny-nemotron` and `tiny-bloom` (6 heads of 64 under ALiBi) (the
    /// same in those families' layouts).
    pub fn shape(name: &str) -> Option<ModelConfig> {
        let v = match name {
            "llama-3-8b" => serde_json::json!({
                "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            }),
            "smollm2-135m" => serde_json::json!({
                "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0,
                "max_position_embeddings": 8192, "tie_word_embeddings": true,
            }),
            "tiny" => serde_json::json!({
                "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
            }),
            // Gemma 2's layout at tiny's size: a 16-token window on layer 0, caps that bend.
            "tiny-gemma2" => serde_json::json!({
                "model_type": "gemma2", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                "max_position_embeddings": 1024, "hidden_activation": "gelu_pytorch_tanh",
                "query_pre_attn_scalar": 64, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
                "attn_logit_softcapping": 5.0, "final_logit_softcapping": 200.0, "tie_word_embeddings": true,
            }),
            // Gemma 3's: q/k norms, no caps, the window on layer 0 rotating with base 10000, layer 1
            // full with base 1e6 scaled by 8.
            "tiny-gemma3" => serde_json::json!({
                "model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                "max_position_embeddings": 1024, "hidden_activation": "gelu_pytorch_tanh",
                "query_pre_attn_scalar": 64, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
                "rope_theta": 1000000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_local_base_freq": 10000.0,
                "tie_word_embeddings": true,
            }),
            // SmolLM3's: layer 1 without RoPE.
            "tiny-smollm3" => serde_json::json!({
                "model_type": "smollm3", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                "no_rope_layers": [1, 0], "tie_word_embeddings": true,
            }),
            // OLMo 2's: norms after attention and the MLP only, q and k normed across all heads.
            "tiny-olmo2" => serde_json::json!({
                "model_type": "olmo2", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
            }),
            // OLMoE-1B-7B's (allenai/OLMoE-1B-7B-0924): each token's top 8 of 64 experts on all 16
            // layers, 1.3B of 6.9B parameters a token: a mixture's decode benchmarked at a real
            // size (13.8 GB in bf16).
            "olmoe-1b-7b" => serde_json::json!({
                "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
                "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": false,
            }),
            // Mixtral's: each token's top 2 of 4 experts.
            "tiny-mixtral" => serde_json::json!({
                "model_type": "mixtral", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 256,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                "num_local_experts": 4, "num_experts_per_tok": 2,
            }),
            // Qwen 2 MoE's: q/k/v biases, each token's top 2 of 8 experts, not renormalized, beside
            // a shared expert weighted by its gate's sigmoid.
            "tiny-qwen2-moe" => serde_json::json!({
                "model_type": "qwen2_moe", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "norm_topk_prob": false,
                "shared_expert_intermediate_size": 256,
            }),
            // Qwen 3 MoE's: layer 0 dense (`mlp_only_layers`), layer 1 each token's top 2 of 8
            // experts of their own size, renormalized.
            "tiny-qwen3-moe" => serde_json::json!({
                "model_type": "qwen3_moe", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "norm_topk_prob": true,
                "mlp_only_layers": [0],
            }),
            // GPT-2's: LayerNorm, learned positions, a GELU MLP without a gate, biases everywhere.
            "tiny-gpt2" => serde_json::json!({
                "model_type": "gpt2", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 1024,
                "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 1024,
                "hidden_act": "gelu_new", "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
            }),
            // Pythia's (GPT-NeoX): attention and the MLP side by side, RoPE on a quarter of each
            // head, the exact GELU.
            "tiny-pythia" => serde_json::json!({
                "model_type": "gpt_neox", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 1024,
                "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 1024,
                "hidden_act": "gelu", "rms_norm_eps": 1e-5, "partial_rotary_factor": 0.25,
            }),
            // Falcon 7B's attention: 71 query heads sharing one key/value head (past the grouped
            // kernels' 8 heads a group and the decode kernel's 16 rows), head dim 64 beside a
            // narrow stream; one LayerNorm side by side, a GELU MLP.
            "tiny-falcon" => serde_json::json!({
                "model_type": "falcon", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 1024,
                "num_hidden_layers": 2, "num_attention_heads": 71, "num_key_value_heads": 1, "head_dim": 64,
                "max_position_embeddings": 1024, "hidden_act": "gelu", "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
            }),
            // Nemotron's: a squared-ReLU MLP without a gate, RoPE on half of each head, LayerNorm.
            "tiny-nemotron" => serde_json::json!({
                "model_type": "nemotron", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 1024,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                "hidden_act": "relu2", "rms_norm_eps": 1e-5, "partial_rotary_factor": 0.5,
            }),
            // Bloom's: ALiBi over 6 heads (slopes on and between a power of two's), a LayerNorm on
            // the embeddings, biases everywhere, a GELU MLP.
            "tiny-bloom" => serde_json::json!({
                "model_type": "bloom", "vocab_size": 512, "hidden_size": 384, "intermediate_size": 1536,
                "num_hidden_layers": 2, "num_attention_heads": 6, "max_position_embeddings": 1024,
                "hidden_act": "gelu_pytorch_tanh", "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
            }),
            _ => return None,
        };
        Some(serde_json::from_value(v).expect("the named shapes are valid configs"))
    }

    pub const SHAPES: [&'static str; 16] = [
        "llama-3-8b",
        "olmoe-1b-7b",
        "smollm2-135m",
        "tiny",
        "tiny-gemma2",
        "tiny-gemma3",
        "tiny-smollm3",
        "tiny-olmo2",
        "tiny-mixtral",
        "tiny-qwen3-moe",
        "tiny-qwen2-moe",
        "tiny-gpt2",
        "tiny-pythia",
        "tiny-falcon",
        "tiny-nemotron",
        "tiny-bloom",
    ];

    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut json: Json = serde_json::from_str(&text).map_err(|e| Error::config(path, "config", e))?;
        let adopted = adopt_family_names(&mut json);
        // An error names the field as the file does (GPT-2's n_inner, not intermediate_size).
        let theirs = |e: Error| match e {
            Error::Config { path, field, detail } => {
                let field = adopted.iter().find(|(_, ours)| *ours == field).map_or(field, |(theirs, _)| theirs.to_string());
                Error::Config { path, field, detail }
            }
            e => e,
        };
        let c: ModelConfig = serde_path_to_error::deserialize(json)
            .map_err(|e| {
                let field = match e.path().to_string().as_str() {
                    "." => "config".to_string(),
                    p => p.to_string(),
                };
                theirs(Error::config(path, &field, e.inner()))
            })?;
        let mut c = c;
        c.adopt_rope_parameters();
        c.validate(path).map_err(theirs)?;
        Ok(c)
    }

    /// transformers >= 5's `rope_parameters` as the older `rope_theta` + `rope_scaling` fields (per
    /// layer type where it is split so, Gemma 3: the full layers' as those, the sliding layers'
    /// base as `rope_local_base_freq`).
    fn adopt_rope_parameters(&mut self) {
        let Some(p) = self.rope_parameters.as_ref().filter(|p| p.is_object()) else { return };
        if let Some(theta) = p.get("sliding_attention").and_then(|s| s.get("rope_theta")).and_then(Json::as_f64) {
            self.rope_local_base_freq = Some(theta);
        }
        let p = &p.get("full_attention").filter(|f| f.is_object()).unwrap_or(p).clone();
        if let Some(theta) = p.get("rope_theta").and_then(Json::as_f64) {
            self.rope_theta = theta;
        }
        if let Some(f) = p.get("partial_rotary_factor").and_then(Json::as_f64) {
            self.partial_rotary_factor = Some(f);
        }
        let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Json::as_str).unwrap_or("default");
        if kind != "default" && self.rope_scaling.as_ref().is_none_or(Json::is_null) {
            self.rope_scaling = Some(p.clone());
        }
    }

    /// The config of a GGUF file, from its `<arch>.*` metadata.
    pub fn from_gguf(g: &Gguf) -> Result<ModelConfig> {
        let path = &g.path;
        let arch = g.get("general.architecture").and_then(Value::as_str).unwrap_or("").to_string();
        if !is_family(model_type_of_arch(&arch)) {
            return Err(Error::config(
                path,
                "general.architecture",
                format!("{arch:?} is not supported (these are: {}; gemma3 for gemma3_text)", families()),
            ));
        }
        // A llama file with experts is Mixtral (llama.cpp converts it as llama).
        let experts = g.get(&format!("{arch}.expert_count")).and_then(Value::as_u64).filter(|&e| e > 0).map(|e| e as usize);
        let model_type = match (arch.as_str(), experts) {
            ("llama", Some(_)) => "mixtral".to_string(),
            _ => model_type_of_arch(&arch).to_string(),
        };
        let gemma = matches!(arch.as_str(), "gemma2" | "gemma3");
        let num = |key: &str| -> Result<usize> {
            let full = format!("{arch}.{key}");
            g.get(&full)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| Error::config(path, &full, "missing or not an integer"))
        };
        let float = |key: &str| g.get(&format!("{arch}.{key}")).and_then(Value::as_f64);
        let heads = num("attention.head_count")?;
        let hidden = num("embedding_length")?;
        let vocab = match num("vocab_size") {
            Ok(v) => v,
            Err(_) => g
                .get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(|t| t.len())
                .ok_or_else(|| Error::config(path, &format!("{arch}.vocab_size"), "missing, and no token list"))?,
        };
        let head_dim = num("attention.key_length").unwrap_or(hidden / heads.max(1));
        let theta = float("rope.freq_base").unwrap_or(10_000.0);
        // A small f32 tensor of RoPE factors llama.cpp stores beside the weights, if the file has it.
        let f32s = |name: &str| -> Result<Option<Vec<f32>>> {
            let Some(t) = g.tensor(name) else { return Ok(None) };
            if t.dtype != highrise_core::DType::F32 {
                return Err(Error::tensor(path, name, format!("{} (f32 expected)", t.dtype)));
            }
            Ok(Some(g.data(t).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()))
        };
        let rope_scaling = match g.get(&format!("{arch}.rope.scaling.type")).and_then(Value::as_str) {
            Some("linear") => Some(serde_json::json!({
                "rope_type": "linear",
                "factor": float("rope.scaling.factor").unwrap_or(1.0),
            })),
            // llama.cpp's YaRN: the factor and the original context (its ramp's betas where the
            // file gives them, else HF's and its own 32 and 1).
            Some("yarn") => {
                let mut p = serde_json::json!({
                    "rope_type": "yarn",
                    "factor": float("rope.scaling.factor").unwrap_or(1.0),
                    "original_max_position_embeddings": num("rope.scaling.original_context_length")?,
                });
                for (key, theirs) in [("beta_fast", "rope.scaling.yarn_beta_fast"), ("beta_slow", "rope.scaling.yarn_beta_slow")] {
                    if let Some(v) = float(theirs) {
                        p[key] = v.into();
                    }
                }
                Some(p)
            }
            // llama.cpp keeps Llama 3.1+'s scaling as per-frequency divisors (`rope_freqs.weight`).
            _ => match f32s("rope_freqs.weight")? {
                Some(freqs) => {
                    Some(llama3_from_freq_factors(&freqs, theta, head_dim).map_err(|e| Error::tensor(path, "rope_freqs.weight", e))?)
                }
                None => None,
            },
        };
        // Phi-3.5's long-context RoPE: per-frequency factors for short and long contexts, as
        // llama.cpp's converter writes them (two f32 tensors, the original context, the cos/sin factor).
        let rope_scaling = match (f32s("rope_factors_short.weight")?, f32s("rope_factors_long.weight")?) {
            (None, None) => rope_scaling,
            (Some(short), Some(long)) => {
                let orig = num("rope.scaling.original_context_length")?;
                let mut p = serde_json::json!({
                    "rope_type": "longrope",
                    "short_factor": short,
                    "long_factor": long,
                    "original_max_position_embeddings": orig,
                });
                if let Some(f) = float("rope.scaling.attn_factor") {
                    p["attention_factor"] = f.into();
                }
                Some(p)
            }
            _ => return Err(Error::tensor(path, "rope_factors_long.weight", "longrope needs both rope_factors_short and rope_factors_long")),
        };
        let token = |key: &str| g.get(key).and_then(Value::as_u64).map(|v| v as u32);
        let tied = g.tensor("output.weight").is_none();
        let c = ModelConfig {
            model_type: model_type.clone(),
            architectures: vec![match arch.as_str() {
                "mistral" => "MistralForCausalLM".into(),
                "qwen2" => "Qwen2ForCausalLM".into(),
                "qwen3" => "Qwen3ForCausalLM".into(),
                "qwen3moe" => "Qwen3MoeForCausalLM".into(),
                "qwen2moe" => "Qwen2MoeForCausalLM".into(),
                "olmoe" => "OlmoeForCausalLM".into(),
                "llama" if experts.is_some() => "MixtralForCausalLM".into(),
                "phi3" => "Phi3ForCausalLM".into(),
                "gemma2" => "Gemma2ForCausalLM".into(),
                "gemma3" => "Gemma3ForCausalLM".into(),
                "smollm3" => "SmolLM3ForCausalLM".into(),
                "olmo2" => "Olmo2ForCausalLM".into(),
                "gemma" => "GemmaForCausalLM".into(),
                "granite" => "GraniteForCausalLM".into(),
                "granitemoe" => "GraniteMoeForCausalLM".into(),
                "gpt2" => "GPT2LMHeadModel".into(),
                "starcoder" => "GPTBigCodeForCausalLM".into(),
                "gptneox" => "GPTNeoXForCausalLM".into(),
                "starcoder2" => "Starcoder2ForCausalLM".into(),
                "phi2" => "PhiForCausalLM".into(),
                "stablelm" => "StableLmForCausalLM".into(),
                "command-r" => "CohereForCausalLM".into(),
                "cohere2" => "Cohere2ForCausalLM".into(),
                "ernie4_5" => "Ernie4_5ForCausalLM".into(),
                "falcon" => "FalconForCausalLM".into(),
                "bloom" => "BloomForCausalLM".into(),
                "mpt" => "MptForCausalLM".into(),
                "nemotron" => "NemotronForCausalLM".into(),
                "olmo" => "OlmoForCausalLM".into(),
                "arcee" => "ArceeForCausalLM".into(),
                _ => "LlamaForCausalLM".into(),
            }],
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: num("feed_forward_length")?,
            num_hidden_layers: num("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(num("attention.head_count_kv").unwrap_or(heads)),
            head_dim: Some(head_dim),
            // LayerNorm's epsilon under its own key (GPT-2, GPT-NeoX, StarCoder 2, Phi-2).
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").or_else(|| float("attention.layer_norm_epsilon")).unwrap_or(1e-5),
            rope_theta: theta,
            rope_scaling,
            max_position_embeddings: num("context_length").unwrap_or(2048),
            original_max_position_embeddings: num("rope.scaling.original_context_length").ok(),
            tie_word_embeddings: tied,
            // (GPT-NeoX's, whose q, k and v llama.cpp keeps fused, too.)
            attention_bias: g.tensor("blk.0.attn_q.bias").is_some() || (arch == "gptneox" && g.tensor("blk.0.attn_qkv.bias").is_some()),
            bos_token_id: token("tokenizer.ggml.bos_token_id"),
            eos_token_id: token("tokenizer.ggml.eos_token_id").map(Json::from),
            sliding_window: num("attention.sliding_window").ok(),
            torch_dtype: Some("float32".into()),
            rope_parameters: None,
            // llama.cpp's n_rot: partial RoPE where it is less than the head dim (Phi-4-mini).
            partial_rotary_factor: num("rope.dimension_count").ok().filter(|&r| r < head_dim).map(|r| r as f64 / head_dim as f64),
            // llama.cpp's Gemma 2: the window on even layers; Gemma 3: on five layers of each six
            // (every sixth full). GeGLU; scores scaled by the head dim (n_embd / n_head for the
            // 27Bs, the one shape of 46 layers of Gemma 2 and of 62 of Gemma 3).
            // llama.cpp's Command R7B and A (`cohere2`): the window on three layers of each four.
            layer_types: (gemma || arch == "cohere2").then(|| {
                let layers = num("block_count").unwrap_or(0);
                let sliding = |l: usize| match arch.as_str() {
                    "gemma2" => l % 2 == 0,
                    "cohere2" => (l + 1) % 4 != 0,
                    _ => (l + 1) % 6 != 0,
                };
                (0..layers).map(|l| if sliding(l) { "sliding_attention" } else { "full_attention" }.to_string()).collect()
            }),
            hidden_activation: (gemma || arch == "gemma").then(|| "gelu_pytorch_tanh".to_string()),
            // The LayerNorm families' GELUs, which no GGUF key holds: HF's (GPT-NeoX's exact one,
            // where llama.cpp runs the tanh approximation for every family).
            hidden_act: match arch.as_str() {
                "gpt2" | "phi2" => Some("gelu_new".into()),
                "starcoder" => Some("gelu_pytorch_tanh".into()),
                "gptneox" | "falcon" | "mpt" => Some("gelu".into()),
                "bloom" => Some("gelu_pytorch_tanh".into()),
                "nemotron" | "arcee" => Some("relu2".into()),
                "starcoder2" => Some("gelu_pytorch_tanh".into()),
                _ => None,
            },
            use_sliding_window: None,
            query_pre_attn_scalar: gemma.then(|| match (arch.as_str(), num("block_count")) {
                ("gemma2", Ok(46)) | ("gemma3", Ok(62)) => (hidden / heads.max(1)) as f64,
                _ => head_dim as f64,
            }),
            // llama.cpp's Gemma 3: the sliding layers rotate unscaled, with base 10000 unless the
            // file says otherwise.
            rope_local_base_freq: (arch == "gemma3").then(|| float("rope.freq_base_swa").unwrap_or(10_000.0)),
            // llama.cpp's SmolLM3: every fourth layer without RoPE (a step no GGUF key holds).
            no_rope_layers: None,
            no_rope_layer_interval: (arch == "smollm3").then_some(4),
            use_bidirectional_attention: None,
            attn_logit_softcapping: float("attn_logit_softcapping"),
            final_logit_softcapping: float("final_logit_softcapping"),
            num_local_experts: experts,
            num_experts: None,
            num_experts_per_tok: experts.and_then(|_| num("expert_used_count").ok()),
            // llama.cpp renormalizes Mixtral's and Qwen 3 MoE's weights, not OLMoE's or Qwen 2
            // MoE's, unless the file says.
            norm_topk_prob: experts.map(|_| match g.get(&format!("{arch}.expert_weights_norm")) {
                Some(Value::Bool(b)) => *b,
                _ => !matches!(arch.as_str(), "olmoe" | "qwen2moe"),
            }),
            moe_intermediate_size: experts.and_then(|_| num("expert_feed_forward_length").ok()),
            shared_expert_intermediate_size: experts.and_then(|_| num("expert_shared_feed_forward_length").ok()),
            // llama.cpp's Granite: the four multipliers (its logits divided by `logit_scale`, Command
            // R's multiplied).
            embedding_multiplier: float("embedding_scale"),
            residual_multiplier: float("residual_scale"),
            attention_multiplier: float("attention.scale"),
            logits_scaling: float("logit_scale").filter(|_| !matches!(arch.as_str(), "command-r" | "cohere2")),
            logit_scale: float("logit_scale").filter(|_| matches!(arch.as_str(), "command-r" | "cohere2")),
            use_qk_norm: (arch == "command-r").then(|| g.tensor("blk.0.attn_q_norm.weight").is_some()),
            // llama.cpp's Falcon: always side by side, q, k and v fused as [q; k; v] (its converter
            // regroups the 40B's), a second norm (`attn_norm_2`) where the MLP has its own.
            new_decoder_architecture: (arch == "falcon").then_some(true),
            multi_query: None,
            parallel_attn: None,
            num_ln_in_parallel_attn: (arch == "falcon").then(|| if g.tensor("blk.0.attn_norm_2.weight").is_some() { 2 } else { 1 }),
            bias: (arch == "falcon").then(|| g.tensor("blk.0.attn_output.bias").is_some()),
            alibi: None,
            attention_out_bias: None,
            // llama.cpp's Bloom: 8 always; MPT's where the file says.
            alibi_bias_max: float("attention.max_alibi_bias"),
            no_bias: None,
            apply_residual_connection_post_layernorm: None,
            mlp_bias: matches!(arch.as_str(), "nemotron" | "arcee").then(|| g.tensor("blk.0.ffn_up.bias").is_some()),
            // llama.cpp's OLMo: its clamp, where the file has one.
            clip_qkv: float("attention.clamp_kqv"),
            decoder_sparse_step: None,
            mlp_only_layers: None,
            use_parallel_residual: match g.get(&format!("{arch}.use_parallel_residual")) {
                Some(Value::Bool(b)) => Some(*b),
                _ => None,
            },
            // llama.cpp's StarCoder 2 without biases has no attn_output.bias.
            use_bias: (arch == "starcoder2").then(|| g.tensor("blk.0.attn_output.bias").is_some()),
            use_qkv_bias: (arch == "stablelm").then(|| g.tensor("blk.0.attn_q.bias").is_some()),
            qk_layernorm: None,
            scale_attn_by_inverse_layer_idx: None,
            scale_attn_weights: None,
            enable_bias: None,
            do_layer_norm_before: None,
            word_embed_proj_dim: None,
            remove_final_layer_norm: None,
            layer_norm_elementwise_affine: None,
        };
        c.validate(path)?;
        Ok(c)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if !is_family(&self.model_type) {
            return Err(Error::config(
                path,
                "model_type",
                format!("{:?} is not supported (these are: {})", self.model_type, families()),
            ));
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(path, field, "must be positive"));
            }
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return Err(Error::config(
                path,
                "num_key_value_heads",
                format!("{} query heads cannot share {} key/value heads", self.num_attention_heads, self.kv_heads()),
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(Error::config(path, "head_dim", format!("{} is odd; RoPE needs pairs", self.head_dim())));
        }
        self.rotary_dims().map_err(|e| Error::config(path, "partial_rotary_factor", e))?;
        self.rope().map_err(|e| Error::config(path, "rope_scaling", e))?;
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(Error::config(path, "layer_types", format!("{} entries for {} layers", types.len(), self.num_hidden_layers)));
            }
            if let Some(t) = types.iter().find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention")) {
                return Err(Error::config(path, "layer_types", format!("{t:?} (full_attention and sliding_attention are supported)")));
            }
        }
        if let Some(list) = &self.no_rope_layers {
            if list.len() != self.num_hidden_layers || list.iter().any(|&v| v > 1) {
                return Err(Error::config(path, "no_rope_layers", format!("{list:?}: one 0 or 1 per layer ({} layers)", self.num_hidden_layers)));
            }
        }
        if self.no_rope_layer_interval == Some(0) {
            return Err(Error::config(path, "no_rope_layer_interval", "must be positive"));
        }
        if let Some(e) = self.num_local_experts.or(self.num_experts).filter(|&e| e > 0) {
            let k = self.experts_per_token();
            if k == 0 || k > e {
                return Err(Error::config(path, "num_experts_per_tok", format!("{k}: each token takes 1 to {e} experts")));
            }
            if self.expert_intermediate_size() == 0 {
                return Err(Error::config(path, "moe_intermediate_size", "must be positive"));
            }
            if self.decoder_sparse_step == Some(0) {
                return Err(Error::config(path, "decoder_sparse_step", "must be positive"));
            }
        } else if matches!(self.model_type.as_str(), "mixtral" | "qwen2_moe" | "qwen3_moe" | "olmoe" | "granitemoe") {
            return Err(Error::config(path, "num_local_experts", format!("missing: {} is a mixture of experts", self.model_type)));
        }
        if self.use_bidirectional_attention == Some(true) {
            return Err(Error::config(path, "use_bidirectional_attention", "true: a bidirectional encoder (EmbeddingGemma) is not a causal language model"));
        }
        let act = self.activation();
        if !matches!(act, "silu" | "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" | "gelu" | "relu" | "relu2") {
            return Err(Error::config(path, "hidden_activation", format!("{act:?} (silu, gelu, gelu_new, gelu_pytorch_tanh, relu and relu2 are supported)")));
        }
        for (field, set, what) in [
            ("qk_layernorm", self.qk_layernorm == Some(true), "LayerNorms of q and k"),
            ("scale_attn_by_inverse_layer_idx", self.scale_attn_by_inverse_layer_idx == Some(true), "scores divided by the layer's index"),
            ("scale_attn_weights", self.scale_attn_weights == Some(false), "unscaled attention scores"),
            ("do_layer_norm_before", self.do_layer_norm_before == Some(false), "LayerNorms after each block (OPT-350m)"),
            ("word_embed_proj_dim", self.word_embed_proj_dim.is_some_and(|d| d != self.hidden_size), "embeddings projected in and out of a wider stream (OPT-350m)"),
            ("_remove_final_layer_norm", self.remove_final_layer_norm == Some(true), "OPT layers without a final norm"),
            ("layer_norm_elementwise_affine", self.layer_norm_elementwise_affine == Some(false), "LayerNorms without a weight and bias"),
            ("use_qk_norm", self.use_qk_norm == Some(true), "LayerNorms of each head's q and k (Command R+ 04-2024)"),
            ("alibi", self.model_type == "falcon" && self.alibi == Some(true), "ALiBi position biases on Falcon (Falcon-RW: scaled with the scores)"),
            ("alibi", self.model_type == "mpt" && self.alibi == Some(false), "MPT's learned positions in place of ALiBi"),
            ("no_bias", self.model_type == "mpt" && self.no_bias == Some(false), "MPT's biases"),
            ("use_bias", self.model_type == "ernie4_5" && self.use_bias == Some(true), "ERNIE 4.5's biases (its gated MLP's among them)"),
            ("apply_residual_connection_post_layernorm", self.apply_residual_connection_post_layernorm == Some(true), "streams carrying each block's normed input"),
            ("clip_qkv", self.clip_qkv.is_some(), "q, k and v clamped (OLMo 1.7, MPT)"),
            // Llama's config has the field too; its gated MLP's biases are read nowhere.
            ("mlp_bias", self.mlp_bias == Some(true) && !self.plain_mlp(), "biases on a gated MLP's projections"),
            ("num_ln_in_parallel_attn", self.falcon_new() && self.num_ln_in_parallel_attn.is_some_and(|n| n != 1 && n != 2), "LayerNorm counts but 1 and 2"),
        ] {
            if set {
                return Err(Error::config(path, field, format!("{what} are not supported")));
            }
        }
        for (field, v) in [
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("rope_local_base_freq", self.rope_local_base_freq),
            ("embedding_multiplier", self.embedding_multiplier),
            ("residual_multiplier", self.residual_multiplier),
            ("attention_multiplier", self.attention_multiplier),
            ("logits_scaling", self.logits_scaling),
            ("logit_scale", self.logit_scale),
        ] {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(Error::config(path, field, format!("{v}: must be finite and above 0")));
            }
        }
        Ok(())
    }

    /// Gemma's layout: (1 + w) norm weights, embeddings scaled by sqrt(hidden) (and from Gemma 2 on,
    /// `post_norms`, but for VaultGemma's).
    pub fn gemma(&self) -> bool {
        matches!(self.model_type.as_str(), "gemma" | "gemma2" | "gemma3_text" | "vaultgemma")
    }

    /// OLMo 2's layout (OLMo 3's too): `post_norms` without pre-norms, q/k norms across all heads.
    fn olmo(&self) -> bool {
        matches!(self.model_type.as_str(), "olmo2" | "olmo3")
    }

    /// The experts each mixture-of-experts layer has (0: the model is dense).
    pub fn experts(&self) -> usize {
        self.num_local_experts.or(self.num_experts).unwrap_or(0)
    }

    /// The experts each token is routed to (HF's default: 2).
    pub fn experts_per_token(&self) -> usize {
        self.num_experts_per_tok.unwrap_or(2)
    }

    /// Whether a token's router weights, over its experts, are scaled to sum to 1 (Mixtral and
    /// Granite MoE always, the latter as a softmax of the chosen scores alone; Qwen 3 MoE and OLMoE
    /// as `norm_topk_prob` says, HF's default off).
    pub fn renormalize_experts(&self) -> bool {
        matches!(self.model_type.as_str(), "mixtral" | "granitemoe") || self.norm_topk_prob.unwrap_or(false)
    }

    /// The shared expert's intermediate size (Qwen 2 MoE), where the mixture has one.
    pub fn shared_expert_size(&self) -> Option<usize> {
        self.shared_expert_intermediate_size.filter(|&s| s > 0 && self.experts() > 0)
    }

    /// Each expert's intermediate size.
    pub fn expert_intermediate_size(&self) -> usize {
        self.moe_intermediate_size.unwrap_or(self.intermediate_size)
    }

    /// Whether layer `layer`'s MLP is a mixture of experts (Qwen 3 MoE's `mlp_only_layers` and
    /// `decoder_sparse_step` keep some dense).
    pub fn moe_layer(&self, layer: usize) -> bool {
        self.experts() > 0
            && !self.mlp_only_layers.as_ref().is_some_and(|l| l.contains(&layer))
            && (layer + 1).is_multiple_of(self.decoder_sparse_step.unwrap_or(1).max(1))
    }

    /// The MLP's gate activation by name: `hidden_activation`, else `hidden_act`, else silu (Gemma:
    /// gelu_pytorch_tanh). Gemma's first configs say `hidden_act: "gelu"` and mean the tanh
    /// approximation: HF runs gelu_pytorch_tanh for them, and so does this.
    pub fn activation(&self) -> &str {
        match (self.hidden_activation.as_deref(), self.hidden_act.as_deref(), self.model_type.as_str()) {
            (Some(act), _, _) => act,
            (None, None | Some("gelu"), "gemma") => "gelu_pytorch_tanh",
            (None, act, _) => act.unwrap_or("silu"),
        }
    }

    /// The MLP's activation (of its gate, where it has one): GPT-2's and Phi's `gelu_new` is the
    /// tanh approximation, `gelu` (GPT-NeoX; Gemma's is read above) the exact one.
    pub fn glu_act(&self) -> GluAct {
        match self.activation() {
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" => GluAct::GeluTanh,
            "gelu" => GluAct::GeluErf,
            "relu" => GluAct::Relu,
            "relu2" => GluAct::Relu2,
            _ => GluAct::Silu,
        }
    }

    /// GPT-2, GPT-NeoX, StarCoder 2, Phi, StableLM, OPT, GPT-J and Cohere norm with LayerNorm (the
    /// mean taken out, then a weight, and a bias but for Cohere's), the other families with RMSNorm.
    pub fn layer_norm(&self) -> bool {
        matches!(self.model_type.as_str(), "gpt2" | "gpt_neox" | "starcoder2" | "phi" | "stablelm" | "opt" | "gptj" | "cohere" | "cohere2" | "falcon" | "nemotron" | "olmo" | "bloom" | "mpt" | "gpt_bigcode" | "jais2")
    }

    /// Whether the norms have a weight (OLMo 1's LayerNorms have neither weight nor bias: loaded
    /// as ones and zeros; nanochat's RMSNorms, q's and k's too, have none: ones).
    pub fn norm_weight(&self) -> bool {
        !matches!(self.model_type.as_str(), "olmo" | "nanochat")
    }

    /// Whether RoPE turns each pair the other way (nanochat's: by -angle, its `rotate_half` giving
    /// (x2, -x1)). The same scores as ours with the second of each head's halves negated in q and
    /// k: the loader negates those rows of q_proj and k_proj, and captures of q and k negate them
    /// back (`Hooks`). q's and k's RMSNorms (weightless here) see the same sums of squares.
    pub fn rope_turns_back(&self) -> bool {
        self.model_type == "nanochat"
    }

    /// Whether the norms multiply by 1 + w, their weight w as saved (Gemma's RMSNorms, Nemotron's
    /// LayerNorm1P); llama.cpp's files keep 1 + w.
    pub fn norm_plus_one(&self) -> bool {
        self.gemma() || self.model_type == "nemotron"
    }

    /// Whether the LayerNorms have a bias (Cohere's, OLMo 1's and MPT's have none).
    pub fn norm_bias(&self) -> bool {
        self.layer_norm() && !matches!(self.model_type.as_str(), "cohere" | "cohere2" | "olmo" | "mpt")
    }

    /// Whether the MLP is a plain one, up, the activation, down (GPT-2, GPT-NeoX, StarCoder 2, Phi,
    /// OPT, GPT-J), rather than gated.
    pub fn plain_mlp(&self) -> bool {
        matches!(self.model_type.as_str(), "gpt2" | "gpt_neox" | "starcoder2" | "phi" | "opt" | "gptj" | "falcon" | "nemotron" | "arcee" | "bloom" | "mpt" | "gpt_bigcode" | "jais2" | "nanochat")
    }

    /// Whether q and k rotate by adjacent pairs of dims (GPT-J's and Cohere's RoPE: dims 2i and
    /// 2i + 1 of the rotating ones), where the other families pair dim i with i + r/2 (HF's
    /// `rotate_half`). The loader moves q's and k's rows (and biases) into the second order as
    /// they load, the same move for both, so every score q . k is unchanged and every backend's
    /// RoPE serves (llama.cpp's converter does the same to Llama's, the other way); captures of q
    /// and k are moved back (`Hooks`).
    /// (ERNIE 4.5, Helium and GLM-4 too.)
    pub fn adjacent_rope_pairs(&self) -> bool {
        matches!(self.model_type.as_str(), "gptj" | "cohere" | "cohere2" | "ernie4_5" | "helium" | "glm" | "glm4")
    }

    /// Whether attention and the MLP read the stream as it enters the layer and both add to it
    /// (GPT-NeoX as `use_parallel_residual` says, HF's default true; StableLM likewise, default
    /// false; Phi, GPT-J and Cohere always).
    pub fn parallel_residual(&self) -> bool {
        match self.model_type.as_str() {
            "gpt_neox" => self.use_parallel_residual.unwrap_or(true),
            "stablelm" => self.use_parallel_residual.unwrap_or(false),
            "phi" | "gptj" | "cohere" | "cohere2" => true,
            "falcon" => self.falcon_new() || self.parallel_attn.unwrap_or(true),
            _ => false,
        }
    }

    /// Falcon 40B's layout (`new_decoder_architecture`).
    pub(crate) fn falcon_new(&self) -> bool {
        self.model_type == "falcon" && self.new_decoder_architecture == Some(true)
    }

    /// Whether the MLP reads attention's norm of the stream, having none of its own (Phi, GPT-J,
    /// Cohere; StableLM side by side).
    pub fn shared_norm(&self) -> bool {
        match self.model_type.as_str() {
            "phi" | "gptj" | "cohere" | "cohere2" => true,
            "stablelm" => self.parallel_residual(),
            // Falcon 7B's one norm; 40B's two (`ln_attn`, `ln_mlp`) unless it says one (Falcon 2).
            "falcon" if self.falcon_new() => self.num_ln_in_parallel_attn == Some(1),
            "falcon" => self.parallel_residual(),
            _ => false,
        }
    }

    /// Whether the attention's output projection and the MLP's have biases (GPT-2, GPT-NeoX, Phi,
    /// StarCoder 2 unless `use_bias` is false, OPT unless `enable_bias` is); q, k and v then have
    /// theirs too.
    pub fn dense_bias(&self) -> bool {
        match self.model_type.as_str() {
            "gpt2" | "gpt_neox" | "phi" | "bloom" | "gpt_bigcode" => true,
            "starcoder2" => self.use_bias.unwrap_or(true),
            "opt" => self.enable_bias.unwrap_or(true),
            "falcon" => self.bias.unwrap_or(false),
            _ => false,
        }
    }

    /// Whether the MLP's projections have biases: with `dense_bias`, GPT-J's (whose attention has
    /// none), Nemotron's, Arcee's and Jais 2's where `mlp_bias` says.
    pub fn mlp_bias(&self) -> bool {
        self.dense_bias() || self.model_type == "gptj" || (matches!(self.model_type.as_str(), "nemotron" | "arcee" | "jais2") && self.mlp_bias == Some(true))
    }

    /// Whether attention's output projection has a bias: with `dense_bias`, and where
    /// `attention_bias` says in the families whose o_proj HF builds with it (Llama, Qwen 3, Granite,
    /// OLMo, Gemma, SmolLM3, Cohere; not Mistral, Mixtral, Qwen 2, Phi-3 or StableLM, whose q, k and v
    /// alone take it; Seed-OSS's takes `attention_out_bias`).
    pub fn o_bias(&self) -> bool {
        if self.model_type == "seed_oss" {
            return self.attention_out_bias.unwrap_or(false);
        }
        self.dense_bias()
            || (self.attention_bias && !matches!(self.model_type.as_str(), "mistral" | "ministral" | "mixtral" | "qwen2" | "qwen2_moe" | "phi3" | "stablelm" | "helium" | "glm" | "glm4"))
    }

    /// Whether the unembedding has a bias (Phi, GPT-J).
    pub fn lm_head_bias(&self) -> bool {
        matches!(self.model_type.as_str(), "phi" | "gptj")
    }

    /// The config as transformers reads it for this family: the fields as serialized, and where a
    /// family reads some under names of its own (GPT-2's `n_inner`, the LayerNorm families'
    /// epsilon, GPT-NeoX's parallel layout, StarCoder 2's biases), those too.
    pub fn hf_json(&self) -> Json {
        let mut v = serde_json::to_value(self).expect("a config serializes");
        let own: &[(&str, Json)] = match self.model_type.as_str() {
            "gpt2" => &[
                ("n_inner", self.intermediate_size.into()),
                ("layer_norm_epsilon", self.rms_norm_eps.into()),
                ("activation_function", self.activation().into()),
            ],
            "gpt_neox" => &[("layer_norm_eps", self.rms_norm_eps.into()), ("use_parallel_residual", self.parallel_residual().into())],
            "starcoder2" => &[("norm_epsilon", self.rms_norm_eps.into()), ("use_bias", self.dense_bias().into())],
            "phi" => &[("layer_norm_eps", self.rms_norm_eps.into())],
            "opt" => &[
                ("ffn_dim", self.intermediate_size.into()),
                ("activation_function", self.activation().into()),
                ("enable_bias", self.dense_bias().into()),
            ],
            "gptj" => &[
                ("n_inner", self.intermediate_size.into()),
                ("layer_norm_epsilon", self.rms_norm_eps.into()),
                ("activation_function", self.activation().into()),
                ("rotary_dim", self.rotary_dim().into()),
            ],
            "cohere" | "cohere2" | "jais2" => &[("layer_norm_eps", self.rms_norm_eps.into())],
            "nemotron" => &[("norm_eps", self.rms_norm_eps.into())],
            "bloom" => &[("layer_norm_epsilon", self.rms_norm_eps.into())],
            "gpt_bigcode" => &[
                ("n_inner", self.intermediate_size.into()),
                ("layer_norm_epsilon", self.rms_norm_eps.into()),
                ("activation_function", self.activation().into()),
                ("n_positions", self.max_position_embeddings.into()),
                ("multi_query", (self.kv_heads() == 1).into()),
            ],
            "mpt" => &[
                ("layer_norm_epsilon", self.rms_norm_eps.into()),
                ("expansion_ratio", (self.intermediate_size / self.hidden_size.max(1)).into()),
                ("max_seq_len", self.max_position_embeddings.into()),
                ("attn_config", serde_json::json!({"alibi": true, "alibi_bias_max": self.alibi_bias(), "softmax_scale": self.attention_multiplier})),
            ],
            "falcon" => &[
                ("layer_norm_epsilon", self.rms_norm_eps.into()),
                ("num_kv_heads", self.kv_heads().into()),
                ("ffn_hidden_size", self.intermediate_size.into()),
                ("activation", self.activation().into()),
            ],
            "stablelm" => &[
                ("layer_norm_eps", self.rms_norm_eps.into()),
                ("use_parallel_residual", self.parallel_residual().into()),
                ("use_qkv_bias", self.qkv_bias().into()),
            ],
            _ => &[],
        };
        if let Some(o) = v.as_object_mut() {
            for (k, x) in own {
                o.insert(k.to_string(), x.clone());
            }
        }
        v
    }

    /// The dims of each head that rotate (all of them but for partial RoPE; None where no layer
    /// rotates: GPT-2).
    pub fn rotary_dim(&self) -> Option<usize> {
        match (self.learned_positions() || self.alibi_bias() > 0.0, self.rotary_dims()) {
            (true, _) => None,
            (false, Ok(0) | Err(_)) => Some(self.head_dim()),
            (false, Ok(r)) => Some(r),
        }
    }

    /// Whether positions enter the stream as learned embeddings added to the tokens' (GPT-2, OPT),
    /// in place of RoPE.
    pub fn learned_positions(&self) -> bool {
        matches!(self.model_type.as_str(), "gpt2" | "opt" | "gpt_bigcode")
    }

    /// The row of the learned positions' table that position 0 reads: OPT's table begins with two
    /// rows no position reads (fairseq's padding offset), so it has `max_position_embeddings + 2`.
    pub fn position_offset(&self) -> usize {
        if self.model_type == "opt" { 2 } else { 0 }
    }

    /// How layer `layer`'s attention scores: its scale, soft-cap and sliding window.
    pub fn scores(&self, layer: usize) -> Scores {
        let scale = self.attention_multiplier.unwrap_or_else(|| 1.0 / self.query_pre_attn_scalar.unwrap_or(self.head_dim() as f64).sqrt());
        let window = self.sliding_window.filter(|_| self.sliding(layer)).map_or(0, |w| w.min(u32::MAX as usize) as u32);
        Scores { scale: scale as f32, softcap: self.attn_logit_softcapping.unwrap_or(0.0) as f32, window, alibi: self.alibi_bias() as f32 }
    }

    /// ALiBi's largest bias where the family biases scores by distance in place of RoPE (0: not):
    /// Bloom's 8, MPT's `alibi_bias_max` (8 where absent).
    pub fn alibi_bias(&self) -> f64 {
        match self.model_type.as_str() {
            "bloom" => 8.0,
            "mpt" => self.alibi_bias_max.unwrap_or(8.0),
            _ => 0.0,
        }
    }

    /// Whether the embeddings are LayerNormed as they enter the stream (Bloom's
    /// `word_embeddings_layernorm`).
    pub fn embed_norm(&self) -> bool {
        matches!(self.model_type.as_str(), "bloom" | "nanochat")
    }

    /// Whether layer `layer` attends through the sliding window (where the config has one).
    fn sliding(&self, layer: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(layer).is_some_and(|t| t == "sliding_attention"),
            None => self.use_sliding_window != Some(false),
        }
    }

    /// How layer `layer` rotates q and k: `rope()`, on Gemma 3's sliding-window layers plain RoPE
    /// of base `rope_local_base_freq` (HF's default for Gemma 3, 10000, where it is absent), and
    /// not at all (None) on SmolLM3's NoPE layers.
    pub fn layer_rope(&self, layer: usize) -> std::result::Result<Option<RopeConfig>, String> {
        let rotates = match (&self.no_rope_layers, self.model_type.as_str()) {
            // GPT-2's and OPT's positions are learned embeddings, Bloom's and MPT's ALiBi's biases:
            // nothing rotates.
            _ if self.learned_positions() || self.alibi_bias() > 0.0 => false,
            (Some(list), _) => list.get(layer) != Some(&0),
            (None, "smollm3") => (layer + 1) % self.no_rope_layer_interval.unwrap_or(4).max(1) != 0,
            // Command R7B and A rotate on their sliding-window layers alone.
            (None, "cohere2") => self.sliding(layer),
            // EXAONE 4 too, where it has a window at all.
            (None, "exaone4") => self.sliding_window.is_none() || self.sliding(layer),
            _ => true,
        };
        let local = self.rope_local_base_freq.or((self.model_type == "gemma3_text").then_some(10_000.0));
        match local {
            _ if !rotates => Ok(None),
            Some(base) if self.sliding(layer) => Ok(Some(RopeConfig::new(base as f32))),
            _ => self.rope().map(Some),
        }
    }

    /// `layer_rope` of every layer.
    pub fn ropes(&self) -> std::result::Result<Vec<Option<RopeConfig>>, String> {
        (0..self.num_hidden_layers).map(|l| self.layer_rope(l)).collect()
    }

    /// What the embeddings are multiplied by as they enter the stream: sqrt(hidden) for Gemma,
    /// Granite's `embedding_multiplier`.
    pub fn embed_scale(&self) -> f32 {
        if self.gemma() {
            (self.hidden_size as f32).sqrt()
        } else {
            self.embedding_multiplier.unwrap_or(1.0) as f32
        }
    }

    /// What attention's and the MLP's outputs are multiplied by as they join the stream (Granite's
    /// `residual_multiplier`; 1 elsewhere).
    pub fn residual_scale(&self) -> f32 {
        self.residual_multiplier.unwrap_or(1.0) as f32
    }

    /// What the logits are multiplied by (Cohere's `logit_scale`, 1 / Granite's `logits_scaling`;
    /// 1 elsewhere).
    pub fn logits_scale(&self) -> f32 {
        self.logit_scale.unwrap_or(1.0 / self.logits_scaling.unwrap_or(1.0)) as f32
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Qwen 3 (MoE too) and Gemma 3 norm each head of q and k (RMSNorm, a weight of head_dim;
    /// Gemma's 1 + w) before RoPE, OLMo 2 and OLMoE all heads at once (a weight of heads x head_dim);
    /// nanochat's after RoPE without a weight, the same as before (a rotation keeps the sum of squares).
    pub fn qk_norm(&self) -> bool {
        matches!(self.model_type.as_str(), "qwen3" | "qwen3_moe" | "gemma3_text" | "exaone4" | "nanochat") || self.qk_norm_across_heads()
    }

    /// OLMo 2 and 3, OLMoE: q and k normed across all heads at once.
    fn qk_norm_across_heads(&self) -> bool {
        self.olmo() || self.model_type == "olmoe"
    }

    /// The width q's and k's RMSNorm takes at once: (q's, k's).
    pub fn qk_norm_width(&self) -> (usize, usize) {
        match self.qk_norm_across_heads() {
            true => (self.num_attention_heads * self.head_dim(), self.kv_heads() * self.head_dim()),
            false => (self.head_dim(), self.head_dim()),
        }
    }

    /// Whether attention and the MLP read the stream through a norm of their own (OLMo 2's read it
    /// as it is, and norm what they add to it instead).
    pub fn pre_norms(&self) -> bool {
        !self.olmo() && self.model_type != "exaone4"
    }

    /// Whether what attention and the MLP add to the stream is RMS-normed first (Gemma 2 and 3,
    /// OLMo 2 and 3).
    pub fn post_norms(&self) -> bool {
        matches!(self.model_type.as_str(), "gemma2" | "gemma3_text" | "exaone4" | "glm4") || self.olmo()
    }

    /// Qwen2 always has q/k/v biases; Llama has them when `attention_bias` is set; the families with
    /// biases on every projection (`dense_bias`) too.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || matches!(self.model_type.as_str(), "qwen2" | "qwen2_moe") || self.dense_bias() || self.use_qkv_bias == Some(true)
    }

    /// The longest sequence the model serves: its trained context.
    pub fn context_len(&self) -> usize {
        self.max_position_embeddings
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(Json::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Json::Array(a)) => a.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect(),
            _ => vec![],
        }
    }

    pub fn rope(&self) -> std::result::Result<RopeConfig, String> {
        let theta = self.rope_theta as f32;
        let rotary_dims = self.rotary_dims()? as u32;
        let Some(s) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) else {
            return Ok(RopeConfig { rotary_dims, ..RopeConfig::new(theta) });
        };
        let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Json::as_str).unwrap_or("");
        let f = |k: &str| s.get(k).and_then(Json::as_f64).ok_or_else(|| format!("{kind} scaling needs {k}"));
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: f("factor")? as f32 },
            "llama3" => RopeScaling::Llama3 {
                factor: f("factor")? as f32,
                low_freq_factor: f("low_freq_factor")? as f32,
                high_freq_factor: f("high_freq_factor")? as f32,
                original_max_position: f("original_max_position_embeddings")? as u32,
            },
            "longrope" => self.longrope(s)?,
            "yarn" => self.yarn(s)?,
            other => return Err(format!("rope type {other:?} is not supported (linear, llama3, longrope, yarn are)")),
        };
        Ok(RopeConfig { theta, scaling, rotary_dims })
    }

    /// Partial RoPE's rotating dims (`partial_rotary_factor` of the head dim: Phi-4-mini's 0.75);
    /// 0 where all rotate.
    fn rotary_dims(&self) -> std::result::Result<usize, String> {
        let d = self.head_dim();
        match self.partial_rotary_factor.filter(|&f| f != 1.0) {
            None => Ok(0),
            Some(f) => {
                let r = (d as f64 * f).round();
                if !(f > 0.0 && f < 1.0) || r as usize % 2 != 0 || (r - d as f64 * f).abs() > 1e-6 {
                    return Err(format!("partial_rotary_factor {f} of a head dim of {d} is not an even number of dims"));
                }
                Ok(r as usize)
            }
        }
    }
}

impl ModelConfig {
    /// YaRN (Qwen 2.5 and 3 past 32k, DeepSeek V3) as HF computes it: each pair's frequency blended
    /// between itself (the fast ones, which turn `beta_fast` times or more over the original
    /// context) and itself over `factor` (the slow ones, `beta_slow` turns or fewer) along a linear
    /// ramp over the pairs between (its ends rounded outwards unless `truncate` is false); cos and
    /// sin times `attention_factor`, by default 0.1 ln(factor) + 1 (with DeepSeek's `mscale` and
    /// `mscale_all_dim`, the ratio of two such). As per-pair divisors (`RopeScaling::Factors`), the
    /// form every backend already takes for LongRoPE.
    fn yarn(&self, s: &Json) -> std::result::Result<RopeScaling, String> {
        let get = |k: &str| s.get(k).and_then(Json::as_f64);
        let orig = get("original_max_position_embeddings")
            .or(self.original_max_position_embeddings.map(|o| o as f64))
            .ok_or("yarn scaling needs original_max_position_embeddings")?;
        let factor = get("factor").unwrap_or(self.max_position_embeddings as f64 / orig);
        if !(factor.is_finite() && factor > 0.0 && orig >= 1.0) {
            return Err(format!("yarn factor {factor} over an original context of {orig}"));
        }
        let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
        let attention_factor = match (get("attention_factor"), get("mscale").filter(|&m| m != 0.0), get("mscale_all_dim").filter(|&m| m != 0.0)) {
            (Some(f), _, _) => f,
            (None, Some(m), Some(all)) => mscale(factor, m) / mscale(factor, all),
            (None, _, _) => mscale(factor, 1.0),
        };
        let (fast, slow) = (get("beta_fast").filter(|&b| b != 0.0).unwrap_or(32.0), get("beta_slow").filter(|&b| b != 0.0).unwrap_or(1.0));
        let dim = match self.rotary_dims()? {
            0 => self.head_dim(),
            r => r,
        };
        let pairs = dim / 2;
        if pairs > MAX_ROPE_PAIRS {
            return Err(format!("{dim} rotating dims are more than yarn's {MAX_ROPE_PAIRS} pairs"));
        }
        let base = self.rope_theta;
        // The pair (as a dim, fractional) whose wavelength turns `rotations` times over the context.
        let correction = |rotations: f64| (dim as f64 * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
        let (mut low, mut high) = (correction(fast), correction(slow));
        if s.get("truncate").and_then(Json::as_bool).unwrap_or(true) {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, high) = (low.max(0.0), high.min(dim as f64 - 1.0));
        let high = if low == high { high + 0.001 } else { high };
        let mut divisors = [1f32; MAX_ROPE_PAIRS];
        for (i, d) in divisors[..pairs].iter_mut().enumerate() {
            // 1 where the pair keeps its frequency, 0 where it is divided by the factor.
            let keep = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            *d = (1.0 / (keep + (1.0 - keep) / factor)) as f32;
        }
        Ok(RopeScaling::Factors { attention_factor: attention_factor as f32, pairs: pairs as u32, divisors })
    }

    /// LongRoPE (Phi-3.5) as HF computes it: the long factors when the context served (here the
    /// model's whole `max_position_embeddings`) is past the pretrained one, else the short ones
    /// (llama.cpp's rule, which picks once per context; HF picks per call by the sequence's length,
    /// so the two agree on every sequence past the pretrained context, and on all when the context
    /// served is within it); cos and sin times `attention_factor`, by default sqrt(1 + ln(factor) /
    /// ln(original)) with factor the served context over the original.
    fn longrope(&self, s: &Json) -> std::result::Result<RopeScaling, String> {
        let orig = s
            .get("original_max_position_embeddings")
            .and_then(Json::as_u64)
            .map(|v| v as usize)
            .or(self.original_max_position_embeddings)
            .ok_or("longrope scaling needs original_max_position_embeddings")?;
        let list = |key: &str| -> std::result::Result<Vec<f32>, String> {
            let v = s.get(key).and_then(Json::as_array).ok_or_else(|| format!("longrope scaling needs {key}"))?;
            v.iter().map(|x| x.as_f64().map(|x| x as f32).ok_or_else(|| format!("{key}: {x} is not a number"))).collect()
        };
        let long = self.context_len() > orig;
        let factors = list(if long { "long_factor" } else { "short_factor" })?;
        // One per rotating pair (partial RoPE: of the rotating dims only).
        let rotary = match self.rotary_dims()? {
            0 => self.head_dim(),
            r => r,
        };
        let pairs = rotary / 2;
        if factors.len() != pairs || pairs > MAX_ROPE_PAIRS {
            return Err(format!("{} longrope factors for {rotary} rotating dims ({pairs} pairs)", factors.len()));
        }
        let factor = s.get("factor").and_then(Json::as_f64).unwrap_or(self.max_position_embeddings as f64 / orig as f64);
        let attention_factor = match s.get("attention_factor").and_then(Json::as_f64) {
            Some(f) => f,
            None if factor <= 1.0 => 1.0,
            None => (1.0 + factor.ln() / (orig as f64).ln()).sqrt(),
        };
        let mut divisors = [1f32; MAX_ROPE_PAIRS];
        divisors[..pairs].copy_from_slice(&factors);
        Ok(RopeScaling::Factors { attention_factor: attention_factor as f32, pairs: pairs as u32, divisors })
    }
}

/// The older families' names for the fields `ModelConfig` reads (GPT-2's `n_embd`, `n_layer`,
/// `n_head`, `n_positions`, `n_inner`, `activation_function`; OPT's `ffn_dim`; each family's name for the norms'
/// epsilon; GPT-NeoX's `rotary_pct` and `rotary_emb_base`), taken under ours where ours is absent;
/// and GPT-2's defaults where its config leaves them out (an MLP 4x the width, tied embeddings).
/// Returns the (theirs, ours) names it adopted.
fn adopt_family_names(json: &mut Json) -> Vec<(&'static str, &'static str)> {
    let mut adopted = Vec::new();
    let Some(o) = json.as_object_mut() else { return adopted };
    const NAMES: [(&str, &str); 14] = [
        ("n_embd", "hidden_size"),
        ("n_embed", "hidden_size"),
        ("n_layer", "num_hidden_layers"),
        ("n_head", "num_attention_heads"),
        ("n_positions", "max_position_embeddings"),
        ("n_inner", "intermediate_size"),
        ("ffn_dim", "intermediate_size"),
        ("activation_function", "hidden_act"),
        ("layer_norm_epsilon", "rms_norm_eps"),
        ("layer_norm_eps", "rms_norm_eps"),
        ("norm_epsilon", "rms_norm_eps"),
        ("norm_eps", "rms_norm_eps"),
        ("rotary_pct", "partial_rotary_factor"),
        ("rotary_emb_base", "rope_theta"),
    ];
    for (theirs, ours) in NAMES {
        if !o.contains_key(ours) {
            if let Some(v) = o.remove(theirs).filter(|v| !v.is_null()) {
                o.insert(ours.to_string(), v);
                adopted.push((theirs, ours));
            }
        }
    }
    let model_type = o.get("model_type").and_then(Json::as_str).unwrap_or("").to_string();
    if matches!(model_type.as_str(), "gpt2" | "gptj" | "gpt_bigcode") {
        default_mlp_width(o, 4);
    }
    if matches!(model_type.as_str(), "gpt2" | "gpt_bigcode") {
        o.entry("tie_word_embeddings").or_insert(true.into());
    }
    // GPT-BigCode: one key/value head where `multi_query` (its default), else one per query head.
    if model_type == "gpt_bigcode" && !o.contains_key("num_key_value_heads") {
        let kv = match o.get("multi_query").and_then(Json::as_bool).unwrap_or(true) {
            true => Some(1.into()),
            false => o.get("num_attention_heads").cloned(),
        };
        if let Some(kv) = kv {
            o.insert("num_key_value_heads".into(), kv);
            adopted.push(("multi_query", "num_key_value_heads"));
        }
        o.entry("hidden_act").or_insert("gelu_pytorch_tanh".into());
    }
    // GPT-J's `rotary_dim`, the rotating dims of each head (all where null), as the fraction of the
    // head the other families write.
    if model_type == "gptj" {
        let (h, n) = (o.get("hidden_size").and_then(Json::as_u64), o.get("num_attention_heads").and_then(Json::as_u64));
        if let (Some(r), Some(h), Some(n)) = (o.remove("rotary_dim").and_then(|r| r.as_u64()), h, n) {
            if n > 0 && h % n == 0 && h / n > 0 && !o.contains_key("partial_rotary_factor") {
                o.insert("partial_rotary_factor".into(), (r as f64 / (h / n) as f64).into());
                adopted.push(("rotary_dim", "partial_rotary_factor"));
            }
        }
    }
    // OLMo 1's LayerNorms are PyTorch's defaults (no epsilon in its config).
    if model_type == "olmo" {
        o.entry("rms_norm_eps").or_insert(1e-5.into());
    }
    // Nemotron and GLM-4 rotate half of each head unless they say otherwise (their configs' default).
    if matches!(model_type.as_str(), "nemotron" | "glm" | "glm4") && o.get("rope_parameters").and_then(|p| p.get("partial_rotary_factor")).is_none() {
        o.entry("partial_rotary_factor").or_insert(0.5.into());
    }
    // Cohere and ERNIE 4.5 tie their embeddings unless the config says otherwise (their configs'
    // default).
    if matches!(model_type.as_str(), "cohere" | "cohere2" | "ernie4_5") {
        o.entry("tie_word_embeddings").or_insert(true.into());
    }
    // EXAONE 4's windowed layers where `layer_types` does not list them: by `sliding_window_pattern`,
    // all but every n-th (4: its default), or as its letters say ("LLLG": L local, G global,
    // repeating; the last layer global); none without a window.
    if model_type == "exaone4" && !o.contains_key("layer_types") {
        let pattern = o.remove("sliding_window_pattern");
        if o.get("sliding_window").is_some_and(|w| !w.is_null()) {
            derive_layer_types(o, |l, layers| match &pattern {
                Some(Json::String(p)) if !p.is_empty() => l + 1 < layers && p.as_bytes()[(l % p.len() as u64) as usize] == b'L',
                p => (l + 1) % p.as_ref().and_then(Json::as_u64).unwrap_or(4).max(1) != 0,
            });
        }
    }
    // Command R7B's and A's windowed layers where `layer_types` does not list them: all but every
    // `sliding_window_pattern`-th (4: Cohere2Config's default).
    if model_type == "cohere2" && !o.contains_key("layer_types") {
        let pattern = o.remove("sliding_window_pattern").and_then(|p| p.as_u64()).unwrap_or(4).max(1);
        derive_layer_types(o, |l, _| (l + 1) % pattern != 0);
    }
    // Falcon: its key/value heads as its attention counts them (`num_kv_heads`, or `n_head_kv`, in
    // the 40B's layout; one where `multi_query`, HF's default; else one per query head), an MLP 4x
    // the width unless `ffn_hidden_size` says, the exact GELU, tied embeddings.
    if model_type == "falcon" {
        let flag = |o: &serde_json::Map<String, Json>, k: &str, default: bool| o.get(k).and_then(Json::as_bool).unwrap_or(default);
        if !o.contains_key("num_key_value_heads") {
            let theirs = o.get("num_kv_heads").or_else(|| o.get("n_head_kv")).filter(|v| !v.is_null()).cloned();
            let kv = match (flag(o, "new_decoder_architecture", false), flag(o, "multi_query", true)) {
                (true, _) => theirs.or_else(|| o.get("num_attention_heads").cloned()),
                (false, true) => Some(1.into()),
                (false, false) => o.get("num_attention_heads").cloned(),
            };
            if let Some(kv) = kv {
                o.insert("num_key_value_heads".into(), kv);
                adopted.push(("num_kv_heads", "num_key_value_heads"));
            }
        }
        adopt_fields(o, &mut adopted, &[("ffn_hidden_size", "intermediate_size"), ("activation", "hidden_act")]);
        default_mlp_width(o, 4);
        o.entry("hidden_act").or_insert("gelu".into());
        o.entry("tie_word_embeddings").or_insert(true.into());
    }
    // Bloom: an MLP 4x the width, Megatron's tanh GELU, tied embeddings.
    if model_type == "bloom" {
        default_mlp_width(o, 4);
        o.entry("hidden_act").or_insert("gelu_pytorch_tanh".into());
        o.entry("tie_word_embeddings").or_insert(true.into());
    }
    // MPT's names (`d_model`, `n_heads`, `n_layers`, `max_seq_len`, the MLP `expansion_ratio` times
    // the stream, 4 where absent) and `attn_config`'s (ALiBi, its largest bias, `clip_qkv`, `qk_ln`,
    // `softmax_scale` as the scores' multiplier); the exact GELU, tied embeddings.
    if model_type == "mpt" {
        adopt_fields(o, &mut adopted, &[("d_model", "hidden_size"), ("n_heads", "num_attention_heads"), ("n_layers", "num_hidden_layers"), ("max_seq_len", "max_position_embeddings")]);
        if let Some(Json::Object(attn)) = o.remove("attn_config") {
            const ATTN: [(&str, &str, &str); 5] = [
                ("alibi", "attn_config.alibi", "alibi"),
                ("alibi_bias_max", "attn_config.alibi_bias_max", "alibi_bias_max"),
                ("clip_qkv", "attn_config.clip_qkv", "clip_qkv"),
                ("qk_ln", "attn_config.qk_ln", "qk_layernorm"),
                ("softmax_scale", "attn_config.softmax_scale", "attention_multiplier"),
            ];
            for (key, theirs, ours) in ATTN {
                if let Some(v) = attn.get(key).filter(|v| !v.is_null() && !o.contains_key(ours)) {
                    o.insert(ours.into(), v.clone());
                    adopted.push((theirs, ours));
                }
            }
        }
        let ratio = o.remove("expansion_ratio").and_then(|r| r.as_u64()).unwrap_or(4);
        default_mlp_width(o, ratio);
        o.entry("rms_norm_eps").or_insert(1e-5.into());
        o.entry("hidden_act").or_insert("gelu".into());
        o.entry("tie_word_embeddings").or_insert(true.into());
    }
    // OPT's LayerNorms are PyTorch's defaults (no epsilon in its config); it ties its embeddings
    // unless the config says otherwise.
    if o.get("model_type").and_then(Json::as_str) == Some("opt") {
        o.entry("rms_norm_eps").or_insert(1e-5.into());
        o.entry("tie_word_embeddings").or_insert(true.into());
    }
    adopted
}

/// `theirs` read as `ours` (and dropped) where the config has it and not ours: a family's own names
/// for fields of ours, noted in `adopted` so errors name theirs.
fn adopt_fields(o: &mut serde_json::Map<String, Json>, adopted: &mut Vec<(&'static str, &'static str)>, names: &[(&'static str, &'static str)]) {
    for &(theirs, ours) in names {
        if let Some(v) = o.remove(theirs).filter(|v| !v.is_null() && !o.contains_key(ours)) {
            o.insert(ours.into(), v);
            adopted.push((theirs, ours));
        }
    }
}

/// An MLP `ratio` times the stream's width where the config gives no `intermediate_size`.
fn default_mlp_width(o: &mut serde_json::Map<String, Json>, ratio: u64) {
    if let (false, Some(h)) = (o.contains_key("intermediate_size"), o.get("hidden_size").and_then(Json::as_u64)) {
        o.insert("intermediate_size".into(), h.saturating_mul(ratio).into());
    }
}

/// `layer_types` of every layer, windowed where `local(layer, layers)` says.
fn derive_layer_types(o: &mut serde_json::Map<String, Json>, local: impl Fn(u64, u64) -> bool) {
    if let Some(layers) = o.get("num_hidden_layers").and_then(Json::as_u64) {
        let layers = layers.min(1 << 16);
        let kind = |l: u64| if local(l, layers) { "sliding_attention" } else { "full_attention" };
        o.insert("layer_types".into(), (0..layers).map(kind).collect::<Vec<_>>().into());
    }
}

/// Llama 3's RoPE scaling as HF's config writes it, from the per-frequency divisors llama.cpp stores
/// instead (its convert_hf_to_gguf.py computes them from those four numbers): `factor` is the
/// largest divisor; the wavelength band is searched over the values models use, and the one that
/// gives back every divisor (within 1e-4) is taken. Refused, saying so, when none does.
fn llama3_from_freq_factors(freqs: &[f32], theta: f64, head_dim: usize) -> std::result::Result<Json, String> {
    if freqs.len() * 2 != head_dim {
        return Err(format!("{} factors for a head dim of {head_dim}", freqs.len()));
    }
    if freqs.iter().all(|&f| f == 1.0) {
        return Ok(serde_json::json!({"rope_type": "default"}));
    }
    let factor = freqs.iter().cloned().fold(0f32, f32::max);
    // The divisors a scaling gives are the unscaled frequencies over the scaled ones, as every
    // backend computes them (`RopeConfig::inv_freq`).
    let plain = RopeConfig::new(theta as f32).inv_freq(head_dim);
    for orig in (4..=20).map(|p| 1u32 << p) {
        for (low, high) in [(1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (0.5, 4.0)] {
            let scaling = RopeScaling::Llama3 { factor, low_freq_factor: low, high_freq_factor: high, original_max_position: orig };
            let scaled = RopeConfig::scaled(theta as f32, scaling).inv_freq(head_dim);
            let fits = plain.iter().zip(&scaled).zip(freqs).all(|((p, s), &f)| (p / s - f as f64).abs() <= 1e-4 * f.max(1.0) as f64);
            if fits {
                return Ok(serde_json::json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": orig,
                }));
            }
        }
    }
    Err(format!("per-frequency factors {freqs:?} are not Llama 3's scaling for any usual original context"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_is_recovered_from_llama_cpp_frequency_factors() {
        // Llama 3.1 8B: theta 500000, head dim 128, factor 8, low 1, high 4, original context 8192;
        // the divisors as llama.cpp's converter computes them (in f32).
        let (theta, d) = (500000f64, 128usize);
        let freqs: Vec<f32> = (0..d / 2)
            .map(|i| {
                let wavelen = 2.0 * std::f64::consts::PI * theta.powf(2.0 * i as f64 / d as f64);
                if wavelen < 8192.0 / 4.0 {
                    1.0
                } else if wavelen > 8192.0 {
                    8.0
                } else {
                    let smooth = (8192.0 / wavelen - 1.0) / 3.0;
                    (1.0 / ((1.0 - smooth) / 8.0 + smooth)) as f32
                }
            })
            .collect();
        let got = llama3_from_freq_factors(&freqs, theta, d).unwrap();
        assert_eq!(got["rope_type"], "llama3");
        assert_eq!((got["factor"].as_f64(), got["original_max_position_embeddings"].as_f64()), (Some(8.0), Some(8192.0)));
        assert_eq!((got["low_freq_factor"].as_f64(), got["high_freq_factor"].as_f64()), (Some(1.0), Some(4.0)));
        // Factors of another form are refused, not guessed.
        let mut odd = freqs.clone();
        odd[3] = 2.5;
        assert!(llama3_from_freq_factors(&odd, theta, d).is_err());
    }

    fn write(name: &str, json: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("highrise-config-{}-{name}.json", std::process::id()));
        std::fs::write(&path, json).unwrap();
        path
    }

    #[test]
    fn named_shapes_are_valid_configs() {
        for name in ModelConfig::SHAPES {
            let c = ModelConfig::shape(name).unwrap();
            // Written as transformers reads the family's config, read back as a file is.
            let path = write(name, &serde_json::to_string(&c.hf_json()).unwrap());
            let back = ModelConfig::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((back.head_dim(), back.kv_heads(), back.intermediate_size), (c.head_dim(), c.kv_heads(), c.intermediate_size), "{name}");
        }
        assert!(ModelConfig::shape("no-such-shape").is_none());
    }

    /// Which layers are mixtures: all of a mixture model's but those `mlp_only_layers` names and
    /// all but every `decoder_sparse_step`-th (Qwen 3 MoE); a mixture's settings checked.
    #[test]
    fn mixture_layers_and_settings() {
        let c = ModelConfig::shape("tiny-qwen3-moe").unwrap();
        assert_eq!((0..2).map(|l| c.moe_layer(l)).collect::<Vec<_>>(), [false, true]);
        assert_eq!((c.experts(), c.experts_per_token(), c.expert_intermediate_size(), c.renormalize_experts()), (8, 2, 128, true));
        let c = ModelConfig { decoder_sparse_step: Some(2), mlp_only_layers: None, num_hidden_layers: 4, ..c };
        assert_eq!((0..4).map(|l| c.moe_layer(l)).collect::<Vec<_>>(), [false, true, false, true]);
        let m = ModelConfig::shape("tiny-mixtral").unwrap();
        assert!(m.renormalize_experts() && m.moe_layer(0) && m.expert_intermediate_size() == m.intermediate_size);
        assert!(!ModelConfig::shape("tiny").unwrap().moe_layer(0));
        let base = r#""vocab_size": 8, "hidden_size": 64, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4"#;
        for (name, extra, field) in [
            ("moe-k", r#""model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 5"#, "num_experts_per_tok"),
            ("moe-none", r#""model_type": "olmoe""#, "num_local_experts"),
            ("moe-size", r#""model_type": "qwen3_moe", "num_experts": 4, "moe_intermediate_size": 0"#, "moe_intermediate_size"),
        ] {
            let e = ModelConfig::from_file(&write(name, &format!("{{{base}, {extra}}}"))).unwrap_err().to_string();
            assert!(e.contains(field), "{name}: {e}");
        }
    }

    /// GPT-2's config under its own names reads as ours (n_embd..., an MLP 4x wide where n_inner
    /// is null, tied embeddings by default), and is written back with the names transformers reads
    /// for the MLP's width and the norms' epsilon.
    #[test]
    fn gpt2_config_names_both_ways() {
        let path = write("gpt2", r#"{"model_type": "gpt2", "vocab_size": 8, "n_embd": 64, "n_layer": 2, "n_head": 4,
            "n_positions": 32, "n_inner": null, "layer_norm_epsilon": 1e-6, "activation_function": "gelu_new"}"#);
        let c = ModelConfig::from_file(&path).unwrap();
        assert_eq!((c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.max_position_embeddings), (64, 2, 4, 32));
        assert_eq!((c.intermediate_size, c.rms_norm_eps, c.tie_word_embeddings, c.glu_act()), (256, 1e-6, true, GluAct::GeluTanh));
        assert!(c.layer_norm() && c.learned_positions() && c.rotary_dim().is_none() && c.ropes().unwrap().iter().all(Option::is_none));
        let j = c.hf_json();
        assert_eq!((j["n_inner"].as_u64(), j["layer_norm_epsilon"].as_f64(), j["activation_function"].as_str()), (Some(256), Some(1e-6), Some("gelu_new")));
        let neox = write("neox", r#"{"model_type": "gpt_neox", "vocab_size": 8, "hidden_size": 64, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 4, "rotary_pct": 0.25, "rotary_emb_base": 500.0, "layer_norm_eps": 1e-5,
            "hidden_act": "gelu", "use_parallel_residual": false}"#);
        let c = ModelConfig::from_file(&neox).unwrap();
        assert_eq!((c.rotary_dim(), c.rope_theta, c.glu_act(), c.parallel_residual()), (Some(4), 500.0, GluAct::GeluErf, false));
        let bad = write("gpt2-idx", r#"{"model_type": "gpt2", "vocab_size": 8, "n_embd": 64, "n_layer": 2, "n_head": 4,
            "scale_attn_by_inverse_layer_idx": true}"#);
        let e = ModelConfig::from_file(&bad).unwrap_err().to_string();
        assert!(e.contains("scale_attn_by_inverse_layer_idx"), "{e}");
        // Errors name the field as the file does.
        for (name, json, field) in [
            ("gpt2-embd", r#"{"model_type": "gpt2", "vocab_size": 8, "n_embd": "wide", "n_layer": 2, "n_head": 4}"#, "n_embd"),
            ("gpt2-inner", r#"{"model_type": "gpt2", "vocab_size": 8, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 0}"#, "n_inner"),
        ] {
            let e = ModelConfig::from_file(&write(name, json)).unwrap_err().to_string();
            assert!(e.contains(field) && !e.contains("hidden_size") && !e.contains("intermediate_size"), "{e}");
        }
    }

    /// OPT's config: `ffn_dim` as the MLP's width, PyTorch's LayerNorm epsilon, tied embeddings,
    /// ReLU, positions from row 2; OPT-350m's post-norm layers and projected embeddings, and the
    /// variants without a final norm or affine norms, refused naming their fields.
    #[test]
    fn opt_config_and_its_refusals() {
        let base = r#""model_type": "opt", "vocab_size": 8, "hidden_size": 64, "ffn_dim": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "activation_function": "relu", "max_position_embeddings": 16"#;
        let c = ModelConfig::from_file(&write("opt", &format!("{{{base}}}"))).unwrap();
        assert_eq!((c.intermediate_size, c.rms_norm_eps, c.tie_word_embeddings, c.glu_act(), c.position_offset()), (32, 1e-5, true, GluAct::Relu, 2));
        assert!(c.layer_norm() && c.plain_mlp() && c.dense_bias() && c.qkv_bias() && c.learned_positions() && c.rotary_dim().is_none());
        assert_eq!(c.hf_json()["ffn_dim"].as_u64(), Some(32));
        for (extra, field) in [
            (r#""do_layer_norm_before": false"#, "do_layer_norm_before"),
            (r#""word_embed_proj_dim": 32"#, "word_embed_proj_dim"),
            (r#""_remove_final_layer_norm": true"#, "_remove_final_layer_norm"),
            (r#""layer_norm_elementwise_affine": false"#, "layer_norm_elementwise_affine"),
        ] {
            let e = ModelConfig::from_file(&write(field, &format!("{{{base}, {extra}}}"))).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        let c = ModelConfig::from_file(&write("opt-nobias", &format!(r#"{{{base}, "enable_bias": false, "word_embed_proj_dim": 64}}"#))).unwrap();
        assert!(!c.dense_bias() && !c.qkv_bias());
    }

    /// GPT-J's own names (`rotary_dim` as the other families' fraction, `n_inner` null as 4x the
    /// width) and Cohere's defaults and refusal; both rotate adjacent pairs and run side by side.
    #[test]
    fn gptj_and_cohere_configs() {
        let gptj = r#""model_type": "gptj", "vocab_size": 8, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": null,
            "n_positions": 16, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5"#;
        let c = ModelConfig::from_file(&write("gptj", &format!(r#"{{{gptj}, "rotary_dim": 4}}"#))).unwrap();
        assert_eq!((c.intermediate_size, c.rotary_dim(), c.tie_word_embeddings, c.glu_act()), (256, Some(4), false, GluAct::GeluTanh));
        assert!(c.adjacent_rope_pairs() && c.parallel_residual() && c.shared_norm() && c.plain_mlp() && c.norm_bias());
        assert!(c.mlp_bias() && c.lm_head_bias() && !c.qkv_bias() && !c.o_bias());
        assert_eq!((c.hf_json()["rotary_dim"].as_u64(), c.hf_json()["n_inner"].as_u64()), (Some(4), Some(256)));
        // An odd count of rotating dims is named as GPT-J's config names it.
        let e = ModelConfig::from_file(&write("gptj-odd", &format!(r#"{{{gptj}, "rotary_dim": 3}}"#))).unwrap_err().to_string();
        assert!(e.contains("rotary_dim"), "{e}");
        let cohere = r#""model_type": "cohere", "vocab_size": 8, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "logit_scale": 0.0625"#;
        let c = ModelConfig::from_file(&write("cohere", &format!("{{{cohere}}}"))).unwrap();
        assert_eq!((c.logits_scale(), c.tie_word_embeddings, c.rotary_dim()), (0.0625, true, Some(16)));
        assert!(c.adjacent_rope_pairs() && c.layer_norm() && !c.norm_bias() && !c.plain_mlp() && !c.o_bias());
        let c = ModelConfig::from_file(&write("cohere-bias", &format!(r#"{{{cohere}, "attention_bias": true}}"#))).unwrap();
        assert!(c.qkv_bias() && c.o_bias() && !c.mlp_bias());
        let e = ModelConfig::from_file(&write("cohere-qk", &format!(r#"{{{cohere}, "use_qk_norm": true}}"#))).unwrap_err().to_string();
        assert!(e.contains("use_qk_norm"), "{e}");
    }

    /// Falcon's key/value heads as its attention counts them in each layout, its norms, and its
    /// refusals (ALiBi, a LayerNorm count but 1 or 2).
    #[test]
    fn falcon_layouts() {
        let base = r#""model_type": "falcon", "vocab_size": 8, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4"#;
        let read = |name: &str, extra: &str| ModelConfig::from_file(&write(name, &format!("{{{base}{extra}}}")));
        // The 7B's: multi-query by default, one norm side by side, the exact GELU, 4x the width, tied.
        let c = read("falcon-7b", "").unwrap();
        assert_eq!((c.kv_heads(), c.intermediate_size, c.glu_act(), c.tie_word_embeddings), (1, 256, GluAct::GeluErf, true));
        assert!(c.parallel_residual() && c.shared_norm() && c.plain_mlp() && !c.dense_bias() && !c.adjacent_rope_pairs());
        assert_eq!(read("falcon-mha", r#", "multi_query": false"#).unwrap().kv_heads(), 4);
        let c = read("falcon-seq", r#", "parallel_attn": false, "bias": true"#).unwrap();
        assert!(!c.parallel_residual() && !c.shared_norm() && c.dense_bias() && c.qkv_bias() && c.o_bias());
        // The 40B's: grouped by `num_kv_heads` (or the older `n_head_kv`), two norms unless it says one.
        let c = read("falcon-40b", r#", "new_decoder_architecture": true, "num_kv_heads": 2, "ffn_hidden_size": 96"#).unwrap();
        assert_eq!((c.kv_heads(), c.intermediate_size), (2, 96));
        assert!(c.parallel_residual() && !c.shared_norm());
        assert_eq!(c.hf_json()["num_kv_heads"].as_u64(), Some(2));
        let c = read("falcon-n-head-kv", r#", "new_decoder_architecture": true, "n_head_kv": 2, "num_ln_in_parallel_attn": 1"#).unwrap();
        assert!(c.kv_heads() == 2 && c.shared_norm());
        for (extra, field) in [(r#", "alibi": true"#, "alibi"), (r#", "new_decoder_architecture": true, "num_ln_in_parallel_attn": 3"#, "num_ln_in_parallel_attn")] {
            let e = read(field, extra).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    /// Bloom's and MPT's names and defaults: ALiBi (8; MPT's `attn_config.alibi_bias_max`) and no
    /// RoPE, Bloom's 4x MLP and tanh GELU and normed embeddings, MPT's `d_model`, `n_heads`,
    /// `n_layers`, `expansion_ratio`, `softmax_scale`, bias-free LayerNorm; what they cannot run
    /// refused by field: MPT without ALiBi, with biases, q/k LayerNorms or clamps; Bloom's stream of
    /// normed inputs.
    #[test]
    fn bloom_and_mpt_configs() {
        let bloom = r#""model_type": "bloom", "vocab_size": 8, "hidden_size": 64, "n_layer": 2, "n_head": 4, "layer_norm_epsilon": 1e-5"#;
        let c = ModelConfig::from_file(&write("bloom", &format!("{{{bloom}}}"))).unwrap();
        assert_eq!((c.alibi_bias(), c.rotary_dim(), c.intermediate_size, c.glu_act()), (8.0, None, 256, GluAct::GeluTanh));
        assert!(c.embed_norm() && c.layer_norm() && c.norm_bias() && c.dense_bias() && c.qkv_bias() && c.tie_word_embeddings && c.ropes().unwrap().iter().all(Option::is_none));
        assert_eq!(c.scores(1).alibi_slope(0, 4), 0.25);
        let e = ModelConfig::from_file(&write("bloom-post", &format!(r#"{{{bloom}, "apply_residual_connection_post_layernorm": true}}"#))).unwrap_err().to_string();
        assert!(e.contains("apply_residual_connection_post_layernorm"), "{e}");
        let mpt = r#""model_type": "mpt", "vocab_size": 8, "d_model": 64, "n_layers": 2, "n_heads": 4, "expansion_ratio": 2, "max_seq_len": 128"#;
        let read = |name: &str, attn: &str, extra: &str| ModelConfig::from_file(&write(name, &format!(r#"{{{mpt}, "attn_config": {{{attn}}}{extra}}}"#)));
        let c = read("mpt", r#""alibi": true, "alibi_bias_max": 16, "softmax_scale": 0.5"#, "").unwrap();
        assert_eq!((c.hidden_size, c.num_attention_heads, c.num_hidden_layers, c.intermediate_size, c.max_position_embeddings), (64, 4, 2, 128, 128));
        assert_eq!((c.alibi_bias(), c.scores(0).scale, c.glu_act(), c.rotary_dim()), (16.0, 0.5, GluAct::GeluErf, None));
        assert!(c.layer_norm() && !c.norm_bias() && !c.dense_bias() && !c.qkv_bias() && c.plain_mlp() && !c.embed_norm() && c.tie_word_embeddings);
        assert_eq!(c.hf_json()["attn_config"]["alibi_bias_max"].as_f64(), Some(16.0));
        for (attn, extra, field) in [
            (r#""alibi": false"#, "", "attn_config.alibi"),
            (r#""alibi": true, "qk_ln": true"#, "", "attn_config.qk_ln"),
            (r#""alibi": true, "clip_qkv": 8"#, "", "attn_config.clip_qkv"),
            (r#""alibi": true"#, r#", "no_bias": false"#, "no_bias"),
        ] {
            let e = read(field, attn, extra).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    /// Command R7B's and A's windowed layers: as `layer_types` lists them, else all but every
    /// `sliding_window_pattern`-th (4 by default); RoPE on those alone; Cohere's layout otherwise.
    #[test]
    fn cohere2_windows_and_rope_by_layer() {
        let base = r#""model_type": "cohere2", "vocab_size": 8, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 8,
            "num_attention_heads": 4, "sliding_window": 16, "logit_scale": 0.5"#;
        let c = ModelConfig::from_file(&write("cohere2", &format!("{{{base}}}"))).unwrap();
        let windows: Vec<u32> = (0..8).map(|l| c.scores(l).window).collect();
        assert_eq!(windows, [16, 16, 16, 0, 16, 16, 16, 0]);
        assert_eq!(c.ropes().unwrap().iter().map(Option::is_some).collect::<Vec<_>>(), windows.iter().map(|&w| w > 0).collect::<Vec<_>>());
        assert!(c.parallel_residual() && c.shared_norm() && c.adjacent_rope_pairs() && !c.norm_bias() && c.tie_word_embeddings);
        assert_eq!(c.logits_scale(), 0.5);
        let c = ModelConfig::from_file(&write("cohere2-2", &format!(r#"{{{base}, "sliding_window_pattern": 2}}"#))).unwrap();
        assert_eq!((0..4).map(|l| c.scores(l).window).collect::<Vec<_>>(), [16, 0, 16, 0]);
    }

    /// EXAONE 4's windowed layers from `sliding_window_pattern` as a count or as letters (the last
    /// layer global either way with letters), RoPE on those alone; without a window, every layer
    /// full and rotating; norms after the blocks alone, each head's q and k normed.
    #[test]
    fn exaone4_layer_patterns() {
        let base = r#""model_type": "exaone4", "vocab_size": 8, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 6, "num_attention_heads": 4"#;
        let read = |name: &str, extra: &str| ModelConfig::from_file(&write(name, &format!("{{{base}{extra}}}"))).unwrap();
        let windows = |c: &ModelConfig| (0..6).map(|l| c.scores(l).window).collect::<Vec<_>>();
        let rotating = |c: &ModelConfig| c.ropes().unwrap().iter().map(Option::is_some).collect::<Vec<_>>();
        let c = read("exaone4", r#", "sliding_window": 8, "sliding_window_pattern": 3"#);
        assert_eq!(windows(&c), [8, 8, 0, 8, 8, 0]);
        assert_eq!(rotating(&c), [true, true, false, true, true, false]);
        assert!(!c.pre_norms() && c.post_norms() && c.qk_norm() && c.qk_norm_width() == (16, 16));
        let c = read("exaone4-letters", r#", "sliding_window": 8, "sliding_window_pattern": "LLG""#);
        assert_eq!(windows(&c), [8, 8, 0, 8, 8, 0]);
        let c = read("exaone4-letters-l", r#", "sliding_window": 8, "sliding_window_pattern": "L""#);
        assert_eq!(windows(&c), [8, 8, 8, 8, 8, 0]);
        let c = read("exaone4-full", r#", "sliding_window": null"#);
        assert!(windows(&c).iter().all(|&w| w == 0) && rotating(&c).iter().all(|&r| r));
    }

    /// ERNIE 4.5 and Helium rotate adjacent pairs; ERNIE ties by default and its biases (use_bias,
    /// its gated MLP's among them) are refused by field; Helium's o_proj has no bias whatever
    /// attention_bias says.
    #[test]
    fn ernie_and_helium_configs() {
        let base = r#""vocab_size": 8, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4"#;
        let c = ModelConfig::from_file(&write("ernie", &format!(r#"{{"model_type": "ernie4_5", {base}}}"#))).unwrap();
        assert!(c.adjacent_rope_pairs() && c.tie_word_embeddings && !c.qkv_bias() && !c.o_bias());
        let e = ModelConfig::from_file(&write("ernie-bias", &format!(r#"{{"model_type": "ernie4_5", "use_bias": true, {base}}}"#))).unwrap_err().to_string();
        assert!(e.contains("use_bias"), "{e}");
        let c = ModelConfig::from_file(&write("helium", &format!(r#"{{"model_type": "helium", "attention_bias": true, {base}}}"#))).unwrap();
        assert!(c.adjacent_rope_pairs() && c.qkv_bias() && !c.o_bias());
    }

    /// Seed-OSS: q/k/v biases by attention_bias, o_proj's by attention_out_bias alone (none where
    /// absent), each kept when the config is written again.
    #[test]
    fn seed_oss_biases() {
        let base = r#""model_type": "seed_oss", "vocab_size": 8, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4"#;
        let c = ModelConfig::from_file(&write("seed", &format!(r#"{{{base}, "attention_bias": true}}"#))).unwrap();
        assert!(c.qkv_bias() && !c.o_bias());
        let c = ModelConfig::from_file(&write("seed-out", &format!(r#"{{{base}, "attention_bias": false, "attention_out_bias": true}}"#))).unwrap();
        assert!(!c.qkv_bias() && c.o_bias());
        assert_eq!(c.hf_json()["attention_out_bias"], serde_json::json!(true));
    }

    /// GPT-BigCode's: multi-query unless `multi_query` is false (then a key/value head per query
    /// head), GPT-2's names and learned positions, 4x the width without `n_inner`, tied.
    #[test]
    fn gpt_bigcode_config() {
        let base = r#""model_type": "gpt_bigcode", "vocab_size": 8, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128"#;
        let c = ModelConfig::from_file(&write("bigcode", &format!("{{{base}}}"))).unwrap();
        assert_eq!((c.kv_heads(), c.intermediate_size, c.max_position_embeddings, c.glu_act(), c.rotary_dim()), (1, 256, 128, GluAct::GeluTanh, None));
        assert!(c.learned_positions() && c.layer_norm() && c.dense_bias() && c.plain_mlp() && c.tie_word_embeddings);
        assert_eq!(c.hf_json()["multi_query"].as_bool(), Some(true));
        let c = ModelConfig::from_file(&write("bigcode-mha", &format!(r#"{{{base}, "multi_query": false}}"#))).unwrap();
        assert_eq!((c.kv_heads(), c.hf_json()["multi_query"].as_bool()), (4, Some(false)));
    }

    /// Nemotron's names and defaults: `norm_eps`, half of each head rotating unless it says, the
    /// squared ReLU, norms of 1 + w, MLP biases where `mlp_bias`.
    #[test]
    fn nemotron_config() {
        let base = r#""model_type": "nemotron", "vocab_size": 8, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "norm_eps": 1e-5, "hidden_act": "relu2""#;
        let c = ModelConfig::from_file(&write("nemotron", &format!("{{{base}}}"))).unwrap();
        assert_eq!((c.rms_norm_eps, c.rotary_dim(), c.glu_act(), c.tie_word_embeddings), (1e-5, Some(8), GluAct::Relu2, false));
        assert!(c.layer_norm() && c.norm_bias() && c.norm_plus_one() && c.plain_mlp() && !c.mlp_bias() && !c.parallel_residual());
        let c = ModelConfig::from_file(&write("nemotron-full", &format!(r#"{{{base}, "mlp_bias": true, "rope_parameters": {{"rope_theta": 10000.0, "partial_rotary_factor": 1.0}}}}"#))).unwrap();
        assert_eq!((c.rotary_dim(), c.mlp_bias()), (Some(16), true));
    }

    /// YaRN's attention factor: 0.1 ln(factor) + 1, DeepSeek's ratio of two where `mscale` and
    /// `mscale_all_dim` are given, or as given; the older `rope_scaling` spelling read too; no
    /// original context, refused.
    #[test]
    fn yarn_scaling() {
        let base = r#""vocab_size": 8, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 4096"#;
        let rope = |name: &str, scaling: &str| {
            ModelConfig::from_file(&write(name, &format!(r#"{{{base}, "rope_scaling": {scaling}}}"#))).map(|c| c.rope().unwrap().scaling)
        };
        let attention = |s: RopeScaling| match s {
            RopeScaling::Factors { attention_factor, pairs, divisors } => (attention_factor, pairs, divisors[0], divisors[pairs as usize - 1]),
            other => panic!("{other:?}"),
        };
        let (f, pairs, first, last) = attention(rope("yarn", r#"{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}"#).unwrap());
        assert!((f - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6 && pairs == 8 && first == 1.0 && last == 4.0, "{f} {pairs} {first} {last}");
        let ds = r#"{"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.5}"#;
        let want = (0.1 * 40f64.ln() + 1.0) / (0.05 * 40f64.ln() + 1.0);
        assert!((attention(rope("yarn-ds", ds).unwrap()).0 as f64 - want).abs() < 1e-6);
        let e = rope("yarn-no-orig", r#"{"rope_type": "yarn", "factor": 4.0}"#).unwrap_err().to_string();
        assert!(e.contains("original_max_position_embeddings"), "{e}");
    }

    /// OLMo 1: PyTorch's LayerNorm epsilon, norms without weight or bias, its clamp refused.
    #[test]
    fn olmo_config() {
        let base = r#""model_type": "olmo", "vocab_size": 8, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4"#;
        let c = ModelConfig::from_file(&write("olmo", &format!(r#"{{{base}, "clip_qkv": null}}"#))).unwrap();
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert!(c.layer_norm() && !c.norm_weight() && !c.norm_bias() && !c.plain_mlp() && !c.parallel_residual());
        let e = ModelConfig::from_file(&write("olmo-clip", &format!(r#"{{{base}, "clip_qkv": 8.0}}"#))).unwrap_err().to_string();
        assert!(e.contains("clip_qkv"), "{e}");
        // A gated MLP with biases (Llama's `mlp_bias`) is refused, not run without them.
        let llama = r#""vocab_size": 8, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4"#;
        let e = ModelConfig::from_file(&write("llama-mlp-bias", &format!(r#"{{{llama}, "mlp_bias": true}}"#))).unwrap_err().to_string();
        assert!(e.contains("mlp_bias"), "{e}");
        assert!(ModelConfig::from_file(&write("llama-no-mlp-bias", &format!(r#"{{{llama}, "mlp_bias": false}}"#))).is_ok());
    }

    #[test]
    fn bad_fields_are_named() {
        let path = write("bad-heads", r#"{"vocab_size": 8, "hidden_size": 64, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 3}"#);
        let e = ModelConfig::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let path = write("bad-type", r#"{"vocab_size": "many", "hidden_size": 64, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 4}"#);
        let e = ModelConfig::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
        let path = write("encoder", r#"{"model_type": "gemma3_text", "vocab_size": 8, "hidden_size": 64, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 4, "use_bidirectional_attention": true}"#);
        let e = ModelConfig::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("use_bidirectional_attention: true: a bidirectional encoder"), "{e}");
    }

    #[test]
    fn gemma3_rotates_per_layer_type_in_either_vocabulary() {
        let common = r#""model_type": "gemma3_text", "vocab_size": 8, "hidden_size": 64, "intermediate_size": 16,
            "num_hidden_layers": 6, "num_attention_heads": 4, "sliding_window": 8,
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]"#;
        // transformers 5: one set of parameters per layer type; 4.x: the full layers' at the top
        // level and the sliding layers' base apart.
        let v5 = write("gemma3-v5", &format!(r#"{{{common}, "rope_parameters": {{
            "full_attention": {{"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
            "sliding_attention": {{"rope_type": "default", "rope_theta": 10000.0}}}}}}"#));
        let v4 = write("gemma3-v4", &format!(r#"{{{common}, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "rope_scaling": {{"rope_type": "linear", "factor": 8.0}}}}"#));
        for path in [v5, v4] {
            let c = ModelConfig::from_file(&path).unwrap();
            let ropes = c.ropes().unwrap();
            assert!(ropes[..5].iter().all(|r| *r == Some(RopeConfig::new(10000.0))), "{path:?}: {ropes:?}");
            assert_eq!(ropes[5], Some(RopeConfig::scaled(1e6, RopeScaling::Linear { factor: 8.0 })), "{path:?}");
            assert_eq!((c.scores(0).window, c.scores(5).window), (8, 0));
        }
    }

    #[test]
    fn rope_scaling_is_read_from_either_key() {
        let mut c = ModelConfig::shape("tiny").unwrap();
        c.rope_scaling = Some(serde_json::json!({"type": "linear", "factor": 4.0}));
        assert_eq!(c.rope().unwrap().scaling, RopeScaling::Linear { factor: 4.0 });
        c.rope_scaling = Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}));
        assert!(matches!(c.rope().unwrap().scaling, RopeScaling::Llama3 { original_max_position: 8192, .. }));
        c.rope_scaling = Some(serde_json::json!({"rope_type": "yarn", "factor": 2.0}));
        assert!(c.rope().unwrap_err().contains("yarn"));
    }
}
