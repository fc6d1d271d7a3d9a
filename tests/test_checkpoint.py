"""``falqon_lit.checkpoint``: the model record in every checkpoint, resume checks, loading without the model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fp8_checkpoints import write_fp8_checkpoint
from lightning.pytorch import Trainer, seed_everything
from tiny_models import tiny_llama, tiny_llama_config

from falqon_lit.callbacks import RowwiseProxyUpdate
from falqon_lit.checkpoint import RECORD_KEY, CheckpointError, load_checkpoint, mismatch, model_record
from falqon_lit.config import FalqonConfig
from falqon_lit.data import InstructionDataModule
from falqon_lit.grouped import projection_groups
from falqon_lit.layer import falqon_layers, flush_all
from falqon_lit.module import FalqonLitModule


def _config(**changes):
    from transformers import AutoConfig

    values = tiny_llama_config(**changes)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _fit(root: Path, model: str | dict, tokenizer: Path, data: Path, **options) -> tuple[FalqonLitModule, Path]:
    """A module fine-tuned 3 steps under ``root``, and the path of its final checkpoint."""
    seed_everything(0)
    module = FalqonLitModule(model=model, tokenizer=str(tokenizer), **options)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=[RowwiseProxyUpdate(k=4)],
    )
    trainer.fit(module, datamodule=InstructionDataModule(str(data), max_length=64, batch_size=4))
    return module, root / "checkpoints" / "last.ckpt"


def _same_layers(loaded: torch.nn.Module, trained: torch.nn.Module) -> None:
    trained_layers = falqon_layers(trained)
    for name, layer in falqon_layers(loaded).items():
        assert torch.equal(layer.weight_fp8.view(torch.uint8), trained_layers[name].weight_fp8.view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, trained_layers[name].weight_scale), name
        assert layer.config == trained_layers[name].config, name
    assert falqon_layers(loaded).keys() == trained_layers.keys()


def _same_logits(loaded: torch.nn.Module, trained: torch.nn.Module) -> None:
    ids = torch.tensor([[5, 17, 42, 99, 200]])
    trained.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def _groups(model: torch.nn.Module) -> list[list[str]]:
    names = {id(layer): name for name, layer in falqon_layers(model).items()}
    return sorted([names[id(m)] for m in group.members] for group in projection_groups(model))


@pytest.fixture
def trained_from_folder(tmp_path: Path, tiny_chat_tokenizer_dir: Path, tiny_chat_jsonl: Path):
    """A module fine-tuned 3 steps from a model *folder*, the folder, and the path of its final checkpoint."""
    folder = tmp_path / "backbone"
    tiny_llama().save_pretrained(folder)
    module, path = _fit(tmp_path / "run", str(folder), tiny_chat_tokenizer_dir, tiny_chat_jsonl)
    return module, folder, path


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
    _same_layers(loaded.model, module.model)
    _same_logits(loaded.model, module.model)
    text = "hello how are you"
    assert loaded.tokenizer(text).input_ids == module.tokenizer(text).input_ids
    assert loaded.falqon_config == module.falqon_config
    assert loaded.record["fp8_source"] is None and not hasattr(loaded.model, "falqon_fp8_source")


@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_checkpoint_rebuilds_projection_groups_as_trained(
    scaling: str, tmp_path: Path, tiny_chat_tokenizer_dir: Path, tiny_chat_jsonl: Path
) -> None:
    # Grouped q/k/v and gate/up store per-projection tensors; the rebuilt model groups them again (one stacked FP8
    # weight; tensor-scaled: one scale tensor shared by the group, as vLLM's fused QKV wants) and merges as trained.
    falqon = {"weight_scaling": scaling, "act_scaling": scaling}
    module, path = _fit(tmp_path, tiny_llama_config(), tiny_chat_tokenizer_dir, tiny_chat_jsonl, falqon=falqon)
    loaded = load_checkpoint(path)
    assert _groups(loaded.model) == _groups(module.model) == sorted(loaded.record["groups"])
    assert len(loaded.record["groups"]) == 4  # q/k/v and gate/up of 2 blocks
    for group in projection_groups(loaded.model):
        shared = {m.weight_scale.data_ptr() for m in group.members}
        assert len(shared) == (1 if scaling == "tensor" else len(group.members))
    _same_layers(loaded.model, module.model)
    torch.manual_seed(torch.seed() % 2**31)
    for name, layer in falqon_layers(module.model).items():
        b = torch.randn_like(layer.lora_B) * 0.05
        with torch.no_grad():
            layer.lora_B.copy_(b)
            falqon_layers(loaded.model)[name].lora_B.copy_(b)
    assert flush_all(loaded.model) == flush_all(module.model) > 0
    _same_layers(loaded.model, module.model)


def test_checkpoint_without_fused_block_rebuilds_ungrouped_and_resumes_grouped(
    tmp_path: Path, tiny_chat_tokenizer_dir: Path, tiny_chat_jsonl: Path
) -> None:
    # fused_block picks kernels, not the model: its checkpoints load into either setting.
    module, path = _fit(tmp_path, tiny_llama_config(), tiny_chat_tokenizer_dir, tiny_chat_jsonl, fused_block=False)
    loaded = load_checkpoint(path)
    assert loaded.record["groups"] == [] and _groups(loaded.model) == []
    _same_layers(loaded.model, module.model)
    _same_logits(loaded.model, module.model)
    resumed = FalqonLitModule(model=tiny_llama_config(), tokenizer=str(tiny_chat_tokenizer_dir), fused_block=True)
    resumed.on_load_checkpoint(torch.load(path, weights_only=True))  # no CheckpointError


@pytest.mark.parametrize("scheme", ["ct-channel", "fp8-block"])
def test_checkpoint_of_an_imported_fp8_model_rebuilds_it_with_its_source(
    scheme: str, tmp_path: Path, tiny_chat_tokenizer_dir: Path, tiny_chat_jsonl: Path
) -> None:
    torch.manual_seed(torch.seed() % 2**31)
    folder = write_fp8_checkpoint(tiny_llama(hidden_size=192, intermediate_size=320), tmp_path / scheme, scheme)
    module, path = _fit(tmp_path / "run", str(folder), tiny_chat_tokenizer_dir, tiny_chat_jsonl)
    assert module.fp8_source_layers  # the import kept FP8 layers as stored
    loaded = load_checkpoint(path)
    source, trained_source = loaded.model.falqon_fp8_source, module.model.falqon_fp8_source
    assert source == trained_source
    assert loaded.record["fp8_source"]["layers"] == module.fp8_source_layers
    _same_layers(loaded.model, module.model)  # the source's scales (row or block) and configs
    assert _groups(loaded.model) == _groups(module.model)
    _same_logits(loaded.model, module.model)


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


def test_checkpoint_mismatch_ignores_kernel_choices_and_fields_added_later() -> None:
    base = {"config": _config(), "dtype": torch.float32}
    saved = model_record(falqon=FalqonConfig(backend="torch"), **base)
    assert mismatch(saved, model_record(falqon=FalqonConfig(backend="auto", transpose_cache=True), **base)) is None
    del saved["falqon"]["merge_threshold"]  # written before the field existed: its default
    assert mismatch(saved, model_record(falqon=FalqonConfig(), **base)) is None
    assert "merge_threshold" in mismatch(saved, model_record(falqon=FalqonConfig(merge_threshold=0.5), **base))


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
