"""``StepProfiler``: profile one optimizer step of a real fit and write where its time went, by kernel family."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch.profiler import ProfilerActivity, profile
from typing_extensions import override

from falqon_lit.kernel_profile import kernel_table


class StepProfiler(Callback):
    """Profile optimizer step ``step`` (0-based global step) and write ``profile_step_<step>.txt`` to the log dir.

    The report (``falqon_lit.kernel_profile.kernel_table``) gives GPU kernel time by family (FP8 GEMM, bf16 GEMM,
    FALQON quantization, attention, proxy update, optimizer, other) and the top kernels; on the CPU, operator time.
    ``falqon fit --profile N`` adds this callback. Pick a step after compilation and warm-up (e.g. 10). Only rank 0
    profiles.

    Args:
        step: the global step to profile.

    Raises:
        ValueError: ``step < 0``.
    """

    def __init__(self, step: int = 10) -> None:
        if step < 0:
            raise ValueError(f"StepProfiler needs step >= 0, got {step}")
        self.step = step
        self.path: Path | None = None
        """Where the report was written (set at the profiled step)."""
        self._prof: profile | None = None

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        if trainer.global_step != self.step or self._prof is not None or self.path is not None or trainer.global_rank:
            return
        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(pl_module.device)
        self._prof = profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU])
        self._prof.start()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if self._prof is None or trainer.global_step == self.step:  # still inside the step (gradient accumulation)
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._prof.stop()
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"profile_step_{self.step}.txt"
        self.path.write_text(kernel_table(self._prof, f"step {self.step}") + "\n")
        self._prof = None
        rank_zero_info(f"StepProfiler: step {self.step} profile written to {self.path}")
