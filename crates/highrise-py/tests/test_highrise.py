"""The Python package against HuggingFace's reference outputs, the CLI, and itself (batched vs
alone, interventions that must change nothing), and its errors."""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import highrise

STREAM = ("resid_pre", "attn_out", "mlp_out", "resid_post")
TEXTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at 100 degrees",
    "In 1969, the first person to walk on the moon was",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def test_run_with_cache_matches_hf(model, fixtures, reference):
    """Every residual-stream site at every layer, the final norm, attention patterns and logits
    against transformers' own, with the bounds of the Rust tests (tests/introspect.rs)."""
    cfg = model.cfg
    for name in ("story", "chat"):
        ids = reference["cases"][name]["input_ids"]
        t = len(ids)
        logits, cache = model.run_with_cache(ids)
        assert logits.shape == (t, cfg.d_vocab)
        want = {s: np.load(fixtures / f"{name}_{s}.npy") for s in STREAM}
        # Where the stream is large (SmolLM2's massive activations reach ~22000), 1e-5 of the largest
        # magnitude that element reaches in any layer; 1e-3 elsewhere (tests/introspect.rs says why).
        peak = np.max(np.abs(np.stack(list(want.values()))), axis=(0, 1))
        tol = np.maximum(1e-3, 1e-5 * peak)
        for s in STREAM:
            got = cache.stack(s)
            assert got.shape == (cfg.n_layers, t, cfg.d_model)
            bad = np.abs(got - want[s]) > tol
            assert not bad.any(), f"{name} {s}: {bad.sum()} values off, worst {np.abs(got - want[s]).max()}"
        assert np.abs(cache["final_norm"] - np.load(fixtures / f"{name}_final_norm.npy")).max() <= 1e-3
        probs = np.stack([cache.attention(l) for l in range(cfg.n_layers)])
        assert np.abs(probs - np.load(fixtures / f"{name}_attn_probs.npy")).max() <= 1e-4
        assert np.abs(logits - np.load(fixtures / f"{name}_logits.npy")).max() <= 1e-3


def test_names_layers_and_shapes(model):
    cfg = model.cfg
    ids = model.tokenize("The capital of France is")
    t = len(ids)
    _, cache = model.run_with_cache(ids, names=["resid_post", "pattern"], layers=[2, 5])
    assert sorted(cache) == [("k", 2), ("k", 5), ("q", 2), ("q", 5), ("resid_post", 2), ("resid_post", 5)]
    assert cache["resid_post", 5].shape == (t, cfg.d_model)
    assert cache["blocks.5.hook_resid_post"] is not None
    assert cache["q", 2].shape == (t, cfg.n_heads, cfg.d_head)
    p = cache["pattern", 2]
    assert p.shape == (cfg.n_heads, t, t)
    assert np.allclose(p.sum(-1), 1.0, atol=1e-5) and np.all(np.triu(p, 1) == 0)
    with pytest.raises(KeyError, match="not captured"):
        cache["resid_pre", 2]
    # The key/value stream: K and V as the cache holds them.
    _, full = model.run_with_cache(ids, layers=[3])
    k, v = full.kv(3)
    assert k.shape == v.shape == (t, cfg.n_key_value_heads, cfg.d_head)
    assert np.array_equal(k, full["k", 3])


def test_a_mixtures_router_scores_and_shape():
    """A mixture of experts' router scores ([T, num_experts], before the softmax picks each token's
    experts) at its mixture layers, by site or TransformerLens-style name; its dense layer has none."""
    m = highrise.Model.load("random:tiny-qwen3-moe")
    assert (m.cfg.num_experts, m.cfg.experts_per_token, m.cfg.d_expert) == (8, 2, 128)
    ids = [1, 2, 3, 4, 5]
    logits, cache = m.run_with_cache(ids)
    r = cache["router", 1]
    assert r.shape == (5, 8) and np.isfinite(r).all()
    assert np.array_equal(cache["blocks.1.hook_router"], cache["router", -1])
    with pytest.raises(KeyError, match="not captured"):
        cache["router", 0]
    assert np.array_equal(logits, m.logits(ids)), "capturing the router changes nothing"


