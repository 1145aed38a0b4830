"""What the project adds to transformers' `Trainer` (the SFT and reward stages train with TRL
trainers built on it): checkpoints a kill cannot corrupt, `--resume_from_checkpoint latest`,
and a stop on NaN/inf before it reaches the weights.

- `AtomicCheckpointMixin._save_checkpoint` lets `Trainer` write its usual checkpoint (model or
  adapter, optimizer, scheduler, the RNG state of every process, `trainer_state.json`, whose
  global step is the data position `Trainer` skips to on resume) into a staging folder, then
  `stackllama.resume.finalize` marks it complete and renames it to
  `<output_dir>/checkpoint-<step>`; `save_total_limit` prunes complete checkpoints only.
  `Trainer`'s own resume (`resume_from_checkpoint=True` -> `get_last_checkpoint`) would trust a
  half-written folder, so `train()` resolves `latest` / `true` itself.
- Counters `Trainer` keeps only for the current `train()` call (the loss sum behind
  `train_loss`, TRL's token count) and `carried_results` (figures of the untrained model) go
  into each checkpoint's `stage_state.json`, so a resumed run reports what an uninterrupted one
  would. `before_training` measures such figures inside `train()`, once the model is prepared:
  a `Trainer.evaluate()` called before `train()` leaves the model marked as prepared by
  accelerate (in evaluation mode, without DDP), so under several processes `train()` would then
  train unsynchronised replicas.
- `NonFiniteGuard` checks every step's loss and, before clipping and the optimizer step, the
  gradients; it raises `NonFiniteError` naming the stage, the step and the tensor, so that
  step is never applied nor checkpointed and the last good checkpoint stays the latest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import nested_gather

from . import resume
from .atomic import write_json
from .errors import NonFiniteError

logger = logging.getLogger(__name__)

PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR: checkpoints are <output_dir>/checkpoint-<step>
STAGE_STATE = "stage_state.json"

__all__ = ["AtomicCheckpointMixin", "NonFiniteError", "NonFiniteGuard", "carried_results", "resolve_resume",
           "stage_state", "STAGE_STATE"]


def resolve_resume(training_args) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: None, the newest complete one for `latest` /
    `true` (None when there is none yet: start fresh), or a path that must hold a complete checkpoint
    (else `CheckpointError`)."""
    return resume.resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir, PREFIX)


def stage_state(folder: str | os.PathLike | None) -> dict:
    """The `stage_state.json` of a checkpoint (empty when there is none: an older or foreign checkpoint)."""
    if folder is None:
        return {}
    path = Path(folder) / STAGE_STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def carried_results(folder: str | os.PathLike | None) -> dict:
    """Results the run measured before training (e.g. `eval_before`), as saved with checkpoint `folder`."""
    return stage_state(folder).get("results", {})


# --------------------------------------------------------------------------- NaN / inf


