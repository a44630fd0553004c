#!/usr/bin/env bash
# Everything a GPU window should run, in one call from prebuilt binaries (scripts/gpu-bundle.sh), on
# one GPU: 263 s on an H200 on 2026-11-30; about 7 minutes expected since flash_attn_ws joined
# step 2b and the bench, the cuBLASLt rows the criterion bench and step 7 (Nsight Compute) came.
# Each step has its own limit (they add up to about 16 minutes, reached only where tests hang; a
# run under a 10-minute limit then loses the last steps):
#   1. `highrise backends` (what the machine offers);
#   2. every test of tests/cuda.rs, each in its own process (one CUDA_ERROR_ILLEGAL_ADDRESS poisons
#      the whole process: a shared one turned 2 failures into 15), each with its own time limit; on
#      Hopper (whose default prefill is wgmma's), the attention cross-checks again on mma.sync's
#      kernel, the plain wgmma one and the warp-specialized one (HIGHRISE_FLASH_KERNEL);
#   3. compute-sanitizer memcheck over the op tests, one process each, where it is on the PATH;
#   4. the criterion benchmarks of benches/cuda_ops.rs with their ceilings (copy bandwidth, cuBLAS);
#      the 8B projections on cublasGemmEx's choice and on cuBLASLt's timed one side by side;
#   5. the peers at the same shapes, where python3 has torch: PyTorch's scaled_dot_product_attention
#      forced to FlashAttention-2 and to cuDNN, its copy bandwidth and bf16 GEMM (scripts/gpu-peers.py);
#   6. `highrise bench` on a Llama-3-8B-shaped model with random bf16 weights (batch 1 to 256, with
#      every residual tap on, and where a token's time goes, at batch 1 and in each batch; the
#      cuBLASLt algorithm each GEMM shape was given, with its time and the heuristic's first's); its
#      decode again with programmatic dependent launches off (HIGHRISE_PDL=0), for what they buy,
#      and batches 1 and 64 sampled as chat requests are (temperature, top-p) instead of greedy;
#   7. under Nsight Compute, each kernel's device time in 8B decode steps at batch 1, 64 and 256;
#   8. `highrise bench` on an OLMoE-1B-7B-shaped mixture (batch 1, 8, 64), routed on the device.
# Full logs go to OUT (default $OUT, else gpu-results/); summary.md, the short table, is printed last.
# Then, in a call of its own right after (a warm machine is handed back after 30 s idle):
# gpu-sweep.sh BUNDLE OUT "gemv step decode wg" (the GEMV's shapes alone and in whole 8B decode
# steps, decode attention's shapes, Hopper's prefill geometries: about 8 minutes; SWEEP_BUDGET_S
# cuts it to what is left).
#
# usage: scripts/gpu-check.sh [BUNDLE [OUT]]
set -uo pipefail
bundle=$(cd "${1:-gpu-bundle}" && pwd)
out=${2:-${OUT:-gpu-results}}
mkdir -p "$out/tests" "$out/sanitizer"
out=$(cd "$out" && pwd)
# No network there: tests that need the default model say skipped instead of waiting on pip.
export HIGHRISE_BACKEND_DIR="$bundle" HIGHRISE_KERNEL_CACHE="$out/kernel-cache" HIGHRISE_OFFLINE=1 RUST_BACKTRACE=1
# ncu and compute-sanitizer, where the image keeps them off the PATH.
source "$bundle/gpu-tools.sh"
: >"$out/steps.txt"

step() { # name, seconds, command...
    local name=$1 secs=$2
    shift 2
    local start=$SECONDS
    timeout "$secs" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s (limit $secs s)" >>"$out/steps.txt"
}

# The outcome of one test binary run on one test: ok, FAILED, skipped (the test said why), timeout.
outcome() { # rc, log
    case $1 in
        0) if grep -q 'skipped' "$2"; then echo skipped; else echo ok; fi ;;
        124 | 137) echo timeout ;;
        *) echo FAILED ;;
    esac
}

{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
} >"$out/device.txt"
echo "tools: ncu $(command -v ncu || echo none), compute-sanitizer $(command -v compute-sanitizer || echo none)" >>"$out/steps.txt"
# A cold machine took 16 s here on 2026-11-30 (the CUDA driver's first start), and a cut list
# lost the Hopper step below: 45 s, and Hopper is asked of nvidia-smi too.
step backends 45 "$bundle/highrise" backends

