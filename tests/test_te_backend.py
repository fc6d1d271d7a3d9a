"""The Transformer Engine backend: refused where it cannot run, and on the GPU equal to the torch backend to rounding.

The CPU tests pin the error paths (TE is never installed on CPU machines, and its absence must stay harmless unless
``te`` is asked for); the GPU tests run TE's quantizers and GEMM against our kernels and the float64 reference on
fresh random inputs.
"""

from __future__ import annotations

import sys

import pytest
import reference
import torch
from fp8_devices import gemm_rtol, requires_cuda_fp8
from tiny_models import tiny_llama
from torch import nn

from falqon_lit.config import Backend, BPolicy, FalqonConfig, GemmRole, ScaleGranularity
from falqon_lit.convert import convert_model
from falqon_lit.fp8 import te_backend
from falqon_lit.fp8.gemm import fp8_gemm, resolve_backend
from falqon_lit.fp8.numerics import E4M3, E5M2, quantize_dynamic
from falqon_lit.fp8.quantizer import Float8Quantizer
from falqon_lit.layer import FalqonLinear

TENSOR = ScaleGranularity.TENSOR
ROW = ScaleGranularity.ROW


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _te_config(**overrides: object) -> FalqonConfig:
    return FalqonConfig(rank=16, weight_scaling=TENSOR, act_scaling=TENSOR, backend=Backend.TE, **overrides)


@pytest.mark.parametrize(
    ("weight_scaling", "act_scaling", "named"),
    [(ROW, TENSOR, "weight_scaling is 'row'"), (TENSOR, ROW, "act_scaling is 'row'"), (ROW, ROW, "are 'row'")],
)
def test_config_refuses_te_with_row_scales_naming_the_fields(weight_scaling, act_scaling, named):
    with pytest.raises(ValueError, match=named):
        FalqonConfig(weight_scaling=weight_scaling, act_scaling=act_scaling, backend="te")


def test_config_accepts_te_with_tensor_scales():
    config = FalqonConfig.from_recipe("paper", backend="te")
    assert config.backend is Backend.TE
    assert "backend=te" in config.short_repr()


@pytest.fixture
def no_transformer_engine(monkeypatch):
    """Make ``import transformer_engine`` fail, whether or not it is installed here."""
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    te_backend._te.cache_clear()
    yield
    te_backend._te.cache_clear()


def test_missing_te_fails_conversion_with_the_install_hint(no_transformer_engine):
    model = tiny_llama()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ImportError, match=r"pip install 'falqon-lit\[te\]'"):
        convert_model(model, _te_config())
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing converted half-way


def test_missing_te_is_harmless_unless_requested(no_transformer_engine):
    model = tiny_llama()
    report = convert_model(model, FalqonConfig(rank=16))  # auto
    assert report.converted
    ids = torch.randint(0, 64, (1, 8))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_resolve_backend_auto_is_torch_and_te_needs_cuda():
    assert resolve_backend(Backend.AUTO, torch.device("cpu")) is Backend.TORCH
    with pytest.raises(RuntimeError, match="CUDA only"):
        resolve_backend(Backend.TE, torch.device("cpu"))


def test_te_layer_on_cpu_says_what_to_fix():
    torch.manual_seed(0)
    layer = FalqonLinear.from_linear(nn.Linear(64, 48), _te_config())
    with pytest.raises(RuntimeError, match="use backend 'auto' or 'torch'"):
        layer(torch.randn(4, 64))


# ------------------------------------------------------------------------------------------------------ GPU
def _require_te() -> None:
    pytest.importorskip("transformer_engine.pytorch", reason="needs Transformer Engine (pip install 'falqon-lit[te]')")


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_te_quantizer_matches_ours_to_rounding(dtype):
    _require_te()
    torch.manual_seed(torch.seed() % 2**31)
    x = torch.randn(512, 768, device="cuda", dtype=torch.bfloat16) * 3
    data, scale = te_backend.quantize(x, dtype)
    want, want_scale = quantize_dynamic(x, dtype, TENSOR)
    assert data.dtype == dtype and data.shape == x.shape and scale.shape == (1,)
    # TE keeps 1/scale of its multiplier fp_max/amax; ours is amax/fp_max: equal up to an ulp or two.
    assert torch.allclose(scale, want_scale, rtol=3e-7, atol=0)
    # x·(fp_max/amax) against x/(amax/fp_max): a value within an ulp of an FP8 rounding boundary may round the
    # other way; nothing else differs.
    codes, want_codes = data.view(torch.uint8).int(), want.view(torch.uint8).int()
    differ = codes != want_codes
    assert differ.float().mean() < 1e-4
    assert torch.all((codes - want_codes)[differ].abs() == 1)


