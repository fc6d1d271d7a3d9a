"""The real fit path's throughput (one GPU): packed vs unpacked chit-chat, compile pay-back, and the fixed-shape bound.

Usage: python -m benchmarks.fit_throughput --out fit-out [--steps 12] [--window 4] [--parts llama,compile,smollm2,bench]
(about 4-5 minutes on one H200 with the default parts, most of it model builds, tokenization and compilation)

Parts (each config in its own process; inside it the model is built and the data tokenized once, then each mode
runs as a fresh ``Trainer.fit`` of ``--steps`` steps with the config's trainer settings, ``RowwiseProxyUpdate`` and
``Throughput``; no validation, checkpoints, loggers or ``QuantStats``):
- ``llama``: ``configs/llama-7b-shape.yaml`` packed and unpacked (length-grouped, the old default), eager.
- ``compile``: the same model packed with ``torch.compile`` of every block (``--model.compile``): the steady step,
  the compilation's extra time in the first window and the pay-back point in steps; ``graphs`` counts what dynamo
  compiled (``benchmarks/recompiles.py`` counts every mode on the CPU).
- ``bucket`` (not in the default parts: ~1-2 more minutes): unpacked, widths bucketed to 64, compiled.
- ``smollm2``: ``configs/smollm2-chat.yaml`` unpacked (before) and packed (after).
- ``bench``: ``train_step_bench.py`` falqon-default on a fixed random batch of the packed fit's shape (8 x 1024,
  checkpointing on, rank 16): the fixed-shape non-padding tokens/s the packed fit is compared against (>= 90%).
Tokens/s count real tokens only; the steady numbers leave out the first window (warm-up, compilation). Writes
``<out>/fits.json`` (after each part), ``<out>/bench.json`` and ``<out>/summary.json``, and prints a table last.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import write_json

HERE = Path(__file__).resolve().parent
CONFIGS = {"llama": "configs/llama-7b-shape.yaml", "smollm2": "configs/smollm2-chat.yaml"}
MODES = {  # part: [(mode, packing, pad_to_multiple_of, compile)]
    "llama": [("packed", True, 1, False), ("unpacked", False, 1, False)],
    "compile": [("packed+compile", True, 1, True)],
    "bucket": [("bucket64+compile", False, 64, True)],
    "smollm2": [("unpacked", False, 1, False), ("packed", True, 1, False)],
}


def run_modes(
    config: str, modes: list[tuple[str, bool, int, bool]], steps: int, window: int, cli_args: list[str]
) -> list[dict]:
    """Build the config's module and data once, then fit each mode afresh; one result per mode."""
    import torch
    import torch._dynamo
    from lightning.pytorch import Trainer
    from torch._dynamo.utils import counters

    from falqon_lit.backbone import compile_blocks
    from falqon_lit.callbacks import RowwiseProxyUpdate, Throughput
    from falqon_lit.cli import FalqonCLI
    from falqon_lit.data import InstructionDataModule
    from falqon_lit.module import FalqonLitModule

    cli = FalqonCLI(
        FalqonLitModule, InstructionDataModule, run=False, auto_configure_optimizers=False, save_config_callback=None,
        args=["--config", str(HERE.parent / config), "--trainer.logger=false", "--model.compile=false", *cli_args],
    )  # fmt: skip
    module, data, settings = cli.model, cli.datamodule, cli.config["trainer"]
    data.prepare(module.tokenizer, module.context_length)
    proxy = [c for c in cli.trainer.callbacks if isinstance(c, RowwiseProxyUpdate)]
    compiled, results = False, []
    for mode, packing, multiple, use_compile in modes:
        data.packing, data.pad_to_multiple_of = packing, multiple
        if use_compile and not compiled:
            module.configure_model()
            compile_blocks(module.model)
            compiled = True
        torch._dynamo.reset()
        counters.clear()
        throughput = Throughput(log_every_n_steps=window)
        trainer = Trainer(
            accelerator=settings["accelerator"], devices=1, precision=settings["precision"],
            gradient_clip_val=settings["gradient_clip_val"], max_steps=steps, limit_val_batches=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, callbacks=[*copy.deepcopy(proxy), throughput],
        )  # fmt: skip
        trainer.fit(module, datamodule=data)
        sampler = data._train_loader.batch_sampler
        steady_steps, tokens, seconds = throughput.steady()
        first = throughput.windows[0]
        rates = throughput.rates(steady_steps, tokens, seconds, 1)
        results.append(
            {
                "config": config,
                "mode": mode,
                "compile": use_compile,
                "steps": steps,
                "window": window,
                "padding_fraction": sampler.padding_fraction(multiple, data.max_length),
                "tokens_per_step": tokens / steady_steps,
                "tokens_per_s": rates["tokens_per_s"],
                "step_s": rates["step_s"],
                "first_window_s": first[2],
                "mfu_fp8": rates.get("mfu_fp8"),
                "mfu_bf16": rates.get("mfu_bf16"),
                "graphs_compiled": counters["stats"]["unique_graphs"] if use_compile else None,
                "fp8_engaged": throughput.fp8_line,
                "device": throughput.device_name,
                "torch": torch.__version__,
            }
        )
        print("RESULT " + json.dumps(results[-1]), flush=True)
    return results


