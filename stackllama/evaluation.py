"""Comparing the SFT and PPO policies on held-out questions: the pieces behind `scripts/evaluate.py`.

Both policies answer the same `Question: q\\n\\nAnswer: ` prompts of the `evaluation` subset
(never seen in training), sampled as the PPO stage samples (`top_k=0, top_p=1`, temperature 1,
cut after the first EOS), and the reward model scores every answer. What makes the
comparison fair and its uncertainty honest:

- each (prompt, sample) gets one response length drawn from `[min, max)` (the recipe's
  `LengthSampler`), the *same* for both policies, so length is not a confound; both policies
  sample with the same seed per batch (common random numbers: less noise in the difference);
- the statistics are paired and the bootstrap resamples *prompts* (`paired_comparison`), so
  several samples of one prompt are not counted as independent evidence;
- KL(PPO || SFT) is measured on the PPO policy's own samples: the sum over response tokens of
  `log p_ppo - log p_sft` at the sampling temperature (nats), the quantity PPO's penalty bounds.

A PPO LoRA adapter whose base is the SFT model is loaded once: the SFT policy is the same
weights with the adapter disabled, as in PPO training (no second copy in memory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .errors import InputError, MissingInputError

logger = logging.getLogger(__name__)

RESULTS_FILE = "evaluation_results.json"  # written last: its presence marks a completed evaluation
SAMPLES_FILE = "evaluation_samples.jsonl"
RECIPE_OUTPUT_LENGTHS = (32, 128)  # the recipe's LengthSampler(32, 128)
SMALL_MODEL_PARAMETERS = 100_000_000  # below this, one CPU thread (no OpenMP stalls on a shared CPU)


@dataclass
class EvaluateScriptArguments:
    """Arguments of `scripts/evaluate.py`. Paths left empty default to the stages' outputs in the run
    folder, the parent of `--output_dir` (`runs/<run>/`)."""

    output_dir: str = field(default="runs/tiny/report", metadata={
        "help": "Where report.md, the plots, evaluation_samples.jsonl and evaluation_results.json go."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Prepared data (folder or Hub id). Default: <run>/data."})
    subset: str = field(default="evaluation", metadata={"help": "Held-out subset: its questions are the prompts "
                                                                "and its pairs measure the reward model."})
    sft_model: str | None = field(default=None, metadata={
        "help": "SFT policy (full weights or LoRA adapter). Default: <run>/sft-merged, else <run>/sft."})
    ppo_model: str | None = field(default=None, metadata={
        "help": "PPO policy (full weights or LoRA adapter; the value head is ignored). Default: <run>/ppo."})
    reward_model_name: str | None = field(default=None, metadata={
        "help": "Reward model (full weights or LoRA). Default: <run>/reward."})
    sft_log_dir: str | None = field(default=None, metadata={
        "help": "Folder with the SFT stage's trainer_state.json / sft_results.json. Default: <run>/sft."})
    reward_log_dir: str | None = field(default=None, metadata={
        "help": "Folder with the reward stage's trainer_state.json / reward_results.json. Default: the reward "
                "model's folder."})
    ppo_log_dir: str | None = field(default=None, metadata={
        "help": "Folder with ppo_log.jsonl / ppo_results.json. Default: the PPO model's folder."})
    num_prompts: int = field(default=128, metadata={"help": "Use at most this many questions (a seeded sample)."})
    samples_per_prompt: int = field(default=4, metadata={
        "help": "Responses per question and policy. More than one narrows the intervals when few questions fit "
                "(the bootstrap resamples questions, so they are not counted as independent)."})
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "Questions longer than this many tokens are dropped (and counted). Default: the PPO run's "
                "(ppo_results.json), else 512 as in the recipe."})
    output_min_length: int | None = field(default=None, metadata={
        "help": "Response length is uniform in [min, max), drawn per (question, sample) and the same for both "
                "policies. Default: the PPO run's, if its ppo_results.json records it, else 32."})
    output_max_length: int | None = field(default=None, metadata={
        "help": "Upper bound (excluded) of the response length. Default: the PPO run's, else 128."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (PPO samples at 1.0); "
                                                              "the KL uses the same."})
    batch_size: int = field(default=32, metadata={"help": "Sequences per generation / forward batch."})
    reward_batch_size: int = field(default=32, metadata={"help": "Texts per reward-model forward pass."})
    max_length: int = field(default=512, metadata={
        "help": "Reward-model accuracy: evaluation pairs with a side longer than this are dropped (and counted)."})
    max_eval_pairs: int | None = field(default=None, metadata={
        "help": "Reward-model accuracy on at most this many evaluation pairs (default: all)."})
    bootstrap_resamples: int = field(default=2000, metadata={"help": "Resamples of the questions for the 95%% "
                                                                     "confidence intervals."})
    num_examples: int = field(default=4, metadata={"help": "Sample answers shown side by side in report.md."})
    seed: int = field(default=0, metadata={"help": "Seed of the question sample, lengths, sampling and bootstrap."})
    dtype: str = field(default="auto", metadata={"help": "dtype of the models: auto, float32, bfloat16, float16."})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads. Default: 1 on a CPU for policies under 100M parameters (more threads only "
                "stall such small models on a busy shared CPU: ten times slower on 2 cores), else torch's choice."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    report_only: bool = field(default=False, metadata={
        "help": "Rebuild report.md and the plots from the training logs and an existing evaluation_results.json "
                "in output_dir, without generating."})


# --------------------------------------------------------------------------- run folder defaults


def model_kind(path: str) -> str:
    """`"LoRA adapter"`, `"full weights"`, or `"Hub id"` (not a local folder)."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return "LoRA adapter"
    if (p / "config.json").is_file():
        return "full weights"
    return "Hub id" if not p.exists() else "unknown"


