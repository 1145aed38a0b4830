"""The text of report.md: models, verdict, held-out comparison, every policy against SFT, reward model,
training curves, samples."""

from __future__ import annotations

from collections.abc import Sequence

from ..run_layout import EVALUATION_RESULTS
from .formatting import code, fmt, fmt_ci, parameters
from .logs import TrainingLogs
from .samples import choose_examples, render_example
from .verdict import full_verdict

NULL = "—"  # a figure the results leave null (the reference's own difference, an untimed stage)
LENGTH_CONTROL = ("the score difference against {ref} left at equal answer length: over the pairs of answers to the "
                  "same question under the same length limit, the score difference is regressed on the length "
                  "difference, and the intercept is the difference expected had both answers been equally long")


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


def _cell(value, ci=None, digits: int = 3, percent: bool = False) -> str:
    return NULL if value is None else fmt_ci(value, ci, digits, percent)


def duration(seconds) -> str:
    """A wall time for the table: seconds, minutes or hours, whichever reads best."""
    if seconds is None:
        return NULL
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def policies_table(results: dict) -> str:
    """One row per policy, the reference (SFT) first: its score and every figure against the reference."""
    policies = results["policies"]
    ref = policies[0]["name"]
    lines = [f"| policy | mean reward-model score [95% CI] | win rate against {ref} [95% CI] | score difference "
             f"against {ref} [95% CI] | length-controlled difference [95% CI] | KL from {ref} (nats per answer) "
             f"[95% CI] | KL from {ref} (nats per token) | mean length (tokens) | ends with EOS | degenerate | "
             "training wall time | tokens generated in training |",
             "|---|" + "---:|" * 11]
    for i, p in enumerate(policies):
        lc = p.get("length_controlled") or {}
        if i == 0:
            kl, kl_token = "0 (reference)", "0 (reference)"
        else:
            kl = _cell(p.get("kl_from_sft"), p.get("kl_from_sft_ci"))
            kl_token = _cell(p.get("kl_from_sft_per_token"), digits=4)
        cells = [p["name"], _cell(p.get("mean_score"), p.get("mean_score_ci")),
                 _cell(p.get("win_rate"), p.get("win_rate_ci"), percent=True),
                 _cell(p.get("score_difference"), p.get("score_difference_ci")),
                 _cell(lc.get("difference"), lc.get("difference_ci")), kl, kl_token,
                 _cell(p.get("mean_length"), digits=1), _cell(p.get("eos_share"), percent=True),
                 _cell(p.get("degenerate_share"), percent=True), duration(p.get("train_wall_time_s")),
                 _cell(p.get("train_tokens_generated"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def length_control_text(results: dict) -> str:
    """What the length-controlled column means, in plain words, and each policy's score per extra token."""
    ref = results["policies"][0]["name"]
    text = f"*Length-controlled difference*: {LENGTH_CONTROL.format(ref=ref)}"
    text += (". A policy whose raw score difference is well above its length-controlled one wins mainly by "
             "writing longer answers, which the reward model rewards.")
    slopes = [(p["name"], p["length_controlled"]) for p in results["policies"][1:] if p.get("length_controlled")]
    slopes = [(name, lc) for name, lc in slopes if lc.get("length_slope") is not None]
    if slopes:
        text += " Reward-model score per extra token (the regression's slope): " + ", ".join(
            f"{name} {lc['length_slope']:+.4f} ({fmt(lc.get('pairs'))} pairs)" for name, lc in slopes) + "."
    return text


def _policies_section(results: dict, plots: dict[str, str | None]) -> list[str]:
    lines = ["## Every policy against SFT", "",
             f"Each policy answered the same {results['prompts']} held-out questions under the same length limits "
             f"and random numbers; figures against {results['policies'][0]['name']} are paired per answer, "
             "intervals as above. Training time and tokens are the stage's own (— where not recorded).", "",
             policies_table(results), "", length_control_text(results), ""]
    if plots.get("comparison"):
        lines += [f"![Every policy: reward against KL, training curves]({plots['comparison']})", "",
                  "Left: each policy's mean held-out reward-model score against its KL from SFT (bars: 95% CIs, SFT "
                  "at 0); right: the training curves the stages logged (PPO, RLOO, GRPO: reward of the training "
                  "batches; DPO: implicit reward margin and accuracy).", ""]
    return lines


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
    """The text of report.md. `plots` maps sft / reward / ppo / comparison to a PNG file name (None: not drawn)."""
    lines = ["# StackLLaMA run report", ""]
    if run:
        lines += [f"Run folder: {code(run)}", ""]
    if results:
        lines += ["## Models", "",
                  f"- SFT policy: {code(results['sft_model'])} ({results.get('sft_model_kind', 'n/a')})",
                  f"- PPO policy: {code(results['ppo_model'])} ({results.get('ppo_model_kind', 'n/a')})",
                  *[f"- {p['name']} policy: {code(p.get('path'))} ({p.get('kind') or 'n/a'})"
                    for p in (results.get("policies") or []) if p.get("stage") not in ("sft", "ppo")],
                  f"- reward model: {code(results['reward_model'])}",
                  f"- data: {code(results['data_dir'])}, subset `{results.get('subset', 'evaluation')}`",
                  f"- policy size: {parameters(results.get('policy_parameters'))} parameters", ""]
        lines += ["## Verdict", "", results.get("verdict") or full_verdict(results, logs), ""]
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
        if len(results.get("policies") or []) >= 2:
            lines += _policies_section(results, plots)
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
