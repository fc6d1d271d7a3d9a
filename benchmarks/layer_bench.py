"""Layer benchmark: FALQON forward+backward against its FP8-GEMM floor and the peers' layers (CUDA only).

Usage: python benchmarks/layer_bench.py [--tokens 8192] [--shapes 4096x4096,4096x11008] [--ranks 16,64,256]
                                      [--groups 4096x4096+4096+4096,4096x11008+11008]
Prints a table and writes JSON (``--json``/``--out``). Times are medians of CUDA-event-timed repeats after warm-up.
A group ``KxN1+N2+...`` is projections sharing one input (q/k/v, gate/up): the grouped FALQON layers (one GEMM each
way) against the same projections alone and bf16 LoRA, with B zero and with B holding a residual (the default
policy's steady state), and against the floor of the group's two FP8 GEMMs over all ``Σ (N_i + r)`` rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics

import torch
from torch import nn

from falqon_lit.config import FalqonConfig, GemmRole, ScaleGranularity
from falqon_lit.fp8 import triton_quantize
from falqon_lit.fp8.quantizer import Float8Quantizer
from falqon_lit.grouped import GroupedFalqonLinear, ProjectionGroup
from falqon_lit.layer import FalqonLinear


def _time_ms(fn, repeats: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        x.grad = None  # a real network passes grad_x on; do not time a leaf's gradient accumulation
        y = module(x)
        y.backward(grad)

    return step


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

    row["fp8_gemm_floor"] = _time_ms(floor)
    row["bf16_linear_frozen"] = _time_ms(_fwd_bwd(linear.requires_grad_(False), x, grad))
    row["bf16_lora"] = _time_ms(_fwd_bwd(_LoraBf16(linear, rank), x, grad))
    triton_quantize.triton, triton_module = None, triton_quantize.triton  # the eager quantization path, for comparison
    cfg = FalqonConfig(rank=rank)
    eager = FalqonLinear.from_linear(linear.float(), cfg).to(torch.bfloat16)
    linear.to(torch.bfloat16)
    row["falqon_eager_quant"] = _time_ms(_fwd_bwd(eager, x, grad))
    triton_quantize.triton = triton_module
    per_row = (ScaleGranularity.TENSOR, ScaleGranularity.ROW)  # block scales: benchmarks/block_bench.py
    for ws in per_row:
        for act in per_row:
            cfg = FalqonConfig(rank=rank, weight_scaling=ws, act_scaling=act)
            layer = FalqonLinear.from_linear(linear.float(), cfg).to(torch.bfloat16)
            linear.to(torch.bfloat16)
            row[f"falqon_w{ws.value}_a{act.value}"] = _time_ms(_fwd_bwd(layer, x, grad))
    if importlib.util.find_spec("transformer_engine") is not None:
        cfg = FalqonConfig(rank=rank, weight_scaling="tensor", act_scaling="tensor", backend="te")
        layer = FalqonLinear.from_linear(linear.float(), cfg).to(torch.bfloat16)
        linear.to(torch.bfloat16)
        row["falqon_te_wtensor_atensor"] = _time_ms(_fwd_bwd(layer, x, grad))
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

    row["fp8_gemm_floor"] = _time_ms(floor)
    lora = [_LoraBf16(lin.to(torch.bfloat16).requires_grad_(False), rank) for lin in linears]
    row["bf16_lora"] = _time_ms(_fwd_bwd_many(lora, x, grads))
    cfg = FalqonConfig(rank=rank)
    alone = [FalqonLinear.from_linear(lin.float(), cfg).to(torch.bfloat16) for lin in linears]
    grouped = [GroupedFalqonLinear.from_linear(lin.float(), cfg).to(torch.bfloat16) for lin in linears]
    ProjectionGroup(grouped)
    for b_state in ("bzero", "bresidual"):
        if b_state == "bresidual":
            with torch.no_grad():
                for layer in alone + grouped:
                    layer.lora_B.normal_(0, 1e-3)
        row[f"falqon_alone_{b_state}"] = _time_ms(_fwd_bwd_many(alone, x, grads))
        row[f"falqon_grouped_{b_state}"] = _time_ms(_fwd_bwd_many(grouped, x, grads))
    return row


def main(bench=None, floor_name: str = "fp8_gemm_floor", description: str = __doc__) -> None:
    """Run ``bench(tokens, in, out, rank)`` (default :func:`bench_shape`) over the CLI's shapes; times relative to the
    row ``floor_name``."""
    bench = bench or bench_shape
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--tokens", default="8192")
    parser.add_argument("--shapes", default="4096x4096,4096x11008")
    parser.add_argument("--ranks", default="64")
    groups = "4096x4096+4096+4096,4096x11008+11008" if bench is bench_shape else ""  # grouped q/k/v, gate/up
    parser.add_argument("--groups", default=groups)
    parser.add_argument("--json", "--out", default=None)
    args = parser.parse_args()
    results = []
    for tokens in map(int, args.tokens.split(",")):
        for shape in args.shapes.split(","):
            k, n = map(int, shape.split("x"))
            for rank in map(int, args.ranks.split(",")):
                row = bench(tokens, k, n, rank)
                results.append({"tokens": tokens, "in": k, "out": n, "rank": rank, **row})
                floor = row[floor_name]
                print(f"\n{tokens} tokens, {k}->{n}, r={rank} ({torch.cuda.get_device_name()})")
                for name, ms in row.items():
                    if isinstance(ms, float):  # other entries (flags) go to the JSON only
                        print(f"  {name:28s} {ms:8.3f} ms  {ms / floor:5.2f}x floor")
    for tokens in map(int, args.tokens.split(",")):
        for spec in filter(None, args.groups.split(",")):
            k, outs = spec.split("x")
            widths = [int(n) for n in outs.split("+")]
            for rank in map(int, args.ranks.split(",")):
                row = bench_group(tokens, int(k), widths, rank)
                results.append({"tokens": tokens, "in": int(k), "group": widths, "rank": rank, **row})
                floor = row["fp8_gemm_floor"]
                print(f"\n{tokens} tokens, group {k}->{outs}, r={rank} ({torch.cuda.get_device_name()})")
                for name, ms in row.items():
                    print(f"  {name:28s} {ms:8.3f} ms  {ms / floor:5.2f}x floor")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f, indent=1
            )


if __name__ == "__main__":
    main()
