"""DPO: the pieces behind `scripts/dpo.py`, TRL's "StackLLaMA 2" alternative to reward model + PPO.

Direct Preference Optimization trains the SFT policy on the preference pairs themselves, with
no reward model and no sampling: the loss `-logsigmoid(beta * (log-ratio(chosen) - log-ratio(rejected)))`,
where `log-ratio(y) = log pi(y|x) - log pi_ref(y|x)` and the reference `pi_ref` is the SFT model
(TRL's `DPOTrainer`; with LoRA the reference is the same weights with the adapter disabled, no
second copy). A pair becomes `prompt` = the shared template's query (`Question: q\\n\\nAnswer: `),
`chosen` = `response_j`, `rejected` = `response_k`, as in TRL's StackLLaMA 2 example, which trained
on the `rl` subset (the questions PPO sees) and evaluated on `evaluation`.

What is added here:
- pairs are tokenized up front as TRL tokenizes them (EOS appended, the completion starting where
  prompt and prompt+answer diverge), and pairs longer than `max_length` tokens (or with a prompt
  over `max_prompt_length`) are dropped *and counted*, not truncated: a cut answer loses its end
  and its EOS. TRL then trains on exactly these ids;
- the held-out evaluation: the implicit reward `beta * log-ratio` of each answer of the
  `evaluation` pairs, its accuracy (chosen above rejected, strictly, as TRL's
  `rewards/accuracies`), mean margin and accuracy by `pm_score` gap, beside the "longer answer
  wins" baseline, before and after training. Before training the policy is its reference, so
  every reward is 0 (accuracy 0, ties 1): the reference log-probs measured then are kept (with
  every checkpoint) and give the rewards after training, whatever TRL keeps in memory;
- `build_trainer`: TRL's `DPOTrainer` with the project's checkpoints and NaN/inf stop
  (`stackllama.hf_trainer`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import run_layout
from .data.loading import load_pairs
from .data.template import format_prompt
from .errors import InputError, MissingInputError, ModelLoadError
from .modeling import adapter_base, load_tokenizer, torch_dtype
from .reward_modeling import format_metrics as format_pair_metrics
from .reward_modeling import pair_metrics

logger = logging.getLogger(__name__)

RESULTS_FILE = run_layout.DPO_RESULTS  # written last: its presence marks a completed stage


@dataclass
class DPOScriptArguments:
    """Arguments of `scripts/dpo.py` beside TRL's `DPOConfig` and `ModelConfig`."""

    data_dir: str | None = field(default=None, metadata={
        "help": "Output folder of scripts/prepare_data.py, or a Hub dataset id with the data/<subset> layout. "
                "Default: <run>/data."})
    train_subset: str = field(default="rl", metadata={
        "help": "Paired subset to train on (StackLLaMA 2: rl, the questions PPO trains on)."})
    eval_subset: str = field(default="evaluation", metadata={"help": "Paired subset to evaluate on (held out)."})
    max_train_pairs: int | None = field(default=None, metadata={"help": "Train on at most this many pairs."})
    max_eval_pairs: int | None = field(default=None, metadata={"help": "Evaluate on at most this many pairs."})
    max_prompt_length: int | None = field(default=512, metadata={
        "help": "Pairs whose prompt is longer than this many tokens are dropped (and counted). TRL 1.x has no "
                "such option any more; StackLLaMA 2 used 512."})
    max_pair_chars: int | None = field(default=None, metadata={
        "help": "Also drop pairs whose prompt + answer is longer than this many characters: the StackLLaMA 2 "
                "example's filter (1024, characters where tokens were meant)."})
    eval_only: bool = field(default=False, metadata={
        "help": "Only evaluate a saved DPO model (--model_name_or_path, default: output_dir) against its "
                "reference; no training."})
    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "With --eval_only: the reference (the SFT model DPO started from). Default: a LoRA adapter's "
                "base with the adapter disabled, else the base_model recorded in the saved dpo_results.json."})
    merge: bool = field(default=False, metadata={
        "help": "Also write merged full weights (LoRA merged into a 16/32-bit base) to --merged_output_dir."})
    merged_output_dir: str | None = field(default=None, metadata={
        "help": "Where --merge writes the full model; default: <output_dir>-merged."})
    merge_dtype: str = field(default="float32", metadata={"help": "dtype of the merged weights."})


