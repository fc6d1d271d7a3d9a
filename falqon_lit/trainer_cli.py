"""``falqon fit|validate|test|predict``: LightningCLI over ``FalqonLitModule`` and ``InstructionDataModule``.

Everything that can be checked before the Trainer writes a run folder is checked first (``_preflight``): the
``--ckpt_path`` file and its model, the conversion of the configured model (rank, targets) and the data. Bad input
then ends with one ``error: ...`` line on stderr and exit status 2, with nothing written.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from falqon_lit.callbacks import RowwiseProxyUpdate, StepProfiler, Throughput
from falqon_lit.checkpoint import RECORD_KEY, check_record, read_checkpoint
from falqon_lit.data import InstructionDataModule
from falqon_lit.exit_codes import EXIT_OK, EXIT_USAGE
from falqon_lit.module import FalqonLitModule
from falqon_lit.preflight import check_conversion

_UNION_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type")
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")  # ckpt_path values Lightning resolves itself
_ADVERTS = ("💡 Tip:",)  # Lightning's product tips, printed on every run


class FalqonProgressBar(RichProgressBar):
    """Lightning's Rich bar without the logger version (``v_num``) and without an epoch total when only
    ``max_steps`` bounds the run (Lightning prints ``Epoch 0/-2`` then)."""

    @override
    def get_metrics(self, trainer: Trainer, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


class FalqonCLI(LightningCLI):
    """LightningCLI with FALQON's progress bar, ``checkpoints/last.ckpt``, the ``RowwiseProxyUpdate`` (merges, and
    the calibration of ``init: gradient``) and ``Throughput`` (tokens/s, step time, MFU, FP8 engagement) callbacks
    unless the config brings them, ``--profile N`` (a kernel-family profile of step N, ``StepProfiler``), and checks
    before the Trainer runs."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--profile", type=int | None, default=None, help="write a kernel-family profile of this global step"
        )

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer", {})
        callbacks = list(trainer_config.get("callbacks") or [])
        extra = list(kwargs.get("callbacks") or [])
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            extra.append(FalqonProgressBar())
        if trainer_config.get("enable_checkpointing") is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            extra.append(ModelCheckpoint(save_last=True))  # last.ckpt after each validation, for resume after a kill
        if not any(isinstance(c, RowwiseProxyUpdate) for c in callbacks):
            extra.append(RowwiseProxyUpdate())  # FALQON's merges, and the calibration of the default init: gradient
        if not any(isinstance(c, Throughput) for c in callbacks):
            extra.append(Throughput())
        if config.get("profile") is not None:
            extra.append(StepProfiler(config["profile"]))
        if extra:
            kwargs["callbacks"] = [*callbacks, *extra]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would replace the configured model by the checkpoint's hyperparameters here, so that a resume
        # silently trains the checkpoint's model. Instead read the file once (one-line errors for missing, truncated
        # or foreign files) and compare its model record with the configured model in _preflight.
        self._ckpt_record: tuple[str, dict[str, Any]] | None = None
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if ckpt_path is not None and str(ckpt_path) not in _CKPT_KEYWORDS:
            checkpoint = read_checkpoint(ckpt_path, "--ckpt_path")
            self._ckpt_record = (str(ckpt_path), {RECORD_KEY: checkpoint.get(RECORD_KEY)})

    def _preflight(self) -> None:
        # Before the Trainer runs: its setup writes config.yaml and the loggers' folders.
        pick_threads()
        if self._ckpt_record is not None:
            check_record(*self._ckpt_record, self.model.model_record())
        if self.model.model is None:
            check_conversion(self.model.backbone.config, self.model.falqon_config)
        self.datamodule.prepare(self.model.tokenizer, self.model.context_length)

    def before_fit(self) -> None:
        """Check the checkpoint, the conversion and the data before ``fit``."""
        self._preflight()

    def before_validate(self) -> None:
        """Check the checkpoint, the conversion and the data before ``validate``."""
        self._preflight()

    def before_test(self) -> None:
        """Check the checkpoint, the conversion and the data before ``test``."""
        self._preflight()

    def before_predict(self) -> None:
        """Check the checkpoint, the conversion and the data before ``predict``."""
        self._preflight()


def _one_line(err: BaseException) -> str:
    """A parser error (often a nested multi-line union report) as one line, noise lines dropped."""
    lines = [re.sub(r"^\s*- ", "", line).strip() for line in str(err).splitlines()]
    kept = [line for line in lines if line and not line.startswith(_UNION_NOISE) and "NoneType" not in line]
    # jsonargparse appends the parsed namespace to instantiation errors: the user's own config, hundreds of chars.
    return re.sub(r"\s*(with )?Namespace\(.*$", "", " ".join(kept)) or type(err).__name__


class _Stdout:
    """Whatever ``sys.stdout`` is at each write (a handler keeps its stream; tests and notebooks replace stdout)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


_STDOUT = _Stdout()


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERTS)


def _quiet_lightning() -> None:
    from lightning_utilities.core import rank_zero

    rank_zero.log.addFilter(_NoAdverts())  # Lightning logs its info lines (tips included) through this logger
    # Lightning's info lines ("Seed set to 0", "GPU available: False") are progress, not errors: stdout, so that a
    # failing run's stderr is its one error line.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:  # Lightning's own console handlers, not a user's file
                handler.setStream(_STDOUT)
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # Lightning's own pytree helper still uses torch's deprecated LeafSpec check (harmless, printed every run).
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def pick_threads(environ: dict[str, str] | None = None) -> int | None:
    """On a busy CPU-only machine, run torch on one thread unless ``OMP_NUM_THREADS`` says otherwise.

    torch starts one thread per core; when other processes already keep the cores busy, those threads wait on
    each other and a step gets several times slower (measured on 2 shared cores: README, "Set up and run").

    Returns:
        The thread count set, or ``None`` when nothing was changed.
    """
    environ = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in environ or torch.cuda.is_available() or not hasattr(os, "getloadavg"):
        return None
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if cores == 1 or load < cores - 0.5:
        return None
    torch.set_num_threads(1)
    print(
        f"torch runs on 1 CPU thread: the {cores} cores are busy (load {load:.1f}); set OMP_NUM_THREADS={cores} to use "
        "them all"
    )
    return 1


def run(argv: list[str] | None = None) -> int:
    """Run LightningCLI on ``argv`` (``None``: ``sys.argv``).

    Returns:
        The exit status: 0, or 2 for a bad config, checkpoint or data.
    """
    _quiet_lightning()
    try:
        FalqonCLI(
            FalqonLitModule,
            InstructionDataModule,
            args=argv,
            auto_configure_optimizers=False,  # FalqonLitModule.optim owns the optimizer and schedule
            parser_kwargs={"exit_on_error": False},
            save_config_kwargs={"overwrite": False},
            # FALQON's conversion line counts FP8 weights; Lightning's table counts parameters only (no FLOPs on CPU).
            trainer_defaults={"enable_model_summary": False},
        )
    except (ArgumentError, ValueError, TypeError, FileNotFoundError, ImportError) as err:  # ImportError: an extra
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
