"""The whole comparison: every policy (SFT, PPO, and DPO / RLOO / GRPO when trained) answers the
same prompts with the same length limits and random numbers, the reward model scores every answer,
each policy's KL from SFT is measured on its own samples, each is compared with SFT (paired, and at
equal length), and the reward model's own accuracy on the held-out pairs is measured beside them."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from ..errors import InputError
from ..modeling import count_parameters
from ..reward_scoring import RewardFunction, same_tokenizer
from .inputs import EvaluationInputs
from .kl import kl_per_response, response_logprobs
from .policies import PolicySpec, load_policies, load_policy_tokenizer, set_torch_threads
from .samples import sample_rows
from .sampling import build_prompts, generate_responses, sample_lengths
from .scoring import reward_model_accuracy, score_responses
from .statistics import (
    LENGTH_CONTROL,
    bootstrap_ci,
    length_controlled_difference,
    paired_comparison,
    policy_summary,
    response_stats,
)
from .training_cost import training_cost

logger = logging.getLogger(__name__)


def evaluate_policies(inputs: EvaluationInputs) -> tuple[dict, list[dict]]:
    """Sample every policy on the held-out prompts, score, measure KL and the reward model.

    Returns `(results, samples)`: the figures (see `scripts/evaluate.py` for the keys) and one row
    per (prompt, sample) with every policy's response and score.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    specs = [PolicySpec("SFT", inputs.sft_model), PolicySpec("PPO", inputs.ppo_model), *inputs.extra_policies]
    tokenizer = load_policy_tokenizer(inputs.ppo_model, inputs.trust_remote_code)
    for spec in specs:
        if spec.name != "PPO" and not same_tokenizer(tokenizer, load_policy_tokenizer(spec.path, inputs.trust_remote_code)):
            raise InputError(f"the {spec.name} ({spec.path}) and PPO ({inputs.ppo_model}) policies use different "
                             "tokenizers; comparing their log-probs (KL) needs the same one")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    dataset, dropped = build_prompts(inputs.data_dir, tokenizer, inputs.subset, inputs.max_prompt_length,
                                     inputs.num_prompts, inputs.seed)
    if len(dataset) == 0:
        raise InputError(f"no {inputs.subset} question fits in --max_prompt_length {inputs.max_prompt_length} "
                         f"({dropped} dropped)")
    logger.info("prompts: %d %s questions (%d longer than %s tokens dropped), %d samples each; policies: %s",
                len(dataset), inputs.subset, dropped, inputs.max_prompt_length, inputs.samples_per_prompt,
                ", ".join(spec.name for spec in specs))
    k = inputs.samples_per_prompt
    prompt_queries = list(dataset["query"])
    prompt_ids = [ids.long() for ids in dataset["input_ids"]]
    items = [(p, j) for p in range(len(prompt_ids)) for j in range(k)]
    queries = [prompt_ids[p] for p, _ in items]
    query_texts = [prompt_queries[p] for p, _ in items]
    lengths = sample_lengths(len(items), inputs.output_min_length, inputs.output_max_length, inputs.seed)

    policies = load_policies(specs, inputs.dtype, trust_remote_code=inputs.trust_remote_code)
    sft, ppo = policies[:2]
    device = ppo.device
    parameters = count_parameters(ppo.model)[1]
    set_torch_threads(inputs.num_threads, device, parameters)
    reward_fn = RewardFunction.from_pretrained(inputs.reward_model, dtype=inputs.dtype,
                                               trust_remote_code=inputs.trust_remote_code, policy_tokenizer=tokenizer,
                                               batch_size=inputs.reward_batch_size, device=device)
    timings["load"] = time.perf_counter() - t

    # Every policy answers the same prompts under the same length limits and random numbers
    responses, texts, scores, stats = {}, {}, {}, {}
    for policy in policies:
        key = policy.name.lower()
        t = time.perf_counter()
        responses[policy.name] = generate_responses(policy, queries, lengths, eos, pad, inputs.batch_size,
                                                    inputs.temperature, inputs.seed, inputs.progress)
        timings[f"generation_{key}"] = time.perf_counter() - t
        texts[policy.name] = tokenizer.batch_decode(responses[policy.name], skip_special_tokens=True)
        t = time.perf_counter()
        full = [q + r for q, r in zip(query_texts, texts[policy.name])]
        scores[policy.name] = score_responses(reward_fn, full, queries, responses[policy.name],
                                              inputs.reward_batch_size, f"Scoring ({policy.name})", inputs.progress)
        timings[f"scoring_{key}"] = time.perf_counter() - t
        stats[policy.name] = response_stats(responses[policy.name], texts[policy.name], eos)

    # KL(policy || SFT) on each policy's own samples
    kl = {}
    for policy in policies[1:]:
        t = time.perf_counter()
        own = response_logprobs(policy, queries, responses[policy.name], pad, inputs.batch_size, inputs.temperature)
        ref = response_logprobs(sft, queries, responses[policy.name], pad, inputs.batch_size, inputs.temperature)
        kl[policy.name] = kl_per_response(own, ref)
        timings[f"kl_{policy.name.lower()}"] = time.perf_counter() - t
    timings["kl"] = timings["kl_ppo"]  # the key reports before several policies read

    t = time.perf_counter()
    accuracy = reward_model_accuracy(reward_fn, inputs.data_dir, inputs.subset, inputs.max_length,
                                     inputs.reward_batch_size, inputs.max_eval_pairs)
    timings["reward_accuracy"] = time.perf_counter() - t

    shape = (len(prompt_ids), k)
    rows = [_policy_row(policy, sft, scores, stats, responses, kl, shape, timings, inputs) for policy in policies]
    sft_row, ppo_row = rows[0], rows[1]
    summaries = {name: {key: row[key] for key in _LEGACY_KEYS} for name, row in (("SFT", sft_row), ("PPO", ppo_row))}
    del summaries["SFT"]["kl_from_sft_ci"]  # the reference: no interval
    results = {
        "data_dir": inputs.data_dir,
        "subset": inputs.subset,
        "sft_model": sft.path, "sft_model_kind": sft.kind,
        "ppo_model": ppo.path, "ppo_model_kind": ppo.kind,
        "sft_is_ppo_with_adapter_disabled": sft.adapter_disabled,
        "reward_model": inputs.reward_model,
        "policy_parameters": parameters, "torch_threads": torch.get_num_threads(),
        "prompts": len(prompt_ids), "prompts_dropped": dropped, "max_prompt_length": inputs.max_prompt_length,
        "samples_per_prompt": k, "responses_per_policy": len(items),
        "output_min_length": inputs.output_min_length, "output_max_length": inputs.output_max_length,
        "settings_from": inputs.settings_from,
        "temperature": inputs.temperature, "seed": inputs.seed, "bootstrap_resamples": inputs.bootstrap_resamples,
        "sft": summaries["SFT"],
        "ppo": summaries["PPO"],
        "score_difference": ppo_row["score_difference"], "score_difference_ci": ppo_row["score_difference_ci"],
        "win_rate": ppo_row["win_rate"], "win_rate_ci": ppo_row["win_rate_ci"],
        "ppo_better": ppo_row["score_difference"] > 0,
        "ppo_better_significant": ppo_row["score_difference_ci"][0] > 0,
        "policies": rows,
        "length_control": LENGTH_CONTROL,
        "reward_fast_path": bool(reward_fn.use_fast_path),
        "reward_model_accuracy": accuracy,
        "timings_s": {key: round(value, 2) for key, value in timings.items()},
    }
    return results, sample_rows(items, query_texts, lengths, texts, scores, stats, kl)


