"""The run's report: training curves from the stages' logs, the policy comparison, `report.md`.

Everything here reads files and writes files; nothing trains or generates, so a report can be
rebuilt at any time (`scripts/evaluate.py --report_only`) and tested on small fake logs. Logs
read (each optional: a missing one skips its plot and the report says which file was absent):

- `<sft>/trainer_state.json`, `<reward>/trainer_state.json`: the HF Trainer's `log_history`;
- `<sft>/sft_results.json`, `<reward>/reward_results.json`: held-out figures before / after;
- `<ppo>/ppo_log.jsonl` (one row per PPO step) and `<ppo>/ppo_results.json`.

Plots are drawn with matplotlib's object API on the Agg canvas (no display, no global state)
and written atomically, like `report.md`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
SFT_PLOT = "sft_loss.png"
REWARD_PLOT = "reward_training.png"
PPO_PLOT = "ppo_training.png"
TRAINER_STATE = "trainer_state.json"
PPO_LOG = "ppo_log.jsonl"


# --------------------------------------------------------------------------- files


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`path` written via a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> dict | None:
    """The JSON object in `path`, or None when it is absent or unreadable."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_trainer_history(folder: str | Path | None) -> list[dict] | None:
    """`log_history` of the HF Trainer's `trainer_state.json` in `folder`, or None."""
    if folder is None:
        return None
    state = read_json(Path(folder) / TRAINER_STATE)
    history = state.get("log_history") if state else None
    return history if isinstance(history, list) else None


def read_ppo_log(path: str | Path) -> tuple[list[dict] | None, list[str]]:
    """`(rows, notes)`: the scalar statistics of each PPO step (sample rows left out).

    A file that holds several runs (`env/step` starting again) gives its last run; lines that
    do not parse (a run killed mid-write) are skipped; both are said in `notes`.
    """
    path = Path(path)
    if not path.is_file():
        return None, []
    runs: list[list[dict]] = [[]]
    bad = 0
    last_step = None
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if not isinstance(row, dict):
                bad += 1
                continue
            row = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            step = row.get("env/step")
            if step is not None and last_step is not None and step <= last_step and runs[-1]:
                runs.append([])
            last_step = step if step is not None else last_step
            runs[-1].append(row)
    notes = []
    if len(runs) > 1:
        notes.append(f"`{path}` holds {len(runs)} runs (`env/step` starts again); the plots show the last one.")
    if bad:
        notes.append(f"`{path}`: {bad} line(s) that are not JSON were skipped.")
    return runs[-1], notes


# --------------------------------------------------------------------------- the logs of a run


@dataclass
class LogSources:
    """The stage folders whose logs the report reads (None: not available)."""

    sft_dir: Path | None = None
    reward_dir: Path | None = None
    ppo_dir: Path | None = None

    @classmethod
    def for_run(cls, run: str | Path, sft_dir=None, reward_dir=None, ppo_dir=None, reward_model: str | None = None,
                ppo_model: str | None = None) -> "LogSources":
        """Given folders win; else the reward / PPO model's own folder (where its stage wrote its logs) when
        it is local, else `<run>/sft`, `<run>/reward`, `<run>/ppo`. The SFT logs are in `sft/`, not
        `sft-merged/`, so they always default to the run folder."""
        run = Path(run)

        def local(path):
            return Path(path) if path and Path(path).is_dir() else None

        return cls(
            sft_dir=Path(sft_dir) if sft_dir else run / "sft",
            reward_dir=Path(reward_dir) if reward_dir else local(reward_model) or run / "reward",
            ppo_dir=Path(ppo_dir) if ppo_dir else local(ppo_model) or run / "ppo",
        )


