"""Reward modeling: the pieces behind `scripts/reward_modeling.py`.

The reward model is the SFT model with a one-output sequence-classification head: it
reads `Question: q\\n\\nAnswer: a<eos>` and returns a scalar, taken at the last non-pad
token (the EOS). It is trained on the `reward` pairs with the pairwise loss
`-logsigmoid(r_j - r_k)` (`response_j` preferred), which is exactly TRL's `RewardTrainer`
once a pair is mapped to its `chosen` / `rejected` form, so TRL does the training.

What is added here:
- pairs are tokenized up front so that pairs longer than `max_length` are dropped *and
  counted* (TRL drops them silently);
- `evaluate_pairs` reports accuracy, mean margin and accuracy by `pm_score` gap (1, 2, 3+),
  beside the "longer answer wins" baseline that a length-only model would reach;
- `load_reward_model` / `score_texts` load a saved model (full weights or a LoRA adapter)
  and score text, for `--eval_only` and for the PPO stage;
- `build_trainer`: TRL's `RewardTrainer` with the project's checkpoints (staged, marked
  complete, `--resume_from_checkpoint latest`) and NaN/inf stop (`stackllama.hf_trainer`).

The saved model's README.md is `stackllama.model_card.write_reward_card`; `--merge` is
`stackllama.merge.save_full_weights`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import run_layout
from .data.template import format_example
from .modeling import adapter_base, load_tokenizer, torch_dtype

logger = logging.getLogger(__name__)

RESULTS_FILE = run_layout.REWARD_RESULTS  # written last: its presence marks a completed stage
GAP_BUCKETS = ("1", "2", "3+")


@dataclass
class RewardScriptArguments:
    """Arguments of `scripts/reward_modeling.py` beside TRL's `RewardConfig` and `ModelConfig`."""

    data_dir: str = field(
        default="runs/tiny/data",
        metadata={"help": "Output folder of scripts/prepare_data.py, or a Hub dataset id with the data/<subset> layout."},
    )
    train_subset: str = field(default="reward", metadata={"help": "Paired subset to train on."})
    eval_subset: str = field(default="evaluation", metadata={"help": "Paired subset to evaluate on (held out)."})
    max_train_pairs: int | None = field(default=None, metadata={"help": "Train on at most this many pairs "
                                                                        "(the recipe: 100000)."})
    max_eval_pairs: int | None = field(default=None, metadata={"help": "Evaluate on at most this many pairs "
                                                                       "(the recipe: 50000)."})
    eval_only: bool = field(default=False, metadata={
        "help": "Only evaluate a saved reward model (--model_name_or_path, default: output_dir); no training."})
    eval_before_training: bool = field(default=True, metadata={
        "help": "Evaluate the untrained model (random score head) first, as the baseline."})
    merge: bool = field(default=False, metadata={
        "help": "Also write merged full weights (LoRA merged into a 16/32-bit base) to --merged_output_dir."})
    merged_output_dir: str | None = field(default=None, metadata={
        "help": "Where --merge writes the full model; default: <output_dir>-merged."})
    merge_dtype: str = field(default="float32", metadata={"help": "dtype of the merged weights."})


# --------------------------------------------------------------------------- data


def reward_text(question: str, answer: str, eos_token: str) -> str:
    """What the reward model reads: the shared template, then EOS, where the score is taken."""
    return format_example(question, answer) + eos_token


def tokenize_pairs(dataset, tokenizer, max_length: int | None, num_proc: int | None = None):
    """`chosen_ids` / `rejected_ids` (response_j / response_k) and the `pm_score` gap of every pair.

    Pairs where either side is longer than `max_length` tokens are dropped, not truncated
    (a truncated answer would be judged on text the model never sees the end of).
    Returns `(dataset, dropped)`.
    """
    eos = tokenizer.eos_token
    has_scores = "pm_score_j" in dataset.column_names

    def tokenize(batch):
        chosen = tokenizer([reward_text(q, a, eos) for q, a in zip(batch["question"], batch["response_j"])])
        rejected = tokenizer([reward_text(q, a, eos) for q, a in zip(batch["question"], batch["response_k"])])
        gaps = ([j - k for j, k in zip(batch["pm_score_j"], batch["pm_score_k"])] if has_scores
                else [-1] * len(batch["question"]))
        return {"chosen_ids": chosen["input_ids"], "rejected_ids": rejected["input_ids"], "gap": gaps}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                            desc="Tokenizing pairs")
    if max_length is None:
        return tokenized, 0
    kept = tokenized.filter(lambda ex: len(ex["chosen_ids"]) <= max_length and len(ex["rejected_ids"]) <= max_length,
                            num_proc=num_proc, desc=f"Dropping pairs > {max_length} tokens")
    return kept, len(tokenized) - len(kept)


# --------------------------------------------------------------------------- scoring


