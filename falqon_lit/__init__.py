"""falqon-lit: FALQON FP8 melded-LoRA fine-tuning on Lightning, exported as FP8 checkpoints with no PTQ step.

The public names below load on first use (PEP 562), so ``falqon --help`` does not wait for torch to import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # module -> public names, grouped: config, convert, numerics, layer
    "falqon_lit.config": (
        "BPolicy",
        "Backend",
        "FalqonConfig",
        "GemmRole",
        "InitMethod",
        "Rounding",
        "ScaleGranularity",
    ),
    "falqon_lit.convert": ("ConversionReport", "convert_model", "dense_state_dict"),
    "falqon_lit.fp8.quantizer": ("Float8Quantizer", "Float8Tensor"),
    "falqon_lit.layer": ("FalqonLinear", "falqon_layers", "flush_all"),
    "falqon_lit.layer_base": ("FalqonLayer",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'falqon_lit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
