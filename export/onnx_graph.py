"""``--target onnx``: the whole causal LM as an ONNX graph whose FALQON weights are FP8 initializers.

Each FALQON layer becomes ``FLOAT8E4M3FN`` initializer ``(out, in)`` (the trained bytes) + float32 scale (scalar, or
``(out,)`` on axis 0 for row scales) → ``DequantizeLinear`` → ``Transpose`` → ``MatMul``, which onnxruntime's CPU
provider runs (opset ≥ 19). By default the graph also rounds each FALQON layer's input to FP8 with the dynamic
scale used in training (``Cast`` to ``FLOAT8E4M3FN`` and back), so it computes what the trainer computes; pass
``activations="float"`` for a weight-only graph.

``precision="float64"`` writes the same graph with every non-FP8 tensor in float64 (the dequantized weights are
widened exactly after ``DequantizeLinear``): slower, but onnxruntime and torch then agree to ~1e-15 and FP8
activation rounding has nothing to amplify, so its greedy tokens are the trainer's (the float32 graph agrees within
the tolerance of ``readback.fp8_tolerance``).

Route: trace with the TorchScript exporter (``torch.onnx.export(dynamo=False)``; the dynamo exporter needs
``onnxscript``) while each ``FalqonLinear`` is swapped for a stand-in computing ``x @ deq(W)ᵀ`` from a buffer named
``<layer>.weight_t``, then swap that float initializer for the FP8 initializer + ``DequantizeLinear`` with ``onnx``.
Signature: ``input_ids, attention_mask (int64, [batch, sequence]) -> logits (float32, [batch, sequence, vocab])``,
no KV cache.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from falqon_lit.config import ScaleGranularity
from falqon_lit.experts import routed_experts
from falqon_lit.layer import falqon_layers
from falqon_lit.layer_base import FalqonLayer

from .errors import ExportError
from .hf_folder import write_tokenizer_and_generation_config
from .standin import ActivationMode, Precision, dequantized_view

ONNX_OPSET = 19
"""First opset with FP8 ``DequantizeLinear`` and ``Cast``."""
ONNX_FILE = "model.onnx"
_EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf caps a model file at 2 GiB; keep weights beside it past 1 GiB


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()


def _trace(model: nn.Module, path: Path, opset: int) -> None:
    example = torch.randint(0, max(int(model.config.vocab_size) - 1, 1), (2, 8))
    wrapper = _LogitsOnly(model)
    axes = {"batch": 0, "sequence": 1}
    dynamic_axes = {name: {v: k for k, v in axes.items()} for name in ("input_ids", "attention_mask", "logits")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings about the TorchScript exporter
        try:
            torch.onnx.export(
                wrapper,
                (example, torch.ones_like(example)),
                str(path),
                dynamo=False,
                opset_version=opset,
                # Folding would store Cast(table)ᵀ of the output head as a second, float32 initializer; onnxruntime
                # folds constants itself when it loads the graph.
                do_constant_folding=False,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_axes=dynamic_axes,
            )
        except Exception as err:
            raise ExportError(
                f"torch.onnx could not trace {type(model).__name__} ({type(err).__name__}: {err}); the onnx target "
                "supports Hugging Face causal LMs that the TorchScript exporter can trace"
            ) from err


def _fp8_subgraph(
    name: str, layer: FalqonLayer, output: str, precision: Precision
) -> tuple[list[TensorProto], list[onnx.NodeProto]]:
    """FP8 initializer + scale → DequantizeLinear (→ Cast) → Transpose: ``output`` ``(in, out)`` in ``precision``."""
    w_fp8 = layer.weight_fp8[: layer.out_features].detach().cpu().contiguous()  # (out, in), the trained bytes
    weight = helper.make_tensor(
        f"{name}.weight_fp8",
        TensorProto.FLOAT8E4M3FN,
        list(w_fp8.shape),
        w_fp8.view(torch.uint8).numpy().tobytes(),
        raw=True,
    )
    scale_hp = layer.weight_scale_rows.detach().cpu().float()
    per_row = scale_hp.numel() > 1
    scale = numpy_helper.from_array(
        (scale_hp.reshape(-1) if per_row else scale_hp.reshape(())).numpy(), f"{name}.weight_scale"
    )
    dq_attrs = {"axis": 0} if per_row else {}
    dequantized = f"{name}.weight_dq"
    dq = helper.make_node("DequantizeLinear", [weight.name, scale.name], [dequantized], name=f"{name}/dq", **dq_attrs)
    nodes = [dq]
    if precision != Precision.FLOAT32:
        wide = f"{dequantized}.wide"
        nodes.append(helper.make_node("Cast", [dequantized], [wide], name=f"{name}/cast", to=precision.onnx_type))
        dequantized = wide
    nodes.append(helper.make_node("Transpose", [dequantized], [output], name=f"{name}/t", perm=[1, 0]))
    return [weight, scale], nodes


def _swap_in_fp8(graph_model: onnx.ModelProto, layers: dict[str, FalqonLayer], precision: Precision) -> None:
    graph = graph_model.graph
    initializers = {init.name: init for init in graph.initializer}
    new_inits, new_nodes = [], []
    for name, layer in layers.items():
        traced = f"model.{name}.weight_t"
        if traced not in initializers:
            raise ExportError(
                f"the ONNX exporter merged or renamed the weight of layer {name!r} (no initializer {traced!r}), so "
                "its FP8 bytes cannot be placed; this happens when two layers hold identical weights"
            )
        graph.initializer.remove(initializers.pop(traced))
        inits, nodes = _fp8_subgraph(name, layer, traced, precision)
        new_inits += inits
        new_nodes += nodes
    graph.initializer.extend(new_inits)
    # Prepend: these nodes read only initializers, so the graph stays topologically sorted.
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + old_nodes)


def require_dense(model: nn.Module) -> None:
    """Refuse a mixture-of-experts model: its routing (``aten::histc``, data-dependent expert loops) does not trace.

    Raises:
        ExportError: the model has routed experts.
    """
    experts = routed_experts(model)
    if experts:
        raise ExportError(
            f"--target onnx cannot export a mixture-of-experts model ({type(model).__name__}: {len(experts)} routed "
            "expert blocks; torch.onnx cannot trace the routing); use --target vllm or --target hf"
        )


def write_onnx(
    model: nn.Module,
    tokenizer: Any,
    folder: Path,
    *,
    activations: ActivationMode | str = ActivationMode.FP8,
    precision: Precision | str = Precision.FLOAT32,
    opset: int = ONNX_OPSET,
    table_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, Any]:
    """Write ``model.onnx`` (+ ``model.onnx.data`` past 1 GiB), tokenizer and generation config into ``folder``.

    The model must already be flushed. The input embedding and output head are stored once, in ``table_dtype``
    (``--dtype``), and cast at run time (see ``embedding_standin``). Returns manifest facts (FP8 initializers,
    opset, activation mode, precision).

    Raises:
        ExportError: an opset below 19, or a model the TorchScript exporter cannot trace.
    """
    require_dense(model)
    activations, precision = ActivationMode(activations), Precision(precision)
    if opset < ONNX_OPSET:
        raise ExportError(
            f"FP8 DequantizeLinear needs ONNX opset >= {ONNX_OPSET}, got {opset}; use --opset {ONNX_OPSET}"
        )
    blocked = [n for n, m in falqon_layers(model).items() if m.config.weight_scaling == ScaleGranularity.BLOCK]
    if blocked:
        raise ExportError(
            f"--target onnx writes per-tensor or per-row FP8 scales, but {len(blocked)} layers (first: {blocked[0]!r}) "
            "have 128x128 block scales; export them with --target vllm (or hf)"
        )
    traced_dir = folder / "_traced"
    traced_dir.mkdir()
    with dequantized_view(model, activations, precision, table_dtype) as layers:
        _trace(model, traced_dir / ONNX_FILE, opset)
    graph_model = onnx.load(str(traced_dir / ONNX_FILE))
    shutil.rmtree(traced_dir)
    _swap_in_fp8(graph_model, layers, precision)
    graph_model.producer_name = "falqon-export"
    external = graph_model.ByteSize() > _EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        graph_model,
        str(folder / ONNX_FILE),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{ONNX_FILE}.data",
    )
    onnx.checker.check_model(str(folder / ONNX_FILE))
    write_tokenizer_and_generation_config(model, tokenizer, folder)
    model.config.save_pretrained(folder)
    tensors = {
        f"{name}.weight_fp8": {"shape": [layer.out_features, layer.in_features], "dtype": "float8_e4m3fn"}
        for name, layer in layers.items()
    }
    return {
        "tensors": tensors,
        "onnx": {
            "opset": opset,
            "activations": activations.value,
            "precision": precision.value,
            "embedding_dtype": str(table_dtype).removeprefix("torch."),
            "inputs": ["input_ids", "attention_mask"],
            "outputs": ["logits"],
            "fp8_layers": len(layers),
            "external_data": external,
        },
    }
