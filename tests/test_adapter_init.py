"""Gradient-informed init of ``A`` and A refresh (``falqon_lit.adapter_init``) against float64 references."""

from __future__ import annotations

import math

import pytest
import reference
import torch
from fp8_devices import DEVICES, gemm_rtol
from torch import nn

from falqon_lit.adapter_init import (
    WeightGradientCapture,
    a_row_norm,
    calibrate_gradient_init,
    orthogonal_random_directions,
    refresh_A,
    set_lora_A,
    top_right_directions,
)
from falqon_lit.config import BPolicy, FalqonConfig, InitMethod, Rounding, ScaleGranularity
from falqon_lit.fp8.numerics import E4M3, quantize
from falqon_lit.layer import FalqonLinear

GRANULARITIES = list(ScaleGranularity)


def _fresh_seed() -> None:
    torch.manual_seed(torch.seed() % 2**31)  # fresh values every run


def _layer(granularity: ScaleGranularity = ScaleGranularity.ROW, device: str = "cpu", **kw) -> FalqonLinear:
    config = FalqonConfig(rank=16, weight_scaling=granularity, act_scaling=granularity, **kw)
    return FalqonLinear.from_linear(nn.Linear(64, 96, device=device), config)


def _projector(rows: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the row space of ``rows`` (float64)."""
    q = torch.linalg.qr(rows.double().t()).Q
    return q @ q.t()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def test_weight_gradient_capture_matches_float64_reference() -> None:
    _fresh_seed()
    first, second = _layer(transpose_cache=True), _layer()
    second_in = nn.Linear(96, 64)  # so that `second` sees a computed input, as inside a model
    model = nn.Sequential(first, nn.Tanh(), second_in, second)
    inputs = [torch.randn(3, 5, 64) for _ in range(2)]
    weights = [torch.randn(3, 5, 96) for _ in range(2)]
    with WeightGradientCapture({"first": first, "second": second}) as capture:
        for x, w in zip(inputs, weights, strict=True):
            (model(x) * w).sum().backward()
    # float64: dL/dy of `second` is w; dL/dW = Σ wᵀ x_second; `first`'s g is backpropagated through the chain.
    expected_second = sum(
        w.reshape(-1, 96).double().t() @ second_in(torch.tanh(first(x))).detach().reshape(-1, 64).double()
        for x, w in zip(inputs, weights, strict=True)
    )
    assert torch.allclose(capture.grads["second"].double(), expected_second, rtol=1e-5, atol=1e-5)
    expected_first = 0
    for x, w in zip(inputs, weights, strict=True):
        y = first(x).detach().requires_grad_(True)
        (second(second_in(torch.tanh(y))) * w).sum().backward()
        expected_first = expected_first + y.grad.reshape(-1, 96).double().t() @ x.reshape(-1, 64).double()
    assert torch.allclose(capture.grads["first"].double(), expected_first, rtol=1e-5, atol=1e-5)
    assert not first._forward_hooks and not second._forward_hooks  # hooks removed on exit


def test_top_right_directions_span_the_float64_top_subspace_and_keep_the_rng_stream() -> None:
    _fresh_seed()
    u = torch.linalg.qr(torch.randn(96, 96, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64)).Q
    s = torch.cat([torch.linspace(10, 5, 16), torch.linspace(1, 0.01, 48)]).double()  # a gap after 16
    grad = (u[:, :64] * s) @ v.t()
    state = torch.get_rng_state()
    directions = top_right_directions(grad.float(), 16)
    assert torch.equal(torch.get_rng_state(), state)
    assert directions.shape == (16, 64)
    assert torch.allclose(directions.double() @ directions.double().t(), torch.eye(16, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(_projector(directions), _projector(v[:, :16].t()), atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_set_lora_A_requantizes_only_the_A_rows_in_both_layouts(granularity: ScaleGranularity, device: str) -> None:
    _fresh_seed()
    layer = _layer(granularity, device, transpose_cache=True)
    w_bytes, w_scale = _bytes(layer.weight_fp8[:96]).clone(), layer.weight_scale_rows.clone()
    new_A = 0.3 * torch.randn(16, 64, device=device)
    if granularity == ScaleGranularity.TENSOR:  # within W's range: exact requantization with W's scale
        new_A *= 400 * layer.weight_scale / new_A.abs().max()
    set_lora_A(layer, new_A)
    assert torch.equal(_bytes(layer.weight_fp8[:96]), w_bytes) and torch.equal(layer.weight_scale_rows, w_scale)
    if granularity == ScaleGranularity.ROW:  # fresh row scales: amax / 448 per new row
        scale = new_A.abs().amax(dim=1, keepdim=True) / 448
        assert torch.allclose(layer.weight_scale[96:], scale, rtol=1e-6)
    elif granularity == ScaleGranularity.BLOCK:  # fresh block scales of A's own block row: amax / 448 per block
        scale = new_A.abs().reshape(16, 1, 64).amax(dim=(0, 2)).expand(16, 1) / 448  # in = 64: one column block
        assert torch.allclose(layer.weight_scale[96:], scale, rtol=1e-6)
    else:
        scale = layer.weight_scale
    assert torch.equal(_bytes(layer.weight_fp8[96:]), _bytes(quantize(new_A, scale, E4M3)))
    assert torch.equal(_bytes(layer.weight_t_fp8), _bytes(layer.weight_fp8.t().contiguous()))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(4, 64, device=device)
    rtol = gemm_rtol(device)
    assert torch.allclose(layer(x).double(), reference.forward(layer, x), rtol=rtol, atol=rtol)
    with pytest.raises(ValueError, match="B == 0"):
        set_lora_A(layer, new_A)


def test_calibrate_gradient_init_sets_A_to_the_gradient_directions() -> None:
    _fresh_seed()
    layers = [_layer(init=InitMethod.GRADIENT), _layer(init=InitMethod.GRADIENT)]
    bridge = nn.Linear(96, 64)
    model = nn.Sequential(layers[0], nn.GELU(), bridge, layers[1])
    w_bytes = [_bytes(layer.weight_fp8[:96]).clone() for layer in layers]
    batches = [torch.randn(8, 64) for _ in range(3)]
    with WeightGradientCapture({"0": layers[0], "3": layers[1]}) as capture:  # the reference gradient
        for x in batches:
            model(x).square().mean().backward()
    expected = {name: g.double() for name, g in capture.grads.items()}
    for p in model.parameters():
        p.grad = None

    assert calibrate_gradient_init(model, [lambda x=x: model(x).square().mean() for x in batches]) == 2
    assert all(p.grad is None for p in model.parameters())
    for name, layer, before in zip(("0", "3"), layers, w_bytes, strict=True):
        assert torch.equal(_bytes(layer.weight_fp8[:96]), before) and not layer.lora_B.any()
        lora_A = layer.lora_A().double()
        v = torch.linalg.svd(expected[name])[2][:16]  # float64 top-16 right singular vectors
        assert torch.allclose(_projector(lora_A), _projector(v), atol=0.05)  # FP8 rounding of A
        norms = lora_A.norm(dim=1)
        assert torch.allclose(norms, torch.full_like(norms, 1 / math.sqrt(3)), rtol=0.04)


def test_gradient_init_rows_scale_with_lora_alpha() -> None:
    assert a_row_norm(FalqonConfig(rank=64, lora_alpha=16)) == pytest.approx(0.25 / math.sqrt(3))
    layer = FalqonLinear.from_linear(nn.Linear(64, 96), FalqonConfig(rank=16, lora_alpha=4, init=InitMethod.RANDOM))
    assert layer.lora_A().abs().max() <= 0.25 / math.sqrt(64) * 1.07  # kaiming bound 1/sqrt(in), times alpha / r


def test_orthogonal_random_directions_are_orthonormal_and_reproducible() -> None:
    _fresh_seed()
    previous = torch.randn(16, 64)
    new = orthogonal_random_directions(previous, 16, torch.Generator().manual_seed(7)).double()
    assert torch.allclose(new @ new.t(), torch.eye(16, dtype=torch.float64), atol=1e-6)
    assert (new @ previous.double().t()).abs().max() < 1e-5
    again = orthogonal_random_directions(previous, 16, torch.Generator().manual_seed(7))
    assert torch.equal(again.double(), new)
    with pytest.raises(ValueError, match="rank \\+ previous rank"):
        orthogonal_random_directions(torch.randn(48, 64), 32, torch.Generator())


@pytest.mark.parametrize("device", DEVICES)  # CUDA: the flush runs the Triton merge kernel
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_refresh_A_merges_all_of_B_then_replaces_A(granularity: ScaleGranularity, device: str) -> None:
    _fresh_seed()
    layer = _layer(granularity, device, b_policy=BPolicy.KEEP, merge_rounding=Rounding.NEAREST)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    rows = torch.arange(96, device=device)
    expected_bytes, expected_scale = reference.merge(layer, rows)
    new_A = torch.randn(16, 64, device=device) / math.sqrt(3 * 64)
    assert refresh_A({"layer": layer}, {"layer": new_A}) == 96
    assert not layer.lora_B.any()
    # float32 sums in the layer, float64 in the reference: a value on a rounding boundary may land one step apart
    assert (_bytes(layer.weight_fp8[:96]) == _bytes(expected_bytes)).float().mean() > 0.99
    got, want = layer.dequantized_weight(), expected_bytes.float() * expected_scale
    step = torch.exp2(torch.floor(torch.log2(expected_bytes.float().abs().clamp(min=2**-6))) - 3) * expected_scale
    assert torch.all((got - want).abs() <= step)
    # a tensor scale is W's: a new A beyond its range is shrunk as a whole, so its directions are kept
    fit = (448 * layer.weight_scale / new_A.abs().max()).clamp(max=1) if granularity == ScaleGranularity.TENSOR else 1
    assert torch.allclose(layer.lora_A(), fit * new_A, rtol=0.07, atol=layer.weight_scale.min().item() * 2)
