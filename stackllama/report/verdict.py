"""The verdict: whether PPO's held-out mean reward exceeds SFT's, the likely reasons when it does not,
and the caveats that make a higher score weak evidence."""

from __future__ import annotations

from .formatting import fmt, fmt_ci, parameters
from .logs import TrainingLogs


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
