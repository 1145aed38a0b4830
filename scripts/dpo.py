"""DPO, the StackLLaMA 2 alternative to reward model + PPO: the SFT model trained on the preference pairs.

TRL's `DPOTrainer` on `prompt` = `Question: <question>\\n\\nAnswer: `, `chosen` = `response_j`,
`rejected` = `response_k` of the `rl` pairs (the questions PPO trains on), the SFT model as the
reference. Reports the implicit reward `beta * (log pi - log pi_ref)` on the held-out `evaluation`
pairs before and after training: accuracy (chosen above rejected), mean margin, accuracy by
`pm_score` gap, beside the "longer answer wins" baseline.

CPU, no download (starts from runs/tiny/sft-merged, else runs/tiny/sft):
```bash
python scripts/dpo.py --config configs/dpo/tiny.yaml
python scripts/dpo.py --config configs/dpo/tiny.yaml --eval_only     # evaluate the saved model
```

StackLLaMA 2 (LLaMA SFT model, 4-bit base + LoRA r=8, bf16, 8 GPUs):
```bash
accelerate launch --config_file accelerate_configs/multi_gpu.yaml scripts/dpo.py --config configs/dpo/llama-7b.yaml
```

With `--save_strategy steps --save_steps N`, a checkpoint is written every N steps (staged, then
marked complete and renamed, so a kill never leaves one that resume would trust; `--save_total_limit`
keeps the newest); `--resume_from_checkpoint latest` continues from the newest complete one (or
starts fresh when there is none). The reference log-probs of the evaluation pairs and the SFT
model's figures are saved with each checkpoint and reused on resume.
"""

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
import logging
import time

from trl import DPOConfig, ModelConfig

from stackllama import run_layout
from stackllama.data.loading import check_data_dir
from stackllama.dpo import (
    RESULTS_FILE,
    DPOScriptArguments,
    build_trainer,
    check_arguments,
    completion_logps,
    evaluate_pairs,
    format_metrics,
    load_saved_policy,
    load_tokenized,
)
from stackllama.errors import InputError
from stackllama.hf_trainer import carried_results, resolve_resume, stage_state
from stackllama.merge import save_full_weights
from stackllama.model_card import write_dpo_card
from stackllama.modeling import (
    count_parameters,
    load_model,
    load_tokenizer,
    lora_config,
    place_for_evaluation,
)
from stackllama.stage import configure_reporting, finish_stage, run_script

logger = logging.getLogger("stackllama.dpo")


