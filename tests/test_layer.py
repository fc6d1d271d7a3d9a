"""FalqonLinear: forward and backward against the float64 reference on the same FP8 bytes, and module behaviour."""

from __future__ import annotations

import itertools

import pytest
import reference
import torch
from fp8_devices import DEVICES, gemm_rtol
from torch import nn

from falqon_lit.config import Backend, BPolicy, FalqonConfig, InitMethod, ScaleGranularity
from falqon_lit.fp8.numerics import E4M3, dequantize, quantize_weight
from falqon_lit.layer import FalqonLinear

GRANULARITIES = list(ScaleGranularity)
SCALINGS = list(itertools.product(GRANULARITIES, GRANULARITIES))  # (weight, activation)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _layer(device: str, weight_scaling, act_scaling, b_policy=BPolicy.ZERO, bias=True, seed=0, **kw) -> FalqonLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(96, 80, bias=bias, device=device)
    config = FalqonConfig(rank=16, weight_scaling=weight_scaling, act_scaling=act_scaling, b_policy=b_policy, **kw)
    return FalqonLinear.from_linear(linear, config)


def _fill_b(layer: FalqonLinear, std: float = 0.05) -> None:
    with torch.no_grad():
        layer.lora_B.normal_(0, std)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("weight_scaling", "act_scaling"), SCALINGS)
