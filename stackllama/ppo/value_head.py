"""A causal LM with a scalar value head on the shared trunk.

One forward pass of the decoder gives the hidden states ``h``; the LM head turns ``h`` into
logits and the value head ``V(h) = w^T dropout(h) + b`` into values, *only at the positions
the caller asks for* (the response), so no logits are computed for the prompt. Models whose
logits are more than ``lm_head(h)`` (Gemma-2 soft-capping, Cohere's ``logit_scale``, ...:
:func:`logits_transform`) run their own forward instead, so that the policy's logits match
what the model, the reference and the reward pipeline compute.

With a LoRA (PEFT) model, the reference policy is the same module with its adapters
disabled (``with model.disable_adapter(): ...``): no second copy of the weights. The value
head is saved next to the adapter (``value_head.safetensors``) and restored by
``from_pretrained``; the old TRL trainer lost it on save with PEFT.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import InputError
from ..modeling import adapter_base, guard_cpu_4bit_packing
from ..processes import kbit_device_map
from ..run_layout import is_adapter
from .speedups.last_layer import last_layer_from

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_CONFIG = "value_head_config.json"

# Config fields of transformers models whose logits are more than ``lm_head(last hidden state)``:
# Gemma-2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling, MuseSpark's multiplier,
# a padded vocabulary cut back. Their identity values mean "not applied".
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "output_multiplier": 1.0,
    "unpadded_vocab_size": None,
}


def logits_transform(config) -> str | None:
    """The config field by which this model's logits differ from ``lm_head(hidden)``, or None.

    For such models the value-head forward runs the model's own forward (which applies it)
    instead of the LM head alone, and the trainer does not reuse log-probs from sampling.
    """
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for c in configs:
        for name, identity in _LOGIT_TRANSFORMS.items():
            value = getattr(c, name, None)
            if value is not None and value != identity:
                return name
    return None


def causal_lm_logits(
    lm: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    logits_start: int = 0,
    logits_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, hidden)`` of a ``*ForCausalLM`` at positions ``[logits_start, logits_start +
    logits_len)`` only: the decoder's last hidden states there and the LM head on them. The
    policy (through :class:`AutoModelForCausalLMWithValueHead`) and an explicit reference model
    both go through here, so that while their weights are equal they compute the same numbers.
    Models whose logits are more than ``lm_head(h)`` (:func:`logits_transform`) run their own
    forward, and the decoder's output is caught on the way."""
    decoder = lm.get_decoder()
    end = input_ids.shape[1] if logits_len is None else logits_start + logits_len
    if logits_transform(lm.config) is not None:
        caught = []
        handle = decoder.register_forward_hook(lambda module, args, output: caught.append(output[0]))
        try:
            with last_layer_from(decoder, logits_start):
                logits = lm(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=input_ids.shape[1] - logits_start,
                ).logits[:, : end - logits_start]
        finally:
            handle.remove()
        return logits, caught[0][:, logits_start:end]
    with last_layer_from(decoder, logits_start):  # positions before logits_start are not read
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
    # contiguous: the LM head is then one (n*len, H) x (H, V) matmul, not a slower batched one
    hidden = hidden[:, logits_start:end].contiguous()
    return lm.get_output_embeddings()(hidden), hidden


class ValueHead(nn.Module):
    """``V(h) = Linear(dropout(h))`` -> one scalar per position.

    ``init``: ``"default"`` (PyTorch's Linear init, as TRL 0.11), ``"zeros"`` (LMHP: the
    value starts at 0 so the first advantages are the rewards) or ``"normal"``
    (``N(0, std)`` weight, zero bias).
    """

    def __init__(self, hidden_size: int, dropout: float = 0.1, init: str = "default", init_std: float = 0.2):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)
        if init == "zeros":
            nn.init.zeros_(self.summary.weight)
            nn.init.zeros_(self.summary.bias)
        elif init == "normal":
            nn.init.normal_(self.summary.weight, std=init_std)
            nn.init.zeros_(self.summary.bias)
        elif init != "default":
            raise InputError(f"value head init must be default/zeros/normal, got {init!r}")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.summary.weight.dtype)
        return self.summary(self.dropout(hidden)).squeeze(-1)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