def _tiny(tmp_path, family: str):
    """tests/data/tiny-<family> (HF's outputs beside it) with a word-level tokenizer over its 512 ids
    (the tiny models have none): the folder to load, and the reference."""
    d = Path(__file__).resolve().parents[3] / "tests" / "data" / f"tiny-{family}"
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).symlink_to(d / f)
    vocab = {f"t{i}": i for i in range(512)}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
                                                          "pre_tokenizer": {"type": "Whitespace"}}))
    return str(tmp_path), json.loads((d / "reference.json").read_text())


def test_opt_positions_start_at_row_two_of_their_table(tmp_path):
    """OPT (tests/data/tiny-opt, HF's logits beside it): TransformerLens's layout, W_pos from the third
    row of the file's table on (the rows positions read), and HF's logits at every position."""
    path, ref = _tiny(tmp_path, "opt")
    with highrise.Model.load(path) as m:
        c = m.cfg
        assert (c.normalization_type, c.positional_embedding_type, c.act_fn, c.gated_mlp, c.position_offset) == ("LN", "standard", "relu", False, 2)
        table = m.weight("model.embed_positions.weight")
        assert table.shape == (c.n_ctx + 2, c.d_model)
        assert np.array_equal(m.W_pos, table[2:])
        logits = m.logits(ref["prompt"])
        assert np.abs(logits - np.array(ref["logits"], dtype=np.float32)).max() <= 1e-4


def test_gptj_rotates_adjacent_pairs_and_its_q_and_k_are_hfs(tmp_path):
    """GPT-J (tests/data/tiny-gptj): TransformerLens's layout (rotary_adjacent_pairs, rotary_dim 8 of
    16, side by side), HF's logits, its unembedding's bias as b_U, and layer 0's q and k after RoPE
    as HF computes them, dim for dim (highrise rotates the dims in another order inside)."""
    path, ref = _tiny(tmp_path, "gptj")
    with highrise.Model.load(path) as m:
        c = m.cfg
        assert (c.normalization_type, c.positional_embedding_type, c.rotary_dim, c.rotary_adjacent_pairs) == ("LN", "rotary", 8, True)
        assert (c.act_fn, c.gated_mlp, c.parallel_attn_mlp) == ("gelu_new", False, True)
        assert np.array_equal(m.b_U, m.weight("lm_head.bias"))
        logits, cache = m.run_with_cache(ref["prompt"], names=["q", "k"])
        assert np.abs(logits - np.array(ref["logits"], dtype=np.float32)).max() <= 1e-4
        for site in ("q", "k"):
            got = cache[site, 0].reshape(len(ref["prompt"]), -1)
            assert np.abs(got - np.array(ref[site + "0"], dtype=np.float32)).max() <= 1e-4, site


def test_bloom_attends_with_alibi_and_its_pattern_gives_z(tmp_path):
    """Bloom (tests/data/tiny-bloom): TransformerLens's layout (positional_embedding_type "alibi", no
    rotary dims), HF's logits, and each head's pattern (scored with its ALiBi slope) over v is z."""
    path, ref = _tiny(tmp_path, "bloom")
    with highrise.Model.load(path) as m:
        c = m.cfg
        assert (c.normalization_type, c.positional_embedding_type, c.rotary_dim, c.gated_mlp) == ("LN", "alibi", None, False)
        logits, cache = m.run_with_cache(ref["prompt"], names=["pattern", "v", "z"])
        assert np.abs(logits - np.array(ref["logits"], dtype=np.float32)).max() <= 1e-4
        t, heads = len(ref["prompt"]), c.n_heads
        for layer in range(c.n_layers):
            pattern = cache["pattern", layer]
            v = cache["v", layer].reshape(t, heads, -1)
            z = np.einsum("hij,jhd->ihd", pattern, v).reshape(t, -1)
            assert np.abs(z - cache["z", layer].reshape(t, -1)).max() <= 1e-4, layer


