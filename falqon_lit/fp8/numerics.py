"""FP8 numerics: pure functions from amax to scale, saturating casts, quantize/dequantize, SQNR.

Conventions, documented once here and used everywhere:

- ``scale`` is the *dequantization multiplier*: ``hp = fp8 * scale`` (the vLLM/compressed-tensors ``weight_scale``
  convention). Its inverse, if ever needed, is named ``inv_scale``.
- Suffixes: ``_hp`` high precision (bf16/fp32/fp64), ``_fp8`` FP8 bytes, ``_t`` transposed (row-major copy of the
  transpose, the column-major operand an FP8 GEMM wants).
- Scales are float32; a ``tensor`` scale has shape ``(1,)``, a ``row`` scale ``(rows, 1)``, a ``block`` scale
  ``(rows, ceil(cols / 128))``: one scale per row and 128-column group (the last group is partial when ``cols`` is
  not a multiple of 128). Weights keep block scales in this row-expanded form, the 128 rows of a block carrying
  equal values (:func:`compact_block_scale` gives the ``(ceil(rows / 128), ceil(cols / 128))`` checkpoint form), so
  quantize, dequantize and row merges index rows exactly as with row scales; activations use it as it is (1 × 128
  groups per token). A block scale with one group is a row scale, and is treated as one.
- E4M3 (``float8_e4m3fn``, max 448) holds weights and activations, E5M2 (``float8_e5m2``, max 57344) gradients.
- Adapter parameters start with ``lora_`` so that freezing and filtering work by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from falqon_lit.config import SCALE_BLOCK, ScaleGranularity

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_DTYPES = (E4M3, E5M2)

AMAX_EPS = 1e-12
"""Floor on amax so an all-zero tensor gets a finite, positive scale."""


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 format."""
    if dtype not in FP8_DTYPES:
        raise TypeError(f"expected an FP8 dtype {FP8_DTYPES}, got {dtype}")
    return float(torch.finfo(dtype).max)


def group_count(cols: int) -> int:
    """Number of 128-column groups of a block scale (the last one partial when ``cols % 128``)."""
    return math.ceil(cols / SCALE_BLOCK)


def expand_scale(scale: torch.Tensor, cols: int) -> torch.Tensor:
    """A scale broadcastable against a ``(rows, cols)`` tensor: block scales ``(rows, G > 1)`` repeat each group's
    scale over its 128 columns; tensor and row scales are returned as they are."""
    if is_block_scale(scale):
        return scale.repeat_interleave(SCALE_BLOCK, dim=1)[:, :cols]
    return scale


def is_block_scale(scale: torch.Tensor) -> bool:
    """Whether a scale has more than one 128-column group (a block scale that is not also a row scale)."""
    return scale.dim() == 2 and scale.shape[1] > 1


def compact_block_scale(scale: torch.Tensor) -> torch.Tensor:
    """Row-expanded weight block scale ``(rows, G)`` → one row per 128-row block ``(ceil(rows / 128), G)``."""
    return scale[::SCALE_BLOCK]


def expand_block_scale(compact: torch.Tensor, rows: int) -> torch.Tensor:
    """Checkpoint block scale ``(ceil(rows / 128), G)`` → row-expanded ``(rows, G)`` (inverse of
    :func:`compact_block_scale`; partial edge blocks are cut at ``rows``)."""
    return compact.float().repeat_interleave(SCALE_BLOCK, dim=0)[:rows].contiguous()


def amax(x_hp: torch.Tensor, granularity: ScaleGranularity, block_rows: int = 1) -> torch.Tensor:
    """Absolute maximum of a 2-D tensor in float32: per tensor ``(1,)``, per row ``(rows, 1)``, or per
    ``block_rows`` × 128 block ``(rows, ceil(cols / 128))`` in row-expanded form (``block_rows`` 1 for activation
    groups, 128 for weight blocks); edge blocks cover what is left."""
    x_abs = x_hp.detach().abs().float()
    if granularity == ScaleGranularity.TENSOR:
        return x_abs.amax().reshape(1)
    if granularity == ScaleGranularity.ROW:
        return x_abs.amax(dim=-1, keepdim=True)  # (rows, 1)
    rows, cols = x_abs.shape
    groups = group_count(cols)
    # Zero padding cannot raise a maximum of absolute values, so partial edge blocks need no special case.
    group_amax = F.pad(x_abs, (0, groups * SCALE_BLOCK - cols)).reshape(rows, groups, SCALE_BLOCK).amax(-1)
    if block_rows == 1:
        return group_amax  # (rows, G)
    row_blocks = math.ceil(rows / block_rows)
    padded = F.pad(group_amax, (0, 0, 0, row_blocks * block_rows - rows))
    block_amax = padded.reshape(row_blocks, block_rows, groups).amax(1)  # (RB, G)
    return block_amax.repeat_interleave(block_rows, dim=0)[:rows]  # (rows, G)


