#!/usr/bin/env bash
# Tries every tile shape of the tensor-core prefill kernel (flash_attn_*, kernels/attention.cu) on a
# GPU, from prebuilt binaries (scripts/gpu-bundle.sh), in one call of about 2-3 minutes. For each
# shape (WARPSxSLICESxKEYS: warps per block, 16-row query slices per warp, keys per step; see
# crates/highrise-cuda/src/flash.rs), in a process of its own:
#   1. the prefill and paged attention cross-checks of tests/cuda.rs against the f64 reference, with
#      the kernels compiled for that shape (HIGHRISE_FLASH_SHAPE);
#   2. its speed at the bench's shapes (32 query heads over 8 KV heads, bf16, head dims 64 and 128,
#      causal 2k/8k/16k and full 8k), HIGHRISE_BENCH_SWEEP mode of benches/cuda_ops.rs.
# Then, where ncu is on the PATH, the best shape at d128 causal 8k under Nsight Compute: tensor-pipe
# utilization and shared-memory bank conflicts. The mma shapes run with HIGHRISE_FLASH_KERNEL=mma
# (on Hopper the engine prefills on wgmma). On Hopper, the same for the wgmma kernels
# (flash_attn_wg, flash_attn_wgp) in each geometry of WG_SHAPES (WARPGROUPSxKEYS, through
# HIGHRISE_FLASH_WG_SHAPE), and the warp-specialized flash_attn_ws in each of WS_SHAPES (CONSUMERSxKEYSxSTAGES,
# HIGHRISE_FLASH_WS_SHAPE), about 15 s each. The winners per head dim go into flash.rs's TUNED (and
# TUNED_WG) table with the date. The decode kernel (decode_attn, the paged cache) in each shape of
# DECODE_SHAPES (WARPSxSTAGES: warps per block, copy-pipeline stages per warp; HIGHRISE_DECODE_SHAPE):
# its paged attention cross-check and its read bandwidth at batch 1 (1k, 8k, 32k) and 8 and 64 (8k),
# about 10 s each; the winner goes into flash.rs's TUNED_DECODE. The matrix-vector kernels (gemv*,
# kernels/gemv.cu) in each shape of GEMV_SHAPES (HIGHRISE_GEMV_SHAPE): the q/k/v and
# SwiGLU-projection cross-checks on them, and their read bandwidth on Llama-3-8B's four decode
# projections, each first held to cuBLAS's result; the winner goes into gemv.rs's TUNED_GEMV. The
# decode step end to end (part "step", about 15 s a shape): `highrise bench`'s batch-1 tg64 of the
# 8B shape (graphs, programmatic launches) with the GEMV compiled in each shape of STEP_SHAPES, and
# with "+own" the down projection on it too (rows of 14336, cuBLAS's otherwise; HIGHRISE_CUDA_GEMV=own): what a
# shape's prefetches before its programmatic wait ("eN") buy shows only there, behind the norms and
# the attention that the isolated timing leaves out. Every shape here is also run on the CPU model in CI
# (tests/kernel_emu.rs) and compiled without spills for sm_80 and sm_90a (tests/cuda_kernels.rs), so
# a failure here is news.
#
# usage: scripts/gpu-sweep.sh [BUNDLE [OUT [WHICH]]]   (results in OUT/sweep.md; default OUT: $OUT or
# gpu-results). WHICH: all (default), gemv (about 2 minutes), step (about 1.5 minutes), decode
# (about 1.5 minutes), mma (the flash_attn shapes, 2-3 minutes) or wg (the Hopper geometries of wgp
# and ws, about 3 minutes), or several of them in one argument ("gemv step decode wg", about 8
# minutes; they run in the order listed here, whatever the argument's), so that a short GPU
# window takes what fits one call (a device call may run 10 minutes); SWEEP_BUDGET_S (default 540)
# stops starting variants once spent, so the call still ends with its table and names the rest.
set -uo pipefail
SHAPES="4x2x64 4x2x32 4x1x64 4x1x128 8x1x64 8x1x32 8x2x32 8x2x64 2x2x64"
# Hopper geometries, WARPGROUPSxKEYS: one for both head dims, or D64/D128 (three warpgroups of 128
# keys fit the register file at d64 only).
WG_SHAPES="2x128 3x128/2x128 2x64 3x64 1x128"
# The warp-specialized Hopper kernel (flash_attn_ws), CONSUMERSxKEYSxSTAGES at d64/d128 (the first the
# default; three consumers fit the registers at d64 only).
WS_SHAPES="2x128x3/2x128x2 2x128x4/2x128x3 3x128x2/2x64x4 3x128x3/2x64x3 3x64x4/2x128x2"
# Decode kernel shapes, WARPSxSTAGES (the first is the default).
DECODE_SHAPES="4x2 4x3 4x4 8x2 8x3 2x4"
# Matrix-vector kernel shapes, WARPSxUNROLL[p][sN][fN] (warps per block, chunks in flight per row and
# lane, p: the next round's loads issued before this one is used, sN: the block's N warps share its
# rows (llama.cpp's block per row; N = the warps), fN: N rounds prefetched into L2 ahead; the first
# is the default; the split ones early, as the most unlike it).
# eN: N rounds prefetched before the programmatic wait (timed here alone too, where no kernel runs
# before it).
GEMV_SHAPES="4x4 4x4ps4 4x2s4 8x4ps8 4x8 8x8 2x8 4x4p 8x4p 4x2p 8x2p 4x4f1 4x4f2 8x4pf1 4x8f1 4x4e2 4x4e4 4x4pe4"
# GEMV shapes timed in whole decode steps (each among GEMV_SHAPES; "+own": every projection on the
# GEMV kernel, the down projection too, which cuBLAS takes otherwise (ops::gemv_pays), and so adding
# into the stream itself; "+apart": the layer's norms apart from the projections, add_rms_norm
# between them, as before they folded (HIGHRISE_FOLD_NORMS=0); the first is the default). The gemv
# part's best and its "+own" are added.
STEP_SHAPES="4x4 4x4+apart 4x4e2 4x4e4 4x4+own 4x4+own+apart 4x4e4+own 4x4pe4+own"
which=${3:-all}
bundle=$(cd "${1:-gpu-bundle}" && pwd)
out=${2:-${OUT:-gpu-results}}
mkdir -p "$out/sweep"
out=$(cd "$out" && pwd)
export HIGHRISE_BACKEND_DIR="$bundle" HIGHRISE_KERNEL_CACHE="$out/kernel-cache" HIGHRISE_OFFLINE=1 RUST_BACKTRACE=1
# ncu, where the image keeps it off the PATH.
source "$bundle/gpu-tools.sh"

