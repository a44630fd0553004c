"""run_with_cache over every residual-stream site, highrise's Python package against HuggingFace
transformers (eager and sdpa attention, output_hidden_states=True) on the same prompt, the same
machine, the same run. Not run in CI: it needs torch and transformers, installed in a benchmark
venv beside the package::

    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install torch transformers gguf accelerate ./crates/highrise-py
    /tmp/benchvenv/bin/python benches/python_vs_hf.py [--tokens 512] [--reps 5] [--out table.md]

HF loads the default model's GGUF itself (transformers' GGUF loader dequantizes every tensor to
f32); highrise runs the same file with f32 weights (the same arithmetic), with the file's own Q4_1
weights (as the CLI runs it), and with those weights meeting 8-bit activations (`q8_activations`,
llama.cpp's arithmetic; integer GEMMs, on AVX-512 VNNI where the CPU has it). Every row captures the residual stream at every layer: HF's 31 hidden
states; highrise's resid_pre, attn_out, mlp_out and resid_post at each of the 30 layers (4x the
arrays). Times are the median of --reps after one warm-up; the prefill ceiling of this machine is
not measured here (see `highrise bench`), the peer is.
"""

import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

import highrise

SITES = ["resid_pre", "attn_out", "mlp_out", "resid_post"]
TEXT = (
    "The history of the city begins with a small settlement on the banks of a river, where traders "
    "stopped on their way between the mountains and the sea. Over the centuries it grew into a market "
    "town, then a fortified city, and finally the capital of a region known for its wool, its bridges "
    "and its long, quarrelsome council. "
)


def median_secs(f, reps):
    f()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="16,128,512", help="prompt lengths, comma-separated")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)

    lengths = [int(t) for t in str(args.tokens).split(",")]
    m32 = highrise.Model.load(weights="f32", kv_cache="64M")
    mq = highrise.Model.load(kv_cache="64M")
    mq8 = highrise.Model.load(kv_cache="64M", q8_activations=True)
    path = Path(m32.cfg.path)
    base = m32.tokenize(TEXT)
    prompts = {n: (base * (n // len(base) + 1))[:n] for n in lengths}

    hf_models = {
        impl: AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation=impl
        ).eval()
        for impl in ("eager", "sdpa")
    }
    rows, checks = [], []
    for n, ids in prompts.items():
        x = torch.tensor([ids])
        hf = {}
        times = {}
        for impl, model in hf_models.items():

            def run_hf(model=model, impl=impl):
                with torch.no_grad():
                    out = model(x, output_hidden_states=True)
                hf[impl] = (out.logits[0].numpy(), [h[0].numpy() for h in out.hidden_states])

            times[f"HF transformers {transformers.__version__} ({impl}), output_hidden_states"] = median_secs(run_hf, args.reps)
        times["highrise run_with_cache, f32 weights, 4 sites x 30 layers"] = median_secs(lambda: m32.run_with_cache(ids, names=SITES), args.reps)
        times["highrise run_with_cache, f32 weights, no captures"] = median_secs(lambda: m32.run_with_cache(ids, names=[]), args.reps)
        times["highrise run_with_cache, Q4_1 weights (the file's), 4 sites x 30 layers"] = median_secs(lambda: mq.run_with_cache(ids, names=SITES), args.reps)
        times["highrise run_with_cache, Q4_1 weights, 8-bit activations, 4 sites x 30 layers"] = median_secs(lambda: mq8.run_with_cache(ids, names=SITES), args.reps)
        eager = next(iter(times.values()))
        for name, secs in times.items():
            rows.append((n, name, secs, eager / secs))
            print(f"T={n} {name}: {secs * 1e3:.1f} ms ({n / secs:.0f} tokens/s, {eager / secs:.2f}x HF eager)", flush=True)
        # The same numbers: highrise's stream against HF's hidden states (resid_pre of layer l is
        # HF's hidden_states[l]).
        logits, cache = m32.run_with_cache(ids, names=SITES)
        hf_logits, hidden = hf["eager"]
        stream = max(float(np.abs(cache["resid_pre", l] - hidden[l]).max() / max(1.0, np.abs(hidden[l]).max())) for l in range(30))
        checks.append((n, stream, float(np.abs(logits - hf_logits).max())))

    lines = [
        "# run_with_cache vs HF transformers, every residual tap on",
        "",
        f"Machine: {cpu_name()}, {threads} threads (torch.set_num_threads({threads}); highrise's CPU backend, all cores).",
        f"torch {torch.__version__}, transformers {transformers.__version__}, highrise {highrise.__version__}; "
        f"model {path.name} (SmolLM2-135M-Instruct, 30 layers, d_model 576). Median of {args.reps} after a warm-up.",
        "",
        "| prompt tokens | what | time (ms) | tokens/s | vs HF eager |",
        "|---:|---|---:|---:|---:|",
    ]
    for n, name, secs, x in rows:
        lines.append(f"| {n} | {name} | {secs * 1e3:.1f} | {n / secs:.0f} | {x:.2f}x |")
    lines.append("")
    for n, stream, logit in checks:
        lines.append(
            f"Same numbers at {n} tokens: highrise's resid_pre (f32 weights) against HF's hidden states within {stream:.1e} "
            f"of each layer's largest magnitude; logits within {logit:.1e}."
        )
    lines.append(f"Command: `benches/python_vs_hf.py --tokens {args.tokens} --reps {args.reps}`.")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
