"""Explicit quantizer objects (as in Transformer Engine): each knows its FP8 format and scale granularity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from falqon_lit.config import Backend, GemmRole, ScaleGranularity
from falqon_lit.fp8 import te_backend, triton_quantize
from falqon_lit.fp8.numerics import E4M3, E5M2, dequantize, quantize_dynamic


class Float8Tensor(NamedTuple):
    """FP8 bytes and their dequantization scale (``hp = data * scale``)."""

    data: torch.Tensor
    """FP8 bytes, 2-D."""
    scale: torch.Tensor
    """float32, ``(1,)`` for a tensor scale, ``(rows, 1)`` for a row scale, ``(rows, ceil(cols / 128))`` for a block
    scale (row-expanded)."""

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """High-precision values ``data * scale``."""
        return dequantize(self.data, self.scale, dtype)


_ROLE_DTYPE = {GemmRole.INPUT: E4M3, GemmRole.WEIGHT: E4M3, GemmRole.GRAD_OUTPUT: E5M2}


@dataclass(frozen=True, slots=True)
class Float8Quantizer:
    """Current-scaling quantizer for one GEMM operand role.

    Args:
        role: which operand it feeds; gradients get E5M2 (range), inputs and weights E4M3 (precision), except
            with ``block`` groups, where every role is E4M3.
        granularity: one scale per tensor, one per row (token or output channel), or one per 1 × 128 group of a row
            (``block``; 128 × 128 weight blocks are built by ``numerics.quantize_weight``).
        backend: ``te`` quantizes with Transformer Engine's kernels (tensor scales only); any other backend with
            the fused Triton kernels on CUDA and the eager reference path elsewhere.
    """

    role: GemmRole
    granularity: ScaleGranularity
    backend: Backend = Backend.TORCH

    @property
    def dtype(self) -> torch.dtype:
        """The FP8 format for this role; E4M3 for every role with 1 × 128 groups (DeepSeek-V3 §3.3.2: fine-grained
        scales give gradients the range, so they keep E4M3's precision, and block-wise GEMMs take E4M3 operands)."""
        return E4M3 if self.granularity == ScaleGranularity.BLOCK else _ROLE_DTYPE[self.role]

    def __call__(
        self, x_hp: torch.Tensor, col_scale: torch.Tensor | None = None, tail: torch.Tensor | None = None
    ) -> Float8Tensor:
        """Quantize a 2-D tensor, with optional extra columns ``tail``, times an optional per-column float32
        multiplier, with a fresh amax: the FP8 tensor of ``[x_hp | tail] * col_scale``.

        On CUDA this runs fused kernels (no host sync), which read ``tail`` in place instead of concatenating;
        elsewhere the eager reference path.
        """
        if x_hp.dim() != 2:
            raise ValueError(f"Float8Quantizer expects a 2-D tensor, got shape {tuple(x_hp.shape)}")
        if self.backend == Backend.TE:
            if col_scale is not None or self.granularity != ScaleGranularity.TENSOR:
                raise ValueError("backend 'te' quantizes with one scale per tensor only")
            x_hp = x_hp if tail is None else torch.cat([x_hp, tail], dim=1)
            return Float8Tensor(*te_backend.quantize(x_hp, self.dtype))
        if triton_quantize.available(x_hp):
            return Float8Tensor(*triton_quantize.quantize_fused(x_hp, self.dtype, self.granularity, col_scale, tail))
        if tail is not None:
            x_hp = torch.cat([x_hp, tail], dim=1)
        if col_scale is not None:
            x_hp = x_hp.float() * col_scale.reshape(1, -1)
        return Float8Tensor(*quantize_dynamic(x_hp, self.dtype, self.granularity))
