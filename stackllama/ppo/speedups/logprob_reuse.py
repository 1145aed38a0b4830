"""When ``log pi_old`` and ``V_old`` may be taken from the sampling passes (``reuse_generation_logprobs``).

Sampling already runs the policy on every sampled token: one pass per token with a KV cache,
whose last hidden state gives the token's log-prob and, through the value head, its value.
Reusing them saves the policy's no-grad rollout pass. That is only right when the sampling
passes and a rollout pass compute the same numbers, to float rounding:

- in fp32. Under bf16 or fp16 (autocast, bf16/fp16 weights, a DeepSpeed engine in bf16) the
  one-token passes with a cache and a full pass round differently, enough to move the
  reward and KL curves (``benchmarks/ppo_bf16_curves.py``; figures in ``benchmarks/RESULTS.md``);
- without dropout while sampling (``rollout_in_eval_mode``, or no dropout in the model): the
  rollout pass always runs with dropout off;
- not on an 8/4-bit base, whose kernels differ between a one-token and a full pass;
- not for models whose logits are transformed after the LM head (``logits_transform``), whose
  sampled log-probs would miss the transformation;
- not under ZeRO-3, where the value head's shards would be needed mid-generation while the
  ranks are out of step;
- not with ``kl_penalty="full"``, which needs whole distributions, not sampled log-probs.

:func:`reuse_blocker` names the first condition that fails, or returns None; the trainer logs
which way it went.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..value_head import logits_transform


def has_dropout(model: nn.Module) -> bool:
    """Whether any dropout in ``model`` is non-zero (a dropout module, or a config's attention dropout)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        if float(getattr(module, "attention_dropout", 0.0) or 0.0) > 0:
            return True
    return False


def reuse_blocker(config, model, regime, is_zero3: bool) -> Optional[str]:
    """Why the rollout pass must recompute ``log pi_old`` / ``V_old`` instead of taking them from
    sampling, or None when reusing them gives the same numbers. ``config``: the PPOConfig;
    ``model``: the unwrapped value-head policy after ``accelerator.prepare`` (so DeepSpeed's dtype
    is seen); ``regime``: the run's :class:`~.mixed_precision.PrecisionRegime`."""
    if not config.reuse_generation_logprobs:
        return "reuse_generation_logprobs is off"
    if config.kl_penalty == "full":
        return "kl_penalty='full' needs the whole distributions"
    if regime.autocast is not None:
        return f"the passes run under {regime.name}, and sampling's one-token passes round differently from a full pass"
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()} - {torch.float32, torch.float64}
    if dtypes:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        return f"the policy's weights are {names}, and sampling's one-token passes round differently from a full pass"
    if model.is_quantized:
        return "the base is 8/4-bit, whose kernels differ between one-token and full passes"
    transform = logits_transform(model.config)
    if transform is not None:
        return f"the model's logits are transformed after the LM head ({transform})"
    if is_zero3:
        return "under ZeRO-3 the value head's shards are not at hand while the ranks sample out of step"
    if not config.rollout_in_eval_mode and has_dropout(model):
        return "sampling runs with dropout (rollout_in_eval_mode=False), the rollout pass without"
    return None
