"""``FitSummary``: validation loss and sample generations before and after fit, and a short summary table."""

from __future__ import annotations

import math
import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from falqon_lit.callbacks.throughput import Throughput
from falqon_lit.layer import falqon_layers
from falqon_lit.prompts import IGNORE_INDEX


class FitSummary(Callback):
    """Print loss and greedy samples before and after fit, then steps, time, FP8 bytes and rows merged.

    Needs a ``FalqonLitModule`` (``loss_and_predictions``, ``generate``) and a data module with
    ``summary_dataloader`` and ``sample_prompts`` (``InstructionDataModule``).

    Args:
        eval_batches: validation batches the before/after loss is measured on.
        num_samples: prompts generated before and after (0: none).
        max_new_tokens: completion length of the samples.

    Raises:
        ValueError: negative counts, or ``eval_batches == 0``.
    """

    def __init__(self, eval_batches: int = 4, num_samples: int = 2, max_new_tokens: int = 32) -> None:
        if eval_batches < 1 or num_samples < 0 or max_new_tokens < 1:
            raise ValueError(
                "FitSummary needs eval_batches >= 1, num_samples >= 0 and max_new_tokens >= 1, got "
                f"{eval_batches}, {num_samples}, {max_new_tokens}"
            )
        self.eval_batches, self.num_samples, self.max_new_tokens = eval_batches, num_samples, max_new_tokens
        self.loss_before: float | None = None
        self.loss_after: float | None = None
        self.samples_before: list[str] = []
        self.samples_after: list[str] = []
        self._start = 0.0
        self._start_step = 0

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """Token-weighted mean loss over the first ``eval_batches`` validation batches."""
        was_training = pl_module.training
        pl_module.eval()
        total, tokens = 0.0, 0
        try:
            for i, batch in enumerate(trainer.datamodule.summary_dataloader()):
                if i >= self.eval_batches:
                    break
                batch = {k: v.to(pl_module.device) for k, v in batch.items()}
                with trainer.precision_plugin.forward_context():
                    loss, _, targets = pl_module.loss_and_predictions(batch)
                n = int((targets != IGNORE_INDEX).sum())
                total, tokens = total + loss.item() * n, tokens + n
        finally:
            pl_module.train(was_training)
        return total / max(tokens, 1)

    @staticmethod
    def _log_loss(trainer: Trainer, loss: float) -> None:
        # At the optimizer steps done, so the training curves show where the fit started (falqon_lit.plots).
        for logger in trainer.loggers:
            logger.log_metrics({"summary/val_loss": loss}, step=trainer.global_step)

    def _samples(self, trainer: Trainer, pl_module: LightningModule) -> list[str]:
        if not self.num_samples:
            return []
        prompts = trainer.datamodule.sample_prompts(self.num_samples)
        with trainer.precision_plugin.forward_context():
            return pl_module.generate(prompts, self.max_new_tokens)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.loss_before = self.evaluate(trainer, pl_module)
        self._log_loss(trainer, self.loss_before)
        self.samples_before = self._samples(trainer, pl_module)
        self._start_step = trainer.global_step
        self._start = time.perf_counter()

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not on_fit_end: Lightning has moved the model to the CPU by then, and the after-fit evaluation and
        # generation would run there (minutes for SmolLM2 on a GPU host). Place after RowwiseProxyUpdate.
        seconds = time.perf_counter() - self._start
        self.loss_after = self.evaluate(trainer, pl_module)
        self._log_loss(trainer, self.loss_after)
        self.samples_after = self._samples(trainer, pl_module)
        self._print(trainer, pl_module, seconds)

    def summary_rows(self, trainer: Trainer, pl_module: LightningModule, seconds: float) -> list[tuple[str, str]]:
        """The summary table as ``(name, value)`` rows."""
        layers = falqon_layers(pl_module).values()
        fp8_bytes = sum(layer.weight_fp8.numel() for layer in layers)
        rows_merged = sum(int(layer.merge_rows) for layer in layers)
        steps = trainer.global_step - self._start_step
        throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
        return [
            ("optimizer steps", f"{steps} (global step {trainer.global_step})"),
            ("fit time", f"{seconds:.1f} s ({seconds / max(steps, 1):.2f} s/step)"),
            ("val loss before → after", f"{self.loss_before:.4f} → {self.loss_after:.4f}"),
            ("val perplexity before → after", f"{math.exp(self.loss_before):.2f} → {math.exp(self.loss_after):.2f}"),
            ("FALQON layers", str(len(layers))),
            ("FP8 weight bytes [W; A]", f"{fp8_bytes:,} ({fp8_bytes / 2**20:.1f} MiB)"),
            ("rows merged into FP8 W", f"{rows_merged:,}"),
            *(throughput.summary_rows(trainer.world_size) if throughput is not None else []),
        ]

    @rank_zero_only
    def _print(self, trainer: Trainer, pl_module: LightningModule, seconds: float) -> None:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = Console()
        # The bar's last val/loss came from the last validation (limit_val_batches), before the final flush.
        caption = (
            f"val loss: first {self.eval_batches} validation batches; 'after' is measured after the final flush, so "
            "it differs from the progress bar's last val/loss"
        )
        table = Table(title="FALQON fit summary", caption=caption, show_header=False)
        for name, value in self.summary_rows(trainer, pl_module, seconds):
            table.add_row(name, value)
        console.print(table)
        conversations = getattr(trainer.datamodule, "val_conversations", [])
        for i, (before, after) in enumerate(zip(self.samples_before, self.samples_after, strict=False)):
            samples = Table(title=f"sample {i + 1}", show_header=True, expand=True)
            samples.add_column("before")
            samples.add_column("after")
            samples.add_row(before or "(empty)", after or "(empty)")
            if i < len(conversations):
                console.print(f"[dim]prompt:[/dim] {escape(_last_user_turn(conversations[i]))}", highlight=False)
            console.print(samples)


def _last_user_turn(messages: list[dict[str, str]], width: int = 200) -> str:
    # What the user said last before the first reply (the sample asks for that reply), not the chat template.
    first_reply = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    text = next((m["content"] for m in reversed(messages[:first_reply]) if m["role"] == "user"), "")
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width] + "…"
