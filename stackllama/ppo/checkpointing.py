"""File-level pieces of PPO checkpoints (the trainer's ``save_checkpoint`` / ``load_checkpoint``
use them): what goes in which file, reloading the policy's weights in place, random states
that ``torch.load(weights_only=True)`` accepts, and cutting the log back to a step.

A checkpoint folder ``checkpoint-<step>/`` holds

- the policy as ``save_pretrained`` writes it (adapter or full weights, ``value_head.safetensors``,
  tokenizer), so it reloads with ``AutoModelForCausalLMWithValueHead.from_pretrained``;
- ``optimizer.pt``: the optimizer state (written by the main process); under DeepSpeed instead
  ``deepspeed/``: the engine's own checkpoint (trainable weights and each process's optimizer
  shard, written by every process);
- ``trainer_state.json``: step, KL coefficient, score moments, data position, the caller's
  extra state (the script's history);
- ``rng_state_<rank>.pt``: each process's random generators (Python, NumPy, torch, CUDA),
  the data-order and minibatch-permutation generators, and the caller's samplers;
- ``checkpoint_complete.json``: the completion marker, written last (``stackllama.resume``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

PREFIX = "checkpoint"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}-{step}"


# --------------------------------------------------------------------------- random states


def encode_rng(state: dict) -> dict:
    """``resume.rng_state()`` with NumPy's key array as a tensor, so that the file loads
    with ``weights_only=True`` (no pickled NumPy objects to trust)."""
    name, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}


def decode_rng(state: dict) -> dict:
    name, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)}


# --------------------------------------------------------------------------- weights


def load_policy_weights(model, directory: str | os.PathLike) -> None:
    """Load a saved policy (``save_pretrained`` output) into ``model`` in place.

    In place because the reference policy is the model as it was loaded (the SFT weights,
    or the same module with adapters off): building the policy from the checkpoint would
    make the checkpoint the reference. Every trainable tensor must be found in the files.
    """
    from safetensors.torch import load_file

    from .value_head import VALUE_HEAD_FILE

    directory = Path(directory)
    model.v_head.load_state_dict(load_file(str(directory / VALUE_HEAD_FILE)))
    if model.is_peft_model:
        from peft import set_peft_model_state_dict

        adapter = directory / "adapter_model.safetensors"
        if not adapter.is_file():
            raise InputError(f"{directory}: no adapter_model.safetensors, but the policy has LoRA adapters")
        result = set_peft_model_state_dict(model.pretrained_model, load_file(str(adapter)))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise InputError(f"{directory}: adapter weights that the policy does not have: {unexpected[:5]}")
        return
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    lm = model.causal_lm
    loaded, unexpected = set(), []
    for name in files:
        path = directory / name
        if not path.is_file():
            raise InputError(f"{directory}: {name} is missing; the checkpoint holds no full weights")
        shard = load_file(str(path))
        result = lm.load_state_dict(shard, strict=False)
        unexpected += result.unexpected_keys
        loaded |= set(shard)
    state = lm.state_dict()
    loaded_ptrs = {state[k].data_ptr() for k in loaded if k in state}
    missing = [k for k in state if k not in loaded and state[k].data_ptr() not in loaded_ptrs]  # tied weights are found
    if unexpected or missing:
        raise InputError(f"{directory}: the saved weights do not fit the policy (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")


# --------------------------------------------------------------------------- log


def truncate_log(path: str | os.PathLike, step: int) -> int:
    """Keep the rows of steps <= ``step`` of a JSONL log (the steps after a checkpoint will be
    redone; an unreadable half-written last line is dropped too). Returns the rows kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("env/step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(kept)
