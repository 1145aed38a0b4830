"""The run folder: where each stage writes its output and finds its inputs by default.

A run is one folder (``runs/<run>/``) holding one sub-folder per stage; a stage's
``--output_dir`` is one of them, so its default inputs are its siblings::

    runs/<run>/
      data/          prepare        the pairs (load_dataset-able) and summary.json
      base/          tiny model     the tiny LLaMA-shaped default model and its tokenizer
      sft/           SFT            adapter or full weights, sft_results.json
      sft-merged/    merge          the SFT adapter folded into its base
      reward/        reward model   reward_results.json
      reward-merged/ merge
      ppo/           PPO            policy + value head, ppo_log.jsonl, ppo_results.json
      ppo-merged/    merge
      dpo/ rloo/ grpo/  DPO, RLOO, GRPO  optional policies trained from SFT, compared with PPO
      report/        evaluation     report.md, plots, evaluation_results.json
      logs/          pipeline       one log per stage; pipeline_results.json in the run folder

Each stage writes its results file (``<stage>_results.json``) atomically as its last act, so
its presence marks a completed stage. This module is the one home of these names and of the
default-input lookups; the stages, the pipeline, the evaluation and the report use it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError, MissingInputError

DATA, BASE, SFT, SFT_MERGED, REWARD, PPO, REPORT, LOGS = (
    "data", "base", "sft", "sft-merged", "reward", "ppo", "report", "logs")
DPO, RLOO, GRPO = "dpo", "rloo", "grpo"  # the optional stages compared with PPO (pipeline `algorithms:`)
OTHER_POLICY_STAGES = (DPO, RLOO, GRPO)  # in the order the pipeline runs and the evaluation lists them

# Each stage's results file, written last: its presence marks a completed stage
SFT_RESULTS = "sft_results.json"
REWARD_RESULTS = "reward_results.json"
PPO_RESULTS = "ppo_results.json"
PPO_LOG = "ppo_log.jsonl"
MERGE_RESULTS = "merge_results.json"
EVALUATION_RESULTS = "evaluation_results.json"
EVALUATION_SAMPLES = "evaluation_samples.jsonl"
REPORT_FILE = "report.md"
PIPELINE_RESULTS = "pipeline_results.json"
DATA_SUMMARY = "summary.json"
TINY_MODEL_RESULTS = "tiny_model_build.json"
DPO_RESULTS = "dpo_results.json"
RLOO_RESULTS = "rloo_results.json"
GRPO_RESULTS = "grpo_results.json"
STAGE_RESULTS = {SFT_RESULTS: "sft", REWARD_RESULTS: "reward", PPO_RESULTS: "ppo", DPO_RESULTS: "dpo",
                 RLOO_RESULTS: "rloo", GRPO_RESULTS: "grpo"}


def run_dir(output_dir: str | os.PathLike) -> Path:
    """The run folder that holds every stage's output (``runs/<run>/``): the parent of a stage's
    ``output_dir``. Stages find their inputs there by default (``sft-merged``, ``reward``, ...)."""
    return Path(output_dir).resolve().parent


def merged(folder: str) -> str:
    """The folder a merge of ``folder``'s adapter writes: ``<folder>-merged``."""
    return f"{folder}-merged"


def is_full_model(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "config.json").is_file()


def is_adapter(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def holds_model(folder: str | os.PathLike) -> bool:
    """Full weights or a LoRA adapter."""
    return is_full_model(folder) or is_adapter(folder)


def model_kind(path: str) -> str:
    """``"LoRA adapter"``, ``"full weights"``, or ``"Hub id"`` (not a local folder)."""
    if is_adapter(path):
        return "LoRA adapter"
    if is_full_model(path):
        return "full weights"
    return "Hub id" if not Path(path).exists() else "unknown"


def default_tiny_model_dir(output_dir: str | os.PathLike) -> Path:
    """``<run>/base``: where the SFT stage builds the tiny default model when no base model is given."""
    return run_dir(output_dir) / BASE


def default_data_dir(output_dir: str | os.PathLike) -> str:
    return str(run_dir(output_dir) / DATA)


def default_sft_model(output_dir: str | os.PathLike, adapter_ok: bool = False, flag: str = "--model_name_or_path") -> str:
    """The SFT stage's model beside this run's output: ``sft-merged`` if present, else ``sft``;
    full weights only unless ``adapter_ok`` (the evaluation needs no merge)."""
    run = run_dir(output_dir)
    for candidate in (run / SFT_MERGED, run / SFT):
        if is_full_model(candidate) or (adapter_ok and is_adapter(candidate)):
            return str(candidate)
    need = "" if adapter_ok else " (full weights): run scripts/sft.py with --merge"
    raise MissingInputError(f"no SFT model in {run / SFT_MERGED} or {run / SFT}{need or ': run scripts/sft.py'} "
                            f"first, or pass {flag}")


def default_reward_model(output_dir: str | os.PathLike) -> str:
    """The reward stage's model beside this run's output (``runs/<run>/reward``)."""
    path = run_dir(output_dir) / REWARD
    if holds_model(path):
        return str(path)
    raise MissingInputError(f"no reward model in {path}: run scripts/reward_modeling.py first, or pass --reward_model_name")


def default_ppo_model(output_dir: str | os.PathLike) -> str:
    path = run_dir(output_dir) / PPO
    if holds_model(path):
        return str(path)
    raise MissingInputError(f"no PPO policy in {path}: run scripts/rl_ppo.py first, or pass --ppo_model")


def check_model_dir(path: str, what: str, flag: str, adapter_ok: bool = True) -> None:
    """A local-looking path that does not hold a model gets a one-line error (not a Hub lookup)."""
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith(".") or path.count("/") != 1 or p.exists()
    if not looks_local or is_full_model(p):
        return
    if is_adapter(p):
        if adapter_ok:
            return
        raise InputError(f"{what} {path} is a LoRA adapter: merge it into full weights first "
                         f"(scripts/sft.py --merge writes <output_dir>-merged) and pass that with {flag}")
    raise MissingInputError(f"{what} {path} not found (no config.json or adapter_config.json there): check {flag}")
