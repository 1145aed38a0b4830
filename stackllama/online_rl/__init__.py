"""RLOO and GRPO, the optional stages beside PPO: the SFT policy answers the `rl` questions with
TRL's `RLOOTrainer` / `GRPOTrainer`, scored by the stage-3 reward model exactly as PPO scores them,
with a KL penalty to the SFT model (`scripts/rloo.py`, `scripts/grpo.py`).

TRL runs the algorithms (sampling, group baselines, losses, the reference model or the disabled
adapter); this package holds only what TRL does not offer:

- ``arguments.py``  the scripts' own flags beside TRL's configs, and the checks of those configs
- ``prompts.py``    PPO's queries (`Question: q\\n\\nAnswer: `) as TRL's `prompt` column
- ``reward.py``     TRL's reward-function interface around `stackllama.reward_scoring.RewardFunction`
- ``statistics.py`` the KL to the SFT model with PPO's meaning, tokens generated, the NaN reward stop
- ``trainer.py``    the trainers (with `stackllama.hf_trainer`'s checkpoints and NaN guard), and the
                    run's figures for the results file
- ``train.py``      the whole stage, start to end, behind both scripts
"""

from .arguments import ALGORITHMS, RESULTS_FILES, OnlineRLScriptArguments, check_prompt_count, check_training_args
from .prompts import build_prompt_dataset
from .reward import TRLReward
from .train import train_online_rl
from .trainer import build_trainer, done_message, run_summary

__all__ = ["ALGORITHMS", "OnlineRLScriptArguments", "RESULTS_FILES", "TRLReward", "build_prompt_dataset",
           "build_trainer", "check_prompt_count", "check_training_args", "done_message", "run_summary",
           "train_online_rl"]
