"""RMSNorm whose forward also writes the FP8 input of the projection group after it (per-token scales).

``install_norm_quantization`` rebinds the ``forward`` of each decoder block's ``input_layernorm`` and
``post_attention_layernorm`` whose group (q/k/v, gate/up) quantizes per token: the norm returns its usual output,
carrying the FP8 bytes and scales of that output as ``_falqon_input_fp8``; the group's GEMM reads them instead of
quantizing the output again (``ProjectionGroup``). Both sides are opaque to ``torch.compile``, so the tensor object
(and its attribute) passes between them unchanged; any other consumer just sees the norm's output.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from falqon_lit.config import ScaleGranularity
from falqon_lit.fp8.quantizer import Float8Tensor
from falqon_lit.fp8.triton_norm_quantize import rmsnorm_grad_input, rmsnorm_quantize
from falqon_lit.grouped import INPUT_FP8_ATTR


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


@torch.compiler.disable
def _norm_quant_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    y, y_fp8, y_scale = RMSNormQuantFunction.apply(hidden_states, self.weight, self.variance_epsilon)
    setattr(y, INPUT_FP8_ATTR, Float8Tensor(y_fp8, y_scale))
    return y


def install_norm_quantization(model: nn.Module) -> int:
    """Fuse the per-token quantization of each projection group's input into the RMSNorm before it.

    Returns:
        The number of norms rebound (0 when no group quantizes its input per token).
    """
    count = 0
    for block in model.modules():
        pairs = (
            ("input_layernorm", getattr(getattr(block, "self_attn", None), "q_proj", None)),
            ("post_attention_layernorm", getattr(getattr(block, "mlp", None), "gate_proj", None)),
        )
        for norm_name, first in pairs:
            norm = getattr(block, norm_name, None)
            group = getattr(first, "_projection_group", None)
            if norm is None or group is None or not hasattr(norm, "variance_epsilon"):
                continue
            if group.config.act_scaling != ScaleGranularity.ROW:
                continue
            norm.forward = types.MethodType(_norm_quant_forward, norm)
            count += 1
    return count
