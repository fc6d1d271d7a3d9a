"""Pictures of a training run, read back from its Lightning log folder: training curves and FP8 statistics.

Reads what ``FalqonLitModule`` (``train/loss``, ``train/ppl``, ``train/acc``, ``val/loss``, ``val/ppl``,
``val/acc``), ``QuantStats`` (``quant/<stat>``), ``RowwiseProxyUpdate`` (``proxy/rows_merged``) and ``FitSummary``
(``summary/val_loss``, before and after fit) logged, from a ``CSVLogger``'s ``metrics.csv`` and/or a
``TensorBoardLogger``'s event files (both may sit in one ``version_N`` folder).

    falqon plot runs/quickstart/lightning_logs/version_0 --out plots/quickstart

One step grid: the x axis is the number of optimizer steps done when a value was measured. Lightning logs a
validation run at the index of the batch it follows, one less than that; :func:`read_metrics` adds the one, so
``val/`` points line up with ``quant/`` and ``proxy/`` (logged after the step) and the before-fit loss sits at 0.

Figures are built with ``matplotlib.figure.Figure`` and never through ``pyplot``, so nothing here switches the
process's backend: saving uses Agg, and a notebook keeps its inline backend (show the PNG, or the returned figure).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from falqon_lit.exit_codes import EXIT_OK, EXIT_USAGE

Series = list[tuple[int, float]]
"""``[(step, value)]`` sorted by step, one value per step."""
Metrics = dict[str, Series]
"""Metric name (``train/loss``, ``quant/a_amax``, ...) -> its series."""

CSV_NAME = "metrics.csv"
"""File name of ``CSVLogger`` metrics."""
TB_GLOB = "events.out.tfevents.*"
"""File names of TensorBoard event files."""
TRAINING_CURVES_PNG = "training_curves.png"
QUANT_STATS_PNG = "quant_stats.png"
"""Exit status of ``main`` for a missing folder or one without logs."""
_NOT_METRICS = {"step", "epoch", "hp_metric"}
_AFTER_BATCH = ("val/",)
"""Metrics Lightning logs at the index of the batch they follow (steps done − 1); shifted by one when read."""
_DPI = 120
_PLAIN = FuncFormatter(lambda v, _: f"{v:g}")
_MINOR_2_5 = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else "")
_COUNT = FuncFormatter(
    lambda v, _: f"{v / 1e6:g}M" if abs(v) >= 1e6 else f"{v / 1e3:g}k" if abs(v) >= 1e4 else f"{v:g}"
)
_PERCENT = FuncFormatter(lambda v, _: f"{100 * v:.3g}%")


# ----------------------------------------------------------------------------------------------------------- reading
def has_logs(folder: Path) -> bool:
    """Whether ``folder`` itself holds ``metrics.csv`` or TensorBoard event files."""
    return (folder / CSV_NAME).is_file() or any(folder.glob(TB_GLOB))


def find_log_dir(log_dir: str | Path) -> Path:
    """The folder holding the logs: ``log_dir`` itself, or its newest sub-folder with logs (``version_N``).

    Raises:
        FileNotFoundError: ``log_dir`` does not exist.
        ValueError: neither ``log_dir`` nor any sub-folder holds ``metrics.csv`` or TensorBoard event files.
    """
    folder = Path(log_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"log folder '{folder}' does not exist; pass a Lightning log folder (version_N)")
    if has_logs(folder):
        return folder
    candidates = {p.parent for p in [*folder.rglob(CSV_NAME), *folder.rglob(TB_GLOB)] if p.is_file()}
    if not candidates:
        raise ValueError(
            f"log folder '{folder}' has no {CSV_NAME} or TensorBoard event files; pass the version_N folder that a "
            "CSVLogger or TensorBoardLogger wrote (e.g. runs/quickstart/lightning_logs/version_0)"
        )
    return max(candidates, key=lambda p: max(f.stat().st_mtime for f in p.iterdir() if f.is_file()))


def _read_csv(path: Path) -> dict[str, dict[int, float]]:
    values: dict[str, dict[int, float]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for name, text in row.items():
                if name in _NOT_METRICS or name is None or text in (None, ""):
                    continue
                values.setdefault(name, {})[step] = float(text)
    return values


def _read_tensorboard(folder: Path) -> dict[str, dict[int, float]]:
    # Imported here: tensorboard's import is slow, and CSV-only folders do not need it.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob(TB_GLOB)):  # several files after a resume; a later file wins on equal steps
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every point
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag not in _NOT_METRICS:
                values.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return values


def read_metrics(log_dir: str | Path) -> Metrics:
    """Every scalar metric logged under ``log_dir`` (see :func:`find_log_dir`), by name.

    ``metrics.csv`` and TensorBoard event files are both read; where both hold a metric, the CSV values win.

    Raises:
        FileNotFoundError, ValueError: as :func:`find_log_dir`, or logs that hold no metric.
    """
    folder = find_log_dir(log_dir)
    merged = _read_tensorboard(folder) if any(folder.glob(TB_GLOB)) else {}
    if (folder / CSV_NAME).is_file():
        merged.update(_read_csv(folder / CSV_NAME))
    if not merged:
        raise ValueError(f"the logs in '{folder}' hold no metric yet; train for at least log_every_n_steps steps")
    return {
        name: sorted((step + 1 if name.startswith(_AFTER_BATCH) else step, value) for step, value in points.items())
        for name, points in sorted(merged.items())
    }


# ---------------------------------------------------------------------------------------------------------- drawing
def _draw(
    ax: Axes,
    metrics: Metrics,
    names: Sequence[tuple[str, str]],
    title: str,
    *,
    log: bool = False,
    zero: bool = False,
    percent: bool = False,
) -> bool:
    """Plot ``(metric, label)`` lines on ``ax``; a panel with none of them says so. Returns whether it drew any.

    Args:
        log: logarithmic y axis (when every value is positive).
        zero: start a linear y axis at 0 (when no value is negative).
        percent: label the y axis in percent (values are fractions).
    """
    drawn = False
    for name, label in names:
        series = metrics.get(name)
        if not series:
            continue
        steps, values = zip(*series, strict=True)
        ax.plot(steps, values, marker="o" if len(series) <= 60 else None, markersize=3, label=label)
        drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.grid(alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        return False
    values = [v for name, _ in names for _, v in metrics.get(name, [])]
    if log and min(values) > 0:
        ax.set_yscale("log")
        # Plain numbers (60, 0.006) rather than 6×10¹; minor ticks are labelled on short axes (all of them within a
        # decade, 2 and 5 within two decades).
        span = max(values) / min(values)
        ax.yaxis.set_major_formatter(_PLAIN)
        ax.yaxis.set_minor_formatter(_PLAIN if span <= 10 else _MINOR_2_5 if span <= 100 else NullFormatter())
    elif zero and min(values) >= 0:
        ax.set_ylim(bottom=0)  # counts and fractions: the distance from zero is part of the picture
        if not percent:
            ax.yaxis.set_major_formatter(_COUNT)
    if percent:
        ax.yaxis.set_major_formatter(_PERCENT)
    ax.tick_params(which="both", labelsize=8)
    ax.legend(fontsize=8)
    return True


def training_curves_figure(metrics: Metrics) -> Figure:
    """Loss, perplexity and token accuracy of training and validation against the optimizer step.

    Raises:
        ValueError: no ``train/`` or ``val/`` metric was logged.
    """
    if not any(name.startswith(("train/", "val/")) for name in metrics):
        raise ValueError(f"no train/ or val/ metric to plot; logged metrics are {sorted(metrics) or 'none'}")
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    ax_loss, ax_ppl, ax_acc = fig.subplots(1, 3)
    loss = [("train/loss", "train"), ("val/loss", "validation"), ("summary/val_loss", "before → after fit")]
    _draw(ax_loss, metrics, loss, "cross-entropy loss")
    _draw(ax_ppl, metrics, [("train/ppl", "train"), ("val/ppl", "validation")], "perplexity", log=True)
    _draw(ax_acc, metrics, [("train/acc", "train"), ("val/acc", "validation")], "next-token accuracy", percent=True)
    fig.suptitle(
        "Training curves (train: that step's batch, unsmoothed; validation: mean over its batches; before → after "
        "fit: FitSummary's batches)",
        fontsize=10,
    )
    return fig


def quant_stats_figure(metrics: Metrics) -> Figure:
    """FP8 statistics over training: saturation, underflow, merges, B norms, amax and scales.

    The summaries over layers exactly as ``QuantStats`` logged them (no smoothing, no derived rates): fractions are
    means over layers, amax and scales maxima, merge counters cumulative sums since conversion.

    Raises:
        ValueError: neither ``quant/`` nor ``proxy/`` metrics were logged.
    """
    if not any(name.startswith(("quant/", "proxy/")) for name in metrics):
        raise ValueError(
            f"no quant/ or proxy/ metric to plot (add the QuantStats and RowwiseProxyUpdate callbacks); "
            f"logged metrics are {sorted(metrics) or 'none'}"
        )
    fig = Figure(figsize=(14, 9.5), layout="constrained")
    axes = iter(fig.subplots(3, 3).flat)
    panels: list[tuple[list[tuple[str, str]], str, dict[str, bool]]] = [
        (
            [("quant/a_sat_frac", "activations"), ("quant/w_sat_frac", "weights W")],
            "values at ±448, the E4M3 max (amax lands there)",
            {"percent": True, "zero": True},
        ),
        (
            [("quant/a_underflow_frac", "activations: non-zero → 0"), ("quant/w_zero_frac", "weights W: zero")],
            "underflow and zeros",
            {"percent": True, "zero": True},
        ),
        ([("proxy/rows_merged", "all layers")], "rows of B merged into W, per step", {"zero": True}),
        (
            [("quant/b_row_norm_max", "max over rows and layers"), ("quant/b_row_norm_mean", "mean")],
            "L2 norm of the rows of B",
            {"log": True},
        ),
        ([("quant/merge_magnitude", "Σ |B·A| merged")], "merged update size (cumulative)", {"zero": True}),
        (
            [("quant/merge_saturated", "rows with a value clamped to ±448")],
            "merged rows that saturated (cumulative)",
            {"zero": True},
        ),
        (
            [("quant/merge_lost", "non-zero update, FP8 byte unchanged")],
            "merged elements lost to rounding (cumulative)",
            {"zero": True},
        ),
        ([("quant/a_amax", "activations"), ("quant/w_amax", "weights W")], "amax (max over layers)", {"log": True}),
        (
            [("quant/a_scale", "activations"), ("quant/w_scale", "weights W")],
            "dequant scale (max over layers)",
            {"log": True},
        ),
    ]
    for names, title, style in panels:
        _draw(next(axes), metrics, names, title, **style)
    fig.suptitle(
        "FP8 statistics of the FALQON layers (QuantStats: fractions are means over layers; "
        "counters are sums over layers since conversion)",
        fontsize=10,
    )
    return fig


# ---------------------------------------------------------------------------------------------------------- writing
def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


def write_plots(log_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``training_curves.png`` and ``quant_stats.png`` (each when its metrics were logged).

    Args:
        log_dir: a Lightning log folder (``version_N``) or a folder above it (its newest run is used).
        out_dir: where the PNGs go; defaults to ``<log folder>/plots`` (``QuantStats`` owns ``quant_stats.png``
            in the log folder itself).

    Returns:
        The written paths.

    Raises:
        FileNotFoundError, ValueError: no such folder, no logs, or no metric either figure can show.
    """
    folder = find_log_dir(log_dir)
    metrics = read_metrics(folder)
    out = Path(out_dir) if out_dir is not None else folder / "plots"
    written = []
    for name, build in ((TRAINING_CURVES_PNG, training_curves_figure), (QUANT_STATS_PNG, quant_stats_figure)):
        try:
            fig = build(metrics)
        except ValueError:
            continue
        written.append(save_figure(fig, out / name))
    if not written:
        raise ValueError(
            f"the logs in '{folder}' hold neither training nor quantization metrics (found {sorted(metrics)}); "
            "train a FalqonLitModule with the QuantStats callback"
        )
    return written


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``falqon plot``."""
    parser = argparse.ArgumentParser(
        prog="falqon plot", description="Write training-curve and FP8-statistics PNGs from a Lightning log folder."
    )
    parser.add_argument("log_dir", type=Path, help="Lightning log folder (version_N) or a folder above it")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <log folder>/plots)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``falqon plot LOG_DIR [--out DIR]``: write the PNGs and print their paths; 2 for a folder without logs."""
    args = build_parser().parse_args(argv)
    try:
        folder = find_log_dir(args.log_dir)
        paths = write_plots(folder, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if folder != args.log_dir:
        print(f"read logs from {folder}", file=sys.stderr)
    for path in paths:
        print(path)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
