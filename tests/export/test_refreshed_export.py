"""An A-refreshed model exports to the vLLM folder and reads back exactly (issue 18)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from falqon_lit import falqon_layers
from falqon_lit.adapter_init import random_directions, refresh_A
from falqon_lit.export import export_model


def test_refreshed_model_exports_its_bytes_and_reads_back_exactly(tiny_factory, tmp_path):
    model, tokenizer = tiny_factory("row", "row")  # trained, with B pending
    layers = falqon_layers(model)
    before = {name: layer.lora_A().clone() for name, layer in layers.items()}
    assert refresh_A(layers, random_directions(layers, 0)) > 0
    assert all(not torch.allclose(layer.lora_A(), before[name]) for name, layer in layers.items())
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():  # one signed step on B along the new A, left pending for the export's flush
        for layer in layers.values():
            layer.lora_B -= 0.05 * layer.lora_B.grad.sign()
    model.eval()

    report = export_model(model, tokenizer, "vllm", tmp_path / "out")
    assert report.rows_flushed > 0  # the step along the new A was merged into the exported bytes
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, layer in layers.items():
        assert torch.equal(stored[f"{name}.weight"].view(torch.uint8), layer.weight_fp8[:-16].view(torch.uint8))
        assert torch.equal(stored[f"{name}.weight_scale"], layer.weight_scale_rows)
    result = report.results[0]  # transformers + compressed-tensors read the folder back: bit-equal logits
    assert result.passed and result.max_rel_err == 0.0 and result.prompts_identical == result.prompts