@dataclass
class TrainingLogs:
    sft_history: list[dict] | None = None
    sft_results: dict | None = None
    reward_history: list[dict] | None = None
    reward_results: dict | None = None
    ppo_rows: list[dict] | None = None
    ppo_results: dict | None = None
    missing: list[str] = field(default_factory=list)  # one line per absent log
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, sources: LogSources) -> "TrainingLogs":
        logs = cls()

        def where(folder, name):
            return f"`{Path(folder) / name}`" if folder is not None else f"`{name}` (no folder known)"

        if sources.sft_dir is not None:
            logs.sft_history = read_trainer_history(sources.sft_dir)
            logs.sft_results = read_json(Path(sources.sft_dir) / "sft_results.json")
        if logs.sft_history is None:
            logs.missing.append(f"SFT loss: {where(sources.sft_dir, TRAINER_STATE)} not found")
        if sources.reward_dir is not None:
            logs.reward_history = read_trainer_history(sources.reward_dir)
            logs.reward_results = read_json(Path(sources.reward_dir) / "reward_results.json")
        if logs.reward_history is None:
            logs.missing.append(f"reward-model loss / accuracy: {where(sources.reward_dir, TRAINER_STATE)} not found")
        if sources.ppo_dir is not None:
            logs.ppo_rows, notes = read_ppo_log(Path(sources.ppo_dir) / PPO_LOG)
            logs.notes.extend(notes)
            logs.ppo_results = read_json(Path(sources.ppo_dir) / "ppo_results.json")
        if not logs.ppo_rows:
            logs.ppo_rows = None
            logs.missing.append(f"PPO statistics: {where(sources.ppo_dir, PPO_LOG)} not found or empty")
        return logs


# --------------------------------------------------------------------------- plots


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
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


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


# --------------------------------------------------------------------------- text helpers


def fmt(value, digits: int = 3, percent: bool = False) -> str:
    """A number for the report; `n/a` for None / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if percent:
        return f"{100 * value:.1f}%"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def fmt_ci(value, ci, digits: int = 3, percent: bool = False) -> str:
    if not ci:
        return fmt(value, digits, percent)
    return f"{fmt(value, digits, percent)} [{fmt(ci[0], digits, percent)}, {fmt(ci[1], digits, percent)}]"


def fenced(text: str, info: str = "text") -> str:
    """`text` in a code fence longer than any backtick run inside it, so nothing in it is Markdown."""
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def code(text: str) -> str:
    """An inline code span that survives backticks in `text`."""
    text = str(text).replace("\n", " ")
    ticks = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + " […]"


def parameters(n) -> str:
    if not n:
        return "n/a"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# --------------------------------------------------------------------------- the verdict


def likely_reasons(results: dict, logs: TrainingLogs) -> list[str]:
    """Why PPO may fail to beat SFT on held-out prompts, from the figures at hand (each stated with its number)."""
    reasons = []
    accuracy = results.get("reward_model_accuracy") or {}
    acc, baseline = accuracy.get("accuracy"), accuracy.get("longer_answer_baseline")
    if acc is not None:
        if baseline is not None and acc <= baseline + 0.02:
            reasons.append(f"the reward model is barely better than a length rule: accuracy {acc:.3f} on held-out "
                           f"pairs against {baseline:.3f} for 'the longer answer wins', so its score carries little "
                           "beyond length, and here both policies answer under the same length limit")
        elif acc < 0.6:
            reasons.append(f"the reward model is weak: accuracy {acc:.3f} on held-out pairs (chance is 0.5)")
    ppo = logs.ppo_results or {}
    steps = ppo.get("steps") or (len(logs.ppo_rows) if logs.ppo_rows else None)
    if steps is not None and steps < 500:
        reasons.append(f"PPO ran only {steps} steps")
    first, last = ppo.get("reward_first"), ppo.get("reward_last")
    if first is not None and last is not None:
        if last > first:
            reasons.append(f"the training reward rose ({first:.3f} → {last:.3f} on `rl` prompts) but the gain does "
                           "not carry over to held-out questions: too small to see here, or fitted to the training "
                           "prompts")
        else:
            reasons.append(f"the training reward did not rise either ({first:.3f} → {last:.3f})")
    kl = (results.get("ppo") or {}).get("kl_from_sft")
    if kl is not None and kl < 0.5:
        reasons.append(f"the PPO policy barely moved from the SFT policy (KL {kl:.3f} nats per response)")
    n = results.get("prompts")
    if n is not None and n < 50:
        reasons.append(f"only {n} held-out questions fit in {results.get('max_prompt_length')} tokens, so the "
                       "interval is wide")
    params = results.get("policy_parameters")
    if params and params < 1e8:
        reasons.append(f"the policy is tiny ({parameters(params)} parameters): its answers are barely language, "
                       "so the reward model's scores of them are mostly noise")
    return reasons


def caveats(results: dict, with_reward_model: bool = True) -> list[str]:
    """Signs that a higher score may not mean better answers: a reward model no better than a length rule,
    a policy too small to write language, reward hacking, a change in how often answers end."""
    out = []
    sft, ppo = results.get("sft") or {}, results.get("ppo") or {}
    accuracy = results.get("reward_model_accuracy") or {}
    acc, baseline = accuracy.get("accuracy"), accuracy.get("longer_answer_baseline")
    if with_reward_model and acc is not None and baseline is not None and acc <= baseline + 0.02:
        out.append(f"the reward model does no better than 'the longer answer wins' on held-out pairs "
                   f"({fmt(acc, percent=True)} against {fmt(baseline, percent=True)}), so a higher score is weak "
                   "evidence of a better answer")
    params = results.get("policy_parameters")
    if with_reward_model and params and params < 1e8:
        out.append(f"a {parameters(params)}-parameter policy writes barely readable text; read the samples "
                   "before trusting the scores")
    if ppo.get("degenerate_share") is not None and sft.get("degenerate_share") is not None:
        if ppo["degenerate_share"] > sft["degenerate_share"] + 0.05:
            out.append(f"more PPO answers are degenerate (one repeated token or line): "
                       f"{fmt(ppo['degenerate_share'], percent=True)} against {fmt(sft['degenerate_share'], percent=True)}"
                       " for SFT, a sign of reward hacking; read the samples")
    if ppo.get("eos_share") is not None and sft.get("eos_share") is not None:
        if abs(ppo["eos_share"] - sft["eos_share"]) > 0.2:
            out.append(f"the share of answers that end with EOS changed from {fmt(sft['eos_share'], percent=True)} "
                       f"(SFT) to {fmt(ppo['eos_share'], percent=True)} (PPO): PPO may be winning by answer length")
    return out


def headline(results: dict) -> str:
    """The verdict in one plain line (no Markdown), for logs and the pipeline's summary."""
    d, ci = results["score_difference"], results["score_difference_ci"]
    answer = "yes" if d > 0 and ci[0] > 0 else ("not shown (CI includes 0)" if d > 0 else "no")
    return (f"PPO beats SFT on held-out reward: {answer}; difference {d:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}], "
            f"win rate {fmt_ci(results['win_rate'], results['win_rate_ci'], percent=True)}, "
            f"KL {fmt((results.get('ppo') or {}).get('kl_from_sft'), 2)} nats")


