"""The ``falqon`` LightningCLI: fit end to end, --print_config round trip, every shipped YAML, clear failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from falqon_lit import cli
from falqon_lit.callbacks import RowwiseProxyUpdate
from falqon_lit.config import InitMethod
from falqon_lit.data import InstructionDataModule
from falqon_lit.module import FalqonLitModule

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_llama_dict: dict, tiny_chat_tokenizer_dir: Path, tiny_chat_jsonl: Path) -> Path:
    """A CLI config for 3 CPU steps of the tiny Llama, logging and checkpointing under ``tmp_path/run``."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 3,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {"class_path": "falqon_lit.callbacks.QuantStats", "init_args": {"every_n_steps": 3}},
                {"class_path": "falqon_lit.callbacks.RowwiseProxyUpdate", "init_args": {"k": 4}},
            ],
        },
        "model": {"model": tiny_llama_dict, "tokenizer": str(tiny_chat_tokenizer_dir)},
        "data": {"source": str(tiny_chat_jsonl), "max_length": 64, "batch_size": 4},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_fit_writes_logs_config_and_checkpoint(tiny_config: Path, tmp_path: Path, capfd) -> None:
    assert cli.main(["fit", "--config", str(tiny_config), "--profile", "1", "--trainer.log_every_n_steps", "1"]) == 0
    version = tmp_path / "run" / "lightning_logs" / "version_0"
    written = set(_files(version))
    expected = {
        "config.yaml",
        "hparams.yaml",
        "quant_stats.png",
        "checkpoints/epoch=0-step=3.ckpt",
        "checkpoints/last.ckpt",
        "profile_step_1.txt",
    }
    assert expected <= written
    assert all(name.startswith("events.out.tfevents") for name in written - expected)
    out, err = capfd.readouterr()
    assert f"final checkpoint (after the flush): {version / 'checkpoints' / 'last.ckpt'}" in out
    for noise in ("Tip:", "LeafSpec", "Total params", "FutureWarning"):  # Lightning adverts, deprecations, its table
        assert noise not in out + err, noise
    # The default Throughput callback prints tokens/s and the FP8-engaged line (no FitSummary in this config).
    assert "FP8 engaged" in out and "14/14 projections" in out and "tokens/s (non-padding)" in out
    saved = yaml.safe_load((version / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 3 and saved["model"]["model"]["hidden_size"] == 64
    module = FalqonLitModule.load_from_checkpoint(version / "checkpoints" / "epoch=0-step=3.ckpt")
    assert int(module.model.model.layers[0].mlp.up_proj.merge_rows) == 12  # 3 steps x k=4


def test_cli_print_config_round_trips(tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(tiny_config), "--model.optim.lr=0.05", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["model"]["optim"]["lr"] == 0.05
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_cli_parses_every_shipped_config(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["max_steps"] > 0
    # Instantiate everything (module and data read configs and tokenizers only) without training; GPU settings
    # are overridden so that the check runs on any machine.
    parsed = cli.FalqonCLI(
        FalqonLitModule,
        InstructionDataModule,
        run=False,
        auto_configure_optimizers=False,
        save_config_callback=None,
        args=[
            "--config",
            str(config),
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
        ],
    )
    assert isinstance(parsed.model, FalqonLitModule) and parsed.model.model is None
    assert isinstance(parsed.datamodule, InstructionDataModule)
    assert sum(isinstance(c, RowwiseProxyUpdate) for c in parsed.trainer.callbacks) == 1


def test_cli_adds_the_proxy_update_when_the_config_has_none(tiny_config: Path) -> None:
    # Without it nothing would merge B or calibrate A of the default init: gradient.
    config = yaml.safe_load(tiny_config.read_text())
    del config["trainer"]["callbacks"]
    tiny_config.write_text(yaml.safe_dump(config))
    parsed = cli.FalqonCLI(
        FalqonLitModule,
        InstructionDataModule,
        run=False,
        auto_configure_optimizers=False,
        args=["--config", str(tiny_config)],
    )
    (callback,) = [c for c in parsed.trainer.callbacks if isinstance(c, RowwiseProxyUpdate)]
    assert callback.calibration_batches == 4 and parsed.model.falqon_config.init == InitMethod.GRADIENT


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.nonsense=1", "nonsense"),
        ("--model.falqon.rank=10", "rank must be a positive multiple of 16"),
        ("--data.source=/nonexistent/data.jsonl", "--data.source '/nonexistent/data.jsonl' does not exist"),
        ("--data.template=chatml", "--data.template must be one of"),
        ("--data.max_length=4096", "exceeds the model's context length 256"),
    ],
    ids=["unknown-key", "bad-rank", "missing-file", "unknown-template", "over-context"],
)
def test_cli_bad_input_fails_cleanly_without_touching_outputs(
    tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture, override: str, message: str
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "earlier.txt").write_text("earlier output")
    before = _files(run_dir)
    assert cli.main(["fit", "--config", str(tiny_config), override]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert _files(run_dir) == before


def test_cli_module_entry_point_exit_status(tiny_config: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "falqon_lit", "fit", "--config", str(tiny_config), "--data.template=nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --data.template must be one of")


def test_cli_eval_subcommand_dispatches_to_the_evaluator(capsys) -> None:
    from falqon_lit.cli import main

    assert main(["eval", "--list-tasks"]) == 0
    assert "arc_easy" in capsys.readouterr().out
    assert main(["eval", "--tasks", "no_such_task", "--model", "smollm2"]) == 2
    assert "no_such_task" in capsys.readouterr().err


def test_cli_plot_subcommand_dispatches_to_plots(tmp_path, capsys) -> None:
    from falqon_lit.cli import main

    assert main(["plot", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_fit_saves_last_ckpt_when_no_validation_ends_the_run(tiny_config: Path, tmp_path: Path) -> None:
    # Validation every 2 steps, 3 steps: Lightning's checkpoints stop at step 2, before the final flush.
    assert cli.main(["fit", "--config", str(tiny_config), "--trainer.val_check_interval=2"]) == 0
    saved = torch.load(tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 3
    assert all(not value.any() for key, value in saved["state_dict"].items() if key.endswith("lora_B"))


def test_cli_resume_refuses_a_checkpoint_of_another_model(tiny_config: Path, tmp_path: Path, capfd) -> None:
    assert cli.main(["fit", "--config", str(tiny_config), "--trainer.max_steps=2"]) == 0
    last = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    config = yaml.safe_load(tiny_config.read_text())
    config["model"]["model"]["model_type"] = "mistral"
    (tmp_path / "mistral.yaml").write_text(yaml.safe_dump(config))
    capfd.readouterr()
    assert cli.main(["fit", "--config", str(tmp_path / "mistral.yaml"), f"--ckpt_path={last}"]) == cli.EXIT_USAGE
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        f"error: checkpoint '{last}' does not match the configured model: it holds a llama model, the configured "
        "model is a mistral; pass the --model and --model.falqon settings it was trained with, or another checkpoint"
    ]
    assert not (tmp_path / "run" / "lightning_logs" / "version_1").exists()
    # The matching model resumes from it (and trains on to step 3).
    assert cli.main(["fit", "--config", str(tiny_config), f"--ckpt_path={last}"]) == 0
    assert (
        torch.load(tmp_path / "run" / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")["global_step"] == 3
    )


def test_cli_help_lists_every_subcommand_without_importing_torch() -> None:
    code = "import sys; from falqon_lit.cli import main; main(['--help']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert {line.split()[0] for line in lines if line.startswith("  ")} == {
        "fit",
        "validate",
        "test",
        "predict",
        "eval",
        "plot",
    }
    assert lines[-1] == "False"


def test_cli_progress_bar_has_no_negative_epoch_total() -> None:
    from types import SimpleNamespace

    from falqon_lit.trainer_cli import FalqonProgressBar

    bar = FalqonProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)  # what Lightning sets when only max_steps bounds the run
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


@pytest.mark.parametrize(
    ("environ", "load", "threads"),
    [({}, 3.0, 1), ({}, 0.2, None), ({"OMP_NUM_THREADS": "2"}, 3.0, None)],
    ids=["busy", "idle", "user-set"],
)
def test_cli_pick_threads_on_a_busy_two_core_machine(monkeypatch, environ, load, threads) -> None:
    from falqon_lit import trainer_cli

    monkeypatch.setattr(trainer_cli.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(trainer_cli.os, "getloadavg", lambda: (load, load, load))
    before = torch.get_num_threads()
    try:
        assert trainer_cli.pick_threads(environ) == threads
        assert torch.get_num_threads() == (threads or before)
    finally:
        torch.set_num_threads(before)
