"""128 × 128 block scales: quantization with partial edge blocks, the melded layer and row merges, against float64."""

from __future__ import annotations

import math
import warnings

import pytest
import reference
import torch
from fp8_devices import DEVICES, gemm_rtol, requires_cuda_fp8
from torch import nn

from falqon_lit.config import Backend, BPolicy, FalqonConfig, Rounding, ScaleGranularity
from falqon_lit.fp8 import block_gemm
from falqon_lit.fp8.numerics import (
    E4M3,
    amax,
    compact_block_scale,
    dequantize,
    expand_block_scale,
    expand_scale,
    fp8_max,
    quantize,
    quantize_weight,
)
from falqon_lit.layer import FalqonLinear

BLOCK = ScaleGranularity.BLOCK
SHAPES = [(576, 192), (192, 576), (1536, 576), (130, 260), (256, 384)]  # SmolLM2's dims have partial edge blocks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _fresh_seed() -> None:
    torch.manual_seed(torch.seed() % 2**31)


def _blockwise_amax_f64(x: torch.Tensor, block_rows: int) -> torch.Tensor:
    """Per-block amax by explicit loops over (block_rows × 128) tiles, float64, row-expanded ``(rows, G)``."""
    rows, cols = x.shape
    out = torch.empty(rows, math.ceil(cols / 128), dtype=torch.float64)
    for r0 in range(0, rows, block_rows):
        for j, c0 in enumerate(range(0, cols, 128)):
            out[r0 : r0 + block_rows, j] = x[r0 : r0 + block_rows, c0 : c0 + 128].double().abs().max()
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_weight_block_scales_are_blockwise_amax_over_fp8_max(shape):
    _fresh_seed()
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3  # rows of different magnitude: blocks differ
    w_fp8, scale = quantize_weight(w, BLOCK)
    expected = _blockwise_amax_f64(w, 128) / fp8_max(E4M3)
    assert scale.shape == (shape[0], math.ceil(shape[1] / 128))
    torch.testing.assert_close(scale.double(), expected, rtol=1e-6, atol=0)  # float32 division of the same amax
    # Every element is within half an E4M3 step of w: relative 2⁻⁴ of its block's range at most.
    err = (dequantize(w_fp8, scale, torch.float64) - w.double()).abs()
    assert torch.all(err <= expand_scale(_blockwise_amax_f64(w, 128), shape[1]) * 2.0**-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_activation_block_groups_are_1x128_amax(shape):
    _fresh_seed()
    x = torch.randn(shape)
    assert torch.equal(amax(x, BLOCK).double(), _blockwise_amax_f64(x, 1))


@pytest.mark.parametrize("shape", SHAPES)
def test_block_quantize_dequantize_exact_for_representable(shape):
    _fresh_seed()
    raw = torch.randint(0, 256, shape, dtype=torch.uint8).view(E4M3).float()
    raw = torch.where(torch.isfinite(raw), raw, torch.zeros_like(raw))
    compact = torch.pow(2.0, torch.randint(-9, 4, (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))).float())
    scale = expand_block_scale(compact, shape[0])
    x_hp = raw.clone()  # power-of-two block scales keep every value representable; applied tile by tile
    for i, r0 in enumerate(range(0, shape[0], 128)):
        for j, c0 in enumerate(range(0, shape[1], 128)):
            x_hp[r0 : r0 + 128, c0 : c0 + 128] *= compact[i, j]
    x_fp8 = quantize(x_hp, scale, E4M3)
    assert torch.equal(dequantize(x_fp8, scale, torch.float64), x_hp.double())
    assert torch.equal(compact_block_scale(scale), compact)


def _block_layer(in_features: int, out_features: int, b_policy=BPolicy.KEEP, device="cpu", **kw) -> FalqonLinear:
    _fresh_seed()
    config = FalqonConfig(
        rank=16, weight_scaling=BLOCK, act_scaling=BLOCK, b_policy=b_policy, merge_rounding=Rounding.NEAREST, **kw
    )
    return FalqonLinear.from_linear(nn.Linear(in_features, out_features, device=device), config)


