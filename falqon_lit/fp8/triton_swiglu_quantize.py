"""SwiGLU ``silu(gate) · up`` fused with the per-token FP8 quantization of its output (the input of ``down_proj``).

Triton on CUDA, the same arithmetic eagerly elsewhere. Semantics are Hugging Face's ``LlamaMLP``:
``h = silu(gate) * up`` with each op rounded to the activation dtype, then ``Q(h)`` per token
(``quantize_dynamic``). The backward is ``dgate = dh · up · silu'(gate)``, ``dup = dh · silu(gate)`` in float32.
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


def available(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on these 2-D tensors."""
    return triton is not None and all(t.is_cuda and t.stride(-1) == 1 for t in tensors)


def swiglu_quantize_eager(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, Float8Tensor]:
    """``(h, Q(h) per token)`` with Hugging Face's arithmetic, unfused."""
    h = torch.nn.functional.silu(gate) * up
    return h, Float8Tensor(*quantize_dynamic(h, E4M3, ScaleGranularity.ROW))


def swiglu_grad_eager(grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dgate, dL/dup)`` in float32, rounded to the inputs' dtypes."""
    g, u, dh = gate.float(), up.float(), grad_h.float()
    sig = torch.sigmoid(g)
    return (dh * u * sig * (1 + g * (1 - sig))).to(gate.dtype), (dh * g * sig).to(up.dtype)


if triton is not None:

    @triton.jit
    def _swiglu_quant_kernel(
        g_ptr, u_ptr, h_ptr, q_ptr, scale_ptr, cols, g_stride, u_stride, fp8_limit, amax_eps, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < cols
        g_raw = tl.load(g_ptr + row * g_stride + offs, mask=mask, other=0.0)
        g = g_raw.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(g_raw.dtype).to(tl.float32)  # silu, rounded as torch rounds it
        u = tl.load(u_ptr + row * u_stride + offs, mask=mask, other=0.0).to(tl.float32)
        h = (act * u).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * cols + offs, h, mask=mask)
        store_row_fp8(h.to(tl.float32), q_ptr, scale_ptr, row, offs, mask, cols, fp8_limit, amax_eps)

    @triton.jit
    def _swiglu_grad_kernel(
        dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, cols, dh_stride, g_stride, u_stride, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < cols
        dh = tl.load(dh_ptr + row * dh_stride + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * g_stride + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * u_stride + offs, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        d_gate = dh * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(dg_ptr + row * cols + offs, d_gate.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + row * cols + offs, (dh * g * sig).to(du_ptr.dtype.element_ty), mask=mask)


def swiglu_quantize(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, Float8Tensor]:
    """``(h, Q(h) per token)`` of 2-D ``gate``/``up``: one Triton pass per row on CUDA, eagerly elsewhere."""
    if not available(gate, up):
        return swiglu_quantize_eager(gate, up)
    return swiglu_quantize_triton(gate, up)


def swiglu_quantize_triton(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, Float8Tensor]:
    """The Triton launch of ``swiglu_quantize``."""
    rows, cols = gate.shape
    h = torch.empty(rows, cols, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    q = torch.empty(rows, cols, dtype=E4M3, device=gate.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=gate.device)
    block = triton.next_power_of_2(cols)
    _swiglu_quant_kernel[(rows,)](
        gate, up, h, q, scale, cols, gate.stride(0), up.stride(0), fp8_max(E4M3), AMAX_EPS, BLOCK=block,
        num_warps=16 if block >= 8192 else 4,
    )  # fmt: skip
    return h, Float8Tensor(q, scale)


def swiglu_grad(grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dgate, dL/dup)``: one Triton pass on CUDA, ``swiglu_grad_eager`` elsewhere."""
    if not available(grad_h, gate, up):
        return swiglu_grad_eager(grad_h, gate, up)
    return swiglu_grad_triton(grad_h, gate, up)


def swiglu_grad_triton(grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton launch of ``swiglu_grad``."""
    rows, cols = gate.shape
    d_gate = torch.empty(rows, cols, dtype=gate.dtype, device=gate.device)
    d_up = torch.empty(rows, cols, dtype=up.dtype, device=up.device)
    block = 1024
    grid = (rows, triton.cdiv(cols, block))
    _swiglu_grad_kernel[grid](
        grad_h, gate, up, d_gate, d_up, cols, grad_h.stride(0), gate.stride(0), up.stride(0), BLOCK=block
    )
    return d_gate, d_up
