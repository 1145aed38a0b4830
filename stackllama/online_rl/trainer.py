"""The RLOO and GRPO trainers: TRL's `RLOOTrainer` / `GRPOTrainer` with the project's checkpoints and
NaN/inf stop (`stackllama.hf_trainer.AtomicCheckpointMixin`) and the statistics of
`stackllama.online_rl.statistics`; and the run's figures for the results file.

`AtomicCheckpointMixin` fits these trainers as it fits SFT's and the reward model's: in TRL 1.16 both
subclass transformers' `Trainer` with `_save_checkpoint(model, trial)` (they write their model card to
the output folder, then call `Trainer`'s, which writes into the folder `_get_output_dir` names: the
mixin's staging folder), `training_step(model, inputs, num_items_in_batch)` and `Trainer`'s
`_clip_grad_norm(model)`, and they set but never use `_total_train_tokens`, which the mixin carries.
"""

from __future__ import annotations

import math

from .. import run_layout
from ..errors import InputError
from .arguments import check_training_args
from .reward import Score, TRLReward
from .statistics import GRPOStatistics, RLOOStatistics


def trainer_class(algorithm: str):
    """The trainer class of `algorithm` ("rloo" or "grpo")."""
    # deferred: TRL (and hf_trainer, which imports transformers) load only when a trainer is built
    from trl import GRPOTrainer, RLOOTrainer

    from ..hf_trainer import AtomicCheckpointMixin

    if algorithm == run_layout.GRPO:

        class StackGRPOTrainer(AtomicCheckpointMixin, GRPOStatistics, GRPOTrainer):
            stage = run_layout.GRPO

        return StackGRPOTrainer
    if algorithm == run_layout.RLOO:

        class StackRLOOTrainer(AtomicCheckpointMixin, RLOOStatistics, RLOOTrainer):
            stage = run_layout.RLOO

        return StackRLOOTrainer
    raise InputError(f"unknown algorithm {algorithm!r}: expected {run_layout.RLOO} or {run_layout.GRPO}")


def build_trainer(algorithm: str, model, tokenizer, training_args, train_dataset, reward: Score, peft_config=None,
                  reward_name: str = "reward_model"):
    """TRL's trainer of `algorithm` for `model` on `train_dataset` (a `prompt` column).

    `reward` is `score(texts, query_ids, response_ids) -> list[float]`: the stage's
    `stackllama.reward_scoring.RewardFunction`, or any callable with its signature, always through
    `TRLReward`. The reference policy is TRL's: with `peft_config` (LoRA) TRL wraps `model` and reads
    the reference with the adapters disabled (no second copy); without, it loads a frozen copy from the
    policy's own path (`model.config._name_or_path`), so `model` must be the weights saved there.
    """
    check_training_args(algorithm, training_args)
    cls = trainer_class(algorithm)
    return cls(model=model, reward_funcs=TRLReward(reward, tokenizer, name=reward_name), args=training_args,
               train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config)


def done_message(algorithm: str, results: dict) -> str:
    """The stage's last log line."""
    def fmt(value):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    return (f"{algorithm.upper()} done: mean reward {fmt(results.get('reward_first'))} -> "
            f"{fmt(results.get('reward_last'))}, KL {fmt(results.get('kl'))} nats per answer, "
            f"{results.get('tokens_generated', 0):,} tokens sampled")


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def run_summary(trainer, train_output) -> dict:
    """The run's figures from the trainer's log (restored with a checkpoint, so a resumed run reports the
    whole run): reward over the first and the last logged steps (up to 5, a quarter of the log), the
    last KL with PPO's meaning, tokens sampled and how fast."""
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    window = max(1, min(5, len(logged) // 4))
    kls = [entry["objective/kl"] for entry in logged if entry.get("objective/kl") is not None]
    runtime = train_output.metrics.get("train_runtime")
    sampled_now = trainer.tokens_generated - trainer.tokens_at_train_start  # this call's share of a resumed run
    last = logged[-1] if logged else {}
    return {
        "global_step": train_output.global_step,
        "train_loss": train_output.training_loss,
        "train_runtime_s": runtime,
        "tokens_generated": trainer.tokens_generated,
        "tokens_per_s": round(sampled_now / runtime, 2) if runtime else None,
        "reward_first": _mean(entry["reward"] for entry in logged[:window]),
        "reward_last": _mean(entry["reward"] for entry in logged[-window:]),
        "averaged_over_logs": window,
        "kl": last.get("objective/kl"),  # nats per answer, the last logged window (PPO's objective/kl)
        "kl_per_token": last.get("objective/kl_per_token"),
        "kl_max": max(kls) if kls else None,
        "trl_kl": last.get("kl"),  # TRL's own per-token estimate (GRPO: exp(r) - r - 1; RLOO: log pi - log pi_ref)
        "completion_length_last": last.get("completions/mean_length"),
    }
