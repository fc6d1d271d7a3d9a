"""``falqon``: train (``fit|validate|test|predict``, LightningCLI), score (``eval``) and draw (``plot``).

``falqon fit --config configs/quickstart.yaml`` trains; ``--print_config`` prints the resolved YAML; any key can be
overridden on the command line (``--trainer.max_steps 10``). Bad configs or data end with one ``error: ...`` line on
stderr and exit status 2. Lightning, transformers and the trainer are imported only for the subcommand that needs
them, so ``falqon --help`` answers at once.
"""

from __future__ import annotations

import sys
from typing import Any

from falqon_lit.exit_codes import EXIT_OK, EXIT_USAGE

_TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
USAGE = """usage: falqon {fit,validate,test,predict,eval,plot} ...

FALQON: FP8 melded-LoRA fine-tuning on Lightning.

subcommands:
  fit        train: falqon fit --config configs/quickstart.yaml [--trainer.max_steps N] [--ckpt_path CKPT]
  validate   validation loss of a checkpoint (--ckpt_path)
  test       test loss of a checkpoint (--ckpt_path)
  predict    greedy completions of the validation prompts
  eval       zero-shot benchmark accuracy: falqon eval --ckpt CKPT --tasks arc_easy --limit 100
  plot       training-curve and FP8-statistics PNGs: falqon plot LOG_DIR --out DIR

`falqon SUBCOMMAND --help` lists a subcommand's options (fit: every config key). Export: falqon-export --help.
"""


def main(args: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0, or 2 for a bad config, checkpoint or data)."""
    argv = sys.argv[1:] if args is None else list(args)
    command = argv[0] if argv else None
    if command == "eval":
        from falqon_lit.eval.cli import main as eval_main

        return eval_main(argv[1:])
    if command == "plot":
        from falqon_lit.plots import main as plot_main

        return plot_main(argv[1:])
    if command in ("-h", "--help"):
        print(USAGE, end="")
        return EXIT_OK
    if command not in _TRAINER_COMMANDS and not (command or "").startswith("-"):  # options go to LightningCLI
        got = f"unknown subcommand {command!r}" if command else "no subcommand"
        print(
            f"error: {got}; use one of {', '.join((*_TRAINER_COMMANDS, 'eval', 'plot'))} (see falqon --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from falqon_lit.trainer_cli import run

    return run(None if args is None else argv)  # None: LightningCLI reads sys.argv itself (and does not warn)


def __getattr__(name: str) -> Any:
    # The LightningCLI class, imported on first use (it pulls in Lightning and transformers).
    if name == "FalqonCLI":
        from falqon_lit.trainer_cli import FalqonCLI

        return FalqonCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