: >"$out/sweep/rows.txt"
: >"$out/sweep/decode-rows.txt"
: >"$out/sweep/gemv-rows.txt"
: >"$out/sweep/step-rows.txt"
: >"$out/sweep/skipped.txt"
# One variant, compiled as the environment says: the cross-checks named (in one process), then its
# timings (HIGHRISE_BENCH_SWEEP=MODE of benches/cuda_ops.rs: rows "| shape | test | figure |"),
# appended to ROWS with the checks' outcome.
# Variants start only while the budget lasts (SWEEP_BUDGET_S, default 540 s: a device call may run
# 600 s), so that a call always ends with its table, and says what it left out.
deadline=$((SECONDS + ${SWEEP_BUDGET_S:-540}))
variant() { # name, mode, rows file, tests...
    local name=$1 mode=$2 rows=$3 check
    shift 3
    if ((SECONDS + 20 > deadline)); then
        echo "$name: skipped (the sweep's budget of ${SWEEP_BUDGET_S:-540} s is spent)" | tee -a "$out/sweep/skipped.txt"
        return
    fi
    timeout 60 "$bundle/cuda-tests" --exact "$@" --test-threads 1 --nocapture >"$out/sweep/$name-check.txt" 2>&1
    case $? in
        0) if grep -q skipped "$out/sweep/$name-check.txt"; then check=skipped; else check=ok; fi ;;
        124 | 137) check=timeout ;;
        *) check=FAILED ;;
    esac
    HIGHRISE_BENCH_SWEEP=$mode timeout 60 "$bundle/cuda-bench" --bench >"$out/sweep/$name-bench.txt" 2>&1
    grep '^| ' "$out/sweep/$name-bench.txt" | sed "s/\$/ $check |/" >>"$rows"
    echo "$name: check $check, $(grep -c '^| ' "$out/sweep/$name-bench.txt") timings"
}
# The prefill kernels' variants: their attention cross-checks and TFLOP/s.
flash_variant() { variant "$1" 1 "$out/sweep/rows.txt" ops::prefill_attention_is_causal_gqa ops::paged_attention_reads_through_block_tables; }
# Whether WHICH (one part, several separated by spaces, or all) asks for part $1.
part() { [[ " $which " == *" $1 "* || " $which " == *" all "* ]]; }
if part gemv; then
    for shape in $GEMV_SHAPES; do
        # Not linear_matches_reference (10 s of host-side references on the H200): the bench holds
        # each 8B projection on the GEMV to cuBLAS's result, these two the fused families to the
        # plain one, and tests/kernel_emu.rs each shape to the default's sums on the CPU model.
        HIGHRISE_GEMV_SHAPE=$shape HIGHRISE_CUDA_GEMV=own variant "gemv-$shape" gemv "$out/sweep/gemv-rows.txt" \
            ops::qkv_linear_equals_three_linears ops::swiglu_linear_equals_its_three_ops
    done
