"""Atomic output folders and the export manifest (shapes, dtypes and sha256 of every file written).

A folder is built under a hidden temporary name next to the target and renamed into place only when complete, so a
failed or killed export never leaves a folder at the target path (a killed one may leave the hidden temporary
folder, named ``.<target>.tmp-*``, which is safe to delete).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import ExportError

MANIFEST_NAME = "falqon_manifest.json"
"""File name of the manifest inside every exported folder."""


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; rename it to ``target`` when the block succeeds.

    Args:
        target: the final folder path.
        force: replace an existing ``target`` (only after the new folder is complete).

    Raises:
        ExportError: ``target`` exists and ``force`` is false, or it is a file.
    """
    target = Path(target)
    if target.exists() and not force:
        raise ExportError(
            f"output folder '{target}' already exists; pass --force to replace it or choose another --out"
        )
    if target.exists() and not target.is_dir():
        raise ExportError(f"output path '{target}' is a file, not a folder; remove it or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes owner-only folders; an exported model should read like any other folder
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / target.name)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, target: str, tensors: dict[str, dict[str, Any]], extra: dict[str, Any]) -> Path:
    """Write ``falqon_manifest.json``: every file's size and sha256, every tensor's shape and dtype, plus ``extra``.

    Args:
        folder: the (temporary) export folder, complete except for the manifest.
        target: export target name (``vllm``, ``onnx``, ``hf``).
        tensors: ``{name: {"shape": [...], "dtype": "..."}}`` of the weights written.
        extra: target-specific facts (FALQON config, scale strategy, verification settings).
    """
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {
        "format": "falqon-export-manifest/1",
        "target": target,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
        "tensors": tensors,
        **extra,
    }
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the manifest of an exported folder."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"'{folder}' has no {MANIFEST_NAME}; it was not written by falqon-export")
    return json.loads(path.read_text(encoding="utf-8"))


def check_manifest(folder: str | os.PathLike[str]) -> list[str]:
    """Re-hash every file listed in the manifest; return the names whose size or sha256 no longer match."""
    folder = Path(folder)
    bad = []
    for name, info in read_manifest(folder)["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
            bad.append(name)
    return bad
