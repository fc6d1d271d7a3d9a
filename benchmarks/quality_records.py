"""Records of the quality study (``benchmarks/quality.py``): resumable JSONL bookkeeping, summary statistics over
seeds, the table and the loss-curve plot.

Kept apart from the runner so that reporting needs neither torch models nor data: ``quality.py --report-only`` and
the tests use these functions on records alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

BF16_LORA = "bf16-lora"
"""The reference variant of the main comparison."""
RECORDS = "quality.jsonl"
COMPARED_GROUPS = ("main", "control", "remedy")
"""Groups whose rows are compared with ``bf16-lora`` (the study's plans put it in the first of them it runs)."""
REPORT_RESERVE_S = 15.0
"""Seconds kept free at the end of ``--time-budget`` for the report and plot."""


class PlannedRun(Protocol):
    """What bookkeeping reads of a planned run (``quality.Run``)."""

    @property
    def name(self) -> str: ...
    @property
    def group(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def key(self) -> str: ...


# ----------------------------------------------------------------------------------------------- bookkeeping
def study_key(settings: dict[str, Any]) -> str:
    """Short hash of the settings that change results: runs of other settings are never mixed in."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a line cut short by a killed process is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a later kill cannot lose it); an exclusive lock keeps the lines
    of concurrent ``--shard`` processes whole."""
    line = (json.dumps(record) + "\n").encode()
    with path.open("a+b") as f:  # writes always go to the end; reads see the last byte only
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 1))
        if size and f.read(1) != b"\n":
            line = b"\n" + line  # the previous writer was killed mid-line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def pending_runs(
    runs: list[PlannedRun], records: list[dict[str, Any]], study: str, retry_failed: bool = False
) -> list[PlannedRun]:
    """Runs without a record of this study (``retry_failed``: without an ``ok`` record)."""
    done = {r["key"] for r in records if r.get("study") == study and (r["status"] == "ok" or not retry_failed)}
    return [r for r in runs if r.key not in done]


def shard_of(runs: list[PlannedRun], spec: str | None) -> list[PlannedRun]:
    """The runs of shard ``I/N`` (every N-th, from the I-th), or all of them without a spec.

    Raises:
        ValueError: a spec that is not ``I/N`` with ``0 <= I < N``.
    """
    if spec is None:
        return runs
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {spec!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {spec!r}")
    return runs[index::count]


def estimate_seconds(run: PlannedRun, records: list[dict[str, Any]], study: str) -> float | None:
    """Expected wall time of ``run``: mean of finished runs with its name, else its group, else its kind, else any."""
    finished = [r for r in records if r.get("study") == study and r["status"] == "ok"]
    for same in ("name", "group", "kind", None):
        walls = [r["wall_s"] for r in finished if same is None or r[same] == getattr(run, same)]
        if walls:
            return statistics.fmean(walls)
    return None


def fits(elapsed: float, estimate: float | None, budget: float | None) -> bool:
    """Whether a run expected to take ``estimate`` seconds still fits the budget (unknown estimates always start)."""
    return budget is None or estimate is None or elapsed + estimate + REPORT_RESERVE_S <= budget


# ------------------------------------------------------------------------------------------------------ summary
def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``None`` below two values) of the non-missing values."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def _row(name: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": name, "group": records[0]["group"], "n": len(records)}
    for metric in ("heldout_loss", "gsm8k_loss", "chat_loss", "bench_acc", "bench_acc_norm"):
        row[metric], row[f"{metric}_std"] = mean_std([r["metrics"].get(metric) for r in records])
    merges = [r["merge"]["lost_fraction"] for r in records if r.get("merge")]
    row["merge_lost_fraction"] = statistics.fmean(merges) if merges else None
    row["wall_s"] = statistics.fmean(r["wall_s"] for r in records)
    return row


