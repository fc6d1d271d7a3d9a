"""The export's output folder: bad --out refused before any work, interrupted exports recovered, files readable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from falqon_lit.exit_codes import EXIT_USAGE
from falqon_lit.export import ExportError, export_model, save_falqon_model
from falqon_lit.export.cli import main
from falqon_lit.export.manifest import sha256_file


def _dead_pid() -> int:
    """The pid of a process that has exited (what a kill -9 leaves behind)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_cli_unwritable_out_one_line_error_before_loading(tiny_factory, tmp_path, capsys, monkeypatch, where):
    model, tokenizer = tiny_factory("row", "row")
    saved = save_falqon_model(model, tokenizer, tmp_path / "saved")
    (tmp_path / "a_file").write_text("x")
    out = "/proc/falqon-export-test" if where == "proc" else str(tmp_path / "a_file" / "out")

    def no_load(path):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    monkeypatch.setattr("falqon_lit.export.cli.load_for_export", no_load)
    assert main(["--target", "vllm", "--ckpt", str(saved), "--out", out]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("falqon-export: error: --out ") and "choose" in err[0], err


def test_export_removes_stale_hidden_folders_with_a_message(tiny_factory, tmp_path):
    model, tokenizer = tiny_factory("tensor", "tensor")
    stale = [tmp_path / f".out.tmp-{_dead_pid()}-k1ll3d", tmp_path / ".out.tmp-oldname"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 64)  # complete-looking, no manifest
    lines = []
    export_model(model, tokenizer, "hf", tmp_path / "out", verify=False, progress=lines.append)
    assert not any(folder.exists() for folder in stale)
    assert sum("removed" in line and "interrupted export" in line for line in lines) == 2, lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replace_killed_between_renames_restores_the_old_export(tiny_factory, tmp_path, monkeypatch):
    model, tokenizer = tiny_factory("tensor", "tensor")
    out = tmp_path / "out"
    export_model(model, tokenizer, "hf", out, verify=False)
    before = sha256_file(out / "falqon_manifest.json")
    rename = os.rename

    def killed_before_publishing(src, dst):
        if ".tmp-" in str(src):
            raise KeyboardInterrupt("kill -9")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_before_publishing)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, tokenizer, "hf", out, force=True, verify=False)
    monkeypatch.setattr(os, "rename", rename)
    assert not out.exists() and len(list(tmp_path.glob(".out.old-*"))) == 1  # the old export survives as a backup

    lines = []
    with pytest.raises(ExportError, match="already exists"):  # restored, so it needs --force again
        export_model(model, tokenizer, "hf", out, verify=False, progress=lines.append)
    assert any(line.startswith(f"restored '{out}'") for line in lines), lines
    assert sha256_file(out / "falqon_manifest.json") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replace_killed_before_deleting_backup_keeps_the_new_export(tiny_factory, tmp_path, monkeypatch):
    model, tokenizer = tiny_factory("tensor", "tensor")
    out = tmp_path / "out"
    export_model(model, tokenizer, "hf", out, verify=False)
    rmtree = shutil.rmtree

    def killed_before_cleanup(path, *args, **kwargs):
        if ".old-" in str(path):
            raise KeyboardInterrupt("kill -9")
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_before_cleanup)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, tokenizer, "hf", out, force=True, verify=False)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    new = sha256_file(out / "falqon_manifest.json")

    lines = []
    export_model(model, tokenizer, "hf", tmp_path / "other", verify=False, progress=lines.append)  # other target
    assert len(list(tmp_path.glob(".out.old-*"))) == 1  # only exports to the same target clean up
    with pytest.raises(ExportError, match="already exists"):
        export_model(model, tokenizer, "hf", out, verify=False, progress=lines.append)
    assert any("removed" in line and ".out.old-" in line for line in lines), lines
    assert sha256_file(out / "falqon_manifest.json") == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]


@pytest.mark.parametrize("target", ["vllm", "hf"])
def test_export_files_are_world_readable(tiny_factory, tmp_path, target):
    model, tokenizer = tiny_factory("tensor", "tensor")
    out = tmp_path / "out"
    export_model(model, tokenizer, target, out, verify=False)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
    assert out.stat().st_mode & 0o777 == 0o755