def check_arguments(script_args: DPOScriptArguments, training_args, model_args) -> None:
    """One-line errors for settings the stage cannot honour; a warning for those that do nothing."""
    if training_args.sync_ref_model:
        raise InputError("--sync_ref_model moves the reference during training; the held-out evaluation measures "
                         "the implicit reward against the SFT model, so it is not supported here")
    if script_args.train_subset == script_args.eval_subset and not script_args.eval_only:
        logger.warning("--train_subset and --eval_subset are both %r: the evaluation is not held out",
                       script_args.train_subset)
    if model_args.use_peft and model_args.lora_dropout and training_args.disable_dropout and not script_args.eval_only:
        logger.warning("--lora_dropout %s has no effect: TRL's --disable_dropout (default true) switches every "
                       "dropout off; pass --disable_dropout false to train with it", model_args.lora_dropout)


# --------------------------------------------------------------------------- data


def to_preference(example: dict) -> dict:
    """A pair in TRL's preference format: the shared query, the preferred answer, the other one."""
    return {"prompt": format_prompt(example["question"]), "chosen": example["response_j"],
            "rejected": example["response_k"]}


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_preference(prompt: str, chosen: str, rejected: str, tokenizer) -> dict:
    """`prompt_ids` / `chosen_ids` / `rejected_ids` as TRL's DPOTrainer tokenizes a text pair: EOS appended
    to each answer, the completion starting where the tokenized prompt and prompt+answer diverge (the
    template's trailing space merges with the answer's first word in a byte-level BPE)."""
    eos = tokenizer.eos_token
    prompt_ids = tokenizer(prompt)["input_ids"]
    with_chosen = tokenizer(prompt + (chosen if chosen.endswith(eos) else chosen + eos))["input_ids"]
    with_rejected = tokenizer(prompt + (rejected if rejected.endswith(eos) else rejected + eos))["input_ids"]
    n = min(common_prefix_length(prompt_ids, with_chosen), common_prefix_length(prompt_ids, with_rejected))
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": with_chosen[n:], "rejected_ids": with_rejected[n:]}


def tokenize_pairs(dataset, tokenizer, max_length: int | None, max_prompt_length: int | None = None,
                   max_pair_chars: int | None = None, num_proc: int | None = None):
    """(dataset of `prompt_ids`, `chosen_ids`, `rejected_ids`, `gap`; pairs dropped). A pair is dropped when
    prompt + either answer is over `max_length` tokens, the prompt over `max_prompt_length`, or prompt +
    either answer over `max_pair_chars` characters (None: no limit)."""
    has_scores = "pm_score_j" in dataset.column_names

    def tokenize(example):
        pair = to_preference(example)
        row = tokenize_preference(pair["prompt"], pair["chosen"], pair["rejected"], tokenizer)
        row["gap"] = example["pm_score_j"] - example["pm_score_k"] if has_scores else -1
        row["chars"] = len(pair["prompt"]) + max(len(pair["chosen"]), len(pair["rejected"]))
        return row

    tokenized = dataset.map(tokenize, remove_columns=dataset.column_names, num_proc=num_proc,
                            desc="Tokenizing pairs")

    def fits(ex):
        prompt = len(ex["prompt_ids"])
        longest = prompt + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
        return ((max_length is None or longest <= max_length)
                and (max_prompt_length is None or prompt <= max_prompt_length)
                and (max_pair_chars is None or ex["chars"] <= max_pair_chars))

    kept = tokenized.filter(fits, num_proc=num_proc, desc="Dropping over-long pairs").remove_columns("chars")
    return kept, len(tokenized) - len(kept)


