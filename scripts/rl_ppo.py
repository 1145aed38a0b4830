"""PPO, the fourth stage of the StackLLaMA recipe: the SFT policy answers `rl` questions and
learns from the reward model's scores, with a KL penalty to the SFT model.

CPU, no download (from the outputs of the SFT and reward stages in runs/tiny):
```bash
python scripts/rl_ppo.py --config configs/ppo/tiny.yaml
```

The recipe (LLaMA-7B SFT model, 8-bit base + LoRA, 8 GPUs):
```bash
accelerate launch --multi_gpu --num_processes 8 scripts/rl_ppo.py --config configs/ppo/llama-7b.yaml \\
    --model_name_or_path <sft-merged> --reward_model_name <reward model> --data_dir lvwerra/stack-exchange-paired
```

Every flag can also come from the YAML file given with `--config`; the command line wins.
Outputs in --output_dir: the policy (adapter or full weights, `value_head.safetensors`,
tokenizer), `checkpoint-<n>/` every --save_freq steps (the newest --save_total_limit kept),
`ppo_log.jsonl` (every statistic of every step plus the step's (query, response, reward) rows)
and `ppo_results.json`. After a stop, the same command with `--resume_from_checkpoint latest`
goes on from the newest complete checkpoint and ends as the uninterrupted run would have.
"""

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import set_seed
from trl import ModelConfig

from stackllama.data.loading import check_data_dir
from stackllama.modeling import count_parameters, load_tokenizer
from stackllama.ppo import LengthSampler, PPOConfig, PPOTrainer
from stackllama.ppo.recipe import (
    LOG_FILE,
    RESULTS_FILE,
    RLScriptArguments,
    build_query_dataset,
    checkpoint_to_resume,
    load_policy,
    mean,
)
from stackllama.ppo.speedups.cpu_allocator import keep_freed_memory
from stackllama.processes import process_state
from stackllama.reward_scoring import RewardFunction
from stackllama.run_layout import (
    check_model_dir,
    default_reward_model,
    default_sft_model,
)
from stackllama.stage import configure_reporting, finish_stage, run_script

logger = logging.getLogger("stackllama.ppo")


