"""``RowwiseProxyUpdate``: the schedule of FALQON's row-wise proxy update (paper §3.3, Alg. 2).

After every ``every_n_steps``-th optimizer step, each ``FalqonLinear`` merges the ``k`` rows of ``B`` with the largest
L1 norm into its FP8 weight (``warmup_k`` rows during the first ``warmup_steps`` steps); what happens to the rest of
``B`` is the layer's ``FalqonConfig.b_policy``. At the end of fit every remaining row is flushed, so the FP8 weights
alone are the trained model.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

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

    Raises:
        ValueError: a non-positive ``k``, ``warmup_k`` or ``every_n_steps``, a negative ``warmup_steps``, or an
            unknown ``score``.
    """

    def __init__(
        self,
        k: int | None = None,
        warmup_k: int | None = None,
        warmup_steps: int = 0,
        every_n_steps: int = 1,
        score: str = "l1",
        flush_at_end: bool = True,
        log_rows: bool = True,
    ) -> None:
        problems = []
        for name, value in (("k", k), ("warmup_k", warmup_k)):
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 or null, got {value}")
        if warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {warmup_steps}")
        if every_n_steps < 1:
            problems.append(f"every_n_steps must be >= 1, got {every_n_steps}")
        if score != "l1":
            problems.append(f"score must be 'l1', got {score!r}")
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
        self._proxy: ProxyUpdater | None = None

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

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # global_step counts optimizer steps: it did not move on accumulation-only batches (or skipped steps).
        if step == self.last_step:
            return
        self.last_step = step
        if step % self.every_n_steps:
            return
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
            f"final flush merged {self.rows_flushed} rows"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "updates": self.updates, "rows_merged": self.rows_merged}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["last_step"])
        self.updates = int(state_dict["updates"])
        self.rows_merged = int(state_dict["rows_merged"])
