"""Profile one FALQON layer forward+backward on CUDA: GPU time per kernel and CPU time per step.

Usage: python -m benchmarks.profile_layer [--tokens 8192] [--shape 4096x4096] [--rank 64] [--scaling tensor]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from falqon_lit.config import FalqonConfig
from falqon_lit.layer import FalqonLinear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--scaling", default="tensor")
    args = parser.parse_args()
    k, n = map(int, args.shape.split("x"))
    cfg = FalqonConfig(rank=args.rank, weight_scaling=args.scaling, act_scaling=args.scaling)
    layer = FalqonLinear.from_linear(nn.Linear(k, n, bias=False, device="cuda"), cfg).to(torch.bfloat16)
    x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16)

    def step():
        x.grad = None
        layer(x).backward(grad)

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        step()
    cpu_ms = (time.perf_counter() - t0) / 50 * 1e3  # host time to issue one step (GPU may lag behind)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / 50 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(
        prof.key_averages(group_by_input_shape=True).table(
            sort_by="cuda_time_total", row_limit=25, max_name_column_width=50
        )
    )
    print(f"host issue time {cpu_ms:.3f} ms/step, wall {wall_ms:.3f} ms/step")


if __name__ == "__main__":
    main()
