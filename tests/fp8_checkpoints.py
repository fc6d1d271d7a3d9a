"""Offline stand-ins for published FP8 releases: a model quantized into each format by compressed-tensors' own
compressors (``tensor``, ``channel``, ``block`` weight scales), and a native ``fp8`` folder with
``weight_block_size: [128, 128]`` written the way DeepSeek-V3 / transformers' FineGrainedFP8 ship them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

SCHEMES = ("ct-tensor", "ct-channel", "ct-block", "fp8-block")
"""Folder kinds: compressed-tensors with each weight strategy, and native fp8 with 128 × 128 blocks."""

_CT = {  # weight strategy → (input activation strategy, extra weight args, extra activation args)
    "tensor": ("tensor", {}, {}),
    "channel": ("token", {}, {}),
    "block": ("group", {"block_structure": [128, 128]}, {"group_size": 128}),
}


def _block_amax(weight: torch.Tensor) -> torch.Tensor:
    """amax per 128 × 128 block, ``(ceil(out / 128), ceil(in / 128))``; edge blocks partial."""
    out, cols = weight.shape
    rb, cb = math.ceil(out / 128), math.ceil(cols / 128)
    padded = torch.nn.functional.pad(weight.abs().float(), (0, cb * 128 - cols, 0, rb * 128 - out))
    return padded.reshape(rb, 128, cb, 128).amax(dim=(1, 3))


def _amax(weight: torch.Tensor, strategy: str) -> torch.Tensor:
    if strategy == "tensor":
        return weight.abs().float().amax().reshape(1)
    if strategy == "channel":
        return weight.abs().float().amax(dim=1, keepdim=True)
    return _block_amax(weight)


def write_compressed_tensors(model: torch.nn.Module, folder: Path, strategy: str) -> Path:
    """Quantize ``model``'s decoder linears with compressed-tensors (scales from its ``calculate_qparams``, bytes
    from its ``float-quantized`` compressor) and save it as a Hugging Face folder."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from loguru import logger

    logger.disable("compressed_tensors")  # its warning per partial 128-wide edge block, which vLLM handles
    act, w_extra, a_extra = _CT[strategy]
    weights = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False, **w_extra)
    acts = QuantizationArgs(num_bits=8, type="float", strategy=act, symmetric=True, dynamic=True, **a_extra)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                amax = _amax(module.weight, strategy)
                scale, _ = calculate_qparams(-amax, amax, weights)
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(str(folder))
    return folder


def write_native_fp8_block(model: torch.nn.Module, folder: Path) -> Path:
    """Save ``model`` as a native ``fp8`` folder: decoder linears as E4M3 bytes with ``weight_scale_inv`` per
    128 × 128 block (a dequantization multiplier, despite the name), ``quant_method: fp8``."""
    model.save_pretrained(folder)
    state = {}
    for file in folder.glob("*.safetensors"):
        from safetensors.torch import load_file

        state.update(load_file(file))
        file.unlink()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            weight = module.weight.detach().float()
            scale = (_block_amax(weight) / 448.0).clamp(min=1e-12)
            expanded = scale.repeat_interleave(128, 0)[: weight.shape[0]].repeat_interleave(128, 1)[
                :, : weight.shape[1]
            ]
            state[f"{name}.weight"] = (weight / expanded).clamp(-448, 448).to(torch.float8_e4m3fn)
            state[f"{name}.weight_scale_inv"] = scale
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head"],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_fp8_checkpoint(model: torch.nn.Module, folder: Path, scheme: str) -> Path:
    """One of :data:`SCHEMES` into ``folder`` (``model`` is quantized in place for compressed-tensors)."""
    if scheme == "fp8-block":
        return write_native_fp8_block(model, folder)
    return write_compressed_tensors(model, folder, scheme.removeprefix("ct-"))
