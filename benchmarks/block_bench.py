"""Block-scale benchmark: the 128 × 128 block-scaled FALQON layer (forward + backward) against its two block-wise
FP8 GEMMs (the floor) and against the row-scaled layer and its row-wise GEMMs (CUDA only).

Usage: python -m benchmarks.block_bench [--tokens 8192] [--shapes 4096x4096,4096x11008] [--ranks 64] [--json F]
Prints a table and writes JSON (``--json``). Times are medians of CUDA-event-timed repeats after warm-up. The
``floor_fallback`` and ``fallback`` columns say whether a floor or a layer GEMM fell back to the float32 dequantized
path (``torch._scaled_mm`` refused block-wise scaling for that shape): then those rows measure that fallback, not
FP8 tensor cores.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.harness import fwd_bwd, sweep_shapes, time_ms
from falqon_lit.config import SCALE_BLOCK, Backend, FalqonConfig, GemmRole, ScaleGranularity
from falqon_lit.fp8 import block_gemm
from falqon_lit.fp8.numerics import quantize_weight
from falqon_lit.fp8.quantizer import Float8Quantizer, Float8Tensor
from falqon_lit.layer import FalqonLinear

BLOCK, ROW = ScaleGranularity.BLOCK, ScaleGranularity.ROW


def _floors(x: torch.Tensor, grad: torch.Tensor, n: int, k: int, rank: int) -> dict[str, float]:
    """The two GEMMs of one layer step with operands already quantized, through the layer's own GEMM functions
    (``block_scaled_mm`` forward, ``grad_input_mm`` backward, so the scale layouts are the layer's), and the
    row-wise pair."""
    weight = torch.randn(n + rank, k, device="cuda")
    w_blk = Float8Tensor(*quantize_weight(weight, BLOCK))
    w_blk_t = w_blk.data.t().contiguous()
    x_blk = Float8Quantizer(GemmRole.INPUT, BLOCK)(x)
    g_blk = Float8Quantizer(GemmRole.GRAD_OUTPUT, BLOCK)(grad)
    aligned = n % SCALE_BLOCK == 0

    def block_floor():
        block_gemm.block_scaled_mm(x_blk, w_blk, torch.bfloat16, aligned)
        block_gemm.grad_input_mm(g_blk, w_blk_t[:, :n], w_blk.scale[:n], torch.bfloat16, Backend.TORCH, aligned)

    w_row = Float8Tensor(*quantize_weight(weight, ROW))
    w_row_t = w_row.data.t().contiguous()
    x_row = Float8Quantizer(GemmRole.INPUT, ROW)(x)
    g_row = Float8Quantizer(GemmRole.GRAD_OUTPUT, ROW)(grad)
    ones_n, ones_k = torch.ones(1, n + rank, device="cuda"), torch.ones(1, k, device="cuda")

    def row_floor():
        torch._scaled_mm(x_row.data, w_row.data.t(), scale_a=x_row.scale, scale_b=ones_n, out_dtype=torch.bfloat16)
        torch._scaled_mm(g_row.data, w_row_t[:, :n].t(), scale_a=g_row.scale, scale_b=ones_k, out_dtype=torch.bfloat16)

    return {
        "block_fp8_gemm_floor": time_ms(block_floor),
        "row_fp8_gemm_floor": time_ms(row_floor),
        "block_quantize_x": time_ms(lambda: Float8Quantizer(GemmRole.INPUT, BLOCK)(x)),
        "row_quantize_x": time_ms(lambda: Float8Quantizer(GemmRole.INPUT, ROW)(x)),
    }


def bench_shape(tokens: int, k: int, n: int, rank: int) -> dict[str, float | bool]:
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    linear = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float32)
    block_gemm._REFUSED.clear()
    row: dict[str, float | bool] = dict(_floors(x.detach(), grad, n, k, rank))
    row["floor_fallback"] = bool(block_gemm._REFUSED)
    block_gemm._REFUSED.clear()  # a shape the floor got refused must not send the layer rows to the fallback unasked
    for ws in (ROW, BLOCK):
        for b_state in ("zero", "residual"):
            layer = FalqonLinear.from_linear(linear, FalqonConfig(rank=rank, weight_scaling=ws, act_scaling=ws))
            layer = layer.to(torch.bfloat16)
            if b_state == "residual":
                with torch.no_grad():
                    layer.lora_B.normal_(0, 1e-3)
            row[f"falqon_w{ws.value}_B{b_state}"] = time_ms(fwd_bwd(layer, x, grad))
    row["fallback"] = bool(block_gemm._REFUSED)
    if block_gemm._REFUSED:
        print(f"block-wise kernel refused {sorted(block_gemm._REFUSED)}: those GEMMs ran the float32 fallback")
    return row


if __name__ == "__main__":
    sweep_shapes(__doc__, bench_shape, "block_fp8_gemm_floor")