def main(script_args: DPOScriptArguments, training_args: DPOConfig, model_args: ModelConfig) -> dict:
    start = time.time()
    configure_reporting(training_args)
    check_arguments(script_args, training_args, model_args)
    data_dir = script_args.data_dir or run_layout.default_data_dir(training_args.output_dir)
    check_data_dir(data_dir)
    resume = None if script_args.eval_only else resolve_resume(training_args)
    results = {"data_dir": data_dir, "train_subset": script_args.train_subset, "eval_subset": script_args.eval_subset,
               "beta": training_args.beta, "loss_type": training_args.loss_type, "max_length": training_args.max_length,
               "max_prompt_length": script_args.max_prompt_length, "use_peft": model_args.use_peft,
               "tokens_generated": 0}  # DPO samples nothing
    beta, batch_size = training_args.beta, training_args.per_device_eval_batch_size

    # Model and tokenizer: the SFT model (the policy and, frozen, the reference), or a saved DPO model (--eval_only)
    reference_model = None
    if script_args.eval_only:
        base_model = model_args.model_name_or_path or training_args.output_dir
        model, reference_model, tokenizer = load_saved_policy(
            base_model, script_args.ref_model_name_or_path, dtype=model_args.dtype,
            trust_remote_code=training_args.trust_remote_code)
        if reference_model is not None:
            reference_model = place_for_evaluation(reference_model, training_args)
    else:
        base_model = model_args.model_name_or_path or run_layout.default_sft_model(training_args.output_dir)
        model_args.model_name_or_path = base_model
        tokenizer = load_tokenizer(base_model, revision=model_args.model_revision,
                                   trust_remote_code=training_args.trust_remote_code)
        model = load_model(model_args, tokenizer, trust_remote_code=training_args.trust_remote_code,
                           gradient_checkpointing=training_args.activation_checkpointing,
                           gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs)
    model = place_for_evaluation(model, training_args)  # the GPU for the evaluation before training
    results["base_model"] = base_model
    pad = tokenizer.pad_token_id

    # Data: prompt / chosen / rejected token ids as TRL builds them; over-long pairs dropped and counted
    eval_dataset, results["eval_pairs_dropped"] = load_tokenized(
        data_dir, script_args.eval_subset, tokenizer, training_args, script_args, script_args.max_eval_pairs)
    results["eval_pairs"] = len(eval_dataset)

    if script_args.eval_only:
        reference = completion_logps(reference_model or model, eval_dataset, pad, batch_size,
                                     disable_adapter=reference_model is None)
        results["eval_after"] = evaluate_pairs(model, eval_dataset, reference, beta, pad, batch_size)
        logger.info("evaluation of %s (beta %s)\n%s", base_model, beta, format_metrics(results["eval_after"]))
        return results

    train_dataset, results["train_pairs_dropped"] = load_tokenized(
        data_dir, script_args.train_subset, tokenizer, training_args, script_args, script_args.max_train_pairs,
        shuffle=True)
    results["train_pairs"] = len(train_dataset)
    logger.info("pairs: %d train (%d dropped: longer than %s tokens, prompt over %s), %d eval (%d dropped)",
                results["train_pairs"], results["train_pairs_dropped"], training_args.max_length,
                script_args.max_prompt_length, results["eval_pairs"], results["eval_pairs_dropped"])
    if results["train_pairs"] == 0:
        raise InputError(f"no training pair fits in --max_length {training_args.max_length} "
                         f"(--max_prompt_length {script_args.max_prompt_length})")

    # Before training the policy is its reference: its log-probs of the evaluation pairs are the reference's
    carried = carried_results(resume)  # saved with the checkpoint
    if "reference_logps" in carried:
        reference = tuple(carried["reference_logps"])
        results["eval_before"] = carried["eval_before"]
        logger.info("SFT model, the reference (from %s)\n%s", resume, format_metrics(results["eval_before"]))
    else:
        reference = completion_logps(model, eval_dataset, pad, batch_size)
        results["eval_before"] = evaluate_pairs(model, eval_dataset, reference, beta, pad, batch_size, policy=reference)
        logger.info("SFT model, the reference\n%s", format_metrics(results["eval_before"]))

    # Trainer: TRL's DPOTrainer (reference: a frozen copy, or the adapter disabled with LoRA), staged checkpoints
    trainer = build_trainer(model, tokenizer, training_args, train_dataset,
                            eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
                            peft_config=lora_config(model_args))
    trainer.carried_results = {"eval_before": results["eval_before"],
                               "reference_logps": [list(map(float, side)) for side in reference]}
    trainable, total = count_parameters(trainer.model)
    logger.info("parameters: %s trainable of %s", f"{trainable:,}", f"{total:,}")

    # Train (from the checkpoint when resuming: weights, optimizer, scheduler, RNG, data position), then evaluate
    train_output = trainer.train(resume_from_checkpoint=resume)
    runtime = train_output.metrics.get("train_runtime")
    results.update(global_step=train_output.global_step, train_loss=train_output.training_loss,
                   train_runtime_s=runtime, train_tokens=int(trainer._total_train_tokens),
                   train_pairs_per_second=train_output.metrics.get("train_samples_per_second"))
    tokens_this_run = trainer._total_train_tokens - stage_state(resume).get("total_train_tokens", 0)
    results["train_tokens_per_second"] = round(tokens_this_run / runtime, 1) if runtime else None
    logger.info("trained %d steps in %.0f s: %s pairs/s, %s tokens/s", results["global_step"], runtime or 0,
                results["train_pairs_per_second"], results["train_tokens_per_second"])
    results["eval_after"] = evaluate_pairs(trainer.model, eval_dataset, reference, beta, pad, batch_size)
    logger.info("trained model\n%s", format_metrics(results["eval_after"]))
    trainer.log({f"final_eval_{k}": v for k, v in results["eval_after"].items() if isinstance(v, float)})

    # Save: adapter or full weights, tokenizer, card; merged weights on request
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the logged losses and rewards, for the report's plots
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        write_dpo_card(training_args.output_dir, base_model, data_dir, results)
        if script_args.merge:
            merged_dir = script_args.merged_output_dir or run_layout.merged(training_args.output_dir.rstrip("/"))
            save_full_weights(tokenizer, training_args.output_dir, merged_dir, model_args.use_peft,
                              base_model=base_model, dtype=script_args.merge_dtype,
                              trust_remote_code=training_args.trust_remote_code)
            results["merged_output_dir"] = merged_dir
    results["wall_time_s"] = round(time.time() - start, 1)
    return finish_stage(trainer.accelerator, training_args.output_dir, RESULTS_FILE, results,
                        f"DPO done in {results['wall_time_s']:.0f} s")


if __name__ == "__main__":
    run_script(main, (DPOScriptArguments, DPOConfig, ModelConfig), __doc__)
