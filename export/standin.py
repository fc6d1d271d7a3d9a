"""Export-time stand-ins for ``FalqonLinear``: ``Q(x) @ deq(W)ᵀ`` in plain torch ops, float32 or float64.

Used to trace the ONNX graph and, with ``activations="float"``, to measure how much the FP8 activation rounding
itself moves the logits (the noise floor that verification tolerances are stated against). In float64 the same
FP8 values (``deq(W)`` as float32 computes it, activations rounded to E4M3) are multiplied and summed in float64:
the reference of the float64 ONNX graph, which two runtimes then compute alike to ~1e-15.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from typing import Any

import torch
from onnx import TensorProto
from torch import nn

from falqon_lit.config import SCALE_BLOCK, ScaleGranularity
from falqon_lit.fp8.numerics import AMAX_EPS, E4M3, fp8_max
from falqon_lit.layer import falqon_layers
from falqon_lit.layer_base import FalqonLayer

from .embedding_standin import stored_embeddings


class ActivationMode(str, enum.Enum):
    """What a stand-in does to a FALQON layer's input."""

    FP8 = "fp8"
    """Round to E4M3 with the trained dynamic scale (tensor or per token), as the trainer's forward does."""
    FLOAT = "float"
    """Leave it in float32: weight-only FP8."""


class Precision(str, enum.Enum):
    """Arithmetic of everything but the FP8 bytes in a stand-in model (and so in the ONNX graph traced from it)."""

    FLOAT32 = "float32"
    """What runtimes run fast; agrees with the trainer up to FP8-amplified float32 rounding (see readback)."""
    FLOAT64 = "float64"
    """The trainer's FP8 arithmetic with float64 sums: any two runtimes agree to ~1e-15, greedy tokens identical."""

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self == Precision.FLOAT64 else torch.float32

    @property
    def onnx_type(self) -> int:
        return TensorProto.DOUBLE if self == Precision.FLOAT64 else TensorProto.FLOAT


class _Fp8RoundTrip(torch.autograd.Function):
    """``x → float32 → E4M3 → x.dtype``; exported as ``Cast`` nodes (the TorchScript exporter has no FP8 dtype).

    float64 goes through float32 explicitly (exact for the clamped range but for the final rounding) so that torch
    and onnxruntime round the same float32 value to E4M3.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.float().to(E4M3).to(x.dtype)

    @staticmethod
    def symbolic(g: Any, x: Any) -> Any:
        dtype = x.type().dtype()
        if dtype == torch.float64:
            x = g.op("Cast", x, to_i=TensorProto.FLOAT)
        x_fp8 = g.op("Cast", x, to_i=TensorProto.FLOAT8E4M3FN, saturate_i=1)
        x_back = g.op("Cast", x_fp8, to_i=TensorProto.FLOAT)
        return g.op("Cast", x_back, to_i=TensorProto.DOUBLE) if dtype == torch.float64 else x_back


def _activation_amax(x: torch.Tensor, scaling: ScaleGranularity) -> torch.Tensor:
    """amax per tensor, per token, or per 1 × 128 group of a token (broadcast back over the group's columns)."""
    if scaling == ScaleGranularity.TENSOR:
        # Shape (1,), not 0-dim: the TorchScript exporter demotes 0-dim float64 arithmetic to float32, which would
        # round the float64 graph's per-tensor scale to float32 (the reference's is float64).
        return x.abs().amax().reshape(1)
    if scaling == ScaleGranularity.ROW:
        return x.abs().amax(dim=-1, keepdim=True)
    cols = x.shape[-1]
    groups = -(-cols // SCALE_BLOCK)
    padded = nn.functional.pad(x.abs(), (0, groups * SCALE_BLOCK - cols))  # zeros never raise an amax
    group_amax = padded.unflatten(-1, (groups, SCALE_BLOCK)).amax(dim=-1)
    return group_amax.repeat_interleave(SCALE_BLOCK, dim=-1)[..., :cols]


class _DequantLinear(nn.Module):
    """Export-time stand-in for a FALQON layer: ``Q(x) @ deq(W)ᵀ + bias`` in float32 or float64."""

    def __init__(self, layer: FalqonLayer, activations: ActivationMode, dtype: torch.dtype) -> None:
        super().__init__()
        # (in, out): MatMul reads the initializer as is, so it keeps this buffer's name through the exporter.
        # deq(W) is computed in float32 (what DequantizeLinear outputs), then widened exactly.
        self.register_buffer("weight_t", layer.dequantized_weight(torch.float32).t().contiguous().to(dtype))
        bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        self.register_buffer("bias", bias)
        self.act_scaling = layer.config.act_scaling
        self.round_input = activations == ActivationMode.FP8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.round_input:
            # Same arithmetic as numerics.quantize_dynamic: scale = max(amax, eps) / 448, x / scale saturated.
            amax = _activation_amax(x, self.act_scaling)
            scale = amax.clamp(min=AMAX_EPS) / fp8_max(E4M3)
            x = _Fp8RoundTrip.apply((x / scale).clamp(-fp8_max(E4M3), fp8_max(E4M3))) * scale
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


class _WideRMSNorm(nn.Module):
    """Llama-style RMSNorm in the input's dtype (Hugging Face's computes in float32 even for float64 input)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class _WideRotary(nn.Module):
    """Rotary ``(cos, sin)`` in the input's dtype (Hugging Face's computes them in float32)."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rotary.inv_freq, persistent=False)
        self.attention_scaling = rotary.attention_scaling

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = self.inv_freq.to(x.dtype)[None, :, None] * position_ids[:, None, :].to(x.dtype)
        emb = torch.cat((freqs, freqs), dim=1).transpose(1, 2)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}
