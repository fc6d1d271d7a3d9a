"""Fused row-wise proxy merge for CUDA (Triton): ``W[row] += B[row] · A`` and requantize, one launch per layer.

The eager merge (``proxy.merge_rows`` plus the scatters in ``FalqonLinear._merge``) is ~45 small kernels per layer;
for the 224 layers of a LLaMA-7B shape that is ~40 ms of GPU time per step even when replayed from a CUDA graph.
Here each program owns one chosen row: pass 1 accumulates ``delta = (B[row] ⊙ s_A) · A_fp8`` chunk by chunk and
the new row's amax; pass 2 recomputes ``delta``, requantizes (fresh row scale, or the kept tensor scale with
clamping), writes the row into both stored layouts and adds the merge statistics atomically.

Rounding is to nearest, or stochastic when a merge counter is given: the kernel then draws the bits of
``proxy.merge_bits`` (``numerics.hash_bits`` of row, column, merge count and layer salt) and rounds as
``numerics.quantize_stochastic``. The count is read from its device buffer, so a CUDA graph replays fresh bits.

Same semantics as ``proxy.merge_rows``; the float32 summation order of ``delta`` differs, so a value that lands on
an FP8 rounding boundary may round to the neighbouring byte (tests bound this to one FP8 step).
"""

from __future__ import annotations

import torch

from falqon_lit.numerics import AMAX_EPS, E4M3, fp8_max

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the eager merge
    triton = None