def _child(part: str, args: argparse.Namespace, out: Path) -> list[dict]:
    """Run one part in a fresh process (its output goes to ``<out>/<part>.log``); a failure becomes a row."""
    cmd = [sys.executable, "-m", "benchmarks.fit_throughput", "--child", part]
    cmd += ["--steps", str(args.steps), "--window", str(args.window), "--cli-args", args.cli_args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return [{"config": part, "mode": "error", "error": f"timed out after {args.timeout} s"}]
    (out / f"{part}.log").write_text(proc.stdout + proc.stderr)
    rows = [json.loads(ln[len("RESULT ") :]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        rows.append({"config": part, "mode": "error", "error": f"exit {proc.returncode}: {tail}"})
    return rows


def _bench(out: Path, args: argparse.Namespace) -> list[dict]:
    path = out / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.train_step_bench", "--variants", "falqon-default", "--ckpt", "on"]
    cmd += ["--batch", "8", "--seq", "1024", "--rank", "16", "--json", str(path), "--timeout", str(args.timeout)]
    subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 60)
    return json.loads(path.read_text()) if path.exists() else [{"variant": "falqon-default", "error": "no result"}]


def _print_table(rows: list[dict], bench: list[dict]) -> dict:
    print(f"\n{'config':30s} {'mode':18s} {'pad':>6s} {'tok/step':>9s} {'tok/s':>9s} {'step s':>7s} "
          f"{'1st win s':>9s} {'MFU fp8':>8s} {'graphs':>7s}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['config']:30s} {r['mode']:18s} {r['error']}")
            continue
        mfu = f"{100 * r['mfu_fp8']:7.1f}%" if r["mfu_fp8"] is not None else f"{'-':>8s}"
        graphs = str(r["graphs_compiled"]) if r["graphs_compiled"] is not None else "-"
        print(
            f"{r['config']:30s} {r['mode']:18s} {100 * r['padding_fraction']:5.1f}% {r['tokens_per_step']:9.0f} "
            f"{r['tokens_per_s']:9.0f} {r['step_s']:7.3f} {r['first_window_s']:9.1f} {mfu} {graphs:>7s}"
        )
    by = {(r["config"], r["mode"]): r for r in rows if "error" not in r}
    summary: dict = {}
    packed, fixed = by.get((CONFIGS["llama"], "packed")), next((b for b in bench if "tokens_per_s" in b), None)
    if fixed is not None:
        print(
            f"fixed-shape bench falqon-default 8x1024 ckpt on: {fixed['step_ms']:.0f} ms, "
            f"{fixed['tokens_per_s']:.0f} tok/s"
        )
    if packed and fixed:
        summary["packed_fit_vs_fixed_shape"] = packed["tokens_per_s"] / fixed["tokens_per_s"]
        print(f"packed 7B-shape fit / fixed-shape bench tokens/s: {100 * summary['packed_fit_vs_fixed_shape']:.1f}% "
              "(target >= 90%)")  # fmt: skip
    compiled = by.get((CONFIGS["llama"], "packed+compile"))
    if packed and compiled:
        overhead = compiled["first_window_s"] - packed["first_window_s"]
        saving = packed["step_s"] - compiled["step_s"]
        summary["compile_overhead_s"], summary["compile_saving_s_per_step"] = overhead, saving
        summary["compile_payback_steps"] = overhead / saving if saving > 0 else None
        payback = f"{overhead / saving:.0f} steps" if saving > 0 else "never (no steady saving)"
        print(f"compile, packed: +{overhead:.1f} s in the first window, {1e3 * saving:.0f} ms/step saved: pays back "
              f"after {payback}")  # fmt: skip
    for config in CONFIGS.values():
        before, after = by.get((config, "unpacked")), by.get((config, "packed"))
        if before and after:
            summary[f"{config} packed/unpacked tokens/s"] = after["tokens_per_s"] / before["tokens_per_s"]
            print(f"{config}: packed {after['tokens_per_s']:.0f} vs unpacked {before['tokens_per_s']:.0f} tok/s "
                  f"({after['tokens_per_s'] / before['tokens_per_s']:.2f}x)")  # fmt: skip
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fit-throughput-out")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per fit")
    parser.add_argument("--window", type=int, default=4, help="steps per throughput window (the first is warm-up)")
    parser.add_argument("--parts", default="llama,compile,smollm2,bench")
    parser.add_argument("--timeout", type=int, default=420, help="seconds one part may take")
    parser.add_argument("--cli-args", default="", help="extra falqon CLI overrides for every fit, e.g. for a CPU try")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        modes = [mode for part in args.child.split("+") for mode in MODES[part]]
        config = CONFIGS["smollm2" if args.child == "smollm2" else "llama"]
        run_modes(config, modes, args.steps, args.window, shlex.split(args.cli_args))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    if unknown := set(parts) - {*MODES, "bench"}:
        parser.error(f"--parts has unknown {sorted(unknown)}; choose from {[*MODES, 'bench']}")
    children = ["+".join(p for p in ("llama", "compile", "bucket") if p in parts)]  # one process builds the 7B once
    children = [c for c in children if c] + (["smollm2"] if "smollm2" in parts else [])
    rows: list[dict] = []
    for child in children:
        rows += _child(child, args, out)
        write_json(out / "fits.json", rows)
    bench = _bench(out, args) if "bench" in parts else []
    summary = _print_table(rows, bench)
    write_json(out / "summary.json", {"fits": rows, "bench": bench, "summary": summary})


if __name__ == "__main__":
    main()
