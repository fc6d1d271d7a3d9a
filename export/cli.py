"""``falqon-export``: write a trained FALQON model as a vLLM FP8 folder, an ONNX graph or a dense HF folder.

    falqon-export --target vllm --ckpt runs/last.ckpt --out exports/smollm2-fp8
    falqon-export --target onnx --ckpt saved_model/ --out exports/smollm2-onnx --force

Exit status: 0 written (and verified), 1 verification over tolerance (nothing written), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from falqon_lit.exit_codes import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE

from .destination import check_destination
from .errors import ExportError
from .loading import load_for_export
from .onnx_graph import ONNX_OPSET
from .pipeline import TARGETS, ExportOptions, export_model
from .verify import DEFAULT_PROMPTS, print_report


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (targets come from the registry)."""
    defaults = ExportOptions()
    parser = argparse.ArgumentParser(
        prog="falqon-export",
        description="Export a FALQON-trained model with no post-training quantization step.",
        epilog="targets: " + "; ".join(f"{t.name}: {t.description}" for t in TARGETS.values()),
    )
    parser.add_argument("--target", required=True, help=f"one of {', '.join(TARGETS)}")
    parser.add_argument("--ckpt", required=True, type=Path, help="Lightning .ckpt or a save_falqon_model folder")
    parser.add_argument("--out", required=True, type=Path, help="folder to create (atomically)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=True, help="read back and compare (default: on)"
    )
    parser.add_argument("--dtype", default=defaults.dtype, help="embeddings/norms/lm_head dtype (default bfloat16)")
    parser.add_argument("--weight-strategy", default=defaults.weight_strategy, help="vllm: auto, tensor or channel")
    parser.add_argument("--onnx-activations", default=defaults.onnx_activations, help="onnx: fp8 (as trained) or float")
    parser.add_argument(
        "--onnx-precision",
        default=defaults.onnx_precision,
        help="onnx: float32 (fast) or float64 (greedy tokens identical to the trainer's)",
    )
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"onnx: opset (>= {ONNX_OPSET})")
    parser.add_argument("--prompts-file", type=Path, help="verification prompts, one per line")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens per verification prompt")
    parser.add_argument("--json", action="store_true", help="print the verification results as JSON on stdout")
    return parser


def _prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    if not path.is_file():
        raise ExportError(f"--prompts-file '{path}' does not exist; pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ExportError(f"--prompts-file '{path}' has no prompts; put one prompt per line")
    return prompts


def main(argv: Sequence[str] | None = None) -> int:
    """Run the exporter; returns the exit status."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True)
    args = build_parser().parse_args(argv)

    def say(line: str) -> None:
        console.print(f"[bold]falqon-export[/]: {escape(line)}", highlight=False)

    try:
        if args.target not in TARGETS:
            raise ExportError(f"unknown export target {args.target!r}; choose one of {', '.join(TARGETS)}")
        options = ExportOptions(
            args.dtype, args.weight_strategy, args.onnx_activations, args.onnx_precision, args.opset
        )
        prompts = _prompts(args.prompts_file)
        check_destination(args.out, args.force, say)  # before loading: a bad --out fails in a second, not after work
        console.print(f"loading {args.ckpt}")
        source = load_for_export(args.ckpt)
        report = export_model(
            source.model,
            source.tokenizer,
            args.target,
            args.out,
            options=options,
            force=args.force,
            verify=args.verify,
            prompts=prompts,
            new_tokens=args.new_tokens,
            falqon_config=source.falqon_config,
            progress=say,
        )
    except ExportError as err:
        print(f"falqon-export: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if report.results:
        print_report(report.results, console)
    if args.json:
        print(json.dumps([r.as_dict() for r in report.results], indent=2, allow_nan=False))
    return EXIT_OK if report.passed else EXIT_CHECK_FAILED


if __name__ == "__main__":
    sys.exit(main())