@pytest.mark.parametrize(("in_features", "out_features"), [(192, 576), (576, 192), (384, 256)])
def test_block_layer_gives_a_rows_blocks_of_their_own(in_features, out_features):
    layer = _block_layer(in_features, out_features)
    w_hp = layer.dequantized_weight(torch.float64)
    a_hp = layer.lora_A(torch.float64)
    scale = layer.weight_scale.double()
    # W's blocks are W's alone (the last one partial when out % 128), A's blocks A's alone: re-quantizing each part
    # by itself reproduces the stored scales exactly (amax of exactly representable values, same rule).
    assert torch.equal(scale[:out_features], quantize_weight(w_hp.float(), BLOCK)[1].double())
    assert torch.equal(scale[out_features:], quantize_weight(a_hp.float(), BLOCK)[1].double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("in_features", "out_features"), [(192, 576), (576, 192), (384, 256)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("backend", [Backend.TORCH, Backend.EMULATE])
def test_block_layer_forward_backward_match_float64_reference(device, in_features, out_features, residual, backend):
    layer = _block_layer(in_features, out_features, device=device, backend=backend)
    if residual:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.05)
    x = torch.randn(4, 9, in_features, device=device, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    # Same FP8 bytes and scales as the float64 reference; only the accumulation differs (fp32 or tensor cores).
    assert _rel(y, reference.forward(layer, x)) < gemm_rtol(device)
    assert _rel(x.grad, reference.grad_input(layer, grad_y, residual)) < gemm_rtol(device)
    assert _rel(layer.lora_B.grad, reference.grad_lora_B(layer, x, grad_y)) < gemm_rtol(device)


@pytest.mark.parametrize(("in_features", "out_features"), [(192, 576), (384, 256)])
def test_block_merge_keeps_every_scale_and_untouched_row(in_features, out_features):
    layer = _block_layer(in_features, out_features, transpose_cache=True)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    snapshot = _block_layer(in_features, out_features, transpose_cache=True)
    snapshot.load_state_dict(layer.state_dict())
    before_fp8, before_scale = layer.weight_fp8.clone(), layer.weight_scale.clone()
    rows = layer.proxy_update(40)
    assert torch.equal(layer.weight_scale, before_scale)  # no block scale moves: their other rows keep their bytes
    untouched = torch.ones(layer.weight_fp8.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(layer.weight_fp8.view(torch.uint8)[untouched], before_fp8.view(torch.uint8)[untouched])
    assert torch.equal(layer.weight_t_fp8.view(torch.uint8), layer.weight_fp8.t().contiguous().view(torch.uint8))
    ref_fp8, _ = reference.merge(snapshot, rows)
    # float32 (layer) and float64 (reference) sums: a value on a rounding boundary may land one step apart.
    same = layer.weight_fp8[rows].view(torch.uint8) == ref_fp8.view(torch.uint8)
    assert same.float().mean() > 0.99


def test_block_merge_clamps_to_the_kept_block_scale_and_counts_saturation():
    layer = _block_layer(192, 576, b_policy=BPolicy.ZERO)
    with torch.no_grad():
        layer.lora_B.normal_(0, 50.0)  # far beyond any block's range
    before_scale = layer.weight_scale.clone()
    rows = layer.proxy_update(8)
    assert torch.equal(layer.weight_scale, before_scale)
    assert int(layer.merge_saturated) == 8
    merged = layer.weight_fp8[rows].float()
    assert torch.isfinite(merged).all() and merged.abs().max() == fp8_max(E4M3)


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize("residual", [False, True])
def test_block_layer_runs_the_blockwise_kernels_on_cuda(residual):
    # out % 128 == 0: W and A blocks lie on the 128-row grid, so neither GEMM may fall back to the float32 path.
    block_gemm._REFUSED.clear()
    layer = _block_layer(512, 256, device="cuda")
    if residual:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.05)
    x = torch.randn(64, 512, device="cuda", requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused shape warns: make it fail here
        y = layer(x)
        grad_y = torch.randn_like(y)
        y.backward(grad_y)
    assert not block_gemm._REFUSED
    assert _rel(y, reference.forward(layer, x)) < gemm_rtol("cuda")
    assert _rel(x.grad, reference.grad_input(layer, grad_y, residual)) < gemm_rtol("cuda")
