"""RowwiseProxyUpdate's A options: gradient-informed init at train start, A refresh schedule, exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from falqon_lit.callbacks import RowwiseProxyUpdate
from falqon_lit.config import BPolicy, FalqonConfig, InitMethod


def _trainer(root: Path, callbacks: list, **kwargs) -> Trainer:
    defaults = {
        "default_root_dir": root,
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    return Trainer(**{**defaults, **kwargs}, callbacks=callbacks)


def _parts(tiny_trainer_parts, init: InitMethod = InitMethod.SVD):
    seed_everything(123)
    falqon = FalqonConfig(b_policy=BPolicy.KEEP, init=init)
    return tiny_trainer_parts({"falqon": falqon, "optim": {"lr": 0.01}}, {"group_by_length": True})


def _lora_As(module) -> dict[str, torch.Tensor]:
    return {name: layer.lora_A().clone() for name, layer in module.falqon_layers().items()}


def test_gradient_init_runs_once_at_train_start(tiny_trainer_parts, tmp_path: Path) -> None:
    module, data = _parts(tiny_trainer_parts, InitMethod.GRADIENT)
    callback = RowwiseProxyUpdate(k=2, calibration_batches=2, flush_at_end=False)
    placeholders: dict[str, torch.Tensor] = {}

    class Probe(RowwiseProxyUpdate):  # the random placeholder A, just before calibration replaces it
        def on_train_start(self, trainer, pl_module):
            placeholders.update(_lora_As(pl_module))

    _trainer(tmp_path, [Probe(), callback], max_steps=1).fit(module, datamodule=data)
    assert callback.a_initialised and callback.state_dict()["a_initialised"]
    for name, lora_A in _lora_As(module).items():
        assert not torch.allclose(lora_A, placeholders[name]), name
        norms = lora_A.norm(dim=1)  # orthonormal directions scaled to the kaiming row norm (FP8-rounded)
        assert torch.allclose(norms, torch.full_like(norms, 1 / math.sqrt(3)), rtol=0.05), name


def test_default_config_fit_calibrates_A_on_4_batches_before_the_first_step(tiny_trainer_parts, tmp_path: Path) -> None:
    seed_everything(123)
    module, data = tiny_trainer_parts({"optim": {"lr": 0.01}})  # FalqonConfig() as it comes
    assert module.falqon_config.init == InitMethod.GRADIENT
    seen: dict = {}

    class Probe(Callback):  # before RowwiseProxyUpdate: sees the provisional A, then A and B at the first step
        def on_train_start(self, trainer, pl_module):
            seen["provisional"] = _lora_As(pl_module)
            seen["losses"] = 0
            loss_and_predictions = pl_module.loss_and_predictions

            def counted(batch):
                seen["losses"] += 1
                return loss_and_predictions(batch)

            pl_module.loss_and_predictions = counted

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["calibrated"] = _lora_As(pl_module)
            seen["calibration losses"] = seen["losses"]
            seen["B"] = [layer.lora_B.detach().clone() for layer in pl_module.falqon_layers().values()]

    _trainer(tmp_path, [Probe(), RowwiseProxyUpdate()], max_steps=1).fit(module, datamodule=data)
    assert seen["calibration losses"] == 4  # the study's calibration: 4 training batches
    assert all(not b.any() for b in seen["B"])
    for name, lora_A in seen["calibrated"].items():
        assert not torch.allclose(lora_A, seen["provisional"][name]), name


def test_gradient_init_keeps_A_of_a_model_that_has_trained(tiny_trainer_parts, tmp_path: Path) -> None:
    """A trained module fitted further (no ckpt_path) keeps the A its B was learnt against: no failure, no new A."""
    seed_everything(123)
    module, data = tiny_trainer_parts({"optim": {"lr": 0.01}})
    module.configure_model()
    layers = module.falqon_layers()
    with torch.no_grad():
        next(iter(layers.values())).lora_B.normal_(0, 1e-3)  # one trained row is enough
    before = _lora_As(module)
    seen: dict = {}

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("A", _lora_As(pl_module))

    callback = RowwiseProxyUpdate()
    with pytest.warns(UserWarning, match="calibration skipped: B is not zero"):
        _trainer(tmp_path, [callback, Probe()], max_steps=1).fit(module, datamodule=data)
    assert callback.a_initialised
    assert all(torch.equal(seen["A"][name], before[name]) for name in before)


def test_gradient_init_without_a_calibrating_callback_warns(tiny_trainer_parts, tmp_path: Path) -> None:
    seed_everything(123)
    module, data = tiny_trainer_parts()
    with pytest.warns(UserWarning, match="init: gradient needs the RowwiseProxyUpdate callback"):
        _trainer(tmp_path, [], max_steps=1).fit(module, datamodule=data)


@pytest.mark.parametrize("directions", ["gradient", "random"])
def test_refresh_replaces_A_every_n_steps_but_not_after_the_last(
    tiny_trainer_parts, tmp_path: Path, directions: str
) -> None:
    module, data = _parts(tiny_trainer_parts)
    module.configure_model()
    initial = _lora_As(module)
    callback = RowwiseProxyUpdate(k=2, refresh_every_n_steps=2, refresh_directions=directions, flush_at_end=False)
    trainer = _trainer(tmp_path, [callback], max_steps=4)
    trainer.fit(module, datamodule=data)
    assert callback.refreshes == 1  # after step 2; step 4 is the last
    assert callback.rows_refreshed > 0 and callback._capture is None
    for name, lora_A in _lora_As(module).items():
        if directions == "random":  # orthogonal to the previous A
            q = torch.linalg.qr(initial[name].double().t()).Q
            assert (lora_A.double() @ q).abs().max() < 0.05 * lora_A.abs().max(), name
        else:
            assert not torch.allclose(lora_A, initial[name]), name
    # Adam restarted for B at the refresh: 2 steps of state since, not 4
    state = trainer.optimizers[0].state
    assert all(int(s["step"]) == 2 for s in state.values())


def _resume_run(tiny_trainer_parts, root: Path, save_every: int, ckpt_path: str | None = None):
    module, data = _parts(tiny_trainer_parts, InitMethod.GRADIENT)
    callbacks = [
        RowwiseProxyUpdate(k=4, refresh_every_n_steps=3, flush_at_end=False),
        ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=save_every, save_top_k=-1),
    ]
    trainer = _trainer(root, callbacks, max_steps=8, enable_checkpointing=True)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, callbacks[0]


def _state_bytes(module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in module.state_dict().items():
        value = value.detach().clone()
        out[key] = value.view(torch.uint8) if value.is_floating_point() and value.itemsize == 1 else value
    return out


def test_refresh_and_gradient_init_resume_bit_exact(tiny_trainer_parts, tmp_path: Path) -> None:
    # Checkpoint at step 4: after the calibration and the refresh at step 3, before the one at step 6.
    straight, straight_cb = _resume_run(tiny_trainer_parts, tmp_path / "straight", save_every=4)
    ckpt = tmp_path / "straight" / "ckpt" / "epoch=0-step=4.ckpt"
    resumed, resumed_cb = _resume_run(tiny_trainer_parts, tmp_path / "resumed", 100, ckpt_path=str(ckpt))
    assert straight_cb.refreshes == resumed_cb.refreshes == 2
    a, b = _state_bytes(straight), _state_bytes(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_refresh_options_are_validated_and_round_trip() -> None:
    with pytest.raises(ValueError, match="refresh_every_n_steps must be >= 1") as err:
        RowwiseProxyUpdate(refresh_every_n_steps=0, refresh_directions="svd", calibration_batches=0)
    assert "refresh_directions must be" in str(err.value) and "calibration_batches must be" in str(err.value)
    callback = RowwiseProxyUpdate(refresh_every_n_steps=5)
    callback.refreshes, callback.rows_refreshed, callback.a_initialised = 3, 99, True
    restored = RowwiseProxyUpdate()
    restored.load_state_dict(callback.state_dict())
    assert (restored.refreshes, restored.rows_refreshed, restored.a_initialised) == (3, 99, True)
    old = {"last_step": 7, "updates": 3, "rows_merged": 42}  # a checkpoint from before A refreshes
    restored.load_state_dict(old)
    assert (restored.refreshes, restored.a_initialised) == (0, False)
