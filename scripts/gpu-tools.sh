# Sourced by gpu-check.sh and gpu-sweep.sh: puts NVIDIA's profilers on the PATH where the machine
# has them installed off it. The 2026-11-30 H200 ran compute-sanitizer but said "no ncu on the
# PATH", where its image keeps Nsight Compute under /opt/nvidia/nsight-compute/<version>/
# (.library/device/KINDS.md): every ncu step of that run was skipped. The newest version found wins.
for tool in ncu compute-sanitizer; do
    command -v "$tool" >/dev/null && continue
    found=$(ls -d /opt/nvidia/nsight-compute/*/"$tool" /usr/local/cuda*/bin/"$tool" \
        /usr/local/cuda*/compute-sanitizer/"$tool" 2>/dev/null | sort -V | tail -1)
    [ -n "$found" ] && [ -x "$found" ] && PATH="$PATH:$(dirname "$found")"
done
export PATH
unset tool found
