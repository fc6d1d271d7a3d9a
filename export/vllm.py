"""``--target vllm``: a Hugging Face folder in the compressed-tensors ``float-quantized`` FP8 format.

vLLM (and transformers with compressed-tensors) load it with no conversion step. Each FALQON layer becomes a plain
``Linear`` with ``weight`` = the trained FP8 bytes of ``W`` (the melded ``A`` rows dropped) and ``weight_scale``; the
input activations are dynamic FP8, ``tensor`` or ``token`` as trained; ``lm_head`` and every layer that was not
converted are on the ``ignore`` list and, like embeddings and norms, stay high precision. No weight is re-rounded.

Scale strategy (docs/design.md §5). Row scales export as the ``channel`` strategy, ``weight_scale`` ``(out, 1)``. A
tensor scale can export as ``tensor`` (``weight_scale`` ``(1,)``) only without loss when vLLM keeps the bytes: vLLM
fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` and, for the ``tensor`` strategy, requantizes every
shard to the largest shard scale (``requantize_with_max_scale`` in vLLM's ``w8a8_utils``/``fp8_utils``, called from
``process_fp8_weight_tensor_strategy``), while the ``channel`` path keeps the bytes as loaded. So ``auto`` writes
``tensor`` only when every fused group's shard scales are identical, and otherwise the exact equivalent: the tensor
scale repeated per output channel, ``channel`` strategy.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from torch import nn

from falqon_lit.config import ScaleGranularity
from falqon_lit.experts import routed_experts, routers
from falqon_lit.fp8.numerics import compact_block_scale
from falqon_lit.layer import falqon_layers
from falqon_lit.layer_base import FalqonLayer

from .errors import ExportError
from .hf_folder import (
    checkpoint_name,
    checkpoint_names,
    high_precision_state_dict,
    tensor_facts,
    write_config,
    write_safetensors,
    write_tokenizer_and_generation_config,
)

FUSED_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling linears vLLM packs into one layer (its ``packed_modules_mapping`` for Llama-style models)."""


class WeightStrategy(str, enum.Enum):
    """compressed-tensors weight scale strategy of the export."""

    AUTO = "auto"
    """``channel`` for row scales; ``tensor`` for tensor scales when fused shards share them, else ``channel``."""
    TENSOR = "tensor"
    """One scale ``(1,)`` per layer; vLLM re-rounds fused shards whose scales differ (warned)."""
    CHANNEL = "channel"
    """One scale per output row ``(out, 1)``; tensor scales are repeated. Always exact in vLLM."""


@dataclass(frozen=True)
class VllmPlan:
    """What the vLLM export writes, decided from the model before any file is touched."""

    weight_strategy: str
    """``tensor``, ``channel`` or ``block``."""
    act_strategy: str
    """``tensor``, ``token`` or ``group`` (dynamic)."""
    ignore: list[str] = field(default_factory=list)
    """Layers left in high precision: ``lm_head`` and every linear that is not a FALQON layer."""
    reason: str = ""
    """Why this weight strategy, for the manifest and progress output."""


