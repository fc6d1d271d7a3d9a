"""``FalqonLayer``: what every FALQON layer offers the rest of the package, whether it stores all of its rows
(``layer.FalqonLinear``) or this data-parallel rank's rows only (``sharded.ShardedFalqonLinear``).

An abstract base class rather than a ``typing.Protocol``: ``falqon_layers`` walks every module of a model and keeps
the FALQON ones with one nominal ``isinstance`` each (a runtime-checkable protocol would inspect every member of every
module), and the code both kinds share lives here once: the B-is-zero token, the eager row merge, the
dtype-preserving ``_apply``, the load hook and ``to_dense``.

State every FALQON layer holds (buffers, not Parameters, except ``lora_B`` and the frozen bias):

- ``weight_fp8``, ``weight_scale``: the FP8 rows this layer stores and their scales (the rows of ``W`` first);
- ``lora_B``: the only trainable tensor, ``(out, r)`` (a ``Shard(0)`` ``DTensor`` when the rows are split);
- ``merge_*``: counters of the row-wise proxy update (:data:`MERGE_COUNTERS`).
"""

from __future__ import annotations

import abc
import zlib
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from falqon_lit.config import FalqonConfig, Rounding
from falqon_lit.fp8.numerics import dequantize
from falqon_lit.proxy import MergeResult, merge_bits, merge_rows


def salt_of(name: str) -> int:
    """A layer's salt: the seed of its stochastic merge rounding and of its random initial ``A``, from its module
    name, so that every conversion and every data-parallel rank draws the same bits."""
    return zlib.crc32(name.encode())


MERGE_COUNTERS = ("merge_rows", "merge_saturated", "merge_lost", "merge_calls", "merge_magnitude")
"""The merge counter buffers: rows merged, saturated and lost values, merge calls, magnitude of the merged updates."""


