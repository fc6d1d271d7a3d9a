"""A few FALQON steps of a tiny random Llama on 1 or 2 CPU processes (gloo), for tests/test_distributed.py.

Lightning's subprocess launcher re-runs this script for rank 1, so the test starts one process per run:

    python tests/distributed_run.py --mode ddp --tokenizer TOK --out OUT

Modes: ``single`` (one process, global batch 8), ``ddp`` (2 ranks x 4, DDP), ``ddp-corrupt`` (rank 1 flips one FP8
byte after step 2), ``sharded`` (2 ranks x 4, ModelParallelStrategy with row-sharded FP8 weights, a sharded
checkpoint at step 3, gather and save for export). Every rank writes ``OUT/rank{r}.pt``: the state dict as bytes
(sharded runs: after gathering), the global training loss of every step and the FP8 ``A`` before and after its
gradient calibration.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from tiny_models import tiny_llama_config
from torch.utils.data import DataLoader, DistributedSampler

from falqon_lit.callbacks import RowwiseProxyUpdate
from falqon_lit.callbacks.replica_check import ReplicaConsistencyCheck
from falqon_lit.config import BPolicy, FalqonConfig, InitMethod, ScaleGranularity
from falqon_lit.module import FalqonLitModule
from falqon_lit.sharded import gather_falqon_model

GLOBAL_BATCH, SEQ, EXAMPLES, STEPS = 8, 32, 24, 6  # 3 optimizer steps per epoch
TINY_LLAMA = tiny_llama_config()
CORRUPT_LAYER = "model.layers.1.mlp.down_proj"


class FixedLengthData(LightningDataModule):
    """``EXAMPLES`` random token sequences, all of length ``SEQ`` and fully trained: every micro-batch has the same
    number of trained tokens, so the mean of per-rank mean losses is the global mean loss (DDP = one process)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        ids = torch.randint(3, TINY_LLAMA["vocab_size"], (EXAMPLES, SEQ), generator=torch.Generator().manual_seed(7))
        self.examples = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]

    def train_dataloader(self) -> DataLoader:
        # No shuffling: rank r of w takes the examples r, r + w, ..., so a step's global batch is 8 consecutive
        # examples whatever w is. (Lightning's injected DistributedSampler would shuffle the training set.)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.examples, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.examples, batch_size=self.batch_size, sampler=sampler)


class RecordLoss(Callback):
    """Global (mean over ranks) training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


class CorruptReplica(Callback):
    """Flip one FP8 byte of one layer on rank 1 after optimizer step 2 (after the proxy update)."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 2 and trainer.global_rank == 1:
            pl_module.model.get_submodule(CORRUPT_LAYER).weight_fp8.view(torch.uint8)[3, 5] ^= 1


class RecordA(Callback):
    """The FP8 bytes of every layer's ``A`` rows before and after the calibration of ``init: gradient`` (placed
    before ``RowwiseProxyUpdate``, whose ``on_train_start`` calibrates), and its whole ``weight_fp8`` after."""

    def __init__(self) -> None:
        self.provisional: dict[str, torch.Tensor] = {}
        self.calibrated: dict[str, torch.Tensor] = {}
        self.weight_fp8: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.provisional = {n: _bits(m.lora_A_rows()[0]) for n, m in pl_module.falqon_layers().items()}

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.calibrated:
            self.calibrated = {n: _bits(m.lora_A_rows()[0]) for n, m in pl_module.falqon_layers().items()}
            self.weight_fp8 = {n: _bits(m.weight_fp8) for n, m in pl_module.falqon_layers().items()}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.clone().view(torch.uint8) if tensor.is_floating_point() and tensor.itemsize == 1 else tensor.clone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "ddp", "ddp-corrupt", "sharded"], required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--b-policy", default="zero")
    parser.add_argument("--act-scaling", default="row")
    parser.add_argument("--resume", help="sharded checkpoint folder to resume from")
    parser.add_argument("--init", default=FalqonConfig().init.value, help="init of A (default: the library's)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    seed_everything(0)
    world = 1 if args.mode == "single" else 2
    module = FalqonLitModule(
        model=TINY_LLAMA,
        tokenizer=args.tokenizer,
        # The default init (gradient): a name-seeded provisional A, calibrated on gradients summed over ranks, so every
        # process holds the same A. Per-token activation scales: the FP8 rounding of a sequence does not depend on
        # which other sequences share its micro-batch.
        falqon=FalqonConfig(
            b_policy=BPolicy(args.b_policy), act_scaling=ScaleGranularity(args.act_scaling), init=InitMethod(args.init)
        ),
        optim={"lr": 0.02, "scheduler": "constant"},
        # Row-sharded weights run every projection alone: every mode runs that arithmetic, so runs compare exactly.
        fused_block=False,
    )
    record, record_a = RecordLoss(), RecordA()
    callbacks: list[Callback] = [
        record_a,
        RowwiseProxyUpdate(k=4, every_n_steps=2),  # odd steps leave B non-zero: the residual path runs too
        ReplicaConsistencyCheck(every_n_steps=1),
        record,
    ]
    strategy: Any = "auto"
    if args.mode.startswith("ddp"):
        strategy = DDPStrategy(process_group_backend="gloo")
    if args.mode == "ddp-corrupt":
        callbacks.insert(1, CorruptReplica())
    if args.mode == "sharded":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        callbacks.append(ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=3, save_top_k=-1))
    trainer = Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=args.mode == "sharded",
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=args.out,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=FixedLengthData(GLOBAL_BATCH // world), ckpt_path=args.resume)
    if args.mode == "sharded":
        gather_falqon_model(module.model)
        if trainer.is_global_zero:
            from falqon_lit.export.loading import save_falqon_model

            save_falqon_model(module.model, module.tokenizer, args.out / "saved")
    state = {k: _bits(v) for k, v in module.state_dict().items()}
    a = {"provisional": record_a.provisional, "calibrated": record_a.calibrated, "weight_fp8": record_a.weight_fp8}
    torch.save({"state": state, "losses": record.losses, "A": a}, args.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