def load_tokenized(data_dir: str, subset: str, tokenizer, training_args, script_args, limit: int | None,
                   shuffle: bool = False):
    """`tokenize_pairs` of `subset` (shuffled with the run's seed when `shuffle`, at most `limit` pairs)."""
    pairs = load_pairs(data_dir, subset)
    missing = {"question", "response_j", "response_k"} - set(pairs.column_names)
    if missing:
        raise InputError(f"{data_dir} ({subset}): missing columns {sorted(missing)}; found {pairs.column_names}")
    if shuffle:
        pairs = pairs.shuffle(seed=training_args.seed)
    if limit is not None:
        pairs = pairs.select(range(min(limit, len(pairs))))
    return tokenize_pairs(pairs, tokenizer, training_args.max_length, script_args.max_prompt_length,
                          script_args.max_pair_chars, num_proc=training_args.dataset_num_proc)


# --------------------------------------------------------------------------- log-probs and the implicit reward


def completion_logps(model, dataset, pad_token_id: int, batch_size: int = 8, disable_adapter: bool = False):
    """(chosen, rejected): `log pi(answer | prompt)` summed over each answer's tokens, EOS included, in
    evaluation mode without gradients, batched and padded as TRL's collator pads. `disable_adapter`:
    the PEFT model's base (the reference of a LoRA run)."""
    import contextlib

    from trl.trainer.dpo_trainer import DataCollatorForPreference  # deferred: TRL is slow to import

    collate = DataCollatorForPreference(pad_token_id=pad_token_id)
    rows = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]) + len(rows[i]["chosen_ids"]))
    chosen, rejected = torch.empty(len(rows), dtype=torch.float64), torch.empty(len(rows), dtype=torch.float64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    context = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    with torch.no_grad(), context:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([rows[i] for i in idx])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            labels, mask = batch["input_ids"][:, 1:].to(device), batch["completion_mask"][:, 1:].to(device)
            sums = torch.stack([  # one row at a time: the float32 log-softmax of a whole batch is large
                (torch.log_softmax(row.float(), dim=-1).gather(-1, lab[:, None])[:, 0] * m).sum()
                for row, lab, m in zip(logits[:, :-1], labels, mask)
            ]).double().cpu()
            chosen[idx], rejected[idx] = sums[: len(idx)], sums[len(idx) :]
    model.train(was_training)
    return chosen, rejected


def implicit_reward_metrics(policy: tuple, reference: tuple, beta: float, gaps=None, length_j=None,
                            length_k=None) -> dict:
    """The implicit DPO reward `beta * (log pi - log pi_ref)` of each answer, as `pair_metrics` (accuracy:
    share of pairs with the chosen answer's reward strictly above; mean margin; by gap; length baseline),
    plus the share of ties, the mean rewards of each side and `likelihood_accuracy`, the share of pairs
    whose chosen answer the policy alone finds more likely (without its reference: length-biased)."""
    pol_j, pol_k = (torch.as_tensor(x, dtype=torch.float64) for x in policy)
    ref_j, ref_k = (torch.as_tensor(x, dtype=torch.float64) for x in reference)
    r_j, r_k = beta * (pol_j - ref_j), beta * (pol_k - ref_k)
    metrics = pair_metrics(r_j, r_k, gaps, length_j, length_k)
    n = len(r_j)
    metrics.update({  # ties compared as pair_metrics compares (float32), so accuracy + ties + wrong way = 1
        "ties": (r_j.float() == r_k.float()).double().mean().item() if n else float("nan"),
        "rewards_chosen": r_j.mean().item() if n else float("nan"),
        "rewards_rejected": r_k.mean().item() if n else float("nan"),
        "likelihood_accuracy": (pol_j > pol_k).double().mean().item() if n else float("nan"),
    })
    return metrics


def pair_lengths(dataset) -> tuple[list[int], list[int]]:
    """Answer lengths in tokens (EOS included), for the "longer answer wins" baseline."""
    return [len(ids) for ids in dataset["chosen_ids"]], [len(ids) for ids in dataset["rejected_ids"]]


def evaluate_pairs(model, dataset, reference: tuple, beta: float, pad_token_id: int, batch_size: int = 8,
                   policy: tuple | None = None) -> dict:
    """`implicit_reward_metrics` of `model` (or of its already computed log-probs `policy`) on a
    `tokenize_pairs` dataset, against the reference log-probs `reference`."""
    if policy is None:
        policy = completion_logps(model, dataset, pad_token_id, batch_size)
    length_j, length_k = pair_lengths(dataset)
    return implicit_reward_metrics(policy, reference, beta, list(dataset["gap"]), length_j, length_k)


def format_metrics(metrics: dict) -> str:
    """The reward stage's block, with the DPO figures after it."""
    extra = (f"  ties {metrics['ties']:.3f}, mean reward chosen {metrics['rewards_chosen']:.4f} / rejected "
             f"{metrics['rewards_rejected']:.4f}; the policy's likelihood prefers chosen: "
             f"{metrics['likelihood_accuracy']:.3f}")
    return format_pair_metrics(metrics) + "\n" + extra


# --------------------------------------------------------------------------- trainer


def build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset=None, peft_config=None):
    """TRL's `DPOTrainer` on `tokenize_pairs` datasets, with `stackllama.hf_trainer`'s additions."""
    # deferred: TRL (and hf_trainer, which imports transformers) load only when a trainer is built
    from trl import DPOTrainer

    from .hf_trainer import AtomicCheckpointMixin

    class StackDPOTrainer(AtomicCheckpointMixin, DPOTrainer):
        """`DPOTrainer` that takes the pairs tokenized by `tokenize_pairs` as they are, with the project's
        checkpoints (staged, marked complete, `latest` resume) and NaN/inf stop."""

        stage = "dpo"

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:  # tokenized here, over-long pairs dropped and counted
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return StackDPOTrainer(model=model, args=training_args, train_dataset=train_dataset.remove_columns("gap"),
                           eval_dataset=eval_dataset.remove_columns("gap") if eval_dataset is not None else None,
                           processing_class=tokenizer, peft_config=peft_config)


