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
from falqon_lit.layer_base import MERGE_COUNTERS, FalqonLayer
from falqon_lit.proxy import row_scores, top_rows
from falqon_lit.sharded_functional import ShardedMeldedFunction, all_gather_rows, gather_melded

_LOCAL_COUNTERS = ("merge_rows", "merge_saturated", "merge_lost", "merge_magnitude")
"""Merge statistics of this rank's rows; saved as a ``(world,)`` vector, summed by :func:`gather_falqon_model`."""


# ------------------------------------------------------------------------------------------------------ layer
class ShardedFalqonLinear(FalqonLayer):
    """A FALQON layer whose FP8 ``W``, row scales and ``B`` are split by output rows over a 1-D device mesh.

    The views of ``FalqonLayer`` (``dequantized_weight``, ``to_dense``, ``weight_scale_rows``) return this rank's
    rows only.

    Args:
        layer: the full layer to split (every rank passes an identical copy).
        mesh: 1-D mesh of the data-parallel ranks.

    Raises:
        ValueError: a 2-D mesh, or ``out_features`` not divisible by the mesh size.
    """

    rows_are_local = False  # the top-k runs over every rank's rows (a collective)
    _dtype_fixed_buffers = ("weight_fp8", "weight_scale", "lora_A_fp8", "lora_A_scale", "merge_magnitude")

    def __init__(self, layer: FalqonLinear, mesh: DeviceMesh) -> None:
        super().__init__(layer.in_features, layer.out_features, layer.config, layer.salt)
        if mesh.ndim != 1:
            raise ValueError(f"ShardedFalqonLinear needs a 1-D device mesh, got {mesh.ndim} dimensions")
        world, shard = mesh.size(), mesh.get_local_rank()
        if layer.out_features % world:
            raise ValueError(
                f"ShardedFalqonLinear splits rows evenly: out_features={layer.out_features} is not divisible by "
                f"{world} ranks; use a device count that divides it or add the layer to 'ignore'"
            )
        self.mesh, self.group = mesh, mesh.get_group()
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
        for name in MERGE_COUNTERS:
            # Counters of the full layer's past belong to rank 0, so that gathering sums them back exactly.
            value = getattr(layer, name).clone() if shard == 0 or name == "merge_calls" else getattr(layer, name) * 0
            self.register_buffer(name, value.to(device))
        self.recheck_b_zero()  # B came from the full layer, as after a load

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
            MeldedArgs(self.config.act_scaling, backend, residual=not self.b_is_zero()),
        )
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def recheck_b_zero(self) -> None:
        """Assume a residual (exact either way) rather than read ``B``, which would need a collective for the ranks
        to agree; the next zero-policy merge restores the fast path."""
        self.mark_b_written()

    def _b_token(self) -> tuple[int, int]:
        # The DTensor wrapper's version counter bumps on optimizer steps and in-place writes, in lockstep on all
        # ranks, so every rank picks the same forward path (their collectives must match).
        return (self.local_lora_B().data_ptr(), self.lora_B._version)

    # ------------------------------------------------------------------------------------- local dense views
    def local_lora_B(self) -> torch.Tensor:
        """This rank's rows of ``B`` ``(out / world, r)``."""
        with torch.no_grad():
            return self.lora_B.to_local()

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

    def replicated_tensors(self) -> dict[str, torch.Tensor]:
        """The replicated tensors only: ``A``, its scales, the merge call count and a tensor scale of ``W``."""
        tensors = {"lora_A_fp8": self.lora_A_fp8, "lora_A_scale": self.lora_A_scale, "merge_calls": self.merge_calls}
        if self.weight_scale.numel() == 1:
            tensors["weight_scale"] = self.weight_scale
        return tensors

    # ------------------------------------------------------------------------------------- proxy update
    @torch.no_grad()
    def proxy_update(self, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Merge the global top-``k`` rows of ``B`` (L1 norm, Alg. 2); each rank merges the ones it owns.

        Args:
            k: rows to merge.
            rows: must be ``None``: the rows are chosen over every rank's ``B`` (``rows_are_local`` is false).

        Returns:
            This rank's merged rows, as local indices.
        """
        if k <= 0:
            raise ValueError(f"proxy_update needs k > 0, got {k}")
        if rows is not None:
            raise ValueError("ShardedFalqonLinear chooses its rows over all ranks; call proxy_update(k) without rows")
        scores = all_gather_rows(row_scores(self.local_lora_B()), self.group)  # (out,), every rank the same
        rows = top_rows(scores, k)
        mine = rows[(rows >= self.row_start) & (rows < self.row_start + self.out_local)] - self.row_start
        self.merge_calls += 1
        self._merge(mine, self.config.merge_rounding)
        if self.config.b_policy == BPolicy.ZERO:
            self.lora_B.zero_()
            self.mark_b_zero()
        else:
            self.local_lora_B().index_fill_(0, mine, 0.0)
            self.mark_b_written()  # a write through the local tensor: the wrapper's version did not move
        return mine

    @torch.no_grad()
    def flush(self, rounding: Rounding = Rounding.NEAREST) -> int:
        """Merge every non-zero row of ``B`` on every rank and zero ``B`` (a collective: call on all ranks).

        Args:
            rounding: of the merged rows, drawing the same stochastic bits as ``FalqonLinear.flush``.

        Returns:
            Rows merged over all ranks.
        """
        mine = (self.local_lora_B() != 0).any(dim=1).nonzero().squeeze(1)
        count = torch.tensor([mine.numel()], device=self.weight_fp8.device)
        dist.all_reduce(count, group=self.group)
        merged = int(count.item())
        # As FalqonLinear.flush: a call only if some rank merges a row, counted before the merge draws its bits.
        self.merge_calls += int(merged > 0)
        self._merge(mine, rounding)
        self.lora_B.zero_()
        self.mark_b_zero()
        return merged

    def _merge(self, rows: torch.Tensor, rounding: Rounding) -> None:
        # Local rows only; merge_calls is counted by the caller (it must match across ranks, rows may not).
        self.merge_rows += rows.numel()
        if rows.numel():
            self._merge_eager(rows, rounding, self.row_start)

    # ------------------------------------------------------------------------------------------ module plumbing
    def _sharded_names(self) -> tuple[str, ...]:
        return ("weight_fp8", *(("weight_scale",) if self.weight_scale.numel() > 1 else ()), *_LOCAL_COUNTERS)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
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
                value = DTensor.from_local(value.to(self.local_lora_B().device), self.mesh, [Shard(0)], run_check=False)
            elif name in _LOCAL_COUNTERS:
                value = value.reshape(())
            state_dict[key] = value
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

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
        full.refresh_transpose()
        full.recheck_b_zero()
        full.train(layer.training)
        model.set_submodule(name, full)
        names.append(name)
    return names
