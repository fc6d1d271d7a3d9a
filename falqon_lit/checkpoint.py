"""Training checkpoints (``.ckpt``): what model they hold, whether they match a configured one, and loading them.

Every checkpoint a ``FalqonLitModule`` writes carries a *model record* under :data:`RECORD_KEY`: the backbone's
architecture, its ``transformers`` config (and its sha256), the FALQON config, the dtype, the shape of every FALQON
layer, the projections that share a GEMM, the FP8 checkpoint the backbone was imported from (if any), and the
tokenizer files. Resuming checks the record against the configured model (one line naming what differs; run-time
choices that leave the model as it is, such as ``fused_block`` or the GEMM backend, are not compared), and
:func:`load_checkpoint` rebuilds the trained model from the record and the state dict alone (the FP8 bytes, ``B`` and
every high-precision weight are in the state dict), so export and evaluation never need the original model folder;
an imported FP8 model's export still reads its source folder, to write that format back. This is the one ``.ckpt``
loader of ``falqon eval`` and ``falqon-export``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from falqon_lit.config import SCALE_BLOCK, FalqonConfig, InitMethod, ScaleGranularity, plain_dict
from falqon_lit.convert import convert_model
from falqon_lit.fp8.numerics import E4M3
from falqon_lit.fp8_checkpoint import Fp8Checkpoint, Fp8SourceLinear
from falqon_lit.grouped import projection_groups
from falqon_lit.layer import falqon_layers

RECORD_KEY = "falqon_model"
"""Key of the model record in a checkpoint dict."""
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "architectures")
_RUNTIME_FALQON_KEYS = ("backend", "transpose_cache")
"""FALQON config fields that pick kernels, not the model: a resume may change them."""
_MODEL_PREFIX = "model."


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, not FALQON's, or of another model: one line naming it and the fix."""


@dataclass
class LoadedCheckpoint:
    """A trained model rebuilt from a checkpoint."""

    model: nn.Module
    """The converted Hugging Face causal LM (``FalqonLinear`` layers inside), in eval mode on the CPU."""
    tokenizer: Any
    """Its tokenizer (from the files stored in the checkpoint)."""
    falqon_config: FalqonConfig
    """The conversion config the model was trained with."""
    record: dict[str, Any]
    """The checkpoint's model record."""


# ------------------------------------------------------------------------------------------------- the record
def plain_config(config: Any) -> dict[str, Any]:
    """A ``transformers`` config as a JSON dict without the keys that do not change the model (paths, versions)."""
    values = json.loads(config.to_json_string(use_diff=False))
    return {k: v for k, v in values.items() if k not in _VOLATILE_CONFIG_KEYS}


def _tokenizer_files(tokenizer: Any) -> dict[str, torch.Tensor]:
    # Bytes as uint8 tensors: they survive torch.load(weights_only=True), unlike raw bytes objects.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {
            p.name: torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8).clone()
            for p in sorted(Path(tmp).iterdir())
            if p.is_file()
        }


def fp8_source_layers(model: nn.Module) -> list[str]:
    """Names of the layers an FP8 checkpoint import left as stored (call before ``convert_model`` replaces them)."""
    return [name for name, module in model.named_modules() if isinstance(module, Fp8SourceLinear)]


def _fp8_source_record(model: nn.Module, layers: list[str]) -> dict[str, Any] | None:
    source: Fp8Checkpoint | None = getattr(model, "falqon_fp8_source", None)
    if source is None:
        return None
    return {
        "folder": str(source.folder),
        "format": source.format,
        "weight_scaling": source.weight_scaling.value,
        "act_scaling": source.act_scaling.value,
        "quantization_config": source.quantization_config,
        "layers": list(layers),
    }


def _group_names(model: nn.Module) -> list[list[str]]:
    names = {id(layer): name for name, layer in falqon_layers(model).items()}
    return [[names[id(member)] for member in group.members] for group in projection_groups(model)]


def model_record(
    config: Any,
    falqon: FalqonConfig,
    dtype: torch.dtype,
    *,
    source: str | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    fp8_layers: list[str] | None = None,
) -> dict[str, Any]:
    """What identifies the trained model: architecture, config (and hash), FALQON config, dtype; with ``model`` and
    ``tokenizer`` also what rebuilds it: the FALQON layer shapes, the projection groups, the FP8 checkpoint it was
    imported from (``fp8_layers``: its layers, from :func:`fp8_source_layers`), the generation config and the
    tokenizer files."""
    values = plain_config(config)
    architectures = getattr(config, "architectures", None) or [values.get("model_type", "?")]
    record: dict[str, Any] = {
        "architecture": architectures[0],
        "config": values,
        "config_sha256": hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest(),
        "falqon": plain_dict(falqon),
        "dtype": str(dtype).removeprefix("torch."),
        "source": source,
    }
    if model is not None:
        record["layer_shapes"] = {n: [m.out_features, m.in_features] for n, m in falqon_layers(model).items()}
        record["groups"] = _group_names(model)
        record["fp8_source"] = _fp8_source_record(model, fp8_layers or [])
        generation = getattr(model, "generation_config", None)
        record["generation_config"] = generation.to_dict() if generation is not None else None
    if tokenizer is not None:
        record["tokenizer_files"] = _tokenizer_files(tokenizer)
    return record