def test_the_layernorm_families_layout_in_transformerlens_terms():
    """GPT-2's and Pythia's layouts as TransformerLens's config names them, and their captures: the
    stream's sites, attention patterns (rows summing to 1), q of Pythia's partially rotated heads."""
    gpt2 = highrise.Model.load("random:tiny-gpt2")
    c = gpt2.cfg
    assert (c.normalization_type, c.positional_embedding_type, c.rotary_dim, c.act_fn) == ("LN", "standard", None, "gelu_new")
    assert (c.gated_mlp, c.parallel_attn_mlp, c.d_mlp) == (False, False, 1024)
    pythia = highrise.Model.load("random:tiny-pythia")
    c = pythia.cfg
    assert (c.normalization_type, c.positional_embedding_type, c.rotary_dim, c.act_fn) == ("LN", "rotary", 16, "gelu")
    assert not c.rotary_adjacent_pairs
    assert (c.gated_mlp, c.parallel_attn_mlp) == (False, True)
    ids = [5, 17, 300, 42]
    for m in (gpt2, pythia):
        names = ["resid_pre", "z", "attn_out", "resid_mid", "mlp_post", "mlp_out", "resid_post", "pattern"]
        logits, cache = m.run_with_cache(ids, names=names)
        # The stream adds up: what leaves a layer is what entered plus attention's and the MLP's.
        for layer in range(m.cfg.n_layers):
            total = cache["resid_pre", layer] + cache["attn_out", layer] + cache["mlp_out", layer]
            assert np.allclose(cache["resid_post", layer], total, atol=1e-4)
            assert cache["blocks.%d.mlp.hook_post" % layer].shape == (len(ids), m.cfg.d_mlp)
            assert cache["blocks.%d.attn.hook_z" % layer].shape == (len(ids), m.cfg.n_heads, m.cfg.d_head)
            # Between attention and the MLP (GPT-2); none where they run side by side (Pythia).
            if m.cfg.parallel_attn_mlp:
                assert ("resid_mid", layer) not in cache
            else:
                mid = cache["blocks.%d.hook_resid_mid" % layer]
                assert np.allclose(mid, cache["resid_pre", layer] + cache["attn_out", layer], atol=1e-5)
            p = cache["pattern", layer]
            assert np.allclose(p.sum(-1), 1.0, atol=1e-5)
        assert np.array_equal(logits, m.logits(ids)), "capturing changes nothing"
        # Head 2 of layer 0 ablated at every position: zero in z, and the logits move.
        rows = [cache["z", 0][p].copy() for p in range(len(ids))]
        for r in rows:
            r[2] = 0.0
        ablated, abl = m.run_with_cache(ids, names=["z"], patch=[highrise.Patch(0, p, r, "z") for p, r in enumerate(rows)])
        assert np.all(abl["z", 0][:, 2] == 0.0) and np.array_equal(abl["z", 0][:, 1], cache["z", 0][:, 1])
        assert np.abs(ablated - logits).max() > 1e-4