fi
# The gemv shape that reads Llama-3-8B's four projections (50, 34, 235 and 117 MB) in the least time.
gemv_best() {
    awk -F'|' '$5 == " ok " { split("qkv 50.3 o 33.6 gate+up 234.9 down 117.4", w, " "); for (i = 1; i < 8; i += 2) if ($3 == " 8B " w[i] " T=1 ") { t[$2] += w[i + 1] / $4; n[$2]++ } }
        END { for (s in t) if (n[s] == 4 && (best == "" || t[s] < t[best])) best = s; gsub(/^ *gemv | *$/, "", best); print best }' "$out/sweep/gemv-rows.txt"
}
# A bench run's tokens/s in the row of test $2 (tg64: graphs; "tg64 (no graphs)": op by op) of file $1.
rate() { grep '^| random' "$1" | awk -F'|' -v t="$2" '$5 == " " t " " { split($6, r, " "); print r[1] }'; }
if part step; then
    steps=$STEP_SHAPES
    g=$(gemv_best)
    [ -n "$g" ] && for v in "$g" "$g+own"; do [[ " $steps " == *" $v "* ]] || steps="$steps $v"; done
    for v in $steps; do
        if ((SECONDS + 30 > deadline)); then
            echo "step-$v: skipped (the sweep's budget of ${SWEEP_BUDGET_S:-540} s is spent)" | tee -a "$out/sweep/skipped.txt"
            continue
        fi
        gemv= fold=
        [[ $v == *+own* ]] && gemv=own
        [[ $v == *+apart ]] && fold=0
        HIGHRISE_GEMV_SHAPE=${v%%+*} HIGHRISE_CUDA_GEMV=$gemv HIGHRISE_FOLD_NORMS=$fold timeout 90 "$bundle/highrise" bench --backend cuda --dtype bf16 \
            --model random:llama-3-8b --pp 0 --tg 64 --reps 2 -c 0 --kv-memory 4G >"$out/sweep/step-$v.txt" 2>&1
        rc=$? f="$out/sweep/step-$v.txt"
        echo "| step $v | tg64 b1 | $(rate "$f" tg64) | $(rate "$f" 'tg64 (no graphs)') | exit $rc |" >>"$out/sweep/step-rows.txt"
        echo "step-$v: exit $rc, $(rate "$f" tg64) t/s"
    done
