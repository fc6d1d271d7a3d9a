"""``QuantStats``: FP8 quantization statistics of every ``FalqonLinear``, to any Lightning logger plus a plot.

Every ``every_n_steps`` optimizer steps, per layer and summarised over layers:

- activations (forward pre-hooks on the layer inputs, installed only for logging steps): ``a_amax``, ``a_scale``
  (the dynamic E4M3 scale, largest over tokens with per-token scaling), ``a_sat_frac`` (values at the FP8 maximum)
  and ``a_underflow_frac`` (non-zero values that quantize to zero);
- weights ``W`` (the ``A`` rows excluded): ``w_amax``, ``w_scale`` (largest row scale with row scaling),
  ``w_sat_frac`` and ``w_zero_frac`` (FP8 values at the maximum / at zero);
- ``b_row_norm_max``/``b_row_norm_mean`` (L2 norms of the rows of ``B``; place this callback before
  ``RowwiseProxyUpdate`` to see ``B`` before it is merged);
- the layer's merge counters (``merge_rows``, ``merge_saturated``, ``merge_lost``, ``merge_calls``,
  ``merge_magnitude``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from falqon_lit.fp8.numerics import E4M3, fp8_max, quantize_dynamic
from falqon_lit.layer import falqon_layers
from falqon_lit.layer_base import MERGE_COUNTERS, FalqonLayer

_SUMMARY = {  # statistic -> how layers are summarised
    "a_amax": "max",
    "a_scale": "max",
    "a_sat_frac": "mean",
    "a_underflow_frac": "mean",
    "w_amax": "max",
    "w_scale": "max",
    "w_sat_frac": "mean",
    "w_zero_frac": "mean",
    "b_row_norm_max": "max",
    "b_row_norm_mean": "mean",
    **dict.fromkeys(MERGE_COUNTERS, "sum"),
}


@torch.no_grad()
def activation_stats(x_hp: torch.Tensor, layer: FalqonLayer) -> dict[str, torch.Tensor]:
    """Amax, scale and saturated/underflow counts of one layer input, quantized as the layer's forward does."""
    x_2d = x_hp.detach().reshape(-1, x_hp.shape[-1]).float()  # (M, in)
    x_fp8, scale = quantize_dynamic(x_2d, E4M3, layer.config.act_scaling)
    q = x_fp8.float()
    return {
        "a_amax": x_2d.abs().amax(),
        "a_scale": scale.amax(),
        "sat": (q.abs() == fp8_max(E4M3)).sum(),
        "underflow": ((x_2d != 0) & (q == 0)).sum(),
        "numel": torch.tensor(x_2d.numel()),
    }


@torch.no_grad()
def weight_stats(layer: FalqonLayer) -> dict[str, float]:
    """Statistics of the layer's FP8 ``W`` rows (``A`` excluded), ``B`` row norms and merge counters."""
    w_fp8 = layer.weight_fp8[: layer.out_features].float()
    w_hp = layer.dequantized_weight()
    b_norms = layer.lora_B.detach().float().norm(dim=1)
    stats = {
        "w_amax": w_hp.abs().max().item(),
        "w_scale": layer.weight_scale_rows.max().item(),
        "w_sat_frac": (w_fp8.abs() == fp8_max(E4M3)).float().mean().item(),
        "w_zero_frac": (w_fp8 == 0).float().mean().item(),
        "b_row_norm_max": b_norms.max().item(),
        "b_row_norm_mean": b_norms.mean().item(),
    }
    stats.update({name: float(getattr(layer, name).item()) for name in MERGE_COUNTERS})
    return stats


