"""``falqon eval``: zero-shot benchmark accuracy of a model folder, the embedded SmolLM2, or a training checkpoint.

Examples::

    falqon eval --model smollm2 --tasks arc_easy,boolq --limit 100
    falqon eval --model exports/vllm --tasks mmlu --limit 5 --json results.json
    falqon eval --ckpt lightning_logs/version_0/checkpoints/last.ckpt --tasks hellaswag --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from falqon_lit.backbone import DTYPES
from falqon_lit.exit_codes import EXIT_OK, EXIT_USAGE

_DEFAULT_TASKS = "arc_easy,arc_challenge,hellaswag,boolq"


class EvalCliError(ValueError):
    """A bad command line (unknown task, missing model folder, ...): printed as one ``error:`` line, exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="falqon eval", description="Zero-shot multiple-choice accuracy (lm-evaluation-harness scoring)."
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        default=None,
        help="local Hugging Face folder (e.g. an exported vLLM/hf folder) or 'smollm2' (the default)",
    )
    source.add_argument("--ckpt", default=None, help="Lightning checkpoint of a FalqonLitModule")
    parser.add_argument("--tasks", default=_DEFAULT_TASKS, help=f"comma-separated task names; default {_DEFAULT_TASKS}")
    parser.add_argument("--limit", type=int, default=None, help="first N items per task (per subject for mmlu)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass; default 8")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    parser.add_argument("--device", default="auto", help="auto (cuda if available; the default), cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="dtype of a --model folder; a --ckpt keeps its own"
    )
    parser.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise EvalCliError(f"--device {name!r} is not a torch device; use auto, cpu or cuda[:N]") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalCliError(f"--device {name!r} needs CUDA, which is not available here; use --device cpu")
    return device


def _check_tasks(spec: str) -> list[str]:
    from falqon_lit.eval.tasks import task_names

    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise EvalCliError(f"--tasks needs at least one task name, got {spec!r}")
    known = set(task_names())
    if unknown := [t for t in tasks if t not in known]:
        raise EvalCliError(
            f"--tasks has unknown task(s) {', '.join(unknown)}; see --list-tasks (e.g. arc_easy, boolq, mmlu)"
        )
    return tasks


def _load_checkpoint(path: Path) -> tuple[Any, Any]:
    from falqon_lit.checkpoint import CheckpointError, load_checkpoint

    try:
        loaded = load_checkpoint(path, what="--ckpt")
    except CheckpointError as err:
        raise EvalCliError(str(err)) from None
    return loaded.model, loaded.tokenizer  # in the dtype the module was trained with


def _load_folder(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        from falqon_lit.assets import smollm2_path

        folder = smollm2_path()
    else:
        folder = Path(name)
        if not (folder / "config.json").is_file():
            raise EvalCliError(
                f"--model {name!r} is not a Hugging Face model folder (no config.json); pass a folder or 'smollm2'"
            )
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any]:
    """The ``(model, tokenizer)`` that ``--model`` or ``--ckpt`` names, on ``--device`` in eval mode."""
    device = _device(args.device)
    dtype = DTYPES[args.dtype]
    if args.ckpt is not None:
        model, tokenizer = _load_checkpoint(Path(args.ckpt))
    else:
        model, tokenizer = _load_folder(args.model or "smollm2", dtype)
    return model.to(device).eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation CLI; returns the exit status (0 ok, 2 bad arguments)."""
    from rich.console import Console

    from falqon_lit.eval.scoring import evaluate

    args = _parser().parse_args(argv)
    try:
        if args.list_tasks:
            from falqon_lit.eval.tasks import task_names

            print("\n".join(task_names()))
            return EXIT_OK
        if args.limit is not None and args.limit <= 0:
            raise EvalCliError(f"--limit must be > 0, got {args.limit}")
        if args.batch_size <= 0:
            raise EvalCliError(f"--batch-size must be > 0, got {args.batch_size}")
        tasks = _check_tasks(args.tasks)
        model, tokenizer = load_model_and_tokenizer(args)
    except EvalCliError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    report = evaluate(
        model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size, progress=not args.no_progress
    )
    source = args.ckpt or args.model or "smollm2"
    Console().print(report.to_table(title=f"{source}: 0-shot accuracy (limit {args.limit}, {report.seconds:.0f} s)"))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(source), **report.to_dict()}, indent=2) + "\n", encoding="utf-8")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
