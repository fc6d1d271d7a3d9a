"""Optimizer and learning-rate schedule of the adapter parameters, as one frozen dataclass the CLI exposes.

Explicit fields rather than ``OptimizerCallable``s keep the YAML flat (``model.optim.lr: 3e-4``) and the saved
hyperparameters plain values, so ``FalqonLitModule.load_from_checkpoint`` works with ``weights_only`` loading.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch


class OptimizerName(str, enum.Enum):
    """Which ``torch.optim`` optimizer trains ``lora_B``."""

    ADAMW = "adamw"
    """``torch.optim.AdamW`` (the paper's and the reference code's choice)."""
    SGD = "sgd"
    """``torch.optim.SGD`` with momentum ``betas[0]``."""


class SchedulerName(str, enum.Enum):
    """Learning-rate schedule after the linear warm-up, stepped once per optimizer step."""

    CONSTANT = "constant"
    """Constant after warm-up."""
    LINEAR = "linear"
    """Linear decay to ``min_lr_ratio * lr`` at the last step."""
    COSINE = "cosine"
    """Cosine decay to ``min_lr_ratio * lr`` at the last step."""


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule of the trainable ``lora_B`` matrices.

    Raises:
        ValueError: listing every invalid field at once.
    """

    optimizer: OptimizerName = OptimizerName.ADAMW
    """``ADAMW`` or ``SGD``."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 penalty (SGD) on ``B``."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas; SGD uses ``betas[0]`` as momentum."""
    eps: float = 1e-8
    """AdamW epsilon."""
    scheduler: SchedulerName = SchedulerName.COSINE
    """``CONSTANT``, ``LINEAR`` or ``COSINE`` decay after warm-up."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to ``lr``."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (linear and cosine schedules)."""

    def __post_init__(self) -> None:
        for name, enum_type in (("optimizer", OptimizerName), ("scheduler", SchedulerName)):
            value = getattr(self, name)
            if not isinstance(value, enum_type):
                try:
                    object.__setattr__(self, name, enum_type(str(value).lower()))
                except ValueError:
                    choices = ", ".join(repr(m.value) for m in enum_type)
                    raise ValueError(f"--model.optim.{name} must be one of {choices}, got {value!r}") from None
        object.__setattr__(self, "betas", tuple(self.betas))
        problems = []
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two values in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if problems:
            raise ValueError("invalid --model.optim: " + "; ".join(problems))



def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer over ``params``."""
    if config.optimizer == OptimizerName.SGD:
        return torch.optim.SGD(params, lr=config.lr, momentum=config.betas[0], weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of ``lr`` at optimizer step ``step`` (0-based) of ``total_steps``."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.scheduler == SchedulerName.CONSTANT:
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    decay = 1 - progress if config.scheduler == SchedulerName.LINEAR else 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR``; its state dict holds only counters, so checkpoints stay plain tensors and numbers."""

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, config)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
