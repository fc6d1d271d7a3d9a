"""Cost of one A refresh on a LLaMA-7B-shaped set of FALQON layers (CUDA), against the training step (issue 18).

A refresh with gradient directions costs, once per ``refresh_every_n_steps``: the weight-gradient GEMMs ``gᵀx`` of
one step (captured by hooks), a randomized SVD per layer, the flush of ``B`` and the requantization of the ``r`` A
rows. Here ``g`` and ``x`` are random bf16 tensors of ``--tokens`` rows (the GEMM cost does not depend on values);
each layer's gradient is freed after its SVD (training holds all of them for one step: 4 bytes per weight).

Usage: python -m benchmarks.profile_refresh [--layers 32] [--rank 64] [--tokens 8192] [--step-ms 455.9] [--every 250]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.harness import write_json
from falqon_lit.adapter_init import a_row_norm, random_directions, set_lora_A, top_right_directions
from falqon_lit.config import FalqonConfig
from falqon_lit.layer import FalqonLinear

SHAPES = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]  # q, k, v, o, gate, up, down (in, out)


def timed(fn: Callable[[], object]) -> float:
    """Milliseconds of ``fn`` including the GPU work it queued."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16 * 512, help="tokens of the captured step (batch 16 x 512)")
    parser.add_argument("--step-ms", type=float, default=455.9, help="step time to compare with (H100, compiled)")
    parser.add_argument("--every", type=int, default=250, help="refresh_every_n_steps to amortize over")
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a dry run of the script)")
    args = parser.parse_args()
    config = FalqonConfig(rank=args.rank, init="random")
    layers = {
        f"{i}.{j}": FalqonLinear.from_linear(nn.Linear(k, n, bias=False, device=args.device), config)
        for i in range(args.layers)
        for j, (k, n) in enumerate(SHAPES)
    }
    print(f"{len(layers)} layers, {config.short_repr()}, {args.tokens} tokens", flush=True)

    def capture_and_directions() -> tuple[float, float]:
        gemm = svd = 0.0
        for layer in layers.values():
            x = torch.randn(args.tokens, layer.in_features, device=args.device, dtype=torch.bfloat16)
            g = torch.randn(args.tokens, layer.out_features, device=args.device, dtype=torch.bfloat16)
            grad: list[torch.Tensor] = []
            gemm += timed(lambda g=g, x=x, grad=grad: grad.append((g.t() @ x).float()))  # as WeightGradientCapture
            svd += timed(lambda grad=grad, layer=layer: a_row_norm(config) * top_right_directions(grad[0], layer.rank))
        return gemm, svd

    def fill_b() -> None:
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_B.normal_(0, 0.01)

    capture_and_directions()  # warm-up (cuBLAS, cuSOLVER)
    results = {}
    for repeat in range(2):
        gemm, svd = capture_and_directions()
        fill_b()
        flush = timed(lambda: [layer.flush(config.merge_rounding) for layer in layers.values()])
        directions = random_directions(layers, repeat)
        requant = timed(lambda d=directions: [set_lora_A(layers[n], a) for n, a in d.items()])
        results = {"capture_gemm_ms": gemm, "svd_ms": svd, "flush_ms": flush, "requantize_ms": requant}
    total = sum(results.values())
    results.update(
        total_ms=total,
        step_ms=args.step_ms,
        every=args.every,
        amortized_pct=100 * total / (args.every * args.step_ms),
        device=torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        torch=torch.__version__,
    )
    for name, value in results.items():
        print(f"{name:>16s}: {value:.1f}" if isinstance(value, float) else f"{name:>16s}: {value}")
    print(f"one refresh = {total:.0f} ms = {results['amortized_pct']:.2f}% of {args.every} steps of {args.step_ms} ms")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
