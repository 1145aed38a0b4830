"""Answer pairs and the question-level split, as the published paired dataset was made.

Every two answers of a question with different `pm_score` form a candidate pair (ties
never do), the better one as `response_j`. A question with more than `max_pairs`
candidates keeps `max_pairs` of them, sampled without replacement by an RNG seeded from
(seed, site, question id): the result depends neither on the order questions are
processed in nor on how many processes do it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import numpy as np

from ..errors import InputError

SUBSETS = ("finetune", "reward", "rl", "evaluation")


def candidate_pairs(pm_scores: Sequence[int]) -> list[tuple[int, int]]:
    """All index pairs `(better, worse)` of answers with different scores, in a fixed order."""
    pairs = []
    for a, b in itertools.combinations(range(len(pm_scores)), 2):
        if pm_scores[a] == pm_scores[b]:
            continue
        pairs.append((a, b) if pm_scores[a] > pm_scores[b] else (b, a))
    return pairs


def sample_pairs(
    pm_scores: Sequence[int], max_pairs: int, seed: int, key: str
) -> list[tuple[int, int]]:
    """At most `max_pairs` candidate pairs, sampled reproducibly from `seed` and `key`."""
    pairs = candidate_pairs(pm_scores)
    if len(pairs) <= max_pairs:
        return pairs
    rng = random.Random(f"{seed}:{key}")
    return rng.sample(pairs, max_pairs)


def split_boundaries(n: int, fractions: Sequence[float]) -> list[int]:
    """Cumulative end index of each subset among `n` shuffled questions."""
    bounds, total = [], 0.0
    for frac in fractions:
        total += frac
        bounds.append(round(total * n))
    bounds[-1] = n
    return bounds


def assign_splits(n: int, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Subset index (into `SUBSETS`) of each of `n` questions, after a seeded shuffle.

    `perm = default_rng(seed).permutation(n)` orders the questions; the first
    `fractions[0] * n` of that order go to `finetune`, the next to `reward`, and so on.
    About 9 bytes per question at the peak, so Stack Overflow's ~24M questions fit easily.
    """
    if len(fractions) != len(SUBSETS):
        raise InputError(f"expected {len(SUBSETS)} fractions, got {len(fractions)}")
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise InputError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    perm = np.random.default_rng(seed).permutation(n)
    split = np.empty(n, dtype=np.int8)
    start = 0
    for subset, end in enumerate(split_boundaries(n, fractions)):
        split[perm[start:end]] = subset
        start = end
    return split
