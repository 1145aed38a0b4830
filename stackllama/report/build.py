"""`build_report`: the plots the logs allow and report.md, written into one folder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..atomic import write_text
from ..run_layout import REPORT_FILE
from .logs import LogSources, TrainingLogs
from .plots import PPO_PLOT, REWARD_PLOT, SFT_PLOT, plot_ppo, plot_reward, plot_sft
from .sections import render_report
from .verdict import verdict

logger = logging.getLogger(__name__)



def build_report(output_dir: str | Path, results: dict | None, samples: Sequence[dict],
                 logs: TrainingLogs | LogSources, run: str | None = None, num_examples: int = 4, seed: int = 0) -> dict:
    """Draws the plots the logs allow and writes report.md into `output_dir`.

    Returns `{"report": path, "plots": {...}, "missing": [...], "verdict": str | None}`; a missing log only
    skips its plot (the report says which file was absent).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(logs, LogSources):
        logs = TrainingLogs.load(logs)
    plots: dict[str, str | None] = {"sft": None, "reward": None, "ppo": None}
    if logs.sft_history is not None:
        plots["sft"] = plot_sft(logs.sft_history, logs.sft_results, output_dir / SFT_PLOT).name
    if logs.reward_history is not None:
        plots["reward"] = plot_reward(logs.reward_history, logs.reward_results, output_dir / REWARD_PLOT).name
    if logs.ppo_rows:
        plots["ppo"] = plot_ppo(logs.ppo_rows, output_dir / PPO_PLOT).name
    text_verdict = None
    if results:
        text_verdict = verdict(results, logs)  # recomputed: the logs may have changed since the evaluation
        results = {**results, "verdict": text_verdict}
    text = render_report(results, samples, logs, plots, run=run, num_examples=num_examples, seed=seed)
    path = write_text(output_dir / REPORT_FILE, text)
    for line in logs.missing:
        logger.info("report: not plotted, %s", line.replace("`", ""))
    return {"report": str(path), "plots": plots, "missing": logs.missing, "verdict": text_verdict}
