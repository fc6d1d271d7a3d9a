"""RowwiseProxyUpdate: schedule (interval, k, warm-up k), accumulation, final flush, logging and state."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import Mock

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import Logger

from falqon_lit.callbacks import RowwiseProxyUpdate
from falqon_lit.config import BPolicy, FalqonConfig


def _mock_logger() -> Mock:
    logger = Mock(spec=Logger)
    logger.name, logger.version, logger.save_dir, logger.log_dir = "mock", 0, None, None
    return logger


def _fit(tiny_trainer_parts, tmp_path: Path, callback: RowwiseProxyUpdate, b_policy: BPolicy, **trainer_kwargs):
    seed_everything(0)
    module, data = tiny_trainer_parts({"falqon": FalqonConfig(b_policy=b_policy), "optim": {"lr": 0.01}})
    logger = _mock_logger()
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[callback],
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=data)
    return module, logger


def test_proxy_update_merges_at_configured_steps_with_warmup_k(tiny_trainer_parts, tmp_path: Path) -> None:
    callback = RowwiseProxyUpdate(k=3, warmup_k=1, warmup_steps=2, every_n_steps=2)
    # 6 optimizer steps of 2 accumulated batches each: merges after steps 2 (warm-up, k=1), 4 and 6 (k=3).
    module, logger = _fit(tiny_trainer_parts, tmp_path, callback, BPolicy.ZERO, max_steps=6, accumulate_grad_batches=2)
    for name, layer in module.falqon_layers().items():
        assert int(layer.merge_calls) == 3, name
        assert int(layer.merge_rows) == 1 + 3 + 3, name
        assert not layer.lora_B.any(), name  # zero policy, and the flush found nothing left
    n_layers = len(module.falqon_layers())
    logged = [c.kwargs["metrics"] for c in logger.log_metrics.mock_calls]
    merged = [m["proxy/rows_merged"] for m in logged if "proxy/rows_merged" in m]
    assert merged == [1.0 * n_layers, 3.0 * n_layers, 3.0 * n_layers]
    assert (callback.updates, callback.rows_merged, callback.rows_flushed) == (3, 7 * n_layers, 0)


def test_proxy_update_flushes_at_fit_end(tiny_trainer_parts, tmp_path: Path) -> None:
    callback = RowwiseProxyUpdate(k=2, every_n_steps=100)  # never scheduled within 3 steps: only the flush merges
    module, _ = _fit(tiny_trainer_parts, tmp_path, callback, BPolicy.KEEP, max_steps=3)
    assert callback.updates == 0
    assert callback.rows_flushed > 0
    assert callback.rows_flushed == sum(int(layer.merge_rows) for layer in module.falqon_layers().values())
    assert all(not layer.lora_B.any() for layer in module.falqon_layers().values())


def test_proxy_update_keep_policy_leaves_unmerged_rows(tiny_trainer_parts, tmp_path: Path) -> None:
    callback = RowwiseProxyUpdate(k=2, flush_at_end=False)
    module, _ = _fit(tiny_trainer_parts, tmp_path, callback, BPolicy.KEEP, max_steps=2)
    layer = module.model.model.layers[0].mlp.gate_proj
    assert int(layer.merge_rows) == 4
    assert (layer.lora_B != 0).any(dim=1).sum() > 2  # the residual of unmerged rows stays in B


def test_proxy_update_state_dict_round_trip() -> None:
    callback = RowwiseProxyUpdate()
    callback.last_step, callback.updates, callback.rows_merged = 7, 3, 42
    restored = RowwiseProxyUpdate()
    restored.load_state_dict(callback.state_dict())
    assert (restored.last_step, restored.updates, restored.rows_merged) == (7, 3, 42)


def test_proxy_update_rows_for_step_uses_warmup_then_rank() -> None:
    callback = RowwiseProxyUpdate(warmup_k=2, warmup_steps=3)
    assert [callback.rows_for_step(s, rank=16) for s in (1, 3, 4)] == [2, 2, 16]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be >= 1 or null, got 0"),
        ({"every_n_steps": 0}, "every_n_steps must be >= 1, got 0"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0, got -1"),
        ({"score": "l2"}, "score must be 'l1', got 'l2'"),
    ],
)
def test_proxy_update_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RowwiseProxyUpdate(**kwargs)


def test_proxy_update_without_falqon_layers_fails(tmp_path: Path) -> None:
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RowwiseProxyUpdate()],
    )
    with pytest.raises(ValueError, match="found no FalqonLinear layer"):
        trainer.fit(BoringModel())
    assert torch.is_grad_enabled()
