"""KL(PPO || SFT) on the PPO policy's own samples: the sum over response tokens of
`log p_ppo - log p_sft` at the sampling temperature (nats), the quantity PPO's penalty bounds."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from ..ppo.core import logprobs_from_logits, position_ids_from_attention_mask
from ..ppo.rollout_batch import RolloutBatch
from .policies import Policy


@torch.no_grad()
def response_logprobs(policy: Policy, queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor],
                      pad_token_id: int, batch_size: int = 32, temperature: float = 1.0,
                      progress: bool = False) -> list[torch.Tensor]:
    """`log p(y_t | x, y_<t)` of every response token under `policy`, at the sampling temperature.

    The PPO trainer's batch (`RolloutBatch`: prompts left-padded, responses right-padded), position
    ids from the attention mask (so left padding does not shift positions), logits only for the response.
    """
    batch = RolloutBatch.build(queries, responses, pad_token_id)
    out: list[torch.Tensor] = []
    device = policy.device
    with policy.active():
        for start in tqdm(range(0, len(queries), batch_size), desc=f"Log-probs ({policy.name})", disable=not progress):
            rows = range(start, min(start + batch_size, len(queries)))
            ids, mask, _, r = batch.rows(rows)
            ids, mask = ids.to(device), mask.to(device)
            logits = policy.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask),
                                  logits_to_keep=r + 1, use_cache=False).logits[:, :-1]
            lp = logprobs_from_logits(logits, batch.response_ids(rows, r).to(device), temperature).cpu()
            out.extend(lp[j, :batch.response_lens[i]] for j, i in enumerate(rows))
    return out


def kl_per_response(logprobs_p: Sequence[torch.Tensor], logprobs_q: Sequence[torch.Tensor]) -> list[float]:
    """`sum_t log p - log q` per response: on samples of `p`, an unbiased estimate of KL(p || q) in nats."""
    return [float((p - q).sum()) for p, q in zip(logprobs_p, logprobs_q)]