def _differences(saved: dict[str, Any], wanted: dict[str, Any], limit: int = 3) -> str:
    keys = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    shown = ", ".join(f"{k} {saved.get(k)!r} vs {wanted.get(k)!r}" for k in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _model_falqon(values: dict[str, Any]) -> dict[str, Any]:
    # Fields added after a checkpoint was written take their defaults; kernel choices are not the model.
    full = {**plain_dict(FalqonConfig()), **values}
    return {k: v for k, v in full.items() if k not in _RUNTIME_FALQON_KEYS}


def mismatch(saved: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """What differs between a checkpoint's record and the configured model's, as a phrase; ``None`` if they match."""
    if saved["config"].get("model_type") != wanted["config"].get("model_type"):
        return f"it holds a {saved['architecture']} model, the configured model is a {wanted['architecture']}"
    if saved["config_sha256"] != wanted["config_sha256"]:
        return f"its {saved['architecture']} config differs from the configured model's: " + _differences(
            saved["config"], wanted["config"]
        )
    saved_falqon, wanted_falqon = _model_falqon(saved["falqon"]), _model_falqon(wanted["falqon"])
    if saved_falqon != wanted_falqon:
        return "its FALQON config differs: " + _differences(saved_falqon, wanted_falqon)
    if saved["dtype"] != wanted["dtype"]:
        return f"it was trained in {saved['dtype']}, --model.dtype is {wanted['dtype']}"
    return None


def check_record(path: str | os.PathLike[str], checkpoint: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model record differs from ``wanted`` (checkpoints without a record pass).

    Raises:
        CheckpointError: one line naming the checkpoint and what differs.
    """
    saved = checkpoint.get(RECORD_KEY)
    if saved is None:  # written before records existed: nothing to compare
        return
    if (difference := mismatch(saved, wanted)) is not None:
        raise CheckpointError(
            f"checkpoint '{path}' does not match the configured model: {difference}; pass the --model and "
            "--model.falqon settings it was trained with, or another checkpoint"
        )


# ------------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike[str], what: str = "checkpoint") -> dict[str, Any]:
    """The checkpoint dict of a FALQON ``.ckpt`` file (memory-mapped: tensors are read when touched).

    Raises:
        CheckpointError: a missing path, a folder, a truncated or corrupted file, or a checkpoint without FALQON
            FP8 weights.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} '{path}' does not exist; pass a .ckpt written by `falqon fit`")
    if not path.is_file():
        raise CheckpointError(f"{what} '{path}' is a folder, not a .ckpt file; pass a .ckpt written by `falqon fit`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # truncated zip, garbage bytes, wrong format: one user error
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(
            f"{what} '{path}' is truncated or corrupted ({reason}); pass an intact .ckpt (e.g. checkpoints/last.ckpt)"
        ) from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(k.endswith(".weight_fp8") for k in state):
        raise CheckpointError(
            f"{what} '{path}' is not a FALQON checkpoint (no FP8 'weight_fp8' buffers in its state_dict); pass a "
            "checkpoint written by `falqon fit`"
        )
    return checkpoint


# ------------------------------------------------------------------------------------------------- rebuilding
def _fp8_checkpoint(values: dict[str, Any]) -> Fp8Checkpoint:
    return Fp8Checkpoint(
        Path(values["folder"]),
        values["format"],
        ScaleGranularity(values["weight_scaling"]),
        ScaleGranularity(values["act_scaling"]),
        values["quantization_config"],
    )


def _place_fp8_source_layers(
    model: nn.Module, source: Fp8Checkpoint, layers: list[str], converted: set[str], state: dict[str, torch.Tensor]
) -> None:
    """Put an ``Fp8SourceLinear`` where the FP8 import put one, so that ``convert_model`` builds those layers as it
    did in training (the source's scales, ungrouped); every tensor of theirs is then loaded from ``state``."""
    for name in layers:
        linear = model.get_submodule(name)
        out, cols = linear.out_features, linear.in_features
        if name in converted:
            weight_shape = (out, cols)
            scale_shape = {
                ScaleGranularity.TENSOR: (1,),
                ScaleGranularity.ROW: (out, 1),
                ScaleGranularity.BLOCK: (math.ceil(out / SCALE_BLOCK), math.ceil(cols / SCALE_BLOCK)),
            }[source.weight_scaling]
        elif f"{name}.weight_fp8" in state:  # left unconverted (ignored): stored as the source had it
            weight_shape, scale_shape = state[f"{name}.weight_fp8"].shape, state[f"{name}.weight_scale"].shape
        else:
            continue  # reported as missing against the state below
        bias = None if linear.bias is None else torch.zeros_like(linear.bias)
        placeholder = Fp8SourceLinear(torch.zeros(weight_shape, dtype=E4M3), torch.ones(scale_shape), bias, source)
        model.set_submodule(name, placeholder)


def rebuild_converted(
    config: Any,
    falqon: FalqonConfig,
    converted: list[str],
    dtype: torch.dtype,
    state: dict[str, torch.Tensor],
    *,
    groups: list[list[str]] | None = None,
    fp8_source: dict[str, Any] | None = None,
) -> nn.Module:
    """A causal LM of ``config`` with ``converted`` layers as ``FalqonLinear``, every tensor loaded from ``state``.

    Args:
        groups: the projections that shared one GEMM when ``state`` was saved (``[]``: none; ``None``: not known,
            grouped as ``convert_model`` groups by default). Grouping changes no number of the forward; the rebuilt
            model groups as the trained one did, so it stores and requantizes as in training (a tensor-scaled group
            shares one scale).
        fp8_source: the record of the FP8 checkpoint the model was imported from (``model_record``): its layers are
            rebuilt with the source's scales and the model gets ``falqon_fp8_source``, for the export.

    Raises:
        ValueError: ``state`` does not have exactly the model's tensors (names or shapes), or other groups.
    """
    from transformers import AutoModelForCausalLM

    # No SVD: the saved FP8 bytes overwrite A (the SVD would cost minutes for nothing). GRADIENT stays (its
    # provisional A is random too), so the rebuilt layers carry the trained ones' config.
    init = InitMethod.RANDOM if falqon.init == InitMethod.SVD else falqon.init
    rebuild = dataclasses.replace(falqon, target_modules=list(converted), init=init)
    source_layers = set(fp8_source["layers"]) if fp8_source else set()
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if fp8_source:
            model.falqon_fp8_source = _fp8_checkpoint(fp8_source)
            _place_fp8_source_layers(model, model.falqon_fp8_source, fp8_source["layers"], set(converted), state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the conversion's notes (MoE experts, imported scales) showed in training
            convert_model(model, rebuild, group_projections=groups is None or bool(groups))
    if groups is not None and sorted(_group_names(model)) != sorted(groups):
        raise ValueError(f"projection groups {sorted(_group_names(model))[:1]} against the recorded {groups[:1]}")
    expected = model.state_dict(keep_vars=True)  # keep_vars: grouped layers would copy their FP8 views
    tied: dict[int, set[str]] = {}  # tied weights (embeddings and lm_head) may be stored under one name only
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), set()).add(name)
    alias = {name: names for names in tied.values() for name in names}
    missing = sorted(k for k in expected.keys() - state.keys() if not alias.get(k, set()) & state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(
            f"missing {missing[:2]}, unexpected {unexpected[:2]}, other shapes {reshaped[:2]} against the recorded "
            "model"
        )
    model.load_state_dict(state, strict=False)  # checked above, tied aliases included
    for name, layer in falqon_layers(model).items():
        # An imported layer keeps the source's scales and random A init (as the import set them); the rest are as
        # configured.
        imported = name in source_layers
        layer.config = dataclasses.replace(layer.config, target_modules=falqon.target_modules) if imported else falqon
    return model.eval()


def _tokenizer_from_record(files: dict[str, torch.Tensor]) -> Any:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data.numpy().tobytes())
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def load_checkpoint(path: str | os.PathLike[str], what: str = "checkpoint") -> LoadedCheckpoint:
    """Rebuild the trained model and tokenizer of a ``falqon fit`` checkpoint, without the original model folder.

    Raises:
        CheckpointError: see :func:`read_checkpoint`; also a checkpoint without a model record (written before
            falqon-lit recorded one) or whose tensors do not match its record.
    """
    from transformers import GenerationConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    checkpoint = read_checkpoint(path, what)
    record = checkpoint.get(RECORD_KEY)
    if record is None or "layer_shapes" not in record:
        raise CheckpointError(
            f"{what} '{path}' has no model record (written by an older falqon-lit); resume it once with "
            "`falqon fit --ckpt_path` to write a checkpoint that records its model"
        )
    values = dict(record["config"])
    values.pop("quantization_config", None)  # an imported FP8 backbone: its layers are rebuilt from the record
    config = CONFIG_MAPPING[values["model_type"]].from_dict(values)
    config.architectures = [record["architecture"]]
    prefix = len(_MODEL_PREFIX)
    state = {k[prefix:]: v for k, v in checkpoint["state_dict"].items() if k.startswith(_MODEL_PREFIX)}
    try:
        falqon = FalqonConfig(**record["falqon"])
        model = rebuild_converted(
            config,
            falqon,
            list(record["layer_shapes"]),
            getattr(torch, record["dtype"]),
            state,
            groups=record.get("groups", []),  # checkpoints from before grouped projections ran every layer alone
            fp8_source=record.get("fp8_source"),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{what} '{path}' does not match its own model record ({err}); re-save it") from None
    if record.get("generation_config"):
        model.generation_config = GenerationConfig.from_dict(record["generation_config"])
    return LoadedCheckpoint(model, _tokenizer_from_record(record["tokenizer_files"]), falqon, record)