fi
if part decode; then
    for shape in $DECODE_SHAPES; do
        HIGHRISE_DECODE_SHAPE=$shape variant "decode-$shape" decode "$out/sweep/decode-rows.txt" ops::paged_attention_reads_through_block_tables
    done
fi
if part mma; then
    for shape in $SHAPES; do
        HIGHRISE_FLASH_KERNEL=mma HIGHRISE_FLASH_SHAPE="d64=$shape,d128=$shape" flash_variant "$shape"
    done
fi
# The Hopper kernels (flash_attn_wg, flash_attn_wgp: wgmma), checked and timed the same way in each
# geometry: the pipelined kernel in all of them, the plain one in the default (2x128).
if part wg && nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | grep -q '^9\.0'; then
    HIGHRISE_FLASH_KERNEL=wgmma flash_variant wgmma-2x128
    for g in $WG_SHAPES; do
        HIGHRISE_FLASH_KERNEL=wgmma-pipe HIGHRISE_FLASH_WG_SHAPE="d64=${g%/*},d128=${g#*/}" flash_variant "wgmma-pipe-${g//\//-}"
    done
    for g in $WS_SHAPES; do
        HIGHRISE_FLASH_KERNEL=ws HIGHRISE_FLASH_WS_SHAPE="d64=${g%/*},d128=${g#*/}" flash_variant "ws-${g//\//-}"
    done
fi

# The fastest checked shape per head dim, by its causal 16k rate.
best() { grep "| d$1 causal T=16384 |" "$out/sweep/rows.txt" | grep -v '^| flash_attn_w[gs]' | grep ' ok |$' | sort -t'|' -k4 -g -r | head -1 | cut -d'|' -f2 | tr -d ' '; }
b64=$(best 64)
b128=$(best 128)
# The fastest checked Hopper kernel and geometry per head dim: "flash_attn_wgp 3x128", "flash_attn_ws 2x128x2".
best_wg() { grep "| d$1 causal T=16384 |" "$out/sweep/rows.txt" | grep '^| flash_attn_w[gs]' | grep ' ok |$' | sort -t'|' -k4 -g -r | head -1 | cut -d'|' -f2 | sed 's/^ *//; s/ *$//'; }
w64=$(best_wg 64)
w128=$(best_wg 128)
if command -v ncu >/dev/null && [ -n "$b128" ] && ((SECONDS + 60 < deadline)); then
    HIGHRISE_FLASH_KERNEL=mma HIGHRISE_FLASH_SHAPE="d64=$b64,d128=$b128" HIGHRISE_BENCH_SWEEP=ncu timeout 120 ncu --kernel-name regex:flash_attn_d128 \
        --launch-count 1 --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,sm__warps_active.avg.pct_of_peak_sustained_active \
        "$bundle/cuda-bench" --bench >"$out/sweep/ncu.txt" 2>&1
else
    echo "skipped: no ncu on the PATH (or no shape passed, or no time left)" >"$out/sweep/ncu.txt"
fi
# The same for the best Hopper geometry ("flash_attn_wgp 3x64"): wgmma runs on the gmma pipe.
if command -v ncu >/dev/null && [ -n "$w128" ] && ((SECONDS + 60 < deadline)); then
    wk=${w128%% *} wg=${w128##* }
    case $wk in
        flash_attn_wg) kind=wgmma geometry=HIGHRISE_FLASH_WG_SHAPE ;;
        flash_attn_ws) kind=ws geometry=HIGHRISE_FLASH_WS_SHAPE ;;
        *) kind=wgmma-pipe geometry=HIGHRISE_FLASH_WG_SHAPE ;;
    esac
    env HIGHRISE_FLASH_KERNEL=$kind "$geometry=d128=$wg" HIGHRISE_BENCH_SWEEP=ncu timeout 120 ncu --kernel-name "regex:${wk}_d128" \
        --launch-count 1 --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,sm__warps_active.avg.pct_of_peak_sustained_active \
        "$bundle/cuda-bench" --bench >"$out/sweep/ncu-wg.txt" 2>&1
