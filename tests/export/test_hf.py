"""hf target: a plain, dequantized Hugging Face folder."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from falqon_lit import falqon_layers
from falqon_lit.export import ExportOptions, export_model


def test_hf_export_round_trips_dequantized_weights(tiny, tmp_path):
    model, tokenizer, _ = tiny
    report = export_model(model, tokenizer, "hf", tmp_path / "hf")
    assert report.passed
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config
    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name, layer in falqon_layers(model).items():
        assert torch.equal(stored[f"{name}.weight"], layer.dequantized_weight().to(torch.bfloat16))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(
        reloaded.model.layers[0].mlp.down_proj.weight,
        model.model.layers[0].mlp.down_proj.dequantized_weight().bfloat16(),
    )


def test_hf_export_float32_is_lossless(tiny_factory, tmp_path):
    model, tokenizer = tiny_factory("row", "row")
    report = export_model(model, tokenizer, "hf", tmp_path / "hf32", options=ExportOptions(dtype="float32"))
    assert report.passed and report.results[0].bytes_identical == (14, 14)
    stored = load_file(str(tmp_path / "hf32" / "model.safetensors"))
    layer = model.model.layers[1].self_attn.k_proj
    assert torch.equal(stored["model.layers.1.self_attn.k_proj.weight"], layer.dequantized_weight())