@pytest.mark.parametrize("b_policy", list(BPolicy))
@pytest.mark.parametrize("b_state", ["zero", "residual"])
def test_layer_forward_backward_match_float64_reference(device, weight_scaling, act_scaling, b_policy, b_state):
    layer = _layer(device, weight_scaling, act_scaling, b_policy, seed=torch.seed() % 2**31)  # fresh each run
    if b_state == "residual":
        _fill_b(layer)
    x = torch.randn(3, 7, 96, device=device, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    residual = b_state == "residual"
    assert layer.b_is_zero() is (not residual)
    # Forward: fp32 accumulation over K=96 exact FP8 products, plus the fp32 residual GEMM: ~1e-6 relative.
    assert _rel(y, reference.forward(layer, x)) < gemm_rtol(device)
    # grad_x: the same E5M2 gradient bytes times the same E4M3 weight bytes, fp32 accumulation.
    assert _rel(x.grad, reference.grad_input(layer, grad_y, residual)) < gemm_rtol(device)
    # grad_B = gᵀ O_A with O_A from the FP8 GEMM (fp32) and a plain fp32 matmul.
    assert _rel(layer.lora_B.grad, reference.grad_lora_B(layer, x, grad_y)) < gemm_rtol(device)


@pytest.mark.parametrize(("weight_scaling", "act_scaling"), SCALINGS)
def test_layer_matches_high_precision_lora_within_fp8_error(weight_scaling, act_scaling):
    torch.manual_seed(11)
    linear = nn.Linear(96, 80, bias=False)
    config = FalqonConfig(rank=16, weight_scaling=weight_scaling, act_scaling=act_scaling)
    layer = FalqonLinear.from_linear(linear, config)
    _fill_b(layer)
    x = torch.randn(64, 96, requires_grad=True)
    y = layer(x)
    # Plain LoRA x (W + B A)ᵀ in float64 with the *original* W and the layer's A and B.
    dense = linear.weight.double() + layer.lora_B.detach().double() @ layer.lora_A(torch.float64)
    x64 = x.detach().double().requires_grad_(True)
    y_ref = x64 @ dense.t()
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    y_ref.backward(grad_y.double())
    # E4M3 has 3 mantissa bits (2^-4 relative rounding); errors of x and W add up to a few percent.
    fwd, bwd = _rel(y, y_ref), _rel(x.grad, x64.grad)
    print(f"vs fp64 LoRA ({weight_scaling.value}/{act_scaling.value}): forward {fwd:.4f}, grad_x {bwd:.4f}")
    assert fwd < 0.06
    # E5M2 gradients have 2 mantissa bits: about twice the E4M3 error.
    assert bwd < 0.12


@pytest.mark.parametrize("weight_scaling", GRANULARITIES)
def test_layer_emulate_backend_equals_torch_backend(weight_scaling):
    torch.manual_seed(12)
    fast = _layer("cpu", weight_scaling, ScaleGranularity.ROW)
    slow = _layer("cpu", weight_scaling, ScaleGranularity.ROW, backend=Backend.EMULATE)
    assert torch.equal(fast.weight_fp8.view(torch.uint8), slow.weight_fp8.view(torch.uint8))
    x = torch.randn(16, 96)
    assert _rel(fast(x), slow(x)) < 1e-5


def test_layer_trains_only_lora_B_and_stores_fp8_buffers():
    layer = _layer("cpu", ScaleGranularity.TENSOR, ScaleGranularity.TENSOR, transpose_cache=True)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_B"}
    buffers = dict(layer.named_buffers())
    assert buffers["weight_fp8"].dtype == E4M3 and buffers["weight_fp8"].shape == (80 + 16, 96)
    assert buffers["weight_t_fp8"].shape == (96, 80 + 16)
    assert "weight_t_fp8" not in layer.state_dict()  # rebuilt on load, never saved twice


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_scaling", GRANULARITIES)
def test_layer_without_transpose_cache_computes_the_same_bits(device, weight_scaling):
    """``transpose_cache=False`` (the default) stores one FP8 copy and transposes in the backward: same forward,
    gradients and merges as the cached layout, bit for bit."""
    seed = torch.seed() % 2**31
    cached = _layer(device, weight_scaling, weight_scaling, BPolicy.KEEP, seed=seed, transpose_cache=True)
    lean = _layer(device, weight_scaling, weight_scaling, BPolicy.KEEP, seed=seed)  # the default
    assert lean.weight_t_fp8 is None and "weight_t_fp8" not in dict(lean.named_buffers())
    assert lean.state_dict().keys() == cached.state_dict().keys()
    x = torch.randn(3, 7, 96, device=device)
    for step in range(3):
        outputs = []
        for layer in (cached, lean):
            x_l = x.clone().requires_grad_(True)
            y = layer(x_l)
            y.backward(torch.ones_like(y))
            outputs.append((y.detach(), x_l.grad, layer.lora_B.grad.clone()))
            with torch.no_grad():
                layer.lora_B.add_(torch.full_like(layer.lora_B, 0.01 * (step + 1)))
                layer.lora_B.grad = None
            layer.proxy_update(8)
        for got, want in zip(outputs[1], outputs[0], strict=True):
            assert torch.equal(got, want), step
        assert torch.equal(lean.weight_fp8.view(torch.uint8), cached.weight_fp8.view(torch.uint8))
    lean.to(torch.bfloat16)  # moves and casts skip the missing copy
    assert lean.weight_t_fp8 is None and lean.lora_B.dtype == torch.bfloat16


@pytest.mark.parametrize("weight_scaling", GRANULARITIES)
def test_layer_to_bfloat16_moves_but_never_casts_fp8_state(weight_scaling):
    layer = _layer("cpu", weight_scaling, ScaleGranularity.TENSOR)
    before = layer.weight_fp8.clone(), layer.weight_scale.clone()
    layer.to(torch.bfloat16)
    assert layer.weight_fp8.dtype == E4M3 and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight_fp8.view(torch.uint8), before[0].view(torch.uint8))
    assert torch.equal(layer.weight_scale, before[1])
    assert layer.lora_B.dtype == torch.bfloat16
    y = layer(torch.randn(4, 96, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_layer_state_dict_roundtrip_is_bitwise_and_rebuilds_transpose():
    src = _layer("cpu", ScaleGranularity.ROW, ScaleGranularity.ROW, seed=3, transpose_cache=True)
    _fill_b(src)
    src.proxy_update(5)
    dst = _layer("cpu", ScaleGranularity.ROW, ScaleGranularity.ROW, seed=4, transpose_cache=True)
    dst.load_state_dict(src.state_dict())
    for name in ("weight_fp8", "weight_t_fp8"):
        assert torch.equal(getattr(dst, name).view(torch.uint8), getattr(src, name).view(torch.uint8))
    assert torch.equal(dst.weight_scale, src.weight_scale) and torch.equal(dst.lora_B, src.lora_B)
    assert int(dst.merge_rows) == 5
    x = torch.randn(8, 96)
    assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize("weight_scaling", GRANULARITIES)
def test_layer_svd_init_reduces_quantization_error(weight_scaling):
    torch.manual_seed(13)
    weight = torch.randn(80, 96) * 0.05
    config = FalqonConfig(rank=16, weight_scaling=weight_scaling, init=InitMethod.SVD)
    layer = FalqonLinear.from_linear(_with_weight(weight), config)
    w_fp8, w_scale = quantize_weight(weight, weight_scaling)
    error = weight.double() - dequantize(w_fp8, w_scale, torch.float64)
    a = layer.lora_A(torch.float64)
    b_hat = error @ torch.linalg.pinv(a)  # best B for the stored A: least squares on the error
    before, after = error.norm().item(), (error - b_hat @ a).norm().item()
    print(f"SVD init ({weight_scaling.value}): |W - deq(Q(W))| = {before:.4e}, with B̂A: {after:.4e}")
    assert after < 0.9 * before


def test_layer_random_init_has_kaiming_scale():
    torch.manual_seed(14)
    layer = FalqonLinear.from_linear(nn.Linear(96, 80), FalqonConfig(rank=16, init=InitMethod.RANDOM))
    a = layer.lora_A()
    assert a.abs().max() <= 1 / 96**0.5 * 1.07  # kaiming_uniform(a=sqrt(5)) bound, plus E4M3 rounding


def _with_weight(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


@pytest.mark.parametrize(
    ("rank", "in_f", "out_f", "match"),
    [
        (0, 96, 80, "positive multiple of 16"),
        (-16, 96, 80, "positive multiple of 16"),
        (8, 96, 80, "positive multiple of 16"),
        (80, 96, 80, r"rank must be < min\(in_features, out_features\) = 80, got 80"),
        (16, 100, 80, "divisible by 16"),
    ],
)
def test_layer_rejects_bad_shapes_and_ranks(rank, in_f, out_f, match):
    with pytest.raises(ValueError, match=match):
        FalqonLinear.from_linear(nn.Linear(in_f, out_f), FalqonConfig(rank=rank), name="blocks.0.fc")


def test_layer_rejects_non_floating_weight():
    linear = nn.Linear(32, 32)
    linear.weight = nn.Parameter(torch.ones(32, 32, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="high-precision floating weight"):
        FalqonLinear.from_linear(linear, FalqonConfig(), name="fc")


def test_layer_rejects_non_finite_weight_naming_the_layer():
    linear = nn.Linear(32, 32)
    with torch.no_grad():
        linear.weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf.*'blocks.1.up'"):
        FalqonLinear.from_linear(linear, FalqonConfig(), name="blocks.1.up")
