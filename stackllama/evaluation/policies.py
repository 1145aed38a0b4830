"""The two policies compared: loaded from full weights or a LoRA adapter (not merged), and a
PPO adapter over the SFT weights loaded once, the SFT policy being the adapter disabled (as in
PPO training: no second copy in memory)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..modeling import adapter_base, load_tokenizer, torch_dtype
from ..run_layout import is_adapter, model_kind

logger = logging.getLogger(__name__)

SMALL_MODEL_PARAMETERS = 100_000_000  # below this, one CPU thread (no OpenMP stalls on a shared CPU)


@dataclass
class Policy:
    """A causal LM to sample from and score with; `active()` is the context in which the model *is* this
    policy (the SFT policy sharing the PPO adapter's base runs with the adapter disabled)."""

    name: str
    path: str
    model: torch.nn.Module
    kind: str
    adapter_disabled: bool = False

    def active(self):
        return self.model.disable_adapter() if self.adapter_disabled else contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def load_causal_lm(path: str, dtype: str | None = "auto", trust_remote_code: bool = False):
    """A causal LM from full weights, or a LoRA adapter over its recorded base (not merged)."""
    from transformers import (
        AutoModelForCausalLM,  # deferred: the auto classes are slow to import (--help)
    )

    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    try:
        if is_adapter(path):
            from peft import (
                PeftModel,  # deferred: peft is slow to import, only an adapter needs it
            )

            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter_base(path), **kwargs), path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the policy {path!r}: {error}") from error
    model.eval()
    model.requires_grad_(False)
    return model


def load_policy_tokenizer(path: str, trust_remote_code: bool = False):
    """The policy's tokenizer (left padding), from its folder or, for an adapter without one, its base."""
    try:
        return load_tokenizer(path, padding_side="left", trust_remote_code=trust_remote_code)
    except ModelLoadError:
        if not is_adapter(path):
            raise
        return load_tokenizer(adapter_base(path), padding_side="left", trust_remote_code=trust_remote_code)


def load_policies(sft_path: str, ppo_path: str, dtype: str | None = "auto", device=None,
                  trust_remote_code: bool = False) -> tuple[Policy, Policy]:
    """(SFT policy, PPO policy). A PPO adapter over the SFT weights is loaded once (SFT = adapter disabled)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ppo_model = load_causal_lm(ppo_path, dtype, trust_remote_code).to(device)
    ppo = Policy("PPO", ppo_path, ppo_model, model_kind(ppo_path))
    base = adapter_base(ppo_path) if ppo.kind == "LoRA adapter" else None
    if base is not None and model_kind(sft_path) == "full weights" and _same_path(base, sft_path):
        logger.info("the PPO adapter's base is the SFT model: one copy, SFT = adapter disabled")
        return Policy("SFT", sft_path, ppo_model, "full weights", adapter_disabled=True), ppo
    sft_model = load_causal_lm(sft_path, dtype, trust_remote_code).to(device)
    return Policy("SFT", sft_path, sft_model, model_kind(sft_path)), ppo


def set_torch_threads(num_threads: int | None, device: torch.device, parameters: int) -> None:
    """`num_threads` torch CPU threads; when not given, one for a small model on a CPU, else torch's choice."""
    if num_threads is None and device.type == "cpu" and parameters < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)
    elif num_threads:
        torch.set_num_threads(num_threads)
