"""Exporters: vLLM (compressed-tensors FP8), ONNX (FP8 initializers + DequantizeLinear) and dequantized HF folders.

No post-training quantization: every target writes the trained FP8 bytes (or their exact dequantization).
"""

from .errors import ExportError
from .hf import write_hf
from .loading import ExportSource, load_for_export, save_falqon_model
from .manifest import MANIFEST_NAME, atomic_directory, check_manifest, read_manifest
from .onnx_graph import ONNX_OPSET, write_onnx
from .pipeline import TARGETS, ExportOptions, ExportReport, ExportTarget, export_model, get_target
from .standin import ActivationMode
from .verify import DEFAULT_PROMPTS, Tolerance, VerifyResult, print_report
from .vllm import VllmPlan, WeightStrategy, build_quantization_config, plan_vllm_export, write_vllm

__all__ = [
    # entry points
    "export_model",
    "load_for_export",
    "save_falqon_model",
    "ExportError",
    "ExportOptions",
    "ExportReport",
    "ExportSource",
    # registry
    "TARGETS",
    "ExportTarget",
    "get_target",
    # targets
    "write_vllm",
    "plan_vllm_export",
    "build_quantization_config",
    "VllmPlan",
    "WeightStrategy",
    "write_onnx",
    "ActivationMode",
    "ONNX_OPSET",
    "write_hf",
    # verification and manifest
    "DEFAULT_PROMPTS",
    "Tolerance",
    "VerifyResult",
    "print_report",
    "MANIFEST_NAME",
    "atomic_directory",
    "read_manifest",
    "check_manifest",
]
