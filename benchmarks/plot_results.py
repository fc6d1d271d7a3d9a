"""Bar charts of recorded benchmark JSON (train-step and layer) for RESULTS.md and the README.

Usage: python -m benchmarks.plot_results benchmarks/results/train_step.json benchmarks/results/layer.json
       python -m benchmarks.plot_results benchmarks/results/train_step_compile.json \
           --train-step-png train_step_compile.png   # a train-step chart alone, under another name
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _bar_note(r: dict) -> str:
    """What a train-step bar says: time and memory, or why there is no measurement."""
    if "skipped" in r:
        return "skipped"
    if "error" in r:
        return "OOM" if "out of memory" in r["error"].lower() else "failed"
    return f"{r['step_ms']:.0f} ms\n{r['peak_mem_gib']:.0f} GiB"


def _bar_color(r: dict) -> str:
    if "skipped" in r:
        return "#c7c7c7"
    if "error" in r:
        return "#d62728"
    return "#1f77b4" if r["variant"].startswith("falqon") else "#7f7f7f"


def plot_train_step(results: list[dict], out: Path, name: str = "train_step.png") -> Path:
    """Median step time per variant, grouped by gradient checkpointing; failed and skipped runs are marked."""
    fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * len(results)), 3.6))
    labels = [f"{r['variant']}\nckpt {'on' if r['grad_ckpt'] else 'off'}" for r in results]
    times = [r.get("step_ms", 0.0) for r in results]
    bars = ax.bar(range(len(labels)), times, color=[_bar_color(r) for r in results])
    for bar, r in zip(bars, results, strict=True):
        ax.text(
            bar.get_x() + bar.get_width() / 2, bar.get_height() + 10, _bar_note(r), ha="center", va="bottom", fontsize=7
        )
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("median step (ms), lower is better")
    first = next(r for r in results if "step_ms" in r)
    ax.set_title(
        f"LLaMA-7B shape, batch {first['batch']}x{first['seq']}, r={first['rank']} - {first['device']}", fontsize=9
    )
    ax.set_ylim(0, max(times) * 1.25)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=130)
    return path


def _layer_label(row: dict) -> str:
    """A layer_bench.py row's shape: one layer (``out``) or a group of projections sharing the input (``group``)."""
    outs = "+".join(str(o) for o in row["group"]) if "group" in row else str(row["out"])
    return f"{row['tokens']} tok, {row['in']}->{outs}, r={row['rank']}"


def plot_layer(data: dict, out: Path) -> Path:
    """Layer forward+backward time per shape, one panel each (single layers and grouped projections differ)."""
    rows = data["results"]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.8), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        names = [k for k, v in row.items() if isinstance(v, float)]  # the timings (ms); shape fields are ints
        ax.bar(range(len(names)), [row[n] for n in names], color="#1f77b4")
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=5)
        ax.set_title(_layer_label(row), fontsize=8)
    axes[0][0].set_ylabel("forward+backward (ms)")
    fig.suptitle(f"One linear layer / grouped projections - {data['device']}", fontsize=9)
    fig.tight_layout()
    path = out / "layer.png"
    fig.savefig(path, dpi=130)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_step_json")
    parser.add_argument("layer_json", nargs="?", help="optional: also chart a layer_bench.py JSON")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--train-step-png", default="train_step.png", help="file name of the train-step chart")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(plot_train_step(json.loads(Path(args.train_step_json).read_text()), out, args.train_step_png))
    if args.layer_json:
        print(plot_layer(json.loads(Path(args.layer_json).read_text()), out))


if __name__ == "__main__":
    main()
