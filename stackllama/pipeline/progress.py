"""The progress printout: each stage's headline figures, read from the results file it wrote."""

from __future__ import annotations

import json
from pathlib import Path

from .plan import Step


def summary_line(step: Step, run: Path) -> str:
    """The stage's headline figures from its results file, or '' when they are not there."""
    path = run / step.spec.output / step.spec.marker
    try:
        r = json.loads(path.read_text())
        name = step.spec.name
        if name == "prepare":
            return f"{r['preference_rows']:,} questions with 2+ answers, {r['pairs']:,} pairs"
        if name == "tiny_model":
            return f"{r['parameters'] / 1e6:.1f}M parameters, vocabulary {r['vocab_size']:,}"
        if name == "sft":
            return f"eval loss {r['eval_loss_before']:.3f} -> {r['eval_loss']:.3f}"
        if name == "reward":
            return (f"evaluation accuracy {r['eval_before']['accuracy']:.3f} -> {r['eval_after']['accuracy']:.3f} "
                    f"(longer-answer baseline {r['eval_after']['longer_answer_baseline']:.3f})")
        if name == "ppo":
            return (f"mean reward {r['reward_first']:.3f} -> {r['reward_last']:.3f}, KL {r['kl_last']:.2f}, "
                    f"{r['seconds_per_step']:.2f} s/step")
        if name == "dpo":
            return (f"held-out implicit-reward accuracy {r['eval_before']['accuracy']:.3f} -> "
                    f"{r['eval_after']['accuracy']:.3f} (longer-answer baseline "
                    f"{r['eval_after']['longer_answer_baseline']:.3f}), margin {r['eval_after']['mean_margin']:.3f}")
        if name in ("rloo", "grpo"):
            return (f"mean reward {r['reward_first']:.3f} -> {r['reward_last']:.3f}, KL {r['kl']:.2f}, "
                    f"{r['tokens_per_s']:.0f} tokens/s")
        if name.startswith("merge_"):
            return f"merged logits match base+adapter (max |diff| {r['max_abs_diff']:.1e})"
        if name == "evaluate":
            return str(r.get("comparison_headline") or r.get("verdict_headline", ""))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ""
