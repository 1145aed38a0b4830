"""The folder a merge writes into before it is renamed to the output, and the clean-up of those
left by a merge that was killed.

A merge stages its output in a hidden folder beside it (:func:`stackllama.atomic.staged_dir`)
named after the host and process, so a later merge can tell an abandoned one from one that runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

logger = logging.getLogger(__name__)


def staging_prefix(output_dir: Path) -> str:
    """Name start of the folder a merge writes into before renaming it to ``output_dir``;
    the process id follows (``staged_dir`` appends it)."""
    return f".{output_dir.name}.merging-{socket.gethostname()}-"


def remove_abandoned_merges(output_dir: Path) -> list[Path]:
    """Deletes the staging folders of merges into ``output_dir`` whose process is gone.

    A merge killed before its rename (SIGKILL, out of memory) leaves a hidden folder of the
    model's size beside the output. Only folders made on this host by a process that no longer
    runs are removed; others are left to their owner.
    """
    prefix = staging_prefix(output_dir)
    removed = []
    for path in output_dir.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if not (path.is_dir() and pid.isdigit()) or process_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("removed %s, left by an interrupted merge (process %s)", path, pid)
        removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
