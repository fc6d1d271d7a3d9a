"""Ops that write the FP8 input of the FALQON GEMM after them: RMSNorm before q/k/v and gate/up, SwiGLU before
down_proj (per-token scales).

``install_fused_inputs`` rebinds, on each decoder block whose projections quantize their input per token, the
``forward`` of ``input_layernorm`` and ``post_attention_layernorm`` (in front of a projection group) and of the MLP
(``down_proj(silu(gate_proj(x)) * up_proj(x))``). Each op returns its usual high-precision output carrying the FP8
bytes and scales of that output (``functional.INPUT_FP8_ATTR``), computed in the same pass (Triton on CUDA, the same
arithmetic eagerly elsewhere); the next GEMM reads them instead of quantizing the output again. Both sides are
opaque to ``torch.compile``, so the tensor object and its attribute pass between them unchanged; any other consumer
just sees the op's output. Under gradient checkpointing the recomputed forward attaches a fresh quantization.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from falqon_lit.config import ScaleGranularity
from falqon_lit.fp8.quantizer import Float8Tensor
from falqon_lit.fp8.triton_norm_quantize import rmsnorm_grad_input, rmsnorm_quantize
from falqon_lit.fp8.triton_swiglu_quantize import swiglu_grad, swiglu_quantize
from falqon_lit.functional import INPUT_FP8_ATTR
from falqon_lit.layer import FalqonLinear

SILU_CLASSES = ("SiLU", "SiLUActivation")
"""Class names of the SiLU activation modules of Hugging Face MLPs (``ACT2FN["silu"]``)."""


class RMSNormQuantFunction(torch.autograd.Function):
    """``y = RMSNorm(x)`` plus the non-differentiable ``Q(y)`` bytes and per-token scales; the weight is frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):  # type: ignore[override]
        x_2d = x.reshape(-1, x.shape[-1])  # (M, K)
        y, y_fp8, rstd = rmsnorm_quantize(x_2d, weight, eps)
        ctx.save_for_backward(x_2d, weight, rstd)
        ctx.mark_non_differentiable(y_fp8.data, y_fp8.scale)
        return y.reshape(*x.shape[:-1], y.shape[-1]), y_fp8.data, y_fp8.scale

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor, *_):  # type: ignore[override]
        x_2d, weight, rstd = ctx.saved_tensors
        assert not ctx.needs_input_grad[1], "FALQON freezes norm weights"
        grad_x = rmsnorm_grad_input(grad_y.reshape(x_2d.shape), x_2d, weight, rstd)
        return grad_x.reshape(grad_y.shape), None, None


class SwiGLUQuantFunction(torch.autograd.Function):
    """``h = silu(gate) * up`` plus the non-differentiable ``Q(h)`` bytes and per-token scales."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):  # type: ignore[override]
        gate_2d, up_2d = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])  # (M, N)
        h, h_fp8 = swiglu_quantize(gate_2d, up_2d)
        ctx.save_for_backward(gate_2d, up_2d)
        ctx.mark_non_differentiable(h_fp8.data, h_fp8.scale)
        return h.reshape(gate.shape), h_fp8.data, h_fp8.scale

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor, *_):  # type: ignore[override]
        gate_2d, up_2d = ctx.saved_tensors
        d_gate, d_up = swiglu_grad(grad_h.reshape(gate_2d.shape), gate_2d, up_2d)
        return d_gate.reshape(grad_h.shape), d_up.reshape(grad_h.shape)


def _carrying(out: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    setattr(out, INPUT_FP8_ATTR, Float8Tensor(data, scale))
    return out


@torch.compiler.disable
def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _carrying(*RMSNormQuantFunction.apply(hidden_states, self.weight, self.variance_epsilon))


@torch.compiler.disable
def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)  # gate first: it runs the gate/up group GEMM
    return self.down_proj(_carrying(*SwiGLUQuantFunction.apply(gate, up)))


def _quantizes_per_token(layer: nn.Module | None) -> bool:
    return isinstance(layer, FalqonLinear) and layer.config.act_scaling == ScaleGranularity.ROW


def install_fused_inputs(model: nn.Module) -> tuple[int, int]:
    """Fuse the per-token input quantization of the FALQON GEMMs into the RMSNorms and SwiGLUs before them.

    Returns:
        ``(norms, MLPs)`` rebound; ``(0, 0)`` when no projection quantizes its input per token.
    """
    norms = mlps = 0
    for block in model.modules():
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        pairs = (
            ("input_layernorm", getattr(attn, "q_proj", None)),
            ("post_attention_layernorm", getattr(mlp, "gate_proj", None)),
        )
        for norm_name, first in pairs:
            norm = getattr(block, norm_name, None)
            grouped = getattr(first, "_projection_group", None) is not None  # one GEMM reads the norm's output
            if norm is not None and hasattr(norm, "variance_epsilon") and grouped and _quantizes_per_token(first):
                norm.forward = types.MethodType(_norm_forward, norm)
                norms += 1
        act = type(getattr(mlp, "act_fn", None)).__name__
        if _quantizes_per_token(getattr(mlp, "down_proj", None)) and act in SILU_CLASSES:
            mlp.forward = types.MethodType(_mlp_forward, mlp)
            mlps += 1
    return norms, mlps
