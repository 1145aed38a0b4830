"""The PPO stage: the pieces behind `scripts/rl_ppo.py` (the trainer itself is `stackllama.ppo`).

- `RLScriptArguments`: the script's own flags beside `PPOConfig` and TRL's `ModelConfig`;
- `build_query_dataset`: `Question: q\\n\\nAnswer: ` queries from the `rl` subset, tokenized,
  those longer than `max_prompt_length` tokens dropped and counted;
- `load_policy`: the SFT model (optionally 8/4-bit) with LoRA adapters and a value head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .. import run_layout
from ..data.loading import load_pairs
from ..data.template import format_prompt
from ..errors import InputError
from ..modeling import load_model, lora_config
from ..resume import latest_checkpoint, resolve_resume
from .checkpointing import PREFIX
from .value_head import AutoModelForCausalLMWithValueHead

logger = logging.getLogger(__name__)

RESULTS_FILE, LOG_FILE = run_layout.PPO_RESULTS, run_layout.PPO_LOG


@dataclass
class RLScriptArguments:
    """Arguments of `scripts/rl_ppo.py` beside `stackllama.ppo.PPOConfig` and TRL's `ModelConfig`
    (`--model_name_or_path` is the policy to start from: the SFT model)."""

    data_dir: str = field(default="runs/tiny/data", metadata={
        "help": "Output folder of scripts/prepare_data.py, or a Hub dataset id with the data/<subset> layout."})
    subset: str = field(default="rl", metadata={"help": "Paired subset whose questions are the PPO queries."})
    output_dir: str = field(default="runs/tiny/ppo", metadata={
        "help": "Where the policy (adapter or full weights + value head), checkpoints and logs go."})
    reward_model_name: str | None = field(default=None, metadata={
        "help": "Reward model (folder or Hub id; full weights or LoRA). Default: the reward stage's output "
                "beside output_dir (runs/<run>/reward)."})
    reward_baseline: float = field(default=0.0, metadata={"help": "Subtracted from every reward-model score."})
    reward_batch_size: int = field(default=16, metadata={"help": "Texts per reward-model forward pass."})
    reward_fast_path: str = field(default="auto", metadata={
        "help": "auto: score the policy's token ids directly when the reward model shares its tokenizer and "
                "re-encoding gives the same ids (checked on the first batch); on: always; off: always the text pipeline."})
    reward_append_eos: bool = field(default=True, metadata={
        "help": "Append EOS to each text before scoring, as the reward stage trains (its score is read at EOS)."})
    max_prompt_length: int = field(default=512, metadata={
        "help": "Queries longer than this many tokens are dropped (and counted), as in the recipe."})
    max_queries: int | None = field(default=None, metadata={"help": "Use at most this many queries (after filtering)."})
    unique_questions: bool = field(default=False, metadata={
        "help": "One query per question. The recipe keeps one per pair, so questions with more pairs recur."})
    output_min_length: int = field(default=32, metadata={"help": "Response length is uniform in [min, max)."})
    output_max_length: int = field(default=128, metadata={"help": "Upper bound (excluded) of the response length."})
    save_freq: int | None = field(default=None, metadata={
        "help": "Write a checkpoint output_dir/checkpoint-<n> every this many PPO steps: the policy (adapter or "
                "full weights + value head), optimizer, random states, data position, KL coefficient, score moments."})
    save_total_limit: int | None = field(default=None, metadata={
        "help": "Keep only the newest this many checkpoints (None: keep all)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "`latest`: go on from the newest complete checkpoint in output_dir (start fresh when there is none); "
                "or a checkpoint folder. The resumed run is the run that would have happened without the stop."})
    report_to: str = field(default="none", metadata={
        "help": "Tracker for the statistics: none, wandb, tensorboard (sets PPOConfig.log_with). "
                "A JSONL file of all statistics and sample rows is always written to output_dir."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads (default: torch's choice). Small models on a shared CPU run best on 1-2."})


# --------------------------------------------------------------------------- data


def build_query_dataset(data_dir: str, tokenizer, max_prompt_length: int | None = 512, subset: str = "rl",
                        max_queries: int | None = None, unique_questions: bool = False, seed: int = 0,
                        num_proc: int | None = None):
    """`(dataset, dropped)`: columns `query` (str) and `input_ids` (torch tensors).

    Queries are `format_prompt(question)`; those over `max_prompt_length` tokens are dropped
    and their number returned (the recipe kept prompts under 512 tokens).
    """
    dataset = load_pairs(data_dir, subset)
    if "question" not in dataset.column_names:
        raise InputError(f"{data_dir} ({subset}): no `question` column; found {dataset.column_names}")
    if unique_questions:
        seen: set = set()
        keep = []
        for i, k in enumerate(dataset["question"]):  # qids repeat across sites; the text does not
            if k not in seen:
                seen.add(k)
                keep.append(i)
        dataset = dataset.select(keep)

    def tokenize(batch):
        queries = [format_prompt(q) for q in batch["question"]]
        return {"query": queries, "input_ids": tokenizer(queries)["input_ids"]}

    dataset = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                          desc="Tokenizing queries")
    total = len(dataset)
    if max_prompt_length is not None:
        dataset = dataset.filter(lambda ex: len(ex["input_ids"]) <= max_prompt_length, num_proc=num_proc,
                                 desc=f"Dropping queries > {max_prompt_length} tokens")
    dropped = total - len(dataset)
    if max_queries is not None and len(dataset) > max_queries:
        dataset = dataset.shuffle(seed=seed).select(range(max_queries))
    dataset.set_format(type="torch", columns=["input_ids"], output_all_columns=True)
    return dataset, dropped


# --------------------------------------------------------------------------- models


def load_policy(model_args, tokenizer, trust_remote_code: bool = False):
    """The policy: the SFT model (8/4-bit if asked) + LoRA adapters (`--use_peft`) + a fresh value head.

    With LoRA, the reference policy is the same model with the adapters disabled (no second
    copy); without, `PPOTrainer` keeps a frozen copy.
    """
    model = load_model(model_args, tokenizer, task="causal_lm", trust_remote_code=trust_remote_code)
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    peft_config = lora_config(model_args, task_type="CAUSAL_LM")
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    return AutoModelForCausalLMWithValueHead(model)


# --------------------------------------------------------------------------- outputs


def checkpoint_to_resume(value: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names (None: start fresh).

    A fresh start refuses an output folder that already holds complete checkpoints: they
    belong to an earlier run, and `latest` or `--save_total_limit` would take them for this
    run's (a stale `checkpoint-60` outranks a new `checkpoint-20`)."""
    resume = resolve_resume(value, output_dir, PREFIX)
    stale = latest_checkpoint(output_dir, PREFIX) if resume is None else None
    if stale is not None:
        raise InputError(f"{output_dir} holds checkpoints of an earlier run ({stale.name}): continue it with "
                         "--resume_from_checkpoint latest, or remove them (or choose another --output_dir) to start afresh")
    return resume



def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
