"""The math of PPO for language models, as pure functions of tensors.

Every formula of the trainer lives here exactly once, named as in the papers (Schulman et
al. 2017 for PPO, 2016 for GAE; Ziegler et al. 2019 for the per-token KL penalty), so that
each one can be tested against hand-computed tensors. Shapes: ``B`` sequences, ``T``
response positions, ``V`` vocabulary. ``mask`` is 1.0 on real response tokens and 0.0 on
padding; every reduction over tokens is a *masked* one.

Defaults reproduce TRL 0.11's ``PPOTrainer.step`` (see docs/recipe-reference.md); where
lm-human-preference-details (LMHP) differs, a keyword selects its variant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InputError

# ---------------------------------------------------------------------------------------
# log-probabilities
# ---------------------------------------------------------------------------------------


def tempered(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``z / tau`` in fp32: the logits every log-prob below is taken from."""
    logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log pi(y_t | x, y_<t) = log_softmax(z_t / tau)_{y_t}``.

    ``logits`` (B, T, V) are cast to fp32 and divided by the sampling temperature ``tau``
    (TRL 0.11 always used ``tau = 1``, which is wrong whenever sampling used another
    temperature). One fused ``log_softmax`` kernel, then a gather: on CPU half the time of
    ``z_y - logsumexp(z)`` (a max, a subtraction, an exp, a sum and a log, each a pass over
    the vocabulary) for the same numbers, and the arithmetic sampling uses.
    """
    logp = F.log_softmax(tempered(logits, temperature), dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """``(log pi(y_t), H_t)``: :func:`logprobs_from_logits` (differentiable) and
    :func:`entropy_from_logits` (detached) from one ``log_softmax``, as the update needs
    both: ``H_t = -sum_v pi_v log pi_v``, the sum as one batched dot product."""
    logp = F.log_softmax(tempered(logits, temperature), dim=-1)
    logprobs = torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        lp = logp.detach()
        entropy = -(lp.exp().unsqueeze(-2) @ lp.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    return logprobs, entropy


def log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Full ``log pi(. | x, y_<t)`` over the vocabulary (fp32), used by the ``full`` KL."""
    logits = tempered(logits, temperature)
    return F.log_softmax(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``H_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_{t,v}`` per position (B, T)."""
    logits = tempered(logits, temperature)
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(-1)


# ---------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """``sum(x * m) / sum(m)`` (over ``axis`` or over everything)."""
    if axis is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(axis) / mask.sum(axis)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """``mean_m((x - mean_m(x))^2)``, times ``n / (n - 1)`` (Bessel) when ``unbiased``.

    TRL 0.11 uses the unbiased variance, LMHP the biased one; ``n = sum(mask)``.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n <= 1:
            raise InputError(
                "masked_var: need at least two unmasked elements for the unbiased variance "
                f"(got {int(n)}); use a larger batch or unbiased=False."
            )
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(x - mu) / sqrt(var + eps)``, plus ``mu`` back when ``shift_mean`` is False.

    ``mu`` and ``var`` are masked over the whole tensor (the batch, not per sequence).
    ``shift_mean=False`` is TRL's ``whiten_rewards`` (scale only, keep the mean).
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask, unbiased=unbiased)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# ---------------------------------------------------------------------------------------
# per-token KL penalty and rewards
# ---------------------------------------------------------------------------------------

