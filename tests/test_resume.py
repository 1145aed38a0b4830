"""Checkpoint folders: staged, marked, renamed; resume finds only complete ones; pruning; RNG state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from stackllama.resume import (
    MARKER,
    CheckpointError,
    checkpoints,
    clear_staging,
    finalize,
    latest_checkpoint,
    prune,
    resolve_resume,
    rng_state,
    set_rng_state,
    staging_dir,
)


def save(output_dir, step, payload="weights"):
    final = output_dir / f"checkpoint-{step}"
    staging = clear_staging(final)
    (staging / "model.safetensors").write_text(payload)
    return finalize(staging, final, {"step": step})


def test_finalize_moves_a_marked_folder_into_place(tmp_path):
    final = save(tmp_path, 3)
    assert (final / MARKER).is_file() and (final / "model.safetensors").read_text() == "weights"
    assert not staging_dir(final).exists()
    assert latest_checkpoint(tmp_path, "checkpoint") == final


def test_an_interrupted_save_is_never_resumed_from(tmp_path):
    save(tmp_path, 2)
    # killed during the save of step 4: the staging folder is left behind, nothing at checkpoint-4
    staging = clear_staging(tmp_path / "checkpoint-4")
    (staging / "model.safetensors").write_text("half")
    # a folder named like a checkpoint but without the marker (e.g. a partial copy)
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / "model.safetensors").write_text("?")
    assert [p.name for p in checkpoints(tmp_path, "checkpoint")] == ["checkpoint-2"]
    assert resolve_resume("latest", tmp_path, "checkpoint") == tmp_path / "checkpoint-2"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-6"), tmp_path, "checkpoint")
    # the next save of step 4 clears what the killed one left
    final = save(tmp_path, 4, "good")
    assert (final / "model.safetensors").read_text() == "good"
    assert resolve_resume(True, tmp_path, "checkpoint") == final


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 5, "first")
    final = save(tmp_path, 5, "second")
    assert (final / "model.safetensors").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-5"]


def test_resolve_resume_without_checkpoints_starts_fresh(tmp_path):
    assert resolve_resume("latest", tmp_path / "missing", "checkpoint") is None
    assert resolve_resume(None, tmp_path, "checkpoint") is None
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_resume(str(tmp_path / "nope"), tmp_path, "checkpoint")


def test_steps_sort_numerically_and_prune_keeps_the_newest(tmp_path):
    for step in (9, 10, 100, 2):
        save(tmp_path, step)
    assert [p.name for p in checkpoints(tmp_path, "checkpoint")] == [
        "checkpoint-2", "checkpoint-9", "checkpoint-10", "checkpoint-100"]
    deleted = prune(tmp_path, "checkpoint", 2)
    assert [p.name for p in deleted] == ["checkpoint-2", "checkpoint-9"]
    assert [p.name for p in checkpoints(tmp_path, "checkpoint")] == ["checkpoint-10", "checkpoint-100"]
    assert prune(tmp_path, "checkpoint", None) == []


def test_rng_state_round_trip():
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[0] == expected[0] and again[1] == expected[1] and torch.equal(again[2], expected[2])
