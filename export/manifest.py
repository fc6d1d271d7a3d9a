"""The export manifest (shapes, dtypes and sha256 of every file written); strict JSON.

Folders are published by ``destination.atomic_directory`` (re-exported here for its older callers).
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .destination import atomic_directory
from .errors import ExportError

__all__ = ["MANIFEST_NAME", "atomic_directory", "check_manifest", "read_manifest", "sha256_file", "write_manifest"]

MANIFEST_NAME = "falqon_manifest.json"
"""File name of the manifest inside every exported folder."""


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
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
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