def _fused_siblings(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Each present fused group as ``[(fqn, module), ...]``."""
    groups = []
    for parent_name, parent in model.named_modules():
        for names in FUSED_GROUPS:
            members = [(n, getattr(parent, n, None)) for n in names]
            if all(isinstance(m, nn.Module) for _, m in members):
                prefix = f"{parent_name}." if parent_name else ""
                groups.append([(prefix + n, m) for n, m in members])
    return groups


def plan_vllm_export(model: nn.Module, weight_strategy: WeightStrategy | str = WeightStrategy.AUTO) -> VllmPlan:
    """Check the model is expressible as one compressed-tensors FP8 scheme and choose its strategies.

    Raises:
        ExportError: no FALQON layer, layers with different scaling configs, a fused group mixing FALQON and
            high-precision shards, or ``tensor`` forced on row-scaled weights.
    """
    try:
        weight_strategy = WeightStrategy(weight_strategy)
    except ValueError:
        raise ExportError(
            f"weight strategy must be one of {[s.value for s in WeightStrategy]}, got {weight_strategy!r}"
        ) from None
    layers = falqon_layers(model)
    if not layers:
        raise ExportError("the model has no FALQON layers, so there are no FP8 weights to export; convert and train it")
    schemes = {(m.config.weight_scaling, m.config.act_scaling) for m in layers.values()}
    if len(schemes) > 1:
        raise ExportError(
            "FALQON layers use different (weight, activation) scalings "
            f"{sorted((w.value, a.value) for w, a in schemes)}; the vllm target writes one compressed-tensors "
            "scheme; convert every layer with one FalqonConfig"
        )
    w_scaling, a_scaling = schemes.pop()
    if a_scaling == ScaleGranularity.TENSOR:
        # vLLM 0.26 (CompressedTensorsW8A8Fp8) maps every dynamic input scheme to per-token FP8 quantization,
        # whatever strategy the config names: the served numerics then differ from the trained ones.
        warnings.warn(
            "the model was trained with per-tensor FP8 activations, but vLLM quantizes dynamic activations per "
            "token: it serves the trained weights with slightly different activation rounding. Train with "
            "act_scaling='row' (recipe 'fp8-row') for serving that matches training.",
            stacklevel=2,
        )
    for group in _fused_siblings(model):
        kinds = {isinstance(m, FalqonLayer) for _, m in group}
        if len(kinds) > 1:
            mixed = ", ".join(f"{n} ({'FP8' if isinstance(m, FalqonLayer) else type(m).__name__})" for n, m in group)
            raise ExportError(
                f"vLLM fuses {mixed} into one layer, which needs one scheme for all shards; convert all of them "
                "(or none) with FALQON"
            )
    ignore = _high_precision_modules(model)

    if w_scaling == ScaleGranularity.BLOCK:
        return VllmPlan("block", _act_strategy(a_scaling), ignore, "block scales export as the 128x128 block strategy")
    if w_scaling == ScaleGranularity.ROW:
        if weight_strategy == WeightStrategy.TENSOR:
            raise ExportError(
                "weight strategy 'tensor' cannot express row-scaled FP8 weights without re-rounding them; "
                "use --weight-strategy channel (or auto)"
            )
        return VllmPlan("channel", _act_strategy(a_scaling), ignore, "row scales export as channel scales")

    unequal = [
        [n for n, _ in group]
        for group in _fused_siblings(model)
        if isinstance(group[0][1], FalqonLayer)
        and not all(torch.equal(group[0][1].weight_scale, m.weight_scale) for _, m in group[1:])
    ]
    if weight_strategy == WeightStrategy.CHANNEL:
        return VllmPlan(
            "channel", _act_strategy(a_scaling), ignore, "channel strategy requested: tensor scales repeated"
        )
    if weight_strategy == WeightStrategy.TENSOR:
        if unequal:
            warnings.warn(
                f"{len(unequal)} fused shard groups (first: {unequal[0]}) have different tensor scales; vLLM will "
                "requantize them to the largest scale, re-rounding the trained FP8 weights. Use --weight-strategy "
                "auto or channel for an exact export",
                stacklevel=2,
            )
        return VllmPlan("tensor", _act_strategy(a_scaling), ignore, "tensor strategy requested")
    if unequal:
        reason = (
            f"{len(unequal)} fused shard groups have different tensor scales (vLLM would requantize them to the max); "
            "exported exactly as repeated channel scales"
        )
        return VllmPlan("channel", _act_strategy(a_scaling), ignore, reason)
    return VllmPlan("tensor", _act_strategy(a_scaling), ignore, "fused shards share their tensor scales")


def _high_precision_modules(model: nn.Module) -> list[str]:
    """Checkpoint names of the layers that stay high precision: the output head, every plain linear, MoE routers
    and routed experts (kept as 3-D parameters, written per expert; see ``falqon_lit.experts``)."""
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = next((n for n, m in model.named_modules() if m is output_embeddings), "lm_head")
    names = [head] + [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not output_embeddings]
    names = [checkpoint_name(model, n) for n in names + list(routers(model))]
    experts = {n: p for e in routed_experts(model) for n, p in model.get_submodule(e).named_parameters(prefix=e)}
    names += [n.removesuffix(".weight") for n in checkpoint_names(model, experts)]
    return list(dict.fromkeys(names))


def _act_strategy(scaling: ScaleGranularity) -> str:
    return {ScaleGranularity.ROW: "token", ScaleGranularity.BLOCK: "group"}.get(scaling, "tensor")


def build_quantization_config(plan: VllmPlan) -> QuantizationConfig:
    """The compressed-tensors config of the export, built (and so validated) by compressed-tensors' own classes."""
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=8,
            type="float",
            strategy=plan.weight_strategy,
            symmetric=True,
            dynamic=False,
            block_structure=[128, 128] if plan.weight_strategy == "block" else None,
        ),
        input_activations=QuantizationArgs(
            num_bits=8,
            type="float",
            strategy=plan.act_strategy,
            symmetric=True,
            dynamic=True,
            group_size=128 if plan.act_strategy == "group" else None,
        ),
    )
    return QuantizationConfig(
        config_groups={"group_0": scheme},
        quant_method="compressed-tensors",
        format="float-quantized",
        quantization_status="compressed",
        ignore=list(plan.ignore),
    )


