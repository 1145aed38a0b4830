"""Supervised fine-tuning, the second stage of the StackLLaMA recipe.

Trains a causal LM on `Question: <question>\\n\\nAnswer: <response_j>` from the `finetune`
pairs, with packing (texts joined by EOS into fixed-length blocks), optional LoRA on an
8-bit or 4-bit base, evaluation on held-out questions before and after training, and an
optional merge of the adapter into full weights for the next stages.

CPU, no download (builds the tiny default model from the data beside the output folder):
```bash
python scripts/sft.py --config configs/sft/tiny.yaml
```

The recipe (LLaMA-7B, 8-bit base + LoRA, 8 GPUs):
```bash
accelerate launch --multi_gpu --num_processes 8 scripts/sft.py --config configs/sft/llama-7b.yaml \\
    --model_name_or_path huggyllama/llama-7b --data_dir lvwerra/stack-exchange-paired
```

With `--save_strategy steps --save_steps N`, a checkpoint is written every N steps (staged, then
marked complete and renamed, so a kill never leaves one that resume would trust; `--save_total_limit`
keeps the newest); `--resume_from_checkpoint latest` continues from the newest complete one (or
starts fresh when there is none), `--resume_from_checkpoint <output_dir>/checkpoint-N` from that one.
The untrained model's held-out loss is saved with each checkpoint and reused on resume.

Every flag can also come from the YAML file given with `--config`; the command line wins.
"""

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
import logging
import time

from trl import ModelConfig, SFTConfig

from stackllama import run_layout
from stackllama.hf_trainer import resolve_resume
from stackllama.merge import save_full_weights
from stackllama.model_card import write_sft_card
from stackllama.modeling import (
    count_parameters,
    load_model,
    load_tokenizer,
    lora_config,
)
from stackllama.sft import (
    RESULTS_FILE,
    SFTScriptArguments,
    build_trainer,
    check_training_args,
    evaluate_untrained,
    load_sft_datasets,
    perplexity,
    resolve_base_model,
)
from stackllama.stage import configure_reporting, finish_stage, run_script

logger = logging.getLogger("stackllama.sft")


def main(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> dict:
    start = time.time()
    check_training_args(training_args, script_args)
    configure_reporting(training_args)
    resume = resolve_resume(training_args)  # `latest`: the newest complete checkpoint, None before the first

    # Data: held-out questions for evaluation, the rest for training
    with training_args.main_process_first(desc="loading the SFT data"):
        train_dataset, eval_dataset = load_sft_datasets(script_args, seed=training_args.seed)

    # Model and tokenizer (a Hub id, a folder, or the tiny default model built from the data)
    base_model = resolve_base_model(script_args, model_args, training_args)
    tokenizer = load_tokenizer(
        base_model, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    model = load_model(
        model_args,
        tokenizer,
        trust_remote_code=training_args.trust_remote_code,
        gradient_checkpointing=training_args.activation_checkpointing,
        gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs,
    )

    # Trainer
    trainer = build_trainer(
        model, tokenizer, training_args, train_dataset, eval_dataset, peft_config=lora_config(model_args)
    )
    trainable, total = count_parameters(trainer.model)
    logger.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    results = {
        "base_model": base_model,
        "data_dir": script_args.data_dir,
        "use_peft": model_args.use_peft,
        "load_in_8bit": model_args.load_in_8bit,
        "load_in_4bit": model_args.load_in_4bit,
        "packing": training_args.packing,
        "packing_strategy": training_args.packing_strategy,
        "max_length": training_args.max_length,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
    if eval_dataset is not None and script_args.eval_before_training:
        trainer.before_training = evaluate_untrained  # on a fresh start; a resumed run has it from its checkpoint

    # Train (from the checkpoint when resuming: weights, optimizer, scheduler, RNG, data position)
    train_output = trainer.train(resume_from_checkpoint=resume)
    if eval_dataset is not None and script_args.eval_before_training:
        if "eval_loss_before" in trainer.carried_results:
            results.update({k: trainer.carried_results[k] for k in ("eval_loss_before", "perplexity_before")})
        else:
            logger.warning("%s holds no figures of the untrained model; they are not recomputed on the partly "
                           "trained one", resume)
    results["global_step"] = train_output.global_step
    results["train_loss"] = train_output.training_loss
    results["train_runtime_s"] = train_output.metrics.get("train_runtime")
    results["num_tokens"] = trainer.state.num_input_tokens_seen or trainer._total_train_tokens

    if eval_dataset is not None:
        after = trainer.evaluate()
        results["eval_loss"] = after["eval_loss"]
        results["perplexity"] = perplexity(after["eval_loss"])
        logger.info("trained eval loss %.4f (perplexity %.1f)", results["eval_loss"], results["perplexity"])

    # Save: the full model or the adapter, the tokenizer, a model card
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the logged losses, for the report's plots
    if trainer.is_world_process_zero():
        write_sft_card(training_args.output_dir, base_model, script_args.data_dir, results)

    # Merge: full weights for the reward-model and PPO stages
    if script_args.merge and trainer.is_world_process_zero():
        merged_dir = script_args.merged_output_dir or run_layout.merged(training_args.output_dir.rstrip("/"))
        save_full_weights(tokenizer, training_args.output_dir, merged_dir, model_args.use_peft,
                          base_model=base_model, dtype=script_args.merge_dtype,
                          trust_remote_code=training_args.trust_remote_code)
        results["merged_output_dir"] = merged_dir
        logger.info("merged full weights written to %s", merged_dir)

    results["wall_time_s"] = round(time.time() - start, 1)
    return finish_stage(trainer.accelerator, training_args.output_dir, RESULTS_FILE, results,
                        f"SFT done in {results['wall_time_s']:.0f} s")


if __name__ == "__main__":
    run_script(main, (SFTScriptArguments, SFTConfig, ModelConfig), __doc__)
