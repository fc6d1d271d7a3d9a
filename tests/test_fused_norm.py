"""RMSNorm fused with the per-token FP8 quantization of its output, and the projection groups that read it."""

from __future__ import annotations

import copy

import pytest
import torch
from fp8_devices import requires_cuda_fp8
from tiny_models import tiny_llama

from falqon_lit import grouped_functional
from falqon_lit.config import FalqonConfig, GemmRole, ScaleGranularity
from falqon_lit.convert import convert_model
from falqon_lit.fp8 import triton_norm_quantize as tnq
from falqon_lit.fp8.numerics import E4M3, quantize_dynamic
from falqon_lit.fused_norm import install_norm_quantization


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
    return calls


def test_fused_norm_model_equals_unfused_model_and_groups_skip_their_quantization(monkeypatch):
    torch.manual_seed(0)
    plain = tiny_llama()
    convert_model(plain, FalqonConfig(rank=16))
    fused = copy.deepcopy(plain)
    assert install_norm_quantization(fused) == 2 * len(fused.model.layers)
    calls = _count_input_quantizations(monkeypatch)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    out = fused(input_ids=ids, labels=ids)
    assert calls[0] == 0  # every group read the norm's FP8 output
    want = plain(input_ids=ids, labels=ids)
    assert calls[0] == 2 * len(plain.model.layers)  # the unfused groups quantize their input themselves
    # The eager norm is Hugging Face's arithmetic: the same y, the same FP8 bytes, the same logits bit for bit.
    assert torch.equal(out.logits, want.logits)
    out.loss.backward()
    want.loss.backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        if p.requires_grad:  # the norm backward's float32 formula differs from autograd's in the last bits only
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6 * float(q.grad.abs().max())), name


def test_install_norm_quantization_skips_tensor_scaled_inputs():
    model = tiny_llama()
    convert_model(model, FalqonConfig(rank=16, weight_scaling="tensor", act_scaling="tensor"))
    assert install_norm_quantization(model) == 0


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
