"""Padding fraction of the chit-chat training batches per batching mode (CPU, no model): what packing saves.

Usage: python -m benchmarks.padding [--json padding.json]
Rows: the shapes of configs/llama-7b-shape.yaml, configs/smollm2-chat.yaml and configs/quickstart.yaml (rows x
max_length), each as random batches, length-grouped batches, length-grouped batches bucketed to multiples of 64,
and packed rows; ``shapes`` counts the distinct batch shapes of one epoch (each a recompile of a compiled step).
"""

from __future__ import annotations

import argparse

from benchmarks.harness import write_json
from falqon_lit.backbone import load_tokenizer, resolve_backbone
from falqon_lit.data import InstructionDataModule

SHAPES = {"llama-7b-shape": (8, 1024, None), "smollm2-chat": (16, 512, None), "quickstart": (4, 96, 400)}
MODES = {  # name: (packing, group_by_length, pad_to_multiple_of)
    "random": (False, False, 1),
    "grouped": (False, True, 1),
    "grouped+bucket64": (False, True, 64),
    "packed": (True, True, 1),
}


def measure(tokenizer, batch_size: int, max_length: int, limit: int | None) -> list[dict]:
    """One row per mode: padding fraction, batches and distinct batch shapes of epoch 0."""
    rows = []
    data = InstructionDataModule("chitchat", max_length=max_length, batch_size=batch_size, limit=limit)
    data.prepare(tokenizer)  # tokenize once; the modes differ only in how the loader batches
    for mode, (packing, grouped, multiple) in MODES.items():
        data.packing, data.group_by_length, data.pad_to_multiple_of = packing, grouped, multiple
        loader = data.train_dataloader()
        shapes = {tuple(b["input_ids"].shape) for b in loader}
        sampler = loader.batch_sampler
        rows.append(
            {
                "mode": mode,
                "batch_size": batch_size,
                "max_length": max_length,
                "conversations": len(data.train_data),
                "batches": len(sampler),
                "padding_fraction": sampler.padding_fraction(multiple, max_length),
                "shapes": len(shapes),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_backbone(None))
    results = {name: measure(tokenizer, *shape) for name, shape in SHAPES.items()}
    print(f"{'config':16s} {'mode':18s} {'rows x len':>11s} {'batches':>8s} {'padding':>8s} {'shapes':>7s}")
    for name, rows in results.items():
        for r in rows:
            size = f"{r['batch_size']}x{r['max_length']}"
            print(
                f"{name:16s} {r['mode']:18s} {size:>11s} {r['batches']:8d} "
                f"{100 * r['padding_fraction']:7.1f}% {r['shapes']:7d}"
            )
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
