"""falqon_lit.plots: metrics read back from a real tiny run (CSV and TensorBoard), PNGs written, CLI errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from falqon_lit import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 4


@pytest.fixture
def tiny_run(tiny_trainer_parts, tmp_path: Path) -> dict[str, Path]:
    """Log folders of one 4-step fit of the tiny Llama, logged by a CSVLogger and a TensorBoardLogger."""
    from falqon_lit.callbacks import FitSummary, QuantStats, RowwiseProxyUpdate

    seed_everything(0)
    module, data = tiny_trainer_parts()
    csv_logger, tb_logger = CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=STEPS,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=[csv_logger, tb_logger],
        callbacks=[
            QuantStats(every_n_steps=2, per_layer=False),
            RowwiseProxyUpdate(k=4),
            FitSummary(eval_batches=1, num_samples=0),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=data)
    return {"csv": Path(csv_logger.log_dir), "tb": Path(tb_logger.log_dir)}


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, f"{path} is not a PNG with content"


def test_read_metrics_csv_run_has_module_and_callback_metrics(tiny_run: dict[str, Path]) -> None:
    metrics = plots.read_metrics(tiny_run["csv"])
    assert [step for step, _ in metrics["train/loss"]] == list(range(STEPS))  # logged at global_step 0..3
    # One grid, optimizer steps done: validation after steps 2 and 4 (Lightning logs it at the batch index 1, 3).
    assert [step for step, _ in metrics["val/loss"]] == [2, 4]
    assert [step for step, _ in metrics["quant/a_sat_frac"]] == [2, 4]
    assert [step for step, _ in metrics["summary/val_loss"]] == [0, STEPS]  # before and after the fit
    assert metrics["proxy/rows_merged"] == [(s, 4.0 * 14) for s in range(1, STEPS + 1)]  # k=4 rows x 14 layers
    assert "epoch" not in metrics and "step" not in metrics


def test_read_metrics_tensorboard_equals_csv(tiny_run: dict[str, Path]) -> None:
    csv_metrics, tb_metrics = plots.read_metrics(tiny_run["csv"]), plots.read_metrics(tiny_run["tb"])
    assert set(tb_metrics) == set(csv_metrics)
    for name, series in csv_metrics.items():
        assert [s for s, _ in tb_metrics[name]] == [s for s, _ in series], name
        # TensorBoard stores float32 scalars; the CSV holds the float64 repr.
        assert [v for _, v in tb_metrics[name]] == pytest.approx([v for _, v in series], rel=1e-6), name


def test_write_plots_writes_both_pngs_into_log_dir(tiny_run: dict[str, Path]) -> None:
    paths = plots.write_plots(tiny_run["csv"])
    assert paths == [
        tiny_run["csv"] / "plots" / plots.TRAINING_CURVES_PNG,
        tiny_run["csv"] / "plots" / "quant_stats.png",
    ]
    for path in paths:
        _assert_png(path)


def test_fit_quant_stats_png_is_falqon_plots_figure(tiny_run: dict[str, Path]) -> None:
    # One producer: the PNG the fit wrote (QuantStats at fit end) and falqon plot's are the same picture.
    fit_png = tiny_run["csv"] / plots.QUANT_STATS_PNG
    _assert_png(fit_png)
    assert fit_png.read_bytes() == plots.write_plots(tiny_run["csv"])[1].read_bytes()


def test_training_curves_show_the_loss_before_fit(tiny_run: dict[str, Path]) -> None:
    fig = plots.training_curves_figure(plots.read_metrics(tiny_run["csv"]))
    loss_panel = fig.axes[0]
    assert [line.get_label() for line in loss_panel.get_lines()] == ["train", "validation", "before → after fit"]
    assert loss_panel.get_lines()[2].get_xdata()[0] == 0


def test_quant_stats_panels_have_readable_titles(tiny_run: dict[str, Path]) -> None:
    fig = plots.quant_stats_figure(plots.read_metrics(tiny_run["csv"]))
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 9 and all(titles) and not any("_" in t for t in titles), titles  # no raw metric names


def test_find_log_dir_parent_folder_uses_newest_run(tmp_path: Path) -> None:
    for version, mtime in (("version_0", 2_000), ("version_1", 3_000), ("version_2", 1_000)):
        folder = tmp_path / "lightning_logs" / version
        folder.mkdir(parents=True)
        (folder / plots.CSV_NAME).write_text("step,train/loss\n0,1.0\n")
        os.utime(folder / plots.CSV_NAME, (mtime, mtime))
    assert plots.find_log_dir(tmp_path) == tmp_path / "lightning_logs" / "version_1"
    assert plots.find_log_dir(tmp_path / "lightning_logs" / "version_2") == tmp_path / "lightning_logs" / "version_2"


def test_write_plots_training_metrics_only_skips_quant_stats(tmp_path: Path) -> None:
    (tmp_path / plots.CSV_NAME).write_text("epoch,step,train/loss,val/loss\n0,0,2.0,\n0,1,1.5,1.7\n")
    assert plots.write_plots(tmp_path, tmp_path / "out") == [tmp_path / "out" / plots.TRAINING_CURVES_PNG]


def test_quant_stats_figure_without_quant_metrics_raises() -> None:
    with pytest.raises(ValueError, match="no quant/ or proxy/ metric to plot"):
        plots.quant_stats_figure({"train/loss": [(0, 1.0)]})


def test_plots_main_writes_pngs_and_prints_paths(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "images"
    assert plots.main([str(tiny_run["tb"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "training_curves.png"), str(out / "quant_stats.png")]
    for path in printed:
        _assert_png(Path(path))


def test_plots_main_empty_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert plots.main([str(tmp_path)]) == plots.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"error: log folder '{tmp_path}' has no metrics.csv or TensorBoard event files")
    assert not list(tmp_path.iterdir())


def test_plots_main_missing_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert plots.main([str(tmp_path / "nope")]) == plots.EXIT_USAGE
    assert (
        capsys.readouterr().err
        == f"error: log folder '{tmp_path / 'nope'}' does not exist; pass a Lightning log folder (version_N)\n"
    )


def test_readme_plot_and_export_commands_write_to_ignored_folders() -> None:
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    outs = re.findall(r"falqon plot \S+ --out (\S+)", readme) + re.findall(r"falqon-export .*--out (\S+)", readme)
    assert len(outs) >= 4, outs
    for out in outs:  # git check-ignore exits 0 for an ignored path: a README command never overwrites tracked files
        assert subprocess.run(["git", "check-ignore", "-q", out], cwd=root).returncode == 0, out
