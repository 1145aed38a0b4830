"""The recipe's stages, in order: each one's script, output folder and completion marker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..run_layout import (
    BASE,
    DATA,
    DATA_SUMMARY,
    DPO,
    DPO_RESULTS,
    GRPO,
    GRPO_RESULTS,
    EVALUATION_RESULTS,
    MERGE_RESULTS,
    OTHER_POLICY_STAGES,
    PPO,
    PPO_RESULTS,
    REPORT,
    REWARD,
    REWARD_RESULTS,
    RLOO,
    RLOO_RESULTS,
    SFT,
    SFT_RESULTS,
    TINY_MODEL_RESULTS,
    merged,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class StageSpec:
    """A stage of the recipe: its script, its output folder and its completion marker."""

    name: str
    title: str
    script: str
    output: str  # sub-folder of the run folder
    marker: str  # file inside `output` that the script writes last
    distributed: bool = False  # a training stage: launched with accelerate/torchrun when asked


STAGES: tuple[StageSpec, ...] = (
    StageSpec("prepare", "prepare data", "scripts/prepare_data.py", DATA, DATA_SUMMARY),
    StageSpec("tiny_model", "tiny model", "scripts/build_tiny_model.py", BASE, TINY_MODEL_RESULTS),
    StageSpec("sft", "SFT", "scripts/sft.py", SFT, SFT_RESULTS, distributed=True),
    StageSpec("merge_sft", "merge SFT adapter", "scripts/merge_adapters.py", merged(SFT), MERGE_RESULTS),
    StageSpec("reward", "reward model", "scripts/reward_modeling.py", REWARD, REWARD_RESULTS, distributed=True),
    StageSpec("merge_reward", "merge reward adapter", "scripts/merge_adapters.py", merged(REWARD), MERGE_RESULTS),
    StageSpec("ppo", "PPO", "scripts/rl_ppo.py", PPO, PPO_RESULTS, distributed=True),
    StageSpec("merge_ppo", "merge PPO adapter", "scripts/merge_adapters.py", merged(PPO), MERGE_RESULTS),
    # the other algorithms, from the same SFT model (and, for RLOO / GRPO, the same reward model), run
    # when listed in `algorithms:`; the evaluation compares every policy trained with SFT
    StageSpec("dpo", "DPO", "scripts/dpo.py", DPO, DPO_RESULTS, distributed=True),
    StageSpec("rloo", "RLOO", "scripts/rloo.py", RLOO, RLOO_RESULTS, distributed=True),
    StageSpec("grpo", "GRPO", "scripts/grpo.py", GRPO, GRPO_RESULTS, distributed=True),
    StageSpec("evaluate", "evaluation report", "scripts/evaluate.py", REPORT, EVALUATION_RESULTS),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
# The policy-optimisation stages a run may train (pipeline `algorithms:`); PPO, the recipe's, always
ALGORITHMS = (PPO, *OTHER_POLICY_STAGES)


def stage_spec(name: str) -> StageSpec:
    return next(s for s in STAGES if s.name == name)
