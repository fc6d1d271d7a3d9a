"""RMSNorm and SwiGLU fused with the per-token FP8 quantization of their outputs, and the GEMMs that read them."""

from __future__ import annotations

import copy

import pytest
import torch
from fp8_devices import requires_cuda_fp8
from tiny_models import tiny_llama

from falqon_lit import functional, grouped_functional
from falqon_lit.config import FalqonConfig, GemmRole, ScaleGranularity
from falqon_lit.convert import convert_model
from falqon_lit.fp8 import triton_norm_quantize as tnq
from falqon_lit.fp8 import triton_swiglu_quantize as tsq
from falqon_lit.fp8.numerics import E4M3, quantize_dynamic
from falqon_lit.fused_inputs import install_fused_inputs


def _norm64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_quantize_eager_matches_float64_reference(dtype):
    torch.manual_seed(torch.seed() % 2**31)  # fresh inputs each run
    x = (torch.randn(7, 96) * torch.logspace(-2, 2, 7).unsqueeze(1)).to(dtype).requires_grad_(True)
    weight = (1 + 0.1 * torch.randn(96)).to(dtype)
    y, y_fp8, rstd = tnq.rmsnorm_quantize_eager(x.detach(), weight, 1e-6)
    want = _norm64(x.detach(), weight, 1e-6)
    # bf16: the normalized row and the product with the weight each round to bf16 (2 x 2^-9 relative).
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    assert torch.allclose(y.double(), want, rtol=tol, atol=0)
    data, scale = quantize_dynamic(y, E4M3, ScaleGranularity.ROW)  # the bytes are Q(y) exactly, per token
    assert torch.equal(y_fp8.data.view(torch.uint8), data.view(torch.uint8)) and torch.equal(y_fp8.scale, scale)
    grad_y = torch.randn(7, 96).to(dtype)
    x64 = x.detach().double().requires_grad_(True)
    _norm64(x64, weight, 1e-6).backward(grad_y.double())
    got = tnq.rmsnorm_grad_input_eager(grad_y, x.detach(), weight, rstd)
    assert torch.allclose(got.double(), x64.grad, rtol=tol, atol=tol * float(x64.grad.abs().max()))


def _count_input_quantizations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = grouped_functional.Float8Quantizer

    def counting(role, *args):
        calls[0] += role == GemmRole.INPUT
        return real(role, *args)

    monkeypatch.setattr(grouped_functional, "Float8Quantizer", counting)
    monkeypatch.setattr(functional, "Float8Quantizer", counting)
    return calls


def test_fused_inputs_model_equals_unfused_model_and_gemms_skip_their_quantization(monkeypatch):
    torch.manual_seed(0)
    plain = tiny_llama()
    convert_model(plain, FalqonConfig(rank=16))
    fused = copy.deepcopy(plain)
    blocks = len(fused.model.layers)
    assert install_fused_inputs(fused) == (2 * blocks, blocks)
    calls = _count_input_quantizations(monkeypatch)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    out = fused(input_ids=ids, labels=ids)
    assert calls[0] == blocks  # only o_proj quantizes its input (attention output); the rest read FP8 inputs
    want = plain(input_ids=ids, labels=ids)
    assert calls[0] == blocks + 4 * blocks  # unfused: both groups, o_proj and down_proj quantize their inputs
    # The eager ops are Hugging Face's arithmetic: the same outputs, the same FP8 bytes, the same logits bit for bit.
    assert torch.equal(out.logits, want.logits)
    out.loss.backward()
    want.loss.backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        if p.requires_grad:  # the fused backward formulas differ from autograd's in the last bits only
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6 * float(q.grad.abs().max())), name


def test_install_fused_inputs_skips_tensor_scaled_inputs():
    model = tiny_llama()
    convert_model(model, FalqonConfig(rank=16, weight_scaling="tensor", act_scaling="tensor"))
    assert install_fused_inputs(model) == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_quantize_eager_matches_float64_reference(dtype):
    torch.manual_seed(torch.seed() % 2**31)  # fresh inputs each run
    gate, up = (torch.randn(2, 7, 80) * 3).to(dtype), torch.randn(2, 7, 80).to(dtype)
    h, h_fp8 = tsq.swiglu_quantize_eager(gate.reshape(14, 80), up.reshape(14, 80))
    g64, u64 = gate.double().requires_grad_(True), up.double().requires_grad_(True)
    want = torch.nn.functional.silu(g64) * u64
    tol = 1e-6 if dtype == torch.float32 else 2**-7  # bf16: silu and the product each round (2 x 2^-9)
    assert torch.allclose(h.double(), want.reshape(14, 80), rtol=tol, atol=tol * 1e-3)
    data, scale = quantize_dynamic(h, E4M3, ScaleGranularity.ROW)
    assert torch.equal(h_fp8.data.view(torch.uint8), data.view(torch.uint8)) and torch.equal(h_fp8.scale, scale)
    grad_h = torch.randn(2, 7, 80).to(dtype)
    want.backward(grad_h.double())
    d_gate, d_up = tsq.swiglu_grad_eager(grad_h, gate, up)
    for got, ref in ((d_gate, g64.grad), (d_up, u64.grad)):
        assert torch.allclose(got.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "cols"), [(5, 96), (333, 4096)])