class QuantStats(Callback):
    """Log FP8 quantization statistics every ``every_n_steps`` optimizer steps, and plot them at fit end.

    Args:
        every_n_steps: log after optimizer steps that are multiples of this.
        per_layer: log every layer's statistics (``quant/<layer>/<stat>``) besides the summaries (``quant/<stat>``).
        plot: write ``quant_stats.png`` of the summaries into the logger's ``log_dir`` (or ``default_root_dir``).

    Raises:
        ValueError: ``every_n_steps < 1``.
    """

    def __init__(self, every_n_steps: int = 50, per_layer: bool = True, plot: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"QuantStats.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.per_layer, self.plot = every_n_steps, per_layer, plot
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        """Summary statistic -> ``[(step, value)]``, for the plot."""
        self.plot_path: Path | None = None
        self._handles: list[RemovableHandle] = []
        self._acts: dict[str, dict[str, torch.Tensor]] = {}

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        names = [type(c).__name__ for c in trainer.callbacks]
        if "RowwiseProxyUpdate" in names and names.index("RowwiseProxyUpdate") < names.index(type(self).__name__):
            rank_zero_warn("QuantStats runs after RowwiseProxyUpdate, so B row norms are read after the merge")

    def _is_log_step(self, step: int) -> bool:
        return step > 0 and step % self.every_n_steps == 0

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # The batches of the coming optimizer step (all its accumulation micro-batches) are observed.
        if self._handles or not self._is_log_step(trainer.global_step + 1):
            return
        self._acts = {}
        for name, layer in falqon_layers(pl_module).items():
            self._handles.append(layer.register_forward_pre_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(layer: FalqonLayer, args: tuple[torch.Tensor, ...]) -> None:
            new = activation_stats(args[0], layer)
            old = self._acts.get(name)
            if old is not None:
                new = {
                    k: torch.maximum(old[k], v) if k in ("a_amax", "a_scale") else old[k] + v for k, v in new.items()
                }
            self._acts[name] = new

        return hook

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._handles or not self._is_log_step(trainer.global_step):
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._log(trainer, pl_module, trainer.global_step)

    def compute(self, pl_module: LightningModule) -> dict[str, dict[str, float]]:
        """Per-layer statistics from the weights now and the activations observed since the hooks went in."""
        per_layer: dict[str, dict[str, float]] = {}
        for name, layer in falqon_layers(pl_module).items():
            stats = weight_stats(layer)
            if (acts := self._acts.get(name)) is not None:
                numel = acts["numel"].item()
                stats.update(
                    a_amax=acts["a_amax"].item(),
                    a_scale=acts["a_scale"].item(),
                    a_sat_frac=acts["sat"].item() / numel,
                    a_underflow_frac=acts["underflow"].item() / numel,
                )
            per_layer[name] = stats
        return per_layer

    @rank_zero_only
    def _log(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        per_layer = self.compute(pl_module)
        self._acts = {}
        metrics: dict[str, float] = {}
        for stat, how in _SUMMARY.items():
            values = [s[stat] for s in per_layer.values() if stat in s]
            if not values:
                continue
            value = {"max": max, "sum": sum}.get(how, lambda v: sum(v) / len(v))(values)
            metrics[f"quant/{stat}"] = value
            self.history[stat].append((step, value))
        if self.per_layer:
            metrics.update({f"quant/{name}/{k}": v for name, stats in per_layer.items() for k, v in stats.items()})
        # Straight to the loggers: Trainer(log_every_n_steps) must not drop a statistic computed only every n steps.
        for logger in trainer.loggers:
            logger.log_metrics(metrics=metrics, step=step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.plot and self.history:
            self._plot(trainer)

    @rank_zero_only
    def _plot(self, trainer: Trainer) -> None:
        """The figure ``falqon plot`` draws (one producer): what the loggers hold, else this callback's history."""
        from falqon_lit import plots

        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        for logger in trainer.loggers:
            logger.save()  # flush a CSVLogger's metrics.csv before reading it back
        metrics = plots.read_metrics(log_dir) if plots.has_logs(log_dir) else {}  # no file-writing logger: history
        metrics.update({f"quant/{stat}": series for stat, series in self.history.items()})
        self.plot_path = plots.save_figure(plots.quant_stats_figure(metrics), log_dir / plots.QUANT_STATS_PNG)
