"""Tiny random-weight models of each family highrise runs, with HuggingFace transformers' own outputs
beside them: the references tests/families.rs holds highrise to.

Run on a developer machine, never in CI (it needs torch and transformers; the outputs are committed):

    python3 -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install torch transformers
    /tmp/benchvenv/bin/python scripts/make-tiny-families.py            # writes tests/data/tiny-*/

Made with transformers 5.24.0 and torch 2.15.0 (CPU, float32, eager attention), seed 0. Each
folder: config.json and model.safetensors (save_pretrained), and reference.json: the prompt ids,
HF's logits at every prompt position (float32, [T, vocab], in `logits`), and 12 greedy ids (EOS
off). Every family keeps its real architecture with small sizes: hidden 64, 2 layers, 4 query
heads over 2 key/value heads, vocab 512.

With the `gguf` package (0.19.0) installed, each folder also gets model.gguf: the same weights as
llama.cpp's convert_hf_to_gguf.py lays them out (its tensor names and metadata keys, Q/K rows
permuted for the llama architecture, Phi-3's fused tensors kept fused, Llama 3's RoPE scaling as
the `rope_freqs` tensor of per-frequency divisors, Gemma's norms as 1 + w (Gemma 3 as `gemma3`), the sliding window as
`<arch>.attention.sliding_window`), so the GGUF path is held to the same references.
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data"

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    # Llama 3.2 1B/3B style: tied embeddings, llama3 RoPE scaling.
    "llama3.2": dict(
        model_type="llama",
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    ),
    # SmolLM3: Llama without RoPE on every fourth layer (layer 3 of the four here).
    "smollm3": dict(model_type="smollm3", num_hidden_layers=4, tie_word_embeddings=True, pad_token_id=0,
                    rope_parameters=dict(rope_type="default", rope_theta=2000000.0)),
    # Mistral: head_dim not hidden / heads (Nemo); a sliding window (v0.1) narrower than the prompt.
    "mistral": dict(model_type="mistral", head_dim=32, sliding_window=8, rope_theta=1000000.0),
    # Ministral: Mistral with an 8-token window on the layers layer_types names (here the first of
    # two). llama.cpp's GGUF keeps one window for every layer: no GGUF.
    "ministral": dict(model_type="ministral", head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                      rope_theta=1000000.0),
    # Qwen 2.5: q/k/v biases.
    "qwen2.5": dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    # Qwen 2.5 past its trained context: YaRN, factor 4 over an original context of 64 (of the 256
    # served): the fast pairs keep their frequencies, the slow ones are divided by 4, a ramp between,
    # cos and sin times 0.1 ln 4 + 1.
    "qwen2.5-yarn": dict(model_type="qwen2", tie_word_embeddings=True,
                         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                              original_max_position_embeddings=64)),
    # Qwen 3: per-head RMSNorm of q and k before RoPE; no biases; head_dim of its own.
    "qwen3": dict(model_type="qwen3", head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True),
    # Phi-3 mini: fused qkv_proj and gate_up_proj.
    "phi3": dict(model_type="phi3", rope_theta=10000.0, pad_token_id=0),
    # Phi-3.5 mini: Phi-3 with longrope, per-frequency factors for short and long contexts and
    # cos/sin scaled by sqrt(1 + ln(max / original) / ln(original)). The trained context is 16 here
    # beside a served one of 256, so that the long factors are the ones in use (HF: for any sequence
    # past 16 tokens, as the 20-token prompt is; highrise, as llama.cpp: whenever the context served
    # is past the original one).
    "phi3.5": dict(model_type="phi3", rope_theta=10000.0, pad_token_id=0, original_max_position_embeddings=16,
                   rope_scaling=dict(rope_type="longrope", short_factor=[1.0 + 0.05 * i for i in range(4)] * 2,
                                     long_factor=[1.0 + 0.7 * i for i in range(8)],
                                     original_max_position_embeddings=16)),
    # OLMo 2: RMSNorm after attention and after the MLP, none before; q and k normed across all
    # heads at once.
    "olmo2": dict(model_type="olmo2", pad_token_id=0),
    # OLMo 3: OLMo 2 with an 8-token window on three layers of each four, the sliding ones rotating
    # with a base of their own.
    "olmo3": dict(model_type="olmo3", num_hidden_layers=4, sliding_window=8, pad_token_id=0,
                  rope_parameters={"full_attention": dict(rope_type="default", rope_theta=500000.0),
                                   "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}),
    # Gemma (1): GeGLU (its legacy hidden_act "gelu", meaning the tanh approximation), embeddings
    # times sqrt(hidden), (1 + w) norms, before each block only.
    "gemma": dict(model_type="gemma", head_dim=32, hidden_act="gelu", tie_word_embeddings=True, pad_token_id=0),
    # Phi-4-mini: Phi-3.5's longrope on the first 3/4 of each head's dims only (partial RoPE), the
    # rest passing through: 12 of 16 here, a factor per rotating pair.
    "phi4-mini": dict(model_type="phi3", rope_theta=10000.0, pad_token_id=0, original_max_position_embeddings=16,
                      tie_word_embeddings=True, partial_rotary_factor=0.75,
                      rope_scaling=dict(rope_type="longrope", short_factor=[1.0 + 0.05 * i for i in range(6)],
                                        long_factor=[1.0 + 0.7 * i for i in range(6)],
                                        original_max_position_embeddings=16)),
    # Gemma 2: GeGLU, embeddings times sqrt(hidden), (1 + w) norms before and after each block,
    # soft-capped attention scores and logits (caps lower than the real 50 and 30, so that they bend
    # these small scores), and a sliding window on every other layer (layer 0
    # here), narrower than the prompt so that it bites. query_pre_attn_scalar is the head dim, as
    # llama.cpp's GGUF assumes for Gemma 2 2B and 9B.
    "gemma2": dict(model_type="gemma2", head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                   attn_logit_softcapping=5.0, final_logit_softcapping=10.0, tie_word_embeddings=True,
                   pad_token_id=0),
    # nanochat: RMSNorms without weights (the embeddings', q's and k's after RoPE too), RoPE turning
    # the other way, a squared-ReLU MLP without a gate (fc1, fc2), soft-capped logits, untied. No
    # GGUF here.
    "nanochat": dict(model_type="nanochat", hidden_act="relu2", final_logit_softcapping=15.0, tie_word_embeddings=False,
                     pad_token_id=0),
    # VaultGemma: Gemma 2 without its norms after attention and the MLP (the MLP's before keeps the
    # name pre_feedforward_layernorm), soft-capped, a window on every other layer. No GGUF here.
    "vaultgemma": dict(model_type="vaultgemma", head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                       attn_logit_softcapping=5.0, final_logit_softcapping=10.0, tie_word_embeddings=True, pad_token_id=0),
    # Gemma 3 (text): Gemma 2's layout with (1 + w) q/k norms and no soft-capping; six layers, so
    # that the real pattern holds (five sliding-window layers, then a full one), the sliding ones
    # rotating with base 10000 and the full one with base 1e6 and linear scaling by 8 (as the 4B
    # and larger).
    "gemma3": dict(model_type="gemma3_text", num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
                   sliding_window=8, tie_word_embeddings=True, pad_token_id=0,
                   rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1000000.0),
                                    "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}),
    # Mixtral: each token's top 2 of 4 SwiGLU experts, their router weights renormalized.
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, rope_theta=1000000.0),
    # Qwen 3 MoE: Qwen 3's attention, each token's top 2 of 8 experts of an intermediate size of their
    # own, renormalized.
    "qwen3-moe": dict(model_type="qwen3_moe", head_dim=32, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=48, norm_topk_prob=True, rope_theta=1000000.0),
    # Qwen 2 MoE: Qwen 2's attention (q/k/v biases), each token's top 2 of 8 experts, not
    # renormalized, beside a shared expert scaled by its sigmoid gate.
    "qwen2-moe": dict(model_type="qwen2_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=96, norm_topk_prob=False, rope_theta=1000000.0),
    # Granite 3: Llama with multipliers of the embeddings, of what joins the stream, of the scores
    # (in place of 1/sqrt(head_dim)) and a divisor of the logits.
    "granite": dict(model_type="granite", embedding_multiplier=12.0, residual_multiplier=0.22,
                    attention_multiplier=0.015625, logits_scaling=4.0, rope_theta=10000.0),
    # Granite 3 MoE: the same multipliers, each token's top 2 of 4 experts (gate and up fused per
    # expert, every expert in one tensor).
    "granitemoe": dict(model_type="granitemoe", num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=12.0,
                       residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=4.0, rope_theta=10000.0),
    # OLMoE: q and k normed across all heads, each token's top 3 of 8 experts, not renormalized.
    "olmoe": dict(model_type="olmoe", num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, pad_token_id=0),
    # The LayerNorm families. GPT-2: learned positions, Conv1D weights, tanh GELU, multi-head (its
    # config has no key/value head count, nor any of the names below but through attribute_map).
    "gpt2": dict(model_type="gpt2", n_inner=128, layer_norm_epsilon=1e-5, activation_function="gelu_new"),
    # Pythia (GPT-NeoX): parallel attention and MLP, RoPE on a quarter of each head, exact GELU.
    "pythia": dict(model_type="gpt_neox", rotary_pct=0.25, layer_norm_eps=1e-5, hidden_act="gelu",
                   use_parallel_residual=True, tie_word_embeddings=False),
    # StarCoder 2: LayerNorm with biases, grouped-query attention, c_fc/c_proj MLP, tanh GELU.
    "starcoder2": dict(model_type="starcoder2", norm_epsilon=1e-5, use_bias=True, tie_word_embeddings=True),
    # Phi-2: one LayerNorm read by attention and the MLP side by side, partial RoPE, lm_head bias.
    "phi2": dict(model_type="phi", partial_rotary_factor=0.5, layer_norm_eps=1e-5, hidden_act="gelu_new"),
    # StableLM 2: LayerNorm with a SwiGLU MLP, RoPE on a quarter of each head, q/k/v biases; and
    # side by side (one norm feeding both, as its 12B).
    "stablelm": dict(model_type="stablelm", partial_rotary_factor=0.25, layer_norm_eps=1e-5, use_qkv_bias=True),
    "stablelm-parallel": dict(model_type="stablelm", partial_rotary_factor=0.25, layer_norm_eps=1e-5,
                              use_parallel_residual=True),
    # OPT: LayerNorm before each block, learned positions from row 2 of their table, a ReLU MLP
    # (fc1/fc2), biases everywhere, multi-head, tied embeddings; saved under `model.decoder.`.
    # llama.cpp has no OPT architecture: no GGUF.
    "opt": dict(model_type="opt", ffn_dim=128, activation_function="relu", do_layer_norm_before=True,
                enable_bias=True, pad_token_id=0),
    # GPT-J: one LayerNorm feeding attention and the MLP side by side, RoPE on adjacent pairs of
    # the first 8 of each head's 16 dims, no attention biases, a tanh-GELU MLP with biases, an
    # untied unembedding with a bias; saved under `transformer.`. llama.cpp's converter has no
    # GPT-J: no GGUF.
    "gptj": dict(model_type="gptj", n_inner=128, rotary_dim=8, layer_norm_epsilon=1e-5,
                 activation_function="gelu_new", tie_word_embeddings=False),
    # Cohere (Command R): LayerNorm without a bias feeding attention and a SwiGLU MLP side by side,
    # RoPE on adjacent pairs, logits scaled; attention biases on (Command R has none; they test the
    # o_proj bias and the biases' rows moved with q's and k's). GGUF: llama.cpp's `command-r`.
    # Falcon 7B: attention and a GELU MLP side by side through one LayerNorm, multi-query (q, k, v
    # fused as every q head, then the one k and v), no biases, tied embeddings.
    "falcon": dict(model_type="falcon", multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                   bias=False, layer_norm_epsilon=1e-5, tie_word_embeddings=True),
    # Falcon 40B: q, k, v fused by key/value group (2 groups of 2 q heads, a k and a v), a LayerNorm
    # each for attention and the MLP (ln_attn, ln_mlp); biases on here (the 40B has none), untied.
    "falcon-40b": dict(model_type="falcon", new_decoder_architecture=True, num_kv_heads=2, bias=True,
                       layer_norm_epsilon=1e-5, tie_word_embeddings=False),
    # Nemotron (Minitron): LayerNorm1P (1 + w, a bias), a squared-ReLU MLP without a gate, RoPE on
    # half of each head; attention and MLP biases on here (Minitron has none). GGUF: llama.cpp's
    # `nemotron`, its norms stored as 1 + w.
    "nemotron": dict(model_type="nemotron", norm_eps=1e-5, hidden_act="relu2", attention_bias=True, mlp_bias=True,
                     tie_word_embeddings=False),
    # OLMo 1: LayerNorms without a weight or bias, a SwiGLU MLP, no biases. GGUF: llama.cpp's
    # `olmo` (q/k rows permuted as Llama's, no norm tensors).
    "olmo": dict(model_type="olmo", pad_token_id=0),
    # Arcee (AFM-4.5B): a Llama with a squared-ReLU MLP without a gate (biases on here), YaRN
    # (factor 2 over an original 64). GGUF: llama.cpp's `arcee` (q/k permuted as Llama's).
    "arcee": dict(model_type="arcee", hidden_act="relu2", mlp_bias=True, tie_word_embeddings=False,
                  rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=2.0,
                                       original_max_position_embeddings=64)),
    "cohere": dict(model_type="cohere", layer_norm_eps=1e-5, logit_scale=0.25, attention_bias=True,
                   rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=0),
    # Command R7B / A (cohere2): Cohere's layout with an 8-token window on three layers of each four
    # (layers 0-2 of four), RoPE on those alone. GGUF: llama.cpp's `cohere2`.
    "cohere2": dict(model_type="cohere2", num_hidden_layers=4, layer_norm_eps=1e-5, logit_scale=0.25, sliding_window=8,
                    rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=0),
    # ERNIE 4.5 (0.3B): a Llama with RoPE on adjacent pairs, tied. GGUF: llama.cpp's `ernie4_5` (q/k
    # rows as HF's: its RoPE pairs adjacent dims itself).
    "ernie4_5": dict(model_type="ernie4_5", head_dim=16, rope_theta=500000.0, tie_word_embeddings=True, pad_token_id=0),
    # Helium 1: a Llama with RoPE on adjacent pairs, q/k/v biases (attention_bias; o_proj without),
    # untied. llama.cpp has no Helium: no GGUF.
    "helium": dict(model_type="helium", head_dim=16, attention_bias=True, tie_word_embeddings=False, pad_token_id=0),
    # GLM-4 9B (glm): a Llama rotating adjacent pairs of the first half of each head, gate and up
    # fused (gate_up_proj), q/k/v biases (o_proj without). No GGUF (llama.cpp's converter writes it
    # as another family).
    "glm": dict(model_type="glm", head_dim=16, attention_bias=True, tie_word_embeddings=False, pad_token_id=0),
    # Jais 2: LayerNorms (weight and bias), a squared-ReLU MLP without a gate, RoPE over whole heads,
    # biases on every projection (attention_bias, mlp_bias), untied. No GGUF here.
    "jais2": dict(model_type="jais2", layer_norm_eps=1e-5, hidden_act="relu2", attention_bias=True, mlp_bias=True,
                  tie_word_embeddings=False, pad_token_id=0),
    # Seed-OSS: a Llama with q/k/v biases (attention_bias) and o_proj's by attention_out_bias (on
    # here; the 36B has none). No GGUF here.
    "seed-oss": dict(model_type="seed_oss", head_dim=16, attention_bias=True, attention_out_bias=True, tie_word_embeddings=False,
                     pad_token_id=0),
    # GLM-4-0414 (glm4): GLM-4 9B's attention and MLP with Gemma 2's four RMSNorms (after attention
    # and the MLP too: post_self_attn_layernorm, post_mlp_layernorm). No GGUF here.
    "glm4": dict(model_type="glm4", head_dim=16, attention_bias=True, tie_word_embeddings=False, pad_token_id=0),
    # EXAONE 4: OLMo 2's norms after attention and the MLP (none before), each head's q and k
    # RMS-normed, an 8-token window on layers 0-2 of four with RoPE on those alone. No GGUF here.
    "exaone4": dict(model_type="exaone4", num_hidden_layers=4, head_dim=16, sliding_window=8, sliding_window_pattern=4,
                    rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0),
    # Bloom: ALiBi in place of positions, a LayerNorm on the embeddings, q/k/v fused head by head,
    # biases everywhere, Megatron's tanh GELU, tied embeddings; 6 heads of 16 (ALiBi's slopes for a
    # head count not a power of two: four on its sequence, two between). GGUF: llama.cpp's `bloom`.
    "bloom": dict(model_type="bloom", hidden_size=96, num_attention_heads=6, layer_norm_epsilon=1e-5),
    # GPT-BigCode (StarCoder, SantaCoder): GPT-2's layout with Linear weights and multi-query
    # attention (c_attn: every q head, then the one k and v), tied. GGUF: llama.cpp's `starcoder`.
    "gpt-bigcode": dict(model_type="gpt_bigcode", n_inner=128, multi_query=True, activation_function="gelu_pytorch_tanh",
                        layer_norm_epsilon=1e-5),
    # MPT: ALiBi (its own way to the same slopes, biased from the last key), LayerNorm without a
    # bias, q/k/v fused one after another, no biases, the exact GELU, tied; 6 heads of 16. GGUF:
    # llama.cpp's `mpt`.
    "mpt": dict(model_type="mpt", hidden_size=96, num_attention_heads=6, layer_norm_epsilon=1e-5, max_seq_len=256,
                attn_config=dict(alibi=True, alibi_bias_max=8)),
}

# Fields of COMMON a family's config does not have under that name, which from_config would save
# as extra attributes (a key/value head count GPT-2 and GPT-NeoX do not read, GPT-2's MLP width).
NOT_THEIRS = {
    "gpt2": ("num_key_value_heads", "rms_norm_eps", "intermediate_size"),
    "gpt_neox": ("num_key_value_heads", "rms_norm_eps"),
    "starcoder2": ("rms_norm_eps",),
    "phi": ("rms_norm_eps",),
    "stablelm": ("rms_norm_eps",),
    "opt": ("num_key_value_heads", "rms_norm_eps", "intermediate_size"),
    "gptj": ("num_key_value_heads", "rms_norm_eps", "intermediate_size"),
    "cohere": ("rms_norm_eps",),
    "cohere2": ("rms_norm_eps",),
    "nemotron": ("rms_norm_eps",),
    "jais2": ("rms_norm_eps",),
    "olmo": ("rms_norm_eps",),
    "falcon": ("num_key_value_heads", "rms_norm_eps", "intermediate_size"),
    "bloom": ("num_key_value_heads", "rms_norm_eps", "intermediate_size", "max_position_embeddings"),
    "mpt": ("num_key_value_heads", "rms_norm_eps", "intermediate_size", "max_position_embeddings"),
    "gpt_bigcode": ("num_key_value_heads", "rms_norm_eps", "intermediate_size"),
}


PROMPT = [1, 17, 300, 42, 99, 5, 250, 7, 7, 128, 511, 64, 3, 200, 31, 400, 12, 77, 150, 9]


def make(name: str, extra: dict) -> None:
    torch.manual_seed(0)
    kind = extra.pop("model_type")
    common = {k: v for k, v in COMMON.items() if k not in NOT_THEIRS.get(kind, ())}
    cfg = AutoConfig.for_model(kind, **{**common, **extra})
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    # from_config's init is small; make the weights large enough that the layers matter.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08 if p.dim() > 1 else 0.3)
            pname = "".join(n for n, q in model.named_parameters() if q is p)
            if p.dim() == 1 and ("norm" in pname or ".ln_" in pname) and pname.endswith("weight"):
                p.add_(1.0)
    out = OUT / f"tiny-{name}"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if kind == "gemma":
        # The official Gemma releases ship the legacy value, which transformers reads as the tanh
        # approximation it saved instead: keep theirs, so the loader's reading of it is tested.
        conf = json.loads((out / "config.json").read_text())
        conf["hidden_act"] = "gelu"
        (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(ids).logits[0]
        gen = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    reference = {
        "family": name,
        "made_with": f"transformers {transformers.__version__}, torch {torch.__version__}, CPU float32 eager, seed 0",
        "prompt": PROMPT,
        "greedy": gen[0, len(PROMPT):].tolist(),
        "logits": [[round(float(x), 6) for x in row] for row in logits],
    }
    if getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None):
        # A mixture's router scores at every layer, [layers][T][E], before the softmax.
        with torch.no_grad():
            routers = model(ids, output_router_logits=True).router_logits
        reference["router_logits"] = [[[round(float(x), 6) for x in row] for row in r] for r in routers]
    if kind in ("gptj", "cohere", "nanochat"):
        # Layer 0's q and k after RoPE, [T, heads x D], in the checkpoint's order of dims: what
        # highrise's `q` and `k` captures give back (it moves the rows to rotate by halves, or
        # negates half of them to turn nanochat's the other way).
        q, k = layer0_qk(kind, cfg, model, ids)
        reference["q0"] = [[round(float(x), 6) for x in row] for row in q]
        reference["k0"] = [[round(float(x), 6) for x in row] for row in k]
    (out / "reference.json").write_text(json.dumps(reference))
    if kind not in ("opt", "gptj"):
        to_gguf(kind, cfg, model, out / "model.gguf")
    if kind == "mixtral":
        # And as llama.cpp's Q4_0 quantization leaves a mixture: every matrix Q4_0 (the stacked
        # experts' too), the router kept f32.
        to_gguf(kind, cfg, model, out / "model-q4_0.gguf", quant="Q4_0")
        quantized_reference(out, ids, "Q4_0")
        # And as llama.cpp wrote Mixtral before it stacked the experts (ffn_gate.{e}...: most Mixtral
        # GGUF files of early 2024).
        to_gguf(kind, cfg, model, out / "model-per-expert.gguf", stack=False)
    print(f"{out}: {sum(p.numel() for p in model.parameters())} parameters, greedy {reference['greedy']}")


def layer0_qk(kind: str, cfg, model, ids):
    """Layer 0's q and k after RoPE as the family's attention computes them, from the inputs its
    attention module was called with."""
    got = {}
    attn = model.transformer.h[0].attn if kind == "gptj" else model.model.layers[0].self_attn

    def hook(mod, args, kwargs, out):
        got["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        got["pe"] = kwargs["position_embeddings"]

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids)
        handle.remove()
        h, pe = got["h"], got["pe"]
        hd = cfg.hidden_size // cfg.num_attention_heads
        shape = (*h.shape[:-1], -1, hd)
        q, k = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)
        if kind == "gptj":
            from transformers.models.gptj import modeling_gptj as M

            sin, cos = pe
            r = cfg.rotary_dim
            q = torch.cat([M.apply_rotary_pos_emb(q[..., :r], sin, cos), q[..., r:]], dim=-1)
            k = torch.cat([M.apply_rotary_pos_emb(k[..., :r], sin, cos), k[..., r:]], dim=-1)
        elif kind == "nanochat":
            # RoPE turning the other way, then the weightless RMSNorms of q and k.
            from transformers.models.nanochat import modeling_nanochat as M

            cos, sin = pe
            q, k = M.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            q, k = attn.q_norm(q).transpose(1, 2), attn.k_norm(k).transpose(1, 2)
        else:
            from transformers.models.cohere import modeling_cohere as M

            cos, sin = pe
            q, k = M.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
    return q[0].reshape(q.shape[1], -1), k[0].reshape(k.shape[1], -1)


def quantized_reference(out: Path, ids, quant: str) -> None:
    """HF's logits for the weights as `quant` leaves them (each matrix but a router quantized and
    dequantized again, row by row, as to_gguf's `quant` writes them): reference-<quant>.json."""
    import tempfile

    import gguf
    from safetensors.numpy import load_file, save_file

    qt = getattr(gguf.GGMLQuantizationType, quant)
    sd = load_file(str(out / "model.safetensors"))
    for k, v in sd.items():
        if v.ndim >= 2 and not k.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight")):
            sd[k] = gguf.quants.dequantize(gguf.quants.quantize(v, qt), qt).reshape(v.shape)
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("config.json", "generation_config.json"):
            (Path(tmp) / f).write_text((out / f).read_text())
        save_file(sd, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            logits = model(ids).logits[0]
    ref = {"made_with": f"transformers {transformers.__version__}, gguf quants {quant} round trip", "prompt": PROMPT,
           "logits": [[round(float(x), 6) for x in row] for row in logits]}
    (out / f"reference-{quant.lower()}.json").write_text(json.dumps(ref))


LN_ARCH = {"gpt2": "gpt2", "gpt_neox": "gptneox", "starcoder2": "starcoder2", "phi": "phi2", "stablelm": "stablelm",
           "falcon": "falcon", "bloom": "bloom", "mpt": "mpt", "gpt_bigcode": "starcoder"}


def to_gguf_layernorm(kind: str, cfg, model, path: Path) -> None:
    """The LayerNorm families as llama.cpp's converter writes them: GPT-2's Conv1D weights
    transposed, GPT-NeoX's fused q/k/v reordered from head by head to q, k, v (its
    GPTNeoXModel.modify_tensors), no q/k permutation (these rotate NEOX-style), the biases."""
    import gguf
    import numpy as np

    arch = LN_ARCH[kind]
    w = gguf.GGUFWriter(str(path), arch)
    hd = cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length({"bloom": lambda: 2048, "mpt": lambda: cfg.max_seq_len}.get(kind, lambda: cfg.max_position_embeddings)())
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length({"gpt2": lambda: cfg.n_inner, "gpt_bigcode": lambda: cfg.n_inner, "falcon": lambda: cfg.ffn_hidden_size, "bloom": lambda: 4 * cfg.hidden_size,
                               "mpt": lambda: cfg.expansion_ratio * cfg.hidden_size}.get(kind, lambda: cfg.intermediate_size)())
    w.add_head_count(cfg.num_attention_heads)
    if kind in ("starcoder2", "phi", "stablelm"):
        w.add_head_count_kv(cfg.num_key_value_heads)
    if kind == "falcon":
        # llama.cpp's FalconModel: the key/value heads as the attention counts them.
        w.add_head_count_kv(cfg.num_kv_heads if cfg.new_decoder_architecture else 1)
    if kind == "gpt_bigcode":
        # llama.cpp's StarCoderModel: one key/value head where multi-query.
        w.add_head_count_kv(1 if cfg.multi_query else cfg.num_attention_heads)
    if kind in ("bloom", "mpt"):
        # llama.cpp's BloomModel and MPTModel: every head its own key/value head; MPT's largest
        # ALiBi bias (Bloom's is 8 in llama.cpp itself).
        w.add_head_count_kv(cfg.num_attention_heads)
    if kind == "mpt":
        w.add_max_alibi_bias(cfg.attn_config.alibi_bias_max)
    eps = {"gpt2": "layer_norm_epsilon", "gpt_neox": "layer_norm_eps", "starcoder2": "norm_epsilon", "phi": "layer_norm_eps",
           "stablelm": "layer_norm_eps", "falcon": "layer_norm_epsilon", "bloom": "layer_norm_epsilon", "mpt": "layer_norm_epsilon",
           "gpt_bigcode": "layer_norm_epsilon"}[kind]
    w.add_layer_norm_eps(getattr(cfg, eps))
    if kind not in ("gpt2", "bloom", "mpt", "gpt_bigcode"):
        rp = cfg.rope_parameters
        w.add_rope_freq_base(rp["rope_theta"])
        partial = rp.get("partial_rotary_factor", 1.0) or 1.0
        if partial != 1.0:
            w.add_rope_dimension_count(int(hd * partial))
    if kind in ("gpt_neox", "stablelm"):
        w.add_parallel_residual(cfg.use_parallel_residual)
    w.add_vocab_size(cfg.vocab_size)
    names = {
        "gpt2": {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm", "ln_1": "attn_norm",
                 "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                 "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
        "gpt_neox": {"embed_in": "token_embd", "final_layer_norm": "output_norm", "input_layernorm": "attn_norm",
                     "attention.query_key_value": "attn_qkv", "attention.dense": "attn_output",
                     "post_attention_layernorm": "ffn_norm", "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"},
        "starcoder2": {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
                       "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                       "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                       "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
        "phi": {"embed_tokens": "token_embd", "final_layernorm": "output_norm", "input_layernorm": "attn_norm",
                "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.dense": "attn_output", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"},
        "stablelm": {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
                     "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                     "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
        "falcon": {"word_embeddings": "token_embd", "ln_f": "output_norm", "input_layernorm": "attn_norm",
                   "ln_attn": "attn_norm", "ln_mlp": "attn_norm_2", "self_attention.query_key_value": "attn_qkv",
                   "self_attention.dense": "attn_output", "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"},
        "bloom": {"word_embeddings": "token_embd", "word_embeddings_layernorm": "token_embd_norm", "ln_f": "output_norm",
                  "input_layernorm": "attn_norm", "self_attention.query_key_value": "attn_qkv",
                  "self_attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
                  "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"},
        "gpt_bigcode": {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm", "ln_1": "attn_norm",
                        "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                        "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
        "mpt": {"wte": "token_embd", "norm_f": "output_norm", "norm_1": "attn_norm", "attn.Wqkv": "attn_qkv",
                "attn.out_proj": "attn_output", "norm_2": "ffn_norm", "ffn.up_proj": "ffn_up", "ffn.down_proj": "ffn_down"},
    }[kind]
    for k, v in model.state_dict().items():
        v = v.detach().numpy()
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        stem, suffix = k.rsplit(".", 1)
        for prefix in ("transformer.", "gpt_neox.", "model."):
            stem = stem.removeprefix(prefix)
        if stem in ("lm_head", "embed_out"):
            if cfg.tie_word_embeddings:
                continue
            g = f"output.{suffix}"
        elif stem.startswith(("h.", "layers.", "blocks.")):
            _, layer, part = stem.split(".", 2)
            g = f"blk.{layer}.{names[part]}.{suffix}"
            if kind == "gpt2" and suffix == "weight" and part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                v = v.T.copy()
            if kind == "falcon" and part == "self_attention.query_key_value":
                # llama.cpp's FalconModel.modify_tensors: by key/value group to q, k, v.
                n = cfg.num_attention_heads
                kv = cfg.num_kv_heads if cfg.new_decoder_architecture else 1
                hd_ = cfg.hidden_size // n
                grp = v.reshape(kv, n // kv + 2, hd_, *v.shape[1:])
                v = np.concatenate([grp[:, :-2].reshape(n * hd_, *v.shape[1:]), grp[:, -2].reshape(kv * hd_, *v.shape[1:]),
                                    grp[:, -1].reshape(kv * hd_, *v.shape[1:])])
            if kind in ("gpt_neox", "bloom") and part in ("attention.query_key_value", "self_attention.query_key_value"):
                n, h = cfg.num_attention_heads, cfg.hidden_size
                v = v.reshape(n, 3, h // n, *v.shape[1:])
                v = v.transpose(1, 0, *range(2, v.ndim)).reshape(3 * h, *v.shape[3:])
        else:
            g = f"{names[stem]}.{suffix}"
        w.add_tensor(g, v.astype("float32"))
        if kind == "bloom" and g == "token_embd.weight":
            # llama.cpp's BloomModel writes the tied unembedding as output.weight too.
            w.add_tensor("output.weight", v.astype("float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"  {path}")


def to_gguf(kind: str, cfg, model, path: Path, quant=None, stack=True) -> None:
    try:
        import gguf
    except ImportError:
        print("  (no gguf package: model.gguf not written)")
        return
    if kind in LN_ARCH:
        return to_gguf_layernorm(kind, cfg, model, path)
    if kind in ("olmo3", "ministral", "helium", "glm", "glm4", "seed_oss", "jais2", "vaultgemma", "nanochat", "exaone4"):
        print(f"  (llama.cpp's GGUF has no {kind} layout: model.gguf not written)")
        return
    # llama.cpp writes Mistral and Mixtral as the llama architecture, Gemma 3's text model as gemma3,
    # Cohere's as command-r.
    arch = {"mistral": "llama", "mixtral": "llama", "gemma3_text": "gemma3", "qwen3_moe": "qwen3moe",
            "qwen2_moe": "qwen2moe", "cohere": "command-r"}.get(kind, kind)
    # Norms stored as 1 + w (Gemma's, Nemotron's LayerNorm1P).
    gemma = kind in ("gemma", "gemma2", "gemma3_text", "nemotron")
    # Gemma 3's RoPE is per layer type: the full layers' is the one GGUF keeps (llama.cpp takes the
    # sliding layers' base as 10000).
    rp = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w = gguf.GGUFWriter(str(path), arch)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_freq_base(rp["rope_theta"])
    partial = rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0
    if partial != 1.0:
        # llama.cpp's n_rot: the rotating dims of a head.
        w.add_rope_dimension_count(int(hd * partial))
    if rp.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rp["factor"])
    if rp.get("rope_type") == "yarn":
        # llama.cpp's Qwen2Model: the type, factor and original context.
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rp["factor"])
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
    if kind in ("cohere", "cohere2"):
        # llama.cpp's CommandR2Model (and Cohere2Model): LayerNorm's epsilon, the logits' multiplier.
        w.add_layer_norm_eps(cfg.layer_norm_eps)
        w.add_logit_scale(cfg.logit_scale)
    elif kind == "nemotron":
        w.add_layer_norm_eps(cfg.norm_eps)
    elif kind == "olmo":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if getattr(cfg, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if kind in ("granite", "granitemoe"):
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
    if kind == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if experts:
        # llama.cpp's MoE tensors: the router as ffn_gate_inp, each projection of all a layer's
        # experts stacked [E, rows, cols] (Mixtral's w1, w3, w2 are gate, up, down), from the
        # checkpoint as saved, one tensor per expert (transformers 5 fuses them in memory).
        import numpy as np
        from safetensors.numpy import load_file

        sd = load_file(str(path.parent / "model.safetensors"))
        for k in [k for k in sd if ".block_sparse_moe." in k and k.endswith(("input_linear.weight", "output_linear.weight", "router.layer.weight"))]:
            # Granite MoE's: every expert in one tensor, gate and up fused (llama.cpp splits them).
            layer = k.split(".block_sparse_moe.")[0]
            v = sd.pop(k)
            if k.endswith("router.layer.weight"):
                sd[f"{layer}.mlp.gate.weight"] = v
            elif k.endswith("output_linear.weight"):
                sd[f"{layer}.mlp.experts.down_proj.weight"] = v
            else:
                i = v.shape[1] // 2
                sd[f"{layer}.mlp.experts.gate_proj.weight"], sd[f"{layer}.mlp.experts.up_proj.weight"] = v[:, :i], v[:, i:]

        mixtral = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
        stacked = {}
        for k in list(sd):
            k2 = k.replace("block_sparse_moe.", "mlp.")
            if ".mlp.experts." in k2 and k2.count(".") > 6:
                layer, rest = k2.split(".mlp.experts.")
                e, proj, _ = rest.split(".")
                stacked.setdefault((layer, mixtral.get(proj, proj)), {})[int(e)] = sd.pop(k)
            elif k2 != k:
                sd[k2] = sd.pop(k)
        for (layer, proj), mats in stacked.items():
            if stack:
                sd[f"{layer}.mlp.experts.{proj}.weight"] = np.stack([mats[e] for e in range(len(mats))])
            else:
                for e, m in mats.items():
                    sd[f"{layer}.mlp.experts_{e}.{proj}.weight"] = m

    def permute(x, heads):
        # llama.cpp's permute: HF's rotate_half pairs (i, i + D/2) become adjacent rows.
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
        "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
        "mlp.gate": "ffn_gate_inp", "mlp.experts.gate_proj": "ffn_gate_exps", "mlp.experts.up_proj": "ffn_up_exps",
        "mlp.experts.down_proj": "ffn_down_exps",
        # Qwen 2 MoE's shared expert, and its gate as a vector [hidden] (llama.cpp's shape for it).
        "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
        "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    }
    if kind in ("gemma2", "gemma3_text", "olmo2"):
        # llama.cpp's Gemma 2 and OLMo 2 names: a norm after attention, one before (Gemma) and one
        # after the MLP.
        names.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    for k, v in sd.items():
        if k == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif k in ("model.norm.weight", "model.norm.bias"):
            g = "output_norm." + k.rsplit(".", 1)[1]
        elif k == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            g = "output.weight"
        else:
            _, _, layer, rest = k.split(".", 3)
            part, suffix = rest.rsplit(".", 1)
            if part.startswith("mlp.experts_"):
                e, proj = part[len("mlp.experts_"):].split(".")
                g = f"blk.{layer}.{names['mlp.' + proj]}.{e}.{suffix}"
            else:
                g = f"blk.{layer}.{names[part]}.{suffix}"
            if part == "mlp.shared_expert_gate":
                v = v.reshape(-1)
            # llama.cpp's LlamaModel permutes, and the converters derived from it (SmolLM3, OLMo).
            if arch in ("llama", "smollm3", "olmo", "arcee") and part == "self_attn.q_proj":
                v = permute(v, cfg.num_attention_heads)
            if arch in ("llama", "smollm3", "olmo", "arcee") and part == "self_attn.k_proj":
                v = permute(v, cfg.num_key_value_heads)
        if gemma and k.endswith("norm.weight"):
            # llama.cpp's GemmaModel, Gemma2Model and Gemma3Model store the norms (q/k's too) as the
            # factor they multiply by, 1 + w.
            v = v + 1
        if quant and v.ndim >= 2 and "ffn_gate_inp" not in g:
            qt = getattr(gguf.GGMLQuantizationType, quant)
            w.add_tensor(g, gguf.quants.quantize(v.astype("float32"), qt), raw_dtype=qt)
            continue
        w.add_tensor(g, v.astype("float32"))
    if rp.get("rope_type") == "longrope":
        # llama.cpp's Phi3MiniModel: both factor lists as tensors, the original context and the
        # cos/sin factor as metadata.
        import math

        import numpy as np

        orig = rp["original_max_position_embeddings"]
        scale = cfg.max_position_embeddings / orig
        w.add_rope_scaling_attn_factors(1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig)))
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_tensor("rope_factors_long.weight", np.array(rp["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rp["short_factor"], dtype=np.float32))
    if rp.get("rope_type") == "llama3":
        # llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors), as it computes them.
        import math

        import numpy as np

        freqs = 1.0 / (rp["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
        orig, low, high, factor = rp["original_max_position_embeddings"], rp["low_freq_factor"], rp["high_freq_factor"], rp["factor"]
        out = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < orig / high:
                out.append(1.0)
            elif wavelen > orig / low:
                out.append(factor)
            else:
                smooth = (orig / wavelen - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(out, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"  {path}")


if __name__ == "__main__":
    names = sys.argv[1:] or list(FAMILIES)
    for n in names:
        make(n, dict(FAMILIES[n]))