class NonFiniteGuard(TrainerCallback):
    """Stops training when a step's loss or a gradient holds NaN/inf, before the optimizer step.

    The losses of the step's micro-batches are folded into one flag without a device sync;
    the check runs once per optimizer step, before gradient clipping (which would spread one
    bad gradient to every parameter) or, without clipping, in `on_pre_optimizer_step`. With
    several processes the verdict is all-reduced so that every process stops at the same step.
    Under fp16 loss scaling inf gradients are the scaler's normal business (it skips the step),
    so only the loss is checked there."""

    def __init__(self, stage: str):
        self.stage = stage
        self._loss_finite: torch.Tensor | None = None
        self._checked_step: int | None = None

    def record_loss(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def check(self, model, state, output_dir: str | None = None, check_gradients: bool = True) -> None:
        step = state.global_step + 1  # the step being computed (checkpoint-N holds the state after N steps)
        if self._checked_step == step:
            return
        self._checked_step = step
        loss_finite, self._loss_finite = self._loss_finite, None
        problem = None
        if loss_finite is not None and not bool(loss_finite):
            problem = "the loss"
        elif check_gradients and model is not None:
            name = first_nonfinite_gradient(model)
            if name is not None:
                problem = f"the gradient of {name}"
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            flag = torch.tensor([0.0 if problem is None else 1.0], device=_device_of(model))
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if problem is None and flag.item() > 0:
                problem = "a loss or gradient on another process"
        if problem is not None:
            latest = resume.latest_checkpoint(output_dir, PREFIX) if output_dir else None
            raise NonFiniteError(
                f"{self.stage} step {step}: non-finite value (NaN/inf) in {problem}; stopped before the optimizer "
                f"step, nothing of this step was applied or saved (latest complete checkpoint: "
                f"{latest if latest else 'none'})"
            )

    def on_train_begin(self, args, state, control, **kwargs):
        self._loss_finite, self._checked_step = None, None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.check(model, state, args.output_dir, check_gradients=not _uses_grad_scaler(kwargs.get("optimizer")))


def first_nonfinite_gradient(model) -> str | None:
    """Name of the first parameter whose gradient holds NaN/inf (one device sync when all are finite)."""
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not named:
        return None
    device = named[0][1].device
    if bool(torch.stack([torch.isfinite(g).all().to(device) for _, g in named]).all()):
        return None
    return next(name for name, g in named if not bool(torch.isfinite(g).all()))


def _device_of(model):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _uses_grad_scaler(optimizer) -> bool:
    return getattr(optimizer, "scaler", None) is not None


# --------------------------------------------------------------------------- the mixin


class _BeforeTraining(TrainerCallback):
    """Runs the trainer's `before_training` once the model is prepared, on a fresh start only."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.before_training is not None and not trainer._resuming:
            trainer.carried_results.update(trainer.before_training(trainer))


class AtomicCheckpointMixin:
    """For `Trainer` subclasses (put it first: `class T(AtomicCheckpointMixin, SFTTrainer)`).

    `stage` names the stage in error messages. `carried_results` (JSON-able figures measured
    before training) are saved with every checkpoint and restored on resume; `before_training`,
    when set, is called as `before_training(trainer) -> dict` at the start of a fresh (not
    resumed) `train()`, its result added to `carried_results`."""

    stage = "train"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.carried_results: dict = {}
        self.before_training = None
        self._resuming = False
        self._staging_parent: str | None = None
        self._resumed_loss_sum = 0.0
        self._nonfinite_guard = NonFiniteGuard(self.stage)
        self.add_callback(self._nonfinite_guard)
        self.add_callback(_BeforeTraining(self))

    # ---- resume

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, with `latest` / `true` meaning the newest *complete* checkpoint (or a fresh
        start when there is none) and a named checkpoint required to be complete."""
        path = resume.resolve_resume(resume_from_checkpoint, self.args.output_dir, PREFIX)
        saved = stage_state(path)
        self._resuming = path is not None
        self.carried_results = {**saved.get("results", {}), **self.carried_results}
        self._resumed_loss_sum = float(saved.get("train_loss_sum", 0.0))
        if "total_train_tokens" in saved and hasattr(self, "_total_train_tokens"):
            self._total_train_tokens = saved["total_train_tokens"]
        output = super().train(resume_from_checkpoint=str(path) if path else None, trial=trial,
                               ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        if path is None or "train_loss_sum" not in saved:
            return output
        # Trainer reports the mean loss of this call's steps only; the run's mean is what an uninterrupted run reports
        train_loss = (self._resumed_loss_sum + self._total_loss_scalar) / max(output.global_step, 1)
        metrics = dict(output.metrics, train_loss=train_loss)
        for entry in reversed(self.state.log_history):
            if "train_loss" in entry:
                entry["train_loss"] = train_loss
                break
        return type(output)(output.global_step, train_loss, metrics)

    # ---- saving

    def _get_output_dir(self, trial):
        if self._staging_parent is not None:
            return self._staging_parent
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """`Trainer._save_checkpoint` into `.checkpoint-<step>.partial/checkpoint-<step>`, then marked complete,
        renamed to `<output_dir>/checkpoint-<step>` and old ones pruned (by the main process, once every
        process has written its share)."""
        run_dir = super()._get_output_dir(trial)
        final = Path(run_dir) / f"{PREFIX}-{self.state.global_step}"
        main = self.args.should_save
        if main:
            staging_parent = resume.clear_staging(final)
        else:
            staging_parent = resume.staging_dir(final)
        self.accelerator.wait_for_everyone()  # the staging folder is empty before anyone writes into it
        self._staging_parent = str(staging_parent)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_parent = None
        staged = staging_parent / final.name
        loss_sum = self._resumed_loss_sum + self._run_loss_sum()
        self.accelerator.wait_for_everyone()  # every process's RNG file is in
        if not main:
            return
        best = self.state.best_model_checkpoint
        if best is not None and Path(best).parent == staging_parent:  # Trainer named it inside the staging folder
            self.state.best_model_checkpoint = str(Path(run_dir) / Path(best).name)
            self.state.save_to_json(str(staged / "trainer_state.json"))
        state = {"stage": self.stage, "global_step": self.state.global_step, "train_loss_sum": loss_sum,
                 "results": self.carried_results}
        if hasattr(self, "_total_train_tokens"):
            state["total_train_tokens"] = int(self._total_train_tokens)
        write_json(staged / STAGE_STATE, state)
        resume.finalize(staged, final, {"stage": self.stage, "global_step": self.state.global_step})
        shutil.rmtree(staging_parent, ignore_errors=True)
        self._prune(run_dir)

    def _run_loss_sum(self) -> float:
        """Sum of this `train()` call's step losses so far: what Trainer logged plus what it has not yet."""
        pending = getattr(self, "_tr_loss", None)
        pending = 0.0 if pending is None else nested_gather(pending, self.args.parallel_mode).mean().item()
        return getattr(self, "_total_loss_scalar", 0.0) + float(pending)

    def _prune(self, run_dir) -> None:
        """Keep the newest `save_total_limit` complete checkpoints (and the best one, when tracked)."""
        keep = self.args.save_total_limit
        if not keep:
            return
        best = self.state.best_model_checkpoint
        for path in resume.checkpoints(run_dir, PREFIX)[:-keep]:
            if best is None or Path(best).resolve() != path.resolve():
                logger.info("deleting %s (save_total_limit %d)", path, keep)
                shutil.rmtree(path, ignore_errors=True)

    # ---- NaN / inf

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._nonfinite_guard.record_loss(loss)
        return loss

    def _clip_grad_norm(self, model):
        """Check before clipping: clipping by a NaN norm would make every gradient NaN and hide the culprit."""
        self._nonfinite_guard.check(self.model, self.state, self.args.output_dir,
                                    check_gradients=getattr(self.accelerator, "scaler", None) is None)
        return super()._clip_grad_norm(model)
