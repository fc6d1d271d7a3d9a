"""GEMMs with 128 × 128 block-scaled weights and 1 × 128 group-scaled activations (the DeepSeek-V3 recipe).

On CUDA, ``torch._scaled_mm`` infers block-wise scaling from the scale shapes (cuBLAS ≥ 12.9, sm90). torch 2.11
pairs 1 × 128 scales on the left operand ``(M, K / 128)`` only with 1 × 128 scales on the right ``(K / 128, N)``,
both outer-dim-major (its error message lists the combinations; a 1 × 128 by 128 × 128 pair is refused, seen on the
H200), so a weight's 128 × 128 block scale is passed repeated over its 128 columns: the same values. That kernel
needs the weight's blocks on a plain 128-row grid: a melded ``[W; A]`` has one only when ``out % 128 == 0`` (``A``
starts a block row of its own), and the activation must have group scales. Otherwise, or when the kernel refuses a
shape, the GEMM falls back to a float32 GEMM of the dequantized operands: exact, slower than an FP8 GEMM, and
announced once per shape with a warning.
"""

from __future__ import annotations

import warnings

import torch

from falqon_lit.config import SCALE_BLOCK, Backend
from falqon_lit.fp8.numerics import compact_block_scale, dequantize, is_block_scale
from falqon_lit.fp8.quantizer import Float8Tensor

_REFUSED: set[tuple[int, int, int]] = set()
"""(M, N, K) shapes the block-wise kernel refused: they take the fallback without trying again."""


def _blockwise(a: Float8Tensor, b_col: torch.Tensor, scale_b_kn: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``torch._scaled_mm`` with 1 × 128 group scales on ``a`` ``(M, K)`` and on ``b_col`` ``(K, N)`` (column-major):
    ``scale_b_kn`` ``(K / 128, N)`` holds one scale per 128-long K group of each of ``b``'s columns (a 128 × 128
    block scale repeated over its 128 columns: the same values, which torch 2.11's cuBLAS path takes, as it pairs
    1 × 128 only with 1 × 128). Returns ``None`` when the kernel refuses the shape."""
    key = (a.data.shape[0], b_col.shape[1], a.data.shape[1])
    if key in _REFUSED:
        return None
    scale_a = a.scale.float().t().contiguous().t()  # (M, K/128), outer-dim-major: stride (1, M)
    scale_b = scale_b_kn.float().contiguous()  # (K/128, N), outer-dim-major: stride (N, 1)
    try:
        return torch._scaled_mm(a.data, b_col, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    except (RuntimeError, NotImplementedError, ValueError) as err:
        _REFUSED.add(key)
        warnings.warn(
            f"torch._scaled_mm refused block-wise scaling for (M, N, K) = {key} ({err}); this shape runs as a "
            f"float32 GEMM of dequantized operands",
            stacklevel=3,
        )
        return None


def _dequantized_mm(a: Float8Tensor, b_hp_t: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Fallback and CPU path: float32 GEMM of exact dequantized values."""
    return (a.dequantize(torch.float32) @ b_hp_t).to(out_dtype)


def block_scaled_mm(a: Float8Tensor, b: Float8Tensor, out_dtype: torch.dtype, block_aligned: bool) -> torch.Tensor:
    """``deq(a) @ deq(b)ᵀ`` on CUDA, ``b`` ``(N, K)`` holding 128 × 128 blocks (row-expanded scale) and ``a``
    ``(M, K)`` 1 × 128 groups; either may instead carry a tensor or row scale (then the fallback runs)."""
    if block_aligned and is_block_scale(a.scale) and is_block_scale(b.scale):
        # b.scale is row-expanded (N, K/128): per output column and K group already.
        out = _blockwise(a, b.data.t(), b.scale.t(), out_dtype)
        if out is not None:
            return out
    return _dequantized_mm(a, b.dequantize(torch.float32).t(), out_dtype)


def grad_input_mm(
    grad: Float8Tensor,
    weight_t: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
    backend: Backend,
    block_aligned: bool,
) -> torch.Tensor:
    """``deq(grad) @ deq(W')`` for ``grad`` ``(M, K)`` and a block-scaled weight ``W'`` ``(K, N)`` given as its
    row-major transpose ``weight_t`` ``(N, K)`` with the row-expanded block scale ``(K, ceil(N / 128))`` of ``W'``.

    Block scales vary along the output columns, so they cannot be folded into the gradient as row scales are;
    the block-wise GEMM applies them per (K-block, N-block) instead.

    Args:
        grad: ``Q([g | g B])``, E4M3 with 1 × 128 group scales (block-wise kernel), or any other scale (fallback).
        weight_t: ``W'ᵀ`` ``(N, K)`` row-major (the stored transpose, or its column slice).
        weight_scale: row-expanded block scale of ``W'`` ``(K, ceil(N / 128))``.
        out_dtype: dtype of ``grad_x``.
        backend: ``emulate`` runs float64; anything else the CUDA kernel or the float32 fallback.
        block_aligned: ``W'``'s blocks lie on the 128-row grid (``out % 128 == 0``).
    """
    if backend == Backend.EMULATE:
        return (grad.dequantize(torch.float64) @ dequantize(weight_t.t(), weight_scale, torch.float64)).to(out_dtype)
    if grad.data.device.type == "cuda" and block_aligned and is_block_scale(grad.scale):
        # With a B residual, K = out + r ends in a partial block (A's rows, and [g | g B]'s last 1 × 128 group, which
        # start together at out): the whole blocks run block-wise, the r-wide tail as a small dequantized GEMM.
        k_full = SCALE_BLOCK * (weight_t.shape[1] // SCALE_BLOCK)
        head = Float8Tensor(grad.data[:, :k_full], grad.scale[:, : k_full // SCALE_BLOCK])
        # _scaled_mm(a (M, K), b (K, N) column-major): weight_t (N, K) row-major is exactly that, transposed.
        # W' (K, N)'s block scales, one per 128 rows of K, repeated over the 128 columns of each block.
        cols = weight_t.shape[0]
        scale_kn = compact_block_scale(weight_scale[:k_full]).repeat_interleave(SCALE_BLOCK, dim=1)[:, :cols]
        out = _blockwise(head, weight_t[:, :k_full].t(), scale_kn, out_dtype)
        if out is not None:
            if k_full == weight_t.shape[1]:
                return out
            tail = Float8Tensor(grad.data[:, k_full:], grad.scale[:, k_full // SCALE_BLOCK :])
            w_tail = dequantize(weight_t[:, k_full:].t(), weight_scale[k_full:], torch.float32)
            return out.add_(_dequantized_mm(tail, w_tail, out_dtype))
    return _dequantized_mm(grad, dequantize(weight_t.t(), weight_scale, torch.float32), out_dtype)
