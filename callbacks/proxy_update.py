"""``RowwiseProxyUpdate``: the schedule of FALQON's row-wise proxy update (paper §3.3, Alg. 2).

After every ``every_n_steps``-th optimizer step, each ``FalqonLinear`` merges the ``k`` rows of ``B`` with the largest
L1 norm into its FP8 weight (``warmup_k`` rows during the first ``warmup_steps`` steps); what happens to the rest of
``B`` is the layer's ``FalqonConfig.b_policy``. At the end of fit every remaining row is flushed, so the FP8 weights
alone are the trained model.

Two options of issue 18 change the frozen ``A`` (``falqon_lit.adapter_init``):

- layers converted with ``init: gradient`` get their ``A`` from the dense weight gradient of the first
  ``calibration_batches`` training batches, in a calibration pass when training starts (no optimizer step);
- ``refresh_every_n_steps``: after every n-th optimizer step, every layer is flushed (``B`` merged, ``B = 0``), its
  ``A`` rows are replaced by new directions (``gradient``: from the weight gradient captured during that step's
  backward; ``random``: orthogonal to the previous ``A``) and requantized, and ``B``'s optimizer state is reset.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from falqon_lit.adapter_init import (
    WeightGradientCapture,
    calibrate_gradient_init,
    gradient_directions,
    random_directions,
    refresh_A,
)
from falqon_lit.config import InitMethod
from falqon_lit.layer import falqon_layers, flush_all
from falqon_lit.proxy_updater import ProxyUpdater
from falqon_lit.sharded import ShardedFalqonLinear


class RowwiseProxyUpdate(Callback):
    """Merge the top-``k`` rows of every layer's ``B`` into its FP8 weight after optimizer steps.

    Args:
        k: rows merged per layer per update; ``None`` merges ``rank`` rows (what the reference code effectively did).
        warmup_k: rows per update during the first ``warmup_steps`` optimizer steps; ``None`` uses ``k``.
        warmup_steps: optimizer steps that use ``warmup_k``.
        every_n_steps: update after every n-th optimizer step (counted by ``trainer.global_step``).
        score: row score; only ``"l1"`` (the paper's L1 norm of each row of ``B``).
        flush_at_end: merge every non-zero row of ``B`` when fit ends.
        log_rows: log ``proxy/rows_merged`` (rows merged over all layers at that step).
        refresh_every_n_steps: replace ``A`` after every n-th optimizer step (before the last); ``None``: never.
        refresh_directions: ``gradient`` (top-r right singular directions of that step's weight gradient) or
            ``random`` (orthogonal to the previous ``A``).
        calibration_batches: training batches whose weight gradient initialises ``A`` of ``init: gradient`` layers
            (4, as the quality study measured; summed over data-parallel ranks, so every rank gets the same ``A``).

    Raises:
        ValueError: a non-positive ``k``, ``warmup_k``, ``every_n_steps``, ``refresh_every_n_steps`` or
            ``calibration_batches``, a negative ``warmup_steps``, or an unknown ``score`` or ``refresh_directions``.
    """

    calibrates_gradient_init = True
    """Read by ``FalqonLitModule``: this callback computes ``A`` of ``init: gradient`` layers when training starts."""

    def __init__(
        self,
        k: int | None = None,
        warmup_k: int | None = None,
        warmup_steps: int = 0,
        every_n_steps: int = 1,
        score: str = "l1",
        flush_at_end: bool = True,
        log_rows: bool = True,
        refresh_every_n_steps: int | None = None,
        refresh_directions: str = "gradient",
        calibration_batches: int = 4,
    ) -> None:
        problems = []
        for name, value in (("k", k), ("warmup_k", warmup_k), ("refresh_every_n_steps", refresh_every_n_steps)):
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 or null, got {value}")
        if warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {warmup_steps}")
        if every_n_steps < 1:
            problems.append(f"every_n_steps must be >= 1, got {every_n_steps}")
        if score != "l1":
            problems.append(f"score must be 'l1', got {score!r}")
        if refresh_directions not in ("gradient", "random"):
            problems.append(f"refresh_directions must be 'gradient' or 'random', got {refresh_directions!r}")
        if calibration_batches < 1:
            problems.append(f"calibration_batches must be >= 1, got {calibration_batches}")
        if problems:
            raise ValueError("invalid RowwiseProxyUpdate: " + "; ".join(problems))
        self.k, self.warmup_k, self.warmup_steps = k, warmup_k, warmup_steps
        self.every_n_steps, self.score, self.flush_at_end, self.log_rows = every_n_steps, score, flush_at_end, log_rows
        self.last_step = 0
        """``trainer.global_step`` at the last batch end seen; a larger value means an optimizer step happened."""
        self.updates = 0
        """Proxy updates done (over the whole run, resumes included)."""
        self.rows_merged = 0
        """Rows merged over all layers and updates (flush excluded)."""
        self.rows_flushed = 0
        """Rows merged by the final flush."""
        self.refresh_every_n_steps, self.refresh_directions = refresh_every_n_steps, refresh_directions
        self.calibration_batches = calibration_batches
        self.refreshes = 0
        """A refreshes done (resumes included); also seeds the random directions of the next one."""
        self.rows_refreshed = 0
        """Rows merged by the flushes before A refreshes."""
        self.a_initialised = False
        """Whether the gradient calibration of ``init: gradient`` layers ran (a resumed run must not repeat it)."""
        self._proxy: ProxyUpdater | None = None
        self._capture: WeightGradientCapture | None = None

    def _build_updater(self, pl_module: LightningModule) -> ProxyUpdater:
        # Once per fit: the set of layers is fixed after configure_model, so the step never walks the module tree.
        layers = list(falqon_layers(pl_module).values())
        if not layers:
            raise ValueError("RowwiseProxyUpdate found no FalqonLinear layer in the model; convert it first")
        # Row-sharded layers run collectives with data-dependent shapes in their update: no CUDA graph.
        sharded = any(isinstance(layer, ShardedFalqonLinear) for layer in layers)
        return ProxyUpdater(layers, use_cuda_graph=False if sharded else None)

    def rows_for_step(self, step: int, rank: int) -> int:
        """Rows to merge for a layer of rank ``rank`` after optimizer step ``step`` (1-based)."""
        k = self.warmup_k if step <= self.warmup_steps and self.warmup_k is not None else self.k
        return rank if k is None else k

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._proxy = self._build_updater(pl_module)
        self.last_step = trainer.global_step
        if self.refresh_every_n_steps and not all(layer.rows_are_local for layer in self._proxy.layers):
            raise ValueError("RowwiseProxyUpdate: refresh_every_n_steps needs unsharded FalqonLinear layers; unset it")

    def initialise_A(self, model: Any, losses: Any, reduce: Any = None) -> None:
        """Gradient-informed ``A`` of ``init: gradient`` layers from ``losses`` (closures, one per calibration
        batch; ``reduce`` sums a gradient over ranks), once per run."""
        if not self.a_initialised:
            calibrate_gradient_init(model, losses, reduce)
            self.a_initialised = True

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        layers = falqon_layers(pl_module).values()
        if self.a_initialised or not any(layer.config.init == InitMethod.GRADIENT for layer in layers):
            return
        if not hasattr(pl_module, "loss_and_predictions"):
            raise TypeError("init 'gradient' needs a FalqonLitModule (loss_and_predictions) to run its calibration")
        # A model that has trained already (B != 0, e.g. a trained module fitted further without ckpt_path) keeps its
        # A: B was learnt in A's coordinates. Decided over all ranks alike (sharded ranks hold different rows of B).
        trained = any(bool(layer.local_lora_B().any()) for layer in layers)
        flag = torch.tensor(float(trained), device=pl_module.device)
        if float(trainer.strategy.reduce(flag, reduce_op="sum")) > 0:
            rank_zero_warn("init: gradient calibration skipped: B is not zero (the model has trained already), A kept")
            self.a_initialised = True
            return

        def losses():
            for _, batch in zip(range(self.calibration_batches), trainer.train_dataloader, strict=False):
                batch = trainer.strategy.batch_to_device(batch)

                def loss(batch=batch):
                    with trainer.precision_plugin.train_step_context():
                        return pl_module.loss_and_predictions(batch)[0]

                yield loss

        self.initialise_A(pl_module, losses(), lambda g: trainer.strategy.reduce(g, reduce_op="sum"))

    def _refresh_due(self, trainer: Trainer, step: int) -> bool:
        # Not after the last step: the final flush follows and nothing would train the new A.
        last = getattr(trainer, "max_steps", -1)
        every = self.refresh_every_n_steps
        return bool(every) and step % every == 0 and (last is None or last < 0 or step < last)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # The step that ends in a refresh also captures its dense weight gradient (every micro-batch of it).
        upcoming = trainer.global_step + 1
        if self._capture is None and self.refresh_directions == "gradient" and self._refresh_due(trainer, upcoming):
            self._capture = WeightGradientCapture(falqon_layers(pl_module)).__enter__()

    def _refresh(self, trainer: Trainer, pl_module: LightningModule) -> None:
        layers = falqon_layers(pl_module)
        if self.refresh_directions == "gradient":
            if self._capture is None:
                raise RuntimeError("A refresh found no captured gradient: on_train_batch_start did not run")
            self._capture.__exit__()
            grads = {n: trainer.strategy.reduce(g, reduce_op="sum") for n, g in self._capture.grads.items()}
            self._capture = None
            directions = gradient_directions(layers, grads)
        else:
            directions = random_directions(layers, self.refreshes)
        self.rows_refreshed += refresh_A(layers, directions)
        for optimizer in trainer.optimizers:  # Adam's moments of B were in the old A's coordinates
            for layer in layers.values():
                optimizer.state.pop(layer.lora_B, None)
        self.refreshes += 1

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # global_step counts optimizer steps: it did not move on accumulation-only batches (or skipped steps).
        if step == self.last_step:
            return
        self.last_step = step
        if step % self.every_n_steps == 0:
            self._update(trainer, pl_module, step)
        if self._refresh_due(trainer, step):
            self._refresh(trainer, pl_module)

    def _update(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        if self._proxy is None:
            self._proxy = self._build_updater(pl_module)
        layers = self._proxy.layers
        k = self.rows_for_step(step, layers[0].rank)
        self._proxy(k)  # every layer at once; one CUDA-graph replay on GPU
        merged = sum(min(k, layer.out_features) for layer in layers)
        self.updates += 1
        self.rows_merged += merged
        if self.log_rows:
            self._log(trainer, step, merged)

    @rank_zero_only
    def _log(self, trainer: Trainer, step: int, merged: int) -> None:
        # Straight to the loggers, once per merge: self.log would repeat the value on accumulation-only batches.
        for logger in trainer.loggers:
            logger.log_metrics(metrics={"proxy/rows_merged": float(merged)}, step=step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not on_fit_end: Lightning moves the model to the CPU before that hook (strategy teardown).
        if not self.flush_at_end:
            return
        self.rows_flushed = flush_all(pl_module)
        rank_zero_info(
            f"RowwiseProxyUpdate: {self.updates} updates merged {self.rows_merged} rows; "
            f"final flush merged {self.rows_flushed} rows; {self.refreshes} A refreshes"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "updates": self.updates,
            "rows_merged": self.rows_merged,
            "refreshes": self.refreshes,
            "rows_refreshed": self.rows_refreshed,
            "a_initialised": self.a_initialised,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["last_step"])
        self.updates = int(state_dict["updates"])
        self.rows_merged = int(state_dict["rows_merged"])
        # Checkpoints from before A refreshes lack these keys.
        self.refreshes = int(state_dict.get("refreshes", 0))
        self.rows_refreshed = int(state_dict.get("rows_refreshed", 0))
        self.a_initialised = bool(state_dict.get("a_initialised", False))