# --------------------------------------------------------------------------- a saved DPO model (--eval_only)


def recorded_base_model(path: str) -> str | None:
    results = Path(path) / RESULTS_FILE
    return json.loads(results.read_text()).get("base_model") if results.is_file() else None


def load_saved_policy(path: str, ref_model: str | None = None, dtype: str | None = None,
                      trust_remote_code: bool = False):
    """(policy, reference, tokenizer) of a saved DPO model. `reference` is None for a LoRA adapter with no
    `ref_model`: its base, the adapter disabled, is the reference (as in training)."""
    from transformers import AutoModelForCausalLM  # deferred: slow to import

    run_layout.check_model_dir(path, "DPO model", "--model_name_or_path")
    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    reference = None
    try:
        if run_layout.is_adapter(path):
            from peft import PeftModel  # deferred: only an adapter needs peft

            policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter_base(path), **kwargs), path)
        else:
            policy = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            ref_model = ref_model or recorded_base_model(path)
            if ref_model is None:
                raise MissingInputError(f"{path} holds full weights and records no base model: pass "
                                        "--ref_model_name_or_path (the SFT model DPO started from)")
        if ref_model is not None:
            reference = AutoModelForCausalLM.from_pretrained(ref_model, **kwargs)
    except (OSError, ValueError) as error:
        if isinstance(error, MissingInputError):
            raise
        raise ModelLoadError(f"could not load the DPO model {path!r} or its reference: {error}") from error
    return policy, reference, load_tokenizer(path, trust_remote_code=trust_remote_code)
