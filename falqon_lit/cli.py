"""``falqon``: LightningCLI over ``FalqonLitModule`` and ``InstructionDataModule`` (fit/validate/test/predict).

``falqon fit --config configs/quickstart.yaml`` trains; ``--print_config`` prints the resolved YAML; any key can be
overridden on the command line (``--trainer.max_steps 10``). The resolved config is saved next to the logs and
checkpoints. Bad configs or data end with one ``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from falqon_lit.callbacks import StepProfiler, Throughput
from falqon_lit.data import InstructionDataModule
from falqon_lit.exit_codes import EXIT_USAGE
from falqon_lit.module import FalqonLitModule

"""Exit status for bad configs and data (argparse's convention)."""
_UNION_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type")


class FalqonCLI(LightningCLI):
    """LightningCLI with a Rich progress bar unless the config disables progress bars or brings its own, a
    ``Throughput`` callback (tokens/s, step time, MFU, FP8 engagement) unless the config brings one, and
    ``--profile N``: a kernel-family profile of step N (``StepProfiler``)."""

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
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            callbacks.append(RichProgressBar())
        if not any(isinstance(c, Throughput) for c in callbacks):
            callbacks.append(Throughput())
        if config.get("profile") is not None:
            callbacks.append(StepProfiler(config["profile"]))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def _prepare_data(self) -> None:
        # Load and tokenize before the Trainer runs: bad data then fails before loggers create run folders.
        self.datamodule.prepare(self.model.tokenizer, self.model.context_length)

    def before_fit(self) -> None:
        """Prepare the data before ``fit``."""
        self._prepare_data()

    def before_validate(self) -> None:
        """Prepare the data before ``validate``."""
        self._prepare_data()

    def before_test(self) -> None:
        """Prepare the data before ``test``."""
        self._prepare_data()

    def before_predict(self) -> None:
        """Prepare the data before ``predict``."""
        self._prepare_data()


def _one_line(err: BaseException) -> str:
    """A parser error (often a nested multi-line union report) as one line, noise lines dropped."""
    lines = [re.sub(r"^\s*- ", "", line).strip() for line in str(err).splitlines()]
    kept = [line for line in lines if line and not line.startswith(_UNION_NOISE) and "NoneType" not in line]
    return " ".join(kept) or type(err).__name__


def main(args: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0, or 2 for a bad config or bad data).

    ``falqon eval ...`` (benchmark scoring) goes to ``falqon_lit.eval.cli``, ``falqon plot LOG_DIR [--out DIR]``
    (training-curve and FP8-statistics PNGs) to ``falqon_lit.plots``; every other subcommand is LightningCLI's.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["eval"]:
        from falqon_lit.eval.cli import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["plot"]:
        from falqon_lit.plots import main as plot_main

        return plot_main(argv[1:])
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    try:
        FalqonCLI(
            FalqonLitModule,
            InstructionDataModule,
            args=args,
            auto_configure_optimizers=False,  # FalqonLitModule.optim owns the optimizer and schedule
            parser_kwargs={"exit_on_error": False},
            save_config_kwargs={"overwrite": False},
        )
    except (ArgumentError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