def test_indices_from_the_end_and_transformerlens_names(model):
    """-1 is the last layer or the prompt's last token wherever a layer or position is taken, as in
    Python and TransformerLens; TL's attention hook names and [batch, pos] id arrays are taken."""
    n = model.cfg.n_layers
    ids = model.tokenize("The capital of France is")
    t = len(ids)
    _, cache = model.run_with_cache(ids, names=["resid_pre", "pattern"])
    assert np.array_equal(cache["resid_pre", -1], cache["resid_pre", n - 1])
    assert np.array_equal(cache["blocks.4.attn.hook_q"], cache["q", 4])
    assert np.array_equal(cache["blocks.4.attn.hook_pattern"], cache.attention(4 - n))
    assert ("resid_pre", n) not in cache and ("resid_pre", -n - 1) not in cache
    with pytest.raises(IndexError, match=f"layer {-n - 1} does not exist"):
        cache["resid_pre", -n - 1]
    _, last = model.run_with_cache(ids, names=["resid_post"], layers=[-1])
    assert list(last) == [("resid_post", n - 1)]
    assert model.logit_lens(last, top_k=2, layers=[-1]).layers == [n - 1]
    v = np.random.default_rng(1).standard_normal(model.cfg.d_model).astype(np.float32)
    end = model.logits(ids, steer=highrise.Steer(-3, v, 2.0, positions=[-1]))
    assert np.array_equal(end, model.logits(ids, steer=highrise.Steer(n - 3, v, 2.0, positions=[t - 1])))
    assert not np.array_equal(end, model.logits(ids))
    row = cache["resid_pre", 7][0]
    assert np.array_equal(model.logits(ids, patch=highrise.Patch(-n + 7, -t, row)), model.logits(ids))
    with pytest.raises(IndexError, match=f"position {-t - 1} is beyond"):
        model.logits(ids, patch=highrise.Patch(7, -t - 1, row))
    # Tokens as TransformerLens takes them: a [batch, pos] integer array is a batch of prompts.
    batch = model.logits(np.array([ids, ids[::-1]]))
    assert len(batch) == 2 and np.abs(batch[0] - model.logits(ids)).max() <= 2e-4
    with pytest.raises(ValueError, match="token id -1 is not in the vocabulary"):
        model.logits([5, -1])


def test_weights_as_hf_lays_them_out(model):
    """The file's weights in HF's names and layout, float32: the final norm's stream times W_U is
    the logits (direct logit attribution), and layer 0's normed first token times k_proj is the
    captured k (position 0: RoPE leaves it as it is), so the GGUF's permuted q/k rows came back."""
    names = model.weight_names()
    assert "model.layers.0.self_attn.k_proj.weight" in names and "lm_head.weight" not in names
    cfg = model.cfg
    assert model.W_E.shape == (cfg.d_vocab, cfg.d_model) and model.W_U.shape == (cfg.d_model, cfg.d_vocab)
    logits, cache = model.run_with_cache("The capital of France is", names=["final_norm", "resid_pre", "k"], layers=[0])
    scale = np.abs(logits).max()
    assert np.abs(cache["final_norm"] @ model.W_U - logits).max() <= 1e-5 * scale
    assert np.array_equal(model.b_U, np.zeros(cfg.d_vocab, dtype=np.float32)), "no unembedding bias: zeros"
    with pytest.raises(KeyError, match="no such tensor"):
        model.W_pos
    x = cache["resid_pre", 0][0].astype(np.float64)
    normed = x / np.sqrt(np.mean(x * x) + 1e-5) * model.weight("model.layers.0.input_layernorm.weight")
    k0 = normed @ model.weight("model.layers.0.self_attn.k_proj.weight").T
    got = cache["k", 0][0].reshape(-1)
    assert np.abs(k0 - got).max() <= 1e-4 * np.abs(got).max()
    with pytest.raises(KeyError, match="no such tensor"):
        model.weight("model.layers.0.mlp.nope.weight")
    with highrise.Model.load("random:tiny") as random:
        with pytest.raises(ValueError, match="random weights are kept in no file"):
            random.W_E


def test_batch_of_eight_equals_one_by_one(model, reference):
    """Eight prompts of different lengths in one forward pass capture what each does alone."""
    prompts = [reference["cases"]["story"]["input_ids"], reference["cases"]["chat"]["input_ids"]] + TEXTS
    assert len(prompts) == 8
    batched = model.run_with_cache(prompts, names=list(STREAM) + ["k", "v"])
    assert len(batched) == 8
    for p, (logits, cache) in zip(prompts, batched):
        alone_logits, alone = model.run_with_cache(p, names=list(STREAM) + ["k", "v"])
        assert np.abs(logits - alone_logits).max() <= 2e-4
        for key in alone:
            # Bit-identical but for the GEMM's summation order, which the batch's row count can change:
            # within 5e-5 of the array's largest magnitude (the stream carries values in the thousands).
            worst = np.abs(cache[key] - alone[key]).max() / max(1.0, np.abs(alone[key]).max())
            assert worst <= 5e-5, f"{key}: batch vs alone differ by {worst} of the largest value"


