"""Merge policy of the row-wise proxy update: merge a chosen row only when its update is large against the FP8 step
of that row (``FalqonConfig.merge_threshold``, issue 18).

A merge rounds ``W[i] + B[i]·A`` to E4M3. An update far below the FP8 spacing of the row's weights is mostly rounding
noise (stochastic rounding) or lost (nearest); with ``b_policy: keep`` such a row can instead stay in ``B``, where
the forward applies it exactly, and grow until it is worth merging. All shapes are fixed (a mask, no
data-dependent indexing), so the update stays capturable in a CUDA graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from falqon_lit.layer import FalqonLinear

E4M3_MANTISSA_BITS = 3
E4M3_MIN_NORMAL_EXP = -6
"""E4M3 normals start at ``2⁻⁶``; below it the spacing is the subnormal step ``2⁻⁹``."""


def e4m3_step(values_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Spacing of E4M3 at each stored value, in real units (float32): ``2^(⌊log₂|q|⌋ − 3) · scale`` for normals,
    ``2⁻⁹ · scale`` for subnormals and zero. At the top of the range (448) it is the spacing below."""
    magnitude = values_fp8.float().abs().clamp(min=2.0**E4M3_MIN_NORMAL_EXP)
    _, exponent = torch.frexp(magnitude)  # magnitude = m · 2^e with m in [0.5, 1): ⌊log₂⌋ = e − 1
    return torch.exp2((exponent - 1 - E4M3_MANTISSA_BITS).float()) * scale


def steps_moved(rows_fp8: torch.Tensor, rows_scale: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``(k,)``: mean over each row's columns of ``|delta| / e4m3_step``, i.e. how many FP8 steps the update moves
    the row's weights on average."""
    return (delta.abs() / e4m3_step(rows_fp8, rows_scale)).mean(dim=1)


def hold_small_rows(layer: FalqonLinear, rows: torch.Tensor) -> torch.Tensor | None:
    """Apply the merge threshold to the chosen ``rows`` of ``layer``: rows whose ``B[i]·A`` moves fewer than
    ``merge_threshold`` FP8 steps are zeroed in ``B`` (the merge then leaves their bytes alone) and returned.

    Returns:
        ``(k, r)`` the held rows of ``B`` (zero where a row is merged), for the caller to put back after the merge;
        ``None`` when the threshold is 0 (merge every chosen row).
    """
    threshold = layer.config.merge_threshold
    if not threshold:
        return None
    row_scaled = layer.weight_scale.numel() > 1
    scale = layer.weight_scale.index_select(0, rows) if row_scaled else layer.weight_scale
    b_rows = layer.lora_B.index_select(0, rows)  # (k, r)
    delta = b_rows.float() @ layer.lora_A()  # (k, in), real units
    merge = (steps_moved(layer.weight_fp8.index_select(0, rows), scale, delta) >= threshold).unsqueeze(1)  # (k, 1)
    layer.lora_B.index_copy_(0, rows, b_rows * merge)
    return b_rows * ~merge
