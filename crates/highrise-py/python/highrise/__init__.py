"""highrise: a transformer inference engine that makes both highways visible.

The residual stream (each token's vector, carried up through the layers) and the key/value stream
(each layer's keys and values, read sideways by later tokens) at engine speed, from Python, as numpy
arrays, with TransformerLens's names::

    import highrise
    m = highrise.Model.load()                        # the default model, SmolLM2-135M-Instruct
    print(m.generate("Once upon a time", max_tokens=32))
    logits, cache = m.run_with_cache("The capital of France is")
    cache["resid_pre", 12]                           # [T, d_model]
    cache.attention(3)                               # [n_heads, T, T]
    k, v = cache.kv(3)                               # [T, n_key_value_heads, d_head] each
    with m.steer(12, vector, scale=8.0):             # add a vector to the stream entering layer 12
        print(m.generate("I think", max_tokens=32))

Everything runs in Rust on the engine's own thread with the GIL released; errors are Python
exceptions (FileNotFoundError, ValueError, IndexError, HighriseError) with the CLI's messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Mapping
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from ._highrise import Engine as _Engine
from ._highrise import HighriseError, __version__

__all__ = [
    "Model",
    "ActivationCache",
    "Generation",
    "GenerationStream",
    "LogitLens",
    "Steer",
    "Patch",
    "HighriseError",
    "SITES",
    "__version__",
]

#: The capture sites, as TransformerLens names its hooks (``hook_<site>``).
SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_post", "mlp_out", "resid_post", "final_norm", "q", "k", "v", "z", "router")

Prompt = Union[str, Sequence[int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Steer:
    """Add ``scale * vector`` to the residual stream entering ``layer`` (at ``positions`` of the
    prompt, every position when None; generation steers every position). A layer or position
    below 0 counts from the end (-1: the last layer, the prompt's last token)."""

    layer: int
    vector: np.ndarray
    scale: float = 1.0
    positions: Optional[Sequence[int]] = None

    def _arg(self):
        pos = None if self.positions is None else [int(p) for p in self.positions]
        return (int(self.layer), _row(self.vector, "steering vector"), float(self.scale), pos)


@dataclasses.dataclass(frozen=True)
class Patch:
    """Replace ``site`` of ``layer`` at prompt ``position`` with ``row`` (below 0: from the end, -1
    the prompt's last token): the stream entering the layer (``"resid_pre"``, the default), each
    head's output before the output projection (``"z"``, a row of n_heads * d_head: zero a head's
    slice to ablate it, or take it from another run), the attention block's output
    (``"attn_out"``), the MLP's activations (``"mlp_post"``) or its output (``"mlp_out"``)."""

    layer: int
    position: int
    row: np.ndarray
    site: str = "resid_pre"

    def _arg(self):
        # A z row may come as the cache gives it, [n_heads, d_head].
        return (int(self.layer), int(self.position), _row(np.ravel(self.row), "patch row"), str(self.site))


def _row(v, what: str) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
    if a.ndim != 1:
        raise ValueError(f"{what}: an array of shape {a.shape}, expected one vector [d_model]")
    return a


@dataclasses.dataclass
class Generation:
    """A finished generation. ``str(g)`` is its text."""

    text: str
    ids: list
    prompt_ids: list
    logprobs: list
    finish_reason: str

    def __str__(self) -> str:
        return self.text


class GenerationStream:
    """Text pieces as they are generated (``for piece in stream``); afterwards ``.generation``
    holds the whole result. Ctrl-C stops the generation and frees its cache."""

    def __init__(self, stream, prompt_ids):
        self._stream = stream
        self._prompt_ids = list(prompt_ids)
        self._text, self._ids, self._logprobs = [], [], []
        self.finish_reason: Optional[str] = None

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> str:
        while True:
            event = next(self._stream, None) if self.finish_reason is None else None
            if event is None:
                raise StopIteration
            token, text, logprob, finish = event
            if token is not None:
                self._ids.append(token)
                self._logprobs.append(logprob)
            self._text.append(text)
            self.finish_reason = finish
            if text:
                return text

    def cancel(self) -> None:
        """Stop generating now."""
        self._stream.cancel()

    @property
    def generation(self) -> Generation:
        """What has been generated so far (all of it once the stream is exhausted)."""
        return Generation("".join(self._text), list(self._ids), self._prompt_ids, list(self._logprobs), self.finish_reason or "")

    def finish(self) -> Generation:
        for _ in self:
            pass
        return self.generation


class ActivationCache(Mapping):
    """What one forward pass captured, for one prompt, indexed as TransformerLens's cache is:
    ``cache["resid_pre", 12]`` or ``cache["blocks.12.hook_resid_pre"]`` -> [T, d_model] (layer -1
    the last, as in Python; ``cache["blocks.3.attn.hook_q"]`` for q, k, v and pattern); ``q`` is
    [T, n_heads, d_head], ``k`` and ``v`` [T, n_key_value_heads, d_head] (after RoPE, as the KV
    cache holds them); ``z`` [T, n_heads, d_head] (attention's output per head before the output
    projection, ``blocks.L.attn.hook_z``); ``resid_mid`` [T, d_model] (between attention and the MLP; none where they
    run side by side); ``mlp_post`` [T, d_mlp] (the MLP's activations, ``blocks.L.mlp.hook_post``);
    ``cache["final_norm"]`` (``ln_final.hook_normalized``) [T, d_model]; and
    ``cache["pattern", 3]`` the attention probabilities [n_heads, T, T]. Arrays are read-only views
    of the engine's buffers."""

    def __init__(self, model: "Model", tokens: list, arrays: dict):
        self.model = model
        self.tokens = tokens
        self._arrays = arrays

    @staticmethod
    def _key(key) -> tuple:
        if isinstance(key, str):
            if key in ("final_norm", "ln_final.hook_normalized"):
                return ("final_norm", None)
            # TransformerLens's hook names: blocks.L.hook_resid_pre, blocks.L.attn.hook_pattern,
            # blocks.L.mlp.hook_post (the MLP's activations: our mlp_post).
            parts = key.split(".")
            if len(parts) == 4 and parts[0] == "blocks" and parts[1].isdigit() and parts[2:] == ["mlp", "hook_post"]:
                return ("mlp_post", int(parts[1]))
            attn = len(parts) == 4 and parts[2] == "attn" and parts[3] in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_pattern")
            if (len(parts) == 3 or attn) and parts[0] == "blocks" and parts[-1].startswith("hook_") and parts[1].isdigit():
                return (parts[-1][len("hook_"):], int(parts[1]))
            raise KeyError(f"{key!r}: expected (site, layer), 'blocks.L.hook_SITE', 'blocks.L.attn.hook_SITE' or 'final_norm'")
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str):
            return (key[0], int(key[1]))
        raise KeyError(f"{key!r}: expected (site, layer), 'blocks.L.hook_SITE' or 'final_norm'")

    def __getitem__(self, key) -> np.ndarray:
        site, layer = self._key(key)
        if layer is not None and site != "final_norm":
            layer = self.model._layer(layer)
        if site == "pattern":
            return self.attention(layer)
        if site == "final_norm":
            layer = self.model.cfg.n_layers
        if site not in SITES:
            raise KeyError(f"unknown site {site!r} ({', '.join(SITES)}, pattern)")
        try:
            a = self._arrays[(site, layer)]
        except KeyError:
            raise KeyError(f"{site} at layer {layer} was not captured (captured: {self._names()})") from None
        cfg = self.model.cfg
        if site in ("q", "z"):
            return a.reshape(len(self.tokens), cfg.n_heads, cfg.d_head)
        if site in ("k", "v"):
            return a.reshape(len(self.tokens), cfg.n_key_value_heads, cfg.d_head)
        return a

    def _names(self) -> str:
        return ", ".join(sorted({s for s, _ in self._arrays})) or "nothing"

    def __iter__(self):
        n = self.model.cfg.n_layers
        return iter(("final_norm", None) if l == n and s == "final_norm" else (s, l) for s, l in self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __contains__(self, key) -> bool:
        try:
            self[key]
            return True
        except (KeyError, IndexError):
            return False

    def attention(self, layer: int) -> np.ndarray:
        """The attention probabilities [n_heads, T, T] at ``layer`` (recomputed in f64 from the
        captured q and k: the attention kernels never write them)."""
        layer = self.model._layer(layer)
        if ("q", layer) not in self._arrays or ("k", layer) not in self._arrays:
            raise KeyError(f"attention patterns at layer {layer} need q and k captured there (names: 'q', 'k' or 'pattern')")
        return self.model._engine.attention(self._arrays[("q", layer)], self._arrays[("k", layer)], layer)

    def kv(self, layer: int) -> tuple:
        """The key/value stream of ``layer``: K and V, each [T, n_key_value_heads, d_head]."""
        return self["k", layer], self["v", layer]

    def stack(self, site: str, layers: Optional[Sequence[int]] = None) -> np.ndarray:
        """One site at every layer (or ``layers``), stacked: [n_layers, T, ...] (a copy)."""
        if layers is None:
            layers = sorted(l for s, l in self._arrays if s == site)
        if not layers:
            raise KeyError(f"{site} was not captured (captured: {self._names()})")
        return np.stack([self[site, l] for l in layers])

    def __repr__(self) -> str:
        return f"ActivationCache({len(self.tokens)} tokens, {len(self)} arrays: {self._names()})"


@dataclasses.dataclass
class LogitLens:
    """The logit lens: each layer's resid_post through the final norm and the unembedding.
    ``ids`` and ``probs`` are [n_layers, T, top_k]; ``tokens`` the same as strings."""

    layers: list
    ids: np.ndarray
    probs: np.ndarray
    tokens: list


def _is_ids(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim == 1 and np.issubdtype(x.dtype, np.integer)
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(i, (int, np.integer)) for i in x)


def _is_id_batch(x) -> bool:
    """A [batch, pos] integer array, as TransformerLens's models take tokens."""
    return isinstance(x, np.ndarray) and x.ndim == 2 and np.issubdtype(x.dtype, np.integer) and x.size > 0


class Model:
    """A model running on the highrise engine. Make one with :meth:`Model.load`."""

    def __init__(self, engine: _Engine):
        self._engine = engine
        info = engine.info()
        #: The model's shape (n_layers, d_model, n_heads, n_key_value_heads, d_head, d_mlp,
        #: d_vocab, n_ctx; a mixture of experts' num_experts, experts_per_token, d_expert: 0 and
        #: None for a dense model), its layout in TransformerLens's terms (original_architecture,
        #: normalization_type "LN" or "RMS", positional_embedding_type "standard", "rotary" or "alibi",
        #: rotary_dim, rotary_adjacent_pairs (GPT-J, Cohere), act_fn, gated_mlp, parallel_attn_mlp;
        #: position_offset, the row of the learned positions' table that position 0 reads: OPT's
        #: 2) and where it runs (path, backend, device, dtype, kv_cache_tokens).
        self.cfg = types.SimpleNamespace(**info)
        self._steer: list = []
        self._patch: list = []

    @classmethod
    def load(
        cls,
        path: Optional[str] = None,
        backend: str = "cpu",
        dtype: str = "f32",
        weights: str = "auto",
        kv_dtype: Optional[str] = None,
        q8_activations: bool = False,
        kv_cache: Union[int, str] = "1G",
        threads: Optional[int] = None,
    ) -> "Model":
        """Load a model and start its engine.

        path: a GGUF file, a HF directory (config.json, *.safetensors, tokenizer.json),
            ``"random:SHAPE"`` (random weights: llama-3-8b, olmoe-1b-7b, smollm2-135m, tiny,
            tiny-gemma2, tiny-gemma3, tiny-smollm3, tiny-olmo2, tiny-mixtral, tiny-qwen3-moe,
            tiny-qwen2-moe, tiny-gpt2, tiny-pythia), or None for the
            default model (SmolLM2-135M-Instruct, fetched on first use as the CLI fetches it).
        backend: ``"cpu"`` (built in), ``"cuda"``, or the path of a backend plugin.
        dtype: activations and KV cache, f32, f16 or bf16. weights: ``auto`` (the file's own
            format where the backend computes with it) or f32, f16, bf16, q8_0.
        kv_cache: memory for the paged KV cache that generation uses (bytes, or "512M", "2G").
        threads: CPU backend threads (default: all cores, or $HIGHRISE_THREADS).
        """
        engine = _Engine.load(
            None if path is None else str(path),
            backend,
            dtype,
            weights,
            kv_dtype,
            bool(q8_activations),
            _bytes(kv_cache),
            threads,
        )
        return cls(engine)

    def __repr__(self) -> str:
        c = self.cfg
        return f"Model({c.path!r}, backend={c.backend!r}, dtype={c.dtype!r}, n_layers={c.n_layers}, d_model={c.d_model})"

    def close(self) -> None:
        """Stop the engine thread and let the model's memory go."""
        self._engine.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- weights ----------------------------------------------------------------------------

    def weight(self, name: str) -> np.ndarray:
        """The model file's tensor ``name`` as HF names it (``model.layers.3.self_attn.q_proj.weight``),
        dequantized to float32 in HF's layout: a GGUF's q/k rows in HF's order, fused projections
        split, Gemma's norms as w (they multiply by 1 + w). A new array each call."""
        return self._engine.weight(str(name))

    def weight_names(self) -> list:
        """The HF names of the model file's tensors."""
        return self._engine.weight_names()

    @property
    def W_E(self) -> np.ndarray:
        """The embedding [d_vocab, d_model] (TransformerLens's name)."""
        return self.weight("model.embed_tokens.weight")

    @property
    def W_U(self) -> np.ndarray:
        """The unembedding [d_model, d_vocab] (TransformerLens's name and layout: lm_head
        transposed, under any family's name for it (GPT-NeoX's embed_out), or the embedding where
        they are tied)."""
        try:
            w = self.weight("lm_head.weight")
        except KeyError:
            w = self.W_E
        return np.ascontiguousarray(w.T)

    @property
    def b_U(self) -> np.ndarray:
        """The unembedding's bias [d_vocab] (TransformerLens's name): Phi's; zeros for the families
        without one."""
        try:
            return self.weight("lm_head.bias")
        except KeyError:
            return np.zeros(self.cfg.d_vocab, dtype=np.float32)

    @property
    def W_pos(self) -> np.ndarray:
        """GPT-2's and OPT's learned positions [n_ctx, d_model] (TransformerLens's name: OPT's from
        the third row of its table on, the first two being rows no position reads); a KeyError for
        the families that rotate q and k instead."""
        return self.weight("model.embed_positions.weight")[self.cfg.position_offset:]

    # --- text -------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list:
        """Token ids of ``text`` (special tokens written in it recognized; BOS where the model's
        tokenizer config asks for one), as the CLI's ``highrise tokenize``."""
        return self._engine.tokenize(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._engine.detokenize([int(i) for i in ids])

    def to_str_tokens(self, prompt: Prompt) -> list:
        """Each token's own text."""
        return self._engine.pieces(self._ids(prompt))

    def apply_chat_template(self, messages: Sequence[Any], add_generation_prompt: bool = True) -> str:
        """The model's chat template over ``messages`` ({"role", "content"} dicts or pairs)."""
        pairs = [(m["role"], m["content"]) if isinstance(m, Mapping) else (m[0], m[1]) for m in messages]
        return self._engine.apply_chat_template(pairs, add_generation_prompt)

    def _ids(self, prompt: Prompt) -> list:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        if isinstance(prompt, (list, tuple, np.ndarray)) and len(prompt) == 0:
            raise ValueError("the prompt is empty (no token ids)")
        if _is_ids(prompt):
            ids = [int(i) for i in prompt]
            if min(ids) < 0:
                raise ValueError(f"token id {min(ids)} is not in the vocabulary (ids are 0 to {self.cfg.d_vocab - 1})")
            return ids
        raise TypeError(f"a prompt is a str or a sequence of token ids, not {type(prompt).__name__}")

    def _prompts(self, prompts) -> tuple:
        """(list of id lists, whether one prompt was given)."""
        if isinstance(prompts, str) or _is_ids(prompts):
            return [self._ids(prompts)], True
        if _is_id_batch(prompts):
            return [self._ids(row) for row in prompts], False
        if isinstance(prompts, (list, tuple)) and prompts:
            return [self._ids(p) for p in prompts], False
        raise TypeError("expected a prompt (str or token ids), a [batch, pos] array of ids or a non-empty list of prompts")

    def _layer(self, layer: int) -> int:
        """A layer index as Python counts (-1 the last), checked against the model's layers."""
        n = self.cfg.n_layers
        l = int(layer)
        if not -n <= l < n:
            raise IndexError(f"layer {layer} does not exist (the model has {n})")
        return l + n if l < 0 else l

    # --- interventions ----------------------------------------------------------------------

    @contextlib.contextmanager
    def steer(self, layer: int, vector, scale: float = 1.0, positions: Optional[Sequence[int]] = None):
        """While the block runs, add ``scale * vector`` to the stream entering ``layer`` in every
        ``generate`` and ``run_with_cache`` (at ``positions`` of each prompt in ``run_with_cache``;
        all positions when None)::

            with m.steer(12, v, 8.0):
                m.generate("I think")
        """
        s = Steer(layer, _row(vector, "steering vector"), scale, positions)
        self._steer.append(s)
        try:
            yield s
        finally:
            self._steer.remove(s)

    @contextlib.contextmanager
    def patch(self, layer: int, position: int, row, site: str = "resid_pre"):
        """While the block runs, ``run_with_cache`` and ``generate`` replace ``site`` of ``layer``
        at ``position`` with ``row`` (activation patching; the sites as ``Patch`` says: the stream
        entering the layer by default, ``"z"`` for heads, ``"attn_out"``, ``"mlp_post"``,
        ``"mlp_out"``; in generation, a position of the prompt)."""
        p = Patch(layer, position, _row(np.ravel(row), "patch row"), site)
        self._patch.append(p)
        try:
            yield p
        finally:
            self._patch.remove(p)

    def _steers(self, steer) -> list:
        extra = [] if steer is None else [steer] if isinstance(steer, Steer) else list(steer)
        out = []
        for s in self._steer + extra:
            if not isinstance(s, Steer):
                s = Steer(*s)
            out.append(s)
        return out

    def _patches(self, patch) -> list:
        extra = [] if patch is None else [patch] if isinstance(patch, Patch) else list(patch)
        return [p if isinstance(p, Patch) else Patch(*p) for p in self._patch + extra]

    # --- generation -------------------------------------------------------------------------

    def _submit(self, ids, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos, steer, patch):
        steers = self._steers(steer)
        if any(s.positions is not None for s in steers):
            raise ValueError("generation steers every position: positions= is for run_with_cache")
        if isinstance(stop, str):
            stop = [stop]
        for name, value in (("max_tokens", max_tokens), ("seed", seed)):
            if int(value) < 0:
                raise ValueError(f"{name} = {value}: expected an integer >= 0")
        sampling = {
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
            "top_k": int(top_k),
            "top_p": float(top_p),
            "min_p": float(min_p),
            "repetition_penalty": float(repetition_penalty),
            "seed": int(seed),
            "stop": list(stop or []),
            "ignore_eos": bool(ignore_eos),
        }
        # The extension reads the settings as attributes.
        patches = [p._arg() for p in self._patches(patch)]
        return GenerationStream(self._engine.submit(ids, types.SimpleNamespace(**sampling), [s._arg() for s in steers], patches), ids)

    def generate(
        self,
        prompt: Prompt,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop: Union[str, Sequence[str], None] = None,
        ignore_eos: bool = False,
        steer=None,
        stream: bool = False,
        patch=None,
    ) -> Union[Generation, GenerationStream]:
        """Continue ``prompt`` (text or token ids): greedy at temperature 0, else sampled with
        the settings of the CLI and the OpenAI API. Returns a :class:`Generation` (``str(g)`` is
        the text), or with ``stream=True`` a :class:`GenerationStream` of text pieces. ``steer``:
        a :class:`Steer` or a list of them (or (layer, vector, scale) tuples), on top of the
        ``with m.steer(...)`` blocks open; ``patch``: a :class:`Patch` or a list of them at
        positions of the prompt (below 0 from its end), on top of the ``with m.patch(...)`` blocks
        open (the prompt's K/V is then the patched run's, and shared only with requests patched
        alike)."""
        s = self._submit(self._ids(prompt), max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos, steer, patch)
        return s if stream else s.finish()

    def generate_many(self, prompts: Sequence[Prompt], **kwargs) -> list:
        """``generate`` for many prompts at once, batched by the engine (continuous batching over
        the paged KV cache): the same results as one by one, at batch speed."""
        if kwargs.pop("stream", False):
            raise ValueError("generate_many returns whole generations; use generate(stream=True) per prompt")
        ids, _ = self._prompts(list(prompts))
        streams = []
        try:
            for i in ids:
                streams.append(self.generate(i, stream=True, **kwargs))
            return [s.finish() for s in streams]
        finally:
            for s in streams:
                s.cancel()

    # --- captures ---------------------------------------------------------------------------

    def run_with_cache(
        self,
        prompts,
        names: Optional[Sequence[str]] = None,
        layers: Optional[Sequence[int]] = None,
        steer=None,
        patch=None,
    ):
        """One forward pass capturing the residual and key/value streams.

        prompts: a prompt (text or ids) -> ``(logits [T, d_vocab], ActivationCache)``; a list of
            prompts (or a [batch, pos] array of ids) -> a list of such pairs, run as one batch (each
            with its own captures and positions; the steering and patches apply to each prompt).
        names: sites to capture (default: all of ``SITES``; ``"pattern"`` captures q and k for
            ``cache.attention``). layers: the layers to capture at (default: all; -1 the last).
            Layers and positions of steering and patches count from the end when below 0.
        steer, patch: :class:`Steer` / :class:`Patch` (or lists), on top of the open ``with``
            blocks. Per-prompt interventions: pass a list of lists, one per prompt.
        """
        ids, single, logits, arrays = self._run(prompts, self._sites(names), layers, steer, patch)
        out, start = [], 0
        for p in ids:
            end = start + len(p)
            cache = ActivationCache(self, p, {k: a[start:end] for k, a in arrays.items()})
            out.append((logits[start:end], cache))
            start = end
        return out[0] if single else out

    def logits(self, prompts, steer=None, patch=None):
        """Logits [T, d_vocab] at every position (a list of them for a list of prompts)."""
        ids, single, logits, _ = self._run(prompts, [], None, steer, patch)
        out, start = [], 0
        for p in ids:
            out.append(logits[start : start + len(p)])
            start += len(p)
        return out[0] if single else out

    def _run(self, prompts, sites, layers, steer, patch):
        """One batched pass: (id lists, whether one prompt was given, logits [sum T, V], arrays)."""
        ids, single = self._prompts(prompts)
        steer_per, patch_per = self._per_prompt(steer, Steer, len(ids)), self._per_prompt(patch, Patch, len(ids))
        steer_args = [[s._arg() for s in self._steers(x)] for x in steer_per]
        patch_args = [[p._arg() for p in self._patches(x)] for x in patch_per]
        layers = None if layers is None else [int(l) for l in layers]
        logits, arrays = self._engine.run(ids, sites, layers, steer_args, patch_args, True)
        return ids, single, logits, arrays

    @staticmethod
    def _sites(names) -> list:
        if names is None:
            return list(SITES)
        if isinstance(names, str):
            names = [names]
        sites = []
        for n in names:
            for s in (["q", "k"] if n == "pattern" else [n]):
                if s not in sites:
                    sites.append(s)
        return sites

    @staticmethod
    def _per_prompt(x, kind, n: int) -> list:
        """One list of interventions per prompt: shared when ``x`` is flat, as given when it holds
        one list per prompt."""
        if x is None or isinstance(x, kind):
            return [x] * n
        x = list(x)
        if len(x) == n and all(isinstance(e, list) for e in x):
            return x
        return [x] * n

    def logit_lens(self, cache: ActivationCache, top_k: int = 5, layers: Optional[Sequence[int]] = None) -> LogitLens:
        """Each layer's ``resid_post`` through the final norm and the unembedding: the ``top_k``
        tokens per position and their probabilities (needs resid_post captured)."""
        if layers is None:
            layers = sorted(l for s, l in cache._arrays if s == "resid_post")
        layers = [self._layer(l) for l in layers]
        if not layers:
            raise KeyError("the logit lens reads resid_post: capture it (names=None or include 'resid_post')")
        stacked = np.ascontiguousarray(np.concatenate([cache["resid_post", l] for l in layers]))
        ids, probs = self._engine.logit_lens(stacked, int(top_k))
        t = len(cache.tokens)
        ids = ids.reshape(len(layers), t, top_k)
        probs = probs.reshape(len(layers), t, top_k)
        tokens = [[self._engine.pieces([int(i) for i in row]) for row in per_layer] for per_layer in ids]
        return LogitLens(list(layers), ids, probs, tokens)


def _bytes(x: Union[int, str]) -> int:
    if isinstance(x, (int, np.integer)):
        return int(x)
    s = str(x).strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    try:
        return int(float(s[:-1] if s[-1:] in "KMG" else s) * mult)
    except ValueError:
        raise ValueError(f"kv_cache {x!r} is not a size such as 512M or 2G") from None
