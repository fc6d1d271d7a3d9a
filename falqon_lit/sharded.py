"""Row-sharded FALQON layers: data-parallel training whose FP8 weights need not fit on one device (ZeRO-3 style).

Each of the ``world`` data-parallel ranks stores rows ``[start, start + out / world)`` of the FP8 ``W``, of its row
scales and of ``B``; ``A`` (``r`` rows) is small and replicated. Per step and layer (paper §3.2, Alg. 1, sharded):

- forward: all-gather the FP8 rows of ``W`` (bytes, ``out × in``), append ``A``, run the usual melded FP8 GEMM on
  this rank's tokens, free the gathered weight;
- backward: ``grad_B = gᵀ · O_A`` on this rank's tokens, reduce-scattered (mean over ranks, as DDP averages) to the
  local rows of ``B``; ``grad_x`` re-gathers ``W`` (as FSDP does) instead of keeping it alive from the forward;
- proxy update (§3.3, Alg. 2): each rank scores its rows of ``B``, the ``out`` scores are all-gathered (small), every
  rank takes the same global top-``k`` and merges only the selected rows it owns.

The result equals unsharded data parallelism (DDP) step for step: the forward and the top-``k`` see the same
numbers. State lives in plain local tensors; ``state_dict`` wraps the sharded ones as ``DTensor`` (``Shard(0)``), so
``torch.distributed.checkpoint`` (Lightning's ``ModelParallelStrategy``) saves and reloads them sharded, and
:func:`gather_falqon_model` turns the model back into plain ``FalqonLinear`` layers for export.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from falqon_lit.config import BPolicy, Rounding
from falqon_lit.fp8.gemm import resolve_backend
from falqon_lit.fp8.numerics import dequantize
from falqon_lit.functional import MeldedArgs
from falqon_lit.layer import FalqonLinear, falqon_layers
from falqon_lit.proxy import merge_bits, merge_rows, row_scores, top_rows
from falqon_lit.sharded_functional import ShardedMeldedFunction, all_gather_rows, gather_melded

_LOCAL_COUNTERS = ("merge_rows", "merge_saturated", "merge_lost", "merge_magnitude")
"""Merge statistics of this rank's rows; saved as a ``(world,)`` vector, summed by :func:`gather_falqon_model`."""
_FIXED_DTYPE = ("weight_fp8", "weight_scale", "lora_A_fp8", "lora_A_scale", "merge_magnitude")


