"""Writes that a kill cannot leave half done: a file or folder is written under a temporary
name beside its final place, then renamed into place (``os.replace``, atomic on one file
system). The one home of this mechanism; checkpoints (:mod:`stackllama.resume`), results
files, reports, merges and datasets all use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` writes the content to a temporary path; it is then renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``path`` holds ``text``, or (after a kill) what it held before."""
    return write_file(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, data) -> Path:
    """``data`` as indented JSON (non-JSON values as their ``str``), written atomically."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename the finished folder ``new`` to ``final``. An older ``final`` is moved aside first and deleted
    after, so ``final`` is at every moment either the old complete folder or the new one."""
    new, final = Path(new), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    had_old = final.exists() or final.is_symlink()
    if had_old:
        os.replace(final, old)
    os.replace(new, final)
    if had_old:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return final


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, prefix: str | None = None) -> Iterator[Path]:
    """A fresh temporary folder beside ``final`` to write into; on success it replaces ``final``
    (:func:`replace_dir`), on an exception it is deleted and ``final`` is left as it was.
    ``prefix``: the temporary name's start (default ``.<name>.tmp-``), followed by the process id."""
    final = Path(final)
    tmp = final.with_name(f"{prefix or f'.{final.name}.tmp-'}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
