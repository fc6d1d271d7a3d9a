"""Projection groups: q/k/v (and gate/up) of one block run as ONE melded FP8 GEMM with one quantization of ``x``.

Each projection stays a ``FalqonLinear`` (``GroupedFalqonLinear``) with its own name, ``lora_B``, merge counters and
``weight_fp8``/``weight_scale`` buffers, so the proxy update, the callbacks, checkpoints and exports see the same
per-projection layers as before. What changes is storage and dispatch:

- storage: a ``ProjectionGroup`` owns one stacked FP8 weight ``[W_q; A_q; W_k; A_k; W_v; A_v]`` and its scales; each
  projection's buffers are *views* of its rows, so a row merge into one projection writes the group's bytes. Row
  scales are each projection's own rows; a tensor scale is one value shared by the group (and written identically
  for each shard, as vLLM's fused QKV wants). The group is a plain object, not a module: it adds no state_dict keys.
- dispatch: the attention/MLP module calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` one by one. The first
  projection's call runs the group GEMM and keeps the other outputs, keyed on the input tensor object; the others
  take their slice when called with that same tensor (and the same grad mode). Any other call (another input, a
  different order, a second call) runs that projection alone through the single-layer path on its views, which is
  the same forward bit for bit: a miss costs speed, never correctness. This works unchanged under gradient
  checkpointing (the recomputed block calls the projections again with its recomputed input: a fresh group call)
  and under ``torch.compile`` of the blocks (the FALQON layers are opaque to the compiler, so they receive the same
  tensor objects), and needs no patching of the model's attention or MLP code.
- relinking: moving a layer (``.to(device)``) or reassigning its buffers breaks the views; the group notices before
  its next GEMM (a pointer check) and re-stacks from the projections' current buffers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from falqon_lit.config import FalqonConfig, ScaleGranularity
from falqon_lit.fp8.gemm import resolve_backend
from falqon_lit.fp8.numerics import E4M3, quantize_dynamic
from falqon_lit.functional import prequantized_input
from falqon_lit.grouped_functional import FalqonGroupFunction, GroupArgs, GroupLayout
from falqon_lit.layer import FalqonLinear

log = logging.getLogger(__name__)

PROJECTION_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    family: (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    for family in ("llama", "mistral", "qwen2", "qwen3")
}
"""Model families (``config.model_type``) whose attention/MLP modules feed these sibling projections one input."""


class GroupedFalqonLinear(FalqonLinear):
    """A ``FalqonLinear`` whose FP8 buffers are views of a ``ProjectionGroup``'s stacked weight.

    Without a group (before conversion attaches one, or after ``ungroup``) it is a plain ``FalqonLinear``.
    """

    _projection_group: ProjectionGroup | None = None

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The group's GEMM output for this projection, or the single-layer forward (same bits) on a cache miss."""
        group = self._projection_group
        y = None if group is None else group.output(self, x)
        if y is None:
            return super().forward(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars and self._projection_group is not None:
            # The FP8 buffers are views of the group's stacked weight: hand out copies, so that every consumer sees
            # per-projection tensors as an ungrouped layer's (safetensors refuses tensors that share a storage).
            for name in ("weight_fp8", "weight_scale"):
                destination[prefix + name] = destination[prefix + name].clone()

    @torch.no_grad()
    def set_weight(self, weight_hp: torch.Tensor, lora_A_hp: torch.Tensor) -> None:
        """As ``FalqonLinear.set_weight``; a tensor-scaled group requantizes all its projections at one shared scale
        (the others from their exact dequantized values, so their bytes change only if the shared scale does)."""
        group = self._projection_group
        if group is None:
            super().set_weight(weight_hp, lora_A_hp)
            self._melded_hp = torch.cat([weight_hp.float(), lora_A_hp.float()], dim=0)  # the group quantizes this
        elif group.shared_scale:
            group.requantize(self, torch.cat([weight_hp.float(), lora_A_hp.float()], dim=0))
        else:
            super().set_weight(weight_hp, lora_A_hp)  # row scales are row-local: write this projection's views


@dataclass
class _PendingOutputs:
    """Outputs of one group GEMM, waiting for the projections that have not taken theirs yet."""

    x: torch.Tensor
    grad_enabled: bool
    outputs: tuple[torch.Tensor, ...]
    taken: set[int] = field(default_factory=set)


class ProjectionGroup:
    """The stacked FP8 weight of sibling projections and the dispatch of their one GEMM.

    Args:
        members: the projections in call order (the first one's call runs the GEMM); same ``in_features``, same
            config, same device, each holding the high-precision ``[W; A]`` its ``set_weight`` recorded.

    Raises:
        ValueError: members that cannot share a GEMM (checked by ``grouping_problem`` before conversion).
    """

    def __init__(self, members: list[GroupedFalqonLinear]) -> None:
        problem = grouping_problem(members)
        if problem:
            raise ValueError(f"cannot group projections: {problem}")
        self.members = members
        self.config: FalqonConfig = members[0].config
        self.shared_scale = self.config.weight_scaling == ScaleGranularity.TENSOR
        starts, row = [], 0
        for member in members:
            starts.append(row)
            row += member.out_features + member.rank
        self.layout: GroupLayout = tuple((s, m.out_features, m.rank) for s, m in zip(starts, members, strict=True))
        self.calls = 0
        """Group GEMMs run (a test and benchmark counter)."""
        self.alone = 0
        """Projection calls that missed the group output and ran alone (a test and benchmark counter)."""
        self._pending: _PendingOutputs | None = None
        melded_hp = torch.cat([m.__dict__.pop("_melded_hp") for m in members], dim=0)  # (R, in)
        data, scale = quantize_dynamic(melded_hp, E4M3, self.config.weight_scaling)
        self._link(data, scale)
        for member in members:
            member._projection_group = self

    # ----------------------------------------------------------------------------------------------- storage
    def _link(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor) -> None:
        """Own ``weight_fp8`` ``(R, in)`` and ``weight_scale`` and point every projection's buffers at its rows."""
        self.weight_fp8, self.weight_scale = weight_fp8, weight_scale
        for (start, n_out, rank), member in zip(self.layout, self.members, strict=True):
            member._buffers["weight_fp8"] = weight_fp8[start : start + n_out + rank]
            scale = weight_scale if self.shared_scale else weight_scale[start : start + n_out + rank]
            member._buffers["weight_scale"] = scale

    def _linked(self) -> bool:
        row_bytes = self.weight_fp8.shape[1] * self.weight_fp8.element_size()
        for (start, _, _), member in zip(self.layout, self.members, strict=True):
            scale_start = 0 if self.shared_scale else start
            if (
                member.weight_fp8.device != self.weight_fp8.device
                or member.weight_fp8.data_ptr() != self.weight_fp8.data_ptr() + start * row_bytes
                or member.weight_scale.data_ptr() != self.weight_scale.data_ptr() + scale_start * 4
            ):
                return False
        return True

    def _relink(self) -> None:
        """Re-stack from the projections' current buffers (after a move or a buffer reassignment)."""
        weight = torch.cat([m.weight_fp8 for m in self.members], dim=0)
        if self.shared_scale:
            scale = self.members[0].weight_scale.clone()
        else:
            scale = torch.cat([m.weight_scale for m in self.members], dim=0)
        self._link(weight, scale)

    @torch.no_grad()
    def requantize(self, member: GroupedFalqonLinear, melded_hp: torch.Tensor) -> None:
        """Give ``member`` the new high-precision ``[W; A]`` and requantize the group at one fresh tensor scale."""
        if not self._linked():
            self._relink()
        parts = [melded_hp if m is member else m.weight_fp8.float() * m.weight_scale for m in self.members]
        melded = torch.cat(parts, dim=0).to(self.weight_fp8.device)  # (R, in)
        data, scale = quantize_dynamic(melded, E4M3, ScaleGranularity.TENSOR)
        self.weight_fp8.copy_(data)
        self.weight_scale.copy_(scale)

    # ---------------------------------------------------------------------------------------------- dispatch
    def output(self, member: GroupedFalqonLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output (without bias) from the group GEMM, or ``None`` when it must run alone."""
        index = self.members.index(member)
        grad_enabled = torch.is_grad_enabled()
        pending = self._pending
        if index == 0:
            self._pending = pending = _PendingOutputs(x, grad_enabled, self._run(x))
        elif pending is None or pending.x is not x or pending.grad_enabled != grad_enabled or index in pending.taken:
            self.alone += 1
            return None
        pending.taken.add(index)
        if len(pending.taken) == len(self.members):
            self._pending = None  # every projection has its output: drop the references
        return pending.outputs[index]

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self._linked():
            self._relink()
        self.calls += 1
        backend = resolve_backend(self.config.backend, x.device)
        residual = tuple(not m.b_is_zero() for m in self.members)
        lora_Bs = [m.lora_B for m in self.members]
        x_fp8 = prequantized_input(x, self.config.act_scaling)
        args = GroupArgs(self.layout, self.config.act_scaling, backend, residual)
        return FalqonGroupFunction.apply(x, x_fp8, self.weight_fp8, self.weight_scale, args, *lora_Bs)


def grouping_problem(members: list[nn.Module]) -> str:
    """Why these projections cannot share one GEMM (``""`` when they can)."""
    first = members[0]
    if not all(isinstance(m, GroupedFalqonLinear) for m in members):
        return "not every projection is a converted FALQON layer"
    if any(m.in_features != first.in_features for m in members):
        return f"different in_features {[m.in_features for m in members]}"
    if any(m.config != first.config for m in members):
        return "different FALQON configs"
    if first.config.weight_scaling not in (ScaleGranularity.ROW, ScaleGranularity.TENSOR):
        return f"weight scaling {first.config.weight_scaling.value!r} is not row or tensor"
    if first.config.transpose_cache:
        return "transpose_cache keeps per-layer transposed copies (group the layers without it)"
    if len({m.lora_B.device for m in members}) != 1:
        return "projections on different devices"
    return ""


def plan_groups(model: nn.Module, converted: list[str]) -> tuple[list[list[str]], dict[str, str]]:
    """Which converted layers to group: ``(groups of names in call order, {group label: reason not grouped})``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    patterns = PROJECTION_GROUPS.get(model_type)
    if patterns is None:
        return [], {"*": f"model type {model_type!r} has no known projection groups ({sorted(PROJECTION_GROUPS)})"}
    wanted = set(converted)
    parents = sorted({name.rpartition(".")[0] for name in converted})
    groups, skipped = [], {}
    for parent in parents:
        for pattern in patterns:
            names = [f"{parent}.{child}" if parent else child for child in pattern]
            present = [n for n in names if n in wanted]
            if not present:
                continue
            if len(present) != len(names):
                skipped[f"{parent}.{{{','.join(pattern)}}}"] = f"only {present} are converted"
                continue
            groups.append(names)
    return groups, skipped


def projection_groups(model: nn.Module) -> list[ProjectionGroup]:
    """The distinct projection groups of a converted model."""
    seen: dict[int, ProjectionGroup] = {}
    for module in model.modules():
        group = getattr(module, "_projection_group", None)
        if isinstance(module, GroupedFalqonLinear) and group is not None:
            seen.setdefault(id(group), group)
    return list(seen.values())