# ------------------------------------------------------------------------------------------------------ layer
class ShardedFalqonLinear(FalqonLinear):
    """A ``FalqonLinear`` whose FP8 ``W``, row scales and ``B`` are split by output rows over a 1-D device mesh.

    It subclasses ``FalqonLinear`` so that ``falqon_layers`` and the proxy-update callback find it; the dense views
    (``dequantized_weight``, ``to_dense``, ``weight_scale_rows``) return this rank's rows only.

    Args:
        layer: the full layer to split (every rank passes an identical copy).
        mesh: 1-D mesh of the data-parallel ranks.

    Raises:
        ValueError: a 2-D mesh, or ``out_features`` not divisible by the mesh size.
    """

    rows_are_local = False  # the top-k runs over every rank's rows (a collective)

    def __init__(self, layer: FalqonLinear, mesh: DeviceMesh) -> None:
        nn.Module.__init__(self)  # not FalqonLinear.__init__: the full-size buffers are never allocated
        if mesh.ndim != 1:
            raise ValueError(f"ShardedFalqonLinear needs a 1-D device mesh, got {mesh.ndim} dimensions")
        world, shard = mesh.size(), mesh.get_local_rank()
        if layer.out_features % world:
            raise ValueError(
                f"ShardedFalqonLinear splits rows evenly: out_features={layer.out_features} is not divisible by "
                f"{world} ranks; use a device count that divides it or add the layer to 'ignore'"
            )
        self.in_features, self.out_features, self.rank, self.config = (
            layer.in_features,
            layer.out_features,
            layer.rank,
            layer.config,
        )
        self.mesh, self.group, self.salt = mesh, mesh.get_group(), layer.salt
        self.out_local = layer.out_features // world
        self.row_start = shard * self.out_local
        # Shards go to the mesh's device right away (as FSDP2 does): only they ever reach the accelerator.
        device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else None
        device = device or torch.device(mesh.device_type)
        rows = slice(self.row_start, self.row_start + self.out_local)
        row_scaled = layer.weight_scale.numel() > 1
        out = layer.out_features
        # Local copies (.clone): the full layer is dropped after sharding and must not stay alive through views.
        self.register_buffer("weight_fp8", layer.weight_fp8[rows].clone().to(device))
        w_scale = layer.weight_scale[rows] if row_scaled else layer.weight_scale
        self.register_buffer("weight_scale", w_scale.clone().to(device))
        self.register_buffer("lora_A_fp8", layer.weight_fp8[out:].clone().to(device))
        a_scale = layer.weight_scale[out:] if row_scaled else layer.weight_scale
        self.register_buffer("lora_A_scale", a_scale.clone().to(device))
        local_B = layer.lora_B.detach()[rows].clone().to(device)
        self.lora_B = nn.Parameter(DTensor.from_local(local_B, mesh, [Shard(0)], run_check=False))
        self.bias = None
        if layer.bias is not None:
            self.bias = nn.Parameter(layer.bias.detach().clone().to(device), requires_grad=False)
        for name in ("merge_rows", "merge_saturated", "merge_lost", "merge_calls", "merge_magnitude"):
            # Counters of the full layer's past belong to rank 0, so that gathering sums them back exactly.
            value = getattr(layer, name).clone() if shard == 0 or name == "merge_calls" else getattr(layer, name) * 0
            self.register_buffer(name, value.to(device))
        self._b_zero_token: tuple[int, int] | None = None
        self._recheck_b_zero()

    # ------------------------------------------------------------------------------------------ forward
    @torch.compiler.disable  # see FalqonLinear.forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (W + B A)ᵀ + bias`` for this rank's tokens, all ``out_features`` columns."""
        backend = resolve_backend(self.config.backend, x.device)
        y = ShardedMeldedFunction.apply(
            x,
            self.lora_B.to_local(),  # autograd: the local gradient comes back as a Shard(0) DTensor gradient
            self.weight_fp8,
            self.weight_scale,
            self.lora_A_fp8,
            self.lora_A_scale,
            self.group,
            MeldedArgs(self.config.act_scaling, backend, residual=not self._b_is_zero()),
        )
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _b_local(self) -> torch.Tensor:
        with torch.no_grad():
            return self.lora_B.to_local()

    def _mark_b_zero(self) -> None:
        # The DTensor wrapper's version counter bumps on optimizer steps and in-place writes, in lockstep on all
        # ranks, so every rank picks the same forward path (their collectives must match).
        self._b_zero_token = (self._b_local().data_ptr(), self.lora_B._version)

    def _recheck_b_zero(self) -> None:
        # After a move or a load: assume a residual (exact either way) rather than read B, which would need a
        # collective for the ranks to agree. The next zero-policy merge restores the fast path.
        self._b_zero_token = None

    def _b_is_zero(self) -> bool:
        return self._b_zero_token == (self._b_local().data_ptr(), self.lora_B._version)

    def _refresh_transpose(self) -> None:
        pass  # no stored transpose: backward transposes the gathered weight

    # ------------------------------------------------------------------------------------- local dense views
    @property
    def weight_scale_rows(self) -> torch.Tensor:
        """Scales of this rank's ``W`` rows: ``(1,)`` or ``(out / world, 1)``."""
        return self.weight_scale

    def lora_A_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A``'s FP8 rows ``(r, in)`` and their scales (replicated)."""
        return self.lora_A_fp8, self.lora_A_scale

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``deq(W)`` of this rank's rows ``(out / world, in)``."""
        return dequantize(self.weight_fp8, self.weight_scale, dtype)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``deq(W) + B A`` of this rank's rows ``(out / world, in)``."""
        return self.dequantized_weight(dtype) + self._b_local().to(dtype) @ self.lora_A(dtype)

    def replicated_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors every rank must hold byte-identical (checked by ``ReplicaConsistencyCheck``)."""
        tensors = {"lora_A_fp8": self.lora_A_fp8, "lora_A_scale": self.lora_A_scale, "merge_calls": self.merge_calls}
        if self.weight_scale.numel() == 1:
            tensors["weight_scale"] = self.weight_scale
        return tensors

    # ------------------------------------------------------------------------------------- proxy update
    @torch.no_grad()
    def proxy_update(self, k: int) -> torch.Tensor:
        """Merge the global top-``k`` rows of ``B`` (L1 norm, Alg. 2); each rank merges the ones it owns.

        Returns:
            This rank's merged rows, as local indices.
        """
        if k <= 0:
            raise ValueError(f"proxy_update needs k > 0, got {k}")
        scores = all_gather_rows(row_scores(self._b_local()), self.group)  # (out,), every rank the same
        rows = top_rows(scores, k)
        mine = rows[(rows >= self.row_start) & (rows < self.row_start + self.out_local)] - self.row_start
        self.merge_calls += 1
        self._merge(mine, self.config.merge_rounding)
        if self.config.b_policy == BPolicy.ZERO:
            self.lora_B.zero_()
            self._mark_b_zero()
        else:
            self._b_local().index_fill_(0, mine, 0.0)
            self._b_zero_token = None
        return mine

    @torch.no_grad()
    def flush(self) -> int:
        """Merge every non-zero row of ``B`` on every rank and zero ``B`` (a collective: call on all ranks).

        Returns:
            Rows merged over all ranks.
        """
        mine = (self._b_local() != 0).any(dim=1).nonzero().squeeze(1)
        self._merge(mine, Rounding.NEAREST)
        self.lora_B.zero_()
        self._mark_b_zero()
        count = torch.tensor([mine.numel()], device=self.weight_fp8.device)
        dist.all_reduce(count, group=self.group)
        merged = int(count.item())
        self.merge_calls += int(merged > 0)  # as FalqonLinear.flush: a call only if some rank merged a row
        return merged

    def _merge(self, rows: torch.Tensor, rounding: Rounding) -> None:
        # Local rows only; merge_calls is counted by the caller (it must match across ranks, rows may not).
        self.merge_rows += rows.numel()
        if rows.numel() == 0:
            return
        row_scaled = self.weight_scale.numel() > 1
        result = merge_rows(
            self.weight_fp8.index_select(0, rows),
            self.weight_scale.index_select(0, rows) if row_scaled else self.weight_scale,
            self._b_local().index_select(0, rows),
            self.lora_A(),
            self.config.weight_scaling,
            # Global row indices: the same bits as the unsharded layer draws for these rows.
            merge_bits(rows + self.row_start, self.in_features, self.merge_calls, self.salt)
            if rounding == Rounding.STOCHASTIC
            else None,
        )
        self.weight_fp8.view(torch.uint8).index_copy_(0, rows, result.rows_fp8.view(torch.uint8))
        if row_scaled:
            self.weight_scale.index_copy_(0, rows, result.rows_scale)
        self.merge_saturated += result.saturated
        self.merge_lost += result.lost
        self.merge_magnitude += result.magnitude

    # ------------------------------------------------------------------------------------------ module plumbing
    def _sharded_names(self) -> tuple[str, ...]:
        return ("weight_fp8", *(("weight_scale",) if self.weight_scale.numel() > 1 else ()), *_LOCAL_COUNTERS)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        for name in self._sharded_names():
            local = getattr(self, name)
            local = local.reshape(1) if local.dim() == 0 else local  # a per-rank scalar is a (world,) vector
            destination[prefix + name] = DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        rows = slice(self.row_start, self.row_start + self.out_local)
        for name in (*self._sharded_names(), "lora_B"):
            key = prefix + name
            if key not in state_dict:
                continue
            value = state_dict[key]
            if isinstance(value, DTensor):
                value = value.to_local()
            elif name in _LOCAL_COUNTERS:  # a full (unsharded) checkpoint: its counters are rank 0's share
                value = value if self.row_start == 0 else value * 0
            else:
                value = value[rows]  # a full (unsharded) tensor: take this rank's rows
            if name == "lora_B":
                value = DTensor.from_local(value.to(self._b_local().device), self.mesh, [Shard(0)], run_check=False)
            elif name in _LOCAL_COUNTERS:
                value = value.reshape(())
            state_dict[key] = value
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        self._recheck_b_zero()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ShardedFalqonLinear:
        # As FalqonLinear._apply: FP8 bytes and float32 scales only move, never cast.
        fixed = {name: self._buffers.pop(name) for name in _FIXED_DTYPE}
        nn.Module._apply(self, fn, recurse)
        device = fn(torch.empty(0, dtype=torch.uint8, device=fixed["weight_fp8"].device)).device
        for name, tensor in fixed.items():
            self._buffers[name] = tensor.to(device)
        self._recheck_b_zero()
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rows=[{self.row_start}, {self.row_start + self.out_local}), {self.config.short_repr()}"
        )


# ------------------------------------------------------------------------------------------------ model level
def data_parallel_mesh(device_mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D data-parallel mesh of Lightning's ``ModelParallelStrategy`` (tensor parallelism must be off).

    Raises:
        ValueError: a tensor-parallel dimension larger than 1.
    """
    names = device_mesh.mesh_dim_names or ()
    if "data_parallel" not in names:
        if device_mesh.ndim == 1:
            return device_mesh
        raise ValueError(f"FALQON sharding needs a 'data_parallel' mesh dimension, got {names}")
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "FALQON shards the FP8 weights over data-parallel ranks only; set "
            "ModelParallelStrategy(data_parallel_size=<devices * nodes>, tensor_parallel_size=1), got "
            f"tensor_parallel_size={device_mesh['tensor_parallel'].size()}"
        )
    return device_mesh["data_parallel"]