class AutoModelForCausalLMWithValueHead(nn.Module):
    """Wraps a ``*ForCausalLM`` (plain or PEFT) and adds a :class:`ValueHead`.

    ``forward(input_ids, attention_mask, position_ids, logits_start, logits_len)`` returns
    ``(logits, values)`` for positions ``[logits_start, logits_start + logits_len)`` only.
    """

    def __init__(
        self,
        pretrained_model: nn.Module,
        value_head_dropout: float = 0.1,
        value_head_init: str = "default",
        value_head_init_std: float = 0.2,
    ) -> None:
        super().__init__()
        self.pretrained_model = pretrained_model
        self.is_peft_model = _is_peft(pretrained_model)
        config = self.causal_lm.config
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or config.word_embed_proj_dim
        self.value_head_kwargs = {
            "dropout": float(value_head_dropout),
            "init": value_head_init,
            "init_std": float(value_head_init_std),
        }
        self.v_head = ValueHead(hidden, dropout=value_head_dropout, init=value_head_init, init_std=value_head_init_std)
        self.v_head.to(next(self.causal_lm.get_output_embeddings().parameters()).device)

    # ------------------------------------------------------------------ structure
    @property
    def causal_lm(self) -> nn.Module:
        """The underlying ``*ForCausalLM`` (with LoRA layers injected when PEFT)."""
        return self.pretrained_model.get_base_model() if self.is_peft_model else self.pretrained_model

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def generation_config(self):
        return self.causal_lm.generation_config

    @property
    def is_quantized(self) -> bool:
        return bool(getattr(self.causal_lm, "is_loaded_in_8bit", False) or getattr(self.causal_lm, "is_loaded_in_4bit", False))

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.causal_lm, "is_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.causal_lm.gradient_checkpointing_disable()

    def disable_adapter(self):
        """Context in which the model is the reference policy (LoRA adapters off)."""
        if not self.is_peft_model:
            raise InputError("disable_adapter() needs a PEFT model; pass an explicit ref_model instead.")
        return self.pretrained_model.disable_adapter()

    # ------------------------------------------------------------------ compute
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_start: int = 0,
        logits_len: int | None = None,
        return_values: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, hidden = causal_lm_logits(self.causal_lm, input_ids, attention_mask, position_ids, logits_start, logits_len)
        values = self.v_head(hidden) if return_values else None
        return logits, values

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        return self.pretrained_model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str, state_dict: dict | None = None, **kwargs: Any) -> None:
        """Saves the adapter (PEFT) or the full model, plus the value head and its config.

        ``state_dict``: this wrapper's full state dict when the parameters themselves are not
        whole here (DeepSpeed ZeRO-3 gathers it with ``accelerator.get_state_dict``)."""
        os.makedirs(save_directory, exist_ok=True)
        head = self.v_head.state_dict()
        if state_dict is not None:
            inner = {k[len("pretrained_model."):]: v for k, v in state_dict.items() if k.startswith("pretrained_model.")}
            head = {k[len("v_head."):]: v for k, v in state_dict.items() if k.startswith("v_head.")}
            kwargs["state_dict"] = inner
        self.pretrained_model.save_pretrained(save_directory, **kwargs)
        state = {k: v.detach().cpu().contiguous() for k, v in head.items()}
        save_file(state, os.path.join(save_directory, VALUE_HEAD_FILE))
        with open(os.path.join(save_directory, VALUE_HEAD_CONFIG), "w") as f:
            json.dump(self.value_head_kwargs, f)

    @classmethod
    def from_pretrained(
        cls,
        path_or_model: str | nn.Module,
        base_model: str | nn.Module | None = None,
        peft_config=None,
        quantization_config=None,
        is_trainable: bool = True,
        value_head_dropout: float | None = None,
        value_head_init: str = "default",
        **model_kwargs: Any,
    ) -> "AutoModelForCausalLMWithValueHead":
        """Builds the model from a folder (full model or LoRA adapter + value head) or wraps
        a model object.

        - A folder with ``adapter_config.json`` is a saved policy: the base comes from
          ``base_model`` (path or model) or the adapter's ``base_model_name_or_path``.
        - ``peft_config`` adds fresh LoRA adapters; with a 4/8-bit ``quantization_config``
          the base is prepared with ``prepare_model_for_kbit_training`` first.
        - ``value_head.safetensors``, when present, restores the value head.
        """

        def load_base(name_or_model):
            if isinstance(name_or_model, nn.Module):
                return name_or_model
            kwargs = dict(model_kwargs)
            if quantization_config is not None:
                kwargs["quantization_config"] = quantization_config
                # this process's own device: eight ranks asking for "cuda" would all load onto GPU 0
                kwargs.setdefault("device_map", kbit_device_map())
            # deferred: importing the auto classes is slow, and --help needs none of them
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(name_or_model, **kwargs)
            if quantization_config is not None:
                guard_cpu_4bit_packing(model)  # bitsandbytes' CPU 4-bit kernel asserts on some shapes
            return model

        directory = path_or_model if isinstance(path_or_model, str) else None
        if directory is not None and is_adapter(directory):
            from peft import PeftModel  # deferred: only an adapter needs peft

            if base_model is None:
                base_model = adapter_base(directory)
            base = load_base(base_model)
            if quantization_config is not None and is_trainable:
                base = _prepare_kbit(base)
            model = PeftModel.from_pretrained(base, directory, is_trainable=is_trainable)
        else:
            model = load_base(path_or_model)
            if peft_config is not None:
                from peft import get_peft_model

                if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
                    model = _prepare_kbit(model)
                model = get_peft_model(model, peft_config)

        head_kwargs = {"dropout": 0.1, "init": value_head_init, "init_std": 0.2}
        head_file = os.path.join(directory, VALUE_HEAD_FILE) if directory else None
        if directory and os.path.isfile(os.path.join(directory, VALUE_HEAD_CONFIG)):
            with open(os.path.join(directory, VALUE_HEAD_CONFIG)) as f:
                head_kwargs.update(json.load(f))
        if value_head_dropout is not None:
            head_kwargs["dropout"] = value_head_dropout
        wrapped = cls(
            model,
            value_head_dropout=head_kwargs["dropout"],
            value_head_init=head_kwargs["init"],
            value_head_init_std=head_kwargs["init_std"],
        )
        if head_file and os.path.isfile(head_file):
            from safetensors.torch import load_file

            wrapped.v_head.load_state_dict(load_file(head_file))
        return wrapped


def _prepare_kbit(model: nn.Module) -> nn.Module:
    from peft import prepare_model_for_kbit_training

    # Gradient checkpointing is left to the caller: on the recipe's short sequences the
    # recomputation costs more than the memory it saves.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


@contextlib.contextmanager
def dropout_off(module: nn.Module, enabled: bool = True):
    """Temporarily switches dropout off in ``module``: every submodule in eval mode (as TRL
    0.11's forward passes ran), except layers with gradient checkpointing on, which keep
    their ``training`` flag because transformers checkpoints only layers in training mode
    (their own submodules still run in eval mode, so no dropout). Each submodule's flag is
    restored afterwards. Wrap the backward too when checkpointing: it reruns the layers."""
    if not enabled:
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    for m, flag in flags:
        if flag and getattr(m, "gradient_checkpointing", False) is True:
            m.training = True
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
