"""The sample answers shown in the report: which rows (seeded, extremes labelled) and their Markdown."""

from __future__ import annotations

import random
from collections.abc import Sequence

from .formatting import fenced, fmt, shorten


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
