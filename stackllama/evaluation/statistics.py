"""The figures of the comparison, paired and honest about their uncertainty.

Sample `j` of a prompt is paired across policies (same length, same seed), and the bootstrap
resamples *prompts*, so several samples of one prompt are not counted as independent evidence.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError
from ..ppo.guards import degenerate_mask


def response_stats(responses: Sequence[torch.Tensor], texts: Sequence[str], eos_token_id: int) -> dict:
    """Per response: length in tokens (EOS included, as the PPO log counts), ends with EOS, degenerate
    (one repeated token or line, `stackllama.ppo.guards.degenerate_mask`: the reward-hacking signal)."""
    degenerate = degenerate_mask([r.cpu() for r in responses], list(texts)) if responses else torch.zeros(0)
    return {
        "length": [len(r) for r in responses],
        "ended": [bool(len(r)) and int(r[-1]) == eos_token_id for r in responses],
        "degenerate": [bool(d) for d in degenerate],
    }


def _as_prompt_matrix(values):
    """(prompts, samples) float array; a 1-D input is one sample per prompt."""
    array = np.asarray(values, dtype=float)
    return array[:, None] if array.ndim == 1 else array


def bootstrap_ci(per_prompt, n_resamples: int = 2000, seed: int = 0, level: float = 0.95,
                 statistic=None) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` (default: mean) over prompts, resampled with replacement."""
    x = np.asarray(per_prompt, dtype=float)
    if len(x) == 0:
        return (math.nan, math.nan)
    statistic = statistic or (lambda a: a.mean(axis=-1))
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_resamples, len(x)))
    stats = statistic(x[idx])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def paired_comparison(sft_scores, ppo_scores, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Means, the mean difference and the win rate of PPO over SFT, each with a bootstrap interval over prompts.

    `sft_scores` / `ppo_scores`: (prompts, samples) arrays (or 1-D for one sample per prompt); sample `j`
    of a prompt is paired across policies (same length, same seed). Per prompt: the mean difference
    and the share of its pairs PPO wins (ties count half). The prompts are resampled together, so
    every interval accounts for several samples of one prompt being correlated.
    """
    sft, ppo = _as_prompt_matrix(sft_scores), _as_prompt_matrix(ppo_scores)
    if sft.shape != ppo.shape:
        raise InputError(f"paired scores need the same shape, got {sft.shape} and {ppo.shape}")
    if sft.shape[0] == 0:
        raise InputError("no prompts to compare")
    per_prompt = {
        "sft": sft.mean(1),
        "ppo": ppo.mean(1),
        "diff": (ppo - sft).mean(1),
        "win": ((ppo > sft) + 0.5 * (ppo == sft)).mean(1),
    }
    n = sft.shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    tail = (1 - level) / 2 * 100

    def ci(v):
        low, high = np.percentile(v[idx].mean(1), [tail, 100 - tail])
        return [float(low), float(high)]

    return {
        "prompts": n,
        "pairs": int(sft.size),
        "sft_mean": float(per_prompt["sft"].mean()), "sft_mean_ci": ci(per_prompt["sft"]),
        "ppo_mean": float(per_prompt["ppo"].mean()), "ppo_mean_ci": ci(per_prompt["ppo"]),
        "difference": float(per_prompt["diff"].mean()), "difference_ci": ci(per_prompt["diff"]),
        "win_rate": float(per_prompt["win"].mean()), "win_rate_ci": ci(per_prompt["win"]),
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def policy_summary(scores, stats: dict) -> dict:
    """Mean / std of the scores and the response figures of one policy."""
    flat = [float(s) for s in scores]
    mean = _mean(flat)
    std = math.sqrt(_mean([(s - mean) ** 2 for s in flat])) if flat else math.nan
    return {
        "mean_score": mean,
        "score_std": std,
        "mean_length": _mean(stats["length"]),
        "eos_share": _mean(float(e) for e in stats["ended"]),
        "degenerate_share": _mean(float(d) for d in stats["degenerate"]),
    }


LENGTH_CONTROL = {
    "method": "paired regression",
    "description": ("the intercept of the regression, over every pair of answers to the same prompt and sample, of "
                    "the score difference (policy − SFT) on the length difference (tokens): the difference the "
                    "reward model gives at equal answer length, with the slope (score per extra token) removed"),
}


def _fit_intercept(d: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares `d ≈ a + b x` for each row of (resamples, pairs) arrays; `b = 0` where `x` does not vary."""
    x_mean, d_mean = x.mean(-1, keepdims=True), d.mean(-1, keepdims=True)
    dx = x - x_mean
    var = (dx * dx).sum(-1)
    slope = np.divide((dx * (d - d_mean)).sum(-1), var, out=np.zeros_like(var), where=var > 1e-12)
    return d_mean[..., 0] - slope * x_mean[..., 0], slope


def length_controlled_difference(sft_scores, scores, sft_lengths, lengths, n_resamples: int = 2000, seed: int = 0,
                                 level: float = 0.95) -> dict:
    """The score difference against SFT at equal answer length, with a bootstrap interval over prompts.

    A reward model that prefers long answers rewards a policy for writing longer, whatever it writes.
    Each pair (same prompt, same sample: same length limit, same seed) gives a score difference
    `d = s_policy − s_SFT` and a length difference `x = len_policy − len_SFT`; the least-squares fit
    `d ≈ a + b·x` over all pairs gives `a`, the difference at equal length, and `b`, the score per
    extra token (the reward model's length preference, estimated within prompts). Unlike a win rate
    over length-matched pairs, no pair is discarded when one policy is systematically longer, which
    is the case this is for; like any regression, `a` assumes the length effect is linear. Arrays
    are (prompts, samples); the prompts are resampled together, as in :func:`paired_comparison`.
    """
    arrays = [_as_prompt_matrix(a) for a in (sft_scores, scores, sft_lengths, lengths)]
    if len({a.shape for a in arrays}) != 1:
        raise InputError(f"paired scores and lengths need the same shape, got {[a.shape for a in arrays]}")
    s0, s1, l0, l1 = arrays
    if s0.shape[0] == 0:
        raise InputError("no prompts to compare")
    d, x = s1 - s0, l1 - l0
    n, k = d.shape
    intercept, slope = _fit_intercept(d.reshape(1, -1), x.reshape(1, -1))
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    boot, _ = _fit_intercept(d[idx].reshape(n_resamples, n * k), x[idx].reshape(n_resamples, n * k))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return {"difference": float(intercept[0]), "difference_ci": [float(low), float(high)],
            "length_slope": float(slope[0]), "pairs": int(d.size)}
