"""FalqonLitModule: conversion, training, checkpoints, exact resume, generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from falqon_lit.callbacks import FitSummary, RowwiseProxyUpdate
from falqon_lit.config import BPolicy, FalqonConfig, InitMethod
from falqon_lit.layer import FalqonLinear
from falqon_lit.module import FalqonLitModule


def _trainer(tmp_path: Path, **kwargs) -> Trainer:
    defaults = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 0,
    }
    return Trainer(**{**defaults, **kwargs})


def test_module_configure_model_idempotent_and_trains_only_lora_b(tiny_trainer_parts) -> None:
    module, _ = tiny_trainer_parts()
    assert module.model is None and module.tokenizer is not None
    module.configure_model()
    model = module.model
    module.configure_model()
    assert module.model is model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".lora_B") for n in trainable)
    assert len(module.falqon_layers()) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert module.falqon_config == FalqonConfig()


def test_module_fit_lowers_validation_loss(tiny_trainer_parts, tmp_path: Path) -> None:
    seed_everything(0)
    module, data = tiny_trainer_parts(
        {"falqon": FalqonConfig(init=InitMethod.RANDOM), "optim": {"lr": 0.02, "warmup_steps": 2}}
    )
    summary = FitSummary(eval_batches=3, num_samples=1, max_new_tokens=4)
    trainer = _trainer(tmp_path, max_steps=24, callbacks=[RowwiseProxyUpdate(), summary], val_check_interval=6)
    trainer.fit(module, datamodule=data)
    assert summary.loss_after < summary.loss_before - 0.5
    assert len(summary.samples_before) == len(summary.samples_after) == 1
    assert trainer.callback_metrics["val/loss"] < summary.loss_before


def test_end_of_fit_work_runs_before_lightning_moves_the_model_to_cpu(
    tiny_trainer_parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's strategy teardown (model to CPU) precedes on_fit_end: flush and summary must not wait for it."""
    module, data = tiny_trainer_parts()
    events: list[str] = []

    def spy(name: str, fn):
        return lambda *args: (events.append(name), fn(*args))[1]

    summary = FitSummary(eval_batches=1, num_samples=1, max_new_tokens=2)
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[RowwiseProxyUpdate(), summary])
    monkeypatch.setattr(trainer.strategy, "teardown", spy("teardown", trainer.strategy.teardown))
    monkeypatch.setattr(summary, "evaluate", spy("evaluate", summary.evaluate))
    monkeypatch.setattr(FalqonLinear, "flush", spy("flush", FalqonLinear.flush))
    trainer.fit(module, datamodule=data)
    torn_down = events.index("teardown")
    assert events.count("evaluate") == 2 and "flush" in events
    last_flush = len(events) - 1 - events[::-1].index("flush")
    assert last_flush < len(events) - 1 - events[::-1].index("evaluate") < torn_down  # flush, evaluate, teardown


