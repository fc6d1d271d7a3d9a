"""The melded FP8 forward/backward of FALQON (paper §3.2, Alg. 1) as one ``torch.autograd.Function``.

Forward, one FP8 GEMM over the melded weight ``W' = [W; A]`` of shape ``(out + r, in)``::

    [O | O_A] = Q(x) · W'ᵀ            O = x Wᵀ,  O_A = x Aᵀ
    y = O (+ O_A Bᵀ when B holds a residual) (+ bias)

Backward, one FP8 GEMM for the input gradient and a small one for ``B``::

    grad_x = Q_e5m2([g | g B]) · W'    (just Q_e5m2(g) · W when B is known to be zero)
    grad_B = gᵀ · O_A

There is no gradient for ``W`` or ``A``: they change only through the row-wise proxy update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from falqon_lit.config import SCALE_BLOCK, Backend, GemmRole, ScaleGranularity
from falqon_lit.fp8 import block_gemm, triton_quantize
from falqon_lit.fp8.gemm import fp8_gemm
from falqon_lit.fp8.numerics import is_block_scale
from falqon_lit.fp8.quantizer import Float8Quantizer, Float8Tensor

INPUT_FP8_ATTR = "_falqon_input_fp8"
"""Attribute of an input tensor holding its per-token FP8 quantization (a ``Float8Tensor`` of its 2-D view), set by
the op that produced it (``fused_inputs``: RMSNorm, SwiGLU): the GEMM then reads it instead of quantizing again."""


def prequantized_input(x: torch.Tensor, act_scaling: ScaleGranularity) -> Float8Tensor | None:
    """The per-token FP8 quantization the op that produced ``x`` attached, when per-token scaling is wanted."""
    return getattr(x, INPUT_FP8_ATTR, None) if act_scaling == ScaleGranularity.ROW else None


def melded_forward(
    x_2d: torch.Tensor,
    weight: Float8Tensor,
    out_features: int,
    act_scaling: ScaleGranularity,
    backend: Backend,
    x_fp8: Float8Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One FP8 GEMM ``Q(x) · [W; A]ᵀ``, split into ``O`` ``(M, out)`` and ``O_A`` ``(M, r)``; ``x_fp8`` is ``Q(x)``
    when the op that produced ``x`` computed it already."""
    if x_fp8 is None:
        x_fp8 = Float8Quantizer(GemmRole.INPUT, act_scaling, backend)(x_2d)
    aligned = out_features % SCALE_BLOCK == 0  # with block scales, A's block row then starts on the 128-row grid
    out = fp8_gemm(x_fp8, weight, out_dtype=x_2d.dtype, backend=backend, block_aligned=aligned)  # (M, out + r)
    # O stays a strided view (no copy of the big output); O_A is copied out (small) so that saving it for
    # backward does not keep the whole (M, out + r) buffer alive after O is gone.
    return out[:, :out_features], out[:, out_features:].clone()


