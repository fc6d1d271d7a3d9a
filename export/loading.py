"""What to export: a converted causal LM and its tokenizer, from a Lightning checkpoint or a saved FALQON folder.

Both the trainer's checkpoints (``FalqonLitModule.load_from_checkpoint``) and folders written by
:func:`save_falqon_model` (model + tokenizer, no Lightning needed) are accepted. Everything here validates the input
once and raises :class:`ExportError` with the path, what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from falqon_lit.config import FalqonConfig, InitMethod, plain_dict
from falqon_lit.convert import convert_model
from falqon_lit.layer import falqon_layers

from .errors import ExportError
from .manifest import atomic_directory

FALQON_MODEL_FILE = "falqon.json"
"""Marker and metadata file of a folder written by :func:`save_falqon_model`."""
_TOKENIZER_FILES = ("tokenizer_config.json",)


@dataclass
class ExportSource:
    """A converted model ready to export."""

    model: nn.Module
    """The converted Hugging Face causal LM (``FalqonLinear`` layers inside)."""
    tokenizer: Any
    """Its Hugging Face tokenizer."""
    falqon_config: FalqonConfig | None = None
    """The conversion config, when known (recorded in the manifest)."""
    origin: str = "<in memory>"
    """Where it came from, for messages."""


def require_falqon(model: nn.Module, origin: str) -> None:
    """Raise unless ``model`` holds at least one ``FalqonLinear``."""
    if not falqon_layers(model):
        raise ExportError(
            f"'{origin}' is not a FALQON model: it has no FalqonLinear layers; convert it with "
            "falqon_lit.convert_model and train it (falqon fit) before exporting"
        )




# ------------------------------------------------------------------------------------------------ saved folders
def save_falqon_model(
    model: nn.Module,
    tokenizer: Any,
    folder: str | os.PathLike[str],
    falqon_config: FalqonConfig | None = None,
    force: bool = False,
) -> Path:
    """Save a converted model (FP8 buffers, ``B``, high-precision rest), its tokenizer and HF config to ``folder``.

    The folder loads back with :func:`load_for_export` (no Lightning needed); it is not a serving format.
    """
    require_falqon(model, str(folder))
    layers = falqon_layers(model)
    config = falqon_config or next(iter(layers.values())).config
    hp_dtype = next((p.dtype for n, p in model.named_parameters() if "lora_" not in n), torch.float32)
    with atomic_directory(folder, force=force) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        meta = {
            "format": "falqon-model/1",
            "falqon_config": plain_dict(config) if config is not None else None,
            "converted": list(layers),
            "dtype": str(hp_dtype).removeprefix("torch."),
        }
        (tmp / FALQON_MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(folder)


def _load_folder(folder: Path) -> ExportSource:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((folder / FALQON_MODEL_FILE).read_text(encoding="utf-8"))
    falqon_config = FalqonConfig(**meta["falqon_config"])
    # Rebuild the same layers (random A init: the saved bytes overwrite it) and load every buffer back exactly.
    rebuild = dataclasses.replace(falqon_config, target_modules=meta["converted"], init=InitMethod.RANDOM)
    dtype = getattr(torch, meta.get("dtype", "float32"))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    convert_model(model, rebuild)
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ExportError(
            f"'{folder}' does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}; re-save it"
        )
    for layer in falqon_layers(model).values():
        layer.config = falqon_config
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else None
    return ExportSource(model, tokenizer, falqon_config, str(folder))


def _has_tokenizer(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _TOKENIZER_FILES)


# --------------------------------------------------------------------------------------------- Lightning checkpoints
def _load_lightning(path: Path) -> ExportSource:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # any unreadable file is the same user error
        raise ExportError(f"cannot read checkpoint '{path}' ({type(err).__name__}: {err}); pass a .ckpt file") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(k.endswith(".weight_fp8") for k in state):
        raise ExportError(
            f"'{path}' is not a FALQON checkpoint: its state_dict has no FP8 'weight_fp8' buffers; pass a checkpoint "
            "written by `falqon fit` or a folder from save_falqon_model"
        )
    del checkpoint, state
    try:
        from falqon_lit.module import FalqonLitModule
    except ImportError as err:
        raise ExportError(f"loading Lightning checkpoint '{path}' needs falqon_lit.module ({err})") from None
    module = FalqonLitModule.load_from_checkpoint(path, map_location="cpu")
    model = getattr(module, "model", None)
    if model is None:
        raise ExportError(f"checkpoint '{path}' rebuilt a FalqonLitModule without a model; re-save it from training")
    model.eval()
    return ExportSource(model, getattr(module, "tokenizer", None), getattr(module, "falqon_config", None), str(path))


def load_for_export(path: str | os.PathLike[str]) -> ExportSource:
    """Load a Lightning checkpoint (``.ckpt``) or a :func:`save_falqon_model` folder for export.

    Raises:
        ExportError: missing path, a file or folder that is not a FALQON model, or no tokenizer files.
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f"checkpoint '{path}' does not exist; pass --ckpt <file.ckpt or saved FALQON folder>")
    if path.is_dir():
        if not (path / FALQON_MODEL_FILE).is_file():
            raise ExportError(
                f"'{path}' is not a FALQON model folder (no {FALQON_MODEL_FILE}); pass a Lightning .ckpt from "
                "`falqon fit` or a folder written by save_falqon_model"
            )
        source = _load_folder(path)
    else:
        source = _load_lightning(path)
    require_falqon(source.model, str(path))
    if source.tokenizer is None:
        raise ExportError(
            f"'{path}' has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the tokenizer with the model "
            "(tokenizer.save_pretrained into the folder) and export again"
        )
    return source