def verdict(results: dict, logs: TrainingLogs) -> str:
    """One paragraph that says plainly whether PPO's held-out mean reward exceeds SFT's, with the interval,
    and if it does not (or not clearly), the likely reasons."""
    d, ci = results["score_difference"], results["score_difference_ci"]
    win = fmt_ci(results["win_rate"], results["win_rate_ci"], percent=True)
    n = results["prompts"]
    figures = (f"mean score {fmt(results['ppo']['mean_score'])} (PPO) against {fmt(results['sft']['mean_score'])} "
               f"(SFT): difference {d:+.3f}, 95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}] over {n} questions; PPO wins "
               f"{win} of the paired answers (ties count half)")
    if d > 0 and ci[0] > 0:
        text = f"**Yes: the PPO policy's mean reward on held-out questions exceeds the SFT policy's** ({figures})."
        reasons = []
    elif d > 0:
        text = (f"**Not shown: the PPO policy's mean reward on held-out questions is higher, but the 95% interval "
                f"includes 0**, so it is not distinguishable from the SFT policy's ({figures}).")
        reasons = likely_reasons(results, logs)
    else:
        text = (f"**No: the PPO policy's mean reward on held-out questions does not exceed the SFT policy's** "
                f"({figures}).")
        reasons = likely_reasons(results, logs)
    if reasons:
        text += " Likely reasons: " + "; ".join(reasons) + "."
    notes = caveats(results, with_reward_model=not reasons)  # the reasons already name those two
    if notes:
        text += " Caution: " + "; ".join(notes) + "."
    return text


# --------------------------------------------------------------------------- samples