def melded_grad_input(
    grad_2d: torch.Tensor,
    weight_t: Float8Tensor,
    lora_B: torch.Tensor | None,
    act_scaling: ScaleGranularity,
    backend: Backend,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``dL/dx = Q_e5m2([g | g B]) · [W; A]``, or ``Q_e5m2(g) · W`` when ``lora_B`` is ``None`` (B known zero).

    Args:
        grad_2d: ``g`` ``(M, out)``.
        weight_t: the row-major transpose ``[W; A]ᵀ`` ``(in, out + r)`` and its scale.
        lora_B: ``B`` ``(out, r)`` (all rows), or ``None`` to skip the residual.

    A row (per output channel) weight scale cannot be a scale of ``W'_t``'s rows, so it is folded into the
    gradient's columns before quantizing: ``g · diag(s) · W_fp8 = (g ⊙ s) · W_fp8``; the GEMM then stays exact.
    A block scale varies along ``grad_x``'s columns too, so it stays with the weight in a block-wise GEMM.
    """
    out_features, tail = grad_2d.shape[1], None
    if lora_B is not None:
        tail = grad_2d @ lora_B.to(grad_2d.dtype)  # (M, r): quantized as the last r columns of [g | g B]
    else:
        # Column slice of the row-major transpose: a column-major (out, in) view, no copy.
        scale = weight_t.scale[:out_features] if weight_t.scale.numel() > 1 else weight_t.scale
        weight_t = Float8Tensor(weight_t.data[:, :out_features], scale)
    if is_block_scale(weight_t.scale):
        grad_fp8 = Float8Quantizer(GemmRole.GRAD_OUTPUT, act_scaling, backend)(grad_2d, None, tail)
        aligned = out_features % SCALE_BLOCK == 0
        return block_gemm.grad_input_mm(grad_fp8, weight_t.data, weight_t.scale, out_dtype, backend, aligned)
    return grad_gemm(grad_2d, tail, weight_t, act_scaling, backend, out_dtype)


def grad_gemm(
    grad_2d: torch.Tensor,
    tail: torch.Tensor | None,
    weight_t: Float8Tensor,
    act_scaling: ScaleGranularity,
    backend: Backend,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``Q_e5m2([grad_2d | tail]) · W'`` for the row-major transpose ``W'_t`` ``(in, N)`` whose ``N`` columns match
    the gradient's; a row weight scale is folded into the gradient's columns (see ``melded_grad_input``)."""
    scale, col_scale = weight_t.scale, None
    if scale.numel() > 1:
        col_scale, scale = scale, torch.ones(1, dtype=torch.float32, device=grad_2d.device)
    grad_fp8 = Float8Quantizer(GemmRole.GRAD_OUTPUT, act_scaling, backend)(grad_2d, col_scale, tail)
    return fp8_gemm(grad_fp8, Float8Tensor(weight_t.data, scale), out_dtype=out_dtype, backend=backend)


def transposed(weight_fp8: torch.Tensor) -> torch.Tensor:
    """The row-major transpose ``[W; A]ᵀ`` ``(in, out + r)`` the backward GEMM needs, built for one use
    (``triton_quantize.transpose`` on CUDA)."""
    if triton_quantize.available(weight_fp8) and weight_fp8.is_contiguous():
        return triton_quantize.transpose(weight_fp8)
    return weight_fp8.t().contiguous()


@dataclass(frozen=True, slots=True)
class MeldedArgs:
    """The non-tensor arguments of the melded autograd functions (as Transformer Engine's ``LinearFwdArgs``): how
    the GEMMs quantize and run, and whether ``B`` holds a residual the forward and backward must include."""

    act_scaling: ScaleGranularity
    """Scale granularity of the input (forward) and gradient (backward) quantization."""
    backend: Backend
    """The resolved GEMM back-end."""
    residual: bool
    """``B`` may be non-zero: add ``O_A Bᵀ`` forward and ``g B A`` backward."""


class FalqonLinearFunction(torch.autograd.Function):
    """Autograd adapter: saves only ``O_A``, ``B`` (for a residual) and references to the FP8 weight buffers
    (``weight_t_fp8`` is ``None`` when the layer keeps no transposed copy)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        lora_B: torch.Tensor,
        weight_fp8: torch.Tensor,
        weight_t_fp8: torch.Tensor | None,
        weight_scale: torch.Tensor,
        args: MeldedArgs,
    ) -> torch.Tensor:
        out_features = lora_B.shape[0]
        x_2d = x.reshape(-1, x.shape[-1])  # (M, in)
        weight = Float8Tensor(weight_fp8, weight_scale)
        x_fp8 = prequantized_input(x, args.act_scaling)
        o, o_a = melded_forward(x_2d, weight, out_features, args.act_scaling, args.backend, x_fp8)
        # B is zero right after a merge (policy "zero"): then y = O exactly and the small GEMM is skipped.
        # Otherwise O += O_A Bᵀ in place: cuBLAS reads and writes the strided view once (beta = 1), where an
        # out-of-place addmm would first copy O into a new tensor.
        y = o.addmm_(o_a, lora_B.t().to(o.dtype)) if args.residual else o
        ctx.save_for_backward(o_a, lora_B, weight_fp8, weight_t_fp8, weight_scale)
        ctx.args = args
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor):  # type: ignore[override]
        o_a, lora_B, weight_fp8, weight_t_fp8, weight_scale = ctx.saved_tensors
        out_features = lora_B.shape[0]
        grad_2d = grad_y.reshape(-1, out_features)  # (M, out)
        grad_x = grad_b = None

        # grad_weight (Alg. 1): dL/dB = gᵀ · O_A, a small (out × M)·(M × r) GEMM in high precision.
        if ctx.needs_input_grad[1]:
            grad_b = (grad_2d.t() @ o_a.to(grad_2d.dtype)).to(lora_B.dtype)  # (out, r)

        # grad_input (Alg. 1): one E5M2 × E4M3 FP8 GEMM (E4M3 × E4M3 with 1 × 128 gradient groups).
        if ctx.needs_input_grad[0]:
            if weight_t_fp8 is None:  # no cached transpose (transpose_cache=False)
                weight_t_fp8 = transposed(weight_fp8)
            grad_x_2d = melded_grad_input(
                grad_2d,
                Float8Tensor(weight_t_fp8, weight_scale),
                lora_B if ctx.args.residual else None,
                ctx.args.act_scaling,
                ctx.args.backend,
                out_dtype=grad_y.dtype,
            )
            grad_x = grad_x_2d.reshape(*grad_y.shape[:-1], weight_t_fp8.shape[0])

        return grad_x, grad_b, None, None, None, None