def test_generation_runs_patched(model):
    """A patch of a prompt position applies to the generation: its greedy tokens are those of the
    patched model's logits, recomputed token by token; the open ``with m.patch`` block counts too."""
    ids = model.tokenize("The capital of France is")
    row = np.where(np.arange(model.cfg.d_model) % 5 == 0, 8.0, -1.0).astype(np.float32)
    patch = highrise.Patch(10, -1, row)
    seq = list(ids)
    for _ in range(4):
        seq.append(int(np.argmax(model.logits(seq, patch=highrise.Patch(10, len(ids) - 1, row))[-1])))
    assert model.generate(ids, max_tokens=4, patch=patch).ids == seq[len(ids):]
    with model.patch(10, len(ids) - 1, row):
        assert model.generate(ids, max_tokens=4).ids == seq[len(ids):]
    assert model.generate(ids, max_tokens=4).ids != seq[len(ids):], "the patch changed the tokens"


def test_zero_steering_and_self_patching_change_nothing(model):
    ids = model.tokenize("The capital of France is")
    base, cache = model.run_with_cache(ids, names=["resid_pre"])
    zero = np.zeros(model.cfg.d_model, dtype=np.float32)
    with model.steer(6, zero, scale=5.0):
        steered, _ = model.run_with_cache(ids, names=["resid_pre"])
    assert np.array_equal(steered, base)
    with model.patch(9, 3, cache["resid_pre", 9][3]):
        patched = model.logits(ids)
    assert np.array_equal(patched, base)
    # A real vector does change them, only from its layer on, and only where it is added.
    v = np.random.default_rng(0).standard_normal(model.cfg.d_model).astype(np.float32)
    _, moved = model.run_with_cache(ids, names=["resid_pre"], steer=highrise.Steer(6, v, 4.0, positions=[2]))
    assert np.array_equal(moved["resid_pre", 5], cache["resid_pre", 5])
    assert np.allclose(moved["resid_pre", 6][2] - cache["resid_pre", 6][2], 4.0 * v, atol=1e-3)
    assert np.array_equal(moved["resid_pre", 6][:2], cache["resid_pre", 6][:2])
    assert not np.array_equal(moved["resid_pre", 7][2:], cache["resid_pre", 7][2:])
    # The with-block is gone afterwards.
    assert np.array_equal(model.logits(ids), base)


def test_per_prompt_interventions_in_a_batch(model):
    a, b = model.tokenize("Once upon a time"), model.tokenize("The capital of France is")
    v = np.ones(model.cfg.d_model, dtype=np.float32)
    (la, _), (lb, _) = model.run_with_cache([a, b], names=[], steer=[[highrise.Steer(4, v, 2.0)], []])
    assert np.array_equal(lb, model.logits(b))
    assert np.allclose(la, model.logits(a, steer=highrise.Steer(4, v, 2.0)), atol=1e-4)
    assert not np.allclose(la, model.logits(a), atol=1e-2)


def test_logit_lens(model):
    ids = model.tokenize("The capital of France is")
    logits, cache = model.run_with_cache(ids, names=["resid_post"])
    lens = model.logit_lens(cache, top_k=5)
    n, t = model.cfg.n_layers, len(ids)
    assert lens.ids.shape == lens.probs.shape == (n, t, 5)
    # At the last layer the lens is the model's own prediction.
    assert np.array_equal(lens.ids[-1, :, 0], logits.argmax(-1))
    assert lens.tokens[-1][-1][0] == model.to_str_tokens([int(logits[-1].argmax())])[0]
    assert np.all(np.diff(lens.probs, axis=-1) <= 0) and np.all(lens.probs <= 1)


