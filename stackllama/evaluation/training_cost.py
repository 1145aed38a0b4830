"""What training a policy cost: its stage's wall time and the tokens it sampled while training,
read from the results file the stage wrote last (`<stage>_results.json`, `stackllama.run_layout`).

SFT and DPO sample nothing (0 tokens); PPO, RLOO and GRPO record `tokens_generated`. A policy
given by path or Hub id without a results file, or a results file written before that key
existed, has no figure (None), never a guess."""

from __future__ import annotations

from pathlib import Path

from .. import run_layout
from ..report.logs import read_json

# stages that learn from fixed text, not from their own samples
NO_SAMPLING = {run_layout.SFT, run_layout.DPO}


def _results(path: str, stage: str) -> dict | None:
    """The stage's results file in the policy's folder, or in the stage folder a `-merged` copy came from."""
    name = f"{stage}_results.json"
    if name not in run_layout.STAGE_RESULTS:
        return None
    folder = Path(path)
    for candidate in (folder, folder.with_name(folder.name.removesuffix("-merged"))):
        results = read_json(candidate / name)
        if results is not None:
            return results
    return None


def training_cost(path: str, stage: str) -> dict:
    """`{"train_wall_time_s": ..., "train_tokens_generated": ...}` of the policy at `path` trained by `stage`."""
    results = _results(path, stage) or {}
    tokens = results.get("tokens_generated")
    if tokens is None and results and stage in NO_SAMPLING:
        tokens = 0
    return {"train_wall_time_s": results.get("wall_time_s"), "train_tokens_generated": tokens}
