"""Exported tensor names are the model's own checkpoint names (what ``save_pretrained`` writes), for every family;
mixture-of-experts models say what stays high precision and refuse the ONNX target."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from tiny_families import FAMILIES, MOE_FAMILIES, tiny_family

from falqon_lit import FalqonConfig, InitMethod, convert_model, falqon_layers
from falqon_lit.export import ExportError, export_model


def _keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def _converted(model_type: str, tmp_path):
    """(FALQON model, the names save_pretrained writes for the same model before conversion)."""
    torch.manual_seed(0)
    model = tiny_family(model_type)
    for param in model.parameters():  # bf16 values, so the bf16 exports are exact
        param.data = param.data.bfloat16().float()
    model.save_pretrained(tmp_path / "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_model(model, FalqonConfig(rank=16, init=InitMethod.RANDOM))
    return model, _keys(tmp_path / "reference")


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_export_tensor_names_match_save_pretrained(model_type, tmp_path, byte_tok):
    model, reference = _converted(model_type, tmp_path)
    export_model(model, byte_tok, "hf", tmp_path / "hf", verify=False)
    assert _keys(tmp_path / "hf") == reference
    export_model(model, byte_tok, "vllm", tmp_path / "vllm", verify=False)
    written = _keys(tmp_path / "vllm")
    scales = {k for k in written if k.endswith(".weight_scale")}
    assert written - scales == reference and len(scales) == len(falqon_layers(model))
    ignore = json.loads((tmp_path / "vllm" / "config.json").read_text())["quantization_config"]["ignore"]
    tied_head = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert all(f"{name}.weight" in reference | tied_head for name in ignore), ignore  # the checkpoint's modules


def test_gpt_neox_head_is_embed_out(tmp_path, byte_tok):
    model, _ = _converted("gpt_neox", tmp_path)
    export_model(model, byte_tok, "vllm", tmp_path / "vllm", verify=False)
    assert "embed_out.weight" in _keys(tmp_path / "vllm") and "lm_head.weight" not in _keys(tmp_path / "vllm")
    ignore = json.loads((tmp_path / "vllm" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "embed_out" in ignore


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_moe_export_ignores_router_and_experts_and_verifies(model_type, tmp_path, byte_tok):
    model, _ = _converted(model_type, tmp_path)
    report = export_model(model, byte_tok, "vllm", tmp_path / "vllm", new_tokens=4)
    assert report.passed, [r.as_dict() for r in report.results]
    ignore = json.loads((tmp_path / "vllm" / "config.json").read_text())["quantization_config"]["ignore"]
    block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    assert f"model.layers.0.{block}.gate" in ignore  # the router
    first_expert = "w1" if model_type == "mixtral" else "gate_proj"
    assert f"model.layers.1.{block}.experts.3.{first_expert}" in ignore


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_moe_conversion_says_experts_stay_high_precision(model_type):
    torch.manual_seed(0)
    model = tiny_family(model_type)
    with pytest.warns(UserWarning, match=r"8 routed experts in 2 blocks .* stay float32 and are not trained"):
        convert_model(model, FalqonConfig(rank=16, init=InitMethod.RANDOM))


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_moe_onnx_target_refused_before_any_work(model_type, tmp_path, byte_tok):
    model, _ = _converted(model_type, tmp_path)
    with pytest.raises(ExportError, match=r"^--target onnx cannot export a mixture-of-experts model"):
        export_model(model, byte_tok, "onnx", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
