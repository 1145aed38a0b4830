"""The training-curve plots: SFT loss, reward-model loss and accuracy, the PPO statistics grid.

Drawn with matplotlib's object API on the Agg canvas (no display, no global state) and written
atomically (:func:`stackllama.atomic.write_file`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..atomic import write_file

SFT_PLOT = "sft_loss.png"
REWARD_PLOT = "reward_training.png"
PPO_PLOT = "ppo_training.png"


def _series(rows: Sequence[dict], key: str, x_key: str | None = None):
    """(x, y) of the rows that have `key` (x: `x_key`, else the row number from 1)."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        if key in row and row[key] is not None:
            xs.append(row.get(x_key, i + 1) if x_key else i + 1)
            ys.append(float(row[key]))
    return xs, ys


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over `window` values (fewer at the start); NaNs are skipped."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1): i + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _figure(width: float, height: float):
    # deferred: matplotlib is heavy and only the plots need it
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: Path) -> Path:
    return write_file(path, lambda tmp: fig.savefig(tmp, format="png"))


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def smoothing_window(n: int) -> int:
    """Steps averaged by the thick line of a noisy curve (1: not smoothed)."""
    return max(1, n // 12) if n >= 24 else 1


def _line(ax, xs, ys, color, label=None, smooth: bool = True):
    """The raw values thin, a trailing moving average on top when there are enough points."""
    if not xs:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    window = smoothing_window(len(ys))
    if smooth and window > 1:
        ax.plot(xs, ys, color=color, alpha=0.3, linewidth=1)
        ax.plot(xs, moving_average(ys, window), color=color, linewidth=2, label=label)
    else:
        ax.plot(xs, ys, color=color, linewidth=1.6, marker="o" if len(ys) < 30 else None, markersize=3, label=label)


def _legend(ax, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _held_out(ax, xs, ys, label):
    """Held-out evaluations as markers only: nothing was measured between them."""
    if xs:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], "s", color="C1", markersize=8, label=label,
                linestyle="none")


def plot_sft(history: list[dict], results: dict | None, path: Path) -> Path:
    """SFT training loss per logging step, held-out loss where evaluated (before and after training)."""
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    xs, ys = _series(history, "loss", "step")
    _line(ax, xs, ys, "C0", "training loss", smooth=False)
    ex, ey = _series(history, "eval_loss", "step")
    if results and results.get("eval_loss_before") is not None:
        ex, ey = [0] + ex, [float(results["eval_loss_before"])] + ey
    _held_out(ax, ex, ey, "held-out loss")
    _style(ax, "SFT: language-modelling loss", "optimizer step", "cross-entropy (nats per token)")
    _legend(ax)
    return _save(fig, path)


def plot_reward(history: list[dict], results: dict | None, path: Path) -> Path:
    """Reward model: pairwise loss and accuracy per logging step, held-out accuracy and the length baseline."""
    fig = _figure(11, 4.2)
    loss_ax, acc_ax = fig.subplots(1, 2)
    xs, ys = _series(history, "loss", "step")
    _line(loss_ax, xs, ys, "C0", "training loss", smooth=False)
    ex, ey = _series(history, "eval_loss", "step")
    _held_out(loss_ax, ex, ey, "held-out loss")
    loss_ax.axhline(math.log(2), color="grey", linestyle=":", label="chance (ln 2)")
    _style(loss_ax, "Reward model: pairwise loss", "optimizer step", "−log σ(r_chosen − r_rejected) (nats)")
    _legend(loss_ax)

    xs, ys = _series(history, "accuracy", "step")
    _line(acc_ax, xs, ys, "C0", "training batches", smooth=False)
    ex, ey = _series(history, "eval_accuracy", "step")
    baseline = None
    if results:
        last_step = results.get("global_step") or (xs[-1] if xs else 1)
        for step, key in ((0, "eval_before"), (last_step, "eval_after")):
            metrics = results.get(key) or {}
            if metrics.get("accuracy") is not None:
                ex.append(step)
                ey.append(float(metrics["accuracy"]))
            baseline = metrics.get("longer_answer_baseline", baseline)
    _held_out(acc_ax, ex, ey, "held-out pairs")
    if baseline is not None:
        acc_ax.axhline(baseline, color="C3", linestyle="--", label=f"'longer answer wins' ({baseline:.2f})")
    acc_ax.axhline(0.5, color="grey", linestyle=":", label="chance (0.5)")
    acc_ax.set_ylim(0, 1)
    _style(acc_ax, "Reward model: accuracy", "optimizer step", "share of pairs with r_chosen > r_rejected")
    _legend(acc_ax, loc="lower right", fontsize=8)
    return _save(fig, path)


PPO_PANELS = (
    # (keys, title, y label)
    (("env/reward_mean",), "Mean reward (training batch)", "reward-model score (logit)"),
    (("objective/kl",), "KL(policy ‖ SFT)", "nats per response"),
    (("objective/kl_coef",), "KL coefficient β", "β (score per nat)"),
    (("ppo/loss/policy",), "Policy loss", "clipped surrogate loss"),
    (("ppo/loss/value",), "Value loss", "½ clipped squared error (before vf_coef)"),
    (("ppo/policy/clipfrac",), "Policy clip fraction", "share of tokens clipped"),
    (("ppo/policy/entropy",), "Policy entropy", "nats per token"),
    (("tokens/responses_len_mean",), "Response length", "tokens (mean of batch)"),
    (("env/missing_eos_share", "env/degenerate_share"), "Responses without EOS / degenerate", "share of responses"),
)


def plot_ppo(rows: list[dict], path: Path) -> Path:
    """A 3x3 grid of the PPO statistics per step: reward, KL, β, losses, clip fraction, entropy, length, shares."""
    fig = _figure(14, 10.5)
    axes = fig.subplots(3, 3).flatten()
    labels = {"env/missing_eos_share": "no EOS (cut by length)", "env/degenerate_share": "degenerate (repeats)"}
    for ax, (keys, title, ylabel) in zip(axes, PPO_PANELS):
        for n, key in enumerate(keys):
            xs, ys = _series(rows, key, "env/step")
            _line(ax, xs, ys, f"C{n}", labels.get(key), smooth=len(keys) == 1 and key != "objective/kl_coef")
            if key == "env/reward_mean" and xs:
                _, std = _series(rows, "env/reward_std", "env/step")
                if len(std) == len(ys):
                    ax.fill_between(xs, [y - s for y, s in zip(ys, std)], [y + s for y, s in zip(ys, std)],
                                    color="C0", alpha=0.12, label="± std within batch")
        if keys[0].endswith("_share"):
            ax.set_ylim(-0.03, 1.03)
        _style(ax, title, "PPO step", ylabel)
        _legend(ax, fontsize=8)
    window = smoothing_window(len(rows))
    note = f" (thin: each step; thick: mean of the last {window} steps)" if window > 1 else ""
    fig.suptitle(f"PPO training statistics per step{note}", fontsize=13)
    return _save(fig, path)
