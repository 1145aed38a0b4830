"""Throughput of the reward-model stage: pairs/s for training and for scoring.

    python benchmarks/reward_modeling.py                         # tiny default model, bundled data, CPU
    python benchmarks/reward_modeling.py --model runs/tiny/sft-merged --data runs/tiny/data
    python benchmarks/reward_modeling.py --model huggyllama/llama-7b --dtype bfloat16 --max_length 512

Training is TRL's RewardTrainer on `--pairs` reward pairs (after the length filter) for
one epoch; scoring is `evaluate_pairs` (no gradients) on the same pairs. Prints pairs/s and
tokens/s for both.
"""

from __future__ import annotations

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model folder or Hub id (default: the tiny model, built from the data).")
    parser.add_argument("--data", help="prepare_data.py output (default: the bundled sample, prepared here).")
    parser.add_argument("--pairs", type=int, default=64, help="Pairs to train and score on.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from stackllama.data.loading import load_pairs
    from stackllama.data.prepare import PrepareOptions, bundled_dumps, prepare_dataset
    from stackllama.modeling import load_tokenizer, torch_dtype
    from stackllama.reward_modeling import evaluate_pairs, tokenize_pairs
    from stackllama.tiny_model import build_tiny_model_from_data

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or prepare_dataset(bundled_dumps(), Path(tmp) / "data", PrepareOptions(progress=False)) and \
            str(Path(tmp) / "data")
        model_path = args.model or str(build_tiny_model_from_data(Path(tmp) / "base", data))
        tokenizer = load_tokenizer(model_path, task="seq_cls")
        pairs, dropped = tokenize_pairs(load_pairs(data, "reward"), tokenizer, args.max_length)
        pairs = pairs.select(range(min(args.pairs, len(pairs))))
        tokens = sum(len(c) + len(r) for c, r in zip(pairs["chosen_ids"], pairs["rejected_ids"]))
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1,
                                                                   dtype=torch_dtype(args.dtype))
        model.config.pad_token_id = tokenizer.pad_token_id
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        print(f"model {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {args.dtype}, "
              f"{device}, {torch.get_num_threads()} threads); {len(pairs)} pairs, {tokens / len(pairs):.0f} tokens per "
              f"pair (max_length {args.max_length})")

        evaluate_pairs(model, tokenizer, pairs.select(range(min(4, len(pairs)))), args.batch_size)  # warm-up
        start = time.perf_counter()
        evaluate_pairs(model, tokenizer, pairs, args.batch_size)
        seconds = time.perf_counter() - start
        print(f"scoring : {len(pairs) / seconds:8.1f} pairs/s  {tokens / seconds:10.0f} tokens/s  ({seconds:.1f} s)")

        config = RewardConfig(output_dir=str(Path(tmp) / "out"), per_device_train_batch_size=args.batch_size,
                              num_train_epochs=1, report_to="none", save_strategy="no", logging_strategy="no",
                              max_length=None, bf16=args.dtype == "bfloat16", use_cpu=device == "cpu",
                              disable_tqdm=True, dataloader_pin_memory=False)
        trainer = RewardTrainer(model=model, args=config, train_dataset=pairs.remove_columns("gap"),
                                processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        print(f"training: {len(pairs) / seconds:8.1f} pairs/s  {tokens / seconds:10.0f} tokens/s  ({seconds:.1f} s, "
              f"batch {args.batch_size} pairs)")


if __name__ == "__main__":
    main()
