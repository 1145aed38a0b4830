"""The forward passes of a PPO step, in the rollout-batch layout (:mod:`.rollout_batch`).

- :func:`policy_pass`: the policy's logits at the positions that predict the responses, and
  its values there (one trunk pass), for a chunk of rows trimmed to its longest query/response;
- :func:`reference_logits`: the same for the reference policy (adapters disabled, or the
  explicit frozen model through the policy's own logits path);
- :func:`rollout_pass`: the no-grad passes of step 1, in chunks with dropout off (as TRL
  0.11's): ``log pi_old``, ``V_old`` (or those taken from sampling), ``log pi_ref``, and the
  per-token KL.

Every pass runs in the run's one precision regime (:mod:`.speedups.mixed_precision`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import core
from .rollout_batch import RolloutBatch
from .speedups.last_layer import last_layer_from
from .value_head import causal_lm_logits, dropout_off


class Passes:
    """The forward passes of one trainer: its model (as prepared), the reference, the regime."""

    def __init__(self, config, model, unwrapped, ref_model, precision, own_reference_forward: bool) -> None:
        self.config, self.model, self.unwrapped, self.ref_model = config, model, unwrapped, ref_model
        self.precision = precision
        # a DeepSpeed engine (or a custom wrapper) as reference runs its own forward
        self.own_reference_forward = own_reference_forward

    def _positions(self, attention_mask):
        return core.position_ids_from_attention_mask(attention_mask) if self.config.position_ids_from_attention_mask else None

    def policy_pass(self, batch: RolloutBatch, rows: Sequence[int], return_values: bool = True):
        """``(logits, values, labels, r)``: logits (n, r, V) at the positions that predict the ``r``
        response columns of ``rows``, values (n, r) or None, and those labels."""
        ids, am, q, r = batch.rows(rows)
        with self.precision():
            logits, values = self.model(input_ids=ids, attention_mask=am, position_ids=self._positions(am),
                                        logits_start=q - 1, logits_len=r, return_values=return_values)
        return logits, values, ids[:, q:], r

    def reference_logits(self, batch: RolloutBatch, rows: Sequence[int]) -> torch.Tensor:
        """The reference policy's logits (n, r, V) at the same positions as :meth:`policy_pass`'s."""
        if self.ref_model is None:
            with self.unwrapped.disable_adapter():
                return self.policy_pass(batch, rows, return_values=False)[0]
        ids, am, q, r = batch.rows(rows)
        with self.precision():
            return self._explicit_reference(ids, am, self._positions(am), q - 1, r)

    def _explicit_reference(self, ids, attention_mask, position_ids, start: int, length: int) -> torch.Tensor:
        """Logits of the explicit reference model at ``[start, start + length)``: through the
        policy's own path (:func:`causal_lm_logits`) for a plain ``*ForCausalLM``, so that a frozen
        copy of the policy computes exactly the policy's numbers; any other module (a DeepSpeed
        engine, a custom wrapper) through its own forward."""
        ref = self.ref_model
        if not self.own_reference_forward and hasattr(ref, "get_decoder") and hasattr(ref, "get_output_embeddings"):
            return causal_lm_logits(ref, ids, attention_mask, position_ids, start, length)[0]
        decoder = ref.get_decoder() if hasattr(ref, "get_decoder") else None
        with last_layer_from(decoder, start):
            out = ref(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                      logits_to_keep=ids.shape[1] - start, use_cache=False)
        return out.logits[:, :length]

    @torch.no_grad()
    def rollout_pass(self, batch: RolloutBatch, temperature: float, old: Optional[list] = None):
        """``(log pi_old, V_old, log pi_ref, KL)``, each (B, R) and zero outside the responses:
        no-grad passes in chunks of ``rollout_chunk_size`` rows, dropout off. ``old``: per row
        ``(log pi_old, V_old)`` from the sampling passes, used instead of the policy's pass."""
        cfg = self.config
        B, R = batch.mask.shape
        device = batch.mask.device
        logprobs, ref_logprobs, values, kl = (torch.zeros(B, R, device=device) for _ in range(4))
        full = cfg.kl_penalty == "full"
        with dropout_off(self.unwrapped):
            for start in range(0, B, cfg.rollout_chunk_size):
                rows = list(range(start, min(start + cfg.rollout_chunk_size, B)))
                if old is None:
                    logits, v, labels, r = self.policy_pass(batch, rows)
                    lp = core.logprobs_from_logits(logits, labels, temperature)
                    full_lp = core.log_softmax(logits, temperature) if full else None
                    del logits
                else:
                    r = max(batch.response_lens[i] for i in rows)
                    labels = batch.response_ids(rows, r)
                    lp = torch.nn.utils.rnn.pad_sequence([old[i][0] for i in rows], batch_first=True)
                    v = torch.nn.utils.rnn.pad_sequence([old[i][1] for i in rows], batch_first=True)
                ref_logits = self.reference_logits(batch, rows)
                ref_lp = core.logprobs_from_logits(ref_logits, labels, temperature)
                if full:
                    k = core.kl_penalty(full_lp, core.log_softmax(ref_logits, temperature), "full")
                else:
                    k = core.kl_penalty(lp, ref_lp, cfg.kl_penalty)
                m = batch.mask[start : start + len(rows), :r]
                sl = slice(start, start + len(rows))
                logprobs[sl, :r] = lp * m
                ref_logprobs[sl, :r] = ref_lp * m
                values[sl, :r] = v.float() * m
                kl[sl, :r] = k * m
        return logprobs, values, ref_logprobs, kl
