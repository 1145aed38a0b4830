"""The last decoder layer's MLP, run only at the positions whose outputs are read.

A decoder layer's attention mixes positions; its MLP does not. In the last layer, a
position's MLP output reaches nothing but that position's final hidden state, so where only
positions ``>= start`` are read (the PPO passes read logits and values for the response,
sampling's prefill reads the last prompt position) the MLP of the earlier positions is
work thrown away: with the benchmark's 64-token prompts and 32-token responses, two thirds
of the last layer's MLP, in the forward and the backward. Attention keeps every position:
the response attends to the prompt's keys and values.

:func:`last_layer_from` makes the last layer's ``mlp`` see only ``hidden[:, start:]`` and
pads its output back to full length with zeros, so the layer's residual addition and
everything after it run unchanged; the final hidden states at positions ``>= start`` are
those of the full computation (the same arithmetic on fewer rows), the ones before it are
not (they are the residual stream without the last MLP), and the caller must not read them.

Only for decoders whose layers are the usual transformer block: a ``layers`` (or ``h``)
list whose last entry has an ``mlp`` and an attention module (LLaMA, Mistral, Qwen, Gemma,
Mixtral, GPT-2, ...). Anything else runs as it is, and so does a decoder with gradient
checkpointing on (its backward re-runs the layer after the context has ended, and would
meet different shapes).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


def last_mlp(decoder: Optional[nn.Module]) -> Optional[nn.Module]:
    """The last layer's MLP of a transformer decoder (``decoder.layers[-1].mlp``, or
    ``decoder.h[-1].mlp``), or None when the decoder is not laid out that way (or None)."""
    layers = getattr(decoder, "layers", None)
    if layers is None:
        layers = getattr(decoder, "h", None)  # GPT-2, Falcon, BLOOM
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) == 0:
        return None
    layer = layers[-1]
    if getattr(layer, "gradient_checkpointing", False) or getattr(decoder, "gradient_checkpointing", False):
        return None
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module) or not any(isinstance(getattr(layer, n, None), nn.Module) for n in _ATTENTION_NAMES):
        return None
    return mlp


@contextlib.contextmanager
def last_layer_from(decoder: Optional[nn.Module], start: int):
    """Within the context, forward passes of ``decoder`` run the last layer's MLP only at
    positions ``>= start`` (dim 1 of its input); the final hidden states before ``start``
    are then not the model's and must not be read. A no-op for ``start <= 0`` or a decoder
    without a recognisable last MLP."""
    mlp = last_mlp(decoder) if start > 0 else None
    if mlp is None:
        yield
        return

    def take(module, args, kwargs):
        if args:
            return (args[0][:, start:].contiguous(), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: kwargs[key][:, start:].contiguous()}

    def pad(module, args, kwargs, output):
        def pad_one(x):  # (n, T - start, H) -> (n, T, H), zeros first
            return F.pad(x, (0, 0, start, 0))

        if isinstance(output, torch.Tensor):
            return pad_one(output)
        return (pad_one(output[0]), *output[1:])  # (hidden, router logits) of some MoE blocks

    handles = [
        mlp.register_forward_pre_hook(take, with_kwargs=True),
        mlp.register_forward_hook(pad, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
