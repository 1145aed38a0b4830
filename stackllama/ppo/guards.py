"""Checks for the failure modes the recipe's users reported (docs/recipe-reference.md):
generation settings that bias the KL, reward hacking by degenerate responses, and NaN/inf
values that must never reach the weights."""

from __future__ import annotations

import collections
import warnings
from typing import Iterable, Sequence

import torch

from ..errors import InputError, NonFiniteError


def check_finite(name: str, tensor: torch.Tensor, hint: str = "", step: int | None = None) -> None:
    """Raise :class:`NonFiniteError` naming the stage, ``step`` and ``name`` if ``tensor`` holds a NaN or inf."""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise NonFiniteError(
            f"{stopped(step)}: {bad} non-finite value(s) (NaN/inf) in {name}; the weights and the "
            f"optimizer state were not updated by this minibatch. {hint}".strip()
        )


def refuse_low_precision_training(named_parameters) -> None:
    """Refuse trainable bf16/fp16 parameters outside DeepSpeed (call it only there).

    ``torch.optim.Adam`` updates a parameter in its own dtype: with bf16 weights (8 bits of
    mantissa) an update of ``lr = 1.4e-5`` times a unit-scale step is below half an ulp of most
    weights and rounds away, so full fine-tuning of a bf16 model under plain DDP hardly moves.
    DeepSpeed keeps fp32 master weights for bf16 training; LoRA adapters and the value head
    are fp32 unless asked otherwise."""
    low = [(name, p.dtype) for name, p in named_parameters if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    if low:
        name, dtype = low[0]
        raise InputError(
            f"{len(low)} trainable parameter(s) are {str(dtype).replace('torch.', '')} (e.g. {name}): the optimizer "
            "would update them with no fp32 master copy, and updates of the learning rate's size round away. Load "
            "the weights in fp32 (--dtype float32) and compute in bf16 with --bf16_autocast or accelerate's "
            "--mixed_precision bf16, train LoRA adapters (--use_peft), or use DeepSpeed "
            "(accelerate_configs/deepspeed_zero2.yaml), which keeps fp32 master weights."
        )


class GradientGuard:
    """Finds NaN/inf gradients before the optimizer step, naming the parameter, under any backend.

    A tensor hook on every trainable parameter folds "this gradient is finite" into one flag
    per parameter as backward computes it (no device sync). The check runs on each process's
    own gradients before any reduction, so it works the same under DDP and under DeepSpeed,
    whose reduced gradients live in its own partitioned buffers rather than in ``p.grad``.
    :meth:`first_nonfinite` reduces the flags over the processes, so that every process stops
    at the same step, and names the first parameter whose gradient was bad on any of them."""

    def __init__(self, named_parameters) -> None:
        self.names: list[str] = []
        self._flags: dict[int, torch.Tensor] = {}
        for name, param in named_parameters:
            if param.requires_grad:
                index = len(self.names)
                self.names.append(name)
                param.register_hook(self._hook(index))

    def _hook(self, index: int):
        def hook(grad: torch.Tensor | None) -> None:
            if grad is None:  # some autograd functions (bitsandbytes') hand hooks no gradient
                return
            bad = ~torch.isfinite(grad).all()
            previous = self._flags.get(index)
            self._flags[index] = bad if previous is None else previous | bad

        return hook

    def first_nonfinite(self, device, reduce=None) -> str | None:
        """The name of the first parameter with a NaN/inf gradient since the last call, on this
        process or (``reduce``: a sum over processes of a tensor on ``device``, e.g.
        ``accelerator.reduce(x, "sum")``) on any; resets the flags."""
        flags, self._flags = self._flags, {}
        if not self.names:
            return None
        vector = torch.zeros(len(self.names), device=device)
        for index, flag in flags.items():
            vector[index] = flag.to(device).float()
        if reduce is not None:
            vector = reduce(vector)
        bad = vector.nonzero()
        return None if len(bad) == 0 else self.names[int(bad[0, 0])]

    def reset(self) -> None:
        """Forget the flags (a step that stopped half-way leaves none behind for the next)."""
        self._flags = {}


def stopped(step: int | None) -> str:
    """The head of every NaN/inf message: the stage and, when known, the step (counted from 1)."""
    return "PPO step stopped" if step is None else f"PPO step {step} stopped"


def check_generation_kwargs(kwargs: dict, generation_config, vocab_size: int, allow_eos_suppression: bool) -> None:
    """Refuse or warn on sampling settings under which the KL estimate is biased.

    - ``min_length`` / ``min_new_tokens`` forbid EOS while sampling: the sampled
      distribution is no longer the model's, the per-token KL (from the model's
      probabilities) is biased and typically goes negative. Refused unless allowed.
    - ``eos_token_id`` outside the vocabulary (the published script's 100_000): generation
      never stops at EOS; warned.
    - ``top_k > 0``, ``top_p < 1``, greedy decoding: samples are not from ``pi``; warned.
    """

    def effective(name, default=None):
        return effective_generation_param(name, kwargs, generation_config, default)

    min_new = effective("min_new_tokens") or 0
    min_len = effective("min_length", 0) or 0
    if min_new > 0 or min_len > 0:
        msg = (
            f"generation with min_new_tokens={min_new} / min_length={min_len} suppresses EOS while sampling, "
            "so responses are not samples of the policy and the KL penalty (computed from the policy's "
            "probabilities on the truncated response) is biased and can go negative. Remove it, or set "
            "PPOConfig(allow_eos_suppression=True) to proceed anyway."
        )
        if not allow_eos_suppression:
            raise InputError(msg)
        warnings.warn(msg, stacklevel=3)
    eos = kwargs.get("eos_token_id")
    if eos is not None:
        ids = eos if isinstance(eos, (list, tuple)) else [eos]
        if any(int(i) >= vocab_size or int(i) < 0 for i in ids):
            warnings.warn(
                f"eos_token_id={eos} is outside the vocabulary ({vocab_size}): generation will never stop at "
                "EOS (the published StackLLaMA script did this). Responses are still cut after the "
                "tokenizer's EOS.",
                stacklevel=3,
            )
    if not effective("do_sample", False):
        warnings.warn("do_sample is off: PPO needs samples from the policy.", stacklevel=3)
    top_k = effective("top_k", 0) or 0
    top_p = effective("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if top_k > 0 or top_p < 1.0:
        warnings.warn(
            f"sampling with top_k={top_k} / top_p={top_p} truncates the policy's distribution, so the "
            "log-probs and KL do not describe what was sampled; the recipe uses top_k=0, top_p=1.0 "
            "(note that transformers' default top_k is 50 when not given).",
            stacklevel=3,
        )


def effective_generation_param(name: str, kwargs: dict, generation_config, default=None):
    """The value ``generate`` will use: the call's kwarg, else the model's generation config,
    else transformers' built-in default (e.g. ``top_k=50`` when nothing sets it)."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    value = getattr(generation_config, name, None) if generation_config is not None else None
    if value is None:
        try:
            from transformers import GenerationConfig

            value = GenerationConfig._get_default_generation_params().get(name)
        except AttributeError:  # older transformers: defaults live on the config itself
            value = None
    return default if value is None else value


def degenerate_mask(
    responses: Sequence[torch.Tensor],
    texts: Sequence[str] | None,
    token_share: float = 0.5,
    line_share: float = 0.5,
    min_tokens: int = 8,
) -> torch.Tensor:
    """Per response, True when it is dominated by one repeated token or one repeated line.

    Token: the most frequent token id is more than ``token_share`` of the response's tokens
    (responses of at least ``min_tokens`` tokens). Line: with at least 3 non-empty lines, the
    most frequent stripped line is more than ``line_share`` of them (the recipe's answers of
    nothing but ```` ``` ````).
    """
    flags = []
    for i, r in enumerate(responses):
        flag = False
        if r.numel() >= min_tokens:
            counts = torch.bincount(r.long().flatten() - r.min().long())
            flag = counts.max().item() > token_share * r.numel()
        if not flag and texts is not None:
            lines = [ln.strip() for ln in texts[i].splitlines() if ln.strip()]
            if len(lines) >= 3:
                flag = collections.Counter(lines).most_common(1)[0][1] > line_share * len(lines)
        flags.append(flag)
    return torch.tensor(flags, dtype=torch.bool)


def negative_kl_message(mean_kl: float) -> str:
    return (
        f"mean KL to the reference is negative ({mean_kl:.4f}); the true KL cannot be. Likely causes: "
        "generation that does not sample from the policy (min_length/min_new_tokens suppressing EOS, "
        "top_k/top_p, a temperature the log-probs do not use), padding or position ids that differ "
        "between generation and scoring, or dropout active while sampling. Small negative values "
        "are also sampling noise of the k1 estimator when the KL is near zero."
    )


def flatten_stop_ids(*groups: Iterable[int] | int | None) -> list[int]:
    out: list[int] = []
    for g in groups:
        if g is None:
            continue
        if isinstance(g, int):
            g = [g]
        out.extend(int(x) for x in g)
    return sorted(set(out))