"""Rotary types whose ``inv_freq`` is fixed at construction (dynamic types recompute it per sequence length)."""


def _float32_islands(model: nn.Module) -> dict[str, nn.Module]:
    """Wide replacements for the Llama-family modules that compute in float32 whatever their input dtype.

    Others are left as they are; their float32 rounding then shows as a float64 verification failure, not as a
    silent difference.
    """
    wide: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            wide[name] = _WideRMSNorm(module)
        elif kind.endswith("RotaryEmbedding") and getattr(module, "rope_type", None) in _STATIC_ROPE:
            wide[name] = _WideRotary(module)
    return wide


@contextlib.contextmanager
def dequantized_view(
    model: nn.Module,
    activations: ActivationMode,
    precision: Precision = Precision.FLOAT32,
    table_dtype: torch.dtype | None = None,
) -> Iterator[dict[str, FalqonLayer]]:
    """Swap FALQON layers for stand-ins and cast the rest to ``precision``; restore both afterwards (lossless).

    In float64, Llama-style RMSNorms and rotary embeddings are swapped too: Hugging Face computes them in float32
    regardless of the model dtype, which would leave float32 rounding for FP8 activation rounding to amplify.
    With ``table_dtype``, the input embedding and output head keep one table in that dtype (the ONNX graph's).
    """
    layers = falqon_layers(model)
    dtype = Precision(precision).dtype
    originals = {name: model.get_submodule(name) for name in layers}
    swaps: dict[str, nn.Module] = {name: _DequantLinear(layer, activations, dtype) for name, layer in layers.items()}
    if dtype == torch.float64:
        wide = _float32_islands(model)
        originals.update({name: model.get_submodule(name) for name in wide})
        swaps.update(wide)
    dtypes = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    was_training = model.training
    tables = contextlib.ExitStack()
    try:
        for name, module in swaps.items():
            model.set_submodule(name, module)
        stored = tables.enter_context(stored_embeddings(model, table_dtype, dtype)) if table_dtype else set()
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and tensor.dtype != dtype and id(tensor) not in stored:
                tensor.data = tensor.data.to(dtype)
        model.eval()
        yield layers
    finally:
        tables.close()
        for name, module in originals.items():
            model.set_submodule(name, module)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name in dtypes and tensor.dtype != dtypes[name]:
                tensor.data = tensor.data.to(dtypes[name])
        model.train(was_training)
