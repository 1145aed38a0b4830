"""Training throughput and padding of SFT with packing on vs off, same data, model and block length.

    python benchmarks/sft_packing.py                                   # tiny model, runs/tiny/data
    python benchmarks/sft_packing.py --data_dir /tmp/sample_data --steps 30 --max_length 512
    python benchmarks/sft_packing.py --model_name_or_path huggyllama/llama-7b --use_peft ...

Packing on = the recipe (`packing_strategy="wrapped"`: texts joined by EOS, full blocks of
`max_length`); off = one text per row, truncated to `max_length`, padded to the longest row of
each batch. For each it prints text tokens/s (padding excluded), positions/s (padding
included), the non-pad share of the batches and, for packing off, the share of text tokens
lost to truncation. The first `--warmup` steps are not timed. Figures, not pass/fail.
"""

from __future__ import annotations

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="runs/tiny/data")
    parser.add_argument("--model_name_or_path", default=None, help="default: the tiny model, built in a temp folder")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--use_peft", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    return parser.parse_args()


def run(mode: str, opts, base: str, workdir: Path) -> dict:
    from transformers import TrainerCallback
    from trl import ModelConfig, SFTConfig

    from stackllama.modeling import load_model, load_tokenizer, lora_config
    from stackllama.sft import SFTScriptArguments, _sft_trainer_class, load_sft_datasets

    packing = mode == "on"
    args = SFTConfig(
        output_dir=str(workdir / f"packing-{mode}"), packing=packing, packing_strategy="wrapped",
        max_length=opts.max_length, per_device_train_batch_size=opts.batch_size, max_steps=opts.steps,
        learning_rate=opts.learning_rate, bf16=opts.bf16, activation_checkpointing=False, report_to=[],
        save_strategy="no", logging_steps=10**6, disable_tqdm=True, dataloader_pin_memory=False, seed=42,
    )
    model_args = ModelConfig(model_name_or_path=base, use_peft=opts.use_peft)
    tokenizer = load_tokenizer(base)
    model = load_model(model_args, tokenizer)
    train, _ = load_sft_datasets(SFTScriptArguments(data_dir=opts.data_dir, eval_fraction=0.0), seed=42)
    text_tokens = sum(len(tokenizer(t + tokenizer.eos_token)["input_ids"]) for t in train["text"])

    counts = {"real": 0, "positions": 0, "steps": 0, "t0": None, "t1": None}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if state.global_step == opts.warmup:
                counts["t0"] = now
            counts["t1"] = now

    base_class = _sft_trainer_class()

    class CountingTrainer(base_class):
        def training_step(self, model, inputs, *rest, **kwargs):
            if self.state.global_step >= opts.warmup:
                mask = inputs.get("attention_mask")
                real = int(mask.sum()) if mask is not None else int((inputs["input_ids"] != tokenizer.pad_token_id).sum())
                counts["real"] += real
                counts["positions"] += inputs["input_ids"].numel()
                counts["steps"] += 1
            return super().training_step(model, inputs, *rest, **kwargs)

    trainer = CountingTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                              peft_config=lora_config(model_args), callbacks=[Timer()])
    prepared_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    trainer.train()
    seconds = counts["t1"] - counts["t0"]
    return {
        "mode": mode,
        "rows": len(trainer.train_dataset),
        "timed_steps": counts["steps"],
        "seconds": seconds,
        "tokens_per_s": counts["real"] / seconds,
        "positions_per_s": counts["positions"] / seconds,
        "non_pad_share": counts["real"] / counts["positions"],
        "tokens_kept_share": prepared_tokens / text_tokens,
    }


def main() -> None:
    opts = parse()
    logging.basicConfig(level=logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    if opts.steps <= opts.warmup:
        sys.exit("benchmarks/sft_packing.py: error: --steps must exceed --warmup")
    from stackllama.data.loading import check_data_dir

    try:
        check_data_dir(opts.data_dir)
    except FileNotFoundError as error:
        sys.exit(f"benchmarks/sft_packing.py: error: {error}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base = opts.model_name_or_path
        if base is None:
            from stackllama.tiny_model import build_tiny_model_from_data

            base = str(build_tiny_model_from_data(workdir / "base", opts.data_dir))
        results = [run(mode, opts, base, workdir) for mode in ("on", "off")]

    print(f"\nSFT packing benchmark: model {opts.model_name_or_path or 'tiny default'}, data {opts.data_dir}, "
          f"max_length {opts.max_length}, batch {opts.batch_size}, {opts.steps - opts.warmup} timed steps "
          f"(torch threads {__import__('torch').get_num_threads()})")
    header = f"{'packing':<8} {'rows':>6} {'s/step':>7} {'text tok/s':>11} {'positions/s':>12} {'non-pad':>8} {'tokens kept':>12}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['mode']:<8} {r['rows']:>6} {r['seconds'] / r['timed_steps']:>7.3f} {r['tokens_per_s']:>11,.0f} "
              f"{r['positions_per_s']:>12,.0f} {r['non_pad_share']:>8.1%} {r['tokens_kept_share']:>12.1%}")
    on, off = results
    print(f"\npacking on trains {on['tokens_per_s'] / off['tokens_per_s']:.2f}x the text tokens per second of packing "
          f"off; off keeps {off['tokens_kept_share']:.0%} of the text tokens (the rest is truncated away).")


if __name__ == "__main__":
    main()
