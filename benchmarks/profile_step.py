"""Profile one training step of the LLaMA-7B-shaped model (CUDA): GPU time by kernel family, then the top kernels.

Usage: python -m benchmarks.profile_step [--variant falqon-default] [--ckpt 0] [--layers 32]
Variants and settings as in ``train_step_bench.py``; run it for a peer too (``--variant peft-bf16``) to see where
the two steps differ.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.train_step_bench import VARIANTS, build_step
from falqon_lit.kernel_profile import kernel_table


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
    ckpt = "on" if args.ckpt else "off"
    print(kernel_table(prof, f"{args.variant}, ckpt {ckpt}, a {wall_ms:.1f} ms profiled step"))


if __name__ == "__main__":
    main()
