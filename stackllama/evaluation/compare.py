"""The whole comparison: both policies answer the same prompts, the reward model scores every
answer, KL(PPO || SFT) is measured on the PPO policy's samples, and the reward model's own
accuracy on the held-out pairs is measured beside them."""

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
from .statistics import bootstrap_ci, paired_comparison, policy_summary, response_stats

logger = logging.getLogger(__name__)


def evaluate_policies(inputs: EvaluationInputs) -> tuple[dict, list[dict]]:
    """Sample both policies on the held-out prompts, score, measure KL and the reward model.

    Returns `(results, samples)`: the figures (see `scripts/evaluate.py` for the keys) and one row
    per (prompt, sample) with both responses and scores.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    tokenizer = load_policy_tokenizer(inputs.ppo_model, inputs.trust_remote_code)
    sft_tokenizer = load_policy_tokenizer(inputs.sft_model, inputs.trust_remote_code)
    if not same_tokenizer(tokenizer, sft_tokenizer):
        raise InputError(f"the SFT ({inputs.sft_model}) and PPO ({inputs.ppo_model}) policies use different "
                         "tokenizers; comparing their log-probs (KL) needs the same one")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    dataset, dropped = build_prompts(inputs.data_dir, tokenizer, inputs.subset, inputs.max_prompt_length,
                                     inputs.num_prompts, inputs.seed)
    if len(dataset) == 0:
        raise InputError(f"no {inputs.subset} question fits in --max_prompt_length {inputs.max_prompt_length} "
                         f"({dropped} dropped)")
    logger.info("prompts: %d %s questions (%d longer than %s tokens dropped), %d samples each",
                len(dataset), inputs.subset, dropped, inputs.max_prompt_length, inputs.samples_per_prompt)
    k = inputs.samples_per_prompt
    prompt_queries = list(dataset["query"])
    prompt_ids = [ids.long() for ids in dataset["input_ids"]]
    items = [(p, j) for p in range(len(prompt_ids)) for j in range(k)]
    queries = [prompt_ids[p] for p, _ in items]
    query_texts = [prompt_queries[p] for p, _ in items]
    lengths = sample_lengths(len(items), inputs.output_min_length, inputs.output_max_length, inputs.seed)

    sft, ppo = load_policies([PolicySpec("SFT", inputs.sft_model), PolicySpec("PPO", inputs.ppo_model)],
                             inputs.dtype, trust_remote_code=inputs.trust_remote_code)
    device = ppo.device
    parameters = count_parameters(ppo.model)[1]
    set_torch_threads(inputs.num_threads, device, parameters)
    reward_fn = RewardFunction.from_pretrained(inputs.reward_model, dtype=inputs.dtype,
                                               trust_remote_code=inputs.trust_remote_code, policy_tokenizer=tokenizer,
                                               batch_size=inputs.reward_batch_size, device=device)
    timings["load"] = time.perf_counter() - t

    responses, texts, scores, stats = {}, {}, {}, {}
    for policy in (sft, ppo):
        t = time.perf_counter()
        responses[policy.name] = generate_responses(policy, queries, lengths, eos, pad, inputs.batch_size,
                                                    inputs.temperature, inputs.seed, inputs.progress)
        timings[f"generation_{policy.name.lower()}"] = time.perf_counter() - t
        texts[policy.name] = tokenizer.batch_decode(responses[policy.name], skip_special_tokens=True)
        t = time.perf_counter()
        full = [q + r for q, r in zip(query_texts, texts[policy.name])]
        scores[policy.name] = score_responses(reward_fn, full, queries, responses[policy.name],
                                              inputs.reward_batch_size, f"Scoring ({policy.name})", inputs.progress)
        timings[f"scoring_{policy.name.lower()}"] = time.perf_counter() - t
        stats[policy.name] = response_stats(responses[policy.name], texts[policy.name], eos)

    # KL(PPO || SFT) on the PPO policy's samples
    t = time.perf_counter()
    lp_ppo = response_logprobs(ppo, queries, responses["PPO"], pad, inputs.batch_size, inputs.temperature)
    lp_sft = response_logprobs(sft, queries, responses["PPO"], pad, inputs.batch_size, inputs.temperature)
    kl = kl_per_response(lp_ppo, lp_sft)
    timings["kl"] = time.perf_counter() - t

    t = time.perf_counter()
    accuracy = reward_model_accuracy(reward_fn, inputs.data_dir, inputs.subset, inputs.max_length,
                                     inputs.reward_batch_size, inputs.max_eval_pairs)
    timings["reward_accuracy"] = time.perf_counter() - t

    shape = (len(prompt_ids), k)
    comparison = paired_comparison(np.reshape(scores["SFT"], shape), np.reshape(scores["PPO"], shape),
                                   inputs.bootstrap_resamples, inputs.seed)
    kl_per_prompt = np.reshape(kl, shape).mean(1)
    tokens = sum(len(r) for r in responses["PPO"])
    summaries = {name: policy_summary(scores[name], stats[name]) for name in ("SFT", "PPO")}
    for name, key in (("SFT", "sft"), ("PPO", "ppo")):
        summaries[name]["mean_score_ci"] = comparison[f"{key}_mean_ci"]
    summaries["PPO"].update({
        "kl_from_sft": float(np.mean(kl)),
        "kl_from_sft_ci": list(bootstrap_ci(kl_per_prompt, inputs.bootstrap_resamples, inputs.seed)),
        "kl_from_sft_per_token": float(np.sum(kl) / tokens) if tokens else math.nan,
    })
    summaries["SFT"].update({"kl_from_sft": 0.0, "kl_from_sft_per_token": 0.0})
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
        "score_difference": comparison["difference"], "score_difference_ci": comparison["difference_ci"],
        "win_rate": comparison["win_rate"], "win_rate_ci": comparison["win_rate_ci"],
        "ppo_better": comparison["difference"] > 0,
        "ppo_better_significant": comparison["difference_ci"][0] > 0,
        "reward_fast_path": bool(reward_fn.use_fast_path),
        "reward_model_accuracy": accuracy,
        "timings_s": {key: round(value, 2) for key, value in timings.items()},
    }
    return results, sample_rows(items, query_texts, lengths, texts, scores, stats, kl)