def pad_right(sequences: list[list[int]], pad_token_id: int):
    """(input_ids, attention_mask) with right padding, as the reward trainer's collator pads."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def score_ids(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 16):
    """The reward of each token-id sequence (a 1-D float tensor), in batches, without gradients."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths: less padding
    scores = torch.empty(len(sequences))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_right([sequences[i] for i in idx], pad_token_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scores[idx] = logits[:, 0].float().cpu()
    model.train(was_training)
    return scores


def score_texts(model, tokenizer, texts: list[str], batch_size: int = 16, add_eos: bool = True):
    """Rewards of full texts (`Question: ...\\n\\nAnswer: ...`); EOS appended as in training."""
    suffix = tokenizer.eos_token if add_eos else ""
    sequences = [tokenizer(t if t.endswith(suffix) else t + suffix)["input_ids"] for t in texts]
    return score_ids(model, sequences, tokenizer.pad_token_id, batch_size)


def pairwise_loss(rewards_j, rewards_k):
    """`-logsigmoid(r_j - r_k)` averaged over pairs: the loss TRL's RewardTrainer minimises."""
    return -F.logsigmoid(rewards_j - rewards_k).mean()


def pair_metrics(rewards_j, rewards_k, gaps=None, length_j=None, length_k=None) -> dict:
    """Accuracy (share with r_j > r_k), mean margin, accuracy per pm_score gap, length baseline."""
    rewards_j, rewards_k = torch.as_tensor(rewards_j, dtype=torch.float), torch.as_tensor(rewards_k, dtype=torch.float)
    correct = (rewards_j > rewards_k).float()
    metrics = {
        "pairs": len(correct),
        "accuracy": correct.mean().item() if len(correct) else float("nan"),
        "mean_margin": (rewards_j - rewards_k).mean().item() if len(correct) else float("nan"),
    }
    if gaps is not None:
        gaps = torch.as_tensor(gaps)
        by_gap = {}
        for bucket, mask in (("1", gaps == 1), ("2", gaps == 2), ("3+", gaps >= 3)):
            n = int(mask.sum())
            by_gap[bucket] = {"pairs": n, "accuracy": correct[mask].mean().item() if n else None}
        metrics["accuracy_by_gap"] = by_gap
    if length_j is not None:
        lj, lk = torch.as_tensor(length_j, dtype=torch.float), torch.as_tensor(length_k, dtype=torch.float)
        metrics["longer_answer_baseline"] = ((lj > lk).float() + 0.5 * (lj == lk).float()).mean().item()
    return metrics


def evaluate_pairs(model, tokenizer, tokenized, batch_size: int = 16) -> dict:
    """`pair_metrics` of a model on a `tokenize_pairs` dataset."""
    chosen, rejected = list(tokenized["chosen_ids"]), list(tokenized["rejected_ids"])
    scores = score_ids(model, chosen + rejected, tokenizer.pad_token_id, batch_size)
    n = len(chosen)
    return pair_metrics(scores[:n], scores[n:], gaps=list(tokenized["gap"]),
                        length_j=[len(c) for c in chosen], length_k=[len(r) for r in rejected])


# --------------------------------------------------------------------------- trainer


def build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset=None, peft_config=None):
    """TRL's `RewardTrainer` (the pairwise loss) with `stackllama.hf_trainer`'s additions."""
    # deferred: TRL (and hf_trainer, which imports transformers) load only when a trainer is built
    from trl import RewardTrainer

    from .hf_trainer import AtomicCheckpointMixin

    class StackRewardTrainer(AtomicCheckpointMixin, RewardTrainer):
        stage = "reward"

    trainer = StackRewardTrainer(model=model, args=training_args, train_dataset=train_dataset,
                                 eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=peft_config)
    restore_score_head_dtype(trainer.model, training_args)
    return trainer


def restore_score_head_dtype(model, training_args) -> int:
    """Casts a score head that TRL moved to bf16 back to the dtype of the hidden states it reads.

    On an 8/4-bit base, TRL's trainers cast every trainable parameter to bf16 (QLoRA's advice for
    LoRA weights). LoRA layers cast their input themselves; the score head, trained in full as a
    plain `nn.Linear`, does not, so without bf16 autocast (`--bf16 false`, the CPU default) the
    first step failed with "expected m1 and m2 to have the same dtype". Returns how many were cast.
    """
    if training_args.bf16 or training_args.fp16:
        return 0  # autocast casts the head's input
    # the frozen floating-point weights (norms, embeddings; the quantized ones are integers) have the
    # dtype of the hidden states: fp32 after prepare_model_for_kbit_training
    hidden_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad), None)
    if hidden_dtype is None:
        return 0
    cast = 0
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" not in name and param.dtype != hidden_dtype and param.is_floating_point():
            param.data = param.data.to(hidden_dtype)
            cast += 1
    return cast


# --------------------------------------------------------------------------- models


def load_reward_model(path: str, dtype: str | None = None, trust_remote_code: bool = False, device=None):
    """(model, tokenizer) of a saved reward model: full weights, or a LoRA adapter over its base.

    Works for the stage's own output and for any one-label sequence classifier on the Hub. With an
    accelerator `device`, the weights are read straight onto it (`device_map`) rather than into host
    memory first: eight processes of a node would otherwise each hold a full copy in RAM at once.
    """
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(path, task="seq_cls", trust_remote_code=trust_remote_code)
    kwargs = dict(num_labels=1, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    if device is not None and torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}
    if run_layout.is_adapter(path):
        # deferred: only an adapter needs peft
        from peft import PeftModel

        model = AutoModelForSequenceClassification.from_pretrained(adapter_base(path), **kwargs)
        model = PeftModel.from_pretrained(model, path)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def format_metrics(metrics: dict) -> str:
    """One readable block of evaluation figures."""
    lines = [f"pairs {metrics['pairs']}: accuracy {metrics['accuracy']:.3f}, mean margin {metrics['mean_margin']:.3f}"]
    for bucket, m in metrics.get("accuracy_by_gap", {}).items():
        acc = "n/a" if m["accuracy"] is None else f"{m['accuracy']:.3f}"
        lines.append(f"  pm_score gap {bucket:>2}: accuracy {acc} ({m['pairs']} pairs)")
    if "longer_answer_baseline" in metrics:
        lines.append(f"  'longer answer wins' baseline: {metrics['longer_answer_baseline']:.3f}")
    return "\n".join(lines)

