"""RMSNorm fused with the per-token FP8 quantization of its output (Triton on CUDA; the same numbers eagerly).

The norm in front of a projection group (q/k/v, gate/up) writes, in the one pass that normalizes a row, the FP8
bytes and per-token scale of that row as well: the group's GEMM then reads them instead of quantizing ``x`` again
(another full read of the activation). The high-precision output is still written (the backward and any other
consumer use it). The backward is the RMSNorm input gradient in one pass per row (the norm weight is frozen).

Semantics are Hugging Face's ``LlamaRMSNorm`` (also Mistral's, Qwen2's, Qwen3's)::

    x_n = (x · rsqrt(mean(x²) + eps)).to(x.dtype);  y = weight · x_n;  Q(y) per token (``quantize_dynamic``)
"""

from __future__ import annotations

import torch

from falqon_lit.config import ScaleGranularity
from falqon_lit.fp8.numerics import AMAX_EPS, E4M3, fp8_max, quantize_dynamic
from falqon_lit.fp8.quantizer import Float8Tensor

try:
    import triton
    import triton.language as tl

    from falqon_lit.fp8.triton_quantize import store_row_fp8
except ImportError:  # CPU-only installs: the eager functions below
    triton = None


def available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``x``."""
    return triton is not None and x.is_cuda and x.stride(-1) == 1


def rmsnorm_quantize_eager(
    x_2d: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, Float8Tensor, torch.Tensor]:
    """``(y, Q(y) per token, rstd (M,))`` with Hugging Face's RMSNorm arithmetic, unfused."""
    x = x_2d.float()
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (M, 1)
    y = weight * (x * rstd).to(x_2d.dtype)
    return y, Float8Tensor(*quantize_dynamic(y, E4M3, ScaleGranularity.ROW)), rstd.squeeze(1)


def rmsnorm_grad_input_eager(
    grad_y: torch.Tensor, x_2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """``dL/dx = rstd · (g·w − x_n · mean(g·w · x_n))`` in float32, ``x_n = x · rstd``."""
    x_n = x_2d.float() * rstd.unsqueeze(1)
    gw = grad_y.float() * weight.float()
    return (rstd.unsqueeze(1) * (gw - x_n * (gw * x_n).mean(-1, keepdim=True))).to(x_2d.dtype)


if triton is not None:

    @triton.jit
    def _norm_quant_kernel(
        x_ptr, w_ptr, y_ptr, q_ptr, scale_ptr, rstd_ptr, cols, x_stride, eps, fp8_limit, amax_eps,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < cols
        x_raw = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0)
        x = x_raw.to(tl.float32)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=0) / cols + eps))
        x_n = (x * rstd).to(x_raw.dtype).to(tl.float32)  # Hugging Face rounds to the input dtype before the weight
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (w * x_n).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * cols + offs, y, mask=mask)
        store_row_fp8(y.to(tl.float32), q_ptr, scale_ptr, row, offs, mask, cols, fp8_limit, amax_eps)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _norm_grad_kernel(g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, cols, g_stride, x_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < cols
        rstd = tl.load(rstd_ptr + row)
        x_n = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32) * rstd
        gw = tl.load(g_ptr + row * g_stride + offs, mask=mask, other=0.0).to(tl.float32)
        gw = gw * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(gw * x_n, axis=0) / cols
        tl.store(dx_ptr + row * cols + offs, (rstd * (gw - x_n * mean)).to(dx_ptr.dtype.element_ty), mask=mask)


def rmsnorm_quantize(
    x_2d: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, Float8Tensor, torch.Tensor]:
    """``(y, Q(y) per token, rstd)``: one Triton pass per row on CUDA, ``rmsnorm_quantize_eager`` elsewhere."""
    if not available(x_2d):
        return rmsnorm_quantize_eager(x_2d, weight, eps)
    return rmsnorm_quantize_triton(x_2d, weight, eps)


def rmsnorm_quantize_triton(
    x_2d: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, Float8Tensor, torch.Tensor]:
    """The Triton launch of ``rmsnorm_quantize`` (any device Triton runs on, its interpreter included)."""
    rows, cols = x_2d.shape
    y = torch.empty(rows, cols, dtype=torch.promote_types(weight.dtype, x_2d.dtype), device=x_2d.device)
    q = torch.empty(rows, cols, dtype=E4M3, device=x_2d.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x_2d.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x_2d.device)
    block = triton.next_power_of_2(cols)
    _norm_quant_kernel[(rows,)](
        x_2d, weight, y, q, scale, rstd, cols, x_2d.stride(0), eps, fp8_max(E4M3), AMAX_EPS, BLOCK=block
    )
    return y, Float8Tensor(q, scale), rstd


def rmsnorm_grad_input(
    grad_y: torch.Tensor, x_2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """The RMSNorm input gradient: one Triton pass per row on CUDA, ``rmsnorm_grad_input_eager`` elsewhere."""
    if not (available(x_2d) and grad_y.stride(-1) == 1):
        return rmsnorm_grad_input_eager(grad_y, x_2d, weight, rstd)
    return rmsnorm_grad_input_triton(grad_y, x_2d, weight, rstd)


def rmsnorm_grad_input_triton(
    grad_y: torch.Tensor, x_2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """The Triton launch of ``rmsnorm_grad_input``."""
    rows, cols = x_2d.shape
    dx = torch.empty(rows, cols, dtype=x_2d.dtype, device=x_2d.device)
    block = triton.next_power_of_2(cols)
    _norm_grad_kernel[(rows,)](grad_y, x_2d, weight, rstd, dx, cols, grad_y.stride(0), x_2d.stride(0), BLOCK=block)
    return dx