def default_sft_policy(run: Path) -> str:
    """`<run>/sft-merged` or `<run>/sft`, full weights or a LoRA adapter (evaluation needs no merge)."""
    for candidate in (run / "sft-merged", run / "sft"):
        if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
            return str(candidate)
    raise MissingInputError(f"no SFT model in {run / 'sft-merged'} or {run / 'sft'}: run scripts/sft.py first, "
                            "or pass --sft_model")


def default_ppo_policy(run: Path) -> str:
    path = run / "ppo"
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return str(path)
    raise MissingInputError(f"no PPO policy in {path}: run scripts/rl_ppo.py first, or pass --ppo_model")


def ppo_run_settings(ppo_dir: str | None) -> dict:
    """The PPO run's figures (`ppo_results.json`) that evaluation should match, or {}."""
    if ppo_dir is None:
        return {}
    path = Path(ppo_dir) / "ppo_results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- prompts and lengths


def build_prompts(data_dir: str, tokenizer, subset: str = "evaluation", max_prompt_length: int | None = 512,
                  num_prompts: int | None = None, seed: int = 0):
    """`(dataset, dropped)`: one `Question: q\\n\\nAnswer: ` query per unique question (columns `query`,
    `input_ids`), those over `max_prompt_length` tokens dropped and counted, at most `num_prompts`."""
    from .ppo.recipe import build_query_dataset

    return build_query_dataset(data_dir, tokenizer, max_prompt_length, subset=subset, max_queries=num_prompts,
                               unique_questions=True, seed=seed)


def sample_lengths(n: int, low: int, high: int, seed: int) -> list[int]:
    """`n` response lengths, uniform in `[low, high)`, reproducible from `seed` (the recipe's LengthSampler)."""
    from .ppo.length_sampler import LengthSampler

    sampler = LengthSampler(low, high, seed=seed)
    return [sampler() for _ in range(n)]


# --------------------------------------------------------------------------- policies


@dataclass
class Policy:
    """A causal LM to sample from and score with; `active()` is the context in which the model *is* this
    policy (the SFT policy sharing the PPO adapter's base runs with the adapter disabled)."""

    name: str
    path: str
    model: torch.nn.Module
    kind: str
    adapter_disabled: bool = False

    def active(self):
        return self.model.disable_adapter() if self.adapter_disabled else contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def load_causal_lm(path: str, dtype: str | None = "auto", trust_remote_code: bool = False):
    """A causal LM from full weights, or a LoRA adapter over its recorded base (not merged)."""
    from transformers import AutoModelForCausalLM

    from .modeling import ModelLoadError, torch_dtype

    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    try:
        if (Path(path) / "adapter_config.json").is_file():
            from peft import PeftConfig, PeftModel

            base = PeftConfig.from_pretrained(path).base_model_name_or_path
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kwargs), path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the policy {path!r}: {error}") from error
    model.eval()
    model.requires_grad_(False)
    return model


