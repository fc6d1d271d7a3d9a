"""Fused FP8 quantization kernels for CUDA (Triton): amax + scale + saturating cast with no host sync.

Eager PyTorch spends more time quantizing an activation than the FP8 GEMM that consumes it (abs → fp32 copy → amax
→ divide → clamp → cast: six passes over memory). Here a tensor-scaled quantization is two passes (amax with an
atomic max into a device scalar, then a cast that reads the scale on device), a row-scaled one is a single pass
(each program owns whole rows) and so is a 1 × 128 group-scaled one (each program owns 8 groups of a row). An
optional per-column multiplier folds a row weight scale into the gradient (see ``functional.melded_grad_input``)
inside the same passes, and an optional ``tail`` is quantized as extra columns of the same tensor: the melded
backward quantizes ``[g | g·B]`` without ever building the concatenation (a copy of the whole gradient per layer).

The kernels produce the same bytes as ``numerics.quantize_dynamic`` (same fp32 amax, same ``amax / fp8_max``,
round-to-nearest-even division, saturating cast); the GPU tests check that bit for bit.
"""

from __future__ import annotations

import torch

from falqon_lit.config import SCALE_BLOCK, ScaleGranularity
from falqon_lit.fp8.numerics import AMAX_EPS, E4M3, fp8_max, group_count

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager path in numerics.py is used instead
    triton = None


def available(x: torch.Tensor) -> bool:
    """Whether the fused kernels can quantize ``x``."""
    return triton is not None and x.is_cuda and x.dim() == 2 and x.stride(1) == 1


