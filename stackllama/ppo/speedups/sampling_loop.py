"""Ancestral sampling for rollouts: the decode loop, written out.

Why not ``generate``: for the sampling PPO needs (``do_sample``, ``top_k=0``, ``top_p=1``, a
temperature: the recipe's settings) ``generate`` adds logits processors, stopping criteria
and a ``multinomial`` draw over the whole vocabulary at every token, a large share of the
generation time of a small model (``benchmarks/RESULTS.md``).
This loop does only that sampling: one forward of the decoder per new token with a KV
cache allocated once for prompt + ``max_new_tokens``, the LM head on the last position
only, the next token drawn by inverse CDF from ``softmax(logits / T)``, rows that emitted
EOS padded, the loop ended when all rows have.
It also returns, per sampled token, ``log pi(token)`` and the last hidden state, so the
rollout needs no second policy pass for ``log pi_old`` / ``V_old``. On a CUDA device the same
loop runs with a static KV cache and its step replayed as a captured CUDA graph
(:mod:`.cuda_graph_decode`); both draw each token with :func:`next_token`.

Any other setting (top-k / top-p, penalties, ``min_new_tokens``, beams, streamers,
``synced_gpus`` for ZeRO-3 on the shards, sliding-window or recurrent caches, logit
soft-capping) is left to ``generate``: :func:`unsupported_reason` names why.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .. import core
from ..guards import effective_generation_param
from ..value_head import logits_transform
from .last_layer import last_layer_from

# Generation-config fields this loop implements; any other non-default field goes to generate.
_HANDLED = {
    "do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "max_length", "use_cache",
    "pad_token_id", "bos_token_id", "eos_token_id", "output_attentions", "output_hidden_states",
    "return_dict_in_generate", "_from_model_config", "transformers_version",
}


def unsupported_reason(causal_lm, generation_kwargs: dict) -> Optional[str]:
    """None when :func:`sample` draws exactly what ``generate(**generation_kwargs)`` would
    (pure sampling), else why not."""
    config = causal_lm.generation_config.__class__.from_dict(causal_lm.generation_config.to_dict())
    unused = config.update(**generation_kwargs)
    if unused:
        return f"generate arguments {sorted(unused)}"
    extra = set(config.to_diff_dict()) - _HANDLED
    if extra:
        return f"generation settings {sorted(extra)}"

    def effective(name, fallback):  # the merged config's value, else transformers' default
        return effective_generation_param(name, {}, config, fallback)

    if not effective("do_sample", False):
        return "do_sample is off"
    if effective("top_k", 0) not in (0, None):
        return f"top_k={effective('top_k', 0)}"
    if effective("top_p", 1.0) != 1.0:
        return f"top_p={effective('top_p', 1.0)}"
    if not effective("temperature", 1.0) > 0:  # generate says what is wrong with it
        return f"temperature={effective('temperature', 1.0)}"
    if config.max_new_tokens is None:
        return "no max_new_tokens"
    if config.output_attentions or config.output_hidden_states or config.return_dict_in_generate:
        return "generate outputs requested"
    if not (getattr(config, "use_cache", True) in (True, None)):
        return "use_cache=False"
    model_config = causal_lm.config
    transform = logits_transform(model_config)
    if transform is not None:
        return f"the model's {transform} (applied outside the LM head)"
    if getattr(model_config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    try:
        layers = DynamicCache(config=model_config).layers
    except Exception as exc:  # noqa: BLE001 - any model whose cache we cannot build
        return f"its KV cache ({exc})"
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return "a sliding-window or recurrent KV cache"
    return None


class PreallocatedLayer(DynamicLayer):
    """transformers' ``DynamicLayer``, but new keys/values are written into buffers sized
    for prompt + ``max_new_tokens`` instead of concatenated (a copy of the whole cache per
    token and layer); attention gets views of the filled part."""

    def __init__(self, capacity: int, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.capacity, self.length, self.cache_dtype = capacity, 0, dtype

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        dtype = self.cache_dtype or key_states.dtype
        self._keys = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[-1], dtype=dtype)
        self._values = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[-1], dtype=dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values


def _kv_cache(model_config, capacity: int, dtype: Optional[torch.dtype] = None) -> DynamicCache:
    cache = DynamicCache(config=model_config)
    cache.layers = [PreallocatedLayer(capacity, dtype) for _ in cache.layers]
    return cache


def cache_kwargs(decoder, cache) -> dict:
    """``{name: cache}`` under the name ``decoder.forward`` takes: ``cache`` where transformers has
    renamed ``past_key_values`` (LLaMA since 5.x, which warns about the old name), else the old one."""
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    return {name: cache}


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (B, V), by inverse CDF: the first index whose
    cumulative probability reaches ``u * total``, ``u`` uniform in (0, 1]. The same
    distribution as ``torch.multinomial(probs, 1)``, with one random number per row instead
    of one per vocabulary entry; zero-probability tokens are never drawn."""
    cdf = probs.cumsum(-1)
    u = 1.0 - torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype)  # (0, 1]
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=probs.shape[-1] - 1)[:, 0]