def load_policy_tokenizer(path: str, trust_remote_code: bool = False):
    """The policy's tokenizer (left padding), from its folder or, for an adapter without one, its base."""
    from .modeling import ModelLoadError, load_tokenizer

    try:
        return load_tokenizer(path, padding_side="left", trust_remote_code=trust_remote_code)
    except ModelLoadError:
        if not (Path(path) / "adapter_config.json").is_file():
            raise
        from peft import PeftConfig

        base = PeftConfig.from_pretrained(path).base_model_name_or_path
        return load_tokenizer(base, padding_side="left", trust_remote_code=trust_remote_code)


def load_policies(sft_path: str, ppo_path: str, dtype: str | None = "auto", device=None,
                  trust_remote_code: bool = False) -> tuple[Policy, Policy]:
    """(SFT policy, PPO policy). A PPO adapter over the SFT weights is loaded once (SFT = adapter disabled)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ppo_model = load_causal_lm(ppo_path, dtype, trust_remote_code).to(device)
    ppo = Policy("PPO", ppo_path, ppo_model, model_kind(ppo_path))
    base = None
    if ppo.kind == "LoRA adapter":
        from peft import PeftConfig

        base = PeftConfig.from_pretrained(ppo_path).base_model_name_or_path
    if base is not None and model_kind(sft_path) == "full weights" and _same_path(base, sft_path):
        logger.info("the PPO adapter's base is the SFT model: one copy, SFT = adapter disabled")
        return Policy("SFT", sft_path, ppo_model, "full weights", adapter_disabled=True), ppo
    sft_model = load_causal_lm(sft_path, dtype, trust_remote_code).to(device)
    return Policy("SFT", sft_path, sft_model, model_kind(sft_path)), ppo


# --------------------------------------------------------------------------- generation


def truncate_response(tokens: torch.Tensor, eos_ids: Sequence[int], max_length: int | None = None) -> torch.Tensor:
    """The first `max_length` tokens, cut after the first EOS (kept), as the PPO trainer cuts."""
    tokens = tokens[:max_length] if max_length is not None else tokens
    stop = torch.isin(tokens, torch.tensor(list(eos_ids), dtype=tokens.dtype, device=tokens.device))
    if stop.any():
        tokens = tokens[: int(stop.float().argmax()) + 1]
    return tokens


@torch.no_grad()
def generate_responses(policy: Policy, queries: Sequence[torch.Tensor], lengths: Sequence[int], eos_token_id: int,
                       pad_token_id: int, batch_size: int = 32, temperature: float = 1.0, seed: int = 0,
                       progress: bool = True) -> list[torch.Tensor]:
    """One sampled response per query, at most `lengths[i]` tokens, cut after the first EOS.

    Batched with left padding; items are grouped by length so each batch generates about as many
    tokens as it needs, and each row is cut to its own length afterwards (the first `L` tokens of a
    longer sample are a sample of length `L`). Every batch is seeded from `seed` and its index,
    so two policies given the same arguments draw the same random numbers.
    """
    from tqdm import tqdm

    from .ppo.trainer import left_pad

    order = sorted(range(len(queries)), key=lambda i: (lengths[i], i))
    responses: list[torch.Tensor | None] = [None] * len(queries)
    device = policy.device
    kwargs = dict(do_sample=True, top_k=0, top_p=1.0, temperature=temperature, pad_token_id=pad_token_id,
                  eos_token_id=eos_token_id)
    starts = range(0, len(order), batch_size)
    with policy.active():
        for b, start in enumerate(tqdm(starts, desc=f"Sampling ({policy.name})", disable=not progress)):
            idx = order[start:start + batch_size]
            ids, mask = left_pad([queries[i] for i in idx], pad_token_id)
            torch.manual_seed(seed * 100_003 + b)
            out = policy.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                        max_new_tokens=max(lengths[i] for i in idx), **kwargs)
            new = out[:, ids.shape[1]:].cpu()
            for row, i in enumerate(idx):
                responses[i] = truncate_response(new[row], [eos_token_id], lengths[i])
    return responses


# --------------------------------------------------------------------------- KL


@torch.no_grad()
def response_logprobs(policy: Policy, queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor],
                      pad_token_id: int, batch_size: int = 32, temperature: float = 1.0,
                      progress: bool = False) -> list[torch.Tensor]:
    """`log p(y_t | x, y_<t)` of every response token under `policy`, at the sampling temperature.

    Layout of the PPO trainer: prompts left-padded, responses right-padded, position ids from
    the attention mask (so left padding does not shift positions), logits only for the response.
    """
    from tqdm import tqdm

    from .ppo.core import logprobs_from_logits, position_ids_from_attention_mask
    from .ppo.trainer import left_pad

    out: list[torch.Tensor] = []
    device = policy.device
    with policy.active():
        for start in tqdm(range(0, len(queries), batch_size), desc=f"Log-probs ({policy.name})", disable=not progress):
            qs, rs = queries[start:start + batch_size], responses[start:start + batch_size]
            q_ids, q_mask = left_pad(qs, pad_token_id)
            r_len = max(len(r) for r in rs)
            r_ids = torch.full((len(rs), r_len), pad_token_id, dtype=torch.long)
            r_mask = torch.zeros((len(rs), r_len), dtype=torch.long)
            for i, r in enumerate(rs):
                r_ids[i, :len(r)] = r
                r_mask[i, :len(r)] = 1
            ids = torch.cat([q_ids, r_ids], 1).to(device)
            mask = torch.cat([q_mask, r_mask], 1).to(device)
            logits = policy.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask),
                                  logits_to_keep=r_len + 1, use_cache=False).logits[:, :-1]
            lp = logprobs_from_logits(logits, r_ids.to(device), temperature).cpu()
            out.extend(lp[i, :len(r)] for i, r in enumerate(rs))
    return out


def kl_per_response(logprobs_p: Sequence[torch.Tensor], logprobs_q: Sequence[torch.Tensor]) -> list[float]:
    """`sum_t log p - log q` per response: on samples of `p`, an unbiased estimate of KL(p || q) in nats."""
    return [float((p - q).sum()) for p, q in zip(logprobs_p, logprobs_q)]


# --------------------------------------------------------------------------- response statistics


def response_stats(responses: Sequence[torch.Tensor], texts: Sequence[str], eos_token_id: int) -> dict:
    """Per response: length in tokens (EOS included, as the PPO log counts), ends with EOS, degenerate
    (one repeated token or line, `stackllama.ppo.guards.degenerate_mask`: the reward-hacking signal)."""
    from .ppo.guards import degenerate_mask

    degenerate = degenerate_mask([r.cpu() for r in responses], list(texts)) if responses else torch.zeros(0)
    return {
        "length": [len(r) for r in responses],
        "ended": [bool(len(r)) and int(r[-1]) == eos_token_id for r in responses],
        "degenerate": [bool(d) for d in degenerate],
    }


# --------------------------------------------------------------------------- statistics


def _as_prompt_matrix(values):
    """(prompts, samples) float array; a 1-D input is one sample per prompt."""
    import numpy as np

    array = np.asarray(values, dtype=float)
    return array[:, None] if array.ndim == 1 else array


def bootstrap_ci(per_prompt, n_resamples: int = 2000, seed: int = 0, level: float = 0.95,
                 statistic=None) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` (default: mean) over prompts, resampled with replacement."""
    import numpy as np

    x = np.asarray(per_prompt, dtype=float)
    if len(x) == 0:
        return (math.nan, math.nan)
    statistic = statistic or (lambda a: a.mean(axis=-1))
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_resamples, len(x)))
    stats = statistic(x[idx])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def paired_comparison(sft_scores, ppo_scores, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Means, the mean difference and the win rate of PPO over SFT, each with a bootstrap interval over prompts.

    `sft_scores` / `ppo_scores`: (prompts, samples) arrays (or 1-D for one sample per prompt); sample `j`
    of a prompt is paired across policies (same length, same seed). Per prompt: the mean difference
    and the share of its pairs PPO wins (ties count half). The prompts are resampled together, so
    every interval accounts for several samples of one prompt being correlated.
    """
    import numpy as np

    sft, ppo = _as_prompt_matrix(sft_scores), _as_prompt_matrix(ppo_scores)
    if sft.shape != ppo.shape:
        raise InputError(f"paired scores need the same shape, got {sft.shape} and {ppo.shape}")
    if sft.shape[0] == 0:
        raise InputError("no prompts to compare")
    per_prompt = {
        "sft": sft.mean(1),
        "ppo": ppo.mean(1),
        "diff": (ppo - sft).mean(1),
        "win": ((ppo > sft) + 0.5 * (ppo == sft)).mean(1),
    }
    n = sft.shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    tail = (1 - level) / 2 * 100

    def ci(v):
        low, high = np.percentile(v[idx].mean(1), [tail, 100 - tail])
        return [float(low), float(high)]

    return {
        "prompts": n,
        "pairs": int(sft.size),
        "sft_mean": float(per_prompt["sft"].mean()), "sft_mean_ci": ci(per_prompt["sft"]),
        "ppo_mean": float(per_prompt["ppo"].mean()), "ppo_mean_ci": ci(per_prompt["ppo"]),
        "difference": float(per_prompt["diff"].mean()), "difference_ci": ci(per_prompt["diff"]),
        "win_rate": float(per_prompt["win"].mean()), "win_rate_ci": ci(per_prompt["win"]),
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def policy_summary(scores, stats: dict) -> dict:
    """Mean / std of the scores and the response figures of one policy."""
    flat = [float(s) for s in scores]
    mean = _mean(flat)
    std = math.sqrt(_mean([(s - mean) ** 2 for s in flat])) if flat else math.nan
    return {
        "mean_score": mean,
        "score_std": std,
        "mean_length": _mean(stats["length"]),
        "eos_share": _mean(float(e) for e in stats["ended"]),
        "degenerate_share": _mean(float(d) for d in stats["degenerate"]),
    }


# --------------------------------------------------------------------------- the whole comparison


@dataclass
class EvaluationInputs:
    """Resolved paths and settings of one evaluation (the script fills it from its flags and the run folder)."""

    data_dir: str
    sft_model: str
    ppo_model: str
    reward_model: str
    subset: str = "evaluation"
    num_prompts: int | None = 128
    samples_per_prompt: int = 4
    max_prompt_length: int | None = 512
    output_min_length: int = 32
    output_max_length: int = 128
    temperature: float = 1.0
    batch_size: int = 32
    reward_batch_size: int = 32
    max_length: int | None = 512
    max_eval_pairs: int | None = None
    bootstrap_resamples: int = 2000
    seed: int = 0
    dtype: str | None = "auto"
    trust_remote_code: bool = False
    progress: bool = True
    num_threads: int | None = None
    settings_from: dict = field(default_factory=dict)  # where max_prompt_length / output lengths came from


def score_responses(reward_fn, texts, queries, responses, batch_size: int, desc: str, progress: bool = True) -> list[float]:
    """Reward-model scores of `query + response` texts (EOS appended as in reward training), with a progress bar."""
    from tqdm import tqdm

    scores: list[float] = []
    chunk = max(1, batch_size * 4)
    for start in tqdm(range(0, len(texts), chunk), desc=desc, disable=not progress):
        end = start + chunk
        scores.extend(reward_fn(texts[start:end], queries[start:end], responses[start:end]))
    return scores


def reward_model_accuracy(reward_fn, data_dir: str, subset: str, max_length: int | None, batch_size: int,
                          max_pairs: int | None = None) -> dict:
    """`stackllama.reward_modeling.pair_metrics` of the reward model on the held-out pairs, with the dropped count."""
    from .data.loading import load_pairs
    from .reward_modeling import evaluate_pairs, tokenize_pairs

    pairs = load_pairs(data_dir, subset)
    if max_pairs is not None:
        pairs = pairs.select(range(min(max_pairs, len(pairs))))
    tokenized, dropped = tokenize_pairs(pairs, reward_fn.tokenizer, max_length)
    if len(tokenized) == 0:
        return {"pairs": 0, "pairs_dropped": dropped, "max_length": max_length}
    metrics = evaluate_pairs(reward_fn.model, reward_fn.tokenizer, tokenized, batch_size)
    return {**metrics, "pairs_dropped": dropped, "max_length": max_length}


def evaluate_policies(inputs: EvaluationInputs) -> tuple[dict, list[dict]]:
    """Sample both policies on the held-out prompts, score, measure KL and the reward model.

    Returns `(results, samples)`: the figures (see `scripts/evaluate.py` for the keys) and one row
    per (prompt, sample) with both responses and scores.
    """
    import numpy as np

    from .modeling import count_parameters
    from .reward_scoring import RewardFunction, same_tokenizer

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

    sft, ppo = load_policies(inputs.sft_model, inputs.ppo_model, inputs.dtype, trust_remote_code=inputs.trust_remote_code)
    device = ppo.device
    parameters = count_parameters(ppo.model)[1]
    if inputs.num_threads is None and device.type == "cpu" and parameters < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)
    elif inputs.num_threads:
        torch.set_num_threads(inputs.num_threads)
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
    samples = []
    for n, (p, j) in enumerate(items):
        samples.append({
            "prompt": p, "sample": j, "query": query_texts[n], "length_limit": lengths[n],
            "sft_response": texts["SFT"][n], "sft_score": scores["SFT"][n],
            "sft_tokens": stats["SFT"]["length"][n], "sft_ended": stats["SFT"]["ended"][n],
            "sft_degenerate": stats["SFT"]["degenerate"][n],
            "ppo_response": texts["PPO"][n], "ppo_score": scores["PPO"][n],
            "ppo_tokens": stats["PPO"]["length"][n], "ppo_ended": stats["PPO"]["ended"][n],
            "ppo_degenerate": stats["PPO"]["degenerate"][n], "ppo_kl_from_sft": kl[n],
        })
    return results, samples


def write_samples(path: str | Path, samples: Sequence[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    return path


def read_samples(path: str | Path) -> list[dict]:
    """Rows of `evaluation_samples.jsonl`; [] when absent."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- flags -> inputs


def resolve_inputs(args: EvaluateScriptArguments) -> EvaluationInputs:
    """The evaluation's paths and settings: flags first, then the run folder (`<run>` = parent of
    output_dir) and the PPO run's own settings, so that evaluation samples the way training did."""
    from .data.loading import check_data_dir
    from .run_layout import check_model_dir, default_reward_model, run_dir

    for name in ("num_prompts", "samples_per_prompt", "batch_size", "reward_batch_size", "bootstrap_resamples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        raise InputError(f"--temperature must be positive (sampling), got {args.temperature}")
    run = run_dir(args.output_dir)
    data_dir = args.data_dir or str(run / "data")
    check_data_dir(data_dir)
    sft = args.sft_model or default_sft_policy(run)
    ppo = args.ppo_model or default_ppo_policy(run)
    reward = args.reward_model_name or default_reward_model(args.output_dir)
    check_model_dir(sft, "SFT policy", "--sft_model")
    check_model_dir(ppo, "PPO policy", "--ppo_model")
    check_model_dir(reward, "reward model", "--reward_model_name")
    settings = ppo_run_settings(args.ppo_log_dir or (ppo if Path(ppo).is_dir() else None))
    recipe = {"max_prompt_length": 512, "output_min_length": RECIPE_OUTPUT_LENGTHS[0],
              "output_max_length": RECIPE_OUTPUT_LENGTHS[1]}
    chosen, settings_from = {}, {}
    for name, default in recipe.items():
        if getattr(args, name) is not None:
            chosen[name], settings_from[name] = getattr(args, name), "flag"
        elif settings.get(name) is not None:
            chosen[name], settings_from[name] = int(settings[name]), "the PPO run (ppo_results.json)"
        else:
            chosen[name], settings_from[name] = default, "the recipe's default"
    low, high = chosen["output_min_length"], chosen["output_max_length"]
    if not 1 <= low < high:
        raise InputError(f"response lengths need 1 <= --output_min_length < --output_max_length, got [{low}, {high})")
    return EvaluationInputs(
        data_dir=data_dir, sft_model=sft, ppo_model=ppo, reward_model=reward, subset=args.subset,
        num_prompts=args.num_prompts, samples_per_prompt=args.samples_per_prompt,
        max_prompt_length=chosen["max_prompt_length"],
        output_min_length=low, output_max_length=high, temperature=args.temperature, batch_size=args.batch_size,
        reward_batch_size=args.reward_batch_size, max_length=args.max_length, max_eval_pairs=args.max_eval_pairs,
        bootstrap_resamples=args.bootstrap_resamples, seed=args.seed, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, num_threads=args.num_threads, settings_from=settings_from)
