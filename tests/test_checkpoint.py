"""``falqon_lit.checkpoint``: the model record in every checkpoint, resume checks, loading without the model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from tiny_models import tiny_llama, tiny_llama_config

from falqon_lit.callbacks import RowwiseProxyUpdate
from falqon_lit.checkpoint import RECORD_KEY, CheckpointError, load_checkpoint, mismatch, model_record
from falqon_lit.config import FalqonConfig
from falqon_lit.data import InstructionDataModule
from falqon_lit.layer import falqon_layers
from falqon_lit.module import FalqonLitModule


def _config(**changes):
    from transformers import AutoConfig

    values = tiny_llama_config(**changes)
    return AutoConfig.for_model(values.pop("model_type"), **values)


@pytest.fixture
def trained_from_folder(tmp_path: Path, tiny_chat_tokenizer_dir: Path, tiny_chat_jsonl: Path):
    """A module fine-tuned 3 steps from a model *folder*, and the path of its final checkpoint."""
    seed_everything(0)
    folder = tmp_path / "backbone"
    tiny_llama().save_pretrained(folder)
    module = FalqonLitModule(model=str(folder), tokenizer=str(tiny_chat_tokenizer_dir))
    data = InstructionDataModule(str(tiny_chat_jsonl), max_length=64, batch_size=4)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path / "run",
        callbacks=[RowwiseProxyUpdate(k=4)],
    )
    trainer.fit(module, datamodule=data)
    return module, folder, tmp_path / "run" / "checkpoints" / "last.ckpt"


def test_checkpoint_final_save_follows_the_flush(trained_from_folder) -> None:
    module, _, path = trained_from_folder
    saved = torch.load(path, weights_only=True)  # the record is plain data and tensors
    assert saved["global_step"] == 3
    b_keys = [k for k in saved["state_dict"] if k.endswith("lora_B")]
    assert b_keys and all(not saved["state_dict"][k].any() for k in b_keys)  # flushed: B is zero everywhere
    record = saved[RECORD_KEY]
    assert record["architecture"] == "LlamaForCausalLM"
    assert record["layer_shapes"]["model.layers.0.mlp.down_proj"] == [64, 128]
    expected = model_record(module.backbone.config, module.falqon_config, torch.float32)
    assert (record["config_sha256"], record["falqon"]) == (expected["config_sha256"], expected["falqon"])


def test_checkpoint_loads_without_the_model_folder(trained_from_folder) -> None:
    module, folder, path = trained_from_folder
    shutil.rmtree(folder)
    loaded = load_checkpoint(path)
    trained = dict(falqon_layers(module.model))
    for name, layer in falqon_layers(loaded.model).items():
        assert torch.equal(layer.weight_fp8.view(torch.uint8), trained[name].weight_fp8.view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, trained[name].weight_scale), name
    ids = torch.tensor([[5, 17, 42, 99, 200]])
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, module.model(input_ids=ids).logits)
    text = "hello how are you"
    assert loaded.tokenizer(text).input_ids == module.tokenizer(text).input_ids
    assert loaded.falqon_config == module.falqon_config


def test_checkpoint_export_loader_is_the_same_loader(trained_from_folder) -> None:
    from falqon_lit.export import load_for_export

    module, folder, path = trained_from_folder
    shutil.rmtree(folder)
    source = load_for_export(path)
    ids = torch.tensor([[3, 4, 5]])
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(source.model(input_ids=ids).logits, module.model(input_ids=ids).logits)


def test_checkpoint_without_record_is_refused_in_one_line(tmp_path: Path) -> None:
    state = {"model.model.layers.0.mlp.up_proj.weight_fp8": torch.zeros(16, 16, dtype=torch.float8_e4m3fn)}
    torch.save({"state_dict": state}, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match=r"'.*old.ckpt' has no model record .*falqon fit --ckpt_path"):
        load_checkpoint(tmp_path / "old.ckpt")


def test_checkpoint_whose_tensors_do_not_match_its_record_is_refused(trained_from_folder, tmp_path: Path) -> None:
    _, _, path = trained_from_folder
    saved = torch.load(path, weights_only=False)
    del saved["state_dict"]["model.model.norm.weight"]
    torch.save(saved, tmp_path / "edited.ckpt")
    with pytest.raises(CheckpointError, match=r"does not match its own model record \(missing \['model.norm.weight'\]"):
        load_checkpoint(tmp_path / "edited.ckpt")


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"config": _config(model_type="mistral")}, "it holds a llama model, the configured model is a mistral"),
        (
            {"config": _config(num_hidden_layers=3)},
            "its llama config differs from the configured model's: num_hidden_layers 2 vs 3",
        ),
        ({"falqon": FalqonConfig(rank=32)}, "its FALQON config differs: rank 16 vs 32"),
        ({"dtype": torch.bfloat16}, "it was trained in float32, --model.dtype is bfloat16"),
    ],
    ids=["architecture", "config", "falqon", "dtype"],
)
def test_checkpoint_mismatch_names_what_differs(changed: dict, message: str) -> None:
    base = {"config": _config(), "falqon": FalqonConfig(), "dtype": torch.float32}
    saved = model_record(**base)
    assert mismatch(saved, model_record(**base)) is None
    assert mismatch(saved, model_record(**{**base, **changed})) == message
