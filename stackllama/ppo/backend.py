"""What differs between one process, DDP and DeepSpeed, in one place: the PPO algorithm calls
these and never branches on the backend.

- **backward and accumulation**: DDP all-reduces the gradients at a window's last backward
  only (``no_sync`` before it); DeepSpeed's engine is called directly, told whether a
  minibatch ends its accumulation window (it reduces the gradients then) and divides by its
  ``gradient_accumulation_steps`` itself, so the loss is multiplied back;
- **the optimizer step and its guard**: NaN/inf gradients are refused before any step,
  naming the parameter (all processes stop together); then our clip + step, or the engine's
  (it clips at ``max_grad_norm``);
- **reductions across ranks**: means, sums and gathers, which are the identity on one process;
- **models**: the reference model's placement, generation on gathered ZeRO-3 weights, the
  state dict to save, the optimizer state in a checkpoint.

FSDP is refused: every forward of an FSDP model is a collective and the ranks sample
responses of different lengths, so generation would hang. ZeRO-3 gathers the weights for it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..errors import InputError, NonFiniteError
from .checkpointing import DEEPSPEED_DIR, DEEPSPEED_TAG, OPTIMIZER_FILE
from .guards import GradientGuard, refuse_low_precision_training, stopped


def backend_for(accelerator: Accelerator, config) -> "SingleProcess":
    """The backend of ``accelerator``'s run, configured for the PPO geometry of ``config``."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        raise InputError("the PPO trainer does not run under FSDP (generation on sharded weights would hang); "
                         "for sharded weights use accelerate_configs/deepspeed_zero3.yaml")
    if kind == DistributedType.DEEPSPEED:
        return DeepSpeed(accelerator, config)
    return (MultiProcess if accelerator.num_processes > 1 else SingleProcess)(accelerator, config)


class SingleProcess:
    """One process: reductions are the identity, our optimizer steps."""

    is_deepspeed = False
    is_zero3 = False
    own_reference_forward = False
    """Whether an explicit reference model runs its own forward (an engine) rather than the policy's logits path."""

    def __init__(self, accelerator: Accelerator, config) -> None:
        self.accelerator = accelerator
        self.config = config
        self.num_processes = accelerator.num_processes
        self.multi = self.num_processes > 1
        self.guard: GradientGuard | None = None
        self.params: list = []

    # ----------------------------------------------------------------------- models
    def check_trainable(self, named_params) -> None:
        """bf16/fp16 trainable weights are refused: Adam's updates would round away (DeepSpeed keeps fp32 masters)."""
        refuse_low_precision_training(named_params)

    def fused_optimizer(self, params) -> bool:
        """Whether torch's fused Adam may be used for ``params`` (one kernel for all of them, the same update)."""
        return all(p.device.type in ("cpu", "cuda") for p in params)

    def prepare_reference(self, ref_model):
        """The frozen reference model on this process's device (a whole copy; 8/4-bit ones are placed already)."""
        if not (getattr(ref_model, "is_loaded_in_8bit", False) or getattr(ref_model, "is_loaded_in_4bit", False)):
            ref_model.to(self.accelerator.device)
        return ref_model

    def attach(self, model, optimizer, named_params) -> None:
        """After ``accelerator.prepare``: the model/engine and optimizer to drive, and the
        gradient guard (none under fp16 loss scaling: an inf gradient is the scaler's business,
        it skips the step and lowers the scale)."""
        self.model, self.optimizer = model, optimizer
        self.params = [p for _, p in named_params]
        self.guard = None if self._loss_scaled() else GradientGuard(named_params)

    def _loss_scaled(self) -> bool:
        return self.accelerator.scaler is not None

    def generation_settings(self, generation_kwargs: dict) -> dict:
        """The caller's generation settings plus what this backend needs (here: nothing)."""
        return generation_kwargs

    def generation_model(self, model):
        """A context giving the model to sample with (here: the model itself)."""
        return contextlib.nullcontext(model)

    def state_dict_to_save(self):
        """The state dict to save the policy with (None: the model's own)."""
        return None

    # ----------------------------------------------------------------------- updates
    def accumulate(self, boundary: bool):
        """Around a minibatch's forward and backward: gradients are reduced at the window's boundary only."""
        return contextlib.nullcontext()

    @property
    def skipped_minibatch_must_sync(self) -> bool:
        """Whether a skipped last minibatch must still run a (zero) backward, so that the
        gradient reduction of the minibatches before it happens (DDP's all-reduce, DeepSpeed's boundary)."""
        return self.multi

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.accelerator.backward(loss)

    def optimizer_step(self, step: int) -> None:
        """Refuse NaN/inf gradients (naming the parameter), then clip and step. A NaN/inf
        gradient never reaches the weights or the optimizer state."""
        if self.guard is not None:
            bad = self.guard.first_nonfinite(self.accelerator.device, (lambda x: self.sum(x)) if self.multi else None)
            if bad is not None:
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(
                    f"{stopped(step)}: non-finite value (NaN/inf) in the gradient of {bad}"
                    f"{' (on at least one process)' if self.multi else ''}; the gradients were discarded and the weights "
                    "and optimizer state were not updated. Look for NaN/inf in logits or values, or lower the lr.")
        self._step()

    def _step(self) -> None:
        if self.config.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def reset_guard(self) -> None:
        if self.guard is not None:
            self.guard.reset()

    # ----------------------------------------------------------------------- reductions
    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, "mean") if self.multi else x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, "sum") if self.multi else x

    def moments(self, x: torch.Tensor) -> tuple:
        """``(mean, biased variance, count)`` of ``x`` over all processes, for
        ``RunningMoments.update``; ``(None, None, None)`` on one process (it takes ``x``'s own)."""
        if not self.multi:
            return None, None, None
        total = self.sum(torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device)]))
        mean = total[0] / total[1]
        return mean, self.sum(((x - mean) ** 2).sum()) / total[1], float(total[1])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's ``x`` stacked along dim 0 (same shapes)."""
        return self.accelerator.gather(x) if self.multi else x

    def gather_flat(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's ``x`` flattened and concatenated (shapes may differ: padded first)."""
        return self.accelerator.gather(self.accelerator.pad_across_processes(x.reshape(-1).float())) if self.multi else x

    # ----------------------------------------------------------------------- checkpoints
    def save_optimizer(self, folder: Path) -> None:
        """The optimizer state into a checkpoint folder (main process only)."""
        if self.accelerator.is_main_process:
            torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load_optimizer(self, folder: Path, load_policy_weights) -> None:
        """Restore the trainable weights (``load_policy_weights()``) and the optimizer state."""
        if (folder / DEEPSPEED_DIR).is_dir():
            raise InputError(f"{folder} was written under DeepSpeed; resume it under the same DeepSpeed config")
        load_policy_weights()
        state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state)  # moved to the parameters' device


