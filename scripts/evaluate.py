"""Evaluation, the last stage of the StackLLaMA recipe: does the PPO policy answer held-out
questions better than the SFT policy it started from, by the reward model's judgement? And, when the
run trained them, do DPO, RLOO or GRPO (`--compare_with`), on the same questions?

Both policies answer the same `evaluation` questions (same length limits, same seeds); the
report gives each policy's mean reward-model score, the paired difference and the PPO win rate
with bootstrap 95% intervals over questions, KL(PPO || SFT), answer length, the share of
answers ending with EOS and of degenerate (repeated-line) answers, the reward model's accuracy
on the evaluation pairs, sample answers side by side, and plots of the training logs.

CPU, no download (the other stages' outputs in runs/tiny):
```bash
python scripts/evaluate.py                         # -> runs/tiny/report/report.md
python scripts/evaluate.py --report_only           # redraw report.md and the plots, no generation
python scripts/evaluate.py --output_dir runs/llama-7b/report --num_prompts 512 --dtype bfloat16
```

Outputs in --output_dir (written to a temporary folder beside it and moved into place when
complete): report.md, *.png, evaluation_samples.jsonl (every answer and score) and
evaluation_results.json, the completion marker.
"""

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
import logging
import time
from pathlib import Path

from stackllama.atomic import staged_dir
from stackllama.errors import MissingInputError
from stackllama.evaluation import (
    SAMPLES_FILE,
    EvaluateScriptArguments,
    evaluate_policies,
    read_samples,
    resolve_inputs,
    write_samples,
)
from stackllama.report import (
    LogSources,
    TrainingLogs,
    build_report,
    headline,
    read_json,
)
from stackllama.run_layout import EVALUATION_RESULTS, REPORT_FILE, run_dir
from stackllama.stage import run_script, write_results

logger = logging.getLogger("stackllama.evaluation")


def log_sources(args: EvaluateScriptArguments, results: dict | None = None) -> LogSources:
    results = results or {}
    return LogSources.for_run(run_dir(args.output_dir), args.sft_log_dir, args.reward_log_dir, args.ppo_log_dir,
                              reward_model=args.reward_model_name or results.get("reward_model"),
                              ppo_model=args.ppo_model or results.get("ppo_model"))


def report_only(args: EvaluateScriptArguments) -> dict:
    """Redraw report.md and the plots in output_dir from the logs and the saved evaluation."""
    output_dir = Path(args.output_dir)
    results = read_json(output_dir / EVALUATION_RESULTS)
    logs = TrainingLogs.load(log_sources(args, results))
    if results is None:
        if logs.sft_history is None and logs.reward_history is None and logs.ppo_rows is None:
            raise MissingInputError(f"nothing to report: no {EVALUATION_RESULTS} in {output_dir} and no training "
                                    f"log in {run_dir(output_dir)} ({'; '.join(m.replace('`', '') for m in logs.missing)})")
        logger.warning("no %s in %s: the report shows the training curves only", EVALUATION_RESULTS, output_dir)
    summary = build_report(output_dir, results, read_samples(output_dir / SAMPLES_FILE), logs,
                           run=str(run_dir(output_dir)), num_examples=args.num_examples, seed=args.seed)
    logger.info("report rebuilt: %s", summary["report"])
    return results or {}


def main(args: EvaluateScriptArguments) -> dict:
    start = time.time()
    if args.report_only:
        return report_only(args)
    inputs = resolve_inputs(args)
    output_dir = Path(args.output_dir)
    results, samples = evaluate_policies(inputs)
    results = {"run_dir": str(run_dir(output_dir)), **results}

    # Everything goes to a temporary folder beside output_dir, moved into place when complete
    with staged_dir(output_dir) as tmp:
        write_samples(tmp / SAMPLES_FILE, samples)
        results["wall_time_s"] = round(time.time() - start, 1)
        summary = build_report(tmp, results, samples, log_sources(args, results), run=results["run_dir"],
                               num_examples=args.num_examples, seed=args.seed)
        results.update({"verdict": summary["verdict"], "verdict_headline": headline(results),
                        "comparison_headline": summary["comparison_headline"],  # None: SFT and PPO only
                        "missing_logs": summary["missing"],
                        "wall_time_s": round(time.time() - start, 1)})
        write_results(tmp, EVALUATION_RESULTS, results)  # last: the completion marker
    logger.info("mean score SFT %.3f, PPO %.3f. %s", results["sft"]["mean_score"], results["ppo"]["mean_score"],
                results["verdict_headline"])
    if results["comparison_headline"]:
        logger.info("%s", results["comparison_headline"])
    logger.info("report in %s (%.0f s)", output_dir / REPORT_FILE, results["wall_time_s"])
    return results


if __name__ == "__main__":
    run_script(main, (EvaluateScriptArguments,), __doc__)
