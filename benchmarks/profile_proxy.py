"""Profile the whole-model row-wise proxy update of a LLaMA-7B-shaped set of FALQON layers (CUDA).

Usage: python -m benchmarks.profile_proxy [--layers 32] [--rank 64] [--scaling row] [--rounding stochastic]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from falqon_lit.config import FalqonConfig
from falqon_lit.layer import FalqonLinear
from falqon_lit.proxy_updater import ProxyUpdater

SHAPES = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]  # q, k, v, o, gate, up, down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--scaling", default=FalqonConfig.weight_scaling.value, help="weight scaling: tensor or row")
    parser.add_argument("--rounding", default=FalqonConfig.merge_rounding.value, help="stochastic or nearest")
    args = parser.parse_args()
    cfg = FalqonConfig(rank=args.rank, weight_scaling=args.scaling, merge_rounding=args.rounding, init="random")
    print(f"{args.layers * len(SHAPES)} layers, {cfg.short_repr()}")
    layers = []
    for _ in range(args.layers):
        for k, n in SHAPES:
            layers.append(FalqonLinear.from_linear(nn.Linear(k, n, bias=False, device="cuda"), cfg))
    updater = ProxyUpdater(layers)

    def step() -> None:
        with torch.no_grad():
            for layer in layers:
                layer.lora_B.normal_(0, 0.01)
        updater(args.rank)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    for name, fn in (
        ("graph replay", lambda: updater(args.rank)),
        ("eager loop", lambda: [lay.proxy_update(args.rank) for lay in layers]),
    ):
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        print(f"{name}: {(time.perf_counter() - t0) / 5 * 1e3:.1f} ms per update of {len(layers)} layers")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        updater(args.rank)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
