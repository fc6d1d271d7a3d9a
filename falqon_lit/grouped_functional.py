"""The melded FP8 forward/backward of projections that share an input (q/k/v, gate/up) as ONE GEMM each way.

The group's weight stacks each projection's melded ``[W_p; A_p]`` one after the other (``[W_q; A_q; W_k; A_k; W_v;
A_v]``, ``R = Σ (out_p + r_p)`` rows), so every projection's buffer is a contiguous slice of it. Forward::

    out = Q(x) · W'ᵀ                        one quantization of x, one FP8 GEMM (M, R)
    y_p = O_p (+ O_A_p B_pᵀ when B_p holds a residual)

Backward::

    grad_x = Q_e5m2([g_q | g_q B_q | g_k | g_k B_k | g_v | g_v B_v]) · W'      one FP8 GEMM
    grad_B_p = g_pᵀ · O_A_p

The forward is the per-projection forward bit for bit (same ``Q(x)``, same bytes); the input gradient quantizes the
concatenated gradient with one scale per token (or tensor) instead of one per projection, and sums the projections
inside the GEMM: that is the one place where the arithmetic differs from three separate layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from falqon_lit.config import Backend, GemmRole, ScaleGranularity
from falqon_lit.fp8.gemm import fp8_gemm
from falqon_lit.fp8.quantizer import Float8Quantizer, Float8Tensor
from falqon_lit.functional import grad_gemm, transposed

GroupLayout = tuple[tuple[int, int, int], ...]
"""Per projection ``(first row, out_features, rank)`` in the stacked weight."""


@dataclass(frozen=True, slots=True)
class GroupArgs:
    """The non-tensor arguments of :class:`FalqonGroupFunction` (as ``functional.MeldedArgs``, per projection)."""

    layout: GroupLayout
    """Per projection ``(first row, out_features, rank)`` in the stacked weight."""
    act_scaling: ScaleGranularity
    """Scale granularity of the input and gradient quantization."""
    backend: Backend
    """The resolved GEMM back-end."""
    residual: tuple[bool, ...]
    """Per projection: ``B`` may be non-zero."""


class FalqonGroupFunction(torch.autograd.Function):
    """Autograd adapter of a projection group: saves ``O_A_p`` and ``B_p`` per projection and references to the
    stacked FP8 weight; returns one output per projection."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        x_fp8: Float8Tensor | None,
        weight_fp8: torch.Tensor,
        weight_scale: torch.Tensor,
        args: GroupArgs,
        *lora_Bs: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        x_2d = x.reshape(-1, x.shape[-1])  # (M, in)
        if x_fp8 is None:  # else the op that produced x quantized it already (``fused_inputs``)
            x_fp8 = Float8Quantizer(GemmRole.INPUT, args.act_scaling, args.backend)(x_2d)
        weight = Float8Tensor(weight_fp8, weight_scale)
        out = fp8_gemm(x_fp8, weight, out_dtype=x_2d.dtype, backend=args.backend)  # (M, R)
        ys, o_as = [], []
        for (start, n_out, rank), lora_B, has_residual in zip(args.layout, lora_Bs, args.residual, strict=True):
            o = out[:, start : start + n_out]  # strided view, as in the single layer
            o_a = out[:, start + n_out : start + n_out + rank].clone()  # (M, r), small, saved
            y = o.addmm_(o_a, lora_B.t().to(o.dtype)) if has_residual else o
            ys.append(y.reshape(*x.shape[:-1], n_out))
            o_as.append(o_a)
        ctx.save_for_backward(weight_fp8, weight_scale, *o_as, *lora_Bs)
        ctx.args = args
        return tuple(ys)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grad_ys: torch.Tensor | None):  # type: ignore[override]
        weight_fp8, weight_scale, *rest = ctx.saved_tensors
        args = ctx.args
        n = len(args.layout)
        o_as, lora_Bs = rest[:n], rest[n:]
        m = o_as[0].shape[0]
        shape = next(g.shape[:-1] for g in grad_ys if g is not None)
        dtype = next(g.dtype for g in grad_ys if g is not None)
        grads_b: list[torch.Tensor | None] = []
        pieces: list[torch.Tensor] = []
        terms = zip(args.layout, o_as, lora_Bs, grad_ys, strict=True)
        for i, ((_, n_out, rank), o_a, lora_B, grad_y) in enumerate(terms):
            g = o_a.new_zeros(m, n_out, dtype=dtype) if grad_y is None else grad_y.reshape(m, n_out)  # (M, out)
            # grad_weight (Alg. 1): dL/dB_p = g_pᵀ · O_A_p, small and in high precision.
            needs_b = ctx.needs_input_grad[5 + i]  # after x, x_fp8, weight_fp8, weight_scale, args
            grads_b.append((g.t() @ o_a.to(g.dtype)).to(lora_B.dtype) if needs_b else None)
            # A zero B contributes zero columns: the stacked GEMM keeps the A rows of every projection.
            tail = g @ lora_B.to(g.dtype) if args.residual[i] else g.new_zeros(m, rank)
            pieces += [g, tail]

        # grad_input (Alg. 1): one E5M2 × E4M3 FP8 GEMM over the whole group.
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_full = torch.cat(pieces, dim=1)  # (M, R) in the stacked row order
            weight_t = Float8Tensor(transposed(weight_fp8), weight_scale)
            grad_x = grad_gemm(grad_full, None, weight_t, args.act_scaling, args.backend, out_dtype=dtype)
            grad_x = grad_x.reshape(*shape, weight_fp8.shape[1])
        return grad_x, None, None, None, None, *grads_b
