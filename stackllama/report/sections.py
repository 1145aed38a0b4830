"""The text of report.md: models, verdict, held-out comparison, reward model, training curves, samples."""

from __future__ import annotations

from collections.abc import Sequence

from ..run_layout import EVALUATION_RESULTS
from .formatting import code, fmt, fmt_ci, parameters
from .logs import TrainingLogs
from .samples import choose_examples, render_example
from .verdict import verdict


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
        lines += ["## Verdict", "", f"**No evaluation results**: `{EVALUATION_RESULTS}` was not found, so the "
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
