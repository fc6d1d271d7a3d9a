"""Results of a multiple-choice evaluation: per-task ``acc``/``acc_norm`` and the report table and JSON."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from falqon_lit.eval.tasks import MultipleChoiceItem


def _stderr(p: float, n: int) -> float | None:
    # Standard error of a mean of 0/1 scores with the sample variance, as the harness's mean_stderr; None (JSON null)
    # for a single item.
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@dataclass(frozen=True)
class TaskResult:
    """Accuracies of one task."""

    n: int
    """Number of items scored."""
    acc: float
    """Fraction whose highest-scoring choice is the gold one."""
    acc_norm: float
    """The same with each score divided by the choice's characters."""

    def to_dict(self) -> dict[str, float | int | None]:
        """``n``, ``acc``, ``acc_stderr``, ``acc_norm``, ``acc_norm_stderr``."""
        return {
            "n": self.n,
            "acc": self.acc,
            "acc_stderr": _stderr(self.acc, self.n),
            "acc_norm": self.acc_norm,
            "acc_norm_stderr": _stderr(self.acc_norm, self.n),
        }


def task_result(items: Sequence[MultipleChoiceItem], scores: Sequence[Sequence[float]]) -> TaskResult:
    """``acc`` and ``acc_norm`` of items from their choice scores (ties go to the first choice, as ``argmax``)."""
    if not items or len(items) != len(scores):
        raise ValueError(f"task_result needs one score list per item and >= 1 item, got {len(items)} and {len(scores)}")
    correct = correct_norm = 0
    for item, lls in zip(items, scores, strict=True):
        normed = [ll / length for ll, length in zip(lls, item.choice_lengths, strict=True)]
        correct += max(range(len(lls)), key=lls.__getitem__) == item.gold
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == item.gold
    return TaskResult(n=len(items), acc=correct / len(items), acc_norm=correct_norm / len(items))


@dataclass
class EvalReport:
    """Per-task accuracies of one :func:`evaluate` run."""

    results: dict[str, TaskResult] = field(default_factory=dict)
    """Results by task name, in the order evaluated."""
    limit: int | None = None
    """Rows per task (per subject for ``mmlu``), ``None`` for all."""
    seconds: float = 0.0
    """Wall time of the run."""

    def mean(self) -> dict[str, float | None]:
        """Unweighted mean over tasks of ``acc`` and ``acc_norm`` (``None`` without tasks)."""
        values = list(self.results.values())
        return {
            "acc": sum(r.acc for r in values) / len(values) if values else None,
            "acc_norm": sum(r.acc_norm for r in values) / len(values) if values else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"tasks": {name: {...}}, "mean": {...}, "limit": ..., "seconds": ...}``."""
        return {
            "tasks": {name: r.to_dict() for name, r in self.results.items()},
            "mean": self.mean(),
            "limit": self.limit,
            "seconds": round(self.seconds, 3),
        }

    def to_table(self, title: str | None = None) -> Any:
        """A ``rich.table.Table`` with one row per task and the mean."""
        from rich.table import Table

        table = Table(title=title or f"0-shot accuracy (limit {self.limit}, {self.seconds:.0f} s)")
        for column in ("task", "n", "acc", "± stderr", "acc_norm", "± stderr"):
            table.add_column(column, justify="left" if column == "task" else "right")
        for name, result in self.results.items():
            d = result.to_dict()
            table.add_row(
                name, str(result.n), *(_fmt(d[k]) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"))
            )
        mean = self.mean()
        table.add_section()
        table.add_row("mean", "", _fmt(mean["acc"]), "", _fmt(mean["acc_norm"]), "")
        return table