def choose_examples(samples: Sequence[dict], n: int = 4, seed: int = 0) -> list[tuple[str, dict]]:
    """`n` rows to show, each from a different question: the largest PPO gain and loss (when n >= 3),
    the rest at random (seeded), so the report neither hides nor cherry-picks."""
    if not samples or n <= 0:
        return []
    chosen: list[tuple[str, dict]] = []
    used: set = set()

    def take(label, row):
        chosen.append((label, row))
        used.add(row.get("prompt", id(row)))

    by_gain = sorted(samples, key=lambda r: r["ppo_score"] - r["sft_score"])
    extremes = []
    if n >= 3:
        extremes = [("largest PPO gain", by_gain[-1])]
        if by_gain[0].get("prompt") != by_gain[-1].get("prompt"):
            extremes.append(("largest PPO loss", by_gain[0]))
    pool = [r for r in samples if r.get("prompt") not in {e[1].get("prompt") for e in extremes}]
    random.Random(seed).shuffle(pool)
    for row in pool:
        if len(chosen) >= n - len(extremes):
            break
        if row.get("prompt", id(row)) not in used:
            take("random question", row)
    for label, row in extremes:
        take(label, row)
    return chosen


def render_example(index: int, label: str, row: dict, question_chars: int = 500, answer_chars: int = 2000) -> str:
    question = row["query"]
    for prefix, suffix in (("Question: ", "\n\nAnswer: "),):
        if question.startswith(prefix) and question.endswith(suffix):
            question = question[len(prefix): -len(suffix)]
    gain = row["ppo_score"] - row["sft_score"]
    parts = [f"### {index}. {label[:1].upper() + label[1:]} (PPO − SFT score: {gain:+.3f})", "",
             "Question" + (f" (first {question_chars} characters):" if len(question) > question_chars else ":"), "",
             fenced(shorten(question, question_chars)), ""]
    for name, key in (("SFT policy", "sft"), ("PPO policy", "ppo")):
        ended = row.get(f"{key}_ended")
        extra = "" if ended is None else (", ended with EOS" if ended else ", cut at the length limit")
        if row.get(f"{key}_degenerate"):
            extra += ", **degenerate**"
        tokens = row.get(f"{key}_tokens")
        parts += [f"**{name}**: score {fmt(row[f'{key}_score'])}"
                  f"{'' if tokens is None else f', {tokens} tokens'}{extra}", "",
                  fenced(shorten(row[f"{key}_response"], answer_chars) or "(empty)"), ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- report.md


def _origin(results: dict, name: str) -> str:
    """Where a setting came from, in words: the flag, the PPO run's own, or the recipe's default."""
    origin = (results.get("settings_from") or {}).get(name)
    return {None: "as given", "flag": "as given"}.get(origin, f"from {origin}")


def _figures_table(results: dict) -> str:
    sft, ppo = results["sft"], results["ppo"]
    rows = [
        ("mean reward-model score [95% CI]", fmt_ci(sft["mean_score"], sft.get("mean_score_ci")),
         fmt_ci(ppo["mean_score"], ppo.get("mean_score_ci"))),
        ("score standard deviation (over answers)", fmt(sft.get("score_std")), fmt(ppo.get("score_std"))),
        ("response length (tokens, mean)", fmt(sft["mean_length"], 1), fmt(ppo["mean_length"], 1)),
        ("answers ending with EOS", fmt(sft["eos_share"], percent=True), fmt(ppo["eos_share"], percent=True)),
        ("degenerate answers (one repeated token or line)", fmt(sft["degenerate_share"], percent=True),
         fmt(ppo["degenerate_share"], percent=True)),
        ("KL from the SFT policy (nats per answer) [95% CI]", "0 (reference)",
         fmt_ci(ppo.get("kl_from_sft"), ppo.get("kl_from_sft_ci"))),
        ("KL from the SFT policy (nats per token)", "0 (reference)", fmt(ppo.get("kl_from_sft_per_token"), 4)),
    ]
    lines = ["| | SFT policy | PPO policy |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "| paired comparison (PPO vs SFT) | value [95% CI] |", "|---|---:|",
              f"| mean score difference, PPO − SFT | {fmt_ci(results['score_difference'], results['score_difference_ci'])} |",
              f"| PPO win rate (ties count half) | {fmt_ci(results['win_rate'], results['win_rate_ci'], percent=True)} |"]
    return "\n".join(lines)


def _reward_accuracy_text(results: dict) -> str:
    acc = results.get("reward_model_accuracy") or {}
    if not acc.get("pairs"):
        return (f"No held-out pair fits in {acc.get('max_length')} tokens ({acc.get('pairs_dropped', 0)} dropped): "
                "no accuracy figure.")
    text = (f"On {fmt(acc['pairs'])} held-out `{results.get('subset', 'evaluation')}` pairs "
            f"({fmt(acc.get('pairs_dropped', 0))} dropped as longer than {acc.get('max_length')} tokens), the reward "
            f"model scores the better answer higher in **{fmt(acc['accuracy'], percent=True)}** of pairs "
            f"(mean margin {fmt(acc.get('mean_margin'))}); chance is 50%")
    if acc.get("longer_answer_baseline") is not None:
        text += f", and always preferring the longer answer reaches {fmt(acc['longer_answer_baseline'], percent=True)}"
    text += "."
    gaps = acc.get("accuracy_by_gap") or {}
    if gaps:
        text += " By `pm_score` gap: " + ", ".join(
            f"{g}: {fmt(m.get('accuracy'), percent=True)} ({m.get('pairs')} pairs)" for g, m in gaps.items()) + "."
    return text


def _training_summaries(logs: TrainingLogs) -> dict[str, str]:
    out = {}
    sft = logs.sft_results or {}
    if sft.get("eval_loss") is not None:
        before = sft.get("eval_loss_before")
        out["sft"] = (f"Held-out loss {fmt(before)} → {fmt(sft['eval_loss'])} nats per token (perplexity "
                      f"{fmt(sft.get('perplexity_before'), 1)} → {fmt(sft.get('perplexity'), 1)}) after "
                      f"{sft.get('global_step')} steps.")
    reward = logs.reward_results or {}
    after, before = reward.get("eval_after") or {}, reward.get("eval_before") or {}
    if after.get("accuracy") is not None:
        out["reward"] = (f"Held-out accuracy {fmt(before.get('accuracy'))} (untrained head) → "
                         f"{fmt(after['accuracy'])} after {reward.get('global_step')} steps; "
                         f"'longer answer wins' baseline {fmt(after.get('longer_answer_baseline'))}.")
    ppo = logs.ppo_results or {}
    if ppo.get("reward_first") is not None:
        window = ppo.get("averaged_over_steps")
        out["ppo"] = (f"Training reward {fmt(ppo['reward_first'])} → {fmt(ppo.get('reward_last'))} (mean of the "
                      f"first / last {window} steps), KL {fmt(ppo.get('kl_last'))} nats at the end (max "
                      f"{fmt(ppo.get('kl_max'))}), β {fmt(ppo.get('kl_coef_last'), 4)}, {ppo.get('steps')} steps "
                      f"of {fmt(ppo.get('seconds_per_step'), 2)} s.")
    return out


def render_report(results: dict | None, samples: Sequence[dict], logs: TrainingLogs, plots: dict[str, str | None],
                  run: str | None = None, num_examples: int = 4, seed: int = 0) -> str:
    """The text of report.md. `plots` maps sft / reward / ppo to a PNG file name (None: not drawn)."""
    lines = ["# StackLLaMA run report", ""]
    if run:
        lines += [f"Run folder: {code(run)}", ""]
    if results:
        lines += ["## Models", "",
                  f"- SFT policy: {code(results['sft_model'])} ({results.get('sft_model_kind', 'n/a')})",
                  f"- PPO policy: {code(results['ppo_model'])} ({results.get('ppo_model_kind', 'n/a')})",
                  f"- reward model: {code(results['reward_model'])}",
                  f"- data: {code(results['data_dir'])}, subset `{results.get('subset', 'evaluation')}`",
                  f"- policy size: {parameters(results.get('policy_parameters'))} parameters", ""]
        lines += ["## Verdict", "", results.get("verdict") or verdict(results, logs), ""]
        lines += ["## Held-out comparison", "",
                  f"{results['prompts']} questions of the `{results.get('subset', 'evaluation')}` subset "
                  f"({results.get('prompts_dropped', 0)} dropped as longer than {results.get('max_prompt_length')} "
                  f"tokens), {results['samples_per_prompt']} answers per question and policy. Each (question, sample) "
                  f"gets a length limit drawn from [{results['output_min_length']}, {results['output_max_length']}) "
                  f"tokens ({_origin(results, 'output_min_length')}), the same for both policies; the prompt limit "
                  f"is {_origin(results, 'max_prompt_length')}. Sampling as in PPO training (top_k 0, top_p 1, temperature "
                  f"{results.get('temperature', 1.0)}), answers cut after the first EOS. Scores are the reward "
                  "model's raw output. Intervals: percentile bootstrap over questions "
                  f"({results.get('bootstrap_resamples')} resamples), so several answers to one question are not "
                  "counted as independent. KL(PPO ‖ SFT) is Σ_t log p_PPO − log p_SFT over the PPO policy's own "
                  "answers.", "", _figures_table(results), ""]
        lines += ["## Reward model", "", _reward_accuracy_text(results), ""]
    else:
        lines += ["## Verdict", "", "**No evaluation results**: `evaluation_results.json` was not found, so the "
                  "policies were not compared. Run `scripts/evaluate.py` without `--report_only`.", ""]

    lines += ["## Training curves", ""]
    summaries = _training_summaries(logs)
    for key, title in (("sft", "SFT"), ("reward", "Reward model"), ("ppo", "PPO")):
        if plots.get(key):
            lines += [f"### {title}", "", f"![{title} training curves]({plots[key]})", ""]
            if key in summaries:
                lines += [summaries[key], ""]
        elif key in summaries:
            lines += [f"### {title}", "", summaries[key], ""]
    if logs.missing:
        lines += ["Not plotted, because the log was absent:", ""]
        lines += [f"- {m}" for m in logs.missing] + [""]
    if logs.notes:
        lines += ["About the logs:", ""] + [f"- {note}" for note in logs.notes] + [""]

    if results and samples:
        chosen = choose_examples(samples, num_examples, seed)
        if chosen:
            lines += ["## Sample answers", "",
                      "The same question answered by both policies under the same length limit; the questions with "
                      "the largest PPO gain and loss, the others drawn at random (seed "
                      f"{seed}). Both policies sample with the same random numbers, so where they still agree "
                      "their answers begin alike. Every answer is in `evaluation_samples.jsonl`.", ""]
            for i, (label, row) in enumerate(chosen, 1):
                lines += [render_example(i, label, row), ""]
    if results and results.get("timings_s"):
        timing = ", ".join(f"{k} {v:.1f} s" for k, v in results["timings_s"].items())
        total = f" In all {results['wall_time_s']:.0f} s before this report was drawn." if results.get("wall_time_s") else ""
        lines += ["---", "", f"Evaluation time: {timing}.{total}", ""]
    return "\n".join(lines).rstrip() + "\n"


def build_report(output_dir: str | Path, results: dict | None, samples: Sequence[dict],
                 logs: TrainingLogs | LogSources, run: str | None = None, num_examples: int = 4, seed: int = 0) -> dict:
    """Draws the plots the logs allow and writes report.md into `output_dir`.

    Returns `{"report": path, "plots": {...}, "missing": [...], "verdict": str | None}`; a missing log only
    skips its plot (the report says which file was absent).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(logs, LogSources):
        logs = TrainingLogs.load(logs)
    plots: dict[str, str | None] = {"sft": None, "reward": None, "ppo": None}
    if logs.sft_history is not None:
        plots["sft"] = plot_sft(logs.sft_history, logs.sft_results, output_dir / SFT_PLOT).name
    if logs.reward_history is not None:
        plots["reward"] = plot_reward(logs.reward_history, logs.reward_results, output_dir / REWARD_PLOT).name
    if logs.ppo_rows:
        plots["ppo"] = plot_ppo(logs.ppo_rows, output_dir / PPO_PLOT).name
    text_verdict = None
    if results:
        text_verdict = verdict(results, logs)  # recomputed: the logs may have changed since the evaluation
        results = {**results, "verdict": text_verdict}
    text = render_report(results, samples, logs, plots, run=run, num_examples=num_examples, seed=seed)
    path = atomic_write_text(output_dir / REPORT_FILE, text)
    for line in logs.missing:
        logger.info("report: not plotted, %s", line.replace("`", ""))
    return {"report": str(path), "plots": plots, "missing": logs.missing, "verdict": text_verdict}