def available(weight_fp8: torch.Tensor) -> bool:
    """Whether the fused merge can run on these buffers."""
    return triton is not None and weight_fp8.is_cuda


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

    @triton.jit(do_not_specialize=["salt_key"])
    def _merge_kernel(
        rows_ptr, b_ptr, w_ptr, wt_ptr, scale_ptr, stats_ptr, count_ptr,
        out_features, in_features, rank, b_stride, wt_stride, fp8_limit, eps, salt_key,
        ROW_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        row = tl.load(rows_ptr + tl.program_id(0))
        r_offs = tl.arange(0, BLOCK_R)
        r_mask = r_offs < rank
        b = tl.load(b_ptr + row * b_stride + r_offs, mask=r_mask, other=0.0).to(tl.float32)
        if ROW_SCALE:
            a_scale = tl.load(scale_ptr + out_features + r_offs, mask=r_mask, other=0.0)
            old_scale = tl.load(scale_ptr + row)
        else:
            a_scale = tl.load(scale_ptr + r_offs * 0)
            old_scale = tl.load(scale_ptr)
        b_scaled = b * a_scale  # fold A's dequantization scale into B: (B ⊙ s_A) · A_fp8 = B · deq(A)
        a_rows = (out_features + r_offs)[:, None] * in_features

        # Pass 1: amax of the merged row and whether anything changes at all.
        amax = tl.zeros((), dtype=tl.float32)
        changed = tl.zeros((), dtype=tl.int32)
        for k0 in range(0, in_features, BLOCK_K):
            k_offs = k0 + tl.arange(0, BLOCK_K)
            k_mask = k_offs < in_features
            a = tl.load(w_ptr + a_rows + k_offs[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            delta = tl.sum(b_scaled[:, None] * a.to(tl.float32), axis=0)  # (BLOCK_K,)
            old = tl.load(w_ptr + row * in_features + k_offs, mask=k_mask, other=0.0).to(tl.float32) * old_scale
            amax = tl.maximum(amax, tl.max(tl.abs(old + delta), axis=0))
            changed = tl.maximum(changed, tl.max((delta != 0).to(tl.int32), axis=0))

        # A row whose update is exactly zero keeps its bytes and scale.
        if changed > 0:
            if ROW_SCALE:
                new_scale = tl.maximum(amax, eps) / fp8_limit
                tl.store(scale_ptr + row, new_scale)
            else:
                new_scale = old_scale
            if ROW_SCALE:
                saturated = tl.zeros((), dtype=tl.float32)  # a fresh row scale fits the row by construction
            else:
                saturated = (amax / new_scale > fp8_limit).to(tl.float32)
            if STOCHASTIC:
                # Hash key of column 0, int64 (wrapping is harmless: only the low 32 bits reach the hash):
                # row · in + count · 0x632BE5AB + salt · 0x9E3779B1, as proxy.merge_bits.
                key_base = row.to(tl.int64) * in_features + tl.load(count_ptr).to(tl.int64) * 0x632BE5AB + salt_key
            lost = tl.zeros((), dtype=tl.float32)
            magnitude = tl.zeros((), dtype=tl.float32)
            # Pass 2: requantize, write both layouts, count updates that rounding swallowed.
            for k0 in range(0, in_features, BLOCK_K):
                k_offs = k0 + tl.arange(0, BLOCK_K)
                k_mask = k_offs < in_features
                a = tl.load(w_ptr + a_rows + k_offs[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
                delta = tl.sum(b_scaled[:, None] * a.to(tl.float32), axis=0)
                old = tl.load(w_ptr + row * in_features + k_offs, mask=k_mask, other=0.0).to(tl.float32) * old_scale
                scaled = tl.math.div_rn(old + delta, new_scale)
                if STOCHASTIC:
                    q_hp = _round_stochastic(scaled, _hash_bits(key_base + k_offs), fp8_limit)
                else:
                    q_hp = tl.clamp(scaled, -fp8_limit, fp8_limit)
                q = q_hp.to(w_ptr.dtype.element_ty)  # exact for stochastic rounding, round to nearest otherwise
                tl.store(w_ptr + row * in_features + k_offs, q, mask=k_mask)
                tl.store(wt_ptr + k_offs * wt_stride + row, q, mask=k_mask)
                swallowed = (delta != 0) & (q.to(tl.float32) * new_scale == old) & k_mask
                lost += tl.sum(swallowed.to(tl.float32), axis=0)
                magnitude += tl.sum(tl.abs(delta), axis=0)
            tl.atomic_add(stats_ptr + 0, saturated)
            tl.atomic_add(stats_ptr + 1, lost)
            tl.atomic_add(stats_ptr + 2, magnitude)


def merge_rows_fused(
    rows: torch.Tensor,
    lora_B: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_t_fp8: torch.Tensor,
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
        weight_fp8, weight_t_fp8, weight_scale: the layer's melded ``[W; A]`` buffers, updated in place.
        out_features: rows of ``W`` (``A`` follows them).
        merge_count: the layer's 0-d integer merge counter buffer; given, rounding is stochastic with the bits of
            ``proxy.merge_bits(rows, in, merge_count, salt)``. Read by the kernel on device (no host sync), so a
            CUDA graph replay sees the current count. ``None`` rounds to nearest.
        salt: the layer's stochastic-rounding seed (ignored when rounding to nearest).

    Returns:
        float32 ``(3,)`` device tensor: rows saturated, updates lost to rounding, sum of ``|B · A|``.
    """
    rank, in_features = lora_B.shape[1], weight_fp8.shape[1]
    stats = torch.zeros(3, dtype=torch.float32, device=weight_fp8.device)
    block_r = max(triton.next_power_of_2(rank), 16)
    block_k = max(16, min(triton.next_power_of_2(in_features), 8192 // block_r))  # keep the (R, K) tile small
    # salt · 0x9E3779B1 matters mod 2³² only: pass it as the int32 with those low bits, so every salt shares one
    # argument type (the kernel adds it in int64; sign extension leaves the low 32 bits alone).
    salt_key = ((salt * 0x9E3779B1 + 2**31) & 0xFFFFFFFF) - 2**31
    _merge_kernel[(rows.numel(),)](
        rows, lora_B, weight_fp8, weight_t_fp8, weight_scale, stats, merge_count,
        out_features, in_features, rank, lora_B.stride(0), weight_t_fp8.stride(0), fp8_max(E4M3), AMAX_EPS,
        salt_key, weight_scale.numel() > 1, merge_count is not None, block_r, block_k,
    )  # fmt: skip
    return stats