# 2. Each cross-check in its own process; the first one compiles the kernels into the cache.
start=$SECONDS
# The wgmma and TMA probes first: they take a second, and must not be the ones the step's budget cuts.
"$bundle/cuda-tests" --list 2>/dev/null | sed -n 's/: test$//p' | awk '/wgmma/ { print; next } { rest[n++] = $0 } END { for (i = 0; i < n; i++) print rest[i] }' >"$out/tests.list"
: >"$out/tests.results"
while read -r t; do
    if ((SECONDS - start > 120)); then
        echo "$t|not run (the step's 120 s were spent)|" >>"$out/tests.results"
        continue
    fi
    s0=$SECONDS
    timeout 45 "$bundle/cuda-tests" --exact "$t" --nocapture --test-threads 1 >"$out/tests/$t.txt" 2>&1
    echo "$t|$(outcome $? "$out/tests/$t.txt")|$((SECONDS - s0))" >>"$out/tests.results"
done <"$out/tests.list"
echo "cross-checks: $(grep -c '|ok|' "$out/tests.results") of $(wc -l <"$out/tests.list") ok in $((SECONDS - start)) s" >>"$out/steps.txt"

# 2b. On Hopper step 2 prefilled on the pipelined wgmma kernel (flash_attn_wgp, the default there
# since 2026-11-30); here the attention cross-checks again on the other three, each in its own
# process: mma.sync's flash_attn (HIGHRISE_FLASH_KERNEL=mma, what every other GPU runs), with
# Gemma 2's soft-capped, windowed scores and the random Llama too, the plain wgmma kernel
# (flash_attn_wg), and the warp-specialized one (flash_attn_ws: producer warpgroup, mbarriers,
# setmaxnreg, named-barrier turns; never run on a GPU before 2026-12-01), all four, and under
# compute-sanitizer's synccheck. wgmma alone, as they use it, ran in step 2
# (wgmma_as_the_kernels_use_it_equals_a_plain_product); where it failed, its report (which product,
# which elements) goes into steps.txt.
: >"$out/wgmma.results"
if grep -q 'sm_90' "$out/backends.txt" || nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | grep -q '^9\.0'; then
    start=$SECONDS
    for run in mma:ops::prefill_attention_is_causal_gqa mma:ops::paged_attention_reads_through_block_tables \
        mma:ops::attention_soft_caps_scores_and_slides_its_window mma:random_llama_matches_cpu_logits_and_64_greedy_steps \
        wgmma:ops::prefill_attention_is_causal_gqa wgmma:ops::paged_attention_reads_through_block_tables \
        ws:ops::prefill_attention_is_causal_gqa ws:ops::paged_attention_reads_through_block_tables \
        ws:ops::attention_soft_caps_scores_and_slides_its_window ws:random_llama_matches_cpu_logits_and_64_greedy_steps \
        ws-synccheck:ops::prefill_attention_is_causal_gqa; do
        kernel=${run%%:*} t=${run#*:}
        if [ "${kernel%%-*}" = ws ] && grep -q '^ws.*|timeout|' "$out/wgmma.results"; then
            echo "$kernel: $t|not run (an earlier flash_attn_ws run hung)|" >>"$out/wgmma.results"
            continue
        fi
        if ((SECONDS - start > 110)); then
            echo "$kernel: $t|not run (the step's 110 s were spent)|" >>"$out/wgmma.results"
            continue
        fi
        s0=$SECONDS
        if [ "$kernel" = ws-synccheck ]; then
            if command -v compute-sanitizer >/dev/null; then
                HIGHRISE_FLASH_KERNEL=ws timeout 60 compute-sanitizer --tool synccheck --error-exitcode 9 "$bundle/cuda-tests" --exact "$t" \
                    --nocapture --test-threads 1 >"$out/tests/$kernel-$t.txt" 2>&1
            else
                echo "skipped: no compute-sanitizer" >"$out/tests/$kernel-$t.txt"
            fi
        else
            HIGHRISE_FLASH_KERNEL=$kernel timeout 45 "$bundle/cuda-tests" --exact "$t" --nocapture --test-threads 1 >"$out/tests/$kernel-$t.txt" 2>&1
        fi
        echo "$kernel: $t|$(outcome $? "$out/tests/$kernel-$t.txt")|$((SECONDS - s0))" >>"$out/wgmma.results"
    done
    echo "Hopper's other prefill kernels (mma, wgmma, ws): $(grep -c '|ok|' "$out/wgmma.results") of $(wc -l <"$out/wgmma.results") cross-checks ok" >>"$out/steps.txt"
    # The bench times flash_attn_ws only where it passed (a trap would poison every later row).
    if ! grep -q '^ws: ops::prefill_attention_is_causal_gqa|ok|' "$out/wgmma.results"; then
        export HIGHRISE_BENCH_SKIP_WS=1
        echo "flash_attn_ws failed or did not run its prefill cross-check: not timed" >>"$out/steps.txt"
    fi
    # Step 2's wgmma and TMA probes, where they found the hardware other than we read the ISA: which
    # product or tile, which elements.
    grep -h -A3 'WRONG' "$out/tests/wgmma_as_the_kernels_use_it_equals_a_plain_product.txt" \
        "$out/tests/wgmma_tma_lays_tiles_out_as_the_kernels_read_them.txt" >>"$out/steps.txt" 2>/dev/null
else
    echo "Hopper's other prefill kernels: skipped (not a Hopper GPU)" >>"$out/steps.txt"
fi

# 3. Memcheck over the op tests (it named both of the first run's bugs within seconds).
: >"$out/sanitizer.results"
if command -v compute-sanitizer >/dev/null; then
    start=$SECONDS
    grep '^ops::' "$out/tests.list" | while read -r t; do
        if ((SECONDS - start > 45)); then
            echo "$t|not run (the step's 45 s were spent)" >>"$out/sanitizer.results"
            continue
        fi
        timeout 30 compute-sanitizer --tool memcheck --error-exitcode 86 "$bundle/cuda-tests" --exact "$t" --test-threads 1 \
            >"$out/sanitizer/$t.txt" 2>&1
        case $? in
            0) r=clean ;; 86) r="ERRORS ($(grep -c 'Invalid' "$out/sanitizer/$t.txt") invalid accesses)" ;; 124 | 137) r=timeout ;; *) r="test failed" ;;
        esac
        echo "$t|$r" >>"$out/sanitizer.results"
    done
    echo "sanitizer: $(grep -c '|clean' "$out/sanitizer.results") of $(grep -c '^ops::' "$out/tests.list") op tests clean" >>"$out/steps.txt"
