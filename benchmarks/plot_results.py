"""Bar charts of recorded benchmark JSON (train-step and layer) for RESULTS.md and the README.

Usage: python benchmarks/plot_results.py benchmarks/results/train_step.json benchmarks/results/layer.json
       python benchmarks/plot_results.py benchmarks/results/train_step_compile.json \
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


def plot_layer(data: dict, out: Path) -> Path:
    """Layer forward+backward time relative to its two FP8 GEMMs, per shape."""
    rows = data["results"]
    names = [k for k in rows[0] if k not in ("tokens", "in", "out", "rank")]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(
            xs, [row[n] for n in names], width, label=f"{row['tokens']} tok, {row['in']}->{row['out']}, r={row['rank']}"
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [n.replace("_", "\n") for n in names], fontsize=6)
    ax.set_ylabel("forward+backward (ms)")
    ax.set_title(f"One linear layer - {data['device']}", fontsize=9)
    ax.legend(fontsize=7)
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
