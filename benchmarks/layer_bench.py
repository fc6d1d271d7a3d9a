"""Layer benchmark: FALQON forward+backward against its FP8-GEMM floor and the peers' layers (CUDA only).

Usage: python -m benchmarks.layer_bench [--tokens 8192] [--shapes 4096x4096,4096x11008] [--ranks 16,64,256]
                                       [--groups 4096x4096+4096+4096,4096x11008+11008]
Prints a table and writes JSON (``--json``/``--out``). Times are medians of CUDA-event-timed repeats after warm-up.
A group ``KxN1+N2+...`` is projections sharing one input (q/k/v, gate/up): the grouped FALQON layers (one GEMM each
way) against the same projections alone and bf16 LoRA, with B zero and with B holding a residual (the default
policy's steady state), and against the floor of the group's two FP8 GEMMs over all ``Σ (N_i + r)`` rows.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from benchmarks.harness import fwd_bwd, sweep_shapes, time_ms
from falqon_lit.config import FalqonConfig, GemmRole, ScaleGranularity
from falqon_lit.fp8 import triton_quantize
from falqon_lit.fp8.quantizer import Float8Quantizer
from falqon_lit.grouped import GroupedFalqonLinear, ProjectionGroup
from falqon_lit.layer import FalqonLinear

GROUPS = "4096x4096+4096+4096,4096x11008+11008"
"""The default ``--groups``: q/k/v and gate/up of the LLaMA-7B shape."""


class _LoraBf16(nn.Module):
    """bf16 LoRA: frozen W, trainable A and B (PEFT's computation)."""

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = linear.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(rank, linear.in_features, device="cuda", dtype=torch.bfloat16) * 0.01)
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device="cuda", dtype=torch.bfloat16))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t()


def bench_shape(tokens: int, k: int, n: int, rank: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    linear = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    row = {}
    # Floor: the two FP8 GEMMs of the melded layer, operands already quantized.
    xq = Float8Quantizer(GemmRole.INPUT, ScaleGranularity.TENSOR)(x.detach())
    wq = Float8Quantizer(GemmRole.WEIGHT, ScaleGranularity.TENSOR)(torch.randn(n + rank, k, device="cuda"))
    w_t = wq.data.t().contiguous()
    gq = Float8Quantizer(GemmRole.GRAD_OUTPUT, ScaleGranularity.TENSOR)(grad)
    one = torch.ones((), device="cuda")

    def floor():
        torch._scaled_mm(xq.data, wq.data.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        torch._scaled_mm(gq.data, w_t[:, :n].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    row["fp8_gemm_floor"] = time_ms(floor)
    row["bf16_linear_frozen"] = time_ms(fwd_bwd(linear.requires_grad_(False), x, grad))
    row["bf16_lora"] = time_ms(fwd_bwd(_LoraBf16(linear, rank), x, grad))
    triton_quantize.triton, triton_module = None, triton_quantize.triton  # the eager quantization path, for comparison
    cfg = FalqonConfig(rank=rank)
    eager = FalqonLinear.from_linear(linear.float(), cfg).to(torch.bfloat16)
    linear.to(torch.bfloat16)
    row["falqon_eager_quant"] = time_ms(fwd_bwd(eager, x, grad))
    triton_quantize.triton = triton_module
    per_row = (ScaleGranularity.TENSOR, ScaleGranularity.ROW)  # block scales: benchmarks/block_bench.py
    for ws in per_row:
        for act in per_row:
            cfg = FalqonConfig(rank=rank, weight_scaling=ws, act_scaling=act)
            layer = FalqonLinear.from_linear(linear.float(), cfg).to(torch.bfloat16)
            linear.to(torch.bfloat16)
            row[f"falqon_w{ws.value}_a{act.value}"] = time_ms(fwd_bwd(layer, x, grad))
    if importlib.util.find_spec("transformer_engine") is not None:
        cfg = FalqonConfig(rank=rank, weight_scaling="tensor", act_scaling="tensor", backend="te")
        layer = FalqonLinear.from_linear(linear.float(), cfg).to(torch.bfloat16)
        linear.to(torch.bfloat16)
        row["falqon_te_wtensor_atensor"] = time_ms(fwd_bwd(layer, x, grad))
    return row


def _fwd_bwd_many(modules: list[nn.Module], x: torch.Tensor, grads: list[torch.Tensor]):
    def step():
        x.grad = None
        torch.autograd.backward([m(x) for m in modules], grads)

    return step


def bench_group(tokens: int, k: int, outs: list[int], rank: int) -> dict[str, float]:
    """Projections of widths ``outs`` sharing one input of width ``k``: grouped, alone, bf16 LoRA, FP8 floor."""
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = [torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16) for n in outs]
    linears = [nn.Linear(k, n, bias=False, device="cuda") for n in outs]
    rows = sum(n + rank for n in outs)
    row = {}
    # Floor: the group's two FP8 GEMMs (x · W'ᵀ and g' · W' over all R rows), operands already quantized.
    xq = Float8Quantizer(GemmRole.INPUT, ScaleGranularity.TENSOR)(x.detach())
    wq = Float8Quantizer(GemmRole.WEIGHT, ScaleGranularity.TENSOR)(torch.randn(rows, k, device="cuda"))
    w_t = wq.data.t().contiguous()
    gq = Float8Quantizer(GemmRole.GRAD_OUTPUT, ScaleGranularity.TENSOR)(torch.randn(tokens, rows, device="cuda"))
    one = torch.ones((), device="cuda")

    def floor():
        torch._scaled_mm(xq.data, wq.data.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        torch._scaled_mm(gq.data, w_t.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    row["fp8_gemm_floor"] = time_ms(floor)
    lora = [_LoraBf16(lin.to(torch.bfloat16).requires_grad_(False), rank) for lin in linears]
    row["bf16_lora"] = time_ms(_fwd_bwd_many(lora, x, grads))
    cfg = FalqonConfig(rank=rank)
    alone = [FalqonLinear.from_linear(lin.float(), cfg).to(torch.bfloat16) for lin in linears]
    grouped = [GroupedFalqonLinear.from_linear(lin.float(), cfg).to(torch.bfloat16) for lin in linears]
    ProjectionGroup(grouped)
    for b_state in ("bzero", "bresidual"):
        if b_state == "bresidual":
            with torch.no_grad():
                for layer in alone + grouped:
                    layer.lora_B.normal_(0, 1e-3)
        row[f"falqon_alone_{b_state}"] = time_ms(_fwd_bwd_many(alone, x, grads))
        row[f"falqon_grouped_{b_state}"] = time_ms(_fwd_bwd_many(grouped, x, grads))
    return row


if __name__ == "__main__":
    sweep_shapes(__doc__, bench_shape, "fp8_gemm_floor", bench_group, GROUPS)
