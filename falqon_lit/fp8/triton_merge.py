"""Fused row-wise proxy merge for CUDA (Triton): ``W[row] += B[row] · A`` and requantize, two launches per layer.

The eager merge (``proxy.merge_rows`` plus the scatters in ``FalqonLinear._merge``) is ~45 small kernels per layer;
for the 224 layers of a LLaMA-7B shape that is ~40 ms of GPU time per step even when replayed from a CUDA graph.

The k merged rows make a small GEMM, ``delta = (B[rows] ⊙ s_A) · A_fp8`` of ``(k, r) · (r, in)``. Both kernels tile
it over (``BLOCK_M`` merged rows) × (``BLOCK_K`` columns): ``A`` is read once per block of rows instead of once per
row, and a 7B layer gets hundreds of programs instead of k. Requantizing a row needs all of it (its amax gives the
fresh row scale; a row whose update is exactly zero keeps its bytes), so the merge takes two launches:

1. ``_row_stats_kernel`` gathers, per merged row, the amax of the merged values and whether anything changes, across
   column blocks with atomics into ``(k,)`` scratch buffers, and keeps the old scales (pass 2 overwrites them).
2. ``_requantize_kernel`` recomputes its ``delta`` tile (cheaper than storing ``k · in`` floats), requantizes (fresh
   row scale, or the kept tensor scale with clamping), writes both stored layouts and the new scales, and adds the
   merge statistics atomically.

Rounding is to nearest, or stochastic when a merge counter is given: the kernel then draws the bits of
``proxy.merge_bits`` (``numerics.hash_bits`` of row, column, merge count and layer salt) and rounds as
``numerics.quantize_stochastic``. The count is read from its device buffer, so a CUDA graph replays fresh bits.

Same semantics as ``proxy.merge_rows``; the float32 summation order of ``delta`` differs, so a value that lands on
an FP8 rounding boundary may round to the neighbouring byte (tests bound this to one FP8 step). Everything else is
the eager arithmetic, rounding for rounding: ``old · scale`` is a rounded multiply (``mul_rn``: no FMA contraction
with the ``+ delta`` after it) and every division is IEEE (``div_rn``; Triton's ``/`` is ``div.full.f32``, off by up
to 2 ulp). That matters at the FP8 maximum: with a tensor scale ``s`` from the melded amax, a merged row whose update
is zero (or below half an ulp) at a ±448 byte has ``amax / s`` within an ulp of 448, so "saturated" (``> 448``)
hinges on the division's last bit (measured on CPU for the 64×4100, rank-32 tile-edge layer: 14 of 400 random layers
merge such a row, and a 1-ulp division error flips the verdict in 12 of them).
"""

from __future__ import annotations

import torch

from falqon_lit.config import ScaleGranularity
from falqon_lit.fp8.numerics import AMAX_EPS, E4M3, fp8_max

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs use the eager merge
    triton = None

BLOCK_M = 32
"""Merged rows per program (``tl.dot`` needs at least 16)."""
BLOCK_K = 64
"""Columns per program: small enough for a few hundred programs on a 4096-wide layer."""


FUSED_GRANULARITIES = (ScaleGranularity.TENSOR, ScaleGranularity.ROW)
"""Weight scale granularities the fused merge handles (block-scaled merges take the eager path)."""


def available(weight_fp8: torch.Tensor, granularity: ScaleGranularity) -> bool:
    """Whether the fused merge can run on these buffers with this weight scale granularity."""
    return triton is not None and weight_fp8.is_cuda and granularity in FUSED_GRANULARITIES


