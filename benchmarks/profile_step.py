"""Profile one training step of the LLaMA-7B-shaped model (CUDA): GPU time by kernel family, then the top kernels.

Usage: python benchmarks/profile_step.py [--variant falqon-default] [--ckpt 0] [--layers 32]
Variants and settings as in ``train_step_bench.py``; run it for a peer too (``--variant peft-bf16``) to see where
the two steps differ.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from train_step_bench import VARIANTS, build_step

FAMILIES = (  # (label, lower-case substrings of kernel names); the first match wins
    ("FALQON quantization", ("_amax_kernel", "_cast_kernel", "_row_quant_kernel")),
    ("proxy update", ("_row_stats_kernel", "_requantize_kernel", "topk", "radixsort")),
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    # cuBLAS names its Hopper FP8 kernels nvjet_sm90_qq* (E4M3 x E4M3) and qr*/rq* (with E5M2).
    ("FP8 GEMM", ("e4m3", "e5m2", "f8f8", "fp8", "_qqtst", "_qrtst", "_rqtst")),
    ("GEMM (bf16/fp32)", ("gemm", "nvjet", "cutlass", "xmma")),
    ("optimizer", ("adam",)),
)


def family(name: str) -> str:
    """The family of a CUDA kernel name, or ``other`` (elementwise, norms, copies, reductions)."""
    lower = name.lower()
    return next((label for label, keys in FAMILIES if any(k in lower for k in keys)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="falqon-default", choices=VARIANTS)
    parser.add_argument("--ckpt", type=int, default=0, help="1: gradient checkpointing on")
    parser.add_argument("--compile", type=int, default=0, help="1: torch.compile each decoder block")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    args.no_graph = False
    run = build_step(args)
    for _ in range(args.warmup):
        run.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run.step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    events = [e for e in prof.key_averages() if e.self_device_time_total]
    kernels = [(e.key, e.self_device_time_total / 1e3, e.count) for e in events]
    totals: dict[str, float] = defaultdict(float)
    for name, ms, _ in kernels:
        totals[family(name)] += ms
    gpu_ms = sum(totals.values())
    ckpt = "on" if args.ckpt else "off"
    print(f"{args.variant}, ckpt {ckpt}: GPU {gpu_ms:.1f} ms of a {wall_ms:.1f} ms profiled step")
    for label, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {label:22s} {ms:8.1f} ms  {100 * ms / gpu_ms:5.1f}%")
    print("top kernels:")
    for name, ms, count in sorted(kernels, key=lambda k: -k[1])[:15]:
        print(f"  {ms:8.1f} ms  {count:5d}x  {family(name):20s} {name[:90]}")


if __name__ == "__main__":
    main()
