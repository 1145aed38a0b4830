"""The training-curve plots: SFT loss, reward-model loss and accuracy, the PPO statistics grid, and the
comparison of every policy (reward against KL, each stage's training curve).

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
COMPARISON_PLOT = "comparison.png"


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


def _errors(value: float, ci) -> list[list[float]] | None:
    """Matplotlib's asymmetric error bar for one point from its interval (None: no interval)."""
    if not ci or ci[0] is None or ci[1] is None:
        return None
    return [[max(0.0, value - ci[0])], [max(0.0, ci[1] - value)]]


def _reward_against_kl(ax, policies: Sequence[dict], colors: dict[str, str]) -> None:
    """One point per policy: KL from SFT (x) against mean reward-model score (y), both with their 95% CIs."""
    placed, unplaced = 0, []
    for i, policy in enumerate(policies):
        score = policy.get("mean_score")
        kl = 0.0 if i == 0 else policy.get("kl_from_sft")  # the first policy is the reference
        if score is None or kl is None:
            unplaced.append(policy["name"])
            continue
        ax.errorbar([kl], [score], yerr=_errors(score, policy.get("mean_score_ci")),
                    xerr=None if i == 0 else _errors(kl, policy.get("kl_from_sft_ci")), fmt="o", markersize=7,
                    capsize=4, color=colors[policy["name"]])
        ax.annotate(policy["name"], (kl, score), xytext=(6, 6), textcoords="offset points", fontsize=10)
        placed += 1
    if policies and policies[0].get("mean_score") is not None:
        ax.axhline(policies[0]["mean_score"], color="grey", linestyle=":", linewidth=1)
    if not placed:
        ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes, color="grey")
    elif unplaced:
        ax.text(0.98, 0.02, "no score or KL: " + ", ".join(unplaced), ha="right", va="bottom", fontsize=8,
                transform=ax.transAxes, color="grey")
    _style(ax, "Held-out reward against KL from SFT", "KL(policy ‖ SFT) (nats per answer)",
           "mean reward-model score (95% CI)")


def plot_comparison(policies: Sequence[dict], path: Path, ppo_rows: list[dict] | None = None,
                    histories: dict[str, list[dict] | None] | None = None) -> Path:
    """Every policy's held-out reward against its KL from SFT, beside the training curves of the stages that
    logged them: PPO's, RLOO's and GRPO's training reward, DPO's reward margin and accuracy. A stage without
    logs is left out, and so is a panel none of them feeds."""
    histories = histories or {}
    colors = {p["name"]: f"C{i}" for i, p in enumerate(policies)}
    names = {p.get("stage"): p["name"] for p in policies}

    def color(stage):
        return colors.get(names.get(stage), "black")

    online = []  # (label, color, xs, ys): reward-model score during training
    if ppo_rows:
        online.append(("PPO", color("ppo"), *_series(ppo_rows, "env/reward_mean", "env/step")))
    for stage in ("rloo", "grpo"):
        if histories.get(stage):
            online.append((names.get(stage, stage.upper()), color(stage), *_series(histories[stage], "reward", "step")))
    online = [row for row in online if row[2]]
    dpo = histories.get("dpo")
    dpo = dpo if dpo and (_series(dpo, "rewards/margins")[0] or _series(dpo, "rewards/accuracies")[0]) else None

    fig = _figure(5.6 * (1 + bool(online) + bool(dpo)), 4.6)
    axes = list(fig.subplots(1, 1 + bool(online) + bool(dpo), squeeze=False)[0])
    _reward_against_kl(axes.pop(0), policies, colors)
    if online:
        ax = axes.pop(0)
        for label, c, xs, ys in online:
            _line(ax, xs, ys, c, label)
        _style(ax, "Training reward", "step (of each stage)", "reward-model score (training batch)")
        _legend(ax, fontsize=8)
    if dpo:
        ax = axes.pop(0)
        _line(ax, *_series(dpo, "rewards/margins", "step"), color("dpo"), "reward margin (chosen − rejected)")
        _style(ax, "DPO: implicit reward", "optimizer step", "β · log-ratio margin (nats)")
        xs, ys = _series(dpo, "rewards/accuracies", "step")
        if xs:
            twin = ax.twinx()
            twin.plot(xs, ys, color="grey", linestyle="--", linewidth=1.2, label="accuracy (right axis)")
            twin.set_ylim(0, 1)
            twin.set_ylabel("share of pairs with margin > 0")
            handles = [h for a in (ax, twin) for h in a.get_legend_handles_labels()[0]]
            ax.legend(handles=handles, fontsize=8, loc="lower right")
        else:
            _legend(ax, fontsize=8)
    fig.suptitle("Every policy against SFT", fontsize=13)
    return _save(fig, path)
