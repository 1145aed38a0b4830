"""The sampling loop's decode step replayed as one captured CUDA graph.

Why: at the recipe's batch of 8 a LLaMA-7B decode step is a few hundred small kernels, and the
host cannot launch them as fast as the GPU runs them: 25 ms per token where reading the weights
once (the floor) takes about 4 ms on an H100, with the GPU busy 11-21 % of a PPO step
(``benchmarks/RESULTS.md``, 2026-11-23). A CUDA graph records the step's kernels once and
replays them with one launch per token, the remedy verl, OpenRLHF and vLLM use.

What is captured: one step of :func:`.sampling_loop.sample_loop`, with every input and output
in a device tensor at a fixed address, updated in place, so that each replay is the next step:

- the KV cache is transformers' ``StaticLayer`` (the static cache of ``torch.compile``'s
  decoding), sized prompt + ``max_new_tokens`` of the batch; its write position is a device
  tensor, and attention reads the whole cache under a causal mask instead of a growing slice;
- the step: ``position += 1``; one decoder forward of the last token; the next token and its
  log-prob by :func:`.sampling_loop.next_token` (the eager loop's formula, nothing copied); the
  token, log-prob and hidden state written at column ``step``; ``step += 1``.

The prefill (prompt lengths vary by batch) draws token 0 eagerly; tokens 1 and 2 come from eager
warm-up steps on the capture's side stream; the step is then captured once per batch and every
later token is one replay. The host reads ``finished.all()`` after each step and stops as the
eager loop does. The random numbers come from the default CUDA generator, which CUDA
graphs advance at each replay: the same distribution as the eager loop, not the same tokens for
a seed (the log-probs it reports are those of the tokens drawn; ``tests/test_ppo_cuda_graph_decode.py``
checks them against a recomputation).

When (:func:`capture_blocker`): a CUDA device, the eager loop's own conditions
(:func:`.sampling_loop.unsupported_reason`), transformers' ``sdpa`` or ``eager`` attention, no
8-bit base, weights whole on the process (not ZeRO-3 shards). A 4-bit base and unmerged LoRA
adapters are tried; if capture fails the batch goes on eagerly, the reason is logged, and later
batches use the eager loop, except after running out of memory, which costs that batch only
(:class:`CudaGraphs`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from .. import core
from .last_layer import last_layer_from
from .sampling_loop import cache_kwargs, next_token

logger = logging.getLogger(__name__)

WARMUP_STEPS = 2
"""Eager steps before the capture (on a side stream, as PyTorch's capture guide asks)."""

_ATTENTION = ("sdpa", "eager")


def capture_blocker(causal_lm, device: torch.device, sharded: bool) -> Optional[str]:
    """None when sampling on ``device`` may replay its decode step as a CUDA graph, else why not
    (per run; whether a given ``generate`` call samples with the loop at all is
    :func:`.sampling_loop.unsupported_reason`'s)."""
    if torch.device(device).type != "cuda":
        return f"not on a CUDA device ({torch.device(device).type})"
    if sharded:
        return "ZeRO-3 shards (each forward gathers the weights)"
    if getattr(causal_lm, "is_loaded_in_8bit", False) or any(type(m).__name__ == "Linear8bitLt" for m in causal_lm.modules()):
        return "an 8-bit base (LLM.int8 finds its outlier columns on the host at every matmul)"
    attention = getattr(causal_lm.config, "_attn_implementation", None)
    if attention not in _ATTENTION:
        return f"attention implementation {attention!r} (the static KV cache needs sdpa or eager)"
    return None


class CudaGraphs:
    """Captures decode steps as CUDA graphs for one run; after a capture fails, says so once and
    declines from then on (``failed``: why)."""

    def __init__(self) -> None:
        self.failed: Optional[str] = None
        self._stream = None

    @property
    def path(self) -> str:
        return "CUDA graph" if self.failed is None else f"eager (CUDA graph capture failed: {self.failed})"

    def pool(self):
        """A memory pool for one batch's graph (freed with it)."""
        return torch.cuda.graph_pool_handle()

    def warmup(self, step: Callable[[], None]) -> None:
        """Runs ``step`` eagerly on the side stream the capture will use (a real step of the loop)."""
        self._stream = self._stream or torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            step()
        torch.cuda.current_stream().wait_stream(self._stream)

    def capture(self, step: Callable[[], None], pool) -> Optional[Callable[[], None]]:
        """The replay of ``step`` (recording runs nothing), or None when it cannot be captured:
        then the reason is logged once and every later call declines."""
        if self.failed is not None:
            return None
        try:
            return self._record(step, pool)
        except torch.OutOfMemoryError:  # this batch's size, not the model: later (smaller) batches may capture
            logger.warning("sampling: out of memory capturing the decode step as a CUDA graph; this batch decodes eagerly")
            return None
        except Exception as exc:  # noqa: BLE001 - any op that cannot be captured: fall back, say why
            message = str(exc).splitlines()[0] if str(exc) else ""
            self.failed = f"{type(exc).__name__}: {message}"[:300]
            logger.warning("sampling: the decode step could not be captured as a CUDA graph (%s); decoding eagerly "
                           "from now on", self.failed)
            return None

    def _record(self, step: Callable[[], None], pool) -> Callable[[], None]:
        """``capture_begin``/``capture_end`` on the warm-up's stream rather than ``torch.cuda.graph``,
        which synchronizes and empties the allocator's cache at every capture: once per rollout
        batch here, after which the update passes would ``cudaMalloc`` that memory again."""
        graph = torch.cuda.CUDAGraph()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream), _autocast_cache_off():
            graph.capture_begin(pool=pool)
            try:
                step()
            except BaseException:
                with contextlib.suppress(Exception):  # the step's error is the one to report, not the aborted capture's
                    graph.capture_end()
                raise
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(self._stream)
        return graph.replay


