"""``--target vllm`` for a model imported from an FP8 checkpoint: write the source's own format and scheme back.

The source's ``quantization_config`` is written verbatim (compressed-tensors or native ``fp8``), each FP8 linear as
``weight`` (the trained E4M3 bytes of ``W``, ``A`` dropped) and its scale under the source's name and shape
(``weight_scale`` / ``weight_scale_inv``; ``(1,)``, ``(out, 1)`` or ``(ceil(out / 128), ceil(in / 128))``).
Merges keep block and tensor scales and change only the rows they chose (``falqon_lit.proxy``), so every row the
proxy update never touched leaves with the source's bytes and scale. The manifest records the source's hashes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from falqon_lit.config import SCALE_BLOCK, ScaleGranularity
from falqon_lit.fp8.numerics import compact_block_scale
from falqon_lit.fp8_checkpoint import Fp8Checkpoint, Fp8SourceLinear
from falqon_lit.layer import falqon_layers

from .errors import ExportError
from .hf_folder import high_precision_state_dict
from .verify import Sample


def _source_shapes(source: Fp8Checkpoint) -> dict[str, list[int]]:
    """Shapes of the source's scale tensors, read from the safetensors headers (no tensor is loaded)."""
    shapes = {}
    for file in sorted(source.folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith(f".{source.scale_suffix}"):
                    shapes[key] = f.get_slice(key).get_shape()
    return shapes


def fp8_source_tensors(model: nn.Module, source: Fp8Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The FP8 tensors of every FALQON layer (and of any source layer left unconverted) in the source's layout.

    Raises:
        ExportError: the source no longer exists, or a layer's scaling is not the source's.
    """
    if not source.folder.is_dir():
        raise ExportError(f"the FP8 source checkpoint '{source.folder}' is gone; the export writes its format back")
    shapes = _source_shapes(source)
    tensors = {}
    for name, layer in falqon_layers(model).items():
        if layer.config.weight_scaling != source.weight_scaling:
            raise ExportError(
                f"layer {name!r} has {layer.config.weight_scaling.value} scales but the source checkpoint "
                f"'{source.folder}' has {source.weight_scaling.value}; convert it from the checkpoint as it is"
            )
        scale = layer.weight_scale_rows.detach().float().cpu()
        if source.weight_scaling == ScaleGranularity.BLOCK:
            scale = compact_block_scale(scale)
        key = f"{name}.{source.scale_suffix}"
        tensors[f"{name}.weight"] = layer.weight_fp8[: layer.out_features].detach().cpu().clone()
        tensors[key] = scale.reshape(shapes.get(key, scale.shape)).contiguous().clone()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().to(dtype)
    for name, module in model.named_modules():
        if isinstance(module, Fp8SourceLinear):  # not converted (ignored): its source tensors, as they were
            tensors[f"{name}.weight"] = module.weight_fp8.detach().cpu().clone()
            tensors[f"{name}.{source.scale_suffix}"] = module.weight_scale.detach().cpu().clone()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().cpu().to(dtype)
    return tensors


def fp8_source_export(
    model: nn.Module, source: Fp8Checkpoint, dtype: torch.dtype
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """What the export writes for a model imported from ``source``: ``(quantization_config, tensors, facts)``."""
    fp8 = fp8_source_tensors(model, source, dtype)
    prefixes = tuple(n.removesuffix("weight") for n in fp8 if n.endswith(".weight"))
    hp = {k: v for k, v in high_precision_state_dict(model, dtype).items() if not k.startswith(prefixes)}
    facts = {
        "vllm": {
            "source_format": source.format,
            "weight_scaling": source.weight_scaling.value,
            "input_activations": source.act_scaling.value,
            "fp8_layers": len(falqon_layers(model)),
            "reason": "written in the format and scheme of the FP8 checkpoint it was imported from",
        },
        "source_checkpoint": {"folder": str(source.folder), "sha256": source.file_hashes()},
    }
    return source.quantization_config, {**hp, **fp8}, facts


def weight_only_readback(model: nn.Module) -> bool:
    """Whether transformers reads the export back weight-only on CPU (a native ``fp8`` folder: float activations)."""
    source = getattr(model, "falqon_fp8_source", None)
    return source is not None and source.format == "fp8"


def cpu_readback_reference(model: nn.Module, samples: list[Sample]) -> tuple[list[Sample], str | None]:
    """The reference transformers' CPU read-back of a vllm export is compared with, or why it cannot run.

    A native fp8 folder runs weight-only in transformers on CPU (``W`` dequantized, float activations): its reference
    is the trainer's FP8 weights with float activations. compressed-tensors quantizes 1 × 128 activation groups only
    when a layer's input width divides by 128 (SmolLM2's 576 does not), so such a block export's logits cannot be
    read back on CPU at all; vLLM on a GPU host is then the only runtime check.
    """
    if weight_only_readback(model):
        return [dataclasses.replace(s, logits=s.logits_float_act) for s in samples], None
    ragged = [
        f"{name} (in {layer.in_features})"
        for name, layer in falqon_layers(model).items()
        if layer.config.act_scaling == ScaleGranularity.BLOCK and layer.in_features % SCALE_BLOCK
    ]
    if ragged:
        return samples, (
            f"logits not compared: compressed-tensors quantizes 1x128 activation groups only for input widths that "
            f"divide by 128, and {len(ragged)} layers do not (first: {ragged[0]}); bytes checked"
        )
    return samples, None
