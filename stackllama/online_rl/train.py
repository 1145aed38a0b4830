"""The RLOO / GRPO stage from start to end, shared by `scripts/rloo.py` and `scripts/grpo.py`: it reads
top to bottom as those scripts would (arguments, models, prompts, trainer, save), once for both."""

from __future__ import annotations

import logging
import time

import torch

from .. import run_layout
from ..data.loading import check_data_dir
from ..modeling import count_parameters, load_model, load_tokenizer, lora_config
from ..ppo.recipe import checkpoint_to_resume
from ..reward_scoring import RewardFunction
from ..stage import configure_reporting, finish_stage
from .arguments import RESULTS_FILES, OnlineRLScriptArguments, check_prompt_count, check_training_args
from .prompts import build_prompt_dataset
from .trainer import build_trainer, done_message, run_summary


def train_online_rl(algorithm: str, script_args: OnlineRLScriptArguments, training_args, model_args) -> dict:
    """The whole stage, `scripts/rloo.py` or `scripts/grpo.py` (`algorithm`): prompts, models, TRL's trainer,
    the saved policy, and the results file, written last (returned). `training_args` is TRL's `RLOOConfig`
    or `GRPOConfig`; the two stages differ in nothing else."""
    start = time.time()
    logger = logging.getLogger(f"stackllama.{algorithm}")
    if script_args.num_threads:
        torch.set_num_threads(script_args.num_threads)
    configure_reporting(training_args)
    check_training_args(algorithm, training_args)
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

    # Trainer: TRL's RLOOTrainer / GRPOTrainer (reference: the SFT weights, or the adapters disabled), staged checkpoints, NaN stop
    trainer = build_trainer(algorithm, policy, tokenizer, training_args, dataset, reward_fn,
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
    return finish_stage(trainer.accelerator, output_dir, RESULTS_FILES[algorithm], results,
                        done_message(algorithm, results))

