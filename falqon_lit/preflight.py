"""Check that a backbone converts, before any weight is loaded: the model is built on the meta device (no memory,
no time) and every layer the conversion would take is checked against the FALQON config (rank, targets)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from falqon_lit.config import FP8_GEMM_ALIGNMENT, FalqonConfig
from falqon_lit.convert import convert_model


def check_conversion(config: Any, falqon: FalqonConfig) -> None:
    """Raise the error ``convert_model`` would raise on the real model, without loading its weights.

    Raises:
        ValueError: a rank not below a target layer's size, target names that match no linear, or no layer to convert.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    probed: list[str] = []

    def probe(linear: nn.Linear, name: str) -> bool:
        # Check what FalqonLinear would refuse, then keep the linear: there is nothing to quantize on meta tensors.
        aligned = not (linear.in_features % FP8_GEMM_ALIGNMENT or linear.out_features % FP8_GEMM_ALIGNMENT)
        if aligned and falqon.rank >= min(linear.in_features, linear.out_features):
            raise ValueError(
                f"--model.falqon.rank {falqon.rank} must be below the size of every converted layer, but {name!r} "
                f"is {linear.out_features} x {linear.in_features}; lower the rank or add the layer to "
                "--model.falqon.ignore"
            )
        probed.append(name)
        return False

    try:
        convert_model(model, falqon, module_filter_fn=probe)
    except ValueError:
        if not probed:  # a real problem (targets matching nothing, no linear at all), not the probe's refusals
            raise
