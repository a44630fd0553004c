#!/usr/bin/env bash
# The CUDA checks and benchmarks, in one run from prebuilt binaries (scripts/gpu-bundle.sh), on one
# GPU, in under 8 minutes: the cross-checks of tests/cuda.rs (every op and dtype against the f64
# references, a random-weight Llama against the CPU), the criterion benchmarks of benches/cuda_ops.rs
# with their ceilings, and `highrise bench` on a Llama-3-8B-shaped model with random bf16 weights
# (with every residual tap on as well: what introspection costs on the GPU).
# Full logs go to OUT (default $OUT, else gpu-results/); a short table is printed last. The steps'
# time limits add up to 470 s.
#
# usage: scripts/gpu-check.sh [BUNDLE [OUT]]
set -uo pipefail
bundle=$(cd "${1:-gpu-bundle}" && pwd)
out=${2:-${OUT:-gpu-results}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# No network there: tests that need the default model say skipped instead of waiting on pip.
export HIGHRISE_BACKEND_DIR="$bundle" HIGHRISE_KERNEL_CACHE="$out/kernel-cache" HIGHRISE_OFFLINE=1 RUST_BACKTRACE=1

step() { # name, seconds, command...
    local name=$1 secs=$2
    shift 2
    local start=$SECONDS
    timeout "$secs" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}

{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
} >"$out/device.txt"
step backends 20 "$bundle/highrise" backends
step cross-checks 150 "$bundle/cuda-tests" --test-threads 1 --nocapture
HIGHRISE_BENCH_QUICK=1 step cuda-bench 150 "$bundle/cuda-bench" --bench
step bench-8b 150 "$bundle/highrise" bench --backend cuda --dtype bf16 --model random:llama-3-8b \
    --pp 512 --tg 64 --reps 2 --taps --profile -c 1 -c 8 -c 64 -c 256 --kv-memory 4G

{
    echo "## highrise GPU check: $(head -1 "$out/device.txt"), $(sed -n 2p "$out/device.txt")"
    echo
    echo "steps:"
    sed 's/^/- /' "$out/steps.txt"
    echo
    echo "backends:"
    sed 's/^/    /' "$out/backends.txt"
    echo
    echo "cross-checks (tests/cuda.rs):"
    grep -E '^test |^test result|skipped|panicked' "$out/cross-checks.txt" | sed 's/^/    /'
    echo
    grep -E '^ceilings' "$out/cuda-bench.txt"
    grep -E '^\|' "$out/cuda-bench.txt"
    echo
    echo "highrise bench, Llama-3-8B shape, random bf16 weights:"
    grep -E '^\||^ceilings|^where' "$out/bench-8b.txt"
} | tee "$out/summary.md"
