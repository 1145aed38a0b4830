"""From flags to one evaluation's inputs: flags first, then the run folder (`<run>` = the parent of
`--output_dir`, `stackllama.run_layout`) and the PPO run's own settings (`ppo_results.json`),
so that the evaluation samples the way training did."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import run_layout
from ..data.loading import check_data_dir
from ..errors import InputError
from ..ppo.recipe import RLScriptArguments
from ..report.logs import read_json
from .arguments import EvaluateScriptArguments
from .policies import PolicySpec

# The recipe's prompt and response lengths: the PPO stage's defaults (LengthSampler(32, 128), prompts <= 512)
RECIPE_LENGTHS = ("max_prompt_length", "output_min_length", "output_max_length")


@dataclass
class EvaluationInputs:
    """Resolved paths and settings of one evaluation (the script fills it from its flags and the run folder)."""

    data_dir: str
    sft_model: str
    ppo_model: str
    reward_model: str
    subset: str = "evaluation"
    num_prompts: int | None = 128
    samples_per_prompt: int = 4
    max_prompt_length: int | None = 512
    output_min_length: int = 32
    output_max_length: int = 128
    temperature: float = 1.0
    batch_size: int = 32
    reward_batch_size: int = 32
    max_length: int | None = 512
    max_eval_pairs: int | None = None
    bootstrap_resamples: int = 2000
    seed: int = 0
    dtype: str | None = "auto"
    trust_remote_code: bool = False
    progress: bool = True
    num_threads: int | None = None
    settings_from: dict = field(default_factory=dict)  # where max_prompt_length / output lengths came from
    extra_policies: list[PolicySpec] = field(default_factory=list)  # compared with SFT beside PPO (DPO, RLOO, GRPO)


def ppo_run_settings(ppo_dir: str | None) -> dict:
    """The PPO run's figures (`ppo_results.json`) that evaluation should match, or {}."""
    if ppo_dir is None:
        return {}
    return read_json(Path(ppo_dir) / run_layout.PPO_RESULTS) or {}


def _check_flags(args: EvaluateScriptArguments) -> None:
    for name in ("num_prompts", "samples_per_prompt", "batch_size", "reward_batch_size", "bootstrap_resamples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        raise InputError(f"--temperature must be positive (sampling), got {args.temperature}")


def _lengths(args: EvaluateScriptArguments, ppo_settings: dict) -> tuple[dict, dict]:
    """`(chosen, settings_from)` of the prompt and response lengths: the flag, else the PPO run's, else the recipe's."""
    chosen, settings_from = {}, {}
    for name in RECIPE_LENGTHS:
        if getattr(args, name) is not None:
            chosen[name], settings_from[name] = getattr(args, name), "flag"
        elif ppo_settings.get(name) is not None:
            chosen[name], settings_from[name] = int(ppo_settings[name]), f"the PPO run ({run_layout.PPO_RESULTS})"
        else:
            chosen[name], settings_from[name] = getattr(RLScriptArguments, name), "the recipe's default"
    low, high = chosen["output_min_length"], chosen["output_max_length"]
    if not 1 <= low < high:
        raise InputError(f"response lengths need 1 <= --output_min_length < --output_max_length, got [{low}, {high})")
    return chosen, settings_from


def extra_policies(compare_with: list[str] | None, output_dir: str) -> list[PolicySpec]:
    """`--compare_with` as policies to load: stage names of the run, NAME=PATH, or `none`; by default each
    of the run's DPO, RLOO and GRPO folders that holds a model."""
    run = run_layout.run_dir(output_dir)
    if compare_with is None:
        return [PolicySpec(stage.upper(), str(run / stage)) for stage in run_layout.OTHER_POLICY_STAGES
                if run_layout.holds_model(run / stage)]
    if [item.lower() for item in compare_with] == ["none"]:
        return []
    specs = []
    for item in compare_with:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = item.upper(), str(run / item.lower())
            if not run_layout.holds_model(path):
                raise InputError(f"--compare_with {item}: no model in {path} (run that stage first, or pass NAME=PATH)")
        if not name or name.upper() in {"SFT", "PPO", *(s.name for s in specs)}:
            raise InputError(f"--compare_with {item}: every policy needs its own name (SFT and PPO are taken)")
        run_layout.check_model_dir(path, f"{name} policy", "--compare_with")
        specs.append(PolicySpec(name.upper(), path))
    return specs


def resolve_inputs(args: EvaluateScriptArguments) -> EvaluationInputs:
    """The evaluation's paths and settings from the flags, the run folder and the PPO run."""
    _check_flags(args)
    data_dir = args.data_dir or run_layout.default_data_dir(args.output_dir)
    check_data_dir(data_dir)
    sft = args.sft_model or run_layout.default_sft_model(args.output_dir, adapter_ok=True, flag="--sft_model")
    ppo = args.ppo_model or run_layout.default_ppo_model(args.output_dir)
    reward = args.reward_model_name or run_layout.default_reward_model(args.output_dir)
    run_layout.check_model_dir(sft, "SFT policy", "--sft_model")
    run_layout.check_model_dir(ppo, "PPO policy", "--ppo_model")
    run_layout.check_model_dir(reward, "reward model", "--reward_model_name")
    chosen, settings_from = _lengths(args, ppo_run_settings(args.ppo_log_dir or (ppo if Path(ppo).is_dir() else None)))
    return EvaluationInputs(
        data_dir=data_dir, sft_model=sft, ppo_model=ppo, reward_model=reward, subset=args.subset,
        num_prompts=args.num_prompts, samples_per_prompt=args.samples_per_prompt,
        max_prompt_length=chosen["max_prompt_length"],
        output_min_length=chosen["output_min_length"], output_max_length=chosen["output_max_length"],
        temperature=args.temperature, batch_size=args.batch_size,
        reward_batch_size=args.reward_batch_size, max_length=args.max_length, max_eval_pairs=args.max_eval_pairs,
        bootstrap_resamples=args.bootstrap_resamples, seed=args.seed, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, num_threads=args.num_threads, settings_from=settings_from,
        extra_policies=extra_policies(args.compare_with, args.output_dir))
