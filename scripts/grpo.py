"""GRPO, an optional stage beside PPO: the SFT policy samples a group of answers to each `rl` question,
each answer's advantage is its reward-model score against its group's (TRL's `GRPOTrainer`), with a KL
penalty to the SFT model.

CPU, no download (from the outputs of the SFT and reward stages in runs/tiny):
```bash
python scripts/grpo.py --config configs/grpo/tiny.yaml
```

LLaMA-7B as the recipe's PPO runs it (8-bit base + LoRA, 8 GPUs):
```bash
accelerate launch --multi_gpu --num_processes 8 scripts/grpo.py --config configs/grpo/llama-7b.yaml \\
    --model_name_or_path <sft-merged> --reward_model_name <reward model> --data_dir lvwerra/stack-exchange-paired
```

The prompts are the PPO stage's (`Question: q\\n\\nAnswer: `, the long ones dropped) and the reward is
PPO's: the reward model's raw score of `Question: q\\n\\nAnswer: a<eos>` (`stackllama.online_rl`).
`--beta` must be > 0 (TRL's GRPO default is 0, which loads no reference): the log's `objective/kl` is
the KL to the SFT model as PPO logs it (nats per answer), beside TRL's own `kl`.

Outputs in --output_dir: the policy (adapter or full weights, tokenizer), `trainer_state.json` (every
logged step), `checkpoint-<n>/` every --save_steps steps (staged, marked complete, renamed; the newest
--save_total_limit kept) and `grpo_results.json`, written last. After a stop, the same command with
`--resume_from_checkpoint latest` goes on from the newest complete checkpoint.
Every flag can also come from the YAML file given with `--config`; the command line wins.
"""

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
import logging
import time

import torch
from trl import GRPOConfig, ModelConfig

from stackllama import run_layout
from stackllama.data.loading import check_data_dir
from stackllama.modeling import count_parameters, load_model, load_tokenizer, lora_config
from stackllama.online_rl import (
    RESULTS_FILES,
    OnlineRLScriptArguments,
    build_prompt_dataset,
    build_trainer,
    check_prompt_count,
    check_training_args,
    done_message,
    run_summary,
)
from stackllama.ppo.recipe import checkpoint_to_resume
from stackllama.reward_scoring import RewardFunction
from stackllama.stage import configure_reporting, finish_stage, run_script

ALGORITHM = run_layout.GRPO
logger = logging.getLogger("stackllama.grpo")


def main(script_args: OnlineRLScriptArguments, training_args: GRPOConfig, model_args: ModelConfig) -> dict:
    start = time.time()
    if script_args.num_threads:
        torch.set_num_threads(script_args.num_threads)
    configure_reporting(training_args)
    check_training_args(ALGORITHM, training_args)
    output_dir = training_args.output_dir
    resume = checkpoint_to_resume(training_args.resume_from_checkpoint, output_dir)
    data_dir = script_args.data_dir or run_layout.default_data_dir(output_dir)
    check_data_dir(data_dir)

    # Models: the SFT policy and the reward model (defaults: the stages' outputs beside output_dir)
    policy_path = model_args.model_name_or_path or run_layout.default_sft_model(output_dir)
    reward_path = script_args.reward_model_name or run_layout.default_reward_model(output_dir)
    run_layout.check_model_dir(policy_path, "policy (SFT) model", "--model_name_or_path", adapter_ok=False)
    run_layout.check_model_dir(reward_path, "reward model", "--reward_model_name")
    model_args.model_name_or_path = policy_path
    tokenizer = load_tokenizer(policy_path, revision=model_args.model_revision, padding_side="left",
                               trust_remote_code=training_args.trust_remote_code)

    # Prompts: PPO's queries, `Question: q\n\nAnswer: ` from the rl subset, the over-long ones dropped and counted
    with training_args.main_process_first(desc="prompts"):  # one process tokenizes, the others read its cache
        dataset, dropped = build_prompt_dataset(
            data_dir, tokenizer, script_args.max_prompt_length, subset=script_args.subset,
            max_prompts=script_args.max_prompts, unique_questions=script_args.unique_questions, seed=training_args.seed)
    logger.info("prompts: %d (%d longer than %d tokens dropped)", len(dataset), dropped, script_args.max_prompt_length)
    check_prompt_count(len(dataset), training_args, script_args.max_prompt_length)

    policy = load_model(model_args, tokenizer, task="causal_lm", trust_remote_code=training_args.trust_remote_code,
                        gradient_checkpointing=training_args.activation_checkpointing,
                        gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs)
    # The reward model before the trainer: under DeepSpeed ZeRO-3 one loaded once the trainer's Accelerator
    # exists would be built sharded (zero.Init), and a pipeline cannot run on shards
    reward_fn = RewardFunction.from_pretrained(
        reward_path, dtype=model_args.dtype, trust_remote_code=training_args.trust_remote_code,
        policy_tokenizer=tokenizer, batch_size=script_args.reward_batch_size,
        append_eos=script_args.reward_append_eos, fast_path=script_args.reward_fast_path, device=training_args.device)
    logger.info("reward model %s (shares the policy's tokenizer: %s)", reward_path, reward_fn.shares_tokenizer)

    # Trainer: TRL's GRPOTrainer (reference: the SFT weights, or the adapters disabled), staged checkpoints, NaN stop
    trainer = build_trainer(ALGORITHM, policy, tokenizer, training_args, dataset, reward_fn,
                            peft_config=lora_config(model_args, task_type="CAUSAL_LM"))
    trainable, total = count_parameters(trainer.model)
    logger.info("policy %s: %s trainable parameters of %s", policy_path, f"{trainable:,}", f"{total:,}")
    train_output = trainer.train(resume_from_checkpoint=resume)

    # Save: adapter or full weights, tokenizer, the logged steps; then the run's figures, last
    trainer.save_model(output_dir)
    trainer.save_state()  # trainer_state.json: every logged step, for the report's curves
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
    results = {"base_model": policy_path, "reward_model": reward_path, "data_dir": data_dir,
               "prompts": len(dataset), "prompts_dropped": dropped, "max_prompt_length": script_args.max_prompt_length,
               "max_completion_length": training_args.max_completion_length,
               "num_generations": training_args.num_generations, "beta": training_args.beta,
               "use_peft": model_args.use_peft, "reward_fast_path": reward_fn.use_fast_path,
               "resumed_from": str(resume) if resume else None, **run_summary(trainer, train_output),
               "wall_time_s": round(time.time() - start, 1)}
    return finish_stage(trainer.accelerator, output_dir, RESULTS_FILES[ALGORITHM], results,
                        done_message(ALGORITHM, results))


if __name__ == "__main__":
    run_script(main, (OnlineRLScriptArguments, GRPOConfig, ModelConfig), __doc__)
