"""Serving check (issue 5): does vLLM serve what falqon-lit trained and exported, and how fast?

Two parts, each in its own process with its own time limit (clean GPU memory; a hang in one cannot eat the other):

- ``smollm2``: fine-tune the embedded SmolLM2-135M-Instruct on chit-chat with ``FalqonLitModule`` +
  ``InstructionDataModule`` (hyperparameters of ``configs/smollm2-chat.yaml``) or load ``--ckpt``, export
  ``--target vllm``, then compare ``vllm.LLM`` with the trainer's own FP8 model on held-out chat prompts (greedy
  tokens, prompt log-probs), and ``vllm serve`` (OpenAI API) with offline ``LLM.generate``/``LLM.chat``.
- ``7b``: a LLaMA-7B-shaped random model converted to FALQON, trained 5 steps, exported FP8 (``vllm``) and bf16
  (``hf``) under /tmp; vLLM load time, weights memory and decode throughput of each, each load in its own process.

Usage (GPU host, repo root, staged vLLM installed):
    python -m benchmarks.serve_check [--part smollm2|7b] [--out DIR] [--steps 300] [--ckpt PATH]
Writes DIR/serve_<part>.json (``serve_smollm2.json``, ``serve_7b.json``: the current files' names in
``benchmarks/results/``) plus logs and prints a table last. Exit status 1 if any check failed or a part did not
finish (everything measured is still written), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from benchmarks.serving.compare import Check, passed
from benchmarks.serving.llama7b import measure_load, run_7b
from benchmarks.serving.procs import ENTRY, RESULT, VERDICTS, Recorder, log_tail, run_logged, say, set_vllm_env
from benchmarks.serving.smollm2 import run_smollm2


def versions() -> dict[str, str]:
    """Installed versions of the packages that matter here (read from metadata, nothing imported)."""
    found = {}
    for name in ("falqon-lit", "torch", "vllm", "transformers", "lightning", "compressed-tensors", "openai"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(summary: Mapping[str, Any]) -> str:
    """The short text report printed last: every check, then the main numbers of each part."""
    lines = ["", f"serve_check: {summary.get('device', '?')}, vllm {summary['versions'].get('vllm')}"]
    lines.append(f"{'part':8s} {'check':48s} {'value':>30s} {'limit':>14s}  result")
    for part, data in summary["parts"].items():
        for c in data.get("checks", []):
            value = _fmt(c["value"])[:30]
            verdict = VERDICTS[c["passed"]]
            lines.append(f"{part:8s} {c['name'][:48]:48s} {value:>30s} {c['limit']:>14s}  {verdict}")
    smollm2 = summary["parts"].get("smollm2", {})
    if "training" in smollm2:
        lines.append(f"smollm2 training: {smollm2['training']}")
    if "vllm_vs_trainer" in smollm2:
        facts = smollm2["vllm_vs_trainer"]
        own, lp = facts["trainer_bf16_vs_fp32"]["prompt_logprobs"], facts["prompt_logprobs"]
        lines.append(f"smollm2 trainer reference: {smollm2.get('trainer_dtype')}")
        lines.append(f"smollm2 identical leading tokens per prompt: {facts['greedy']['leading_identical']}")
        lines.append(
            f"smollm2 prompt log-prob |diff| max/mean: vLLM vs trainer {lp['max_abs']:.3g}/{lp['mean_abs']:.3g}, "
            f"trainer bf16 vs fp32 {own['max_abs']:.3g}/{own['mean_abs']:.3g}"
        )
    loads = summary["parts"].get("7b", {}).get("loads", {})
    if loads:
        lines.append(f"{'7b':8s} {'folder':6s} {'GiB':>6s} {'load s':>7s} {'weights GiB':>12s} {'tok/s':>8s}  mode")
        for label, m in loads.items():
            size = summary["parts"]["7b"].get(f"export_{label}", {}).get("gib", float("nan"))
            if "error" in m:
                lines.append(f"{'7b':8s} {label:6s} {size:6.1f}  {m['error'][:80]}")
                continue
            weights = m["weights_gib"] if isinstance(m["weights_gib"], float) else float("nan")
            lines.append(
                f"{'7b':8s} {label:6s} {size:6.1f} {m['load_s']:7.1f} {weights:12.2f} {m['output_tok_per_s']:8.0f}  "
                f"{m['mode']}"
            )
    lines.append(f"overall: {'PASS' if summary['passed'] else 'FAIL'}")
    return "\n".join(lines)


def run_part(part: str, timeout: float, args: argparse.Namespace) -> dict[str, Any]:
    """Run one part in its own process group with a hard time limit; returns its results (partial when cut)."""
    path = args.out / f"{part}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", ENTRY, "--child", part, "--deadline", str(time.time() + timeout - 5)]
    cmd += ["--out", str(args.out), "--steps", str(args.steps), "--recipe", args.recipe, "--limit", str(args.limit)]
    cmd += ["--ckpt", str(args.ckpt)] if args.ckpt else []
    cmd += ["--7b-eager"] if args.eager_7b else []
    say(f"part {part}: up to {timeout:.0f} s, log {args.out / f'{part}.log'}")
    code, _ = run_logged(cmd, args.out / f"{part}.log", timeout, env=os.environ, group=True)
    data = json.loads(path.read_text()) if path.exists() else {"checks": []}
    if code not in (0, 1):
        why = f"timed out after {timeout:.0f} s" if code is None else f"exit status {code}: {data.get('error')}"
        data["checks"].append(asdict(Check(f"{part} part finished", why, "finished", False, data.get("stage", ""))))
        print(f"--- {part}: {why} at stage {data.get('stage')!r}; end of {part}.log:")
        print(log_tail(args.out / f"{part}.log", 15), flush=True)
    return data


def run_child(args: argparse.Namespace) -> None:
    """Child-process entry: run one part (or one 7b load), then leave without interpreter teardown."""
    import traceback

    if args.child == "7b-load":
        try:
            result = measure_load(args.folder, args.eager_7b)
        except Exception as err:
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {err}"}
        print(RESULT + json.dumps(result), flush=True)
        os._exit(0)
    rec = Recorder(args.out / f"{args.child}.json")
    rec.update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
    try:
        (run_smollm2 if args.child == "smollm2" else run_7b)(args, rec)
        rec.update(stage="done")
        code = 0 if passed(rec.data["checks"]) else 1
    except Exception as err:
        traceback.print_exc()
        rec.update(error=f"{type(err).__name__}: {err}")
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # vLLM's in-process engine and NCCL can hang interpreter shutdown; everything is written


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["smollm2", "7b", "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "serve-out"))
    parser.add_argument("--steps", type=int, default=300, help="smollm2 optimizer steps (fewer if time runs out)")
    parser.add_argument("--ckpt", type=Path, help="smollm2: export this checkpoint/saved folder instead of training")
    parser.add_argument("--recipe", default="fp8-row", help="smollm2 FALQON recipe: fp8-row, paper, or yaml")
    parser.add_argument("--limit", type=int, default=1000, help="smollm2: chit-chat conversations to tokenize")
    parser.add_argument("--smollm2-timeout", type=float, default=240.0, help="seconds for the smollm2 part")
    parser.add_argument("--7b-timeout", dest="timeout_7b", type=float, default=300.0, help="seconds for the 7b part")
    parser.add_argument("--7b-eager", dest="eager_7b", action="store_true", help="7b loads without compile/graphs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected parts, write ``serve_<part>.json`` and print the table; 1 if anything failed."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    set_vllm_env()
    if args.child:
        run_child(args)
    parts = ["smollm2", "7b"] if args.part == "all" else [args.part]
    summary: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": versions(),
        "parts": {},
    }
    for part in parts:
        timeout = args.smollm2_timeout if part == "smollm2" else args.timeout_7b
        summary["parts"][part] = run_part(part, timeout, args)
        summary["device"] = summary["parts"][part].get("device", summary.get("device"))
    summary["passed"] = all(passed(p["checks"]) for p in summary["parts"].values())
    text = json.dumps(summary, indent=1, default=str) + "\n"
    (args.out / f"serve_{args.part}.json").write_text(text, encoding="utf-8")
    print(format_table(summary), flush=True)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
