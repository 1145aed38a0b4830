"""The flags of `scripts/rloo.py` and `scripts/grpo.py` beside TRL's `RLOOConfig` / `GRPOConfig` and
`ModelConfig`, and the checks of TRL's configs that these stages need."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import run_layout
from ..errors import InputError

ALGORITHMS = (run_layout.RLOO, run_layout.GRPO)
RESULTS_FILES = {run_layout.RLOO: run_layout.RLOO_RESULTS, run_layout.GRPO: run_layout.GRPO_RESULTS}


@dataclass
class OnlineRLScriptArguments:
    """Arguments of `scripts/rloo.py` / `scripts/grpo.py` beside TRL's config and `ModelConfig`
    (`--model_name_or_path` is the policy to start from: the SFT model, full weights)."""

    data_dir: str | None = field(default=None, metadata={
        "help": "Output folder of scripts/prepare_data.py, or a Hub dataset id with the data/<subset> layout. "
                "Default: <run>/data, beside output_dir."})
    subset: str = field(default="rl", metadata={"help": "Paired subset whose questions are the prompts."})
    reward_model_name: str | None = field(default=None, metadata={
        "help": "Reward model (folder or Hub id; full weights or LoRA). Default: the reward stage's output "
                "beside output_dir (<run>/reward)."})
    reward_batch_size: int = field(default=16, metadata={"help": "Texts per reward-model forward pass."})
    reward_fast_path: str = field(default="auto", metadata={
        "help": "As the PPO stage's flag: auto scores the policy's token ids directly when the reward model shares "
                "its tokenizer and re-encoding gives the same ids (checked on the first batch); on: always; off: "
                "always the text pipeline."})
    reward_append_eos: bool = field(default=True, metadata={
        "help": "Append EOS to each text before scoring, as the reward stage trains (its score is read at EOS)."})
    max_prompt_length: int = field(default=512, metadata={
        "help": "Prompts longer than this many tokens are dropped (and counted), as in the recipe's PPO stage."})
    max_prompts: int | None = field(default=None, metadata={
        "help": "Use at most this many prompts (after filtering, a seeded sample)."})
    unique_questions: bool = field(default=False, metadata={
        "help": "One prompt per question. The recipe's PPO keeps one per pair, so questions with more pairs recur."})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads (default: torch's choice). Small models on a shared CPU run best on 1-2."})


def check_training_args(algorithm: str, training_args) -> None:
    """What these stages need of TRL's config, as one-line errors before any model is loaded."""
    if algorithm not in ALGORITHMS:
        raise InputError(f"unknown algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    if not training_args.beta > 0:
        # TRL loads no reference model at beta 0 (GRPO's default since TRL 0.19): no KL penalty, nothing to report
        raise InputError(f"--beta {training_args.beta}: {algorithm.upper()} here needs a KL coefficient > 0, so that "
                         "the SFT model is the reference and the KL to it is penalised and reported")
    if training_args.max_completion_length is None:
        raise InputError("--max_completion_length must be set: the longest answer sampled, in tokens")


def check_prompt_count(prompts: int, training_args, max_prompt_length: int) -> None:
    """A step's prompts (generation batch / num_generations over all processes) must exist."""
    per_step = training_args.generation_batch_size // training_args.num_generations
    if prompts < per_step:
        raise InputError(f"only {prompts} prompts fit in --max_prompt_length {max_prompt_length}; a step samples "
                         f"{training_args.num_generations} answers to each of {per_step} prompts")