KL_PENALTIES = ("kl", "abs", "mse", "full")


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` at the sampled tokens.

    - ``kl``:   ``log pi - log pi_ref`` (k1, unbiased, can be negative per token)
    - ``abs``:  ``|log pi - log pi_ref|``
    - ``mse``:  ``0.5 (log pi - log pi_ref)^2`` (k2)
    - ``full``: ``sum_v pi_v (log pi_v - log pi_ref,v)``, the exact KL of the two next-token
      distributions; here ``logprob``/``ref_logprob`` are full log-softmaxes (B, T, V).
    """
    if kind == "kl":
        return logprob - ref_logprob
    if kind == "abs":
        return (logprob - ref_logprob).abs()
    if kind == "mse":
        return 0.5 * (logprob - ref_logprob).square()
    if kind == "full":
        return (logprob.exp() * (logprob - ref_logprob)).sum(-1)
    raise InputError(f"kl_penalty must be one of {KL_PENALTIES}, got {kind!r}")


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r_t = -beta * KL_t`` on every response token, plus the score ``s`` at the last one.

    Returns ``(rewards, non_score_rewards)``, both (B, T) and zero on padding. The last
    token of row ``b`` is ``sum(mask_b) - 1`` (responses are right-padded).
    """
    non_score = -beta * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards = non_score.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, non_score


class RunningMoments:
    """Running mean / std of the scores (Chan et al. parallel update), as TRL 0.11.

    ``update(x)`` merges a batch of ``n`` values with sample mean ``m_x`` and biased
    variance ``v_x``: ``delta = m_x - mu``, ``N = count + n``, ``mu += delta n / N``,
    ``var = (var count + delta^2 count n / N + v_x n) / N`` and ``std = sqrt(var N / (N-1))``.
    ``count`` starts at 1e-24 so that the first batch sets the moments.
    """

    def __init__(self) -> None:
        self.mean, self.var, self.std, self.count = 0.0, 1.0, 1.0, 1e-24

    def update(self, xs: torch.Tensor, xs_mean=None, xs_var=None, xs_count=None) -> tuple[float, float]:
        """Merge a batch; pass ``xs_mean/xs_var/xs_count`` for global (all-rank) moments."""
        if xs_mean is None:
            xs_count = xs.numel()
            xs_var, xs_mean = torch.var_mean(xs.float(), unbiased=False)
        xs_mean, xs_var = float(xs_mean), float(xs_var)
        delta = xs_mean - self.mean
        tot = self.count + xs_count
        tot_sum = self.var * self.count + delta**2 * self.count * xs_count / tot + xs_var * xs_count
        self.mean += delta * xs_count / tot
        self.var = tot_sum / tot
        self.std = math.sqrt(self.var * tot / (tot - 1)) if tot > 1 else 1.0
        self.count = tot
        batch_std = math.sqrt(xs_var * xs_count / (xs_count - 1)) if xs_count > 1 else 0.0
        return xs_mean, batch_std

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "std": self.std, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.std, self.count = (state[k] for k in ("mean", "var", "std", "count"))


# ---------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response (Schulman et al. 2016).

    ``delta_t = r_t + gamma V_{t+1} - V_t`` with ``V_T = 0`` after the last position,
    ``A_t = delta_t + gamma lam A_{t+1}`` and ``R_t = A_t + V_t``. Rewards and values are
    masked first, so right padding contributes nothing. The backward recursion is computed
    at once as ``A = delta @ D^T`` with ``D[t, s] = (gamma lam)^(s - t)`` for ``s >= t``:
    one small matmul instead of a Python loop over tokens. Returns ``(advantages, returns)``
    (advantages not yet whitened).
    """
    values = values * mask
    rewards = rewards * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    T = rewards.shape[1]
    idx = torch.arange(T, device=rewards.device)
    power = (idx[None, :] - idx[:, None]).to(torch.float64)  # s - t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros_like(power))
    advantages = deltas.to(torch.float64) @ discount.T
    advantages = advantages.to(deltas.dtype)
    return advantages, advantages + values


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate: ``L_pg = mean_m(max(-A rho, -A clip(rho, 1 - eps, 1 + eps)))``.

    ``rho = exp(log pi - log pi_old)``. Returns ``(loss, clipfrac, ratio)`` where
    ``clipfrac = mean_m(1[-A clip(rho) > -A rho])``.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses).float(), mask)
    return loss, clipfrac, ratio


def value_loss(
    vpreds: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ``L_vf = 0.5 mean_m(max((V - R)^2, (clip(V, V_old +- c) - R)^2))``.

    Returns ``(loss, clipfrac)``, ``clipfrac = mean_m(1[clipped error > unclipped error])``.
    """
    vpredclipped = torch.max(torch.min(vpreds, old_values + cliprange_value), old_values - cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    clipfrac = masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)
    return loss, clipfrac


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``0.5 mean_m((log pi - log pi_old)^2)`` (TRL's ``policy/approxkl``)."""
    return 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)


def policy_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_m(log pi_old - log pi)`` (TRL's ``policy/policykl``, used for early stopping)."""
    return masked_mean(old_logprobs - logprobs, mask)


# ---------------------------------------------------------------------------------------
# positions
# ---------------------------------------------------------------------------------------


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``pos = cumsum(mask) - 1`` clamped at 0: the first real token gets position 0.

    With left padding the default ``arange`` positions would start the prompt at the
    padding length, which changes the outputs of models with absolute position embeddings
    and, through rounding, even of RoPE models; generation already uses these positions.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
