"""Reward modeling, the third stage of the StackLLaMA recipe.

Trains the SFT model with a one-output classification head to score `response_j` above
`response_k` (loss `-logsigmoid(r_j - r_k)`, TRL's `RewardTrainer`), then reports accuracy on
the held-out `evaluation` pairs, overall and by `pm_score` gap, beside the untrained model.

CPU, no download (starts from runs/tiny/sft-merged):
```bash
python scripts/reward_modeling.py --config configs/reward/tiny.yaml
python scripts/reward_modeling.py --config configs/reward/tiny.yaml --eval_only   # evaluate the saved model
```

The recipe (LLaMA-7B SFT model, LoRA r=8, bf16, 8 GPUs):
```bash
accelerate launch --multi_gpu --num_processes 8 scripts/reward_modeling.py --config configs/reward/llama-7b.yaml
```

With `--save_strategy steps --save_steps N`, a checkpoint is written every N steps (staged, then
marked complete and renamed, so a kill never leaves one that resume would trust; `--save_total_limit`
keeps the newest); `--resume_from_checkpoint latest` continues from the newest complete one (or
starts fresh when there is none). The untrained model's figures are saved with each checkpoint and
reused on resume.
"""

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
import logging
import time

from transformers import set_seed
from trl import ModelConfig, RewardConfig

from stackllama import run_layout
from stackllama.data.loading import check_data_dir, load_pairs
from stackllama.errors import InputError
from stackllama.hf_trainer import carried_results, resolve_resume
from stackllama.merge import save_full_weights
from stackllama.model_card import write_reward_card
from stackllama.modeling import (
    count_parameters,
    load_model,
    load_tokenizer,
    lora_config,
    place_for_evaluation,
)
from stackllama.reward_modeling import (
    RESULTS_FILE,
    RewardScriptArguments,
    build_trainer,
    evaluate_pairs,
    format_metrics,
    load_reward_model,
    tokenize_pairs,
)
from stackllama.stage import configure_reporting, finish_stage, run_script

logger = logging.getLogger("stackllama.reward_modeling")