def shard_falqon_model(model: nn.Module, mesh: DeviceMesh) -> list[str]:
    """Replace every ``FalqonLinear`` of ``model`` by a ``ShardedFalqonLinear`` over ``mesh`` (all ranks call it).

    Every rank must hold the same converted model (same weights and ``A``), as ``FalqonLitModule`` builds it.

    Returns:
        The names of the sharded layers.
    """
    names = []
    for name, layer in falqon_layers(model).items():
        if isinstance(layer, ShardedFalqonLinear):
            continue
        try:
            model.set_submodule(name, ShardedFalqonLinear(layer, mesh))
        except ValueError as err:
            raise ValueError(f"{err} (layer {name!r})") from None
        names.append(name)
    return names


@torch.no_grad()
def gather_falqon_model(model: nn.Module) -> list[str]:
    """Replace every ``ShardedFalqonLinear`` by the equivalent full ``FalqonLinear`` (all ranks call it).

    The result is byte-identical to an unsharded layer with the same history (merge counters summed over ranks), so
    the export package (``save_falqon_model``, ``falqon-export``) takes it as it is.

    Returns:
        The names of the gathered layers.
    """
    names = []
    for name, layer in falqon_layers(model).items():
        if not isinstance(layer, ShardedFalqonLinear):
            continue
        device, group = layer.weight_fp8.device, layer.group
        lora_B = layer.lora_B.full_tensor().detach()
        full = FalqonLinear(
            layer.in_features, layer.out_features, layer.config, layer.bias is not None, device, lora_B.dtype
        )
        melded, scale = gather_melded(layer.weight_fp8, layer.weight_scale, layer.lora_A_fp8, layer.lora_A_scale, group)
        full.weight_fp8.copy_(melded)
        full.weight_scale.copy_(scale.reshape(full.weight_scale.shape))
        full.lora_B.copy_(lora_B)
        if layer.bias is not None:
            full.bias.copy_(layer.bias)
        for counter in _LOCAL_COUNTERS:
            total = getattr(layer, counter).clone()
            dist.all_reduce(total, group=group)
            getattr(full, counter).copy_(total)
        full.merge_calls.copy_(layer.merge_calls)
        full._refresh_transpose()
        full._recheck_b_zero()
        full.train(layer.training)
        model.set_submodule(name, full)
        names.append(name)
    return names
