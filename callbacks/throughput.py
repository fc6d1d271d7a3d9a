"""``Throughput``: non-padding tokens/s, step time and MFU in the progress bar and at the end of fit, plus whether
FP8 is engaged (which projections run FP8 GEMMs, which fell back to high precision and why)."""

from __future__ import annotations

import time
from collections import Counter

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from typing_extensions import override

from falqon_lit.convert import ConversionReport
from falqon_lit.layer_base import FalqonLayer

PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    # (substring of torch.cuda.get_device_name, dense bf16, dense FP8) TFLOP/s, NVIDIA datasheets without sparsity;
    # the first match wins, so specific names come before the names they contain.
    ("H100 PCIe", 756.0, 1513.0),
    ("H100 NVL", 835.0, 1671.0),
    ("H100", 989.0, 1979.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.0, 1671.0),
    ("H200", 989.0, 1979.0),  # SXM
    ("B200", 2250.0, 4500.0),
)
"""Dense peak throughput by device name; a device not listed gets no MFU (add a row to get one)."""


def device_peaks(name: str) -> tuple[float, float] | None:
    """``(bf16, fp8)`` dense peak TFLOP/s of a device name, or ``None`` when unknown."""
    return next(((bf16, fp8) for key, bf16, fp8 in PEAK_TFLOPS if key in name), None)


def flops_per_token(model: nn.Module) -> int:
    """Model FLOPs of one trained token: forward plus input-gradient backward of every weight matrix.

    A FALQON layer runs ``2·in·(out + r)`` forward (the melded ``[W; A]`` GEMM), ``2·in·out`` for ``grad_x`` and
    ``2·out·r`` for ``grad_B``; a frozen high-precision linear (the lm_head) ``2·in·out`` each way. The frozen
    weights get no gradient, so this is ~4N, not full fine-tuning's 6N. Recomputation under gradient checkpointing
    and the attention score products (a few percent at these lengths) are not counted.
    """
    total = 0
    for module in model.modules():
        if isinstance(module, FalqonLayer):
            d_in, d_out, r = module.in_features, module.out_features, module.rank
            total += 2 * d_in * (d_out + r) + 2 * d_in * d_out + 2 * d_out * r
        elif isinstance(module, nn.Linear):
            total += 4 * module.in_features * module.out_features
    return total


_SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def fp8_engagement(report: ConversionReport, model: nn.Module, compute_dtype: str | None = None) -> str:
    """One line: projections on FP8 GEMMs out of those targeted, the fallbacks with reasons, the lm_head's dtype.

    Args:
        report: what ``convert_model`` converted and skipped (with reasons).
        model: the converted model (for its output embedding).
        compute_dtype: the dtype the lm_head computes in under mixed precision (``"bf16"``); default its weights'.
    """
    targeted = len(report.converted) + len(report.skipped)
    line = f"{len(report.converted)}/{targeted} projections"
    if report.skipped:
        reasons = Counter(report.skipped.values())
        fell_back = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        line += f"; fell back to high precision: {fell_back} ({', '.join(sorted(report.skipped))})"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        weights = str(head.weight.dtype).removeprefix("torch.")
        line += f"; lm_head {compute_dtype or _SHORT_DTYPES.get(weights, weights)} by design"
    return line