@pytest.mark.gpu
@requires_cuda_fp8
def test_te_gemm_matches_float64_on_the_same_bytes():
    _require_te()
    torch.manual_seed(torch.seed() % 2**31)
    a = Float8Quantizer(GemmRole.GRAD_OUTPUT, TENSOR, Backend.TE)(torch.randn(64, 256, device="cuda"))
    b = Float8Quantizer(GemmRole.WEIGHT, TENSOR)(torch.randn(96, 256, device="cuda") * 0.02)
    out = fp8_gemm(a, b, torch.bfloat16, Backend.TE)
    assert out.shape == (64, 96) and out.dtype == torch.bfloat16
    ref = fp8_gemm(a, b, torch.float64, Backend.EMULATE)
    assert _rel(out.float(), ref) < 2**-8 + gemm_rtol("cuda")  # bf16 output rounding on top of the GEMM's


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize("b_policy", list(BPolicy))
@pytest.mark.parametrize("b_state", ["zero", "residual"])
def test_te_layer_agrees_with_torch_backend_and_float64_reference(b_policy, b_state):
    _require_te()
    seed = torch.seed() % 2**31
    layers = {}
    for backend in (Backend.TE, Backend.TORCH):
        torch.manual_seed(seed)
        linear = nn.Linear(256, 192, device="cuda")
        config = FalqonConfig(rank=16, weight_scaling=TENSOR, act_scaling=TENSOR, b_policy=b_policy, backend=backend)
        layers[backend] = FalqonLinear.from_linear(linear, config)
        if b_state == "residual":
            with torch.no_grad():
                layers[backend].lora_B.normal_(0, 0.05)
    torch.manual_seed(seed + 1)
    x = torch.randn(4, 33, 256, device="cuda")
    grad_y = torch.randn(4, 33, 192, device="cuda")
    out = {}
    for backend, layer in layers.items():
        x_b = x.clone().requires_grad_(True)
        y = layer(x_b)
        y.backward(grad_y)
        out[backend] = (y, x_b.grad, layer.lora_B.grad)
    te_layer = layers[Backend.TE]
    residual = b_state == "residual"
    # One FP8 step is 6%; a value on a rounding boundary that TE's multiply and our divide round apart moves a
    # result by ~1e-3 relative. A wrong scale or layout is O(1).
    for got, want in zip(out[Backend.TE], out[Backend.TORCH], strict=True):
        assert _rel(got, want) < 5e-3
    assert _rel(out[Backend.TE][0], reference.forward(te_layer, x)) < 5e-3
    assert _rel(out[Backend.TE][1], reference.grad_input(te_layer, grad_y, residual)) < 5e-3
    assert _rel(out[Backend.TE][2], reference.grad_lora_B(te_layer, x, grad_y)) < 5e-3


@pytest.mark.gpu
@requires_cuda_fp8
def test_te_backend_trains_a_model_like_the_torch_backend():
    """A few optimizer steps with proxy updates: the two backends' losses stay together."""
    _require_te()
    losses = {}
    for backend in (Backend.TE, Backend.TORCH):
        torch.manual_seed(3)
        model = tiny_llama().cuda()
        convert_model(model, FalqonConfig(rank=16, weight_scaling=TENSOR, act_scaling=TENSOR, backend=backend))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, 256, (4, 32), device="cuda")
        losses[backend] = []
        for _ in range(5):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            for layer in model.modules():
                if isinstance(layer, FalqonLinear):
                    layer.proxy_update(16)
            losses[backend].append(float(loss.detach()))
    te, torch_ = losses[Backend.TE], losses[Backend.TORCH]
    assert te[-1] < te[0]  # it learns
    assert max(abs(a - b) / b for a, b in zip(te, torch_, strict=True)) < 1e-3  # 5 steps learn ~1.2%
