"""Checkpoints that a kill cannot corrupt, and finding the one to resume from.

Every stage writes a checkpoint the same way: into a staging folder beside its final place
(`.<name>.partial`), then a completion marker (`checkpoint_complete.json`) as the last file,
then one `os.replace` of the folder into place. A run killed at any moment leaves either the
complete checkpoint or a staging folder that resume never looks at (and the next save
clears). A folder named like a checkpoint but without the marker (copied in part, written by
an older version) is not trusted either.

`--resume_from_checkpoint latest` picks the newest complete checkpoint of the output folder
and starts from scratch when there is none, so one command serves the first start and every
restart of a pre-empted job.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import replace_dir, write_json
from .errors import CheckpointError

logger = logging.getLogger(__name__)

MARKER = "checkpoint_complete.json"
PARTIAL_SUFFIX = ".partial"
LATEST = "latest"



# --------------------------------------------------------------------------- writing


def staging_dir(final: str | os.PathLike) -> Path:
    """Where a checkpoint bound for `final` is written first: `.<name>.partial` beside it.

    The name is fixed (not random) so every process of a multi-process run writes its share
    (e.g. its own RNG state) into the same folder."""
    final = Path(final)
    return final.parent / f".{final.name}{PARTIAL_SUFFIX}"


def clear_staging(final: str | os.PathLike) -> Path:
    """Remove what a killed save left in the staging folder of `final`; return the (empty) staging folder."""
    staging = staging_dir(final)
    if staging.exists():
        logger.info("removing the unfinished checkpoint %s left by an interrupted save", staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def finalize(staging: str | os.PathLike, final: str | os.PathLike, info: dict | None = None) -> Path:
    """Write the completion marker into `staging`, then rename it to `final` (replacing an older `final`)."""
    staging, final = Path(staging), Path(final)
    write_json(staging / MARKER, {"completed_at": time.time(), **(info or {})})
    replace_dir(staging, final)  # the same step saved again (a resumed run) replaces the older one
    return final


# --------------------------------------------------------------------------- finding


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).is_file()


def checkpoints(output_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """Complete checkpoints `<prefix>-<step>` (or `<prefix>_<step>`) in `output_dir`, oldest step first."""
    pattern = re.compile(rf"^{re.escape(prefix)}[-_](\d+)$")
    found = []
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike, prefix: str) -> Path | None:
    found = checkpoints(output_dir, prefix)
    return found[-1] if found else None


def resolve_resume(value: str | bool | None, output_dir: str | os.PathLike, prefix: str) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: None (start fresh), `latest` (or true) for the
    newest complete one in `output_dir` (None when there is none yet), or a path that must be complete."""
    if value in (None, "", False, "false", "False"):
        return None
    if value in (True, LATEST, "true", "True"):
        found = latest_checkpoint(output_dir, prefix)
        if found is None:
            logger.info("--resume_from_checkpoint latest: no complete checkpoint in %s yet, starting from scratch",
                        output_dir)
        else:
            logger.info("resuming from %s", found)
        return found
    path = Path(str(value))
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {value}: no such folder")
    if not is_complete(path):
        raise CheckpointError(f"--resume_from_checkpoint {value}: not a complete checkpoint (no {MARKER}; "
                              "an interrupted save?). Use `latest` for the newest complete one.")
    return path


def prune(output_dir: str | os.PathLike, prefix: str, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (None or 0: keep all); return the deleted."""
    if not keep:
        return []
    found = checkpoints(output_dir, prefix)
    doomed = found[: max(0, len(found) - keep)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------- random state


def rng_state() -> dict:
    """This process's random generators: Python, NumPy, torch CPU and every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
