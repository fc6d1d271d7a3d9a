"""Scaled FP8 GEMM dispatch: ``out = deq(a) @ deq(b)ᵀ`` on the chosen backend.

``b`` is given row-major as ``(N, K)`` (its transpose is the column-major right operand FP8 tensor cores want),
so weights are passed as stored and the backward passes the stored transposed copy. Block-scaled operands go
through :mod:`falqon_lit.fp8.block_gemm`.
"""

from __future__ import annotations

import torch

from falqon_lit.config import Backend
from falqon_lit.fp8 import block_gemm, te_backend
from falqon_lit.fp8.numerics import is_block_scale
from falqon_lit.fp8.quantizer import Float8Tensor


def resolve_backend(backend: Backend, device: torch.device) -> Backend:
    """Turn ``auto`` into a concrete backend for tensors on ``device``; check that ``te`` can run there.

    ``auto`` is ``torch``: it runs on CPU and on FP8 GPUs alike, and on the H100 it was the faster backend
    (benchmarks/RESULTS.md, "Backends").

    Raises:
        RuntimeError: ``te`` off CUDA. ImportError: ``te`` without Transformer Engine installed.
    """
    if backend == Backend.AUTO:
        return Backend.TORCH
    if backend == Backend.TE:
        te_backend.require(device)
    return backend


def _row_scale(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A ``(rows, 1)`` float32 scale, expanding a tensor scale if needed."""
    return scale.float().reshape(-1, 1).expand(rows, 1).contiguous()


def fp8_gemm(
    a: Float8Tensor, b: Float8Tensor, out_dtype: torch.dtype, backend: Backend, block_aligned: bool = False
) -> torch.Tensor:
    """``deq(a) @ deq(b)ᵀ`` for ``a`` of shape ``(M, K)`` and ``b`` of shape ``(N, K)``.

    Args:
        a: left operand, scale ``(1,)``, ``(M, 1)`` or 1 × 128 groups ``(M, ceil(K / 128))``.
        b: right operand as rows, scale ``(1,)``, ``(N, 1)`` or 128 × 128 blocks (row-expanded,
            ``(N, ceil(K / 128))``); ``b.data.stride(1)`` must be 1.
        out_dtype: dtype of the result.
        backend: ``torch`` (``torch._scaled_mm`` on CUDA, a float32 GEMM of the dequantized operands on CPU),
            ``te`` (Transformer Engine's cuBLASLt GEMM; tensor scales) or ``emulate`` (float64, the oracle).
        block_aligned: ``b``'s blocks start at every 128th row (a melded ``[W; A]`` with ``out % 128 == 0``), so
            its block scales are a plain 128 × 128 grid that a block-wise CUDA GEMM can read.

    Returns:
        ``(M, N)`` tensor in ``out_dtype``.
    """
    if backend == Backend.EMULATE:
        return (a.dequantize(torch.float64) @ b.dequantize(torch.float64).t()).to(out_dtype)
    if backend == Backend.TE:
        return te_backend.gemm(a.data, a.scale, b.data, b.scale, out_dtype)
    if a.data.device.type == "cpu":
        # CPU: a float32 GEMM of the dequantized operands (exact FP8 values times their scales), which is the
        # arithmetic compressed-tensors runs in transformers on CPU: the trainer's CPU forward is then bit for bit
        # the exported model's forward there, not merely close (FP8 activation rounding amplifies any difference).
        return torch.nn.functional.linear(a.dequantize(torch.float32), b.dequantize(torch.float32)).to(out_dtype)
    if is_block_scale(a.scale) or is_block_scale(b.scale):
        return block_gemm.block_scaled_mm(a, b, out_dtype, block_aligned)
    if a.scale.numel() == 1 and b.scale.numel() == 1:
        scale_a, scale_b = a.scale.reshape(()).float(), b.scale.reshape(()).float()
        return torch._scaled_mm(a.data, b.data.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    # Row-wise scaling needs both operands row-wise: (M, 1) and (1, N).
    m, n = a.data.shape[0], b.data.shape[0]
    scale_a, scale_b = _row_scale(a.scale, m), _row_scale(b.scale, n).reshape(1, n)
    return torch._scaled_mm(a.data, b.data.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