class FalqonLayer(nn.Module, abc.ABC):
    """A linear layer whose backbone ``W`` and adapter ``A`` are FP8 and whose ``B`` trains (paper §3).

    Args:
        in_features: input width.
        out_features: output width (of the whole layer, whatever rows this one stores).
        config: rank, scaling, B policy and backend.
        salt: per-layer seed of stochastic merge rounding and of a random initial ``A`` (a hash of the module
            name).
    """

    rows_are_local: ClassVar[bool]
    """Whether the proxy update's top-k rows come from this layer's own ``B`` alone, so that ``ProxyUpdater`` may
    choose them for many layers in one batched top-k."""

    _dtype_fixed_buffers: ClassVar[tuple[str, ...]]
    """Buffers whose dtype is part of their meaning: ``module.to(torch.bfloat16)`` must move them, never cast them."""

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    lora_B: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, config: FalqonConfig, salt: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank, self.config = in_features, out_features, config.rank, config
        self.salt = salt
        """Per-layer seed (:func:`salt_of` the module name, set when the layer is built from one)."""
        self._b_zero_token: tuple[int, int] | None = None

    # --------------------------------------------------------------------------------------------------- forward
    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (W + B A)ᵀ + bias`` with ``W`` and ``A`` in FP8; exact whether or not ``B`` holds a residual."""

    # ------------------------------------------------------------------------------------------- is B zero?
    def mark_b_zero(self) -> None:
        """Record that ``B`` is zero now: forward skips the residual GEMM until ``B`` is written again."""
        self._b_zero_token = self._b_token()

    def mark_b_written(self) -> None:
        """Record that ``B`` may hold a residual (a write the version counter did not see, such as a graph replay)."""
        self._b_zero_token = None

    def b_is_zero(self) -> bool:
        """Whether ``B`` is known to be zero: marked so and not written since (no read of ``B``, no host sync)."""
        return self._b_zero_token == self._b_token()

    @abc.abstractmethod
    def recheck_b_zero(self) -> None:
        """Decide again whether ``B`` is known to be zero, after a move or a load made the mark stale."""

    @abc.abstractmethod
    def _b_token(self) -> tuple[int, int]:
        """``(storage address, version)`` of ``B``: version counters bump on every in-place write (optimizer steps
        included), so an unchanged token says "B has not been written since it was zeroed" without reading it."""

    # ------------------------------------------------------------------------------------------------ views
    @abc.abstractmethod
    def local_lora_B(self) -> torch.Tensor:
        """The rows of ``B`` this layer stores, as a plain tensor outside autograd that shares ``B``'s storage."""

    @property
    @abc.abstractmethod
    def weight_scale_rows(self) -> torch.Tensor:
        """Scales of the stored ``W`` rows only: ``(1,)`` or ``(rows, 1)`` (the vLLM ``weight_scale`` shape)."""

    @abc.abstractmethod
    def lora_A_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A``'s FP8 rows ``(r, in)`` and their scales, as views that writing into changes the layer."""

    @torch.no_grad()
    def write_lora_A(self, data: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Store new FP8 rows of ``A`` and, unless ``None`` (a tensor scale ``W`` shares), their scales."""
        a_fp8, a_scale = self.lora_A_rows()
        a_fp8.copy_(data)
        if scale is not None:
            a_scale.copy_(scale.reshape(a_scale.shape))

    def lora_A(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized ``A`` ``(r, in)``."""
        return dequantize(*self.lora_A_rows(), dtype)

    @abc.abstractmethod
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``deq(W)`` of the stored rows ``(rows, in)``, the FP8 backbone weight alone."""

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight ``deq(W) + B A`` of the stored rows ``(rows, in)`` that forward applies."""
        return self.dequantized_weight(dtype) + self.local_lora_B().to(dtype) @ self.lora_A(dtype)

    @abc.abstractmethod
    def replicated_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors every data-parallel rank must hold byte-identical (checked by ``ReplicaConsistencyCheck``)."""

    # ------------------------------------------------------------------------------------- row-wise proxy update
    @abc.abstractmethod
    def proxy_update(self, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Merge the ``k`` rows of ``B`` with the largest L1 norm into ``W`` (Alg. 2), then apply the B policy.

        Args:
            k: rows to merge.
            rows: those rows, when the caller selected them already (only where ``rows_are_local``).

        Returns:
            The merged row indices this layer stores (device tensor).
        """

    @abc.abstractmethod
    def flush(self, rounding: Rounding = Rounding.NEAREST) -> int:
        """Merge every non-zero row of ``B`` and zero ``B``, so the FP8 weight alone is the trained model.

        Args:
            rounding: of the merged rows; the final flush rounds to nearest, a flush mid-training (before an A
                refresh) rounds as the proxy update does.

        Returns:
            The number of rows merged (read on the host; call at the end of training, not per step).
        """

    def _merge_eager(self, rows: torch.Tensor, rounding: Rounding, row_start: int = 0) -> MergeResult:
        """Merge the stored ``rows`` of ``B`` into ``W`` and their row scales, and count the merge statistics.

        ``row_start`` is the first stored row's index in the whole layer: stochastic rounding draws the bits of the
        global rows, the same as an unsharded layer draws. ``merge_rows`` and ``merge_calls`` are the caller's.

        Returns:
            The merged rows' bytes and scales, for a caller that keeps another layout of them.
        """
        row_scaled = self.weight_scale.numel() > 1
        result = merge_rows(
            self.weight_fp8.index_select(0, rows),
            self.weight_scale.index_select(0, rows) if row_scaled else self.weight_scale,
            self.local_lora_B().index_select(0, rows),
            self.lora_A(),
            self.config.weight_scaling,
            merge_bits(rows + row_start if row_start else rows, self.in_features, self.merge_calls, self.salt)
            if rounding == Rounding.STOCHASTIC
            else None,
        )
        # Row scatter; untouched rows keep every byte.
        self.weight_fp8.view(torch.uint8).index_copy_(0, rows, result.rows_fp8.view(torch.uint8))
        if row_scaled:
            self.weight_scale.index_copy_(0, rows, result.rows_scale)
        self.merge_saturated += result.saturated
        self.merge_lost += result.lost
        self.merge_magnitude += result.magnitude
        return result

    # ------------------------------------------------------------------------------------------ module plumbing
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FalqonLayer:
        # `fn` may cast floating tensors (`.to(bf16)`, `.half()`): FP8 bytes and float32 scales must only move.
        fixed = {name: self._buffers.pop(name) for name in self._dtype_fixed_buffers}
        super()._apply(fn, recurse)
        probe = fixed["weight_fp8"]
        device = fn(torch.empty(0, dtype=torch.uint8, device=probe.device)).device  # non-float: device change only
        for name, tensor in fixed.items():
            self._buffers[name] = None if tensor is None else tensor.to(device)
        self.recheck_b_zero()  # B may be a new tensor now
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        self.recheck_b_zero()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.config.short_repr()}"