@contextlib.contextmanager
def _autocast_cache_off():
    """Autocast's cache of cast weights off while capturing: a cast cached before the capture
    would be read by every replay from memory the graph does not own (PyTorch's CUDA graphs
    guide: ``cache_enabled=False``)."""
    was = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(was)


class _StaticLayer(StaticLayer):
    """transformers' ``StaticLayer``, storing keys/values in ``dtype`` when given (the fp32 cache
    of bf16 autocast on CPU, :mod:`.mixed_precision`)."""

    def __init__(self, max_cache_len: int, dtype: Optional[torch.dtype]) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.cache_dtype = dtype

    def update(self, key_states, value_states, *args, **kwargs):
        if self.cache_dtype is not None:
            key_states, value_states = key_states.to(self.cache_dtype), value_states.to(self.cache_dtype)
        return super().update(key_states, value_states, *args, **kwargs)


def static_kv_cache(model_config, capacity: int, dtype: Optional[torch.dtype] = None) -> StaticCache:
    """A static KV cache of ``capacity`` positions for every layer of ``model_config``'s decoder."""
    cache = StaticCache(config=model_config, max_cache_len=capacity)
    cache.layers = [_StaticLayer(capacity, dtype) for _ in cache.layers]
    return cache


class StaticDecode:
    """The state of one batch's decoding in fixed device tensors, and its step.

    ``prefill()`` runs the prompt and draws token 0; each ``step()`` draws the next token, reading
    and writing only tensors allocated here (the graph's inputs and outputs)."""

    def __init__(self, causal_lm, input_ids, attention_mask, max_new_tokens: int, temperature: float,
                 eos_token_ids, pad_token_id: int, logprob_temperature: Optional[float], cache_dtype) -> None:
        self.decoder = causal_lm.get_decoder()
        self.lm_head = causal_lm.get_output_embeddings()
        self.temperature, self.pad_token_id, self.logprob_temperature = temperature, pad_token_id, logprob_temperature
        self.input_ids, self.prompt_mask = input_ids, attention_mask
        B, Q = input_ids.shape
        device = input_ids.device
        self.eos = torch.as_tensor(list(eos_token_ids), device=device, dtype=torch.long)
        # the whole cache is attended to, under the causal mask: slots not yet written are masked by it
        self.mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], dim=1).bool()
        self.positions = core.position_ids_from_attention_mask(attention_mask)
        self.position = self.positions[:, -1:].clone()
        self.cache = static_kv_cache(causal_lm.config, Q + max_new_tokens, cache_dtype)
        self.cached = cache_kwargs(self.decoder, self.cache)
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.logprobs = self.hiddens = None

    def prefill(self) -> None:
        with last_layer_from(self.decoder, self.input_ids.shape[1] - 1):  # the prefill reads the last position only
            hidden = self.decoder(input_ids=self.input_ids, attention_mask=self.prompt_mask, position_ids=self.positions,
                                  use_cache=True, **self.cached).last_hidden_state[:, -1]
        if self.logprob_temperature is not None:
            B, N = self.tokens.shape
            self.logprobs = torch.zeros(B, N, dtype=torch.float32, device=hidden.device)
            self.hiddens = torch.zeros(B, N, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        self._draw(hidden)

    def step(self) -> None:
        """One decode step; what a CUDA graph replays."""
        self.position.add_(1)
        hidden = self.decoder(input_ids=self.token, attention_mask=self.mask, position_ids=self.position,
                              use_cache=True, **self.cached).last_hidden_state[:, -1]
        self._draw(hidden)

    def _draw(self, hidden: torch.Tensor) -> None:
        token, logprob, finished = next_token(self.lm_head, hidden, self.finished, self.temperature, self.eos,
                                              self.pad_token_id, self.logprob_temperature)
        self.token.copy_(token[:, None])
        self.finished.copy_(finished)
        self.tokens.index_copy_(1, self.column, token[:, None])
        if self.logprobs is not None:
            self.logprobs.index_copy_(1, self.column, logprob[:, None])
            self.hiddens.index_copy_(1, self.column, hidden[:, None].to(self.hiddens.dtype))
        self.column.add_(1)

    def outputs(self, n: int):
        """``(tokens, logprobs, hidden)`` of the first ``n`` steps, as :func:`.sampling_loop.sample_loop` returns."""
        if self.logprobs is None:
            return self.tokens[:, :n], None, None
        return self.tokens[:, :n], self.logprobs[:, :n], self.hiddens[:, :n]


def sample_loop(causal_lm, input_ids, attention_mask, max_new_tokens: int, temperature: float, eos_token_ids,
                pad_token_id: int, logprob_temperature: Optional[float] = None, cache_dtype=None,
                graphs: Optional[CudaGraphs] = None):
    """:func:`.sampling_loop.sample_loop`'s contract, decoding with a static KV cache; with
    ``graphs`` the steps after the warm-up replay one captured CUDA graph (None: every step
    eagerly, which is how the CPU tests check this loop)."""
    decode = StaticDecode(causal_lm, input_ids, attention_mask, max_new_tokens, temperature, eos_token_ids,
                          pad_token_id, logprob_temperature, cache_dtype)
    decode.prefill()
    n, replay = 1, None  # n: tokens drawn so far
    while n < max_new_tokens and not bool(decode.finished.all()):
        if replay is not None:
            replay()
        elif graphs is not None and n <= WARMUP_STEPS:
            graphs.warmup(decode.step)
            if n == WARMUP_STEPS and n + 1 < max_new_tokens:  # steps left to replay
                replay = graphs.capture(decode.step, graphs.pool())
        else:
            decode.step()
        n += 1
    return decode.outputs(n)


def sample(*args, **kwargs):
    """:func:`sample_loop` under ``torch.inference_mode``, returning normal tensors (as
    :func:`.sampling_loop.sample`)."""
    with torch.inference_mode():
        out = sample_loop(*args, **kwargs)
    return tuple(None if t is None else t.clone() for t in out)