def test_generate_equals_the_cli(quant_model, cli):
    prompt = "Once upon a time"
    out = subprocess.run(
        [str(cli), "generate", "--prompt", prompt, "-n", "24", "--json"], capture_output=True, text=True, check=True
    )
    want = json.loads(out.stdout)
    g = quant_model.generate(prompt, max_tokens=24)
    assert g.prompt_ids == want["prompt_ids"]
    assert g.ids == want["ids"]
    assert g.text == want["text"] and g.finish_reason == want["finish_reason"]
    assert len(g.logprobs) == len(g.ids) and all(lp <= 0 for lp in g.logprobs)


def test_greedy_matches_hf(model, reference):
    """The f32 model's greedy continuation is HF's, through the story's step 11 (step 12 is a
    near-tie, margin 0.003: see the fixtures' README)."""
    case = reference["cases"]["story"]
    g = model.generate(case["input_ids"], max_tokens=12, ignore_eos=True)
    assert g.ids == case["greedy"][:12]


def test_stream_gives_the_same_text(quant_model):
    whole = quant_model.generate("The capital of France is", max_tokens=16)
    stream = quant_model.generate("The capital of France is", max_tokens=16, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == whole.text and len(pieces) > 1
    assert stream.generation.ids == whole.ids and stream.finish_reason == whole.finish_reason


def test_generate_many_equals_one_by_one(quant_model):
    many = quant_model.generate_many(TEXTS, max_tokens=12)
    assert [g.ids for g in many] == [quant_model.generate(t, max_tokens=12).ids for t in TEXTS]
    # Sampling is reproducible from its seed, batched or not.
    sampled = quant_model.generate_many(TEXTS[:3], max_tokens=8, temperature=0.8, seed=7)
    assert [g.ids for g in sampled] == [quant_model.generate(t, max_tokens=8, temperature=0.8, seed=7).ids for t in TEXTS[:3]]


def test_steered_generation(quant_model):
    v = quant_model.run_with_cache("wedding", names=["resid_pre"], layers=[6])[1]["resid_pre", 6][-1]
    plain = quant_model.generate("I went to the", max_tokens=12)
    with quant_model.steer(6, v, 8.0):
        steered = quant_model.generate("I went to the", max_tokens=12)
    assert steered.ids != plain.ids
    assert quant_model.generate("I went to the", max_tokens=12).ids == plain.ids


def test_tokenizer_matches_hf(model, reference):
    for case in reference["tokenizer"]:
        assert model.tokenize(case["text"]) == case["ids"], case["text"]
        assert model.detokenize(case["ids"]) == case["text"]


def test_bad_inputs_raise_named_errors(model):
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        highrise.Model.load("/nowhere.gguf")
    with pytest.raises(ValueError, match="no backend named"):
        highrise.Model.load(backend="nope")
    with pytest.raises(ValueError, match='dtype "f8"'):
        highrise.Model.load(dtype="f8")
    with pytest.raises(ValueError, match="no such shape"):
        highrise.Model.load("random:huge")
    ids = model.tokenize("Hello there")
    with pytest.raises(ValueError, match='unknown site "hook_resid_mid"'):
        model.run_with_cache(ids, names=["hook_resid_mid"])
    with pytest.raises(IndexError, match="layer 30 does not exist"):
        model.run_with_cache(ids, layers=[30])
    with pytest.raises(IndexError, match="layer 99 does not exist"):
        model.generate(ids, steer=highrise.Steer(99, np.zeros(model.cfg.d_model), 1.0))
    with pytest.raises(ValueError, match="7 values, the residual stream has 576"):
        model.generate(ids, steer=highrise.Steer(3, np.zeros(7), 1.0))
    with pytest.raises(IndexError, match="position 5 is beyond the prompt's 2 tokens"):
        model.run_with_cache(ids, patch=highrise.Patch(3, 5, np.zeros(model.cfg.d_model)))
    with pytest.raises(ValueError, match="beyond the vocabulary"):
        model.run_with_cache([1, 10**6])
    with pytest.raises(ValueError, match="empty"):
        model.generate("")
    with pytest.raises(ValueError, match="empty"):
        model.generate([])
    with pytest.raises(ValueError, match="max_tokens is 0"):
        model.generate(ids, max_tokens=0)
    with pytest.raises(ValueError, match="seed = -1"):
        model.generate(ids, seed=-1)
    nan = np.zeros(model.cfg.d_model)
    nan[7] = np.nan
    with pytest.raises(ValueError, match="value 7 is NaN, not a finite number"):
        model.generate(ids, steer=highrise.Steer(3, nan, 1.0))
    with pytest.raises(ValueError, match="scale inf"):
        model.generate(ids, steer=highrise.Steer(3, np.zeros(model.cfg.d_model), float("inf")))
    with pytest.raises(ValueError, match="patch row: value 7 is NaN"):
        model.run_with_cache(ids, patch=highrise.Patch(3, 0, nan))
    with pytest.raises(ValueError, match='site "q" cannot be patched .these can: resid_pre, z, attn_out, mlp_post, mlp_out'):
        model.run_with_cache(ids, patch=highrise.Patch(3, 0, np.zeros(model.cfg.d_model), "q"))
    with pytest.raises(ValueError, match="patch row: 5 values, z has 576"):
        model.run_with_cache(ids, patch=highrise.Patch(3, 0, np.zeros(5), "z"))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, temperature=-1.0)
    # Generation patches positions of its prompt.
    with pytest.raises(IndexError, match="position 9 is beyond the prompt's"):
        with model.patch(3, 9, np.zeros(model.cfg.d_model)):
            model.generate(ids)
    with pytest.raises(TypeError):
        model.run_with_cache(3.5)
    # None of it hurt the model.
    assert model.generate(ids, max_tokens=4).ids


