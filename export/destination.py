"""The export's output folder: checked before any work, built under a hidden name, published by rename.

A folder is built as ``.<name>.tmp-<pid>-*`` next to the target and renamed into place only when complete, so a
failed or killed export never leaves a folder at the target path. ``--force`` replaces in three steps, each one a
state the next run can read: the old folder is renamed to ``.<name>.old-<pid>-*``, the new one renamed into place,
then the backup deleted. A run killed in between leaves either the backup alone (the next run renames it back, so
the old export is never lost) or the new folder plus a backup (the next run deletes the backup). Hidden folders of a
process that is no longer running are removed by the next export to the same target, with a message.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import ExportError

FILE_MODE, DIR_MODE = 0o644, 0o755
"""Modes of everything published: an exported model reads like any other folder (safetensors writes 0600)."""


def _owner_alive(hidden: Path) -> bool:
    """Whether another process named in ``.<name>.tmp-<pid>-*`` still runs and may be writing it.

    A name without a pid (older exports) is stale, and so is one of this process: its exports run one at a time.
    """
    pid = hidden.name.rsplit(".", 1)[-1].split("-")[1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(target: Path, say: Callable[[str], None]) -> None:
    """Undo what a killed export left next to ``target``: restore a lost folder, delete stale hidden folders."""
    if not target.parent.is_dir():
        return
    hidden = sorted(
        (p for p in target.parent.glob(f".{glob.escape(target.name)}.*-*") if p.is_dir() and not _owner_alive(p)),
        key=lambda p: p.stat().st_mtime,
    )
    backups = [p for p in hidden if p.name.startswith(f".{target.name}.old-")]
    if backups and not target.exists():
        os.rename(backups[-1], target)
        say(f"restored '{target}' from '{backups[-1].name}', left by a --force replace that was interrupted")
        hidden.remove(backups[-1])
    for stale in hidden:
        shutil.rmtree(stale, ignore_errors=True)
        say(f"removed '{stale}', left by an interrupted export (incomplete or replaced)")


def check_destination(target: str | os.PathLike[str], force: bool, say: Callable[[str], None] = print) -> Path:
    """Refuse an output folder that cannot be published, before any work; recover after an interrupted export.

    Raises:
        ExportError: ``target`` exists without ``force``, is a file, or its folder cannot be written.
    """
    target = Path(target)
    recover_interrupted(target, say)
    if target.exists() and not force:
        raise ExportError(
            f"output folder '{target}' already exists; pass --force to replace it or choose another --out"
        )
    if target.exists() and not target.is_dir():
        raise ExportError(f"output path '{target}' is a file, not a folder; remove it or choose another --out")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"--out '{target}' is inside '{ancestor}', which is a file; choose another --out")
    try:  # os.access is no answer for root or read-only mounts: try what the export will do
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=ancestor))
    except OSError as err:
        raise ExportError(
            f"--out '{target}' cannot be written ({err.strerror} in '{ancestor}'); choose a writable --out"
        ) from None
    return target


def _publishable(folder: Path) -> None:
    for path in folder.rglob("*"):
        path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)
    folder.chmod(DIR_MODE)


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike[str], force: bool = False, say: Callable[[str], None] = print
) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; publish it at ``target`` when the block succeeds.

    Args:
        target: the final folder path.
        force: replace an existing ``target`` (only after the new folder is complete).
        say: where recovery messages go.

    Raises:
        ExportError: see :func:`check_destination`.
    """
    target = check_destination(target, force, say)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as err:
        raise ExportError(f"--out '{target}' cannot be created ({err.strerror}); choose a writable --out") from None
    try:
        yield tmp
        _publishable(tmp)
        backup = None
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.rename(target, backup)  # replaces the empty placeholder folder: the old export is now the backup
        os.rename(tmp, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
