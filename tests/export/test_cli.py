"""falqon-export CLI: end-to-end through a saved FALQON folder, atomic writes and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from falqon_lit import falqon_layers
from falqon_lit.exit_codes import EXIT_OK, EXIT_USAGE
from falqon_lit.export import ExportError, export_model, load_for_export, save_falqon_model
from falqon_lit.export.cli import main


@pytest.fixture
def saved(tiny_factory, tmp_path):
    model, tokenizer = tiny_factory("row", "row")
    return save_falqon_model(model, tokenizer, tmp_path / "saved"), model


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()  # progress lines may come first
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith("falqon-export: error: "), lines
    return errors[0]


def test_save_falqon_model_round_trips_fp8_buffers_and_b(saved):
    folder, model = saved
    source = load_for_export(folder)
    for name, layer in falqon_layers(model).items():
        loaded = falqon_layers(source.model)[name]
        assert torch.equal(loaded.weight_fp8.view(torch.uint8), layer.weight_fp8.view(torch.uint8))
        assert torch.equal(loaded.weight_scale, layer.weight_scale)
        assert torch.equal(loaded.lora_B, layer.lora_B)  # still pending: the export flushes, not the save
    assert source.tokenizer is not None and source.falqon_config.act_scaling.value == "row"


def test_cli_vllm_writes_exact_file_set(saved, tmp_path, capsys):
    folder, _ = saved
    out = tmp_path / "vllm"
    assert main(["--target", "vllm", "--ckpt", str(folder), "--out", str(out), "--json"]) == EXIT_OK
    results = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert results[0]["passed"] and results[0]["bytes_identical"] == [14, 14]
    assert results[1]["gating"] is False  # the noise-bound comparison, reported as information
    assert results[2]["backend"] == "vLLM" and results[2]["status"] == "skipped" and results[2]["passed"] is None
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "falqon_manifest.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    manifest = json.loads((out / "falqon_manifest.json").read_text())
    assert manifest["vllm"]["weight_strategy"] == "channel" and manifest["vllm"]["input_activations"] == "token"
    assert manifest["falqon_config"]["weight_scaling"] == "row"
    assert not list(tmp_path.glob(".vllm.*"))  # no temporary folder left behind


def test_cli_needs_force_to_replace(saved, tmp_path, capsys):
    folder, _ = saved
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert main(["--target", "hf", "--ckpt", str(folder), "--out", str(out), "--no-verify"]) == EXIT_USAGE
    assert "already exists; pass --force" in _error_line(capsys)
    assert (out / "keep.txt").exists()
    assert main(["--target", "hf", "--ckpt", str(folder), "--out", str(out), "--no-verify", "--force"]) == EXIT_OK
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_cli_unknown_target_one_line_error(saved, tmp_path, capsys):
    folder, _ = saved
    assert main(["--target", "tflite", "--ckpt", str(folder), "--out", str(tmp_path / "x")]) == EXIT_USAGE
    assert "unknown export target 'tflite'; choose one of vllm, onnx, hf" in _error_line(capsys)


def test_cli_not_a_falqon_checkpoint_one_line_error(tiny_factory, tmp_path, capsys):
    model, _ = tiny_factory("tensor", "tensor")
    plain = tmp_path / "plain"
    model.config.save_pretrained(plain)  # an HF folder without FALQON metadata
    assert main(["--target", "vllm", "--ckpt", str(plain), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    assert "is not a FALQON model folder" in _error_line(capsys)
    bogus = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, bogus)
    assert main(["--target", "vllm", "--ckpt", str(bogus), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    assert "is not a FALQON checkpoint" in _error_line(capsys)
    assert main(["--target", "vllm", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in _error_line(capsys)


def test_cli_missing_tokenizer_one_line_error(tiny_factory, tmp_path, capsys):
    model, _ = tiny_factory("tensor", "tensor")
    folder = save_falqon_model(model, None, tmp_path / "no_tok")
    assert main(["--target", "onnx", "--ckpt", str(folder), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    assert "has no tokenizer files" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_cli_onnx_float64_reports_identical_greedy_tokens(saved, tmp_path, capsys):
    folder, _ = saved
    out = tmp_path / "onnx64"
    argv = ["--target", "onnx", "--ckpt", str(folder), "--out", str(out), "--onnx-precision", "float64", "--json"]
    assert main(argv) == EXIT_OK
    (result,) = json.loads(capsys.readouterr().out)
    assert result["backend"] == "onnxruntime (CPU, float64)" and result["prompts_identical"] == result["prompts"]
    manifest = json.loads((out / "falqon_manifest.json").read_text())
    assert manifest["export_options"]["onnx_precision"] == "float64" and manifest["onnx"]["precision"] == "float64"
    argv = ["--target", "onnx", "--ckpt", str(folder), "--out", str(tmp_path / "x"), "--onnx-precision", "fp16"]
    assert main(argv) == EXIT_USAGE
    assert "--onnx-precision must be one of ['float32', 'float64'], got 'fp16'" in _error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_cli_layer_target_cannot_express_one_line_error(tiny_factory, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from falqon_lit import FalqonConfig, convert_model

    model, tokenizer = tiny_factory("tensor", "tensor")
    partial = LlamaForCausalLM(model.config)
    convert_model(partial, FalqonConfig(rank=16, target_modules=["q_proj", "gate_proj"]))
    folder = save_falqon_model(partial, tokenizer, tmp_path / "partial")
    assert main(["--target", "vllm", "--ckpt", str(folder), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    assert "vLLM fuses" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("target", ["vllm", "onnx", "hf"])
def test_export_killed_midway_leaves_no_folder(tiny_factory, tmp_path, monkeypatch, target):
    import falqon_lit.export.hf_folder as hf_folder

    model, tokenizer = tiny_factory("tensor", "tensor")
    real = hf_folder.write_tokenizer_and_generation_config

    def crash(model, tokenizer, folder):
        real(model, tokenizer, folder)  # some files are on disk already
        raise KeyboardInterrupt("killed")

    for module in ("vllm", "onnx_graph", "hf"):
        monkeypatch.setattr(f"falqon_lit.export.{module}.write_tokenizer_and_generation_config", crash)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, tokenizer, target, tmp_path / "out", verify=False)
    assert list(tmp_path.iterdir()) == []


def test_export_model_refuses_model_without_falqon_layers(tiny_factory, tmp_path):
    from transformers import LlamaForCausalLM

    model, tokenizer = tiny_factory("tensor", "tensor")
    with pytest.raises(ExportError, match="has no FalqonLinear layers"):
        export_model(LlamaForCausalLM(model.config), tokenizer, "vllm", tmp_path / "o")


def test_cli_exports_lightning_checkpoint(tiny_trainer_parts, tmp_path, capsys):
    from lightning import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    seed_everything(0)
    module, data = tiny_trainer_parts({"falqon": {"init": "random"}, "optim": {"lr": 0.02}})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[ckpt],
    )
    trainer.fit(module, datamodule=data)
    path = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    out = tmp_path / "from_ckpt"
    assert main(["--target", "vllm", "--ckpt", str(path), "--out", str(out), "--new-tokens", "4"]) == EXIT_OK
    module.model.eval()
    for name, layer in falqon_layers(module.model).items():
        layer.flush()  # what the export did to its own copy
        stored = load_file(str(out / "model.safetensors"))[f"{name}.weight"]
        assert torch.equal(stored.view(torch.uint8), layer.weight_fp8[: layer.out_features].view(torch.uint8))
