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
from trl import GRPOConfig, ModelConfig

from stackllama import run_layout
from stackllama.online_rl import OnlineRLScriptArguments, train_online_rl
from stackllama.stage import run_script


def main(script_args: OnlineRLScriptArguments, training_args: GRPOConfig, model_args: ModelConfig) -> dict:
    # prompts, the SFT policy and the reward model, TRL's GRPOTrainer, save; results file last
    return train_online_rl(run_layout.GRPO, script_args, training_args, model_args)


if __name__ == "__main__":
    run_script(main, (OnlineRLScriptArguments, GRPOConfig, ModelConfig), __doc__)
