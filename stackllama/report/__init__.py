"""The run's report: training curves from the stages' logs, the policy comparison, `report.md`.

Everything here reads files and writes files; nothing trains or generates, so a report can be
rebuilt at any time (`scripts/evaluate.py --report_only`) and tested on small fake logs.

- `logs`: reads the stages' logs (`trainer_state.json`, the `*_results.json`, `ppo_log.jsonl`),
  each optional: a missing one skips its plot and the report names the absent file;
- `plots`: the training-curve PNGs and `comparison.png` (every policy's reward against KL);
- `verdict`: whether PPO beats SFT, the likely reasons and caveats; with DPO / RLOO / GRPO, which
  method the reward model ranks first and whether its lead survives length control;
- `formatting`, `samples`, `sections`: the text of report.md;
- `build`: `build_report`, which draws the plots and writes report.md.
"""

from .build import REPORT_FILE, build_report
from .formatting import fenced
from .logs import (
    LogSources,
    TrainingLogs,
    read_json,
    read_ppo_log,
    read_trainer_history,
)
from .plots import COMPARISON_PLOT, PPO_PLOT, REWARD_PLOT, SFT_PLOT
from .samples import choose_examples
from .sections import render_report
from .verdict import comparison_headline, comparison_verdict, compares_policies, full_verdict, headline, verdict

__all__ = [
    "COMPARISON_PLOT", "PPO_PLOT", "REPORT_FILE", "REWARD_PLOT", "SFT_PLOT", "LogSources", "TrainingLogs",
    "build_report", "choose_examples", "comparison_headline", "comparison_verdict", "compares_policies", "fenced",
    "full_verdict", "headline", "read_json", "read_ppo_log", "read_trainer_history", "render_report", "verdict",
]
