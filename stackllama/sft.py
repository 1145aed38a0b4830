"""Supervised fine-tuning: the pieces behind `scripts/sft.py`.

The stage trains a causal LM on `Question: <question>\\n\\nAnswer: <response_j>` texts from
the `finetune` subset with TRL's `SFTTrainer`:

- packing as in the recipe (`packing=True, packing_strategy="wrapped"`): texts tokenized
  with BOS, joined by EOS and cut into blocks of exactly `max_length` tokens; the short
  block left at the end of each map batch is dropped (the recipe's `ConstantLengthDataset`
  did the same), so no padding is ever trained on. The share of non-pad tokens of every
  batch is logged as `non_pad_share`;
- a held-out slice chosen by question id (no question in both train and eval), evaluated
  before and after training (loss, perplexity);
- LoRA / 8-bit / 4-bit through `stackllama.modeling`;
- checkpoints every `save_steps` that a kill cannot corrupt, `--resume_from_checkpoint latest`,
  and a stop on a NaN/inf loss or gradient (`stackllama.hf_trainer`);
- without `--model_name_or_path`, the tiny default model (`stackllama.tiny_model`) is built
  beside the output folder and trained from scratch.

The saved model's README.md is `stackllama.model_card.write_sft_card`; `--merge` is
`stackllama.merge.save_full_weights`.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from . import run_layout
from .data.loading import check_data_dir, load_pairs
from .data.template import format_example
from .errors import InputError
from .tiny_model import build_tiny_model_from_data, is_built

logger = logging.getLogger(__name__)

RESULTS_FILE = run_layout.SFT_RESULTS  # written last: its presence marks a completed SFT stage


@dataclass
class SFTScriptArguments:
    """Arguments of `scripts/sft.py` beside TRL's `SFTConfig` (training) and `ModelConfig` (model)."""

    data_dir: str = field(
        default="runs/tiny/data",
        metadata={"help": "Output folder of scripts/prepare_data.py, or a Hub dataset id with the data/<subset> layout."},
    )
    subset: str = field(default="finetune", metadata={"help": "Which paired subset to train on."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset instead of loading it (needs --max_steps)."}
    )
    shuffle_buffer: int = field(default=5000, metadata={"help": "Shuffle buffer size when streaming."})
    eval_fraction: float = field(
        default=0.005,
        metadata={"help": "Share of questions held out for evaluation (split by question id, deterministic)."},
    )
    max_eval_samples: int | None = field(
        default=4000, metadata={"help": "At most this many held-out pairs are evaluated."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on at most this many pairs."})
    eval_before_training: bool = field(
        default=True, metadata={"help": "Evaluate the untrained model first (logged as eval_before_*)."}
    )
    merge: bool = field(
        default=False,
        metadata={"help": "Also write merged full weights (LoRA merged into a 16/32-bit base) to --merged_output_dir."},
    )
    merged_output_dir: str | None = field(
        default=None, metadata={"help": "Where --merge writes the full model; default: <output_dir>-merged."}
    )
    merge_dtype: str = field(
        default="float32", metadata={"help": "dtype of the merged weights (float32, bfloat16, float16)."}
    )
    tiny_model_dir: str | None = field(
        default=None,
        metadata={
            "help": "Without --model_name_or_path: where the tiny default model is built (or reused); "
            "default: <parent of output_dir>/base."
        },
    )
    tiny_model_config: str | None = field(
        default=None, metadata={"help": "Folder of the tiny model's config.json; default: the repo's configs/tiny_model."}
    )
    tiny_model_seed: int = field(default=42, metadata={"help": "Seed of the tiny model's initialisation."})


# --------------------------------------------------------------------------- data


def in_eval_split(qid, fraction: float, seed: int = 0) -> bool:
    """Deterministic by question: the same question is always on the same side, in memory or streaming."""
    if fraction <= 0:
        return False
    return zlib.crc32(f"{seed}:{qid}".encode()) % 1_000_000 < fraction * 1_000_000


def to_text(example: dict) -> dict:
    """One SFT text from a pair: the shared template with the preferred answer."""
    return {"text": format_example(example["question"], example["response_j"])}


def load_sft_datasets(args: SFTScriptArguments, seed: int = 42):
    """(train, eval) datasets with one `text` column; eval is None when `eval_fraction` is 0.

    `seed` shuffles the training pairs (before packing, so that neighbouring pairs of one question
    do not share blocks); the held-out questions do not depend on it.
    """
    check_data_dir(args.data_dir)
    dataset = load_pairs(args.data_dir, args.subset, streaming=args.streaming)
    columns = dataset.column_names or ["qid", "question", "date", "metadata", "response_j", "response_k"]
    missing = {"qid", "question", "response_j"} - set(columns)
    if missing:
        raise InputError(f"{args.data_dir} ({args.subset}): missing columns {sorted(missing)}; found {columns}")
    if not 0 <= args.eval_fraction < 1:
        raise InputError(f"--eval_fraction must be in [0, 1), got {args.eval_fraction}")

    def is_eval(example):  # independent of the training seed: every run holds out the same questions
        return in_eval_split(example["qid"], args.eval_fraction)

    train = dataset.filter(lambda example: not is_eval(example))
    eval_ = dataset.filter(is_eval) if args.eval_fraction > 0 else None
    if args.streaming:
        train = train.shuffle(seed=seed, buffer_size=args.shuffle_buffer)
        if args.max_train_samples is not None:
            train = train.take(args.max_train_samples)
        if eval_ is not None:
            # Held in memory: evaluated many times, it would otherwise be re-streamed (and re-filtered) each time
            from datasets import Dataset  # deferred, as in data.loading: heavy

            if args.max_eval_samples is None:
                raise InputError("--streaming needs --max_eval_samples (the held-out pairs are kept in memory)")
            rows = list(eval_.take(args.max_eval_samples))
            if not rows:
                logger.warning("eval_fraction %s held out no question; evaluation is skipped", args.eval_fraction)
                eval_ = None
            else:
                eval_ = Dataset.from_list(rows, features=dataset.features)
    else:
        if len(train) == 0:
            raise InputError(f"{args.data_dir} ({args.subset}): no training pairs left after the eval split")
        train = train.shuffle(seed=seed)
        if args.max_train_samples is not None:
            train = train.select(range(min(args.max_train_samples, len(train))))
        if eval_ is not None:
            if len(eval_) == 0:
                logger.warning("eval_fraction %s held out no question; evaluation is skipped", args.eval_fraction)
                eval_ = None
            elif args.max_eval_samples is not None and len(eval_) > args.max_eval_samples:
                eval_ = eval_.select(range(args.max_eval_samples))
    train = train.map(to_text, remove_columns=columns)
    if eval_ is not None:
        eval_ = eval_.map(to_text, remove_columns=columns)
    return train, eval_


# --------------------------------------------------------------------------- trainer


def _sft_trainer_class():
    # deferred: TRL (and hf_trainer, which imports transformers) load only when a trainer is built
    from trl import SFTTrainer

    from .hf_trainer import AtomicCheckpointMixin

    class StackSFTTrainer(AtomicCheckpointMixin, SFTTrainer):
        """`SFTTrainer` that drops short packed blocks and logs the non-pad share of each batch, with
        the project's checkpoints (staged, marked complete, `latest` resume) and NaN/inf stop."""

        stage = "sft"

        def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
            dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
            if packing and args.packing_strategy == "wrapped":
                block = args.max_length
                dataset = dataset.filter(lambda example: len(example["input_ids"]) == block)
                if hasattr(dataset, "__len__") and len(dataset) == 0:
                    raise InputError(
                        f"the {dataset_name} dataset holds fewer than max_length={block} tokens, so packing yields "
                        "no full block: lower --max_length or add data (for eval: raise --eval_fraction)"
                    )
            return dataset

        def log(self, logs, start_time=None):
            for key, value in list(logs.items()):
                if key.startswith("eval") and key.endswith("_loss"):
                    logs[key[: -len("loss")] + "perplexity"] = perplexity(value)
            super().log(logs, start_time)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["non_pad_share"].append(non_pad_share(inputs, self._tokenizer.pad_token_id))
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return StackSFTTrainer


def non_pad_share(inputs: dict, pad_token_id: int | None) -> float:
    """Share of the batch's token positions that hold text (attention mask, else non-pad ids)."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return float(mask.float().mean())
    ids = inputs["input_ids"]
    if pad_token_id is None:
        return 1.0
    return float((ids != pad_token_id).float().mean())


def build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset=None, peft_config=None, callbacks=None):
    """The SFT trainer (`trl.SFTTrainer` with the two additions above)."""
    if training_args.packing and training_args.packing_strategy != "wrapped":
        logger.warning(
            "packing_strategy=%r keeps documents apart (padding-free, best-fit); the recipe's packing is 'wrapped'",
            training_args.packing_strategy,
        )
    trainer_class = _sft_trainer_class()
    return trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def evaluate_untrained(trainer) -> dict:
    """Held-out loss and perplexity of the model before its first step (the trainer's `before_training`:
    run inside `train()`, so the model is evaluated as prepared for training; see `stackllama.hf_trainer`)."""
    loss = trainer.evaluate(metric_key_prefix="eval_before")["eval_before_loss"]
    logger.info("untrained eval loss %.4f (perplexity %.1f)", loss, perplexity(loss))
    return {"eval_loss_before": loss, "perplexity_before": perplexity(loss)}


def check_training_args(training_args, script_args: SFTScriptArguments) -> None:
    """Clear errors for option combinations that would otherwise fail deep inside the trainer."""
    if script_args.streaming and training_args.max_steps <= 0:
        raise InputError("--streaming needs --max_steps: a streamed dataset has no length to derive epochs from")
    if training_args.packing and not training_args.max_length:
        raise InputError("--packing needs --max_length (the block length)")


# --------------------------------------------------------------------------- base model


def resolve_base_model(script_args: SFTScriptArguments, model_args, training_args) -> str:
    """`--model_name_or_path`, or the tiny default model built (once) from the finetune texts."""
    if model_args.model_name_or_path:
        return model_args.model_name_or_path
    target = Path(script_args.tiny_model_dir) if script_args.tiny_model_dir else run_layout.default_tiny_model_dir(training_args.output_dir)
    if not is_built(target):
        logger.info("no --model_name_or_path: building the tiny default model in %s", target)
    # deferred: imports torch
    from accelerate import PartialState

    with PartialState().main_process_first():  # built once, by the main process; the others then reuse it
        build_tiny_model_from_data(
            target, script_args.data_dir, config=script_args.tiny_model_config, seed=script_args.tiny_model_seed
        )
    model_args.model_name_or_path = str(target)
    return str(target)


# --------------------------------------------------------------------------- results


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")

