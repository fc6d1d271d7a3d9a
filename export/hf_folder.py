"""Pieces of a Hugging Face model folder shared by the ``vllm`` and ``hf`` targets.

Config (with or without a ``quantization_config``), safetensors shards with an index, tokenizer and generation config.
The FALQON layers themselves are written by each target; here live the high-precision rest and the file plumbing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from falqon_lit.layer import falqon_layers

from .errors import ExportError

DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
"""Largest safetensors shard; bigger models get ``model-0000i-of-0000n.safetensors`` plus an index."""


def high_precision_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every persistent tensor outside the FALQON layers, floating ones cast to ``dtype``.

    A tensor shared with an earlier one (``lm_head`` tied to the input embedding) is left out when the config says
    the weights are tied, since loaders re-tie it; otherwise it is written as its own copy.
    """
    falqon_prefixes = tuple(f"{name}." for name in falqon_layers(model))
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(falqon_prefixes):
            continue
        if tensor.data_ptr() in seen and tensor.numel():
            if tied:
                continue
            tensor = tensor.clone()
        seen[tensor.data_ptr()] = name
        value = tensor.detach().to("cpu")
        out[name] = value.to(dtype) if value.is_floating_point() else value
    return out


def checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` under the names the model's own checkpoints use, as ``save_pretrained`` writes them.

    transformers renames and merges some weights on load (GPT-NeoX ``embed_out`` → ``lm_head``; MoE experts
    ``experts.N.gate_proj``/``up_proj`` or Mixtral ``block_sparse_moe.experts.N.w1``/``w3`` → one 3-D
    ``mlp.experts.gate_up_proj``); its save path reverts that, and so does this, with the same function.
    """
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


def checkpoint_name(model: nn.Module, module_name: str) -> str:
    """The checkpoint name of one module (a renamed one, not a merged one: see :func:`checkpoint_names`)."""
    (name,) = checkpoint_names(model, {f"{module_name}.weight": torch.zeros(1)})
    return name.removesuffix(".weight")


def tensor_facts(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """``{name: {"shape", "dtype"}}`` for the manifest."""
    return {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in tensors.items()}


def write_safetensors(
    tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """Write ``tensors`` as one ``model.safetensors`` or as shards with ``model.safetensors.index.json``.

    Returns:
        The file names written.
    """
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards, strict=True):
        save_file(shard, folder / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, "model.safetensors.index.json"]


def write_config(
    model: nn.Module, folder: Path, dtype: torch.dtype, quantization_config: dict[str, Any] | None = None
) -> None:
    """Save a copy of ``model.config`` with the export dtype and, for quantized targets, ``quantization_config``."""
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    if quantization_config is None:
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    else:
        config.quantization_config = quantization_config
    config.save_pretrained(folder)


def write_tokenizer_and_generation_config(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Save the tokenizer (required) and the generation config (when the model has one).

    Raises:
        ExportError: no tokenizer, or saving it wrote no tokenizer files.
    """
    if tokenizer is None:
        raise ExportError(
            "the model has no tokenizer to copy into the export; save the checkpoint with its tokenizer "
            "(FalqonLitModule keeps one) or pass a folder that holds tokenizer files"
        )
    tokenizer.save_pretrained(folder)
    if not (folder / "tokenizer_config.json").is_file():
        raise ExportError(
            f"saving tokenizer {type(tokenizer).__name__} wrote no tokenizer_config.json; use an HF tokenizer"
        )
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
