"""The Transformer Engine backend: TE's fused current-scaling quantizers and its cuBLASLt GEMM (``general_gemm``).

TE is an optional extra (``pip install 'falqon-lit[te]'``): nothing here imports it until ``backend: te`` is used,
and its absence is an error only then. TE's FP8 tensors carry one scale each, so this backend runs tensor scaling
only (``FalqonConfig`` refuses ``te`` with row scales). FP8 bytes cross over as views, never as copies: our
``Float8Tensor`` (bytes, dequantization scale) is TE's ``Float8TensorStorage`` (bytes, ``scale_inv``).

Numerics against the ``torch`` backend: TE multiplies by ``fp8_max / amax`` where we divide by ``amax / fp8_max``,
so a value can land on the neighbouring FP8 code in rare ties; GEMMs accumulate in full precision (split
accumulator), as ``torch._scaled_mm`` does by default. The two backends agree to rounding (tested on the GPU).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from falqon_lit.fp8.numerics import AMAX_EPS, E4M3, E5M2

INSTALL_HINT = "install it with `pip install 'falqon-lit[te]'` (needs CUDA), or use backend 'torch'"


@functools.cache
def _te() -> SimpleNamespace:
    """Import TE once, on first use."""
    try:
        from transformer_engine.pytorch.constants import DType
        from transformer_engine.pytorch.cpp_extensions import general_gemm
        from transformer_engine.pytorch.tensor import Float8CurrentScalingQuantizer, Float8TensorStorage
    except ImportError as err:
        raise ImportError(f"backend 'te' needs Transformer Engine ({err}); {INSTALL_HINT}") from err
    return SimpleNamespace(
        dtypes={E4M3: DType.kFloat8E4M3, E5M2: DType.kFloat8E5M2},
        general_gemm=general_gemm,
        Quantizer=Float8CurrentScalingQuantizer,
        Storage=Float8TensorStorage,
    )


def require(device: torch.device | None = None) -> None:
    """Raise a one-line error unless TE is installed (and ``device``, when given, is a CUDA device)."""
    if device is not None and device.type != "cuda":
        raise RuntimeError(f"backend 'te' runs on CUDA only, got a tensor on {device}; use backend 'auto' or 'torch'")
    _te()


@functools.cache
def _quantizer(dtype: torch.dtype) -> object:
    te = _te()
    quantizer = te.Quantizer(te.dtypes[dtype], torch.device("cuda"), columnwise=False, amax_epsilon=AMAX_EPS)
    quantizer.internal = True  # plain storage objects, no autograd-aware tensor subclass
    return quantizer


def quantize(x_hp: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-scaled FP8 ``(bytes, scale (1,))`` of a 2-D CUDA tensor with TE's fused amax + cast kernels."""
    stored = _quantizer(dtype)(x_hp.contiguous())
    return stored._data.view(dtype), stored._scale_inv.reshape(1)


def _storage(data: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> object:
    te = _te()
    return te.Storage(
        data=data.contiguous().view(torch.uint8),  # TE reads rows densely: a strided view would be misread
        fp8_scale_inv=scale.reshape(1).float(),
        fp8_dtype=te.dtypes[data.dtype],
        fake_dtype=out_dtype,
    )


def gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``deq(a) @ deq(b)ᵀ`` for tensor-scaled FP8 ``a`` ``(M, K)`` and ``b`` ``(N, K)``: TE's "TN" GEMM."""
    out, *_ = _te().general_gemm(
        _storage(b, b_scale, out_dtype),
        _storage(a, a_scale, out_dtype),
        out_dtype=out_dtype,
        layout="TN",
        use_split_accumulator=True,
    )
    return out