class MultiProcess(SingleProcess):
    """DDP: gradients all-reduced at each accumulation window's last backward."""

    def accumulate(self, boundary: bool):
        return contextlib.nullcontext() if boundary else self.accelerator.no_sync(self.model)


class DeepSpeed(SingleProcess):
    """DeepSpeed: the engine owns micro-batching, loss scaling, clipping and the optimizer step.
    It gets the PPO geometry (one micro-batch = ``mini_batch_size`` sequences, a step every
    ``gradient_accumulation_steps`` of them, clipping at ``max_grad_norm``), as TRL 0.11 gave
    it; the trainer tells it each window's boundary and calls its step, so that a window
    skipped by ``ratio_threshold`` does not step."""

    is_deepspeed = True
    own_reference_forward = True

    def __init__(self, accelerator: Accelerator, config) -> None:
        super().__init__(accelerator, config)
        plugin = accelerator.state.deepspeed_plugin
        self.is_zero3 = plugin.zero_stage == 3
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = config.mini_batch_size
        ds["gradient_accumulation_steps"] = config.gradient_accumulation_steps
        ds["train_batch_size"] = config.backward_batch_size * accelerator.num_processes
        ds["gradient_clipping"] = config.max_grad_norm if config.max_grad_norm is not None else 0.0

    def check_trainable(self, named_params) -> None:
        pass  # the engine keeps fp32 master weights of bf16/fp16 parameters

    def fused_optimizer(self, params) -> bool:
        return False  # the engine wraps the optimizer

    def prepare_reference(self, ref_model):
        """ZeRO-3: sharded like the policy; otherwise a whole copy per process (TRL's helper)."""
        from trl.models.utils import (
            prepare_deepspeed,  # imported only here: TRL costs ~250 MB of RSS
        )

        return prepare_deepspeed(ref_model, self.accelerator)

    def _loss_scaled(self) -> bool:
        return self.model.fp16_enabled()

    def generation_settings(self, generation_kwargs: dict) -> dict:
        """ZeRO-3 sampling on the shards (``ds3_gather_for_generation=False``): every rank must run
        as many forwards as the slowest (``synced_gpus``), or the collectives hang."""
        if self.is_zero3 and not self.config.ds3_gather_for_generation:
            return {"synced_gpus": True, **generation_kwargs}
        return generation_kwargs

    def generation_model(self, model):
        """The whole weights gathered once for the call (TRL's helper) instead of fetched layer by
        layer at every new token (unless ``ds3_gather_for_generation=False``)."""
        from trl.models.utils import (
            unwrap_model_for_generation,  # imported only here: ~250 MB of RSS
        )

        return unwrap_model_for_generation(self.model, self.accelerator,
                                           gather_deepspeed3_params=self.config.ds3_gather_for_generation)

    def state_dict_to_save(self):
        """ZeRO-3 holds a shard of each weight per process: gathered (every process takes part)."""
        return self.accelerator.get_state_dict(self.model)

    @property
    def skipped_minibatch_must_sync(self) -> bool:
        return True

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.model.set_gradient_accumulation_boundary(is_boundary=boundary)
        self.model.backward(loss * self.config.gradient_accumulation_steps)

    def _step(self) -> None:
        self.model.step()

    def save_optimizer(self, folder: Path) -> None:
        """The optimizer state is sharded: every process writes its part of the engine's checkpoint."""
        self.model.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)

    def load_optimizer(self, folder: Path, load_policy_weights) -> None:
        """Trainable weights and optimizer shards, each process its own, from the engine's checkpoint."""
        if not (folder / DEEPSPEED_DIR).is_dir():
            raise InputError(f"{folder} was not written under DeepSpeed (no {DEEPSPEED_DIR}/); resume it "
                             "with the launcher that wrote it")
        self.model.load_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                   load_module_strict=False, load_lr_scheduler_states=False)
