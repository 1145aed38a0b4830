"""Whether a stage's output can be reused: its completion marker exists and the driver's record
(``<run>/.pipeline/<stage>.json``) says it was made by the same command, config and upstream
outputs. A training stage that is redone resumes from its checkpoints when its last run, with
the same command, was interrupted; otherwise it starts from an empty folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..atomic import write_json
from .plan import Step

STATE_DIR = ".pipeline"  # inside the run folder: one record per stage run


def _state_path(run: Path, name: str) -> Path:
    return run / STATE_DIR / f"{name}.json"


def read_state(run: Path, name: str) -> dict | None:
    try:
        return json.loads(_state_path(run, name).read_text())
    except (OSError, ValueError):
        return None


def write_state(run: Path, name: str, state: dict) -> None:
    write_json(_state_path(run, name), state)


def completion(step: Step, run: Path, fingerprint: str) -> tuple[bool, str]:
    """(complete?, why): the marker exists and the record matches this command and inputs."""
    marker = run / step.spec.output / step.spec.marker
    if not marker.is_file():
        return False, "not run yet" if not (run / step.spec.output).exists() else "incomplete (no " + step.spec.marker + ")"
    state = read_state(run, step.spec.name)
    if state is None:
        return True, "complete (made outside the pipeline; --force redoes it)"
    if state.get("fingerprint") != fingerprint:
        return False, "its command, config or inputs changed"
    if state.get("status", "complete") != "complete":
        return False, "its last run did not finish"
    return True, "complete"


def upstream_token(step: Step, run: Path, fingerprint: str) -> str:
    """What the next stage's fingerprint depends on: this stage's record (changes whenever it re-runs)."""
    state = read_state(run, step.spec.name)
    if state is not None:
        return f"{state.get('fingerprint')}@{state.get('finished_at')}"
    marker = run / step.spec.output / step.spec.marker
    return f"{fingerprint}@{marker.stat().st_mtime if marker.exists() else ''}"


def prepare_training_stage(step: Step, run: Path, fingerprint: str, forced: bool) -> str | None:
    """A training stage whose last run (same command and inputs) was interrupted resumes from its
    latest checkpoint; otherwise it starts clean, so checkpoints of an older run are never mistaken
    for this one's. Returns how the stage starts, for the progress line."""
    previous = read_state(run, step.spec.name)
    interrupted = previous is not None and previous.get("status") in ("running", "failed")
    if interrupted and previous.get("fingerprint") == fingerprint and not forced:
        step.script_args = step.script_args + ["--resume_from_checkpoint", "latest"]
        return "its last run did not finish: resuming from its latest checkpoint, if any"
    output = run / step.spec.output
    if output.exists():
        shutil.rmtree(output)
    return None