if triton is not None:

    @triton.jit
    def _amax_kernel(x_ptr, col_scale_ptr, amax_ptr, rows, cols, stride, HAS_COL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col_block = tl.program_id(1)
        offs = col_block * BLOCK + tl.arange(0, BLOCK)
        mask = offs < cols
        x = tl.load(x_ptr + row * stride + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_COL:
            x = x * tl.load(col_scale_ptr + offs, mask=mask, other=0.0)
        tl.atomic_max(amax_ptr, tl.max(tl.abs(x), axis=0))

    @triton.jit
    def _cast_kernel(
        x_ptr, col_scale_ptr, amax_ptr, out_ptr, scale_ptr, rows, cols, stride, out_stride, out_col0, fp8_limit, eps,
        HAS_COL: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        col_block = tl.program_id(1)
        offs = col_block * BLOCK + tl.arange(0, BLOCK)
        mask = offs < cols
        scale = tl.maximum(tl.load(amax_ptr), eps) / fp8_limit
        x = tl.load(x_ptr + row * stride + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_COL:
            x = x * tl.load(col_scale_ptr + offs, mask=mask, other=0.0)
        q = tl.clamp(tl.math.div_rn(x, scale), -fp8_limit, fp8_limit)
        tl.store(out_ptr + row * out_stride + out_col0 + offs, q.to(out_ptr.dtype.element_ty), mask=mask)
        if (row == 0) & (col_block == 0):
            tl.store(scale_ptr, scale)

    @triton.jit
    def _load_row(x_ptr, tail_ptr, col_scale_ptr, row, offs, cols, tail_cols, stride, tail_stride, HAS_COL, HAS_TAIL):
        """Columns ``offs`` of row ``row`` of ``[x | tail]`` (times the column scale), float32, 0 past the end."""
        mask = offs < cols
        x = tl.load(x_ptr + row * stride + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_TAIL:
            tail_mask = (offs >= cols) & (offs < cols + tail_cols)
            x += tl.load(tail_ptr + row * tail_stride + (offs - cols), mask=tail_mask, other=0.0).to(tl.float32)
            mask = mask | tail_mask
        if HAS_COL:
            x = x * tl.load(col_scale_ptr + offs, mask=mask, other=0.0)
        return x, mask

    @triton.jit
    def store_row_fp8(y32, q_ptr, scale_ptr, row, offs, mask, cols, fp8_limit, amax_eps):
        """Quantize one whole row held in registers (float32, 0 past ``cols``) with its own scale and store the
        FP8 bytes at ``q_ptr[row, offs]`` and the scale at ``scale_ptr[row]``: the epilogue of the kernels that
        produce a GEMM input (``triton_norm_quantize``, ``triton_swiglu_quantize``)."""
        scale = tl.maximum(tl.max(tl.abs(y32), axis=0), amax_eps) / fp8_limit
        q = tl.clamp(tl.math.div_rn(y32, scale), -fp8_limit, fp8_limit)
        tl.store(q_ptr + row * cols + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _row_quant_kernel(
        x_ptr, tail_ptr, col_scale_ptr, out_ptr, scale_ptr, cols, tail_cols, stride, tail_stride, fp8_limit, eps,
        HAS_COL: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        width = cols + tail_cols
        amax = tl.zeros((), dtype=tl.float32)
        for start in range(0, width, BLOCK):  # pass 1 over the row (stays in L1/L2 for the second)
            offs = start + tl.arange(0, BLOCK)
            x, _ = _load_row(x_ptr, tail_ptr, col_scale_ptr, row, offs, cols, tail_cols, stride, tail_stride,
                             HAS_COL, HAS_TAIL)  # fmt: skip
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
        scale = tl.maximum(amax, eps) / fp8_limit
        for start in range(0, width, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x, mask = _load_row(x_ptr, tail_ptr, col_scale_ptr, row, offs, cols, tail_cols, stride, tail_stride,
                                HAS_COL, HAS_TAIL)  # fmt: skip
            q = tl.clamp(tl.math.div_rn(x, scale), -fp8_limit, fp8_limit)
            tl.store(out_ptr + row * width + offs, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _group_quant_kernel(
        x_ptr, tail_ptr, col_scale_ptr, out_ptr, scale_ptr, cols, tail_cols, stride, tail_stride, groups, fp8_limit,
        eps, HAS_COL: tl.constexpr, HAS_TAIL: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr,
    ):  # fmt: skip
        """``GROUPS`` consecutive 1 × ``GROUP`` groups of one row: amax, scale and cast in one pass."""
        row = tl.program_id(0)
        group_ids = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        offs = group_ids[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # (GROUPS, GROUP) columns
        x, mask = _load_row(x_ptr, tail_ptr, col_scale_ptr, row, offs, cols, tail_cols, stride, tail_stride,
                            HAS_COL, HAS_TAIL)  # fmt: skip
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), eps) / fp8_limit  # (GROUPS,)
        q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -fp8_limit, fp8_limit)
        tl.store(out_ptr + row * (cols + tail_cols) + offs, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row * groups + group_ids, scale, mask=group_ids < groups)


if triton is not None:

    @triton.jit
    def _transpose_kernel(x_ptr, out_ptr, rows, cols, BLOCK: tl.constexpr):
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        tile = tl.load(x_ptr + r[:, None] * cols + c[None, :], mask=(r[:, None] < rows) & (c[None, :] < cols))
        out_mask = (c[:, None] < cols) & (r[None, :] < rows)
        tl.store(out_ptr + c[:, None] * rows + r[None, :], tl.trans(tile), mask=out_mask)  # coalesced along rows


def transpose(x: torch.Tensor) -> torch.Tensor:
    """``x.t().contiguous()`` of a contiguous 2-D CUDA tensor of 1-byte elements, by tiles.

    The backward without a cached transpose (``transpose_cache=False``) needs one per layer; PyTorch's strided copy
    of a 1-byte transpose runs far below memory bandwidth.
    """
    rows, cols = x.shape
    out = torch.empty(cols, rows, dtype=x.dtype, device=x.device)
    block = 64
    _transpose_kernel[(triton.cdiv(rows, block), triton.cdiv(cols, block))](
        x.view(torch.uint8), out.view(torch.uint8), rows, cols, block
    )
    return out


def quantize_fused(
    x_hp: torch.Tensor,
    dtype: torch.dtype = E4M3,
    granularity: ScaleGranularity = ScaleGranularity.TENSOR,
    col_scale: torch.Tensor | None = None,
    tail: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[x_hp | tail] * col_scale`` (``tail`` and ``col_scale`` optional) to FP8 on CUDA.

    Args:
        x_hp: ``(M, N)``, unit column stride.
        col_scale: one float32 per column of the whole ``(M, N + T)`` tensor.
        tail: ``(M, T)`` extra columns, unit column stride.

    Returns:
        ``(x_fp8 (M, N + T), scale)`` exactly as ``numerics.quantize_dynamic`` of ``torch.cat([x_hp, tail], 1).float()
        * col_scale`` would.
    """
    rows, cols = x_hp.shape
    tail_cols = 0 if tail is None else tail.shape[1]
    out = torch.empty(rows, cols + tail_cols, dtype=dtype, device=x_hp.device)
    has_col = col_scale is not None
    col = col_scale.reshape(-1).float().contiguous() if has_col else x_hp  # dummy pointer when unused
    limit = fp8_max(dtype)
    if granularity == ScaleGranularity.ROW:
        scale = torch.empty(rows, 1, dtype=torch.float32, device=x_hp.device)
        block = min(triton.next_power_of_2(cols + tail_cols), 8192)
        tail_arg, tail_stride = (x_hp, 0) if tail is None else (tail, tail.stride(0))
        _row_quant_kernel[(rows,)](
            x_hp, tail_arg, col, out, scale, cols, tail_cols, x_hp.stride(0), tail_stride, limit, AMAX_EPS,
            has_col, tail is not None, block, num_warps=_warps(block),
        )  # fmt: skip
        return out, scale
    if granularity == ScaleGranularity.BLOCK:
        groups = group_count(cols + tail_cols)
        scale = torch.empty(rows, groups, dtype=torch.float32, device=x_hp.device)
        per_program = 8
        tail_arg, tail_stride = (x_hp, 0) if tail is None else (tail, tail.stride(0))
        _group_quant_kernel[(rows, triton.cdiv(groups, per_program))](
            x_hp, tail_arg, col, out, scale, cols, tail_cols, x_hp.stride(0), tail_stride, groups, limit, AMAX_EPS,
            has_col, tail is not None, per_program, SCALE_BLOCK, num_warps=4,
        )  # fmt: skip
        return out, scale
    # One allocation for both scalars; cuBLAS wants the scale 16-byte aligned, so amax sits 4 floats later.
    scale_and_amax = torch.zeros(8, dtype=torch.float32, device=x_hp.device)
    scale, amax = scale_and_amax[:1], scale_and_amax[4:5]
    # The tail is a second segment of the same tensor: both amax passes fold into one scalar before any cast.
    width = cols + tail_cols
    block = min(triton.next_power_of_2(cols), 4096)
    grid, warps = (rows, triton.cdiv(cols, block)), _warps(block)
    _amax_kernel[grid](x_hp, col, amax, rows, cols, x_hp.stride(0), has_col, block, num_warps=warps)
    if tail is not None:
        tail_col = col[cols:] if has_col else tail
        tail_block = min(triton.next_power_of_2(tail_cols), 4096)
        tail_grid, tail_warps = (rows, triton.cdiv(tail_cols, tail_block)), _warps(tail_block)
        _amax_kernel[tail_grid](
            tail, tail_col, amax, rows, tail_cols, tail.stride(0), has_col, tail_block, num_warps=tail_warps
        )
    _cast_kernel[grid](
        x_hp, col, amax, out, scale, rows, cols, x_hp.stride(0), width, 0, limit, AMAX_EPS, has_col, block,
        num_warps=warps,
    )  # fmt: skip
    if tail is not None:
        _cast_kernel[tail_grid](
            tail, tail_col, amax, out, scale, rows, tail_cols, tail.stride(0), width, cols, limit, AMAX_EPS, has_col,
            tail_block, num_warps=tail_warps,
        )  # fmt: skip
    return out, scale


def _warps(block: int) -> int:
    # 8 warps keep enough loads in flight for 4096-wide rows; small rows do not need them.
    return 8 if block >= 2048 else 4
