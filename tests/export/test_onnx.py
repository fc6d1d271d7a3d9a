"""onnx target: FP8 initializers → DequantizeLinear → MatMul, run by onnxruntime's CPU provider."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from falqon_lit import falqon_layers
from falqon_lit.export import ExportError, ExportOptions, check_manifest, export_model
from falqon_lit.export.verify import DEFAULT_PROMPTS


def _graph(folder):
    return onnx.load(str(folder / "model.onnx"))


_FLOAT32_EXACT_OPS = {"Cast", "Constant", "DequantizeLinear", "Where"}
"""Ops a float64 graph may give float32 outputs: the FP8 round trips, the weights' DequantizeLinear and the
attention mask's 0/-inf selection (exact in either type); any other op with a float32 output rounds to float32."""


def _float32_arithmetic(graph_model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute in float32, from onnx shape inference's value types."""
    inferred = onnx.shape_inference.infer_shapes(graph_model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.output]}
    return [
        n.name
        for n in inferred.node
        if n.op_type not in _FLOAT32_EXACT_OPS and any(types.get(o) == TensorProto.FLOAT for o in n.output)
    ]


def test_onnx_export_holds_trained_fp8_bytes_and_matches_trainer(tiny, tmp_path):
    model, tokenizer, granularity = tiny
    report = export_model(model, tokenizer, "onnx", tmp_path / "onnx")
    graph_model = _graph(tmp_path / "onnx")
    assert max(o.version for o in graph_model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    inits = {i.name: i for i in graph_model.graph.initializer}
    dq_nodes = {n.name: n for n in graph_model.graph.node if n.op_type == "DequantizeLinear"}
    layers = falqon_layers(model)
    assert len(dq_nodes) == len(layers)
    for name, layer in layers.items():
        init = inits[f"{name}.weight_fp8"]
        assert init.data_type == TensorProto.FLOAT8E4M3FN and list(init.dims) == [layer.out_features, layer.in_features]
        want = layer.weight_fp8[: layer.out_features].view(torch.uint8).numpy()
        assert np.frombuffer(init.raw_data, dtype=np.uint8).tobytes() == want.tobytes()
        scale = onnx.numpy_helper.to_array(inits[f"{name}.weight_scale"])
        assert np.array_equal(scale.reshape(-1), layer.weight_scale_rows.reshape(-1).numpy())
        axis = [a.i for a in dq_nodes[f"{name}/dq"].attribute if a.name == "axis"]
        assert axis == ([0] if granularity == "row" else [])
    result = report.results[0]
    assert report.passed and result.bytes_identical == (len(layers), len(layers))
    assert result.prompts_identical >= 8
    assert check_manifest(tmp_path / "onnx") == []


def test_onnx_graph_runs_dynamic_batch_and_sequence(tiny_factory, tmp_path):
    import onnxruntime as ort

    model, tokenizer = tiny_factory("row", "row")
    export_model(model, tokenizer, "onnx", tmp_path / "onnx", verify=False)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(1, 3), (3, 17)]:
        ids = np.random.default_rng(0).integers(0, 256, shape, dtype=np.int64)
        (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        assert logits.shape == (*shape, model.config.vocab_size) and np.isfinite(logits).all()


def test_onnx_weight_only_graph_within_activation_noise(tiny_factory, tmp_path):
    model, tokenizer = tiny_factory("tensor", "tensor")
    report = export_model(model, tokenizer, "onnx", tmp_path / "w", options=ExportOptions(onnx_activations="float"))
    assert report.passed
    assert not any(n.op_type == "Cast" and "FLOAT8" in str(n) for n in _graph(tmp_path / "w").graph.node)


def test_onnx_refuses_opset_below_19():
    with pytest.raises(ExportError, match="opset must be an integer >= 19"):
        ExportOptions(opset=18)


def test_onnx_refuses_unknown_precision():
    with pytest.raises(ExportError, match=r"--onnx-precision must be one of \['float32', 'float64'\], got 'bf16'"):
        ExportOptions(onnx_precision="bf16")


def test_onnx_float64_graph_reproduces_trainer_greedy_tokens(tiny, tmp_path):
    model, tokenizer, _ = tiny
    before = {name: (type(m), *(t.dtype for t in m.parameters(recurse=False))) for name, m in model.named_modules()}
    report = export_model(model, tokenizer, "onnx", tmp_path / "f64", options=ExportOptions(onnx_precision="float64"))
    result = report.results[0]
    layers = falqon_layers(model)
    # The float64 graph and the float64 reference differ only by float64 rounding: every greedy token is the same.
    assert report.passed and result.prompts_identical == result.prompts == 10
    assert result.token_agreement == 1.0 and result.max_rel_err <= 1e-6
    assert result.bytes_identical == (len(layers), len(layers))
    nodes = {n.name: n for n in _graph(tmp_path / "f64").graph.node}
    for name in layers:  # the trained bytes → DequantizeLinear (float32, as in the float32 graph) → Cast to double
        cast = nodes[f"{name}/cast"]
        assert cast.input == nodes[f"{name}/dq"].output and cast.attribute[0].i == TensorProto.DOUBLE
    # The view swapped layers, norms and rotary and widened the dtypes; all of it is back.
    after = {name: (type(m), *(t.dtype for t in m.parameters(recurse=False))) for name, m in model.named_modules()}
    assert after == before


def test_onnx_float64_graph_has_no_float32_arithmetic(tiny, tmp_path):
    model, tokenizer, _ = tiny
    options = ExportOptions(onnx_precision="float64")
    export_model(model, tokenizer, "onnx", tmp_path / "f64", options=options, verify=False)
    # A float32 island (as the exporter once made of the 0-dim per-tensor activation scale) flips an FP8 rounding
    # only where a value lies within float32 rounding of a step, so the logits can hide it for a given model.
    assert _float32_arithmetic(_graph(tmp_path / "f64")) == []


@pytest.mark.slow
def test_onnx_smollm2_trained_runs_on_onnxruntime_within_tolerance(smollm2_trained, tmp_path):
    model, tokenizer, _ = smollm2_trained
    report = export_model(model, tokenizer, "onnx", tmp_path / "smol", prompts=DEFAULT_PROMPTS[:8], new_tokens=6)
    result = report.results[0]
    layers = falqon_layers(model)
    print(f"SmolLM2 onnx: {result.as_dict()}")
    assert report.passed and result.bytes_identical == (len(layers), len(layers))
    # Not bit for bit: onnxruntime's float32 kernels (MatMul, Softmax, normalisation) sum in other orders than
    # torch's, and FP8 activation rounding amplifies a 1-ulp difference into a flipped FP8 value and onwards (see
    # readback.fp8_tolerance), so greedy argmaxes can differ where the top two logits nearly tie.
    assert result.token_agreement >= 0.9


@pytest.mark.slow
def test_onnx_smollm2_float64_graph_gives_identical_greedy_tokens(smollm2_trained, tmp_path):
    model, tokenizer, _ = smollm2_trained
    options = ExportOptions(onnx_precision="float64")
    report = export_model(
        model, tokenizer, "onnx", tmp_path / "smol64", options=options, prompts=DEFAULT_PROMPTS[:8], new_tokens=6
    )
    result = report.results[0]
    print(f"SmolLM2 onnx float64: {result.as_dict()}")
    assert report.passed and result.prompts_identical == result.prompts == 8
    assert result.max_rel_err <= 1e-6


@pytest.mark.parametrize(("dtype", "onnx_type"), [("bfloat16", TensorProto.BFLOAT16), ("float32", TensorProto.FLOAT)])
def test_onnx_stores_tied_embedding_once_in_export_dtype(tiny_factory, tmp_path, dtype, onnx_type):
    model, tokenizer = tiny_factory("row", "row", bf16_exact=False)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    options = ExportOptions(dtype=dtype, onnx_precision="float64")
    report = export_model(model, tokenizer, "onnx", tmp_path / "o", options=options, new_tokens=4)
    # The float64 reference rounds the table as the graph stores it: still every greedy token identical.
    assert report.passed and report.results[0].prompts_identical == report.results[0].prompts
    graph = onnx.load(str(tmp_path / "o" / "model.onnx")).graph
    vocab = model.config.vocab_size
    tables = [(i.name, i.data_type) for i in graph.initializer if vocab in i.dims]
    assert tables == [("model.model.embed_tokens.weight", onnx_type)]  # no float32 or transposed copy of the head