def main(script_args: RewardScriptArguments, training_args: RewardConfig, model_args: ModelConfig) -> dict:
    start = time.time()
    configure_reporting(training_args)
    check_data_dir(script_args.data_dir)
    resume = None if script_args.eval_only else resolve_resume(training_args)
    results = {"data_dir": script_args.data_dir, "max_length": training_args.max_length,
               "use_peft": model_args.use_peft}
    set_seed(training_args.seed)  # the new score head's initialisation is part of the run
    if model_args.use_peft and model_args.lora_dropout and training_args.disable_dropout and not script_args.eval_only:
        logger.warning("--lora_dropout %s has no effect: TRL's --disable_dropout (default true) switches every "
                       "dropout off; pass --disable_dropout false to train with it", model_args.lora_dropout)

    # Model and tokenizer: the SFT model with a fresh score head, or a saved reward model (--eval_only)
    if script_args.eval_only:
        path = model_args.model_name_or_path or training_args.output_dir
        model, tokenizer = load_reward_model(path, dtype=model_args.dtype,
                                             trust_remote_code=training_args.trust_remote_code)
        base_model = path
    else:
        base_model = model_args.model_name_or_path or run_layout.default_sft_model(training_args.output_dir)
        model_args.model_name_or_path = base_model
        tokenizer = load_tokenizer(base_model, revision=model_args.model_revision, task="seq_cls",
                                   trust_remote_code=training_args.trust_remote_code)
        model = load_model(model_args, tokenizer, task="seq_cls", num_labels=1,
                           trust_remote_code=training_args.trust_remote_code,
                           gradient_checkpointing=training_args.activation_checkpointing,
                           gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs)
    model = place_for_evaluation(model, training_args)  # the GPU for the evaluation before training
    results["base_model"] = base_model

    # Data: pairs tokenized as `Question: q\n\nAnswer: a<eos>`, the over-long ones dropped and counted
    eval_pairs = load_pairs(script_args.data_dir, script_args.eval_subset)
    if script_args.max_eval_pairs is not None:
        eval_pairs = eval_pairs.select(range(min(script_args.max_eval_pairs, len(eval_pairs))))
    eval_dataset, results["eval_pairs_dropped"] = tokenize_pairs(eval_pairs, tokenizer, training_args.max_length)
    results["eval_pairs"] = len(eval_dataset)
    batch_size = training_args.per_device_eval_batch_size

    if script_args.eval_only:
        results["eval_after"] = evaluate_pairs(model, tokenizer, eval_dataset, batch_size)
        logger.info("evaluation of %s\n%s", base_model, format_metrics(results["eval_after"]))
        return results

    train_pairs = load_pairs(script_args.data_dir, script_args.train_subset).shuffle(seed=training_args.seed)
    if script_args.max_train_pairs is not None:
        train_pairs = train_pairs.select(range(min(script_args.max_train_pairs, len(train_pairs))))
    train_dataset, results["train_pairs_dropped"] = tokenize_pairs(train_pairs, tokenizer, training_args.max_length)
    results["train_pairs"] = len(train_dataset)
    logger.info("pairs: %d train (%d longer than %s tokens dropped), %d eval (%d dropped)", results["train_pairs"],
                results["train_pairs_dropped"], training_args.max_length, results["eval_pairs"],
                results["eval_pairs_dropped"])
    if results["train_pairs"] == 0:
        raise InputError(f"no training pair fits in --max_length {training_args.max_length}")

    carried = carried_results(resume)  # the untrained model's figures, saved with the checkpoint
    if script_args.eval_before_training and "eval_before" in carried:
        results["eval_before"] = carried["eval_before"]
        logger.info("untrained model (from %s)\n%s", resume, format_metrics(results["eval_before"]))
    elif script_args.eval_before_training:
        results["eval_before"] = evaluate_pairs(model, tokenizer, eval_dataset, batch_size)
        logger.info("untrained model\n%s", format_metrics(results["eval_before"]))

    # Trainer: TRL's RewardTrainer (pairwise loss, accuracy and margin in its logs), staged checkpoints, NaN stop
    trainer = build_trainer(
        model, tokenizer, training_args, train_dataset,
        eval_dataset=eval_dataset.remove_columns("gap") if training_args.eval_strategy != "no" else None,
        peft_config=lora_config(model_args, task_type="SEQ_CLS"),
    )
    trainer.carried_results = {"eval_before": results["eval_before"]} if "eval_before" in results else {}
    trainable, total = count_parameters(trainer.model)
    logger.info("parameters: %s trainable of %s", f"{trainable:,}", f"{total:,}")

    # Train (from the checkpoint when resuming: weights, optimizer, scheduler, RNG, data position), then evaluate
    train_output = trainer.train(resume_from_checkpoint=resume)
    results["train_loss"] = train_output.training_loss
    results["global_step"] = train_output.global_step
    results["train_runtime_s"] = train_output.metrics.get("train_runtime")
    results["eval_after"] = evaluate_pairs(trainer.model, tokenizer, eval_dataset, batch_size)
    logger.info("trained model\n%s", format_metrics(results["eval_after"]))
    trainer.log({f"final_eval_{k}": v for k, v in results["eval_after"].items() if isinstance(v, float)})

    # Save: adapter (with the score head) or full weights, tokenizer, card; merged weights on request
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the logged losses and accuracies, for the report's plots
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        if script_args.merge:
            merged_dir = script_args.merged_output_dir or run_layout.merged(training_args.output_dir.rstrip("/"))
            save_full_weights(tokenizer, training_args.output_dir, merged_dir, model_args.use_peft,
                              base_model=base_model, dtype=script_args.merge_dtype, task="seq_cls",
                              trust_remote_code=training_args.trust_remote_code)
            results["merged_output_dir"] = merged_dir
    results["wall_time_s"] = round(time.time() - start, 1)
    if trainer.is_world_process_zero():
        write_reward_card(training_args.output_dir, base_model, script_args.data_dir, results)
    return finish_stage(trainer.accelerator, training_args.output_dir, RESULTS_FILE, results,
                        f"reward modeling done in {results['wall_time_s']:.0f} s")


if __name__ == "__main__":
    run_script(main, (RewardScriptArguments, RewardConfig, ModelConfig), __doc__)