def test_gil_released_and_ctrl_c_stops_generation(quant_model):
    # Another Python thread runs while the engine generates.
    ticks, done = [0], threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        quant_model.generate("Once upon a time", max_tokens=48, ignore_eos=True)
    finally:
        done.set()
        counter.join()
    assert ticks[0] > 10
    # Ctrl-C (SIGINT to this process) stops a long generation with KeyboardInterrupt, and the engine
    # carries on.
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    start = time.time()
    with pytest.raises(KeyboardInterrupt):
        quant_model.generate("Once upon a time", max_tokens=5000, ignore_eos=True)
    assert time.time() - start < 30
    assert len(quant_model.generate("Hello", max_tokens=4).ids) > 0


def test_cuda_backend_from_the_plugin():
    """backend="cuda" loads the CUDA plugin built beside the package: on a GPU when there is one,
    else on the emulated device (the kernels compiled for the host, run on a CPU model of CUDA);
    either way the same answers as the built-in CPU backend (f32, random weights of the tiny shape)."""
    try:
        gpu = highrise.Model.load("random:tiny", backend="cuda", kv_cache="16M")
    except highrise.HighriseError:
        os.environ["HIGHRISE_CUDA_EMULATE"] = "1"
        try:
            gpu = highrise.Model.load("random:tiny", backend="cuda", kv_cache="16M")
        except (highrise.HighriseError, ValueError) as e:
            from conftest import skip

            skip(f"no GPU, and the emulated CUDA device could not start: {e}")
        finally:
            del os.environ["HIGHRISE_CUDA_EMULATE"]
    except ValueError as e:
        from conftest import skip

        skip(f"the CUDA plugin was not found: {e}")
    cpu = highrise.Model.load("random:tiny", kv_cache="16M")
    ids = list(range(1, 40, 3))
    (lg, cg), (lc, cc) = gpu.run_with_cache(ids, names=["resid_post"]), cpu.run_with_cache(ids, names=["resid_post"])
    scale = np.abs(lc).max()
    assert np.abs(lg - lc).max() <= 1e-5 * scale, f"{gpu.cfg.device}: logits differ by {np.abs(lg - lc).max()}"
    assert np.abs(cg["resid_post", 1] - cc["resid_post", 1]).max() <= 1e-4
    assert gpu.generate(ids, max_tokens=8, ignore_eos=True).ids == cpu.generate(ids, max_tokens=8, ignore_eos=True).ids
    gpu.close()
    cpu.close()
