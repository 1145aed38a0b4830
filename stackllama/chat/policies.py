"""The trained policies of a run folder, found by what each stage wrote (loaded by
`evaluation.policies.load_policies`, adapters over one base sharing it in memory)."""

from __future__ import annotations

from pathlib import Path

from .. import run_layout
from ..errors import MissingInputError
from ..evaluation.policies import PolicySpec
from ..report.logs import read_json

# Folders that hold something other than a policy to talk to: the untrained base, the reward model
NOT_POLICIES = {run_layout.BASE, run_layout.REWARD, run_layout.merged(run_layout.REWARD)}
# Display names, and the order SFT first (the baseline), then the stages trained from it
KNOWN_NAMES = {stage: stage.upper() for stage in (run_layout.SFT, run_layout.PPO, *run_layout.OTHER_POLICY_STAGES)}


def is_causal_lm(folder: Path) -> bool:
    """Full weights of a `*ForCausalLM` or a LoRA adapter of task `CAUSAL_LM` (a reward model is neither)."""
    if run_layout.is_adapter(folder):
        return (read_json(folder / "adapter_config.json") or {}).get("task_type") in ("CAUSAL_LM", None)
    architectures = (read_json(folder / "config.json") or {}).get("architectures") or []
    return any(str(a).endswith("ForCausalLM") for a in architectures)


def _display_name(stage: str) -> str:
    return KNOWN_NAMES.get(stage, stage)


def find_policies(run: str | Path) -> list[PolicySpec]:
    """Every trained policy in `run`: one per stage folder (`sft`, `ppo`, and any other stage's), its
    `-merged` twin standing in when the stage's own folder holds no model. SFT first, then the known
    stages in recipe order, then the others by name."""
    run = Path(run)
    if not run.is_dir():
        raise MissingInputError(f"run folder {run} not found: run `make demo` (or scripts/run_pipeline.py) first, "
                                f"or pass --run_dir")
    stages: dict[str, Path] = {}
    for folder in sorted(p for p in run.iterdir() if p.is_dir()):
        stage = folder.name[: -len("-merged")] if folder.name.endswith("-merged") else folder.name
        if stage in NOT_POLICIES or folder.name in NOT_POLICIES or not is_causal_lm(folder):
            continue
        # the stage's own output wins for PPO (its adapter is what training saved), the merge for SFT (full weights
        # that a PPO adapter names as its base, so both load as one model)
        prefer_merged = stage == run_layout.SFT
        if stage not in stages or folder.name.endswith("-merged") == prefer_merged:
            stages[stage] = folder
    order = list(KNOWN_NAMES)
    ranked = sorted(stages, key=lambda s: (order.index(s) if s in order else len(order), s))
    return [PolicySpec(_display_name(s), str(stages[s])) for s in ranked]


def select_policies(run: str | Path, wanted: list[str] | None, compare: bool) -> list[PolicySpec]:
    """The policies asked for: `wanted` (stage names such as `ppo`, or model folders / Hub ids), all of
    the run's with `compare`, else the recipe's product: PPO, or without one the run's last in recipe order."""
    if wanted:
        found = {spec.name.lower(): spec for spec in find_policies(run)} if Path(run).is_dir() else {}
        specs = []
        for item in wanted:
            if item.lower() in found:
                specs.append(found[item.lower()])
            elif Path(item).exists() or item.count("/") == 1:
                run_layout.check_model_dir(item, "policy", "--policies")
                specs.append(PolicySpec(Path(item).name or item, item))
            else:
                names = ", ".join(found) or "none"
                raise MissingInputError(f"no policy {item!r} in {run} (found: {names}); pass a stage name, a model "
                                        f"folder or a Hub id with --policies")
        return specs
    found = find_policies(run)
    if not found:
        raise MissingInputError(f"no trained policy in {run} (looked for SFT, PPO and other stages' weights or "
                                f"adapters): run `make demo` (or scripts/run_pipeline.py) first, or pass --run_dir")
    if compare:
        return found
    return [next((spec for spec in found if spec.name == KNOWN_NAMES[run_layout.PPO]), found[-1])]
