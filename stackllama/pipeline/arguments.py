"""The driver's flags (:class:`PipelineArguments`), the default config, and the check of the
per-stage settings (:func:`check_config`) that turns them into one mapping per stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PipelineError
from .stages import ALGORITHMS, REPO_ROOT, STAGE_NAMES

LAUNCHERS = ("python", "accelerate", "torchrun")
STAGE_KEYS = {"config", "args", "launcher", "skip"}
DEFAULT_CONFIG = "configs/pipeline/tiny.yaml"


@dataclass
class PipelineArguments:
    """The run: where it goes, which model starts it, how training stages are launched.

    Everything can be set in the `--config` YAML (top-level keys as below) and overridden on
    the command line. Per-stage settings live under `stages:` in the YAML (see
    configs/pipeline/tiny.yaml): each stage takes `config` (that stage's own YAML), `args`
    (extra flags for its script), `launcher` and `skip`.
    """

    output_dir: str = field(default="runs/tiny", metadata={
        "help": "The run folder: every stage writes its own sub-folder here (data/, base/, sft/, reward/, ppo/, "
                "report/), plus logs/ (one log per stage) and pipeline_results.json."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Base model (Hub id or folder) for SFT. Default: build the tiny LLaMA from the prepared data "
                "(the `tiny_model` stage)."})
    launcher: str = field(default="python", metadata={
        "help": "How the training stages (sft, reward, ppo) run: `python` (one process), `accelerate` "
                "(`accelerate launch --config_file <accelerate_config>`) or `torchrun` "
                "(`torchrun --nproc_per_node <num_processes>`). The other stages always run with python.",
        "choices": list(LAUNCHERS)})
    accelerate_config: str | None = field(default=None, metadata={
        "help": "Config file for `accelerate launch`, e.g. accelerate_configs/multi_gpu.yaml."})
    num_processes: int | None = field(default=None, metadata={
        "help": "Processes per machine for the training stages (torchrun needs it; overrides the accelerate "
                "config's)."})
    algorithms: list[str] = field(default_factory=lambda: ["ppo"], metadata={
        "help": "Which policy-optimisation stages train from the SFT model: ppo (the recipe's, always), plus any of "
                "dpo, rloo, grpo. The evaluation compares every one of them with SFT in one table "
                "(configs/pipeline/compare.yaml runs all four)."})
    stages: dict | None = field(default=None, metadata={
        "help": "Per-stage settings (YAML only): {stage: {config: file.yaml, args: {flag: value}, launcher: ..., "
                "skip: bool}}."})
    force: bool = field(default=False, metadata={"help": "Redo every stage, even those already complete."})
    from_stage: str | None = field(default=None, metadata={
        "help": "Redo this stage and every stage after it (earlier complete stages are reused)."})
    until_stage: str | None = field(default=None, metadata={"help": "Stop after this stage."})
    dry_run: bool = field(default=False, metadata={
        "help": "Print the command of every stage (with its launcher) and whether it would run, without running."})
    verbose: bool = field(default=False, metadata={
        "help": "Stream each stage's output to the console as well as to logs/<stage>.log."})
    progress_interval: float = field(default=30.0, metadata={
        "help": "Seconds between the progress lines printed while a stage runs when the output is not a terminal "
                "(a file, CI): the stage's step k of n, rate and time left, read from its own progress bar. "
                "0: none. On a terminal the same figures are one line rewritten in place; with --verbose, the "
                "stage's raw output is shown instead."})


def resolve_path(path: str) -> str:
    """A repository file (config) named relative to the current folder, else to the repository root,
    so the driver runs from anywhere."""
    if Path(path).exists() or Path(path).is_absolute() or not (REPO_ROOT / path).exists():
        return path
    return str(REPO_ROOT / path)


def with_default_config(argv: list[str]) -> list[str]:
    """`argv` with `--config configs/pipeline/tiny.yaml` in front when no --config is given."""
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    return ["--config", resolve_path(DEFAULT_CONFIG)] + argv


def check_config(args: PipelineArguments, source: str = "the pipeline config") -> dict[str, dict]:
    """Validate the per-stage settings; return {stage: {config, args, launcher, skip}} for every stage."""
    if args.launcher not in LAUNCHERS:
        raise PipelineError(f"launcher {args.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if args.launcher == "torchrun" and not args.num_processes:
        raise PipelineError("launcher torchrun needs num_processes (processes per machine)")
    if args.accelerate_config:
        args.accelerate_config = resolve_path(args.accelerate_config)
    if args.launcher == "accelerate" and args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise PipelineError(f"accelerate_config {args.accelerate_config} not found")
    unknown = [a for a in args.algorithms if a not in ALGORITHMS]
    if unknown or "ppo" not in args.algorithms:
        raise PipelineError(f"algorithms {args.algorithms} must include ppo (the evaluation compares against it) and "
                            f"name only {', '.join(ALGORITHMS)}" + (f": {unknown[0]!r} is not one" if unknown else ""))
    for flag in ("from_stage", "until_stage"):
        value = getattr(args, flag)
        if value is not None and value not in STAGE_NAMES:
            raise PipelineError(f"--{flag} {value!r} is not a stage: {', '.join(STAGE_NAMES)}")
    stages = args.stages or {}
    if not isinstance(stages, dict):
        raise PipelineError(f"{source}: `stages` must be a mapping of stage name to settings")
    for name in stages:
        if name not in STAGE_NAMES:
            raise PipelineError(f"{source}: unknown stage {name!r} under `stages` (stages: {', '.join(STAGE_NAMES)})")
    return {name: _check_stage(name, stages.get(name) or {}, source) for name in STAGE_NAMES}


def _check_stage(name: str, stage, source: str) -> dict:
    """One stage's settings, checked, with the defaults filled in and its config path resolved."""
    if not isinstance(stage, dict):
        raise PipelineError(f"{source}: stages.{name} must be a mapping")
    unknown = set(stage) - STAGE_KEYS
    if unknown:
        raise PipelineError(f"{source}: unknown key stages.{name}.{sorted(unknown)[0]} "
                            f"(allowed: {', '.join(sorted(STAGE_KEYS))})")
    stage_args = stage.get("args") or {}
    if not isinstance(stage_args, dict):
        raise PipelineError(f"{source}: stages.{name}.args must be a mapping of flag to value")
    config = stage.get("config")
    if config is not None:
        config = resolve_path(config)
        if not Path(config).is_file():
            raise PipelineError(f"{source}: stages.{name}.config {config} not found")
    launcher = stage.get("launcher")
    if launcher is not None and launcher not in LAUNCHERS:
        raise PipelineError(f"{source}: stages.{name}.launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    return {"config": config, "args": stage_args, "launcher": launcher, "skip": bool(stage.get("skip"))}
