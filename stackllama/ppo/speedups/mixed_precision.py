"""The precision every PPO pass runs in, and bf16 autocast with two CPU speedups.

One regime for every pass (:func:`precision_regime`): sampling, the policy's rollout pass, the
reference pass (adapters disabled or a separate model) and the update passes all run under the
same autocast, so that the policy and the reference, and ``pi_old`` and ``pi_theta``, are the
same computation while the weights are the same (a KL of exactly 0 at the first step, a ratio of
exactly 1 before the weights move). Accelerate's ``mixed_precision`` autocasts only calls
through the model it prepared; the sampling loop and an explicit reference model are called
directly, so the trainer enters the regime itself around each of them.

bf16 autocast (``PPOConfig.bf16_autocast``, or accelerate's ``mixed_precision="bf16"``): on a
GPU this is plain ``torch.autocast(dtype=bfloat16)``. On a CPU two things made bf16
barely faster than fp32 there (``benchmarks/ppo_step.py --bf16``), and are changed:

- **Frozen weights are cast once.** Autocast caches its bf16 copy of a weight only for
  weights that require grad, so every call re-casts every frozen ``nn.Linear`` weight (the
  whole base under LoRA, the reference model). Here each frozen fp32 ``nn.Linear`` weight
  gets one bf16 copy, swapped in for the duration of the context: the very tensor autocast
  would have made, so the results are bit-identical, and decoding reads half the bytes.
  Memory: a bf16 copy of those weights (half their fp32 size); load the base in bf16 to
  need neither. Re-made when the weight is modified in place.
- **Attention runs in fp32.** PyTorch's CPU attention in bf16 is slower than in fp32, in
  the flash-attention backward and most of all in one-token decoding steps with a mask.
  Query/key/value are cast to fp32 for ``scaled_dot_product_attention`` and the output
  back to bf16 (more precise than bf16 attention, and faster here); sampling keeps its KV
  cache in fp32 (``kv_cache_dtype``) so that no step casts the whole cache. Only for
  models on transformers' ``sdpa`` attention.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

FP32_SDPA = "stackllama_sdpa_fp32"
_registered = False


def _register_fp32_sdpa() -> None:
    """Registers the ``FP32_SDPA`` attention implementation with transformers (once)."""
    global _registered
    if _registered:
        return
    # deferred: these pull in transformers' attention and distributed machinery (about a second
    # of import time), needed only once bf16 autocast runs on CPU
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
        dtype = query.dtype
        with torch.autocast(query.device.type, enabled=False):
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
        return out.to(dtype), weights

    AttentionInterface.register(FP32_SDPA, sdpa_fp32)
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)
    _registered = True


class Bf16Autocast:
    """``with autocast():`` bf16 autocast for forward passes of ``models`` on
    ``device_type`` (see the module docstring for the CPU specifics)."""

    def __init__(self, models: Iterable[nn.Module], device_type: str, cpu_speedups: bool = True) -> None:
        self.models = [m for m in models if m is not None]
        self.device_type = device_type
        self.cpu_speedups = cpu_speedups and device_type == "cpu"  # off under DeepSpeed (sharded weights)
        self._copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}  # id(weight) -> copy
        self._linears: Optional[list[nn.Linear]] = None

    @property
    def kv_cache_dtype(self) -> Optional[torch.dtype]:
        """The dtype sampling should keep its KV cache in: fp32 where attention runs in fp32,
        so that no step casts the whole cache."""
        return torch.float32 if self.cpu_speedups else None

    @contextlib.contextmanager
    def __call__(self):
        with contextlib.ExitStack() as stack:
            if self.cpu_speedups:
                stack.enter_context(self._bf16_frozen_weights())
                stack.enter_context(self._fp32_attention())
            stack.enter_context(torch.autocast(device_type=self.device_type, dtype=torch.bfloat16))
            yield

    def _frozen_linears(self):
        if self._linears is None:  # the models' structure is fixed once training starts: walk it once
            self._linears = [m for model in self.models for m in model.modules() if type(m) is nn.Linear]
        for module in self._linears:
            w = module._parameters.get("weight")
            if w is not None and not w.requires_grad and w.dtype == torch.float32:
                yield module, w

    @contextlib.contextmanager
    def _bf16_frozen_weights(self):
        swapped = []
        try:
            for module, weight in list(self._frozen_linears()):
                key = id(weight)
                ref, version, copy = self._copies.get(key, (None, None, None))
                # first use, another weight (merged_lora's), or the weight was changed in place
                if ref is None or ref() is not weight or version != weight._version:
                    copy = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
                    # the copy lives as long as its weight: the entry goes when the weight does
                    ref = weakref.ref(weight, lambda _, key=key, copies=self._copies: copies.pop(key, None))
                    self._copies[key] = (ref, weight._version, copy)
                module._parameters["weight"] = copy
                swapped.append((module, weight))
            yield
        finally:
            for module, weight in swapped:
                module._parameters["weight"] = weight

    @contextlib.contextmanager
    def _fp32_attention(self):
        configs = []
        for model in self.models:
            config = getattr(model, "config", None)
            if getattr(config, "_attn_implementation", None) == "sdpa" and all(config is not c for c in configs):
                configs.append(config)
        if configs:
            _register_fp32_sdpa()
        try:
            for config in configs:
                config._attn_implementation = FP32_SDPA
            yield
        finally:
            for config in configs:
                config._attn_implementation = "sdpa"


@dataclass
class PrecisionRegime:
    """``with regime():`` around every forward pass of the PPO step (see the module docstring)."""

    name: str
    """What runs, for the log: ``no autocast``, ``bf16 autocast (<why>)``, ``fp16 autocast (<why>)``."""
    autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None
    """The context factory, None for no autocast."""
    kv_cache_dtype: Optional[torch.dtype] = None
    """The dtype sampling keeps its KV cache in (None: as computed)."""

    def __call__(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.autocast is None else self.autocast()


def precision_regime(accelerator, bf16_autocast: bool, models: Iterable[nn.Module], cpu_speedups: bool = True) -> PrecisionRegime:
    """The one autocast regime of a PPO run: bf16 autocast when ``bf16_autocast`` is set or
    accelerate autocasts in bf16 (``--mixed_precision bf16``, every shipped accelerate config),
    fp16 autocast as accelerate does for ``fp16``, else none. Under DeepSpeed accelerate does
    not autocast (the engine casts the weights themselves, for every pass alike), so neither
    does this, unless ``bf16_autocast`` asks for it. ``models``: the policy and the reference
    model (None skipped); ``cpu_speedups``: :class:`Bf16Autocast`'s, off under DeepSpeed."""
    amp = accelerator.mixed_precision if accelerator.native_amp else "no"
    device_type = accelerator.device.type
    if bf16_autocast or amp == "bf16":
        why = "PPOConfig.bf16_autocast" if bf16_autocast else "accelerate mixed_precision=bf16"
        bf16 = Bf16Autocast(models, device_type, cpu_speedups=cpu_speedups)
        return PrecisionRegime(f"bf16 autocast ({why})", bf16, bf16.kv_cache_dtype)
    if amp != "no":
        return PrecisionRegime(f"{amp} autocast (accelerate mixed_precision={amp})", accelerator.autocast)
    return PrecisionRegime("no autocast")