else
    echo "skipped: no ncu on the PATH (or no Hopper geometry passed, or no time left)" >"$out/sweep/ncu-wg.txt"
fi

{
    echo "## flash_attn tile shapes on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(date -u +'%Y-%m-%d %H:%M UTC')"
    echo
    echo "TFLOP/s, bf16, 32 query heads over 8 KV heads, one sequence; check: tests/cuda.rs's attention cross-checks at that shape."
    echo
    echo "| shape | test | TFLOP/s | check |"
    echo "| --- | --- | ---: | --- |"
    cat "$out/sweep/rows.txt"
    echo
    echo "best by causal 16k: d64 ${b64:-none}, d128 ${b128:-none} (put them in crates/highrise-cuda/src/flash.rs TUNED with today's date)"
    echo "best wgmma by causal 16k: d64 ${w64:-none}, d128 ${w128:-none} (TUNED_WG or, for flash_attn_ws, WS_DEFAULT, with today's date; flash_attn_wgp is Hopper's default until flash_attn_ws beats it, flash::wgmma)"
    echo
    echo "decode_attn shapes (warps x stages), GB/s of K and V read, d128 bf16, 32 query heads over 8 KV heads:"
    echo
    echo "| shape | test | GB/s | check |"
    echo "| --- | --- | ---: | --- |"
    cat "$out/sweep/decode-rows.txt"
    echo
    echo "best decode shape by batch 1 ctx 32768: $(grep '| batch 1 ctx 32768 |' "$out/sweep/decode-rows.txt" | grep ' ok |$' | sort -t'|' -k4 -g -r | head -1 | cut -d'|' -f2 | sed 's/^ *decode //; s/ *$//') (flash.rs TUNED_DECODE, with today's date)"
    echo
    echo "gemv shapes (warps x chunks in flight, p: pipelined, fN: N rounds prefetched into L2), GB/s of weights read, Llama-3-8B's projections at one row, bf16:"
    echo
    echo "| shape | test | GB/s | check |"
    echo "| --- | --- | ---: | --- |"
    cat "$out/sweep/gemv-rows.txt"
    echo
    gbest=$(gemv_best)
    echo "best gemv shape by the four projections' time: ${gbest:-none} (the step part below decides between it and the others: crates/highrise-cuda/src/gemv.rs TUNED_GEMV, with today's date)"
    echo
    echo "decode steps with each gemv shape (highrise bench, random:llama-3-8b bf16, batch 1, tokens/s; +own: the down projection on the GEMV too; +apart: the norms as add_rms_norm, not folded into the projections):"
    echo
    echo "| shape | test | t/s, graphs | t/s, op by op | run |"
    echo "| --- | --- | ---: | ---: | --- |"
    cat "$out/sweep/step-rows.txt"
    echo
    sbest=$(awk -F'|' '$4 + 0 > 0 { print $4 + 0, $2 }' "$out/sweep/step-rows.txt" | sort -g -r | head -1 | sed 's/^[^ ]* *step //; s/ *$//')
    echo "best decode step: ${sbest:-none} (TUNED_GEMV; \"+own\": ops::gemv_pays for the down projection's rows of 14336 too; \"+apart\": ops::folds_norms off)"
    echo
    echo "Nsight Compute, d128 at the best shape:"
    grep -E 'pct_of_peak|bank_conflicts|skipped|ERR' "$out/sweep/ncu.txt" | sed 's/^ */    /'
    echo "Nsight Compute, d128 at the best Hopper geometry (${w128:-none}):"
    grep -E 'pct_of_peak|bank_conflicts|skipped|ERR' "$out/sweep/ncu-wg.txt" | sed 's/^ */    /'
    if [ -s "$out/sweep/skipped.txt" ]; then
        echo
        echo "not run (the budget was spent; run these parts in another call):"
        sed 's/^/    /' "$out/sweep/skipped.txt"
    fi
} | tee "$out/sweep.md"