if triton is not None:

    @triton.jit
    def _hash_bits(keys):
        """``numerics.hash_bits`` (murmur3's finalizer) of int64 ``keys``, as uint32."""
        x = keys.to(tl.uint32)  # keeps the low 32 bits: the eager ``& 0xFFFFFFFF``
        x = (x ^ (x >> 16)) * 0x85EBCA6B  # uint32 products wrap: the low 32 bits of the eager int64 product
        x = (x ^ (x >> 13)) * 0xC2B2AE35
        return x ^ (x >> 16)

    @triton.jit
    def _round_stochastic(scaled, bits, fp8_limit):
        """``numerics.quantize_stochastic`` before the cast: float32 E4M3 values of ``scaled`` rounded by ``bits``."""
        magnitude = tl.minimum(tl.abs(scaled), fp8_limit, propagate_nan=tl.PropagateNan.ALL)  # NaN as torch.clamp
        # Normal range: add 20 random bits below E4M3's 3 mantissa bits of the float32 pattern, then truncate them.
        pattern = magnitude.to(tl.int32, bitcast=True) + (bits >> 12).to(tl.int32)
        normal = (pattern & -0x100000).to(tl.float32, bitcast=True)  # -0x100000 == ~0xFFFFF
        # Subnormal range (below 2⁻⁶ = 0.015625): a fixed spacing of 2⁻⁹ = 0.001953125; the 24 bits are scaled by
        # 2⁻²⁴ = 5.96e-08. Multiplying by powers of two is exact.
        subnormal = tl.floor(magnitude * 512.0 + (bits >> 8).to(tl.float32) * 5.9604644775390625e-08) * 0.001953125
        rounded = tl.where(magnitude < 0.015625, subnormal, normal)
        rounded = tl.minimum(rounded, fp8_limit, propagate_nan=tl.PropagateNan.ALL)
        sign = scaled.to(tl.int32, bitcast=True) & -0x80000000  # copysign, -0.0 included
        return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _dequantize(values, scale):
        """``numerics.dequantize``: ``values · scale`` rounded to float32 on its own (never fused into an FMA)."""
        return libdevice.mul_rn(values, tl.broadcast_to(scale[:, None], values.shape))

    @triton.jit
    def _scales(scale_ptr, idx, mask, ROW_SCALE: tl.constexpr):
        """Dequantization scales of rows ``idx`` of the melded ``[W; A]``: their row scales, or the tensor scale."""
        return tl.load(scale_ptr + (idx if ROW_SCALE else idx * 0), mask=mask, other=1.0)

    @triton.jit
    def _merge_tile(
        rows_ptr, b_ptr, w_ptr, scale_ptr, n_rows, out_features, in_features, rank, b_stride,
        ROW_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """This program's tile of merged rows × columns: ``(m_offs, m_mask, rows, k_offs, mask, delta)``.

        ``m_offs`` index the merged rows (and the scratch buffers), ``rows`` are their global indices, and ``delta``
        is the ``(BLOCK_M, BLOCK_K)`` float32 update in real units (zero outside ``mask``).
        """
        m_offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m_offs < n_rows
        rows = tl.load(rows_ptr + m_offs, mask=m_mask, other=0)
        k_offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = k_offs < in_features
        delta = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r_offs = r0 + tl.arange(0, BLOCK_R)
            r_mask = r_offs < rank
            b_mask = m_mask[:, None] & r_mask[None, :]
            b = tl.load(b_ptr + rows[:, None] * b_stride + r_offs[None, :], mask=b_mask, other=0.0)
            a_rows = out_features + r_offs
            a_mask = r_mask[:, None] & k_mask[None, :]
            a = tl.load(w_ptr + a_rows[:, None] * in_features + k_offs[None, :], mask=a_mask, other=0.0)
            # Fold A's dequantization scale into B: (B ⊙ s_A) · A_fp8 = B · deq(A). IEEE float32, not TF32.
            b_scaled = b.to(tl.float32) * _scales(scale_ptr, a_rows, r_mask, ROW_SCALE)[None, :]
            delta = tl.dot(b_scaled, a.to(tl.float32), delta, input_precision="ieee")
        return m_offs, m_mask, rows, k_offs, m_mask[:, None] & k_mask[None, :], delta

    @triton.jit
    def _row_stats_kernel(
        rows_ptr, b_ptr, w_ptr, scale_ptr, amax_ptr, changed_ptr, old_scale_ptr,
        n_rows, out_features, in_features, rank, b_stride,
        ROW_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """Pass 1: per merged row, the amax of its merged values and whether its update is non-zero."""
        m_offs, m_mask, rows, k_offs, mask, delta = _merge_tile(
            rows_ptr, b_ptr, w_ptr, scale_ptr, n_rows, out_features, in_features, rank, b_stride,
            ROW_SCALE, BLOCK_M, BLOCK_R, BLOCK_K,
        )  # fmt: skip
        old_scale = _scales(scale_ptr, rows, m_mask, ROW_SCALE)
        old = tl.load(w_ptr + rows[:, None] * in_features + k_offs[None, :], mask=mask, other=0.0).to(tl.float32)
        new = _dequantize(old, old_scale) + delta
        tl.atomic_max(amax_ptr + m_offs, tl.max(tl.abs(new), axis=1), mask=m_mask)
        tl.atomic_max(changed_ptr + m_offs, tl.max((delta != 0).to(tl.float32), axis=1), mask=m_mask)
        if tl.program_id(1) == 0:
            tl.store(old_scale_ptr + m_offs, old_scale, mask=m_mask)

    @triton.jit(do_not_specialize=["salt_key"])
    def _requantize_kernel(
        rows_ptr, b_ptr, w_ptr, wt_ptr, scale_ptr, amax_ptr, changed_ptr, old_scale_ptr, stats_ptr, count_ptr,
        n_rows, out_features, in_features, rank, b_stride, wt_stride, fp8_limit, eps, salt_key,
        ROW_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """Pass 2: requantize the tile, write both layouts (and the new row scales), add the merge statistics."""
        m_offs, m_mask, rows, k_offs, mask, delta = _merge_tile(
            rows_ptr, b_ptr, w_ptr, scale_ptr, n_rows, out_features, in_features, rank, b_stride,
            ROW_SCALE, BLOCK_M, BLOCK_R, BLOCK_K,
        )  # fmt: skip
        old_scale = tl.load(old_scale_ptr + m_offs, mask=m_mask, other=1.0)
        amax = tl.load(amax_ptr + m_offs, mask=m_mask, other=0.0)
        changed = tl.load(changed_ptr + m_offs, mask=m_mask, other=0.0) > 0
        new_scale = tl.math.div_rn(tl.maximum(amax, eps), fp8_limit) if ROW_SCALE else old_scale  # amax_to_scale
        w_offs = rows[:, None] * in_features + k_offs[None, :]
        old = _dequantize(tl.load(w_ptr + w_offs, mask=mask, other=0.0).to(tl.float32), old_scale)
        scaled = tl.math.div_rn(old + delta, new_scale[:, None])
        if STOCHASTIC:
            # Hash keys as proxy.merge_bits: row · in + column + count · 0x632BE5AB + salt · 0x9E3779B1, in int64
            # (wrapping is harmless: only the low 32 bits reach the hash).
            keys = w_offs + tl.load(count_ptr).to(tl.int64) * 0x632BE5AB + salt_key
            q_hp = _round_stochastic(scaled, _hash_bits(keys), fp8_limit)
        else:
            q_hp = tl.clamp(scaled, -fp8_limit, fp8_limit)
        q = q_hp.to(w_ptr.dtype.element_ty)  # exact for stochastic rounding, round to nearest otherwise
        # A row whose update is exactly zero keeps its bytes and scale.
        write = mask & changed[:, None]
        tl.store(w_ptr + w_offs, q, mask=write)
        if wt_ptr is not None:
            tl.store(wt_ptr + k_offs[None, :] * wt_stride + rows[:, None], q, mask=write)
        swallowed = write & (delta != 0) & (q.to(tl.float32) * new_scale[:, None] == old)
        tl.atomic_add(stats_ptr + 1, tl.sum(swallowed.to(tl.float32)))
        tl.atomic_add(stats_ptr + 2, tl.sum(tl.abs(delta)))
        if tl.program_id(1) == 0:  # once per row
            if ROW_SCALE:
                tl.store(scale_ptr + rows, new_scale, mask=m_mask & changed)
            else:  # the kept tensor scale may not fit: count rows with a value clamped to the FP8 range
                saturated = m_mask & (tl.math.div_rn(amax, old_scale) > fp8_limit)  # IEEE: see the module docstring
                tl.atomic_add(stats_ptr + 0, tl.sum(saturated.to(tl.float32)))


def merge_rows_fused(
    rows: torch.Tensor,
    lora_B: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_t_fp8: torch.Tensor | None,
    weight_scale: torch.Tensor,
    out_features: int,
    *,
    merge_count: torch.Tensor | None = None,
    salt: int = 0,
) -> torch.Tensor:
    """Merge ``B[rows] · A`` into ``weight_fp8``/``weight_t_fp8``/``weight_scale`` in place.

    Args:
        rows: global indices of the rows to merge (device tensor).
        lora_B: ``(out, r)`` the full ``B``.
        weight_fp8, weight_t_fp8, weight_scale: the layer's melded ``[W; A]`` buffers, updated in place
            (``weight_t_fp8`` is ``None`` for a layer that keeps no transposed copy).
        out_features: rows of ``W`` (``A`` follows them).
        merge_count: the layer's 0-d integer merge counter buffer; given, rounding is stochastic with the bits of
            ``proxy.merge_bits(rows, in, merge_count, salt)``. Read by the kernel on device (no host sync), so a
            CUDA graph replay sees the current count. ``None`` rounds to nearest.
        salt: the layer's stochastic-rounding seed (ignored when rounding to nearest).

    Returns:
        float32 ``(3,)`` device tensor: rows saturated, updates lost to rounding, sum of ``|B · A|``.
    """
    n_rows, rank, in_features = rows.numel(), lora_B.shape[1], weight_fp8.shape[1]
    device, row_scale = weight_fp8.device, weight_scale.numel() > 1
    # One zeroed buffer (one memset): the statistics, then pass 1's per-row amax, changed flag and old scale.
    buffer = torch.zeros(3 + 3 * n_rows, dtype=torch.float32, device=device)
    stats, row_amax, row_changed, row_old_scale = buffer.split([3, n_rows, n_rows, n_rows])
    block_r = min(max(triton.next_power_of_2(rank), 16), 64)  # loop over r in chunks: bounded tiles up to r = 256
    grid = (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(in_features, BLOCK_K))
    tile_args = (n_rows, out_features, in_features, rank, lora_B.stride(0))
    _row_stats_kernel[grid](
        rows, lora_B, weight_fp8, weight_scale, row_amax, row_changed, row_old_scale, *tile_args,
        row_scale, BLOCK_M, block_r, BLOCK_K,
    )  # fmt: skip
    # salt · 0x9E3779B1 matters mod 2³² only: pass it as the int32 with those low bits, so every salt shares one
    # argument type (the kernel adds it in int64; sign extension leaves the low 32 bits alone).
    salt_key = ((salt * 0x9E3779B1 + 2**31) & 0xFFFFFFFF) - 2**31
    wt_stride = 0 if weight_t_fp8 is None else weight_t_fp8.stride(0)
    _requantize_kernel[grid](
        rows, lora_B, weight_fp8, weight_t_fp8, weight_scale, row_amax, row_changed, row_old_scale, stats,
        merge_count, *tile_args, wt_stride, fp8_max(E4M3), AMAX_EPS, salt_key,
        row_scale, merge_count is not None, BLOCK_M, block_r, BLOCK_K,
    )  # fmt: skip
    return stats
