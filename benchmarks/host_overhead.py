"""Host (Python + launch) time of the pieces of a FALQON layer step, on tiny CUDA shapes where the GPU never lags.

Usage: python -m benchmarks.host_overhead
"""

from __future__ import annotations

import time

import torch
from torch import nn

from falqon_lit.config import FalqonConfig, ScaleGranularity
from falqon_lit.fp8 import triton_quantize
from falqon_lit.fp8.numerics import E4M3
from falqon_lit.layer import FalqonLinear


def _host_us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


def main() -> None:
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    layer = FalqonLinear.from_linear(nn.Linear(256, 256, bias=False, device="cuda"), FalqonConfig(rank=16))
    layer.to(torch.bfloat16)
    xq, _ = triton_quantize.quantize_fused(x.detach(), E4M3, ScaleGranularity.TENSOR)
    one = torch.ones((), device="cuda")
    rows = {
        "empty_like": lambda: torch.empty_like(x),
        "quantize_fused tensor": lambda: triton_quantize.quantize_fused(x.detach(), E4M3, ScaleGranularity.TENSOR),
        "quantize_fused row": lambda: triton_quantize.quantize_fused(x.detach(), E4M3, ScaleGranularity.ROW),
        "_scaled_mm": lambda: torch._scaled_mm(
            xq, layer.weight_fp8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16
        ),
        "layer forward (no grad)": lambda: layer(x.detach()),
        "layer forward+backward": lambda: layer(x).backward(grad),
        "nn.Linear bf16 fwd+bwd": lambda: torch.nn.functional.linear(x, layer.lora_B.new_ones(256, 256)).backward(grad),
    }
    for name, fn in rows.items():
        print(f"{name:28s} {_host_us(fn):8.1f} us host")


if __name__ == "__main__":
    main()