else
    echo "sanitizer: skipped (no compute-sanitizer on the PATH)" >>"$out/steps.txt"
fi

HIGHRISE_BENCH_QUICK=1 step cuda-bench 180 "$bundle/cuda-bench" --bench
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    step peers 40 python3 "$bundle/gpu-peers.py"
else
    echo "peers: skipped (python3 has no torch with CUDA)" >>"$out/steps.txt"
    echo "skipped: python3 has no torch with CUDA" >"$out/peers.txt"
fi
# HIGHRISE_GEMM_LOG: each GEMM shape's cuBLASLt algorithm as timed (crates/highrise-cuda/src/lt.rs).
HIGHRISE_GEMM_LOG=1 step bench-8b 170 "$bundle/highrise" bench --backend cuda --dtype bf16 --model random:llama-3-8b \
    --pp 512 --tg 64 --reps 2 --taps --profile -c 1 -c 8 -c 64 -c 256 --kv-memory 4G
# The same decode with the graphs' programmatic dependent launches off: what they buy.
HIGHRISE_PDL=0 step bench-8b-nopdl 90 "$bundle/highrise" bench --backend cuda --dtype bf16 --model random:llama-3-8b \
    --pp 0 --tg 64 --reps 2 -c 1 -c 64 --kv-memory 4G
# The same batches drawing their tokens as chat requests do (temperature 0.8, top-p 0.95: the
# sampling kernel over the vocabulary every step, where greedy runs argmax): what sampling costs.
step bench-8b-sampled 60 "$bundle/highrise" bench --backend cuda --dtype bf16 --model random:llama-3-8b \
    --pp 0 --tg 0 -c 1 -c 64 --temperature 0.8 --top-p 0.95 --kv-memory 4G
