"""Fused Triton quantization (CUDA) gives the same FP8 bytes and scales as the eager reference path."""

from __future__ import annotations

import pytest
import torch
from fp8_devices import requires_cuda_fp8

from falqon_lit.config import ScaleGranularity
from falqon_lit.fp8 import triton_quantize
from falqon_lit.fp8.numerics import E4M3, E5M2, quantize_dynamic


def test_kernels_not_used_on_cpu():
    assert not triton_quantize.available(torch.randn(4, 16))


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("granularity", list(ScaleGranularity))  # tensor, row, 1 × 128 groups
@pytest.mark.parametrize("with_col_scale", [False, True])
@pytest.mark.parametrize(("rows", "cols"), [(8, 16), (333, 4096), (64, 11008), (5, 20000)])
def test_quantize_fused_matches_eager_bit_for_bit(dtype, granularity, with_col_scale, rows, cols):
    torch.manual_seed(rows + cols)
    x = (torch.randn(rows, cols, device="cuda") * torch.logspace(-2, 2, rows, device="cuda").unsqueeze(1)).bfloat16()
    col_scale = torch.rand(cols, device="cuda") + 0.5 if with_col_scale else None
    got_fp8, got_scale = triton_quantize.quantize_fused(x, dtype, granularity, col_scale)
    x_ref = x.float() * col_scale if with_col_scale else x
    want_fp8, want_scale = quantize_dynamic(x_ref, dtype, granularity)
    assert got_scale.shape == want_scale.shape
    assert torch.equal(got_scale, want_scale)
    assert torch.equal(got_fp8.view(torch.uint8), want_fp8.view(torch.uint8))


@pytest.mark.gpu
@requires_cuda_fp8
def test_quantize_fused_strided_rows():
    """A column slice (row stride > width), as a GEMM output slice, quantizes like its contiguous copy."""
    torch.manual_seed(0)
    base = torch.randn(32, 160, device="cuda", dtype=torch.bfloat16)
    view = base[:, :128]
    got, _ = triton_quantize.quantize_fused(view, E4M3, ScaleGranularity.TENSOR)
    want, _ = quantize_dynamic(view.contiguous(), E4M3, ScaleGranularity.TENSOR)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("granularity", list(ScaleGranularity))  # tensor, row, 1 × 128 groups
@pytest.mark.parametrize("with_col_scale", [False, True])
@pytest.mark.parametrize(("rows", "cols", "tail"), [(8, 16, 16), (333, 4096, 64), (64, 11008, 256), (16, 200, 64)])
def test_quantize_fused_tail_equals_quantizing_the_concatenation(dtype, granularity, with_col_scale, rows, cols, tail):
    """The backward's ``[g | g·B]`` quantized from its two parts gives the bytes of the concatenated tensor."""
    torch.manual_seed(torch.seed() % 2**31)
    x = torch.randn(rows, cols + 8, device="cuda", dtype=torch.bfloat16)[:, :cols]  # strided, as a GEMM slice
    tail_hp = torch.randn(rows, tail, device="cuda", dtype=torch.bfloat16) * 4  # the tail often holds the amax
    col_scale = torch.rand(cols + tail, device="cuda") + 0.5 if with_col_scale else None
    got_fp8, got_scale = triton_quantize.quantize_fused(x, dtype, granularity, col_scale, tail_hp)
    whole = torch.cat([x, tail_hp], dim=1)
    want_fp8, want_scale = quantize_dynamic(whole.float() * col_scale if with_col_scale else whole, dtype, granularity)
    assert got_fp8.shape == (rows, cols + tail)
    assert torch.equal(got_scale, want_scale)
    assert torch.equal(got_fp8.view(torch.uint8), want_fp8.view(torch.uint8))


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize(("rows", "cols"), [(64, 64), (4096 + 64, 4096), (11008 + 64, 4096), (200, 130)])
def test_transpose_equals_torch_transpose(rows, cols):
    """The backward's on-the-fly transpose (``transpose_cache=False``): the same bytes as ``.t().contiguous()``."""
    x = torch.randn(rows, cols, device="cuda").to(E4M3)
    got = triton_quantize.transpose(x)
    assert got.shape == (cols, rows) and got.dtype == E4M3 and got.is_contiguous()
    assert torch.equal(got.view(torch.uint8), x.t().contiguous().view(torch.uint8))
