"""Import → fit → export round trip of FP8 checkpoints: the export is the source's format, untouched rows keep the
source's bytes and scales exactly, and transformers (+ compressed-tensors) reads it back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from fp8_checkpoints import SCHEMES, write_fp8_checkpoint
from lightning.pytorch import Trainer
from safetensors.torch import load_file
from tiny_models import tiny_llama

from falqon_lit.callbacks import RowwiseProxyUpdate
from falqon_lit.export import check_manifest, export_model
from falqon_lit.export.manifest import read_manifest
from falqon_lit.layer import falqon_layers

# k/v projections have 64 rows: a partial 128-row block. Input widths stay multiples of 128 because compressed-tensors
# (the read-back) quantizes 1 × 128 activation groups only when the width divides; partial column blocks are tested
# against the float64 reference in tests/test_block_scales.py and on import in tests/test_fp8_checkpoint.py.
TINY_FP8 = {"hidden_size": 256, "intermediate_size": 384, "num_key_value_heads": 1}


def _bf16_valued(model: torch.nn.Module) -> torch.nn.Module:
    """Round parameters (not buffers: rotary frequencies stay float32) to bf16 values, kept in float32."""
    for param in model.parameters():
        param.data = param.data.bfloat16().float()
    return model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fp8_checkpoint_fit_export_round_trip_keeps_untouched_rows(scheme, tiny_trainer_parts, tmp_path):
    torch.manual_seed(torch.seed() % 2**31)
    # bf16-valued weights: the bf16 export of embeddings and norms is then lossless, and the read-back must
    # reproduce the trainer bit for bit (only the FP8 path is under test).
    source = write_fp8_checkpoint(_bf16_valued(tiny_llama(**TINY_FP8)), tmp_path / scheme, scheme)
    module, data = tiny_trainer_parts({"model": str(source), "falqon": {"rank": 16, "b_policy": "zero"}})
    trainer = Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[RowwiseProxyUpdate(k=4)],
    )  # fmt: skip
    trainer.fit(module, data)
    model = module.model.cpu()
    report = export_model(model, module.tokenizer, "vllm", tmp_path / "out", new_tokens=3)
    results = {r.backend: r for r in report.results}
    assert results["transformers + compressed-tensors (CPU)"].passed, results

    src, out = _tensors(source), _tensors(tmp_path / "out")
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
        == json.loads((source / "config.json").read_text())["quantization_config"]
    )
    scale_key = "weight_scale_inv" if scheme.startswith("fp8") else "weight_scale"
    touched_any = False
    for name, layer in falqon_layers(model).items():
        src_w, out_w = src[f"{name}.weight"].view(torch.uint8), out[f"{name}.weight"].view(torch.uint8)
        assert torch.equal(out_w, layer.weight_fp8[: layer.out_features].view(torch.uint8))  # the trained bytes
        changed = (src_w != out_w).any(dim=1)
        touched_any |= bool(changed.any())
        assert int(changed.sum()) <= int(layer.merge_rows)  # only merged rows can differ
        src_s, out_s = src[f"{name}.{scale_key}"], out[f"{name}.{scale_key}"]
        assert out_s.shape == src_s.shape
        if scheme == "ct-channel":  # a merged row gets a fresh row scale; every other scale is the source's
            assert torch.equal(out_s[~changed], src_s[~changed])
        else:  # tensor and block scales are kept through merges
            assert torch.equal(out_s, src_s)
    assert touched_any  # the proxy update did merge rows
    assert check_manifest(tmp_path / "out") == []
    hashes = read_manifest(tmp_path / "out")["source_checkpoint"]["sha256"]
    assert hashes == {
        f: hashlib.sha256((source / f).read_bytes()).hexdigest() for f in ("model.safetensors", "config.json")
    }


def test_block_trained_model_exports_as_compressed_tensors_block(tiny_chat_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from falqon_lit import FalqonConfig, convert_model

    torch.manual_seed(torch.seed() % 2**31)
    model = _bf16_valued(tiny_llama(**TINY_FP8))
    convert_model(model, FalqonConfig(rank=16, weight_scaling="block", act_scaling="block"))
    with torch.no_grad():
        for layer in falqon_layers(model).values():
            layer.lora_B.normal_(0, 1e-3)  # a pending residual for the export's flush
    report = export_model(model, AutoTokenizer.from_pretrained(tiny_chat_tokenizer_dir), "vllm", tmp_path / "out")
    assert report.results[0].passed, report.results[0]
    scheme = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]
    args = next(iter(scheme.values()))
    assert (args["weights"]["strategy"], args["weights"]["block_structure"]) == ("block", [128, 128])
    assert (args["input_activations"]["strategy"], args["input_activations"]["group_size"]) == ("group", 128)
    out = _tensors(tmp_path / "out")
    for name, layer in falqon_layers(model).items():
        assert out[f"{name}.weight_scale"].shape == (-(-layer.out_features // 128), -(-layer.in_features // 128))


def test_onnx_export_refuses_block_scales(tiny_chat_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from falqon_lit import FalqonConfig, convert_model
    from falqon_lit.export import ExportError

    model = tiny_llama(**TINY_FP8)
    convert_model(model, FalqonConfig(rank=16, weight_scaling="block", act_scaling="block"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_tokenizer_dir)
    with pytest.raises(ExportError, match="have 128x128 block scales; export them with --target vllm"):
        export_model(model, tokenizer, "onnx", tmp_path / "onnx", verify=False)
    assert not (tmp_path / "onnx").exists()


def test_fp8_checkpoint_exports_its_format_from_a_lightning_checkpoint(tiny_trainer_parts, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from falqon_lit.export import load_for_export

    torch.manual_seed(torch.seed() % 2**31)
    source = write_fp8_checkpoint(_bf16_valued(tiny_llama(**TINY_FP8)), tmp_path / "fp8-block", "fp8-block")
    module, data = tiny_trainer_parts({"model": str(source)})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[RowwiseProxyUpdate(k=4), ckpt],
    )  # fmt: skip
    trainer.fit(module, data)
    loaded = load_for_export(tmp_path / "ckpt" / "last.ckpt")  # rebuilt from the FP8 folder, trained state loaded
    export_model(loaded.model, loaded.tokenizer, "vllm", tmp_path / "out", new_tokens=2)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((source / "config.json").read_text())["quantization_config"]
    out = _tensors(tmp_path / "out")
    for name, layer in falqon_layers(module.model).items():  # the trained bytes, not the source's
        assert torch.equal(
            out[f"{name}.weight"].view(torch.uint8), layer.weight_fp8[: layer.out_features].view(torch.uint8)
        )


def test_block_export_with_input_widths_off_the_128_grid_checks_bytes_only(tiny_chat_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from falqon_lit import FalqonConfig, convert_model

    model = _bf16_valued(tiny_llama(hidden_size=192, intermediate_size=320))  # SmolLM2-like: 192 = 1.5 × 128
    convert_model(model, FalqonConfig(rank=16, weight_scaling="block", act_scaling="block"))
    report = export_model(model, AutoTokenizer.from_pretrained(tiny_chat_tokenizer_dir), "vllm", tmp_path / "out")
    readback = report.results[0]
    assert readback.passed and readback.bytes_identical == (14, 14)
    assert readback.notes[0].startswith("logits not compared: compressed-tensors quantizes 1x128 activation groups")
