"""QuantStats: logged statistics equal a direct computation; plot written; argument checks."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import Mock

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import Logger

from falqon_lit.callbacks import QuantStats
from falqon_lit.fp8.numerics import E4M3, dequantize, quantize_dynamic

LAYER = "model.model.layers.0.self_attn.q_proj"


class _CaptureInputs(Callback):
    """Records the inputs of one layer for every forward, with the optimizer step they belong to."""

    def __init__(self) -> None:
        self.inputs: list[tuple[int, torch.Tensor]] = []

    def on_fit_start(self, trainer: Trainer, pl_module) -> None:
        layer = pl_module.get_submodule(LAYER)
        layer.register_forward_pre_hook(lambda _, args: self.inputs.append((trainer.global_step, args[0].detach())))


def test_quant_stats_match_direct_computation(tiny_trainer_parts, tmp_path: Path) -> None:
    seed_everything(0)
    module, data = tiny_trainer_parts()
    logger = Mock(spec=Logger)
    logger.name, logger.version, logger.save_dir, logger.log_dir = "mock", 0, None, None
    capture, stats = _CaptureInputs(), QuantStats(every_n_steps=2)
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=4,
        limit_val_batches=0,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[capture, stats],
    )
    trainer.fit(module, datamodule=data)

    calls = [c.kwargs for c in logger.log_metrics.mock_calls if "quant/w_amax" in c.kwargs["metrics"]]
    assert [c["step"] for c in calls] == [2, 4]
    logged = calls[-1]["metrics"]

    # Activations of the step-4 forward (global_step 3 while it runs), quantized as the layer does.
    x = torch.cat([t.reshape(-1, t.shape[-1]) for step, t in capture.inputs if step == 3]).float()
    x_fp8, scale = quantize_dynamic(x, E4M3, module.falqon_config.act_scaling)
    prefix = f"quant/{LAYER}/"
    assert logged[prefix + "a_amax"] == pytest.approx(x.abs().max().item(), rel=1e-6)
    assert logged[prefix + "a_scale"] == pytest.approx(scale.amax().item(), rel=1e-6)  # largest over tokens
    assert logged[prefix + "a_sat_frac"] == pytest.approx((x_fp8.float().abs() == 448).float().mean().item())
    underflow = ((x != 0) & (x_fp8.float() == 0)).float().mean().item()
    assert logged[prefix + "a_underflow_frac"] == pytest.approx(underflow)

    # Weights never change without proxy updates; B is the one trained at step 4 (no later step).
    layer = module.get_submodule(LAYER)
    w_fp8 = layer.weight_fp8[: layer.out_features].float()
    assert logged[prefix + "w_amax"] == pytest.approx(
        dequantize(layer.weight_fp8, layer.weight_scale)[: layer.out_features].abs().max().item(), rel=1e-6
    )
    assert logged[prefix + "w_scale"] == pytest.approx(layer.weight_scale_rows.amax().item())  # largest W row
    assert logged[prefix + "w_sat_frac"] == pytest.approx((w_fp8.abs() == 448).float().mean().item())
    assert logged[prefix + "w_zero_frac"] == pytest.approx((w_fp8 == 0).float().mean().item())
    assert logged[prefix + "b_row_norm_max"] == pytest.approx(layer.lora_B.norm(dim=1).max().item(), rel=1e-6)
    assert logged[prefix + "merge_rows"] == 0.0

    layers = module.falqon_layers()
    per_layer = [logged[f"quant/model.{name}/w_amax"] for name in layers]
    assert logged["quant/w_amax"] == max(per_layer)
    assert (tmp_path / "quant_stats.png").stat().st_size > 0
    assert stats.history["a_amax"][0][0] == 2
    assert not stats._handles  # hooks only live during logging steps


def test_quant_stats_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match=r"QuantStats\.every_n_steps must be >= 1, got 0"):
        QuantStats(every_n_steps=0)