def test_rmsnorm_quantize_triton_matches_eager(dtype, rows, cols):
    torch.manual_seed(rows + cols)
    x = (torch.randn(rows, cols, device="cuda") * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(cols, device="cuda")).to(dtype)
    y, y_fp8, rstd = tnq.rmsnorm_quantize(x, weight, 1e-6)
    want_y, _, want_rstd = tnq.rmsnorm_quantize_eager(x, weight, 1e-6)
    # The row reduction's order differs from torch's: rstd to a few fp32 ulps, y to one step of its dtype.
    assert torch.allclose(rstd, want_rstd, rtol=1e-6)
    step = 2**-7 if dtype == torch.bfloat16 else 1e-6
    assert torch.allclose(y.float(), want_y.float(), rtol=step, atol=0)
    # The fused quantization is exactly Q(y) per token of the kernel's own y: the bytes the unfused path would write.
    data, scale = quantize_dynamic(y, E4M3, ScaleGranularity.ROW)
    assert torch.equal(y_fp8.data.view(torch.uint8), data.view(torch.uint8)) and torch.equal(y_fp8.scale, scale)
    grad_y = torch.randn(rows, cols, device="cuda").to(dtype)
    got = tnq.rmsnorm_grad_input(grad_y, x, weight, rstd)
    want = tnq.rmsnorm_grad_input_eager(grad_y, x, weight, rstd)
    assert torch.allclose(got.float(), want.float(), rtol=step, atol=step * float(want.float().abs().max()))


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "cols"), [(5, 96), (333, 11008)])
def test_swiglu_quantize_triton_matches_eager(dtype, rows, cols):
    torch.manual_seed(rows + cols)
    gate = (torch.randn(rows, cols, device="cuda") * 3).to(dtype)
    up = torch.randn(rows, cols, device="cuda").to(dtype)
    h, h_fp8 = tsq.swiglu_quantize(gate, up)
    want, _ = tsq.swiglu_quantize_eager(gate, up)
    # exp differs from torch's by an ulp or so: h within one step of its dtype.
    step = 2**-7 if dtype == torch.bfloat16 else 1e-6
    assert torch.allclose(h.float(), want.float(), rtol=step, atol=step * 1e-3)
    data, scale = quantize_dynamic(h, E4M3, ScaleGranularity.ROW)  # exactly Q(h) of the kernel's own h
    assert torch.equal(h_fp8.data.view(torch.uint8), data.view(torch.uint8)) and torch.equal(h_fp8.scale, scale)
    grad_h = torch.randn(rows, cols, device="cuda").to(dtype)
    for got, ref in zip(tsq.swiglu_grad(grad_h, gate, up), tsq.swiglu_grad_eager(grad_h, gate, up), strict=True):
        assert torch.allclose(got.float(), ref.float(), rtol=step, atol=step * float(ref.float().abs().max()))


@pytest.mark.parametrize("mode", ["checkpointing", "compile"])
def test_fused_inputs_survive_checkpointing_and_torch_compile(monkeypatch, mode):
    torch.manual_seed(0)
    plain = tiny_llama()
    convert_model(plain, FalqonConfig(rank=16))
    fused = copy.deepcopy(plain)
    blocks = len(fused.model.layers)
    install_fused_inputs(fused)
    fused.train()
    if mode == "checkpointing":
        fused.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        for block in fused.model.layers:
            block.compile(backend="aot_eager")  # graph breaks around the opaque ops, no code generation
    calls = _count_input_quantizations(monkeypatch)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    fused(input_ids=ids, labels=ids).loss.backward()
    plain(input_ids=ids, labels=ids).loss.backward()
    # Only o_proj quantizes in the fused model (forward, and again in the recomputation); the plain model 4 per block.
    assert calls[0] == blocks * (2 if mode == "checkpointing" else 1) + 4 * blocks
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6 * float(q.grad.abs().max())), name