# the figures of `results["sft"]` / `results["ppo"]`, as before several policies were compared
_LEGACY_KEYS = ("mean_score", "score_std", "mean_length", "eos_share", "degenerate_share", "mean_score_ci",
                "kl_from_sft", "kl_from_sft_ci", "kl_from_sft_per_token")


def _policy_row(policy, sft, scores, stats, responses, kl, shape, timings, inputs: EvaluationInputs) -> dict:
    """One policy's figures: its own, then against SFT (paired, at equal length, KL), then its costs."""
    n, seed = inputs.bootstrap_resamples, inputs.seed
    name = policy.name
    tokens = sum(len(r) for r in responses[name])
    row = {"name": name, "stage": name.lower(), "path": policy.path, "kind": policy.kind,
           **policy_summary(scores[name], stats[name])}
    if policy is sft:
        row.update({"mean_score_ci": list(bootstrap_ci(np.reshape(scores[name], shape).mean(1), n, seed)),
                    "kl_from_sft": 0.0, "kl_from_sft_ci": None, "kl_from_sft_per_token": 0.0,
                    "score_difference": None, "score_difference_ci": None, "win_rate": None, "win_rate_ci": None,
                    "length_controlled": None})
    else:
        base = np.reshape(scores[sft.name], shape)
        comparison = paired_comparison(base, np.reshape(scores[name], shape), n, seed)
        kl_per_prompt = np.reshape(kl[name], shape).mean(1)
        row.update({
            "mean_score_ci": comparison["ppo_mean_ci"],
            "kl_from_sft": float(np.mean(kl[name])),
            "kl_from_sft_ci": list(bootstrap_ci(kl_per_prompt, n, seed)),
            "kl_from_sft_per_token": float(np.sum(kl[name]) / tokens) if tokens else math.nan,
            "score_difference": comparison["difference"], "score_difference_ci": comparison["difference_ci"],
            "win_rate": comparison["win_rate"], "win_rate_ci": comparison["win_rate_ci"],
            "length_controlled": length_controlled_difference(
                base, np.reshape(scores[name], shape), np.reshape(stats[sft.name]["length"], shape),
                np.reshape(stats[name]["length"], shape), n, seed),
        })
    row.update({"generation_s": round(timings[f"generation_{name.lower()}"], 2), "tokens_evaluated": tokens,
                **training_cost(policy.path, name.lower())})
    return row
