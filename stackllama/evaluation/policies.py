"""The policies compared or asked: loaded from full weights or a LoRA adapter (not merged), adapters
over the same base sharing one copy of it, the base's own policy being the adapters disabled (as in
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
    adapter_name: str | None = None  # which of the adapters loaded into `model` (load_policies)

    def active(self):
        if self.adapter_disabled:
            return self.model.disable_adapter()
        if self.adapter_name is not None and self.model.active_adapter != self.adapter_name:
            self.model.set_adapter(self.adapter_name)
        return contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass(frozen=True)
class PolicySpec:
    """A policy to load: its display name and the folder (or Hub id) of its weights or LoRA adapter."""

    name: str
    path: str


def _weights_key(path: str) -> str:
    """One key per set of weights: a folder's real path, a Hub id as written."""
    p = Path(path)
    return str(p.resolve()) if p.exists() else path.rstrip("/")


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


def load_policies(specs: list[PolicySpec], dtype: str | None = "auto", device=None,
                  trust_remote_code: bool = False) -> list[Policy]:
    """One `Policy` per spec, in order, with base weights loaded once: a LoRA adapter whose recorded
    base is another spec's full weights, or the base of an adapter already loaded, joins that model
    as a named PEFT adapter, and the full-weight policy becomes that model with its adapters disabled
    (as in PPO training, where the reference is the policy without its adapter). A 7B SFT model and
    its PPO adapter cost one 7B model, not two."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models: dict[str, torch.nn.Module] = {}  # base weights -> the model holding them (a PeftModel once adapted)
    policies: list[Policy | None] = [None] * len(specs)
    for index in sorted(range(len(specs)), key=lambda i: is_adapter(specs[i].path)):  # the bases first
        spec = specs[index]
        kind = model_kind(spec.path)
        if kind != "LoRA adapter":
            model = models[_weights_key(spec.path)] = load_causal_lm(spec.path, dtype, trust_remote_code).to(device)
            policies[index] = Policy(spec.name, spec.path, model, kind)
            continue
        from peft import PeftModel  # deferred: peft is slow to import, only adapters need it

        base_key = _weights_key(adapter_base(spec.path))
        shared = models.get(base_key)
        adapter = "default" if shared is None else spec.name.lower()
        if shared is None:
            model = load_causal_lm(spec.path, dtype, trust_remote_code).to(device)  # base + this adapter
        elif isinstance(shared, PeftModel):
            shared.load_adapter(spec.path, adapter_name=adapter)
            model = shared
        else:
            model = PeftModel.from_pretrained(shared, spec.path, adapter_name=adapter)
            model.eval()
            for policy in policies:  # the full-weight policy is now this model with its adapters disabled
                if policy is not None and policy.model is shared:
                    policy.model, policy.adapter_disabled = model, True
        model.requires_grad_(False)
        models[base_key] = model
        logger.info("%s: LoRA adapter %s%s", spec.name, spec.path, "" if shared is None else
                    f" over {adapter_base(spec.path)}, already loaded (one copy of the base)")
        policies[index] = Policy(spec.name, spec.path, model, kind, adapter_name=adapter)
    return policies


def set_torch_threads(num_threads: int | None, device: torch.device, parameters: int) -> None:
    """`num_threads` torch CPU threads; when not given, one for a small model on a CPU, else torch's choice."""
    if num_threads is None and device.type == "cpu" and parameters < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)
    elif num_threads:
        torch.set_num_threads(num_threads)