def quantization_config_dict(plan: VllmPlan) -> dict[str, Any]:
    """``quantization_config`` for ``config.json``: JSON-safe, and re-validated by compressed-tensors."""
    config = build_quantization_config(plan)
    data = config.model_dump(mode="json")
    QuantizationConfig.model_validate(data)  # the written dict must parse back (raises pydantic's ValidationError)
    return data


def fp8_tensors(model: nn.Module, plan: VllmPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weight`` (E4M3 ``(out, in)``), ``weight_scale`` (float32) and ``bias`` of every FALQON layer.

    The weight is a byte copy of the stored ``W`` rows: nothing is re-rounded.
    """
    tensors = {}
    for name, layer in falqon_layers(model).items():
        scale = layer.weight_scale_rows.detach().float().cpu()
        if plan.weight_strategy == "channel":
            scale = scale.reshape(-1, 1).expand(layer.out_features, 1)  # (out, 1), a tensor scale repeated
        elif plan.weight_strategy == "block":
            scale = compact_block_scale(scale)  # (ceil(out / 128), ceil(in / 128))
        tensors[f"{name}.weight"] = layer.weight_fp8[: layer.out_features].detach().cpu().clone()
        tensors[f"{name}.weight_scale"] = scale.contiguous().clone()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().to(dtype)
    return tensors


def write_vllm(
    model: nn.Module,
    tokenizer: Any,
    folder: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    weight_strategy: WeightStrategy | str = WeightStrategy.AUTO,
) -> dict[str, Any]:
    """Write the compressed-tensors FP8 folder into ``folder`` (a fresh temporary folder).

    The model must already be flushed (``B`` merged); ``export_model`` does that.

    Returns:
        Manifest facts: tensors written, scheme and the reason for the weight strategy.
    """
    source = getattr(model, "falqon_fp8_source", None)
    if source is not None:  # imported from an FP8 checkpoint: its own format and scheme go back out
        from .fp8_source import fp8_source_export

        quantization_config, tensors, facts = fp8_source_export(model, source, dtype)
    else:
        plan = plan_vllm_export(model, weight_strategy)
        quantization_config = quantization_config_dict(plan)
        tensors = {**high_precision_state_dict(model, dtype), **fp8_tensors(model, plan, dtype)}
        tensors = checkpoint_names(model, tensors)
        facts = {
            "vllm": {
                "weight_strategy": plan.weight_strategy,
                "input_activations": plan.act_strategy,
                "ignore": plan.ignore,
                "reason": plan.reason,
                "fp8_layers": len(falqon_layers(model)),
            },
        }
    write_config(model, folder, dtype, quantization_config)
    write_tokenizer_and_generation_config(model, tokenizer, folder)
    write_safetensors(tensors, folder)
    return {"tensors": tensor_facts(tensors), **facts}
