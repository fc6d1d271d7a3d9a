"""Scaled FP8 GEMM dispatch against a float64 product of the same bytes."""

from __future__ import annotations

import pytest
import torch
from fp8_devices import DEVICES, gemm_rtol

from falqon_lit.config import Backend, GemmRole, ScaleGranularity
from falqon_lit.fp8.gemm import fp8_gemm
from falqon_lit.fp8.quantizer import Float8Quantizer, Float8Tensor


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("a_gran", list(ScaleGranularity))
@pytest.mark.parametrize("b_gran", list(ScaleGranularity))
def test_fp8_gemm_matches_float64(device, a_gran, b_gran):
    torch.manual_seed(4)
    a = Float8Quantizer(GemmRole.INPUT, a_gran)(torch.randn(48, 64, device=device))
    b = Float8Quantizer(GemmRole.WEIGHT, b_gran)(torch.randn(80, 64, device=device) * 0.02)
    out = fp8_gemm(a, b, torch.float32, Backend.TORCH)
    ref = fp8_gemm(a, b, torch.float64, Backend.EMULATE)
    assert out.shape == (48, 80)
    # fp32 accumulation of 64 products of exact FP8 values: error ~ 64 * 2^-24 relative.
    assert _rel(out, ref) < gemm_rtol(device)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_gemm_e5m2_left_operand_on_column_slice(device):
    """The backward's right operand is a column slice of the stored transpose: strided, no copy."""
    torch.manual_seed(5)
    w = Float8Quantizer(GemmRole.WEIGHT, ScaleGranularity.TENSOR)(torch.randn(96 + 16, 64, device=device))
    w_t = w.data.t().contiguous()  # (in, out + r)
    g = Float8Quantizer(GemmRole.GRAD_OUTPUT, ScaleGranularity.TENSOR)(torch.randn(32, 96, device=device))
    sliced = Float8Tensor(w_t[:, :96], w.scale)
    out = fp8_gemm(g, sliced, torch.float32, Backend.TORCH)
    ref = g.dequantize(torch.float64) @ (w.data[:96].double() * w.scale.double())
    assert _rel(out, ref) < gemm_rtol(device)
