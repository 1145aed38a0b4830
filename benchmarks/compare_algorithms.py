"""Cost of PPO, DPO, RLOO and GRPO on the tiny default: the whole `configs/pipeline/compare.yaml`
run, then each stage's wall time, tokens sampled in training and tokens/s, from the results files
the stages wrote (and the pipeline's own timings).

    python benchmarks/compare_algorithms.py                       # a fresh run in a temporary folder
    python benchmarks/compare_algorithms.py --output_dir runs/compare --reuse   # figures of a finished run

A measurement, never a pass/fail test: figures go to benchmarks/RESULTS.md with the date and machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sft", "reward", "ppo", "dpo", "rloo", "grpo", "evaluate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", help="Run folder (default: a temporary one, removed afterwards).")
    parser.add_argument("--reuse", action="store_true", help="Only read the figures of a run that already finished.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.output_dir or Path(tmp) / "compare")
        seconds = None
        if not args.reuse:
            start = time.time()
            subprocess.run([sys.executable, str(REPO / "scripts" / "run_pipeline.py"), "--config",
                            str(REPO / "configs" / "pipeline" / "compare.yaml"), "--output_dir", str(run)], check=True)
            seconds = time.time() - start
        report(run, seconds)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def report(run: Path, seconds: float | None) -> None:
    import torch

    stages = _read(run / "pipeline_results.json").get("stages", {})
    rows = {row["name"]: row for row in _read(run / "report" / "evaluation_results.json").get("policies", [])}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    if seconds is not None:
        print(f"whole compare.yaml pipeline: {seconds:.0f} s")
    print(f"{'stage':<9}{'stage s':>9}{'tokens sampled':>16}{'tokens/s':>10}   held-out mean score, KL from SFT")
    for stage in STAGES:
        ran = stages.get(stage, {})
        results = _read(run / stage / f"{stage}_results.json")
        tokens = results.get("tokens_generated")
        wall = ran.get("seconds") or results.get("wall_time_s")
        rate = f"{tokens / wall:.0f}" if tokens and wall else "-"
        row = rows.get(stage.upper(), {})
        held_out = (f"{row['mean_score']:+.3f}, {row['kl_from_sft']:.2f} nats" if row else "")
        print(f"{stage:<9}{(f'{wall:.0f}' if wall else '-'):>9}{(tokens if tokens is not None else '-'):>16}"
              f"{rate:>10}   {held_out}")


if __name__ == "__main__":
    main()
