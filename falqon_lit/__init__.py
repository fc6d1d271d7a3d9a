"""falqon-lit: FALQON FP8 melded-LoRA fine-tuning on Lightning, exported as FP8 checkpoints with no PTQ step."""

from falqon_lit.config import Backend, BPolicy, FalqonConfig, GemmRole, InitMethod, Rounding, ScaleGranularity
from falqon_lit.convert import ConversionReport, convert_model, dense_state_dict
from falqon_lit.fp8.quantizer import Float8Quantizer, Float8Tensor
from falqon_lit.layer import FalqonLinear, falqon_layers, flush_all

__all__ = [
    # config
    "BPolicy",
    "Backend",
    "FalqonConfig",
    "GemmRole",
    "InitMethod",
    "Rounding",
    "ScaleGranularity",
    # numerics and layer
    "FalqonLinear",
    "Float8Quantizer",
    "Float8Tensor",
    # convert
    "ConversionReport",
    "convert_model",
    "dense_state_dict",
    "falqon_layers",
    "flush_all",
]
