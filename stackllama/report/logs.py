"""Reading the stages' logs: the HF Trainer's history, the results files, the PPO step log.

Each log is optional: a missing one is recorded in `TrainingLogs.missing` (one line naming the
absent file), so the report skips its plot and says why. The optional stages (DPO, RLOO, GRPO)
count as missing only when their folder exists or the evaluation compared their policy
(:meth:`TrainingLogs.expecting`): most runs train none of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..run_layout import (
    DPO,
    GRPO,
    PPO,
    PPO_LOG,
    PPO_RESULTS,
    REWARD,
    REWARD_RESULTS,
    RLOO,
    SFT,
    SFT_RESULTS,
)

TRAINER_STATE = "trainer_state.json"
# The optional stages whose TRL trainer_state.json the comparison plots, and what it shows of each
OPTIONAL_STAGES = {DPO: "DPO reward margins / accuracy", RLOO: "RLOO training reward", GRPO: "GRPO training reward"}


def read_json(path: str | Path) -> dict | None:
    """The JSON object in `path`, or None when it is absent or unreadable."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_trainer_history(folder: str | Path | None) -> list[dict] | None:
    """`log_history` of the HF Trainer's `trainer_state.json` in `folder`, or None."""
    if folder is None:
        return None
    state = read_json(Path(folder) / TRAINER_STATE)
    history = state.get("log_history") if state else None
    return history if isinstance(history, list) else None


def read_ppo_log(path: str | Path) -> tuple[list[dict] | None, list[str]]:
    """`(rows, notes)`: the scalar statistics of each PPO step (sample rows left out).

    A file that holds several runs (`env/step` starting again) gives its last run; lines that
    do not parse (a run killed mid-write) are skipped; both are said in `notes`.
    """
    path = Path(path)
    if not path.is_file():
        return None, []
    runs: list[list[dict]] = [[]]
    bad = 0
    last_step = None
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if not isinstance(row, dict):
                bad += 1
                continue
            row = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            step = row.get("env/step")
            if step is not None and last_step is not None and step <= last_step and runs[-1]:
                runs.append([])
            last_step = step if step is not None else last_step
            runs[-1].append(row)
    notes = []
    if len(runs) > 1:
        notes.append(f"`{path}` holds {len(runs)} runs (`env/step` starts again); the plots show the last one.")
    if bad:
        notes.append(f"`{path}`: {bad} line(s) that are not JSON were skipped.")
    return runs[-1], notes


@dataclass
class LogSources:
    """The stage folders whose logs the report reads (None: not available)."""

    sft_dir: Path | None = None
    reward_dir: Path | None = None
    ppo_dir: Path | None = None
    dpo_dir: Path | None = None
    rloo_dir: Path | None = None
    grpo_dir: Path | None = None

    @classmethod
    def for_run(cls, run: str | Path, sft_dir=None, reward_dir=None, ppo_dir=None, reward_model: str | None = None,
                ppo_model: str | None = None, dpo_dir=None, rloo_dir=None, grpo_dir=None,
                dpo_model: str | None = None, rloo_model: str | None = None,
                grpo_model: str | None = None) -> LogSources:
        """Given folders win; else the stage's model's own folder (where its stage wrote its logs) when
        it is local, else `<run>/sft`, `<run>/reward`, `<run>/ppo`, `<run>/dpo`, ... (:mod:`stackllama.run_layout`).
        The SFT logs are in `sft/`, not `sft-merged/`, so they always default to the run folder."""
        run = Path(run)

        def local(path):
            return Path(path) if path and Path(path).is_dir() else None

        def folder(given, model, name):
            return Path(given) if given else local(model) or run / name

        return cls(
            sft_dir=Path(sft_dir) if sft_dir else run / SFT,
            reward_dir=folder(reward_dir, reward_model, REWARD),
            ppo_dir=folder(ppo_dir, ppo_model, PPO),
            dpo_dir=folder(dpo_dir, dpo_model, DPO),
            rloo_dir=folder(rloo_dir, rloo_model, RLOO),
            grpo_dir=folder(grpo_dir, grpo_model, GRPO),
        )


@dataclass
class TrainingLogs:
    """What the report read from a run's logs (None: that log is absent or unreadable)."""

    sft_history: list[dict] | None = None
    sft_results: dict | None = None
    reward_history: list[dict] | None = None
    reward_results: dict | None = None
    ppo_rows: list[dict] | None = None
    ppo_results: dict | None = None
    dpo_history: list[dict] | None = None
    rloo_history: list[dict] | None = None
    grpo_history: list[dict] | None = None
    missing: list[str] = field(default_factory=list)  # one line per absent log
    notes: list[str] = field(default_factory=list)
    # optional stage -> its `missing` line, held back while nothing says the stage ran
    unexpected: dict[str, str] = field(default_factory=dict)

    def history(self, stage: str) -> list[dict] | None:
        """The `log_history` of an optional stage (`dpo`, `rloo`, `grpo`), or None."""
        return getattr(self, f"{stage}_history") if stage in OPTIONAL_STAGES else None

    def expecting(self, stages) -> TrainingLogs:
        """A copy whose `missing` also names the absent logs of `stages` (the policies the evaluation
        compared), which a run without those stages does not count as missing."""
        extra = [self.unexpected[s] for s in stages if s in self.unexpected]
        if not extra:
            return self
        return replace(self, missing=self.missing + extra,
                       unexpected={s: line for s, line in self.unexpected.items() if s not in stages})

    @classmethod
    def load(cls, sources: LogSources) -> TrainingLogs:
        logs = cls()

        def where(folder, name):
            return f"`{Path(folder) / name}`" if folder is not None else f"`{name}` (no folder known)"

        if sources.sft_dir is not None:
            logs.sft_history = read_trainer_history(sources.sft_dir)
            logs.sft_results = read_json(Path(sources.sft_dir) / SFT_RESULTS)
        if logs.sft_history is None:
            logs.missing.append(f"SFT loss: {where(sources.sft_dir, TRAINER_STATE)} not found")
        if sources.reward_dir is not None:
            logs.reward_history = read_trainer_history(sources.reward_dir)
            logs.reward_results = read_json(Path(sources.reward_dir) / REWARD_RESULTS)
        if logs.reward_history is None:
            logs.missing.append(f"reward-model loss / accuracy: {where(sources.reward_dir, TRAINER_STATE)} not found")
        if sources.ppo_dir is not None:
            logs.ppo_rows, notes = read_ppo_log(Path(sources.ppo_dir) / PPO_LOG)
            logs.notes.extend(notes)
            logs.ppo_results = read_json(Path(sources.ppo_dir) / PPO_RESULTS)
        if not logs.ppo_rows:
            logs.ppo_rows = None
            logs.missing.append(f"PPO statistics: {where(sources.ppo_dir, PPO_LOG)} not found or empty")
        for stage, what in OPTIONAL_STAGES.items():
            folder = getattr(sources, f"{stage}_dir")
            history = read_trainer_history(folder)
            setattr(logs, f"{stage}_history", history)
            if history is None:
                line = f"{what}: {where(folder, TRAINER_STATE)} not found"
                if folder is not None and Path(folder).is_dir():
                    logs.missing.append(line)
                else:
                    logs.unexpected[stage] = line
        return logs
