"""PPO checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint` (the trainer's methods of
those names call them), what goes in which file, reloading the policy's weights in place,
random states that ``torch.load(weights_only=True)`` accepts, and cutting the log back to a step.

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
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .. import resume
from ..atomic import write_json, write_text
from ..errors import InputError
from .value_head import VALUE_HEAD_FILE

logger = logging.getLogger(__name__)

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
    directory = Path(directory)
    model.v_head.load_state_dict(load_file(str(directory / VALUE_HEAD_FILE)))
    if model.is_peft_model:
        from peft import set_peft_model_state_dict  # only PEFT policies need peft

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
    write_text(path, "".join(line + "\n" for line in kept))
    return len(kept)


# --------------------------------------------------------------------------- save / load


def save_checkpoint(trainer, output_dir: str, extra: dict | None = None, save_total_limit: int | None = None,
                    **stateful) -> Path:
    """Writes ``<output_dir>/checkpoint-<step>/`` with everything a resumed run needs to go on as
    if never stopped (the files listed above), then keeps only the newest ``save_total_limit``.

    The folder is written under a staging name and renamed when complete (marker last), so a
    kill during the save leaves nothing that :func:`load_checkpoint` would trust. ``extra``:
    JSON-able state of the caller (returned by ``load_checkpoint``); ``stateful``: objects with
    ``state_dict`` / ``load_state_dict`` saved per process (e.g. the length sampler). Called on
    every process: each writes its own random state."""
    start = time.perf_counter()
    acc = trainer.accelerator
    final = checkpoint_dir(output_dir, trainer.current_step)
    if acc.is_main_process:
        resume.clear_staging(final)
    acc.wait_for_everyone()
    staging = resume.staging_dir(final)
    trainer.save_pretrained(str(staging))  # the policy, reloadable as it is
    trainer.backend.save_optimizer(staging)
    if acc.is_main_process:
        batches = len(trainer.dataloader) if trainer.dataloader is not None else None
        state = {**trainer.state_dict(), "num_processes": acc.num_processes, "batch_size": trainer.config.batch_size,
                 "data": {"epoch": trainer.epoch, "batch": trainer.batch_in_epoch, "batches_per_epoch": batches},
                 "extra": extra or {}}
        write_json(staging / TRAINER_STATE, state)
    rng = {"rng": encode_rng(resume.rng_state()), "perm_generator": trainer.perm_generator.get_state(),
           "data_epoch_start": trainer.epoch_start_state, **{k: v.state_dict() for k, v in stateful.items()}}
    torch.save(rng, staging / rng_file(acc.process_index))
    acc.wait_for_everyone()
    if acc.is_main_process:
        resume.finalize(staging, final, {"stage": "ppo", "step": trainer.current_step})
        resume.prune(output_dir, PREFIX, save_total_limit)
        logger.info("saved %s (%.2f s)", final, time.perf_counter() - start)
    acc.wait_for_everyone()
    return final


def load_checkpoint(trainer, directory: str, **stateful) -> dict:
    """Restores a :func:`save_checkpoint` folder into ``trainer`` (built as for a fresh run, so the
    reference policy stays the starting model) and returns the caller's ``extra``. The log is
    cut back to the checkpoint's step. Called last before the loop: it sets the random generators."""
    directory = Path(directory)
    acc = trainer.accelerator
    state = json.loads((directory / TRAINER_STATE).read_text())
    batches = len(trainer.dataloader) if trainer.dataloader is not None else None
    saved = (state["num_processes"], state["batch_size"], state["data"]["batches_per_epoch"])
    if saved != (acc.num_processes, trainer.config.batch_size, batches):
        raise InputError(
            f"{directory} was written by {saved[0]} process(es) with batch_size {saved[1]} and {saved[2]} batches per "
            f"epoch; this run has {acc.num_processes}, {trainer.config.batch_size} and {batches}. Resume with the same "
            "processes, batch size and queries, or start a new run.")
    trainer.backend.load_optimizer(directory, lambda: load_policy_weights(trainer.unwrapped_model, directory))
    trainer.load_state_dict(state)
    trainer.epoch, trainer.batch_in_epoch = state["data"]["epoch"], state["data"]["batch"]
    if trainer.current_step > 0:
        trainer.unwrapped_model.train()  # as the last update left it (matters when rollouts keep dropout)
    if trainer.config.log_jsonl and acc.is_main_process:
        truncate_log(trainer.config.log_jsonl, trainer.current_step)
    rng = torch.load(directory / rng_file(acc.process_index), map_location="cpu", weights_only=True)
    for name, obj in stateful.items():
        obj.load_state_dict(rng[name])
    trainer.perm_generator.set_state(rng["perm_generator"])
    trainer.epoch_start_state = rng["data_epoch_start"]
    resume.set_rng_state(decode_rng(rng["rng"]))
    return state["extra"]
