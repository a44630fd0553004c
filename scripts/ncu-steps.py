#!/usr/bin/env python3
"""Each kernel's device time in the decode steps benches/cuda_ops.rs profiles (HIGHRISE_BENCH_SWEEP=steps),
from Nsight Compute's CSV (`ncu --csv --print-units base --metrics gpu__time_duration.sum`).

The bench runs a few steps at batch 1, then 64, then 256, of a Llama-3-8B-shaped model cut to LAYERS
layers, and says so on its own lines ("steps: batch B, N decode steps of L layers ..."). ncu numbers
the profiled kernels in order; each step begins with the embedding's gather, whose grid is the
batch. For each batch: a
row per kernel and grid (name up to its first '(' or 60 characters), its launches per step, microseconds per
launch, and per step; then the step's total, and that total with the layers' share scaled to the
full model's 32 (a kernel and grid launched a multiple of LAYERS times a step is a layer's). Where ncu
also read dram__bytes_read.sum, each row's DRAM megabytes per launch and their rate: a projection's
rate against the copy bandwidth says how far it is from the memory's limit, a small kernel's time
with next to no bytes says it is latency.

usage: ncu-steps.py NCU_CSV BENCH_OUTPUT
       ncu-steps.py --launches NCU_CSV   (a row per launch: device time, DRAM bytes read, their rate)
"""
import csv
import re
import sys

FULL_LAYERS = 32


def rows(ncu_csv):
    """ncu's CSV rows (its own messages, which are not rows, left out)."""
    with open(ncu_csv, newline="") as f:
        return list(csv.DictReader([l for l in f if l.startswith('"')]))


def launches(ncu_csv):
    """A row per profiled launch, in order: kernel, grid, device time, DRAM bytes read and their rate."""
    by_id = {}
    for row in rows(ncu_csv):
        key = int(row["ID"])
        entry = by_id.setdefault(key, {"kernel": row["Kernel Name"].split("(")[0].strip()[:40], "grid": row.get("Grid Size", "").replace(" ", "")})
        entry[row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
    print("| # | kernel | grid | us | DRAM MB read | GB/s |")
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    for key, e in sorted(by_id.items()):
        ns, read = e.get("gpu__time_duration.sum"), e.get("dram__bytes_read.sum")
        us = f"{ns / 1e3:.1f}" if ns else "-"
        mb = f"{read / 1e6:.1f}" if read is not None else "-"
        rate = f"{read / ns:.0f}" if ns and read is not None else "-"
        print(f"| {key} | {e['kernel']} | {e['grid']} | {us} | {mb} | {rate} |")


def main(ncu_csv, bench_out):
    runs = [tuple(int(x) for x in m) for m in re.findall(r"steps: batch (\d+), (\d+) decode steps of (\d+) layers", open(bench_out).read())]
    if not runs:
        print("skipped: the bench printed no 'steps:' lines")
        return
    launch = {}  # kernel id -> [name, ns, DRAM bytes read or None]
    for row in rows(ncu_csv):
        metric = row.get("Metric Name")
        if metric not in ("gpu__time_duration.sum", "dram__bytes_read.sum"):
            continue
        # The grid too: one kernel serves a layer's projection and the unembedding, at other grids.
        name = row["Kernel Name"].split("(")[0].strip()[:60] + " " + row.get("Grid Size", "").replace(" ", "")
        entry = launch.setdefault(int(row["ID"]), [name, 0.0, None])
        entry[1 if metric == "gpu__time_duration.sum" else 2] = float(row["Metric Value"].replace(",", ""))
    durations = [tuple(launch[key]) for key in sorted(launch)]
    with_bytes = all(read is not None for _, _, read in durations)
    # Each step begins with the embedding's gather, a block per token: its grid says the batch.
    by_batch = {}  # batch -> (steps, {kernel: (launches, ns, bytes)})
    current = None
    for name, ns, read in durations:
        if name.startswith("embedding"):
            batch = int(name.split("(")[-1].split(",")[0])
            steps, kernels = by_batch.get(batch, (0, {}))
            by_batch[batch] = (steps + 1, kernels)
            current = kernels
        if current is None:
            continue
        n, t, b = current.get(name, (0, 0.0, 0.0))
        current[name] = (n + 1, t + ns, b + (read or 0.0))
    print(f"{len(durations)} kernels profiled")
    layers = runs[0][2]
    for batch, (steps, kernels) in sorted(by_batch.items()):
        step_ns = sum(t for _, t, _ in kernels.values()) / steps
        layer_ns = sum(t for n, t, _ in kernels.values() if n % (steps * layers) == 0) / steps
        full = step_ns + layer_ns * (FULL_LAYERS / layers - 1)
        print()
        print(f"batch {batch}: {steps} steps of {layers} layers; device time per step {step_ns / 1e3:.1f} us, "
              f"scaled to {FULL_LAYERS} layers {full / 1e6:.3f} ms per step ({batch / (full / 1e9):.0f} tokens/s if nothing else took time)")
        dram = " DRAM MB per launch | GB/s |" if with_bytes else ""
        print("| kernel grid | launches per step | us per launch | us per step | share |" + dram)
        print("| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if with_bytes else ""))
        for name, (n, t, b) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
            rate = f" {b / n / 1e6:.2f} | {b / t:.0f} |" if with_bytes else ""
            print(f"| {name} | {n / steps:g} | {t / n / 1e3:.2f} | {t / steps / 1e3:.1f} | {100 * t / steps / step_ns:.1f}% |" + rate)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--launches":
        launches(sys.argv[2])
    elif len(sys.argv) == 3:
        main(sys.argv[1], sys.argv[2])
    else:
        sys.exit(__doc__)