def main(script_args: RLScriptArguments, config: PPOConfig, model_args: ModelConfig) -> dict:
    start = time.time()
    state = process_state()  # without a GPU too, the processes of a launch join one run (gloo)
    if config.cpu_malloc_tuning:
        keep_freed_memory(state.device)  # process-wide: CPU training stops re-faulting each step's memory
    if script_args.num_threads:
        torch.set_num_threads(script_args.num_threads)
    output_dir = Path(script_args.output_dir)
    configure_reporting(script_args)
    if script_args.report_to not in ("none", "", None):
        config.log_with = script_args.report_to
        config.project_kwargs.setdefault("project_dir", str(output_dir))
    config.log_jsonl = config.log_jsonl or str(output_dir / LOG_FILE)
    resume = checkpoint_to_resume(script_args.resume_from_checkpoint, output_dir)
    if resume is None and state.is_main_process:
        Path(config.log_jsonl).unlink(missing_ok=True)  # a new run starts a new log (a resumed one cuts it)
    check_data_dir(script_args.data_dir)

    # Models: the SFT policy and the reward model (defaults: the stages' outputs beside output_dir)
    policy_path = model_args.model_name_or_path or default_sft_model(script_args.output_dir)
    reward_path = script_args.reward_model_name or default_reward_model(script_args.output_dir)
    check_model_dir(policy_path, "policy (SFT) model", "--model_name_or_path", adapter_ok=False)
    check_model_dir(reward_path, "reward model", "--reward_model_name")
    model_args.model_name_or_path = policy_path
    tokenizer = load_tokenizer(policy_path, revision=model_args.model_revision, padding_side="left",
                               trust_remote_code=script_args.trust_remote_code)

    # Queries: `Question: q\n\nAnswer: ` from the rl subset, the over-long ones dropped and counted
    with state.main_process_first():  # one process tokenizes, the others read its cache
        dataset, dropped = build_query_dataset(
            script_args.data_dir, tokenizer, script_args.max_prompt_length, subset=script_args.subset,
            max_queries=script_args.max_queries, unique_questions=script_args.unique_questions, seed=config.seed)
    logger.info("queries: %d (%d longer than %d tokens dropped)", len(dataset), dropped, script_args.max_prompt_length)
    if len(dataset) < config.batch_size:
        raise ValueError(f"only {len(dataset)} queries fit in --max_prompt_length {script_args.max_prompt_length}; "
                         f"--batch_size is {config.batch_size}")

    set_seed(config.seed)  # the value head's initialisation is part of the run
    policy = load_policy(model_args, tokenizer, trust_remote_code=script_args.trust_remote_code)
    trainable, total = count_parameters(policy)
    logger.info("policy %s: %s trainable parameters of %s", policy_path, f"{trainable:,}", f"{total:,}")
    # The reward model before the trainer: under DeepSpeed ZeRO-3 a model loaded once the trainer's
    # Accelerator exists would be built sharded (zero.Init), and a pipeline cannot run on shards
    reward_fn = RewardFunction.from_pretrained(
        reward_path, dtype=model_args.dtype, trust_remote_code=script_args.trust_remote_code,
        policy_tokenizer=tokenizer, batch_size=script_args.reward_batch_size, append_eos=script_args.reward_append_eos,
        fast_path=script_args.reward_fast_path, device=state.device)
    logger.info("reward model %s (shares the policy's tokenizer: %s)", reward_path, reward_fn.shares_tokenizer)
    ppo_trainer = PPOTrainer(config, policy, None, tokenizer, dataset=dataset)

    # Sampling as in the recipe: pure sampling, EOS is a real stop (not the published 100_000)
    generation_kwargs = {"top_k": 0, "top_p": 1.0, "do_sample": True,
                         "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    output_length_sampler = LengthSampler(script_args.output_min_length, script_args.output_max_length, seed=config.seed)
    reward_baseline = script_args.reward_baseline

    results = {"policy": policy_path, "reward_model": reward_path, "data_dir": script_args.data_dir,
               "queries": len(dataset), "queries_dropped": dropped, "max_prompt_length": script_args.max_prompt_length,
               "output_min_length": script_args.output_min_length, "output_max_length": script_args.output_max_length,
               "steps_planned": config.steps, "resumed_from": str(resume) if resume else None}
    history = []
    if resume is not None:  # last: it restores the random generators
        saved = ppo_trainer.load_checkpoint(resume, length_sampler=output_length_sampler)
        history, reward_fn.use_fast_path = saved.get("history", []), saved.get("reward_fast_path")
        logger.info("resumed from %s at step %d", resume, ppo_trainer.current_step)
    step = ppo_trainer.current_step
    progress = tqdm(total=config.steps, initial=step, desc="PPO steps", disable=not ppo_trainer.accelerator.is_main_process)
    for batch in ppo_trainer.batches():  # epoch after epoch, from the checkpoint's position when resumed
        if step >= config.steps:
            break
        t0 = time.perf_counter()
        query_tensors = batch["input_ids"]
        response_tensors = ppo_trainer.generate(query_tensors, return_prompt=False,
                                                length_sampler=output_length_sampler, **generation_kwargs)
        batch["response"] = tokenizer.batch_decode(response_tensors, skip_special_tokens=True)
        t1 = time.perf_counter()
        texts = [q + r for q, r in zip(batch["query"], batch["response"])]
        rewards = [torch.tensor(s - reward_baseline) for s in reward_fn(texts, query_tensors, response_tensors)]
        t2 = time.perf_counter()
        stats = ppo_trainer.step(query_tensors, response_tensors, rewards)
        stats.update({"time/generation": t1 - t0, "time/reward": t2 - t1, "time/step": time.perf_counter() - t0})
        logs = ppo_trainer.log_stats(stats, batch, rewards)
        step += 1
        history.append({"reward": logs["env/reward_mean"], "kl": logs["objective/kl"], "seconds": logs["time/step"],
                        "generation": logs["time/generation"], "scoring": logs["time/reward"],
                        "ppo_step": logs["time/ppo/total"], "tokens": sum(len(r) for r in response_tensors)})
        progress.update(1)
        progress.set_postfix(reward=f"{logs['env/reward_mean']:.3f}", kl=f"{logs['objective/kl']:.3f}")
        if script_args.save_freq and step % script_args.save_freq == 0:
            ppo_trainer.save_checkpoint(output_dir, {"history": history, "reward_fast_path": reward_fn.use_fast_path},
                                        script_args.save_total_limit, length_sampler=output_length_sampler)
    progress.close()

    # Save: adapter (or full weights) + value head + tokenizer, and the run's figures
    ppo_trainer.save_pretrained(str(output_dir))
    window = max(1, min(5, len(history) // 4))
    results.update({
        "steps": step,
        "reward_first": mean(h["reward"] for h in history[:window]),
        "reward_last": mean(h["reward"] for h in history[-window:]),
        "kl_last": mean(h["kl"] for h in history[-window:]),
        "kl_max": max(h["kl"] for h in history),
        "kl_coef_last": ppo_trainer.kl_ctl.value,
        "seconds_per_step": mean(h["seconds"] for h in history[1:] or history),  # the first step warms up
        "seconds_per_step_split": {k: round(mean(h[k] for h in history[1:] or history), 3)
                                   for k in ("generation", "scoring", "ppo_step")},
        "averaged_over_steps": window,
        # response tokens sampled over the run and every process (the evaluation's cost column)
        "sampling_decode": ppo_trainer.speedups.decode_path,  # "CUDA graph", or "eager (<why>)" as the run ended
        "tokens_generated": int(ppo_trainer.backend.sum(torch.tensor(float(sum(h.get("tokens", 0) for h in history)),
                                                                     device=ppo_trainer.accelerator.device)).item()),
        "log": config.log_jsonl,
        "wall_time_s": round(time.time() - start, 1),
    })
    done = (f"PPO done: mean reward {results['reward_first']:.3f} (first {window} steps) -> "
            f"{results['reward_last']:.3f} (last {window}), KL {results['kl_last']:.3f}, "
            f"{results['seconds_per_step']:.2f} s/step")
    return finish_stage(ppo_trainer.accelerator, output_dir, RESULTS_FILE, results, done)


if __name__ == "__main__":
    run_script(main, (RLScriptArguments, PPOConfig, ModelConfig), __doc__)
