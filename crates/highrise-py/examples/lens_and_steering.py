"""Two small published findings, reproduced on the default model (SmolLM2-135M-Instruct) in seconds:

1. The logit lens (nostalgebraist, 2020): read each layer's residual stream through the final norm
   and the unembedding. The model's answer is not there from the start: in "The capital of France
   is", " Paris" appears only in the last layers.
2. Activation addition (Turner et al., 2023, "Steering Language Models With Activation
   Engineering"): the difference of two prompts' residual streams ("I love" minus "I hate") at one
   layer, added while generating, turns the continuation's sentiment: "I hate you because" goes on
   about love. (Added at every position, so at small scales: SmolLM2's first position carries
   "massive activations" that a large vector there would swamp.)

    pip install ./crates/highrise-py matplotlib
    python crates/highrise-py/examples/lens_and_steering.py [--out lens_and_steering.png]
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import highrise


def logit_lens(m: highrise.Model, prompt: str, ax) -> None:
    _, cache = m.run_with_cache(prompt, names=["resid_post"])
    lens = m.logit_lens(cache, top_k=1)
    probs = lens.probs[:, :, 0]  # [layers, T]
    ax.imshow(probs, aspect="auto", origin="lower", cmap="Blues", vmin=0, vmax=1)
    for l in range(probs.shape[0]):
        for t in range(probs.shape[1]):
            ax.text(t, l, lens.tokens[l][t][0].replace("\n", "\\n")[:8], ha="center", va="center", fontsize=5)
    ax.set_xticks(range(len(cache.tokens)), m.to_str_tokens(cache.tokens), rotation=45, fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(f"logit lens: top token per layer (shade: its probability)\n{prompt!r}", fontsize=9)
    paris = [l for l in range(probs.shape[0]) if lens.tokens[l][-1][0] == " Paris"]
    print(f"logit lens: ' Paris' is the top next token from layer {paris[0] if paris else None} of {m.cfg.n_layers}")


def steering_vector(m: highrise.Model, layer: int, plus: str, minus: str) -> np.ndarray:
    """ActAdd's vector: the difference of the two prompts' streams entering `layer`, at the last
    token (where they differ; the first, shared, is the attention sink)."""
    (_, a), (_, b) = m.run_with_cache([plus, minus], names=["resid_pre"], layers=[layer])
    return a["resid_pre", layer][-1] - b["resid_pre", layer][-1]


def sentiment_by_scale(m: highrise.Model, prompt: str, layer: int, v: np.ndarray, scales, ax) -> None:
    """How much probability the next token puts on positive vs negative words, as the vector is
    added at growing scales."""
    positive = [" love", " happy", " wonderful", " great", " beautiful", " kind"]
    negative = [" hate", " angry", " terrible", " awful", " horrible", " cruel"]
    ids = lambda words: [m.tokenize(w)[0] for w in words]
    pos_ids, neg_ids = ids(positive), ids(negative)
    pos, neg = [], []
    for s in scales:
        logits = m.logits(prompt, steer=highrise.Steer(layer, v, s))[-1]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        pos.append(p[pos_ids].sum())
        neg.append(p[neg_ids].sum())
    ax.plot(scales, pos, "o-", label="positive words")
    ax.plot(scales, neg, "s-", label="negative words")
    ax.set_xlabel(f"scale of ('I love' - 'I hate') added at layer {layer}")
    ax.set_ylabel("next-token probability")
    ax.set_title(f"activation addition on {prompt!r}", fontsize=9)
    ax.legend(fontsize=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF file or HF directory (default: the default model)")
    ap.add_argument("--layer", type=int, default=8, help="the layer the steering vector enters")
    ap.add_argument("--out", default="lens_and_steering.png")
    args = ap.parse_args()

    m = highrise.Model.load(args.model)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    logit_lens(m, "The capital of France is", ax1)

    v = steering_vector(m, args.layer, "I love", "I hate")
    prompt = "I hate you because"
    sentiment_by_scale(m, prompt, args.layer, v, [-1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2], ax2)
    print("without steering:", repr(m.generate(prompt, max_tokens=24).text))
    with m.steer(args.layer, v, scale=0.5):
        print(f"with 0.5 x ('I love' - 'I hate') at layer {args.layer}:", repr(m.generate(prompt, max_tokens=24).text))

    fig.tight_layout()
    fig.savefig(args.out, dpi=150)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
