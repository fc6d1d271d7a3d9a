"""``ReplicaConsistencyCheck``: verify that data-parallel replicas hold byte-identical FALQON state.

Under DDP only ``lora_B`` trains; after the gradient all-reduce every rank sees the same ``B``, picks the same top-k
rows and applies the same merge, so the FP8 buffers stay identical without ever being communicated (docs/design.md §3).
This callback checks that instead of assuming it: every ``every_n_steps`` optimizer steps (and when fit ends) each
rank fingerprints every FALQON layer's ``replicated_tensors()`` on its device (``weight_fp8``, ``weight_scale`` and
``lora_B`` of a ``FalqonLinear``; ``A`` and a tensor scale of a row-sharded ``ShardedFalqonLinear``), the
fingerprints are all-gathered (16 bytes per tensor), and a mismatch raises on every rank, naming the first layer that
differs.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from falqon_lit.layer import falqon_layers

_MIX = 0x9E3779B97F4A7C15 - 2**64  # odd 64-bit constant (golden ratio), as a signed int64


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Two int64 words that change with any byte of ``tensor``: a word sum and a position-weighted word sum.

    Computed on the tensor's device (no copy to the host); int64 arithmetic wraps, which is what a hash wants.
    """
    data = tensor.detach()
    if hasattr(data, "to_local"):  # a DTensor: fingerprint this rank's part
        data = data.to_local()
    raw = data.contiguous().reshape(-1).view(torch.uint8)
    raw = torch.cat([raw, raw.new_zeros(-raw.numel() % 8)]).view(torch.int64)  # (n / 8,) words
    weights = torch.arange(raw.numel(), dtype=torch.int64, device=raw.device) * 2 + 1  # odd: no word is ignored
    return torch.stack([raw.sum(), (raw * weights * _MIX).sum()])


class ReplicaConsistencyCheck(Callback):
    """Fail fast when data-parallel replicas of the FP8 model diverge.

    It checks when training starts (each rank converted its own copy of the backbone), every ``every_n_steps``
    optimizer steps, and when fit ends. List it after ``RowwiseProxyUpdate`` so that the last check also covers the
    final flush.

    Args:
        every_n_steps: check at the start of every n-th optimizer step (1 = every step, a debugging setting; the
            cost is one pass over the FP8 weights and one small all-gather).
        check_at_end: also check when fit ends.

    Raises:
        ValueError: ``every_n_steps`` < 1.
    """

    def __init__(self, every_n_steps: int = 100, check_at_end: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"ReplicaConsistencyCheck.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.check_at_end = every_n_steps, check_at_end
        self.checks = 0
        """Checks run (on this rank)."""
        self._last_checked = -1

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not falqon_layers(pl_module):
            raise ValueError("ReplicaConsistencyCheck found no FalqonLinear layer in the model; convert it first")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # DDP does not broadcast FALQON's buffers (FalqonLitModule opts them out): each rank converted its own copy.
        self.check(trainer, pl_module, f"at the start of training (step {trainer.global_step})")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # At a batch start every callback of the previous batch (the proxy update included) has run.
        step = trainer.global_step
        if step and step % self.every_n_steps == 0 and step != self._last_checked:
            self._last_checked = step
            self.check(trainer, pl_module, f"after optimizer step {step}")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before the strategy's teardown moves the model to the CPU (NCCL collectives need device tensors).
        if self.check_at_end:
            self.check(trainer, pl_module, f"at the end of fit (step {trainer.global_step})")

    def check(self, trainer: Trainer, pl_module: LightningModule, when: str) -> None:
        """Compare every replica's fingerprints with rank 0's; a collective, so every rank must call it.

        Raises:
            RuntimeError: on every rank, naming the first differing layer and tensor and the ranks involved.
        """
        self.checks += 1
        if trainer.world_size == 1:
            return
        names, prints = [], []
        for layer_name, layer in falqon_layers(pl_module).items():
            for tensor_name, tensor in layer.replicated_tensors().items():
                names.append((layer_name, tensor_name))
                prints.append(fingerprint(tensor))
        gathered = trainer.strategy.all_gather(torch.stack(prints))  # (world, n, 2)
        differs = (gathered != gathered[0]).any(dim=2)  # (world, n)
        if not bool(differs.any()):
            return
        rank, index = (int(i) for i in differs.nonzero()[0])
        layer_name, tensor_name = names[index]
        count = int(differs.any(dim=0).sum())
        raise RuntimeError(
            f"ReplicaConsistencyCheck: data-parallel replicas diverged {when}: {tensor_name!r} of layer "
            f"{layer_name!r} differs between rank 0 and rank {rank} ({count} of {len(names)} checked tensors differ). "
            "FALQON keeps replicas identical only if every rank applies the same optimizer step and merge: look for "
            "non-deterministic kernels, per-rank writes to the model, or a mismatched checkpoint load"
        )
