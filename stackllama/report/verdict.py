"""The verdict: whether PPO's held-out mean reward exceeds SFT's, the likely reasons when it does not,
and the caveats that make a higher score weak evidence; and, when more methods were trained, which
of them the reward model ranks first, whether that lead survives length control, and how sure it is."""

from __future__ import annotations

from .formatting import fmt, fmt_ci, parameters
from .logs import TrainingLogs

LENGTH_RULE_MARGIN = 0.02  # a reward model within this accuracy of "the longer answer wins" adds little to it
WEAK_ACCURACY = 0.6  # held-out pair accuracy below this: a weak reward model (chance is 0.5)
TINY_POLICY = 1e8  # parameters: below this a policy writes barely readable text


def reward_model_weakness(results: dict) -> tuple[str | None, float | None, float | None]:
    """`(kind, accuracy, baseline)`: kind `"length"` when the reward model is no better than "the longer
    answer wins" on held-out pairs, `"weak"` when it is merely weak, else None."""
    accuracy = results.get("reward_model_accuracy") or {}
    acc, baseline = accuracy.get("accuracy"), accuracy.get("longer_answer_baseline")
    if acc is None:
        return None, acc, baseline
    if baseline is not None and acc <= baseline + LENGTH_RULE_MARGIN:
        return "length", acc, baseline
    return ("weak" if acc < WEAK_ACCURACY else None), acc, baseline


def tiny_policy(results: dict) -> int | None:
    """The policies' parameter count when it is below :data:`TINY_POLICY`, else None."""
    params = results.get("policy_parameters")
    return params if params and params < TINY_POLICY else None


def likely_reasons(results: dict, logs: TrainingLogs) -> list[str]:
    """Why PPO may fail to beat SFT on held-out prompts, from the figures at hand (each stated with its number)."""
    reasons = []
    weakness, acc, baseline = reward_model_weakness(results)
    if weakness == "length":
        reasons.append(f"the reward model is barely better than a length rule: accuracy {acc:.3f} on held-out "
                       f"pairs against {baseline:.3f} for 'the longer answer wins', so its score carries little "
                       "beyond length, and here both policies answer under the same length limit")
    elif weakness == "weak":
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
    params = tiny_policy(results)
    if params:
        reasons.append(f"the policy is tiny ({parameters(params)} parameters): its answers are barely language, "
                       "so the reward model's scores of them are mostly noise")
    return reasons


def caveats(results: dict, with_reward_model: bool = True) -> list[str]:
    """Signs that a higher score may not mean better answers: a reward model no better than a length rule,
    a policy too small to write language, reward hacking, a change in how often answers end."""
    out = []
    sft, ppo = results.get("sft") or {}, results.get("ppo") or {}
    weakness, acc, baseline = reward_model_weakness(results)
    if with_reward_model and weakness == "length":
        out.append(f"the reward model does no better than 'the longer answer wins' on held-out pairs "
                   f"({fmt(acc, percent=True)} against {fmt(baseline, percent=True)}), so a higher score is weak "
                   "evidence of a better answer")
    params = tiny_policy(results)
    if with_reward_model and params:
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


# --------------------------------------------------------------------------- every policy (DPO, RLOO, GRPO)


def compares_policies(results: dict | None) -> bool:
    """Whether the results compare more than SFT and PPO: `policies` with more than two entries, scored."""
    policies = (results or {}).get("policies") or []
    return len(policies) > 2 and bool(ranked_policies(results))


def ranked_policies(results: dict) -> list[dict]:
    """The policies other than the reference (the first, SFT), highest mean reward-model score first."""
    others = [p for p in (results.get("policies") or [])[1:] if p.get("mean_score") is not None]
    return sorted(others, key=lambda p: p["mean_score"], reverse=True)


