"""The statistics of a PPO step, under TRL 0.11's keys and with TRL's meanings (the README's
"Logged statistics" table lists every key), and their logging to trackers and a JSONL file.

With several processes TRL averaged each of its tensor statistics over the processes
(``gather_stats``), and so does :func:`step_statistics`, in one reduction; the counts of what
the step did (:data:`COUNTS`) are the same on every rank and not averaged.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Sequence

import torch

from . import core
from .guards import degenerate_mask, negative_kl_message

# Statistics that count what the step did: the same on every rank, so not averaged over them
COUNTS = ("ppo/optimizer_steps", "ppo/skipped_minibatches", "ppo/epochs_run")


def tracker_config(config) -> dict:
    """The config as trackers accept it: TensorBoard's hparams take only int/float/str/bool,
    so None, lists and dicts are written as strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


def _std(x: torch.Tensor) -> torch.Tensor:
    return x.std() if x.numel() > 1 else torch.zeros((), device=x.device)


@torch.no_grad()
def minibatch_statistics(pg_loss, vf_loss, loss, skipped: bool, entropy, logprobs, old_logprobs, mask, pg_clipfrac,
                         advantages, ratio_mean, returns, vpred, vf_clipfrac, old_values) -> dict:
    """One minibatch's update statistics (the step reports their mean over its minibatches);
    the losses of a skipped minibatch count as 0, as TRL 0.11's zeroed loss."""
    m, z = mask, 0.0 if skipped else 1.0
    return {
        "ppo/loss/policy": z * pg_loss.item(),
        "ppo/loss/value": z * vf_loss.item(),  # unscaled, as TRL logs it; the total has vf_coef
        "ppo/loss/total": z * loss.item(),
        "ppo/policy/entropy": core.masked_mean(entropy, m).item(),
        "ppo/policy/approxkl": core.approx_kl(logprobs, old_logprobs, m).item(),
        "ppo/policy/policykl": core.policy_kl(logprobs, old_logprobs, m).item(),
        "ppo/policy/clipfrac": pg_clipfrac.item(),
        "ppo/policy/advantages_mean": core.masked_mean(advantages, m).item(),
        "ppo/policy/ratio_mean": ratio_mean.item(),
        "ppo/returns/mean": core.masked_mean(returns, m).item(),
        "ppo/returns/var": core.masked_var(returns, m, unbiased=m.sum() > 1).item(),
        "ppo/val/vpred": core.masked_mean(vpred, m).item(),
        "ppo/val/error": core.masked_mean((vpred - returns) ** 2, m).item(),
        "ppo/val/clipfrac": vf_clipfrac.item(),
        "ppo/val/mean": core.masked_mean(old_values, m).item(),
        "ppo/val/var": core.masked_var(old_values, m, unbiased=m.sum() > 1).item(),
    }


def step_statistics(config, backend, tokenizer, batch, scores, raw_scores, logprobs, ref_logprobs, kl, non_score,
                    beta: float, train_stats: dict, ended, responses) -> dict:
    """The step's statistics; warns on a negative mean KL and on possible reward hacking
    (a share of degenerate responses above ``degenerate_share_threshold``)."""
    mask = batch.mask
    kl_per_seq = (kl * mask).sum(-1)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True) if tokenizer is not None else None
    degenerate = degenerate_mask([r.cpu() for r in responses], texts, config.degenerate_token_share,
                                 config.degenerate_line_share, config.degenerate_min_tokens)
    q_lens = torch.tensor(batch.query_lens, dtype=torch.float32)
    r_lens = torch.tensor(batch.response_lens, dtype=torch.float32)
    averaged = {  # per process, then averaged over the processes
        "objective/kl": kl_per_seq.mean(),
        "objective/entropy": (-logprobs * mask).sum(-1).mean(),
        "ppo/mean_non_score_reward": core.masked_mean(non_score, mask),
        "ppo/mean_scores": scores.mean(),
        "ppo/std_scores": _std(scores),
        "ppo/mean_raw_scores": raw_scores.mean(),
        "env/missing_eos_share": (~ended).float().mean(),
        "env/degenerate_share": degenerate.float().mean().to(scores.device),
    }
    updates = {k: v for k, v in train_stats.items() if k not in COUNTS}  # floats already
    values = torch.cat([torch.stack([v.double() for v in averaged.values()]),
                        torch.tensor(list(updates.values()), dtype=torch.float64, device=scores.device)])
    values = backend.mean(values)  # one call for all of them; one beta on every rank
    stats = dict(zip([*averaged, *updates], values.tolist()))
    stats.update({
        "objective/kl_dist": kl_per_seq.cpu(),
        "objective/logprobs": logprobs.cpu(),
        "objective/ref_logprobs": ref_logprobs.cpu(),
        "objective/kl_coef": beta,
        "tokens/queries_len_mean": q_lens.mean().item(),
        "tokens/queries_len_std": _std(q_lens).item(),
        "tokens/responses_len_mean": r_lens.mean().item(),
        "tokens/responses_len_std": _std(r_lens).item(),
        **{k: train_stats[k] for k in COUNTS},
    })
    mean_kl, degenerate_share = stats["objective/kl"], stats["env/degenerate_share"]
    if mean_kl < -config.negative_kl_warning:
        warnings.warn(negative_kl_message(mean_kl), stacklevel=3)
    if degenerate_share > config.degenerate_share_threshold:
        warnings.warn(
            f"possible reward hacking: {degenerate_share:.0%} of the responses are dominated by one repeated "
            f"token or line (threshold {config.degenerate_share_threshold:.0%}). Inspect samples; consider a "
            "larger KL coefficient or a reward-model fix.",
            stacklevel=3,
        )
    return stats


def scalar_logs(stats: dict, rewards: torch.Tensor, step: int) -> dict:
    """The scalar statistics as floats, with the reward mean/std over all processes' ``rewards``."""
    logs = {}
    for k, v in stats.items():
        if isinstance(v, torch.Tensor):
            if v.numel() == 1:
                logs[k] = float(v)
        elif isinstance(v, (int, float)):
            logs[k] = float(v)
    logs["env/reward_mean"] = rewards.mean().item()
    logs["env/reward_std"] = rewards.std().item() if rewards.numel() > 1 else 0.0
    logs["env/step"] = step
    return logs


def append_jsonl(path: str, logs: dict, batch: dict | None, rewards: torch.Tensor,
                 columns: Sequence[str] = ("query", "response")) -> None:
    """One row of ``logs`` appended to the JSONL log, with the step's (query, response, reward) samples."""
    row = dict(logs)
    if batch is not None and all(c in batch for c in columns):
        row["samples"] = [{**{c: batch[c][i] for c in columns}, "reward": float(rewards[i])}
                          for i in range(min(len(batch[columns[0]]), rewards.numel()))]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
