"""Import published FP8 checkpoints: build the FALQON backbone from their FP8 bytes and scales, with no
dequantize/requantize of ``W``.

Recognised folders (``config.json`` ``quantization_config``):

- compressed-tensors ``float-quantized`` FP8 with one config group: weights ``tensor``, ``channel`` or ``block``
  (128 × 128) scales, input activations dynamic (``tensor``, ``token`` or ``group`` of 128) or absent
  (weight-only; FALQON then quantizes activations at the weight's granularity);
- native ``fp8`` (``quant_method: fp8``, ``weight_scale_inv`` tensors, which despite the name are dequantization
  multipliers): ``weight_block_size: [128, 128]`` or none (tensor scale), dynamic activations.

The weight scheme is kept (``tensor`` → tensor scale, ``channel`` → row scales, ``block`` → block scales) and
activations follow the checkpoint's scheme, whatever ``FalqonConfig`` says. ``A`` is initialised at random
(Kaiming-uniform, as PEFT initialises LoRA ``A``): the paper's SVD init decomposes the FP8 quantization error of
``W``, and a checkpoint's weights are exactly representable, so that error is zero; with ``B = 0`` the imported
model computes exactly what the checkpoint does. Everything else (int4, NVFP4/MXFP, static activation scales that
a dynamic FP8 GEMM cannot honour, several config groups) gets one :class:`UnsupportedCheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from falqon_lit.config import FalqonConfig, InitMethod, ScaleGranularity
from falqon_lit.fp8.numerics import E4M3, dequantize, expand_block_scale, quantize, quantize_weight
from falqon_lit.layer import FalqonLinear, init_lora_A
from falqon_lit.layer_base import salt_of

SUPPORTED = (
    "compressed-tensors float-quantized FP8 (weights tensor, channel or block [128, 128]; input activations dynamic "
    "or none) and native fp8 (weight_block_size [128, 128] or none; activation_scheme dynamic)"
)

_CT_WEIGHT = {"tensor": ScaleGranularity.TENSOR, "channel": ScaleGranularity.ROW, "block": ScaleGranularity.BLOCK}
_CT_ACT = {"tensor": ScaleGranularity.TENSOR, "token": ScaleGranularity.ROW, "group": ScaleGranularity.BLOCK}


class UnsupportedCheckpointError(ValueError):
    """A quantized checkpoint FALQON cannot start from."""


@dataclass(frozen=True)
class Fp8Checkpoint:
    """What an FP8 folder holds and how FALQON reads it."""

    folder: Path
    """The checkpoint folder."""
    format: str
    """``compressed-tensors`` or ``fp8`` (native)."""
    weight_scaling: ScaleGranularity
    """Weight scale granularity, kept through training and export."""
    act_scaling: ScaleGranularity
    """Dynamic activation scale granularity (the checkpoint's, or the weight's for weight-only checkpoints)."""
    quantization_config: dict[str, Any]
    """The source ``quantization_config``, written back by the export."""

    @property
    def scale_suffix(self) -> str:
        """Name suffix of the scale tensors: ``weight_scale`` (compressed-tensors) or ``weight_scale_inv``."""
        return "weight_scale" if self.format == "compressed-tensors" else "weight_scale_inv"

    def file_hashes(self) -> dict[str, str]:
        """SHA-256 of every safetensors and ``config.json`` file of the source, for the export manifest."""
        files = [*sorted(self.folder.glob("*.safetensors")), self.folder / "config.json"]
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _unsupported(folder: Path, what: str) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(
        f"--model {str(folder)!r}: {what} is not supported by the FP8 import; supported are {SUPPORTED}; "
        f"dequantize it to bf16 first to fine-tune it as a plain model"
    )


def _is_fp8(args: dict[str, Any]) -> bool:
    return args.get("num_bits") == 8 and args.get("type") == "float"


def _compressed_tensors_scheme(folder: Path, qc: dict[str, Any]) -> tuple[ScaleGranularity, ScaleGranularity]:
    if qc.get("format") not in ("float-quantized", None):
        raise _unsupported(folder, f"compressed-tensors format {qc.get('format')!r}")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise _unsupported(folder, f"a compressed-tensors config with {len(groups)} config groups (need one)")
    scheme = next(iter(groups.values()))
    weights, acts = scheme.get("weights") or {}, scheme.get("input_activations")
    strategy = weights.get("strategy")
    if not _is_fp8(weights) or strategy not in _CT_WEIGHT:
        kind = f"{weights.get('num_bits')}-bit {weights.get('type')} weights with strategy {strategy!r}"
        raise _unsupported(folder, kind)
    if strategy == "block" and list(weights.get("block_structure") or []) != [128, 128]:
        raise _unsupported(folder, f"block structure {weights.get('block_structure')}")
    if scheme.get("output_activations"):
        raise _unsupported(folder, "output activation quantization")
    if acts is None:
        return _CT_WEIGHT[strategy], _CT_WEIGHT[strategy]
    if not acts.get("dynamic"):
        raise _unsupported(folder, "static input activation scales (FALQON's FP8 GEMMs scale activations dynamically)")
    act_strategy = acts.get("strategy")
    if not _is_fp8(acts) or act_strategy not in _CT_ACT or (act_strategy == "group" and acts.get("group_size") != 128):
        raise _unsupported(folder, f"input activations {acts.get('num_bits')}-bit {acts.get('type')} {act_strategy}")
    return _CT_WEIGHT[strategy], _CT_ACT[act_strategy]


def _native_fp8_scheme(folder: Path, qc: dict[str, Any]) -> tuple[ScaleGranularity, ScaleGranularity]:
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise _unsupported(folder, f"native fp8 activation_scheme {qc.get('activation_scheme')!r}")
    block = qc.get("weight_block_size")
    if block is None:
        return ScaleGranularity.TENSOR, ScaleGranularity.TENSOR
    if list(block) != [128, 128]:
        raise _unsupported(folder, f"native fp8 weight_block_size {block}")
    return ScaleGranularity.BLOCK, ScaleGranularity.BLOCK


def detect_fp8_checkpoint(folder: str | Path) -> Fp8Checkpoint | None:
    """The FP8 scheme of a local model folder; ``None`` for an unquantized folder (or a hub name).

    Raises:
        UnsupportedCheckpointError: a quantized folder in a scheme FALQON cannot start from.
    """
    folder = Path(folder).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    qc = json.loads(config_file.read_text()).get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        w, a = _compressed_tensors_scheme(folder, qc)
    elif method == "fp8":
        w, a = _native_fp8_scheme(folder, qc)
    else:
        raise _unsupported(folder, f"quant_method {method!r}")
    return Fp8Checkpoint(folder, "compressed-tensors" if method == "compressed-tensors" else "fp8", w, a, qc)


class Fp8SourceLinear(nn.Module):
    """A linear layer as the checkpoint stores it (FP8 bytes and source-shaped scale), until conversion.

    ``convert_model`` turns it into a ``FalqonLinear`` with :meth:`to_falqon`; one left unconverted (ignored)
    computes with its dequantized weight.
    """

    def __init__(self, weight_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, source: Fp8Checkpoint):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.source = source
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def row_scale(self) -> torch.Tensor:
        """The scale in FALQON's layout for ``W``: ``(1,)``, ``(out, 1)`` or row-expanded blocks ``(out, G)``."""
        if self.source.weight_scaling == ScaleGranularity.TENSOR:
            return self.weight_scale.reshape(1)
        if self.source.weight_scaling == ScaleGranularity.ROW:
            return self.weight_scale.reshape(self.out_features, 1)
        return expand_block_scale(self.weight_scale, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize(self.weight_fp8, self.row_scale(), x.dtype)
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_falqon(self, config: FalqonConfig, name: str = "") -> FalqonLinear:
        """A ``FalqonLinear`` whose ``W`` rows are this layer's bytes and scales, and ``A`` random rows of its own
        (its own row or block scales; with a tensor scale, quantized with ``W``'s scale). ``init: svd`` becomes
        ``random`` (there is no high-precision ``W`` whose FP8 error it would take); ``init: gradient`` stays, so
        fit calibrates ``A`` as for any layer."""
        kept = (self.source.weight_scaling, self.source.act_scaling)
        if (config.weight_scaling, config.act_scaling) != kept:
            warnings.warn(
                f"--model {str(self.source.folder)!r} is FP8 with {kept[0].value} weight and {kept[1].value} "
                f"activation scales: they replace weight_scaling={config.weight_scaling.value!r}, "
                f"act_scaling={config.act_scaling.value!r} (the checkpoint's bytes are kept as they are)",
                stacklevel=2,
            )
        init = InitMethod.RANDOM if config.init == InitMethod.SVD else config.init
        config = replace(config, weight_scaling=kept[0], act_scaling=kept[1], init=init)
        device = self.weight_fp8.device
        lora_dtype = torch.float32 if self.bias is None or self.bias.dtype != torch.float64 else torch.float64
        try:
            layer = FalqonLinear(self.in_features, self.out_features, config, self.bias is not None, device, lora_dtype)
        except ValueError as err:
            raise ValueError(f"{err} (layer {name!r})") from None
        salt = salt_of(name)
        lora_A = init_lora_A(torch.empty(0, self.in_features, device=device), config.rank, config, salt)
        w_scale = self.row_scale()
        if config.weight_scaling == ScaleGranularity.TENSOR:
            a_fp8, scale = quantize(lora_A, w_scale, E4M3), w_scale
        else:
            a_fp8, a_scale = quantize_weight(lora_A, config.weight_scaling)
            scale = torch.cat([w_scale, a_scale])
        state = {"weight_fp8": torch.cat([self.weight_fp8, a_fp8]), "weight_scale": scale}
        if self.bias is not None:
            state["bias"] = self.bias
        layer.load_state_dict(state, strict=False)  # also rebuilds the transposed copy
        layer.salt = salt
        return layer


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"--model {str(folder)!r} has no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def load_fp8_model(source: Fp8Checkpoint, dtype: torch.dtype, init_seed: int = 0) -> PreTrainedModel:
    """The checkpoint's model with every FP8 linear as an :class:`Fp8SourceLinear` (bytes and scales as stored) and
    every other tensor (embeddings, norms, ``lm_head``) loaded in ``dtype``.

    Raises:
        ValueError: an FP8 weight without its scale, or tensors the model does not have.
    """
    config = AutoConfig.from_pretrained(source.folder)
    del config.quantization_config  # built as a plain model: the FP8 layers are put in below
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _read_tensors(source.folder)
    fp8_names = set()
    for key in [k for k, t in tensors.items() if t.dtype == E4M3 and k.endswith(".weight")]:
        name = key[: -len(".weight")]
        fp8_names.add(name)
        scale = tensors.pop(f"{name}.{source.scale_suffix}", None)
        if scale is None:
            raise ValueError(f"--model {str(source.folder)!r}: FP8 weight {key!r} has no {source.scale_suffix!r}")
        for extra in ("input_scale", "weight_zero_point"):
            tensors.pop(f"{name}.{extra}", None)
        bias = tensors.pop(f"{name}.bias", None)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent, child, Fp8SourceLinear(tensors.pop(key), scale, None if bias is None else bias.to(dtype), source)
        )
    hp = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    missing, unexpected = model.load_state_dict(hp, strict=False)
    tied = "lm_head.weight" if config.tie_word_embeddings else None
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in fp8_names and k != tied]
    if unexpected or missing:
        raise ValueError(
            f"--model {str(source.folder)!r}: tensors do not match the model (unexpected {unexpected[:3]}, missing "
            f"{missing[:3]})"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model.falqon_fp8_source = source
    return model
