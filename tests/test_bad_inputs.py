"""Catalogue of bad inputs: each ends with exit 2, exactly one ``error:`` line on stderr naming the thing and the fix,
and no file written or changed (``falqon fit`` in-process on the tiny Llama, ``falqon eval`` and ``falqon-export``)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_models import tiny_llama_config

from falqon_lit import cli
from falqon_lit.checkpoint import RECORD_KEY, model_record
from falqon_lit.config import FalqonConfig

Setup = Callable[[Path, dict[str, Any]], list[str]]
"""Given ``tmp_path`` and the config dict (to mutate), write what the case needs and return extra CLI args."""


def _config(tmp_path: Path, tokenizer: Path, data: Path) -> dict[str, Any]:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [{"class_path": "falqon_lit.callbacks.RowwiseProxyUpdate"}],
        },
        "model": {"model": tiny_llama_config(), "tokenizer": str(tokenizer)},
        "data": {"source": str(data), "max_length": 64, "batch_size": 4},
    }


def _data_file(name: str, text: str) -> Setup:
    def setup(tmp_path: Path, config: dict[str, Any]) -> list[str]:
        (tmp_path / name).write_text(text)
        return [f"--data.source={tmp_path / name}"]

    return setup


def _args(*args: str) -> Setup:
    return lambda tmp_path, config: list(args)


def _model(**changes: Any) -> Setup:
    def setup(tmp_path: Path, config: dict[str, Any]) -> list[str]:
        config["model"]["model"] = {**config["model"]["model"], **changes}
        return []

    return setup


def _callback(**init_args: Any) -> Setup:
    def setup(tmp_path: Path, config: dict[str, Any]) -> list[str]:
        config["trainer"]["callbacks"][0]["init_args"] = init_args
        return []

    return setup


def _fake_checkpoint(path: Path, falqon: FalqonConfig | None = None, **config_changes: Any) -> Path:
    """A checkpoint file with FP8 buffers and the model record of the tiny Llama (changed as asked)."""
    from transformers import AutoConfig

    values = tiny_llama_config(**config_changes)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    state = {"model.model.layers.0.mlp.up_proj.weight_fp8": torch.zeros(16, 16, dtype=torch.float8_e4m3fn)}
    record = model_record(config, falqon or FalqonConfig(), torch.float32)
    torch.save({"state_dict": state, RECORD_KEY: record}, path)
    return path


def _ckpt(make: Callable[[Path], Path]) -> Setup:
    def setup(tmp_path: Path, config: dict[str, Any]) -> list[str]:
        return [f"--ckpt_path={make(tmp_path)}"]

    return setup


def _truncated(tmp_path: Path) -> Path:
    path = _fake_checkpoint(tmp_path / "whole.ckpt")
    data = path.read_bytes()
    path.unlink()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.ckpt"


def _garbage(tmp_path: Path) -> Path:
    (tmp_path / "garbage.ckpt").write_bytes(bytes(range(256)) * 64)
    return tmp_path / "garbage.ckpt"


def _not_falqon(tmp_path: Path) -> Path:
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, tmp_path / "plain.ckpt")
    return tmp_path / "plain.ckpt"


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "ckpt_dir").mkdir()
    return tmp_path / "ckpt_dir"


MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
GOOD_LINE = json.dumps({"messages": MESSAGES})

# (id, setup, what the one line must contain: the thing, then the fix)
FIT_CASES: list[tuple[str, Setup, tuple[str, ...]]] = [
    ("unknown-key", _args("--model.nonsense=1"), ("nonsense",)),
    ("rank-not-multiple-of-16", _args("--model.falqon.rank=10"), ("rank must be a positive multiple of 16",)),
    ("rank-over-layer-size", _args("--model.falqon.rank=64"), ("--model.falqon.rank 64", "lower the rank")),
    ("rank-negative", _args("--model.falqon.rank=-16"), ("rank must be a positive multiple of 16",)),
    ("unknown-init", _args("--model.falqon.init=MAGIC"), ("init", "MAGIC")),
    ("te-with-row-scales", _args("--model.falqon.backend=TE"), ("backend 'te' needs tensor scaling", "'torch'")),
    ("unknown-target", _args("--model.falqon.target_modules=[nope]"), ("['nope'] match no nn.Linear", "q_proj")),
    ("unknown-dtype", _args("--model.dtype=float8"), ("--model.dtype must be one of", "float32")),
    ("zero-sample-tokens", _args("--model.sample_max_new_tokens=0"), ("--model.sample_max_new_tokens must be > 0",)),
    ("missing-model-folder", _args("--model.model=/no/model"), ("--model folder '/no/model' does not exist",)),
    ("missing-tokenizer", _args("--model.tokenizer=/nonexistent/tok"), ("--model.tokenizer folder", "does not exist")),
    ("config-without-type", _model(model_type=""), ("needs a 'model_type'", "llama")),
    ("non-causal-model", _model(model_type="t5", d_model=64), ("'t5' model", "decoder-only")),
    ("vocab-below-tokenizer", _model(vocab_size=100), ("vocab_size is 100", "vocab_size >= 320")),
    ("unknown-optimizer-field", _args("--model.optim.nonsense=1"), ("nonsense",)),
    ("missing-data-file", _args("--data.source=/no/data.jsonl"), ("'/no/data.jsonl' does not exist",)),
    ("unknown-template", _args("--data.template=chatml"), ("--data.template must be one of", "alpaca")),
    ("over-context", _args("--data.max_length=4096"), ("--data.max_length 4096 exceeds", "256")),
    ("max-length-1", _args("--data.max_length=1"), ("max_length must be >= 2",)),
    ("batch-size-0", _args("--data.batch_size=0"), ("batch_size must be >= 1",)),
    ("val-fraction-1.5", _args("--data.val_fraction=1.5"), ("val_fraction must be in [0, 1)",)),
    ("limit-0", _args("--data.limit=0"), ("limit must be >= 1",)),
    ("malformed-jsonl", _data_file("bad.jsonl", GOOD_LINE + "\n{broken\n"), ("bad.jsonl' line 2 is not valid JSON",)),
    ("malformed-json", _data_file("bad.json", "[\n" + GOOD_LINE + ",\n}"), ("bad.json' line 3 is not valid JSON",)),
    ("no-known-columns", _data_file("text.jsonl", '{"text": "a"}\n'), ("text.jsonl', record 0", "'messages'")),
    ("messages-without-role", _data_file("norole.jsonl", '{"messages": [{"text": "a"}]}\n'), ("norole.jsonl'",)),
    ("empty-data-file", _data_file("empty.jsonl", ""), ("empty.jsonl' has no records",)),
    ("unsupported-file-type", _data_file("data.csv", "a,b\n"), ("data.csv': unsupported file type", ".jsonl")),
    ("callback-k-0", _callback(k=0), ("k must be >= 1",)),
    ("callback-bad-score", _callback(score="l2"), ("score must be 'l1'",)),
    ("max-steps-not-int", _args("--trainer.max_steps=abc"), ("max_steps",)),
    ("missing-ckpt", _args("--ckpt_path=/nonexistent/last.ckpt"), ("'/nonexistent/last.ckpt' does not exist", ".ckpt")),
    ("truncated-ckpt", _ckpt(_truncated), ("cut.ckpt' is truncated or corrupted", "intact .ckpt")),
    ("garbage-ckpt", _ckpt(_garbage), ("garbage.ckpt' is truncated or corrupted",)),
    ("not-falqon-ckpt", _ckpt(_not_falqon), ("plain.ckpt' is not a FALQON checkpoint", "falqon fit")),
    ("ckpt-is-folder", _ckpt(_folder), ("ckpt_dir' is a folder", ".ckpt")),
    (
        "ckpt-of-another-architecture",
        _ckpt(lambda p: _fake_checkpoint(p / "mistral.ckpt", model_type="mistral")),
        ("holds a mistral model, the configured model is a llama", "--model"),
    ),
    (
        "ckpt-of-another-size",
        _ckpt(lambda p: _fake_checkpoint(p / "wide.ckpt", intermediate_size=256)),
        ("intermediate_size 256 vs 128", "another checkpoint"),
    ),
    (
        "ckpt-of-another-rank",
        _ckpt(lambda p: _fake_checkpoint(p / "r32.ckpt", falqon=FalqonConfig(rank=32))),
        ("FALQON config differs: rank 32 vs 16", "--model.falqon"),
    ),
    *(  # a bad input only where Transformer Engine is not installed
        []
        if importlib.util.find_spec("transformer_engine")
        else [
            (
                "te-not-installed",
                _args(*(f"--model.falqon.{k}" for k in ("backend=TE", "weight_scaling=TENSOR", "act_scaling=TENSOR"))),
                ("backend 'te' needs Transformer Engine", "backend 'torch'"),
            )
        ]
    ),
]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _assert_one_error_line(capfd: pytest.CaptureFixture, prefix: str, expected: tuple[str, ...]) -> None:
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), lines[0]
    for part in expected:
        assert part in lines[0], (part, lines[0])


@pytest.mark.parametrize(("setup", "expected"), [c[1:] for c in FIT_CASES], ids=[c[0] for c in FIT_CASES])
def test_bad_input_fit_one_line_exit_2_nothing_written(
    setup: Setup,
    expected: tuple[str, ...],
    tmp_path: Path,
    tiny_chat_tokenizer_dir: Path,
    tiny_chat_jsonl: Path,
    capfd: pytest.CaptureFixture,
) -> None:
    config = _config(tmp_path, tiny_chat_tokenizer_dir, tiny_chat_jsonl)
    extra = setup(tmp_path, config)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    before = _files(tmp_path)
    capfd.readouterr()
    assert cli.main(["fit", "--config", str(tmp_path / "config.yaml"), *extra]) == cli.EXIT_USAGE
    _assert_one_error_line(capfd, "error: ", expected)
    assert _files(tmp_path) == before


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ("no subcommand", "fit")),
        (["fitt"], ("unknown subcommand 'fitt'", "falqon --help")),
        (["fit", "--config", "/nonexistent/config.yaml"], ("/nonexistent/config.yaml",)),
    ],
    ids=["no-subcommand", "unknown-subcommand", "missing-config"],
)
def test_bad_input_command_line_one_line_exit_2(argv: list[str], expected: tuple[str, ...], capfd) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    _assert_one_error_line(capfd, "error: ", expected)


EVAL_CKPT_CASES = [
    ("missing", lambda p: p / "none.ckpt", ("none.ckpt' does not exist",)),
    ("truncated", _truncated, ("cut.ckpt' is truncated or corrupted",)),
    ("garbage", _garbage, ("garbage.ckpt' is truncated or corrupted",)),
    ("not-falqon", _not_falqon, ("plain.ckpt' is not a FALQON checkpoint",)),
    ("folder", _folder, ("ckpt_dir' is a folder",)),
]


@pytest.mark.parametrize(("make", "expected"), [c[1:] for c in EVAL_CKPT_CASES], ids=[c[0] for c in EVAL_CKPT_CASES])
def test_bad_input_eval_checkpoint_one_line_exit_2(make, expected, tmp_path: Path, capfd) -> None:
    path = make(tmp_path)
    before = _files(tmp_path)
    capfd.readouterr()
    assert cli.main(["eval", "--ckpt", str(path), "--tasks", "arc_easy", "--limit", "1"]) == 2
    _assert_one_error_line(capfd, "error: --ckpt ", expected)
    assert _files(tmp_path) == before


EXPORT_CASES = [  # (id, args, --out folder name, expected); "out" exists already
    ("unknown-target", ["--target", "gguf"], "new", ("unknown export target 'gguf'", "vllm")),
    ("out-exists", ["--target", "vllm"], "out", ("out' already exists", "--force")),
    ("no-prompts-file", ["--target", "vllm", "--prompts-file", "/none.txt"], "new", ("--prompts-file '/none.txt'",)),
]


@pytest.mark.parametrize(("args", "out", "expected"), [c[1:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES])
def test_bad_input_export_one_line_exit_2(args: list[str], out: str, expected, tmp_path: Path, capfd) -> None:
    from falqon_lit.export.cli import main as export_main

    ckpt = _fake_checkpoint(tmp_path / "model.ckpt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("earlier export")
    before = _files(tmp_path)
    capfd.readouterr()
    assert export_main([*args, "--ckpt", str(ckpt), "--out", str(tmp_path / out)]) == 2
    _assert_one_error_line(capfd, "falqon-export: error: ", expected)
    assert _files(tmp_path) == before


@pytest.mark.parametrize(("make", "expected"), [c[1:] for c in EVAL_CKPT_CASES], ids=[c[0] for c in EVAL_CKPT_CASES])
def test_bad_input_export_checkpoint_is_one_line_error(make, expected, tmp_path: Path) -> None:
    from falqon_lit.export import ExportError, load_for_export

    path = make(tmp_path)
    if path.is_dir():  # a folder is read as a save_falqon_model folder by the exporter
        expected = ("is not a FALQON model folder",)
    with pytest.raises(ExportError) as info:
        load_for_export(path)
    message = str(info.value)
    assert "\n" not in message and all(part in message for part in expected), message