def _with_deltas(row: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    loss, ref_loss = row["heldout_loss"], ref and ref["heldout_loss"]
    acc, ref_acc = row["bench_acc"], ref and ref["bench_acc"]
    row["delta_loss_pct"] = None if loss is None or not ref_loss else 100 * (loss - ref_loss) / ref_loss
    row["delta_acc_pts"] = None if acc is None or ref_acc is None else 100 * (acc - ref_acc)
    return row


def summarize(records: list[dict[str, Any]], study: str, order: list[str] | None = None) -> dict[str, Any]:
    """Per-variant mean ± std over seeds, Δ vs ``bf16-lora`` (main, control, remedy) or vs the ablation base at the
    same seed. Rows follow ``order`` (the plan's run names; names not in it last), not the order in which
    concurrent shards happened to append their records."""
    ok = [r for r in records if r.get("study") == study and r["status"] == "ok"]
    if order is not None:
        rank = {name: i for i, name in enumerate(dict.fromkeys(order))}
        ok.sort(key=lambda r: rank.get(r["name"], len(rank)))  # stable: unplanned names keep the file order
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        by_name[r["name"]].append(r)
    rows = {name: _row(name, rs) for name, rs in by_name.items()}
    summary: dict[str, Any] = {"study": study, "before": [], **{g: [] for g in COMPARED_GROUPS}, "ablation": []}
    for row in rows.values():
        if row["group"] != "export":
            summary[row["group"]].append(_with_deltas(row, rows.get(BF16_LORA)))
    summary["export"] = [row for r in ok if r["group"] == "export" for row in export_rows(r)]
    ablations = [r for r in ok if r["group"] == "ablation"]
    if ablations:
        base_name, seed = ablations[0]["name"].split(":")[0], ablations[0]["seed"]
        base = [r for r in by_name.get(base_name, []) if r["seed"] == seed]
        base_row = _row(f"{base_name} (k=r, every=1, init=svd)", base) if base else None
        for row in summary["ablation"]:
            _with_deltas(row, base_row)
        if base_row is not None:
            summary["ablation"].insert(0, _with_deltas(dict(base_row, group="ablation"), base_row))
    finished = {r["key"] for r in ok}
    summary["not_ok"] = [
        {"key": r["key"], "status": r["status"], "reason": r.get("reason")}
        for r in records
        if r.get("study") == study and r["status"] != "ok" and r["key"] not in finished
    ]
    return summary


def export_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Trainer vs exported-folder scores of one export-check run, one row per compute precision (same weights:
    a gap is the export's or the arithmetic's)."""
    rows = []
    for compute, pair in record["export"]["compute"].items():
        trainer, exported = pair["trainer"], pair["export"]
        row = {"variant": record["name"], "seed": record["seed"], "compute": compute}
        for metric in ("heldout_loss", "bench_acc"):
            row[f"trainer_{metric}"], row[f"export_{metric}"] = trainer[metric], exported[metric]
        deltas = _with_deltas({metric: exported[metric] for metric in ("heldout_loss", "bench_acc")}, trainer)
        row["delta_loss_pct"], row["delta_acc_pts"] = deltas["delta_loss_pct"], deltas["delta_acc_pts"]
        row["tasks"] = {
            task: {"trainer": trainer["bench"][task]["acc"], "export": exported["bench"][task]["acc"]}
            for task in trainer["bench"]
        }
        rows.append(row)
    return rows


def _pm(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 4) -> str:
    if mean is None:
        return "-"
    return f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def _signed(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:+.2f}{unit}"


def format_table(summary: dict[str, Any]) -> str:
    """The study table: held-out loss and bench accuracy (mean ± std over seeds) with deltas."""
    header = (
        f"{'variant':44s} {'n':>2s} {'held-out loss':>17s} {'Δ loss':>8s} {'GSM8K':>7s} {'chat':>7s} "
        f"{'bench acc %':>13s} {'Δ acc':>8s} {'lost %':>7s}"
    )
    lines = []
    titles = {
        "before": "before training",
        **{g: "vs bf16-lora" for g in COMPARED_GROUPS},
        "ablation": "vs ablation base",
    }
    for group, title in titles.items():
        if not summary[group]:
            continue
        lines += [f"-- {group} ({title})", header]
        for row in summary[group]:
            lost = row["merge_lost_fraction"]
            lines.append(
                f"{row['variant']:44s} {row['n']:2d} {_pm(row['heldout_loss'], row['heldout_loss_std']):>17s} "
                f"{_signed(row['delta_loss_pct'], '%'):>8s} {_pm(row['gsm8k_loss'], None, digits=3):>7s} "
                f"{_pm(row['chat_loss'], None, digits=3):>7s} "
                f"{_pm(row['bench_acc'], row['bench_acc_std'], 100, 1):>13s} {_signed(row['delta_acc_pts'], 'pt'):>8s} "
                f"{'-' if lost is None else f'{100 * lost:.1f}':>7s}"
            )
    if summary.get("export"):
        lines += [
            "-- export (the trainer's model vs its vLLM folder read back by transformers: same weights)",
            f"{'variant':30s} {'seed':>4s} {'compute':>13s} {'held-out trainer':>16s} {'export':>8s} {'Δ loss':>8s} "
            f"{'acc % trainer':>13s} {'export':>7s} {'Δ acc':>8s}",
        ]
        for row in summary["export"]:
            lines.append(
                f"{row['variant']:30s} {row['seed']:4d} {row['compute']:>13s} {row['trainer_heldout_loss']:16.4f} "
                f"{row['export_heldout_loss']:8.4f} {_signed(row['delta_loss_pct'], '%'):>8s} "
                f"{100 * row['trainer_bench_acc']:13.1f} {100 * row['export_bench_acc']:7.1f} "
                f"{_signed(row['delta_acc_pts'], 'pt'):>8s}"
            )
    lines += [f"not finished: {r['key']} {r['status']}: {r['reason']}" for r in summary["not_ok"]]
    lines.append(
        "held-out loss: mean of GSM8K and chat nats/token; bench acc: mean over tasks; Δ acc in points;\n"
        "lost %: merged FP8 elements that rounding left unchanged (row scales re-round the whole merged row with a "
        "fresh scale, so near 0 there by construction)"
    )
    return "\n".join(lines)


def format_gap_table(summary: dict[str, Any]) -> str:
    """The short table of the compared rows: held-out loss mean ± sd over seeds and its gap to bf16 LoRA."""
    rows = [row for group in COMPARED_GROUPS for row in summary[group]]
    if not rows:
        return ""
    lines = [
        f"{'variant':40s} {'group':>7s} {'n':>2s} {'held-out loss':>17s} {'gap vs bf16-lora':>16s} {'bench acc %':>13s}"
    ]
    for row in rows:
        lines.append(
            f"{row['variant']:40s} {row['group']:>7s} {row['n']:2d} "
            f"{_pm(row['heldout_loss'], row['heldout_loss_std']):>17s} {_signed(row['delta_loss_pct'], '%'):>16s} "
            f"{_pm(row['bench_acc'], row['bench_acc_std'], 100, 1):>13s}"
        )
    return "\n".join(lines)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (over fewer values at the start)."""
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def plot_curves(records: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Training-loss curves (moving average) per variant, mean over seeds: main comparison or controls (left),
    ablations (first seed) or remedies (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("study") == summary["study"] and r["status"] == "ok" and r["loss_curve"]]
    tracked = [r for r in ok if r.get("heldout_curve")]
    fig, axes = plt.subplots(1, 3 if tracked else 2, figsize=(21 if tracked else 14, 5))
    axes[1].sharey(axes[0])
    ablations = [r for r in ok if r["group"] == "ablation"]
    base = ablations[0]["name"].split(":")[0] if ablations else None
    panels = ((axes[0], ("main", "control"), "mean over seeds"), (axes[1], ("ablation", "remedy"), "seeds as run"))
    for ax, groups, title in panels:
        curves: dict[str, list[list[float]]] = defaultdict(list)
        for r in ok:
            base_run = ablations and r["name"] == base and r["seed"] == ablations[0]["seed"]
            reference = "remedy" in groups and r["name"] == BF16_LORA and any(x["group"] == "remedy" for x in ok)
            if r["group"] in groups or ("ablation" in groups and base_run) or reference:
                curves[r["name"]].append(r["loss_curve"])
        for name, runs in curves.items():
            steps = min(len(c) for c in runs)
            mean = [statistics.fmean(c[i] for c in runs) for i in range(steps)]
            ax.plot(range(1, steps + 1), _smooth(mean, max(1, steps // 20)), label=f"{name} (n={len(runs)})")
        ax.set(title=f"{' / '.join(groups)}: training loss ({title}, moving average)", xlabel="step")
        if curves:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("loss (nats/token)")
    if tracked:
        _plot_heldout(axes[2], tracked)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_heldout(ax: Any, records: list[dict[str, Any]]) -> None:
    """Held-out loss during training (``--eval-every``) per variant, mean over seeds, ending at the final score."""
    curves: dict[str, list[list[tuple[int, float]]]] = defaultdict(list)
    for r in records:
        points = [(int(step), loss) for step, loss, _ in r["heldout_curve"]]
        curves[r["name"]].append([*points, (len(r["loss_curve"]), r["metrics"]["heldout_loss"])])
    for name, runs in curves.items():
        steps = [step for step, _ in runs[0]]
        mean = [statistics.fmean(run[i][1] for run in runs) for i in range(len(steps))]
        ax.plot(steps, mean, marker="o", label=f"{name} (n={len(runs)})")
    ax.set(title="held-out loss during training (mean over seeds)", xlabel="step", ylabel="held-out loss")
    ax.legend(fontsize=7)


def report(out: Path, study: str, order: list[str] | None = None) -> dict[str, Any]:
    """Print the table, write ``quality_summary.json`` and ``quality.png`` (rows in ``order``, see
    :func:`summarize`); returns the summary."""
    records = read_records(out / RECORDS)
    if records and not any(r.get("study") == study for r in records):
        study = records[-1]["study"]
        print(f"no records with these settings; reporting the last study in {out / RECORDS} ({study})")
    summary = summarize(records, study, order)
    summary["settings"] = next((r["settings"] for r in records if r.get("study") == study), None)
    print(format_table(summary), flush=True)
    if gaps := format_gap_table(summary):  # last: what a GPU session's log tail shows
        print(gaps, flush=True)
    (out / "quality_summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    plot_curves(records, summary, out / "quality.png")
    return summary
