#!/usr/bin/env python3
"""The peers of benches/cuda_ops.rs, at its shapes, on the same GPU in the same run (scripts/gpu-check.sh).

PyTorch's scaled_dot_product_attention forced to its FlashAttention-2 backend and to its cuDNN
backend: prefill over one sequence, 32 query heads (K/V made with 8 heads and expanded to 32, as
SDPA's flash path takes them), bf16, head dims 64 and 128, 512 to 16384 tokens, causal and not. And
the ceilings as torch measures them: device-to-device copy bandwidth (1 GiB, read + write) and a bf16
8192^3 GEMM. Prints markdown rows in the same units as the bench (TFLOP/s, GB/s).
"""
import sys

try:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError as e:  # the check runs where torch is absent too
    print(f"skipped: no torch ({e})")
    sys.exit(0)

if not torch.cuda.is_available():
    print("skipped: torch sees no CUDA device")
    sys.exit(0)


def seconds(fn, iters=10):
    """Mean seconds per call over `iters` calls after two warm-ups, timed with CUDA events."""
    fn()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


dev = torch.device("cuda")
print(f"peers on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")

n = 1 << 30
src = torch.empty(n, dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)
copy = 2 * n / seconds(lambda: dst.copy_(src))
del src, dst
a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
gemm = 2 * 8192**3 / seconds(lambda: a @ b)
del a, b
print(f"ceilings (torch): copy {copy / 1e9:.0f} GB/s (read + write), bf16 GEMM 8192^3 {gemm / 1e12:.0f} TFLOP/s")

print("\n| test | FlashAttention-2 TFLOP/s | cuDNN TFLOP/s |")
print("| --- | ---: | ---: |")
hq, hkv = 32, 8
for d in (64, 128):
    for t in (512, 2048, 8192, 16384):
        q = torch.randn(1, hq, t, d, dtype=torch.bfloat16, device=dev)
        k = torch.randn(1, hkv, t, d, dtype=torch.bfloat16, device=dev).repeat_interleave(hq // hkv, dim=1)
        v = torch.randn(1, hkv, t, d, dtype=torch.bfloat16, device=dev).repeat_interleave(hq // hkv, dim=1)
        for causal in (True, False):
            flops = 2 * 2 * t * t * hq * d / (2 if causal else 1)
            cells = []
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                try:
                    with sdpa_kernel(backend):
                        s = seconds(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
                    cells.append(f"{flops / s / 1e12:.1f}")
                except RuntimeError as e:
                    cells.append(f"n/a ({str(e).splitlines()[0][:40]})")
            mask = "causal" if causal else "full"
            print(f"| attention prefill d{d} {mask} T={t} | {cells[0]} | {cells[1]} |")
        del q, k, v
