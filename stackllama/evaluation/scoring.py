"""The reward model's side: its scores of both policies' answers, and its own accuracy on the
held-out pairs (how far its judgement can be trusted)."""

from __future__ import annotations

from tqdm import tqdm

from ..data.loading import load_pairs
from ..reward_modeling import evaluate_pairs, tokenize_pairs


def score_responses(reward_fn, texts, queries, responses, batch_size: int, desc: str, progress: bool = True) -> list[float]:
    """Reward-model scores of `query + response` texts (EOS appended as in reward training), with a progress bar."""
    scores: list[float] = []
    chunk = max(1, batch_size * 4)
    for start in tqdm(range(0, len(texts), chunk), desc=desc, disable=not progress):
        end = start + chunk
        scores.extend(reward_fn(texts[start:end], queries[start:end], responses[start:end]))
    return scores


def reward_model_accuracy(reward_fn, data_dir: str, subset: str, max_length: int | None, batch_size: int,
                          max_pairs: int | None = None) -> dict:
    """`stackllama.reward_modeling.pair_metrics` of the reward model on the held-out pairs, with the dropped count."""
    pairs = load_pairs(data_dir, subset)
    if max_pairs is not None:
        pairs = pairs.select(range(min(max_pairs, len(pairs))))
    tokenized, dropped = tokenize_pairs(pairs, reward_fn.tokenizer, max_length)
    if len(tokenized) == 0:
        return {"pairs": 0, "pairs_dropped": dropped, "max_length": max_length}
    metrics = evaluate_pairs(reward_fn.model, reward_fn.tokenizer, tokenized, batch_size)
    return {**metrics, "pairs_dropped": dropped, "max_length": max_length}