def next_token(lm_head, hidden: torch.Tensor, finished: torch.Tensor, temperature: float, eos: torch.Tensor,
               pad_token_id: int, logprob_temperature: Optional[float] = None):
    """One token per row from the last hidden states ``hidden`` (B, H): drawn from
    ``softmax(lm_head(hidden) / T)``, ``pad_token_id`` for rows already ``finished``.
    Returns ``(token, log pi(token) at logprob_temperature or None, finished after it)``.
    The one formula of both decode loops (this one and :mod:`.cuda_graph_decode`'s captured
    step), so it uses no operation that waits for the device (a CUDA graph cannot hold one)."""
    logits = lm_head(hidden)
    log_p = core.log_softmax(logits, temperature)
    token = draw(log_p.exp())
    token = torch.where(finished, torch.full_like(token, pad_token_id), token)
    logprob = None
    if logprob_temperature is not None:
        lp_all = log_p if logprob_temperature == temperature else core.log_softmax(logits, logprob_temperature)
        logprob = lp_all.gather(-1, token[:, None])[:, 0]
    return token, logprob, finished | (token[:, None] == eos).any(-1)


def sample(*args, **kwargs):
    """:func:`sample_loop` under ``torch.inference_mode`` (no autograd bookkeeping on any
    tensor, which matters most under bf16 autocast, where each token's ops are small),
    returning normal tensors, which later autograd passes may use."""
    with torch.inference_mode():
        out = sample_loop(*args, **kwargs)
    return tuple(None if t is None else t.clone() for t in out)


def sample_loop(
    causal_lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_token_ids,
    pad_token_id: int,
    logprob_temperature: Optional[float] = None,
    cache_dtype: Optional[torch.dtype] = None,
):
    """Samples up to ``max_new_tokens`` after left-padded prompts ``(B, Q)``.

    Returns ``(tokens, logprobs, hidden)``: ``tokens`` (B, n) with ``pad_token_id`` after a
    row's EOS, ``n <= max_new_tokens`` (the loop stops once every row has ended); when
    ``logprob_temperature`` is given, ``logprobs`` (B, n) = ``log softmax(logits / T_lp)`` at
    each sampled token and ``hidden`` (B, n, H) the last hidden states that produced them,
    else both None. Positions follow the attention mask (``cumsum - 1``), as in ``generate``.
    ``cache_dtype``: keys/values are stored in this dtype (default: as computed).
    """
    decoder = causal_lm.get_decoder()
    lm_head = causal_lm.get_output_embeddings()
    B, Q = input_ids.shape
    device = input_ids.device
    eos = torch.as_tensor(list(eos_token_ids), device=device, dtype=torch.long)
    mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], dim=1)
    positions = core.position_ids_from_attention_mask(attention_mask)
    cache = _kv_cache(causal_lm.config, Q + max_new_tokens, cache_dtype)
    capture = logprob_temperature is not None
    cached = cache_kwargs(decoder, cache)

    with last_layer_from(decoder, Q - 1):  # the prefill reads the last position only
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         use_cache=True, **cached).last_hidden_state[:, -1]
    position = positions[:, -1:]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logprobs, hiddens = [], [], []
    for t in range(max_new_tokens):
        token, logprob, finished = next_token(lm_head, hidden, finished, temperature, eos, pad_token_id,
                                              logprob_temperature)
        tokens.append(token)
        if capture:
            logprobs.append(logprob)
            hiddens.append(hidden)
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        position = position + 1
        hidden = decoder(input_ids=token[:, None], attention_mask=mask[:, : Q + t + 1], position_ids=position,
                         use_cache=True, **cached).last_hidden_state[:, -1]
    tokens = torch.stack(tokens, dim=1)
    if not capture:
        return tokens, None, None
    return tokens, torch.stack(logprobs, dim=1), torch.stack(hiddens, dim=1)
