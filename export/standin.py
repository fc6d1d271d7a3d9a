"""Export-time stand-ins for ``FalqonLinear``: ``Q(x) @ deq(W)ᵀ`` in plain float32 torch ops.

Used to trace the ONNX graph and, with ``activations="float"``, to measure how much the FP8 activation rounding
itself moves the logits (the noise floor that verification tolerances are stated against).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from typing import Any

import torch
from onnx import TensorProto
from torch import nn

from falqon_lit.config import ScaleGranularity
from falqon_lit.convert import falqon_layers
from falqon_lit.layer import FalqonLinear
from falqon_lit.numerics import AMAX_EPS, E4M3, fp8_max


class ActivationMode(str, enum.Enum):
    """What a stand-in does to a FALQON layer's input."""

    FP8 = "fp8"
    """Round to E4M3 with the trained dynamic scale (tensor or per token), as the trainer's forward does."""
    FLOAT = "float"
    """Leave it in float32: weight-only FP8."""


class _Fp8RoundTrip(torch.autograd.Function):
    """``x → E4M3 → float``; exported as two ``Cast`` nodes (the TorchScript exporter has no FP8 dtype)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.to(E4M3).to(x.dtype)

    @staticmethod
    def symbolic(g: Any, x: Any) -> Any:
        x_fp8 = g.op("Cast", x, to_i=TensorProto.FLOAT8E4M3FN, saturate_i=1)
        return g.op("Cast", x_fp8, to_i=TensorProto.FLOAT)


class _DequantLinear(nn.Module):
    """Export-time stand-in for a ``FalqonLinear``: ``Q(x) @ deq(W)ᵀ + bias`` in float32."""

    def __init__(self, layer: FalqonLinear, activations: ActivationMode) -> None:
        super().__init__()
        # (in, out): MatMul reads the initializer as is, so it keeps this buffer's name through the exporter.
        self.register_buffer("weight_t", layer.dequantized_weight(torch.float32).t().contiguous())
        bias = None if layer.bias is None else layer.bias.detach().float()
        self.register_buffer("bias", bias)
        self.per_token = layer.config.act_scaling == ScaleGranularity.ROW
        self.round_input = activations == ActivationMode.FP8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.round_input:
            # Same arithmetic as numerics.quantize_dynamic: scale = max(amax, eps) / 448, x / scale saturated.
            amax = x.abs().amax(dim=-1, keepdim=True) if self.per_token else x.abs().amax()
            scale = amax.clamp(min=AMAX_EPS) / fp8_max(E4M3)
            x = _Fp8RoundTrip.apply((x / scale).clamp(-fp8_max(E4M3), fp8_max(E4M3))) * scale
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


@contextlib.contextmanager
def dequantized_view(model: nn.Module, activations: ActivationMode) -> Iterator[dict[str, FalqonLinear]]:
    """Swap FALQON layers for stand-ins and cast the rest to float32; restore both afterwards (lossless)."""
    layers = falqon_layers(model)
    dtypes = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    was_training = model.training
    try:
        for name, layer in layers.items():
            model.set_submodule(name, _DequantLinear(layer, activations))
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
        model.eval()
        yield layers
    finally:
        for name, layer in layers.items():
            model.set_submodule(name, layer)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name in dtypes and tensor.dtype != dtypes[name]:
                tensor.data = tensor.data.to(dtypes[name])
        model.train(was_training)