def test_module_gradient_checkpointing_gives_same_gradient(tiny_trainer_parts) -> None:
    grads = []
    for checkpointing in (False, True):
        module, data = tiny_trainer_parts({"gradient_checkpointing": checkpointing})
        data.tokenizer_path = module.backbone.tokenizer  # no Trainer attaches the module here
        data.setup("fit")
        module.configure_model()
        module.train()
        batch = next(iter(data.train_dataloader()))
        module.model.model.layers[0].self_attn.q_proj.lora_B.data.fill_(0.01)  # a non-zero residual path too
        module.loss_and_predictions(batch)[0].backward()
        grads.append(module.model.model.layers[1].mlp.down_proj.lora_B.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_module_compile_keeps_the_function_and_the_parameter_names(tiny_trainer_parts, tmp_path: Path) -> None:
    results = []
    for compiled in (False, True):
        seed_everything(0)
        module, data = tiny_trainer_parts({"compile": compiled, "falqon": FalqonConfig(init=InitMethod.RANDOM)})
        data.tokenizer_path = module.backbone.tokenizer
        data.setup("fit")
        module.configure_model()
        module.train()
        batch = next(iter(data.train_dataloader()))
        module.model.model.layers[0].self_attn.q_proj.lora_B.data.fill_(0.01)  # the residual path too
        loss = module.loss_and_predictions(batch)[0]
        loss.backward()
        grads = torch.cat([layer.lora_B.grad.flatten() for layer in module.falqon_layers().values()])
        results.append((float(loss.detach()), grads, list(module.state_dict()), module.model.model.layers))
    (loss_eager, grad_eager, keys_eager, _), (loss_comp, grad_comp, keys_comp, blocks) = results
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert keys_comp == keys_eager  # in-place compilation: checkpoints and exports read the same names
    # Same function: compiled norms and attention round differently in the last float32 bits, which FP8 activation
    # rounding amplifies a little (gradients are E5M2-quantized in backward); a wrong graph would be O(1) off.
    assert abs(loss_comp - loss_eager) <= 1e-4 * abs(loss_eager)
    assert torch.nn.functional.cosine_similarity(grad_comp, grad_eager, dim=0) > 0.99


def test_compile_blocks_needs_a_decoder_block_list() -> None:
    from falqon_lit.backbone import compile_blocks

    with pytest.raises(ValueError, match="compile needs one decoder block list named 'layers' in Sequential, found 0"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_module_load_from_checkpoint_restores_fp8_state(tiny_trainer_parts, tmp_path: Path) -> None:
    seed_everything(0)
    module, data = tiny_trainer_parts({"falqon": FalqonConfig(b_policy=BPolicy.KEEP)})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = _trainer(
        tmp_path, max_steps=3, callbacks=[RowwiseProxyUpdate(k=2, flush_at_end=False), ckpt], enable_checkpointing=True
    )
    trainer.fit(module, datamodule=data)
    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    saved = torch.load(path, weights_only=True)  # plain hyperparameters: loads without unpickling classes
    assert saved["hyper_parameters"]["falqon"]["b_policy"] == "keep"
    assert saved["optimizer_states"][0]["state"]  # Adam moments of B
    assert saved["lr_schedulers"][0]["last_epoch"] == 3

    loaded = FalqonLitModule.load_from_checkpoint(path)
    assert loaded.falqon_config.b_policy == BPolicy.KEEP
    state = loaded.state_dict()
    for key, value in saved["state_dict"].items():
        assert torch.equal(_bits(state[key]), _bits(value)), key
    layer = loaded.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, FalqonLinear)
    assert int(layer.merge_calls) == 3 and layer.lora_B.abs().sum() > 0
    assert layer.weight_t_fp8 is None  # the default keeps no transposed copy: nothing saved twice, nothing rebuilt
    assert loaded.tokenizer is not None


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    # FP8 tensors compare by their bytes (torch.equal on float8 is not defined everywhere).
    return tensor.detach().clone().view(torch.uint8) if tensor.is_floating_point() and tensor.itemsize == 1 else tensor


def _state_bytes(module: FalqonLitModule) -> dict[str, torch.Tensor]:
    return {k: _bits(v).clone() for k, v in module.state_dict().items()}


def _resume_run(
    tiny_trainer_parts, root: Path, save_every: int, ckpt_path: str | None = None, packing: bool = False
) -> FalqonLitModule:
    seed_everything(123)
    module, data = tiny_trainer_parts(
        {"falqon": FalqonConfig(b_policy=BPolicy.KEEP), "optim": {"lr": 0.01, "warmup_steps": 2}},
        {"group_by_length": True, "packing": packing},
    )
    callbacks = [
        RowwiseProxyUpdate(k=4, warmup_k=1, warmup_steps=3, every_n_steps=2, flush_at_end=False),
        ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=save_every, save_top_k=-1),
    ]
    trainer = _trainer(
        root, max_steps=14, callbacks=callbacks, enable_checkpointing=True, val_check_interval=4, limit_val_batches=1
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize(
    ("resume_step", "packing"), [(5, False), (10, False), (5, True)], ids=["mid-epoch", "epoch-end", "packed"]
)
def test_module_resume_is_bit_exact(tiny_trainer_parts, tmp_path: Path, resume_step: int, packing: bool) -> None:
    # 38 training examples in batches of 4: 10 steps per epoch; 14 steps cross the epoch boundary (packed: 2 examples
    # per row at most, so fewer steps per epoch). The uninterrupted run also writes the checkpoint the second resumes.
    straight = _resume_run(tiny_trainer_parts, tmp_path / "straight", save_every=resume_step, packing=packing)
    straight = _state_bytes(straight)
    (ckpt,) = (tmp_path / "straight" / "ckpt").glob(f"epoch=*-step={resume_step}.ckpt")
    resumed = _resume_run(tiny_trainer_parts, tmp_path / "resumed", 100, ckpt_path=str(ckpt), packing=packing)
    resumed = _state_bytes(resumed)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert straight["model.model.layers.1.self_attn.v_proj.merge_calls"] == 7


def test_module_generate_and_predict(tiny_trainer_parts, tmp_path: Path) -> None:
    module, data = tiny_trainer_parts({"sample_max_new_tokens": 3})
    trainer = _trainer(tmp_path)
    predictions = trainer.predict(module, datamodule=data)
    flat = [p for batch in predictions for p in batch]
    assert len(flat) == len(data.val_conversations)
    assert all(isinstance(p["completion"], str) and p["prompt"].endswith("assistant\n") for p in flat)


@pytest.mark.slow
def test_module_embedded_smollm2_converts_and_generates() -> None:
    # The embedded default backbone; random A skips 210 SVDs (minutes on a busy 2-core CPU).
    module = FalqonLitModule(falqon=FalqonConfig(init=InitMethod.RANDOM), sample_max_new_tokens=4)
    module.configure_model()
    assert len(module.falqon_layers()) == 210  # 30 blocks x 7 linears
    prompt = module.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert "Paris" in module.generate([prompt], max_new_tokens=8)[0]
