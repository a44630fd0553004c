#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine that has no Rust toolchain, into one folder
# (default gpu-bundle/, git-ignored; stripped to fit a 64 MiB transfer): the highrise binary, both
# backend plugins, the CUDA cross-check test binary (tests/cuda.rs), the CUDA criterion bench, the
# scripts that run them (gpu-check.sh, gpu-sweep.sh) and the peers' script (gpu-peers.py). Carry it as one archive: `tar -cJf gpu-bundle.tar.xz gpu-bundle`.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=${1:-gpu-bundle}
rm -rf "$bundle"
mkdir -p "$bundle"

# The executable cargo built for a test or bench target (not the binaries it builds beside it).
executable() {
    cargo "$@" --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' | tail -1
}

cargo build --release --workspace
cp target/release/highrise "$bundle/highrise"
cp target/release/deps/libhighrise_cpu.so target/release/deps/libhighrise_cuda.so "$bundle/"
cp "$(executable test --release --test cuda)" "$bundle/cuda-tests"
cp "$(executable bench --bench cuda_ops)" "$bundle/cuda-bench"
cp scripts/gpu-check.sh scripts/gpu-sweep.sh scripts/gpu-tools.sh scripts/gpu-peers.py scripts/ncu-steps.py "$bundle/"
for f in "$bundle"/*; do
    case "$f" in *.sh | *.py) ;; *) strip --strip-debug "$f" ;; esac
done
du -ch "$bundle"/* | tail -1