def _signed(value, ci) -> str:
    """`+0.300, 95% CI [+0.200, +0.400]` (the interval left out when there is none)."""
    if value is None:
        return "n/a"
    return f"{value:+.3f}" + (f", 95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def _above_zero(ci) -> bool:
    return bool(ci) and ci[0] > 0


def _overlap(a, b) -> bool | None:
    """Whether two intervals overlap (None: one is missing)."""
    if not a or not b:
        return None
    return a[0] <= b[1] and b[0] <= a[1]


def _length_text(best: dict, reference: dict) -> str:
    """Whether the best policy's lead over SFT survives length control, in one sentence."""
    lc = best.get("length_controlled")
    if not lc or lc.get("difference") is None:
        return "No length-controlled difference was computed, so a lead from longer answers cannot be ruled out."
    figures = f"at equal answer length the difference is {_signed(lc['difference'], lc.get('difference_ci'))}"
    slope = lc.get("length_slope")
    per_token = f"; the reward model gives {slope:+.3f} per extra token" if slope is not None else ""
    lengths = ""
    if best.get("mean_length") is not None and reference.get("mean_length") is not None:
        lengths = (f", and {best['name']}'s answers average {fmt(best['mean_length'], 1)} tokens against "
                   f"{fmt(reference['mean_length'], 1)} for {reference['name']}")
    if (best.get("score_difference") or 0) <= 0:
        return f"Controlled for length, {figures}{per_token}."
    if _above_zero(lc.get("difference_ci")):
        return f"Its lead survives length control: {figures}{per_token}."
    return (f"Its lead does not survive length control: {figures}, an interval that does not lie above 0"
            f"{per_token}{lengths}; the raw lead may come from answer length.")


def _runner_up_text(best: dict, runner: dict, prompts) -> str:
    about = f"the runner-up, {runner['name']} (mean score {fmt_ci(runner['mean_score'], runner.get('mean_score_ci'))})"
    overlap = _overlap(best.get("mean_score_ci"), runner.get("mean_score_ci"))
    if overlap is None:
        return f"Against {about} there is no interval to compare."
    if overlap:
        questions = f" of {prompts} questions" if prompts else ""
        return (f"It is not distinguishable from {about} at this sample size{questions}: their 95% intervals "
                "overlap.")
    return f"It is ahead of {about}: their 95% intervals do not overlap."


def comparison_caveats(results: dict, best: dict | None = None) -> list[str]:
    """Why the ranking may not mean better answers: a reward model too weak to rank them, policies too
    small to write language, a best policy that wins by degenerate answers."""
    out = []
    weakness, acc, baseline = reward_model_weakness(results)
    if weakness == "length":
        out.append(f"the reward model does no better than 'the longer answer wins' on held-out pairs "
                   f"({fmt(acc, percent=True)} against {fmt(baseline, percent=True)}), so its ranking of the "
                   "methods says little about which answers are better")
    elif weakness == "weak":
        out.append(f"the reward model is weak ({fmt(acc, percent=True)} accuracy on held-out pairs, chance 50%), "
                   "so its ranking of the methods says little about which answers are better")
    params = tiny_policy(results)
    if params:
        out.append(f"the policies are tiny ({parameters(params)} parameters) and write barely readable text; "
                   "read the samples before trusting the ranking")
    reference = (results.get("policies") or [{}])[0]
    if best and best.get("degenerate_share") is not None and reference.get("degenerate_share") is not None:
        if best["degenerate_share"] > reference["degenerate_share"] + 0.05:
            out.append(f"{fmt(best['degenerate_share'], percent=True)} of {best['name']}'s answers are degenerate "
                       f"(against {fmt(reference['degenerate_share'], percent=True)} for "
                       f"{reference.get('name', 'SFT')}), a sign of reward hacking")
    return out


def comparison_verdict(results: dict) -> str:
    """One paragraph on every trained method: which one the reward model ranks first and by how much over
    SFT, whether that lead survives length control, whether it is distinguishable from the runner-up, and
    the caveats. Only for results with more than two policies (:func:`compares_policies`)."""
    reference, ranked = results["policies"][0], ranked_policies(results)
    best, ref_name = ranked[0], results["policies"][0]["name"]
    d, ci = best.get("score_difference"), best.get("score_difference_ci")
    figures = (f"mean score {fmt_ci(best['mean_score'], best.get('mean_score_ci'))} against "
               f"{fmt(reference.get('mean_score'))} for {ref_name}: difference {_signed(d, ci)}, win rate "
               f"{fmt_ci(best.get('win_rate'), best.get('win_rate_ci'), percent=True)} (ties count half)")
    name = best["name"]
    if d is not None and d > 0 and _above_zero(ci):
        text = f"**Best method under the reward model: {name}, whose mean reward exceeds {ref_name}'s** ({figures})."
    elif d is not None and d > 0:
        text = (f"**Best method under the reward model: {name}, but its lead over {ref_name} is not shown: the 95% "
                f"interval includes 0** ({figures}).")
    else:
        text = (f"**No method beats {ref_name} under the reward model; the highest-scoring, {name}, does not exceed "
                f"it** ({figures}).")
    text += " Ranking by mean score: " + ", ".join(f"{p['name']} {fmt(p['mean_score'])}" for p in ranked) + "."
    text += " " + _length_text(best, reference)
    if len(ranked) > 1:
        text += " " + _runner_up_text(best, ranked[1], results.get("prompts"))
    notes = comparison_caveats(results, best)
    if notes:
        text += " Caution: " + "; ".join(notes) + "."
    return text


def comparison_headline(results: dict) -> str:
    """The comparison in one plain line (no Markdown), for logs and the pipeline's summary."""
    ranked = ranked_policies(results)
    best = ranked[0]
    d, ci = best.get("score_difference"), best.get("score_difference_ci")
    diff = f"{d:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") if d is not None else "n/a"
    text = f"best under the reward model: {best['name']}, {diff} vs {results['policies'][0]['name']}"
    lc = best.get("length_controlled") or {}
    if lc.get("difference") is not None:
        lc_ci = lc.get("difference_ci")
        survives = "survives" if _above_zero(lc_ci) else "does not survive"
        bounds = f" [{lc_ci[0]:+.3f}, {lc_ci[1]:+.3f}]" if lc_ci else ""
        text += f"; length-controlled {lc['difference']:+.3f}{bounds} ({survives} length control)"
    if len(ranked) > 1:
        overlap = _overlap(best.get("mean_score_ci"), ranked[1].get("mean_score_ci"))
        state = {True: "not distinguishable from", False: "ahead of", None: "no intervals for"}[overlap]
        text += f"; {state} runner-up {ranked[1]['name']}"
    if comparison_caveats(results):
        text += "; caution: weak evidence (see report)"
    return text


def full_verdict(results: dict, logs: TrainingLogs) -> str:
    """report.md's verdict: the comparison of every method (when there are more than two policies), then
    PPO against SFT as :func:`verdict` gives it."""
    if compares_policies(results):
        return comparison_verdict(results) + "\n\n" + verdict(results, logs)
    return verdict(results, logs)