# 7. Each kernel's device time and DRAM bytes read in decode steps of the 8B shape (batch 1, 64, 256;
# op by op under Nsight Compute, which runs kernels one at a time: what a token costs on the device
# alone, beside the bench's time per token, whose difference is the gaps; each kernel's GB/s against
# the copy bandwidth). Clocks as they run (--clock-control none).
if command -v ncu >/dev/null; then
    HIGHRISE_BENCH_SWEEP=steps step steps-ncu 150 ncu --profile-from-start off --clock-control none --csv --print-units base \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum --log-file "$out/steps-ncu.csv" "$bundle/cuda-bench" --bench
    python3 "$bundle/ncu-steps.py" "$out/steps-ncu.csv" "$out/steps-ncu.txt" >"$out/steps-kernels.md" 2>&1
    # Decode attention alone at the bench's shapes (batch 1 at 1k, 8k, 32k; 8 and 64 at 8k; three
    # launches of each pair, the first untimed by the bench): its device time and DRAM bytes read,
    # beside the bench's GB/s, which count the host's launches too.
    HIGHRISE_BENCH_SWEEP=decode HIGHRISE_BENCH_ITERS=2 step decode-ncu 90 ncu --clock-control none --csv --print-units base \
        --kernel-name 'regex:decode_attn|attn_combine' --metrics gpu__time_duration.sum,dram__bytes_read.sum \
        --log-file "$out/decode-ncu.csv" "$bundle/cuda-bench" --bench
    python3 "$bundle/ncu-steps.py" --launches "$out/decode-ncu.csv" >>"$out/steps-kernels.md" 2>&1
else
    echo "steps-ncu: skipped (no ncu on the PATH)" >>"$out/steps.txt"
    echo "skipped: no ncu on the PATH" >"$out/steps-kernels.md"
fi
# 8. A mixture's decode at a real size (OLMoE-1B-7B's shape, random bf16 weights: each token's top 8
# of 64 experts on every layer), its router's choice on the device (the `Moe` op) so that each step
# is one graph, beside the roofline of the experts its tokens chose. Last: it never ran on a GPU.
step bench-moe 75 "$bundle/highrise" bench --backend cuda --dtype bf16 --model random:olmoe-1b-7b \
    --pp 256 --tg 32 --reps 1 --profile -c 1 -c 8 -c 64 --kv-memory 2G

{
    echo "## highrise GPU check: $(sed -n 2p "$out/device.txt"), $(head -1 "$out/device.txt")"
    echo
    echo "steps:"
    sed 's/^/- /' "$out/steps.txt"
    echo
    echo "backends:"
    sed 's/^/    /' "$out/backends.txt"
    echo
    echo "| cross-check (tests/cuda.rs, one process each) | result | s | memcheck |"
    echo "| --- | --- | ---: | --- |"
    while IFS='|' read -r t r s; do
        m=$(grep -F "$t|" "$out/sanitizer.results" | head -1 | cut -d'|' -f2)
        echo "| $t | $r | $s | ${m:--} |"
    done < <(cat "$out/tests.results" "$out/wgmma.results")
    echo
    grep -hE 'logits max|differ|skipped|panicked' "$out"/tests/*.txt | sort -u | sed 's/^/    /' | head -20
    echo
    grep -E '^ceilings|^\||^skipped' "$out/cuda-bench.txt" || tail -3 "$out/cuda-bench.txt"
    echo
    echo "peers (PyTorch, same shapes, same run):"
    grep -E '^\||^ceilings|^skipped' "$out/peers.txt"
    echo
    echo "highrise bench, Llama-3-8B shape, random bf16 weights:"
    # "highrise: ..." lines too: graphs given up, or captured without programmatic dependent launches.
    grep -E '^\||^ceilings|^where|^\(|^graphs|^highrise: ' "$out/bench-8b.txt" | grep -v '^highrise: gemm' || tail -3 "$out/bench-8b.txt"
    echo
    echo "cuBLASLt's algorithms as the bench's GEMM shapes timed them (first run of each shape):"
    grep '^highrise: gemm' "$out/bench-8b.txt" | sed 's/^highrise: /    /' | head -60
    echo
    echo "the same decode without programmatic dependent launches (HIGHRISE_PDL=0):"
    grep -E '^\| random' "$out/bench-8b-nopdl.txt" || tail -3 "$out/bench-8b-nopdl.txt"
    echo
    echo "the same batches sampled (temperature 0.8, top-p 0.95) instead of greedy:"
    grep -E '^\| random' "$out/bench-8b-sampled.txt" || tail -3 "$out/bench-8b-sampled.txt"
    echo
    echo "each kernel's device time in 8B decode steps, then each decode attention launch at the bench's"
    echo "shapes (1x1k, 1x8k, 1x32k, 8x8k, 64x8k; three launches each) (Nsight Compute, scripts/ncu-steps.py):"
    cat "$out/steps-kernels.md"
    grep '^| decode' "$out/decode-ncu.txt" 2>/dev/null || true
    echo
    echo "a mixture (OLMoE-1B-7B's shape, bf16), its router's choice on the device:"
    grep -E '^\||^ceilings|^where|^graphs' "$out/bench-moe.txt" || tail -3 "$out/bench-moe.txt"
} | tee "$out/summary.md"
