"""`build_report`: the plots the logs allow and report.md, written into one folder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..atomic import write_text
from ..run_layout import REPORT_FILE
from .logs import LogSources, TrainingLogs
from .logs import OPTIONAL_STAGES
from .plots import (
    COMPARISON_PLOT,
    PPO_PLOT,
    REWARD_PLOT,
    SFT_PLOT,
    plot_comparison,
    plot_ppo,
    plot_reward,
    plot_sft,
)
from .sections import render_report
from .verdict import comparison_headline, compares_policies, full_verdict

logger = logging.getLogger(__name__)


def build_report(output_dir: str | Path, results: dict | None, samples: Sequence[dict],
                 logs: TrainingLogs | LogSources, run: str | None = None, num_examples: int = 4, seed: int = 0) -> dict:
    """Draws the plots the logs allow and writes report.md into `output_dir`.

    Returns `{"report": path, "plots": {...}, "missing": [...], "verdict": str | None, "comparison_headline":
    str | None}`; a missing log only skips its plot (the report says which file was absent). With more than two
    policies (SFT, PPO and DPO / RLOO / GRPO) the verdict is the comparison of every method followed by PPO
    against SFT, and `comparison.png` is drawn.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(logs, LogSources):
        logs = TrainingLogs.load(logs)
    compared = compares_policies(results)
    if compared:  # a compared stage's absent log is missing, not merely a stage the run did not train
        logs = logs.expecting([p.get("stage") for p in results["policies"]])
    plots: dict[str, str | None] = {"sft": None, "reward": None, "ppo": None, "comparison": None}
    if logs.sft_history is not None:
        plots["sft"] = plot_sft(logs.sft_history, logs.sft_results, output_dir / SFT_PLOT).name
    if logs.reward_history is not None:
        plots["reward"] = plot_reward(logs.reward_history, logs.reward_results, output_dir / REWARD_PLOT).name
    if logs.ppo_rows:
        plots["ppo"] = plot_ppo(logs.ppo_rows, output_dir / PPO_PLOT).name
    if compared:
        histories = {stage: logs.history(stage) for stage in OPTIONAL_STAGES}
        plots["comparison"] = plot_comparison(results["policies"], output_dir / COMPARISON_PLOT, logs.ppo_rows,
                                              histories).name
    text_verdict = None
    if results:
        text_verdict = full_verdict(results, logs)  # recomputed: the logs may have changed since the evaluation
        results = {**results, "verdict": text_verdict}
    text = render_report(results, samples, logs, plots, run=run, num_examples=num_examples, seed=seed)
    path = write_text(output_dir / REPORT_FILE, text)
    for line in logs.missing:
        logger.info("report: not plotted, %s", line.replace("`", ""))
    return {"report": str(path), "plots": plots, "missing": logs.missing, "verdict": text_verdict,
            "comparison_headline": comparison_headline(results) if compared else None}
