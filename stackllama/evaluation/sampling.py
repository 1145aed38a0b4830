"""What both policies are asked and how they answer: one `Question: q\\n\\nAnswer: ` prompt per
held-out question, one response length per (prompt, sample) shared by both policies, and
sampling as the PPO stage samples (`top_k=0, top_p=1`, cut after the first EOS)."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from ..ppo.length_sampler import LengthSampler
from ..ppo.recipe import build_query_dataset
from ..ppo.rollout_batch import StopTokens, left_pad
from .policies import Policy


def build_prompts(data_dir: str, tokenizer, subset: str = "evaluation", max_prompt_length: int | None = 512,
                  num_prompts: int | None = None, seed: int = 0):
    """`(dataset, dropped)`: one `Question: q\\n\\nAnswer: ` query per unique question (columns `query`,
    `input_ids`), those over `max_prompt_length` tokens dropped and counted, at most `num_prompts`."""
    return build_query_dataset(data_dir, tokenizer, max_prompt_length, subset=subset, max_queries=num_prompts,
                               unique_questions=True, seed=seed)


def sample_lengths(n: int, low: int, high: int, seed: int) -> list[int]:
    """`n` response lengths, uniform in `[low, high)`, reproducible from `seed` (the recipe's LengthSampler)."""
    sampler = LengthSampler(low, high, seed=seed)
    return [sampler() for _ in range(n)]


@torch.no_grad()
def generate_responses(policy: Policy, queries: Sequence[torch.Tensor], lengths: Sequence[int], eos_token_id: int,
                       pad_token_id: int, batch_size: int = 32, temperature: float = 1.0, seed: int = 0,
                       progress: bool = True) -> list[torch.Tensor]:
    """One sampled response per query, at most `lengths[i]` tokens, cut after the first EOS.

    Batched with left padding; items are grouped by length so each batch generates about as many
    tokens as it needs, and each row is cut to its own length afterwards (the first `L` tokens of a
    longer sample are a sample of length `L`). Every batch is seeded from `seed` and its index,
    so two policies given the same arguments draw the same random numbers.
    """
    order = sorted(range(len(queries)), key=lambda i: (lengths[i], i))
    responses: list[torch.Tensor | None] = [None] * len(queries)
    stops = StopTokens([eos_token_id])
    device = policy.device
    kwargs = dict(do_sample=True, top_k=0, top_p=1.0, temperature=temperature, pad_token_id=pad_token_id,
                  eos_token_id=eos_token_id)
    starts = range(0, len(order), batch_size)
    with policy.active():
        for b, start in enumerate(tqdm(starts, desc=f"Sampling ({policy.name})", disable=not progress)):
            idx = order[start:start + batch_size]
            ids, mask = left_pad([queries[i] for i in idx], pad_token_id)
            torch.manual_seed(seed * 100_003 + b)
            out = policy.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                        max_new_tokens=max(lengths[i] for i in idx), **kwargs)
            cut = stops.truncate(out[:, ids.shape[1]:].cpu(), [lengths[i] for i in idx])
            for i, response in zip(idx, cut):
                responses[i] = response
    return responses