def amax_to_scale(amax_hp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Current-scaling rule: the scale that maps ``amax`` onto the format's largest finite value."""
    return (amax_hp.float().clamp(min=AMAX_EPS) / fp8_max(dtype)).float()


def saturating_cast(x_scaled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to FP8, clamping to the finite range first: ``float8_e4m3fn`` has no inf and overflow would give NaN."""
    limit = fp8_max(dtype)
    return x_scaled.clamp(-limit, limit).to(dtype)


def quantize(x_hp: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 bytes of ``x_hp / scale`` (round to nearest even, saturating)."""
    # Upcast before dividing: a bf16 quotient would round twice (once to bf16, once to FP8).
    return saturating_cast(x_hp.float() / expand_scale(scale, x_hp.shape[-1]), dtype)


def dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x_fp8 * scale`` in ``dtype`` (float64 for the reference emulation)."""
    return (x_fp8.to(dtype) * expand_scale(scale, x_fp8.shape[-1]).to(dtype)).to(dtype)


def quantize_dynamic(
    x_hp: torch.Tensor, dtype: torch.dtype, granularity: ScaleGranularity, block_rows: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Current (dynamic) scaling of a 2-D tensor: returns ``(x_fp8, scale)`` (``block_rows`` as in :func:`amax`)."""
    scale = amax_to_scale(amax(x_hp, granularity, block_rows), dtype)
    return quantize(x_hp, scale, dtype), scale


def quantize_weight(weight_hp: torch.Tensor, granularity: ScaleGranularity) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 weight with a fresh scale: one per tensor, per output row, or per 128 × 128 block (row-expanded)."""
    block_rows = SCALE_BLOCK if granularity == ScaleGranularity.BLOCK else 1
    return quantize_dynamic(weight_hp, E4M3, granularity, block_rows)


def hash_bits(keys: torch.Tensor) -> torch.Tensor:
    """32 pseudo-random bits (int64 in ``[0, 2³²)``) per integer key: murmur3's finalizer, a bijection on 32 bits.

    Counter-based, so the same keys give the same bits on every device and rank, with no generator state to carry
    through checkpoints or CUDA-graph replays.
    """
    x = keys & 0xFFFFFFFF
    x = (x ^ (x >> 16)) * 0x85EBCA6B & 0xFFFFFFFF  # int64 products wrap; the low 32 bits are exact
    x = (x ^ (x >> 13)) * 0xC2B2AE35 & 0xFFFFFFFF
    return x ^ (x >> 16)


def quantize_stochastic(x_hp: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes of ``x_hp / scale`` rounded up or down with probability proportional to the distance (unbiased).

    Args:
        x_hp: values to quantize.
        scale: dequantization scale: tensor, row or block (row-expanded).
        bits: int64 random bits in ``[0, 2³²)``, one per element (:func:`hash_bits`).
    """
    scaled = x_hp.float() / expand_scale(scale, x_hp.shape[-1])
    limit = fp8_max(E4M3)
    magnitude = scaled.abs().clamp(max=limit)
    # Normal range: add 20 random bits below E4M3's 3 mantissa bits of the float32 pattern, then truncate them.
    pattern = magnitude.view(torch.int32).long() + (bits >> 12)
    normal = (pattern & ~0xFFFFF).int().view(torch.float32)
    # Subnormal range (below 2⁻⁶): a fixed spacing of 2⁻⁹.
    subnormal = torch.floor(magnitude * 512 + (bits >> 8).float() / 2.0**24) / 512
    rounded = torch.where(magnitude < 2.0**-6, subnormal, normal).clamp(max=limit)
    return rounded.copysign(scaled).to(E4M3)  # exact: every value above is an E4M3 value


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; E4M3 round-trips sit near 30 dB)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp(min=1e-300)))
