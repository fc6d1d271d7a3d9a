"""What to export: a converted causal LM and its tokenizer, from a Lightning checkpoint or a saved FALQON folder.

Both the trainer's checkpoints (``falqon_lit.checkpoint.load_checkpoint``, no Lightning needed) and folders written by
:func:`save_falqon_model` (model + tokenizer, no Lightning needed) are accepted. Everything here validates the input
once and raises :class:`ExportError` with the path, what is wrong and what to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from falqon_lit.checkpoint import CheckpointError, load_checkpoint, rebuild_converted
from falqon_lit.config import FalqonConfig, plain_dict
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
    from transformers import AutoConfig, AutoTokenizer

    meta = json.loads((folder / FALQON_MODEL_FILE).read_text(encoding="utf-8"))
    falqon_config = FalqonConfig(**meta["falqon_config"])
    dtype = getattr(torch, meta.get("dtype", "float32"))
    state = load_file(str(folder / "model.safetensors"))
    try:
        model = rebuild_converted(AutoConfig.from_pretrained(folder), falqon_config, meta["converted"], dtype, state)
    except ValueError as err:
        raise ExportError(f"'{folder}' does not match its config ({err}); re-save it") from None
    tokenizer = AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else None
    return ExportSource(model, tokenizer, falqon_config, str(folder))


def _has_tokenizer(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _TOKENIZER_FILES)


# --------------------------------------------------------------------------------------------- Lightning checkpoints
def _load_lightning(path: Path) -> ExportSource:
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    return ExportSource(loaded.model, loaded.tokenizer, loaded.falqon_config, str(path))


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
