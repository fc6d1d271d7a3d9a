"""``--target hf``: a plain Hugging Face folder with the FP8 weights dequantized (``W = fp8 · scale``) to bf16.

For tools that cannot read FP8. Dequantizing is exact in float32 (E4M3 has 3 mantissa bits, the scale 24); casting
to bf16 rounds to 8 bits (relative error ≤ 2⁻⁹), so pass ``dtype=torch.float32`` for a lossless dense copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from falqon_lit.layer import falqon_layers

from .hf_folder import (
    checkpoint_names,
    high_precision_state_dict,
    tensor_facts,
    write_config,
    write_safetensors,
    write_tokenizer_and_generation_config,
)


def dense_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weight`` ``deq(W)`` (``B`` must be flushed) and ``bias`` of every FALQON layer, in ``dtype``."""
    tensors = {}
    for name, layer in falqon_layers(model).items():
        tensors[f"{name}.weight"] = layer.dequantized_weight(torch.float32).cpu().to(dtype)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().to(dtype)
    return tensors


def write_hf(model: nn.Module, tokenizer: Any, folder: Path, *, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Write a dense (dequantized) Hugging Face folder into ``folder``; the model must already be flushed.

    Returns:
        Manifest facts (tensors written).
    """
    tensors = checkpoint_names(model, {**high_precision_state_dict(model, dtype), **dense_tensors(model, dtype)})
    write_config(model, folder, dtype)
    write_tokenizer_and_generation_config(model, tokenizer, folder)
    write_safetensors(tensors, folder)
    return {"tensors": tensor_facts(tensors), "hf": {"dequantized_layers": len(falqon_layers(model))}}
