"""Sampling the responses of a rollout, and what the sampling passes already computed of them.

:class:`Sampler` samples in batches of left-padded prompts with the KV cache: with the PPO
sampling loop for pure sampling (:mod:`.speedups.sampling_loop`; on a GPU its decode steps
replayed as a CUDA graph, :mod:`.speedups.cuda_graph_decode`), else with transformers'
``generate``. Each response is cut after its first stop (:class:`.rollout_batch.StopTokens`).

The sampling passes run the policy on every sampled token; where the speed-up plan allows
(:mod:`.speedups.logprob_reuse`), ``log pi_old`` and ``V_old`` of each token are read off them
and returned with the responses (:class:`Responses`), for ``step`` to use instead of a
rollout pass. Nothing is kept in the trainer: what ``step`` may reuse is what it is given.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import torch

from . import core
from .guards import flatten_stop_ids
from .rollout_batch import StopTokens, left_pad
from .speedups import cuda_graph_decode, sampling_loop
from .speedups.merged_lora import merged_lora
from .speedups.plan import Speedups
from .value_head import dropout_off


class Responses(list):
    """The sampled responses (a list of 1-D token tensors, as TRL's ``generate`` returned), with
    ``old``: per response ``(log pi_old, V_old)`` of its tokens from the sampling passes, or None
    when they were not captured (a rollout pass then computes them); ``policy_step``: the step
    whose weights sampled them (``old`` holds for those weights only)."""

    def __init__(self, responses: Sequence[torch.Tensor], old: Optional[list] = None, policy_step: int = 0) -> None:
        super().__init__(responses)
        self.old, self.policy_step = old, policy_step

    def old_for(self, step: int) -> Optional[list]:
        """``old`` if the policy is still the one that sampled (no update since), else None."""
        return self.old if step == self.policy_step else None


class Sampler:
    """Samples for the trainer: ``sample(model, queries, ...)`` -> (responses, old or None)."""

    def __init__(self, config, backend, speedups: Speedups, stops: StopTokens, pad_token_id: int, device) -> None:
        self.config, self.backend, self.speedups, self.stops = config, backend, speedups, stops
        self.pad_token_id, self.device = pad_token_id, device

    @torch.no_grad()
    def sample(self, model, queries: Sequence[torch.Tensor], generation_kwargs: dict,
               length_sampler: Optional[Callable[[], int]], batch_size: int, temperature: float,
               logprob_temperature: float) -> tuple[list, Optional[list]]:
        """Responses to ``queries`` and, when the plan reuses them, their ``(log pi_old, V_old)``.
        Dropout is off while sampling when ``rollout_in_eval_mode``; sampling runs in the run's
        precision regime, as every pass of ``step``."""
        capture = self.speedups.reuse_logprobs
        # the backend's settings first: the sampling loop is chosen on the settings generate gets
        generation_kwargs = self.backend.generation_settings(generation_kwargs)
        own_loop = self.speedups.use_sampling_loop(model.causal_lm, generation_kwargs, length_sampler is not None)
        # as generate: an explicit eos_token_id=None in the call means no EOS stop
        eos_ids = flatten_stop_ids(generation_kwargs["eos_token_id"] if "eos_token_id" in generation_kwargs
                                   else model.generation_config.eos_token_id)
        responses, old = [], [] if capture else None
        with (self.backend.generation_model(model) as model,
              dropout_off(model, enabled=self.config.rollout_in_eval_mode),
              merged_lora(model, enabled=self.speedups.merge_lora_for_sampling)):
            for start in range(0, len(queries), batch_size):
                chunk = [q.to(self.device) for q in queries[start : start + batch_size]]
                kwargs = dict(generation_kwargs)
                if length_sampler is not None:
                    kwargs["max_new_tokens"] = length_sampler()
                input_ids, attention_mask = left_pad(chunk, self.pad_token_id)
                if own_loop:
                    graphs = self.speedups.graphs_for_loop()
                    loop = sampling_loop.sample if graphs is None else partial(cuda_graph_decode.sample, graphs=graphs)
                    with self.speedups.precision():
                        new_tokens, logprobs, hidden = loop(
                            model.causal_lm, input_ids, attention_mask, kwargs["max_new_tokens"], temperature,
                            eos_ids, kwargs["pad_token_id"], logprob_temperature=logprob_temperature if capture else None,
                            cache_dtype=self.speedups.precision.kv_cache_dtype)
                else:
                    new_tokens, logprobs, hidden = self._generate(model, input_ids, attention_mask, capture, kwargs,
                                                                  logprob_temperature)
                chunk_responses = self.stops.truncate(new_tokens)
                responses.extend(chunk_responses)
                if capture:
                    old.extend(_old_rows(model, logprobs, hidden, chunk_responses))
        if old is not None and any(o is None for o in old):
            old = None
        return responses, old

    def _generate(self, model, input_ids, attention_mask, capture: bool, kwargs: dict, logprob_temperature: float):
        """``(new tokens, log pi_old, last hidden states)`` from transformers' ``generate``; the
        last two read off its own forwards (forward ``k`` gives the logits of new token ``k``)
        when ``capture``, else None."""
        seen = []  # per forward: (last hidden state, last logits)
        lm_head = model.causal_lm.get_output_embeddings()
        handle = lm_head.register_forward_hook(lambda m, i, o: seen.append((i[0][:, -1], o[:, -1]))) if capture else None
        try:
            with self.speedups.precision():
                generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        new_tokens = generated[:, input_ids.shape[1] :]
        if not capture or len(seen) != new_tokens.shape[1]:  # unexpected generate internals: recomputed later
            return new_tokens, None, None
        hidden = torch.stack([h for h, _ in seen], dim=1)
        logits = torch.stack([o for _, o in seen], dim=1)
        return new_tokens, core.logprobs_from_logits(logits, new_tokens, logprob_temperature), hidden


def _old_rows(model, logprobs, hidden, responses) -> list:
    """``(log pi_old, V_old)`` per response from the sampling passes (None entries when they
    were not captured)."""
    if logprobs is None:
        return [None] * len(responses)
    values = model.v_head(hidden).float()
    return [(lp[: len(r)], v[: len(r)]) for r, lp, v in zip(responses, logprobs, values)]
