"""LoRA folded into the weights while sampling, without touching the weights.

Sampling runs one forward per new token, and with LoRA every adapted projection is the base
matmul plus four more small operations (dropout, ``A``, ``B``, the scaled add), each a
kernel launch on a GPU and a dispatch on a CPU (``benchmarks/RESULTS.md``). While sampling
nothing trains, so each adapted
``nn.Linear`` can use ``W' = W + s B A`` instead (PEFT's own delta,
``get_delta_weight``): the same function, up to float rounding.

PEFT's ``merge_adapter()`` would add ``s B A`` into ``W`` in place and subtract it again
afterwards; ``(W + d) - d`` is not ``W`` in floating point, and the base is the frozen
reference policy, so it would drift a little at every step. Here ``W'`` is a new tensor
swapped in for the duration of the context (a temporary copy of each adapted weight) and
the original ``W`` is put back untouched. Layers on a quantized base (8-bit / 4-bit), with
a LoRA variant (DoRA, ...), a LoRA bias, or LoRA dropout active (sampling in train mode,
``rollout_in_eval_mode=False``) keep their adapter path.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _mergeable(layer) -> list[str]:
    """The adapters of a PEFT LoRA layer to fold in, or [] when it keeps its LoRA path."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(layer) is not LoraLinear or layer.disable_adapters or layer.merged:
        return []
    if type(layer.get_base_layer()) is not nn.Linear:
        return []
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if any(a in layer.lora_variant or layer.lora_bias.get(a, False) for a in adapters):
        return []
    # with its dropout active (train mode: rollout_in_eval_mode=False) the adapter path is not W + sBA
    if any(layer.lora_dropout[a].training and getattr(layer.lora_dropout[a], "p", 0.0) > 0 for a in adapters):
        return []
    return adapters


def merge_applies(model: nn.Module, wanted: bool, sharded: bool) -> bool:
    """Whether sampling may fold ``model``'s LoRA adapters in: asked for (``merge_lora_for_sampling``),
    a PEFT model, and its weights whole on each process (not ZeRO-3 shards)."""
    return bool(wanted and getattr(model, "is_peft_model", False) and not sharded)


@contextlib.contextmanager
def merged_lora(model: nn.Module, enabled: bool = True):
    """Within the context, each mergeable LoRA layer of ``model`` runs as one ``nn.Linear``
    with weight ``W + sum_a s_a B_a A_a`` (a new tensor); on exit the original weight and the
    adapter path are back. For no-grad passes only (sampling): nothing flows to ``A``/``B``."""
    done = []
    try:
        if enabled:
            with torch.no_grad():
                for layer in model.modules():
                    adapters = _mergeable(layer)
                    if not adapters:
                        continue
                    base = layer.get_base_layer()
                    weight = base._parameters["weight"]
                    merged = weight.detach().clone()
                    for adapter in adapters:
                        merged += layer.get_delta_weight(adapter).to(merged.dtype)
                    base._parameters["weight"] = nn.Parameter(merged, requires_grad=False)
                    layer.merged_adapters = list(adapters)  # PEFT's forward: base layer only
                    done.append((layer, base, weight))
        yield len(done)
    finally:
        for layer, base, weight in done:
            base._parameters["weight"] = weight
            layer.merged_adapters = []
