"""What the benchmarks share around a measurement: CUDA-event timing of a layer step, the shape-sweep command line
of ``layer_bench`` and ``block_bench``, and the result JSON files."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ShapeBench = Callable[[int, int, int, int], dict[str, Any]]
"""``bench(tokens, in_features, out_features, rank)`` -> one row of named times (ms) and flags."""
GroupBench = Callable[[int, int, list[int], int], dict[str, float]]
"""``bench(tokens, in_features, out_widths, rank)`` -> one row of named times (ms) for projections sharing an input."""


def time_ms(fn: Callable[[], object], repeats: int = 50, warmup: int = 10) -> float:
    """Median CUDA-event time of ``fn`` in milliseconds, over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One forward and backward of ``module`` on ``x`` with output gradient ``grad``, as a step to time."""

    def step() -> None:
        x.grad = None  # a real network passes grad_x on; do not time a leaf's gradient accumulation
        y = module(x)
        y.backward(grad)

    return step


def write_json(path: str | Path, data: Any) -> None:
    """Write a benchmark's results to ``path`` as JSON indented by one space (the files of ``benchmarks/results/``)."""
    Path(path).write_text(json.dumps(data, indent=1))


def _print_row(title: str, row: dict[str, Any], floor_name: str) -> None:
    floor = row[floor_name]
    print(f"\n{title} ({torch.cuda.get_device_name()})")
    for name, ms in row.items():
        if isinstance(ms, float):  # other entries (flags) go to the JSON only
            print(f"  {name:28s} {ms:8.3f} ms  {ms / floor:5.2f}x floor")


def sweep_shapes(
    description: str, bench: ShapeBench, floor_name: str, group_bench: GroupBench | None = None, groups: str = ""
) -> None:
    """The command line of a layer benchmark: run ``bench`` over ``--tokens`` × ``--shapes`` × ``--ranks`` (and
    ``group_bench`` over ``--groups``, default ``groups``), print each row's times relative to its ``floor_name``
    entry and write every row to ``--json``.

    Args:
        description: the benchmark's module docstring; its first line is the ``--help`` description.
        bench: one layer shape; rows get ``tokens``, ``in``, ``out`` and ``rank`` keys.
        floor_name: the row entry every time is divided by (the FP8 GEMMs alone).
        group_bench: projections ``KxN1+N2+...`` sharing one input; ``--groups`` exists only with it.
        groups: the default of ``--groups``.
    """
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--tokens", default="8192")
    parser.add_argument("--shapes", default="4096x4096,4096x11008")
    parser.add_argument("--ranks", default="64")
    if group_bench is not None:
        parser.add_argument("--groups", default=groups)
    parser.add_argument("--json", "--out", default=None)
    args = parser.parse_args()
    tokens_list, ranks = [int(t) for t in args.tokens.split(",")], [int(r) for r in args.ranks.split(",")]
    results = []
    for tokens in tokens_list:
        for shape in args.shapes.split(","):
            k, n = map(int, shape.split("x"))
            for rank in ranks:
                row = bench(tokens, k, n, rank)
                results.append({"tokens": tokens, "in": k, "out": n, "rank": rank, **row})
                _print_row(f"{tokens} tokens, {k}->{n}, r={rank}", row, floor_name)
    group_specs = args.groups.split(",") if group_bench is not None else []
    for tokens in tokens_list:
        for spec in filter(None, group_specs):
            k, outs = spec.split("x")
            widths = [int(n) for n in outs.split("+")]
            for rank in ranks:
                row = group_bench(tokens, int(k), widths, rank)
                results.append({"tokens": tokens, "in": int(k), "group": widths, "rank": rank, **row})
                _print_row(f"{tokens} tokens, group {k}->{outs}, r={rank}", row, floor_name)
    if args.json:
        write_json(args.json, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results})