class Throughput(Callback):
    """Log non-padding tokens/s, step time and MFU every ``log_every_n_steps`` optimizer steps; summarise at the end.

    Tokens are the real (``attention_mask`` 1) tokens of each batch, summed over data-parallel ranks; timings are
    wall time between optimizer steps over a window of steps (no device sync per step). MFU is the model FLOPs of
    :func:`flops_per_token` per second over the device's dense FP8 and bf16 peaks (:data:`PEAK_TFLOPS`), per GPU.
    The end-of-fit numbers leave out the first window (compilation and warm-up) when there is more than one. Printed
    by ``FitSummary`` when present, else by this callback.

    Args:
        log_every_n_steps: optimizer steps per window; ``None``: the Trainer's ``log_every_n_steps``.

    Raises:
        ValueError: ``log_every_n_steps < 1``.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"Throughput needs log_every_n_steps >= 1 or None, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.windows: list[tuple[int, int, float]] = []
        """``(optimizer steps, tokens, seconds)`` of each finished window."""
        self.flops_per_token = 0
        self.peaks: tuple[float, float] | None = None
        self.device_name = "cpu"
        self.fp8_line = ""
        self._tokens: torch.Tensor | None = None
        self._window_start = 0.0
        self._window_step = 0

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = pl_module.model if getattr(pl_module, "model", None) is not None else pl_module
        self.flops_per_token = flops_per_token(model)
        device = pl_module.device
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        self.peaks = device_peaks(self.device_name) if device.type == "cuda" else None
        report = getattr(pl_module, "conversion", None)
        precision = str(trainer.precision)
        compute = "bf16" if precision.startswith("bf16") else "fp16" if precision.startswith("16") else None
        self.fp8_line = fp8_engagement(report, model, compute) if report is not None else "no FALQON conversion report"
        if device.type == "cpu":
            self.fp8_line += " (CPU: FP8 bytes, dequantized float32 GEMMs)"
        self.windows = []
        self._tokens = torch.zeros((), dtype=torch.long, device=device)
        self._window_start, self._window_step = time.perf_counter(), trainer.global_step

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: dict, batch_idx: int) -> None:
        mask = batch.get("attention_mask")
        self._tokens += mask.sum() if mask is not None else batch["input_ids"].numel()  # stays on the device

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: dict, batch_idx: int
    ) -> None:
        steps = trainer.global_step - self._window_step
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if steps < every:
            return
        tokens = int(trainer.strategy.reduce(self._tokens.clone(), reduce_op="sum"))  # one sync per window
        seconds = time.perf_counter() - self._window_start
        self.windows.append((steps, tokens, seconds))
        for name, value in self.rates(steps, tokens, seconds, trainer.world_size).items():
            pl_module.log(f"perf/{name}", value, prog_bar=name in ("tokens_per_s", "step_s", "mfu_fp8"))
        self._tokens.zero_()
        self._window_start, self._window_step = time.perf_counter(), trainer.global_step

    def rates(self, steps: int, tokens: int, seconds: float, world_size: int) -> dict[str, float]:
        """``tokens_per_s``, ``step_s`` and, on a device with known peaks, ``mfu_bf16`` and ``mfu_fp8`` per GPU."""
        rates = {"tokens_per_s": tokens / seconds, "step_s": seconds / steps}
        if self.peaks is not None:
            per_gpu = tokens * self.flops_per_token / seconds / world_size / 1e12  # TFLOP/s
            rates["mfu_bf16"], rates["mfu_fp8"] = per_gpu / self.peaks[0], per_gpu / self.peaks[1]
        return rates

    def steady(self) -> tuple[int, int, float]:
        """``(steps, tokens, seconds)`` over the windows after the first (all windows when there is one)."""
        windows = self.windows[1:] or self.windows
        return sum(w[0] for w in windows), sum(w[1] for w in windows), sum(w[2] for w in windows)

    def summary_rows(self, world_size: int = 1) -> list[tuple[str, str]]:
        """The throughput rows of the end-of-fit summary."""
        rows = [("FP8 engaged", self.fp8_line)]
        steps, tokens, seconds = self.steady()
        if not steps:
            return [*rows, ("throughput", "no full window of steps measured; lower log_every_n_steps")]
        rates = self.rates(steps, tokens, seconds, world_size)
        span = f"{steps} steps" + (" after the first window" if len(self.windows) > 1 else "")
        rows += [
            ("tokens/s (non-padding)", f"{rates['tokens_per_s']:,.0f} ({span})"),
            ("step time", f"{1e3 * rates['step_s']:.0f} ms"),
        ]
        if self.peaks is None:
            mfu = f"n/a: no peak known for {self.device_name!r} (add it to PEAK_TFLOPS)"
        else:
            mfu = (
                f"{100 * rates['mfu_fp8']:.1f}% of FP8 {self.peaks[1]:.0f} / {100 * rates['mfu_bf16']:.1f}% of bf16 "
                f"{self.peaks[0]:.0f} TFLOP/s dense ({self.device_name}, {self.flops_per_token / 1e9:.2f} GFLOP/token)"
            )
        return [*rows, ("MFU", mfu)]

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from falqon_lit.callbacks.summary import FitSummary  # not at the top: summary imports this module

        if not any(isinstance(c, FitSummary) for c in trainer.callbacks):  # FitSummary prints these rows
            self._print(trainer.world_size)

    @rank_zero_only
    def _print(self, world_size: int) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="FALQON throughput", show_header=False)
        for name, value in self.summary_rows(world_size):
            table.add_row(name, value)
        Console().print(table)
